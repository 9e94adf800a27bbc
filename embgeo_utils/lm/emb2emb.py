"""EMB2EMB: linear maps between two models' spaces that carry steering vectors across (chapter 6).

Lee et al. (2025) fit a linear map from model A's token embeddings to model B's
on the vocabulary the two share, and use it to move a steering vector found in A
into B. :func:`fit_linear_map` is the closed-form ridge least-squares fit (float64)
with a held-out R²; :func:`embedding_pairs` gives the paired rows (input
embeddings or unembeddings of the shared vocabulary); :func:`residual_pairs` gives
paired residual activations of the same tokens, the stronger alternative of later
work (affine maps between residual streams).

References:
    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared global and local
    geometry of language model embeddings, arXiv:2503.21073.

    N. Bello et al. (2025), arXiv:2506.00653; J. Chen et al. (2025), arXiv:2506.06609.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..core.cache import cached
from ..core.errors import EmbgeoInputError
from .alignment import align_positions
from .models import LoadedModel
from .steering import token_states
from .vocab import shared_vocabulary

__all__ = [
    "LinearMap",
    "MIN_SHARED_ROWS",
    "clean_rows",
    "embedding_pairs",
    "fit_linear_map",
    "matching_layer",
    "residual_pairs",
]


#: Fewest shared rows that a map between widths ``d_a -> d_b`` is fitted on.
MIN_SHARED_ROWS = 1000


@dataclass(frozen=True)
class LinearMap:
    """A fitted map ``y ≈ (x - mean_a) @ matrix + mean_b`` (chapter 6).

    Attributes:
        matrix: ``(d_a, d_b)`` float64.
        mean_a, mean_b: centring offsets (zeros when fitted uncentred).
        r2_heldout: R² of B's held-out rows predicted from A's (pooled over coordinates).
        n_fit: rows the map was fitted on; n_heldout: rows kept out.
        ridge: the absolute ridge penalty used.
    """

    matrix: torch.Tensor
    mean_a: torch.Tensor
    mean_b: torch.Tensor
    r2_heldout: float
    n_fit: int
    n_heldout: int
    ridge: float

    def apply(self, v: Any) -> torch.Tensor:
        """Map a direction (a steering vector) from A to B: ``v @ matrix``, no offset."""
        t = torch.as_tensor(v, dtype=torch.float64)
        if t.shape[-1] != self.matrix.shape[0]:
            raise EmbgeoInputError(f"The vector has width {t.shape[-1]}; the map expects {self.matrix.shape[0]}.")
        return (t @ self.matrix).float()

    def predict(self, x: Any) -> torch.Tensor:
        """Map points (rows) from A to B, offsets included."""
        t = torch.as_tensor(x, dtype=torch.float64)
        return (t - self.mean_a) @ self.matrix + self.mean_b


def _rows(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64).cpu()
    if t.ndim != 2:
        raise EmbgeoInputError(f"{name} must be 2-D (rows x width), got shape {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise EmbgeoInputError(f"{name} holds NaN or infinite values.")
    return t


def fit_linear_map(
    X_a: Any,
    X_b: Any,
    *,
    ridge: float = 1e-3,
    center: bool = True,
    holdout: float = 0.1,
    seed: int = 0,
    min_rows: int | None = None,
) -> LinearMap:
    """Closed-form ridge least squares from A's rows to B's rows (chapter 6).

    ``matrix = (Xa^T Xa + lam I)^-1 Xa^T Xb`` on the fitting rows, in float64,
    with ``lam = ridge * trace(Xa^T Xa) / d_a`` (the penalty relative to the mean
    eigenvalue, so it does not depend on the scale of A). ``holdout`` of the rows,
    drawn with ``seed``, are left out of the fit and give ``r2_heldout``.

    Raises:
        EmbgeoInputError: mismatched rows, NaN/inf, a negative ridge, or fewer rows
            than ``min_rows`` (default: the wider of the two widths, at least
            :data:`MIN_SHARED_ROWS` when ``holdout`` > 0).
    """
    a, b = _rows(X_a, "X_a"), _rows(X_b, "X_b")
    if a.shape[0] != b.shape[0]:
        raise EmbgeoInputError(f"X_a and X_b must be paired row for row: {a.shape[0]} != {b.shape[0]}.")
    if ridge < 0:
        raise EmbgeoInputError(f"ridge must be >= 0, got {ridge}.")
    if not 0 <= holdout < 1:
        raise EmbgeoInputError(f"holdout must lie in [0, 1), got {holdout}.")
    need = min_rows if min_rows is not None else (max(a.shape[1], b.shape[1], MIN_SHARED_ROWS) if holdout else 2)
    if a.shape[0] < need:
        raise EmbgeoInputError(
            f"Only {a.shape[0]} paired rows to fit a {a.shape[1]} -> {b.shape[1]} map; need at least {need}. "
            "Two models whose shared vocabulary is this small cannot be mapped through embeddings."
        )
    n = a.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    n_out = int(round(holdout * n))
    test, fit = order[:n_out], order[n_out:]
    af, bf = a[fit], b[fit]
    mean_a = af.mean(dim=0) if center else torch.zeros(a.shape[1], dtype=torch.float64)
    mean_b = bf.mean(dim=0) if center else torch.zeros(b.shape[1], dtype=torch.float64)
    ac, bc = af - mean_a, bf - mean_b
    gram = ac.T @ ac
    lam = float(ridge) * float(torch.trace(gram)) / a.shape[1]
    matrix = torch.linalg.solve(gram + lam * torch.eye(a.shape[1], dtype=torch.float64), ac.T @ bc)
    r2 = float("nan")
    if n_out:
        pred = (a[test] - mean_a) @ matrix + mean_b
        sse = float(((b[test] - pred) ** 2).sum())
        sst = float(((b[test] - bf.mean(dim=0)) ** 2).sum())
        r2 = 1 - sse / sst if sst > 0 else float("nan")
    return LinearMap(matrix, mean_a, mean_b, r2, int(fit.size), int(n_out), lam)


def embedding_pairs(
    a: LoadedModel, b: LoadedModel, which: Literal["input", "output"] = "input"
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Rows of the two models' embedding tables for the vocabulary they share (chapter 6).

    ``which="input"`` uses the input embeddings, ``"output"`` the unembeddings (the
    LM head; the same table for tied models). Tokens are paired by id for one
    tokenizer and by normalised string across tokenizers (chapter 1's shared
    vocabulary).

    Returns:
        ``(X_a, X_b, shared)`` float32 CPU tensors and the :class:`~embgeo_utils.lm.vocab.SharedVocabulary`, row for
        row (tokens past either table's rows left out).
    """

    if which not in ("input", "output"):
        raise EmbgeoInputError(f"which must be 'input' or 'output', got {which!r}.")

    def table(m: LoadedModel) -> torch.Tensor:
        layer = m.model.get_input_embeddings() if which == "input" else m.model.get_output_embeddings()
        if layer is None:
            raise EmbgeoInputError(f"{m.info.name} has no {which} embedding table.")
        return layer.weight.detach().float().cpu()

    shared = shared_vocabulary(a.tokenizer, b.tokenizer)
    ta, tb = table(a), table(b)
    ids_a = torch.as_tensor(shared.ids_a)
    ids_b = torch.as_tensor(shared.ids_b)
    keep = (ids_a < ta.shape[0]) & (ids_b < tb.shape[0])
    return ta[ids_a[keep]], tb[ids_b[keep]], shared.subset(np.flatnonzero(keep.numpy()))


def _first_of_each(rows: np.ndarray) -> np.ndarray:
    """Bool mask keeping the first of every group of exactly equal rows."""
    flat = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    keep = np.zeros(len(flat), dtype=bool)
    keep[np.unique(flat, return_index=True)[1]] = True
    return keep


def clean_rows(
    x_a: Any, x_b: Any, ids_a: Any, ids_b: Any, flagged_a: np.ndarray, flagged_b: np.ndarray
) -> tuple[np.ndarray, dict[str, int]]:
    """Rows of the shared vocabulary fit to carry a map: trained in both models, no repeated row (chapter 6).

    Quantized tables hold under-trained tokens whose rows sit together near the table's mean, and exact duplicate
    rows; both are easy to predict and inflate a map's held-out R². A pair is dropped when its token is flagged
    under-trained in A or in B (:func:`~embgeo_utils.lm.undertrained.find_undertrained`); of the pairs left, only the
    first of each group whose A row repeats exactly is kept, then the same for B's rows.

    Args:
        x_a, x_b: the paired rows (:func:`embedding_pairs`).
        ids_a, ids_b: their token ids in A's and B's tables.
        flagged_a, flagged_b: bool per row of A's and B's tables, under-trained.

    Returns:
        ``(keep, counts)``: a bool mask over the pairs and the counts ``pairs``, ``under-trained`` (dropped as
        such), ``duplicates`` (dropped as repeats) and ``kept``.
    """
    a, b = np.asarray(torch.as_tensor(x_a).float()), np.asarray(torch.as_tensor(x_b).float())
    ia, ib = np.asarray(ids_a, dtype=np.int64), np.asarray(ids_b, dtype=np.int64)
    if not (a.shape[0] == b.shape[0] == ia.size == ib.size):
        raise EmbgeoInputError(f"Rows and ids must be paired: {a.shape[0]}, {b.shape[0]}, {ia.size}, {ib.size}.")
    if ia.size and (ia.max() >= len(flagged_a) or ib.max() >= len(flagged_b)):
        raise EmbgeoInputError("A token id lies past its flag array; pass one flag per row of each model's table.")
    keep = ~(np.asarray(flagged_a, dtype=bool)[ia] | np.asarray(flagged_b, dtype=bool)[ib])
    undertrained = int((~keep).sum())
    for rows in (a, b):
        idx = np.flatnonzero(keep)
        keep[idx[~_first_of_each(rows[idx])]] = False
    kept = int(keep.sum())
    return keep, {
        "pairs": int(ia.size),
        "under-trained": undertrained,
        "duplicates": int(ia.size) - undertrained - kept,
        "kept": kept,
    }


def matching_layer(layer_a: int, n_layers_a: int, n_layers_b: int) -> int:
    """B's block at the same relative depth as A's block ``layer_a`` (chapter 6)."""
    if not 1 <= layer_a <= n_layers_a:
        raise EmbgeoInputError(f"layer_a must lie in [1, {n_layers_a}], got {layer_a}.")
    return max(1, min(n_layers_b, round(layer_a / n_layers_a * n_layers_b)))


def residual_pairs(
    a: LoadedModel,
    b: LoadedModel,
    texts: Sequence[str],
    layer_a: int,
    layer_b: int,
    max_tokens: int = 128,
    skip_first: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired residual activations of the same tokens at A's block ``layer_a`` and B's ``layer_b`` (chapter 6).

    Each text is cut to ``max_tokens`` of A's tokens; a position of A is paired
    with the position of B whose character span is the same (every position for
    one tokenizer, as for the two Qwen2.5-Coder models; the positions both
    tokenizers cut alike across tokenizers, as in chapter 5). The first
    ``skip_first`` positions of each text (and BOS) are left out. Activations are
    cached per model, layer and texts.

    Returns:
        ``(rows_a, rows_b)`` float32 CPU tensors, one row per paired token.
    """

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise EmbgeoInputError("residual_pairs needs at least one non-empty text.")
    spans_a, cut = [], []
    for text in texts:
        offs = a.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][:max_tokens]
        spans_a.append([tuple(o) for o in offs])
        cut.append(text[: offs[-1][1]] if offs else text)
    spans_b = [
        [tuple(o) for o in b.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        for t in cut
    ]
    states_a = cached_states(a, cut, layer_a, max_tokens=max_tokens, skip_first=skip_first)
    states_b = cached_states(b, cut, layer_b, max_tokens=10 * max_tokens, skip_first=skip_first)
    rows_a, rows_b = [], []
    for sa, sb, ha, hb in zip(spans_a, spans_b, states_a, states_b):
        pairs = align_positions(sa, sb)
        pairs = pairs[(pairs[:, 0] >= skip_first) & (pairs[:, 1] >= skip_first)] - skip_first
        pairs = pairs[(pairs[:, 0] < ha.shape[0]) & (pairs[:, 1] < hb.shape[0])]
        rows_a.append(ha[pairs[:, 0]])
        rows_b.append(hb[pairs[:, 1]])
    return torch.cat(rows_a), torch.cat(rows_b)


@cached("steering_states", version=1)
def cached_states(
    loaded: LoadedModel, texts: Sequence[str], layer: int, *, max_tokens: int = 128, skip_first: int = 1
) -> list[torch.Tensor]:
    """:func:`~embgeo_utils.lm.steering.token_states`, cached on disk per model, layer and texts (chapter 6)."""
    states = token_states(loaded, texts, layer, max_tokens=max_tokens, skip_first=skip_first)
    return [h.clone() for h in states]
