"""How long the book takes to run: per-notebook times, memory, the machine, and the pages about them (every chapter).

:func:`embgeo_utils.book.runner.run_notebooks` times every notebook it executes, measures
the peak resident memory of its kernel, and notes whether the run wrote to the
on-disk cache (``cold``: models converted, hidden states extracted or SAEs trained)
or only read it (``warm``). It then calls :func:`write_timings`, which prints the
table and writes ``timings.json`` and the "How long it takes" page (``timings.md``)
next to the executed notebooks, where ``_toc.yml`` finds it.

A run with the book's default parameters, or with the small test parameters
(``--small``), also keeps each chapter's measurement as a *timing record*
(:func:`record_measurement`): one file per chapter in ``timings/`` of that run's
results folder, holding the latest cold and the latest warm run, each with its
time, peak memory, the models the chapter loaded, the machine and its load. The
records are what the pages quote, never a number typed by hand: every chapter's
header (:func:`chapter_header`, put under the chapter's title by
:func:`show_header`) and the table of the Teaching page (:func:`teaching_table`,
written by :func:`write_teaching` to ``teaching_times.md``, which
``book/teaching.md`` includes). A measurement that no run has made yet reads
"not measured yet".
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.cache import atomic_path, cache_root
from ..core.device import get_device
from ..core.errors import EmbgeoInputError
from ..core.progress import LOG

__all__ = [
    "HEADER_TAG",
    "KINDS",
    "NOT_MEASURED",
    "NotebookTime",
    "TEACHING_PAGE",
    "cache_snapshot",
    "cache_written",
    "chapter_header",
    "load_measurements",
    "load_average",
    "machine",
    "peak_mib",
    "record_measurement",
    "show_header",
    "teaching_table",
    "timing_table",
    "write_teaching",
    "write_timings",
]


PAGE = "timings.md"
#: The generated part of the Teaching page, next to the executed notebooks (``book/teaching.md`` includes it).
TEACHING_PAGE = "teaching_times.md"
#: Folder of the timing records inside a results folder.
RECORDS = "timings"
#: What a page says where no run has measured a number.
NOT_MEASURED = "not measured yet"
#: The parameter sets whose runs are kept as timing records, and how the pages name them.
KINDS = {"default": "the book's default parameters", "small": "the small test parameters (`--small`)"}
#: Tag of the markdown cell under a chapter's title that gives its time, memory and models.
HEADER_TAG = "chapter-cost"


@dataclass
class NotebookTime:
    """One executed notebook (every chapter).

    Attributes:
        notebook: the notebook's stem, e.g. ``"04_layerwise_geometry"``.
        seconds: wall-clock seconds of the whole notebook (its kernel's start to its end).
        status: ``"ok"`` or ``"failed"``.
        cache: ``"cold (N MB written)"``, ``"warm"`` or ``""`` when unknown.
        peak_memory_mib: the peak resident memory of the notebook's kernel (MiB), ``None`` where not measurable.
        models: the models the chapter loaded (from its record; empty for a page without one).
        load_start, load_end: the machine's load average (1, 5, 15 min) when the notebook started and ended.
    """

    notebook: str
    seconds: float
    status: str
    cache: str
    peak_memory_mib: float | None = None
    models: list[str] = field(default_factory=list)
    load_start: list[float] | None = None
    load_end: list[float] | None = None


def machine() -> dict[str, Any]:
    """CPU model, cores, load average, torch threads, device and memory of the machine that runs the book."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = get_device("auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    memory = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = round(total / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def load_average() -> list[float] | None:
    """The machine's load average over 1, 5 and 15 minutes (``None`` where the system does not report one)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def peak_mib(maxrss: int) -> float | None:
    """A process's ``ru_maxrss`` (KiB on Linux, bytes on macOS) in MiB; ``None`` when it is not reported."""
    if maxrss <= 0:
        return None
    return round(maxrss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def cache_snapshot() -> dict[str, int]:
    """Size of every file in the embgeo cache, by path (cheap: one directory walk)."""

    sizes: dict[str, int] = {}
    for folder, _, files in os.walk(cache_root()):
        for name in files:
            try:
                sizes[os.path.join(folder, name)] = os.path.getsize(os.path.join(folder, name))
            except OSError:
                continue  # removed while we looked (a staging file)
    return sizes


def cache_written(before: dict[str, int], after: dict[str, int]) -> str:
    """``"warm"`` when no cache file appeared, else ``"cold (N MB written)"``."""
    new = sum(size for path, size in after.items() if path not in before)
    return "warm" if new == 0 else f"cold ({new / 1e6:.0f} MB written)"


def _memory(mib: float | None) -> str:
    if mib is None:
        return "-"
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def timing_table(rows: list[NotebookTime], wall: float | None = None) -> str:
    """A Markdown table of the notebooks' times and peak memory (also readable as plain text)."""
    lines = ["| notebook | seconds | peak memory | status | cache |", "|---|---:|---:|---|---|"]
    lines += [
        f"| {r.notebook} | {r.seconds:.0f} | {_memory(r.peak_memory_mib)} | {r.status} | {r.cache or '-'} |"
        for r in rows
    ]
    lines.append(f"| **sum** | {sum(r.seconds for r in rows):.0f} | | | |")
    if wall is not None:
        lines.append(f"| **wall clock** | {wall:.0f} | | | |")
    return "\n".join(lines)


def write_timings(
    out: Path, rows: list[NotebookTime], wall: float, jobs: int, info: dict[str, Any], small: bool
) -> Path:
    """Print the table and write ``timings.json`` and the page ``timings.md`` into ``out``; returns the page."""
    table = timing_table(rows, wall)
    LOG.info("time per notebook:\n" + table)
    info = {**info, "load_average_end": load_average()}
    record = {"rows": [asdict(r) for r in rows], "wall_seconds": wall, "jobs": jobs, "small": small, "machine": info}
    (out / "timings.json").write_text(json.dumps(record, indent=1))
    params = "the small test parameters (`--small`)" if small else "each chapter's default parameters"
    load = ", ".join(f"{v:.2f}" for v in info["load_average"] or [])
    load_end = ", ".join(f"{v:.2f}" for v in info["load_average_end"] or [])
    page = f"""# How long it takes

The last run of `python -m embgeo_utils.book.runner` executed these notebooks with {params},
{jobs} at a time. *Cold* means the notebook wrote to the cache (`~/.cache/embgeo`): it converted a model,
extracted hidden states or trained an SAE; *warm* means it only read what an earlier run stored. *Peak memory* is the peak resident memory of the notebook's
kernel. With more than one notebook at a time the cache column is shared between neighbours and only indicative.
The {{doc}}`Teaching page <../book/teaching>` keeps the latest cold and warm run of every chapter.

{table}

The machine:

| | |
|---|---|
| CPU | {info["cpu"]} |
| cores | {info["cores"]} |
| memory | {info["memory_gib"]} GiB |
| load average (1, 5, 15 min) at start | {load} |
| load average at the end | {load_end} |
| torch threads | {info["torch_threads"]} (OMP_NUM_THREADS={info["omp_num_threads"] or "unset"}) |
| CPU vector capability (torch) | {info.get("cpu_capability", "not recorded")} (models compute in float32 on any CPU) |
| device | {info["device"]} |
| torch, Python | {info["torch"]}, {info["python"]} |
| date | {info["date"]} |

A load average above the number of cores means other work shared the machine, and the times are longer than
an idle machine's.
"""
    target = out / PAGE
    target.write_text(page)
    return target


def _measurement(row: NotebookTime, info: Mapping[str, Any], jobs: int) -> dict[str, Any]:
    """What a timing record keeps of one run of a notebook: time, memory, models, the machine and its load."""
    keep = ("cpu", "cores", "memory_gib", "device", "torch_threads", "omp_num_threads", "torch")
    return {
        "seconds": round(row.seconds, 1),
        "peak_memory_mib": row.peak_memory_mib,
        "models": list(row.models),
        "cache": row.cache,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_start": row.load_start,
        "load_end": row.load_end,
        "jobs": jobs,
        "machine": {k: info.get(k) for k in keep},
    }


def record_measurement(folder: Path, row: NotebookTime, info: Mapping[str, Any], jobs: int, kind: str) -> Path | None:
    """Keep a notebook's run as its latest cold or warm timing record (every chapter); returns the record's path.

    A failed run, or one whose cache state is unknown, is not kept (``None``). The record is
    ``<folder>/timings/<notebook>.json``, holding ``{"notebook", "parameters": kind, "cold": ..., "warm": ...}``;
    this run replaces the entry of its cache state and leaves the other as it was.

    Args:
        folder: the run's results folder (:func:`embgeo_utils.book.runner.results_folder`).
        row: the notebook's time, memory and models.
        info: the machine (:func:`machine`).
        jobs: notebooks run at once.
        kind: ``"default"`` or ``"small"`` (:data:`KINDS`).
    """
    if kind not in KINDS:
        raise EmbgeoInputError(f"kind must be one of {sorted(KINDS)}, got {kind!r}.")
    if row.status != "ok" or not row.cache:
        return None
    state = "warm" if row.cache == "warm" else "cold"
    path = folder / RECORDS / f"{row.notebook}.json"
    record: dict[str, Any] = {"notebook": row.notebook, "parameters": kind, "cold": None, "warm": None}
    if path.is_file():
        try:
            record.update(json.loads(path.read_text()))
        except ValueError:
            pass  # an unreadable record is replaced by this run's
    record[state] = _measurement(row, info, jobs)
    with atomic_path(path) as staged:
        staged.write_text(json.dumps(record, indent=1))
    return path


def load_measurements(folder: Path) -> dict[str, dict[str, Any]]:
    """The timing records of a results folder, by notebook stem (empty when there are none; unreadable ones skipped)."""
    out = {}
    for path in sorted((folder / RECORDS).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        out[str(record.get("notebook", path.stem))] = record
    return out


def _load_text(load: Sequence[float] | None) -> str:
    return "load not reported" if not load else f"load average {load[0]:.1f}"


def _machine_text(m: Mapping[str, Any]) -> str:
    """A machine in a few words: its cores, CPU, memory and the device the chapters computed on."""
    mach = m.get("machine") or {}
    memory = f", {mach['memory_gib']} GiB" if mach.get("memory_gib") else ""
    device = f", on {mach['device']}" if mach.get("device") and mach.get("device") != "cpu" else ""
    return f"{mach.get('cores', '?')} cores ({mach.get('cpu') or 'CPU not reported'}{memory}){device}"


def _when(m: Mapping[str, Any]) -> str:
    """Where and when a measurement was made, with the machine's load at the notebook's start."""
    shared = f", {m['jobs']} notebooks at once" if (m.get("jobs") or 1) > 1 else ""
    return f"{m.get('date', '?')}, {_machine_text(m)}, {_load_text(m.get('load_start'))}{shared}"


def chapter_header(notebook: str, record: Mapping[str, Any] | None, kind: str) -> str:
    """The markdown under a chapter's title: its cold and warm time, peak memory and models (every chapter).

    Every number comes from the chapter's timing record (:func:`record_measurement`) for ``kind``; a run that was
    never measured reads :data:`NOT_MEASURED`.

    Args:
        notebook: the chapter's notebook stem.
        record: its timing record (``None``: none yet).
        kind: the parameters the record is for: ``"default"`` or ``"small"``.
    """
    states = {"cold": "cold cache (models converted, states extracted)", "warm": "warm cache (all read back)"}
    lines: list[str] = []
    models: list[str] = []
    for state, words in states.items():
        m = (record or {}).get(state)
        if not m:
            lines.append(f"- {words}: {NOT_MEASURED}")
            continue
        models = models or list(m.get("models") or [])
        memory = NOT_MEASURED if m.get("peak_memory_mib") is None else _memory(m["peak_memory_mib"])
        lines.append(f"- {words}: {m['seconds']:.0f} s, peak memory {memory} ({_when(m)})")
    loads = ", ".join(f"`{name}`" for name in models) if models else NOT_MEASURED
    head = f"**Cost of this chapter**, the whole notebook with {KINDS[kind]}. Models loaded: {loads}."
    return head + "\n\n" + "\n".join(lines)


def show_header(executed: Path, text: str) -> None:
    """Put ``text`` in a markdown cell tagged :data:`HEADER_TAG` right under the notebook's title (every chapter).

    The title is the first markdown cell that opens with a level-one heading (the top of the notebook when there is
    none); a header from an earlier run is replaced, not repeated.
    """
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    cells = [c for c in nb.cells if HEADER_TAG not in c.get("metadata", {}).get("tags", [])]
    title = next(
        (i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.lstrip().startswith("# ")), -1
    )
    header = nbformat.v4.new_markdown_cell(text)
    header.metadata["tags"] = [HEADER_TAG]
    cells.insert(title + 1, header)
    nb.cells = cells
    nbformat.write(nb, executed)


def _cell(m: Mapping[str, Any] | None, machines: dict[str, str]) -> str:
    """One measurement in the Teaching table: time, peak memory, and the machine's label and load."""
    if not m:
        return NOT_MEASURED
    label = machines.setdefault(_machine_text(m), f"M{len(machines) + 1}")
    memory = "memory not measured" if m.get("peak_memory_mib") is None else _memory(m["peak_memory_mib"])
    load = "load ?" if not m.get("load_start") else f"load {m['load_start'][0]:.1f}"
    shared = f", {m['jobs']} at once" if (m.get("jobs") or 1) > 1 else ""
    return f"{m['seconds']:.0f} s, {memory} ({label}, {m.get('date', '?')[:10]}, {load}{shared})"


def teaching_table(chapters: Mapping[str, Sequence[str]], default: Mapping[str, Any], small: Mapping[str, Any]) -> str:
    """The Teaching page's table: each chapter's cold and warm runs, default and small parameters (every chapter).

    Args:
        chapters: notebook stem -> the models it loads at its default parameters, in book order.
        default: the timing records of runs with the default parameters (:func:`load_measurements`).
        small: the timing records of runs with the small test parameters.

    Returns:
        Markdown: the table, then the machines the measurements were made on (``M1``, ...). A measurement no run
        has made reads :data:`NOT_MEASURED`.
    """
    machines: dict[str, str] = {}
    lines = [
        "| chapter | models (default parameters) | default, cold cache | default, warm cache | small, cold cache "
        "| small, warm cache |",
        "|---|---|---|---|---|---|",
    ]
    for stem, models in chapters.items():
        cells = [_cell((records.get(stem) or {}).get(state), machines) for records in (default, small)
                 for state in ("cold", "warm")]  # fmt: skip
        lines.append(f"| {stem} | {', '.join(models)} | " + " | ".join(cells) + " |")
    where = [f"- **{label}**: {text}" for text, label in machines.items()] or [
        "- none: no chapter has been measured yet"
    ]
    return "\n".join(lines) + "\n\nThe machines:\n\n" + "\n".join(where) + "\n"


def write_teaching(out: Path, chapters: Mapping[str, Sequence[str]], default: Path, small: Path) -> Path:
    """Write the Teaching page's generated table (:func:`teaching_table`) to ``out/teaching_times.md``."""
    text = teaching_table(chapters, load_measurements(default), load_measurements(small))
    target = out / TEACHING_PAGE
    target.write_text(text)
    return target
