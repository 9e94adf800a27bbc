"""Matching SAE features across models and comparing their decoder geometry (chapter 5).

Two SAEs, one per model, encode the same tokens. :func:`activation_correlation`
gives the Pearson correlation of every latent of A with every latent of B over
those tokens; :func:`match_features` pairs them (many-to-one: each B latent with
its most correlated A latent, as Lan et al.; or one-to-one by optimal
assignment); :func:`filter_pairs` applies Lan et al.'s filters and counts the
pairs left after each. The paired decoder rows are then compared with
:func:`svcca` and :func:`rsa`, each against a null of random re-pairings
(:func:`svcca_test`, :func:`rsa_test`, built on :func:`embgeo_utils.core.stats.permutation_test`).

References:
    M. Lan, P. Torr, A. Meek, A. Khakzar, D. Krueger, F. Barez (2024), Quantifying
    feature space universality across large language models via sparse
    autoencoders, arXiv:2410.06981.

    J. Son et al. (2025), Semantic convergence: investigating shared
    representations across scaled LLMs, arXiv:2507.22918.

    M. Raghu, J. Gilmer, J. Yosinski, J. Sohl-Dickstein (2017), SVCCA: singular
    vector canonical correlation analysis, NeurIPS.


One look for every figure of the book (all chapters).

``use_book_style()`` sets a seaborn theme with a colour-blind-safe palette;
``model_colors`` gives each packaged model the same colour in every chapter.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.cache import (
    array_digest,
    cache_dir,
    content_key,
    frame_row,
    load_arrays,
    load_frame,
    save_arrays,
    save_frame,
)
from ..core.device import get_device
from ..core.errors import EmbgeoInputError
from ..core.stats import Check, verdict
from ..geometry.matching import FeaturePairs, activation_correlation, match_features, rsa, rsa_test, svcca_curve_test
from ..lm.alignment import AlignedTokens, aligned_activations
from ..lm.sae import cached_loss_recovered, cached_sae, encode_all, sae_metrics
from .style import need_columns

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "LayerSAE",
    "PairResult",
    "best_depth_subsamples",
    "check_claim10",
    "compare_layer",
    "feature_examples",
    "filter_pairs",
    "non_concept_tokens",
    "pair_layers",
    "plot_sae_layer_heatmaps",
    "plot_svcca_curves",
    "run_pair",
    "seed_ceiling",
    "top_tokens",
    "train_layer_saes",
]


def non_concept_tokens(tokenizer: Any) -> np.ndarray:
    """Boolean mask over the vocabulary of non-concept tokens (chapter 5, Lan et al.'s filter).

    A token is non-concept when it is a special token (BOS, EOS, pad, ...), or
    its text is empty or made only of whitespace, newlines, punctuation or symbols.
    """
    size = len(tokenizer)
    mask = np.zeros(size, dtype=bool)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i in range(size):
        if i in special:
            mask[i] = True
            continue
        text = tokenizer.decode([i])
        stripped = "".join(ch for ch in text if not ch.isspace())
        mask[i] = not stripped or all(unicodedata.category(ch)[0] in "PSZC" for ch in stripped)
    return mask


def top_tokens(z: Any, token_ids: np.ndarray, latents: np.ndarray, top: int = 5) -> np.ndarray:
    """Token ids at the ``top`` most activating positions of each latent, ``(len(latents), top)`` (chapter 5)."""
    t = torch.as_tensor(z)
    ids = np.asarray(token_ids).ravel()
    if ids.size != t.shape[0]:
        raise EmbgeoInputError(f"token_ids has {ids.size} entries for {t.shape[0]} rows of latents.")
    cols = t[:, torch.as_tensor(np.asarray(latents), dtype=torch.long)]
    rows = torch.topk(cols, min(top, t.shape[0]), dim=0).indices.T.cpu().numpy()
    return ids[rows]


def filter_pairs(
    pairs: FeaturePairs,
    za: Any,
    zb: Any,
    token_ids: np.ndarray,
    non_concept: np.ndarray,
    *,
    min_corr: float = 0.1,
    top: int = 5,
    drop_dead: bool = True,
    drop_non_concept: bool = True,
    require_shared_tokens: bool = True,
) -> tuple[FeaturePairs, list[dict[str, Any]]]:
    """Lan et al.'s filters on matched pairs, with the count left after each (chapter 5).

    In order: pairs with a dead latent (never active on these tokens); pairs whose
    ``top`` most activating tokens (either side) include a non-concept token; pairs
    whose top-token sets do not intersect; pairs with correlation ``<= min_corr``.
    Each filter can be switched off.

    Returns:
        The pairs kept, and one row per step: ``{"filter", "pairs left"}``.
    """
    ids = np.asarray(token_ids).ravel()
    za_t, zb_t = torch.as_tensor(za), torch.as_tensor(zb)
    counts = [{"filter": "matched", "pairs left": len(pairs)}]
    keep = np.ones(len(pairs), dtype=bool)
    if drop_dead:
        alive_a = (za_t > 0).any(dim=0).cpu().numpy()
        alive_b = (zb_t > 0).any(dim=0).cpu().numpy()
        keep &= alive_a[pairs.a] & alive_b[pairs.b]
        counts.append({"filter": "dead latents dropped", "pairs left": int(keep.sum())})
    tops_a = top_tokens(za_t, ids, pairs.a, top)
    tops_b = top_tokens(zb_t, ids, pairs.b, top)
    if drop_non_concept:
        mask = np.asarray(non_concept, dtype=bool)
        keep &= ~(mask[tops_a].any(axis=1) | mask[tops_b].any(axis=1))
        counts.append({"filter": f"non-concept top-{top} tokens dropped", "pairs left": int(keep.sum())})
    if require_shared_tokens:
        shared = (tops_a[:, :, None] == tops_b[:, None, :]).any(axis=(1, 2))
        keep &= shared
        counts.append({"filter": f"top-{top} token sets intersect", "pairs left": int(keep.sum())})
    if min_corr is not None:
        keep &= pairs.corr > min_corr
        counts.append({"filter": f"correlation > {min_corr}", "pairs left": int(keep.sum())})
    return pairs.subset(keep), counts


def pair_layers(n_layers_a: int, n_layers_b: int, depths: Sequence[float]) -> list[tuple[int, int]]:
    """Layers of A and B at the same relative depths (chapter 5): ``round(depth * L)``, at least 1."""
    out = []
    for d in depths:
        if not 0 < d <= 1:
            raise EmbgeoInputError(f"relative depths must lie in (0, 1], got {d}.")
        out.append((max(1, round(d * n_layers_a)), max(1, round(d * n_layers_b))))
    return out


@dataclass
class LayerSAE:
    """One trained SAE with its held-out quality (chapter 5)."""

    model: str
    layer: int
    sae: Any
    history: Any
    metrics: dict[str, float]


def train_layer_saes(
    acts: dict[int, np.ndarray],
    train: np.ndarray,
    heldout: np.ndarray,
    model_key: str,
    model_name: str,
    *,
    expansion: int = 4,
    k: int = 32,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    **train_kwargs: Any,
) -> dict[int, LayerSAE]:
    """A cached TopK SAE per layer on the training rows, evaluated on the held-out rows (chapter 5).

    The cache key holds ``model_key`` (the model's digest), the layer, a digest of
    the training activations and every hyperparameter.
    """

    out = {}
    for layer, x in acts.items():
        x_train = np.ascontiguousarray(x[train])
        key = {"model": model_key, "layer": layer, "tokens": content_key(x_train.tobytes())}
        sae, history = cached_sae(
            x_train, expansion * x.shape[1], k, key, seed=seed, device=device, progress=progress, **train_kwargs
        )
        out[layer] = LayerSAE(model_name, layer, sae, history, sae_metrics(sae, x[heldout]))
    return out


def compare_layer(
    za: Any,
    zb: Any,
    dec_a: np.ndarray,
    dec_b: np.ndarray,
    ids: np.ndarray,
    non_concept: np.ndarray,
    *,
    n_components: Sequence[int] = (5, 10, 20, 50, 100),
    n_permutations: int = 1000,
    rsa_rows: int = 1000,
    min_corr: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> tuple[dict[str, Any], list[dict[str, Any]], FeaturePairs]:
    """Match two SAEs' latents on the same tokens and compare the paired decoder rows (chapter 5).

    Returns:
        A row of statistics (pairs kept, mean matched correlation, RSA and its
        null, SVCCA at the first usable ``n_components`` and its null), the
        SVCCA curve rows (one per ``n_components`` with its null), and the kept pairs.
    """
    corr = activation_correlation(za, zb, device=device)
    pairs = match_features(corr, "max")
    kept, counts = filter_pairs(pairs, za, zb, ids, non_concept, min_corr=min_corr)
    row: dict[str, Any] = {f"after: {c['filter']}": c["pairs left"] for c in counts}
    row.update({"pairs": len(kept), "mean corr (kept)": float(kept.corr.mean()) if len(kept) else float("nan")})
    curve = []
    if len(kept) >= 10:
        x, y = dec_a[kept.a], dec_b[kept.b]
        r = rsa_test(x, y, max_rows=rsa_rows, n_permutations=n_permutations, seed=seed, device=device)
        row.update(
            {
                "RSA": r.statistic,
                "RSA null mean": r.null_mean,
                "RSA null std": r.null_std,
                "RSA null max": r.null_max,
                "RSA p": r.p_value,
            }
        )
        usable = [n for n in n_components if n < len(kept) - 1]
        tests = svcca_curve_test(x, y, usable, n_permutations, seed, device) if usable else []
        for n, s in zip(usable, tests):
            curve.append(
                {
                    "n_components": n,
                    "SVCCA": s.statistic,
                    "null mean": s.null_mean,
                    "null std": s.null_std,
                    "null max": s.null_max,
                    "p": s.p_value,
                }
            )
        if curve:
            head = curve[min(2, len(curve) - 1)]  # n = 20 when the pairs allow it (the google/svcca tutorial's choice)
            row.update(
                {
                    "SVCCA": head["SVCCA"],
                    "SVCCA n": head["n_components"],
                    "SVCCA null mean": head["null mean"],
                    "SVCCA null std": head["null std"],
                    "SVCCA p": head["p"],
                }
            )
    return row, curve, kept


def _cached_compare_layer(key: str | None, compute: Any) -> tuple[dict[str, Any], list[dict[str, Any]], FeaturePairs]:
    """:func:`compare_layer`'s result, read from the cache under ``key`` or computed and stored there."""
    import pandas as pd

    if key is None:
        return compute()
    folder = cache_dir("sae", "compare")
    paths = [folder / f"{key}-{part}.npz" for part in ("row", "curve", "kept")]
    row_f, curve_f, kept_f = load_frame(paths[0]), load_frame(paths[1]), load_arrays(paths[2])
    if row_f is not None and curve_f is not None and kept_f is not None and len(row_f) == 1:
        kept = FeaturePairs(kept_f["a"], kept_f["b"], kept_f["corr"], str(kept_f["method"]))
        row = frame_row(row_f)
        return row, curve_f.to_dict(orient="records"), kept
    row, curve, kept = compute()
    save_arrays(paths[2], {"a": kept.a, "b": kept.b, "corr": kept.corr, "method": np.array(kept.method)})
    save_frame(pd.DataFrame(curve), paths[1])
    save_frame(pd.DataFrame([row]), paths[0])
    return row, curve, kept


def best_depth_subsamples(
    decoder_pairs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
    depth: dict[tuple[int, int], float],
    n_subsamples: int = 50,
    fraction: float = 0.5,
    rsa_rows: int = 500,
    seed: int = 0,
    device: str | torch.device = "auto",
) -> np.ndarray:
    """Relative depth of the layer pair with the highest RSA, over subsamples of the matched pairs (chapter 5).

    Each replicate draws ``fraction`` of every layer pair's matched features
    without replacement (a subsampling bootstrap: resampling with replacement
    would duplicate rows, whose correlation of 1 inflates RSA) and recomputes RSA
    on at most ``rsa_rows`` of them.
    """
    rng = np.random.default_rng(seed)
    keys = [key for key, (x, _) in decoder_pairs.items() if len(x) >= 20]
    if not keys:
        raise EmbgeoInputError("No layer pair has 20 matched features; lower the filters or use more tokens.")
    best = np.empty(n_subsamples)
    for i in range(n_subsamples):
        values = []
        for key in keys:
            x, y = decoder_pairs[key]
            pick = rng.choice(len(x), max(10, int(fraction * len(x))), replace=False)
            values.append(rsa(x[pick], y[pick], max_rows=rsa_rows, seed=int(rng.integers(1 << 30)), device=device))
        best[i] = depth[keys[int(np.argmax(values))]]
    return best


def _finite_or_none(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def check_claim10(
    grid: Any,
    matched: Sequence[tuple[int, int]],
    depth_a: dict[int, float],
    depth_b: dict[int, float],
    boot_argmax: np.ndarray,
    alpha: float = 0.01,
) -> Any:
    """Claim 10 (chapter 5): paired decoder geometry beats the null, and is highest in the middle layers.

    Checks, declared in advance:

    * (a) for every matched-depth layer pair: RSA above its permutation null
      (effect RSA minus the null mean, one-sided permutation p), and SVCCA above
      its null at the reported ``n`` (effect SVCCA minus the null mean);
    * (b) the layer pair with the highest RSA lies at an interior depth: effect
      = fraction of bootstrap replicates (``boot_argmax``: mean relative depth of
      the best pair per replicate) whose maximum is neither at the shallowest nor
      at the deepest studied depth, minus 0.5; smallest effect 0.45 (95 % of
      replicates). Descriptive (no p-value).

    The p-values are Holm-adjusted together (:func:`embgeo_utils.core.stats.verdict`).
    """

    g = grid.set_index(["layer A", "layer B"])
    checks = []
    for la, lb in matched:
        r = g.loc[(la, lb)]
        n = int(r["pairs"])
        if n < 10 or "RSA" not in r or not np.isfinite(r.get("RSA", np.nan)):
            checks.append(Check(f"RSA > null, layers {la}/{lb}", -1.0, 1.0, n=n))
            continue
        checks.append(
            Check(
                f"RSA > null, layers {la}/{lb}",
                float(r["RSA"] - r["RSA null mean"]),
                float(r["RSA p"]),
                n=n,
                se=_finite_or_none(r.get("RSA null std")),
            )
        )
        if np.isfinite(r.get("SVCCA", np.nan)):
            checks.append(
                Check(
                    f"SVCCA(n={int(r['SVCCA n'])}) > null, layers {la}/{lb}",
                    float(r["SVCCA"] - r["SVCCA null mean"]),
                    float(r["SVCCA p"]),
                    n=n,
                    se=_finite_or_none(r.get("SVCCA null std")),
                )
            )
    depths = sorted({round((depth_a[la] + depth_b[lb]) / 2, 6) for la, lb in matched})
    boot = np.asarray(boot_argmax, dtype=float)
    interior = np.mean([(d > depths[0] + 1e-9) and (d < depths[-1] - 1e-9) for d in boot]) if boot.size else 0.0
    checks.append(
        Check(
            "best layer pair at an interior depth (bootstrap share - 0.5)",
            float(interior - 0.5),
            None,
            min_effect=0.45,
            n=int(boot.size),
        )
    )
    return verdict(checks, alpha=alpha)


@dataclass
class PairResult:
    """Everything chapter 5 measures for one pair of models (chapter 5).

    Attributes:
        names: ``(A, B)``; layers_a, layers_b: the blocks studied.
        aligned: the aligned tokens and activations.
        saes: one table row per SAE (model, layer, relative depth, FVU, L0, dead fraction, loss recovered...).
        grid: one row per layer pair (filters, matched correlation, RSA, SVCCA with nulls and p-values).
        curves: SVCCA over ``n_components`` with the null, per layer pair.
        decoders: ``{(layer A, layer B): (rows of A's decoder, rows of B's decoder)}`` of the kept pairs.
        kept: ``{(layer A, layer B): FeaturePairs}``; latents: the encoded tokens per side and layer.
    """

    names: tuple[str, str]
    layers_a: list[int]
    layers_b: list[int]
    aligned: AlignedTokens
    saes: Any
    grid: Any
    curves: Any
    decoders: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]
    kept: dict[tuple[int, int], FeaturePairs]
    trained: dict[str, dict[int, LayerSAE]]

    def depth(self, la: int, lb: int) -> float:
        return float(self.grid.set_index(["layer A", "layer B"]).loc[(la, lb), "depth"])


def _loss_ids(loaded: Any, texts: Sequence[str], n_tokens: int) -> tuple[np.ndarray, int]:
    bos = [loaded.tokenizer.bos_token_id] if loaded.info.needs_bos else []
    rows = [bos + loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = min(len(r) for r in rows + [list(range(n_tokens + len(bos)))])
    return np.array([r[:width] for r in rows], dtype=np.int64), 1 + len(bos)


def run_pair(
    a: Any,
    b: Any,
    texts: Sequence[str],
    depths: Sequence[float],
    *,
    max_tokens: int = 256,
    heldout_fraction: float = 0.2,
    expansion: int = 4,
    k: int = 32,
    epochs: int = 4,
    batch_size: int = 256,
    lr: float | None = None,
    n_permutations: int = 1000,
    n_components: Sequence[int] = (5, 10, 20, 50, 100),
    rsa_rows: int = 1000,
    min_corr: float = 0.1,
    loss_texts: int = 4,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    cache: bool = True,
) -> PairResult:
    """Chapter 5 for one pair of loaded models: align, train SAEs, match every layer pair, compare (chapter 5).

    Layers are taken at the same relative ``depths`` in both models
    (:func:`pair_layers`). SAEs are trained on the aligned tokens of the first
    ``1 - heldout_fraction`` of the texts and evaluated on the rest (FVU, L0, dead
    fraction; loss recovered on ``loss_texts`` held-out texts). Latents of all
    aligned tokens are matched for every layer of A against every layer of B;
    SVCCA is computed at every ``n_components`` for the pairs at matching depth
    and at the headline value (the third) for the others. With ``cache`` each
    layer pair's comparison is kept on disk under a key of both layers'
    activations and SAE weights and of the comparison's parameters, so a rerun
    reads it.
    """
    import pandas as pd

    pairs = pair_layers(a.info.n_layers, b.info.n_layers, depths)
    layers_a = sorted({la for la, _ in pairs})
    layers_b = sorted({lb for _, lb in pairs})
    aligned = aligned_activations(a, b, texts, layers_a, layers_b, max_tokens=max_tokens, progress=progress)
    train, held = aligned.split(heldout_fraction)
    opts: dict[str, Any] = dict(
        expansion=expansion,
        k=k,
        seed=seed,
        device=device,
        progress=progress,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
    )
    trained = {
        "A": train_layer_saes(aligned.acts_a, train, held, a.info.sha256 or a.info.name, a.info.name, **opts),
        "B": train_layer_saes(aligned.acts_b, train, held, b.info.sha256 or b.info.name, b.info.name, **opts),
    }
    held_texts = sorted(set(aligned.passage[held].tolist()))[:loss_texts]
    sae_rows = []
    for side, loaded, acts in (("A", a, aligned.acts_a), ("B", b, aligned.acts_b)):
        ids, skip = _loss_ids(loaded, [aligned.texts[i] for i in held_texts], max_tokens)
        clean = None
        for layer, item in trained[side].items():
            mean = acts[layer][train].mean(axis=0)
            rec = cached_loss_recovered(loaded, ids, layer, item.sae, mean, skip_first=skip, clean=clean)
            clean = rec["clean"]
            sae_rows.append(
                {
                    "model": loaded.info.name,
                    "layer": layer,
                    "depth": layer / loaded.info.n_layers,
                    "latents": item.sae.n_latents,
                    "k": item.sae.k,
                    "train tokens": int(train.sum()),
                    "held-out tokens": int(held.sum()),
                    **{m: item.metrics[m] for m in ("fvu", "l0", "dead_fraction")},
                    "loss clean": rec["clean"],
                    "loss spliced": rec["spliced"],
                    "loss mean-ablated": rec["ablated"],
                    "loss recovered": rec["recovered"],
                    "train seconds": item.history.seconds,
                    "from cache": item.history.from_cache,
                }
            )
    non_concept = non_concept_tokens(a.tokenizer)
    latents_a = {la: encode_all(trained["A"][la].sae, aligned.acts_a[la]) for la in layers_a}
    latents_b = {lb: encode_all(trained["B"][lb].sae, aligned.acts_b[lb]) for lb in layers_b}
    grid_rows, curve_rows, decoders, kept_all = [], [], {}, {}
    dev_type = get_device(device).type
    layer_keys = {
        (side, layer): content_key(
            array_digest(acts[layer]), *(array_digest(t) for t in item.sae.state_dict().values())
        )
        for side, acts in (("A", aligned.acts_a), ("B", aligned.acts_b))
        for layer, item in trained[side].items()
    }
    tokens_key = content_key(array_digest(aligned.ids_a), array_digest(non_concept))
    # The SVCCA curve over n_components is drawn for the pairs at matching depth; the
    # other cells of the grid need only the headline n (the third value, 20 by default).
    headline = [list(n_components)[min(2, len(n_components) - 1)]] if len(n_components) else []
    for la in layers_a:
        for lb in layers_b:
            dec_a = trained["A"][la].sae.W_dec.detach().cpu().numpy()
            dec_b = trained["B"][lb].sae.W_dec.detach().cpu().numpy()
            comps = list(n_components if (la, lb) in pairs else headline)
            key = content_key(
                "compare-layer-v1", layer_keys[("A", la)], layer_keys[("B", lb)], tokens_key, comps, n_permutations,
                rsa_rows, min_corr, seed, dev_type,
            )  # fmt: skip
            row, curve, kept = _cached_compare_layer(
                key if cache else None,
                lambda la=la, lb=lb, dec_a=dec_a, dec_b=dec_b, comps=comps: compare_layer(
                    latents_a[la],
                    latents_b[lb],
                    dec_a,
                    dec_b,
                    aligned.ids_a,
                    non_concept,
                    n_components=comps,
                    n_permutations=n_permutations,
                    rsa_rows=rsa_rows,
                    min_corr=min_corr,
                    seed=seed,
                    device=device,
                ),
            )
            depth = (la / a.info.n_layers + lb / b.info.n_layers) / 2
            grid_rows.append(
                {
                    "layer A": la,
                    "layer B": lb,
                    "depth A": la / a.info.n_layers,
                    "depth B": lb / b.info.n_layers,
                    "depth": depth,
                    "matched depth": (la, lb) in pairs,
                    **row,
                }
            )
            curve_rows += [{"layer A": la, "layer B": lb, **c} for c in curve]
            decoders[(la, lb)] = (dec_a[kept.a], dec_b[kept.b])
            kept_all[(la, lb)] = kept
    return PairResult(
        (a.info.name, b.info.name),
        layers_a,
        layers_b,
        aligned,
        pd.DataFrame(sae_rows),
        pd.DataFrame(grid_rows),
        pd.DataFrame(curve_rows),
        decoders,
        kept_all,
        trained,
    )


def seed_ceiling(
    result: PairResult,
    side: str = "A",
    layer: int | None = None,
    seed: int = 1,
    n_permutations: int = 1000,
    rsa_rows: int = 1000,
    device: str | torch.device = "auto",
    progress: bool = True,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """The same comparison between two SAEs of one model and layer that differ only in their seed (chapter 5).

    It shows how similar "the same model" looks through this pipeline: the
    ceiling that cross-model numbers are read against.
    """

    trained = result.trained[side]
    layers = sorted(trained)
    layer = layers[len(layers) // 2] if layer is None else layer
    acts = (result.aligned.acts_a if side == "A" else result.aligned.acts_b)[layer]
    train, _ = result.aligned.split(0.2)
    first = trained[layer].sae

    x_train = np.ascontiguousarray(acts[train])
    key = {"model": result.names[0 if side == "A" else 1], "layer": layer, "tokens": content_key(x_train.tobytes())}
    second, _ = cached_sae(
        x_train, first.n_latents, first.k, key, seed=seed, device=device, progress=progress, **train_kwargs
    )
    ids = result.aligned.ids_a if side == "A" else result.aligned.ids_b
    row, _, _ = compare_layer(
        encode_all(first, acts),
        encode_all(second, acts),
        first.W_dec.detach().cpu().numpy(),
        second.W_dec.detach().cpu().numpy(),
        ids,
        np.zeros(int(ids.max()) + 1, dtype=bool),
        n_permutations=n_permutations,
        rsa_rows=rsa_rows,
        device=device,
    )
    return {"model": result.names[0 if side == "A" else 1], "layer": layer, **row}


def feature_examples(result: PairResult, la: int, lb: int, n: int = 4, top: int = 3, width: int = 40) -> Any:
    """The best-correlated kept pairs of a layer pair with their top-activating contexts (chapter 5).

    Each context shows ``width`` characters either side of the token, the token in bold.
    """
    import pandas as pd

    kept = result.kept[(la, lb)]
    if not len(kept):
        return pd.DataFrame()
    order = np.argsort(-kept.corr)[:n]
    al = result.aligned

    za = encode_all(result.trained["A"][la].sae, al.acts_a[la])
    rows = []
    for i in order:
        col = za[:, int(kept.a[i])]
        best = torch.topk(col, min(top, col.shape[0])).indices.cpu().numpy()
        contexts = []
        for r in best:
            text = al.texts[int(al.passage[r])]
            s, e = (int(v) for v in al.spans[r])
            left = text[max(0, s - width) : s].replace("\n", " ")
            right = text[e : e + width].replace("\n", " ")
            contexts.append(f"…{left}**{text[s:e].strip() or '␣'}**{right}…")
        rows.append(
            {
                "latent A": int(kept.a[i]),
                "latent B": int(kept.b[i]),
                "correlation": float(kept.corr[i]),
                "top contexts (A's latent)": " / ".join(contexts),
            }
        )
    return pd.DataFrame(rows)


def plot_sae_layer_heatmaps(grid: pd.DataFrame, names: tuple[str, str]) -> Figure:
    """Chapter 5: layer x layer heatmaps of RSA, SVCCA above its null, -log10 p of RSA, and pairs kept.

    Args:
        grid: ``feature_matching.run_pair(...).grid``.
        names: the two models (rows: A's layers, columns: B's layers).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    need_columns(grid, ("layer A", "layer B", "pairs"), "feature_matching.run_pair")
    g = grid.copy()
    if "SVCCA" in g:
        g["SVCCA − null"] = g["SVCCA"] - g["SVCCA null mean"]
    if "RSA p" in g:
        g["−log10 p (RSA)"] = -np.log10(g["RSA p"].astype(float))
    panels = [c for c in ("RSA", "SVCCA − null", "−log10 p (RSA)", "pairs") if c in g]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, col in zip(np.atleast_1d(axes), panels):
        table = g.pivot(index="layer A", columns="layer B", values=col).astype(float)
        sns.heatmap(
            table,
            annot=True,
            fmt=".3g" if col != "pairs" else ".0f",
            cmap="viridis",
            ax=ax,
            cbar=False,
            annot_kws={"fontsize": 7},
        )
        ax.set_title(col)
        ax.set_xlabel(f"layer of {names[1]}")
        ax.set_ylabel(f"layer of {names[0]}")
    fig.suptitle("Paired SAE decoder geometry per layer pair", y=1.02)
    return fig


def plot_svcca_curves(curves: pd.DataFrame, matched: Sequence[tuple[int, int]]) -> Figure:
    """Chapter 5: SVCCA against the number of kept singular directions, with the null, for the matched layer pairs."""
    import matplotlib.pyplot as plt
    import numpy as np

    need_columns(
        curves, ("layer A", "layer B", "n_components", "SVCCA", "null mean", "null max"), "feature_matching.run_pair"
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(matched))))
    for color, (la, lb) in zip(colors, matched):
        c = curves[(curves["layer A"] == la) & (curves["layer B"] == lb)]
        if c.empty:
            continue
        ax.plot(c["n_components"], c["SVCCA"], marker="o", color=color, label=f"layers {la} / {lb}")
        ax.fill_between(c["n_components"], c["null mean"], c["null max"], color=color, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("singular directions kept per side (log scale)")
    ax.set_ylabel("SVCCA (mean canonical correlation)")
    ax.set_title("SVCCA of paired decoder rows; bands: permutation null, mean to max")
    ax.legend(fontsize=8)
    return fig
