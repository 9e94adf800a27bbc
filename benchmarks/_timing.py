"""Timing, floors and result rows shared by the benchmark scripts (run them as ``python benchmarks/bench_*.py``).

Every script measures the floor it compares against in the same run (a float32 or
float64 matrix-multiply rate, or the memory bandwidth of a large copy), prints the
load average at its start and end, and writes its rows to
``benchmarks/results/<script>.json`` through :class:`Recorder`; ``benchmarks/report.py``
turns those files into the table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def best_time(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls of ``fn`` and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def load_average() -> float:
    """The one-minute load average (NaN where the system has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return float("nan")


def gemm_rate(
    dtype: torch.dtype = torch.float32, m: int = 2048, k: int = 576, n: int = 2048, repeats: int = 3
) -> float:
    """Flops per second of one ``(m, k) @ (k, n)`` product in ``dtype`` on the CPU, best of ``repeats``."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up
    seconds, _ = best_time(lambda: a @ b, repeats)
    return 2.0 * m * k * n / seconds


def bmm_rate(batch: int, rows: int, inner: int, dtype: torch.dtype = torch.float32, repeats: int = 3) -> float:
    """Flops per second of a batched Gram product ``(batch, rows, inner) @ (batch, inner, rows)``."""
    x = torch.randn(batch, rows, inner, dtype=dtype)
    torch.bmm(x, x.transpose(1, 2))
    seconds, _ = best_time(lambda: torch.bmm(x, x.transpose(1, 2)), repeats)
    return 2.0 * batch * rows * rows * inner / seconds


def bandwidth(megabytes: int = 256, repeats: int = 3) -> float:
    """Bytes per second moved by a large copy (read + write), best of ``repeats``."""
    src = torch.ones(megabytes * (1 << 20) // 8, dtype=torch.float64)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds, _ = best_time(lambda: dst.copy_(src), repeats)
    return 2.0 * src.numel() * 8 / seconds


def machine() -> str:
    """A short description of the CPU and the torch build (the CPU name as the book's timings page gives it)."""
    from embgeo_utils.timings import machine as book_machine

    return f"{book_machine()['cpu']}, {os.cpu_count()} CPUs, torch {torch.__version__}"


class Recorder:
    """Rows of one benchmark script: printed as they come, written as JSON at the end."""

    def __init__(self, script: str) -> None:
        self.script = Path(script).stem
        self.rows: list[dict[str, Any]] = []
        self.load_start = load_average()
        self.started = datetime.datetime.now(datetime.timezone.utc)
        print(f"{self.script}: {machine()}; torch threads {torch.get_num_threads()}")
        print(f"load average at start: {self.load_start:.2f}")

    def add(
        self,
        kernel: str,
        input: str,
        ours_s: float,
        peer: str | None,
        peer_s: float | None,
        floor: str | None,
        floor_s: float | None,
        agreement: str,
    ) -> None:
        """One comparison: our time, the peer's, the floor's (each in seconds, None where there is none)."""
        row = {
            "script": self.script,
            "kernel": kernel,
            "input": input,
            "ours_s": ours_s,
            "peer": peer,
            "peer_s": peer_s,
            "floor": floor,
            "floor_s": floor_s,
            "peer_ratio": peer_s / ours_s if peer_s else None,
            "floor_ratio": ours_s / floor_s if floor_s else None,
            "agreement": agreement,
        }
        self.rows.append(row)
        parts = [f"{kernel}: ours {ours_s:.3f} s"]
        if peer_s is not None:
            parts.append(f"{peer} {peer_s:.3f} s (peer / ours {peer_s / ours_s:.1f}x)")
        if floor_s is not None:
            parts.append(f"floor {floor_s:.3f} s [{floor}] (ours / floor {ours_s / floor_s:.2f}x)")
        print("  ROW " + "; ".join(parts) + f"; agreement: {agreement}")

    def write(self) -> Path:
        """Write the rows, the load at start and end, the threads, the date and the machine."""
        load_end = load_average()
        print(f"load average at end: {load_end:.2f}")
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{self.script}.json"
        for row in self.rows:
            row.update(
                load_start=self.load_start,
                load_end=load_end,
                threads=torch.get_num_threads(),
                date=self.started.strftime("%Y-%m-%d %H:%M UTC"),
                machine=machine(),
            )
        path.write_text(json.dumps(self.rows, indent=1) + "\n")
        print(f"rows written to {path}")
        return path
