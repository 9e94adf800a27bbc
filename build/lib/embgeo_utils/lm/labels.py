"""Token labels and word-frequency strata (chapter 3).

Chapter 3 asks whether the nearest neighbours of a token *agree* with it, which
needs a label for every token string. :func:`token_labels` gives coarse labels
read from the text alone: a kind (whole word, fragment, number,
punctuation/code, whitespace, other), capitalisation, and for whole words the
section of the Google analogy set they belong to (:func:`analogy_categories`).
Word frequencies come from wordfreq (Zipf scale, English).

:func:`frequency_strata` and :func:`stratified_sample` draw a sample of a large
vocabulary spread evenly over word-frequency strata, so that rare and frequent
words are both represented.

References:
    Mikolov et al. (2013). Efficient Estimation of Word Representations in
    Vector Space. arXiv:1301.3781 (the analogy set ``questions-words.txt``).

    R. Speer (2022). wordfreq, version 3. Zenodo, doi:10.5281/zenodo.7199437.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..core.cache import package_dir
from ..core.errors import VocabularyError

__all__ = [
    "KINDS",
    "TokenLabels",
    "WORD_ZIPF_THRESHOLD",
    "analogy_categories",
    "frequency_strata",
    "stratified_sample",
    "token_labels",
    "zipf_frequencies",
]


#: Zipf frequency (wordfreq, English) above which a space-prefixed alphabetic token counts as a whole word.
WORD_ZIPF_THRESHOLD = 3.0


#: The kinds :func:`token_labels` assigns, mutually exclusive.
KINDS = ("word", "fragment", "number", "punctuation/code", "whitespace", "other")


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


@dataclass(frozen=True)
class TokenLabels:
    """Coarse labels of token strings (chapter 3).

    Attributes:
        kind: one of :data:`KINDS` per token (mutually exclusive, see :func:`token_labels`).
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

        data: dict[str, Any] = {
            "kind": self.kind,
            "capitalised": self.capitalised,
            "analogy": self.analogy,
            "zipf": self.zipf,
        }
        if strings is not None:
            data = {"token": list(strings), **data}
        return pd.DataFrame(data)


def zipf_frequencies(words: Sequence[str]) -> np.ndarray:
    """wordfreq Zipf frequency (English) of each word, 0 for empty or unknown words (chapter 3).

    The words are looked up as given (callers strip and lower-case them); each
    distinct word is looked up once.
    """
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
            ``vocab.normalized_vocabulary`` keys).
        word_threshold: Zipf frequency a whole word must exceed.

    Returns:
        :class:`TokenLabels`.
    """
    stripped = [s.strip() for s in strings]
    lowered = [s.lower() if s.replace("'", "").isalpha() else "" for s in stripped]
    zipf = zipf_frequencies(lowered)
    analogies = analogy_categories()
    kind, cap, analogy = [], [], []
    for raw, s, low, z in zip(strings, stripped, lowered, zipf, strict=True):
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
    z = zipf_frequencies([s.strip().lower() for s in strings])
    return np.searchsorted(np.asarray(edges, dtype=float), z, side="right").astype(np.int64)


def stratified_sample(strata: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` items spread as evenly as possible over strata (chapter 3).

    Each stratum gets an equal share; strata smaller than their share are taken
    whole and the rest is shared among the others. Indices are returned sorted;
    with ``n >= len(strata)`` all indices are returned.

    Raises:
        VocabularyError: if ``n`` is not positive.
    """
    strata = np.asarray(strata)
    if n >= len(strata):
        return np.arange(len(strata))
    if n < 1:
        raise VocabularyError(f"n must be a positive number of tokens, got {n}.")
    rng = np.random.default_rng(seed)
    groups = {s: rng.permutation(np.flatnonzero(strata == s)) for s in np.unique(strata)}
    take = dict.fromkeys(groups, 0)
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
