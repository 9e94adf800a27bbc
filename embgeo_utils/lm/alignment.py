"""Pairing the token positions of two tokenizations of the same texts (chapters 5 and 6).

Models of one family share a tokenizer, so their positions pair one to one. Models with different tokenizers
(SmolLM2 and Gemma-3) do not: :func:`align_positions` pairs only the positions whose character spans coincide in
both tokenizations, and :func:`aligned_activations` runs both models over the same texts and returns the hidden
states of those paired positions at the requested layers (:class:`AlignedTokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import EmbgeoInputError
from ..core.progress import tqdm
from .activations import hidden_states

__all__ = [
    "AlignedTokens",
    "align_positions",
    "aligned_activations",
]


@dataclass
class AlignedTokens:
    """Token positions that two tokenizers cut identically, with both models' activations (chapter 5).

    Attributes:
        acts_a, acts_b: ``{layer: (tokens, d)}`` float32 activations (block outputs) of the aligned positions.
        ids_a, ids_b: the token ids of each position in each tokenizer.
        passage: index of the passage each position comes from; position: its index in A's tokens.
        texts: the passages' texts; spans: ``(start, end)`` characters of each position.
        n_positions_a, n_positions_b: positions each model saw (before alignment).
    """

    acts_a: dict[int, np.ndarray]
    acts_b: dict[int, np.ndarray]
    ids_a: np.ndarray
    ids_b: np.ndarray
    passage: np.ndarray
    position: np.ndarray
    texts: list[str]
    spans: np.ndarray
    n_positions_a: int
    n_positions_b: int

    def __len__(self) -> int:
        return int(self.ids_a.size)

    def split(self, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Row masks (train, held-out): the last passages are held out whole."""
        n_pass = int(self.passage.max()) + 1
        cut = n_pass - max(1, int(round(heldout_fraction * n_pass)))
        train = self.passage < cut
        return train, ~train


def _offsets(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"][:max_tokens]), [tuple(o) for o in enc["offset_mapping"][:max_tokens]]


def align_positions(spans_a: Sequence[tuple[int, int]], spans_b: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pairs ``(i, j)`` of positions whose character spans coincide exactly (chapter 5).

    Empty spans are never paired. For one tokenizer every position pairs with itself.
    """
    index_b = {tuple(s): j for j, s in enumerate(spans_b) if s[1] > s[0]}
    pairs = [(i, index_b[tuple(s)]) for i, s in enumerate(spans_a) if s[1] > s[0] and tuple(s) in index_b]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def aligned_activations(
    a: Any,
    b: Any,
    texts: Sequence[str],
    layers_a: Sequence[int],
    layers_b: Sequence[int],
    max_tokens: int = 256,
    skip_first: int = 1,
    progress: bool = True,
) -> AlignedTokens:
    """Block-output activations of two models on the same texts, at the positions both tokenizers share (chapter 5).

    Each text is tokenized by each model (no special tokens; BOS added and left
    out by :func:`~embgeo_utils.lm.activations.hidden_states` where a model needs
    it); positions whose character spans coincide are kept, except the first
    ``skip_first`` positions of each text (outsized activations in these models).
    Hidden states are cached per text and model.
    """

    for loaded, layers in ((a, layers_a), (b, layers_b)):
        bad = [lay for lay in layers if not 1 <= lay < loaded.info.n_layers]
        if bad:
            raise EmbgeoInputError(
                f"layers {bad} out of range for {loaded.info.name}: use blocks 1..{loaded.info.n_layers - 1} "
                "(the last hidden state is taken after the final norm)."
            )
    rows_a: dict[int, list[np.ndarray]] = {lay: [] for lay in layers_a}
    rows_b: dict[int, list[np.ndarray]] = {lay: [] for lay in layers_b}
    ids_a, ids_b, passage, position, spans = [], [], [], [], []
    seen_a = seen_b = 0
    kept_texts: list[str] = []
    for text in tqdm_texts(texts, progress):
        ia, sa = _offsets(a.tokenizer, text, max_tokens)
        end = sa[-1][1] if sa else 0
        ib, sb = _offsets(b.tokenizer, text[:end], 10 * max_tokens)
        if len(ia) <= skip_first + 1 or len(ib) <= skip_first + 1:
            continue
        pairs = align_positions(sa, sb)
        pairs = pairs[(pairs[:, 0] >= skip_first) & (pairs[:, 1] >= skip_first)]
        if not len(pairs):
            continue
        ha = hidden_states(a, [ia], len(ia), with_loss=False, layers=list(layers_a), progress=False).hidden[0]
        hb = hidden_states(b, [ib], len(ib), with_loss=False, layers=list(layers_b), progress=False).hidden[0]
        for j, lay in enumerate(layers_a):
            rows_a[lay].append(ha[j, pairs[:, 0]])
        for j, lay in enumerate(layers_b):
            rows_b[lay].append(hb[j, pairs[:, 1]])
        ids_a.append(np.asarray(ia)[pairs[:, 0]])
        ids_b.append(np.asarray(ib)[pairs[:, 1]])
        passage.append(np.full(len(pairs), len(kept_texts)))
        position.append(pairs[:, 0])
        spans.append(np.asarray(sa)[pairs[:, 0]])
        kept_texts.append(text)
        seen_a += len(ia) - skip_first
        seen_b += len(ib) - skip_first
    if not kept_texts:
        raise EmbgeoInputError("No text gave aligned positions; use longer texts or check the tokenizers.")
    return AlignedTokens(
        {lay: np.concatenate(v) for lay, v in rows_a.items()},
        {lay: np.concatenate(v) for lay, v in rows_b.items()},
        np.concatenate(ids_a),
        np.concatenate(ids_b),
        np.concatenate(passage),
        np.concatenate(position),
        kept_texts,
        np.concatenate(spans),
        seen_a,
        seen_b,
    )


def tqdm_texts(texts: Sequence[str], progress: bool) -> Any:
    """The texts, wrapped in a compact progress bar when ``progress`` (chapter 5)."""

    return tqdm(list(texts), desc="texts", unit="text", disable=not progress, mininterval=5.0)
