"""The student edition: the same book with every solution removed and every exercise kept (``make book-student``).

The chapters end with sphinx-exercise exercises. A solution is either a gated block spread over cells (a markdown
cell opening it with a ``solution-start`` directive, the solution's code cells, a markdown cell with the answer
that ends with ``solution-end``) or one ``solution`` directive inside a markdown cell. :func:`strip_solutions`
removes both forms, text, code and outputs, and leaves the rest of every cell as it was.

:func:`build` makes the edition from the executed copies in ``_executed/`` without running anything: it copies
them with ``book/``, ``_toc.yml`` and ``_config.yml`` into a staging folder, strips every notebook, and runs
Jupyter Book there with ``embgeo_edition: student`` (pages may say ``{only} student``) and without launch buttons
(they open the repository's notebooks, solutions included). The HTML goes to ``<out>/html``; the chapters' source
notebooks, stripped the same way, go to ``<out>/notebooks`` for handing out.
``python -m embgeo_utils.book.student`` does this for ``make book-student``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import SiteError
from .launch import hosting_note
from .parameters import chapter_sources
from .publish import HOSTING_NOTE_TAG

__all__ = [
    "build",
    "make_student_source",
    "strip_solutions",
    "strip_text",
]


def _block(name: str) -> re.Pattern[str]:
    """A fenced MyST directive ``{name}`` (backticks or colons), from its opening fence to the matching close."""
    return re.compile(rf"^(?P<fence>`{{3,}}|:{{3,}})\{{{name}\}}.*?^(?P=fence)[ \t]*$\n?", re.M | re.S)


_START, _END, _SOLUTION = _block("solution-start"), _block("solution-end"), _block("solution")


def strip_text(text: str, inside: bool = False) -> tuple[str, bool]:
    """Remove the solutions from a markdown cell's text; returns the text left and whether a gated solution is open.

    Args:
        text: the cell's markdown.
        inside: a ``solution-start`` of an earlier cell is still open (everything up to its ``solution-end`` goes).
    """
    kept: list[str] = []
    pos = 0
    while True:
        if inside:
            end = _END.search(text, pos)
            if end is None:
                return "".join(kept), True
            pos, inside = end.end(), False
            continue
        found = [m for m in (_START.search(text, pos), _SOLUTION.search(text, pos)) if m is not None]
        if not found:
            kept.append(text[pos:])
            return "".join(kept), False
        first = min(found, key=lambda m: m.start())
        kept.append(text[pos : first.start()])
        pos, inside = first.end(), first.re is _START


def strip_solutions(nb: dict[str, Any]) -> dict[str, Any]:
    """``nb`` (a notebook as JSON) without its solutions; cells left empty are dropped, the rest keep their ids.

    Raises:
        SiteError: a ``solution-start`` that no ``solution-end`` closes (the notebook would lose every later cell).
    """
    cells, inside = [], False
    for cell in nb["cells"]:
        if cell["cell_type"] != "markdown":
            if not inside:
                cells.append(cell)
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        text, inside = strip_text(source, inside)
        if text == source:
            cells.append(cell)
        elif text.strip():
            cells.append({**cell, "source": text.splitlines(keepends=True)})
    if inside:
        raise SiteError("A solution-start is never closed by a solution-end; close it in the notebook's last cells.")
    return {**nb, "cells": cells}


def _strip_file(source: Path, target: Path, root: Path) -> None:
    """Write ``source`` without its solutions to ``target``, with the student edition's note on Colab and Binder."""
    nb = strip_solutions(json.loads(source.read_text()))
    for cell in nb["cells"]:
        if HOSTING_NOTE_TAG in cell.get("metadata", {}).get("tags", []):
            note = hosting_note(source.stem, root, edition="student") or ""
            cell["source"] = note.splitlines(keepends=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def _student_config(config: dict[str, Any]) -> dict[str, Any]:
    """The book's configuration for the student edition: its own title, the edition tag, no launch buttons."""
    config = dict(config)
    config["title"] = f"{config.get('title', 'embgeo')} (student edition)"
    config.pop("launch_buttons", None)
    sphinx = dict(config.get("sphinx") or {})
    sphinx["config"] = {**(sphinx.get("config") or {}), "embgeo_edition": "student"}
    config["sphinx"] = sphinx
    return config


def make_student_source(root: str | Path, stage: str | Path, executed: str = "_executed") -> Path:
    """Copy the executed book into ``stage`` with every notebook stripped of its solutions; returns ``stage``.

    Raises:
        SiteError: ``<root>/<executed>`` holds no executed chapter (run ``make book`` first).
    """
    root, stage = Path(root), Path(stage)
    done = root / executed
    if not any(done.glob("[0-9][0-9]_*.ipynb")):
        raise SiteError(f"No executed chapters in {done}; run `make book` (or the runner) first, then this.")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    shutil.copytree(done, stage / "_executed", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(root / "book", stage / "book")
    shutil.copy(root / "_toc.yml", stage / "_toc.yml")
    config = yaml.safe_load((root / "_config.yml").read_text())
    (stage / "_config.yml").write_text(yaml.safe_dump(_student_config(config), sort_keys=False, allow_unicode=True))
    for notebook in [*stage.glob("_executed/*.ipynb"), *stage.glob("book/*.ipynb")]:
        _strip_file(notebook, notebook, root)
    return stage


def build(root: str | Path = ".", out: str | Path = "_build/student", executed: str = "_executed") -> Path:
    """Build the student edition into ``<out>/html`` and the stripped source notebooks into ``<out>/notebooks``.

    Raises:
        SiteError: nothing executed yet, or Jupyter Book failed (its output's end is in the message).
    """
    root, out = Path(root), Path(out)
    stage = make_student_source(root, out / "source", executed)
    jb = Path(sys.executable).with_name("jupyter-book")
    command = [str(jb if jb.exists() else shutil.which("jupyter-book") or "jupyter-book"), "build", str(stage)]
    done = subprocess.run([*command, "-W", "-n", "--keep-going"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SiteError(f"The student edition did not build:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
    html = out / "html"
    if html.exists():
        shutil.rmtree(html)
    shutil.copytree(stage / "_build" / "html", html)
    for source in chapter_sources(root):
        _strip_file(source, out / "notebooks" / source.name, root)
    return html


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument(
        "--executed", default="_executed", help="executed notebooks, under the root (default: _executed)"
    )
    parser.add_argument("--out", default="_build/student", help="output folder (default: _build/student)")
    args = parser.parse_args(argv)
    html = build(args.root, args.out, args.executed)
    sys.stdout.write(
        f"The student edition: file://{html.resolve()}/index.html (notebooks: {Path(args.out) / 'notebooks'})\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
