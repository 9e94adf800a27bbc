from __future__ import annotations

import json
import math

import numpy as np

from embgeo_utils.core.serial import json_ready, round_significant


def test_round_significant_known_values():
    assert round_significant(123456.0, 3) == 123000.0
    assert round_significant(0.00012345, 2) == 0.00012
    assert round_significant(-0.98765, 3) == -0.988
    assert round_significant(0.0, 3) == 0.0
    assert round_significant(math.nan, 3) is None and round_significant(-math.inf, 3) is None


def test_json_ready_turns_numpy_and_non_finite_values_into_plain_json():
    value = {1: np.array([1.5, np.nan]), "b": (np.float32(2.25), np.int64(3)), "c": [math.inf, "x", None, True]}
    plain = json_ready(value)
    assert plain == {"1": [1.5, None], "b": [2.25, 3], "c": [None, "x", None, True]}
    assert type(plain["b"][1]) is int
    json.dumps(plain, allow_nan=False)


def test_json_ready_rounds_only_when_asked():
    assert json_ready([0.123456], digits=3) == [0.123]
    assert json_ready([0.123456]) == [0.123456]
