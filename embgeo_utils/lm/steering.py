"""Steering vectors: find them, add them to the residual stream, generate, score (chapter 6).

A steering vector for block ``layer`` is the difference of the mean residual
activations (the block's output, averaged over each text's token positions, BOS
left out, then over texts) between a positive and a negative set of texts
(:func:`steering_vector`). :func:`steer` adds ``alpha * vector`` to the block's
output at every position through a forward hook, for plain forward passes and for
``generate``; the hook is removed on exit, also when the body raises, and several
may be active at once. :func:`generate_ids` runs batched generation with the KV cache and left padding, one
steering vector and one sampling seed per sequence (greedy where the seed is ``None``), so that a sequence's
continuation does not depend on the batch it shares; :func:`generate` is its text front end.
:func:`last_token_logits` gives the next-token logits after each prompt from one position per row (the
vocabulary head is the largest matrix of a small model), :func:`sequence_nll` scores fluency,
:class:`TopicClassifier` scores the concept.

References:
    A. M. Turner, L. Thiergart, D. Udell, G. Leech, U. Mini, M. MacDiarmid (2023),
    Activation addition: steering language models without optimization, arXiv:2308.10248.

    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared global and local
    geometry of language model embeddings, arXiv:2503.21073.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.cache import cached
from ..core.errors import EmbgeoInputError
from ..core.progress import tqdm
from .models import LoadedModel, base_model, block_output_hook, first_blocks, transformer_blocks

__all__ = [
    "TopicClassifier",
    "check_layer",
    "continuation_nll",
    "encode_texts",
    "fit_topic_classifier",
    "generate",
    "generate_ids",
    "last_token_logits",
    "residual_means",
    "residual_norm",
    "resume_after",
    "sentence_embeddings",
    "sequence_nll",
    "steer",
    "steering_vector",
    "token_states",
]


def check_layer(loaded: LoadedModel, layer: int) -> int:
    """``layer`` as a block number in ``[1, n_layers]`` for this model, or a clear error (chapter 6)."""
    n = loaded.info.n_layers
    if isinstance(layer, bool) or int(layer) != layer or not 1 <= layer <= n:
        raise EmbgeoInputError(f"layer must be a block number in [1, {n}] for {loaded.info.name}, got {layer!r}.")
    return int(layer)


def _texts(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        raise EmbgeoInputError(f"{name} must be a list of texts, not one string.")
    out = [t for t in texts if isinstance(t, str) and t.strip()]
    if not out:
        raise EmbgeoInputError(f"{name} is empty: give at least one non-empty text.")
    return out


def encode_texts(loaded: LoadedModel, texts: Sequence[str], max_tokens: int = 128) -> list[list[int]]:
    """Token ids of each text, cut to ``max_tokens``, with BOS first when the model needs it (chapter 6)."""
    tok = loaded.tokenizer
    bos = tok.bos_token_id if loaded.info.needs_bos else None
    if loaded.info.needs_bos and bos is None:
        raise EmbgeoInputError(f"Model {loaded.info.name} needs a BOS token but its tokenizer has none.")
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
        out.append(([int(bos)] if bos is not None else []) + list(ids))
    return out


def _pad(seqs: list[list[int]], pad_id: int, left: bool, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids.to(dev), mask.to(dev)


def _pad_id(loaded: LoadedModel) -> int:
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad if pad is not None else 0)


@torch.no_grad()
def token_states(
    loaded: LoadedModel,
    texts: Sequence[str],
    layer: int,
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    skip_first: int = 0,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Block ``layer``'s output at every token of each text, ``[(tokens_i, d)]`` float32 on CPU (chapter 6).

    BOS (when the model needs one) and then ``skip_first`` more leading positions
    are left out. The forward pass stops once block ``layer`` has run (later blocks
    cannot change it), so a middle layer costs about half a forward pass.
    """
    layer = check_layer(loaded, layer)
    texts = _texts(texts, "texts")
    seqs = encode_texts(loaded, texts, max_tokens)
    lead = (1 if loaded.info.needs_bos else 0) + int(skip_first)
    if min(len(s) for s in seqs) <= lead:
        raise EmbgeoInputError(f"Every text needs more than {lead} tokens (after BOS and skip_first); one is shorter.")
    blocks = transformer_blocks(loaded.model)
    body = base_model(loaded.model)  # no language-model head
    captured: list[torch.Tensor] = []

    def keep(h: torch.Tensor) -> torch.Tensor:
        captured.append(h)
        return h

    out: list[torch.Tensor] = []
    bar = tqdm(total=len(seqs), desc=f"{loaded.info.name} layer {layer}", disable=not progress, mininterval=2.0)
    with block_output_hook(blocks[layer - 1], keep), first_blocks(loaded.model, layer):
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            ids, mask = _pad(chunk, _pad_id(loaded), left=False, dev=loaded.device)
            captured.clear()
            body(input_ids=ids, attention_mask=mask)
            h = captured[0].float().cpu()
            out += [h[i, lead : len(s)] for i, s in enumerate(chunk)]
            bar.update(len(chunk))
    bar.close()
    return out


def residual_means(
    loaded: LoadedModel,
    texts: Sequence[str],
    layer: int,
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    skip_first: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Per-text mean of block ``layer``'s output over token positions, ``(texts, d)`` float32 (chapter 6).

    BOS (when the model needs one) and then ``skip_first`` more leading positions
    are left out of each mean (:func:`token_states`).
    """
    states = token_states(
        loaded, texts, layer, max_tokens=max_tokens, batch_size=batch_size, skip_first=skip_first, progress=progress
    )
    return torch.stack([h.mean(dim=0) for h in states])


def steering_vector(
    loaded: LoadedModel,
    positive_texts: Sequence[str],
    negative_texts: Sequence[str],
    layer: int,
    **kwargs: Any,
) -> torch.Tensor:
    """Difference of mean residual activations, positive minus negative texts, at block ``layer`` (chapter 6).

    Each text counts once (mean over its positions, BOS left out, then mean over
    texts). Keyword arguments go to :func:`residual_means`.

    Raises:
        EmbgeoInputError: on an empty text set or a layer out of range.
    """
    pos = residual_means(loaded, _texts(positive_texts, "positive_texts"), layer, **kwargs)
    neg = residual_means(loaded, _texts(negative_texts, "negative_texts"), layer, **kwargs)
    return pos.mean(dim=0) - neg.mean(dim=0)


@torch.no_grad()
def residual_norm(loaded: LoadedModel, texts: Sequence[str], layer: int, max_tokens: int = 128) -> float:
    """Median per-token norm of block ``layer``'s output, the first position left out (chapter 6).

    The first position carries outsized activations in these models (30x the
    median in Qwen2.5-Coder-1.5B), so the mean would misstate the scale of a
    typical token; steering strengths are expressed relative to this median.
    """
    layer = check_layer(loaded, layer)
    seqs = encode_texts(loaded, _texts(texts, "texts"), max_tokens)
    blocks = transformer_blocks(loaded.model)
    norms: list[torch.Tensor] = []

    def keep(h: torch.Tensor) -> torch.Tensor:
        norms.append(h[0, 1:].float().norm(dim=-1))
        return h

    with block_output_hook(blocks[layer - 1], keep):
        for s in seqs:
            if len(s) > 1:
                loaded.model(input_ids=torch.tensor([s], device=loaded.device))
    if not norms:
        raise EmbgeoInputError("Texts need at least 2 tokens to measure a residual norm.")
    return float(torch.cat(norms).median())


def _vector(loaded: LoadedModel, vector: Any) -> torch.Tensor:
    v = torch.as_tensor(vector).float()
    v = v.reshape(-1) if v.ndim < 2 else v
    if v.ndim > 2 or v.shape[-1] != loaded.info.d_model:
        raise EmbgeoInputError(
            f"The vector has width {v.shape[-1] if v.ndim else 1} but {loaded.info.name} has width "
            f"{loaded.info.d_model}; map it into this model first (emb2emb)."
        )
    if not bool(torch.isfinite(v).all()):
        raise EmbgeoInputError("The steering vector holds NaN or infinite values.")
    return v


@contextmanager
def resume_after(loaded: LoadedModel, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Run only the blocks after ``layer``, starting from its known output ``hidden`` (chapter 6).

    While active, blocks ``1..layer-1`` pass their input through untouched and
    block ``layer`` returns ``hidden`` (``(batch, tokens, d)``, the same batch and
    padding as the forward pass that follows); hooks on block ``layer`` (such as
    :func:`steer`) still apply. Steering at ``layer`` cannot change earlier
    blocks, so a strength sweep computes them once. The blocks are restored on
    exit, also when the body raises.
    """
    layer = check_layer(loaded, layer)
    blocks = transformer_blocks(loaded.model)

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    def cached(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        if tuple(x.shape) != tuple(hidden.shape):
            raise EmbgeoInputError(
                f"resume_after got states of shape {tuple(hidden.shape)} for a batch of shape {tuple(x.shape)}; "
                "pad the batch exactly as when the states were taken."
            )
        return hidden.to(device=x.device, dtype=x.dtype)

    try:
        for i in range(layer):
            blocks[i].forward = cached if i == layer - 1 else passthrough
        yield
    finally:
        for i in range(layer):
            blocks[i].__dict__.pop("forward", None)


@contextmanager
def steer(loaded: LoadedModel, layer: int, vector: Any, alpha: float) -> Iterator[None]:
    """Add ``alpha * vector`` to block ``layer``'s output at every position while active (chapter 6).

    Applies to forward passes and to ``generate`` (every new position too). The
    hook is removed on exit, also when the body raises; nested ``steer`` blocks
    add up. ``vector`` is one direction ``(d,)`` for every sequence, or one per
    sequence ``(batch, d)`` (row ``i`` is added to sequence ``i``; the batch must
    then have exactly that many sequences).
    """
    layer = check_layer(loaded, layer)
    v = _vector(loaded, vector)
    blocks = transformer_blocks(loaded.model)
    add = (float(alpha) * v).to(loaded.device)
    if add.ndim == 2:
        add = add[:, None, :]

    def shift(h: torch.Tensor) -> torch.Tensor:
        if add.ndim == 3 and h.shape[0] != add.shape[0]:
            raise EmbgeoInputError(
                f"steer was given {add.shape[0]} per-sequence vectors but the batch has {h.shape[0]} sequences."
            )
        return h + add.to(h.dtype)

    with block_output_hook(blocks[layer - 1], shift):
        yield


def _head(loaded: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The output head on final hidden states (rows), float32, with the model's logit soft-capping if it has one."""
    logits = loaded.model.get_output_embeddings()(hidden).float()
    cap = getattr(loaded.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def last_token_logits(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits after the last real token of each row of a right-padded batch, ``(batch, vocab)`` (chapter 6).

    The body runs on the whole batch (hooks such as :func:`steer` and :func:`resume_after` apply), the output head
    on one position per row: for a vocabulary of 262,144 tokens the head costs more than the body's half that
    follows a middle block, so scoring every position would multiply the cost several times.
    """
    if ids.shape != mask.shape or ids.ndim != 2:
        raise EmbgeoInputError(
            f"ids and mask must be (batch, tokens) of one shape, got {tuple(ids.shape)}, {tuple(mask.shape)}."
        )
    last = mask.long().sum(dim=1) - 1
    if bool((last < 0).any()):
        raise EmbgeoInputError("Every row needs at least one real token (mask with a 1).")
    hidden = base_model(loaded.model)(input_ids=ids, attention_mask=mask).last_hidden_state
    return _head(loaded, hidden[torch.arange(ids.shape[0], device=hidden.device), last.to(hidden.device)])


def _stop_ids(loaded: LoadedModel) -> list[int]:
    """Token ids that end a continuation: the generation config's and the tokenizer's end of text, and padding."""
    ids: set[int] = set()
    eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    for value in ([eos] if isinstance(eos, int) else list(eos or [])) + [
        loaded.tokenizer.eos_token_id,
        _pad_id(loaded),
    ]:
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


class _RowSampler:
    """Per-row decoding for ``generate``: a seeded top-k draw where a row has a seed, the argmax elsewhere (chapter 6).

    Each sampled row owns a generator seeded with its seed and draws one uniform number per step, so its
    continuation depends on its prompt, its steering and its seed, never on the other rows of the batch; two
    conditions given the same seed draw the same numbers (common random numbers). The draw inverts the cumulative
    distribution of the ``top_k`` most likely tokens, sorted by probability, at ``temperature``.
    """

    def __init__(self, seeds: Sequence[int | None], top_k: int | None, temperature: float) -> None:
        self.rows = [i for i, s in enumerate(seeds) if s is not None]
        self.gens = [torch.Generator().manual_seed(int(seeds[i])) for i in self.rows]  # type: ignore[arg-type]
        self.top_k = top_k
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return scores
        rows = torch.as_tensor(self.rows, device=scores.device)
        u = torch.cat([torch.rand(1, generator=g) for g in self.gens]).to(scores.device)
        k = scores.shape[-1] if self.top_k is None else min(int(self.top_k), scores.shape[-1])
        values, index = torch.topk(scores[rows].float() / self.temperature, k, dim=-1)
        cdf = torch.softmax(values, dim=-1).cumsum(dim=-1)
        pick = (cdf < u[:, None]).sum(dim=-1).clamp(max=k - 1)
        chosen = index[torch.arange(len(self.rows), device=scores.device), pick]
        out = scores.clone()
        out[rows] = float("-inf")
        out[rows, chosen] = 0.0
        return out


@torch.no_grad()
def generate_ids(
    loaded: LoadedModel,
    seqs: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    *,
    seeds: Sequence[int | None] | None = None,
    vectors: torch.Tensor | None = None,
    layer: int | None = None,
    top_k: int | None = 50,
    temperature: float = 1.0,
    batch_size: int = 32,
    use_cache: bool = True,
    progress: bool = False,
) -> list[list[int]]:
    """New token ids continuing each token sequence: batched, left-padded, with the KV cache (chapter 6).

    Args:
        loaded: the model.
        seqs: prompts as token ids (:func:`encode_texts`).
        max_new_tokens: tokens generated per sequence (fewer when it ends: end of text or padding tokens).
        seeds: per sequence, the seed of its top-k draw, or ``None`` for greedy decoding (default: all greedy).
        vectors: ``(len(seqs), d)``, one vector added to block ``layer``'s output of each sequence at every
            position (:func:`steer`); ``None`` generates unsteered.
        layer: the steered block (with ``vectors``).
        top_k, temperature: the sampling distribution of seeded rows (``top_k=None``: the whole vocabulary).
        batch_size: sequences per call of ``generate``; the result does not depend on it.
        use_cache: keep the keys and values of past positions (the KV cache); ``False`` recomputes every position
            at every step (for tests: both give the same tokens).
        progress: show a progress bar.

    Returns:
        Per sequence, the new token ids, up to and without the first end-of-text or padding token.
    """
    if max_new_tokens < 1:
        raise EmbgeoInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    rows = [[int(t) for t in s] for s in seqs]
    if not rows or min(len(s) for s in rows) < 1:
        raise EmbgeoInputError("Give at least one prompt, each with at least one token.")
    seeds = list(seeds) if seeds is not None else [None] * len(rows)
    if len(seeds) != len(rows):
        raise EmbgeoInputError(f"{len(seeds)} seeds for {len(rows)} sequences; give one per sequence (None: greedy).")
    block = 0
    if vectors is not None:
        vectors = _vector(loaded, vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(rows) or layer is None:
            raise EmbgeoInputError(f"Give one steering vector per sequence, ({len(rows)}, d), and the block to steer.")
        block = layer
    pad, stop = _pad_id(loaded), _stop_ids(loaded)
    out: list[list[int]] = []
    bar = tqdm(total=len(rows), desc=f"{loaded.info.name} generate", disable=not progress, mininterval=2.0)
    for start in range(0, len(rows), batch_size):
        ids, mask = _pad(rows[start : start + batch_size], pad, left=True, dev=loaded.device)
        sampler = _RowSampler(seeds[start : start + batch_size], top_k, temperature)
        kwargs: dict[str, Any] = {"logits_processor": [sampler]} if sampler.rows else {}
        with steer(loaded, block, vectors[start : start + ids.shape[0]], 1.0) if vectors is not None else nullcontext():
            new = loaded.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=int(max_new_tokens), do_sample=False,
                temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=stop, use_cache=use_cache,
                **kwargs,
            )[:, ids.shape[1] :].tolist()  # fmt: skip
        for row in new:
            end = next((i for i, t in enumerate(row) if t in stop), len(row))
            out.append(row[:end])
        bar.update(ids.shape[0])
    bar.close()
    return out


def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Continuations of ``prompts`` as text (chapter 6): :func:`generate_ids`, greedy or sampled.

    Sampled, prompt ``i`` draws with seed ``seed + i`` (whatever the batch size). Returns only the new text of each
    prompt (special tokens dropped).
    """
    prompts = _texts(prompts, "prompts")
    seqs = encode_texts(loaded, prompts, max_tokens=10_000)
    seeds = [None if greedy else int(seed) + i for i in range(len(seqs))]
    new = generate_ids(
        loaded, seqs, max_new_tokens, seeds=seeds, top_k=top_k, temperature=temperature, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    return loaded.tokenizer.batch_decode(new, skip_special_tokens=True)


@torch.no_grad()
def sequence_nll(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], batch_size: int = 8
) -> np.ndarray:
    """Mean negative log-likelihood (nats per token) of each continuation's ids after its prompt's ids (chapter 6).

    Computed without steering it measures fluency as the unsteered model sees it; ``exp`` of it is the
    continuation's perplexity. The head runs on the continuation's positions only. An empty continuation gives NaN.
    """
    if len(prompts) != len(continuations):
        raise EmbgeoInputError(f"{len(prompts)} prompts but {len(continuations)} continuations.")
    body = base_model(loaded.model)
    out = np.full(len(prompts), np.nan)
    for start in range(0, len(prompts), batch_size):
        heads = [list(h) for h in prompts[start : start + batch_size]]
        tails = [list(t) for t in continuations[start : start + batch_size]]
        ids, mask = _pad([h + t for h, t in zip(heads, tails)], _pad_id(loaded), left=False, dev=loaded.device)
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        for j, (h, t) in enumerate(zip(heads, tails)):
            if not t:
                continue
            logp = torch.log_softmax(_head(loaded, hidden[j, len(h) - 1 : len(h) + len(t) - 1]), dim=-1)
            out[start + j] = float(-logp[torch.arange(len(t)), torch.tensor(t, device=logp.device)].mean())
    return out


def continuation_nll(
    loaded: LoadedModel, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8
) -> np.ndarray:
    """Mean negative log-likelihood (nats per token) of each continuation text after its prompt (chapter 6).

    The texts are encoded (the prompt with BOS where the model needs it) and scored by :func:`sequence_nll`.
    """
    if len(prompts) != len(continuations):
        raise EmbgeoInputError(f"{len(prompts)} prompts but {len(continuations)} continuations.")
    tok = loaded.tokenizer
    heads = encode_texts(loaded, list(prompts), max_tokens=10_000)
    tails = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
    return sequence_nll(loaded, heads, tails, batch_size)


@dataclass
class TopicClassifier:
    """Logistic regression on sentence embeddings of an encoder (chapter 6): the concept score.

    Attributes:
        topics: class names, in the order of the probability columns.
        heldout_accuracy: accuracy on held-out texts never used to fit.
    """

    encoder: LoadedModel
    model: Any
    topics: list[str]
    heldout_accuracy: float

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return sentence_embeddings(self.encoder, texts, batch_size)

    def proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities ``(texts, topics)``."""
        return self.model.predict_proba(self.embed(texts))

    def score(self, texts: Sequence[str], topic: str) -> np.ndarray:
        """Probability of ``topic`` for each text."""
        if topic not in self.topics:
            raise EmbgeoInputError(f"Unknown topic {topic!r}; the classifier knows {self.topics}.")
        return self.proba(texts)[:, self.topics.index(topic)]


def sentence_embeddings(
    encoder: LoadedModel, texts: Sequence[str], batch_size: int = 32, cache: bool = True
) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states of an encoder such as MiniLM (chapter 6).

    With ``cache`` the embeddings are kept on disk (cache kind ``sentence_embeddings``) under the encoder and the
    texts, so a rerun that scores the same continuations reads them.
    """
    texts = [str(t) for t in texts]
    if not texts:
        return np.empty((0, 0), dtype=np.float32)
    return (_embeddings if cache else _embeddings.compute)(encoder, texts, batch_size)


@cached("sentence_embeddings", version=1)
@torch.no_grad()
def _embeddings(encoder: LoadedModel, texts: list[str], batch_size: int) -> np.ndarray:
    """The embeddings of :func:`sentence_embeddings`, cached under the encoder (weights, dtype) and the texts."""
    tok = encoder.tokenizer
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tok(
            list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=128, return_tensors="pt"
        ).to(encoder.device)
        h = encoder.model(**batch).last_hidden_state.float()
        m = batch["attention_mask"][:, :, None].float()
        e = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
        out.append(torch.nn.functional.normalize(e, dim=1).cpu().numpy())
    return np.concatenate(out)


def fit_topic_classifier(
    encoder: LoadedModel,
    texts: Sequence[str],
    topics: Sequence[str],
    heldout_texts: Sequence[str],
    heldout_topics: Sequence[str],
    seed: int = 0,
) -> TopicClassifier:
    """Fit the concept scorer on topic-labelled texts; report its held-out accuracy (chapter 6)."""
    from sklearn.linear_model import LogisticRegression

    if len(texts) != len(topics) or len(heldout_texts) != len(heldout_topics):
        raise EmbgeoInputError("Each text needs exactly one topic label.")
    names = sorted(set(topics))
    if len(names) < 2:
        raise EmbgeoInputError("The classifier needs at least two topics.")
    clf = LogisticRegression(max_iter=2000, C=10.0, random_state=seed)
    clf.fit(sentence_embeddings(encoder, texts), [names.index(t) for t in topics])
    pred = clf.predict(sentence_embeddings(encoder, heldout_texts))
    truth = np.array([names.index(t) if t in names else -1 for t in heldout_topics])
    return TopicClassifier(encoder, clf, names, float((pred == truth).mean()))
