from __future__ import annotations

import json
import math

import numpy as np
import pytest

from embgeo_utils import results, stats
from embgeo_utils.errors import EmbgeoError


def test_record_round_trip_and_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBGEO_RESULTS", str(tmp_path))
    rec = results.ChapterRecord("ch01_test", "Test chapter", parameters={"n": np.int64(3)}, models=["a", "b"])
    good = stats.verdict([stats.Check("a vs b", 0.25, 0.001, n=300)])
    bad = stats.verdict([stats.Check("a vs b", -0.1, 0.8), stats.Check("a vs c", 0.2, 0.001)])
    rec.claim(6, "Pearson r", np.float32(0.25), "permuted tokens", good, z=12.5)
    rec.claim(7, "error ratio", math.nan, "random neighbours", bad)
    path = rec.save()
    data = json.loads(path.read_text())
    assert data["claims"][0]["value"] == pytest.approx(0.25)
    assert data["claims"][0]["p_value"] == pytest.approx(0.001)
    assert data["claims"][0]["checks"][0]["n"] == 300
    assert data["claims"][1]["value"] is None  # NaN stored as null, never as invalid JSON
    assert data["run"]["parameters"] == {"n": 3} and data["run"]["models"] == ["a", "b"]
    ledger = results.load_ledger(tmp_path).set_index("claim")
    assert list(ledger.index) == sorted(results.CLAIMS)
    assert ledger.loc[6, "verdict"] == "reproduced"
    assert ledger.loc[7, "verdict"] == "partly reproduced"
    assert ledger.loc[7, "failing checks"] == "a vs b"
    assert ledger.loc[1, "verdict"] == "not yet run"
    runs = results.load_runs(tmp_path)
    assert list(runs["chapter"]) == ["Test chapter"] and runs.loc[0, "models"] == "a, b"


def test_verdicts_come_from_the_rule_and_bad_files_are_refused(tmp_path):
    rec = results.ChapterRecord("x", "X")
    with pytest.raises(EmbgeoError, match="stats.verdict"):
        rec.claim(1, "s", 1.0, "n", "reproduced")
    with pytest.raises(EmbgeoError, match="Unknown claim"):
        rec.claim(42, "s", 1.0, "n", stats.verdict([stats.Check("c", 1.0)]))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="rerun its chapter"):
        results.load_records(tmp_path)


def test_start_chapter_resolves_device_seeds_and_models(tmp_path, monkeypatch, device):
    monkeypatch.setenv("EMBGEO_RESULTS", str(tmp_path))
    params = {"model_names": ["smollm2-135m", "qwen2.5-coder-1.5b"], "seed": 3, "device": device}
    monkeypatch.setattr("embgeo_utils.models.installed_models", lambda: ["smollm2-135m"])
    ch = results.start_chapter("ch_test", "Test", params)
    assert ch.models == ["smollm2-135m"] and ch.missing == ["qwen2.5-coder-1.5b"]
    assert ch.params["device"] == device and ch.seed == 3
    first = np.random.rand()
    results.start_chapter("ch_test", "Test", params)
    assert np.random.rand() == first
    ch.record.claim(6, "r", 0.3, "null", stats.verdict([stats.Check("c", 0.3, 0.001)]))
    line = ch.finish()
    assert "ch_test.json" in line and (tmp_path / "ch_test.json").exists()
