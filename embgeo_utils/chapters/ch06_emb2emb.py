"""Chapter 6, EMB2EMB: does a steering vector found in model A still steer model B once mapped into B's space?

A topic's steering vector is the mean residual activation on texts about the topic minus that on other topics.
Lee et al. carry A's vector into B through a linear map fitted on the two models' token embeddings (EMB2EMB); claim
9 says the carried vector steers B better than a random vector and better than no steering. B's own vector for the
topic (the *native* vector) is the positive control: a test that cannot see B's own vector steer cannot show that a
carried one does not.

The stages, in the order the chapter runs them, once for the development topics and once, unchanged, for the
confirmation topics:

1. Texts and the scorer. :func:`topic_texts` splits the topic-labelled Wikipedia summaries of one topic set into
   disjoint texts that build the vectors, fit the scorer, choose the score tokens and validate the scorer
   (:class:`TopicTexts`); :func:`neutral_texts` takes held-out prompts and "other" text from speeches and news
   (:class:`NeutralTexts`); :func:`fit_scorer` fits the topic scorer on windows of continuation length and
   validates it on held-out windows (:class:`Scorer`); :func:`topic_tokens` picks the score tokens.
2. One pair (:func:`run_pair`, :class:`PairRun`): :func:`build_transfer` finds each topic's vector in A and in B,
   fits the maps on clean rows and carries A's vectors into B (:class:`Transfer`, with the lexical, shuffled-map and
   random controls); :func:`next_token_scores` measures every condition in forward passes (the log-probability of
   the topic's score tokens as the next token); :func:`steered_continuations` generates greedy and seeded sampled
   continuations of the held-out prompts at every strength, and :func:`score_continuations` scores them.
3. The claim: :func:`pair_analysis` turns a pair into paired comparisons over prompts and distribution
   comparisons over random directions (:class:`PairAnalysis`); :func:`check_claim9` makes the checks, with the
   native vector as the positive control, and :func:`evaluate_claim9` gives one topic set's verdict
   (:class:`Claim9`). :func:`dose_response`, :func:`strength_units`, :func:`example_generations` and
   :func:`plot_dose_response` are the tables and the figure.

References:
    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared global and local
    geometry of language model embeddings, arXiv:2503.21073.

    A. M. Turner et al. (2023), Activation addition: steering language models
    without optimization, arXiv:2308.10248.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..core.cache import cached
from ..core.errors import EmbgeoInputError
from ..core.stats import Check, Verdict, bootstrap_ci, paired_permutation, permutation_p, verdict
from ..lm.corpus import documents, wiki_summaries
from ..lm.emb2emb import (
    LinearMap,
    cached_states,
    clean_rows,
    embedding_pairs,
    fit_linear_map,
    matching_layer,
    residual_pairs,
)
from ..lm.models import LoadedModel, block_output_hook, transformer_blocks
from ..lm.steering import (
    TopicClassifier,
    encode_texts,
    fit_topic_classifier,
    generate_ids,
    last_token_logits,
    resume_after,
    sequence_nll,
    steer,
)
from ..lm.undertrained import find_undertrained
from .style import COLUMN_INCHES, need_columns

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CHAPTER",
    "CONDITIONS",
    "CONTROL_MIN_FORWARD",
    "CONTROL_MIN_GENERATION",
    "Claim9",
    "Comparison",
    "DistributionComparison",
    "FRACTION_OF_NATIVE",
    "CANDIDATE_COLUMNS",
    "CONTROL_SOURCE",
    "claim_checks",
    "usable_strengths",
    "MAX_PPL_RATIO",
    "GENERATED",
    "NeutralTexts",
    "OTHER",
    "PairAnalysis",
    "PairRun",
    "Parameters",
    "RANDOM_KINDS",
    "Scorer",
    "TITLE",
    "TopicTexts",
    "Transfer",
    "beyond_random",
    "build_transfer",
    "check_claim9",
    "compare_prompts",
    "dose_response",
    "evaluate_claim9",
    "example_generations",
    "fit_scorer",
    "neutral_prompts",
    "neutral_texts",
    "next_token_scores",
    "pair_analysis",
    "plot_dose_response",
    "run_pair",
    "score_continuations",
    "steered_continuations",
    "strength_units",
    "topic_texts",
    "topic_tokens",
]


CHAPTER = "ch06_emb2emb"
TITLE = "EMB2EMB: steering vectors carried across models"

#: Steering conditions in B, in the order figures and tables show them (the random kinds are many directions each).
CONDITIONS = (
    "none",
    "native",
    "emb2emb",
    "emb2emb (unembedding)",
    "residual map",
    "null map",
    "lexical",
    "random (isotropic)",
    "random (residual)",
)
#: The two kinds of random direction: Gaussian, and differences of means of random splits of texts about other topics.
RANDOM_KINDS = ("random (isotropic)", "random (residual)")
#: The conditions continued by generation (the others are measured in forward passes only).
GENERATED = ("none", "native", "emb2emb", "random (residual)")
#: The scorer's class for text about none of the topics.
OTHER = "other"
#: Smallest rise of the native vector's topic probability in continuations that counts as steering (positive control).
CONTROL_MIN_GENERATION = 0.05
#: Smallest rise of the native vector's next-token score (nats) that counts as steering (positive control).
CONTROL_MIN_FORWARD = 0.1
#: The fraction of the native vector's effect a carried vector must reach to count as steering.
FRACTION_OF_NATIVE = 0.25
#: Largest median perplexity ratio (continuations under unsteered B, against the unsteered continuation of the same
#: prompt and seed) at which a vector's continuations count as steered text rather than broken text; a strength is
#: read only where both B's own vector and EMB2EMB stay within it (chapter 6, :func:`usable_strengths`).
MAX_PPL_RATIO = 2.0


@dataclass(frozen=True)
class Parameters:
    """Chapter 6's parameters: the fields of its cell tagged ``parameters`` (defaults and allowed values are there)."""

    pairs: list[list[str]]
    encoder: str
    topics: list[str]
    confirm_topics: list[str]
    depth: float
    n_build: int
    n_classifier: int
    n_score_texts: int
    n_heldout: int
    n_other: int
    n_map_texts: int
    max_tokens: int
    map_rows: int
    ridge: float
    min_map_rows: int | None
    n_prompts: int
    prompt_words: int
    window_words: int
    strengths: list[float]
    sweep_strengths: list[float]
    n_sweep_prompts: int
    n_topic_tokens: int
    n_random: int
    n_random_prompts: int
    n_samples: int
    top_k: int
    temperature: float
    max_new_tokens: int
    n_ppl_prompts: int
    n_permutations: int
    batch_size: int
    gen_batch_size: int
    alpha: float
    seed: int
    device: str

    def models(self) -> list[str]:
        """The scorer's encoder, then every model the pairs name, in order."""
        return [self.encoder] + [name for pair in self.pairs for name in pair]

    def causal_models(self) -> list[str]:
        """The models that must be causal language models: both of every pair (B generates, A gives its vectors)."""
        return [name for pair in self.pairs for name in pair]

    def topic_sets(self) -> dict[str, list[str]]:
        """``{"development": topics, "confirmation": confirm_topics}``, the second only when given."""
        sets = {"development": list(self.topics)}
        if self.confirm_topics:
            sets["confirmation"] = list(self.confirm_topics)
        return sets


# --- Stage 1: texts, prompts, the scorer and the score tokens ----------------------------------------------------


@dataclass(frozen=True)
class TopicTexts:
    """Topic-labelled summaries of one topic set, split by use (chapter 6, :func:`topic_texts`); no text has two uses.

    Attributes:
        topics: the topics steered towards.
        build: per topic, the summaries the steering vectors are found on.
        classifier: per topic, the summaries whose windows fit the scorer.
        score: per topic, the summaries the score tokens are chosen from (:func:`topic_tokens`).
        heldout: per topic, summaries whose windows validate the scorer.
        other: summaries of topics outside every topic set, for the scorer's "other" class (fit).
        other_heldout: more such summaries, for its validation.
        map_texts: summaries of topics outside every topic set, for the residual map (never a vector or the scorer).
    """

    topics: list[str]
    build: dict[str, list[str]]
    classifier: dict[str, list[str]]
    score: dict[str, list[str]]
    heldout: dict[str, list[str]]
    other: list[str]
    other_heldout: list[str]
    map_texts: list[str]


def _stable_seed(seed: int, name: str) -> list[int]:
    return [int(seed), zlib.crc32(name.encode())]


def _check_topics(topics: list[str], every: list[str], known: list[str]) -> None:
    if len(topics) < 2 or len(set(topics)) != len(topics):
        raise EmbgeoInputError(f"Give at least two distinct topics, got {topics}.")
    unknown = [t for t in every if t not in known]
    if unknown:
        raise EmbgeoInputError(f"Unknown topic(s) {unknown}; the summaries have {known}.")


def topic_texts(p: Parameters, topics: Sequence[str]) -> TopicTexts:
    """Chapter 6: split the Wikipedia summaries of ``topics`` into build, scorer, score-token and held-out texts.

    Per topic, in an order seeded by ``p.seed`` and the topic's name (so a topic's split does not depend on the
    other topics): ``p.n_heldout`` held out, ``p.n_classifier`` for the scorer, ``p.n_score_texts`` for the score
    tokens, ``p.n_build`` for the vectors. Topics outside ``p.topics`` and ``p.confirm_topics`` (and not
    "Uncategorized") give the "other" texts (``p.n_other`` to fit, ``p.n_other`` held out) and ``p.n_map_texts``
    residual-map texts, the same for every topic set.

    Raises:
        EmbgeoInputError: fewer than two distinct topics, an unknown topic, or too few summaries for a topic.
    """
    topics = list(topics)
    rows = wiki_summaries()
    known = sorted({r["topic"] for r in rows})
    every = list(dict.fromkeys([*p.topics, *p.confirm_topics, *topics]))
    _check_topics(topics, every, known)
    sizes = (p.n_heldout, p.n_classifier, p.n_score_texts, p.n_build)
    if min(sizes) < 1:
        raise EmbgeoInputError(f"Every split needs at least one summary per topic, got {sizes}.")
    parts: dict[str, dict[str, list[str]]] = {k: {} for k in ("heldout", "classifier", "score", "build")}
    for t in topics:
        texts = [r["extract"] for r in rows if r["topic"] == t]
        if len(texts) < sum(sizes):
            raise EmbgeoInputError(f"Topic {t!r} has {len(texts)} summaries; {sum(sizes)} are needed. Ask for fewer.")
        order = np.random.default_rng(_stable_seed(p.seed, t)).permutation(len(texts))
        edges = np.cumsum((0, *sizes))
        for part, lo, hi in zip(parts.values(), edges[:-1], edges[1:]):
            part[t] = [texts[i] for i in order[lo:hi]]
    rest = [r["extract"] for r in rows if r["topic"] not in every and r["topic"] != "Uncategorized"]
    order = np.random.default_rng(_stable_seed(p.seed, "other topics")).permutation(len(rest))
    need = 2 * p.n_other + p.n_map_texts
    if len(rest) < need:
        raise EmbgeoInputError(f"Only {len(rest)} summaries outside the topic sets; {need} are needed. Ask for fewer.")
    pool = [rest[i] for i in order[:need]]
    return TopicTexts(
        topics, parts["build"], parts["classifier"], parts["score"], parts["heldout"],
        pool[: p.n_other], pool[p.n_other : 2 * p.n_other], pool[2 * p.n_other :],
    )  # fmt: skip


def _neutral_paragraphs(n_words: int, sources: Sequence[str], seed: int) -> list[str]:
    """Paragraphs of at least ``2 * n_words`` words without markup, drawn from ``sources`` in turn (seeded)."""
    pools = []
    for k, source in enumerate(sources):
        paras = [p for _title, _domain, ps in documents(source) for p in ps if len(p.split()) >= 2 * n_words]
        order = np.random.default_rng([seed, k]).permutation(len(paras))
        pools.append([paras[i] for i in order if not set(" ".join(paras[i].split()[:n_words])) & set("|=[]{}<>()_\\")])
    out: list[str] = []
    for i in range(max(len(p) for p in pools)):
        out += [pool[i] for pool in pools if i < len(pool)]
    return out


def neutral_prompts(
    n: int, n_words: int = 12, sources: Sequence[str] = ("sotu", "lee-news"), seed: int = 0
) -> list[str]:
    """Chapter 6: the first ``n_words`` words of ``n`` real paragraphs, drawn in turn from ``sources``.

    Neutral prompts for steering: real openings of other texts than the topic summaries; by default State of the
    Union addresses and news stories (the full-article dumps keep table and markup residue). Paragraphs shorter than
    ``2 * n_words`` words, and openings with markup or brackets, are skipped; the draw is seeded.
    """
    if n < 1 or n_words < 2:
        raise EmbgeoInputError(f"Need n >= 1 and n_words >= 2, got {n} and {n_words}.")
    out: list[str] = []
    for para in _neutral_paragraphs(n_words, sources, seed):
        head = " ".join(para.split()[:n_words])
        if head not in out:
            out.append(head)
        if len(out) == n:
            return out
    raise EmbgeoInputError(f"Only {len(out)} prompts available from {list(sources)}; ask for fewer.")


@dataclass(frozen=True)
class NeutralTexts:
    """Speech and news text of chapter 6 (:func:`neutral_texts`): the prompts and the scorer's neutral "other" text.

    Attributes:
        prompts: openings of ``prompt_words`` words, the held-out prompts every condition continues.
        fit: windows of other paragraphs (never a prompt's), for the scorer's "other" class.
        heldout: windows of further paragraphs, for its validation.
    """

    prompts: list[str]
    fit: list[str]
    heldout: list[str]


def neutral_texts(p: Parameters) -> NeutralTexts:
    """Chapter 6: ``p.n_prompts`` prompts (:func:`neutral_prompts`), then windows of ``p.window_words`` words from
    ``p.n_other`` further paragraphs to fit the scorer and ``p.n_other`` more to validate it."""
    prompts = neutral_prompts(p.n_prompts, p.prompt_words, seed=p.seed)
    paragraphs = _neutral_paragraphs(p.prompt_words, ("sotu", "lee-news"), p.seed)
    used = set(prompts)
    rest = [x for x in paragraphs if " ".join(x.split()[: p.prompt_words]) not in used]
    if len(rest) < 2 * p.n_other:
        raise EmbgeoInputError(f"Only {len(rest)} neutral paragraphs left for the scorer; ask for fewer (n_other).")
    windows = _windows(rest[: 2 * p.n_other], p.window_words, 1, p.seed)
    return NeutralTexts(prompts, windows[: p.n_other], windows[p.n_other :])


def _windows(texts: Sequence[str], n_words: int, per_text: int, seed: int) -> list[str]:
    """``per_text`` windows of ``n_words`` consecutive words from each text, at seeded positions (whole text if short)."""
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        words = text.split()
        for _ in range(per_text):
            start = int(rng.integers(0, max(1, len(words) - n_words + 1)))
            out.append(" ".join(words[start : start + n_words]))
    return out


@dataclass
class Scorer:
    """The topic scorer of one topic set and its validation on continuation-length text (chapter 6, :func:`fit_scorer`).

    Attributes:
        classifier: logistic regression on MiniLM sentence embeddings; classes are the topics and ``"other"``.
        window_words: the length of the windows it was fitted and validated on (about a continuation's length).
        validation: one row per class: ``class``, ``windows`` (held-out windows), ``recall`` (fraction classified
            as that class); the accuracy over all held-out windows is :attr:`accuracy`.
    """

    classifier: TopicClassifier
    window_words: int
    validation: pd.DataFrame = field(repr=False)

    @property
    def accuracy(self) -> float:
        """Accuracy on every held-out window (topic windows and "other" windows)."""
        return float(self.classifier.heldout_accuracy)

    @property
    def classes(self) -> list[str]:
        """The class names, in the order of the probability columns."""
        return list(self.classifier.topics)

    def proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities ``(texts, classes)``; an empty text scores as ``"."``."""
        return np.asarray(self.classifier.proba([x if x.strip() else "." for x in texts]))


def fit_scorer(encoder: LoadedModel, texts: TopicTexts, neutral: NeutralTexts, p: Parameters) -> Scorer:
    """Chapter 6: the topic scorer of one topic set, fitted and validated on windows of ``p.window_words`` words.

    Continuations are short and most are about none of the topics, so the scorer sees text of that kind: two windows
    from each ``classifier`` summary per topic, and an ``"other"`` class of windows of summaries of other topics and
    of speech and news paragraphs (never a prompt's). It is validated on one window of each ``heldout`` summary and
    of the held-out "other" texts; the score of a continuation is the probability of its topic.
    """
    w = p.window_words
    fit = [(x, t) for t in texts.topics for x in _windows(texts.classifier[t], w, 2, p.seed)]
    fit += [(x, OTHER) for x in _windows(texts.other, w, 1, p.seed) + neutral.fit]
    held = [(x, t) for t in texts.topics for x in _windows(texts.heldout[t], w, 1, p.seed + 1)]
    held += [(x, OTHER) for x in _windows(texts.other_heldout, w, 1, p.seed + 1) + neutral.heldout]
    clf = fit_topic_classifier(
        encoder, [x for x, _ in fit], [t for _, t in fit], [x for x, _ in held], [t for _, t in held], seed=p.seed
    )
    pred = np.asarray(clf.topics)[np.asarray(clf.proba([x for x, _ in held])).argmax(axis=1)]
    truth = np.asarray([t for _, t in held])
    rows = [
        {"class": c, "windows": int((truth == c).sum()), "recall": float((pred[truth == c] == c).mean())}
        for c in clf.topics
    ]
    return Scorer(clf, w, pd.DataFrame(rows))


def topic_tokens(tokenizer: Any, texts: dict[str, list[str]], k: int = 50, min_count: int = 3) -> dict[str, list[int]]:
    """Chapter 6: the ``k`` tokens most characteristic of each topic, in one tokenizer.

    Word-initial alphabetic tokens of at least 3 letters, ranked by the smoothed log ratio of their frequency in the
    topic's texts to their frequency in the other topics' texts; a token must occur at least ``min_count`` times in
    its topic. The chapter passes the ``score`` summaries, which build nothing else.
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


# --- Stage 2a: vectors in A and B, the maps, the controls, and A's vectors carried into B ------------------------

#: A dimension of the residual stream is "massive" when its RMS over tokens exceeds this multiple of the median one's.
MASSIVE_FACTOR = 10.0


@dataclass
class Transfer:
    """Steering directions of one model pair and topic set, all in B's space (chapter 6, :func:`build_transfer`).

    Attributes:
        names: ``(A, B)``.
        n_layers: blocks of A and of B.
        layer_a, layer_b: the blocks steered (same relative depth).
        topics: the topics.
        unit: the strength unit: the mean norm of B's native topic vectors at ``layer_b``. A strength of 1 adds a
            vector as long as B's own difference of topic means.
        scales: B's residual scales at ``layer_b`` over the build texts' tokens (first position and BOS left out):
            ``median norm``, ``massive dims`` (how many dimensions have an RMS over ten times the median
            dimension's) and ``median norm without massive dims``.
        vectors_a: A's topic vectors.
        vectors: ``{condition: {topic: vector in B}}`` for the named conditions (``native``, ``emb2emb``,
            ``emb2emb (unembedding)`` where both models have their own output table, ``residual map``,
            ``null map``, ``lexical``), in :data:`CONDITIONS` order.
        random: ``{kind: (n, d) unit directions}`` for :data:`RANDOM_KINDS`.
        maps: the fitted maps by name, ``emb2emb (all rows)`` among them (fitted without the row filter, for its R²).
        map_rows: what :func:`~embgeo_utils.lm.emb2emb.clean_rows` kept of the shared vocabulary.
        tied: whether both models use one table for input embeddings and unembeddings.
        cosines: one row per named condition and topic: ``condition``, ``topic``, ``cosine with native``,
            ``isotropic q99`` (99th percentile of |cosine| of a random direction at B's width),
            ``residual q99`` (of |cosine| between the native vector and the residual random directions) and
            ``norm / unit``; ``None`` for a transfer built by hand.
    """

    names: tuple[str, str]
    n_layers: tuple[int, int]
    layer_a: int
    layer_b: int
    topics: list[str]
    unit: float
    scales: dict[str, float]
    vectors_a: dict[str, torch.Tensor]
    vectors: dict[str, dict[str, torch.Tensor]]
    random: dict[str, torch.Tensor]
    maps: dict[str, LinearMap] = field(default_factory=dict)
    map_rows: dict[str, int] = field(default_factory=dict)
    tied: bool = True
    cosines: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def pair(self) -> str:
        """``"A → B"``, the pair's label in every table."""
        return f"{self.names[0]} → {self.names[1]}"

    @property
    def conditions(self) -> list[str]:
        """The named conditions, in :data:`CONDITIONS` order."""
        return [c for c in CONDITIONS if c in self.vectors]

    def direction(self, condition: str, topic: str) -> torch.Tensor:
        """Unit vector of a named ``condition`` for ``topic`` (zeros for ``"none"``)."""
        if condition == "none":
            return torch.zeros(next(iter(self.vectors["native"].values())).numel())
        v = self.vectors[condition][topic].float()
        return v / v.norm().clamp_min(1e-12)

    def cache_key(self) -> dict[str, Any]:
        """What a cached table of this transfer depends on (:func:`embgeo_utils.core.cache.key_part` reads it): the
        pair, B's block, the strength unit, the topics and conditions, and every unit direction that steers B."""
        named = [self.direction(c, t) for c in self.conditions for t in self.topics]
        return {
            "names": list(self.names),
            "layer_b": self.layer_b,
            "unit": self.unit,
            "topics": list(self.topics),
            "conditions": self.conditions,
            "directions": torch.stack(named) if named else torch.zeros(0),
            "random": {k: v.float() for k, v in self.random.items()},
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

    def heading(self) -> str:
        """One markdown line: the pair, the steered blocks, the strength unit and whether the tables are tied."""
        s = self.scales
        return (
            f"**{self.pair}**: block {self.layer_a} of {self.n_layers[0]} in A, block {self.layer_b} of "
            f"{self.n_layers[1]} in B; strength unit (mean norm of B's topic vectors) {self.unit:.2f} = "
            f"{self.unit / s['median norm']:.3f} of B's median residual norm and "
            f"{self.unit / s['median norm without massive dims']:.3f} of that norm without its "
            f"{int(s['massive dims'])} massive dimensions; {'tied' if self.tied else 'separate'} input and output tables."
        )


def _tied(m: LoadedModel) -> bool:
    out = m.model.get_output_embeddings()
    return out is None or out.weight is m.model.get_input_embeddings().weight


def _topic_vectors(means: torch.Tensor, labels: list[str], topics: list[str]) -> dict[str, torch.Tensor]:
    lab = np.array(labels)
    out = {}
    for t in topics:
        pos = torch.as_tensor(lab == t)
        out[t] = means[pos].mean(dim=0) - means[~pos].mean(dim=0)
    return out


def _residual_scales(states: list[torch.Tensor]) -> dict[str, float]:
    """Chapter 6: B's median token norm, its massive dimensions (RMS > :data:`MASSIVE_FACTOR` x the median
    dimension's) and the median token norm without them."""
    h = torch.cat(states).float()
    rms = h.pow(2).mean(dim=0).sqrt()
    massive = rms > MASSIVE_FACTOR * rms.median()
    return {
        "median norm": float(h.norm(dim=1).median()),
        "massive dims": float(int(massive.sum())),
        "median norm without massive dims": float(h[:, ~massive].norm(dim=1).median()),
    }


def _native_vectors(
    a: LoadedModel, b: LoadedModel, texts: TopicTexts, layer_a: int, layer_b: int, max_tokens: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """A's and B's topic vectors from the ``build`` summaries, and B's residual scales on them (chapter 6)."""
    labels = [t for t in texts.topics for _ in texts.build[t]]
    flat = [x for t in texts.topics for x in texts.build[t]]
    states_a = cached_states(a, flat, layer_a, max_tokens=max_tokens)
    states_b = cached_states(b, flat, layer_b, max_tokens=max_tokens)
    vec_a = _topic_vectors(torch.stack([h.mean(dim=0) for h in states_a]), labels, texts.topics)
    vec_b = _topic_vectors(torch.stack([h.mean(dim=0) for h in states_b]), labels, texts.topics)
    return vec_a, vec_b, _residual_scales(states_b)


@cached("undertrained_rows", version=1)
def _flags(m: LoadedModel) -> np.ndarray:
    """Chapter 6: the rows of a model's input table that the under-trained-token detector flags (cached per model)."""
    table = m.model.get_input_embeddings().weight.detach().float().cpu()
    return find_undertrained(m.info.name, table, m.tokenizer).flagged


def _fit_maps(
    a: LoadedModel, b: LoadedModel, texts: TopicTexts, layer_a: int, layer_b: int, p: Parameters
) -> tuple[dict[str, LinearMap], dict[str, int], bool]:
    """Chapter 6: the maps from A to B (:func:`build_transfer` lists them), the row counts, and whether tied."""
    xa, xb, shared = embedding_pairs(a, b, "input")
    keep, counts = clean_rows(xa, xb, shared.ids_a, shared.ids_b, _flags(a), _flags(b))
    rng = np.random.default_rng(p.seed)
    every = np.sort(rng.permutation(xa.shape[0])[: min(p.map_rows, xa.shape[0])])
    clean = np.flatnonzero(keep)
    pick = torch.as_tensor(np.sort(rng.permutation(clean)[: min(p.map_rows, clean.size)]))
    maps = {"emb2emb": fit_linear_map(xa[pick], xb[pick], ridge=p.ridge, seed=p.seed)}
    maps["emb2emb (all rows)"] = fit_linear_map(
        xa[torch.as_tensor(every)], xb[torch.as_tensor(every)], ridge=p.ridge, seed=p.seed
    )
    shuffled = torch.as_tensor(rng.permutation(len(pick)))
    maps["null map"] = fit_linear_map(xa[pick], xb[pick][shuffled], ridge=p.ridge, seed=p.seed)
    tied = _tied(a) and _tied(b)
    if not _tied(a) and not _tied(b):
        oa, ob, _ = embedding_pairs(a, b, "output")
        maps["emb2emb (unembedding)"] = fit_linear_map(oa[pick], ob[pick], ridge=p.ridge, seed=p.seed)
    ra, rb = residual_pairs(a, b, texts.map_texts, layer_a, layer_b, max_tokens=p.max_tokens)
    maps["residual map"] = fit_linear_map(ra, rb, ridge=p.ridge, seed=p.seed, min_rows=p.min_map_rows)
    return maps, counts, tied


def _random_directions(means_b: torch.Tensor, n_pos: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Chapter 6: ``n`` Gaussian unit directions, and ``n`` differences of means of random splits of texts about none
    of the topics (per-text means ``means_b``; ``n_pos`` texts against the rest, as a topic against the others),
    normalised."""
    if not 1 <= n_pos < means_b.shape[0]:
        raise EmbgeoInputError(
            f"Random splits of {means_b.shape[0]} texts need 1 <= {n_pos} < that; give more map texts."
        )
    gen = torch.Generator().manual_seed(seed)
    iso = torch.randn(n, means_b.shape[1], generator=gen)
    rng = np.random.default_rng(_stable_seed(seed, "residual splits"))
    diffs = []
    for _ in range(n):
        pos = np.zeros(means_b.shape[0], dtype=bool)
        pos[rng.choice(means_b.shape[0], size=n_pos, replace=False)] = True
        diffs.append(means_b[torch.as_tensor(pos)].mean(dim=0) - means_b[torch.as_tensor(~pos)].mean(dim=0))
    unit = torch.nn.functional.normalize
    return {RANDOM_KINDS[0]: unit(iso, dim=1), RANDOM_KINDS[1]: unit(torch.stack(diffs).float(), dim=1)}


def _cosine_table(transfer: Transfer) -> pd.DataFrame:
    """Chapter 6: :attr:`Transfer.cosines`; the isotropic chance level is exact (a Beta law at B's width)."""
    from scipy.stats import beta

    d = next(iter(transfer.vectors["native"].values())).numel()
    iso = float(2 * beta.ppf(0.995, (d - 1) / 2, (d - 1) / 2) - 1)
    rows = []
    for cond in transfer.conditions:
        for t in transfer.topics:
            nat = transfer.direction("native", t)
            rows.append(
                {
                    "condition": cond,
                    "topic": t,
                    "cosine with native": float(transfer.direction(cond, t) @ nat),
                    "isotropic q99": iso,
                    "residual q99": float(torch.quantile((transfer.random[RANDOM_KINDS[1]] @ nat).abs(), 0.99)),
                    "norm / unit": float(transfer.vectors[cond][t].norm()) / transfer.unit,
                }
            )
    return pd.DataFrame(rows)


def build_transfer(
    a: LoadedModel, b: LoadedModel, texts: TopicTexts, tokens: dict[str, list[int]], p: Parameters
) -> Transfer:
    """Chapter 6: find the topic vectors in A and B, fit the maps, carry A's vectors into B, build the controls.

    A's block is ``round(p.depth * layers of A)``, B's the block at the same relative depth. A topic's vector is the
    mean residual of its ``build`` summaries minus that of the other topics' (each text its own mean over positions,
    the first position and BOS left out, at most ``p.max_tokens`` tokens). Maps (ridge ``p.ridge``): ``emb2emb`` on
    the input embeddings of at most ``p.map_rows`` shared tokens that are trained in both models and not repeated
    (:func:`~embgeo_utils.lm.emb2emb.clean_rows`); ``emb2emb (all rows)`` on as many shared tokens without that
    filter (its R² only); ``emb2emb (unembedding)`` on the output tables when both models have their own;
    ``null map`` on the clean rows with B's rows shuffled; ``residual map`` on paired residual activations of
    ``map_texts``. Controls: ``lexical``, the mean of B's input embeddings of the topic's score ``tokens`` (centred
    on the clean rows' mean); ``p.n_random`` isotropic directions and ``p.n_random`` residual ones, each the
    difference of means between a random third of the ``map_texts`` (about none of the topics) and the rest, as a
    topic's vector is a third of the build texts against the rest (:data:`RANDOM_KINDS`).
    """
    n_a, n_b = a.info.n_layers, b.info.n_layers
    layer_a = max(1, min(n_a - 1, round(p.depth * n_a)))
    layer_b = matching_layer(layer_a, n_a, n_b)
    vec_a, native, scales = _native_vectors(a, b, texts, layer_a, layer_b, p.max_tokens)
    means_b = torch.stack([h.mean(dim=0) for h in cached_states(b, texts.map_texts, layer_b, max_tokens=p.max_tokens)])
    n_pos = round(means_b.shape[0] / len(texts.topics))
    maps, counts, tied = _fit_maps(a, b, texts, layer_a, layer_b, p)
    vectors: dict[str, dict[str, torch.Tensor]] = {"native": native}
    for name in ("emb2emb", "emb2emb (unembedding)", "residual map", "null map"):
        if name in maps:
            vectors[name] = {t: maps[name].apply(vec_a[t]) for t in texts.topics}
    table = b.model.get_input_embeddings().weight.detach().float().cpu()
    centre = maps["emb2emb"].mean_b.float()
    vectors["lexical"] = {t: table[torch.as_tensor(tokens[t])].mean(dim=0) - centre for t in texts.topics}
    unit = float(np.mean([float(v.norm()) for v in native.values()]))
    tr = Transfer(
        (a.info.name, b.info.name), (n_a, n_b), layer_a, layer_b, list(texts.topics), unit, scales, vec_a,
        {c: vectors[c] for c in CONDITIONS if c in vectors}, _random_directions(means_b, n_pos, p.n_random, p.seed),
        maps, counts, tied,
    )  # fmt: skip
    tr.cosines = _cosine_table(tr)
    return tr


# --- Stage 2b: the next-token score of every condition (forward passes) ------------------------------------------


def _right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _topic_logp(logits: torch.Tensor, token_ids: list[torch.Tensor]) -> torch.Tensor:
    """``(rows, topics)``: log of the probability the next token is one of each topic's score tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.stack([torch.logsumexp(logp[:, ids], dim=-1) for ids in token_ids], dim=1)


@cached("next_token_scores", version=1, ignore=("progress",))
@torch.no_grad()
def _job_scores(
    b: LoadedModel,
    device: torch.device,
    layer: int,
    prompts: list[str],
    rows: np.ndarray,
    vectors: torch.Tensor,
    tokens: list[list[int]],
    batch_size: int,
    progress: bool = False,
) -> np.ndarray:
    """Chapter 6: ``(len(prompts) + len(rows), topics)`` next-token log-probabilities of each topic's ``tokens``:
    first every prompt unsteered, then prompt ``rows[j]`` with ``vectors[j]`` added to block ``layer``'s output.

    Blocks up to ``layer`` run once, unsteered (:func:`~embgeo_utils.lm.steering.resume_after`); the head runs at
    each prompt's last token only (:func:`~embgeo_utils.lm.steering.last_token_logits`). Cached under B (weights,
    dtype), the device type, the block, the prompts, rows, vectors, tokens and batch size.
    """
    from ..core.progress import tqdm

    pad = b.tokenizer.pad_token_id if b.tokenizer.pad_token_id is not None else (b.tokenizer.eos_token_id or 0)
    ids, mask = _right_pad(encode_texts(b, prompts, max_tokens=10_000), int(pad))
    ids, mask = ids.to(b.device), mask.to(b.device)
    token_ids = [torch.as_tensor(t, device=b.device) for t in tokens]
    kept: list[torch.Tensor] = []

    def keep(h: torch.Tensor) -> torch.Tensor:
        kept.append(h)
        return h

    with block_output_hook(transformer_blocks(b.model)[layer - 1], keep):
        out = [_topic_logp(last_token_logits(b, ids, mask), token_ids)]
    hidden = kept[0]
    bar = tqdm(total=len(rows), desc=f"{b.info.name} next-token scores", disable=not progress, mininterval=2.0)
    for start in range(0, len(rows), batch_size):
        r = torch.as_tensor(rows[start : start + batch_size], device=b.device)
        with resume_after(b, layer, hidden[r]), steer(b, layer, vectors[start : start + batch_size], 1.0):
            out.append(_topic_logp(last_token_logits(b, ids[r], mask[r]), token_ids))
        bar.update(len(r))
    bar.close()
    return torch.cat(out).cpu().numpy()


def next_token_scores(
    b: LoadedModel,
    transfer: Transfer,
    prompts: Sequence[str],
    tokens: dict[str, list[int]],
    p: Parameters,
    *,
    progress: bool = False,
) -> pd.DataFrame:
    """Chapter 6: the next-token score of every condition, topic, strength and prompt, from forward passes.

    A condition's unit direction is added at ``strength * transfer.unit`` to B's block ``transfer.layer_b`` at every
    position; the **score** on a topic is the log of the probability B gives, as the token after the prompt, to the
    topic's score ``tokens``, and its **rise** is the score minus the unsteered score of the same prompt and topic.
    The named conditions run on the first ``p.n_sweep_prompts`` prompts at every ``p.sweep_strengths``; each of the
    ``p.n_random`` directions of both random kinds on the first ``p.n_random_prompts`` prompts at every
    ``p.strengths``. Every pass is scored on every topic, so a topic's vector is also scored on the other topics
    (the topic-swap control). Cached (kind ``next_token_scores``).

    Returns:
        One row per (condition, steered topic, direction, strength, prompt, scored topic): ``condition``, ``topic``
        (the steered topic; empty for random directions), ``direction`` (index of a random direction, -1 otherwise),
        ``strength``, ``prompt`` (index), ``scored`` (the topic scored), ``score``, ``rise``.
    """
    topics = transfer.topics
    jobs = [
        (c, t, -1, float(s), i)
        for c in transfer.conditions for t in topics for s in p.sweep_strengths for i in range(min(p.n_sweep_prompts, len(prompts)))
    ]  # fmt: skip
    jobs += [
        (kind, "", k, float(s), i)
        for kind in RANDOM_KINDS for k in range(p.n_random) for s in p.strengths for i in range(min(p.n_random_prompts, len(prompts)))
    ]  # fmt: skip
    vecs = torch.stack(
        [(transfer.direction(c, t) if k < 0 else transfer.random[c][k]) * (s * transfer.unit) for c, t, k, s, _ in jobs]
    )
    rows = np.asarray([i for *_, i in jobs], dtype=np.int64)
    scores = _job_scores(
        b, b.device, transfer.layer_b, list(prompts), rows, vecs, [list(map(int, tokens[t])) for t in topics],
        p.batch_size, progress=progress,
    )  # fmt: skip
    base, steered = scores[: len(prompts)], scores[len(prompts) :]
    meta = pd.DataFrame(jobs, columns=["condition", "topic", "direction", "strength", "prompt"])
    frames = [
        meta.assign(scored=t, score=steered[:, j], rise=steered[:, j] - base[rows, j]) for j, t in enumerate(topics)
    ]
    none = pd.DataFrame(
        {"condition": "none", "topic": "", "direction": -1, "strength": 0.0, "prompt": range(len(prompts))}
    )
    frames += [none.assign(scored=t, score=base[:, j], rise=0.0) for j, t in enumerate(topics)]
    return pd.concat(frames, ignore_index=True)


# --- Stage 2c: steered continuations -------------------------------------------------------------------------------


@cached("steered_continuations", version=2, ignore=("progress",))
@torch.no_grad()
def _generated(
    b: LoadedModel,
    device: torch.device,
    layer: int,
    prompts: list[str],
    rows: np.ndarray,
    seeds: list[int | None],
    vectors: torch.Tensor | None,
    gen: dict[str, Any],
    n_ppl_prompts: int,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Chapter 6: continuations of prompt ``rows[j]`` with seed ``seeds[j]`` (``None``: greedy), steered by
    ``vectors[j]`` at block ``layer`` (unsteered when ``vectors`` is None), generated with
    :func:`~embgeo_utils.lm.steering.generate_ids` (``gen``: ``max_new_tokens``, ``top_k``, ``temperature``,
    ``batch_size``), and the mean loss of each under unsteered B for rows whose prompt is among the first
    ``n_ppl_prompts`` (NaN elsewhere). Returns ``ids`` (every continuation's tokens, end to end), ``lengths`` and
    ``nll``. Cached under B, the device type and every argument."""
    heads = encode_texts(b, prompts, max_tokens=10_000)
    seqs = [heads[int(r)] for r in rows]
    new = generate_ids(
        b, seqs, gen["max_new_tokens"], seeds=seeds, vectors=vectors, layer=layer if vectors is not None else None,
        top_k=gen["top_k"], temperature=gen["temperature"], batch_size=gen["batch_size"], progress=progress,
    )  # fmt: skip
    nll = np.full(len(rows), np.nan)
    scored = np.flatnonzero(np.asarray(rows) < n_ppl_prompts)
    if scored.size:
        nll[scored] = sequence_nll(b, [seqs[i] for i in scored], [new[i] for i in scored], batch_size=16)
    flat = np.asarray([t for row in new for t in row], dtype=np.int64)
    return {"ids": flat, "lengths": np.asarray([len(x) for x in new], dtype=np.int64), "nll": nll}


def _row_seed(seed: int, prompt: int, sample: int) -> int | None:
    """The sampling seed of one (prompt, sample): greedy for sample 0; the same in every condition and topic set."""
    return None if sample == 0 else int(np.random.SeedSequence([seed, prompt, sample]).generate_state(1)[0])


def _generation_jobs(transfer: Transfer, p: Parameters, n_prompts: int) -> pd.DataFrame:
    """Chapter 6: the steered jobs. Sample ``s`` of prompt ``i`` is steered towards topic ``(i + s) mod topics`` in
    every condition and strength, so each prompt is continued towards every topic once per three samples."""
    n_t, per = len(transfer.topics), p.n_samples + 1
    rows = []
    for c in GENERATED[1:]:
        for s in p.strengths:
            for i in range(n_prompts):
                for k in range(per):
                    direction = (i * per + k) % p.n_random if c in RANDOM_KINDS else -1
                    rows.append((c, float(s), i, k, transfer.topics[(i + k) % n_t], direction))
    return pd.DataFrame(rows, columns=["condition", "strength", "prompt", "sample", "topic", "direction"])


def _texts_of(b: LoadedModel, out: Mapping[str, np.ndarray]) -> list[str]:
    ends = np.cumsum(out["lengths"])
    pieces = np.split(out["ids"], ends[:-1]) if len(ends) else []
    return b.tokenizer.batch_decode([x.tolist() for x in pieces], skip_special_tokens=True)


def steered_continuations(
    b: LoadedModel, transfer: Transfer, prompts: Sequence[str], p: Parameters, *, progress: bool = False
) -> pd.DataFrame:
    """Chapter 6: greedy and seeded sampled continuations of every prompt under :data:`GENERATED` at ``p.strengths``.

    Every prompt is continued once greedily and ``p.n_samples`` times by a seeded top-``p.top_k`` draw at
    ``p.temperature`` (the same seeds in every condition: common random numbers), ``p.max_new_tokens`` tokens, with
    the KV cache. Sample ``s`` of prompt ``i`` is steered towards topic ``(i + s) mod topics``; ``random (residual)``
    takes the random residual directions in turn, one per continuation; the unsteered continuations do not depend on
    the topics and are shared by every topic set (both cached, kind ``steered_continuations``). Perplexity under
    unsteered B is measured on the first ``p.n_ppl_prompts`` prompts.

    Returns:
        One row per continuation: ``condition``, ``strength`` (0 unsteered), ``prompt``, ``sample`` (0 greedy),
        ``topic`` (the topic it is steered towards; for ``none``, the topic the same prompt and sample are steered
        towards elsewhere), ``direction``, ``text``, ``tokens`` (generated), ``nll`` and ``ppl ratio`` (perplexity
        over the unsteered continuation's of the same prompt and sample; NaN outside the perplexity prompts).
    """
    n, per = len(prompts), p.n_samples + 1
    gen = {
        "max_new_tokens": p.max_new_tokens,
        "top_k": p.top_k,
        "temperature": p.temperature,
        "batch_size": p.gen_batch_size,
    }
    base_rows = np.repeat(np.arange(n), per)
    base_seeds = [_row_seed(p.seed, int(i), k) for i in range(n) for k in range(per)]
    none = _generated(
        b,
        b.device,
        transfer.layer_b,
        list(prompts),
        base_rows,
        base_seeds,
        None,
        gen,
        p.n_ppl_prompts,
        progress=progress,
    )
    jobs = _generation_jobs(transfer, p, n)
    vecs = torch.stack(
        [
            (transfer.random[c][k] if c in RANDOM_KINDS else transfer.direction(c, t)) * (s * transfer.unit)
            for c, s, t, k in zip(jobs["condition"], jobs["strength"], jobs["topic"], jobs["direction"])
        ]
    )
    seeds = [_row_seed(p.seed, int(i), int(k)) for i, k in zip(jobs["prompt"], jobs["sample"])]
    out = _generated(
        b,
        b.device,
        transfer.layer_b,
        list(prompts),
        jobs["prompt"].to_numpy(),
        seeds,
        vecs,
        gen,
        p.n_ppl_prompts,
        progress=progress,
    )
    base = pd.DataFrame(
        {"condition": "none", "strength": 0.0, "prompt": base_rows, "sample": np.tile(np.arange(per), n)}
    )
    base["topic"] = [transfer.topics[(i + k) % len(transfer.topics)] for i, k in zip(base["prompt"], base["sample"])]
    base["direction"] = -1
    frames = [base.assign(text=_texts_of(b, none), tokens=none["lengths"], nll=none["nll"]),
              jobs.assign(text=_texts_of(b, out), tokens=out["lengths"], nll=out["nll"])]  # fmt: skip
    df = pd.concat(frames, ignore_index=True)
    ref = df[df["condition"] == "none"].set_index(["prompt", "sample"])["nll"]
    df["ppl ratio"] = np.exp(
        df["nll"].to_numpy() - ref.reindex(pd.MultiIndex.from_frame(df[["prompt", "sample"]])).to_numpy()
    )
    df.insert(0, "pair", transfer.pair)
    return df


def score_continuations(gens: pd.DataFrame, scorer: Scorer) -> pd.DataFrame:
    """Chapter 6: ``gens`` with one column ``P(<class>)`` per scorer class and ``score``, the probability of the
    row's own topic (:func:`fit_scorer`)."""
    need_columns(gens, ("text", "topic"), "ch06_emb2emb.steered_continuations")
    proba = scorer.proba([str(x) for x in gens["text"]])
    out = gens.copy()
    for j, c in enumerate(scorer.classes):
        out[f"P({c})"] = proba[:, j]
    out["score"] = [out.at[i, f"P({t})"] for i, t in zip(out.index, out["topic"])]
    return out


# --- Stage 3: the numbers and checks of claim 9 ----------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A paired comparison over prompts (chapter 6, :func:`pair_analysis`): each prompt is one unit.

    Prompts are shared across topics, samples and strengths, so each prompt's differences are averaged into one
    value first and the test resamples prompts: a one-sided sign-flip permutation test of the mean, a 95 %
    bootstrap interval over prompts.

    Attributes:
        effect: mean over prompts of the per-prompt difference (probability of the topic in continuations; nats
            in the next-token score).
        low, high: its 95 % bootstrap interval over prompts.
        se: its standard error (sd over prompts / sqrt(n)).
        p_value: one-sided sign-flip permutation p (effect > 0).
        n: prompts.
        n_permutations: sign flips behind ``p_value``.
    """

    effect: float
    low: float
    high: float
    se: float
    p_value: float
    n: int
    n_permutations: int

    def record(self) -> dict[str, float | int]:
        """The numbers under the record's keys."""
        return {
            "effect": self.effect,
            "low": self.low,
            "high": self.high,
            "se": self.se,
            "p": self.p_value,
            "n": self.n,
        }


def compare_prompts(per_prompt: pd.Series, n_permutations: int = 10_000, seed: int = 0) -> Comparison:
    """Chapter 6: a :class:`Comparison` from one value per prompt (the prompt's differences already averaged)."""
    x = per_prompt.to_numpy(dtype=np.float64)
    if x.size < 2:
        raise EmbgeoInputError("A comparison over prompts needs at least 2 prompts.")
    test = paired_permutation(x, n_permutations=n_permutations, seed=seed)
    low, high = bootstrap_ci(x, seed=seed)
    return Comparison(float(x.mean()), low, high, float(test.se or 0.0), test.p_value, int(x.size), n_permutations)


@dataclass(frozen=True)
class DistributionComparison:
    """A steering vector against a distribution of random directions (chapter 6, :func:`pair_analysis`).

    Every random direction is scored exactly like the vector (same prompts, topics and strengths); each gives one
    value, the mean rise of the next-token score. The test asks whether the vector's value could be one more draw
    of that distribution: ``t = (value - mean) / (sd * sqrt(1 + 1/n))`` against Student's t with ``n - 1`` degrees
    of freedom (a prediction interval), so its p-value can go below ``1 / (n + 1)``; the empirical p-value
    ``(1 + #{random >= value}) / (n + 1)`` is reported beside it.

    Attributes:
        value: the vector's mean rise (nats).
        null_mean, null_q99: mean and 99th percentile of the random directions' values.
        effect: ``value - null_mean``.
        se: ``sd * sqrt(1 + 1/n)`` of the random values.
        p_value: the t-based one-sided p-value.
        empirical_p: the rank-based one.
        n: random directions.
    """

    value: float
    null_mean: float
    null_q99: float
    effect: float
    se: float
    p_value: float
    empirical_p: float
    n: int

    def record(self) -> dict[str, float | int]:
        """The numbers under the record's keys."""
        return {
            "value": self.value, "random mean": self.null_mean, "random q99": self.null_q99, "effect": self.effect,
            "se": self.se, "p": self.p_value, "empirical p": self.empirical_p, "n": self.n,
        }  # fmt: skip


def beyond_random(value: float, null: np.ndarray) -> DistributionComparison:
    """Chapter 6: a :class:`DistributionComparison` of ``value`` with the random directions' values ``null``."""
    from scipy.stats import t as student

    n = int(null.size)
    if n < 3:
        raise EmbgeoInputError("A distribution comparison needs at least 3 random directions.")
    se = float(null.std(ddof=1) * np.sqrt(1 + 1 / n))
    effect = float(value - null.mean())
    p = float(student.sf(effect / se, n - 1)) if se > 0 else float(effect <= 0)
    return DistributionComparison(
        float(value), float(null.mean()), float(np.quantile(null, 0.99)), effect, se, p, permutation_p(value, null), n
    )


def _gen_units(g: pd.DataFrame, condition: str) -> pd.Series:
    """Per (strength, prompt, sample): the condition's score."""
    return g[g["condition"] == condition].set_index(["strength", "prompt", "sample"])["score"].sort_index()


def _gen_over_none(g: pd.DataFrame, condition: str) -> pd.Series:
    """Per prompt: mean over strengths and samples of the condition's score minus the unsteered score."""
    c = _gen_units(g, condition)
    none = g[g["condition"] == "none"].set_index(["prompt", "sample"])["score"]
    base = none.reindex(pd.MultiIndex.from_arrays([c.index.get_level_values(1), c.index.get_level_values(2)]))
    return (c - base.to_numpy()).groupby(level="prompt").mean()


def _gen_swap(g: pd.DataFrame, condition: str, topics: list[str]) -> pd.Series:
    """Per prompt: the condition's continuations scored on their own topic minus the same prompt's continuations
    steered towards the other topics, scored on that topic (topic swap), averaged over strengths and samples."""
    c = g[g["condition"] == condition]
    rows = []
    for (_strength, i), grp in c.groupby(["strength", "prompt"]):
        for _, r in grp.iterrows():
            others = grp[grp["topic"] != r["topic"]]
            if len(others):
                rows.append((i, r[f"P({r['topic']})"] - float(others[f"P({r['topic']})"].mean())))
    return pd.DataFrame(rows, columns=["prompt", "d"]).groupby("prompt")["d"].mean()


def _generation_comparisons(g: pd.DataFrame, topics: list[str], n_perm: int, seed: int) -> dict[str, Comparison]:
    """Chapter 6: the paired comparisons of the continuations (effects in probability of the topic)."""
    out = {f"{c} − none": compare_prompts(_gen_over_none(g, c), n_perm, seed) for c in GENERATED[1:]}
    for c in ("native", "emb2emb"):
        diff = (_gen_units(g, c) - _gen_units(g, "random (residual)")).groupby(level="prompt").mean()
        out[f"{c} − random (residual)"] = compare_prompts(diff, n_perm, seed)
    for c in ("native", "emb2emb"):
        out[f"{c}: own topic − swapped topic"] = compare_prompts(_gen_swap(g, c, topics), n_perm, seed)
    return out


def _forward_rise(f: pd.DataFrame, condition: str, strengths: list[float], own: bool = True) -> pd.DataFrame:
    """Rows of a named condition at the given strengths, scored on the steered topic (``own``) or the others."""
    sub = f[(f["condition"] == condition) & f["strength"].isin(strengths)]
    return sub[(sub["topic"] == sub["scored"]) == own]


def _forward_comparisons(
    f: pd.DataFrame, conditions: list[str], strengths: list[float], n_perm: int, seed: int
) -> dict[str, Comparison]:
    """Chapter 6: the paired comparisons of the next-token score at the generation strengths (effects in nats)."""
    per = {c: _forward_rise(f, c, strengths).groupby("prompt")["rise"].mean() for c in conditions if c != "none"}
    out = {f"{c} − none": compare_prompts(per[c], n_perm, seed) for c in per}
    for other in ("null map", "lexical"):
        if other in per:
            for c in ("native", "emb2emb"):
                out[f"{c} − {other}"] = compare_prompts(per[c] - per[other], n_perm, seed)
    swapped = _forward_rise(f, "emb2emb", strengths, own=False).groupby("prompt")["rise"].mean()
    out["emb2emb: own topic − swapped topic"] = compare_prompts(
        per["emb2emb"] - swapped.reindex(per["emb2emb"].index), n_perm, seed
    )
    return out


def _distributions(f: pd.DataFrame, strengths: list[float], prompts: int) -> dict[str, DistributionComparison]:
    """Chapter 6: the native and EMB2EMB vectors against each random kind, on the random directions' prompts."""
    out = {}
    for kind in RANDOM_KINDS:
        rand = f[f["condition"] == kind]
        null = rand.groupby("direction")["rise"].mean().to_numpy()
        for c in ("native", "emb2emb"):
            own = _forward_rise(f, c, strengths)
            out[f"{c} vs {kind}"] = beyond_random(float(own[own["prompt"] < prompts]["rise"].mean()), null)
    return out


def _random_by_topic(f: pd.DataFrame, strengths: list[float], prompts: int) -> pd.DataFrame:
    """Per random kind, scored topic and strength: EMB2EMB's and native's mean rise against the random directions'."""
    rows = []
    for kind in RANDOM_KINDS:
        rand = f[f["condition"] == kind]
        for (t, s), grp in rand.groupby(["scored", "strength"]):
            null = grp.groupby("direction")["rise"].mean().to_numpy()
            row = {"random kind": kind, "topic": t, "strength": s, "random q50": float(np.median(null)),
                   "random q99": float(np.quantile(null, 0.99)), "directions": int(null.size)}  # fmt: skip
            for c in ("native", "emb2emb"):
                own = f[(f["condition"] == c) & (f["topic"] == t) & (f["scored"] == t) & (f["strength"] == s)]
                value = float(own[own["prompt"] < prompts]["rise"].mean())
                row[c], row[f"{c} empirical p"] = value, permutation_p(value, null)
            rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class PairAnalysis:
    """The numbers behind claim 9 for one pair and topic set (chapter 6, :func:`pair_analysis`).

    Attributes:
        pair: ``"A → B"``.
        topics: the topic set.
        generation: paired comparisons of the continuations over prompts (:class:`Comparison`; probability of the
            topic): ``"<condition> − none"`` for every generated condition, ``"emb2emb − random (residual)"`` and
            ``"<native or emb2emb>: own topic − swapped topic"`` (the topic-swap control).
        forward: paired comparisons of the next-token score at the generation strengths (nats):
            ``"<condition> − none"`` for every named condition, ``"emb2emb − null map"``, ``"emb2emb − lexical"``
            and ``"emb2emb: own topic − swapped topic"``.
        random: ``"<native or emb2emb> vs <random kind>"`` (:class:`DistributionComparison`).
        random_by_topic: the same per random kind, topic and strength, with empirical p-values.
        fluency: per generated condition and strength, ``median ppl ratio`` of the continuations under unsteered B
            and ``continuations`` measured.
        by_strength: the same numbers at each strength alone (empty in those per-strength analyses themselves);
            the checks read these (:func:`check_claim9`), the pooled ones above are descriptive.
    """

    pair: str
    topics: list[str]
    generation: dict[str, Comparison]
    forward: dict[str, Comparison]
    random: dict[str, DistributionComparison]
    random_by_topic: pd.DataFrame = field(repr=False)
    fluency: pd.DataFrame = field(repr=False)
    by_strength: dict[float, PairAnalysis] = field(default_factory=dict, repr=False)

    def record(self) -> dict[str, Any]:
        """Every number as the chapter's record holds it."""
        return {
            "generation": {k: v.record() for k, v in self.generation.items()},
            "next token": {k: v.record() for k, v in self.forward.items()},
            "random directions": {k: v.record() for k, v in self.random.items()},
            "fluency": self.fluency.to_dict(orient="records"),
        }

    def table(self) -> pd.DataFrame:
        """Every comparison in one table: measure, comparison, effect, interval, n, p."""
        rows = [{"measure": "continuations", "comparison": k, **v.record()} for k, v in self.generation.items()]
        rows += [{"measure": "next token", "comparison": k, **v.record()} for k, v in self.forward.items()]
        rows += [{"measure": "next token", "comparison": k, **v.record()} for k, v in self.random.items()]
        return pd.DataFrame(rows).assign(pair=self.pair).set_index(["pair", "measure", "comparison"])


def pair_analysis(
    sweep: pd.DataFrame,
    gens: pd.DataFrame,
    p: Parameters,
    pair: str | None = None,
    strengths: list[float] | None = None,
) -> PairAnalysis:
    """Chapter 6: the numbers behind claim 9 for one pair: continuations, next-token scores, random distributions.

    Continuations (``gens``, scored by :func:`score_continuations`) are compared over prompts, each prompt's
    differences averaged over the strengths (``strengths``, by default ``p.strengths``) and samples
    (:class:`Comparison`); the next-token ``sweep`` at those strengths likewise over its prompts and topics; the
    native and EMB2EMB vectors against each kind of random direction on the first ``p.n_random_prompts`` prompts
    (:class:`DistributionComparison`). Over the default strengths, :attr:`PairAnalysis.by_strength` holds the same
    analysis at each strength alone.
    """
    pair = pair or str(gens["pair"].iloc[0])
    topics = sorted({t for t in gens["topic"]}, key=list(dict.fromkeys(gens["topic"])).index)
    pooled = strengths is None
    chosen = [float(s) for s in (p.strengths if strengths is None else strengths)]
    by_strength = {s: pair_analysis(sweep, gens, p, pair, [s]) for s in chosen} if pooled else {}
    gens = gens[(gens["condition"] == "none") | gens["strength"].isin(chosen)]
    conditions = [c for c in CONDITIONS if c in set(sweep["condition"]) and c not in RANDOM_KINDS]
    kw = {"n_perm": p.n_permutations, "seed": p.seed}
    flu = gens[gens["condition"] != "none"].dropna(subset=["ppl ratio"])
    fluency = flu.groupby(["condition", "strength"], sort=False)["ppl ratio"].agg(["median", "size"])
    fluency = fluency.rename(columns={"median": "median ppl ratio", "size": "continuations"}).reset_index()
    return PairAnalysis(
        pair, topics, _generation_comparisons(gens, topics, **kw), _forward_comparisons(sweep, conditions, chosen, **kw),
        _distributions(sweep, chosen, p.n_random_prompts), _random_by_topic(sweep, chosen, p.n_random_prompts),
        fluency, by_strength,
    )  # fmt: skip


def usable_strengths(a: PairAnalysis) -> list[float]:
    """Chapter 6: the strengths at which both B's own vector and EMB2EMB keep their continuations fluent.

    Fluent: the median perplexity ratio of the condition's continuations at that strength is at most
    :data:`MAX_PPL_RATIO`. Broken text (repeated words, symbols) can look on-topic to a scorer of topics; a
    strength where either vector breaks B says nothing about steering.
    """
    flu = a.fluency.set_index(["condition", "strength"])["median ppl ratio"]
    out = []
    for s in sorted(a.by_strength):
        ratios = [flu.get((c, s), np.nan) for c in ("native", "emb2emb")]
        if all(np.isfinite(r) and r <= MAX_PPL_RATIO for r in ratios):
            out.append(s)
    return out


def _min_source(ceiling: float, floor: float, unit: str, measure: str) -> tuple[float, str]:
    value = FRACTION_OF_NATIVE * max(ceiling, floor)
    return value, (
        f"{FRACTION_OF_NATIVE:g} x B's own vector's {measure} effect ({max(ceiling, floor):.3g} {unit}; at least "
        f"the control's minimum {floor:g}): the ceiling a carried vector can approach; less than a quarter of it is "
        "not steering in any useful sense"
    )


def _claim_rows(a: PairAnalysis) -> list[tuple[str, bool, Any, Any]]:
    """Every candidate claim check at one strength: (label, in continuations?, EMB2EMB's comparison, the same
    comparison for B's own vector, its twin)."""
    g, f, r = a.generation, a.forward, a.random
    iso, res = r["emb2emb vs random (isotropic)"], r["emb2emb vs random (residual)"]
    return [
        ("EMB2EMB > no steering (continuations)", True, g["emb2emb − none"], g["native − none"]),
        ("EMB2EMB > random residual directions (continuations)", True, g["emb2emb − random (residual)"],
         g["native − random (residual)"]),
        ("EMB2EMB on its topic > on the other topics (continuations, topic swap)", True,
         g["emb2emb: own topic − swapped topic"], g["native: own topic − swapped topic"]),
        ("EMB2EMB > no steering (next token)", False, f["emb2emb − none"], f["native − none"]),
        (f"EMB2EMB > {iso.n} isotropic random directions (next token)", False, iso, r["native vs random (isotropic)"]),
        (f"EMB2EMB > {res.n} residual random directions (next token)", False, res, r["native vs random (residual)"]),
        ("EMB2EMB > shuffled-row map (next token)", False, f["emb2emb − null map"], f["native − null map"]),
        ("EMB2EMB > lexical vector of the topic's tokens (next token)", False, f["emb2emb − lexical"],
         f["native − lexical"]),
    ]  # fmt: skip


#: The columns of :func:`claim_checks`' table of candidate checks.
CANDIDATE_COLUMNS = [
    "pair",
    "strength",
    "check",
    "EMB2EMB effect",
    "own vector's effect",
    "own vector's p",
    "informative",
]

CONTROL_SOURCE = {
    True: "practical: one continuation in twenty moved to the topic by B's own vector",
    False: "practical: B's own vector raises the probability of the topic's tokens by a tenth (0.1 nats)",
}


def _control(pair: str, name: str, c: Any, in_text: bool, s: float) -> Check:
    minimum = CONTROL_MIN_GENERATION if in_text else CONTROL_MIN_FORWARD
    return Check(f"{pair}: {name} at strength {s:g}", c.effect, c.p_value, minimum, c.n, c.se, 1,
                 CONTROL_SOURCE[in_text], getattr(c, "n_permutations", None), True)  # fmt: skip


def claim_checks(a: PairAnalysis, alpha: float = 0.01) -> tuple[list[Check], pd.DataFrame]:
    """Chapter 6: one pair's checks of claim 9, and every candidate check with its native twin.

    Only strengths where both vectors stay fluent are read (:func:`usable_strengths`); without one, the pair gets
    one inconclusive check, and B's own vector is still tested at its own fluent strengths. At each usable strength:
    the positive controls (B's own vector over no steering, in continuations and in the next-token score), and
    every candidate comparison of :func:`_claim_rows` whose twin — the same comparison made for B's own vector —
    passes (effect at least the control's minimum, p below ``alpha`` over the number of candidates): a comparison
    that B's own vector cannot pass cannot show that a carried vector fails it. Such a check enters with its twin
    as a further control; the others are reported in the table as not informative. Each claim check needs
    :data:`FRACTION_OF_NATIVE` of B's own vector's effect over no steering on the same measure and strength.
    """
    usable = usable_strengths(a)
    checks: list[Check] = []
    rows: list[dict[str, Any]] = []
    if not usable:
        flu = a.fluency.set_index(["condition", "strength"])["median ppl ratio"]
        native_ok = [s for s in sorted(a.by_strength) if flu.get(("native", s), np.inf) <= MAX_PPL_RATIO]
        for s in native_ok:
            b = a.by_strength[s]
            checks.append(
                _control(a.pair, "B's own vector > no steering (continuations)", b.generation["native − none"], True, s)
            )
        if not native_ok:
            checks.append(Check(f"{a.pair}: B's own vector keeps its continuations fluent at some strength", -1.0,
                                None, 1.0, min_effect_source=f"median perplexity ratio at most {MAX_PPL_RATIO:g}",
                                control=True))  # fmt: skip
        checks.append(Check(f"{a.pair}: EMB2EMB keeps its continuations fluent at some strength", -1.0, None, 1.0,
                            min_effect_source=f"median perplexity ratio at most {MAX_PPL_RATIO:g} for both vectors: "
                            "broken text is not steering"))  # fmt: skip
        return checks, pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)
    for s in usable:
        b = a.by_strength[s]
        candidates = _claim_rows(b)
        checks.append(
            _control(a.pair, "B's own vector > no steering (continuations)", b.generation["native − none"], True, s)
        )
        checks.append(
            _control(a.pair, "B's own vector > no steering (next token)", b.forward["native − none"], False, s)
        )
        base = {True: b.generation["native − none"].effect, False: b.forward["native − none"].effect}
        for label, in_text, emb, twin in candidates:
            floor = CONTROL_MIN_GENERATION if in_text else CONTROL_MIN_FORWARD
            informative = twin.effect >= floor and twin.p_value < alpha / len(candidates)
            rows.append({"pair": a.pair, "strength": s, "check": label, "EMB2EMB effect": emb.effect,
                         "own vector's effect": twin.effect, "own vector's p": twin.p_value, "informative": informative})  # fmt: skip
            if not informative:
                continue
            minimum, source = _min_source(base[in_text], floor, "in probability" if in_text else "nats",
                                          "continuation" if in_text else "next-token")  # fmt: skip
            checks.append(Check(f"{a.pair}: {label} at strength {s:g}", emb.effect, emb.p_value, minimum, emb.n,
                                emb.se, 1, source, getattr(emb, "n_permutations", None)))  # fmt: skip
            if "> no steering" not in label:
                checks.append(_control(a.pair, "B's own vector " + label.removeprefix("EMB2EMB "), twin, in_text, s))
    if all(c.control for c in checks):
        checks.append(Check(f"{a.pair}: a comparison that B's own vector passes at a fluent strength", -1.0, None,
                            1.0, min_effect_source="a comparison B's own vector fails says nothing about EMB2EMB"))  # fmt: skip
    return checks, pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)


def check_claim9(analyses: Mapping[str, PairAnalysis], alpha: float = 0.01) -> Verdict:
    """Chapter 6, claim 9: the carried vector steers B better than random directions and no steering.

    Per pair, the checks of :func:`claim_checks`: read only at strengths where B's own vector and EMB2EMB both keep
    their continuations fluent (median perplexity ratio at most :data:`MAX_PPL_RATIO`); positive controls (B's own
    vector over no steering, in continuations by at least :data:`CONTROL_MIN_GENERATION` and in the next-token score
    by at least :data:`CONTROL_MIN_FORWARD` nats); claim checks — in continuations, EMB2EMB beats no steering, the
    random residual directions and its own continuations steered towards the other topics (topic swap); in the
    next-token score, it beats no steering, the distributions of isotropic and residual random directions, the map
    fitted on shuffled rows and the lexical vector of the topic's score tokens — each only where B's own vector
    passes the same comparison, and each needing :data:`FRACTION_OF_NATIVE` of the native vector's effect. Controls
    and claim checks are two Holm families (:func:`embgeo_utils.core.stats.verdict`); a control that does not hold
    makes the claim inconclusive.
    """
    if not analyses:
        raise EmbgeoInputError("check_claim9 needs at least one pair.")
    return verdict([c for a in analyses.values() for c in claim_checks(a, alpha)[0]], alpha=alpha)


# --- The chapter's pipeline: one pair, then every pair -------------------------------------------------------------


@dataclass(frozen=True)
class PairRun:
    """What chapter 6 computed for one model pair and topic set (:func:`run_pair`).

    Attributes:
        transfer: the vectors, maps and controls (:class:`Transfer`).
        tokens: per topic, the score tokens in B's tokenizer.
        sweep: the next-token scores (:func:`next_token_scores`).
        gens: the scored continuations (:func:`steered_continuations`, :func:`score_continuations`).
    """

    transfer: Transfer
    tokens: dict[str, list[int]]
    sweep: pd.DataFrame
    gens: pd.DataFrame


def run_pair(
    a: LoadedModel, b: LoadedModel, texts: TopicTexts, neutral: NeutralTexts, scorer: Scorer, p: Parameters
) -> PairRun:
    """Chapter 6, one pair and topic set: score tokens, transfer, next-token scores, then scored continuations.

    :func:`topic_tokens` (``p.n_topic_tokens`` per topic, from the ``score`` summaries, in B's tokenizer);
    :func:`build_transfer`; :func:`next_token_scores` and :func:`steered_continuations` of ``neutral.prompts``;
    :func:`score_continuations` with ``scorer``.
    """
    unknown = [s for s in p.strengths if s not in p.sweep_strengths]
    if unknown:
        raise EmbgeoInputError(f"strengths {unknown} are not among sweep_strengths {p.sweep_strengths}; add them.")
    tokens = topic_tokens(b.tokenizer, texts.score, k=p.n_topic_tokens)
    tr = build_transfer(a, b, texts, tokens, p)
    sweep = next_token_scores(b, tr, neutral.prompts, tokens, p).assign(pair=tr.pair)
    gens = score_continuations(steered_continuations(b, tr, neutral.prompts, p), scorer)
    return PairRun(tr, tokens, sweep, gens)


@dataclass(frozen=True)
class Claim9:
    """Claim 9 on one topic set (chapter 6, :func:`evaluate_claim9`).

    Attributes:
        label: ``"development"`` or ``"confirmation"``.
        topics: the topic set.
        verdict: the verdict of every pair's checks together.
        per_pair: each pair's own verdict.
        analyses: each pair's numbers (:class:`PairAnalysis`).
        scorer_accuracy: the scorer's accuracy on held-out windows.
    """

    label: str
    topics: list[str]
    verdict: Verdict
    per_pair: dict[str, Verdict]
    analyses: dict[str, PairAnalysis]
    scorer_accuracy: float

    @property
    def value(self) -> float | None:
        """The headline: the smallest EMB2EMB effect over no steering in continuations, over pairs and the strengths
        where both vectors stay fluent (probability); ``None`` without such a strength."""
        effects = [a.by_strength[s].generation["emb2emb − none"].effect
                   for a in self.analyses.values() for s in usable_strengths(a)]  # fmt: skip
        return min(effects, default=None)

    def candidates(self) -> pd.DataFrame:
        """Every candidate claim check at the usable strengths with its native twin (:func:`claim_checks`)."""
        tables = [claim_checks(a, self.verdict.alpha)[1] for a in self.analyses.values()]
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()

    def record(self) -> dict[str, Any]:
        """The topic set's verdict, its per-pair verdicts and numbers, for the chapter's record."""
        return {
            "topics": self.topics,
            "verdict": self.verdict.verdict,
            "summary": self.verdict.summary(),
            "scorer accuracy": self.scorer_accuracy,
            "pairs": {p: {"verdict": v.verdict, **self.analyses[p].record()} for p, v in self.per_pair.items()},
        }

    def fluency(self) -> pd.DataFrame:
        """Every pair's :attr:`PairAnalysis.fluency`, with a ``pair`` column."""
        return pd.concat([a.fluency.assign(pair=p) for p, a in self.analyses.items()], ignore_index=True)

    def verdicts_table(self) -> pd.DataFrame:
        """One row per pair: its verdict in one line."""
        return pd.DataFrame({p: {"topics": self.label, "verdict": v.summary()} for p, v in self.per_pair.items()}).T

    def power_table(self) -> pd.DataFrame:
        """Per continuation check: n, the detectable effect and half the native vector's effect (the power target)."""
        rows = []
        for c, d in zip(self.verdict.checks, self.verdict.detectable):
            if "(continuations" not in c.name or c.control or d is None:
                continue
            pair, strength = c.name.split(":")[0], float(c.name.rsplit("at strength ", 1)[1])
            half = self.analyses[pair].by_strength[strength].generation["native − none"].effect / 2
            rows.append(
                {"check": c.name, "n": c.n, "detectable effect": d, "native effect / 2": half, "target met": d <= half}
            )
        columns = ["check", "n", "detectable effect", "native effect / 2", "target met"]
        return pd.DataFrame(rows, columns=columns).set_index("check")

    def summary(self) -> str:
        """This topic set's result in markdown: per pair the native and EMB2EMB effects, then the verdict."""
        lines = [f"**{self.label.capitalize()} topics** ({', '.join(self.topics)}); scorer accuracy "
                 f"{self.scorer_accuracy:.3f} on held-out windows."]  # fmt: skip
        for p, a in self.analyses.items():
            v = self.per_pair[p]
            detect = dict(zip([c.name for c in v.checks], v.detectable or (None,) * len(v.checks)))
            usable = usable_strengths(a)
            lines.append(f"- **{p}** ({v.verdict}); strengths where both vectors keep their continuations fluent "
                         f"(median perplexity ratio at most {MAX_PPL_RATIO:g}): "
                         f"{', '.join(f'{x:g}' for x in usable) or 'none'}.")  # fmt: skip
            for s in sorted(a.by_strength):
                g = a.by_strength[s].generation
                n, e, r = g["native − none"], g["emb2emb − none"], g["emb2emb − random (residual)"]
                d = detect.get(f"{p}: EMB2EMB > no steering (continuations) at strength {s:g}")
                lines.append(
                    f"  At strength {s:g}{'' if s in usable else ' (not read: not fluent)'}, in continuations, B's "
                    f"own vector raises P(topic) by {n.effect:.3f} [{n.low:.3f}, {n.high:.3f}], EMB2EMB by "
                    f"{e.effect:.3f} [{e.low:.3f}, {e.high:.3f}] and beats random residual directions by "
                    f"{r.effect:.3f} [{r.low:.3f}, {r.high:.3f}] (n = {e.n} prompts"
                    + (
                        f"; detectable effect {d:.3f}, half the native effect {n.effect / 2:.3f}"
                        if d is not None
                        else ""
                    )
                    + ")."
                )
            flu = a.fluency.set_index(["condition", "strength"])["median ppl ratio"]
            lines.append(
                "  Median perplexity ratio under unsteered B, against the unsteered continuation (the fluency gate): "
                + "; ".join(
                    f"{c} " + ", ".join(f"{flu[c, s]:.3g} at {s:g}" for s in flu[c].index)
                    for c in dict.fromkeys(flu.index.get_level_values(0))
                )
                + "."
            )
            lines.append(
                "  Checks: "
                + "; ".join(
                    f"{c.name.split(': ', 1)[1]}{' (control)' if c.control else ''}: {c.effect:.3g} "
                    f"(minimum {c.min_effect:.3g}), {s}"
                    for c, s in zip(v.checks, v.status)
                )
                + "."
            )
        lines.append(f"- Claim 9 on these topics: **{self.verdict.summary()}**.")
        return "\n".join(lines)


def evaluate_claim9(runs: Mapping[str, PairRun], scorer: Scorer, p: Parameters, label: str) -> Claim9:
    """Chapter 6: claim 9's numbers and checks on one topic set, per pair and over all pairs (level ``p.alpha``)."""
    analyses = {name: pair_analysis(r.sweep, r.gens, p, name) for name, r in runs.items()}
    per_pair = {name: check_claim9({name: a}, p.alpha) for name, a in analyses.items()}
    topics = next(iter(runs.values())).transfer.topics if runs else []
    return Claim9(label, list(topics), check_claim9(analyses, p.alpha), per_pair, analyses, scorer.accuracy)


# --- Tables and the figure -----------------------------------------------------------------------------------------


def strength_units(transfers: Sequence[Transfer], strengths: Sequence[float]) -> pd.DataFrame:
    """Chapter 6: each strength in three units per pair: the native-vector unit, B's median residual norm, and that
    norm without its massive dimensions (:attr:`Transfer.scales`)."""
    rows = []
    for tr in transfers:
        s = tr.scales
        for x in strengths:
            rows.append({"pair": tr.pair, "strength (x native norm)": x, "x median residual norm": x * tr.unit / s["median norm"],
                         "x median norm without massive dims": x * tr.unit / s["median norm without massive dims"],
                         "massive dims": int(s["massive dims"])})  # fmt: skip
    return pd.DataFrame(rows)


def dose_response(runs: Mapping[str, PairRun], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Chapter 6: per pair, measure, condition and strength, the mean effect with its 95 % bootstrap interval over
    prompts: the next-token rise (nats; random kinds: the median direction, with the 1st and 99th percentiles of the
    directions as ``low`` and ``high``) and the continuations' rise of P(topic) over no steering."""
    rows = []
    for pair, r in runs.items():
        f = r.sweep[r.sweep["topic"] == r.sweep["scored"]]
        for (c, s), g in f[f["condition"] != "none"].groupby(["condition", "strength"], sort=False):
            per = g.groupby("prompt")["rise"].mean().to_numpy()
            lo, hi = bootstrap_ci(per, n_boot=n_boot, seed=seed) if per.size > 1 else (np.nan, np.nan)
            rows.append((pair, "next token", c, s, float(per.mean()), lo, hi, per.size))
        for (c, s), g in r.sweep[r.sweep["condition"].isin(RANDOM_KINDS)].groupby(["condition", "strength"]):
            per = g.groupby("direction")["rise"].mean().to_numpy()
            rows.append((pair, "next token", c, s, float(np.median(per)), *np.quantile(per, [0.01, 0.99]), per.size))
        for c in GENERATED[1:]:
            for s in sorted(set(r.gens.loc[r.gens["condition"] == c, "strength"])):
                per = _gen_over_none(r.gens[r.gens["strength"].isin([0.0, s])], c).to_numpy()
                lo, hi = bootstrap_ci(per, n_boot=n_boot, seed=seed)
                rows.append((pair, "continuations", c, s, float(per.mean()), lo, hi, per.size))
    return pd.DataFrame(rows, columns=["pair", "measure", "condition", "strength", "effect", "low", "high", "n"])


def example_generations(gens: pd.DataFrame, prompt: int = 0, width: int = 140) -> pd.DataFrame:
    """Chapter 6: one prompt's greedy continuations under every condition and strength: a table to read."""
    g = gens[(gens["prompt"] == prompt) & (gens["sample"] == 0)]
    if g.empty:
        raise EmbgeoInputError(f"No greedy continuation of prompt {prompt}.")
    out = g[["pair", "condition", "strength", "topic", "text", "score"]].copy()
    out["text"] = out["text"].str.replace("\n", " ").str.slice(0, width)
    return out.rename(columns={"score": "P(topic)"}).reset_index(drop=True)


def plot_dose_response(table: pd.DataFrame, fluency: pd.DataFrame) -> Figure:
    """Chapter 6: per pair, the next-token rise and the continuations' rise of P(topic) against strength, and the
    continuations' perplexity ratio (two panels across, the legend in the fourth place).

    Args:
        table: :func:`dose_response`'s table.
        fluency: the :attr:`PairAnalysis.fluency` tables of the pairs, with a ``pair`` column.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    need_columns(
        table, ("pair", "measure", "condition", "strength", "effect", "low", "high"), "ch06_emb2emb.dose_response"
    )
    pairs = list(dict.fromkeys(table["pair"]))
    conds = [c for c in CONDITIONS if c in set(table["condition"])]
    colors = dict(zip(conds, sns.color_palette("colorblind", n_colors=len(conds))))
    fig, grid = plt.subplots(2 * len(pairs), 2, figsize=(COLUMN_INCHES, 7.4 * len(pairs)), squeeze=False)
    rows = [(grid[2 * i][0], grid[2 * i][1], grid[2 * i + 1][0], grid[2 * i + 1][1]) for i in range(len(pairs))]
    for (*row, key), pair in zip(rows, pairs):
        for ax, measure in zip(row[:2], ("next token", "continuations")):
            s = table[(table["pair"] == pair) & (table["measure"] == measure)]
            for c in conds:
                g = s[s["condition"] == c].sort_values("strength")
                if not g.empty:
                    err = np.vstack([g["effect"] - g["low"], g["high"] - g["effect"]])
                    ax.errorbar(g["strength"], g["effect"], yerr=err, marker="o", capsize=3, color=colors[c], label=c)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("strength (x mean norm of B's topic vectors)")
        row[0].set_ylabel("rise in log P(topic tokens) (nats)")
        row[0].set_title(f"{pair}\nnext token (random: median, 1-99 %)", fontsize=10)
        row[1].set_ylabel("rise in P(topic) over no steering")
        row[1].set_title("continuations\n(95 % interval over prompts)", fontsize=10)
        fl = fluency[fluency["pair"] == pair]
        for c, g in fl.groupby("condition", sort=False):
            row[2].plot(g["strength"], g["median ppl ratio"], marker="o", color=colors.get(c, "grey"), label=c)
        row[2].axhline(1, color="grey", lw=0.8)
        row[2].set_xscale("log", base=2)
        row[2].set_yscale("log")
        row[2].set_xlabel("strength (x mean norm of B's topic vectors)")
        row[2].set_ylabel("perplexity ratio under unsteered B (median)")
        row[2].set_title("fluency of the continuations", fontsize=10)
        key.axis("off")  # the fourth place of the pair's 2 x 2 grid holds the legend
        key.legend(*row[0].get_legend_handles_labels(), loc="center", fontsize=8, title="condition")
    fig.tight_layout()
    return fig
