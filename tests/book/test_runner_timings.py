"""The runner's time table (every chapter): ``--jobs`` runs chapters at once, the ledger last, the page is written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nbformat
import pytest

from embgeo_utils.book import runner, timings
from embgeo_utils.core.errors import ParameterError


def _notebook(path: Path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# {path.stem}"),
        nbformat.v4.new_code_cell('pause: "float" = 0.0', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(body),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """Two chapters that each sleep 3 s, and a ledger page that checks both ran before it."""
    root = tmp_path_factory.mktemp("tiny")
    for stem in ("00_first", "01_second"):
        _notebook(
            root / "notebooks" / f"{stem}.ipynb",
            f"import os, pathlib, time\nstart = time.time()\ntime.sleep(pause)\n"
            f"pathlib.Path(os.environ['EMBGEO_RESULTS'], '{stem}').write_text(f'{{start}} {{time.time()}}')",
        )
    _notebook(
        root / runner.LEDGER,
        "import os, pathlib\nassert {p.name for p in pathlib.Path(os.environ['EMBGEO_RESULTS']).iterdir()} "
        ">= {'00_first', '01_second'}",
    )
    return root


def test_parallel_chapters_overlap_and_the_ledger_runs_last(tiny_root, monkeypatch):
    monkeypatch.setattr(runner, "JOB_MEMORY", 1)  # the memory check must not reduce the two jobs here
    out = tiny_root / "_executed"
    params = {"00_first": {"pause": 3.0}, "01_second": {"pause": 3.0}}
    failed = runner.run_notebooks(tiny_root, out, runner.chapter_sources(tiny_root), params, jobs=2)
    assert failed == []
    record = json.loads((out / "timings.json").read_text())
    rows = record["rows"]
    assert [r["notebook"] for r in rows] == ["00_first", "01_second", "ledger"]
    assert all(r["status"] == "ok" and r["seconds"] >= 3.0 for r in rows[:2])
    assert record["jobs"] == 2 and record["machine"]["cores"] >= 1
    (a0, a1), (b0, b1) = ([float(t) for t in (out / "results" / s).read_text().split()] for s in params)
    assert max(a0, b0) < min(a1, b1)  # the two chapters ran at the same time
    page = (out / timings.PAGE).read_text()
    assert page.startswith("# How long it takes") and "| 01_second |" in page and "torch threads" in page


def test_a_failing_chapter_is_reported_and_timed(tiny_root):
    out = tiny_root / "_failed"
    failed = runner.run_notebooks(tiny_root, out, runner.chapter_sources(tiny_root)[:1], {"00_first": {"pause": -1}})
    assert failed == ["00_first.ipynb", "ledger.ipynb"]
    rows = json.loads((out / "timings.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["failed", "failed"]


def test_an_executed_copy_keeps_every_cell_id_and_nothing_warns_about_ids(tiny_root, tmp_path, monkeypatch):
    source = runner.chapter_sources(tiny_root)[0]
    monkeypatch.setenv("EMBGEO_RESULTS", str(tmp_path))  # where the tiny chapter writes its time stamps
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        target, _ = runner.execute(source, tmp_path, {"pause": 0.0})
    assert not [w for w in seen if "MissingIDField" in w.category.__name__ or "id field" in str(w.message)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nb = nbformat.read(target, as_version=4)
        nbformat.validate(nb)
    ids = [cell.id for cell in nb.cells]
    assert nb.nbformat_minor >= 5 and len(set(ids)) == len(ids) == len(nbformat.read(source, as_version=4).cells) + 2


def test_jobs_are_bounded_by_chapters_and_free_memory(monkeypatch):
    assert runner.parallel_jobs(8, 3) <= 3 and runner.parallel_jobs(1, 5) == 1
    monkeypatch.setattr(runner, "JOB_MEMORY", 1 << 50)  # no machine has a petabyte free
    assert runner.parallel_jobs(4, 4) == 1


def test_cache_state_is_warm_without_new_files():
    assert timings.cache_written({"a": 5}, {"a": 5}) == "warm"
    assert timings.cache_written({"a": 5}, {"a": 5, "b": 3_000_000}) == "cold (3 MB written)"


def test_cells_have_no_fixed_time_limit_unless_one_is_set(monkeypatch):
    monkeypatch.delenv("EMBGEO_CELL_TIMEOUT", raising=False)
    assert runner.cell_timeout() is None
    monkeypatch.setenv("EMBGEO_CELL_TIMEOUT", "900")
    assert runner.cell_timeout() == 900
    monkeypatch.setenv("EMBGEO_CELL_TIMEOUT", "0")
    assert runner.cell_timeout() is None
    monkeypatch.setenv("EMBGEO_CELL_TIMEOUT", "soon")
    with pytest.raises(ParameterError, match="EMBGEO_CELL_TIMEOUT"):
        runner.cell_timeout()
