"""How long the book takes to run: per-notebook times, the machine, and the book's page about them (every chapter).

:func:`embgeo_utils.book.runner.run_notebooks` times every notebook it executes and
notes whether the run wrote to the on-disk cache (``cold``: models converted,
hidden states extracted or SAEs trained) or only read it (``warm``). It then
calls :func:`write_timings`, which prints the table and writes
``timings.json`` and the "How long it takes" page (``timings.md``) next to the
executed notebooks, where ``_toc.yml`` finds it.
"""

from __future__ import annotations

from ..core.progress import LOG

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from ..core.cache import cache_root
from ..core.device import get_device

__all__ = [
    "NotebookTime",
    "cache_snapshot",
    "cache_written",
    "machine",
    "timing_table",
    "write_timings",
]


PAGE = "timings.md"


@dataclass
class NotebookTime:
    """One executed notebook: its name, wall-clock seconds, ``ok``/``failed``, and cache state."""

    notebook: str
    seconds: float
    status: str
    cache: str  # "cold (N MB written)", "warm" or "" when unknown


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


def timing_table(rows: list[NotebookTime], wall: float | None = None) -> str:
    """A Markdown table of the notebooks' times (also readable as plain text)."""
    lines = ["| notebook | seconds | status | cache |", "|---|---:|---|---|"]
    lines += [f"| {r.notebook} | {r.seconds:.0f} | {r.status} | {r.cache or '-'} |" for r in rows]
    lines.append(f"| **sum** | {sum(r.seconds for r in rows):.0f} | | |")
    if wall is not None:
        lines.append(f"| **wall clock** | {wall:.0f} | | |")
    return "\n".join(lines)


def write_timings(
    out: Path, rows: list[NotebookTime], wall: float, jobs: int, info: dict[str, Any], small: bool
) -> Path:
    """Print the table and write ``timings.json`` and the page ``timings.md`` into ``out``; returns the page."""
    table = timing_table(rows, wall)
    LOG.info("time per notebook:\n" + table)
    info = {**info, "load_average_end": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    record = {"rows": [asdict(r) for r in rows], "wall_seconds": wall, "jobs": jobs, "small": small, "machine": info}
    (out / "timings.json").write_text(json.dumps(record, indent=1))
    params = "the small test parameters (`--small`)" if small else "each chapter's default parameters"
    load = ", ".join(f"{v:.2f}" for v in info["load_average"] or [])
    load_end = ", ".join(f"{v:.2f}" for v in info["load_average_end"] or [])
    page = f"""# How long it takes

The last run of `python -m embgeo_utils.book.runner` executed these notebooks with {params},
{jobs} at a time. *Cold* means the notebook wrote to the cache (`~/.cache/embgeo`): it converted a model,
extracted hidden states or trained an SAE; *warm* means it only read what an earlier run stored.
With more than one notebook at a time the cache column is shared between neighbours and only indicative.

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
