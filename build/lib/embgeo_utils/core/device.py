"""Device resolution shared by every chapter.

One resolver for the whole book: ``get_device("auto")`` picks CUDA when a GPU is
visible, else the CPU; the environment variable ``EMBGEO_DEVICE`` overrides the
automatic choice (for example ``EMBGEO_DEVICE=cpu`` on a machine with a GPU).
"""

from __future__ import annotations

import os

import torch

from .errors import EmbgeoInputError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "NUMPY_CHUNK_BYTES",
    "chunk_budget",
    "chunk_rows",
    "get_device",
]


def get_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device that heavy functions should run on.

    Args:
        device: ``"auto"`` (or ``None``) to choose CUDA when available and the CPU
            otherwise, honouring ``EMBGEO_DEVICE``; any other string or
            ``torch.device`` is used as given.

    Raises:
        EmbgeoInputError: if the name is not a device torch knows, or CUDA is asked for
            on a machine without it.
    """
    if isinstance(device, torch.device):
        resolved = device
    else:
        name = (device or "auto").strip().lower()
        if name == "auto":
            name = os.environ.get("EMBGEO_DEVICE", "").strip().lower() or (
                "cuda" if torch.cuda.is_available() else "cpu"
            )
        try:
            resolved = torch.device(name)
        except RuntimeError as exc:
            raise EmbgeoInputError(f"Unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EmbgeoInputError(
            f"Device {str(resolved)!r} was requested but no CUDA GPU is visible; "
            "use device='cpu' or unset EMBGEO_DEVICE."
        )
    return resolved


#: Default bytes per chunk on the CPU (and the cap on a GPU): one block of a distance matrix, a
#: batch of neighbourhoods. ``EMBGEO_CHUNK_MB`` overrides it.
DEFAULT_CHUNK_BYTES = 1 << 28


#: Bytes per chunk of the float64 numpy loops that draw permutations in blocks (32 MiB: fits the cache
#: hierarchy better than big blocks; the draws do not depend on it).
NUMPY_CHUNK_BYTES = 1 << 25


def chunk_budget(device: str | torch.device | None = None) -> int:
    """Bytes that one chunk of a batched kernel may take on ``device`` (every chapter).

    ``EMBGEO_CHUNK_MB`` sets the budget in MiB. Otherwise the CPU gets
    :data:`DEFAULT_CHUNK_BYTES` (256 MiB) and a CUDA device a quarter of its free
    memory, at most four times that.
    """
    env = os.environ.get("EMBGEO_CHUNK_MB", "").strip()
    if env:
        try:
            mib = float(env)
        except ValueError:
            mib = -1.0
        if mib <= 0:
            raise EmbgeoInputError(f"EMBGEO_CHUNK_MB must be a positive number of MiB, got {env!r}.")
        return int(mib * (1 << 20))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(dev)
        return int(min(4 * DEFAULT_CHUNK_BYTES, free // 4))
    return DEFAULT_CHUNK_BYTES


def chunk_rows(
    bytes_per_row: int,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    max_rows: int | None = None,
    budget_bytes: int | None = None,
) -> int:
    """Rows per chunk so that one chunk fits the memory budget (every chapter).

    Args:
        bytes_per_row: memory one row of the chunk needs (all its buffers).
        device: where the chunk is computed (sets the default budget).
        chunk_size: the caller's explicit choice; returned as is when given.
        max_rows: upper bound (e.g. the number of rows there are).
        budget_bytes: override of :func:`chunk_budget`.

    Raises:
        EmbgeoInputError: if ``chunk_size`` is given and is not a positive integer.
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
            raise EmbgeoInputError(f"chunk_size must be a positive number of rows, got {chunk_size!r}.")
        return int(chunk_size)
    budget = chunk_budget(device) if budget_bytes is None else int(budget_bytes)
    rows = max(1, budget // max(1, int(bytes_per_row)))
    return int(min(rows, max_rows)) if max_rows is not None else int(rows)
