"""The ``embgeo`` command: help, early errors for bad chapters and parameters, the ledger, models and the cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from embgeo_utils.book import cli, results
from embgeo_utils.core import stats

ROOT = Path(__file__).resolve().parents[2]


def test_the_console_script_points_at_main():
    text = (ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\nembgeo = "embgeo_utils.book.cli:main"\n' in text
    assert callable(cli.main)


@pytest.mark.parametrize("command", [[], ["run"], ["book"], ["ledger"], ["models"], ["cache"], ["cache", "clear"]])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    assert info.value.code == 0 and "usage: embgeo" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "00", "-p", "nonexistent", "1"], "Unknown parameter 'nonexistent' for 00_models_and_text. Allowed"),
        (["run", "02", "-p", "n_token", "300"], "Did you mean 'n_tokens'"),
        (["run", "02", "-p", "n_tokens", "abc"], "expected int, got 'abc'"),
        (["run", "02", "-p", "n_tokens", "0"], r"allowed values are [50, inf), got 0"),
        (["run", "04", "-y", "{shuffle_levels: [0, 13]}"], "[0, 12], got [0, 13]"),
        (["run", "99"], "No chapter '99'. Chapters: 00_models_and_text"),
        (["run", "02", "-y", "{model_pairs: [[smollm2-135m, no-such-model]]}"], "'no-such-model' is not a registry"),
    ],
)
def test_run_fails_before_anything_runs(args, message, tmp_path, capsys):
    start = time.perf_counter()
    assert cli.main(["--root", str(ROOT), *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - start < 3 and not list(tmp_path.iterdir())


def test_ledger_prints_and_writes_csv_and_json(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "results"
    monkeypatch.setenv("EMBGEO_RESULTS", str(folder))
    rec = results.ChapterRecord("ch01_global_orientation", "Global orientation", parameters={"n_tokens": 3000})
    rec.defaults = True
    rec.claim(
        6,
        "Pearson r",
        0.4,
        "permuted tokens",
        stats.verdict([stats.Check("a vs b", 0.4, 0.001, min_effect=0.1, min_effect_source="test threshold")]),
    )
    path = rec.save()
    assert cli.main(["ledger", "--results", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "reproduced" in out and path.name in out and "not yet run" in out
    assert cli.main(["ledger", "--results", str(folder), "--json", str(tmp_path / "l.json")]) == 0
    rows = json.loads((tmp_path / "l.json").read_text())
    assert [r["verdict"] for r in rows if r["claim"] == 6] == ["reproduced"] and len(rows) == 10
    assert cli.main(["ledger", "--results", str(folder), "--csv", str(tmp_path / "l.csv")]) == 0
    assert (tmp_path / "l.csv").read_text().startswith("claim,statement,chapter")


def test_models_lists_the_registry_with_install_state(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b", "minilm-l6"))


def test_cache_info_and_clear(tmp_cache, capsys, monkeypatch):
    (tmp_cache / "activations" / "m").mkdir(parents=True)
    (tmp_cache / "activations" / "m" / "a.npz").write_bytes(b"x" * 2048)
    (tmp_cache / "sae").mkdir()
    (tmp_cache / "sae" / "keep").write_bytes(b"y" * 10)
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_cache) in out and "2.0 KiB" in out
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert cli.main(["cache", "clear", "activations"]) == 2  # no --yes and nobody to ask
    assert "add --yes" in capsys.readouterr().err and (tmp_cache / "activations" / "m" / "a.npz").exists()
    assert cli.main(["cache", "clear", "activations", "--yes"]) == 0
    assert not (tmp_cache / "activations").exists() and (tmp_cache / "sae" / "keep").exists()
