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

import numpy as np
import torch

from embgeo_utils.book.timings import machine as book_machine

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str | torch.device = "cpu") -> None:
    """Wait for the queued work of ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], Any], repeats: int = 1, device: str | torch.device = "cpu") -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls of ``fn`` and the last result (``device`` synchronized around each)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def load_average() -> float:
    """The one-minute load average (NaN where the system has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return float("nan")


def gemm_rate(
    dtype: torch.dtype = torch.float32,
    m: int = 2048,
    k: int = 576,
    n: int = 2048,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> float:
    """Flops per second of one ``(m, k) @ (k, n)`` product in ``dtype`` on ``device``, best of ``repeats``."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    a @ b  # warm-up
    seconds, _ = best_time(lambda: a @ b, repeats, device)
    return 2.0 * m * k * n / seconds


def bmm_rate(
    batch: int,
    rows: int,
    inner: int,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    device: str | torch.device = "cpu",
) -> float:
    """Flops per second of a batched Gram product ``(batch, rows, inner) @ (batch, inner, rows)`` on ``device``."""
    x = torch.randn(batch, rows, inner, dtype=dtype, device=device)
    torch.bmm(x, x.transpose(1, 2))
    seconds, _ = best_time(lambda: torch.bmm(x, x.transpose(1, 2)), repeats, device)
    return 2.0 * batch * rows * rows * inner / seconds


def row_block_rate(n: int, d: int, block: int, device: str | torch.device = "cpu", repeats: int = 3) -> float:
    """float32 flops per second of ``x[:block] @ x.T`` for ``x`` of shape ``(n, d)``: one row block of a distance search."""
    x = torch.randn(n, d, device=device)
    rows = x[: min(block, n)]
    torch.mm(rows, x.T)  # warm-up
    seconds, _ = best_time(lambda: torch.mm(rows, x.T), repeats, device)
    return 2.0 * len(rows) * n * d / seconds


def max_rel(a: Any, b: Any) -> float:
    """Largest relative difference of ``a`` from the reference ``b`` (elementwise)."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def bandwidth(megabytes: int = 256, repeats: int = 3, device: str | torch.device = "cpu") -> float:
    """Bytes per second moved by a large copy (read + write) on ``device``, best of ``repeats``."""
    src = torch.ones(megabytes * (1 << 20) // 8, dtype=torch.float64, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds, _ = best_time(lambda: dst.copy_(src), repeats, device)
    return 2.0 * src.numel() * 8 / seconds


def card(device: str | torch.device = "cpu") -> str | None:
    """The accelerator's name (``torch.cuda.get_device_name``), None on the CPU."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def machine(device: str | torch.device = "cpu") -> str:
    """A short description of the CPU, the card if any and the torch build (the CPU name as the book's timings page gives it)."""

    name = card(device)
    gpu = f", {name}" if name else ""
    return f"{book_machine()['cpu']}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}"


class Recorder:
    """Rows of one benchmark script: printed as they come, written as JSON at the end."""

    def __init__(self, script: str, device: str | torch.device = "cpu", out: Path | None = None) -> None:
        self.script = Path(script).stem
        self.device = torch.device(device)
        self.path = out or RESULTS / f"{self.script}.json"
        self.rows: list[dict[str, Any]] = []
        self.load_start = load_average()
        self.started = datetime.datetime.now(datetime.timezone.utc)
        print(f"{self.script}: {machine(self.device)}; torch threads {torch.get_num_threads()}")
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
        ours_cpu_s: float | None = None,
    ) -> None:
        """One comparison: our time, the peer's, the floor's (each in seconds, None where there is none).

        On an accelerator, ``ours_s`` is the time there and ``ours_cpu_s`` that of our CPU path on the
        same input; the row then names the card and the CPU threads.
        """
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
        name = card(self.device)
        if name or ours_cpu_s is not None:  # an accelerator row (or its dry run on the CPU)
            row.update(device=name or self.device.type, ours_cpu_s=ours_cpu_s, cpu_threads=torch.get_num_threads())
        self.rows.append(row)
        parts = [f"{kernel}: ours {ours_s:.3f} s" + (f" [{name}]" if name else "")]
        if ours_cpu_s is not None:
            parts.append(f"ours on the CPU {ours_cpu_s:.3f} s (CPU / {self.device.type} {ours_cpu_s / ours_s:.1f}x)")
        if peer_s is not None:
            parts.append(f"{peer} {peer_s:.3f} s (peer / ours {peer_s / ours_s:.1f}x)")
        if floor_s is not None:
            parts.append(f"floor {floor_s:.3f} s [{floor}] (ours / floor {ours_s / floor_s:.2f}x)")
        print("  ROW " + "; ".join(parts) + f"; agreement: {agreement}")

    def write(self) -> Path:
        """Write the rows, the load at start and end, the threads, the date and the machine."""
        load_end = load_average()
        print(f"load average at end: {load_end:.2f}")
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for row in self.rows:
            row.update(
                load_start=self.load_start,
                load_end=load_end,
                threads=torch.get_num_threads(),
                date=self.started.strftime("%Y-%m-%d %H:%M UTC"),
                machine=machine(self.device),
            )
        path.write_text(json.dumps(self.rows, indent=1) + "\n")
        print(f"rows written to {path}")
        return path
