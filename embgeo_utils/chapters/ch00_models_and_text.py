"""Chapter 0, models and text: are the models and the corpus what every later chapter assumes?

Chapter 0 makes no claim of the papers. It shows what the book stands on and checks it, in five stages:

1. the model zoo (:func:`zoo_table`): architecture, size, quantization and provenance of every loaded model;
2. the token-embedding tables (:func:`embedding_tables`, an :class:`EmbeddingTables`): the spread of row norms,
   duplicate rows, and the *anisotropy*, the mean cosine of random token pairs, raw and after mean-centring;
3. the text (:func:`corpus_table`, :func:`passage_lengths`, :func:`topic_counts`): documents, paragraphs and
   characters per source, passage lengths in tokens, and the Wikipedia topics later chapters use as labels;
4. the models as language models (:func:`real_vs_shuffled_loss`, :func:`loss_summary`): the mean next-token loss
   on real passages, and on the same passages block-shuffled;
5. the sanity checks the book relies on (:func:`loss_checks`): no verdict, a table of checks that pass or fail.

The ``plot_*`` functions draw the chapter's figures in the book's style (:mod:`embgeo_utils.chapters.style`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..core.errors import EmbgeoInputError
from ..lm import activations, corpus
from ..lm.models import LoadedModel
from .style import figure_axes, model_colors

__all__ = [
    "CHAPTER",
    "EmbeddingTables",
    "LOSS_REAL",
    "LOSS_SHUFFLED",
    "Parameters",
    "SHUFFLE_LEVEL",
    "TITLE",
    "corpus_table",
    "embedding_tables",
    "loss_checks",
    "loss_summary",
    "passage_lengths",
    "plot_embedding_norms",
    "plot_passage_lengths",
    "plot_real_vs_shuffled_loss",
    "plot_topic_counts",
    "real_vs_shuffled_loss",
    "topic_counts",
    "zoo_table",
]


CHAPTER = "ch00_models_and_text"
TITLE = "Models and text"


@dataclass(frozen=True)
class Parameters:
    """Chapter 0's parameters: the fields of its cell tagged ``parameters`` (defaults and allowed values are there)."""

    model_names: list[str]
    n_passages: int
    passage_tokens: int
    corpus_sample: int
    pair_sample: int
    seed: int
    device: str

    def models(self) -> list[str]:
        """The models the chapter loads, in order."""
        return list(self.model_names)


@dataclass(frozen=True)
class EmbeddingTables:
    """What :func:`embedding_tables` measured (chapter 0).

    Attributes:
        summary: one row per model, indexed by ``model``: ``median norm``, ``norm CV`` (std / mean of the row
            norms), ``mean cosine (raw)``, ``mean cosine (centred)`` and ``duplicate rows``.
        norms: one row per token of every table: ``model``, ``norm / median norm``.
    """

    summary: pd.DataFrame
    norms: pd.DataFrame


#: Column names of the loss table (real text, and the strongest block shuffle of chapter 4).
LOSS_REAL = "loss (real)"


LOSS_SHUFFLED = "loss (shuffled, S=5)"


SHUFFLE_LEVEL = 5


def zoo_table(loaded: Mapping[str, LoadedModel]) -> pd.DataFrame:
    """Chapter 0: one row per loaded model (architecture, size, quantization, provenance, load time).

    Args:
        loaded: registry name (or id) to the model returned by :func:`embgeo_utils.lm.models.load`.

    Returns:
        DataFrame indexed by ``model``.
    """
    if not loaded:
        raise EmbgeoInputError("No models given: load at least one with embgeo_utils.lm.models.load(...).")
    rows = []
    for name, m in loaded.items():
        info = m.info
        n_params = sum(p.numel() for p in m.model.parameters())
        rows.append(
            {
                "model": name,
                "architecture": info.arch,
                "layers": info.n_layers,
                "width d": info.d_model,
                "vocabulary": info.vocab_size,
                "parameters (M)": round(n_params / 1e6, 1),
                "embedding quantization": info.embedding_quant,
                "tied in/out embeddings": info.tied_embeddings,
                "needs BOS": info.needs_bos,
                "sha256": (info.sha256 or "")[:12],
                "source": info.source,
                "load s": round(info.load_seconds, 1),
                "from cache": info.from_cache,
            }
        )
    return pd.DataFrame(rows).set_index("model")


def _table(item: Any) -> torch.Tensor:
    """The input-embedding table of a loaded model, or the given array, as a float32 CPU tensor."""
    if isinstance(item, LoadedModel):
        item = item.model.get_input_embeddings().weight
    table = torch.as_tensor(item).detach().float().cpu()
    if table.ndim != 2 or table.shape[0] < 2:
        raise EmbgeoInputError(
            f"An embedding table must be 2-D (vocabulary x d) with at least 2 rows, got {tuple(table.shape)}."
        )
    if not bool(torch.isfinite(table).all()):
        raise EmbgeoInputError("The embedding table holds NaN/inf values; check the model file.")
    return table


def embedding_tables(tables: Mapping[str, LoadedModel | torch.Tensor | np.ndarray], p: Parameters) -> EmbeddingTables:
    """Chapter 0: norms, anisotropy and duplicate rows of each token-embedding table.

    The anisotropy is the mean cosine of ``p.pair_sample`` random token pairs
    (pairs of a token with itself dropped), on the raw rows and on the rows
    after removing the table's mean. One generator seeded with ``p.seed`` is shared
    by the models in the order given, so the same seed and models give the same pairs.

    Args:
        tables: model name to a loaded model (its input embeddings are used) or a ``(vocabulary, d)`` array.
        p: the chapter's parameters (``pair_sample``: random token pairs per table; ``seed``: seed of the pairs).

    Returns:
        An :class:`EmbeddingTables` (the summary per model and the relative norm of every token).
    """
    pair_sample, seed = p.pair_sample, p.seed
    if isinstance(pair_sample, bool) or not isinstance(pair_sample, (int, np.integer)) or pair_sample < 1:
        raise EmbgeoInputError(f"pair_sample must be a positive number of token pairs, got {pair_sample!r}.")
    if not tables:
        raise EmbgeoInputError("No embedding tables given.")
    rng = np.random.default_rng(seed)
    norm_rows, summary = [], []
    for name, item in tables.items():
        table = _table(item)
        norms = table.norm(dim=1).numpy()
        norm_rows.append(pd.DataFrame({"model": name, "norm / median norm": norms / np.median(norms)}))
        i, j = rng.integers(0, table.shape[0], size=(2, pair_sample))
        keep = i != j
        unit = torch.nn.functional.normalize(table, dim=1)
        cos_raw = (unit[i[keep]] * unit[j[keep]]).sum(1).numpy()
        centred = torch.nn.functional.normalize(table - table.mean(0), dim=1)
        cos_cent = (centred[i[keep]] * centred[j[keep]]).sum(1).numpy()
        dup = int(table.shape[0] - torch.unique(table, dim=0).shape[0])
        summary.append(
            {
                "model": name,
                "median norm": float(np.median(norms)),
                "norm CV": float(norms.std() / norms.mean()),
                "mean cosine (raw)": cos_raw.mean(),
                "mean cosine (centred)": cos_cent.mean(),
                "duplicate rows": dup,
            }
        )
    return EmbeddingTables(pd.DataFrame(summary).set_index("model"), pd.concat(norm_rows, ignore_index=True))


def corpus_table() -> pd.DataFrame:
    """Chapter 0: what each text source holds (domain, documents, paragraphs, characters, licence).

    Returns:
        DataFrame indexed by ``source``.
    """
    rows = []
    for source, spec in corpus.SOURCES.items():
        docs = corpus.documents(source)
        n_chars = sum(len(p) for _, _, paras in docs for p in paras)
        rows.append(
            {
                "source": source,
                "domain": spec.domain,
                "documents": len(docs),
                "paragraphs": sum(len(paras) for _, _, paras in docs),
                "characters (M)": round(n_chars / 1e6, 2),
                "licence": spec.licence,
            }
        )
    return pd.DataFrame(rows).set_index("source")


def passage_lengths(tokenizer: Any, p: Parameters, max_tokens: int = 1024) -> pd.DataFrame:
    """Chapter 0: token counts of candidate passages of about ``max_tokens`` tokens, per source.

    ``p.corpus_sample`` candidates are drawn per source (at most 60 from the small
    news corpus, seeded with ``p.seed``) and tokenized with ``tokenizer``.

    Returns:
        Tidy DataFrame, one row per passage: ``source``, ``tokens``.
    """
    corpus_sample, seed = p.corpus_sample, p.seed
    if isinstance(corpus_sample, bool) or not isinstance(corpus_sample, (int, np.integer)) or corpus_sample < 1:
        raise EmbgeoInputError(f"corpus_sample must be a positive number of passages, got {corpus_sample!r}.")
    rows = []
    for source in corpus.SOURCES:
        n = min(corpus_sample, 60) if source == "lee-news" else corpus_sample
        for passage in corpus.load_passages(n, None, min_tokens=1, max_tokens=max_tokens, seed=seed, sources=[source]):
            rows.append({"source": source, "tokens": len(corpus.encode(tokenizer, passage.text))})
    return pd.DataFrame(rows)


def topic_counts() -> pd.Series:
    """Chapter 0: number of Wikipedia summaries per topic, largest first (the labels of chapters 3 and 6)."""
    return pd.Series([row["topic"] for row in corpus.wiki_summaries()]).value_counts()


def real_vs_shuffled_loss(loaded: Mapping[str, LoadedModel], p: Parameters) -> pd.DataFrame:
    """Chapter 0: mean next-token loss of each causal model on real and on block-shuffled passages.

    Each model draws the same ``p.n_passages`` passages with its own tokenizer
    (:func:`embgeo_utils.lm.corpus.load_passages`, balanced across sources, seeded with ``p.seed``), cut to
    ``p.passage_tokens`` tokens, and is scored on them as written and after the
    strongest block shuffle of chapter 4 (:func:`embgeo_utils.lm.corpus.shuffle_tokens`
    with ``S = 5``: every token of a passage of up to 1,024 tokens is its own block).
    Encoders (no next-token loss) are left out.

    Returns:
        Tidy DataFrame, one row per passage: ``model``, ``source``, ``loss (real)``, ``loss (shuffled, S=5)``.
    """
    n_passages, passage_tokens, seed = p.n_passages, p.passage_tokens, p.seed
    if isinstance(n_passages, bool) or not isinstance(n_passages, (int, np.integer)) or n_passages < 1:
        raise EmbgeoInputError(f"n_passages must be a positive integer, got {n_passages!r}.")
    if isinstance(passage_tokens, bool) or not isinstance(passage_tokens, (int, np.integer)) or passage_tokens < 2:
        raise EmbgeoInputError(
            f"passage_tokens must be at least 2 (a next-token loss needs two), got {passage_tokens!r}."
        )
    rows = []
    for name, m in loaded.items():
        if not m.info.causal:
            continue
        passages = corpus.load_passages(
            n_passages, m.tokenizer, min_tokens=passage_tokens, max_tokens=passage_tokens, seed=seed
        )
        ids = [passage.token_ids for passage in passages]
        real = activations.token_losses(m, ids, passage_tokens)
        shuffled: list[Any] = [corpus.shuffle_tokens(i, SHUFFLE_LEVEL, seed) for i in ids]
        scrambled = activations.token_losses(m, shuffled, passage_tokens)
        for passage, a, b in zip(passages, real, scrambled):
            rows.append({"model": name, "source": passage.source, LOSS_REAL: a, LOSS_SHUFFLED: b})
    if not rows:
        raise EmbgeoInputError("None of the models is causal: the loss check needs at least one language model.")
    return pd.DataFrame(rows)


def loss_summary(losses: pd.DataFrame) -> pd.DataFrame:
    """Chapter 0: mean losses per model and the perplexity of the real text (``exp`` of its mean loss)."""
    _require_columns(losses, ["model", LOSS_REAL, LOSS_SHUFFLED])
    summary = losses.groupby("model")[[LOSS_REAL, LOSS_SHUFFLED]].mean()
    summary["perplexity (real)"] = np.exp(summary[LOSS_REAL])
    return summary


def loss_checks(summary: pd.DataFrame, max_real_loss: float = 4.5) -> pd.DataFrame:
    """Chapter 0: the two sanity checks the book relies on (no claim of the papers, so no verdict).

    1. Every causal model has a higher mean loss on shuffled than on real text.
    2. The largest mean real loss is below ``max_real_loss`` nats.

    Returns:
        DataFrame with ``check``, ``value``, ``pass``.
    """
    _require_columns(summary, [LOSS_REAL, LOSS_SHUFFLED])
    rises = bool((summary[LOSS_SHUFFLED] > summary[LOSS_REAL]).all())
    worst = float(summary[LOSS_REAL].max())
    return pd.DataFrame(
        [
            {"check": "every causal model: shuffled loss > real loss", "value": rises, "pass": rises},
            {
                "check": f"max mean real loss (nats) < {max_real_loss}",
                "value": round(worst, 2),
                "pass": bool(worst < max_real_loss),
            },
        ]
    )


def _require_columns(frame: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise EmbgeoInputError(
            f"The table lacks columns {missing}; pass the output of real_vs_shuffled_loss / loss_summary."
        )


def plot_embedding_norms(norms: Any, ax: Any = None) -> Any:
    """Chapter 0: violins of token-embedding row norms relative to each table's median (log scale).

    Args:
        norms: tidy DataFrame with ``model`` and ``norm / median norm`` (``embedding_tables(...).norms``).
    """
    import seaborn as sns

    fig, ax = figure_axes((8, 3.6), ax)
    names = list(dict.fromkeys(norms["model"]))
    sns.violinplot(
        data=norms,
        x="model",
        y="norm / median norm",
        hue="model",
        cut=0,
        palette=model_colors(names),
        ax=ax,
        legend=False,
    )
    ax.set_yscale("log")
    ax.set_xlabel("model")
    ax.set_ylabel("row norm / median row norm (log)")
    ax.set_title("Token-embedding norms per model")
    return fig


def plot_passage_lengths(lengths: Any, tokenizer_name: str, ax: Any = None) -> Any:
    """Chapter 0: box plot of candidate passage lengths (tokens) per source."""
    import seaborn as sns

    fig, ax = figure_axes((8, 3.4), ax)
    sns.boxplot(data=lengths, x="source", y="tokens", hue="source", ax=ax, legend=False)
    ax.set_xlabel("source")
    ax.set_ylabel(f"passage length ({tokenizer_name} tokens)")
    ax.set_title("Candidate passage lengths per source")
    return fig


def plot_topic_counts(topics: Any, ax: Any = None) -> Any:
    """Chapter 0: horizontal bars of Wikipedia summaries per topic."""
    import seaborn as sns

    fig, ax = figure_axes((8, 3.4), ax)
    sns.barplot(x=topics.values, y=topics.index, color=sns.color_palette()[0], ax=ax)
    ax.set_xlabel("summaries")
    ax.set_ylabel("topic")
    ax.set_title("Wikipedia summaries per topic (the labels used for steering and coherence)")
    return fig


def plot_real_vs_shuffled_loss(losses: Any, n_passages: int, passage_tokens: int, ax: Any = None) -> Any:
    """Chapter 0: mean next-token loss per model on real and shuffled text, with 95 % intervals.

    Args:
        losses: tidy DataFrame of :func:`real_vs_shuffled_loss` (one row per passage).
    """
    import seaborn as sns

    long = losses.melt(id_vars=["model", "source"], var_name="text", value_name="loss")
    fig, ax = figure_axes((8, 3.6), ax)
    sns.barplot(data=long, x="model", y="loss", hue="text", errorbar=("ci", 95), ax=ax)
    ax.set_xlabel("model")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(f"Loss on {n_passages} real passages of {passage_tokens} tokens")
    return fig
