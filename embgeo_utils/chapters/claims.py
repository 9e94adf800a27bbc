"""The claims the book tests, numbered as in the methods brief, with the chapter that tests each (every chapter).

The chapters record a verdict for each claim (:meth:`embgeo_utils.book.results.ChapterRecord.claim`), and the
Claims ledger lists them all, including the claims no chapter has run yet.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd
import yaml

from ..core.errors import EmbgeoInputError

__all__ = [
    "CLAIMS",
    "REVISION_FIELDS",
    "revisions",
]


#: The claims the book tests (numbering of METHODS.md), with the chapter that tests each.
CLAIMS: dict[int, tuple[str, str]] = {
    1: ("Intrinsic dimension rises then falls over layers", "Chapter 4"),
    2: ("Shuffling raises loss and peak ID, monotone in S", "Chapter 4"),
    3: ("Shuffled prompts have higher mean cosine in late layers", "Chapter 4"),
    4: ("Neighbour overlap chi_1 is lower for shuffled prompts near the ID peak", "Chapter 4"),
    5: ("Pearson(ID, loss) > 0 with p < 0.01", "Chapter 4"),
    6: ("Cosine matrices of token embeddings correlate across models far above the null", "Chapter 1"),
    7: ("LLE weights transfer across models with error far below the null", "Chapter 2"),
    8: (
        "Per-token ID is far below the width, low-ID neighbourhoods are coherent, ID correlates across models",
        "Chapter 3",
    ),
    9: ("Mapped steering vectors steer B better than random and no-steer controls", "Chapter 6"),
    10: ("Paired SAE decoder geometry beats the permutation null, highest in middle layers", "Chapter 5"),
}


#: The fields of every revision-log entry, in order.
REVISION_FIELDS = ("date", "commit", "claims", "chapter", "change", "reason", "verdict_before", "verdict_after")


def revisions(claim: int | None = None, chapter: str | None = None) -> pd.DataFrame:
    """The revision log (every chapter's Checks section; the Claims ledger).

    Every change to a claim's checks, thresholds, permutation counts or a chapter's defaults made after that claim's
    first result had been seen, from ``revisions.yaml`` beside this module: one row per change with
    :data:`REVISION_FIELDS`, oldest first. ``claim`` keeps the entries that name that claim; ``chapter`` the entries
    of one chapter (its record id, e.g. ``"ch06_emb2emb"``, or its number prefix ``"ch06"``).

    Raises:
        EmbgeoInputError: the file is not valid YAML, an entry lacks one of the fields or names an unknown claim
            number, or ``claim`` is unknown.
    """
    try:
        entries = yaml.safe_load(resources.files(__package__).joinpath("revisions.yaml").read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise EmbgeoInputError(f"revisions.yaml is not valid YAML: fix the entry at {error}") from None
    for number, entry in enumerate(entries or [], 1):
        missing = [name for name in REVISION_FIELDS if name not in entry]
        unknown = [c for c in entry.get("claims", []) if c not in CLAIMS]
        if missing or unknown:
            raise EmbgeoInputError(
                f"Revision {number} of revisions.yaml lacks {missing} or names unknown claims {unknown}."
            )
    if claim is not None and claim not in CLAIMS:
        raise EmbgeoInputError(f"Unknown claim {claim}; the ledger's claims are {sorted(CLAIMS)}.")
    rows = [
        {**entry, "claims": ", ".join(str(c) for c in entry["claims"])}
        for entry in entries or []
        if (claim is None or claim in entry["claims"]) and (chapter is None or _of_chapter(entry, chapter))
    ]
    return pd.DataFrame(rows, columns=list(REVISION_FIELDS)).sort_values("date", kind="stable").reset_index(drop=True)


def _of_chapter(entry: dict, chapter: str) -> bool:
    """Whether a revision concerns a chapter: it names the chapter, or a claim that chapter tests."""
    number = int(chapter[2:4])
    return entry["chapter"].startswith(chapter[:4]) or any(CLAIMS[c][1] == f"Chapter {number}" for c in entry["claims"])
