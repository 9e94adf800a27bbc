from __future__ import annotations

import json
import math

import numpy as np
import pytest

from embgeo_utils import results


def test_record_round_trip_and_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBGEO_RESULTS", str(tmp_path))
    rec = results.ChapterRecord("ch01_test", "Test chapter", parameters={"n": np.int64(3)}, models=["a", "b"])
    rec.claim(6, "cosines correlate", "Pearson r", np.float32(0.25), "permuted tokens", 0.001, "reproduced", z=12.5)
    rec.claim(7, "LLE transfers", "error ratio", math.nan, "random neighbours", None, "not reproduced")
    path = rec.save()
    data = json.loads(path.read_text())
    assert data["claims"][0]["value"] == pytest.approx(0.25)
    assert data["claims"][1]["value"] is None  # NaN stored as null, never as invalid JSON
    assert data["run"]["parameters"] == {"n": 3} and data["run"]["models"] == ["a", "b"]
    ledger = results.load_ledger(tmp_path)
    assert list(ledger["claim"]) == sorted(results.CLAIMS)
    assert ledger.set_index("claim").loc[6, "verdict"] == "reproduced"
    assert ledger.set_index("claim").loc[1, "verdict"] == "not yet run"


def test_bad_verdicts_and_files_are_refused(tmp_path):
    rec = results.ChapterRecord("x", "X")
    with pytest.raises(ValueError, match="verdict must be one of"):
        rec.claim(1, "c", "s", 1.0, "n", 0.5, "probably")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="rerun its chapter"):
        results.load_records(tmp_path)
