"""Opening a chapter, and the claims and run records it writes (every chapter; Claims ledger page).

A chapter opens with :func:`start_chapter` (parameter and model-name checks,
device, seeds, results folder, plot style, models that are installed) and ends
with ``chapter.finish()``. In between, each claim is recorded from a
:class:`~embgeo_utils.core.stats.Verdict`, the book's one verdict rule. ``finish()``
calls ``record.save()``, which writes ``<results dir>/<chapter>-<parameters
hash>.json`` holding its claims (statistic, null, p-value, verdict and numbers)
and its run info (device, models, parameters, whether they are the book's
defaults, wall time, package versions); a run that left models out writes a
``.partial.json`` file, a failed run writes nothing. The results folder is
``EMBGEO_RESULTS`` when set (the book build sets it), else ``results/`` in the
cache. The ledger page reads, per chapter, the latest complete run with the
book's default parameters (:func:`chosen_records`) and names it; nothing in it
is typed by hand.
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
