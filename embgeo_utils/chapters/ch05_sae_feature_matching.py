"""Chapter 5, SAE feature matching across scale: do the features of a small and a larger model match?

Son et al. (2025), after Lan et al. (2024), take a sparse autoencoder (SAE) for each of two models, pair each latent
of one with the latent of the other whose activations correlate most over the same tokens, and ask whether the
paired decoder directions are arranged alike in the two spaces (claim 10): above a permutation null, and most in
the middle layers. Both papers used pretrained SAEs; none exists offline for the book's models, so this chapter
trains its own. It runs the pipeline on one pair of models in named stages:

1. :func:`extract`: both models' block outputs on the same passages at the same relative depths
   (:func:`pair_layers`; one forward pass per batch of passages gives every block, cached in chunks by
   :func:`block_outputs`), split by passage into training and held-out tokens (:class:`PairTokens`);
2. :func:`train`: TopK SAEs for every studied block of each model and every seed, their quality on held-out tokens
   and the loss recovered (:class:`TrainedSAEs`); :func:`token_curve` measures held-out FVU against the number of
   training tokens;
3. match, on held-out tokens only: the correlation of every latent of A with every latent of B, Lan et al.'s
   many-to-one pairs and filters (:func:`filter_pairs`, with :func:`top_tokens` counting only active positions),
   then one pair per A latent (the primary pairs) and the Hungarian assignment on the filtered correlations;
4. compare, :func:`compare_pairs` / :func:`compare_layer`: RSA and SVCCA of the one-to-one pairs' decoder rows
   against random re-pairings, the Hungarian pairs the same way, and the many-to-one pairs against a null that keeps
   their groups (:func:`~embgeo_utils.geometry.matching.rsa_group_test`). :func:`match_and_compare` does this for
   every matched depth and seed, and for pairs of seeds of one model: the seed ceiling (:class:`LayerComparisons`);
   :func:`depth_bootstrap` re-matches on resampled held-out passages for the uncertainty of part (b);
5. :func:`check`: claim 10's verdict (:func:`check_claim10`; :class:`Claim10`).

:func:`run_pair` chains stages 1-4 (:class:`PairResult`); :func:`feature_examples` shows matched features in context,
and the figures show the SAE quality, the similarity against depth with its ceiling, and the SVCCA curves.

References:
    M. Lan, P. Torr, A. Meek, A. Khakzar, D. Krueger, F. Barez (2024), Quantifying
    feature space universality across large language models via sparse
    autoencoders, arXiv:2410.06981.

    J. Son et al. (2025), Semantic convergence: investigating shared
    representations across scaled LLMs, arXiv:2507.22918.

    L. Gao et al. (2024), Scaling and evaluating sparse autoencoders, arXiv:2406.04093.

    M. Raghu, J. Gilmer, J. Yosinski, J. Sohl-Dickstein (2017), SVCCA: singular
    vector canonical correlation analysis, NeurIPS.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.cache import array_digest, cached, content_key
from ..core.device import get_device
from ..core.errors import EmbgeoInputError
from ..core.progress import LOG, tqdm
from ..core.stats import Check, Verdict, from_null, verdict
from ..geometry.matching import (
    FeaturePairs,
    activation_correlation,
    group_sizes,
    hungarian_pairs,
    match_features,
    one_per_a,
    rsa,
    rsa_group_test,
    rsa_test,
    svcca_curve_test,
)
from ..lm.alignment import AlignedTokens, aligned_activations
from ..lm.models import LoadedModel
from ..lm.sae import TopKSAE, cached_loss_recovered, cached_sae, encode_all, sae_metrics
from . import interactive
from .style import COLUMN_INCHES, need_columns

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "CHAPTER",
    "CONTROL_MIN_RSA",
    "Claim10",
    "Comparison",
    "CompareSettings",
    "EXTRACT_BATCH",
    "EXTRACT_CHUNK",
    "Encoded",
    "GROUP_NULL_PERMUTATIONS",
    "LayerComparisons",
    "LayerSAE",
    "PairResult",
    "PairTokens",
    "Parameters",
    "RandomControl",
    "TITLE",
    "TrainedSAEs",
    "block_outputs",
    "check",
    "check_claim10",
    "layer_comparison",
    "compare_decoders",
    "compare_layer",
    "compare_pairs",
    "depth_bootstrap",
    "depth_profile",
    "extract",
    "feature_examples",
    "filter_pairs",
    "interactive_depth_profile",
    "match_and_compare",
    "middle_and_edges",
    "non_concept_tokens",
    "pair_layers",
    "passage_ids",
    "passage_states",
    "peak_statistic",
    "plot_depth_profile",
    "plot_sae_quality",
    "plot_svcca_curves",
    "precision_agreement",
    "profile_projection",
    "random_control",
    "run_cross_pair",
    "run_pair",
    "sae_quality",
    "summary_lines",
    "token_curve",
    "top_tokens",
    "train",
    "train_layer_saes",
]


CHAPTER = "ch05_sae_feature_matching"
TITLE = "SAE feature matching across scale"

#: Permutations of the many-to-one group null (chapter 5): it ranks every draw anew, and it is reported beside the
#: checks, not in them.
GROUP_NULL_PERMUTATIONS = 200

#: The positive control's smallest effect (chapter 5): two SAEs of one model that differ only in their seed must
#: share at least this much RSA above their null, about five times the largest RSA null maximum (0.011) the chapter
#: measured at 500 rows (revision log, fdd2287).
CONTROL_MIN_RSA = 0.05


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
    seeds: list[int]
    token_fractions: list[float]
    loss_passages: int
    n_permutations: int
    n_components: list[int]
    rsa_rows: int
    min_corr: float
    n_boot: int
    ceiling_fraction: float
    cross_pair: list[str]
    cross_depths: list[float]
    cross_passages: int
    alpha: float
    seed: int
    device: str

    def models(self) -> list[str]:
        """The pair of one family, then the cross-tokenizer pair."""
        return [self.model_a, self.model_b] + list(self.cross_pair)

    def causal_models(self) -> list[str]:
        """Every model: the loss recovered runs each one's language-model head."""
        return self.models()


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
    """Token ids at the ``top`` most activating positions of each latent, among the positions where it is active.

    Chapter 5. Returns ``(len(latents), top)``; a latent active at fewer than ``top`` positions gets fewer tokens
    and ``-1`` in the rest of its row (a dead latent: ``-1`` only), never a position where it is silent.
    """
    t = torch.as_tensor(z)
    ids = np.asarray(token_ids).ravel()
    if ids.size != t.shape[0]:
        raise EmbgeoInputError(f"token_ids has {ids.size} entries for {t.shape[0]} rows of latents.")
    lat = np.asarray(latents, dtype=np.int64).ravel()
    out = np.full((lat.size, top), -1, dtype=np.int64)
    if not lat.size or not t.shape[0]:
        return out
    cols = t[:, torch.as_tensor(lat, dtype=torch.long)]
    values, rows = torch.topk(cols, min(top, t.shape[0]), dim=0)
    active = (values > 0).T.cpu().numpy()
    out[:, : active.shape[1]] = np.where(active, ids[rows.T.cpu().numpy()], -1)
    return out


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

    In order: pairs with a dead latent (never active on these tokens); pairs whose ``top`` most activating tokens
    (either side, active positions only: :func:`top_tokens`) include a non-concept token; pairs whose top-token
    sets do not intersect; pairs with correlation ``<= min_corr``. Each filter can be switched off.

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
        bad_a = ((tops_a >= 0) & mask[np.clip(tops_a, 0, None)]).any(axis=1)
        bad_b = ((tops_b >= 0) & mask[np.clip(tops_b, 0, None)]).any(axis=1)
        keep &= ~(bad_a | bad_b)
        counts.append({"filter": f"non-concept top-{top} tokens dropped", "pairs left": int(keep.sum())})
    if require_shared_tokens:
        keep &= _shared_tokens(tops_a, tops_b)
        counts.append({"filter": f"top-{top} token sets intersect", "pairs left": int(keep.sum())})
    if min_corr is not None:
        keep &= pairs.corr > min_corr
        counts.append({"filter": f"correlation > {min_corr}", "pairs left": int(keep.sum())})
    return pairs.subset(keep), counts


def _shared_tokens(tops_a: np.ndarray, tops_b: np.ndarray) -> np.ndarray:
    """Per row, whether two top-token rows (``-1`` = none) have a token in common."""
    return ((tops_a[:, :, None] == tops_b[:, None, :]) & (tops_a[:, :, None] >= 0)).any(axis=(1, 2))


def _eligible(z: Any, ids: np.ndarray, non_concept: np.ndarray, top: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per latent: whether it is alive with only concept tokens among its top tokens, and those tokens."""
    t = torch.as_tensor(z)
    tops = top_tokens(t, ids, np.arange(t.shape[1]), top)
    alive = (t > 0).any(dim=0).cpu().numpy()
    mask = np.asarray(non_concept, dtype=bool)
    concept = ~((tops >= 0) & mask[np.clip(tops, 0, None)]).any(axis=1)
    return alive & concept, tops


def pair_layers(n_layers_a: int, n_layers_b: int, depths: Sequence[float]) -> list[tuple[int, int]]:
    """Layers of A and B at the same relative depths (chapter 5): ``round(depth * L)``, at least 1."""
    out = []
    for d in depths:
        if not 0 < d <= 1:
            raise EmbgeoInputError(f"relative depths must lie in (0, 1], got {d}.")
        out.append((max(1, round(d * n_layers_a)), max(1, round(d * n_layers_b))))
    return out


#: Passages per forward pass (chapter 5, :func:`passage_states`).
EXTRACT_BATCH = 8
#: Passages per cache entry of :func:`passage_states` (chapter 5): a run with more passages reuses the entries of a
#: run with fewer, so the text can grow without recomputing what was run before.
EXTRACT_CHUNK = 40


def passage_ids(loaded: LoadedModel, texts: Sequence[str], passage_tokens: int) -> np.ndarray:
    """Chapter 5: the first ``passage_tokens`` token ids of every text in ``loaded``'s tokenizer, ``(texts, tokens)``.

    Raises:
        EmbgeoInputError: when a text is shorter than ``passage_tokens`` tokens.
    """
    rows = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"][:passage_tokens] for t in texts]
    short = [i for i, r in enumerate(rows) if len(r) < passage_tokens]
    if short:
        raise EmbgeoInputError(
            f"texts {short[:5]} have fewer than {passage_tokens} tokens; load passages with "
            f"min_tokens={passage_tokens} (corpus.load_passages) or lower passage_tokens."
        )
    return np.asarray(rows, dtype=np.int64)


@cached("sae_tokens", version=1)
def passage_states(loaded: LoadedModel, ids: np.ndarray, layers: list[int], skip_first: int) -> dict[str, Any]:
    """Chapter 5: one model's block outputs at ``layers`` for a chunk of passages, in float16, cached.

    One forward pass per :data:`EXTRACT_BATCH` passages gives every requested block (the blocks after the deepest
    are skipped); positions before ``skip_first`` are left out; rows run passage by passage. The activations are
    stored in float16 (half the memory and disk of float32; its relative rounding error, 2**-11, is far below any
    SAE's reconstruction error); a value beyond float16's range is refused.

    Returns:
        ``{"acts": {layer: (passages * (tokens - skip_first), width)} float16, "seconds": time of the forward
        passes}``.
    """
    import time

    from ..lm.activations import hidden_states

    start_time = time.perf_counter()
    hidden = hidden_states(
        loaded, ids, ids.shape[1], batch_size=EXTRACT_BATCH, with_loss=False, layers=layers, cache=False,
        progress=False,
    ).hidden[:, :, skip_first:]  # fmt: skip
    if float(np.abs(hidden).max()) > 6e4:
        raise EmbgeoInputError(f"{loaded.info.name} has activations beyond float16's range at blocks {layers}.")
    acts = {layer: hidden[:, j].reshape(-1, hidden.shape[-1]).astype(np.float16) for j, layer in enumerate(layers)}
    return {"acts": acts, "seconds": time.perf_counter() - start_time}


def block_outputs(
    loaded: LoadedModel, ids: np.ndarray, layers: list[int], skip_first: int = 1, progress: bool = False
) -> tuple[dict[int, np.ndarray], float]:
    """Chapter 5: one model's float16 block outputs at ``layers`` for every passage (:func:`passage_states`).

    The passages are run in cached chunks of :data:`EXTRACT_CHUNK`.

    Returns:
        ``{layer: (passages * (tokens - skip_first), width)}`` and the seconds the forward passes took when they
        were run (as stored with the cache entries).
    """
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    seconds = 0.0
    steps = range(0, len(ids), EXTRACT_CHUNK)
    for start in tqdm(steps, desc=f"{loaded.info.name} block outputs", unit="chunk", disable=not progress):
        entry = passage_states(loaded, ids[start : start + EXTRACT_CHUNK], list(layers), skip_first)
        seconds += float(entry["seconds"])
        for layer in layers:
            parts[layer].append(entry["acts"][layer])
    return {layer: np.concatenate(v) for layer, v in parts.items()}, seconds


@dataclass(frozen=True)
class PairTokens:
    """What :func:`extract` gathered for one pair of models (chapter 5, stage 1).

    Attributes:
        matched: the layer pairs ``(layer of A, layer of B)`` at the requested relative depths (:func:`pair_layers`).
        depths: those relative depths, in the order of ``matched``.
        layers_a, layers_b: the blocks studied in each model, sorted, each once.
        aligned: the token positions both models saw alike, with both models' activations at those blocks
            (float16 for one tokenizer, float32 across tokenizers).
        train, heldout: boolean row masks over ``aligned``: the SAEs' training tokens and the held-out passages'.
        seconds: time of the forward passes of A and B (as measured when they were run; 0 where not recorded).
    """

    matched: list[tuple[int, int]]
    depths: list[float]
    layers_a: list[int]
    layers_b: list[int]
    aligned: AlignedTokens
    train: np.ndarray
    heldout: np.ndarray
    seconds: tuple[float, float]


def _one_tokenizer_tokens(
    a: LoadedModel, b: LoadedModel, texts: Sequence[str], layers: tuple[list[int], list[int]], p: Parameters,
    progress: bool,
) -> tuple[AlignedTokens, tuple[float, float]] | None:  # fmt: skip
    """Both models' block outputs when their tokenizers cut every passage alike (else ``None``)."""
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        return None
    ids = passage_ids(a, texts, p.passage_tokens)
    if not np.array_equal(ids, passage_ids(b, texts, p.passage_tokens)):
        return None
    acts_a, sec_a = block_outputs(a, ids, layers[0], 1, progress)
    acts_b, sec_b = block_outputs(b, ids, layers[1], 1, progress)
    n_pass, width = ids.shape
    spans = []
    for text in texts:
        offsets = a.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans.append(np.asarray(offsets[1:width], dtype=np.int64))
    flat = ids[:, 1:].ravel()
    aligned = AlignedTokens(
        acts_a, acts_b, flat, flat.copy(), np.repeat(np.arange(n_pass), width - 1),
        np.tile(np.arange(1, width), n_pass), list(texts), np.concatenate(spans), flat.size, flat.size,
    )  # fmt: skip
    return aligned, (sec_a, sec_b)


def extract(
    a: LoadedModel, b: LoadedModel, texts: Sequence[str], depths: Sequence[float], p: Parameters, progress: bool = False
) -> PairTokens:
    """Chapter 5, stage 1: both models' activations on the same tokens, split into training and held-out tokens.

    Layers are taken at the same relative ``depths`` in both models (:func:`pair_layers`). Each text is cut to
    ``p.passage_tokens`` tokens and its first position is left out (it carries outsized activations in these
    models). When both tokenizers cut every passage alike, every position pairs with itself and each model runs once
    per batch of passages (:func:`block_outputs`); otherwise only positions whose character spans coincide are kept
    (:func:`~embgeo_utils.lm.alignment.aligned_activations`). The last ``p.heldout_fraction`` of the passages are
    held out whole (:meth:`~embgeo_utils.lm.alignment.AlignedTokens.split`).
    """
    matched = pair_layers(a.info.n_layers, b.info.n_layers, depths)
    layers_a = sorted({la for la, _ in matched})
    layers_b = sorted({lb for _, lb in matched})
    same = _one_tokenizer_tokens(a, b, texts, (layers_a, layers_b), p, progress)
    if same is None:
        aligned = aligned_activations(a, b, texts, layers_a, layers_b, max_tokens=p.passage_tokens, progress=progress)
        seconds = (0.0, 0.0)
    else:
        aligned, seconds = same
    train_rows, heldout = aligned.split(p.heldout_fraction)
    return PairTokens(matched, list(depths), layers_a, layers_b, aligned, train_rows, heldout, seconds)


@cached("sae_float32_states", version=1)
def _float32_states(name: str, model_key: Any, ids: np.ndarray, layers: list[int], device: str) -> dict[int, Any]:
    """Chapter 5: block outputs of ``name`` loaded in float32 (``model_key`` identifies the weights), cached."""
    import gc

    from ..lm import models
    from ..lm.activations import hidden_states

    f32 = models.load(name, device=device, dtype="float32")
    hidden = hidden_states(
        f32, ids, ids.shape[1], batch_size=EXTRACT_BATCH, with_loss=False, layers=layers, cache=False, progress=False
    ).hidden[:, :, 1:]
    del f32
    gc.collect()
    return {layer: hidden[:, j].reshape(-1, hidden.shape[-1]) for j, layer in enumerate(layers)}


def _states_in_float32(loaded: LoadedModel, ids: np.ndarray, layers: list[int]) -> dict[int, Any]:
    """Block outputs of ``loaded``'s weights computed in float32 (the loaded model itself when it computes so)."""
    if next(loaded.model.parameters()).dtype != torch.float32:
        return _float32_states(loaded.info.name, loaded.cache_key(), ids, layers, loaded.device.type)
    from ..lm.activations import hidden_states

    hidden = hidden_states(
        loaded, ids, ids.shape[1], batch_size=EXTRACT_BATCH, with_loss=False, layers=layers, cache=False, progress=False
    ).hidden[:, :, 1:]
    return {layer: hidden[:, j].reshape(-1, hidden.shape[-1]) for j, layer in enumerate(layers)}


def precision_agreement(
    a: LoadedModel, b: LoadedModel, tokens: PairTokens, p: Parameters, n_passages: int = 4
) -> pd.DataFrame:
    """Chapter 5: the stored activations the SAEs see against the same weights computed in float32.

    The chapter computes each model in its loading dtype (float32 on a CPU; bfloat16 on an accelerator for a model
    stored so: :func:`~embgeo_utils.lm.models.compute_dtype`) and stores the block outputs in float16. For the first
    ``n_passages`` passages, each model is run in float32 on the same tokens (loaded again when it computes in
    another dtype). Only for a pair with one tokenizer (every position kept); for two
    tokenizers the table is empty.

    Returns:
        One row per model and studied block: ``model``, ``compute dtype``, ``layer``, ``tokens``, ``relative squared
        error`` (squared error over the float32 activations' variance, the units of FVU) and ``mean cosine``.
    """
    import pandas as pd

    al = tokens.aligned
    rows = np.flatnonzero(al.passage < n_passages)
    columns = ["model", "compute dtype", "layer", "tokens", "relative squared error", "mean cosine"]
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab() or len(rows) != n_passages * (p.passage_tokens - 1):
        LOG.info("precision check skipped: the two models tokenize differently (only aligned positions are kept)")
        return pd.DataFrame(columns=columns)
    out = []
    for loaded, acts, layers in ((a, al.acts_a, tokens.layers_a), (b, al.acts_b, tokens.layers_b)):
        ids = passage_ids(loaded, al.texts[:n_passages], p.passage_tokens)
        ref = _states_in_float32(loaded, ids, list(layers))
        for layer in layers:
            x, r = np.asarray(acts[layer][rows], dtype=np.float64), np.asarray(ref[layer], dtype=np.float64)
            cos = (x * r).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(r, axis=1), 1e-30)
            out.append({
                "model": loaded.info.name, "compute dtype": str(next(loaded.model.parameters()).dtype), "layer": layer,
                "tokens": len(rows), "relative squared error": float(((x - r) ** 2).sum() / ((r - r.mean(0)) ** 2).sum()),
                "mean cosine": float(cos.mean()),
            })  # fmt: skip
    return pd.DataFrame(out)


@dataclass
class LayerSAE:
    """One trained SAE with its held-out quality (chapter 5)."""

    model: str
    layer: int
    seed: int
    sae: TopKSAE
    history: Any
    metrics: dict[str, float]


@dataclass(frozen=True)
class TrainedSAEs:
    """What :func:`train` produced for one pair of models (chapter 5, stage 2).

    Attributes:
        saes: ``{"A": {layer: {seed: LayerSAE}}, "B": {...}}``, one SAE per studied block, model and seed.
        table: one row per SAE (A's, then B's): ``model``, ``layer``, ``depth`` (layer / blocks), ``seed``,
            ``latents``, ``k``, ``train tokens``, ``held-out tokens``, ``fvu``, ``l0``, ``dead_fraction`` (on the
            held-out tokens), ``train seconds``, ``from cache``; for the first seed also ``loss clean``, ``loss
            spliced``, ``loss mean-ablated``, ``loss increase (nats)`` (spliced minus clean), ``loss recovered`` and
            ``loss passages`` (:func:`sae_quality`; NaN for the other seeds).
    """

    saes: dict[str, dict[int, dict[int, LayerSAE]]]
    table: pd.DataFrame


def _train_one(x_train: np.ndarray, model: LoadedModel, layer: int, seed: int, p: Parameters, progress: bool) -> Any:
    key = {"model": model.info.sha256 or model.info.name, "layer": layer, "tokens": content_key(x_train.tobytes())}
    return cached_sae(
        x_train, p.expansion * x_train.shape[1], p.k, key, seed=seed, device=get_device(p.device), progress=progress,
        epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
    )  # fmt: skip


def train_layer_saes(
    acts: dict[int, np.ndarray],
    train: np.ndarray,
    heldout: np.ndarray,
    model: LoadedModel,
    p: Parameters,
    progress: bool = False,
) -> dict[int, dict[int, LayerSAE]]:
    """Chapter 5: a cached TopK SAE per block of one model and per seed of ``p.seeds``, evaluated on held-out rows.

    Each SAE has ``p.expansion`` x width latents, ``p.k`` of them active, and is trained with ``p.epochs``,
    ``p.batch_size`` and ``p.lr`` (:func:`~embgeo_utils.lm.sae.cached_sae`). The cache key holds the model's digest
    (its name when it has none), the layer, a digest of the training activations, the seed and every hyperparameter.
    """
    out: dict[int, dict[int, LayerSAE]] = {}
    for layer, x in acts.items():
        x_train = np.ascontiguousarray(x[train])
        out[layer] = {}
        for seed in p.seeds:
            sae, history = _train_one(x_train, model, layer, seed, p, progress)
            metrics = sae_metrics(sae, x[heldout])
            out[layer][seed] = LayerSAE(model.info.name, layer, seed, sae, history, metrics)
    return out


def _loss_ids(loaded: LoadedModel, texts: Sequence[str], n_tokens: int) -> tuple[np.ndarray, int]:
    bos = [loaded.tokenizer.bos_token_id] if loaded.info.needs_bos else []
    rows = [bos + loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = min(len(r) for r in rows + [list(range(n_tokens + len(bos)))])
    return np.array([r[:width] for r in rows], dtype=np.int64), 1 + len(bos)


def _loss_row(loaded: LoadedModel, ids: np.ndarray, skip: int, item: LayerSAE, mean: np.ndarray, clean: Any) -> dict:
    rec = cached_loss_recovered(
        loaded, ids, item.layer, item.sae, mean.astype(np.float32), skip_first=skip, clean=clean
    )
    return {
        "loss clean": rec["clean"],
        "loss spliced": rec["spliced"],
        "loss mean-ablated": rec["ablated"],
        "loss increase (nats)": rec["spliced"] - rec["clean"],
        "loss recovered": rec["recovered"],
        "loss passages": len(ids),
    }


def sae_quality(
    a: LoadedModel, b: LoadedModel, tokens: PairTokens, saes: dict[str, dict[int, dict[int, LayerSAE]]], p: Parameters
) -> pd.DataFrame:
    """Chapter 5: the quality table of :class:`TrainedSAEs` (its columns are listed there).

    The loss recovered of the first seed's SAEs is measured on the first ``p.loss_passages`` held-out passages, cut
    to the shortest of them and at most ``p.passage_tokens`` tokens, with the mean training activation as the
    ablation (:func:`~embgeo_utils.lm.sae.cached_loss_recovered`); the clean loss is computed once per model.
    """
    import pandas as pd

    al = tokens.aligned
    held_texts = sorted(set(al.passage[tokens.heldout].tolist()))[: p.loss_passages]
    rows = []
    for side, loaded, acts in (("A", a, al.acts_a), ("B", b, al.acts_b)):
        ids, skip = _loss_ids(loaded, [al.texts[i] for i in held_texts], p.passage_tokens)
        clean = None
        for layer, by_seed in saes[side].items():
            for seed, item in by_seed.items():
                row = {
                    "model": loaded.info.name, "layer": layer, "depth": layer / loaded.info.n_layers, "seed": seed,
                    "latents": item.sae.n_latents, "k": item.sae.k, "train tokens": int(tokens.train.sum()),
                    "held-out tokens": int(tokens.heldout.sum()),
                    **{m: item.metrics[m] for m in ("fvu", "l0", "dead_fraction")},
                    "train seconds": item.history.seconds, "from cache": item.history.from_cache,
                }  # fmt: skip
                if seed == p.seeds[0]:
                    mean = acts[layer][tokens.train].mean(axis=0, dtype=np.float64)
                    row.update(_loss_row(loaded, ids, skip, item, mean, clean))
                    clean = row["loss clean"]
                rows.append(row)
    return pd.DataFrame(rows)


def train(a: LoadedModel, b: LoadedModel, tokens: PairTokens, p: Parameters, progress: bool = False) -> TrainedSAEs:
    """Chapter 5, stage 2: an SAE per studied block, model and seed (:func:`train_layer_saes`) and their quality."""
    saes = {
        "A": train_layer_saes(tokens.aligned.acts_a, tokens.train, tokens.heldout, a, p, progress),
        "B": train_layer_saes(tokens.aligned.acts_b, tokens.train, tokens.heldout, b, p, progress),
    }
    return TrainedSAEs(saes, sae_quality(a, b, tokens, saes, p))


def _middle(tokens: PairTokens) -> tuple[int, int]:
    """The matched layer pair whose relative depth is nearest 0.5."""
    return tokens.matched[int(np.argmin([abs(d - 0.5) for d in tokens.depths]))]


def token_curve(a: LoadedModel, b: LoadedModel, tokens: PairTokens, p: Parameters, progress: bool = False) -> Any:
    """Chapter 5: held-out FVU against the number of training tokens, at the matched depth nearest 0.5.

    For each share of ``p.token_fractions``, an SAE of the first seed is trained (cached) on that share of the
    training passages, the first ones (whole passages), and evaluated on all held-out tokens. The share 1.0 is the
    chapter's own SAE.

    Returns:
        One row per model and share: ``model``, ``layer``, ``share``, ``train tokens``, ``fvu``, ``dead_fraction``
        (held-out), ``train seconds`` (as measured when trained), ``tokens per second`` (training tokens times
        epochs over those seconds).
    """
    import pandas as pd

    al = tokens.aligned
    train_passages = np.unique(al.passage[tokens.train])
    rows = []
    for loaded, acts, layer in ((a, al.acts_a, _middle(tokens)[0]), (b, al.acts_b, _middle(tokens)[1])):
        for share in p.token_fractions:
            first = train_passages[: max(1, round(share * len(train_passages)))]
            x_train = np.ascontiguousarray(acts[layer][tokens.train & np.isin(al.passage, first)])
            sae, history = _train_one(x_train, loaded, layer, p.seeds[0], p, progress)
            metrics = sae_metrics(sae, acts[layer][tokens.heldout])
            rows.append({
                "model": loaded.info.name, "layer": layer, "share": share, "train tokens": len(x_train),
                "fvu": metrics["fvu"], "dead_fraction": metrics["dead_fraction"], "train seconds": history.seconds,
                "tokens per second": len(x_train) * p.epochs / max(history.seconds, 1e-9),
            })  # fmt: skip
    return pd.DataFrame(rows)


def profile_projection(tokens: PairTokens, curve: Any, names: tuple[str, str], p: Parameters, n_tokens: int) -> Any:
    """Chapter 5: the time a run on ``n_tokens`` training tokens per model would take, from this run's speeds.

    Extraction: the forward passes' tokens per second of this run (both models, every studied block; held-out tokens
    added in this run's proportion). Training: the SAE tokens per second over every SAE of :func:`token_curve`
    (their tokens times epochs over their seconds: one slow share on a busy machine weighs by its time only), times
    ``p.epochs``, times the SAEs of the chapter (studied blocks x seeds). Loss recovered and matching do not
    grow with the training tokens and are left out.

    Returns:
        One row per model: ``model``, ``extract tokens/s``, ``SAE tokens/s``, ``extract hours``, ``SAE hours``.
    """
    import pandas as pd

    total = n_tokens / max(1.0 - p.heldout_fraction, 1e-9)
    rows = []
    for i, name in enumerate(names):
        ran = len(tokens.aligned)
        extract_rate = ran / tokens.seconds[i] if tokens.seconds[i] > 0 else float("nan")
        c = curve[curve["model"] == name]
        sae_rate = float((c["train tokens"] * p.epochs).sum() / max(float(c["train seconds"].sum()), 1e-9))
        n_saes = len(tokens.layers_a if i == 0 else tokens.layers_b) * len(p.seeds)
        rows.append({
            "model": name, "extract tokens/s": extract_rate, "SAE tokens/s": sae_rate,
            "extract hours": total / extract_rate / 3600, "SAE hours": n_tokens * p.epochs * n_saes / sae_rate / 3600,
        })  # fmt: skip
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class CompareSettings:
    """How :func:`compare_pairs` compares one pair of SAEs (chapter 5).

    Attributes:
        n_components: SVCCA's numbers of singular directions; the third (the last when fewer) is the headline.
        n_permutations: re-pairings of every null except the many-to-one group null
            (:data:`GROUP_NULL_PERMUTATIONS`).
        rsa_rows: pairs drawn (seeded) for RSA when more are kept.
        min_corr: pairs must correlate above this.
        seed: seed of the draws and permutations.
        full: also the Hungarian and many-to-one views (the cross-model comparisons); without it only the primary
            one-to-one statistics (the seed ceiling).
    """

    n_components: tuple[int, ...]
    n_permutations: int
    rsa_rows: int
    min_corr: float
    seed: int
    full: bool = True


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare_pairs` measured for one pair of SAEs (chapter 5).

    Attributes:
        row: the filter counts (``after: <filter>``), the many-to-one pairs' groups (``pairs (many-to-one)``,
            ``distinct A``, ``distinct B``, ``largest group``, ``pairs sharing an A latent``, ``group sizes``), the
            one-to-one pairs (``pairs``, ``mean corr (kept)``) and their statistics (``RSA``, ``RSA null mean``,
            ``RSA null std``, ``RSA null max``, ``RSA p``; ``SVCCA``, ``SVCCA n``, ``SVCCA null mean``, ``SVCCA null
            std``, ``SVCCA p`` at the headline ``n``); with ``full`` also ``pairs (Hungarian)`` and ``RSA ...
            (Hungarian)``, and ``RSA (many-to-one)`` with the p-values and null maxima of both many-to-one nulls
            (``B shuffled``: B's rows re-paired; ``groups kept``: :func:`~embgeo_utils.geometry.matching.rsa_group_test`).
        curve: SVCCA at every usable ``n``: ``n_components``, ``SVCCA``, ``null mean``, ``null std``, ``null max``,
            ``p``.
        kept: the one-to-one pairs (one per A latent).
        rsa_null, svcca_null: the null values of the one-to-one RSA and of SVCCA at the headline ``n`` (empty when
            not computed).
    """

    row: dict[str, Any]
    curve: list[dict[str, Any]]
    kept: FeaturePairs
    rsa_null: np.ndarray
    svcca_null: np.ndarray


def compare_decoders(
    dec_a: np.ndarray, dec_b: np.ndarray, kept: FeaturePairs, s: CompareSettings, device: str | torch.device
) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Chapter 5, stage 4 for one set of pairs: RSA and SVCCA of their decoder rows, against random re-pairings.

    Nothing is computed below 10 pairs. RSA uses at most ``s.rsa_rows`` pairs; SVCCA is computed at every
    ``s.n_components`` below the number of pairs minus one. Returns the statistics (keys of :class:`Comparison`'s
    row), the SVCCA curve and the two null arrays.
    """
    row: dict[str, Any] = {}
    curve: list[dict[str, Any]] = []
    empty = np.zeros(0)
    if len(kept) < 10:
        return row, curve, empty, empty
    x, y = dec_a[kept.a], dec_b[kept.b]
    r = rsa_test(x, y, max_rows=s.rsa_rows, n_permutations=s.n_permutations, seed=s.seed, device=device)
    row.update({"RSA": r.statistic, "RSA null mean": r.null_mean, "RSA null std": r.null_std,
                "RSA null max": r.null_max, "RSA p": r.p_value})  # fmt: skip
    usable = [n for n in s.n_components if n < len(kept) - 1]
    tests = svcca_curve_test(x, y, usable, s.n_permutations, s.seed, device) if usable else []
    for n, t in zip(usable, tests):
        curve.append({"n_components": n, "SVCCA": t.statistic, "null mean": t.null_mean, "null std": t.null_std,
                      "null max": t.null_max, "p": t.p_value})  # fmt: skip
    svcca_null = empty
    if curve:
        head = min(2, len(curve) - 1)
        svcca_null = tests[head].null
        row.update({"SVCCA": curve[head]["SVCCA"], "SVCCA n": curve[head]["n_components"],
                    "SVCCA null mean": curve[head]["null mean"], "SVCCA null std": curve[head]["null std"],
                    "SVCCA p": curve[head]["p"]})  # fmt: skip
    return row, curve, r.null, svcca_null


def _size_text(groups: dict[int, int]) -> str:
    """``{size: count}`` as ``"1x412, 2x51, 5x1"`` (A latents with that many partners)."""
    return ", ".join(f"{size}x{count}" for size, count in sorted(groups.items()))


def _hungarian_row(corr: np.ndarray, za: Any, zb: Any, ids: np.ndarray, non_concept: np.ndarray,
                   dec_a: np.ndarray, dec_b: np.ndarray, s: CompareSettings, device: Any) -> dict[str, Any]:  # fmt: skip
    ok_a, tops_a = _eligible(za, ids, non_concept)
    ok_b, tops_b = _eligible(zb, ids, non_concept)
    pairs = hungarian_pairs(corr, ok_a, ok_b, s.min_corr)
    pairs = pairs.subset(_shared_tokens(tops_a[pairs.a], tops_b[pairs.b]))
    row: dict[str, Any] = {"pairs (Hungarian)": len(pairs)}
    if len(pairs) >= 10:
        r = rsa_test(dec_a[pairs.a], dec_b[pairs.b], s.rsa_rows, s.n_permutations, s.seed, device)
        row.update({"RSA (Hungarian)": r.statistic, "RSA null mean (Hungarian)": r.null_mean,
                    "RSA null max (Hungarian)": r.null_max, "RSA p (Hungarian)": r.p_value})  # fmt: skip
    return row


def _many_to_one_row(pairs: FeaturePairs, dec_a: np.ndarray, dec_b: np.ndarray, s: CompareSettings,
                     device: Any) -> dict[str, Any]:  # fmt: skip
    if len(pairs) < 10 or np.unique(pairs.a).size < 2:
        return {}
    naive = rsa_test(dec_a[pairs.a], dec_b[pairs.b], s.rsa_rows, s.n_permutations, s.seed, device)
    group = rsa_group_test(dec_a, pairs.a, dec_b[pairs.b], s.rsa_rows, GROUP_NULL_PERMUTATIONS, s.seed, device)
    return {
        "RSA (many-to-one)": naive.statistic,
        "RSA null max (many-to-one, B shuffled)": naive.null_max,
        "RSA p (many-to-one, B shuffled)": naive.p_value,
        "RSA null mean (many-to-one, groups kept)": group.null_mean,
        "RSA null max (many-to-one, groups kept)": group.null_max,
        "RSA p (many-to-one, groups kept)": group.p_value,
    }


def compare_pairs(
    za: Any, zb: Any, dec_a: np.ndarray, dec_b: np.ndarray, ids: np.ndarray, non_concept: np.ndarray,
    s: CompareSettings, device: str | torch.device = "auto",
) -> Comparison:  # fmt: skip
    """Chapter 5, stages 3 and 4 for two SAEs' latents on the same (held-out) tokens.

    Each B latent is paired with its most correlated A latent (many-to-one, Lan et al.) and Lan et al.'s filters
    are applied (:func:`filter_pairs`). The primary pairs keep one pair per A latent, its best
    (:func:`~embgeo_utils.geometry.matching.one_per_a`): their decoder rows are compared by
    :func:`compare_decoders`. With ``s.full`` the Hungarian assignment on the filtered correlations (latents alive
    with concept top tokens, correlation above ``s.min_corr``, top tokens shared) is compared the same way, and the
    many-to-one pairs are compared against both a null that shuffles B's rows and one that keeps their groups.
    """
    dev = get_device(device)
    corr = activation_correlation(za, zb, device=dev)
    many, counts = filter_pairs(match_features(corr, "max"), za, zb, ids, non_concept, min_corr=s.min_corr)
    kept = one_per_a(many)
    sizes = group_sizes(many)
    row: dict[str, Any] = {f"after: {c['filter']}": c["pairs left"] for c in counts}
    row.update({
        "pairs (many-to-one)": sizes["pairs"], "distinct A": sizes["distinct A"], "distinct B": sizes["distinct B"],
        "largest group": sizes["largest group"], "pairs sharing an A latent": sizes["pairs sharing an A latent"],
        "group sizes": _size_text(sizes["groups of size"]), "pairs": len(kept),
        "mean corr (kept)": float(kept.corr.mean()) if len(kept) else float("nan"),
    })  # fmt: skip
    stats, curve, rsa_null, svcca_null = compare_decoders(dec_a, dec_b, kept, s, dev)
    row.update(stats)
    if s.full:
        row.update(_hungarian_row(corr, za, zb, ids, non_concept, dec_a, dec_b, s, dev))
        row.update(_many_to_one_row(many, dec_a, dec_b, s, dev))
    return Comparison(row, curve, kept, rsa_null, svcca_null)


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
    """Chapter 5, stages 3 and 4 for one layer pair, every view (:func:`compare_pairs` with ``full``).

    ``za`` and ``zb`` are both SAEs' latents on the same held-out tokens. Returns the statistics row (the primary
    one-to-one RSA p-value is ``"RSA p"``), the SVCCA curve rows (each with its ``"p"``) and the one-to-one pairs.
    """
    s = CompareSettings(tuple(n_components), n_permutations, rsa_rows, min_corr, seed, True)
    out = compare_pairs(za, zb, dec_a, dec_b, ids, non_concept, s, device)
    return out.row, out.curve, out.kept


@dataclass(frozen=True)
class Encoded:
    """One SAE with the held-out activations it encodes (chapter 5): a side of :func:`layer_comparison`.

    Attributes:
        sae: the SAE; acts: ``(held-out tokens, width)`` activations of its block.
        key: a digest of the activations and of every tensor of the SAE's state; it stands for this side in cache
            keys (:meth:`cache_key`), so the latents are encoded only when a comparison is computed.
    """

    sae: TopKSAE
    acts: np.ndarray
    key: str

    @classmethod
    def of(cls, sae: TopKSAE, acts: np.ndarray, acts_digest: str) -> Encoded:
        """The side for ``sae`` on ``acts`` whose digest (:func:`~embgeo_utils.core.cache.array_digest`) is given."""
        return cls(sae, acts, content_key(acts_digest, *(array_digest(t) for t in sae.state_dict().values())))

    def cache_key(self) -> str:
        """What identifies this side in a cache key (:func:`embgeo_utils.core.cache.key_part`)."""
        return self.key

    def latents(self) -> torch.Tensor:
        """Dense latents of every held-out token (:func:`~embgeo_utils.lm.sae.encode_all`)."""
        return encode_all(self.sae, self.acts)

    @property
    def decoder(self) -> np.ndarray:
        return self.sae.W_dec.detach().cpu().numpy()


@cached("sae_compare", version=2)
def layer_comparison(
    a: Encoded, b: Encoded, ids: np.ndarray, non_concept: np.ndarray, s: CompareSettings, device: torch.device
) -> dict[str, Any]:
    """Chapter 5: :func:`compare_pairs` of two sides, cached under both sides' keys, the token ids, the non-concept
    mask, the settings and the device type.

    Returns:
        ``{"row", "curve", "kept": {"a", "b", "corr", "method"}, "rsa null", "svcca null"}`` (:class:`Comparison`).
    """
    out = compare_pairs(a.latents(), b.latents(), a.decoder, b.decoder, ids, non_concept, s, device)
    kept = {"a": out.kept.a, "b": out.kept.b, "corr": out.kept.corr, "method": out.kept.method}
    return {"row": out.row, "curve": out.curve, "kept": kept, "rsa null": out.rsa_null, "svcca null": out.svcca_null}


@cached("sae_depth_boot", version=1)
def depth_bootstrap(
    a: Encoded, b: Encoded, ids: np.ndarray, passage: np.ndarray, non_concept: np.ndarray, min_corr: float,
    rsa_rows: int, n_boot: int, seed: int, device: torch.device,
) -> np.ndarray:  # fmt: skip
    """Chapter 5, part (b)'s uncertainty: the one-to-one RSA re-measured on resampled held-out passages, cached.

    Each of ``n_boot`` replicates draws the held-out passages with replacement (``passage`` gives each token's
    passage), matches and filters the latents on those tokens and keeps one pair per A latent, as
    :func:`compare_pairs` does, and computes RSA of their decoder rows (NaN below 10 pairs).
    """
    za, zb = a.latents(), b.latents()
    order = np.argsort(passage, kind="stable")
    names, starts = np.unique(passage[order], return_index=True)
    rows_of = np.split(order, starts[1:])
    rng = np.random.default_rng(seed)
    out = np.full(n_boot, np.nan)
    for r in range(n_boot):
        rows = torch.as_tensor(np.concatenate([rows_of[i] for i in rng.integers(0, len(names), len(names))]))
        ra, rb = za[rows], zb[rows]
        corr = activation_correlation(ra, rb, device=device)
        many, _ = filter_pairs(match_features(corr, "max"), ra, rb, ids[rows.numpy()], non_concept, min_corr=min_corr)
        kept = one_per_a(many)
        if len(kept) >= 10:
            out[r] = rsa(a.decoder[kept.a], b.decoder[kept.b], max_rows=rsa_rows, seed=seed + r, device=device)
    return out


@dataclass(frozen=True)
class LayerComparisons:
    """What :func:`match_and_compare` measured at every matched depth (chapter 5, stages 3 and 4).

    Attributes:
        cross: one row per matched depth and seed (A's SAE of that seed against B's): ``depth``, ``layer A``,
            ``layer B``, ``seed``, then :class:`Comparison`'s row (every view).
        ceiling: one row per matched depth, model and pair of seeds (two SAEs of one model and block that differ
            only in their seed, compared by the same pipeline on the same held-out tokens): ``depth``, ``model``
            (``"A"`` or ``"B"``), ``layer``, ``seeds``, then :class:`Comparison`'s primary statistics.
        curves: the SVCCA curves of the cross rows: ``depth``, ``layer A``, ``layer B``, ``seed``, then the curve.
        boot: part (b)'s replicates (:func:`depth_bootstrap`): ``depth``, ``seed``, ``replicate``, ``RSA``.
        kept: ``{(layer A, layer B, seed): FeaturePairs}``, the one-to-one pairs of the cross rows.
        nulls: ``{("cross", depth, seed) or (model, depth, seeds): (RSA null, SVCCA null)}`` in the row order.
    """

    cross: pd.DataFrame
    ceiling: pd.DataFrame
    curves: pd.DataFrame
    boot: pd.DataFrame
    kept: dict[tuple[int, int, int], FeaturePairs]
    nulls: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]]


def _settings(p: Parameters, full: bool, offset: int) -> CompareSettings:
    comps = tuple(p.n_components) if full else tuple(p.n_components[min(2, len(p.n_components) - 1) :][:1])
    return CompareSettings(comps, p.n_permutations, p.rsa_rows, p.min_corr, p.seed + 7919 * offset, full)


def _sides(saes: dict[int, LayerSAE], acts: np.ndarray) -> dict[int, Encoded]:
    digest = array_digest(acts)
    return {seed: Encoded.of(item.sae, acts, digest) for seed, item in saes.items()}


def _depth_rows(
    depth: float, layers: tuple[int, int], enc: dict[str, dict[int, Encoded]], tokens: PairTokens,
    masks: dict[str, np.ndarray], p: Parameters, compare: Any, ceiling: bool, bootstrap: bool,
) -> dict[str, list]:  # fmt: skip
    """Every comparison at one matched depth: the cross-model ones per seed, their bootstrap, the seed ceiling."""
    from itertools import combinations

    al, held = tokens.aligned, tokens.heldout
    ids = {"A": al.ids_a[held], "B": al.ids_b[held]}
    dev = get_device(p.device)
    out: dict[str, list] = {"cross": [], "curves": [], "boot": [], "ceiling": [], "kept": [], "nulls": []}
    for i, seed in enumerate(p.seeds):
        res = compare(enc["A"][seed], enc["B"][seed], ids["A"], masks["A"], _settings(p, True, i), dev)
        head = {"depth": depth, "layer A": layers[0], "layer B": layers[1], "seed": seed}
        out["cross"].append({**head, **res["row"]})
        out["curves"] += [{**head, **c} for c in res["curve"]]
        k = res["kept"]
        out["kept"].append(((layers[0], layers[1], seed), FeaturePairs(k["a"], k["b"], k["corr"], str(k["method"]))))
        out["nulls"].append((("cross", depth, seed), (res["rsa null"], res["svcca null"])))
        if bootstrap:
            boot = depth_bootstrap(enc["A"][seed], enc["B"][seed], ids["A"], al.passage[held], masks["A"],
                                   p.min_corr, p.rsa_rows, p.n_boot, p.seed + i, dev)  # fmt: skip
            out["boot"] += [{"depth": depth, "seed": seed, "replicate": r, "RSA": v} for r, v in enumerate(boot)]
    for j, (side, (s, t)) in enumerate((side, st) for side in "AB" for st in combinations(p.seeds, 2) if ceiling):
        res = compare(enc[side][s], enc[side][t], ids[side], masks[side], _settings(p, False, 100 + j), dev)
        layer = layers[0] if side == "A" else layers[1]
        out["ceiling"].append({"depth": depth, "model": side, "layer": layer, "seeds": f"{s}-{t}", **res["row"]})
        out["nulls"].append(((side, depth, f"{s}-{t}"), (res["rsa null"], res["svcca null"])))
    return out


def match_and_compare(
    a: LoadedModel, b: LoadedModel, tokens: PairTokens, trained: TrainedSAEs, p: Parameters, cache: bool = True,
    ceiling: bool = True, bootstrap: bool = True, progress: bool = False,
) -> LayerComparisons:  # fmt: skip
    """Chapter 5, stages 3 and 4 at every matched depth, on the held-out tokens only.

    For every seed, A's SAE is compared with B's SAE of the same seed (:func:`compare_pairs`, every view), with the
    non-concept tokens of A's tokenizer (:func:`non_concept_tokens`), and re-matched on ``p.n_boot`` resamplings of
    the held-out passages (:func:`depth_bootstrap`). With ``ceiling``, every pair of seeds of one model is compared
    by the same pipeline (same filters, matching and held-out tokens; primary statistics, SVCCA at the headline
    ``n``): the seed ceiling; ``bootstrap`` switches part (b)'s replicates. Each comparison draws its own permutations (seed ``p.seed`` plus an offset). With
    ``cache`` comparisons are read from, or written to, the cache (:func:`layer_comparison`).
    """
    import pandas as pd

    mask_a = non_concept_tokens(a.tokenizer)
    same = a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    masks = {"A": mask_a, "B": mask_a if same else non_concept_tokens(b.tokenizer)}
    compare = layer_comparison if cache else layer_comparison.compute
    al, held = tokens.aligned, tokens.heldout
    parts: dict[str, list] = {"cross": [], "curves": [], "boot": [], "ceiling": [], "kept": [], "nulls": []}
    for depth, (la, lb) in tqdm(list(zip(tokens.depths, tokens.matched)), desc="depths", disable=not progress):
        enc = {"A": _sides(trained.saes["A"][la], al.acts_a[la][held]),
               "B": _sides(trained.saes["B"][lb], al.acts_b[lb][held])}  # fmt: skip
        for name, rows in _depth_rows(depth, (la, lb), enc, tokens, masks, p, compare, ceiling, bootstrap).items():
            parts[name] += rows
    return LayerComparisons(
        pd.DataFrame(parts["cross"]), pd.DataFrame(parts["ceiling"]), pd.DataFrame(parts["curves"]),
        pd.DataFrame(parts["boot"]), dict(parts["kept"]), dict(parts["nulls"]),
    )  # fmt: skip


def _combined(rows: Any, nulls: list[np.ndarray], stat: str) -> dict[str, float]:
    """The mean of a statistic over comparisons against the mean of their independent nulls (draw by draw)."""
    ok = [i for i, n in enumerate(nulls) if n.size and np.isfinite(rows.iloc[i].get(stat, np.nan))]
    if not ok:
        return {f"{stat}": np.nan, f"{stat} excess": np.nan, f"{stat} p": np.nan, f"{stat} null std": np.nan}
    null = np.mean([nulls[i] for i in ok], axis=0)
    res = from_null(float(np.mean([rows.iloc[i][stat] for i in ok])), null)
    return {f"{stat}": res.statistic, f"{stat} excess": res.statistic - res.null_mean, f"{stat} p": res.p_value,
            f"{stat} null std": res.null_std}  # fmt: skip


def _own_ceilings(layers: LayerComparisons, ceil: Any, depth: float, excess: float) -> dict[str, float]:
    """Each model's own seed ceiling (RSA excess over the pairs of its seeds, its p and null spread), their geometric
    mean and the cross-model excess over it, the correction for attenuation when both sides are measured with noise
    (chapter 5)."""
    out = {}
    for side in "AB":
        part = ceil[ceil["model"] == side]
        nulls = [layers.nulls[(side, depth, s)][0] for s in part["seeds"]]
        res = _combined(part, nulls, "RSA") if len(part) else {"RSA excess": np.nan, "RSA p": np.nan}
        out[f"ceiling RSA excess {side}"] = res["RSA excess"]
        out[f"ceiling RSA p {side}"] = res["RSA p"]
        out[f"ceiling RSA null std {side}"] = res.get("RSA null std", np.nan)
    a, b = out["ceiling RSA excess A"], out["ceiling RSA excess B"]
    ok = np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0
    out["geometric ceiling"] = float(np.sqrt(a * b)) if ok else np.nan
    out["fraction of geometric ceiling"] = excess / out["geometric ceiling"] if ok else np.nan
    return out


def _with_seed_spread(row: dict[str, Any], cross: Any, stat: str) -> None:
    """``{stat} se``: the standard error of the seeds' mean excess, from the null's spread and the seeds' spread
    (chapter 5): sqrt(null variance + variance over seeds / seeds)."""
    if stat not in cross:
        row[f"{stat} se"] = np.nan
        return
    excess = (cross[stat] - cross[f"{stat} null mean"]).dropna()
    seed_var = float(excess.var(ddof=1)) / len(excess) if len(excess) > 1 else 0.0
    row[f"{stat} se"] = float(np.sqrt(row[f"{stat} null std"] ** 2 + seed_var))


def depth_profile(layers: LayerComparisons, table: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    """Chapter 5: similarity, its seed ceiling and SAE quality against depth, one row per matched depth.

    Columns: ``depth``, ``layer A``, ``layer B``, ``pairs`` (one-to-one, mean over seeds); ``RSA``, ``RSA excess``
    (over the null mean), ``RSA p``, ``RSA null std`` and the same for ``SVCCA``, each over the seeds' mean against
    the mean of their nulls; ``RSA se`` and ``SVCCA se`` (the excess's standard error from the null's and the seeds'
    spread); ``RSA excess min`` and ``max`` over seeds; ``ceiling RSA ...`` and ``ceiling SVCCA ...`` the same over
    every pair of seeds of both models; ``fraction of ceiling`` (RSA excess over the ceiling's; NaN where the
    ceiling's is below :data:`CONTROL_MIN_RSA`); ``ceiling RSA excess A`` and ``B``, ``ceiling RSA p A`` and ``B``,
    ``ceiling RSA null std A`` and ``B`` (each model's own seed pairs), ``geometric ceiling`` (the geometric mean of
    the two excesses) and ``fraction of geometric ceiling`` (RSA excess over it); ``fvu A`` and ``fvu B`` (held-out,
    mean over seeds).
    """
    import pandas as pd

    rows = []
    for depth, cross in layers.cross.groupby("depth", sort=True):
        nulls = [layers.nulls[("cross", depth, s)] for s in cross["seed"]]
        row = {"depth": depth, "layer A": int(cross["layer A"].iloc[0]), "layer B": int(cross["layer B"].iloc[0]),
               "pairs": float(cross["pairs"].mean())}  # fmt: skip
        row.update(_combined(cross, [n[0] for n in nulls], "RSA"))
        row.update(_combined(cross, [n[1] for n in nulls], "SVCCA"))
        _with_seed_spread(row, cross, "RSA")
        _with_seed_spread(row, cross, "SVCCA")
        excess = cross["RSA"] - cross["RSA null mean"] if "RSA" in cross else pd.Series([np.nan])
        row.update({"RSA excess min": float(excess.min()), "RSA excess max": float(excess.max())})
        ceil = layers.ceiling[layers.ceiling["depth"] == depth] if len(layers.ceiling) else layers.ceiling
        if len(ceil):
            cn = [layers.nulls[(m, depth, s)] for m, s in zip(ceil["model"], ceil["seeds"])]
            row.update({f"ceiling {k}": v for k, v in _combined(ceil, [n[0] for n in cn], "RSA").items()})
            row.update({f"ceiling {k}": v for k, v in _combined(ceil, [n[1] for n in cn], "SVCCA").items()})
            ceil_excess = row["ceiling RSA excess"]
            row["fraction of ceiling"] = row["RSA excess"] / ceil_excess if ceil_excess >= CONTROL_MIN_RSA else np.nan
            row.update(_own_ceilings(layers, ceil, depth, row["RSA excess"]))
        for side, name, layer in (("A", names[0], row["layer A"]), ("B", names[1], row["layer B"])):
            q = table[(table["model"] == name) & (table["layer"] == layer)]
            row[f"fvu {side}"] = float(q["fvu"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def _peak(values: np.ndarray) -> float:
    """Best interior value minus the better of the two edges (values in depth order)."""
    return float(np.max(values[1:-1]) - max(values[0], values[-1]))


def middle_and_edges(depths: Sequence[float]) -> tuple[list[int], list[int]]:
    """Chapter 5, part (b)'s contrast, fixed before any result: the indices of the middle depths (interior, between
    1/3 and 2/3 of the model) and of the edges (the shallowest and the deepest studied depth).

    Raises:
        EmbgeoInputError: fewer than 3 depths, or no interior depth between 1/3 and 2/3.
    """
    if len(depths) < 3:
        raise EmbgeoInputError(f"Part (b) needs at least 3 matched depths (two edges and an interior), got {depths}.")
    middle = [i for i, d in enumerate(depths) if 0 < i < len(depths) - 1 and 1 / 3 <= d <= 2 / 3]
    if not middle:
        raise EmbgeoInputError(
            f"Part (b) compares the middle depths (between 1/3 and 2/3) with the edges; {list(depths)} has no interior "
            "depth there: add one (e.g. 0.5)."
        )
    return middle, [0, len(depths) - 1]


def _contrasts(sims: np.ndarray, fvu: np.ndarray, middle: list[int], edges: list[int]) -> dict[str, float]:
    """Part (b)'s statistics for one seed or draw: the middle-minus-edges contrast, raw and on the residuals of a
    straight-line fit on FVU, the smaller of the two, and the best interior depth minus the better edge (reported)."""
    slope, intercept = np.polyfit(fvu, sims, 1)
    resid = sims - (slope * fvu + intercept)
    raw = float(np.mean(sims[middle]) - np.mean(sims[edges]))
    adjusted = float(np.mean(resid[middle]) - np.mean(resid[edges]))
    return {"raw": raw, "fvu": adjusted, "both": min(raw, adjusted), "peak": _peak(sims)}


def _part_b_rows(layers: LayerComparisons, table: pd.DataFrame, names: tuple[str, str], depths: list[float]) -> Any:
    """Part (b)'s statistics on each seed's full held-out comparison and on each bootstrap draw (chapter 5)."""
    import pandas as pd

    middle, edges = middle_and_edges(depths)
    cross = layers.cross.set_index(["depth", "seed"])
    profile = depth_profile(layers, table, names).set_index("depth")
    boot = layers.boot.dropna()
    rows = []
    for seed in sorted(set(cross.index.get_level_values("seed"))):
        null = np.array([cross.loc[(d, seed), "RSA null mean"] for d in depths], dtype=float)
        fvu = np.array([_seed_fvu(table, names, profile.loc[d], seed) for d in depths])
        point = np.array([cross.loc[(d, seed), "RSA"] for d in depths], dtype=float) - null
        if np.isfinite(point).all():
            rows.append({"seed": seed, "replicate": -1, **_contrasts(point, fvu, middle, edges)})
        for rep, draw in boot[boot["seed"] == seed].groupby("replicate"):
            sims = draw.set_index("depth")["RSA"].reindex(depths).to_numpy() - null
            if np.isfinite(sims).all():
                rows.append({"seed": seed, "replicate": int(rep), **_contrasts(sims, fvu, middle, edges)})
    return pd.DataFrame(rows, columns=["seed", "replicate", "raw", "fvu", "both", "peak"])


def peak_statistic(layers: LayerComparisons, table: pd.DataFrame, names: tuple[str, str]) -> dict[str, Any]:
    """Chapter 5, part (b): is the cross-model similarity higher in the middle layers than at the edges?

    The similarity at a depth is the one-to-one RSA minus its null mean. The contrast, fixed in advance
    (:func:`middle_and_edges`), is the mean similarity at the middle depths minus the mean at the shallowest and
    deepest depth; the FVU-adjusted contrast does the same on the residuals of a straight-line fit of similarity on
    the held-out FVU (mean of A's and B's SAE of that seed) across depths, and the check reads the smaller of the
    two (a difference that must stand both ways). Its point estimate is the mean over seeds of each seed's full
    held-out comparison; its standard error combines the spread over seeds (variance over seeds / seeds) and the
    spread over the held-out passages (the mean over seeds of the variance of the bootstrap draws, which re-match
    on resampled passages: :func:`depth_bootstrap`).

    Returns:
        ``contrast``: ``{"effect", "se", "seed se", "boot se", "low", "high"}`` (mean, standard error, its two parts
        and the effect ± 1.96 standard errors), ``per seed`` (the checked statistic), ``per seed raw``, ``per seed
        fvu``; ``peak per seed`` (best interior depth minus the better edge, reported); ``seeds``; ``draws`` (the
        bootstrap draws used) and ``draws table`` (every seed's and draw's statistics, replicate -1 being the full
        comparison); ``best depth`` (of the seeds' mean similarity) and ``best depth per seed``, ``depths``,
        ``middle`` and ``edges``. The contrast's interval (``low``, ``high``) is 95 % with t quantiles (seeds - 1
        degrees of freedom), like its check.
    """
    from scipy.stats import t as student

    depths = sorted(layers.cross["depth"].unique())
    middle, edges = middle_and_edges(depths)
    rows = _part_b_rows(layers, table, names, depths)
    point, draws = rows[rows["replicate"] < 0], rows[rows["replicate"] >= 0]
    if point.empty:
        raise EmbgeoInputError("No seed has 10 one-to-one pairs at every depth; use more held-out tokens.")
    n = len(point)
    seed_var = float(point["both"].var(ddof=1)) / n if n > 1 else 0.0
    boot_var = draws.groupby("seed")["both"].var(ddof=1).dropna()
    boot_var_mean = float(boot_var.mean()) if len(boot_var) else 0.0
    effect, se = float(point["both"].mean()), float(np.sqrt(seed_var + boot_var_mean))
    cross = layers.cross.assign(sim=layers.cross["RSA"] - layers.cross["RSA null mean"])
    best = cross.groupby("depth")["sim"].mean().idxmax()
    best_per_seed = cross.groupby(["seed", "depth"])["sim"].mean().groupby(level="seed").idxmax()
    half = float(student.ppf(0.975, max(1, n - 1))) * se
    contrast = {"effect": effect, "se": se, "seed se": float(np.sqrt(seed_var)), "boot se": float(np.sqrt(boot_var_mean)),
                "low": effect - half, "high": effect + half}  # fmt: skip
    return {
        "contrast": contrast, "per seed": point["both"].tolist(), "per seed raw": point["raw"].tolist(),
        "per seed fvu": point["fvu"].tolist(), "peak per seed": point["peak"].tolist(), "seeds": n,
        "draws": len(draws), "draws table": rows.to_dict(orient="records"), "best depth": float(best),
        "best depth per seed": [float(d) for _, d in best_per_seed.tolist()],
        "depths": [float(d) for d in depths], "middle": [float(depths[i]) for i in middle],
        "edges": [float(depths[i]) for i in edges],
    }  # fmt: skip


def _seed_fvu(table: pd.DataFrame, names: tuple[str, str], row: Any, seed: int) -> float:
    a = table[(table["model"] == names[0]) & (table["layer"] == row["layer A"]) & (table["seed"] == seed)]
    b = table[(table["model"] == names[1]) & (table["layer"] == row["layer B"]) & (table["seed"] == seed)]
    return float((a["fvu"].iloc[0] + b["fvu"].iloc[0]) / 2)


def _rsa_minimum(r: Any, stat: str, ceiling_fraction: float) -> tuple[float, str]:
    """Part (a)'s smallest effect at one depth and its source (chapter 5): for RSA a share of the geometric mean of
    the two models' own seed ceilings, for SVCCA of the pooled SVCCA ceiling; never below that share of
    :data:`CONTROL_MIN_RSA`."""
    if stat == "RSA":
        ceil, what = float(r.get("geometric ceiling", np.nan)), "the geometric mean of the two models' seed ceilings"
    else:
        ceil, what = float(r.get(f"ceiling {stat} excess", np.nan)), "the seed ceiling's SVCCA above its null"
    minimum = ceiling_fraction * max(ceil if np.isfinite(ceil) else 0.0, CONTROL_MIN_RSA)
    source = (
        f"{ceiling_fraction:.0%} of {what} at this depth ({ceil:.3f}), and at least {ceiling_fraction:.0%} of the "
        f"smallest ceiling the control accepts ({CONTROL_MIN_RSA}): 'far more similar than chance' read as keeping "
        "that share of what two seeds of one model share"
    )
    return minimum, source


def _part_a_checks(r: Any, ceiling_fraction: float, n_permutations: int, random_row: Any = None) -> list[Check]:
    """Part (a) at one depth: one-to-one RSA and SVCCA above their nulls, RSA above a randomly initialised B's (when
    ``random_row``, :func:`random_control`'s row at this depth, is given), and each model's seed ceiling as a
    positive control."""
    from scipy.stats import norm

    where = f"depth {r['depth']:.2f} (layers {int(r['layer A'])}/{int(r['layer B'])})"
    checks = []
    for stat in ("RSA", "SVCCA"):
        minimum, source = _rsa_minimum(r, stat, ceiling_fraction)
        name = f"one-to-one {stat} > null, {where}"
        effect = float(r.get(f"{stat} excess", np.nan))
        if not np.isfinite(effect):
            checks.append(Check(name, -1.0, 1.0, min_effect=minimum, n=int(r["pairs"]), min_effect_source=source))
            continue
        checks.append(Check(name, effect, float(r[f"{stat} p"]), minimum, int(r["pairs"]), se=float(r[f"{stat} se"]),
                            min_effect_source=source, n_permutations=n_permutations))  # fmt: skip
    if random_row is not None:
        minimum, source = _rsa_minimum(r, "RSA", ceiling_fraction)
        name = f"one-to-one RSA > a randomly initialised B's, {where}"
        effect = float(r.get("RSA excess", np.nan)) - float(random_row["RSA excess"])
        se = float(np.hypot(r.get("RSA se", np.nan), random_row["RSA null std"]))
        if np.isfinite(effect) and np.isfinite(se) and se > 0:
            checks.append(Check(name, effect, float(norm.sf(effect / se)), minimum, int(r["pairs"]), se=se,
                                min_effect_source=source))  # fmt: skip
        else:
            checks.append(Check(name, -1.0, 1.0, min_effect=minimum, min_effect_source=source))
    source = f"practical: {CONTROL_MIN_RSA}, about five times the largest RSA null maximum measured at 500 rows (0.011)"
    for side in "AB":
        control = f"seed ceiling of {side}: one-to-one RSA > null, {where}"
        effect = float(r.get(f"ceiling RSA excess {side}", np.nan))
        if np.isfinite(effect):
            checks.append(Check(control, effect, float(r[f"ceiling RSA p {side}"]), CONTROL_MIN_RSA,
                                se=float(r[f"ceiling RSA null std {side}"]), min_effect_source=source,
                                n_permutations=n_permutations, control=True))  # fmt: skip
        else:
            checks.append(Check(control, -1.0, 1.0, CONTROL_MIN_RSA, min_effect_source=source, control=True))
    return checks


def check_claim10(
    profile: pd.DataFrame, peak: dict[str, Any], n_permutations: int, ceiling_fraction: float = 0.1,
    alpha: float = 0.01, random: pd.DataFrame | None = None,
) -> Verdict:  # fmt: skip
    """Claim 10 (chapter 5): paired decoder geometry beats the null, and is highest in the middle layers.

    Checks (Holm-adjusted together; the controls form their own family):

    * (a) at every matched depth, the one-to-one RSA and SVCCA (headline ``n``) of the seeds' mean above the mean of
      their nulls (effect: the excess; permutation p of the mean against the draw-by-draw mean of independent nulls;
      standard error from the null's and the seeds' spread), with the smallest effect ``ceiling_fraction`` of the
      seed ceiling at that depth (for RSA the geometric mean of the two models' own ceilings; at least of
      :data:`CONTROL_MIN_RSA`: a near-zero ceiling gives no near-zero minimum);
    * (a) with ``random`` (:func:`random_control`'s table), at every matched depth: the RSA excess above the one
      measured by the same pipeline against a randomly initialised B, by the same smallest effect (normal
      approximation with both standard errors): what the pipeline reports without learned geometry is not the claim;
    * (b) the middle depths' similarity minus the edges' (:func:`peak_statistic`), each seed the smaller of the raw
      contrast and the one with FVU as a covariate; effect the mean over seeds, p from a t distribution with seeds - 1
      degrees of freedom on its standard error (seeds and held-out passages), smallest effect ``ceiling_fraction`` of
      the mean geometric ceiling (at least of :data:`CONTROL_MIN_RSA`);
    * controls, at every depth and for each model: its seed ceiling's one-to-one RSA above its null by at least
      :data:`CONTROL_MIN_RSA` (two SAEs of one model that differ only in their seed).

    ``profile`` is :func:`depth_profile`'s table, ``peak`` :func:`peak_statistic`'s result.
    """
    from scipy.stats import t as student

    if "ceiling RSA excess A" not in profile:
        raise EmbgeoInputError("Claim 10's minimum effects need the seed ceiling: run match_and_compare(ceiling=True).")
    by_depth = random.set_index("depth") if random is not None else None
    checks = []
    for _, r in profile.iterrows():
        rnd = by_depth.loc[r["depth"]] if by_depth is not None and r["depth"] in by_depth.index else None
        checks += _part_a_checks(r, ceiling_fraction, n_permutations, rnd)
    mean_ceiling = float(profile["geometric ceiling"].mean())
    minimum = ceiling_fraction * max(mean_ceiling if np.isfinite(mean_ceiling) else 0.0, CONTROL_MIN_RSA)
    source = (
        f"{ceiling_fraction:.0%} of the geometric mean of the two models' seed ceilings, mean over depths "
        f"({mean_ceiling:.3f}), and at least {ceiling_fraction:.0%} of the smallest ceiling the control accepts "
        f"({CONTROL_MIN_RSA})"
    )
    e = peak["contrast"]
    se = e["se"] if np.isfinite(e["se"]) and e["se"] > 0 else None
    df = max(1, int(peak["seeds"]) - 1)
    p = float(student.sf(e["effect"] / se, df)) if se else (0.0 if e["effect"] > 0 else 1.0)
    mid = ", ".join(f"{d:.2f}" for d in peak["middle"])
    edges = " and ".join(f"{d:.2f}" for d in peak["edges"])
    checks.append(Check(f"middle depths ({mid}) minus edges ({edges}), raw and with FVU as a covariate",
                        e["effect"], p, minimum, int(peak["seeds"]), se=se, min_effect_source=source, df=df))  # fmt: skip
    return verdict(checks, alpha=alpha)


@dataclass(frozen=True)
class Claim10:
    """Claim 10's verdict for one pair of models, with what the chapter reports beside it (chapter 5, stage 5).

    Attributes:
        verdict: the checks and verdict of :func:`check_claim10`.
        profile: :func:`depth_profile`'s table.
        peak: :func:`peak_statistic`'s result (part (b)).
        part_b: part (b) in words, as its check reads.
    """

    verdict: Verdict
    profile: pd.DataFrame
    peak: dict[str, Any]
    part_b: str

    @property
    def smallest_rsa(self) -> float:
        """The smallest one-to-one RSA excess over the matched depths (the claim's headline statistic)."""
        return float(self.profile["RSA excess"].min())


def check(pair: PairResult, p: Parameters, random: RandomControl | None = None) -> Claim10:
    """Chapter 5, stage 5: claim 10's verdict (:func:`check_claim10`) for one pair of models, at level ``p.alpha``,
    with :func:`random_control`'s result when given."""
    profile = depth_profile(pair.layers, pair.saes, pair.names)
    peak = peak_statistic(pair.layers, pair.saes, pair.names)
    table = random.profile if random is not None else None
    result = check_claim10(profile, peak, p.n_permutations, p.ceiling_fraction, p.alpha, table)
    span = f"{peak['depths'][0]:.2f}-{peak['depths'][-1]:.2f}"
    status = next(st for c, st in zip(result.checks, result.status) if c.name.startswith("middle depths"))
    if status == "holds":
        text = f"higher in the middle depths than at the edges within depths {span}"
    elif status == "absent" and result.verdict.startswith("inconclusive (positive control"):
        text = (
            f"a peak in the middle depths is not seen within depths {span}, but with a positive control failing "
            "that absence does not count (inconclusive)"
        )
    elif status == "absent":
        text = f"a peak in the middle depths is not supported within depths {span}"
    else:
        text = f"a peak in the middle depths is neither shown nor ruled out within depths {span} (inconclusive)"
    return Claim10(result, profile, peak, text)


@dataclass(frozen=True)
class PairResult:
    """Everything chapter 5 measures for one pair of models: the outputs of stages 1, 2 and 3-4.

    Attributes:
        names: ``(A, B)``; n_layers: their numbers of blocks; seeds: the SAE seeds.
        tokens: stage 1 (:class:`PairTokens`); sae: stage 2 (:class:`TrainedSAEs`); layers: stages 3 and 4
            (:class:`LayerComparisons`); curve: :func:`token_curve`'s table (None when not measured).
    """

    names: tuple[str, str]
    n_layers: tuple[int, int]
    seeds: list[int]
    tokens: PairTokens
    sae: TrainedSAEs
    layers: LayerComparisons
    curve: pd.DataFrame | None

    @property
    def matched(self) -> list[tuple[int, int]]:
        """The layer pairs at matching relative depth."""
        return self.tokens.matched

    @property
    def aligned(self) -> AlignedTokens:
        return self.tokens.aligned

    @property
    def trained(self) -> dict[str, dict[int, dict[int, LayerSAE]]]:
        """``{"A": {layer: {seed: LayerSAE}}, "B": {...}}``."""
        return self.sae.saes

    @property
    def saes(self) -> pd.DataFrame:
        """The SAEs' quality table (:class:`TrainedSAEs`)."""
        return self.sae.table

    @property
    def cross(self) -> pd.DataFrame:
        """One row per matched depth and seed (:class:`LayerComparisons`)."""
        return self.layers.cross

    @property
    def kept(self) -> dict[tuple[int, int, int], FeaturePairs]:
        return self.layers.kept


def run_pair(
    a: LoadedModel, b: LoadedModel, texts: Sequence[str], depths: Sequence[float], p: Parameters,
    progress: bool = False, cache: bool = True, study: bool = True,
) -> PairResult:  # fmt: skip
    """Chapter 5 for one pair of loaded models at relative ``depths``: extract, train, match and compare.

    With ``study`` (the pair of one family) also the seed ceiling, part (b)'s bootstrap and the FVU-against-tokens
    curve; without it (the cross-tokenizer pair) the cross-model comparisons only. Without ``cache`` the
    comparisons are recomputed and not stored.
    """
    tokens = extract(a, b, texts, depths, p, progress)
    trained = train(a, b, tokens, p, progress)
    layers = match_and_compare(a, b, tokens, trained, p, cache, ceiling=study, bootstrap=study, progress=progress)
    curve = token_curve(a, b, tokens, p, progress) if study else None
    names = (a.info.name, b.info.name)
    return PairResult(names, (a.info.n_layers, b.info.n_layers), list(p.seeds), tokens, trained, layers, curve)


def run_cross_pair(a: LoadedModel, b: LoadedModel, texts: Sequence[str], p: Parameters, progress: bool = False) -> Any:
    """Chapter 5 beyond the paper: the cross-tokenizer pair on the first ``p.cross_passages`` texts, at
    ``p.cross_depths``, with the first seed only (:func:`run_pair` without the study)."""
    from dataclasses import replace

    q = replace(p, seeds=list(p.seeds[:1]))
    return run_pair(a, b, list(texts[: p.cross_passages]), p.cross_depths, q, progress, study=False)


@dataclass(frozen=True)
class RandomControl:
    """Chapter 5's negative control: model A against a randomly initialised B, through the same pipeline.

    Attributes:
        name: the random model's name (:func:`~embgeo_utils.lm.models.random_init`).
        saes: the first seed's SAEs of both sides with their held-out quality: ``model``, ``layer``, ``seed``,
            ``fvu``, ``l0``, ``dead_fraction``.
        cross: one row per matched depth (first seed): ``depth``, ``layer A``, ``layer B``, ``seed``, then
            :class:`Comparison`'s row.
        profile: one row per matched depth: ``depth``, ``layer A``, ``layer B``, ``pairs``, ``RSA``, ``RSA excess``,
            ``RSA null std``, ``RSA p``, ``SVCCA excess``, ``SVCCA p``, ``fvu B`` (the random model's SAE). Below 10
            one-to-one pairs the pipeline reports nothing: the excess is 0 with a null spread of 0.
    """

    name: str
    saes: pd.DataFrame
    cross: pd.DataFrame
    profile: pd.DataFrame


def _random_profile(layers: LayerComparisons, table: pd.DataFrame, name: str) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for _, r in layers.cross.iterrows():
        fvu = table[(table["model"] == name) & (table["layer"] == r["layer B"])]["fvu"]
        has_rsa = np.isfinite(r.get("RSA", np.nan))
        rows.append({
            "depth": r["depth"], "layer A": int(r["layer A"]), "layer B": int(r["layer B"]), "pairs": int(r["pairs"]),
            "RSA": r.get("RSA", np.nan), "RSA excess": r["RSA"] - r["RSA null mean"] if has_rsa else 0.0,
            "RSA null std": r["RSA null std"] if has_rsa else 0.0, "RSA p": r.get("RSA p", np.nan),
            "SVCCA excess": r.get("SVCCA", np.nan) - r.get("SVCCA null mean", np.nan),
            "SVCCA p": r.get("SVCCA p", np.nan), "fvu B": float(fvu.iloc[0]) if len(fvu) else np.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)


def random_control(
    a: LoadedModel, b: LoadedModel, texts: Sequence[str], depths: Sequence[float], p: Parameters,
    progress: bool = False, cache: bool = True,
) -> RandomControl:  # fmt: skip
    """Chapter 5: claim 10's pipeline between A and B's architecture with random weights (the negative control).

    B is re-initialised with seed ``p.seed`` (:func:`~embgeo_utils.lm.models.random_init`: same tokenizer, widths
    and depths, no learned structure). The same passages, layers, split, SAE settings (first seed only), filters,
    one-to-one matching and comparisons as :func:`run_pair` follow; A's activations and SAEs come from the cache.
    Whatever it reports — co-firing of latents on the same text, token identity, the matching itself — the pipeline
    reports without shared learned geometry, so claim 10's part (a) must exceed it (:func:`check_claim10`).
    """
    import gc
    from dataclasses import replace

    import pandas as pd

    from ..lm.models import random_init

    q = replace(p, seeds=list(p.seeds[:1]))
    rb = random_init(b, seed=p.seed)
    tokens = extract(a, rb, texts, depths, q, progress)
    al = tokens.aligned
    saes = {
        "A": train_layer_saes(al.acts_a, tokens.train, tokens.heldout, a, q, progress),
        "B": train_layer_saes(al.acts_b, tokens.train, tokens.heldout, rb, q, progress),
    }
    table = pd.DataFrame([
        {"model": item.model, "layer": layer, "seed": seed, **{m: item.metrics[m] for m in ("fvu", "l0", "dead_fraction")}}
        for side in "AB" for layer, by_seed in saes[side].items() for seed, item in by_seed.items()
    ])  # fmt: skip
    layers = match_and_compare(a, rb, tokens, TrainedSAEs(saes, table), q, cache, False, False, progress)
    name = rb.info.name
    del rb, saes
    gc.collect()
    return RandomControl(name, table, layers.cross, _random_profile(layers, table, name))


def _span(values: Any, fmt: str = ".3f") -> str:
    """``"low–high"`` of the finite values (one value when they agree, "n/a" when there is none)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return "n/a"
    low, high = format(float(v.min()), fmt), format(float(v.max()), fmt)
    return low if low == high else f"{low}–{high}"


def _random_line(random: RandomControl | None, m: pd.DataFrame) -> list[str]:
    """The negative control in one summary line (chapter 5; none without it)."""
    if random is None:
        return []
    r = random.profile
    return [
        f"- Against {random.name} (the negative control): one-to-one RSA above its null {_span(r['RSA excess'])} over "
        f"depths from {_span(r['pairs'], '.0f')} pairs (held-out FVU of its SAEs {_span(r['fvu B'], '.2f')}), "
        f"against {_span(m['RSA excess'])} for the trained model."
    ]


def _part_b_line(pk: dict[str, Any], text: str) -> str:
    """Part (b) in one summary line (chapter 5)."""
    c = pk["contrast"]

    def values(key: str) -> str:
        return ", ".join(f"{x:.4f}" for x in pk[key])

    return (
        f"- Part (b): the middle depths ({', '.join(f'{d:.2f}' for d in pk['middle'])}) minus the edges "
        f"({' and '.join(f'{d:.2f}' for d in pk['edges'])}), per seed the smaller of the raw contrast and the one with "
        f"FVU as a covariate: {values('per seed')} (mean {c['effect']:.4f}, standard error {c['se']:.4f}: "
        f"{c['seed se']:.4f} from the seeds, {c['boot se']:.4f} from {pk['draws']} resampled draws of the held-out "
        f"passages); raw {values('per seed raw')}, with FVU as a covariate {values('per seed fvu')}. The best "
        f"interior depth minus the better edge, per seed (reported, not checked): {values('peak per seed')}; the "
        f"most similar depth, per seed: {', '.join(f'{d:.2f}' for d in pk['best depth per seed'])}. "
        f"{text[0].upper()}{text[1:]}."
    )


def summary_lines(
    pair: PairResult, claim: Claim10, fvu_bars: dict[str, float], random: RandomControl | None = None
) -> list[str]:
    """Chapter 5's summary in words, every number from the run: the SAEs (held-out FVU against ``fvu_bars`` per
    model, dead latents, loss), the FVU-against-tokens curve, the many-to-one groups, one-to-one against
    many-to-one RSA with their nulls, the seed ceiling, the randomly initialised control (``random``), part (b) and
    the verdict (markdown list items)."""
    t, c, m, pk = pair.saes, pair.cross, claim.profile, claim.peak
    bar = t["fvu"] <= t["model"].map(fvu_bars)
    lines = [
        f"- SAEs ({len(t)}: {len(pair.seeds)} seeds): held-out FVU "
        + "; ".join(f"{name} {_span(q['fvu'], '.2f')}" for name, q in t.groupby("model", sort=False))
        + f" on {int(t['train tokens'].iloc[0]):,} training tokens ({int(bar.sum())} of {len(t)} within the bar); "
        f"dead latents at most {t['dead_fraction'].max():.1%}; loss recovered {_span(t['loss recovered'], '.2f')}, "
        f"a loss increase of {_span(t['loss increase (nats)'], '.2f')} nats."
    ]
    if pair.curve is not None and len(pair.curve):
        parts = [f"{name} {q['fvu'].iloc[0]:.2f} at {int(q['train tokens'].iloc[0]):,} tokens to "
                 f"{q['fvu'].iloc[-1]:.2f} at {int(q['train tokens'].iloc[-1]):,}"
                 for name, q in pair.curve.sort_values("train tokens").groupby("model", sort=False)]  # fmt: skip
        lines.append("- Held-out FVU against training tokens: " + "; ".join(parts) + ".")
    lines.append(
        f"- Many-to-one pairs: {_span(c['pairs (many-to-one)'], '.0f')} per comparison from "
        f"{_span(c['distinct A'], '.0f')} distinct A latents (largest group {int(c['largest group'].max())}); the "
        f"one-to-one pairs keep {_span(c['pairs'], '.0f')}."
    )
    if "RSA (many-to-one)" in c:
        lines.append(
            f"- One-to-one RSA {_span(c['RSA'])} against null maxima {_span(c['RSA null max'])} (p "
            f"{_span(c['RSA p'], '.4f')}); many-to-one RSA {_span(c['RSA (many-to-one)'])}, p "
            f"{_span(c['RSA p (many-to-one, B shuffled)'], '.4f')} against the shuffled-B null and "
            f"{_span(c['RSA p (many-to-one, groups kept)'], '.4f')} against the null that keeps the groups."
        )
    both = (m["ceiling RSA excess A"] >= CONTROL_MIN_RSA) & (m["ceiling RSA excess B"] >= CONTROL_MIN_RSA)
    share = (
        f"the cross-model excess is {_span(m['fraction of geometric ceiling'] * 100, '.0f')} % of the geometric mean "
        "of the two own ceilings; "
        + (
            f"both own ceilings pass the control at depths {', '.join(f'{d:.2f}' for d in m.loc[both, 'depth'])}"
            if both.any()
            else f"at no depth do both own ceilings reach the control's {CONTROL_MIN_RSA}"
        )
    )
    lines += [
        f"- Seeds' mean one-to-one RSA above its null: {_span(m['RSA excess'])} over depths; the seed ceiling's "
        f"{_span(m['ceiling RSA excess'])} (A's own {_span(m['ceiling RSA excess A'])}, B's own "
        f"{_span(m['ceiling RSA excess B'])}); {share}.",
        *_random_line(random, m),
        _part_b_line(pk, claim.part_b),
        "- Positive controls that do not hold: "
        + (
            ", ".join(
                f"{c.name} ({c.effect:.4f} against {c.min_effect:.2f}, {st})"
                for c, st in zip(claim.verdict.checks, claim.verdict.status)
                if c.control and st != "holds"
            )
            or "none"
        )
        + ".",
        f"- Claim 10: **{claim.verdict.summary()}**.",
    ]
    return lines


def feature_examples(result: PairResult, la: int, lb: int, n: int = 4, top: int = 3, width: int = 40) -> Any:
    """The best-correlated one-to-one pairs of a matched layer pair (first seed) with their top contexts (chapter 5).

    Contexts are A's latent's most activating held-out positions among those where it is active, each with ``width``
    characters either side of the token, the token in bold.
    """
    import pandas as pd

    kept = result.kept[(la, lb, result.seeds[0])]
    if not len(kept):
        return pd.DataFrame()
    al, held = result.aligned, np.flatnonzero(result.tokens.heldout)
    za = encode_all(result.trained["A"][la][result.seeds[0]].sae, al.acts_a[la][held])
    rows = []
    for i in np.argsort(-kept.corr)[:n]:
        col = za[:, int(kept.a[i])]
        values, best = torch.topk(col, min(top, col.shape[0]))
        contexts = []
        for r in held[best[values > 0].cpu().numpy()]:
            text = al.texts[int(al.passage[r])]
            s, e = (int(v) for v in al.spans[r])
            left = text[max(0, s - width) : s].replace("\n", " ")
            right = text[e : e + width].replace("\n", " ")
            contexts.append(f"…{left}**{text[s:e].strip() or '␣'}**{right}…")
        rows.append({"latent A": int(kept.a[i]), "latent B": int(kept.b[i]), "correlation": float(kept.corr[i]),
                     "top contexts (A's latent)": " / ".join(contexts)})  # fmt: skip
    return pd.DataFrame(rows)


def plot_sae_quality(table: pd.DataFrame, curve: pd.DataFrame | None) -> Figure:
    """Chapter 5: held-out FVU of every SAE against depth (one point per seed) and against training tokens."""
    import matplotlib.pyplot as plt

    need_columns(table, ("model", "depth", "fvu"), "ch05.train")
    fig, axes = plt.subplots(1, 2, figsize=(COLUMN_INCHES, 3.8))
    for (name, q), color in zip(table.groupby("model", sort=False), ("#0072B2", "#D55E00")):
        axes[0].plot(q["depth"], q["fvu"], "o", color=color, alpha=0.7, label=name)
        if curve is not None and len(curve):
            c = curve[curve["model"] == name]
            axes[1].plot(
                c["train tokens"], c["fvu"], "o-", color=color, label=f"{name}, layer {int(c['layer'].iloc[0])}"
            )
    axes[0].set_xlabel("relative depth")
    axes[0].set_ylabel("held-out FVU")
    axes[0].set_title("SAE quality at every studied block (one point per seed)")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("training tokens (log scale)")
    axes[1].set_ylabel("held-out FVU")
    axes[1].set_title("held-out FVU against training tokens")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_depth_profile(profile: pd.DataFrame, show: bool = True) -> Figure:
    """Chapter 5: one-to-one RSA above its null against depth (seeds' range), its seed ceiling, and FVU beside it.

    With ``show`` the figure is displayed at once, then its interactive version (:func:`interactive_depth_profile`).
    """
    import matplotlib.pyplot as plt

    need_columns(profile, ("depth", "RSA excess", "RSA excess min", "RSA excess max", "fvu A", "fvu B"), "ch05.check")
    fig, axes = plt.subplots(1, 2, figsize=(COLUMN_INCHES, 3.8))
    d = profile["depth"]
    lo, hi = profile["RSA excess"] - profile["RSA excess min"], profile["RSA excess max"] - profile["RSA excess"]
    axes[0].errorbar(d, profile["RSA excess"], yerr=[lo, hi], fmt="o-", color="#0072B2", capsize=3,
                     label="A vs B (mean of seeds; bars: range)")  # fmt: skip
    if "ceiling RSA excess" in profile:
        axes[0].plot(d, profile["ceiling RSA excess"], "s--", color="#009E73", label="seed ceiling (same model)")
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set_yscale("symlog", linthresh=0.01)
    axes[0].set_xlabel("relative depth")
    axes[0].set_ylabel("one-to-one RSA minus null mean")
    axes[0].set_title("paired decoder geometry against depth")
    axes[0].legend(fontsize=8)
    axes[1].plot(d, profile["fvu A"], "o-", color="#0072B2", label="model A")
    axes[1].plot(d, profile["fvu B"], "o-", color="#D55E00", label="model B")
    axes[1].set_xlabel("relative depth")
    axes[1].set_ylabel("held-out FVU (mean of seeds)")
    axes[1].set_title("SAE quality at the same depths")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    if show:
        interactive.show(fig, interactive_depth_profile(profile))
    return fig


def interactive_depth_profile(profile: pd.DataFrame) -> interactive.InteractiveFigure:
    """Chapter 5: :func:`plot_depth_profile` as an interactive figure (hover a point for its depth and value).

    Left, the one-to-one RSA excess (mean of seeds, band: their range) and the seed ceiling; right, each model's
    held-out FVU at the same depths.
    """
    import pandas as pd

    need_columns(profile, ("depth", "RSA excess", "RSA excess min", "RSA excess max", "fvu A", "fvu B"), "ch05.check")
    left, right = "paired decoder geometry against depth", "SAE quality at the same depths"
    parts = [
        profile.assign(series="A vs B (band: range of seeds)", panel=left, value=profile["RSA excess"],
                       low=profile["RSA excess min"], high=profile["RSA excess max"]),
    ]  # fmt: skip
    if "ceiling RSA excess" in profile:
        c = profile["ceiling RSA excess"]
        parts.append(profile.assign(series="seed ceiling (same model)", panel=left, value=c, low=c, high=c))
    for side in "AB":
        f = profile[f"fvu {side}"]
        parts.append(profile.assign(series=f"model {side}", panel=right, value=f, low=f, high=f))
    table = pd.concat(parts, ignore_index=True)[["depth", "series", "panel", "value", "low", "high"]]
    titles = {left: "one-to-one RSA minus null mean", right: "held-out FVU (mean of seeds)"}
    return interactive.line_panels(
        table, "depth", "value", "series", "panel", "Paired decoder geometry and SAE quality against depth",
        "relative depth", titles, band=("low", "high"), color_title="",
    )  # fmt: skip


def plot_svcca_curves(curves: pd.DataFrame, seed: int) -> Figure:
    """Chapter 5: SVCCA of the one-to-one pairs against the number of kept directions, with the null, per depth."""
    import matplotlib.pyplot as plt

    need_columns(curves, ("depth", "seed", "n_components", "SVCCA", "null mean", "null max"), "ch05.run_pair")
    fig, ax = plt.subplots(figsize=(7, 4))
    c0 = curves[curves["seed"] == seed]
    depths = sorted(c0["depth"].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(depths))))
    for color, depth in zip(colors, depths):
        c = c0[c0["depth"] == depth]
        ax.plot(c["n_components"], c["SVCCA"], marker="o", color=color, label=f"depth {depth:.2f}")
        ax.fill_between(c["n_components"], c["null mean"], c["null max"], color=color, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("singular directions kept per side (log scale)")
    ax.set_ylabel("SVCCA (mean canonical correlation)")
    ax.set_title(f"SVCCA of one-to-one pairs (seed {seed}); bands: permutation null, mean to max")
    ax.legend(fontsize=8)
    return fig
