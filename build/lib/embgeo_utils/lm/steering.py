"""Steering vectors: find them, add them to the residual stream, generate, score (chapter 6).

A steering vector for block ``layer`` is the difference of the mean residual
activations (the block's output, averaged over each text's token positions, BOS
left out, then over texts) between a positive and a negative set of texts
(:func:`steering_vector`). :func:`steer` adds ``alpha * vector`` to the block's
output at every position through a forward hook, for plain forward passes and for
``generate``; the hook is removed on exit, also when the body raises, and several
may be active at once. :func:`generate` runs batched generation with left padding.
:func:`continuation_nll` scores fluency, :class:`TopicClassifier` scores the concept.

References:
    A. M. Turner, L. Thiergart, D. Udell, G. Leech, U. Mini, M. MacDiarmid (2023),
    Activation addition: steering language models without optimization, arXiv:2308.10248.

    A. Lee, M. Weber, F. Viégas, M. Wattenberg (2025), Shared global and local
    geometry of language model embeddings, arXiv:2503.21073.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
    "residual_means",
    "residual_norm",
    "resume_after",
    "sentence_embeddings",
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


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Continuations of ``prompts`` (chapter 6): batched, left-padded, greedy or sampled with a seed.

    Returns only the new text of each prompt (special tokens dropped).
    """
    prompts = _texts(prompts, "prompts")
    if max_new_tokens < 1:
        raise EmbgeoInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    seqs = encode_texts(loaded, prompts, max_tokens=10_000)
    pad = _pad_id(loaded)
    out: list[str] = []
    bar = tqdm(total=len(seqs), desc=f"{loaded.info.name} generate", disable=not progress, mininterval=2.0)
    for start in range(0, len(seqs), batch_size):
        ids, mask = _pad(seqs[start : start + batch_size], pad, left=True, dev=loaded.device)
        if not greedy:
            torch.manual_seed(int(seed) + start)
        new = loaded.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=int(max_new_tokens),
            do_sample=not greedy,
            temperature=float(temperature) if not greedy else None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )[:, ids.shape[1] :]
        out += loaded.tokenizer.batch_decode(new, skip_special_tokens=True)
        bar.update(ids.shape[0])
    bar.close()
    return out


@torch.no_grad()
def continuation_nll(
    loaded: LoadedModel, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8
) -> np.ndarray:
    """Mean negative log-likelihood (nats per token) of each continuation after its prompt (chapter 6).

    ``exp`` of it is the continuation's perplexity; computed without steering it
    measures fluency as the unsteered model sees it. An empty continuation gives NaN.
    """
    if len(prompts) != len(continuations):
        raise EmbgeoInputError(f"{len(prompts)} prompts but {len(continuations)} continuations.")
    tok = loaded.tokenizer
    heads = encode_texts(loaded, list(prompts), max_tokens=10_000)
    tails = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
    out = np.full(len(prompts), np.nan)
    for start in range(0, len(heads), batch_size):
        seqs = [h + t for h, t in zip(heads[start : start + batch_size], tails[start : start + batch_size])]
        ids, mask = _pad(seqs, _pad_id(loaded), left=False, dev=loaded.device)
        logp = torch.log_softmax(loaded.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for j, (h, t) in enumerate(zip(heads[start : start + batch_size], tails[start : start + batch_size])):
            if not t:
                continue
            pos = torch.arange(len(h) - 1, len(h) + len(t) - 1, device=ids.device)
            target = torch.tensor(t, device=ids.device)
            out[start + j] = float(-logp[j, pos, target].mean())
    return out


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


@torch.no_grad()
def sentence_embeddings(encoder: LoadedModel, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Mean-pooled, L2-normalised last hidden states of an encoder such as MiniLM (chapter 6)."""
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
    return np.concatenate(out) if out else np.empty((0, 0))


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
