"""Hidden states of every layer and next-token loss, batched and cached (chapters 0, 1 and 4).

``hidden_states`` runs the base model (no language-model head) on equal-length
token sequences and returns float32 hidden states of every layer
``[prompts, layers + 1, tokens, d]``: index 0 is the embedding output, index
``l`` the output of block ``l``; in the ``transformers`` models used here the
last entry is taken after the final normalisation. When a model needs a BOS
token (Gemma-3) it is prepended for the forward pass and its position is left
out of the returned cloud. Each prompt's result is cached on disk under a key
made of the model's hash, the token ids and every parameter, so reruns read
instead of compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.cache import cached
from ..core.device import chunk_rows
from ..core.errors import EmbgeoInputError, PromptTooShortError
from ..core.progress import tqdm
from .models import LoadedModel, base_model, first_blocks
from .vocab import normalized_vocabulary

__all__ = [
    "Activations",
    "hidden_states",
    "lone_token_states",
    "prepare_ids",
    "prompt_states",
    "token_losses",
]


@dataclass
class Activations:
    """Result of :func:`hidden_states` (chapter 4)."""

    hidden: np.ndarray  # [prompts, layers + 1, tokens, d] float32
    loss: np.ndarray | None  # [prompts] mean next-token cross-entropy (nats)
    token_ids: np.ndarray  # [prompts, tokens]
    model: str
    cache_hits: int = 0

    @property
    def n_layers(self) -> int:
        return self.hidden.shape[1] - 1


def prepare_ids(
    ids: Sequence[Sequence[int]] | Sequence[np.ndarray] | np.ndarray, n_tokens: int | None = None
) -> np.ndarray:
    """Cut every sequence to the same length and stack them (``[prompts, tokens]`` int64).

    Raises:
        PromptTooShortError: if a sequence is shorter than ``n_tokens`` (or than 2 tokens).
    """
    seqs = [np.asarray(s, dtype=np.int64).ravel() for s in ids]
    if not seqs:
        raise EmbgeoInputError("No prompts given.")
    length = n_tokens or min(len(s) for s in seqs)
    if length < 2:
        raise PromptTooShortError(
            f"Prompts need at least 2 tokens (got {length}): a next-token loss and a token cloud need two; "
            "prefix single tokens with a context token, or pass longer prompts."
        )
    short = [i for i, s in enumerate(seqs) if len(s) < length]
    if short:
        raise PromptTooShortError(
            f"Prompts {short[:5]} have fewer than {length} tokens; choose longer passages "
            "(load_passages(min_tokens=...)) or a smaller n_tokens."
        )
    return np.stack([s[:length] for s in seqs])


def _bos_id(loaded: LoadedModel) -> int | None:
    if not loaded.info.needs_bos:
        return None
    bos = loaded.tokenizer.bos_token_id
    if bos is None:
        raise EmbgeoInputError(f"Model {loaded.info.name} needs a BOS token but its tokenizer has none.")
    return int(bos)


def _loss_from_last(model: Any, last: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sequence, with the LM head applied in position chunks."""
    head = model.get_output_embeddings()
    # float32 logits, their softmax and gradient-free temporaries: about 3 copies per position.
    chunk = chunk_rows(12 * last.shape[0] * head.weight.shape[0], last.device, max_rows=targets.shape[1])
    cap = getattr(model.config, "final_logit_softcapping", None)
    total = torch.zeros(last.shape[0], dtype=torch.float64, device=last.device)
    for start in range(0, targets.shape[1], chunk):
        logits = head(last[:, start : start + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        ce = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets[:, start : start + chunk], reduction="none"
        )
        total += ce.double().sum(dim=1)
    return total / targets.shape[1]


@torch.no_grad()
def _forward(loaded: LoadedModel, ids: np.ndarray, with_loss: bool, layers: list[int] | None):
    dev = loaded.device
    bos = _bos_id(loaded)
    batch = torch.as_tensor(ids, device=dev)
    if bos is not None:
        batch = torch.cat([torch.full((batch.shape[0], 1), bos, device=dev, dtype=batch.dtype), batch], dim=1)
    offset = 1 if bos is not None else 0
    base = base_model(loaded.model) if loaded.info.causal else loaded.model
    n_blocks = loaded.info.n_layers
    if not with_loss and layers and loaded.info.causal and max(layers) + 1 < n_blocks:
        n_blocks = max(layers) + 1  # the blocks after the deepest requested layer are skipped
    if n_blocks < loaded.info.n_layers:
        with first_blocks(loaded.model, n_blocks):
            out = base(input_ids=batch, output_hidden_states=True)
    else:
        out = base(input_ids=batch, output_hidden_states=True)
    states = out.hidden_states if layers is None else [out.hidden_states[i] for i in layers]
    hidden = torch.stack([h[:, offset:] for h in states], dim=1).float().cpu().numpy()
    loss = None
    if with_loss:
        if not loaded.info.causal:
            raise EmbgeoInputError(
                f"{loaded.info.name} is an encoder: it has no next-token loss; pass with_loss=False."
            )
        last = out.hidden_states[-1][:, offset:]
        # predict content tokens 1..T-1 from their prefixes (the BOS-only prediction is left out)
        loss = _loss_from_last(loaded.model, last[:, :-1], batch[:, offset + 1 :]).cpu().numpy()
    return hidden, loss


@cached("activations", version=1)
def prompt_states(loaded: LoadedModel, ids: np.ndarray, with_loss: bool, layers: list[int] | None) -> dict[str, Any]:
    """Hidden states of one prompt (``{"hidden": [layers + 1, tokens, d]}``, plus ``"loss"`` ``(1,)``), cached (chapter 4).

    :func:`hidden_states` looks each prompt up here and runs the misses in batches.
    """
    hidden, loss = _forward(loaded, np.asarray(ids, dtype=np.int64)[None], with_loss, layers)
    return _entry(hidden[0], None if loss is None else loss[:1])


def _entry(hidden: np.ndarray, loss: np.ndarray | None) -> dict[str, Any]:
    return {"hidden": hidden} if loss is None else {"hidden": hidden, "loss": loss}


def hidden_states(
    loaded: LoadedModel,
    ids: Sequence[Sequence[int]] | Sequence[np.ndarray] | np.ndarray,
    n_tokens: int | None = None,
    batch_size: int = 4,
    with_loss: bool = True,
    layers: Sequence[int] | None = None,
    cache: bool = True,
    progress: bool = True,
) -> Activations:
    """Hidden states of every layer for equal-length prompts, plus per-prompt loss (chapter 4).

    Args:
        loaded: a model from :func:`embgeo_utils.lm.models.load`.
        ids: token ids per prompt (no special tokens; BOS is added when the model needs it).
        n_tokens: cut every prompt to this many tokens (default: the shortest prompt).
        batch_size: prompts per forward pass.
        with_loss: also compute the mean next-token cross-entropy per prompt.
        layers: hidden-state indices to keep (0 = embeddings); default all.
        cache: read and write the on-disk cache.
        progress: show a progress bar.

    Returns:
        :class:`Activations` with ``hidden`` ``[prompts, layers, tokens, d]`` float32.
    """
    if batch_size < 1:
        raise EmbgeoInputError(f"batch_size must be at least 1, got {batch_size}.")
    arr = prepare_ids(ids, n_tokens)
    vocab = loaded.info.vocab_size
    if arr.min() < 0 or arr.max() >= vocab:
        raise EmbgeoInputError(
            f"Token ids must lie in [0, {vocab}) for {loaded.info.name}: were they made by its tokenizer?"
        )
    layer_list = list(layers) if layers is not None else None
    results: list[dict[str, Any] | None] = [None] * len(arr)
    if cache:
        results = [prompt_states.peek(loaded, row, with_loss, layer_list) for row in arr]
    hits = sum(r is not None for r in results)
    todo = [i for i, r in enumerate(results) if r is None]
    bar = tqdm(
        total=len(todo), desc=f"{loaded.info.name} hidden states", unit="prompt", disable=not progress or not todo
    )
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        hidden, loss = _forward(loaded, arr[chunk], with_loss, layer_list)
        for j, i in enumerate(chunk):
            item = _entry(hidden[j], None if loss is None else loss[j : j + 1])
            results[i] = prompt_states.put(item, loaded, arr[i], with_loss, layer_list) if cache else item
        bar.update(len(chunk))
    bar.close()
    hidden_all = np.stack([r["hidden"] for r in results])  # type: ignore[index]
    loss_all = np.concatenate([r["loss"] for r in results]) if with_loss else None  # type: ignore[index]
    return Activations(hidden_all, loss_all, arr, loaded.info.name, hits)


def token_losses(
    loaded: LoadedModel, ids: Sequence[Sequence[int]] | np.ndarray, n_tokens: int | None = None
) -> np.ndarray:
    """Per-prompt mean next-token loss only, without keeping hidden states (chapter 4)."""
    return hidden_states(loaded, ids, n_tokens, with_loss=True, layers=[0], progress=False).loss  # type: ignore[return-value]


def lone_token_states(
    loaded: LoadedModel, token_ids: Sequence[int] | np.ndarray, context: str = "\n", batch_size: int = 64
) -> np.ndarray:
    """Hidden states of single tokens, each presented alone after one context token (chapter 1).

    Each token is run as the two-token prompt ``[context, token]`` (after BOS for
    a model that needs it) and its hidden state at every layer is taken at the
    token's position. The context token (a newline by default) gives every model
    the same neutral one-token context and keeps the token off the first
    position, which in a causal model without BOS acts as an attention sink.

    Args:
        loaded: a model from :func:`embgeo_utils.lm.models.load`.
        token_ids: ids of the tokens in this model's vocabulary.
        context: the string of the context token; it must be one token of the vocabulary.
        batch_size: prompts per forward pass.

    Returns:
        float32 array ``[tokens, layers + 1, d]`` (index 0: the input embeddings as the model sees them).
    """
    ids = np.asarray(token_ids, dtype=np.int64).ravel()
    if ids.size == 0:
        raise EmbgeoInputError("No token ids given.")
    context_id = normalized_vocabulary(loaded.tokenizer).get(context)
    if context_id is None:
        raise EmbgeoInputError(
            f"{context!r} is not a single token of {loaded.info.name}; choose another context string."
        )
    prompts = np.stack([np.full(ids.size, context_id), ids], axis=1)
    acts = hidden_states(loaded, prompts, n_tokens=2, batch_size=batch_size, with_loss=False, progress=False)
    return acts.hidden[:, :, 1, :]
