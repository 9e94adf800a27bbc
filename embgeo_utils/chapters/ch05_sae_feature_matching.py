"""Chapter 5, SAE feature matching across scale: do the features of a small and a larger model match?

Son et al. (2025), after Lan et al. (2024), train a sparse autoencoder (SAE) on each of two models, pair each
latent of one with the latent of the other whose activations correlate most over the same tokens, and ask whether
the paired decoder directions are arranged alike in the two spaces (claim 10): above a permutation null, and most
in the middle layers. The chapter runs that pipeline on one pair of models in named stages:

1. :func:`extract`: both models' block outputs at the token positions both tokenizers cut alike
   (:func:`~embgeo_utils.lm.alignment.aligned_activations`), at the same relative depths (:func:`pair_layers`),
   split by passage into training and held-out tokens (:class:`PairTokens`);
2. :func:`train`: a cached TopK SAE per studied block and its quality on held-out tokens (:class:`TrainedSAEs`);
3. match, :func:`match_layer`: the Pearson correlation of every latent of A with every latent of B
   (:func:`~embgeo_utils.geometry.matching.activation_correlation`), each B latent paired with its most correlated
   A latent, and Lan et al.'s filters counted one by one (:func:`filter_pairs`);
4. compare, :func:`compare_decoders`: RSA and SVCCA of the kept pairs' decoder rows, each against a null of random
   re-pairings. :func:`compare_layer` chains stages 3 and 4 for one layer pair; :func:`match_and_compare` runs
   them, cached (:func:`layer_comparison`), for every layer of A against every layer of B (:class:`LayerComparisons`);
5. :func:`check`: claim 10's verdict (:func:`check_claim10`, with :func:`best_depth_subsamples` for the location of
   the maximum; :class:`Claim10`).

:func:`run_pair` chains stages 1-4 (:class:`PairResult`); :func:`seed_ceiling` compares two SAEs of one model that
differ only in their seed (:class:`SeedCeiling`), the ceiling cross-model numbers are read against;
:func:`feature_examples` shows the best-matched features in context, and two figures show the grid and the SVCCA
curves.

References:
    M. Lan, P. Torr, A. Meek, A. Khakzar, D. Krueger, F. Barez (2024), Quantifying
    feature space universality across large language models via sparse
    autoencoders, arXiv:2410.06981.

    J. Son et al. (2025), Semantic convergence: investigating shared
    representations across scaled LLMs, arXiv:2507.22918.

    M. Raghu, J. Gilmer, J. Yosinski, J. Sohl-Dickstein (2017), SVCCA: singular
    vector canonical correlation analysis, NeurIPS.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.cache import array_digest, cached, content_key
from ..core.device import get_device
from ..core.errors import EmbgeoInputError
from ..core.stats import Check, Verdict, verdict
from ..geometry.matching import FeaturePairs, activation_correlation, match_features, rsa, rsa_test, svcca_curve_test
from ..lm.alignment import AlignedTokens, aligned_activations
from ..lm.models import LoadedModel
from ..lm.sae import cached_loss_recovered, cached_sae, encode_all, sae_metrics
from .style import need_columns

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "CHAPTER",
    "Claim10",
    "EncodedLayer",
    "LOSS_TEXTS",
    "LayerComparisons",
    "LayerSAE",
    "PairResult",
    "PairTokens",
    "Parameters",
    "SeedCeiling",
    "TITLE",
    "TrainedSAEs",
    "best_depth_subsamples",
    "check",
    "check_claim10",
    "compare_decoders",
    "compare_layer",
    "encode_layers",
    "extract",
    "feature_examples",
    "filter_pairs",
    "layer_comparison",
    "match_and_compare",
    "match_layer",
    "non_concept_tokens",
    "pair_layers",
    "plot_sae_layer_heatmaps",
    "plot_svcca_curves",
    "run_pair",
    "sae_quality",
    "seed_ceiling",
    "top_tokens",
    "train",
    "train_layer_saes",
]


CHAPTER = "ch05_sae_feature_matching"
TITLE = "SAE feature matching across scale"

#: Held-out texts the loss recovered of every SAE is measured on (chapter 5).
LOSS_TEXTS = 4

#: Claim 10's minimum effects (chapter 5, :func:`check_claim10`): (value, where it comes from).
CEILING_SHARE = (
    0.25,
    "a quarter of the seed ceiling's excess over its null (two SAEs of one model that differ only in their seed, "
    "through the same pipeline): 'far more similar than chance' read as a clear share of what one model shows",
)
MIN_CONTROL_RSA = (
    0.05,
    "practical: two SAEs of one model on the same activations must beat the null by a Spearman correlation of 0.05, "
    "or the pipeline could not show 'far more similar' between models",
)
MIN_CONTROL_SVCCA = (
    0.02,
    "practical: two SAEs of one model must raise SVCCA above its null by 0.02 (mean canonical correlation)",
)
MIN_INTERIOR = (
    0.45,
    "part (b)'s 'most in the middle layers' read as a maximum strictly inside the studied depths in 95 % of subsamples",
)


@dataclass(frozen=True)
class Parameters:
    """Chapter 5's parameters: the fields of its cell tagged ``parameters`` (defaults and allowed values are there)."""

    model_a: str
    model_b: str
    depths: list[float]
    n_passages: int
    passage_tokens: int
    heldout_fraction: float
    expansion: int
    k: int
    epochs: int
    batch_size: int
    lr: float | None
    n_permutations: int
    n_components: list[int]
    rsa_rows: int
    min_corr: float
    n_subsamples: int
    cross_pair: list[str]
    cross_depths: list[float]
    alpha: float
    seed: int
    device: str

    def models(self) -> list[str]:
        """The pair of one family, then the cross-tokenizer pair."""
        return [self.model_a, self.model_b] + list(self.cross_pair)


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


@dataclass(frozen=True)
class PairTokens:
    """What :func:`extract` gathered for one pair of models (chapter 5, stage 1).

    Attributes:
        matched: the layer pairs ``(layer of A, layer of B)`` at the requested relative depths (:func:`pair_layers`).
        layers_a, layers_b: the blocks studied in each model, sorted, each once.
        aligned: the aligned token positions with both models' activations at those blocks.
        train, heldout: boolean row masks over ``aligned``: the SAEs' training tokens and the held-out passages'.
    """

    matched: list[tuple[int, int]]
    layers_a: list[int]
    layers_b: list[int]
    aligned: AlignedTokens
    train: np.ndarray
    heldout: np.ndarray


def extract(
    a: LoadedModel, b: LoadedModel, texts: Sequence[str], depths: Sequence[float], p: Parameters, progress: bool = False
) -> PairTokens:
    """Chapter 5, stage 1: both models' activations on the same tokens, split into training and held-out tokens.

    Layers are taken at the same relative ``depths`` in both models (:func:`pair_layers`). Each text is cut to
    ``p.passage_tokens`` tokens and only positions whose character spans coincide in both tokenizations are kept
    (:func:`~embgeo_utils.lm.alignment.aligned_activations`); the last ``p.heldout_fraction`` of the passages are
    held out whole (:meth:`~embgeo_utils.lm.alignment.AlignedTokens.split`).
    """
    matched = pair_layers(a.info.n_layers, b.info.n_layers, depths)
    layers_a = sorted({la for la, _ in matched})
    layers_b = sorted({lb for _, lb in matched})
    aligned = aligned_activations(a, b, texts, layers_a, layers_b, max_tokens=p.passage_tokens, progress=progress)
    train, heldout = aligned.split(p.heldout_fraction)
    return PairTokens(matched, layers_a, layers_b, aligned, train, heldout)


@dataclass
class LayerSAE:
    """One trained SAE with its held-out quality (chapter 5)."""

    model: str
    layer: int
    sae: Any
    history: Any
    metrics: dict[str, float]


@dataclass(frozen=True)
class TrainedSAEs:
    """What :func:`train` produced for one pair of models (chapter 5, stage 2).

    Attributes:
        saes: ``{"A": {layer: LayerSAE}, "B": {layer: LayerSAE}}``, one SAE per studied block of each model.
        table: one row per SAE (A's, then B's): ``model``, ``layer``, ``depth`` (layer / blocks), ``latents``, ``k``,
            ``train tokens``, ``held-out tokens``, ``fvu``, ``l0``, ``dead_fraction`` (on the held-out tokens),
            ``loss clean``, ``loss spliced``, ``loss mean-ablated``, ``loss recovered`` (on :data:`LOSS_TEXTS`
            held-out texts, :func:`~embgeo_utils.lm.sae.loss_recovered`), ``train seconds``, ``from cache``.
    """

    saes: dict[str, dict[int, LayerSAE]]
    table: pd.DataFrame


def train_layer_saes(
    acts: dict[int, np.ndarray],
    train: np.ndarray,
    heldout: np.ndarray,
    model: LoadedModel,
    p: Parameters,
    progress: bool = False,
) -> dict[int, LayerSAE]:
    """Chapter 5: a cached TopK SAE per block of one model on the training rows, evaluated on the held-out rows.

    Each SAE has ``p.expansion`` x width latents, ``p.k`` of them active, and is trained with ``p.seed``,
    ``p.epochs``, ``p.batch_size`` and ``p.lr`` (:func:`~embgeo_utils.lm.sae.cached_sae`). The cache key holds the
    model's digest (its name when it has none), the layer, a digest of the training activations and every
    hyperparameter.
    """
    dev = get_device(p.device)
    out = {}
    for layer, x in acts.items():
        x_train = np.ascontiguousarray(x[train])
        key = {"model": model.info.sha256 or model.info.name, "layer": layer, "tokens": content_key(x_train.tobytes())}
        sae, history = cached_sae(
            x_train,
            p.expansion * x.shape[1],
            p.k,
            key,
            seed=p.seed,
            device=dev,
            progress=progress,
            epochs=p.epochs,
            batch_size=p.batch_size,
            lr=p.lr,
        )
        out[layer] = LayerSAE(model.info.name, layer, sae, history, sae_metrics(sae, x[heldout]))
    return out


def _loss_ids(loaded: LoadedModel, texts: Sequence[str], n_tokens: int) -> tuple[np.ndarray, int]:
    bos = [loaded.tokenizer.bos_token_id] if loaded.info.needs_bos else []
    rows = [bos + loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = min(len(r) for r in rows + [list(range(n_tokens + len(bos)))])
    return np.array([r[:width] for r in rows], dtype=np.int64), 1 + len(bos)


def sae_quality(
    a: LoadedModel, b: LoadedModel, tokens: PairTokens, saes: dict[str, dict[int, LayerSAE]], p: Parameters
) -> pd.DataFrame:
    """Chapter 5: the quality table of :class:`TrainedSAEs` (its columns are listed there).

    The loss recovered is measured on the first :data:`LOSS_TEXTS` held-out passages, cut to the shortest of them
    and at most ``p.passage_tokens`` tokens, with the mean training activation as the ablation
    (:func:`~embgeo_utils.lm.sae.cached_loss_recovered`); the clean loss is computed once per model.
    """
    import pandas as pd

    al = tokens.aligned
    held_texts = sorted(set(al.passage[tokens.heldout].tolist()))[:LOSS_TEXTS]
    rows = []
    for side, loaded, acts in (("A", a, al.acts_a), ("B", b, al.acts_b)):
        ids, skip = _loss_ids(loaded, [al.texts[i] for i in held_texts], p.passage_tokens)
        clean = None
        for layer, item in saes[side].items():
            mean = acts[layer][tokens.train].mean(axis=0)
            rec = cached_loss_recovered(loaded, ids, layer, item.sae, mean, skip_first=skip, clean=clean)
            clean = rec["clean"]
            rows.append(
                {
                    "model": loaded.info.name,
                    "layer": layer,
                    "depth": layer / loaded.info.n_layers,
                    "latents": item.sae.n_latents,
                    "k": item.sae.k,
                    "train tokens": int(tokens.train.sum()),
                    "held-out tokens": int(tokens.heldout.sum()),
                    **{m: item.metrics[m] for m in ("fvu", "l0", "dead_fraction")},
                    "loss clean": rec["clean"],
                    "loss spliced": rec["spliced"],
                    "loss mean-ablated": rec["ablated"],
                    "loss recovered": rec["recovered"],
                    "train seconds": item.history.seconds,
                    "from cache": item.history.from_cache,
                }
            )
    return pd.DataFrame(rows)


def train(a: LoadedModel, b: LoadedModel, tokens: PairTokens, p: Parameters, progress: bool = False) -> TrainedSAEs:
    """Chapter 5, stage 2: an SAE per studied block of each model (:func:`train_layer_saes`) and their quality table."""
    saes = {
        "A": train_layer_saes(tokens.aligned.acts_a, tokens.train, tokens.heldout, a, p, progress),
        "B": train_layer_saes(tokens.aligned.acts_b, tokens.train, tokens.heldout, b, p, progress),
    }
    return TrainedSAEs(saes, sae_quality(a, b, tokens, saes, p))


def match_layer(
    za: Any, zb: Any, ids: np.ndarray, non_concept: np.ndarray, min_corr: float, device: str | torch.device
) -> tuple[FeaturePairs, dict[str, Any]]:
    """Chapter 5, stage 3 for one layer pair: correlate two SAEs' latents on the same tokens, pair and filter them.

    Each latent of B is paired with its most correlated latent of A (many-to-one, Lan et al.), then Lan et al.'s
    filters are applied (:func:`filter_pairs`, correlation above ``min_corr``).

    Returns:
        The kept pairs, and their counts: ``after: <filter>`` for each filter step (the first is ``after: matched``),
        ``pairs`` (kept) and ``mean corr (kept)`` (NaN when none is kept).
    """
    corr = activation_correlation(za, zb, device=device)
    pairs = match_features(corr, "max")
    kept, counts = filter_pairs(pairs, za, zb, ids, non_concept, min_corr=min_corr)
    row: dict[str, Any] = {f"after: {c['filter']}": c["pairs left"] for c in counts}
    row.update({"pairs": len(kept), "mean corr (kept)": float(kept.corr.mean()) if len(kept) else float("nan")})
    return kept, row


def compare_decoders(
    dec_a: np.ndarray,
    dec_b: np.ndarray,
    kept: FeaturePairs,
    n_components: Sequence[int],
    n_permutations: int,
    rsa_rows: int,
    seed: int,
    device: str | torch.device,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Chapter 5, stage 4 for one layer pair: RSA and SVCCA of the kept pairs' decoder rows, against their nulls.

    Nothing is computed below 10 kept pairs. RSA uses at most ``rsa_rows`` pairs; SVCCA is computed at every
    ``n_components`` below the number of pairs minus one; each has a null of ``n_permutations`` re-pairings.

    Returns:
        The statistics: ``RSA``, ``RSA null mean``, ``RSA null std``, ``RSA null max``, ``RSA p``, and at the third
        usable ``n`` (the last when fewer: n = 20 by default, the google/svcca tutorial's choice) ``SVCCA``,
        ``SVCCA n``, ``SVCCA null mean``, ``SVCCA null std``, ``SVCCA p`` (absent when not computed); and the SVCCA
        curve, one row per usable ``n``: ``n_components``, ``SVCCA``, ``null mean``, ``null std``, ``null max``, ``p``.
    """
    row: dict[str, Any] = {}
    curve: list[dict[str, Any]] = []
    if len(kept) < 10:
        return row, curve
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
        head = curve[min(2, len(curve) - 1)]
        row.update(
            {
                "SVCCA": head["SVCCA"],
                "SVCCA n": head["n_components"],
                "SVCCA null mean": head["null mean"],
                "SVCCA null std": head["null std"],
                "SVCCA p": head["p"],
            }
        )
    return row, curve


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
    """Chapter 5, stages 3 and 4 for one layer pair: match two SAEs' latents, then compare the paired decoder rows.

    Returns:
        One row: the counts of :func:`match_layer` followed by the statistics of :func:`compare_decoders`; the SVCCA
        curve rows of :func:`compare_decoders`; and the kept pairs.
    """
    kept, row = match_layer(za, zb, ids, non_concept, min_corr, device)
    stats, curve = compare_decoders(dec_a, dec_b, kept, n_components, n_permutations, rsa_rows, seed, device)
    return {**row, **stats}, curve, kept


@dataclass(frozen=True)
class EncodedLayer:
    """One studied block of one model seen through its SAE (chapter 5): what :func:`layer_comparison` compares.

    Attributes:
        layer: the block.
        latents: ``(tokens, latents)`` dense SAE latents of every aligned token (:func:`~embgeo_utils.lm.sae.encode_all`).
        decoder: the SAE's decoder rows, ``(latents, width)``.
        key: a digest of the block's activations and of every tensor of the SAE's state, which determine the
            latents and the decoder; it stands for the layer in cache keys (:meth:`cache_key`).
    """

    layer: int
    latents: torch.Tensor
    decoder: np.ndarray
    key: str

    def cache_key(self) -> str:
        """What identifies this layer in a cache key (:func:`embgeo_utils.core.cache.key_part`)."""
        return self.key


def encode_layers(saes: dict[int, LayerSAE], acts: dict[int, np.ndarray]) -> dict[int, EncodedLayer]:
    """Chapter 5: every studied block's aligned tokens encoded by its SAE, with the digest of what they come from."""
    out = {}
    for layer, item in saes.items():
        state = item.sae.state_dict().values()
        key = content_key(array_digest(acts[layer]), *(array_digest(t) for t in state))
        decoder = item.sae.W_dec.detach().cpu().numpy()
        out[layer] = EncodedLayer(layer, encode_all(item.sae, acts[layer]), decoder, key)
    return out


@cached("sae_compare", version=1)
def layer_comparison(
    a: EncodedLayer,
    b: EncodedLayer,
    ids: np.ndarray,
    non_concept: np.ndarray,
    n_components: list[int],
    n_permutations: int,
    rsa_rows: int,
    min_corr: float,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Chapter 5: :func:`compare_layer` of a block of A and a block of B, cached.

    The key holds both layers' keys (activations and SAE weights), the token ids, the non-concept mask, the
    comparison's parameters and the device type.

    Returns:
        ``{"row": ..., "curve": ..., "kept": {"a", "b", "corr", "method"}}``: :func:`compare_layer`'s row, curve rows
        and kept pairs (:class:`~embgeo_utils.geometry.matching.FeaturePairs`' fields).
    """
    row, curve, kept = compare_layer(
        a.latents,
        b.latents,
        a.decoder,
        b.decoder,
        ids,
        non_concept,
        n_components=n_components,
        n_permutations=n_permutations,
        rsa_rows=rsa_rows,
        min_corr=min_corr,
        seed=seed,
        device=device,
    )
    return {"row": row, "curve": curve, "kept": {"a": kept.a, "b": kept.b, "corr": kept.corr, "method": kept.method}}


@dataclass(frozen=True)
class LayerComparisons:
    """What :func:`match_and_compare` measured for every layer of A against every layer of B (chapter 5).

    Attributes:
        grid: one row per layer pair: ``layer A``, ``layer B``, ``depth A``, ``depth B`` (layer / blocks), ``depth``
            (their mean), ``matched depth`` (a pair of :attr:`PairTokens.matched`), then :func:`compare_layer`'s row
            (filter counts, ``pairs``, ``mean corr (kept)``, RSA and SVCCA with their nulls and p-values).
        curves: the SVCCA curve rows of every layer pair, with ``layer A`` and ``layer B`` first.
        decoders: ``{(layer A, layer B): (A's decoder rows, B's decoder rows)}`` of the kept pairs, row by row.
        kept: ``{(layer A, layer B): FeaturePairs}``, the kept pairs.
    """

    grid: pd.DataFrame
    curves: pd.DataFrame
    decoders: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]
    kept: dict[tuple[int, int], FeaturePairs]


def match_and_compare(
    a: LoadedModel, b: LoadedModel, tokens: PairTokens, trained: TrainedSAEs, p: Parameters, cache: bool = True
) -> LayerComparisons:
    """Chapter 5, stages 3 and 4 for every layer of A against every layer of B.

    The non-concept tokens are those of A's tokenizer (:func:`non_concept_tokens`). SVCCA is computed at every
    ``p.n_components`` for the pairs at matching depth and at the headline value (the third) for the others. With
    ``cache`` each layer pair's comparison is read from, or written to, the cache (:func:`layer_comparison`).
    """
    import pandas as pd

    non_concept = non_concept_tokens(a.tokenizer)
    enc_a = encode_layers(trained.saes["A"], tokens.aligned.acts_a)
    enc_b = encode_layers(trained.saes["B"], tokens.aligned.acts_b)
    compare = layer_comparison if cache else layer_comparison.compute
    dev = get_device(p.device)
    headline = [p.n_components[min(2, len(p.n_components) - 1)]] if len(p.n_components) else []
    rows, curves, decoders, kept_all = [], [], {}, {}
    for la in tokens.layers_a:
        for lb in tokens.layers_b:
            comps = list(p.n_components if (la, lb) in tokens.matched else headline)
            out = compare(
                enc_a[la],
                enc_b[lb],
                tokens.aligned.ids_a,
                non_concept,
                comps,
                p.n_permutations,
                p.rsa_rows,
                p.min_corr,
                p.seed,
                dev,
            )
            k = out["kept"]
            kept = FeaturePairs(k["a"], k["b"], k["corr"], str(k["method"]))
            depth_a, depth_b = la / a.info.n_layers, lb / b.info.n_layers
            rows.append(
                {
                    "layer A": la,
                    "layer B": lb,
                    "depth A": depth_a,
                    "depth B": depth_b,
                    "depth": (depth_a + depth_b) / 2,
                    "matched depth": (la, lb) in tokens.matched,
                    **out["row"],
                }
            )
            curves += [{"layer A": la, "layer B": lb, **c} for c in out["curve"]]
            decoders[(la, lb)] = (enc_a[la].decoder[kept.a], enc_b[lb].decoder[kept.b])
            kept_all[(la, lb)] = kept
    return LayerComparisons(pd.DataFrame(rows), pd.DataFrame(curves), decoders, kept_all)


@dataclass(frozen=True)
class PairResult:
    """Everything chapter 5 measures for one pair of models: the outputs of stages 1, 2 and 3-4.

    Attributes:
        names: ``(A, B)``; n_layers: their numbers of blocks.
        tokens: stage 1 (:class:`PairTokens`); sae: stage 2 (:class:`TrainedSAEs`); layers: stages 3 and 4
            (:class:`LayerComparisons`). The properties below name their parts.
    """

    names: tuple[str, str]
    n_layers: tuple[int, int]
    tokens: PairTokens
    sae: TrainedSAEs
    layers: LayerComparisons

    @property
    def matched(self) -> list[tuple[int, int]]:
        """The layer pairs at matching relative depth."""
        return self.tokens.matched

    @property
    def layers_a(self) -> list[int]:
        return self.tokens.layers_a

    @property
    def layers_b(self) -> list[int]:
        return self.tokens.layers_b

    @property
    def aligned(self) -> AlignedTokens:
        return self.tokens.aligned

    @property
    def trained(self) -> dict[str, dict[int, LayerSAE]]:
        """``{"A": {layer: LayerSAE}, "B": {...}}``."""
        return self.sae.saes

    @property
    def saes(self) -> pd.DataFrame:
        """The SAEs' quality table (:class:`TrainedSAEs`)."""
        return self.sae.table

    @property
    def grid(self) -> pd.DataFrame:
        """One row per layer pair (:class:`LayerComparisons`)."""
        return self.layers.grid

    @property
    def curves(self) -> pd.DataFrame:
        return self.layers.curves

    @property
    def decoders(self) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        return self.layers.decoders

    @property
    def kept(self) -> dict[tuple[int, int], FeaturePairs]:
        return self.layers.kept

    def depth(self, la: int, lb: int) -> float:
        """The mean relative depth of layer ``la`` of A and ``lb`` of B."""
        return float(self.grid.set_index(["layer A", "layer B"]).loc[(la, lb), "depth"])


def run_pair(
    a: LoadedModel,
    b: LoadedModel,
    texts: Sequence[str],
    depths: Sequence[float],
    p: Parameters,
    progress: bool = False,
    cache: bool = True,
) -> PairResult:
    """Chapter 5 for one pair of loaded models at relative ``depths``: extract, train, match and compare.

    ``depths`` is ``p.depths`` for the pair of one family and ``p.cross_depths`` for the cross-tokenizer pair;
    every other setting comes from ``p``. Without ``cache`` the layer comparisons are recomputed and not stored.
    """
    tokens = extract(a, b, texts, depths, p, progress)
    trained = train(a, b, tokens, p, progress)
    layers = match_and_compare(a, b, tokens, trained, p, cache)
    return PairResult((a.info.name, b.info.name), (a.info.n_layers, b.info.n_layers), tokens, trained, layers)


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


def _excess(row: Mapping[str, Any], stat: str) -> float:
    """``stat`` minus its null mean in a comparison row; NaN when not computed (chapter 5)."""
    value, null = row.get(stat, np.nan), row.get(f"{stat} null mean", np.nan)
    return float(value - null) if np.isfinite(value) and np.isfinite(null) else float("nan")


def _layer_checks(
    r: Mapping[str, Any], name: str, minimums: dict[str, tuple[float, str]], n_permutations: int | None
) -> list[Check]:
    """Part (a)'s checks of one layer pair (chapter 5, :func:`check_claim10`): RSA and SVCCA above their nulls."""
    n = int(r["pairs"])
    if n < 10 or not np.isfinite(r.get("RSA", np.nan)):
        minimum, source = minimums["RSA"]
        return [Check(f"RSA > null, {name} (fewer than 10 pairs)", -1.0, None, minimum, n, min_effect_source=source)]
    checks = []
    n_svcca = r.get("SVCCA n")
    for stat, label in (("RSA", "RSA"), ("SVCCA", "SVCCA" if n_svcca is None else f"SVCCA(n={int(n_svcca)})")):
        if not np.isfinite(r.get(stat, np.nan)):
            continue
        minimum, source = minimums[stat]
        se = r.get(f"{stat} null std")
        checks.append(
            Check(
                f"{label} > null, {name}",
                _excess(r, stat),
                float(r[f"{stat} p"]),
                minimum,
                n,
                float(se) if se is not None and np.isfinite(se) else None,
                min_effect_source=source,
                n_permutations=n_permutations,
                control=name.startswith("seed ceiling"),
            )
        )
    return checks


def _part_a_minimums(ceiling: Mapping[str, Any] | None) -> dict[str, tuple[float, str]]:
    """Part (a)'s minimum effects: :data:`CEILING_SHARE` of the seed ceiling's excess, floored (chapter 5)."""
    share, why = CEILING_SHARE
    out = {}
    for stat, floor in (("RSA", MIN_CONTROL_RSA), ("SVCCA", MIN_CONTROL_SVCCA)):
        top = _excess(ceiling, stat) if ceiling is not None else float("nan")
        if not np.isfinite(top):
            out[stat] = (share * floor[0], f"{why} (no seed ceiling: {share:g} x the control's minimum {floor[0]:g})")
            continue
        top = max(top, floor[0])
        out[stat] = (share * top, f"{why} ({share:g} x {top:.3g})")
    return out


def check_claim10(
    grid: Any,
    matched: Sequence[tuple[int, int]],
    depth_a: dict[int, float],
    depth_b: dict[int, float],
    boot_argmax: np.ndarray,
    alpha: float = 0.01,
    ceiling: Mapping[str, Any] | None = None,
    n_permutations: int | None = None,
) -> Verdict:
    """Claim 10 (chapter 5): paired decoder geometry beats the null, and is highest in the middle layers.

    Checks:

    * (a) for every matched-depth layer pair: RSA above its permutation null
      (effect RSA minus the null mean, one-sided permutation p, se the null's
      standard deviation), and SVCCA above its null at the reported ``n``; each
      minimum is :data:`CEILING_SHARE` of the seed ceiling's excess over its null
      (at least of the control's own minimum);
    * (b) the layer pair with the highest RSA lies at an interior depth: effect
      = fraction of bootstrap replicates (``boot_argmax``: mean relative depth of
      the best pair per replicate) whose maximum is neither at the shallowest nor
      at the deepest studied depth, minus 0.5; minimum :data:`MIN_INTERIOR` (95 %
      of replicates), binomial standard error. Descriptive (no p-value).
    * positive control, with ``ceiling`` (:class:`SeedCeiling`'s ``statistics``): the
      seed ceiling's RSA and SVCCA beat their own nulls by :data:`MIN_CONTROL_RSA`
      and :data:`MIN_CONTROL_SVCCA`; when they do not, the claim is inconclusive.

    ``n_permutations`` is recorded with every permutation p-value. The p-values are Holm-adjusted together
    (:func:`embgeo_utils.core.stats.verdict`; the control separately).
    """
    g = grid.set_index(["layer A", "layer B"])
    minimums = _part_a_minimums(ceiling)
    checks = []
    for la, lb in matched:
        checks += _layer_checks(g.loc[(la, lb)], f"layers {la}/{lb}", minimums, n_permutations)
    depths = sorted({round((depth_a[la] + depth_b[lb]) / 2, 6) for la, lb in matched})
    boot = np.asarray(boot_argmax, dtype=float)
    interior = np.mean([(d > depths[0] + 1e-9) and (d < depths[-1] - 1e-9) for d in boot]) if boot.size else 0.0
    se = float(np.sqrt(max(interior * (1 - interior), 1 / max(boot.size, 1)) / max(boot.size, 1)))
    checks.append(
        Check(
            "best layer pair at an interior depth (bootstrap share - 0.5)",
            float(interior - 0.5),
            None,
            MIN_INTERIOR[0],
            int(boot.size),
            se,
            min_effect_source=MIN_INTERIOR[1],
        )
    )
    if ceiling is not None:
        own = {"RSA": MIN_CONTROL_RSA, "SVCCA": MIN_CONTROL_SVCCA}
        checks += _layer_checks(ceiling, f"seed ceiling, layer {ceiling.get('layer', '?')}", own, n_permutations)
    return verdict(checks, alpha=alpha)


@dataclass(frozen=True)
class SeedCeiling:
    """Two SAEs of one model and block that differ only in their seed, compared like a layer pair (chapter 5).

    Attributes:
        model, layer: the model and block.
        pairs: matched pairs kept by the filters.
        rsa: RSA of the kept pairs' decoder rows; NaN when fewer than 10 pairs are kept (not computed).
        svcca, svcca_n: SVCCA at the headline number of directions, and that number; NaN and None when not computed.
        statistics: :func:`compare_layer`'s whole row (filter counts, ``pairs``, ``mean corr (kept)``, and RSA and
            SVCCA with their nulls and p-values where computed), as the record keeps it (:meth:`record`).
    """

    model: str
    layer: int
    pairs: int
    rsa: float
    svcca: float
    svcca_n: int | None
    statistics: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """The chapter record's ``seed_ceiling`` entry: ``model``, ``layer`` and every statistic."""
        return {"model": self.model, "layer": self.layer, **self.statistics}

    def summary(self) -> str:
        """One line for the chapter: the layer, the pairs kept, RSA and SVCCA."""
        return (
            f"Seed ceiling at layer {self.layer} of {self.model}: {self.pairs} pairs kept, RSA {self.rsa:.3f}, "
            f"SVCCA(n={self.svcca_n}) {self.svcca:.3f}."
        )


def seed_ceiling(
    result: PairResult, p: Parameters, side: str = "A", layer: int | None = None, progress: bool = False
) -> SeedCeiling:
    """Chapter 5: the comparison between two SAEs of one model and block that differ only in their seed.

    It shows how similar "the same model" looks through this pipeline: the ceiling that cross-model numbers are read
    against. The block is the middle studied one of ``side`` unless ``layer`` is given. The second SAE has the
    first's size and ``p.seed + 1``, and is trained on the tokens of ``split(0.2)`` (a fixed held-out fraction, not
    ``p.heldout_fraction``). The two are compared by :func:`compare_layer` with no non-concept filter, at
    ``p.n_permutations`` and ``p.rsa_rows`` but fixed ``n_components`` (5, 10, 20, 50, 100), ``min_corr`` 0.1 and
    comparison seed 0.
    """
    trained = result.trained[side]
    layers = sorted(trained)
    layer = layers[len(layers) // 2] if layer is None else layer
    acts = (result.aligned.acts_a if side == "A" else result.aligned.acts_b)[layer]
    train_rows, _ = result.aligned.split(0.2)
    first = trained[layer].sae
    name = result.names[0 if side == "A" else 1]
    dev = get_device(p.device)
    x_train = np.ascontiguousarray(acts[train_rows])
    key = {"model": name, "layer": layer, "tokens": content_key(x_train.tobytes())}
    second, _ = cached_sae(
        x_train,
        first.n_latents,
        first.k,
        key,
        seed=p.seed + 1,
        device=dev,
        progress=progress,
        epochs=p.epochs,
        batch_size=p.batch_size,
        lr=p.lr,
    )
    ids = result.aligned.ids_a if side == "A" else result.aligned.ids_b
    row, _, _ = compare_layer(
        encode_all(first, acts),
        encode_all(second, acts),
        first.W_dec.detach().cpu().numpy(),
        second.W_dec.detach().cpu().numpy(),
        ids,
        np.zeros(int(ids.max()) + 1, dtype=bool),
        n_components=(5, 10, 20, 50, 100),
        n_permutations=p.n_permutations,
        rsa_rows=p.rsa_rows,
        min_corr=0.1,
        seed=0,
        device=dev,
    )
    nan = float("nan")
    return SeedCeiling(
        name,
        layer,
        int(row["pairs"]),
        float(row["RSA"]) if "RSA" in row else nan,
        float(row["SVCCA"]) if "SVCCA" in row else nan,
        int(row["SVCCA n"]) if "SVCCA n" in row else None,
        row,
    )


@dataclass(frozen=True)
class Claim10:
    """Claim 10's verdict for one pair of models, with what the chapter reports beside it (chapter 5, stage 5).

    Attributes:
        verdict: the checks and verdict of :func:`check_claim10`.
        best_depths: per subsample of the matched features, the relative depth of the layer pair with the highest RSA
            (:func:`best_depth_subsamples`).
        interior_share: the share of ``best_depths`` strictly inside the depths of the layer pairs of matching depth.
        smallest_rsa: the smallest RSA over the layer pairs of matching depth (NaN when none has one; None when no
            layer pair kept 10 pairs).
        best_pair, best_depth: the layer pair with the highest RSA over all layer pairs and its relative depth (None
            when no layer pair kept 10 pairs).
    """

    verdict: Verdict
    best_depths: np.ndarray
    interior_share: float
    smallest_rsa: float | None
    best_pair: tuple[int, int] | None
    best_depth: float | None


def check(pair: PairResult, p: Parameters, ceiling: SeedCeiling | None = None) -> Claim10:
    """Chapter 5, stage 5: claim 10's verdict (:func:`check_claim10`) for one pair of models, at level ``p.alpha``.

    ``ceiling`` (:func:`seed_ceiling`) sets part (a)'s minimum effects and is the positive control.

    The location of the maximum comes from ``p.n_subsamples`` subsamples of the kept pairs of every layer pair
    (:func:`best_depth_subsamples` with its default fraction 0.5 and 500 RSA rows, seed ``p.seed``).
    """
    depth_of = {key: pair.depth(*key) for key in pair.decoders}
    best = best_depth_subsamples(
        pair.decoders, depth_of, n_subsamples=p.n_subsamples, seed=p.seed, device=get_device(p.device)
    )
    na, nb = pair.n_layers
    depth_a = {la: la / na for la in pair.layers_a}
    depth_b = {lb: lb / nb for lb in pair.layers_b}
    stats = None if ceiling is None else ceiling.record()
    result = check_claim10(pair.grid, pair.matched, depth_a, depth_b, best, p.alpha, stats, p.n_permutations)
    m = pair.grid[pair.grid["matched depth"]]
    interior = float(((best > m["depth"].min() + 1e-9) & (best < m["depth"].max() - 1e-9)).mean())
    if "RSA" not in pair.grid:
        return Claim10(result, best, interior, None, None, None)
    top = pair.grid.loc[pair.grid["RSA"].idxmax()]
    best_pair = (int(top["layer A"]), int(top["layer B"]))
    return Claim10(result, best, interior, float(m["RSA"].min()), best_pair, float(top["depth"]))


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
        grid: ``run_pair(...).grid``.
        names: the two models (rows: A's layers, columns: B's layers).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    need_columns(grid, ("layer A", "layer B", "pairs"), "ch05.run_pair")
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

    need_columns(curves, ("layer A", "layer B", "n_components", "SVCCA", "null mean", "null max"), "ch05.run_pair")
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
