"""Chapter 4, layerwise token geometry: does a prompt's token cloud rise and fall in dimension over the layers?

At every layer of a language model, the hidden states of a prompt's ``T`` tokens form a cloud of ``T`` points.
Viswanathan et al. (2025) follow that cloud through the layers with three observables (its intrinsic dimension,
the overlap of nearest-neighbour sets between consecutive layers, the cosine similarity of its tokens), then
destroy the order of the text by block-shuffling its tokens and watch the geometry move with the model's
next-token loss. This chapter asks whether their claims 1-5 hold on the book's small models and real passages.

The stages:

1. :func:`load_prompts`: the passages of the book's corpus each model reads (cut to ``T`` tokens), and
   :func:`shuffled_prompts`: their token ids at one shuffle level ``S``.
2. :func:`measure_level` (cached): the hidden states of layers ``1..L`` and the loss of every prompt at one
   level, measured by :func:`embgeo_utils.geometry.token_clouds.layer_observables` (GRIDE ID, TwoNN, overlap
   ``chi_k``, cosine mean and spread), plus the GRIDE scale curve at the peak layer, as tables.
3. :func:`run_model` gathers one model's levels and :func:`run_layerwise` every model, into a
   :class:`LayerwiseRun` of tidy tables.
4. Summaries of those tables: :func:`id_peaks`, :func:`loss_table`, :func:`max_mean_cosine`,
   :func:`scale_curve_table`, :func:`id_loss_correlation`, :func:`strongest_correlation`, :func:`paper_comparison`.
5. The checks of claims 1-5, :func:`check_claim1` ... :func:`check_claim5` (all five: :func:`check_claims`),
   each with checks judged by :func:`embgeo_utils.core.stats.verdict`, and :func:`claims_summary`.
6. The figures: :func:`plot_layer_profiles`, :func:`plot_gride_scale_curves`, :func:`plot_loss_by_shuffle_level`,
   :func:`plot_id_loss_correlation_by_layer`.

References:
    K. Viswanathan, Y. Gardinazzi, G. Panerai, A. Cazzaniga, M. Biagetti (2025),
    The Geometry of Tokens in Internal Representations of Large Language Models,
    arXiv:2501.10573.

    F. Denti, D. Doimo, A. Laio, A. Mira (2022), The generalized ratios intrinsic
    dimension estimator, Sci. Rep. 12, 20005.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from ..core import stats
from ..core.cache import cached
from ..core.device import get_device
from ..core.errors import EmbgeoInputError
from ..core.progress import LOG
from ..geometry.intrinsic_dim import check_scales, default_scales, gride_batched
from ..geometry.token_clouds import LayerObservables, layer_observables
from ..lm import activations, corpus, models
from ..lm.corpus import Passage
from ..lm.models import LoadedModel
from . import interactive
from .claims import CLAIMS
from .style import MAX_PANELS_ACROSS, finish_axes, model_colors, need_columns

__all__ = [
    "CHAPTER",
    "ClaimCheck",
    "LayerwiseRun",
    "PAPER_REFERENCE",
    "Parameters",
    "TITLE",
    "check_claim1",
    "check_claim2",
    "check_claim3",
    "check_claim4",
    "check_claim5",
    "check_claims",
    "claims_summary",
    "distinct_levels",
    "id_loss_correlation",
    "id_peaks",
    "interactive_layer_profiles",
    "layer_profile_table",
    "load_prompts",
    "loss_table",
    "max_mean_cosine",
    "measure_level",
    "paper_comparison",
    "plot_gride_scale_curves",
    "plot_id_loss_correlation_by_layer",
    "plot_layer_profiles",
    "plot_loss_by_shuffle_level",
    "run_layerwise",
    "run_model",
    "scale_curve_table",
    "shuffled_prompts",
    "strongest_correlation",
]


CHAPTER = "ch04_layerwise_geometry"
TITLE = "Layerwise token geometry"


@dataclass(frozen=True)
class Parameters:
    """Chapter 4's parameters: the fields of its cell tagged ``parameters`` (defaults and allowed values are there)."""

    model_names: list[str]
    n_prompts: int
    n_tokens: int
    shuffle_levels: list[int]
    scales: list[int]
    scale_curve_max: int
    overlap_k: list[int]
    alpha: float
    seed: int
    device: str
    batch_size: int

    def models(self) -> list[str]:
        """The models the chapter measures, in order."""
        return list(self.model_names)

    def causal_models(self) -> list[str]:
        """Every model: the chapter reads each one's next-token loss."""
        return self.models()


@dataclass
class LayerwiseRun:
    """Everything chapter 4 measures, as tidy pandas tables (returned by :func:`run_layerwise` and :func:`run_model`).

    Attributes:
        geometry: one row per model, shuffle level and prompt and layer, prompt-major within a model and level.
            Columns: ``model`` (name as given), ``S`` (shuffle level), ``prompt`` (0-based), ``layer`` (``1..L``,
            the embedding layer skipped), ``depth`` (``layer / L``), ``ID`` (headline GRIDE ID at the first rank
            of ``scales``, ``n2 = 2`` by default), ``TwoNN``, ``cos_mean`` and ``cos_std`` (off-diagonal token x
            token cosines), ``loss`` (the prompt's mean next-token loss, nats), then ``ID n2=<n2>`` for each further
            rank of ``scales`` and ``chi_<k>`` for each ``k`` of ``overlap_k`` (the overlap of the layer's ``k``
            nearest neighbours with those of the next layer; NaN at the last layer).
        losses: one row per model, level and prompt. Columns: ``model, S, prompt, loss`` (mean next-token loss, nats).
        curves: the GRIDE scale curve at the peak layer of the mean ID profile, for the lowest and the highest level.
            Columns: ``model, S, peak layer`` (1-based), ``prompt``, ``n2`` (GRIDE rank), ``ID``.
        sources: the passage behind each prompt. Columns: ``model, prompt, source, title``.
        n_tokens: tokens per prompt ``T``.
        seconds: wall time per model (loading included).
    """

    geometry: pd.DataFrame
    losses: pd.DataFrame
    curves: pd.DataFrame
    sources: pd.DataFrame
    n_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """The models in the order they were run."""
        return list(dict.fromkeys(self.geometry["model"]))

    @property
    def shuffle_levels(self) -> list[int]:
        """The shuffle levels, ascending."""
        return sorted(int(s) for s in self.geometry["S"].unique())


def _shuffle_levels(shuffle_levels: Sequence[int]) -> list[int]:
    values = list(shuffle_levels)
    if not values or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in values):
        raise EmbgeoInputError(
            f"shuffle_levels must be a list of non-negative integers (0 = the text as written), got {shuffle_levels!r}."
        )
    return sorted({int(s) for s in values})


def load_prompts(loaded: LoadedModel, p: Parameters) -> list[Passage]:
    """Chapter 4, stage 1: the ``p.n_prompts`` passages one model reads, each cut to ``p.n_tokens`` of its tokens.

    Passages of the book's corpus with at least ``n_tokens`` tokens in the model's tokenizer
    (:func:`embgeo_utils.lm.corpus.load_passages`, seed ``p.seed``); their ``token_ids`` hold ``n_tokens`` ids.
    """
    return corpus.load_passages(
        p.n_prompts, loaded.tokenizer, min_tokens=p.n_tokens, max_tokens=p.n_tokens, seed=p.seed
    )


def shuffled_prompts(passages: Sequence[Passage], S: int, seed: int) -> list[np.ndarray]:
    """Chapter 4, stage 1: every passage's token ids at shuffle level ``S``, each with its own block order.

    Passage ``i`` is block-shuffled by :func:`embgeo_utils.lm.corpus.shuffle_tokens` with seed
    ``seed * 100003 + i``; level ``S`` cuts it into ``min(4^S, T)`` blocks (``S = 0``: the text as written).
    """
    return [corpus.shuffle_tokens(p.token_ids, S, seed=seed * 100_003 + i) for i, p in enumerate(passages)]


@cached("layerwise", version=1, ignore=("batch_size",))
def measure_level(
    loaded: LoadedModel,
    name: str,
    S: int,
    ids: list[np.ndarray],
    n_tokens: int,
    scales: np.ndarray,
    overlap_k: list[int],
    curve_scales: np.ndarray | None,
    device: torch.device,
    batch_size: int,
) -> dict[str, pd.DataFrame]:
    """Chapter 4, stage 2: the geometry of every prompt's token cloud at one shuffle level, as tables (cached).

    The hidden states of layers ``1..L`` (the embedding layer skipped) and the loss come from
    :func:`embgeo_utils.lm.activations.hidden_states` (``batch_size`` prompts per forward pass, not written to
    disk: about 10 GB at the chapter's defaults); :func:`layer_observables` measures them with float32 Gram
    matrices (GRIDE at ``scales``, TwoNN, overlap ``chi_k`` for ``overlap_k``, cosines). With ``curve_scales``
    (the lowest and the highest level), the GRIDE scale curve at those ranks is computed at the peak layer of the
    mean ID profile. The cache key holds the model (name, weights' sha256, dtype), ``S``, the token ids' digests,
    ``n_tokens``, the ranks, ``overlap_k`` and the device type.

    Returns:
        ``{"geometry": ..., "losses": ..., "curve": ...}``: this level's rows of :attr:`LayerwiseRun.geometry`,
        :attr:`LayerwiseRun.losses` and :attr:`LayerwiseRun.curves` (same columns); ``curve`` only with
        ``curve_scales``.
    """
    acts = activations.hidden_states(loaded, ids, n_tokens, batch_size=batch_size, cache=False, progress=False)
    hidden = acts.hidden[:, 1:]  # skip the embedding layer: layers 1..L
    obs = layer_observables(
        hidden, scales=scales, overlap_k=overlap_k, device=device, dtype=torch.float32, progress=False
    )
    assert acts.loss is not None  # with_loss=True
    n_prompts = len(ids)
    losses = pd.DataFrame({"model": name, "S": S, "prompt": np.arange(n_prompts), "loss": acts.loss.astype(np.float64)})
    tables = {"geometry": _geometry_frame(name, S, obs, acts.loss), "losses": losses}
    if curve_scales is not None:
        tables["curve"] = _curve_frame(name, S, hidden, obs, curve_scales, device)
    return tables


def _curve_frame(
    name: str, S: int, hidden: np.ndarray, obs: LayerObservables, curve_scales: np.ndarray, device: torch.device
) -> pd.DataFrame:
    """Chapter 4: the rows of :attr:`LayerwiseRun.curves` for one model and level (GRIDE at the peak layer)."""
    peak = int(np.argmax(obs.gride[:, :, 0].mean(0)))
    curve = np.asarray(gride_batched(hidden[:, peak], scales=curve_scales, device=device))
    p_idx, s_idx = np.meshgrid(np.arange(hidden.shape[0]), np.arange(len(curve_scales)), indexing="ij")
    return pd.DataFrame(
        {
            "model": name,
            "S": S,
            "peak layer": peak + 1,
            "prompt": p_idx.ravel(),
            "n2": curve_scales[s_idx.ravel()].astype(int),
            "ID": curve.ravel(),
        }
    )


def _geometry_frame(name: str, S: int, obs: LayerObservables, loss: np.ndarray) -> pd.DataFrame:
    """Chapter 4: the rows of :attr:`LayerwiseRun.geometry` for one model and shuffle level (prompt-major)."""
    n_prompts, n_layers = obs.twonn.shape
    grid_p, grid_l = np.meshgrid(np.arange(n_prompts), np.arange(n_layers), indexing="ij")
    prompt, layer = grid_p.ravel(), grid_l.ravel()
    columns: dict[str, Any] = {
        "model": name,
        "S": int(S),
        "prompt": prompt,
        "layer": layer + 1,
        "depth": (layer + 1) / n_layers,
        "ID": obs.gride[:, :, 0].ravel(),
        "TwoNN": obs.twonn.ravel(),
        "cos_mean": obs.cos_mean.ravel(),
        "cos_std": obs.cos_std.ravel(),
        "loss": np.asarray(loss, dtype=np.float64)[prompt],
    }
    for j, n2 in enumerate(obs.scales[1:], start=1):
        columns[f"ID n2={n2}"] = obs.gride[:, :, j].ravel()
    for k, chi in obs.overlap.items():
        padded = np.concatenate([chi, np.full((n_prompts, 1), np.nan)], axis=1)  # no next layer after the last
        columns[f"chi_{k}"] = padded.ravel()
    return pd.DataFrame(columns)


def _checked_grid(p: Parameters) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Chapter 4: the sorted shuffle levels, the GRIDE ranks of every layer and those of the scale curve."""
    if p.n_prompts < 1 or p.n_tokens < 4:
        raise EmbgeoInputError(f"Need n_prompts >= 1 and n_tokens >= 4, got {p.n_prompts} and {p.n_tokens}.")
    return _shuffle_levels(p.shuffle_levels), check_scales(p.scales), default_scales(p.n_tokens, p.scale_curve_max)


def run_model(loaded: LoadedModel, name: str, p: Parameters, cache: bool = True) -> LayerwiseRun:
    """Chapter 4, stage 3: one model at every shuffle level of ``p`` (:func:`load_prompts`, :func:`measure_level`).

    The same passages serve every level (:func:`shuffled_prompts`); the scale curve is computed at the lowest and
    the highest level only.

    Args:
        loaded: the model.
        name: its name in the tables.
        p: the chapter's parameters (``n_prompts``, ``n_tokens``, ``shuffle_levels``, ``scales``,
            ``scale_curve_max``, ``overlap_k``, ``seed``, ``device``, ``batch_size``).
        cache: read and write :func:`measure_level`'s entries (``False``: compute every level).

    Returns:
        A :class:`LayerwiseRun` of this model (``seconds`` empty).
    """
    levels, scales, curve_scales = _checked_grid(p)
    dev = get_device(p.device)
    measure = measure_level if cache else measure_level.compute
    passages = load_prompts(loaded, p)
    tables = [
        measure(
            loaded,
            name,
            S,
            shuffled_prompts(passages, S, p.seed),
            int(p.n_tokens),
            scales,
            [int(k) for k in p.overlap_k],
            curve_scales if S in (levels[0], levels[-1]) else None,
            dev,
            p.batch_size,
        )  # fmt: skip
        for S in levels
    ]
    sources = [{"model": name, "prompt": i, "source": q.source, "title": q.title} for i, q in enumerate(passages)]
    return LayerwiseRun(
        geometry=pd.concat([t["geometry"] for t in tables], ignore_index=True),
        losses=pd.concat([t["losses"] for t in tables], ignore_index=True),
        curves=pd.concat([t["curve"] for t in tables if "curve" in t], ignore_index=True),
        sources=pd.DataFrame(sources),
        n_tokens=int(p.n_tokens),
    )


def run_layerwise(
    model_names: Sequence[str],
    p: Parameters,
    loader: Callable[[str], LoadedModel] | None = None,
    cache: bool = True,
) -> LayerwiseRun:
    """Chapter 4: measure the layerwise geometry of real prompts, every model at every shuffle level.

    Each model is loaded in turn and measured by :func:`run_model`; its time is logged.

    Args:
        model_names: registry names, Hugging Face ids or paths (the installed ones of ``p.models()``).
        p: the chapter's parameters.
        loader: ``name -> LoadedModel`` (default :func:`embgeo_utils.lm.models.load` on ``p.device``).
        cache: keep each model's tables per shuffle level on disk (:func:`measure_level`), so a rerun reads them
            instead of the hidden states.

    Returns:
        A :class:`LayerwiseRun` of every model, in the order given.

    Raises:
        EmbgeoInputError: on no models, bad counts, levels or scales.
    """
    if isinstance(model_names, str) or not list(model_names):
        raise EmbgeoInputError("model_names must be a non-empty list of model names.")
    levels, _, _ = _checked_grid(p)
    dev = get_device(p.device)
    load = loader or (lambda name: models.load(name, device=dev))
    runs, seconds = [], {}
    for name in model_names:
        start = time.perf_counter()
        loaded = load(name)
        runs.append(run_model(loaded, name, p, cache=cache))
        del loaded
        seconds[name] = time.perf_counter() - start
        n_layers = int(runs[-1].geometry["layer"].nunique())
        LOG.info(f"{name}: {n_layers} layers, {len(levels)} shuffle levels in {seconds[name]:.0f} s")
    return LayerwiseRun(
        geometry=pd.concat([r.geometry for r in runs], ignore_index=True),
        losses=pd.concat([r.losses for r in runs], ignore_index=True),
        curves=pd.concat([r.curves for r in runs], ignore_index=True),
        sources=pd.concat([r.sources for r in runs], ignore_index=True),
        n_tokens=int(p.n_tokens),
        seconds=seconds,
    )


def _require(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise EmbgeoInputError(
            f"{name} must be a pandas DataFrame (a table of run_layerwise), got {type(frame).__name__}."
        )
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise EmbgeoInputError(f"{name} lacks the column(s) {missing}; pass the table that run_layerwise returns.")
    if frame.empty:
        raise EmbgeoInputError(f"{name} is empty; run at least one model.")


def _layer_counts(geometry: pd.DataFrame) -> dict[str, int]:
    return {m: int(v) for m, v in geometry.groupby("model", sort=False)["layer"].max().items()}


def id_peaks(geometry: pd.DataFrame) -> pd.DataFrame:
    """Peak of the mean ID profile per model and shuffle level (chapter 4).

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, layer, ID``).

    Returns:
        DataFrame indexed by ``(model, S)`` with ``peak ID``, ``peak layer``,
        ``layers``, ``first-layer ID`` and ``last-layer ID`` (means over prompts).
    """
    _require(geometry, ["model", "S", "layer", "ID"], "geometry")
    id_mean = geometry.groupby(["model", "S", "layer"])["ID"].mean()
    agg = id_mean.groupby(["model", "S"]).agg(["max", "idxmax", "first", "last"])
    n_layers = _layer_counts(geometry)
    return pd.DataFrame(
        {
            "peak ID": agg["max"],
            "peak layer": [int(i[2]) for i in agg["idxmax"]],
            "layers": [n_layers[m] for m, _ in agg.index],
            "first-layer ID": agg["first"],
            "last-layer ID": agg["last"],
        }
    )


def loss_table(losses: pd.DataFrame) -> pd.DataFrame:
    """Mean next-token loss per model (rows) and shuffle level (columns) (chapter 4)."""
    _require(losses, ["model", "S", "loss"], "losses")
    return losses.groupby(["model", "S"])["loss"].mean().unstack("S")


def max_mean_cosine(geometry: pd.DataFrame) -> pd.DataFrame:
    """Largest layer mean of the mean cosine similarity, per model (rows) and shuffle level (columns) (chapter 4)."""
    _require(geometry, ["model", "S", "layer", "cos_mean"], "geometry")
    return geometry.groupby(["model", "S", "layer"])["cos_mean"].mean().groupby(["model", "S"]).max().unstack("S")


def scale_curve_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean GRIDE ID per model, shuffle level and peak layer (rows) and rank ``n2`` (columns) (chapter 4)."""
    _require(curves, ["model", "S", "peak layer", "n2", "ID"], "curves")
    return curves.groupby(["model", "S", "peak layer", "n2"])["ID"].mean().unstack("n2")


def id_loss_correlation(geometry: pd.DataFrame, shuffle_level: int | None = None) -> pd.DataFrame:
    """Pearson r between a layer's ID and the prompt's loss, across prompts, at every layer (chapter 4).

    One-sided test of r > 0 (``scipy.stats.pearsonr``). Two sets of points per
    model: the prompts at ``shuffle_level`` (default: the lowest level, the
    text as written), labelled ``"S = <level>"``, and all prompts of all levels
    pooled, labelled ``"all S pooled"`` (confounded by shuffling, which raises
    both quantities).

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, layer, ID, loss``).
        shuffle_level: the level of the headline correlation.

    Returns:
        DataFrame with ``model, prompts, layer, depth, r, p, n``, one row per layer and set.
    """
    _require(geometry, ["model", "S", "layer", "ID", "loss"], "geometry")
    level = int(geometry["S"].min()) if shuffle_level is None else int(shuffle_level)
    if level not in set(geometry["S"]):
        raise EmbgeoInputError(f"shuffle_level {level} is not in the run; choose one of {sorted(set(geometry['S']))}.")
    n_layers = _layer_counts(geometry)
    rows = []
    for name in n_layers:
        mine = geometry[geometry["model"] == name]
        for label, part in [(f"S = {level}", mine[mine["S"] == level]), ("all S pooled", mine)]:
            for layer, sub in part.groupby("layer"):
                res = sps.pearsonr(sub["ID"], sub["loss"], alternative="greater")
                rows.append(
                    {
                        "model": name,
                        "prompts": label,
                        "layer": layer,
                        "depth": layer / n_layers[name],
                        "r": res.statistic,
                        "p": res.pvalue,
                        "n": len(sub),
                    }
                )
    return pd.DataFrame(rows)


def strongest_correlation(corr: pd.DataFrame) -> pd.DataFrame:
    """The layer with the largest r per model and set of prompts, with its Bonferroni p over layers (chapter 4).

    Args:
        corr: the table of :func:`id_loss_correlation`.

    Returns:
        DataFrame indexed by ``(model, prompts)`` with ``layer, depth, r, p,
        p (Bonferroni), n, layers tested``; the Bonferroni p is ``min(1, p * number of layers)``
        (:func:`~embgeo_utils.core.stats.bonferroni` over the layers of the set).
    """
    _require(corr, ["model", "prompts", "layer", "r", "p", "n"], "corr")
    rows = []
    for (name, label), part in corr.groupby(["model", "prompts"]):
        if not np.isfinite(part["r"].to_numpy(dtype=np.float64)).any():
            raise EmbgeoInputError(f"No layer of {name} ({label}) has a finite r: the ID or the loss is constant.")
        adjusted = stats.bonferroni(part["p"].to_numpy())
        best = int(np.nanargmax(part["r"].to_numpy(dtype=np.float64)))
        row = part.iloc[best].to_dict()
        row["p (Bonferroni)"] = float(adjusted[best])
        row["layers tested"] = len(part)
        rows.append(row)
    cols = ["model", "prompts", "layer", "depth", "r", "p", "p (Bonferroni)", "n", "layers tested"]
    return pd.DataFrame(rows)[[c for c in cols if c in rows[0]]].set_index(["model", "prompts"])


#: Reference numbers of Viswanathan et al. (2025), 50 prompts of 1,024 tokens (METHODS.md): peak ID
#: (``"value @ layer"``), loss and largest mean cosine; keys ending in ``lo`` are for the text as
#: written (S = 0), in ``hi`` for the finest shuffle (S = 5). :func:`paper_comparison` names them by level.
PAPER_REFERENCE: tuple[dict[str, Any], ...] = (
    {
        "model": "Llama-3-8B (P2)",
        "layers": 32,
        "peak ID lo": "9.5 @ 13",
        "peak ID hi": "13.9 @ 10",
        "loss lo": 1.87,
        "loss hi": 7.49,
        "max mean cos lo": 0.32,
        "max mean cos hi": 0.83,
    },
    {"model": "Mistral-7B (P2)", "layers": 32, "peak ID lo": "9.2", "peak ID hi": "15.0"},
    {"model": "Pythia-6.9B (P2)", "layers": 32, "peak ID lo": "8.2", "peak ID hi": "13.9"},
    {"model": "Pythia-160m (P2)", "layers": 12, "peak ID lo": "7.8 @ 8"},
    {"model": "GPT-2 (P2)", "layers": 12, "peak ID lo": "7.3 @ 9"},
)


def paper_comparison(
    peaks: pd.DataFrame, losses: pd.DataFrame, cos_max: pd.DataFrame, models: Sequence[str] | None = None
) -> pd.DataFrame:
    """Our peak IDs, losses and largest mean cosines next to the paper's reference numbers (chapter 4).

    The paper's shuffled numbers are at its highest level, ``S = 5``; ours at
    the highest level of the run (the column names give both levels).

    Args:
        peaks: :func:`id_peaks`.
        losses: :func:`loss_table`.
        cos_max: :func:`max_mean_cosine`.
        models: order of our models (default: the order of ``peaks``).

    Returns:
        DataFrame indexed by model: the paper's models first (missing numbers
        are NaN), then ours.
    """
    levels = sorted({int(s) for s in peaks.index.get_level_values("S")})
    lo, hi = levels[0], levels[-1]
    names = {"lo": lo, "hi": hi}

    def rename(row: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in row.items():
            head, _, tail = key.rpartition(" ")
            out[f"{head} S={names[tail]}" if tail in names else key] = value
        return out

    ours = []
    for name in models or dict.fromkeys(peaks.index.get_level_values("model")):
        pk = peaks.loc[name]
        ours.append(
            rename(
                {
                    "model": name,
                    "layers": int(pk["layers"].iloc[0]),
                    "peak ID lo": f"{pk.loc[lo, 'peak ID']:.1f} @ {int(pk.loc[lo, 'peak layer'])}",
                    "peak ID hi": f"{pk.loc[hi, 'peak ID']:.1f} @ {int(pk.loc[hi, 'peak layer'])}",
                    "loss lo": round(losses.loc[name, lo], 2),
                    "loss hi": round(losses.loc[name, hi], 2),
                    "max mean cos lo": round(cos_max.loc[name, lo], 2),
                    "max mean cos hi": round(cos_max.loc[name, hi], 2),
                }
            )
        )
    paper = pd.DataFrame([rename(r) for r in PAPER_REFERENCE])
    return pd.concat([paper, pd.DataFrame(ours)]).set_index("model")


@dataclass(frozen=True)
class ClaimCheck:
    """The test of one ledger claim in chapter 4.

    Attributes:
        number: the claim's number in the ledger (1-5).
        verdict: the :class:`~embgeo_utils.core.stats.Verdict` of its checks.
        table: per-model numbers behind the checks (DataFrame indexed by model),
            with ``checks holding`` and ``holds`` (every check of the model holds).
        statistic: what :attr:`value` is.
        value: the claim's headline statistic.
        null: what the statistic is tested against.
    """

    number: int
    verdict: stats.Verdict
    table: pd.DataFrame
    statistic: str
    value: float
    null: str

    @property
    def statement(self) -> str:
        """The claim as the ledger states it (:data:`embgeo_utils.chapters.claims.CLAIMS`)."""
        return CLAIMS[self.number][0]


def _levels(geometry: pd.DataFrame, need_two: bool) -> tuple[int, int]:
    levels = sorted(int(s) for s in geometry["S"].unique())
    if need_two and len(levels) < 2:
        raise EmbgeoInputError(
            f"Claims 2-4 compare shuffle levels, but the run has only S = {levels}; add a higher level (e.g. 5)."
        )
    return levels[0], levels[-1]


def _per_prompt(geometry: pd.DataFrame, name: str, S: int, column: str, layers: Sequence[int]) -> np.ndarray:
    """``column`` averaged over ``layers``, one value per prompt (sorted by prompt)."""
    sub = geometry[(geometry["model"] == name) & (geometry["S"] == S) & (geometry["layer"].isin(list(layers)))]
    return sub.groupby("prompt")[column].mean().sort_index().to_numpy()


def _peak_layer(geometry: pd.DataFrame, name: str, S: int) -> int:
    """Layer of the largest mean ID over prompts."""
    sub = geometry[(geometry["model"] == name) & (geometry["S"] == S)]
    return int(sub.groupby("layer")["ID"].mean().idxmax())


def _prompt_matrix(geometry: pd.DataFrame, name: str, S: int, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``column`` per prompt (rows, sorted) and layer (columns, sorted) at level ``S``, and the layers."""
    sub = geometry[(geometry["model"] == name) & (geometry["S"] == S)]
    wide = sub.pivot_table(index="prompt", columns="layer", values=column, aggfunc="mean").sort_index(axis=0)
    return wide.to_numpy(dtype=np.float64), wide.columns.to_numpy()


def _prompt_bootstrap(values: np.ndarray, statistic: Any, seed: int = 0) -> float | None:
    """Standard error of ``statistic(values)`` over resamples of the rows (prompts) of ``values`` (chapter 4)."""
    if values.shape[0] < 2:
        return None
    rng = np.random.default_rng(seed)
    draws = [statistic(values[rng.integers(0, values.shape[0], values.shape[0])]) for _ in range(BOOTSTRAP)]
    return float(np.std(draws, ddof=1))


def _interior_distance(ids: np.ndarray) -> float:
    """Layers between the peak of the mean ID profile (columns: layers in order) and the nearer end."""
    peak = int(np.argmax(ids.mean(axis=0)))
    return float(min(peak, ids.shape[1] - 1 - peak))


def _smallest_step(values: np.ndarray) -> float:
    """The smallest rise of the mean from one level (column) to the next, relative to the first level's mean."""
    means = values.mean(axis=0)
    return float(np.diff(means).min() / abs(means[0]))


def _ratio_se(test: stats.TestResult, baseline: np.ndarray) -> float | None:
    """Standard error of ``mean(a) / mean(baseline) - 1``, from the paired test's se of ``mean(a - baseline)``."""
    return None if test.se is None else float(test.se / abs(baseline.mean()))


def _claim(
    number: int,
    checks: list[stats.Check],
    rows: list[dict[str, Any]],
    alpha: float,
    statistic: str,
    value: float,
    null: str,
) -> ClaimCheck:
    """The verdict of ``checks`` and the per-model table, with how many of each model's checks hold."""
    verdict = stats.verdict(checks, alpha=alpha, correction="holm")
    for row in rows:
        mine = [ok for c, ok in zip(verdict.checks, verdict.holds) if c.name.startswith(f"{row['model']}: ")]
        row["checks holding"] = f"{sum(mine)} of {len(mine)}"
        row["holds"] = bool(mine) and all(mine)
    return ClaimCheck(number, verdict, pd.DataFrame(rows).set_index("model"), statistic, float(value), null)


#: The smallest effects that count for claims 1-5, with where each comes from (Viswanathan et al. 2025 = P2).
MIN_RISE = (
    0.1,
    "practical: 'rises then falls' read as a hump of at least 10 % of the end layers' ID; P2's humps are far "
    "larger (Pythia-160m 3.0 -> 7.8)",
)
MIN_RANK_RISE = (
    0.3,
    "practical: 'raises' read as at least a medium rank correlation between S and the prompt's value (Cohen 1988); "
    "P2's loss rises from 1.87 to 7.49 between S = 0 and 5",
)
MIN_STEP = (
    0.01,
    "practical: 'monotone in S' read as a rise of at least 1 % of the unshuffled value at every step between distinct "
    "shuffle levels",
)
INTERIOR = (1.0, "the claim's words: the ID peaks at least one layer inside the network, not at either end")
#: Resamples of the prompts behind the standard errors of the descriptive checks of claims 1 and 2.
BOOTSTRAP = 200
MIN_COSINE_GAP = (
    0.05,
    "a tenth of P2's gap between shuffled and real text in the largest mean cosine over layers (Llama-3-8B: 0.32 -> "
    "0.83); the book reads the gap at the last layers",
)
MIN_OVERLAP_DROP = (
    0.05,
    "practical: one token in twenty more loses its nearest neighbour from one layer to the next when the prompt is "
    "shuffled",
)
MIN_CORRELATION = (
    0.3,
    "practical: at least a medium correlation (Cohen 1988); P2 reports r up to 0.83 for Pythia-160m and calls "
    "GPT-2's <= 0.52 weak",
)


def check_claim1(geometry: pd.DataFrame, alpha: float = 0.01) -> ClaimCheck:
    """Claim 1: the ID of the token cloud rises, then falls over the layers (chapter 4).

    Checks, per model, on the text as written (the lowest shuffle level):

    * the peak layer ``l*`` of the mean ID profile is interior: effect = layers
      between ``l*`` and the nearer end, minimum :data:`INTERIOR` (1), descriptive (no p-value; its standard
      error comes from resampling the prompts);
    * the ID at ``l*`` exceeds the ID at the first layer: effect = mean ID at
      ``l*`` / mean ID at the first layer - 1, minimum :data:`MIN_RISE` (10 %),
      one-sided Wilcoxon signed-rank test over prompts;
    * the same against the last layer.

    The p-values of all models are Holm-adjusted together and the verdict comes
    from :func:`~embgeo_utils.core.stats.verdict`. The peak is chosen on the same data,
    which favours it slightly; the minimum rise guards against a flat profile.

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, prompt, layer, ID``).
        alpha: significance level.

    Returns:
        A :class:`ClaimCheck`; its value is the smallest peak / last-layer ratio over models.
    """
    _require(geometry, ["model", "S", "prompt", "layer", "ID"], "geometry")
    lo, _ = _levels(geometry, need_two=False)
    checks, rows = [], []
    for name in dict.fromkeys(geometry["model"]):
        mine, row = _claim1_model(geometry, name, lo)
        checks += mine
        rows.append(row)
    return _claim(
        1,
        checks,
        rows,
        alpha,
        f"min over models of mean(ID at peak) / mean(ID at last layer), S={lo}",
        min(r["peak/last"] for r in rows),
        "peak ID no higher than first/last-layer ID (one-sided Wilcoxon over prompts, Holm)",
    )


def _claim1_model(geometry: pd.DataFrame, name: str, lo: int) -> tuple[list[stats.Check], dict[str, Any]]:
    """Chapter 4: claim 1's three checks for one model (see :func:`check_claim1`) and its row of the claim's table."""
    layers = geometry.loc[geometry["model"] == name, "layer"]
    first_layer, last_layer = int(layers.min()), int(layers.max())
    l_star = _peak_layer(geometry, name, lo)
    peak, first, last = (_per_prompt(geometry, name, lo, "ID", [layer]) for layer in (l_star, first_layer, last_layer))
    t_first, t_last = stats.wilcoxon(peak, first), stats.wilcoxon(peak, last)
    ratio_first, ratio_last = peak.mean() / first.mean(), peak.mean() / last.mean()
    ids, _ = _prompt_matrix(geometry, name, lo, "ID")
    checks = [
        stats.Check(
            f"{name}: peak layer {l_star} is interior",
            float(min(l_star - first_layer, last_layer - l_star)),
            None,
            INTERIOR[0],
            last_layer - first_layer + 1,
            _prompt_bootstrap(ids, _interior_distance),
            min_effect_source=INTERIOR[1],
        ),
        stats.Check(
            f"{name}: ID at peak > first layer",
            float(ratio_first - 1),
            t_first.p_value,
            MIN_RISE[0],
            t_first.n,
            _ratio_se(t_first, first),
            min_effect_source=MIN_RISE[1],
        ),
        stats.Check(
            f"{name}: ID at peak > last layer",
            float(ratio_last - 1),
            t_last.p_value,
            MIN_RISE[0],
            t_last.n,
            _ratio_se(t_last, last),
            min_effect_source=MIN_RISE[1],
        ),
    ]
    row = {
        "model": name,
        "peak layer": l_star,
        "layers": last_layer,
        "peak/first": ratio_first,
        "peak/last": ratio_last,
        "p (peak > first)": t_first.p_value,
        "p (peak > last)": t_last.p_value,
    }
    return checks, row


def distinct_levels(shuffle_levels: Sequence[int], n_tokens: int) -> list[int]:
    """The levels that shuffle differently from the level before them (chapter 4).

    Level ``S`` cuts ``T = n_tokens`` tokens into ``min(4^S, T)`` blocks; once
    ``4^S >= T`` every token is its own block, and higher levels are the same
    treatment with another random order. Returns the sorted levels with a new
    number of blocks.
    """
    levels = _shuffle_levels(shuffle_levels)
    blocks = [min(4 ** int(S), int(n_tokens)) for S in levels]
    return [S for i, S in enumerate(levels) if i == 0 or blocks[i] > blocks[i - 1]]


def check_claim2(geometry: pd.DataFrame, losses: pd.DataFrame, n_tokens: int, alpha: float = 0.01) -> ClaimCheck:
    """Claim 2: shuffling raises the loss and the peak ID, monotonically in S (chapter 4).

    Checks, per model:

    * loss: Spearman rho between ``S`` and the prompt's loss over all prompt x
      level points, one-sided (``scipy.stats.spearmanr``); effect = rho, minimum :data:`MIN_RANK_RISE`;
    * peak ID: the same for ``S`` and the per-prompt ID at the peak layer of
      that level's mean profile;
    * monotone loss: effect = the smallest rise of the mean loss from one level
      to the next, relative to the lowest level's mean, minimum :data:`MIN_STEP`
      (descriptive: no p-value; its standard error comes from resampling the prompts);
    * monotone peak ID: the same for the mean peak ID.

    Monotonicity is judged over :func:`distinct_levels` only: levels with the
    same number of blocks are one treatment with two random orders. The
    p-values of all models are Holm-adjusted together and the verdict comes
    from :func:`~embgeo_utils.core.stats.verdict`; when only the loss checks hold,
    the claim is partly reproduced.

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, prompt, layer, ID``).
        losses: :attr:`LayerwiseRun.losses` (columns ``model, S, prompt, loss``).
        n_tokens: tokens per prompt ``T`` (sets which levels differ).
        alpha: significance level.

    Returns:
        A :class:`ClaimCheck`; its value is the smallest Spearman rho(S, peak ID) over models.
    """
    _require(geometry, ["model", "S", "prompt", "layer", "ID"], "geometry")
    _require(losses, ["model", "S", "prompt", "loss"], "losses")
    _levels(geometry, need_two=True)
    levels = sorted(int(s) for s in geometry["S"].unique())
    distinct = distinct_levels(levels, n_tokens)
    mean_loss = loss_table(losses)
    checks, rows = [], []
    for name in dict.fromkeys(geometry["model"]):
        mine, row = _claim2_model(geometry, losses, mean_loss, name, levels, distinct)
        checks += mine
        rows.append(row)
    return _claim(
        2,
        checks,
        rows,
        alpha,
        "min over models of Spearman rho(S, peak ID); loss rho in details",
        min(r["rho(S, peak ID)"] for r in rows),
        "no association of S with loss / peak ID (one-sided Spearman, Holm); means rise at every step",
    )


def _claim2_model(
    geometry: pd.DataFrame,
    losses: pd.DataFrame,
    mean_loss: pd.DataFrame,
    name: str,
    levels: list[int],
    distinct: list[int],
) -> tuple[list[stats.Check], dict[str, Any]]:
    """Chapter 4: claim 2's checks for one model (see :func:`check_claim2`) and its row of the claim's table."""
    lsub = losses[losses["model"] == name]
    rho_loss = stats.spearman(lsub["S"], lsub["loss"])
    pk = pd.concat(
        [
            pd.DataFrame({"S": S, "ID": _per_prompt(geometry, name, S, "ID", [_peak_layer(geometry, name, S)])})
            for S in levels
        ]
    )
    rho_id = stats.spearman(pk["S"], pk["ID"])
    steps_loss = np.diff(mean_loss.loc[name, distinct].to_numpy(dtype=np.float64))
    steps_id = np.diff(pk.groupby("S")["ID"].mean().loc[distinct].to_numpy(dtype=np.float64))
    # prompts x distinct levels (the same prompts at every level), for the relative steps and their bootstrap
    loss_by_level = lsub.pivot_table(index="prompt", columns="S", values="loss")[distinct].to_numpy(dtype=np.float64)
    id_by_level = np.stack([pk.loc[pk["S"] == S, "ID"].to_numpy(dtype=np.float64) for S in distinct], axis=1)
    checks = [
        stats.Check(
            f"{name}: loss rises with S (Spearman)",
            rho_loss.effect,
            rho_loss.p_value,
            MIN_RANK_RISE[0],
            rho_loss.n,
            rho_loss.se,
            min_effect_source=MIN_RANK_RISE[1],
        ),
        stats.Check(
            f"{name}: peak ID rises with S (Spearman)",
            rho_id.effect,
            rho_id.p_value,
            MIN_RANK_RISE[0],
            rho_id.n,
            rho_id.se,
            min_effect_source=MIN_RANK_RISE[1],
        ),
    ]
    if len(distinct) > 1:
        checks += [
            stats.Check(
                f"{name}: mean {label} rises at every step between levels (relative to S={distinct[0]})",
                _smallest_step(values), None, MIN_STEP[0], len(distinct),
                _prompt_bootstrap(values, _smallest_step), min_effect_source=MIN_STEP[1],
            )
            for label, values in (("loss", loss_by_level), ("peak ID", id_by_level))
        ]  # fmt: skip
    row = {
        "model": name,
        "rho(S, loss)": rho_loss.statistic,
        "p loss": rho_loss.p_value,
        "decreases in mean loss": int((steps_loss < 0).sum()),
        "rho(S, peak ID)": rho_id.statistic,
        "p peak ID": rho_id.p_value,
        "decreases in mean peak ID": int((steps_id < 0).sum()),
    }
    return checks, row


def check_claim3(geometry: pd.DataFrame, alpha: float = 0.01) -> ClaimCheck:
    """Claim 3: shuffled prompts have a higher mean cosine similarity in the late layers (chapter 4).

    One check per model: the per-prompt mean cosine averaged over the
    last third of the layers (at least one), highest shuffle level against the
    lowest; effect = difference of the means, minimum :data:`MIN_COSINE_GAP`; one-sided Wilcoxon
    signed-rank test over prompts. Holm across models; verdict from
    :func:`~embgeo_utils.core.stats.verdict`.

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, prompt, layer, cos_mean``).
        alpha: significance level.

    Returns:
        A :class:`ClaimCheck`; its value is the smallest difference over models.
    """
    _require(geometry, ["model", "S", "prompt", "layer", "cos_mean"], "geometry")
    lo, hi = _levels(geometry, need_two=True)
    checks, rows = [], []
    for name in dict.fromkeys(geometry["model"]):
        L = int(geometry.loc[geometry["model"] == name, "layer"].max())
        late = [layer for layer in range(1, L + 1) if layer > L - max(1, L // 3)]
        cos_lo, cos_hi = (
            _per_prompt(geometry, name, lo, "cos_mean", late),
            _per_prompt(geometry, name, hi, "cos_mean", late),
        )
        test = stats.wilcoxon(cos_hi, cos_lo)
        diff = float(cos_hi.mean() - cos_lo.mean())
        checks.append(
            stats.Check(
                f"{name}: mean cosine of layers {late[0]}-{late[-1]}, S={hi} > S={lo}",
                diff,
                test.p_value,
                MIN_COSINE_GAP[0],
                test.n,
                test.se,
                min_effect_source=MIN_COSINE_GAP[1],
            )
        )
        rows.append(
            {
                "model": name,
                "late layers": f"{late[0]}-{late[-1]}",
                f"cos S={lo}": cos_lo.mean(),
                f"cos S={hi}": cos_hi.mean(),
                "difference": diff,
                "p": test.p_value,
            }
        )
    return _claim(
        3,
        checks,
        rows,
        alpha,
        f"min over models of mean cosine difference S={hi} - S={lo}, last third of layers",
        min(r["difference"] for r in rows),
        "no difference (one-sided Wilcoxon over prompts, Holm)",
    )


def check_claim4(geometry: pd.DataFrame, alpha: float = 0.01, k: int = 1, window: int = 2) -> ClaimCheck:
    """Claim 4: the neighbour overlap chi_k is lower for shuffled prompts near the ID peak (chapter 4).

    One check per model: the per-prompt ``chi_k`` averaged over the
    transitions ``l -> l + 1`` for ``l`` within ``window`` layers of the peak of
    the lowest level's mean ID profile, lowest shuffle level against the
    highest; effect = ``chi_k(lowest) - chi_k(highest)`` (positive when the
    shuffled overlap is lower), minimum :data:`MIN_OVERLAP_DROP`; one-sided Wilcoxon signed-rank test
    over prompts. Holm across models; verdict from :func:`~embgeo_utils.core.stats.verdict`.

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, prompt, layer, ID, chi_<k>``).
        alpha: significance level.
        k: neighbourhood size (1 in the ledger).
        window: layers on either side of the peak.

    Returns:
        A :class:`ClaimCheck`; its value is the largest ``chi_k(highest) - chi_k(lowest)`` over models.
    """
    chi = f"chi_{k}"
    _require(geometry, ["model", "S", "prompt", "layer", "ID", chi], "geometry")
    lo, hi = _levels(geometry, need_two=True)
    checks, rows = [], []
    for name in dict.fromkeys(geometry["model"]):
        L = int(geometry.loc[geometry["model"] == name, "layer"].max())
        l_star = _peak_layer(geometry, name, lo)
        near = [layer for layer in range(l_star - window, l_star + window + 1) if 1 <= layer <= L - 1]
        if not near:
            raise EmbgeoInputError(f"{name} has a single layer: there is no transition l -> l + 1 to compare.")
        chi_lo, chi_hi = _per_prompt(geometry, name, lo, chi, near), _per_prompt(geometry, name, hi, chi, near)
        test = stats.wilcoxon(chi_lo, chi_hi)
        checks.append(
            stats.Check(
                f"{name}: {chi} of layers {near[0]}-{near[-1]}, S={hi} < S={lo}",
                float(chi_lo.mean() - chi_hi.mean()),
                test.p_value,
                MIN_OVERLAP_DROP[0],
                test.n,
                test.se,
                min_effect_source=MIN_OVERLAP_DROP[1],
            )
        )
        rows.append(
            {
                "model": name,
                "layers l (l→l+1)": f"{near[0]}-{near[-1]}",
                f"{chi} S={lo}": chi_lo.mean(),
                f"{chi} S={hi}": chi_hi.mean(),
                "difference": chi_hi.mean() - chi_lo.mean(),
                "p": test.p_value,
            }
        )
    return _claim(
        4,
        checks,
        rows,
        alpha,
        f"max over models of {chi} difference S={hi} - S={lo}, within {window} layers of the ID peak",
        max(r["difference"] for r in rows),
        "no difference (one-sided Wilcoxon over prompts, Holm)",
    )


def check_claim5(geometry: pd.DataFrame, alpha: float = 0.01) -> ClaimCheck:
    """Claim 5: across prompts, a layer's ID correlates positively with the loss (chapter 4).

    One check per model: the largest per-layer Pearson r between ID
    and loss over the prompts at the lowest shuffle level
    (:func:`id_loss_correlation`), effect = r, minimum :data:`MIN_CORRELATION`, p = its one-sided p
    times the number of layers (Bonferroni over layers,
    :func:`strongest_correlation`). The models' p-values are then Holm-adjusted
    together; verdict from :func:`~embgeo_utils.core.stats.verdict`. The correlation
    pooled over all levels (confounded by shuffling) is reported, not tested.

    Args:
        geometry: :attr:`LayerwiseRun.geometry` (columns ``model, S, prompt, layer, ID, loss``).
        alpha: significance level.

    Returns:
        A :class:`ClaimCheck`; its value is the smallest max r over models.
    """
    lo, _ = _levels(geometry, need_two=False)
    best = strongest_correlation(id_loss_correlation(geometry, lo))
    checks, rows = [], []
    for name in dict.fromkeys(geometry["model"]):
        b, pooled = best.loc[(name, f"S = {lo}")], best.loc[(name, "all S pooled")]
        checks.append(
            stats.Check(
                f"{name}: Pearson r(ID, loss) at layer {int(b['layer'])}, S={lo}",
                float(b["r"]),
                float(b["p (Bonferroni)"]),
                MIN_CORRELATION[0],
                int(b["n"]),
                float(1 / np.sqrt(int(b["n"]) - 1)),
                int(b["layers tested"]),
                min_effect_source=MIN_CORRELATION[1],
            )
        )
        rows.append(
            {
                "model": name,
                "best layer": int(b["layer"]),
                "max r": b["r"],
                "p": b["p"],
                "p (Bonferroni)": b["p (Bonferroni)"],
                "prompts": int(b["n"]),
                "pooled max r": pooled["r"],
                "pooled p (Bonferroni)": pooled["p (Bonferroni)"],
            }
        )
    return _claim(
        5,
        checks,
        rows,
        alpha,
        f"min over models of the max per-layer Pearson r(ID, loss), S={lo}",
        min(r["max r"] for r in rows),
        "r <= 0 (one-sided Pearson test, Bonferroni over layers, Holm)",
    )


def check_claims(run: LayerwiseRun, alpha: float = 0.01) -> list[ClaimCheck]:
    """Claims 1-5 of the ledger on one run (chapter 4); see :func:`check_claim1` ... :func:`check_claim5`.

    Each claim's checks are Holm-adjusted together and judged by
    :func:`~embgeo_utils.core.stats.verdict` at ``alpha``.
    """
    if not isinstance(run, LayerwiseRun):
        raise EmbgeoInputError(f"run must be the LayerwiseRun of run_layerwise, got {type(run).__name__}.")
    return [
        check_claim1(run.geometry, alpha),
        check_claim2(run.geometry, run.losses, run.n_tokens, alpha),
        check_claim3(run.geometry, alpha),
        check_claim4(run.geometry, alpha),
        check_claim5(run.geometry, alpha),
    ]


def claims_summary(claims: Sequence[ClaimCheck], peaks: pd.DataFrame) -> str:
    """The chapter's summary in markdown: each verdict and where it holds, the peaks, the correlations (chapter 4).

    Args:
        claims: :func:`check_claims`.
        peaks: :func:`id_peaks`.
    """

    by_number = {c.number: c for c in claims}
    lines = []
    for c in claims:
        passed = ", ".join(c.table.index[c.table["holds"].astype(bool)]) or "none"
        lines.append(f"- **Claim {c.number}** ({CLAIMS[c.number][0]}): *{c.verdict.verdict}* — holds in {passed}.")
    levels = sorted({int(s) for s in peaks.index.get_level_values("S")})
    lo, hi = levels[0], levels[-1]
    if 1 in by_number:
        c1 = by_number[1].table
        lines.append(
            "- The ID peak sits at relative depth "
            + ", ".join(f"{r['peak layer'] / r['layers']:.2f} ({m})" for m, r in c1.iterrows())
            + f" for S = {lo}; at S = {hi} it moves to layer "
            + ", ".join(f"{int(peaks.loc[(m, hi), 'peak layer'])} ({m})" for m in c1.index)
            + "."
        )
    if 5 in by_number:
        c5 = by_number[5].table
        lines.append(
            f"- ID–loss correlation at S = {lo}: max r "
            + ", ".join(
                f"{r['max r']:.2f} (layer {r['best layer']}, Bonferroni p {r['p (Bonferroni)']:.3g}, {m})"
                for m, r in c5.iterrows()
            )
            + "; pooled over S (confounded by shuffling): "
            + ", ".join(f"{r['pooled max r']:.2f}" for _, r in c5.iterrows())
            + "."
        )
    return "\n".join(lines)


def layer_profile_table(geometry: Any, y: str) -> pd.DataFrame:
    """Mean and standard error of ``y`` over prompts, per model, shuffle level and layer (chapter 4's profiles).

    Args:
        geometry: ``LayerwiseRun.geometry`` (columns ``model, S, depth`` and ``y``).
        y: the column to summarise, e.g. ``"ID"``.

    Returns:
        One row per model, level and depth: ``model``, ``S``, ``depth``, ``mean``, ``se`` (0 with one prompt).
    """
    need_columns(geometry, ["model", "S", "depth", y], "ch04_layerwise_geometry.run_layerwise")
    grouped = geometry.groupby(["model", "S", "depth"], sort=False)[y]
    table = grouped.agg(["mean", "std", "count"]).reset_index()
    table["se"] = (table["std"] / np.sqrt(table["count"])).fillna(0.0)
    return table.drop(columns=["std", "count"])


def plot_layer_profiles(geometry: Any, y: str, ylabel: str, title: str, show: bool = True) -> Any:
    """One panel per model: ``y`` against relative depth, one line per shuffle level, ± one standard error (chapter 4).

    At most two panels sit side by side. With ``show`` the figure is displayed at once, then its interactive
    version (:func:`interactive_layer_profiles`).

    Args:
        geometry: ``LayerwiseRun.geometry`` (columns ``model, S, depth`` and ``y``).
        y: the column to plot, e.g. ``"ID"``, ``"chi_1"``, ``"cos_mean"``.
        ylabel: its axis label, with units.
        title: the figure's title.
        show: show the figure now (inline), so that it comes before the cell's table.

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    need_columns(geometry, ["model", "S", "depth", y], "ch04_layerwise_geometry.run_layerwise")
    grid = sns.relplot(
        data=geometry,
        x="depth",
        y=y,
        hue="S",
        col="model",
        col_wrap=MAX_PANELS_ACROSS,
        kind="line",
        errorbar="se",
        palette="viridis",
        height=3.2,
        aspect=1.1,
        facet_kws={"sharey": False},
    )
    grid.set_axis_labels("relative depth (layer / number of layers)", ylabel)
    grid.set_titles("{col_name}")
    fig = finish_axes(grid.figure, title, False)
    if show:
        interactive.show(fig, interactive_layer_profiles(geometry, y, ylabel, title))
    return fig


def interactive_layer_profiles(geometry: Any, y: str, ylabel: str, title: str) -> interactive.InteractiveFigure:
    """Chapter 4: :func:`plot_layer_profiles` as an interactive figure (hover a point for its layer and value).

    Lines are the mean over prompts (:func:`layer_profile_table`), bands ± one standard error.
    """
    table = layer_profile_table(geometry, y)
    table = table.assign(low=table["mean"] - table["se"], high=table["mean"] + table["se"])
    return interactive.line_panels(
        table, "depth", "mean", "S", "model", title, "relative depth", ylabel, band=("low", "high"),
        color_title="shuffle level S",
    )  # fmt: skip


def plot_gride_scale_curves(curves: Any, show: bool = True) -> Any:
    """GRIDE ID against the rank ``n2`` (log scale) at the peak layer, per model and shuffle level (chapter 4).

    Args:
        curves: ``LayerwiseRun.curves`` (columns ``model, S, n2, ID``).
        show: show the figure now.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    need_columns(curves, ["model", "S", "n2", "ID"], "ch04_layerwise_geometry.run_layerwise")
    levels = sorted(curves["S"].unique())
    palette = {s: plt.cm.viridis(i / max(1, len(levels) - 1)) for i, s in enumerate(levels)}
    grid = sns.relplot(
        data=curves,
        x="n2",
        y="ID",
        hue="S",
        col="model",
        col_wrap=MAX_PANELS_ACROSS,
        kind="line",
        errorbar="se",
        marker="o",
        palette=palette,
        height=3.2,
        aspect=1.1,
        facet_kws={"sharey": False},
    )
    for ax in grid.axes.flat:
        ax.set_xscale("log", base=2)
    grid.set_axis_labels("GRIDE rank n2 (neighbours, log scale)", "GRIDE ID (dimensions)")
    grid.set_titles("{col_name}")
    title = "GRIDE scale curve at the peak layer, " + " and ".join(f"S = {s}" for s in levels)
    return finish_axes(grid.figure, title, show)


def plot_loss_by_shuffle_level(losses: Any, show: bool = True) -> Any:
    """Mean next-token loss (± one standard error) against the shuffle level, one colour per model (chapter 4).

    Args:
        losses: ``LayerwiseRun.losses`` (columns ``model, S, loss``).
        show: show the figure now.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    need_columns(losses, ["model", "S", "loss"], "ch04_layerwise_geometry.run_layerwise")
    names = list(dict.fromkeys(losses["model"]))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.pointplot(
        data=losses,
        x="S",
        y="loss",
        hue="model",
        errorbar="se",
        dodge=0.3 if len(names) > 1 else False,
        palette=model_colors(names),
        ax=ax,
    )
    ax.set_xlabel("shuffle level S (K = 4^S blocks)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title("Loss rises with the shuffle level")
    if show:
        plt.show()
    return fig


def plot_id_loss_correlation_by_layer(corr: Any, show: bool = True) -> Any:
    """Pearson r(ID, loss) across prompts against relative depth, one panel per model (chapter 4).

    Args:
        corr: :func:`id_loss_correlation` (columns ``model, prompts, depth, r``).
        show: show the figure now.

    Returns:
        The matplotlib figure.
    """
    import seaborn as sns

    need_columns(corr, ["model", "prompts", "depth", "r"], "ch04_layerwise_geometry.id_loss_correlation")
    grid = sns.relplot(
        data=corr,
        x="depth",
        y="r",
        hue="prompts",
        col="model",
        col_wrap=MAX_PANELS_ACROSS,
        kind="line",
        marker="o",
        height=3.2,
        aspect=1.1,
    )
    for ax in grid.axes.flat:
        ax.axhline(0, color="grey", lw=0.8)
    grid.set_axis_labels("relative depth (layer / number of layers)", "Pearson r(ID, loss) across prompts")
    grid.set_titles("{col_name}")
    return finish_axes(grid.figure, "Correlation of the layer's ID with the prompt's loss", show)
