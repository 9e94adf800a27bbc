"""Benchmark: ``layer_observables`` against a per-prompt, per-layer DADApy loop (chapter 4).

Input: a seeded synthetic stack shaped like SmolLM2-135M hidden states,
50 prompts x 31 layers x 512 tokens x 576 (float32): each prompt's tokens follow a
12-dimensional latent signal that every layer maps through its own random
linear map plus noise, on top of a large shared offset (anisotropy). Real hidden
states would need the model and corpus; the cost depends only on the shape.

Reference loop, as in the code of Viswanathan et al.: for each prompt and layer,
``np.unique`` to drop duplicate tokens, ``Data(X).return_id_scaling_gride(range_max=256)``,
``Data(X).compute_id_2NN()``, DADApy neighbour indices (``maxk=4``) with
``return_data_overlap`` between consecutive layers, and a numpy cosine matrix.
The loop is timed on the first ``--peer-prompts`` prompts and extrapolated to all.
Exits non-zero if any number disagrees.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from embgeo_utils.token_geometry import layer_observables

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
    """Real hidden states of every layer for real passages (cached on disk after the first run)."""
    from embgeo_utils import activations, corpus, models

    loaded = models.load(model, device="cpu")
    passages = corpus.load_passages(prompts, loaded.tokenizer, min_tokens=tokens, max_tokens=tokens, seed=0)
    acts = activations.hidden_states(loaded, [p.token_ids for p in passages], tokens, with_loss=False)
    return acts.hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--peer-prompts", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="real SmolLM2-135M hidden states of real passages")
    args = parser.parse_args()

    if args.real:
        # the embedding layer is skipped as in Viswanathan et al.: repeated tokens are exact duplicates there
        hidden = np.ascontiguousarray(real_hidden(args.prompts)[:, 1:])
        print(f"real SmolLM2-135M hidden states {hidden.shape} float32 (embedding layer skipped)")
    else:
        hidden = synthetic_hidden(args.prompts)
        print(f"synthetic hidden states {hidden.shape} float32 (seeded)")
    layer_observables(hidden[:1], scales=SCALES, overlap_k=OVERLAP_K, device="cpu")  # warm-up

    start = time.perf_counter()
    ours = layer_observables(hidden, scales=SCALES, overlap_k=OVERLAP_K, device="cpu", progress=False)
    t_ours = time.perf_counter() - start

    sub = args.peer_prompts
    start = time.perf_counter()
    peer = dadapy_loop(hidden[:sub])
    t_peer_sub = time.perf_counter() - start
    t_peer = t_peer_sub * args.prompts / sub

    print(f"layer_observables, {args.prompts} prompts: {t_ours:8.2f} s ({t_ours / args.prompts:.3f} s/prompt)")
    print(
        f"DADApy loop, {sub} prompts: {t_peer_sub:8.2f} s ({t_peer_sub / sub:.3f} s/prompt) "
        f"-> {t_peer:.1f} s extrapolated to {args.prompts}"
    )
    print(f"speed-up {t_peer / t_ours:.1f}x")

    np.testing.assert_allclose(ours.gride[:sub], peer["gride"], rtol=1e-8)
    np.testing.assert_allclose(ours.twonn[:sub], peer["twonn"], rtol=1e-8)
    for j, k in enumerate(OVERLAP_K):
        np.testing.assert_allclose(ours.overlap[k][:sub], peer["overlap"][:, j], atol=1e-12)
    np.testing.assert_allclose(ours.cos_mean[:sub], peer["cos_mean"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ours.cos_std[:sub], peer["cos_std"], rtol=1e-6)
    print("all observables agree with the DADApy loop (GRIDE, TwoNN rtol 1e-8; overlap exact; cosine rtol 1e-6)")
    print("peak GRIDE (n2=2) of prompt 0:", np.round(ours.gride[0, :, 0].max(), 3))


if __name__ == "__main__":
    main()
