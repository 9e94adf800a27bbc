"""Under-trained tokens of an embedding table: never seen in real text and collapsed in the table (chapter 3).

A vocabulary can hold tokens that the model (almost) never saw in training:
reserved placeholders, byte sequences of scripts absent from the training
data, or strings of the tokenizer's own training corpus that the model's data
lacked. Their embedding rows stay near the initialisation or decay together
under weight decay, so they form tight clusters with very low local ID — and
would dilute every per-token statistic of chapter 3. Land & Bartolo (2024)
detect them by combining tokenizer analysis with indicators computed from the
(un)embedding matrix; this module applies that recipe, with the book's corpus
as the text:

1. **Never seen** (:func:`corpus_token_counts`): the tokenizer never produces
   the token while encoding every paragraph of the book's text sources
   (:mod:`embgeo_utils.lm.corpus`, about 20 M characters, 4 M tokens).
2. **Embedding indicators** (:func:`embedding_indicator`): the cosine
   similarity of the token's row, with the table's first principal component
   removed, to the mean row of *reference* tokens that are unused by
   construction — reserved placeholders (``<unused12>``, ``[unused7]``,
   ``[PAD151700]``, ``<|reserved_special_token_3|>``) and table rows past the
   tokenizer's vocabulary (:func:`reserved_rows`); and the row's L2 norm.

A token is **under-trained** (:func:`find_undertrained`) when it is never
seen *and* either its indicator lies at least halfway from the median of
well-seen tokens (seen ``min_seen`` times or more) to the median of the
reference tokens and above the ``1 - quantile`` quantile of the well-seen
tokens' indicators, or its norm lies below the ``quantile`` quantile of the
well-seen tokens' norms. Without enough reference tokens (fewer than
``min_reference``) only the norm criterion applies. For the four models here
the input embeddings are also the unembeddings (tied) except MiniLM, which has
no output layer, so the input table carries both indicators.

Our simplifications, stated: the paper verifies candidates by prompting the
model to repeat them; we do not, so the flag is a detector with false
positives and negatives, and an English corpus leaves many trained tokens of
other languages "never seen" — the embedding indicators are what separates
those from under-trained ones.

References:
    S. Land, M. Bartolo (2024), Fishing for Magikarp: Automatically Detecting
    Under-trained Tokens in Large Language Models, arXiv:2405.05417.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.cache import cached, content_key
from ..core.errors import EmbgeoInputError
from . import corpus

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "RESERVED_PATTERN",
    "UndertrainedTokens",
    "corpus_token_counts",
    "embedding_indicator",
    "find_undertrained",
    "flag_tokens",
    "mark_tokens",
    "reserved_rows",
    "summary_table",
]


#: Token strings that are placeholders, unused by construction (the reference of the indicator).
RESERVED_PATTERN = re.compile(
    r"^(<unused\d+>|\[unused\d+\]|\[PAD\d+\]|<\|reserved[^|]*\|>|<extra_id_\d+>|<reserved_\d+>)$"
)


@dataclass(frozen=True)
class UndertrainedTokens:
    """The under-trained-token detector's inputs and flags for one table (chapter 3).

    Attributes:
        model: the model's name.
        counts: occurrences of each table row when the corpus is encoded.
        norm: L2 norm of each row.
        indicator: cosine of each row (first principal component removed) to the reference mean;
            NaN everywhere when the table has too few reference rows.
        reference: rows unused by construction (:func:`reserved_rows`).
        flagged: rows judged under-trained.
        indicator_threshold: the indicator above which a never-seen row is flagged (NaN without reference).
        norm_threshold: the norm below which a never-seen row is flagged.
        corpus_tokens: tokens the corpus encodes to.
    """

    model: str
    counts: np.ndarray
    norm: np.ndarray
    indicator: np.ndarray
    reference: np.ndarray
    flagged: np.ndarray
    indicator_threshold: float
    norm_threshold: float
    corpus_tokens: int

    @property
    def rows(self) -> np.ndarray:
        """Row indices of the flagged tokens."""
        return np.flatnonzero(self.flagged)


def _tokenizer_key(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    return content_key(type(tokenizer).__name__, sorted(vocab.items(), key=lambda kv: kv[1]))


def corpus_token_counts(
    tokenizer: Any, n_rows: int, sources: Sequence[str] | None = None, use_cache: bool = True
) -> np.ndarray:
    """How often each token id occurs when every paragraph of the text sources is encoded (chapter 3).

    Paragraphs are encoded without special tokens (:func:`embgeo_utils.lm.corpus.encode`'s convention).
    The counts are cached under ``~/.cache/embgeo/token_counts``, keyed by the tokenizer's vocabulary
    and the sources (encoding the 20 M characters takes about 30 s per tokenizer on two cores).

    Args:
        tokenizer: a Hugging Face tokenizer.
        n_rows: rows of the embedding table (ids at or past it are dropped, missing ids count 0).
        sources: names from :data:`embgeo_utils.lm.corpus.SOURCES`; default all of them.
        use_cache: read and write the on-disk cache.

    Returns:
        int64 array ``(n_rows,)``.
    """
    names = sorted(sources) if sources else sorted(corpus.SOURCES)
    count = _token_counts if use_cache else _token_counts.compute
    return count(tokenizer, _tokenizer_key(tokenizer), names, n_rows)["counts"]


@cached("token_counts", version=1, ignore=("tokenizer",))
def _token_counts(tokenizer: Any, vocabulary_key: str, names: list[str], n_rows: int) -> dict[str, np.ndarray]:
    """Token counts over the sources, keyed by the tokenizer's vocabulary (``vocabulary_key``) rather than the object."""
    texts = [p for source in names for _, _, paragraphs in corpus.documents(source) for p in paragraphs]
    counts = np.zeros(n_rows, dtype=np.int64)
    for start in range(0, len(texts), 2000):
        encoded = tokenizer(texts[start : start + 2000], add_special_tokens=False, verbose=False)["input_ids"]
        flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64)
        counts += np.bincount(flat[flat < n_rows], minlength=n_rows)[:n_rows]
    return {"counts": counts}


def reserved_rows(tokenizer: Any, n_rows: int) -> np.ndarray:
    """Rows unused by construction: placeholder tokens (:data:`RESERVED_PATTERN`) and rows past the vocabulary.

    Returns:
        bool array ``(n_rows,)``.
    """
    size = min(n_rows, len(tokenizer))
    strings = tokenizer.convert_ids_to_tokens(list(range(size)))
    out = np.ones(n_rows, dtype=bool)
    out[:size] = [bool(RESERVED_PATTERN.match(s or "")) for s in strings]
    return out


def embedding_indicator(table: np.ndarray | torch.Tensor, reference: np.ndarray, sample: int = 5000) -> np.ndarray:
    """Cosine of each row to the mean reference row, the table's first principal component removed (chapter 3).

    After Land & Bartolo (2024, section 3.2): rows are centred, their component
    along the first principal direction (estimated on ``sample`` rows, a
    constant direction most rows share) is removed, and each row's cosine to
    the mean of the ``reference`` rows is returned.

    Args:
        table: ``(n, d)`` embedding (or unembedding) table.
        reference: bool mask or row indices of the reference rows.
        sample: rows used to estimate the first principal direction (taken evenly spaced).

    Raises:
        EmbgeoInputError: without reference rows.
    """
    X = torch.as_tensor(table).detach().to(torch.float64).cpu()
    ref = np.flatnonzero(reference) if np.asarray(reference).dtype == bool else np.asarray(reference, dtype=np.int64)
    if len(ref) == 0:
        raise EmbgeoInputError("No reference row: pass the rows of tokens known to be unused (reserved_rows).")
    X = X - X.mean(dim=0)
    pick = torch.as_tensor(np.linspace(0, X.shape[0] - 1, min(sample, X.shape[0])).astype(np.int64))
    direction = torch.linalg.svd(X[pick], full_matrices=False).Vh[0]
    X = X - (X @ direction)[:, None] * direction[None, :]
    mean = X[torch.as_tensor(ref)].mean(dim=0)
    cos = (X @ mean) / (X.norm(dim=1).clamp_min(1e-12) * mean.norm().clamp_min(1e-12))
    return cos.numpy()


def flag_tokens(
    counts: np.ndarray,
    norm: np.ndarray,
    indicator: np.ndarray | None,
    reference: np.ndarray,
    min_seen: int = 10,
    quantile: float = 0.01,
    min_reference: int = 20,
) -> tuple[np.ndarray, float, float]:
    """The detector's rule on precomputed inputs (chapter 3; see the module docstring).

    Returns:
        ``(flagged, indicator_threshold, norm_threshold)``; the indicator threshold is NaN
        when ``indicator`` is None or fewer than ``min_reference`` reference rows exist.

    Raises:
        EmbgeoInputError: when fewer than 10 tokens are seen ``min_seen`` times, or a bad quantile.
    """
    if not 0 < quantile < 0.5:
        raise EmbgeoInputError(f"quantile must lie in (0, 0.5), got {quantile}.")
    seen = counts >= min_seen
    if seen.sum() < 10:
        raise EmbgeoInputError(f"Fewer than 10 tokens occur {min_seen} times in the corpus; lower min_seen.")
    never = counts == 0
    norm_threshold = float(np.quantile(norm[seen], quantile))
    flagged = never & (norm < norm_threshold)
    indicator_threshold = float("nan")
    if indicator is not None and reference.sum() >= min_reference:
        halfway = (np.median(indicator[seen]) + np.median(indicator[reference])) / 2
        indicator_threshold = float(max(halfway, np.quantile(indicator[seen], 1 - quantile)))
        flagged |= never & (indicator >= indicator_threshold)
    return flagged, indicator_threshold, norm_threshold


def find_undertrained(
    name: str,
    table: np.ndarray | torch.Tensor,
    tokenizer: Any,
    counts: np.ndarray | None = None,
    min_seen: int = 10,
    quantile: float = 0.01,
    min_reference: int = 20,
    sources: Sequence[str] | None = None,
) -> UndertrainedTokens:
    """Flag the under-trained tokens of one embedding table (chapter 3; the rule is in the module docstring).

    Args:
        name: the model's name (for the tables).
        table: its ``(n, d)`` input-embedding table (tied to the unembedding for the book's language models).
        tokenizer: its tokenizer.
        counts: :func:`corpus_token_counts` (computed, and cached, when None).
        min_seen: occurrences that make a token "well seen" (the indicators' reference distribution).
        quantile: the norm quantile of well-seen tokens below which a never-seen token is flagged.
        min_reference: fewest reference rows for the cosine indicator to be used.
        sources: the corpus sources counted (:func:`corpus_token_counts`; default all).
    """
    n_rows = int(table.shape[0])
    if counts is None:
        counts = corpus_token_counts(tokenizer, n_rows, sources=sources)
    if len(counts) != n_rows:
        raise EmbgeoInputError(f"counts has {len(counts)} entries for a table of {n_rows} rows; recount.")
    reference = reserved_rows(tokenizer, n_rows) & (counts == 0)
    norm = torch.as_tensor(table).detach().to(torch.float64).norm(dim=1).cpu().numpy()
    indicator = embedding_indicator(table, reference) if reference.sum() >= min_reference else None
    flagged, ind_t, norm_t = flag_tokens(counts, norm, indicator, reference, min_seen, quantile, min_reference)
    return UndertrainedTokens(
        model=name, counts=counts, norm=norm,
        indicator=indicator if indicator is not None else np.full(n_rows, np.nan),
        reference=reference, flagged=flagged, indicator_threshold=ind_t, norm_threshold=norm_t,
        corpus_tokens=int(counts.sum()),
    )  # fmt: skip


def summary_table(found: Mapping[str, UndertrainedTokens], strings: Mapping[str, Mapping[int, str]]) -> pd.DataFrame:
    """Per model: table rows, reference rows, never-seen and flagged tokens, with examples (chapter 3).

    Args:
        found: model name → :func:`find_undertrained`.
        strings: model name → ``{token id: normalised string}`` (``LocalIDs.strings``), for the
            count of flagged tokens among those chapter 3 evaluates and for the examples.

    Returns:
        One row per model (index ``model``).
    """
    import pandas as pd

    rows = []
    for name, f in found.items():
        text = strings.get(name, {})
        flagged = f.rows
        alignable = [int(r) for r in flagged if int(r) in text]
        pick: list[int] = (
            np.linspace(0, len(alignable) - 1, min(6, len(alignable))).astype(int).tolist() if alignable else []
        )
        rows.append(
            {
                "model": name,
                "table rows": len(f.counts),
                "corpus tokens": f.corpus_tokens,
                "never seen": int((f.counts == 0).sum()),
                "reference (reserved) rows": int(f.reference.sum()),
                "under-trained": len(flagged),
                "under-trained, % of rows": 100 * len(flagged) / len(f.counts),
                "under-trained with a string": len(alignable),
                "examples": ", ".join(repr(text[alignable[i]]) for i in pick),
            }
        )
    return pd.DataFrame(rows).set_index("model")


def mark_tokens(tokens: pd.DataFrame, found: Mapping[str, UndertrainedTokens]) -> pd.DataFrame:
    """``tokens`` (:func:`embgeo_utils.chapters.ch03_intrinsic_dimension.token_frame`) with a bool column ``under-trained`` (chapter 3).

    Raises:
        EmbgeoInputError: when ``tokens`` lacks ``model`` or ``token``.
    """
    missing = [c for c in ("model", "token") if c not in tokens.columns]
    if missing:
        raise EmbgeoInputError(
            f"tokens lacks the columns {missing}; pass the per-token table of chapter 3 (token_frame)."
        )
    flag = np.zeros(len(tokens), dtype=bool)
    for name, f in found.items():
        where = (tokens["model"] == name).to_numpy()
        flag[where] = f.flagged[tokens.loc[where, "token"].to_numpy(dtype=np.int64)]
    return tokens.assign(**{"under-trained": flag})
