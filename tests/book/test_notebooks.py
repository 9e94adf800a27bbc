"""Every chapter runs with small parameters, and the book builds with warnings as errors."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import nbformat
import pytest
import yaml

from embgeo_utils.book import parameters, results, runner
from embgeo_utils.chapters import claims
from embgeo_utils.core import stats

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = runner.chapter_sources(ROOT) + [ROOT / runner.LEDGER]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_sources_are_clean_and_parameterized(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_sources_are_valid_nbformat_4_5_with_unique_cell_ids(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cell without an id is a MissingIDFieldWarning
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) >= (4, 5)
    ids = [cell.id for cell in nb.cells]
    assert len(set(ids)) == len(ids), f"{path.name}: repeated cell ids"


#: The papers whose claims each chapter tests, by arXiv id (chapter 0 tests none).
REPRODUCES = {
    "00": [],
    "01": ["2503.21073"],
    "02": ["2503.21073"],
    "03": ["2503.21073"],
    "04": ["2501.10573"],
    "05": ["2507.22918", "2410.06981"],
    "06": ["2503.21073"],
}


def _entries(markdown: str) -> list[str]:
    """The list items of a markdown text, each on one line."""
    items = re.split(r"^- ", markdown, flags=re.M)[1:]
    return [" ".join(item.split()) for item in items]


@pytest.mark.parametrize("path", runner.chapter_sources(ROOT), ids=lambda p: p.stem)
def test_each_chapter_ends_with_the_references_it_uses_first_the_papers_it_tests(path):
    last = json.loads(path.read_text())["cells"][-1]
    text = "".join(last["source"])
    assert last["cell_type"] == "markdown" and text.startswith("## References\n")
    entries = _entries(text)
    papers = REPRODUCES[path.stem[:2]]
    assert [any(f"arXiv:{p}" in e for p in papers) for e in entries[: len(papers)]] == [True] * len(papers)
    assert "<../book/references>" in text
    book = _entries((ROOT / "book" / "references.md").read_text())
    assert [e for e in entries if e not in book] == [], "each entry as book/references.md gives it"


def test_small_parameters_name_real_notebooks_and_parameters():
    small = runner.small_parameters(ROOT)
    stems = {p.stem for p in runner.chapter_sources(ROOT)}
    assert set(small) == stems
    for stem, params in small.items():
        declared = parameters.notebook_parameters(ROOT / "notebooks" / f"{stem}.ipynb")
        assert set(params) <= set(declared), f"{stem}: unknown parameters {set(params) - set(declared)}"


def test_toc_lists_every_chapter():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    for path in runner.chapter_sources(ROOT):
        assert f"_executed/{path.stem}" in files


@pytest.mark.slow
def test_every_chapter_executes_with_small_parameters(small_book):
    for path in runner.chapter_sources(small_book):
        executed = json.loads((small_book / "_executed" / path.name).read_text())
        errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors
    # small runs keep their records apart from the book's
    records = list(runner.results_folder(small_book / "_executed", small=True).glob("*.json"))
    assert len(records) == len(runner.chapter_sources(small_book))
    assert not (small_book / "_executed" / "results").exists()


@pytest.mark.slow
def test_book_builds_without_warnings(small_book, small_build):
    done = small_build
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    html = small_book / "_build" / "html"
    assert (html / "index.html").exists()
    # the ledger is read from this run's records: every claim once, each verdict one of the defined ones
    folder = runner.results_folder(small_book / "_executed", small=True)
    ledger = results.load_ledger(folder).set_index("claim")
    records = {r["run"]["record"]: r for r in results.load_records(folder)}
    assert sorted(ledger.index) == sorted(claims.CLAIMS)
    for number, row in ledger.iterrows():
        assert row["run"] in records, f"claim {number}: the ledger names no record of this run ({row['run']!r})"
        (claim,) = [c for c in records[row["run"]]["claims"] if c["number"] == number]
        assert row["verdict"] == claim["verdict"] and row["verdict"] in stats.VERDICTS
        assert row["value"] == claim["value"] or (row["value"] != row["value"] and claim["value"] is None)
    page = (html / "_executed" / "ledger.html").read_text()
    assert all(name in page for name in records), "the ledger page names every record it read"
