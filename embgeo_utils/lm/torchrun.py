"""The command line for data-parallel extraction and SAE training under ``torchrun`` (chapters 4 and 5).

The process group is PyTorch's own: start the processes with
``torchrun --nproc_per_node N -m embgeo_utils.lm.torchrun ...`` (or
``python -m torch.distributed.run``), which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; :func:`init_from_env` then joins the
group with NCCL on GPUs and gloo on the CPU. Nothing here schedules processes.

- :func:`sharded_hidden_states`: every rank runs the model on prompts
  ``rank::world`` (writing the shared on-disk cache as usual) and the results
  are gathered, so every rank returns the same :class:`Activations` as a
  single-process :func:`embgeo_utils.lm.activations.hidden_states`.
- :func:`embgeo_utils.lm.sae.train_sae` trains data-parallel by itself when a
  group is initialised: rank ``r`` takes rows ``r::world`` of every global
  batch, gradients are summed over ranks before each Adam step, and the weights
  equal a single-process run's up to the order of float sums.

Command line (the README shows the multi-GPU form)::

    torchrun --nproc_per_node 2 -m embgeo_utils.lm.torchrun train-sae \
        --acts acts.npy --n-latents 4096 --k 32 --out sae_folder
    torchrun --nproc_per_node 2 -m embgeo_utils.lm.torchrun extract-train \
        --model smollm2-135m --layer 6 --n-passages 64 --out sae_folder
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from ..core.progress import LOG, show_messages
from . import corpus, models
from .distributed import barrier, group_active, init_from_env, is_main, rank_and_world, sharded_hidden_states
from .sae import save_sae, train_sae

__all__ = [
    "main",
]


def _train_and_save(x: Any, args: argparse.Namespace, key: dict[str, Any]) -> None:

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
        LOG.info(
            f"SAE {args.n_latents}x k={args.k} on {history.tokens} tokens, {rank_and_world()[1]} rank(s): "
            f"fvu {history.fvu[-1]:.4f}, dead {history.dead_fraction[-1]:.3f}, {history.seconds:.1f} s -> {args.out}"
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
    show_messages()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    try:
        if "WORLD_SIZE" in os.environ:
            args.device = init_from_env(args.backend)
        else:
            args.device = "auto"
        if args.command == "train-sae":
            _train_and_save(args.acts, args, {"acts": os.path.abspath(args.acts)})
        else:
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

        if group_active():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
