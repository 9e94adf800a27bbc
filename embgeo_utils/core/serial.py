"""JSON-ready copies of nested numpy values, shared by the chapter records and the interactive figures.

Chapter records (:mod:`embgeo_utils.book.results`) and the figures of chapters 1, 4 and 5
(:mod:`embgeo_utils.chapters.interactive`) are written as JSON: both need numpy arrays and scalars as plain Python
values and NaN or infinities as ``null``; the figures also round numbers to a few significant digits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["json_ready", "round_significant"]


def round_significant(value: float, digits: int) -> float | None:
    """``value`` to ``digits`` significant digits; NaN and infinities become ``None`` (JSON null)."""
    if not math.isfinite(value):
        return None
    if value == 0:
        return 0.0
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def json_ready(value: Any, digits: int | None = None) -> Any:
    """A copy of ``value`` that ``json.dumps`` writes as it is.

    Dicts (keys as strings), lists, tuples and arrays become dicts and lists; numpy scalars become Python scalars;
    NaN and infinities become ``None``. With ``digits``, every float is rounded to that many significant digits.
    """
    if isinstance(value, dict):
        return {str(k): json_ready(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v, digits) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist(), digits)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if digits is not None:
            return round_significant(value, digits)
        return value if math.isfinite(value) else None
    return value
