"""Token strings of known kinds for the chapter-3 tests (coherence and per-token ID)."""

import numpy as np

from embgeo_utils.lm import labels

SYMBOLS = "!#$%&*+-"


def token_string(kind: int, t: int) -> str:
    """A unique token string of a known kind: number, punctuation/code, other, whitespace."""
    if kind == 0:
        return f" {t}"
    if kind == 1:
        return "".join(SYMBOLS[int(c)] for c in np.base_repr(t + 8, 8))
    if kind == 2:
        return f"x{t}"
    return "".join(" \t\n"[int(c)] for c in np.base_repr(t + 3, 3))


def kind_encoder(strings):
    """A stand-in sentence encoder: the unit one-hot of each string's kind (``labels.token_labels``).

    Two strings are "similar" exactly when they are of the same kind, so a neighbourhood's semantic
    coherence is known in advance.
    """

    kinds = labels.token_labels(list(strings)).kind
    out = np.zeros((len(kinds), len(labels.KINDS)))
    out[np.arange(len(kinds)), [labels.KINDS.index(k) for k in kinds]] = 1.0
    return out
