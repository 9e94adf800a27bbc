"""The runner's time table (every chapter): ``--jobs`` runs chapters at once, the ledger last, the page is written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nbformat
import pytest

from embgeo_utils.book import runner, timings
from embgeo_utils.core.errors import EmbgeoInputError, ParameterError


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
    assert record["machine"]["cpu_capability"] in page  # e.g. AVX2 or AVX512: where bfloat16 would be slow or fast


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


# -- timing records and the pages that quote them -------------------------------------------------------------------

MACHINE = {"cpu": "Test CPU 3000", "cores": 2, "memory_gib": 7.8, "device": "cpu", "torch_threads": 2}


def _row(stem: str, seconds: float, cache: str, status: str = "ok", peak: float | None = 1536.0):
    row = timings.NotebookTime(stem, seconds, status, cache, peak, ["smollm2-135m", "gemma3-270m"])
    row.load_start, row.load_end = [3.25, 2.0, 1.0], [2.5, 2.0, 1.0]
    return row


def test_timing_records_keep_the_latest_cold_and_the_latest_warm_run(tmp_path):
    folder = tmp_path / "results"
    timings.record_measurement(folder, _row("04_layer", 300.0, "cold (12 MB written)"), MACHINE, 1, "default")
    timings.record_measurement(folder, _row("04_layer", 90.0, "warm"), MACHINE, 1, "default")
    timings.record_measurement(folder, _row("04_layer", 80.0, "warm"), MACHINE, 2, "default")
    assert timings.record_measurement(folder, _row("04_layer", 5.0, "warm", "failed"), MACHINE, 1, "default") is None
    assert timings.record_measurement(folder, _row("04_layer", 5.0, ""), MACHINE, 1, "default") is None
    record = timings.load_measurements(folder)["04_layer"]
    assert record["parameters"] == "default"
    assert record["cold"]["seconds"] == 300.0 and record["warm"]["seconds"] == 80.0 and record["warm"]["jobs"] == 2
    assert record["cold"]["machine"]["cpu"] == "Test CPU 3000" and record["cold"]["load_start"] == [3.25, 2.0, 1.0]
    with pytest.raises(EmbgeoInputError, match="kind"):
        timings.record_measurement(folder, _row("04_layer", 1.0, "warm"), MACHINE, 1, "lab")


def test_a_chapter_header_quotes_its_records_and_says_what_is_missing(tmp_path):
    folder = tmp_path / "results"
    assert timings.chapter_header("04_layer", None, "default").count("not measured yet") == 3  # models too
    timings.record_measurement(folder, _row("04_layer", 300.4, "cold (1 MB written)"), MACHINE, 1, "small")
    header = timings.chapter_header("04_layer", timings.load_measurements(folder)["04_layer"], "small")
    assert "the small test parameters" in header and "Models loaded: `smollm2-135m`, `gemma3-270m`." in header
    cold, warm = [line for line in header.splitlines() if line.startswith(("- cold", "- warm"))]
    assert "300 s, peak memory 1.5 GiB" in cold and "2 cores (Test CPU 3000, 7.8 GiB)" in cold
    assert "load average 3.2" in cold  # the load when the notebook started
    assert warm == "- warm cache (all read back): not measured yet"
    no_memory = _row("04_layer", 90.0, "warm", peak=None)
    timings.record_measurement(folder, no_memory, MACHINE, 1, "small")
    header = timings.chapter_header("04_layer", timings.load_measurements(folder)["04_layer"], "small")
    assert "- warm cache (all read back): 90 s, peak memory not measured yet (" in header  # none made up


def test_the_teaching_table_reads_both_parameter_sets_and_names_the_machines(tmp_path):
    default, small = tmp_path / "results", tmp_path / "results-small"
    timings.record_measurement(default, _row("01_b", 356.0, "cold (3 MB written)"), MACHINE, 1, "default")
    other = {**MACHINE, "cpu": "Other CPU", "cores": 16}
    timings.record_measurement(small, _row("01_b", 12.0, "warm", peak=300.0), other, 1, "small")
    chapters = {"00_a": ["minilm-l6"], "01_b": ["smollm2-135m", "gemma3-270m"]}
    text = timings.write_teaching(tmp_path, chapters, default, small).read_text()
    lines = text.splitlines()
    row_a = next(line for line in lines if line.startswith("| 00_a |"))
    assert row_a.count("not measured yet") == 4
    row_b = next(line for line in lines if line.startswith("| 01_b |"))
    cells = [c.strip() for c in row_b.strip("|").split("|")]
    assert cells[1] == "smollm2-135m, gemma3-270m"
    assert cells[2].startswith("356 s, 1.5 GiB (M1, ") and "load 3.2" in cells[2]
    assert cells[3] == "not measured yet" and cells[4] == "not measured yet"
    assert cells[5].startswith("12 s, 300 MiB (M2, ")
    assert "- **M1**: 2 cores (Test CPU 3000, 7.8 GiB)" in text and "- **M2**: 16 cores (Other CPU, 7.8 GiB)" in text
    empty = timings.teaching_table(chapters, {}, {})
    assert empty.count("not measured yet") == 8 and "no chapter has been measured yet" in empty


def test_the_header_goes_under_the_title_once(tmp_path):
    path = tmp_path / "04_layer.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("setup = 1"), nbformat.v4.new_markdown_cell("# Title\n\ntext"),
                nbformat.v4.new_code_cell("x = 1")]  # fmt: skip
    nbformat.write(nb, path)
    timings.show_header(path, "first")
    timings.show_header(path, "second")
    cells = nbformat.read(path, as_version=4).cells
    assert [c.source for c in cells] == ["setup = 1", "# Title\n\ntext", "second", "x = 1"]
    assert cells[2].metadata["tags"] == [timings.HEADER_TAG]


def test_a_run_with_the_default_parameters_keeps_records_headers_and_the_teaching_table(tiny_root):
    out = tiny_root / "_defaults"
    assert runner.run_notebooks(tiny_root, out, runner.chapter_sources(tiny_root)) == []
    record = timings.load_measurements(runner.results_folder(out))["00_first"]
    (state,) = [s for s in ("cold", "warm") if record[s]]
    assert record[state]["peak_memory_mib"] > 10  # the kernel's own peak, measured in its own process
    rows = json.loads((out / "timings.json").read_text())["rows"]
    assert all(r["peak_memory_mib"] for r in rows)
    executed = nbformat.read(out / "00_first.ipynb", as_version=4)
    assert timings.HEADER_TAG in executed.cells[1].metadata.get("tags", [])
    teaching = (out / timings.TEACHING_PAGE).read_text()
    assert "| 00_first |" in teaching and "| 01_second |" in teaching
    small = tiny_root / "_small_override"
    runner.run_notebooks(tiny_root, small, runner.chapter_sources(tiny_root)[:1], {"00_first": {"pause": 0.1}})
    assert not timings.load_measurements(runner.results_folder(small))  # other parameters keep no record
