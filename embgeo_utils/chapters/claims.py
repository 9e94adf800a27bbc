"""The claims the book tests, numbered as in the methods brief, with the chapter that tests each (every chapter).

The chapters record a verdict for each claim (:meth:`embgeo_utils.book.results.ChapterRecord.claim`), and the
Claims ledger lists them all, including the claims no chapter has run yet.
"""

from __future__ import annotations

__all__ = [
    "CLAIMS",
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
