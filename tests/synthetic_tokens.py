"""Token strings of known kinds for the chapter-3 tests (coherence and per-token ID)."""

import numpy as np

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
