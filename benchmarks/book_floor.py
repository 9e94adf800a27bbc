"""The arithmetic floor of a cold ``make book``: matrix-multiply work of the model-bound chapters at their defaults.

Counts the float32 multiply-add work that chapters 3, 4 and 5 cannot avoid at the
defaults of their parameters cells (read from the notebooks): the forward passes
of the models over text (chapters 4 and 5), SAE training (chapter 5) and the
nearest-neighbour products over whole vocabularies (chapter 3). Parameters are
counted on the loaded models; attention scores add ``4 T_avg h d_head`` per token
and layer (causal: ``T_avg = T / 2``). The floor is that work divided by the
float32 matrix-multiply rate measured here on the models' own shapes with the
book's thread count. With ``--timings _executed/timings.json`` it prints the
measured time of each chapter next to its floor.

    python benchmarks/book_floor.py [--timings _executed/timings.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _timing
import torch

from embgeo_utils.book.parameters import notebook_parameters
from embgeo_utils.lm import models

ROOT = Path(__file__).resolve().parents[1]


def defaults(notebook: str) -> dict:
    """The default value of every parameter of a chapter notebook."""
    return {k: p.default for k, p in notebook_parameters(ROOT / "notebooks" / notebook).items()}


class Shape:
    """Per-token forward work of one model (flops)."""

    def __init__(self, name: str) -> None:
        loaded = models.load(name, device="cpu")
        base = models.base_model(loaded.model)
        self.name = name
        self.n_layers = len(base.layers)
        self.block = sum(p.numel() for p in base.layers[0].parameters())
        cfg = loaded.model.config.get_text_config()
        self.d = int(cfg.hidden_size)
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.d // self.heads)
        self.vocab = int(cfg.vocab_size)
        del loaded

    def forward(self, tokens_per_text: int, blocks: int | None = None, head: bool = True) -> float:
        """Flops per token of a forward pass through ``blocks`` blocks (default all), with the LM head or not."""
        b = self.n_layers if blocks is None else blocks
        attention = 4.0 * (tokens_per_text / 2) * self.heads * self.head_dim
        return b * (2.0 * self.block + attention) + (2.0 * self.d * self.vocab if head else 0.0)


def chapter4(shapes: dict[str, Shape]) -> float:
    p = defaults("04_layerwise_geometry.ipynb")
    tokens = p["n_prompts"] * len(p["shuffle_levels"]) * p["n_tokens"]
    return sum(tokens * shapes[m].forward(p["n_tokens"]) for m in p["model_names"])


def chapter5(shapes: dict[str, Shape]) -> float:
    p = defaults("05_sae_feature_matching.ipynb")
    t = p["passage_tokens"]
    seeds = len(p["seeds"])

    def side(name: str, depths: list[float], passages: int, n_seeds: int, study: bool) -> tuple[float, float]:
        s = shapes[name]
        tokens = passages * t
        train = tokens * (1 - p["heldout_fraction"])
        deepest = max(int(round(x * s.n_layers)) for x in depths) + 1
        extract = tokens * s.forward(t, blocks=deepest, head=False)
        # ch05.sae_quality: loss recovered of the first seed's SAEs on loss_passages held-out passages, clean once
        loss = p["loss_passages"] * t * (1 + 2 * len(depths)) * s.forward(t) if study else 0.0
        latents = p["expansion"] * s.d
        # dense encoder forward and weight gradient per token and epoch; the token curve adds its smaller shares
        shares = len(depths) * n_seeds + (sum(p["token_fractions"]) - 1 if study else 0)
        sae = shares * p["epochs"] * train * 4.0 * s.d * latents
        return extract + loss, sae

    work = 0.0
    for name in (p["model_a"], p["model_b"]):
        work += sum(side(name, p["depths"], p["n_passages"], seeds, True))
    for name in p["cross_pair"]:
        work += sum(side(name, p["cross_depths"], min(p["cross_passages"], p["n_passages"]), 1, False))
    return work


def chapter3() -> float:
    p = defaults("03_intrinsic_dimension.ipynb")
    work = 0.0
    for name in p["model_names"]:
        vocab, d = models.input_embeddings(name).shape
        queries = vocab if vocab <= p["cpu_all_tokens_up_to"] else p["cpu_id_tokens"] + p["n_common"]
        work += 2.0 * min(queries, vocab) * vocab * d
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timings", type=Path, help="a runner timings.json to compare with")
    args = parser.parse_args()
    ch5 = defaults("05_sae_feature_matching.ipynb")
    names = sorted(
        set(defaults("04_layerwise_geometry.ipynb")["model_names"])
        | {ch5["model_a"], ch5["model_b"]}
        | set(ch5["cross_pair"])
    )
    shapes = {name: Shape(name) for name in names if name in models.installed_models()}
    print(f"{_timing.machine()}; torch threads {torch.get_num_threads()}; load {_timing.load_average():.1f}")
    rates = [_timing.gemm_rate(m=1024, k=s.d, n=4 * s.d) for s in shapes.values()]
    rate = sorted(rates)[len(rates) // 2]
    print("float32 GEMM rate on (1024 x d) @ (d x 4d): " + ", ".join(f"{r / 1e9:.0f}" for r in rates) + " GFLOP/s")
    measured = {}
    if args.timings:
        measured = {r["notebook"][:2]: r["seconds"] for r in json.loads(args.timings.read_text())["rows"]}
    total = 0.0
    print(f"{'chapter':>8} {'TFLOP':>8} {'floor (min)':>12} {'measured (min)':>15}")
    for chapter, work in (("03", chapter3()), ("04", chapter4(shapes)), ("05", chapter5(shapes))):
        floor = work / rate
        total += floor
        seen = f"{measured[chapter] / 60:15.1f}" if chapter in measured else f"{'':>15}"
        print(f"{chapter:>8} {work / 1e12:8.1f} {floor / 60:12.1f} {seen}")
    print(f"floor of chapters 3-5 at {rate / 1e9:.0f} GFLOP/s: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
