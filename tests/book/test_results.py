from __future__ import annotations

import json
import math
import types
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from embgeo_utils.book import parameters, results
from embgeo_utils.chapters import claims
from embgeo_utils.core import stats
from embgeo_utils.core.errors import EmbgeoError


def _check(name, effect, p, **kw):
    return stats.Check(name, effect, p, min_effect=0.1, min_effect_source="test threshold", **kw)


def test_record_round_trip_and_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBGEO_RESULTS", str(tmp_path))
    rec = results.ChapterRecord("ch01_test", "Test chapter", parameters={"n": np.int64(3)}, models=["a", "b"])
    good = stats.verdict([_check("a vs b", 0.25, 0.001, n=300, se=0.05)])
    bad = stats.verdict(
        [_check("a vs b", -0.1, 0.8, se=0.01), _check("a vs c", 0.2, 0.001), _check("a vs d", 0.05, 0.3, se=0.2)]
    )
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
    assert list(ledger.index) == sorted(claims.CLAIMS)
    assert ledger.loc[6, "verdict"] == "reproduced"
    assert ledger.loc[7, "verdict"] == "partly reproduced"
    assert ledger.loc[7, "absent checks"] == "a vs b" and ledger.loc[7, "inconclusive checks"] == "a vs d"
    assert ledger.loc[7, "checks"].startswith("1 of 3 checks hold, 1 absent, 1 inconclusive")
    assert ledger.loc[1, "verdict"] == "not yet run"
    assert ledger.loc[6, "n"] == "300" and ledger.loc[1, "n"] == ""
    checks = results.load_checks(tmp_path)
    assert list(checks["claim"]) == [6, 7, 7, 7] and list(checks.columns) == results.CHECK_COLUMNS
    assert checks.loc[0, "detectable"] == pytest.approx(stats.detectable_effect(0.05, 0.01))
    assert pd.isna(checks.loc[2, "detectable"])  # no standard error given
    assert list(checks["status"]) == ["holds", "absent", "holds", "inconclusive"]
    assert (checks["source of the minimum"] == "test threshold").all() and (checks["min effect"] == 0.1).all()
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


@dataclass(frozen=True)
class _TestParameters:
    model_names: list[str]
    n_tokens: int
    seed: int
    device: str

    def models(self) -> list[str]:
        return self.model_names


#: A stand-in chapter module: what start_chapter needs of one.
TEST_CHAPTER = types.SimpleNamespace(CHAPTER="ch_test", TITLE="Test", Parameters=_TestParameters, __name__="ch_test")
TEST_CELL = parameters.parse_cell(
    'model_names: list[str] = ["smollm2-135m"]  # names\n'
    "n_tokens: int = 4000  # [1, inf) tokens\n"
    "seed: int = 0  # [0, inf)\n"
    'device: str = "auto"  # where\n'
)


def _start(values):
    return results.start_chapter(TEST_CHAPTER, values, declarations=TEST_CELL)


def test_start_chapter_resolves_device_seeds_and_models(tmp_path, monkeypatch, device, caplog):
    monkeypatch.setenv("EMBGEO_RESULTS", str(tmp_path))
    params = {"model_names": ["smollm2-135m", "qwen2.5-coder-1.5b"], "seed": 3, "device": device}
    monkeypatch.setattr("embgeo_utils.lm.models.installed_models", lambda: ["smollm2-135m"])
    ch = _start(params)
    assert ch.models == ["smollm2-135m"] and ch.missing == ["qwen2.5-coder-1.5b"]
    assert ch.params.device == device and ch.seed == 3 and ch.params.n_tokens == 4000
    assert "left out: qwen2.5-coder-1.5b" in caplog.text
    first = np.random.rand()
    _start(params)
    assert np.random.rand() == first
    ch.record.claim(6, "r", 0.3, "null", stats.verdict([_check("c", 0.3, 0.001)]))
    line = ch.finish()
    written = list(tmp_path.glob("ch_test-*.partial.json"))  # one requested model is not installed: a partial run
    assert len(written) == 1 and written[0].name in line and "partial" in line


def _run(folder, params, verdict_effect, defaults, missing=(), finished="2026-01-01 00:00:00"):
    rec = results.ChapterRecord("ch02_lle", "LLE", parameters=params, models=["a"])
    rec.defaults, rec.missing = defaults, list(missing)
    rec.claim(7, "ratio", verdict_effect, "null", stats.verdict([_check("c", verdict_effect, 0.001, se=0.01)]))
    path = rec.save()
    data = json.loads(path.read_text())
    data["run"]["finished"] = finished
    path.write_text(json.dumps(data))
    return path


def test_runs_never_replace_each_other_and_the_ledger_uses_the_default_run(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBGEO_RESULTS", str(tmp_path))
    default = _run(tmp_path, {"n_tokens": 4000}, 0.5, True, finished="2026-01-01 10:00:00")
    small = _run(tmp_path, {"n_tokens": 300}, -0.5, False, finished="2026-01-02 10:00:00")
    partial = _run(tmp_path, {"n_tokens": 4000}, -0.5, True, missing=["b"], finished="2026-01-03 10:00:00")
    assert len({default, small, partial}) == 3 and default.name.startswith("ch02_lle-")
    assert partial.name.endswith(".partial.json") and json.loads(default.read_text())["claims"][0]["value"] == 0.5
    ledger = results.load_ledger(tmp_path).set_index("claim")
    assert ledger.loc[7, "verdict"] == "reproduced" and ledger.loc[7, "run"] == default.name
    runs = results.load_runs(tmp_path)
    assert "complete run, book defaults" in runs.loc[0, "run used"] and default.name in runs.loc[0, "run used"]
    # without a default run, the latest complete run is used and labelled as such
    default.unlink()
    runs = results.load_runs(tmp_path)
    assert small.name in runs.loc[0, "run used"] and "other parameters" in runs.loc[0, "run used"]
    # a damaged record is skipped with a notice, not a crash of the ledger page
    (tmp_path / "ch01_x-0000000000.json").write_text("{trunc")
    assert list(results.load_ledger(tmp_path).set_index("claim").loc[[7], "run"]) == [small.name]


def test_a_failed_run_leaves_the_record_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBGEO_RESULTS", str(tmp_path))
    good = _run(tmp_path, {"n_tokens": 4000}, 0.5, True)
    before = good.read_bytes()
    ch = _start({"n_tokens": 4000, "device": "cpu"})
    with pytest.raises(RuntimeError):
        ch.record.claim(7, "ratio", 0.1, "null", stats.verdict([_check("c", 0.1, 0.5)]))
        raise RuntimeError("the chapter fails before ch.finish()")
    assert good.read_bytes() == before and len(list(tmp_path.glob("*.json"))) == 1
