"""Input checks shared by every estimator: clear messages instead of deep tracebacks."""

from __future__ import annotations

from collections.abc import Container, Iterable

import numpy as np
import torch

from .errors import EmbgeoInputError

__all__ = [
    "as_matrix",
    "check_pairs",
]


def as_matrix(
    X: np.ndarray | torch.Tensor,
    name: str = "X",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    min_rows: int = 2,
) -> torch.Tensor:
    """Return ``X`` as a finite 2-D torch tensor on ``device``.

    Raises:
        EmbgeoInputError: if ``X`` is not 2-D, has too few rows, or holds NaN/inf.
    """
    tensor = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)
    if tensor.ndim != 2:
        raise EmbgeoInputError(f"{name} must be a 2-D array (points x features), got shape {tuple(tensor.shape)}.")
    if tensor.shape[0] < min_rows:
        raise EmbgeoInputError(f"{name} needs at least {min_rows} points, got {tensor.shape[0]}.")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
        raise EmbgeoInputError(f"{name} holds NaN or infinite values in {bad} rows; drop or fix them first.")
    return tensor.to(device=device, dtype=dtype)


def check_pairs(pairs: Iterable[tuple[str, str]], tables: Container[str], empty: str | None = None) -> None:
    """Check that every model of every pair has a table (chapters 1 and 2).

    Args:
        pairs: ``(model A, model B)`` pairs.
        tables: the models that have an embedding table.
        empty: the message to raise when ``pairs`` is empty (``None``: an empty ``pairs`` is accepted).

    Raises:
        EmbgeoInputError: no pair (when ``empty`` is given), or a model without a table.
    """
    pairs = list(pairs)
    if not pairs and empty is not None:
        raise EmbgeoInputError(empty)
    missing = sorted({m for pair in pairs for m in pair if m not in tables})
    if missing:
        raise EmbgeoInputError(f"No embedding table for {missing}; pass one table per model of the pairs.")
