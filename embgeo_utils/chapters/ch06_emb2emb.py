"""Chapter 6, EMB2EMB: does a steering vector found in model A still steer model B once mapped into B's space?

A topic's steering vector is the mean residual activation on texts about the topic minus that on other topics.
Lee et al. carry A's vector into B through a linear map fitted on the two models' token embeddings (EMB2EMB); claim
9 says the carried vector steers B better than a random vector of the same norm and better than no steering. The
chapter also maps the residual streams themselves, so it can say how much is lost by going through embeddings.

The stages, in the order the chapter runs them:

1. :func:`topic_texts` splits the topic-labelled Wikipedia summaries into texts that build the vectors, texts that
   fit the topic classifier and held-out texts (:class:`TopicTexts`); :func:`neutral_prompts` takes the opening
   words of real passages from other sources as prompts; :func:`fit_classifier` fits the MiniLM topic classifier.
2. :func:`run_pair` runs one pair (:class:`PairRun`): :func:`build_transfer` finds each topic's vector in A and in
   B and carries A's into B through every map (:class:`Transfer`; the maps are those of
   :mod:`embgeo_utils.lm.emb2emb`); :func:`concept_sweep` adds each direction to B's residual stream at several
   strengths and scores forward passes only (the log-probability of the topic's characteristic tokens,
   :func:`topic_tokens`, and B's loss on the prompt's own text); :func:`steered_generations` generates
   continuations at the strength :func:`best_strength` picks and scores them with the classifier.
3. :func:`evaluate_claim9` turns every pair into the numbers (:func:`pair_analysis`, :class:`PairAnalysis`) and
   checks (:func:`check_claim9`) of claim 9 (:class:`Claim9`); :func:`sweep_summary`, :func:`generation_table`,
   :func:`example_generations` and :func:`plot_steering_sweep` are the tables and the figure.

References:
    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared global and local
    geometry of language model embeddings, arXiv:2503.21073.

    A. M. Turner et al. (2023), Activation addition: steering language models
    without optimization, arXiv:2308.10248.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..core.cache import cached
from ..core.errors import EmbgeoInputError
from ..core.stats import Check, Verdict, bootstrap_ci, paired_permutation, verdict
from ..lm.corpus import documents, wiki_summaries
from ..lm.emb2emb import LinearMap, cached_states, embedding_pairs, fit_linear_map, matching_layer, residual_pairs
from ..lm.models import LoadedModel, block_output_hook, transformer_blocks
from ..lm.steering import (
    TopicClassifier,
    continuation_nll,
    encode_texts,
    fit_topic_classifier,
    generate,
    resume_after,
    steer,
)
from .style import need_columns

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CHAPTER",
    "CONDITIONS",
    "Claim9",
    "GenerationEvidence",
    "PairAnalysis",
    "PairRun",
    "Parameters",
    "SweepEvidence",
    "TITLE",
    "TopicTexts",
    "Transfer",
    "best_strength",
    "build_transfer",
    "check_claim9",
    "concept_sweep",
    "evaluate_claim9",
    "example_generations",
    "fit_classifier",
    "generation_table",
    "neutral_prompts",
    "pair_analysis",
    "plot_steering_sweep",
    "run_pair",
    "steered_generations",
    "sweep_summary",
    "topic_texts",
    "topic_tokens",
]


CHAPTER = "ch06_emb2emb"
TITLE = "EMB2EMB: steering vectors carried across models"

#: Steering conditions in B, in the order figures and tables show them.
#: Claim 9's minimum effects (chapter 6, :func:`check_claim9`): (value, where it comes from).
MIN_SHARE_OF_NATIVE = (
    0.1,
    "a tenth of B's native vector's effect on the same units (the ceiling): 'transfers a steering vector' needs "
    "a visible share of what B's own vector does",
)
MIN_SWEEP_RISE = (
    0.05,
    "practical floor, also when the native vector hardly raises the score: 0.05 nats of concept score",
)
MIN_GEN_GAIN = (
    0.02,
    "practical floor, also when the native vector hardly raises it: 2 points of classifier probability",
)
MIN_NATIVE_GAIN = (
    0.05,
    "practical: a vector that steers B moves the topic classifier's probability by at least 5 points "
    "(chance is 1/3 for three topics)",
)

CONDITIONS = ("none", "native", "emb2emb", "emb2emb (unembedding)", "residual map", "random", "null map")


@dataclass(frozen=True)
class Parameters:
    """Chapter 6's parameters: the fields of its cell tagged ``parameters`` (defaults and allowed values are there)."""

    pairs: list[list[str]]
    encoder: str
    topics: list[str]
    depth: float
    n_build: int
    n_classifier: int
    n_heldout: int
    n_map_texts: int
    max_tokens: int
    map_rows: int
    ridge: float
    min_map_rows: int | None
    n_prompts: int
    prompt_words: int
    alphas: list[float]
    n_topic_tokens: int
    n_gen_prompts: int
    max_new_tokens: int
    gen_conditions: list[str]
    max_ppl_ratio: float
    n_permutations: int
    batch_size: int
    alpha: float
    seed: int
    device: str

    def models(self) -> list[str]:
        """The classifier's encoder, then every model the pairs name, in order."""
        return [self.encoder] + [name for pair in self.pairs for name in pair]


# --- Stage 1: texts, prompts and the topic classifier ---------------------------------------------------------


@dataclass(frozen=True)
class TopicTexts:
    """Topic-labelled texts of chapter 6, split by use (:func:`topic_texts`).

    Attributes:
        topics: the topics steered towards.
        build: per topic, the summaries the steering vectors are found on.
        classifier: per topic, the summaries the topic classifier is fitted on (``build`` among them).
        heldout: per topic, summaries used for nothing but the classifier's held-out accuracy.
        map_texts: summaries of the other topics, for the residual map (never a vector).
    """

    topics: list[str]
    build: dict[str, list[str]]
    classifier: dict[str, list[str]]
    heldout: dict[str, list[str]]
    map_texts: list[str]


def topic_texts(p: Parameters) -> TopicTexts:
    """Chapter 6: split the Wikipedia summaries of ``p.topics`` into build, classifier and held-out texts.

    Per topic, summaries are drawn in an order seeded by ``p.seed``: the first ``p.n_heldout`` are held out, the next
    ``p.n_classifier`` fit the classifier, and the first ``p.n_build`` of those also build the steering vectors.
    ``p.n_map_texts`` summaries of the remaining topics feed the residual map.

    Raises:
        EmbgeoInputError: fewer than two distinct topics, an unknown topic, or too few summaries for a topic.
    """

    topics, n_build, n_classifier, n_heldout = list(p.topics), p.n_build, p.n_classifier, p.n_heldout
    if len(topics) < 2 or len(set(topics)) != len(topics):
        raise EmbgeoInputError(f"Give at least two distinct topics, got {topics}.")
    if not 1 <= n_build <= n_classifier:
        raise EmbgeoInputError(f"Need 1 <= n_build <= n_classifier, got {n_build} and {n_classifier}.")
    rows = wiki_summaries()
    known = sorted({r["topic"] for r in rows})
    unknown = [t for t in topics if t not in known]
    if unknown:
        raise EmbgeoInputError(f"Unknown topic(s) {unknown}; the summaries have {known}.")
    rng = np.random.default_rng(p.seed)
    build, clf, held = {}, {}, {}
    for t in topics:
        texts = [r["extract"] for r in rows if r["topic"] == t]
        need = n_heldout + n_classifier
        if len(texts) < need:
            raise EmbgeoInputError(f"Topic {t!r} has {len(texts)} summaries; {need} are needed. Ask for fewer.")
        order = rng.permutation(len(texts))
        held[t] = [texts[i] for i in order[:n_heldout]]
        clf[t] = [texts[i] for i in order[n_heldout:need]]
        build[t] = clf[t][:n_build]
    rest = [r["extract"] for r in rows if r["topic"] not in topics and r["topic"] != "Uncategorized"]
    map_texts = [rest[i] for i in rng.permutation(len(rest))[: p.n_map_texts]]
    return TopicTexts(topics, build, clf, held, map_texts)


def neutral_prompts(
    n: int, n_words: int = 12, sources: Sequence[str] = ("sotu", "lee-news"), seed: int = 0
) -> list[str]:
    """Chapter 6: the first ``n_words`` words of ``n`` real paragraphs, drawn in turn from ``sources``.

    Neutral prompts for steering: real openings of other texts than the topic
    summaries; by default State of the Union addresses and news stories (the
    full-article dumps keep table and markup residue). Paragraphs shorter than
    ``2 * n_words`` words, and openings with markup or brackets, are skipped; the
    draw is seeded.
    """

    if n < 1 or n_words < 2:
        raise EmbgeoInputError(f"Need n >= 1 and n_words >= 2, got {n} and {n_words}.")
    pools = []
    for k, source in enumerate(sources):
        paras = [p for _title, _domain, ps in documents(source) for p in ps if len(p.split()) >= 2 * n_words]
        order = np.random.default_rng([seed, k]).permutation(len(paras))
        heads = [" ".join(paras[i].split()[:n_words]) for i in order]
        pools.append([h for h in heads if not set(h) & set("|=[]{}<>()_\\")])
    out: list[str] = []
    for i in range(max(len(p) for p in pools)):
        for pool in pools:
            if i < len(pool) and len(out) < n and pool[i] not in out:
                out.append(pool[i])
    if len(out) < n:
        raise EmbgeoInputError(f"Only {len(out)} prompts available from {list(sources)}; ask for fewer.")
    return out


def fit_classifier(encoder: LoadedModel, texts: TopicTexts, seed: int) -> TopicClassifier:
    """Chapter 6: the topic classifier (:func:`~embgeo_utils.lm.steering.fit_topic_classifier`) on the texts' split.

    Fitted on the ``classifier`` summaries of every topic; its ``heldout_accuracy`` is measured on the ``heldout``
    summaries (topic by topic, in the order of ``texts.topics``).
    """
    labelled = [(x, t) for t in texts.topics for x in texts.classifier[t]]
    held = [(x, t) for t in texts.topics for x in texts.heldout[t]]
    return fit_topic_classifier(
        encoder,
        [x for x, _ in labelled],
        [t for _, t in labelled],
        [x for x, _ in held],
        [t for _, t in held],
        seed=seed,
    )


def topic_tokens(tokenizer: Any, texts: dict[str, list[str]], k: int = 50, min_count: int = 3) -> dict[str, list[int]]:
    """Chapter 6: the ``k`` tokens most characteristic of each topic, in one tokenizer.

    Word-initial alphabetic tokens of at least 3 letters, ranked by the smoothed
    log ratio of their frequency in the topic's texts to their frequency in the
    other topics' texts; a token must occur at least ``min_count`` times in its topic.
    """
    counts: dict[str, Counter[int]] = {}
    for topic, items in texts.items():
        c: Counter[int] = Counter()
        for t in items:
            c.update(tokenizer(t, add_special_tokens=False)["input_ids"])
        counts[topic] = c
    vocab = {i for c in counts.values() for i in c}
    words = {i for i in vocab if _is_word(tokenizer.decode([i]))}
    out = {}
    for topic, c in counts.items():
        other: Counter[int] = Counter()
        for o, oc in counts.items():
            if o != topic:
                other.update(oc)
        n_t, n_o, v = sum(c.values()), sum(other.values()), len(vocab)
        scored = [
            (np.log((c[i] + 1) / (n_t + v)) - np.log((other[i] + 1) / (n_o + v)), i) for i in words if c[i] >= min_count
        ]
        scored.sort(reverse=True)
        if not scored:
            raise EmbgeoInputError(f"No characteristic token for {topic!r}: give more texts or lower min_count.")
        out[topic] = [i for _, i in scored[:k]]
    return out


def _is_word(piece: str) -> bool:
    return piece.startswith(" ") and piece[1:].isalpha() and len(piece) >= 4


# --- Stage 2a: vectors in A and B, the maps, and A's vectors carried into B ------------------------------------


@dataclass
class Transfer:
    """Steering directions of one model pair, all in B's space (chapter 6, :func:`build_transfer`).

    Attributes:
        names: ``(A, B)``.
        layer_a, layer_b: the blocks steered (same relative depth).
        norm_b: median per-token norm of B's residual at ``layer_b`` (first position left out).
        topics: the topics.
        vectors_a: A's topic vectors.
        vectors: ``{condition: {topic: vector in B}}``, conditions in :data:`CONDITIONS` order.
        maps: the fitted maps by name (held-out R² in ``r2_heldout``).
        tied: whether both models use one table for input embeddings and unembeddings.
        cosines: one row per condition and topic: ``condition``, ``topic``, ``cosine with native`` (with B's native
            vector), ``random |cosine| q99`` (the 99th percentile of |cosine| of random directions with it) and
            ``norm / residual norm``; ``None`` for a transfer built by hand.
    """

    names: tuple[str, str]
    layer_a: int
    layer_b: int
    norm_b: float
    topics: list[str]
    vectors_a: dict[str, torch.Tensor]
    vectors: dict[str, dict[str, torch.Tensor]]
    maps: dict[str, LinearMap]
    tied: bool
    cosines: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def pair(self) -> str:
        """``"A → B"``, the pair's label in every table."""
        return f"{self.names[0]} → {self.names[1]}"

    @property
    def conditions(self) -> list[str]:
        """The steered conditions, in :data:`CONDITIONS` order."""
        return [c for c in CONDITIONS if c in self.vectors]

    def direction(self, condition: str, topic: str) -> torch.Tensor:
        """Unit vector of ``condition`` for ``topic`` (zeros for ``"none"``)."""
        if condition == "none":
            return torch.zeros(next(iter(self.vectors["native"].values())).numel())
        v = self.vectors[condition][topic].float()
        return v / v.norm().clamp_min(1e-12)

    def cache_key(self) -> dict[str, Any]:
        """What a cached table of this transfer depends on (:func:`embgeo_utils.core.cache.key_part` reads it).

        The pair, B's block and median norm, the topics and conditions, and every unit direction (float32) that
        steers B; not the maps or A's vectors, which reach B only through those directions.
        """
        directions = [self.direction(c, t) for c in self.conditions for t in self.topics]
        return {
            "names": list(self.names),
            "layer_b": self.layer_b,
            "norm_b": self.norm_b,
            "topics": list(self.topics),
            "conditions": self.conditions,
            "directions": torch.stack(directions) if directions else torch.zeros(0),
        }

    def maps_table(self) -> pd.DataFrame:
        """One row per map: rows fitted, held-out R², ridge."""
        return pd.DataFrame(
            [
                {"map": k, "rows fitted": m.n_fit, "held-out R2": m.r2_heldout, "ridge": m.ridge}
                for k, m in self.maps.items()
            ]
        ).set_index("map")

    def mean_cosine(self, condition: str) -> float:
        """Mean over topics of the cosine of ``condition``'s vector with B's native one (NaN when not built)."""
        if self.cosines is None or condition not in set(self.cosines["condition"]):
            return float("nan")
        return float(self.cosines.groupby("condition")["cosine with native"].mean()[condition])


def _tied(m: LoadedModel) -> bool:
    out = m.model.get_output_embeddings()
    return out is None or out.weight is m.model.get_input_embeddings().weight


def _topic_vectors(states: list[torch.Tensor], labels: list[str], topics: list[str]) -> dict[str, torch.Tensor]:
    means = torch.stack([h.mean(dim=0) for h in states])
    lab = np.array(labels)
    out = {}
    for t in topics:
        pos = torch.as_tensor(lab == t)
        out[t] = means[pos].mean(dim=0) - means[~pos].mean(dim=0)
    return out


def _native_vectors(
    a: LoadedModel, b: LoadedModel, texts: TopicTexts, layer_a: int, layer_b: int, max_tokens: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """A's and B's own topic vectors from the ``build`` summaries, and B's median token norm (chapter 6)."""
    labels = [t for t in texts.topics for _ in texts.build[t]]
    flat = [x for t in texts.topics for x in texts.build[t]]
    states_a = cached_states(a, flat, layer_a, max_tokens=max_tokens)
    states_b = cached_states(b, flat, layer_b, max_tokens=max_tokens)
    vec_a = _topic_vectors(states_a, labels, texts.topics)
    native = _topic_vectors(states_b, labels, texts.topics)
    norm_b = float(torch.cat([h.norm(dim=1) for h in states_b]).median())
    return vec_a, native, norm_b


def _fit_maps(
    a: LoadedModel, b: LoadedModel, texts: TopicTexts, layer_a: int, layer_b: int, p: Parameters
) -> tuple[dict[str, LinearMap], bool]:
    """Chapter 6: the maps from A to B, in the order :func:`build_transfer` lists, and whether both tables are tied."""
    rng = np.random.default_rng(p.seed)
    maps: dict[str, LinearMap] = {}
    xa, xb, _shared = embedding_pairs(a, b, "input")
    pick = torch.as_tensor(np.sort(rng.permutation(xa.shape[0])[: min(p.map_rows, xa.shape[0])]))
    maps["emb2emb"] = fit_linear_map(xa[pick], xb[pick], ridge=p.ridge, seed=p.seed)
    shuffled = torch.as_tensor(rng.permutation(len(pick)))
    maps["null map"] = fit_linear_map(xa[pick], xb[pick][shuffled], ridge=p.ridge, seed=p.seed)
    tied = _tied(a) and _tied(b)
    if not tied:
        oa, ob, _ = embedding_pairs(a, b, "output")
        maps["emb2emb (unembedding)"] = fit_linear_map(oa[pick], ob[pick], ridge=p.ridge, seed=p.seed)
    ra, rb = residual_pairs(a, b, texts.map_texts, layer_a, layer_b, max_tokens=p.max_tokens)
    maps["residual map"] = fit_linear_map(ra, rb, ridge=p.ridge, seed=p.seed, min_rows=p.min_map_rows)
    return maps, tied


def _carried_vectors(
    maps: dict[str, LinearMap],
    vec_a: dict[str, torch.Tensor],
    native: dict[str, torch.Tensor],
    topics: list[str],
    d_model: int,
    gen: torch.Generator,
) -> dict[str, dict[str, torch.Tensor]]:
    """Chapter 6: B's native vectors, A's vectors through every map, and a Gaussian direction per topic (``gen``)."""
    vectors: dict[str, dict[str, torch.Tensor]] = {"native": native}
    for name, m in maps.items():
        vectors[name] = {t: m.apply(vec_a[t]) for t in topics}
    vectors["random"] = {t: torch.randn(d_model, generator=gen) for t in topics}
    return vectors


def _cosine_table(
    vectors: dict[str, dict[str, torch.Tensor]],
    native: dict[str, torch.Tensor],
    norm_b: float,
    d_model: int,
    gen: torch.Generator,
) -> pd.DataFrame:
    """Chapter 6: :attr:`Transfer.cosines`, against 1000 random unit probes drawn from ``gen``."""
    probes = torch.nn.functional.normalize(torch.randn(1000, d_model, generator=gen), dim=1)
    rows = []
    for cond, vs in vectors.items():
        for t, v in vs.items():
            nat = torch.nn.functional.normalize(native[t].float(), dim=0)
            rows.append(
                {
                    "condition": cond,
                    "topic": t,
                    "cosine with native": float(torch.nn.functional.normalize(v.float(), dim=0) @ nat),
                    "random |cosine| q99": float(torch.quantile((probes @ nat).abs(), 0.99)),
                    "norm / residual norm": float(v.norm()) / norm_b,
                }
            )
    order = {c: i for i, c in enumerate(CONDITIONS)}
    cos = pd.DataFrame(rows).sort_values(
        ["condition", "topic"], key=lambda s: s.map(order) if s.name == "condition" else s
    )
    return cos.reset_index(drop=True)


def build_transfer(a: LoadedModel, b: LoadedModel, texts: TopicTexts, p: Parameters) -> Transfer:
    """Chapter 6: find the topic vectors in A and B and carry A's into B through every map.

    A's block is ``round(p.depth * layers of A)``, B's the block at the same relative depth
    (:func:`~embgeo_utils.lm.emb2emb.matching_layer`). A topic's vector is the mean residual of its ``build``
    summaries minus that of the other topics' (each text its own mean over positions, the first position and BOS left
    out, at most ``p.max_tokens`` tokens). Maps: ``emb2emb`` on the shared vocabulary's input embeddings (at most
    ``p.map_rows`` rows, drawn with ``p.seed``); ``emb2emb (unembedding)`` on the unembeddings, only when a model has
    its own output table; ``null map`` on the input embeddings with B's rows shuffled; ``residual map`` on paired
    residual activations of ``map_texts`` (at least ``p.min_map_rows`` paired tokens; default the wider model's
    width, see :func:`~embgeo_utils.lm.emb2emb.fit_linear_map`). Every map has ridge ``p.ridge``. ``random`` is a
    Gaussian direction per topic.
    """
    n_a = a.info.n_layers
    layer_a = max(1, min(n_a - 1, round(p.depth * n_a)))
    layer_b = matching_layer(layer_a, n_a, b.info.n_layers)
    vec_a, native, norm_b = _native_vectors(a, b, texts, layer_a, layer_b, p.max_tokens)
    maps, tied = _fit_maps(a, b, texts, layer_a, layer_b, p)
    gen = torch.Generator().manual_seed(p.seed)
    vectors = _carried_vectors(maps, vec_a, native, texts.topics, b.info.d_model, gen)
    cosines = _cosine_table(vectors, native, norm_b, b.info.d_model, gen)
    return Transfer(
        (a.info.name, b.info.name),
        layer_a,
        layer_b,
        norm_b,
        list(texts.topics),
        vec_a,
        {c: vectors[c] for c in CONDITIONS if c in vectors},
        maps,
        tied,
        cosines,
    )


# --- Stage 2b: the strength sweep (forward passes) -------------------------------------------------------------


@dataclass(frozen=True)
class _Prompts:
    """The sweep's prompts in B's tokenizer, right-padded on B's device, and what each row is scored on."""

    seqs: list[list[int]]
    ids: torch.Tensor
    mask: torch.Tensor
    topic_ids: dict[str, torch.Tensor]
    lead: int
    score_from: int


def _right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _encode_prompts(b: LoadedModel, prompts: list[str], tokens: dict[str, list[int]], score_from: int) -> _Prompts:
    seqs = encode_texts(b, prompts, max_tokens=10_000)
    if min(len(s) for s in seqs) <= score_from + 1:
        raise EmbgeoInputError(f"Every prompt needs more than {score_from + 1} tokens; use longer prompts.")
    pad = b.tokenizer.pad_token_id if b.tokenizer.pad_token_id is not None else (b.tokenizer.eos_token_id or 0)
    ids, mask = _right_pad(seqs, int(pad))
    topic_ids = {t: torch.as_tensor(ids_t, device=b.device) for t, ids_t in tokens.items()}
    lead = 1 if b.info.needs_bos else 0
    return _Prompts(seqs, ids.to(b.device), mask.to(b.device), topic_ids, lead, score_from)


def _measure(logits: torch.Tensor, rows: list[int], topics: list[str], batch: _Prompts) -> list[tuple[float, float]]:
    """Concept score and loss on the prompt's own text of each row of ``logits`` (chapter 6, :func:`concept_sweep`)."""
    lse = torch.logsumexp(logits.float(), dim=-1)  # (batch, tokens): no second vocabulary-sized tensor
    out = []
    for j, (r, t) in enumerate(zip(rows, topics)):
        n, lead = len(batch.seqs[r]), batch.lead
        at = slice(lead + batch.score_from - 1, n - 1)
        mass = (torch.logsumexp(logits[j, at][:, batch.topic_ids[t]].float(), dim=-1) - lse[j, at]).mean()
        target = logits[j, lead : n - 1].gather(-1, batch.ids[r, lead + 1 : n, None])[:, 0].float()
        nll = (lse[j, lead : n - 1] - target).mean()
        out.append((float(mass), float(nll)))
    return out


def _unsteered(
    b: LoadedModel, transfer: Transfer, batch: _Prompts
) -> tuple[torch.Tensor, list[tuple[str, str, float, int, float, float]]]:
    """B's residual entering the steered block's output, and the ``none`` rows, from one unsteered pass."""
    base_states: list[torch.Tensor] = []

    def keep(h: torch.Tensor) -> torch.Tensor:
        base_states.append(h)
        return h

    with block_output_hook(transformer_blocks(b.model)[transfer.layer_b - 1], keep):
        base_logits = b.model(input_ids=batch.ids, attention_mask=batch.mask).logits
    every = list(range(len(batch.seqs)))
    records = []
    for t in transfer.topics:
        for r, (score, nll) in enumerate(_measure(base_logits, every, [t] * len(every), batch)):
            records.append(("none", t, 0.0, r, score, nll))
    return base_states[0], records


def _steered(
    b: LoadedModel,
    transfer: Transfer,
    batch: _Prompts,
    hidden: torch.Tensor,
    alphas: list[float],
    batch_size: int,
    progress: bool,
) -> list[tuple[str, str, float, int, float, float]]:
    """Every (condition, topic, alpha, prompt), resumed from the unsteered pass at the steered block."""
    from tqdm.auto import tqdm

    jobs = [
        (c, t, al, r)
        for c in transfer.conditions
        for t in transfer.topics
        for al in alphas
        for r in range(len(batch.seqs))
    ]
    records = []
    bar = tqdm(total=len(jobs), desc=f"{b.info.name} sweep", disable=not progress, mininterval=2.0)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        rows = [r for *_, r in chunk]
        vecs = torch.stack([transfer.direction(c, t) * (al * transfer.norm_b) for c, t, al, _ in chunk])
        with resume_after(b, transfer.layer_b, hidden[rows]), steer(b, transfer.layer_b, vecs, 1.0):
            logits = b.model(input_ids=batch.ids[rows], attention_mask=batch.mask[rows]).logits
        for (c, t, al, r), (score, nll) in zip(chunk, _measure(logits, rows, [t for _, t, _, _ in chunk], batch)):
            records.append((c, t, float(al), r, score, nll))
        bar.update(len(chunk))
    bar.close()
    return records


def _sweep_frame(records: list[tuple[str, str, float, int, float, float]], pair: str) -> pd.DataFrame:
    df = pd.DataFrame(records, columns=["condition", "topic", "alpha", "prompt", "score", "nll"])
    base = df[df["condition"] == "none"].set_index(["topic", "prompt"])
    key = pd.MultiIndex.from_frame(df[["topic", "prompt"]])
    df["rise"] = df["score"].to_numpy() - base["score"].reindex(key).to_numpy()
    df["ppl ratio"] = np.exp(df["nll"].to_numpy() - base["nll"].reindex(key).to_numpy())
    df.insert(0, "pair", pair)
    return df


@cached("concept_sweep", version=1, ignore=("progress",))
@torch.no_grad()
def _sweep_table(
    b: LoadedModel,
    device: torch.device,
    transfer: Transfer,
    prompts: list[str],
    alphas: list[float],
    tokens: dict[str, list[int]],
    score_from: int,
    batch_size: int,
    progress: bool = False,
) -> pd.DataFrame:
    """The table of :func:`concept_sweep`, cached under B (weights, dtype), its device type, the transfer's
    :meth:`Transfer.cache_key` (directions, norm, block, topics), the prompts, strengths, topic tokens, ``score_from``
    and batch size."""
    batch = _encode_prompts(b, prompts, tokens, score_from)
    hidden, records = _unsteered(b, transfer, batch)
    records += _steered(b, transfer, batch, hidden, alphas, batch_size, progress)
    return _sweep_frame(records, transfer.pair)


@torch.no_grad()
def concept_sweep(
    b: LoadedModel,
    transfer: Transfer,
    prompts: Sequence[str],
    alphas: Sequence[float],
    tokens: dict[str, list[int]],
    *,
    score_from: int = 2,
    batch_size: int = 32,
    progress: bool = False,
    cache: bool = True,
) -> pd.DataFrame:
    """Chapter 6: concept score and fluency of every condition, topic, strength and prompt, from forward passes.

    The direction of each condition (unit length) is added at ``alpha * transfer.norm_b`` to B's block
    ``transfer.layer_b`` at every position. For each prompt, **score** is the mean over positions ``score_from..`` of
    the log of the probability B puts on the topic's characteristic ``tokens`` as the next token; **nll** is B's mean
    loss on the prompt's own next tokens (real text, so a steer that breaks the model raises it). Blocks before the
    steered one are computed once (:func:`~embgeo_utils.lm.steering.resume_after`). With ``cache`` the table is kept
    on disk (cache kind ``concept_sweep``) under a key of everything it depends on (model and device type,
    directions, prompts, strengths, tokens, batch size), so a rerun reads it.

    Returns:
        One row per (condition, topic, alpha, prompt), the unsteered rows (condition ``none``, alpha 0) first:
        ``pair``, ``condition``, ``topic``, ``alpha``, ``prompt`` (index into ``prompts``), ``score``, ``nll``,
        ``rise`` (score minus the unsteered score of that prompt and topic) and ``ppl ratio`` (``exp`` of nll minus
        the unsteered nll).
    """
    if not alphas or any(not np.isfinite(x) or x < 0 for x in alphas):
        raise EmbgeoInputError(f"alphas must be non-negative finite numbers, got {list(alphas)}.")
    missing = [t for t in transfer.topics if t not in tokens]
    if missing:
        raise EmbgeoInputError(f"No characteristic tokens for {missing}; build them with topic_tokens.")
    topic_tokens_b = {t: [int(i) for i in tokens[t]] for t in transfer.topics}
    args = (b, b.device, transfer, list(prompts), [float(x) for x in alphas], topic_tokens_b, score_from, batch_size)
    if not cache:
        return _sweep_table.compute(*args, progress=progress)
    return _sweep_table(*args, progress=progress)


# --- Stage 2c: steered continuations ---------------------------------------------------------------------------


def _generation_jobs(transfer: Transfer, n_prompts: int, conditions: list[str]) -> list[tuple[str, str, int]]:
    """(condition, topic, prompt) in generation order: the unsteered continuation of each prompt once, then the rest."""
    jobs = [("none", transfer.topics[0], r) for r in range(n_prompts)]
    jobs += [(c, t, r) for c in conditions if c != "none" for t in transfer.topics for r in range(n_prompts)]
    return jobs


@cached("steered_continuations", version=1, ignore=("progress",))
@torch.no_grad()
def _continuations(
    b: LoadedModel,
    device: torch.device,
    transfer: Transfer,
    prompts: list[str],
    alpha: float,
    conditions: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
) -> pd.DataFrame:
    """Chapter 6: greedy continuations of every job and their loss under unsteered B (cached).

    Returns one row per job of :func:`_generation_jobs`: ``condition``, ``topic``, ``prompt``, ``continuation`` and
    ``nll`` (mean loss of the continuation under unsteered B). The key holds B (weights, dtype), its device type, the
    transfer's :meth:`Transfer.cache_key`, the prompts, the strength, the conditions, the length and the batch size.
    """
    jobs = _generation_jobs(transfer, len(prompts), conditions)
    texts: list[str] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        vecs = torch.stack([transfer.direction(c, t) * (alpha * transfer.norm_b) for c, t, _ in chunk])
        with steer(b, transfer.layer_b, vecs, 1.0):
            texts += generate(
                b, [prompts[r] for *_, r in chunk], max_new_tokens, batch_size=len(chunk), progress=progress
            )
    nll = continuation_nll(b, [prompts[r] for *_, r in jobs], texts, batch_size=batch_size)
    return pd.DataFrame(
        {
            "condition": [c for c, _, _ in jobs],
            "topic": [t for _, t, _ in jobs],
            "prompt": [r for *_, r in jobs],
            "continuation": texts,
            "nll": nll,
        }
    )


def _scored(
    runs: pd.DataFrame, transfer: Transfer, prompts: list[str], alpha: float, classifier: TopicClassifier
) -> pd.DataFrame:
    """Chapter 6: the classifier's score and the perplexity ratio of each continuation (:func:`steered_generations`)."""
    texts = [str(x) for x in runs["continuation"]]
    proba = classifier.proba([x if x.strip() else "." for x in texts])
    rows = []
    jobs = zip(runs["condition"].tolist(), runs["topic"].tolist(), runs["prompt"].tolist(), texts, runs["nll"].tolist())
    for (c, t, r, text, n), p in zip(jobs, proba):
        for topic in transfer.topics if c == "none" else [t]:
            rows.append((c, topic, r, prompts[r], text, float(p[classifier.topics.index(topic)]), float(np.exp(n))))
    df = pd.DataFrame(rows, columns=["condition", "topic", "prompt", "prompt text", "continuation", "score", "ppl"])
    base = df[df["condition"] == "none"].set_index(["topic", "prompt"])["ppl"]
    df["ppl ratio"] = df["ppl"].to_numpy() / base.reindex(pd.MultiIndex.from_frame(df[["topic", "prompt"]])).to_numpy()
    df.insert(0, "pair", transfer.pair)
    df.insert(3, "alpha", float(alpha))
    return df


def steered_generations(
    b: LoadedModel,
    transfer: Transfer,
    prompts: Sequence[str],
    alpha: float,
    classifier: TopicClassifier,
    conditions: Sequence[str] = ("none", "native", "emb2emb", "random"),
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = False,
    cache: bool = True,
) -> pd.DataFrame:
    """Chapter 6: greedy continuations under each condition and topic, scored for topic and fluency.

    All conditions run in the same batches (left-padded, one steering vector per sequence). With ``cache`` the
    continuations and their losses are kept on disk (cache kind ``steered_continuations``) under a key of everything
    they depend on (model and device type, directions, prompts, strength, conditions, lengths); the scores are then
    computed from them, so another classifier reuses the continuations.

    Returns:
        One row per condition, topic and prompt: ``pair``, ``condition``, ``topic``, ``alpha``, ``prompt`` (index),
        ``prompt text``, ``continuation``, ``score`` (the topic classifier's probability of the row's topic),
        ``ppl`` (perplexity under unsteered B) and ``ppl ratio`` (divided by the unsteered continuation's perplexity
        of the same prompt). The unsteered continuation appears once per topic.
    """
    unknown = [c for c in conditions if c != "none" and c not in transfer.vectors]
    if unknown:
        raise EmbgeoInputError(f"Unknown condition(s) {unknown}; choose from {['none', *transfer.conditions]}.")
    args = (b, b.device, transfer, list(prompts), float(alpha), list(conditions), max_new_tokens, batch_size)
    runs = _continuations(*args, progress=progress) if cache else _continuations.compute(*args, progress=progress)
    return _scored(runs, transfer, list(prompts), float(alpha), classifier)


# --- Stage 3: the numbers and checks of claim 9 ----------------------------------------------------------------


@dataclass(frozen=True)
class SweepEvidence:
    """The sweep at the chosen strength ``alpha*`` (chapter 6, :func:`pair_analysis`); rises in nats.

    Attributes:
        alpha: ``alpha*``, the chosen strength.
        units: (topic, prompt) units behind each mean and test.
        rise, rise_random, rise_native: mean rise in concept score of the transferred, random and native vectors.
        ppl_ratio: the transferred vector's geometric-mean perplexity ratio on real text.
        p_vs_none, p_vs_random: one-sided sign-flip permutation p-values (transferred rise > 0; > the random
            vector's rise), multiplied by the number of admissible strengths (at most 1).
        se_vs_none, se_vs_random: the standard errors of those tests.
        effect_vs_random: mean over units of the transferred rise minus the random rise.
        fraction_of_native: ``rise / rise_native``; NaN when the native vector does not raise the score.
    """

    alpha: float
    units: int
    rise: float
    rise_random: float
    rise_native: float
    ppl_ratio: float
    p_vs_none: float
    p_vs_random: float
    se_vs_none: float | None
    se_vs_random: float | None
    effect_vs_random: float
    fraction_of_native: float

    def record(self) -> dict[str, Any]:
        """The numbers under the record's keys (``"alpha*"``, ``"rise"``, ...)."""
        return {
            "alpha*": self.alpha,
            "units": self.units,
            "rise": self.rise,
            "rise random": self.rise_random,
            "rise native": self.rise_native,
            "ppl ratio": self.ppl_ratio,
            "p vs none": self.p_vs_none,
            "p vs random": self.p_vs_random,
            "se vs none": self.se_vs_none,
            "se vs random": self.se_vs_random,
            "effect vs random": self.effect_vs_random,
            "fraction of native": self.fraction_of_native,
        }


@dataclass(frozen=True)
class GenerationEvidence:
    """The steered continuations of one pair (chapter 6, :func:`pair_analysis`); scores are classifier probabilities.

    Attributes:
        alpha: the strength they were generated at.
        units: (topic, prompt) units.
        score, score_none, score_random: mean score of the transferred, unsteered and random-vector continuations.
        p_vs_none, p_vs_random: one-sided sign-flip permutation p-values (transferred > unsteered; > random).
        se_vs_none, se_vs_random: the standard errors of those tests.
        ppl_ratio: median perplexity ratio of the transferred continuations under unsteered B.
        score_native: mean score of the native-vector continuations; ``None`` when they were not generated.
        fraction_of_native: ``(score - score_none) / (score_native - score_none)``; ``None`` without native
            continuations, NaN when the native vector does not raise the score.
        p_native_vs_none, se_native_vs_none: the same test for the native continuations against the unsteered
            ones (the positive control); ``None`` without native continuations.
    """

    alpha: float
    units: int
    score: float
    score_none: float
    score_random: float
    p_vs_none: float
    p_vs_random: float
    se_vs_none: float | None
    se_vs_random: float | None
    ppl_ratio: float
    score_native: float | None
    fraction_of_native: float | None
    p_native_vs_none: float | None = None
    se_native_vs_none: float | None = None

    def record(self) -> dict[str, Any]:
        """The numbers under the record's keys (``"gen alpha"``, ...); the native ones only when present."""
        out = {
            "gen alpha": self.alpha,
            "gen units": self.units,
            "gen score": self.score,
            "gen score none": self.score_none,
            "gen score random": self.score_random,
            "gen p vs none": self.p_vs_none,
            "gen p vs random": self.p_vs_random,
            "gen se vs none": self.se_vs_none,
            "gen se vs random": self.se_vs_random,
            "gen ppl ratio": self.ppl_ratio,
        }
        if self.score_native is not None:
            out["gen score native"] = self.score_native
            out["gen fraction of native"] = self.fraction_of_native
            out["gen p native vs none"] = self.p_native_vs_none
            out["gen se native vs none"] = self.se_native_vs_none
        return out


@dataclass(frozen=True)
class PairAnalysis:
    """The numbers behind claim 9 for one pair and one transferred condition (chapter 6, :func:`pair_analysis`).

    Attributes:
        transfer: the condition analysed (``"emb2emb"`` unless asked otherwise).
        admissible_alphas: the swept strengths (> 0) at which it keeps the perplexity ratio within the bound.
        sweep: the sweep at ``alpha*``; ``None`` when no strength is admissible.
        generations: the continuations; ``None`` when none were given, they lack the condition, or no strength is
            admissible.
    """

    transfer: str
    admissible_alphas: list[float]
    sweep: SweepEvidence | None
    generations: GenerationEvidence | None

    @property
    def alpha_star(self) -> float | None:
        """The chosen strength, ``None`` when no strength is admissible."""
        return None if self.sweep is None else self.sweep.alpha

    def record(self) -> dict[str, Any]:
        """Every number as the chapter's record holds it: one flat dict; absent groups leave their keys out."""
        out: dict[str, Any] = {"transfer": self.transfer, "admissible alphas": self.admissible_alphas}
        if self.sweep is not None:
            out.update(self.sweep.record())
        if self.generations is not None:
            out.update(self.generations.record())
        return out


def _units(frame: pd.DataFrame, condition: str, value: str, alpha: float | None = None) -> pd.Series:
    g = frame[frame["condition"] == condition]
    if alpha is not None:
        g = g[np.isclose(g["alpha"], alpha)]
    return g.set_index(["topic", "prompt"])[value].sort_index()


def _admissible(sweep: pd.DataFrame, transfer: str, max_ppl_ratio: float) -> tuple[list[float], pd.Series]:
    """The strengths at which ``transfer`` keeps the perplexity bound, and its ratio per strength (chapter 6)."""
    sub = sweep[sweep["condition"] == transfer]
    if sub.empty:
        raise EmbgeoInputError(f"The sweep has no condition {transfer!r}.")
    ratio = sub.groupby("alpha")["ppl ratio"].apply(lambda x: float(np.exp(np.log(x).mean())))
    return [float(a) for a in ratio.index if ratio[a] <= max_ppl_ratio and a > 0], ratio


def _best_of(sweep: pd.DataFrame, transfer: str, admissible: list[float]) -> float:
    gain = {
        a: float((_units(sweep, transfer, "rise", a) - _units(sweep, "random", "rise", a)).mean()) for a in admissible
    }
    return max(admissible, key=lambda a: gain[a])


def best_strength(sweep: pd.DataFrame, transfer: str = "emb2emb", max_ppl_ratio: float = 2.0) -> float | None:
    """Chapter 6: ``alpha*``, the admissible strength where ``transfer`` beats the random vector most (or ``None``).

    Admissible: swept strengths above 0 at which ``transfer`` keeps the geometric-mean perplexity ratio on real text
    within ``max_ppl_ratio``. The same choice as :func:`pair_analysis` makes, without its tests.
    """
    admissible, _ = _admissible(sweep, transfer, max_ppl_ratio)
    return _best_of(sweep, transfer, admissible) if admissible else None


def _sweep_evidence(
    sweep: pd.DataFrame, transfer: str, best: float, k: int, ratio: pd.Series, n_permutations: int, seed: int
) -> SweepEvidence:
    tr = _units(sweep, transfer, "rise", best)
    rnd = _units(sweep, "random", "rise", best)
    nat = _units(sweep, "native", "rise", best)
    p_none = paired_permutation(tr.to_numpy(), n_permutations=n_permutations, seed=seed)
    p_rand = paired_permutation(tr.to_numpy(), rnd.to_numpy(), n_permutations=n_permutations, seed=seed)
    return SweepEvidence(
        alpha=best,
        units=len(tr),
        rise=float(tr.mean()),
        rise_random=float(rnd.mean()),
        rise_native=float(nat.mean()),
        ppl_ratio=float(ratio[best]),
        p_vs_none=min(1.0, k * p_none.p_value),
        p_vs_random=min(1.0, k * p_rand.p_value),
        se_vs_none=p_none.se,
        se_vs_random=p_rand.se,
        effect_vs_random=float((tr - rnd).mean()),
        fraction_of_native=float(tr.mean() / nat.mean()) if nat.mean() > 0 else float("nan"),
    )


def _generation_evidence(gens: pd.DataFrame, transfer: str, n_permutations: int, seed: int) -> GenerationEvidence:
    gt = _units(gens, transfer, "score")
    gn = _units(gens, "none", "score").reindex(gt.index)
    gr = _units(gens, "random", "score").reindex(gt.index)
    gv = _units(gens, "native", "score").reindex(gt.index) if "native" in set(gens["condition"]) else None
    g_none = paired_permutation(gt.to_numpy(), gn.to_numpy(), n_permutations=n_permutations, seed=seed)
    g_rand = paired_permutation(gt.to_numpy(), gr.to_numpy(), n_permutations=n_permutations, seed=seed)
    native, fraction, p_native, se_native = None, None, None, None
    if gv is not None:
        native = float(gv.mean())
        d_nat = float(gv.mean() - gn.mean())
        fraction = float((gt.mean() - gn.mean()) / d_nat) if d_nat > 0 else float("nan")
        control = paired_permutation(gv.to_numpy(), gn.to_numpy(), n_permutations=n_permutations, seed=seed)
        p_native, se_native = control.p_value, control.se
    return GenerationEvidence(
        alpha=float(gens["alpha"].iloc[0]),
        units=len(gt),
        score=float(gt.mean()),
        score_none=float(gn.mean()),
        score_random=float(gr.mean()),
        p_vs_none=g_none.p_value,
        p_vs_random=g_rand.p_value,
        se_vs_none=g_none.se,
        se_vs_random=g_rand.se,
        ppl_ratio=float(np.exp(np.log(_units(gens, transfer, "ppl ratio")).median())),
        score_native=native,
        fraction_of_native=fraction,
        p_native_vs_none=p_native,
        se_native_vs_none=se_native,
    )


def pair_analysis(
    sweep: pd.DataFrame,
    gens: pd.DataFrame | None = None,
    transfer: str = "emb2emb",
    max_ppl_ratio: float = 2.0,
    n_permutations: int = 10_000,
    seed: int = 0,
) -> PairAnalysis:
    """Chapter 6: the numbers behind claim 9 for one pair.

    The strength ``alpha*`` is chosen among the swept strengths at which the transferred vector keeps the
    geometric-mean perplexity ratio on real text within ``max_ppl_ratio``: the one where its rise in concept score
    over the random vector is largest (:func:`best_strength`). Its p-values (one-sided sign-flip permutation over
    (topic, prompt) units) are multiplied by the number of admissible strengths, which pays for the choice.
    ``fraction_of_native`` is the transferred vector's rise over no steering divided by the native vector's, at
    ``alpha*``. With ``gens`` (continuations, :func:`steered_generations`) that include ``transfer``, their scores are
    compared with the unsteered and random-vector continuations' in the same way (without the multiplication).
    """
    admissible, ratio = _admissible(sweep, transfer, max_ppl_ratio)
    if not admissible:
        return PairAnalysis(transfer, admissible, None, None)
    best = _best_of(sweep, transfer, admissible)
    at_best = _sweep_evidence(sweep, transfer, best, len(admissible), ratio, n_permutations, seed)
    generated = None
    if gens is not None and not gens.empty and transfer in set(gens["condition"]):
        generated = _generation_evidence(gens, transfer, n_permutations, seed)
    return PairAnalysis(transfer, admissible, at_best, generated)


def _minimum(native_effect: float | None, floor: tuple[float, str], unit: str) -> tuple[float, str]:
    """A transfer check's minimum effect: a share of the native vector's effect, never below the practical floor."""
    share, why = MIN_SHARE_OF_NATIVE
    if native_effect is not None and np.isfinite(native_effect) and share * native_effect > floor[0]:
        return share * native_effect, f"{why} ({share:g} x {native_effect:.3g} {unit})"
    return floor


def _versus_checks(
    label: str,
    tests: list[tuple[str, float, float, float | None]],
    minimum: tuple[float, str],
    units: int,
    corrected_for: int,
    n_permutations: int,
) -> list[Check]:
    """Chapter 6: one check per control the transfer is compared with (``label`` holds ``{what}``)."""
    return [
        Check(label.format(what=what), effect, p, minimum[0], units, se, corrected_for,
              min_effect_source=minimum[1], n_permutations=n_permutations)
        for what, effect, p, se in tests
    ]  # fmt: skip


def _sweep_checks(pair: str, r: PairAnalysis, n_permutations: int) -> list[Check]:
    """The forward-pass checks of one pair at ``alpha*`` (chapter 6, :func:`check_claim9`)."""
    s, k, transfer = r.sweep, len(r.admissible_alphas), r.transfer
    assert s is not None
    tests = [("no steering", s.rise, s.p_vs_none, s.se_vs_none),
             ("random vector", s.effect_vs_random, s.p_vs_random, s.se_vs_random)]  # fmt: skip
    label = f"{pair}: {transfer} > {{what}} (sweep, alpha {s.alpha:g})"
    return _versus_checks(label, tests, _minimum(s.rise_native, MIN_SWEEP_RISE, "nats"), s.units, k, n_permutations)


def _generation_checks(pair: str, g: GenerationEvidence, transfer: str, n_permutations: int) -> list[Check]:
    """The continuation checks of one pair and their positive control (chapter 6, :func:`check_claim9`)."""
    native_gain = None if g.score_native is None else g.score_native - g.score_none
    minimum = _minimum(native_gain, MIN_GEN_GAIN, "in probability")
    tests = [("no steering", g.score - g.score_none, g.p_vs_none, g.se_vs_none),
             ("random vector", g.score - g.score_random, g.p_vs_random, g.se_vs_random)]  # fmt: skip
    label = f"{pair}: continuations, {transfer} > {{what}} (classifier)"
    checks = _versus_checks(label, tests, minimum, g.units, 1, n_permutations)
    if native_gain is not None and g.p_native_vs_none is not None:
        checks.append(
            Check(
                f"{pair}: continuations, native vector > no steering (positive control)",
                native_gain,
                g.p_native_vs_none,
                MIN_NATIVE_GAIN[0],
                g.units,
                g.se_native_vs_none,
                min_effect_source=MIN_NATIVE_GAIN[1],
                n_permutations=n_permutations,
                control=True,
            )  # fmt: skip
        )
    return checks


def _pair_checks(pair: str, r: PairAnalysis, max_ppl_ratio: float, n_permutations: int) -> list[Check]:
    """The checks of one pair (chapter 6, :func:`check_claim9`)."""
    if r.sweep is None:
        return [
            Check(
                f"{pair}: no strength keeps perplexity within {max_ppl_ratio}x",
                -1.0,
                None,
                1.0,
                min_effect_source="a strength that keeps fluency is what the claim needs",
            )
        ]
    checks = _sweep_checks(pair, r, n_permutations)
    if r.generations is not None:
        checks += _generation_checks(pair, r.generations, r.transfer, n_permutations)
    return checks


def check_claim9(
    sweep: pd.DataFrame,
    gens: pd.DataFrame | None = None,
    transfer: str = "emb2emb",
    max_ppl_ratio: float = 2.0,
    alpha: float = 0.01,
    n_permutations: int = 10_000,
    seed: int = 0,
) -> Verdict:
    """Chapter 6, claim 9: the transferred vector steers B better than the random and no-steering controls.

    Checks for every pair in ``sweep`` (and ``gens``), each with its minimum effect (:data:`MIN_SHARE_OF_NATIVE`
    of the native vector's effect on the same units; the practical floors :data:`MIN_SWEEP_RISE` and
    :data:`MIN_GEN_GAIN` where the native vector does not raise the score):

    * the forward-pass concept score at ``alpha*`` (:func:`pair_analysis`: the best
      strength at which perplexity on real text stays within ``max_ppl_ratio`` of
      unsteered) rises above no steering, and above a random vector of equal norm
      (effects in nats, one-sided permutation p, multiplied by the number of
      admissible strengths);
    * with ``gens`` (continuations generated at ``alpha*``): the topic
      classifier's probability for continuations steered by the transferred
      vector exceeds the unsteered and the random-vector continuations' (one-sided
      permutation p). Their perplexity under unsteered B is reported
      (:func:`pair_analysis`), not tested: fluency enters through ``alpha*``. The native vector's continuations
      against the unsteered ones, by the same test, are the positive control (minimum :data:`MIN_NATIVE_GAIN`):
      when the generation test cannot see B's own vector, the claim is inconclusive.

    A pair with no admissible strength gets one descriptive check without a standard error: inconclusive, since a
    coarse strength grid that misses a fluent strength is no evidence that none exists. The p-values of
    all pairs are Holm-adjusted together (:func:`embgeo_utils.core.stats.verdict`).
    """
    checks = []
    for pair in sweep["pair"].unique():
        g = gens[gens["pair"] == pair] if gens is not None else None
        r = pair_analysis(sweep[sweep["pair"] == pair], g, transfer, max_ppl_ratio, n_permutations, seed)
        checks += _pair_checks(str(pair), r, max_ppl_ratio, n_permutations)
    return verdict(checks, alpha=alpha)


# --- The chapter's pipeline: one pair, then every pair ---------------------------------------------------------


@dataclass(frozen=True)
class PairRun:
    """What chapter 6 computed for one model pair (:func:`run_pair`).

    Attributes:
        transfer: the vectors and maps (:class:`Transfer`).
        n_layers: blocks of A and of B.
        tokens: per topic, the characteristic tokens of B's tokenizer the concept score counts.
        sweep: the strength sweep (:func:`concept_sweep`'s table).
        gens: the scored continuations at ``alpha*`` (:func:`steered_generations`' table).
    """

    transfer: Transfer
    n_layers: tuple[int, int]
    tokens: dict[str, list[int]]
    sweep: pd.DataFrame
    gens: pd.DataFrame

    def heading(self) -> str:
        """One markdown line: the pair, the steered blocks, B's residual norm and whether the tables are tied."""
        tr = self.transfer
        return (
            f"**{tr.pair}**: block {tr.layer_a} of {self.n_layers[0]} in A, block {tr.layer_b} of {self.n_layers[1]} "
            f"in B; median residual norm of B {tr.norm_b:.1f}; {'tied' if tr.tied else 'separate'} input and output "
            "tables."
        )


def run_pair(
    a: LoadedModel,
    b: LoadedModel,
    texts: TopicTexts,
    prompts: Sequence[str],
    classifier: TopicClassifier,
    p: Parameters,
) -> PairRun:
    """Chapter 6, one pair: the transfer, the strength sweep, then continuations at the chosen strength.

    :func:`build_transfer`; :func:`topic_tokens` (``p.n_topic_tokens`` per topic, from the classifier summaries, in
    B's tokenizer); :func:`concept_sweep` over ``p.alphas``; :func:`steered_generations` of the first
    ``p.n_gen_prompts`` prompts under ``p.gen_conditions`` (those the transfer has), at :func:`best_strength`'s
    ``alpha*`` or, when no strength keeps perplexity within ``p.max_ppl_ratio``, the smallest swept strength.
    """
    tr = build_transfer(a, b, texts, p)
    tokens = topic_tokens(b.tokenizer, texts.classifier, k=p.n_topic_tokens)
    sweep = concept_sweep(b, tr, prompts, p.alphas, tokens, batch_size=p.batch_size)
    best = best_strength(sweep, max_ppl_ratio=p.max_ppl_ratio)
    gens = steered_generations(
        b,
        tr,
        prompts[: p.n_gen_prompts],
        best if best is not None else min(p.alphas),
        classifier,
        [c for c in p.gen_conditions if c == "none" or c in tr.vectors],
        max_new_tokens=p.max_new_tokens,
        batch_size=p.batch_size,
    )
    return PairRun(tr, (a.info.n_layers, b.info.n_layers), tokens, sweep, gens)


@dataclass(frozen=True)
class Claim9:
    """Claim 9 over every pair (chapter 6, :func:`evaluate_claim9`).

    Attributes:
        verdict: the verdict of every pair's checks together (Holm).
        per_pair: each pair's own verdict.
        numbers: per pair, the EMB2EMB vector's numbers, continuations included (:class:`PairAnalysis`).
        residual: per pair, the residual map's numbers from the sweep alone.
        cosines: per pair, the mean cosine with B's native vector of ``emb2emb``, ``residual map`` and ``null map``
            (NaN for a map not built).
        max_ppl_ratio: the fluency bound the strengths were chosen under.
    """

    verdict: Verdict
    per_pair: dict[str, Verdict]
    numbers: dict[str, PairAnalysis]
    residual: dict[str, PairAnalysis]
    cosines: dict[str, dict[str, float]]
    max_ppl_ratio: float

    @property
    def value(self) -> float | None:
        """The claim's statistic: the smallest EMB2EMB effect over the random vector over pairs (NaN for a pair
        without an admissible strength; ``None`` without pairs)."""
        effects = (n.sweep.effect_vs_random if n.sweep is not None else float("nan") for n in self.numbers.values())
        return min(effects, default=None)

    def per_pair_record(self) -> dict[str, dict[str, Any]]:
        """Per pair: its verdict and every number of :meth:`PairAnalysis.record`."""
        return {p: {"verdict": v.verdict, **self.numbers[p].record()} for p, v in self.per_pair.items()}

    def residual_record(self) -> dict[str, dict[str, float | None]]:
        """Per pair: the residual map's ``alpha*``, rise and fraction of native (``None`` without ``alpha*``)."""
        return {
            p: {
                "alpha*": r.alpha_star,
                "rise": None if r.sweep is None else r.sweep.rise,
                "fraction of native": None if r.sweep is None else r.sweep.fraction_of_native,
            }
            for p, r in self.residual.items()
        }

    def verdicts_table(self) -> pd.DataFrame:
        """One row per pair: its verdict in one line."""
        return pd.DataFrame({p: {"verdict": v.summary()} for p, v in self.per_pair.items()}).T

    def numbers_table(self) -> pd.DataFrame:
        """One row per pair, one column per number of :meth:`PairAnalysis.record`."""
        return pd.DataFrame({p: n.record() for p, n in self.numbers.items()}).T

    def summary(self, heldout_accuracy: float) -> str:
        """The chapter's summary in markdown: per pair the verdict, cosines, rises and continuation scores."""
        nan = float("nan")
        lines = [f"- Topic classifier held-out accuracy: {heldout_accuracy:.3f}."]
        for p, n in self.numbers.items():
            cos = self.cosines[p]
            lines.append(
                f"- **{p}**: claim 9 **{self.per_pair[p].verdict}**. Mean cosine with B's native vector: EMB2EMB "
                f"{cos['emb2emb']:.3f}, residual map {cos['residual map']:.3f}, null map {cos['null map']:.3f}."
            )
            if n.sweep is None:
                bound = self.max_ppl_ratio
                lines.append(f"  No swept strength kept EMB2EMB's perplexity within {bound:g}× unsteered.")
                continue
            s, g, r = n.sweep, n.generations, self.residual[p].sweep
            gen = (g.score, g.score_none, g.score_random) if g is not None else (nan, nan, nan)
            lines.append(
                f"  At alpha {s.alpha:g}: concept-score rise EMB2EMB {s.rise:.3f} nats, native {s.rise_native:.3f}, "
                f"random {s.rise_random:.3f} (fraction of native {s.fraction_of_native:.2f}); residual map reaches "
                f"{r.fraction_of_native if r is not None else nan:.2f} of native at its own best strength. "
                f"Continuations: P(topic) EMB2EMB {gen[0]:.2f} against {gen[1]:.2f} unsteered and {gen[2]:.2f} random."
            )
        lines.append(f"- Claim 9 over both pairs: **{self.verdict.summary()}**.")
        return "\n".join(lines)


def evaluate_claim9(runs: Mapping[str, PairRun], p: Parameters) -> Claim9:
    """Chapter 6: claim 9's checks and numbers for every pair, and over all pairs together.

    :func:`check_claim9` per pair and over the pairs' sweeps and continuations together (level ``p.alpha``), the
    EMB2EMB numbers of :func:`pair_analysis` with the continuations, and the residual map's from the sweep alone; all
    with ``p.max_ppl_ratio``, ``p.n_permutations`` and ``p.seed``.
    """
    kw: dict[str, Any] = {"max_ppl_ratio": p.max_ppl_ratio, "n_permutations": p.n_permutations, "seed": p.seed}
    per_pair = {name: check_claim9(r.sweep, r.gens, alpha=p.alpha, **kw) for name, r in runs.items()}
    numbers = {name: pair_analysis(r.sweep, r.gens, **kw) for name, r in runs.items()}
    residual = {name: pair_analysis(r.sweep, transfer="residual map", **kw) for name, r in runs.items()}
    sweep = pd.concat([r.sweep for r in runs.values()], ignore_index=True)
    gens = pd.concat([r.gens for r in runs.values()], ignore_index=True)
    overall = check_claim9(sweep, gens, alpha=p.alpha, **kw)
    cosines = {
        name: {c: r.transfer.mean_cosine(c) for c in ("emb2emb", "residual map", "null map")}
        for name, r in runs.items()
    }
    return Claim9(overall, per_pair, numbers, residual, cosines, p.max_ppl_ratio)


# --- Tables and the figure -------------------------------------------------------------------------------------


def sweep_summary(sweep: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Chapter 6: mean rise in concept score and geometric-mean perplexity ratio per pair, condition and alpha.

    Returns:
        One row per (pair, condition, alpha): ``pair``, ``condition``, ``alpha``, ``rise`` with its 95 % bootstrap
        interval over (topic, prompt) units ``rise low``, ``rise high`` (NaN for one unit), ``ppl ratio`` with
        ``ppl low``, ``ppl high``, and ``units``.
    """
    rows = []
    for (pair, cond, al), g in sweep.groupby(["pair", "condition", "alpha"], sort=False):
        rise = g["rise"].to_numpy()
        logr = np.log(g["ppl ratio"].to_numpy())
        lo, hi = bootstrap_ci(rise, n_boot=n_boot, seed=seed) if len(rise) > 1 else (np.nan, np.nan)
        plo, phi = bootstrap_ci(logr, n_boot=n_boot, seed=seed) if len(rise) > 1 else (np.nan, np.nan)
        rows.append(
            {
                "pair": pair,
                "condition": cond,
                "alpha": al,
                "rise": rise.mean(),
                "rise low": lo,
                "rise high": hi,
                "ppl ratio": float(np.exp(logr.mean())),
                "ppl low": float(np.exp(plo)),
                "ppl high": float(np.exp(phi)),
                "units": len(rise),
            }
        )
    return pd.DataFrame(rows)


def generation_table(gens: pd.DataFrame) -> pd.DataFrame:
    """Chapter 6: per pair and condition, the strength, the mean topic probability and the median perplexity ratio.

    Returns:
        Indexed by (``pair``, ``condition``), in the continuations' order: ``alpha``, ``topic_probability``,
        ``ppl_ratio``.
    """
    return gens.groupby(["pair", "condition"], sort=False).agg(
        alpha=("alpha", "first"), topic_probability=("score", "mean"), ppl_ratio=("ppl ratio", "median")
    )


def example_generations(
    gens: pd.DataFrame, topic: str | None = None, prompt: int = 0, width: int = 160
) -> pd.DataFrame:
    """Chapter 6: one prompt's continuations under every condition, for one topic: a table to read."""
    topic = topic or str(gens["topic"].iloc[0])
    g = gens[(gens["topic"] == topic) & (gens["prompt"] == prompt)]
    if g.empty:
        raise EmbgeoInputError(f"No continuation for topic {topic!r} and prompt {prompt}.")
    out = g[["pair", "condition", "continuation", "score", "ppl"]].copy()
    out["continuation"] = out["continuation"].str.replace("\n", " ").str.slice(0, width)
    return out.rename(columns={"score": f"P({topic})"}).reset_index(drop=True)


def plot_steering_sweep(summary: pd.DataFrame) -> Figure:
    """Chapter 6: per model pair, the concept score and the perplexity against strength, and one against the other.

    Args:
        summary: :func:`sweep_summary`'s table (mean rise with 95 % bootstrap
            interval, geometric-mean perplexity ratio with its interval).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    need_columns(
        summary,
        ("pair", "condition", "alpha", "rise", "rise low", "rise high", "ppl ratio"),
        "ch06_emb2emb.sweep_summary",
    )
    pairs = list(dict.fromkeys(summary["pair"]))
    conds = [c for c in CONDITIONS if c in set(summary["condition"]) and c != "none"]
    colors = dict(zip(conds, sns.color_palette("colorblind", n_colors=len(conds))))
    fig, axes = plt.subplots(len(pairs), 3, figsize=(14, 3.8 * len(pairs)), squeeze=False)
    for row, pair in zip(axes, pairs):
        s = summary[summary["pair"] == pair]
        for c in conds:
            g = s[s["condition"] == c].sort_values("alpha")
            col = colors[c]
            err = np.vstack([g["rise"] - g["rise low"], g["rise high"] - g["rise"]])
            row[0].errorbar(g["alpha"], g["rise"], yerr=err, marker="o", capsize=3, color=col, label=c)
            perr = np.vstack([g["ppl ratio"] - g["ppl low"], g["ppl high"] - g["ppl ratio"]])
            row[1].errorbar(g["alpha"], g["ppl ratio"], yerr=perr, marker="o", capsize=3, color=col, label=c)
            row[2].plot(g["ppl ratio"], g["rise"], marker="o", color=col, label=c)
        row[0].axhline(0, color="grey", lw=0.8)
        row[0].set_xlabel("alpha (× median residual norm of B)")
        row[0].set_ylabel("rise in log P(topic tokens) (nats)")
        row[0].set_title(f"{pair}: concept score")
        row[1].axhline(2, color="grey", ls="--", lw=0.8)
        row[1].set_yscale("log")
        row[1].set_xlabel("alpha (× median residual norm of B)")
        row[1].set_ylabel("perplexity ratio on real text (log)")
        row[1].set_title("fluency (dashed: 2× unsteered)")
        row[2].axvline(2, color="grey", ls="--", lw=0.8)
        row[2].set_xscale("log")
        row[2].set_xlabel("perplexity ratio (log)")
        row[2].set_ylabel("rise in concept score (nats)")
        row[2].set_title("score against fluency")
        row[0].legend(fontsize=8)
    return fig
