"""Steering vectors carried from model A into model B, and whether they still steer (chapter 6, claim 9).

The pipeline of chapter 6, in the order the chapter runs it:

1. :func:`topic_texts` splits the topic-labelled Wikipedia summaries into texts
   that build the steering vectors, texts that train the topic classifier, and
   held-out texts never used for a vector or a map; :func:`neutral_prompts`
   takes the opening words of real passages from other sources (speeches, news,
   full articles) as prompts.
2. :func:`build_transfer` finds each topic's vector in A and in B (one topic
   against the others, :mod:`embgeo_utils.lm.steering`), fits the maps
   (:mod:`embgeo_utils.lm.emb2emb`: input embeddings, unembeddings where they
   differ, paired residual activations, and a null map fitted on shuffled rows)
   and moves A's vectors into B. Every condition is one direction per topic.
3. :func:`concept_sweep` adds each direction to B's residual stream at
   ``alpha`` times B's median token norm and scores forward passes only: the
   log-probability B gives the topic's characteristic tokens (:func:`topic_tokens`)
   at the next position, and B's loss on the prompt's own real text (fluency).
4. :func:`steered_generations` generates continuations at one strength and scores
   them with the MiniLM topic classifier and the perplexity under unsteered B.
5. :func:`check_claim9` turns both into the checks of claim 9 and a verdict.

References:
    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared global and local
    geometry of language model embeddings, arXiv:2503.21073.

    A. M. Turner et al. (2023), Activation addition: steering language models
    without optimization, arXiv:2308.10248.


One look for every figure of the book (all chapters).

``use_book_style()`` sets a seaborn theme with a colour-blind-safe palette;
``model_colors`` gives each packaged model the same colour in every chapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.cache import cache_dir, content_key, load_frame, save_frame
from ..core.errors import EmbgeoInputError
from ..core.stats import Check, bootstrap_ci, paired_permutation, verdict
from ..lm.corpus import documents, wiki_summaries
from ..lm.emb2emb import LinearMap, cached_states, embedding_pairs, fit_linear_map, matching_layer, residual_pairs
from ..lm.models import LoadedModel, block_output_hook, transformer_blocks
from ..lm.steering import continuation_nll, encode_texts, generate, resume_after, steer
from .style import need_columns

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "CONDITIONS",
    "TopicTexts",
    "Transfer",
    "build_transfer",
    "check_claim9",
    "concept_sweep",
    "example_generations",
    "neutral_prompts",
    "pair_analysis",
    "plot_steering_sweep",
    "steered_generations",
    "sweep_summary",
    "topic_texts",
    "topic_tokens",
]


#: Steering conditions in B, in the order figures and tables show them.
CONDITIONS = ("none", "native", "emb2emb", "emb2emb (unembedding)", "residual map", "random", "null map")


@dataclass(frozen=True)
class TopicTexts:
    """Topic-labelled texts of chapter 6, split by use.

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


def topic_texts(
    topics: Sequence[str], n_build: int, n_classifier: int, n_heldout: int, n_map: int, seed: int = 0
) -> TopicTexts:
    """Split the Wikipedia summaries of ``topics`` into build, classifier and held-out texts (chapter 6).

    Per topic, summaries are drawn in a seeded order: the first ``n_heldout`` are
    held out, the next ``n_classifier`` fit the classifier, and the first
    ``n_build`` of those also build the steering vectors. ``n_map`` summaries of
    the remaining topics feed the residual map.
    """

    topics = list(topics)
    if len(topics) < 2 or len(set(topics)) != len(topics):
        raise EmbgeoInputError(f"Give at least two distinct topics, got {topics}.")
    if not 1 <= n_build <= n_classifier:
        raise EmbgeoInputError(f"Need 1 <= n_build <= n_classifier, got {n_build} and {n_classifier}.")
    rows = wiki_summaries()
    known = sorted({r["topic"] for r in rows})
    unknown = [t for t in topics if t not in known]
    if unknown:
        raise EmbgeoInputError(f"Unknown topic(s) {unknown}; the summaries have {known}.")
    rng = np.random.default_rng(seed)
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
    map_texts = [rest[i] for i in rng.permutation(len(rest))[:n_map]]
    return TopicTexts(topics, build, clf, held, map_texts)


def neutral_prompts(
    n: int, n_words: int = 12, sources: Sequence[str] = ("sotu", "lee-news"), seed: int = 0
) -> list[str]:
    """The first ``n_words`` words of ``n`` real paragraphs, drawn in turn from ``sources`` (chapter 6).

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


def topic_tokens(tokenizer: Any, texts: dict[str, list[str]], k: int = 50, min_count: int = 3) -> dict[str, list[int]]:
    """The ``k`` tokens most characteristic of each topic, in one tokenizer (chapter 6).

    Word-initial alphabetic tokens of at least 3 letters, ranked by the smoothed
    log ratio of their frequency in the topic's texts to their frequency in the
    other topics' texts; a token must occur at least ``min_count`` times in its topic.
    """
    from collections import Counter

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


@dataclass
class Transfer:
    """Steering directions of one model pair, all in B's space (chapter 6).

    Attributes:
        names: ``(A, B)``; layer_a, layer_b: the blocks steered (same relative depth).
        norm_b: median per-token norm of B's residual at ``layer_b`` (first position left out).
        topics: the topics.
        vectors_a: A's topic vectors; vectors: ``{condition: {topic: vector in B}}``.
        maps: the fitted maps by name (held-out R² in ``r2_heldout``).
        tied: whether both models use one table for input embeddings and unembeddings.
        cosines: one row per condition and topic: cosine with B's native vector, and
            the 99th percentile of |cosine| of random directions with it.
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
    cosines: Any = field(default=None, repr=False)

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

    def maps_table(self) -> Any:
        """One row per map: rows fitted, held-out R², ridge."""
        import pandas as pd

        return pd.DataFrame(
            [
                {"map": k, "rows fitted": m.n_fit, "held-out R2": m.r2_heldout, "ridge": m.ridge}
                for k, m in self.maps.items()
            ]
        ).set_index("map")


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


def build_transfer(
    a: LoadedModel,
    b: LoadedModel,
    texts: TopicTexts,
    depth: float = 0.5,
    *,
    max_tokens: int = 64,
    map_rows: int = 20_000,
    ridge: float = 1e-3,
    min_map_rows: int | None = None,
    seed: int = 0,
) -> Transfer:
    """Find the topic vectors in A and B and carry A's into B through every map (chapter 6).

    A's block is ``round(depth * layers of A)``, B's the block at the same relative
    depth (:func:`~embgeo_utils.lm.emb2emb.matching_layer`). A topic's vector is the
    mean residual of its ``build`` summaries minus that of the other topics'
    (each text its own mean over positions, the first position and BOS left out).
    Maps: ``emb2emb`` on the shared vocabulary's input embeddings (at most
    ``map_rows`` rows, drawn with ``seed``); ``emb2emb (unembedding)`` on the
    unembeddings, only when a model has its own output table; ``null map`` on the
    input embeddings with B's rows shuffled; ``residual map`` on paired residual
    activations of ``map_texts`` (at least ``min_map_rows`` paired tokens; default
    the wider model's width, see :func:`~embgeo_utils.lm.emb2emb.fit_linear_map`).
    ``random`` is a Gaussian direction per topic.
    """
    import pandas as pd

    n_a = a.info.n_layers
    layer_a = max(1, min(n_a - 1, round(depth * n_a)))
    layer_b = matching_layer(layer_a, n_a, b.info.n_layers)
    labels = [t for t in texts.topics for _ in texts.build[t]]
    flat = [x for t in texts.topics for x in texts.build[t]]
    states_a = cached_states(a, flat, layer_a, max_tokens=max_tokens)
    states_b = cached_states(b, flat, layer_b, max_tokens=max_tokens)
    vec_a = _topic_vectors(states_a, labels, texts.topics)
    native = _topic_vectors(states_b, labels, texts.topics)
    norm_b = float(torch.cat([h.norm(dim=1) for h in states_b]).median())

    rng = np.random.default_rng(seed)
    maps: dict[str, LinearMap] = {}
    xa, xb, _shared = embedding_pairs(a, b, "input")
    pick = torch.as_tensor(np.sort(rng.permutation(xa.shape[0])[: min(map_rows, xa.shape[0])]))
    maps["emb2emb"] = fit_linear_map(xa[pick], xb[pick], ridge=ridge, seed=seed)
    shuffled = torch.as_tensor(rng.permutation(len(pick)))
    maps["null map"] = fit_linear_map(xa[pick], xb[pick][shuffled], ridge=ridge, seed=seed)
    tied = _tied(a) and _tied(b)
    if not tied:
        oa, ob, _ = embedding_pairs(a, b, "output")
        maps["emb2emb (unembedding)"] = fit_linear_map(oa[pick], ob[pick], ridge=ridge, seed=seed)
    ra, rb = residual_pairs(a, b, texts.map_texts, layer_a, layer_b, max_tokens=max_tokens)
    maps["residual map"] = fit_linear_map(ra, rb, ridge=ridge, seed=seed, min_rows=min_map_rows)

    vectors: dict[str, dict[str, torch.Tensor]] = {"native": native}
    for name, m in maps.items():
        vectors[name] = {t: m.apply(vec_a[t]) for t in texts.topics}
    gen = torch.Generator().manual_seed(seed)
    vectors["random"] = {t: torch.randn(b.info.d_model, generator=gen) for t in texts.topics}

    probes = torch.nn.functional.normalize(torch.randn(1000, b.info.d_model, generator=gen), dim=1)
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
        cos.reset_index(drop=True),
    )


def _vectors_bytes(transfer: Transfer) -> bytes:
    return b"".join(
        transfer.direction(c, t).numpy().astype(np.float32).tobytes()
        for c in transfer.conditions
        for t in transfer.topics
    )


def _table_path(kind: str, b: LoadedModel, transfer: Transfer, *items: Any) -> Any:

    key = content_key(
        kind,
        b.info.name,
        b.info.sha256,
        str(b.model.dtype),
        str(b.device.type),
        transfer.names,
        transfer.layer_b,
        transfer.norm_b,
        transfer.topics,
        transfer.conditions,
        _vectors_bytes(transfer),
        *items,
    )
    return cache_dir("steering", "tables") / f"{kind}-{key}.npz"


def _right_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


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
) -> Any:
    """Concept score and fluency of every condition, topic, strength and prompt, from forward passes (chapter 6).

    The direction of each condition (unit length) is added at ``alpha *
    transfer.norm_b`` to B's block ``transfer.layer_b`` at every position. For each
    prompt, **score** is the mean over positions ``score_from..`` of the log of
    the probability B puts on the topic's characteristic ``tokens`` as the next
    token; **nll** is B's mean loss on the prompt's own next tokens (real text, so
    a steer that breaks the model raises it). Blocks before the steered one are
    computed once (:func:`~embgeo_utils.lm.steering.resume_after`). With ``cache``
    the table is kept on disk under a key of everything it depends on (model,
    directions, prompts, strengths, tokens, batch size), so a rerun reads it.

    Returns:
        A DataFrame with one row per (condition, topic, alpha, prompt): score,
        nll, ``rise`` (score minus the unsteered score of that prompt and topic)
        and ``ppl ratio`` (``exp`` of nll minus the unsteered nll).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if not alphas or any(not np.isfinite(x) or x < 0 for x in alphas):
        raise EmbgeoInputError(f"alphas must be non-negative finite numbers, got {list(alphas)}.")
    missing = [t for t in transfer.topics if t not in tokens]
    if missing:
        raise EmbgeoInputError(f"No characteristic tokens for {missing}; build them with topic_tokens.")

    path = _table_path(
        "sweep",
        b,
        transfer,
        list(prompts),
        [float(x) for x in alphas],
        {t: list(map(int, tokens[t])) for t in transfer.topics},
        score_from,
        batch_size,
    )
    if cache and (cached := load_frame(path)) is not None:
        return cached
    seqs = encode_texts(b, prompts, max_tokens=10_000)
    if min(len(s) for s in seqs) <= score_from + 1:
        raise EmbgeoInputError(f"Every prompt needs more than {score_from + 1} tokens; use longer prompts.")
    pad = b.tokenizer.pad_token_id if b.tokenizer.pad_token_id is not None else (b.tokenizer.eos_token_id or 0)
    ids, mask = _right_pad(seqs, int(pad))
    ids, mask = ids.to(b.device), mask.to(b.device)
    topic_ids = {t: torch.as_tensor(tokens[t], device=b.device) for t in transfer.topics}
    lead = 1 if b.info.needs_bos else 0

    def measure(logits: torch.Tensor, rows: list[int], topics: list[str]) -> list[tuple[float, float]]:
        lse = torch.logsumexp(logits.float(), dim=-1)  # (batch, tokens): no second vocabulary-sized tensor
        out = []
        for j, (r, t) in enumerate(zip(rows, topics)):
            n = len(seqs[r])
            at = slice(lead + score_from - 1, n - 1)
            mass = (torch.logsumexp(logits[j, at][:, topic_ids[t]].float(), dim=-1) - lse[j, at]).mean()
            target = logits[j, lead : n - 1].gather(-1, ids[r, lead + 1 : n, None])[:, 0].float()
            nll = (lse[j, lead : n - 1] - target).mean()
            out.append((float(mass), float(nll)))
        return out

    base_states: list[torch.Tensor] = []
    records = []

    def keep(h: torch.Tensor) -> torch.Tensor:
        base_states.append(h)
        return h

    with block_output_hook(transformer_blocks(b.model)[transfer.layer_b - 1], keep):
        base_logits = b.model(input_ids=ids, attention_mask=mask).logits
    hidden = base_states[0]
    for t in transfer.topics:
        for r, (score, nll) in enumerate(measure(base_logits, list(range(len(seqs))), [t] * len(seqs))):
            records.append(("none", t, 0.0, r, score, nll))
    jobs = [
        (c, t, al, r) for c in transfer.conditions for t in transfer.topics for al in alphas for r in range(len(seqs))
    ]
    bar = tqdm(total=len(jobs), desc=f"{b.info.name} sweep", disable=not progress, mininterval=2.0)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        rows = [r for *_, r in chunk]
        vecs = torch.stack([transfer.direction(c, t) * (al * transfer.norm_b) for c, t, al, _ in chunk])
        with resume_after(b, transfer.layer_b, hidden[rows]), steer(b, transfer.layer_b, vecs, 1.0):
            logits = b.model(input_ids=ids[rows], attention_mask=mask[rows]).logits
        for (c, t, al, r), (score, nll) in zip(chunk, measure(logits, rows, [t for _, t, _, _ in chunk])):
            records.append((c, t, float(al), r, score, nll))
        bar.update(len(chunk))
    bar.close()
    df = pd.DataFrame(records, columns=["condition", "topic", "alpha", "prompt", "score", "nll"])
    base = df[df["condition"] == "none"].set_index(["topic", "prompt"])
    key = pd.MultiIndex.from_frame(df[["topic", "prompt"]])
    df["rise"] = df["score"].to_numpy() - base["score"].reindex(key).to_numpy()
    df["ppl ratio"] = np.exp(df["nll"].to_numpy() - base["nll"].reindex(key).to_numpy())
    df.insert(0, "pair", f"{transfer.names[0]} → {transfer.names[1]}")
    if cache:
        save_frame(df, path)
    return df


@torch.no_grad()
def steered_generations(
    b: LoadedModel,
    transfer: Transfer,
    prompts: Sequence[str],
    alpha: float,
    classifier: Any,
    conditions: Sequence[str] = ("none", "native", "emb2emb", "random"),
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = False,
    cache: bool = True,
) -> Any:
    """Greedy continuations under each condition and topic, scored for topic and fluency (chapter 6).

    All conditions run in the same batches (left-padded, one steering vector per
    sequence). **score** is the topic classifier's probability of the row's topic
    for the continuation; **ppl** is the continuation's perplexity under unsteered
    B; **ppl ratio** divides it by the unsteered continuation's perplexity of the
    same prompt. The unsteered continuation appears once per topic. With
    ``cache`` the table is kept on disk under a key of everything it depends on
    (model, directions, prompts, strength, classifier weights, lengths).
    """
    import pandas as pd

    unknown = [c for c in conditions if c != "none" and c not in transfer.vectors]
    if unknown:
        raise EmbgeoInputError(f"Unknown condition(s) {unknown}; choose from {['none', *transfer.conditions]}.")

    clf = classifier.model
    path = _table_path(
        "generations",
        b,
        transfer,
        list(prompts),
        float(alpha),
        list(conditions),
        max_new_tokens,
        batch_size,
        classifier.encoder.info.name,
        classifier.encoder.info.sha256,
        list(classifier.topics),
        np.asarray(getattr(clf, "coef_", []), dtype=np.float64).tobytes(),
        np.asarray(getattr(clf, "intercept_", []), dtype=np.float64).tobytes(),
    )
    if cache and (cached := load_frame(path)) is not None:
        return cached
    jobs = [("none", transfer.topics[0], r) for r in range(len(prompts))]
    jobs += [(c, t, r) for c in conditions if c != "none" for t in transfer.topics for r in range(len(prompts))]
    texts: list[str] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        vecs = torch.stack([transfer.direction(c, t) * (alpha * transfer.norm_b) for c, t, _ in chunk])
        with steer(b, transfer.layer_b, vecs, 1.0):
            texts += generate(
                b, [prompts[r] for *_, r in chunk], max_new_tokens, batch_size=len(chunk), progress=progress
            )
    nll = continuation_nll(b, [prompts[r] for *_, r in jobs], texts, batch_size=batch_size)
    proba = classifier.proba([x if x.strip() else "." for x in texts])
    rows = []
    for (c, t, r), text, n, p in zip(jobs, texts, nll, proba):
        for topic in transfer.topics if c == "none" else [t]:
            rows.append((c, topic, r, prompts[r], text, float(p[classifier.topics.index(topic)]), float(np.exp(n))))
    df = pd.DataFrame(rows, columns=["condition", "topic", "prompt", "prompt text", "continuation", "score", "ppl"])
    base = df[df["condition"] == "none"].set_index(["topic", "prompt"])["ppl"]
    df["ppl ratio"] = df["ppl"].to_numpy() / base.reindex(pd.MultiIndex.from_frame(df[["topic", "prompt"]])).to_numpy()
    df.insert(0, "pair", f"{transfer.names[0]} → {transfer.names[1]}")
    df.insert(3, "alpha", float(alpha))
    if cache:
        save_frame(df, path)
    return df


def sweep_summary(sweep: Any, n_boot: int = 2000, seed: int = 0) -> Any:
    """Mean rise in concept score and geometric-mean perplexity ratio per pair, condition and alpha,
    with 95 % bootstrap intervals over (topic, prompt) units (chapter 6)."""
    import pandas as pd

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


def _units(frame: Any, condition: str, value: str, alpha: float | None = None) -> Any:
    g = frame[frame["condition"] == condition]
    if alpha is not None:
        g = g[np.isclose(g["alpha"], alpha)]
    return g.set_index(["topic", "prompt"])[value].sort_index()


def pair_analysis(
    sweep: Any,
    gens: Any | None = None,
    transfer: str = "emb2emb",
    max_ppl_ratio: float = 2.0,
    n_permutations: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """The numbers behind claim 9 for one pair (chapter 6).

    The strength ``alpha*`` is chosen among the swept strengths at which the
    transferred vector keeps the geometric-mean perplexity ratio on real text
    within ``max_ppl_ratio``: the one where its rise in concept score over the
    random vector is largest. Its p-values (one-sided sign-flip permutation over
    (topic, prompt) units) are multiplied by the number of admissible strengths,
    which pays for the choice. ``fraction of native`` is the transferred vector's
    rise over no steering divided by the native vector's, at ``alpha*``.
    """

    out: dict[str, Any] = {"transfer": transfer}
    sub = sweep[sweep["condition"] == transfer]
    if sub.empty:
        raise EmbgeoInputError(f"The sweep has no condition {transfer!r}.")
    ratio = sub.groupby("alpha")["ppl ratio"].apply(lambda x: float(np.exp(np.log(x).mean())))
    admissible = [float(a) for a in ratio.index if ratio[a] <= max_ppl_ratio and a > 0]
    out["admissible alphas"] = admissible
    if not admissible:
        return out
    gain = {
        a: float((_units(sweep, transfer, "rise", a) - _units(sweep, "random", "rise", a)).mean()) for a in admissible
    }
    best = max(admissible, key=lambda a: gain[a])
    k = len(admissible)
    tr = _units(sweep, transfer, "rise", best)
    rnd = _units(sweep, "random", "rise", best)
    nat = _units(sweep, "native", "rise", best)
    p_none = paired_permutation(tr.to_numpy(), n_permutations=n_permutations, seed=seed)
    p_rand = paired_permutation(tr.to_numpy(), rnd.to_numpy(), n_permutations=n_permutations, seed=seed)
    out.update(
        {
            "alpha*": best,
            "units": len(tr),
            "rise": float(tr.mean()),
            "rise random": float(rnd.mean()),
            "rise native": float(nat.mean()),
            "ppl ratio": float(ratio[best]),
            "p vs none": min(1.0, k * p_none.p_value),
            "p vs random": min(1.0, k * p_rand.p_value),
            "se vs none": p_none.se,
            "se vs random": p_rand.se,
            "effect vs random": float((tr - rnd).mean()),
            "fraction of native": float(tr.mean() / nat.mean()) if nat.mean() > 0 else float("nan"),
        }
    )
    if gens is not None and not gens.empty and transfer in set(gens["condition"]):
        gt = _units(gens, transfer, "score")
        gn = _units(gens, "none", "score").reindex(gt.index)
        gr = _units(gens, "random", "score").reindex(gt.index)
        gv = _units(gens, "native", "score").reindex(gt.index) if "native" in set(gens["condition"]) else None
        g_none = paired_permutation(gt.to_numpy(), gn.to_numpy(), n_permutations=n_permutations, seed=seed)
        g_rand = paired_permutation(gt.to_numpy(), gr.to_numpy(), n_permutations=n_permutations, seed=seed)
        out.update(
            {
                "gen alpha": float(gens["alpha"].iloc[0]),
                "gen units": len(gt),
                "gen score": float(gt.mean()),
                "gen score none": float(gn.mean()),
                "gen score random": float(gr.mean()),
                "gen p vs none": g_none.p_value,
                "gen p vs random": g_rand.p_value,
                "gen se vs none": g_none.se,
                "gen se vs random": g_rand.se,
                "gen ppl ratio": float(np.exp(np.log(_units(gens, transfer, "ppl ratio")).median())),
            }
        )
        if gv is not None:
            out["gen score native"] = float(gv.mean())
            d_nat = float(gv.mean() - gn.mean())
            out["gen fraction of native"] = float((gt.mean() - gn.mean()) / d_nat) if d_nat > 0 else float("nan")
    return out


def check_claim9(
    sweep: Any,
    gens: Any | None = None,
    transfer: str = "emb2emb",
    max_ppl_ratio: float = 2.0,
    alpha: float = 0.01,
    n_permutations: int = 10_000,
    seed: int = 0,
) -> Any:
    """Claim 9 (chapter 6): the transferred vector steers B better than the random and no-steering controls.

    Checks, declared in advance, for every pair in ``sweep`` (and ``gens``):

    * the forward-pass concept score at ``alpha*`` (:func:`pair_analysis`: the best
      strength at which perplexity on real text stays within ``max_ppl_ratio`` of
      unsteered) rises above no steering, and above a random vector of equal norm
      (effects in nats, one-sided permutation p, multiplied by the number of
      admissible strengths);
    * with ``gens`` (continuations generated at ``alpha*``): the topic
      classifier's probability for continuations steered by the transferred
      vector exceeds the unsteered and the random-vector continuations' (one-sided
      permutation p). Their perplexity under unsteered B is reported
      (:func:`pair_analysis`), not tested: fluency enters through ``alpha*``.

    A pair with no admissible strength fails its sweep checks. The p-values of
    all pairs are Holm-adjusted together (:func:`embgeo_utils.core.stats.verdict`).
    """

    checks = []
    for pair in sweep["pair"].unique():
        g = gens[gens["pair"] == pair] if gens is not None else None
        r = pair_analysis(sweep[sweep["pair"] == pair], g, transfer, max_ppl_ratio, n_permutations, seed)
        if "alpha*" not in r:
            checks.append(Check(f"{pair}: no strength keeps perplexity within {max_ppl_ratio}x", -1.0, 1.0))
            continue
        n, a_, k = r["units"], r["alpha*"], len(r["admissible alphas"])
        checks.append(
            Check(
                f"{pair}: {transfer} > no steering (sweep, alpha {a_:g})",
                r["rise"],
                r["p vs none"],
                n=n,
                se=r["se vs none"],
                corrected_for=k,
            )
        )
        checks.append(
            Check(
                f"{pair}: {transfer} > random vector (sweep, alpha {a_:g})",
                r["effect vs random"],
                r["p vs random"],
                n=n,
                se=r["se vs random"],
                corrected_for=k,
            )
        )
        if "gen score" in r:
            n_g = r["gen units"]
            checks.append(
                Check(
                    f"{pair}: continuations, {transfer} > no steering (classifier)",
                    r["gen score"] - r["gen score none"],
                    r["gen p vs none"],
                    n=n_g,
                    se=r["gen se vs none"],
                )
            )
            checks.append(
                Check(
                    f"{pair}: continuations, {transfer} > random vector (classifier)",
                    r["gen score"] - r["gen score random"],
                    r["gen p vs random"],
                    n=n_g,
                    se=r["gen se vs random"],
                )
            )
    return verdict(checks, alpha=alpha)


def example_generations(gens: Any, topic: str | None = None, prompt: int = 0, width: int = 160) -> Any:
    """One prompt's continuations under every condition, for one topic (chapter 6): a table to read."""
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
        summary: ``transfer.sweep_summary(...)`` (mean rise with 95 % bootstrap
            interval, geometric-mean perplexity ratio with its interval).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    need_columns(
        summary, ("pair", "condition", "alpha", "rise", "rise low", "rise high", "ppl ratio"), "transfer.sweep_summary"
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
