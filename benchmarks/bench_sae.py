"""Benchmark of chapter 5's kernels: SAE training, activation correlation, the permutation null.

1. TopK SAE training (``embgeo_utils.lm.sae.train_sae``) against EleutherAI's ``sparsify``
   ``SparseCoder`` trained by the same loop (Adam, the same learning rate, batches,
   epochs, AuxK for dead latents, unit-norm decoder), on the same real SmolLM2-135M
   residual activations, scaled the same way: tokens per second and held-out FVU side by side.
2. ``matching.activation_correlation`` on two SAEs' latents against a numpy
   reference (``np.corrcoef`` on dense latents) and against the GEMM floor of the
   dense cross product measured in this run; the results must agree.
3. ``matching.svcca_test`` (batched null) against a plain loop of numpy SVDs, same permutations.
4. ``matching.rsa_test`` (batched gather of ranks) against a plain loop of ``rsa`` on re-paired rows.

Run: ``python benchmarks/bench_sae.py [--tokens N] [--layer L] [--epochs E]``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import _timing
import numpy as np
import torch

from embgeo_utils.geometry import matching
from embgeo_utils.lm import activations, corpus, models
from embgeo_utils.lm import sae as S


def smollm_activations(n_tokens: int, layer: int) -> np.ndarray:
    loaded = models.load("smollm2-135m", device="cpu")
    n_passages = math.ceil(n_tokens / 255)
    passages = corpus.load_passages(n_passages, loaded.tokenizer, min_tokens=256, max_tokens=256, seed=0)
    acts = activations.hidden_states(loaded, [p.token_ids for p in passages], 256, with_loss=False, layers=[layer])
    return acts.hidden[:, 0, 1:].reshape(-1, acts.hidden.shape[-1])[:n_tokens].astype(np.float32)


def train_sparsify(x: np.ndarray, n_latents: int, k: int, epochs: int, batch_size: int, lr: float, seed: int):
    """The peer: sparsify's SparseCoder trained by a loop with our hyperparameters."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    d = x.shape[1]
    coder = SparseCoder(d, SparseCoderConfig(num_latents=n_latents, k=k), device="cpu")
    opt = torch.optim.Adam(coder.parameters(), lr=lr, eps=6.25e-10)
    data = torch.from_numpy(x)
    rng = np.random.default_rng(seed)
    since = torch.zeros(n_latents, dtype=torch.long)
    dead_after = max(batch_size, len(x) // 2)
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))  # the same batches as train_sae with this seed
        for start in range(0, len(x), batch_size):
            batch = data[order[start : start + batch_size]]
            out = coder(batch, dead_mask=since >= dead_after)
            loss = out.fvu + out.auxk_loss / 32
            opt.zero_grad(set_to_none=True)
            loss.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            coder.set_decoder_norm_to_unit_norm()
            since += batch.shape[0]
            since[out.latent_indices.flatten()] = 0
    return coder


def fvu_of(reconstruct, x: np.ndarray) -> float:
    t = torch.from_numpy(x)
    with torch.no_grad():
        err = float((t - reconstruct(t)).double().pow(2).sum())
    return err / float((t - t.mean(0)).double().pow(2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=12_000)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=4)
    args = parser.parse_args()
    rec = _timing.Recorder(__file__)
    rate = _timing.gemm_rate(torch.float32)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    )
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    x = smollm_activations(args.tokens, args.layer)
    n_train = int(0.8 * len(x))
    train, held = x[:n_train], x[n_train:]
    n_latents, k = args.expansion * x.shape[1], args.k
    lr = 2e-4 / math.sqrt(n_latents / 2**14)
    steps_tokens = args.epochs * n_train
    print(
        f"\n1. SAE training: SmolLM2-135M layer {args.layer}, {n_train} training / {len(held)} held-out tokens, "
        f"{n_latents} latents, k = {k}, {args.epochs} epochs, batch {args.batch_size}, Adam lr {lr:.2e}"
    )
    start = time.perf_counter()
    ours, _ = S.train_sae(
        train, n_latents, k, epochs=args.epochs, batch_size=args.batch_size, lr=lr, seed=0, device="cpu", progress=False
    )
    t_ours = time.perf_counter() - start
    fvu_ours = S.sae_metrics(ours, held)["fvu"]
    rows = [("embgeo train_sae", t_ours, fvu_ours)]
    try:
        scale = float(ours.input_scale)
        start = time.perf_counter()
        peer = train_sparsify(train * scale, n_latents, k, args.epochs, args.batch_size, lr, 0)
        t_peer = time.perf_counter() - start
        fvu_peer = fvu_of(lambda t: peer(t).sae_out, held * scale)
        rows.append(("sparsify SparseCoder", t_peer, fvu_peer))
    except ImportError:
        print("   (sparsify is not installed here: `pip install eai-sparsify` for the peer row)")
    print(f"{'':>24} {'seconds':>9} {'tokens/s':>10} {'held-out FVU':>13}")
    for name, seconds, fvu in rows:
        print(f"{name:>24} {seconds:>9.1f} {steps_tokens / seconds:>10.0f} {fvu:>13.3f}")
    if len(rows) == 2:
        print(f"{'ratio peer / ours (time)':>24} {rows[1][1] / rows[0][1]:>9.2f}")
    # Floor: the dense encoder product forward and backward (6 d L flops per token) at the float32 GEMM rate.
    d = x.shape[1]
    rec.add(
        f"train_sae: TopK, {n_latents} latents, k = {k}, {args.epochs} epochs",
        f"SmolLM2-135M layer {args.layer}, {n_train} real training tokens",
        t_ours,
        "sparsify SparseCoder, same loop" if len(rows) == 2 else None,
        rows[1][1] if len(rows) == 2 else None,
        f"6 d L flops per token at {rate / 1e9:.0f} GFLOP/s",
        6.0 * d * n_latents * steps_tokens / rate,
        f"held-out FVU ours {fvu_ours:.3f}" + (f", peer {rows[1][2]:.3f}" if len(rows) == 2 else ""),
    )

    print("\n2. activation_correlation (two SAEs' latents, all tokens)")
    other, _ = S.train_sae(
        train, n_latents, k, epochs=1, batch_size=args.batch_size, lr=lr, seed=1, device="cpu", progress=False
    )
    za, zb = S.encode_all(ours, x), S.encode_all(other, x)
    start = time.perf_counter()
    corr = matching.activation_correlation(za, zb, device="cpu")
    t_corr = time.perf_counter() - start
    dense_a, dense_b = za.numpy().astype(np.float64), zb.numpy().astype(np.float64)
    start = time.perf_counter()
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.nan_to_num(np.corrcoef(dense_a.T, dense_b.T)[:n_latents, n_latents:])
    t_ref = time.perf_counter() - start
    a32 = za.numpy()
    start = time.perf_counter()
    _ = a32.T @ zb.numpy()
    t_gemm = time.perf_counter() - start
    print(f"{'ours (sparse where sparse)':>28} {t_corr:>8.2f} s")
    print(f"{'numpy corrcoef (dense f64)':>28} {t_ref:>8.2f} s   ratio {t_ref / t_corr:.1f}x")
    print(f"{'floor: dense f32 GEMM':>28} {t_gemm:>8.2f} s   ours / floor {t_corr / t_gemm:.2f}")
    np.testing.assert_allclose(corr, ref, atol=1e-6)
    print(f"   agreement: max |difference| {float(np.abs(corr - ref).max()):.1e}")
    rec.add(
        f"activation_correlation, {n_latents} x {n_latents} latents",
        f"{len(x)} tokens",
        t_corr,
        "numpy corrcoef (dense float64)",
        t_ref,
        "dense float32 GEMM of the latents (this run)",
        t_gemm,
        f"max |difference| {float(np.abs(corr - ref).max()):.0e}",
    )

    print("\n3. SVCCA permutation null (200 re-pairings of 2,000 matched rows, n = 20)")
    pairs = matching.match_features(corr, "max")
    keep = np.argsort(-pairs.corr)[:2000]
    xa, xb = ours.W_dec.detach().numpy()[pairs.a[keep]], other.W_dec.detach().numpy()[pairs.b[keep]]
    start = time.perf_counter()
    res = matching.svcca_test(xa, xb, 20, n_permutations=200, seed=0, device="cpu")
    t_batched = time.perf_counter() - start

    def loop_null() -> np.ndarray:
        ua = np.linalg.svd(xa - xa.mean(0), full_matrices=False)[0][:, :20]
        ub = np.linalg.svd(xb - xb.mean(0), full_matrices=False)[0][:, :20]
        gen = torch.Generator().manual_seed(0)
        perms = torch.argsort(torch.rand((200, len(xa)), generator=gen), dim=1).numpy()
        return np.array([np.linalg.svd(ua.T @ ub[p], compute_uv=False).mean() for p in perms])

    start = time.perf_counter()
    null = loop_null()
    t_loop = time.perf_counter() - start
    print(f"{'ours (batched)':>28} {t_batched:>8.2f} s")
    print(f"{'plain loop (numpy SVDs)':>28} {t_loop:>8.2f} s   ratio {t_loop / t_batched:.1f}x")
    np.testing.assert_allclose(np.sort(res.null), np.sort(null), atol=1e-6)
    print(
        f"   agreement: the same null values (max |difference| {np.abs(np.sort(res.null) - np.sort(null)).max():.1e})"
    )
    rec.add(
        "svcca_test null, n = 20, 200 re-pairings",
        f"{len(xa)} matched rows",
        t_batched,
        "loop of numpy SVDs",
        t_loop,
        None,
        None,
        f"same null values ({np.abs(np.sort(res.null) - np.sort(null)).max():.0e})",
    )

    print("\n4. RSA permutation null (200 re-pairings of 1,000 matched rows)")
    xr, yr = xa[:1000], xb[:1000]
    start = time.perf_counter()
    res = matching.rsa_test(xr, yr, None, n_permutations=200, seed=0, device="cpu")
    t_batched = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    perms = torch.argsort(torch.rand((200, len(xr)), generator=gen), dim=1).numpy()
    start = time.perf_counter()
    null = np.array([matching.rsa(xr, yr[p], None, device="cpu") for p in perms])
    t_loop = time.perf_counter() - start
    print(f"{'ours (batched gather)':>28} {t_batched:>8.2f} s")
    print(f"{'plain loop of rsa()':>28} {t_loop:>8.2f} s   ratio {t_loop / t_batched:.1f}x")
    np.testing.assert_allclose(np.sort(res.null), np.sort(null), atol=1e-6)
    print(
        f"   agreement: the same null values (max |difference| {np.abs(np.sort(res.null) - np.sort(null)).max():.1e})"
    )
    rec.add(
        "rsa_test null, 200 re-pairings",
        f"{len(xr)} matched rows",
        t_batched,
        "loop of rsa()",
        t_loop,
        None,
        None,
        f"same null values ({np.abs(np.sort(res.null) - np.sort(null)).max():.0e})",
    )
    rec.write()


if __name__ == "__main__":
    main()
