"""The collectives of data-parallel work under ``torchrun`` (chapters 4 and 5).

The process group is PyTorch's own (:func:`init_from_env` joins it: NCCL on GPUs, gloo on the CPU); nothing here
schedules processes. :func:`rank_and_world`, :func:`barrier`, :func:`all_reduce_sum` and :func:`broadcast_module`
are what :func:`embgeo_utils.lm.sae.train_sae` uses to train data-parallel, and :func:`sharded_hidden_states`
runs a model on prompts ``rank::world`` and gathers the results, so every rank returns the same
:class:`~embgeo_utils.lm.activations.Activations` as one process would. The command line is
:mod:`embgeo_utils.lm.torchrun`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from ..core.errors import EmbgeoInputError
from .activations import Activations, hidden_states, prepare_ids

__all__ = [
    "group_active",
    "all_reduce_sum",
    "barrier",
    "broadcast_module",
    "init_from_env",
    "is_main",
    "rank_and_world",
    "sharded_hidden_states",
]


def group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the current process group; ``(0, 1)`` when none is initialised."""
    import torch.distributed as dist

    if not group_active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on rank 0, or when no process group is initialised (the process that writes caches and reports)."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if group_active():
        dist.barrier()


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment; returns this rank's device.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, gloo otherwise.
        timeout_s: collective timeout.

    Returns:
        ``cuda:LOCAL_RANK`` with NCCL, the CPU with gloo.

    Raises:
        EmbgeoInputError: when the environment lacks ``WORLD_SIZE``/``RANK`` (not started by ``torchrun``).
    """
    import torch.distributed as dist

    if not {"RANK", "WORLD_SIZE"} <= set(os.environ):
        raise EmbgeoInputError(
            "No RANK/WORLD_SIZE in the environment: start this with "
            "`torchrun --nproc_per_node N -m embgeo_utils.lm.torchrun ...`."
        )
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if chosen == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=chosen, timeout=timedelta(seconds=timeout_s))
    return device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op without a process group); returns it."""
    import torch.distributed as dist

    if group_active() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (no-op without a process group)."""
    import torch.distributed as dist

    if not group_active() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)


def sharded_hidden_states(
    loaded: Any,
    ids: Sequence[Sequence[int]] | np.ndarray,
    n_tokens: int | None = None,
    **kwargs: Any,
) -> Any:
    """:func:`~embgeo_utils.lm.activations.hidden_states` with the prompts shared out over ranks (chapters 4 and 5).

    Rank ``r`` runs prompts ``r::world`` (reading and writing the on-disk cache as
    usual, progress shown on rank 0 only); the per-prompt results are gathered
    to every rank and put back in prompt order, so the return value equals a
    single-process call. Without a process group this is ``hidden_states``.
    """

    rank, world = rank_and_world()
    if world == 1:
        return hidden_states(loaded, ids, n_tokens, **kwargs)
    import torch.distributed as dist

    arr = prepare_ids(ids, n_tokens)
    kwargs["progress"] = bool(kwargs.get("progress", True)) and rank == 0
    mine = np.arange(rank, len(arr), world)
    part = hidden_states(loaded, arr[mine], arr.shape[1], **kwargs) if len(mine) else None
    payload = None if part is None else (mine, part.hidden, part.loss, part.cache_hits)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, payload)
    pieces = [g for g in gathered if g is not None]
    hidden = np.empty((len(arr), *pieces[0][1].shape[1:]), dtype=pieces[0][1].dtype)
    with_loss = pieces[0][2] is not None
    loss = np.empty(len(arr), dtype=pieces[0][2].dtype) if with_loss else None
    for index, h, lo, _ in pieces:
        hidden[index] = h
        if loss is not None:
            loss[index] = lo
    return Activations(hidden, loss, arr, loaded.info.name, sum(p[3] for p in pieces))
