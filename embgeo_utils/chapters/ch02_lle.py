"""Chapter 2, local geometry by LLE: do the LLE weights of one model rebuild another model's embeddings?

Each token is written as an affine combination of its ``k`` nearest neighbours in model A (weights summing to 1,
the first step of LLE, :func:`embgeo_utils.geometry.lle.lle_weights`), and the same neighbours and weights are
then applied to model B's vectors of the same tokens. Baselines: B's own weights (the floor), uniform weights, and
A's weights on random neighbours (the null). The stages: :func:`compare_pairs` measures every pair
(:class:`LLETransfer`) from its sampled clouds (:func:`pair_clouds`) and their errors under each weighting
(:func:`pair_errors`), :func:`check_claim7` turns the errors into claim 7's verdict, and the two figures show them.

References:
    Roweis, S. T. and Saul, L. K. (2000). Nonlinear Dimensionality Reduction by
    Locally Linear Embedding. Science 290(5500), 2323-2326.
    Lee, Weber, Viegas, Wattenberg (2025). Shared Global and Local Geometry of
    Language Model Embeddings. arXiv:2503.21073.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core import stats
from ..core.device import get_device
from ..core.errors import EmbgeoInputError
from ..core.validation import check_pairs
from ..geometry.lle import lle_weights, random_neighbors, reconstruction_error, uniform_weights
from ..geometry.neighbors import shared_neighbor_counts
from ..lm.vocab import SharedVocabulary
from .style import COLUMN_INCHES, figure_axes

__all__ = [
    "CHAPTER",
    "CONDITIONS",
    "LLETransfer",
    "PairErrors",
    "Parameters",
    "TITLE",
    "check_claim7",
    "compare_pairs",
    "pair_clouds",
    "pair_errors",
    "plot_lle_errors",
    "plot_neighbour_overlap",
]


CHAPTER = "ch02_lle"
TITLE = "Local geometry by LLE"


@dataclass(frozen=True)
class Parameters:
    """Chapter 2's parameters: the fields of its cell tagged ``parameters`` (defaults and allowed values are there)."""

    model_pairs: list[list[str]]
    n_tokens: int
    k: int
    reg: float
    center: bool
    alpha: float
    seed: int
    device: str

    def models(self) -> list[str]:
        """Every model the pairs name, in order."""
        return [name for pair in self.model_pairs for name in pair]


@dataclass(frozen=True)
class LLETransfer:
    """What :func:`compare_pairs` measured (chapter 2).

    Attributes:
        summary: one row per pair: ``pair``, ``A``, ``B``, ``shared vocabulary``, ``tokens``, ``median <weighting>``
            for every weighting of :data:`CONDITIONS`, ``transfer / null (median ratio)``, ``fraction transfer <
            null``, ``Wilcoxon p (transfer < null)``, ``fraction transfer < uniform``, ``Wilcoxon p (transfer <
            uniform)``, ``neighbour overlap`` and its chance level ``overlap chance k/(n-1)``.
        errors: one row per pair, weighting and token: ``pair``, ``token``, ``weights``, ``relative error``.
    """

    summary: pd.DataFrame
    errors: pd.DataFrame


#: The weightings chapter 2 compares in model B, in the order of its figures and tables.
CONDITIONS = (
    "A on A (fit)",
    "B's own weights (floor)",
    "A's weights transferred",
    "uniform on A's neighbours",
    "A's weights, random neighbours (null)",
)


_FIT, _FLOOR, _TRANSFER, _UNIFORM, _NULL = CONDITIONS


@dataclass(frozen=True)
class PairErrors:
    """What :func:`pair_errors` measured for one pair (chapter 2).

    Attributes:
        errors: the relative reconstruction error of every sampled token, ``(n,)`` per weighting of
            :data:`CONDITIONS` (in that order).
        neighbours_a: A's ``k`` nearest neighbours of every token, ``(n, k)`` row indices; neighbours_b: B's.
    """

    errors: dict[str, np.ndarray]
    neighbours_a: np.ndarray
    neighbours_b: np.ndarray


def pair_clouds(
    tables: Mapping[str, np.ndarray | torch.Tensor], pair: tuple[str, str], shared: SharedVocabulary, p: Parameters
) -> tuple[np.ndarray, np.ndarray]:
    """Chapter 2: the clouds of one pair, ``p.n_tokens`` shared tokens drawn with ``p.seed``, in float64.

    Row ``i`` of both is the same token (``shared.sample(n_tokens, seed)``); each cloud is mean-centred when
    ``p.center``.
    """
    sample = shared.sample(p.n_tokens, seed=p.seed)
    X = np.asarray(tables[pair[0]][sample.ids_a], dtype=np.float64)
    Y = np.asarray(tables[pair[1]][sample.ids_b], dtype=np.float64)
    if p.center:
        X, Y = X - X.mean(0), Y - Y.mean(0)
    return X, Y


def pair_errors(X: np.ndarray, Y: np.ndarray, p: Parameters) -> PairErrors:
    """Chapter 2: the LLE reconstruction errors of one pair's clouds under every weighting of :data:`CONDITIONS`.

    A's Euclidean ``p.k`` nearest neighbours and LLE weights (:func:`lle_weights`, ``p.reg``) are applied to B's
    vectors; the relative error of :func:`reconstruction_error` is measured for A's fit in A, B's own weights (the
    floor), A's weights transferred, uniform weights on A's neighbours, and A's weights on random neighbours
    (:func:`random_neighbors` with ``p.seed``; the null), on ``p.device``.
    """
    dev, k, reg = get_device(p.device), p.k, p.reg
    idx_a, w_a = lle_weights(X, k, reg=reg, device=dev)
    idx_b, w_b = lle_weights(Y, k, reg=reg, device=dev)
    rnd = random_neighbors(len(X), k, seed=p.seed)
    err = {
        _FIT: reconstruction_error(X, idx_a, w_a, device=dev),
        _FLOOR: reconstruction_error(Y, idx_b, w_b, device=dev),
        _TRANSFER: reconstruction_error(Y, idx_a, w_a, device=dev),
        _UNIFORM: reconstruction_error(Y, idx_a, uniform_weights(idx_a), device=dev),
        _NULL: reconstruction_error(Y, rnd, w_a, device=dev),
    }
    return PairErrors(err, idx_a, idx_b)


def _summary_row(a: str, b: str, vocabulary: int, measured: PairErrors, k: int) -> dict[str, Any]:
    """One row of :attr:`LLETransfer.summary` (chapter 2): medians, the tests against the null and uniform, overlap."""
    err = measured.errors
    n = len(err[_TRANSFER])
    transfer, null = err[_TRANSFER], err[_NULL]
    wil = stats.wilcoxon(transfer, null, alternative="less")
    wil_u = stats.wilcoxon(transfer, err[_UNIFORM], alternative="less")
    shared_nb = shared_neighbor_counts(measured.neighbours_a, measured.neighbours_b)
    return {
        "pair": f"{a} → {b}",
        "A": a,
        "B": b,
        "shared vocabulary": vocabulary,
        "tokens": n,
        **{f"median {name}": float(np.median(e)) for name, e in err.items()},
        "transfer / null (median ratio)": float(np.median(transfer / null)),
        "fraction transfer < null": float((transfer < null).mean()),
        "Wilcoxon p (transfer < null)": wil.p_value,
        "fraction transfer < uniform": float((transfer < err[_UNIFORM]).mean()),
        "Wilcoxon p (transfer < uniform)": wil_u.p_value,
        "neighbour overlap": float(shared_nb.mean() / k),
        "overlap chance k/(n-1)": k / (n - 1),
    }


def compare_pairs(
    tables: Mapping[str, np.ndarray | torch.Tensor],
    shared: Mapping[tuple[str, str], SharedVocabulary],
    p: Parameters,
) -> LLETransfer:
    """Chapter 2: LLE transfer from A to B for every pair, against the floor, uniform weights and the null.

    For each pair ``(A, B)`` of ``shared``: the sampled clouds (:func:`pair_clouds`), their errors under every
    weighting (:func:`pair_errors`), and one summary row of medians, tests and neighbour-set overlap.

    Returns:
        An :class:`LLETransfer`; its p-values are one-sided Wilcoxon tests (:func:`embgeo_utils.core.stats.wilcoxon`).

    Raises:
        EmbgeoInputError: no pair, or a model of a pair without an embedding table.
    """
    check_pairs(
        shared, tables, "No model pair has both models installed; install at least smollm2-135m and gemma3-270m."
    )
    per_pair, errors = [], []
    for (a, b), s in shared.items():
        X, Y = pair_clouds(tables, (a, b), s, p)
        measured = pair_errors(X, Y, p)
        for name, e in measured.errors.items():
            errors.append(
                pd.DataFrame({"pair": f"{a} → {b}", "token": np.arange(len(X)), "weights": name, "relative error": e})
            )
        per_pair.append(_summary_row(a, b, len(s), measured, p.k))
    return LLETransfer(pd.DataFrame(per_pair), pd.concat(errors, ignore_index=True))


#: Claim 7's smallest effects that count, with where each comes from.
MIN_BEATS_NULL = (
    0.05,
    "practical: A's weights must lower B's relative reconstruction error by at least 0.05 on average against "
    "the random-neighbour null (whose errors are of order 1)",
)
MIN_FAR_BELOW = (
    0.5,
    "the claim's words: 'far below the null' read as a transferred error at most half the null's, token by "
    "token (median ratio <= 0.5)",
)


def _far_below_check(
    pair: str, transfer: np.ndarray, null: np.ndarray, seed: int, what: str = "transfer", control: bool = False
) -> stats.Check:
    """Chapter 2: the median per-token ratio transfer / null lies below one half (a tested check).

    With ``control``, ``transfer`` holds B's own weights' errors: the positive control of :func:`check_claim7`.
    """
    if (null <= 0).any() or (transfer < 0).any():
        raise EmbgeoInputError(f"Pair {pair!r}: errors must be non-negative and the null's positive.")
    ratio = transfer / null
    minimum, source = MIN_FAR_BELOW
    # one-sided Wilcoxon signed-rank test that the per-token log ratio lies below log(1 - minimum)
    test = stats.wilcoxon(np.log(1 - minimum) - np.log(np.maximum(ratio, 1e-300)))
    return stats.Check(
        f"{pair}: median {what} / null <= {1 - minimum:g}" + (" (positive control)" if control else ""),
        1.0 - float(np.median(ratio)),
        test.p_value,
        minimum,
        test.n,
        stats.bootstrap_se(ratio, np.median, seed=seed),
        min_effect_source=source,
        control=control,
    )


def check_claim7(errors: pd.DataFrame, alpha: float = 0.01, correction: str = "holm", seed: int = 0) -> stats.Verdict:
    """Chapter 2: the verdict of claim 7, LLE weights transfer across models with error far below the null.

    Two tested checks per model pair (``errors`` as returned by :func:`compare_pairs`):

    * ``beats the null``: A's transferred weights rebuild B's tokens better than A's weights on random
      neighbours, token by token: one-sided Wilcoxon signed-rank test of the paired errors; effect = mean of
      ``null - transfer`` over tokens, minimum :data:`MIN_BEATS_NULL`;
    * ``far below``: effect = ``1 - median(transfer / null)`` over tokens, minimum :data:`MIN_FAR_BELOW` (a
      median ratio of at most one half); one-sided Wilcoxon signed-rank test that the per-token log ratio lies
      below ``log(1/2)``; standard error by bootstrap over tokens (seeded), so the check can be shown absent.

    Positive control, where ``errors`` has B's own weights (``"B's own weights (floor)"``): the same far-below check
    for them. If the best local fit in B is not "far below" the null by this measure, the measure cannot show the
    claim for a transfer either, and the verdict is *inconclusive (positive control failed)*.

    The p-values of all pairs are adjusted together (Holm by default) and the verdict comes from
    :func:`embgeo_utils.core.stats.verdict`.

    Raises:
        EmbgeoInputError: missing columns, no rows, a pair without both weightings, or negative errors.
    """
    need = ["pair", "token", "weights", "relative error"]
    missing = [c for c in need if c not in errors.columns]
    if errors.empty or missing:
        raise EmbgeoInputError(
            f"check_claim7 needs the errors table of compare_pairs (missing columns: {missing or 'none, but no rows'})."
        )
    checks = []
    minimum, source = MIN_BEATS_NULL
    for pair, group in errors.groupby("pair", sort=False):
        wide = group.pivot(index="token", columns="weights", values="relative error")
        if _TRANSFER not in wide or _NULL not in wide:
            raise EmbgeoInputError(f"Pair {pair!r} lacks the {_TRANSFER!r} or {_NULL!r} errors.")
        transfer, null = wide[_TRANSFER].to_numpy(), wide[_NULL].to_numpy()
        test = stats.wilcoxon(null, transfer, alternative="greater")
        name = f"{pair}: transfer beats the null (Wilcoxon)"
        checks.append(stats.Check(name, test.effect, test.p_value, minimum, test.n, test.se, min_effect_source=source))
        checks.append(_far_below_check(str(pair), transfer, null, seed))
        if _FLOOR in wide:
            checks.append(_far_below_check(str(pair), wide[_FLOOR].to_numpy(), null, seed, "B's own weights", True))
    return stats.verdict(checks, alpha=alpha, correction=correction)


def plot_lle_errors(errors: Any, k: int, n_tokens: int, order: Sequence[str] | None = None, ax: Any = None) -> Any:
    """Chapter 2: box plots of the relative reconstruction error in B, per pair and weighting (log scale).

    Args:
        errors: tidy DataFrame with ``pair``, ``weights``, ``relative error`` (from ``lle.compare_pairs``).
        order: the weightings in legend order (default: as they appear).
    """
    import seaborn as sns

    fig, ax = figure_axes((COLUMN_INCHES, 4.2), ax)
    sns.boxplot(
        data=errors,
        x="pair",
        y="relative error",
        hue="weights",
        hue_order=list(order) if order is not None else None,
        showfliers=False,
        ax=ax,
    )
    ax.set_yscale("log")
    ax.set_xlabel("model A → model B")
    ax.set_ylabel("relative reconstruction error ‖y − Σ w y‖² / ‖y‖²")
    ax.set_title(f"LLE reconstruction in B, k = {k}, {n_tokens} shared tokens")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_neighbour_overlap(summary: Any, k: int, ax: Any = None) -> Any:
    """Chapter 2: bars of the neighbour-set overlap of A and B per pair, beside its chance level."""
    import seaborn as sns

    plot = summary.melt(
        id_vars="pair", value_vars=["neighbour overlap", "overlap chance k/(n-1)"], var_name="", value_name="overlap"
    )
    fig, ax = figure_axes((7, 3.4), ax)
    sns.barplot(data=plot, y="pair", x="overlap", hue="", ax=ax)
    ax.set_xlabel(f"mean fraction of shared {k}-nearest neighbours")
    ax.set_ylabel("model pair (A → B)")
    ax.set_title("Neighbour-set overlap between A and B")
    return fig
