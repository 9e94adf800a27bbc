"""Execute the book's notebooks with papermill (used by ``make book`` and the tests).

``python -m embgeo_utils.book.runner`` runs every chapter in ``notebooks/`` in order
with its default parameters, then the Claims ledger page (``book/ledger.ipynb``),
writing executed copies to ``_executed/`` and chapter records to
``_executed/results/``. ``--small`` uses the small parameters of
``notebooks/params_small.yml`` (what the tests run) and keeps their records apart
in ``_executed/results-small/``; ``--only`` picks chapters. Every notebook's
parameters are checked against its declarations before the first one runs.
``--jobs N`` runs up to N chapters at once in separate processes (fewer when
the free memory is short); the ledger page always runs last. The kernel of every
notebook reports its own peak memory (:func:`measure`). At the end the runner
prints the time and memory of every notebook and writes the book's "How long it
takes" page (``_executed/timings.md``, see :mod:`embgeo_utils.book.timings`). A run
with the default or the small parameters also keeps each chapter's timing record,
puts the chapter's cost (cold and warm time, peak memory, models) under its title,
and rewrites the table of the Teaching page (``_executed/teaching_times.md``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..core.errors import ParameterError
from ..core.progress import LOG, show_messages
from ..lm.models import REGISTRY, check_name
from . import launch, publish, timings
from .parameters import chapter_sources, check_overrides, notebook_parameters, small_parameters

__all__ = [
    "absolute_model_paths",
    "chapter_sources",
    "default_models",
    "execute",
    "measure",
    "main",
    "parallel_jobs",
    "results_folder",
    "run_notebooks",
    "select_chapters",
    "small_parameters",
]


LEDGER = Path("book") / "ledger.ipynb"


#: Memory one chapter may need at its peak (bytes); ``--jobs`` runs no more chapters at once than fit in free memory.
#: Memory one chapter may take when several run at once, unless EMBGEO_JOB_MEMORY_GIB says otherwise (bytes).
JOB_MEMORY = 6 << 30


def job_memory() -> int:
    """Bytes of memory one chapter is given when several run at once: ``EMBGEO_JOB_MEMORY_GIB``, else :data:`JOB_MEMORY`."""
    value = os.environ.get("EMBGEO_JOB_MEMORY_GIB")
    try:
        return int(float(value) * 2**30) if value else JOB_MEMORY
    except ValueError as exc:
        raise ParameterError(f"EMBGEO_JOB_MEMORY_GIB must be a number of GiB, got {value!r}.") from exc


#: Parameters that name models (their overrides are checked with ``models.check_name`` before a run starts).
MODEL_PARAMETERS = (
    "model_names",
    "model_pairs",
    "model_a",
    "model_b",
    "layer_pair",
    "cross_pair",
    "semantic_encoder",
    "pairs",
    "encoder",
)


def absolute_model_paths(params: dict[str, Any]) -> dict[str, Any]:
    """The same parameters with every model name that names an existing folder made absolute (own models).

    A notebook runs in ``notebooks/``, not in the folder the command was given in: ``-p model_names '["./my-model"]'``
    must name the folder the reader meant. Registry names and Hugging Face ids are left as they are.
    """

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value not in REGISTRY and Path(value).expanduser().is_dir():
            return str(Path(value).expanduser().resolve())
        if isinstance(value, (list, tuple)):
            return [fix(v) for v in value]
        return value

    return {key: fix(value) if key in MODEL_PARAMETERS else value for key, value in params.items()}


def cell_timeout() -> int | None:
    """Seconds one notebook cell may run: ``EMBGEO_CELL_TIMEOUT`` when set (``0``: no limit), else no limit.

    A chapter that is making progress is never stopped by a fixed limit (a loaded machine can take several times
    an idle one's minutes); a test or a scheduler that must bound a run sets one.
    """
    value = os.environ.get("EMBGEO_CELL_TIMEOUT", "").strip()
    try:
        seconds = int(float(value)) if value else 0
    except ValueError as exc:
        raise ParameterError(f"EMBGEO_CELL_TIMEOUT must be a number of seconds, got {value!r}.") from exc
    return seconds if seconds > 0 else None


def execute(
    source: Path, out_dir: Path, parameters: dict[str, Any] | None = None, timeout: int | None = None
) -> tuple[Path, float]:
    """Run one notebook with papermill into ``out_dir``; returns (executed path, seconds).

    The parameters are checked against the notebook's declarations first, so an unknown name, a wrong type or a
    value out of range fails before a kernel starts. The executed copy shows its parameters once, as a table
    (:func:`publish.show_parameters`) followed for a chapter by where it fits on Colab and Binder
    (:func:`launch.hosting_note`), and the code of its plumbing cells collapsed (:func:`publish.hide_plumbing`).
    ``timeout`` bounds each cell in seconds (default :func:`cell_timeout`).

    Raises:
        ParameterError: a parameter that the notebook does not declare or whose value it does not allow.
    """
    start = time.perf_counter()
    return measure(source, out_dir, parameters, {}, timeout), time.perf_counter() - start


#: The cell :func:`measure` runs after a notebook's own cells: the peak resident memory of the kernel (and of the
#: processes it waited for), printed on one line that starts with :data:`_PEAK`.
_PEAK = "embgeo-peak-memory-kib"
_MEASURE = f"""import resource as _embgeo_resource
print("{_PEAK}", max(_embgeo_resource.getrusage(w).ru_maxrss for w in (_embgeo_resource.RUSAGE_SELF,
      _embgeo_resource.RUSAGE_CHILDREN)))"""


def measure(
    source: Path, out_dir: Path, parameters: dict[str, Any] | None, measured: dict[str, float | None],
    timeout: int | None = None,
) -> Path:  # fmt: skip
    """:func:`execute`, and the peak memory of the notebook's kernel into ``measured["peak_memory_mib"]``.

    The kernel runs one more cell after the notebook's own, which reports the kernel's peak resident memory (and
    that of the processes it waited for); the cell is taken out of the executed copy again, also when the notebook
    failed. Where the system has no ``resource`` module (Windows) the peak stays ``None``.

    Returns:
        The executed copy's path.
    """
    import nbformat
    import papermill as pm

    parameters = dict(parameters or {})
    check_overrides(source, parameters)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / source.name
    nb = nbformat.read(source, as_version=4)
    probe = nbformat.v4.new_code_cell(_MEASURE if sys.platform != "win32" else "", metadata={"tags": [_PEAK]})
    nb.cells.append(probe)
    measured["peak_memory_mib"] = None
    try:
        pm.execute_notebook(
            nb,
            str(target),
            parameters=parameters,
            cwd=str(source.parent),
            kernel_name="python3",
            execution_timeout=timeout if timeout is not None else cell_timeout(),
            progress_bar=False,
            log_output=False,
        )
    finally:
        if target.is_file():
            measured["peak_memory_mib"] = _take_probe(target, source)
    publish.show_parameters(target, source, parameters, note=launch.hosting_note(source.stem, source.parent.parent))
    publish.hide_plumbing(target)
    return target


def _take_probe(executed: Path, source: Path) -> float | None:
    """Remove :func:`measure`'s cell from an executed notebook; returns the peak memory it printed (MiB).

    papermill, given the notebook as an object, records that object as its input; the source's path goes back.
    """
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    if "papermill" in nb.metadata:
        nb.metadata.papermill["input_path"] = str(source)
    probes = [c for c in nb.cells if _PEAK in c.get("metadata", {}).get("tags", [])]
    nb.cells = [c for c in nb.cells if c not in probes]
    nbformat.write(nb, executed)
    for out in (o for c in probes for o in c.get("outputs", [])):
        for line in str(out.get("text", "")).splitlines():
            if line.startswith(_PEAK):
                return timings.peak_mib(int(line.split()[1]))
    return None


def results_folder(out: Path, small: bool = False) -> Path:
    """Where a run's records go: ``<out>/results``, or ``<out>/results-small`` for the small test parameters."""
    return out / ("results-small" if small else "results")


def parallel_jobs(jobs: int, n_chapters: int) -> int:
    """How many chapters to run at once: at most ``jobs``, the chapters, and what free memory allows (``JOB_MEMORY`` each)."""
    wanted = max(1, min(int(jobs), n_chapters))
    if wanted == 1:
        return 1
    try:
        free = next(
            int(line.split()[1]) * 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemAvailable:")
        )
    except (OSError, StopIteration, ValueError):
        return wanted
    fits = max(1, free // job_memory())
    if fits < wanted:
        LOG.info(
            f"{free / 2**30:.0f} GiB free memory fits {fits} chapter(s) at once, not {wanted} "
            "(EMBGEO_JOB_MEMORY_GIB sets the memory per chapter)"
        )
    return int(min(wanted, fits))


def _record_models(source: Path, since: float) -> list[str]:
    """The models a chapter's record written since ``since`` says it loaded (empty: no such record)."""
    folder = Path(os.environ.get("EMBGEO_RESULTS", ""))
    found = [p for p in folder.glob(f"ch{source.stem}-*.json") if p.stat().st_mtime >= since] if folder.name else []
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return [str(m) for m in json.loads(path.read_text())["run"]["models"]]
        except (ValueError, KeyError, TypeError):
            continue
    return []


def _run_one(source: Path, out: Path, params: dict[str, Any]) -> tuple[timings.NotebookTime, str | None]:
    """Execute one notebook, timed and measured; returns its timing row and the failure message (``None``: it ran)."""
    import papermill as pm

    before = timings.cache_snapshot()
    load = timings.load_average()
    since = time.time()
    start = time.perf_counter()
    error = None
    measured: dict[str, float | None] = {}
    try:
        measure(source, out, params, measured)
    except pm.PapermillExecutionError as exc:
        error = (
            f"{source.name} FAILED in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
            f"         the executed copy with the traceback is {out / source.name}"
        )
    seconds = time.perf_counter() - start
    cache = timings.cache_written(before, timings.cache_snapshot())
    row = timings.NotebookTime(source.stem, seconds, "failed" if error else "ok", cache)
    row.peak_memory_mib = measured.get("peak_memory_mib")
    row.models = _record_models(source, since)
    row.load_start, row.load_end = load, timings.load_average()
    return row, error


def default_models(source: Path) -> list[str]:
    """The models a chapter loads at its default parameters (its module's ``Parameters.models()``; empty if none)."""
    try:
        module = importlib.import_module(f"embgeo_utils.chapters.ch{source.stem}")
    except ImportError:
        return []
    values = {name: p.default for name, p in notebook_parameters(source).items()}
    return list(dict.fromkeys(str(m) for m in getattr(module.Parameters(**values), "models", list)()))


def _timing_kind(small: bool, overrides: dict[str, Any]) -> str | None:
    """Which timing record a run feeds: the book's defaults, the small parameters, or none (other overrides)."""
    if overrides:
        return None
    return "small" if small else "default"


def _keep_timing(
    source: Path, row: timings.NotebookTime, kind: str | None, results: Path, info: dict[str, Any], jobs: int
) -> None:
    """Keep a chapter's run as its timing record and put its cost under its title (chapters, not the ledger)."""
    if kind is None or source.name == LEDGER.name:
        return
    timings.record_measurement(results, row, info, jobs, kind)
    executed = results.parent / source.name
    if executed.is_file():
        record = timings.load_measurements(results).get(source.stem)
        timings.show_header(executed, timings.chapter_header(source.stem, record, kind))


def _report(row: timings.NotebookTime, error: str | None, failed: list[str], name: str) -> None:
    if error:
        failed.append(name)
        LOG.error(error)
    else:
        LOG.info(f"{name} done in {row.seconds:.0f} s ({row.cache})")


def run_notebooks(
    root: Path,
    out: Path,
    sources: list[Path],
    overrides: dict[str, dict[str, Any]] | None = None,
    small: bool = False,
    ledger: bool = True,
    jobs: int = 1,
) -> list[str]:
    """Execute chapters (then the ledger page) into ``out``; returns the names of the notebooks that failed.

    Every notebook's parameters are checked before the first one runs. Records go to :func:`results_folder`.
    ``jobs`` > 1 runs chapters in that many processes at once (:func:`parallel_jobs`); the ledger runs after
    them all. The time of every notebook is printed and written to ``out/timings.md`` (:mod:`embgeo_utils.book.timings`).
    A run of a chapter without overrides (beyond ``small``) is kept as its timing record, its cost goes under its
    title, and ``out/teaching_times.md`` is rewritten from every record.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the book runs offline unless the caller says otherwise
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    small_params = small_parameters(root) if small else {}
    overrides = overrides or {}
    plan = [(s, absolute_model_paths({**small_params.get(s.stem, {}), **overrides.get(s.stem, {})})) for s in sources]
    if ledger:
        plan.append((root / LEDGER, {}))
    for source, params in plan:
        check_overrides(source, params)
    _check_model_names([params for _, params in plan])
    results = results_folder(out, small)
    results.mkdir(parents=True, exist_ok=True)
    os.environ["EMBGEO_RESULTS"] = str(results)
    info = timings.machine()
    failed: list[str] = []
    rows: list[timings.NotebookTime] = []
    chapters, last = (plan[:-1], plan[-1:]) if ledger else (plan, [])
    workers = parallel_jobs(jobs, len(chapters))
    start = time.perf_counter()
    kinds = {s.stem: _timing_kind(small, overrides.get(s.stem, {})) for s, _ in plan}
    if workers > 1:
        LOG.info(f"executing {len(chapters)} chapters, {workers} at a time ...")
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, source, out, params): source for source, params in chapters}
            for future in as_completed(futures):
                row, error = future.result()
                rows.append(row)
                _report(row, error, failed, futures[future].name)
                _keep_timing(futures[future], row, kinds[futures[future].stem], results, info, workers)
        order = [s.stem for s, _ in chapters]
        rows.sort(key=lambda r: order.index(r.notebook))
        chapters = []
    for source, params in chapters + last:
        LOG.info(f"executing {source.name} ...")
        row, error = _run_one(source, out, params)
        rows.append(row)
        _report(row, error, failed, source.name)
        _keep_timing(source, row, kinds[source.stem], results, info, 1)
    timings.write_timings(out, rows, time.perf_counter() - start, workers, info, small)
    book = {s.stem: default_models(s) for s in chapter_sources(root)}
    timings.write_teaching(out, book, results_folder(out, False), results_folder(out, True))
    return failed


def _check_model_names(plans: list[dict[str, Any]]) -> None:
    """Model names given as overrides are checked before a kernel starts (the chapter checks them again)."""
    names = []
    for params in plans:
        for key in MODEL_PARAMETERS:
            value = params.get(key)
            items = [value] if isinstance(value, str) else list(value or [])
            names += [n for item in items for n in (item if isinstance(item, (list, tuple)) else [item])]
    if names:
        for name in dict.fromkeys(names):
            check_name(name)


def select_chapters(root: Path, only: list[str] | None) -> list[Path]:
    """Chapters named by number or stem (``"04"``, ``"04_layerwise"``); all when ``only`` is empty.

    Raises:
        ParameterError: a name that matches no chapter (the message lists the chapters).
    """
    sources = chapter_sources(root)
    if not only:
        return sources
    picked = []
    for name in only:
        found = [s for s in sources if s.stem == name or s.stem.startswith(name)]
        if not found:
            raise ParameterError(
                f"No chapter {name!r}. Chapters: {', '.join(s.stem for s in sources)} (a number such as 04 is enough)."
            )
        picked += [s for s in found if s not in picked]
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument("--out", default="_executed", help="folder for executed notebooks (default: _executed)")
    parser.add_argument("--small", action="store_true", help="use the small test parameters (records: results-small/)")
    parser.add_argument("--only", nargs="*", help="chapter stems or numbers to run, e.g. 00 04_layerwise")
    parser.add_argument("--jobs", type=int, default=1, help="chapters run at once in separate processes (default 1)")
    args = parser.parse_args(argv)
    show_messages()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    root = Path(args.root).resolve()
    out = (root / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    try:
        failed = run_notebooks(root, out, select_chapters(root, args.only), small=args.small, jobs=args.jobs)
    except ParameterError as exc:
        LOG.error(f"nothing was run: {exc}")
        return 2
    if failed:
        LOG.error(f"{len(failed)} notebook(s) failed: {', '.join(failed)}")
        return 1
    LOG.info(f"executed notebooks in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
