"""Benchmark of chapter 6's steering machinery.

1. Steering vectors from ``steering.token_states`` against the ``steering-vectors``
   package (``train_steering_vector`` with its mean aggregator) on the same texts,
   the same block of SmolLM2-135M and the same loaded model: the package reads one
   token position per text (last, second-last, third-last are compared); the two
   vectors must agree to float tolerance; time of each. ``steering-vectors`` 0.12
   declares transformers < 5 but its training code runs unchanged on
   transformers 5: install it with ``pip install --no-deps -r
   benchmarks/requirements-steering.txt``.
2. Greedy generation with the KV cache and a ``steering.steer`` hook active against
   plain ``generate``: the hook's overhead (target at most 5 %), with one vector for
   the batch and with one vector per sequence (as chapter 6 generates), on one
   thread and in CPU time, plain and hooked runs alternating.

Run: ``python benchmarks/bench_steering.py [--repeats N] [--new-tokens T]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

from embgeo_utils.lm import models, steering

POS = [
    "The violin concerto was first performed in Leipzig.",
    "Her novel won the prize for fiction that year.",
    "The painter exhibited the portrait in Paris.",
    "The symphony's second movement is a slow march.",
]
NEG = [
    "The river flows north into the inland sea.",
    "The city lies on a plateau at high altitude.",
    "The island's population is about ten thousand.",
    "The mountain range forms the border to the east.",
]


def peer_last_tokens(loaded, layer: int) -> tuple[list[np.ndarray], float]:
    """steering-vectors' mean-difference vector at block ``layer`` (its index ``layer - 1``), positions -1, -2, -3."""
    from steering_vectors import train_steering_vector

    start = time.perf_counter()
    out = []
    for idx in (-1, -2, -3):
        sv = train_steering_vector(
            loaded.model,
            loaded.tokenizer,
            list(zip(POS, NEG)),
            layers=[layer - 1],
            read_token_index=idx,
            show_progress=False,
        )
        out.append(sv.layer_activations[layer - 1].float().cpu().numpy())
    return out, time.perf_counter() - start


def ours_last_tokens(loaded, layer: int) -> tuple[list[np.ndarray], float]:
    """The same statistic with our token_states: mean over texts of the state at position -1, -2, -3, pos minus neg."""

    start = time.perf_counter()
    sp = steering.token_states(loaded, POS, layer)
    sn = steering.token_states(loaded, NEG, layer)
    out = [
        (torch.stack([h[i] for h in sp]).mean(0) - torch.stack([h[i] for h in sn]).mean(0)).numpy()
        for i in (-1, -2, -3)
    ]
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-generation", action="store_true", help="only compare the vectors")
    args = parser.parse_args()
    import _timing

    rec = _timing.Recorder(__file__)

    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    loaded = models.load("smollm2-135m", device="cpu", dtype="float32")
    layer = args.layer

    # 1. the vector
    ours, t_ours = ours_last_tokens(loaded, layer)
    t_mean = time.perf_counter()
    steering.steering_vector(loaded, POS, NEG, layer)
    t_mean = time.perf_counter() - t_mean
    try:
        theirs, t_peer = peer_last_tokens(loaded, layer)
    except ImportError:
        print("steering-vectors is not installed: pip install --no-deps -r benchmarks/requirements-steering.txt")
    else:
        for i, (a, b) in enumerate(zip(ours, theirs)):
            rel = float(np.abs(a - b).max() / np.abs(b).max())
            print(f"position {-1 - i}: max |ours - steering-vectors| / max |v| = {rel:.2e}")
            assert rel < 1e-4, "the vectors disagree"
        rec.add(
            f"steering vector at block {layer}, 3 read positions",
            f"{len(POS)} + {len(NEG)} real sentences, SmolLM2-135M",
            t_ours,
            "steering-vectors train_steering_vector",
            t_peer,
            None,
            None,
            f"max rel. diff {rel:.0e}",
        )
        print(
            f"vectors at block {layer}, 3 read positions: ours {t_ours:.2f} s (one pass per text), "
            f"steering-vectors {t_peer:.2f} s (one pass per text and position), ratio {t_peer / t_ours:.2f}x; "
            f"our mean-over-positions steering_vector {t_mean:.2f} s"
        )

    if args.skip_generation:
        rec.write()
        return
    # 2. the hook during generation: one thread and CPU time, so that other jobs on a shared machine
    # inflate both sides alike; plain and steered runs alternate
    torch.set_num_threads(1)
    prompts = ["The history of the city begins", "In the laboratory, the scientists"] * 4
    v = steering.steering_vector(loaded, POS, NEG, layer)
    per_row = v[None, :] * torch.linspace(2.0, 6.0, len(prompts))[:, None]  # one vector per sequence
    seqs = steering.encode_texts(loaded, prompts)
    steering.generate(loaded, prompts, 4, batch_size=8)  # warm up
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "hook": [], "per-row hook": []}
    for _ in range(args.repeats):
        for kind in runs:
            w, c = time.perf_counter(), time.process_time()
            if kind == "hook":
                with steering.steer(loaded, layer, v, 4.0):
                    steering.generate_ids(loaded, seqs, args.new_tokens, batch_size=8)
            elif kind == "per-row hook":
                steering.generate_ids(loaded, seqs, args.new_tokens, vectors=per_row, layer=layer, batch_size=8)
            else:
                steering.generate_ids(loaded, seqs, args.new_tokens, batch_size=8)
            runs[kind].append((time.perf_counter() - w, time.process_time() - c))
    for i, name in ((1, "CPU time"), (0, "wall time")):
        p = float(np.median([r[i] for r in runs["plain"]]))
        for kind in ("hook", "per-row hook"):
            s = float(np.median([r[i] for r in runs[kind]]))
            print(
                f"generation with the KV cache, 8 prompts x {args.new_tokens} tokens, 1 thread, median of "
                f"{args.repeats}, {name}: plain {p:.2f} s, {kind} {s:.2f} s, overhead {100 * (s / p - 1):+.1f} %"
            )
            if i == 1:
                rec.add(
                    f"generation with the steer {kind} ({name})",
                    f"8 prompts x {args.new_tokens} new tokens, 1 thread",
                    s,
                    None,
                    None,
                    "plain generate (the floor: no hook)",
                    p,
                    f"hook overhead {100 * (s / p - 1):+.1f} %",
                )
    rec.write()


if __name__ == "__main__":
    sys.exit(main())
