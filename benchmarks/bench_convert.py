"""Benchmark: converting each packaged GGUF model into its safetensors folder, one pass vs transformers (chapter 0).

Chapter 0's first load of a GGUF model writes a float safetensors folder (``models.convert_gguf``). Each
conversion runs in a fresh process, cold (nothing converted yet; the imports of transformers and of the model's
architecture are done before the clock starts, since every load needs them): the one-pass path of
``embgeo_utils.lm.convert``, and the path it replaced, transformers' ``from_pretrained(gguf_file=...)``, a plain
model rebuilt from its config, ``save_pretrained`` for both halves. Both folders must hold the same files, sha256 for
sha256, before a row is written. The floor is the gguf package's dequantization kernels alone on every tensor of
the file (the arithmetic both paths must do), in a fresh process too. Wall and CPU seconds are both reported: on a
shared machine the wall time depends on the other jobs, the CPU time much less.

Run: ``python benchmarks/bench_convert.py [--models a,b] [--skip-reference NAME,...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _timing

from embgeo_utils.core import cache
from embgeo_utils.lm import convert, models

MODULES = {"llama": "llama", "gemma3": "gemma3", "qwen2": "qwen2"}


def floor(gguf_file: Path) -> None:
    """The gguf package's dequantization of every tensor, nothing else."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    from embgeo_utils.lm import convert

    parsed = convert.read_gguf(gguf_file)
    data = np.memmap(gguf_file, dtype=np.uint8, mode="r").view(np.ndarray)
    for tensor in parsed.tensors.values():
        qtype = GGMLQuantizationType(tensor.ggml_type)
        block, size = GGML_QUANT_SIZES[qtype]
        rows = data[tensor.start : tensor.start + tensor.nbytes].reshape(-1, tensor.shape[-1] // block * size)
        dequantize(rows, qtype)


def child(mode: str, name: str, out: Path) -> None:
    """One timed conversion (or the floor) in this process; prints wall, CPU and peak memory as JSON."""
    import importlib

    import transformers  # noqa: F401  (imports before the clock: every load needs them)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    spec = models.REGISTRY[name]
    importlib.import_module(f"transformers.models.{MODULES[spec.arch]}.modeling_{MODULES[spec.arch]}")
    source = models.gguf_path(name, verify=False)
    cpu, wall = sum(os.times()[:2]), time.perf_counter()
    if mode == "new":
        models.convert_gguf(spec, source, str(spec.sha256), out)
    elif mode == "old":
        convert.convert_with_transformers(source, out, spec.storage_dtype)
    else:
        floor(source)
    wall, cpu = time.perf_counter() - wall, sum(os.times()[:2]) - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps({"wall": wall, "cpu": cpu, "peak_gb": peak, "load": _timing.load_average()}))


def run(mode: str, name: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, name, str(out)], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} conversion of {name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"  {name:20s} {mode:5s} wall {result['wall']:7.1f} s  CPU {result['cpu']:7.1f} s  "
        f"peak {result['peak_gb']:.2f} GB  load {result['load']:.1f}",
        flush=True,
    )
    return result


def sums(folder: Path) -> dict[str, str]:
    return {p.name: cache.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != models.MANIFEST}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("MODE", "NAME", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--models", default=",".join(n for n, s in models.REGISTRY.items() if s.kind != "safetensors-dir")
    )
    parser.add_argument("--skip-reference", default="", help="models converted only by the one-pass path")
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], Path(args.child[2]))
    rec = _timing.Recorder(__file__)
    skip = {n for n in args.skip_reference.split(",") if n}
    totals = {"new": 0.0, "old": 0.0}
    for name in args.models.split(","):
        spec = models.REGISTRY[name]
        source = models.gguf_path(name)  # assembled and verified outside the timings
        with tempfile.TemporaryDirectory(dir=cache.cache_dir("bench-convert")) as tmp:
            new = run("new", name, Path(tmp) / "new")
            old = run("old", name, Path(tmp) / "old") if name not in skip else None
            if old is not None:
                ours, theirs = sums(Path(tmp) / "new"), sums(Path(tmp) / "old")
                assert ours == theirs, f"{name}: files differ: {sorted(k for k in ours if ours[k] != theirs.get(k))}"
                agreement = f"all {len(ours)} files identical (sha256)"
            else:
                agreement = "reference not run (memory); files equal to the manifest of the previous path"
            shutil.rmtree(Path(tmp) / "old", ignore_errors=True)
            kernels = run("floor", name, Path(tmp) / "floor")
        totals["new"] += new["wall"]
        totals["old"] += old["wall"] if old else float("nan")
        cpu = f"CPU ours {new['cpu']:.0f} s" + (f", reference {old['cpu']:.0f} s" if old else "")
        rec.add(
            f"GGUF -> safetensors folder, cold ({name})",
            f"{source.stat().st_size / 1e6:.0f} MB GGUF ({spec.notes.split(',')[0]}) -> {spec.storage_dtype} "
            f"folder; peak RSS ours {new['peak_gb']:.1f} GB" + (f", reference {old['peak_gb']:.1f} GB" if old else ""),
            new["wall"],
            "transformers from_pretrained(gguf_file) + save_pretrained" if old else None,
            old["wall"] if old else None,
            "gguf dequantize kernels alone, every tensor",
            kernels["wall"],
            f"{agreement}; {cpu}",
        )
    print(f"total wall: one pass {totals['new']:.0f} s, transformers {totals['old']:.0f} s")
    rec.write()


if __name__ == "__main__":
    main()
