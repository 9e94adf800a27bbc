"""Benchmark: ``layer_observables`` against a per-prompt, per-layer DADApy loop (chapter 4).

Input (default): real SmolLM2-135M hidden states of ``--prompts`` real passages of 512
tokens, layers 1..30 (the embedding layer skipped). ``--synthetic``: a seeded stack of
the same shape (each prompt's tokens follow a 12-dimensional latent signal mapped by
every layer through its own random linear map plus noise, on a large shared offset).

Reference loop, as in the code of Viswanathan et al.: for each prompt and layer,
``np.unique`` to drop duplicate tokens, ``Data(X).return_id_scaling_gride(range_max=256)``,
``Data(X).compute_id_2NN()``, DADApy neighbour indices (``maxk=4``) with
``return_data_overlap`` between consecutive layers, and a numpy cosine matrix.
The loop is timed on the first ``--peer-prompts`` prompts and extrapolated to all.
Floor: the float32 Gram matrices of every cloud (2 T^2 d flops each) at the batched
matrix-multiply rate measured in this run. Exits non-zero if any number disagrees."""

from __future__ import annotations

import argparse
import warnings

import _timing
import numpy as np
import torch

from embgeo_utils.geometry.token_clouds import layer_observables
from embgeo_utils.lm import activations, corpus, models

SCALES = [2, 4, 8, 16, 32, 64, 128, 256]
OVERLAP_K = (1, 2, 4)


def synthetic_hidden(prompts: int, layers: int = 31, tokens: int = 512, dim: int = 576, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((layers, 12, dim)).astype(np.float32)
    offset = 3.0 * rng.standard_normal(dim).astype(np.float32)
    out = np.empty((prompts, layers, tokens, dim), dtype=np.float32)
    for p in range(prompts):
        latent = rng.standard_normal((tokens, 12)).astype(np.float32)
        noise = rng.standard_normal((layers, tokens, dim), dtype=np.float32)
        out[p] = latent @ maps + 0.3 * noise + offset
    return out


def dadapy_loop(hidden: np.ndarray) -> dict[str, np.ndarray]:
    from dadapy import Data

    warnings.filterwarnings("ignore")
    res = {"gride": [], "twonn": [], "overlap": [], "cos_mean": [], "cos_std": []}
    for prompt in hidden:
        indices = []
        gride, twonn, cmean, cstd = [], [], [], []
        for X in prompt:
            unique = np.unique(X, axis=0)
            gride.append(Data(coordinates=unique, verbose=False).return_id_scaling_gride(range_max=256)[0])
            twonn.append(Data(coordinates=unique, verbose=False).compute_id_2NN()[0])
            data = Data(coordinates=X, maxk=max(OVERLAP_K), verbose=False)
            data.compute_distances()
            indices.append(data)
            unit = X.astype(np.float64) / np.linalg.norm(X, axis=1, keepdims=True)
            cos = (unit @ unit.T)[~np.eye(len(X), dtype=bool)]
            cmean.append(cos.mean())
            cstd.append(cos.std())
        overlap = [
            [a.return_data_overlap(dist_indices=b.dist_indices, k=k) for a, b in zip(indices[:-1], indices[1:])]
            for k in OVERLAP_K
        ]
        for key, value in zip(res, (gride, twonn, overlap, cmean, cstd)):
            res[key].append(np.asarray(value))
    return {key: np.stack(value) for key, value in res.items()}


def real_hidden(prompts: int, tokens: int = 512, model: str = "smollm2-135m") -> np.ndarray:
    """Real hidden states of every layer for real passages."""

    loaded = models.load(model, device="cpu")
    passages = corpus.load_passages(prompts, loaded.tokenizer, min_tokens=tokens, max_tokens=tokens, seed=0)
    acts = activations.hidden_states(loaded, [p.token_ids for p in passages], tokens, with_loss=False)
    return acts.hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--peer-prompts", type=int, default=2)
    parser.add_argument("--synthetic", action="store_true", help="seeded synthetic stack instead of real hidden states")
    args = parser.parse_args()
    rec = _timing.Recorder(__file__)

    if args.synthetic:
        hidden = synthetic_hidden(args.prompts)
        what = f"synthetic {args.prompts} prompts x 31 layers x 512 tokens x 576"
    else:
        # the embedding layer is skipped as in Viswanathan et al.: repeated tokens are exact duplicates there
        hidden = np.ascontiguousarray(real_hidden(args.prompts)[:, 1:])
        what = f"real SmolLM2-135M hidden states, {args.prompts} prompts x {hidden.shape[1]} layers x 512 tokens x 576"
    print(what)
    n_prompts, n_layers, n_tokens, dim = hidden.shape
    kwargs = {"scales": SCALES, "overlap_k": OVERLAP_K, "device": "cpu", "progress": False}
    layer_observables(hidden[:1], dtype=torch.float32, **kwargs)  # warm-up

    t_ours, ours = _timing.best_time(lambda: layer_observables(hidden, dtype=torch.float32, **kwargs))
    t_f64, f64 = _timing.best_time(lambda: layer_observables(hidden, **kwargs))
    rate = _timing.bmm_rate(16, n_tokens, dim)
    floor = 2.0 * n_prompts * n_layers * n_tokens * n_tokens * dim / rate
    print(f"float32 Gram rate measured in this run: {rate / 1e9:.0f} GFLOP/s")

    sub = args.peer_prompts
    t_peer_sub, peer = _timing.best_time(lambda: dadapy_loop(hidden[:sub]))
    t_peer = t_peer_sub * n_prompts / sub
    print(
        f"DADApy loop, {sub} prompts: {t_peer_sub:8.2f} s ({t_peer_sub / sub:.3f} s/prompt) "
        f"-> {t_peer:.1f} s extrapolated to {n_prompts}"
    )

    errs = {
        "GRIDE": _timing.max_rel(ours.gride[:sub], peer["gride"]),
        "TwoNN": _timing.max_rel(ours.twonn[:sub], peer["twonn"]),
        "cos mean": _timing.max_rel(ours.cos_mean[:sub], peer["cos_mean"]),
        "cos std": _timing.max_rel(ours.cos_std[:sub], peer["cos_std"]),
    }
    same_overlap = all(np.array_equal(ours.overlap[k][:sub], peer["overlap"][:, j]) for j, k in enumerate(OVERLAP_K))
    np.testing.assert_allclose(ours.gride[:sub], peer["gride"], rtol=1e-6)
    np.testing.assert_allclose(ours.twonn[:sub], peer["twonn"], rtol=1e-6)
    for j, k in enumerate(OVERLAP_K):
        np.testing.assert_allclose(ours.overlap[k][:sub], peer["overlap"][:, j], atol=1e-12)
    np.testing.assert_allclose(ours.cos_mean[:sub], peer["cos_mean"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.cos_std[:sub], peer["cos_std"], rtol=1e-6)
    vs_f64 = max(_timing.max_rel(ours.gride, f64.gride), _timing.max_rel(ours.twonn, f64.twonn))
    agreement = (
        "vs DADApy: max rel. diff "
        + ", ".join(f"{k} {v:.0e}" for k, v in errs.items())
        + f"; overlaps {'identical' if same_overlap else 'equal to 1e-12'}"
        + f"; vs float64 path on all prompts: IDs {vs_f64:.0e}"
    )
    per = f" ({t_ours / n_prompts:.3f} s/prompt)"
    rec.add(
        "layer_observables(dtype=float32): float32 ranking, exact decisive distances",
        what,
        t_ours,
        f"DADApy 0.3.4 loop ({sub} prompts, extrapolated)",
        t_peer,
        f"float32 Gram matrices at {rate / 1e9:.0f} GFLOP/s (bmm, this run)",
        floor,
        agreement + per,
    )
    rec.add(
        "layer_observables(dtype=float64): float64 Gram matrices (the previous path)",
        what,
        t_f64,
        f"DADApy 0.3.4 loop ({sub} prompts, extrapolated)",
        t_peer,
        f"float32 Gram matrices at {rate / 1e9:.0f} GFLOP/s (bmm, this run)",
        floor,
        f"float32 path vs this: IDs {vs_f64:.0e}",
    )
    print("all observables agree with the DADApy loop (GRIDE, TwoNN, cosines rtol 1e-6; overlap exact)")
    print("peak GRIDE (n2=2) of prompt 0:", np.round(ours.gride[0, :, 0].max(), 3))
    rec.write()


if __name__ == "__main__":
    main()
