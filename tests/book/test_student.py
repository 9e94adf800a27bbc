"""The student edition: every solution removed, every exercise kept, built from the executed copies."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from embgeo_utils.book import runner, student
from embgeo_utils.core.errors import SiteError

ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = runner.chapter_sources(ROOT)


def _md(text: str, i: int) -> dict:
    return {"cell_type": "markdown", "id": f"m{i}", "metadata": {}, "source": text.splitlines(keepends=True)}


def _code(text: str, i: int) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": text}


def _texts(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"]]


def test_a_solution_over_several_cells_goes_and_its_exercise_stays():
    nb = {
        "cells": [
            _md("```{exercise} Why?\n:label: ch09-why\n\nSay why.\n```", 0),
            _md("```{solution-start} ch09-why\n:class: dropdown\n```", 1),
            _code("secret_answer()", 2),
            _md("Because of the answer.\n\n```{solution-end}\n```", 3),
            _md("## References", 4),
        ]
    }
    out = student.strip_solutions(nb)
    assert _texts(out) == ["```{exercise} Why?\n:label: ch09-why\n\nSay why.\n```", "## References"]
    assert [c["id"] for c in out["cells"]] == ["m0", "m4"] and len(nb["cells"]) == 5  # the input is left as it was


def test_text_around_a_solution_in_the_same_cells_stays():
    nb = {
        "cells": [
            _md("Before.\n\n```{solution-start} x\n```\nhidden start", 0),
            _code("hidden()", 1),
            _md("hidden end\n````{solution-end}\n````\nAfter.", 2),
            _md("Kept\n:::{solution} y\n:class: dropdown\nsecret\n```python\nx = 1\n```\n:::\nstill kept", 3),
        ]
    }
    assert _texts(student.strip_solutions(nb)) == ["Before.\n\n", "After.", "Kept\nstill kept"]


def test_a_solution_left_open_is_refused():
    with pytest.raises(SiteError, match="never closed"):
        student.strip_solutions({"cells": [_md("```{solution-start} x\n```", 0), _code("x", 1)]})


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_keeps_its_exercises_and_loses_its_solutions(path):
    nb = json.loads(path.read_text())
    out = json.dumps(student.strip_solutions(nb))
    labels = re.findall(r":label: ([\w-]+)", json.dumps(nb))
    assert labels and all(f":label: {label}" in out for label in labels)
    assert not re.search(r"\{solution(-start|-end)?\}", out)
    assert len(re.findall(r"\{solution-start\}", json.dumps(nb))) == len(labels)


# -- the built edition ---------------------------------------------------------------------------


class _Text(HTMLParser):
    """The text of a page's article (what a reader sees), and the ids and classes of its elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.ids: set[str] = set()
        self.classes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.ids.add(a.get("id") or "")
        self.classes.update((a.get("class") or "").split())

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _page(path: Path) -> _Text:
    parser = _Text()
    parser.feed(path.read_text())
    parser.text = " ".join("".join(parser.parts).split())  # type: ignore[attr-defined]
    return parser


def _fragments(executed: Path) -> list[str]:
    """Pieces of solution text and code that appear nowhere else in the notebook (what must not leak)."""
    nb = json.loads(executed.read_text())
    kept_ids = {c["id"] for c in student.strip_solutions(nb)["cells"]}
    kept = " ".join(" ".join("".join(c["source"]).split()) for c in nb["cells"] if c["id"] in kept_ids)
    found = []
    for cell in nb["cells"]:
        if cell["id"] in kept_ids:
            continue
        text = "".join(cell["source"])
        if cell["cell_type"] == "code":
            found += [" ".join(line.split()) for line in text.splitlines() if len(line.strip()) >= 24]
        else:
            found += [f.strip() for f in re.findall(r"[A-Za-z0-9 ,;:()]{40,}", " ".join(text.split()))]
    return [f for f in found if f not in kept]


@pytest.mark.slow
def test_the_student_edition_has_every_exercise_and_no_solution(small_book, small_build):
    assert small_build.returncode == 0, "the small book did not build; test_book_builds_without_warnings shows why"
    html = student.build(small_book, small_book / "_build" / "student")
    full = small_book / "_build" / "html"
    for source in runner.chapter_sources(small_book):
        executed = small_book / "_executed" / source.name
        labels = re.findall(r":label: ([\w-]+)", executed.read_text())
        fragments = _fragments(executed)
        whole, edition = (
            _page(full / "_executed" / f"{source.stem}.html"),
            _page(html / "_executed" / f"{source.stem}.html"),
        )
        assert fragments and all(f in whole.text for f in fragments), source.stem  # the check can see a solution
        assert [f for f in fragments if f in edition.text] == [], source.stem
        assert set(labels) <= edition.ids and "solution" not in edition.classes
        assert "colab.research.google.com" not in (html / "_executed" / f"{source.stem}.html").read_text()
        handout = json.loads((small_book / "_build" / "student" / "notebooks" / source.name).read_text())
        assert not re.search(r"\{solution(-start|-end)?\}", json.dumps(handout)), source.stem
    intro = _page(html / "book" / "intro.html").text
    assert "student edition" in intro and "launch buttons" not in intro
