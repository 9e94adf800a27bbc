"""Shared vocabularies across tokenizers (chapters 1, 2 and 3).

Chapters 1-3 compare two models *token by token*, so they need the tokens that
both vocabularies hold. :func:`shared_vocabulary` returns them as aligned id
pairs:

* Same tokenizer (identical vocabularies): the identical ids.
* Different tokenizers: tokens whose *normalised strings* match. Each
  vocabulary entry is turned into the text it stands for: byte-level BPE
  entries (GPT-2, SmolLM2, Qwen) are mapped back through the GPT-2
  byte-to-unicode table (``Ġ`` → space, ``Ċ`` → newline, every other byte too)
  and decoded as UTF-8; SentencePiece entries (Gemma) have ``▁`` → space;
  WordPiece entries (BERT, MiniLM) follow the convention below. Special tokens,
  placeholder tokens (``<unused12>``, ``[PAD151933]``, ``[unused3]``),
  byte-fallback tokens (``<0x0A>``) and byte-level entries that are not valid
  UTF-8 on their own (pieces of a multi-byte character) are dropped, and so is
  every string that occurs more than once within one vocabulary (it has no
  single id).

WordPiece convention (our choice, chapter 1): a word-initial WordPiece token
``word`` is taken to stand for ``" word"`` (the space-prefixed BPE token, the
usual case inside running text) and a continuation ``##ing`` for ``"ing"``;
a word-initial token made only of punctuation stands for itself without a
space, because BERT's pre-tokenizer splits punctuation off every word. MiniLM
is uncased, so it can only match lower-case strings.

:func:`common_strings` gives the strings that *every* vocabulary of a list
holds (chapter 3 gives those tokens an ID in every model). Token labels live in
:mod:`embgeo_utils.lm.labels`, the coherence statistics in
:mod:`embgeo_utils.chapters.ch03_intrinsic_dimension`.

References:
    Lee, Weber, Viegas, Wattenberg (2025). Shared Global and Local Geometry of
    Language Model Embeddings. arXiv:2503.21073.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from ..core.errors import VocabularyError

__all__ = [
    "SharedVocabulary",
    "byte_to_unicode",
    "common_strings",
    "normalized_vocabulary",
    "shared_vocabulary",
    "tokenizer_scheme",
]


Scheme = Literal["byte-level", "sentencepiece", "wordpiece"]


_PLACEHOLDER = re.compile(r"^(<unused\d+>|\[unused\d+\]|\[PAD\d+\]|<extra_id_\d+>|<pad_\d+>)$")


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass(frozen=True)
class SharedVocabulary:
    """Aligned token ids of two tokenizers (chapters 1-3).

    Attributes:
        ids_a: int64 ids in tokenizer A.
        ids_b: int64 ids in tokenizer B, row for row the same token as ``ids_a``.
        strings: the normalised string of each shared token (space-prefixed for word starts).
        same_tokenizer: True when both vocabularies are identical (``ids_a == ids_b``).
        scheme_a: normalisation scheme used for A; scheme_b: for B.
    """

    ids_a: np.ndarray
    ids_b: np.ndarray
    strings: tuple[str, ...]
    same_tokenizer: bool
    scheme_a: str
    scheme_b: str

    def __len__(self) -> int:
        return len(self.strings)

    def subset(self, rows: np.ndarray | Sequence[int]) -> SharedVocabulary:
        """The shared tokens at the given row positions (e.g. a seeded sample)."""
        rows = np.asarray(rows, dtype=np.int64)
        return SharedVocabulary(
            self.ids_a[rows],
            self.ids_b[rows],
            tuple(self.strings[i] for i in rows),
            self.same_tokenizer,
            self.scheme_a,
            self.scheme_b,
        )

    def sample(self, n: int, seed: int = 0) -> SharedVocabulary:
        """``min(n, len(self))`` shared tokens drawn without replacement, in a seeded order."""
        if n < 1:
            raise VocabularyError(f"n must be a positive number of tokens, got {n}.")
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(len(self), size=min(n, len(self)), replace=False))
        return self.subset(rows)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level BPE table: each byte value to the printable character that stands for it.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the remaining 68 bytes (controls, space, ...) are given the
    characters ``U+0100``, ``U+0101``, ... in byte order, so space (0x20) is
    ``Ġ`` and newline (0x0A) is ``Ċ``.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in byte_to_unicode().items()}


def _backend_repr(tokenizer: Any) -> tuple[str, str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "", ""
    parts = [repr(getattr(backend, "pre_tokenizer", "")), repr(getattr(backend, "decoder", ""))]
    return type(backend.model).__name__, " ".join(parts)


def tokenizer_scheme(tokenizer: Any) -> Scheme:
    """How a tokenizer writes its vocabulary: ``"byte-level"``, ``"sentencepiece"`` or ``"wordpiece"``.

    Read from the fast tokenizer's backend (model type, pre-tokenizer and
    decoder); for other tokenizers, from the marker characters in the vocabulary.

    Raises:
        VocabularyError: when none of the three schemes fits.
    """
    model_type, pipeline = _backend_repr(tokenizer)
    if model_type == "WordPiece":
        return "wordpiece"
    if "ByteLevel" in pipeline:
        return "byte-level"
    vocab = _vocab(tokenizer)
    tokens = list(vocab)
    n = max(1, len(tokens))
    if sum(t.startswith("##") for t in tokens) / n > 0.05:
        return "wordpiece"
    if sum("▁" in t for t in tokens) / n > 0.05:
        return "sentencepiece"
    if sum("Ġ" in t for t in tokens) / n > 0.05:
        return "byte-level"
    raise VocabularyError(
        f"Cannot tell how {type(tokenizer).__name__} writes its vocabulary (not byte-level BPE, SentencePiece or "
        "WordPiece); pass scheme_a/scheme_b to shared_vocabulary explicitly."
    )


def _vocab(tokenizer: Any) -> dict[str, int]:
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError) as exc:
        raise VocabularyError(
            f"{type(tokenizer).__name__} has no get_vocab(); pass a Hugging Face tokenizer "
            "(embgeo_utils.lm.models.load(name).tokenizer)."
        ) from exc
    if not vocab:
        raise VocabularyError(f"{type(tokenizer).__name__} has an empty vocabulary.")
    return dict(vocab)


def _special_ids(tokenizer: Any) -> set[int]:
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for idx, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            special.add(int(idx))
    return special


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(c).startswith(("P", "S")) for c in text)


def _normalise(token: str, scheme: Scheme, added: bool) -> str | None:
    """The text a vocabulary entry stands for, or None when it stands for no text of its own."""
    if _PLACEHOLDER.match(token) or _BYTE_FALLBACK.match(token):
        return None
    if added:
        return token  # added tokens are stored as plain text in every scheme
    if scheme == "byte-level":
        table = _unicode_to_byte()
        try:
            raw = bytes(table[c] for c in token)
        except KeyError:
            return None  # not a byte-level entry
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None  # part of a multi-byte character
    if scheme == "sentencepiece":
        return token.replace("▁", " ")
    if scheme == "wordpiece":
        if token.startswith("##"):
            # BERT splits punctuation off every word, so "##," never occurs in text: keep "," for it.
            return None if _is_punctuation(token[2:]) else (token[2:] or None)
        return token if _is_punctuation(token) else " " + token
    raise VocabularyError(f"Unknown scheme {scheme!r}; use 'byte-level', 'sentencepiece' or 'wordpiece'.")


def normalized_vocabulary(tokenizer: Any, scheme: Scheme | None = None) -> dict[str, int]:
    """Map from normalised string to token id, for the tokens that can be aligned (chapter 1).

    Drops special, placeholder and byte-fallback tokens, byte-level entries
    that are not valid UTF-8 by themselves, empty strings, and every string
    that more than one id normalises to.

    Args:
        tokenizer: a Hugging Face tokenizer.
        scheme: force a scheme instead of detecting it with :func:`tokenizer_scheme`.

    Returns:
        ``{string: id}``.
    """
    scheme = scheme or tokenizer_scheme(tokenizer)
    vocab = _vocab(tokenizer)
    special = _special_ids(tokenizer)
    added = {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", {}) or {})}
    seen: dict[str, int] = {}
    repeated: set[str] = set()
    for token, idx in vocab.items():
        idx = int(idx)
        if idx in special:
            continue
        text = _normalise(token, scheme, idx in added)
        if not text:
            continue
        if text in seen:
            repeated.add(text)
        else:
            seen[text] = idx
    for text in repeated:
        del seen[text]
    return seen


def shared_vocabulary(
    tok_a: Any, tok_b: Any, scheme_a: Scheme | None = None, scheme_b: Scheme | None = None
) -> SharedVocabulary:
    """Tokens that two tokenizers share, as aligned id pairs (chapters 1-3).

    Identical vocabularies give the identical ids (all alignable tokens);
    different ones give the tokens whose normalised strings match (see the
    module docstring). Rows are sorted by A's id.

    Args:
        tok_a, tok_b: Hugging Face tokenizers (``models.load(name).tokenizer``).
        scheme_a, scheme_b: force the normalisation scheme of each tokenizer.

    Returns:
        :class:`SharedVocabulary`.

    Raises:
        VocabularyError: a tokenizer whose scheme cannot be told, or no shared token at all.

    Example:
        >>> shared = shared_vocabulary(models.load("smollm2-135m").tokenizer,
        ...                            models.load("gemma3-270m").tokenizer)  # doctest: +SKIP
        >>> " the" in shared.strings  # doctest: +SKIP
        True
    """
    sa = scheme_a or tokenizer_scheme(tok_a)
    sb = scheme_b or tokenizer_scheme(tok_b)
    same = tok_a is tok_b or (sa == sb and len(tok_a) == len(tok_b) and _vocab(tok_a) == _vocab(tok_b))
    map_a = normalized_vocabulary(tok_a, sa)
    if same:
        pairs = sorted((idx, idx, text) for text, idx in map_a.items())
    else:
        map_b = normalized_vocabulary(tok_b, sb)
        pairs = sorted((idx, map_b[text], text) for text, idx in map_a.items() if text in map_b)
    if not pairs:
        raise VocabularyError(
            f"The two tokenizers share no token after normalisation ({sa} vs {sb}); check that both are text tokenizers."
        )
    ids_a = np.array([p[0] for p in pairs], dtype=np.int64)
    ids_b = np.array([p[1] for p in pairs], dtype=np.int64)
    return SharedVocabulary(ids_a, ids_b, tuple(p[2] for p in pairs), bool(same), sa, sb)


def common_strings(
    vocabularies: Iterable[Mapping[str, int]], n: int | None = None, seed: int | np.random.Generator = 0
) -> list[str]:
    """Normalised strings that every vocabulary holds, sorted; optionally a seeded sample of ``n`` (chapter 3).

    Args:
        vocabularies: ``{string: id}`` maps, e.g. from :func:`normalized_vocabulary`.
        n: keep ``min(n, number shared)`` strings drawn without replacement (kept in sorted order);
            ``None`` keeps them all.
        seed: seed of the draw, or a numpy Generator to draw from (it is advanced).

    Raises:
        VocabularyError: when no vocabulary is given, no string is shared, or ``n`` is not positive.
    """
    sets = [set(v) for v in vocabularies]
    if not sets:
        raise VocabularyError("common_strings needs at least one vocabulary.")
    common = sorted(set.intersection(*sets))
    if not common:
        raise VocabularyError("The vocabularies share no string; check that they are text tokenizers' vocabularies.")
    if n is None:
        return common
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise VocabularyError(f"n must be a positive number of strings, got {n!r}.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(common), size=min(int(n), len(common)), replace=False))
    return [common[i] for i in pick]
