"""Data-parallel extraction and SAE training under ``torchrun`` (chapters 4 and 5).

The process group is PyTorch's own: start the processes with
``torchrun --nproc_per_node N -m embgeo_utils.distributed ...`` (or
``python -m torch.distributed.run``), which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; :func:`init_from_env` then joins the
group with NCCL on GPUs and gloo on the CPU. Nothing here schedules processes.

- :func:`sharded_hidden_states`: every rank runs the model on prompts
  ``rank::world`` (writing the shared on-disk cache as usual) and the results
  are gathered, so every rank returns the same :class:`Activations` as a
  single-process :func:`embgeo_utils.activations.hidden_states`.
- :func:`embgeo_utils.sae.train_sae` trains data-parallel by itself when a
  group is initialised: rank ``r`` takes rows ``r::world`` of every global
  batch, gradients are summed over ranks before each Adam step, and the weights
  equal a single-process run's up to the order of float sums.

Command line (the README shows the multi-GPU form)::

    torchrun --nproc_per_node 2 -m embgeo_utils.distributed train-sae \\
        --acts acts.npy --n-latents 4096 --k 32 --out sae_folder
    torchrun --nproc_per_node 2 -m embgeo_utils.distributed extract-train \\
        --model smollm2-135m --layer 6 --n-passages 64 --out sae_folder
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from .errors import EmbgeoInputError

__all__ = [
    "init_from_env",
    "rank_and_world",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "broadcast_module",
    "sharded_hidden_states",
    "main",
]


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the current process group; ``(0, 1)`` when none is initialised."""
    import torch.distributed as dist

    if not _active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on rank 0, or when no process group is initialised (the process that writes caches and reports)."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if _active():
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
            "`torchrun --nproc_per_node N -m embgeo_utils.distributed ...`."
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

    if _active() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (no-op without a process group)."""
    import torch.distributed as dist

    if not _active() or dist.get_world_size() == 1:
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
    """:func:`~embgeo_utils.activations.hidden_states` with the prompts shared out over ranks (chapters 4 and 5).

    Rank ``r`` runs prompts ``r::world`` (reading and writing the on-disk cache as
    usual, progress shown on rank 0 only); the per-prompt results are gathered
    to every rank and put back in prompt order, so the return value equals a
    single-process call. Without a process group this is ``hidden_states``.
    """
    from .activations import Activations, hidden_states, prepare_ids

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


def _train_and_save(x: Any, args: argparse.Namespace, key: dict[str, Any]) -> None:
    from .sae import save_sae, train_sae

    sae, history = train_sae(
        x,
        args.n_latents,
        args.k,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        dead_tokens=args.dead_tokens,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    if is_main():
        save_sae(sae, args.out, history, meta={"key": key, "world_size": rank_and_world()[1]})
        print(
            f"[embgeo] SAE {args.n_latents}x k={args.k} on {history.tokens} tokens, {rank_and_world()[1]} rank(s): "
            f"fvu {history.fvu[-1]:.4f}, dead {history.dead_fraction[-1]:.3f}, {history.seconds:.1f} s -> {args.out}",
            flush=True,
        )
    barrier()


def main(argv: list[str] | None = None) -> int:
    """Command line: ``train-sae`` on a ``.npy`` file, or ``extract-train`` from a model's hidden states."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-sae", help="train a TopK SAE on activations stored as a (tokens, d) .npy file")
    train.add_argument("--acts", required=True, help="path of the (tokens, d) float32 .npy file")
    both = sub.add_parser("extract-train", help="extract one layer's hidden states of corpus passages, then train")
    both.add_argument("--model", default="smollm2-135m")
    both.add_argument("--layer", type=int, default=6, help="hidden-state index (block output)")
    both.add_argument("--n-passages", type=int, default=64)
    both.add_argument("--passage-tokens", type=int, default=128)
    for p in (train, both):
        p.add_argument("--out", required=True, help="folder for sae.safetensors and config.json (written by rank 0)")
        p.add_argument("--n-latents", type=int, default=4096)
        p.add_argument("--k", type=int, default=32)
        p.add_argument("--epochs", type=int, default=4)
        p.add_argument("--batch-size", type=int, default=256, help="global batch (split over ranks)")
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--dead-tokens", type=int, default=None, help="tokens without firing before a latent is dead")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--backend", choices=["gloo", "nccl"], default=None)
        p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    try:
        if "WORLD_SIZE" in os.environ:
            args.device = init_from_env(args.backend)
        else:
            args.device = "auto"
        if args.command == "train-sae":
            _train_and_save(args.acts, args, {"acts": os.path.abspath(args.acts)})
        else:
            from . import corpus, models

            loaded = models.load(args.model, device=args.device)
            passages = corpus.load_passages(
                args.n_passages, loaded.tokenizer, min_tokens=args.passage_tokens, max_tokens=args.passage_tokens
            )
            acts = sharded_hidden_states(
                loaded, [p.token_ids for p in passages], args.passage_tokens, layers=[args.layer], with_loss=False
            )
            x = acts.hidden[:, 0, 1:].reshape(-1, acts.hidden.shape[-1])  # the first position is left out
            _train_and_save(x, args, {"model": args.model, "layer": args.layer, "passages": args.n_passages})
    finally:
        import torch.distributed as dist

        if _active():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
