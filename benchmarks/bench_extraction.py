"""Benchmark: hidden-state extraction throughput per model, with and without the LM head (chapter 4).

For each installed causal model, times a forward pass over a batch of real passages
(tokens per second): the base model returning every layer's hidden states, as
``activations.hidden_states(with_loss=False)`` runs it, against the full model that
also computes the vocabulary logits (as a naive ``model(ids, output_hidden_states=True)``
does). Checks that both give the same hidden states.
"""

from __future__ import annotations

import argparse
from functools import partial

import _timing
import torch
from _timing import best_time

from embgeo_utils.lm import corpus, models


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    return best_time(fn, repeats)[0]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rec = _timing.Recorder(__file__)
    rate = _timing.gemm_rate(torch.float32)
    print(f"float32 GEMM rate {rate / 1e9:.0f} GFLOP/s (this run)")
    print(f"torch threads: {torch.get_num_threads()}; batch {args.batch} x {args.tokens} tokens")
    print(f"{'model':22s} {'hidden only tok/s':>18s} {'with LM head tok/s':>19s} {'ratio':>6s}")
    for name in models.installed_models():
        loaded = models.load(name, device="cpu")
        if not loaded.info.causal:
            continue
        passages = corpus.load_passages(args.batch, loaded.tokenizer, args.tokens, args.tokens, seed=0)
        ids = torch.tensor([p.token_ids for p in passages])
        if loaded.info.needs_bos:
            ids = torch.cat([torch.full((len(ids), 1), loaded.tokenizer.bos_token_id), ids], dim=1)
        base = models.base_model(loaded.model)
        hidden = base(input_ids=ids, output_hidden_states=True).hidden_states
        full = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(hidden, full)), "hidden states differ"
        t_base = timed(partial(base, input_ids=ids, output_hidden_states=True), args.repeats)
        t_full = timed(partial(loaded.model, input_ids=ids, output_hidden_states=True), args.repeats)
        n = ids.numel()
        print(f"{name:22s} {n / t_base:18.0f} {n / t_full:19.0f} {t_full / t_base:6.2f}")
        # Floor: 2 flops per weight per token (embedding table excluded) at the float32 GEMM rate.
        weights = sum(p.numel() for p in base.parameters()) - base.get_input_embeddings().weight.numel()
        rec.add(
            f"hidden states, every layer ({name})",
            f"{args.batch} real passages x {ids.shape[1]} tokens",
            t_base,
            "the same model with the LM head (naive call)",
            t_full,
            f"2 x {weights / 1e6:.0f}M weights x tokens at {rate / 1e9:.0f} GFLOP/s",
            2.0 * weights * n / rate,
            "hidden states equal (atol 1e-5)",
        )
    rec.write()


if __name__ == "__main__":
    main()
