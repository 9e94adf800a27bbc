"""Device resolution shared by every chapter.

One resolver for the whole book: ``get_device("auto")`` picks CUDA when a GPU is
visible, else the CPU; the environment variable ``EMBGEO_DEVICE`` overrides the
automatic choice (for example ``EMBGEO_DEVICE=cpu`` on a machine with a GPU).
"""

from __future__ import annotations

import os

import torch

__all__ = ["get_device"]


def get_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device that heavy functions should run on.

    Args:
        device: ``"auto"`` (or ``None``) to choose CUDA when available and the CPU
            otherwise, honouring ``EMBGEO_DEVICE``; any other string or
            ``torch.device`` is used as given.

    Raises:
        ValueError: if the name is not a device torch knows, or CUDA is asked for
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
            raise ValueError(
                f"Unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'."
            ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"Device {str(resolved)!r} was requested but no CUDA GPU is visible; "
            "use device='cpu' or unset EMBGEO_DEVICE."
        )
    return resolved
