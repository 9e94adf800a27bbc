"""Shared vocabularies across tokenizers and token labels (chapters 1, 2 and 3).

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

:func:`token_labels` gives the coarse labels that chapter 3 uses to measure
whether a neighbourhood is *coherent*; :func:`neighbor_label_agreement` and
:func:`coherence_test` compute that coherence and its permutation p-value.

References:
    Lee, Weber, Viegas, Wattenberg (2025). Shared Global and Local Geometry of
    Language Model Embeddings. arXiv:2503.21073.
    Mikolov et al. (2013). Efficient Estimation of Word Representations in
    Vector Space. arXiv:1301.3781 (the analogy set ``questions-words.txt``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from .cache import package_dir
from .errors import VocabularyError

__all__ = [
    "SharedVocabulary",
    "byte_to_unicode",
    "tokenizer_scheme",
    "normalized_vocabulary",
    "shared_vocabulary",
    "TokenLabels",
    "token_labels",
    "analogy_categories",
    "frequency_strata",
    "stratified_sample",
    "neighbor_label_agreement",
    "CoherenceResult",
    "coherence_test",
    "WORD_ZIPF_THRESHOLD",
]

Scheme = Literal["byte-level", "sentencepiece", "wordpiece"]

#: Zipf frequency (wordfreq, English) above which a space-prefixed alphabetic token counts as a whole word.
WORD_ZIPF_THRESHOLD = 3.0

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

    def subset(self, rows: np.ndarray | Sequence[int]) -> "SharedVocabulary":
        """The shared tokens at the given row positions (e.g. a seeded sample)."""
        rows = np.asarray(rows, dtype=np.int64)
        return SharedVocabulary(
            self.ids_a[rows], self.ids_b[rows], tuple(self.strings[i] for i in rows), self.same_tokenizer,
            self.scheme_a, self.scheme_b,
        )

    def sample(self, n: int, seed: int = 0) -> "SharedVocabulary":
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
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
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
            "(embgeo_utils.models.load(name).tokenizer)."
        ) from exc
    if not vocab:
        raise VocabularyError(f"{type(tokenizer).__name__} has an empty vocabulary.")
    return dict(vocab)


def _special_ids(tokenizer: Any) -> set[int]:
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
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


# ----------------------------------------------------------------------------------------
# Token labels (chapter 3)


def _questions_words() -> Path:
    folder = package_dir("gensim")
    if folder is None:
        raise VocabularyError("gensim is not installed: `pip install gensim==4.4.0` provides questions-words.txt.")
    path = folder / "test" / "test_data" / "questions-words.txt"
    if not path.exists():
        raise VocabularyError(f"{path} is missing; reinstall gensim (`pip install --force-reinstall gensim==4.4.0`).")
    return path


@lru_cache(maxsize=1)
def analogy_categories() -> dict[str, str]:
    """Lower-cased word → section of the Google analogy set ``questions-words.txt`` (chapter 3).

    The file has 14 sections (``capital-common-countries``, ``currency``,
    ``gram3-comparative``, ...). A word that appears in several sections keeps
    the first one in file order (our choice).
    """
    categories: dict[str, str] = {}
    section = ""
    for line in _questions_words().read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        for word in line.split():
            categories.setdefault(word.lower(), section)
    return categories


KINDS = ("word", "fragment", "number", "punctuation/code", "whitespace", "other")


@dataclass(frozen=True)
class TokenLabels:
    """Coarse labels of token strings (chapter 3).

    Attributes:
        kind: one of ``KINDS`` per token (mutually exclusive, see :func:`token_labels`).
        capitalised: first letter of the stripped string is upper case.
        analogy: section of the analogy set for whole words listed there, else ``""``.
        zipf: wordfreq Zipf frequency of the stripped, lower-cased string (0 when unknown).
    """

    kind: np.ndarray
    capitalised: np.ndarray
    analogy: np.ndarray
    zipf: np.ndarray

    def frame(self, strings: Sequence[str] | None = None):
        """The labels as a pandas DataFrame (one row per token)."""
        import pandas as pd

        data = {"kind": self.kind, "capitalised": self.capitalised, "analogy": self.analogy, "zipf": self.zipf}
        if strings is not None:
            data = {"token": list(strings), **data}
        return pd.DataFrame(data)


def _zipf(words: Sequence[str]) -> np.ndarray:
    try:
        from wordfreq import zipf_frequency
    except ImportError as exc:  # pragma: no cover - wordfreq is a dependency
        raise VocabularyError("wordfreq is needed for token labels: `pip install wordfreq`.") from exc
    cache: dict[str, float] = {}
    out = np.zeros(len(words))
    for i, word in enumerate(words):
        if word and word not in cache:
            cache[word] = float(zipf_frequency(word, "en"))
        out[i] = cache.get(word, 0.0)
    return out


def token_labels(strings: Sequence[str], word_threshold: float = WORD_ZIPF_THRESHOLD) -> TokenLabels:
    """Label normalised token strings for the coherence test of chapter 3.

    Rules (on the string with surrounding whitespace stripped, ``s``):

    * ``"whitespace"``: ``s`` is empty (spaces, newlines, tabs only).
    * ``"number"``: ``s`` is made of digits, optionally with ``.``, ``,`` separators (``"1,000"``, ``"3.5"``).
    * ``"punctuation/code"``: ``s`` holds no letter and no digit (``"});"``, ``" -->"``).
    * ``"word"``: ``s`` is alphabetic (letters and inner apostrophes), the token
      *starts a word* (its string begins with a space or newline) and the
      wordfreq Zipf frequency of ``s.lower()`` in English is above
      ``word_threshold`` (3.0 = about once per million words).
    * ``"fragment"``: any other alphabetic ``s`` (no leading space, or a rare string: ``"ing"``, ``" Mama"`` at Zipf < 3).
    * ``"other"``: mixed letters and digits or symbols (``"x86"``, ``"_init"``).

    ``capitalised`` is independent of the kind: the first character of ``s`` is
    an upper-case letter. ``analogy`` is the analogy-set section of
    ``s.lower()`` for tokens of kind ``"word"``.

    Args:
        strings: normalised token strings (``SharedVocabulary.strings`` or
            :func:`normalized_vocabulary` keys).
        word_threshold: Zipf frequency a whole word must exceed.

    Returns:
        :class:`TokenLabels`.
    """
    stripped = [s.strip() for s in strings]
    lowered = [s.lower() if s.replace("'", "").isalpha() else "" for s in stripped]
    zipf = _zipf(lowered)
    analogies = analogy_categories()
    kind, cap, analogy = [], [], []
    for raw, s, low, z in zip(strings, stripped, lowered, zipf):
        if not s:
            k = "whitespace"
        elif re.fullmatch(r"\d+([.,]\d+)*", s):
            k = "number"
        elif not any(c.isalnum() for c in s):
            k = "punctuation/code"
        elif low:
            starts_word = raw[:1] in (" ", "\n", "\t")
            k = "word" if starts_word and z > word_threshold else "fragment"
        else:
            k = "other"
        kind.append(k)
        cap.append(bool(s) and s[0].isalpha() and s[0].isupper())
        analogy.append(analogies.get(low, "") if k == "word" else "")
    return TokenLabels(np.array(kind, dtype=object), np.array(cap, dtype=bool), np.array(analogy, dtype=object), zipf)


def frequency_strata(strings: Sequence[str], edges: Sequence[float] = (1.0, 2.0, 3.0, 4.0, 5.0)) -> np.ndarray:
    """Stratum index of each token by the Zipf frequency of its stripped string (chapter 3).

    Stratum 0 holds strings wordfreq does not know (Zipf < ``edges[0]``,
    including all fragments and symbols); stratum ``j`` holds Zipf in
    ``[edges[j-1], edges[j])``; the last stratum holds Zipf >= ``edges[-1]``.
    """
    z = _zipf([s.strip().lower() for s in strings])
    return np.searchsorted(np.asarray(edges, dtype=float), z, side="right").astype(np.int64)


def stratified_sample(strata: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` items spread as evenly as possible over strata (chapter 3).

    Each stratum gets an equal share; strata smaller than their share are taken
    whole and the rest is shared among the others. Indices are returned sorted;
    with ``n >= len(strata)`` all indices are returned.
    """
    strata = np.asarray(strata)
    if n >= len(strata):
        return np.arange(len(strata))
    if n < 1:
        raise VocabularyError(f"n must be a positive number of tokens, got {n}.")
    rng = np.random.default_rng(seed)
    groups = {s: rng.permutation(np.flatnonzero(strata == s)) for s in np.unique(strata)}
    take = {s: 0 for s in groups}
    left = n
    open_groups = sorted(groups)
    while left > 0 and open_groups:
        share = max(1, left // len(open_groups))
        for s in list(open_groups):
            add = min(share, len(groups[s]) - take[s], left)
            take[s] += add
            left -= add
            if take[s] == len(groups[s]):
                open_groups.remove(s)
            if left == 0:
                break
    return np.sort(np.concatenate([groups[s][: take[s]] for s in groups]))


def neighbor_label_agreement(
    labels: Sequence[Any] | np.ndarray,
    indices: np.ndarray,
    rows: np.ndarray | Sequence[int] | None = None,
    adjust: bool = True,
) -> np.ndarray:
    """Per-token agreement of its neighbours' labels with its own label (chapter 3).

    ``a_i = |{j in N_i : label_j == label_i}| / k``. With ``adjust=True`` the
    chance level of token ``i``'s own label is subtracted: the frequency of that
    label among all neighbour slots, so that tokens of a common kind do not look
    coherent merely because their kind is common; 0 then means "as random".

    Args:
        labels: one label per row of the table (entries never referenced may be anything).
        indices: ``(n, k)`` neighbour rows (self excluded), e.g. from ``neighbors.knn(table, k, queries=rows)``.
        rows: the ``n`` query rows the neighbours belong to; default ``0..n-1``.
        adjust: subtract the chance agreement.

    Returns:
        float64 array ``(n,)``.
    """
    lab = np.asarray(labels).astype(str)
    idx = np.asarray(indices)
    own_rows = np.arange(idx.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    if idx.ndim != 2 or idx.shape[0] != len(own_rows):
        raise VocabularyError(f"indices must be (n, k) with one row per query row ({len(own_rows)}), got shape {idx.shape}.")
    own = lab[own_rows]
    neigh = lab[idx]
    agree = (neigh == own[:, None]).mean(axis=1)
    if adjust:
        values, counts = np.unique(neigh, return_counts=True)
        freq = dict(zip(values.tolist(), (counts / neigh.size).tolist()))
        agree = agree - np.array([freq.get(o, 0.0) for o in own])
    return agree


@dataclass(frozen=True)
class CoherenceResult:
    """Outcome of :func:`coherence_test` (chapter 3)."""

    low_mean: float
    high_mean: float
    difference: float
    null_mean: float
    null_std: float
    z: float
    p_value: float
    n_low: int
    n_high: int
    n_permutations: int


def coherence_test(
    values: np.ndarray, low: np.ndarray, high: np.ndarray, n: int = 1000, seed: int = 0
) -> CoherenceResult:
    """Is a per-token value (e.g. label agreement) larger in group ``low`` than in group ``high``? (chapter 3)

    The statistic is ``mean(values[low]) - mean(values[high])``; the null
    reassigns the pooled tokens of both groups to groups of the same sizes at
    random ``n`` times (seeded); the p-value is one-sided,
    ``(1 + #{null >= observed}) / (1 + n)``.

    Args:
        values: ``(n_tokens,)`` per-token values.
        low, high: boolean masks (or index arrays) of the two groups, e.g. the lowest- and highest-ID deciles.
        n: permutations.
        seed: seed of the permutations.
    """
    vals = np.asarray(values, dtype=float)
    lo = np.flatnonzero(low) if np.asarray(low).dtype == bool else np.asarray(low)
    hi = np.flatnonzero(high) if np.asarray(high).dtype == bool else np.asarray(high)
    if len(lo) == 0 or len(hi) == 0:
        raise VocabularyError("Both groups need at least one token; use more tokens or wider quantiles.")
    pooled = np.concatenate([vals[lo], vals[hi]])
    observed = float(pooled[: len(lo)].mean() - pooled[len(lo) :].mean())
    rng = np.random.default_rng(seed)
    null = np.empty(n)
    for t in range(n):
        perm = rng.permutation(pooled)
        null[t] = perm[: len(lo)].mean() - perm[len(lo) :].mean()
    std = float(null.std(ddof=1)) if n > 1 else float("nan")
    z = (observed - float(null.mean())) / std if std > 0 else float("nan")
    p = (1 + int((null >= observed).sum())) / (1 + n)
    return CoherenceResult(
        float(vals[lo].mean()), float(vals[hi].mean()), observed, float(null.mean()), std, float(z), float(p),
        len(lo), len(hi), int(n),
    )
