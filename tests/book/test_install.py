"""A chapter runs from an installed wheel, with its notebook elsewhere and any working folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_chapter_runs_from_the_wheel_with_its_notebook_elsewhere(tmp_path):
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # built from a copy: the checkout stays clean
    shutil.copytree(ROOT / "embgeo_utils", source / "embgeo_utils", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("embgeo_utils-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere, work, records = tmp_path / "elsewhere", tmp_path / "work", tmp_path / "records"
    elsewhere.mkdir()
    work.mkdir()
    notebook = elsewhere / "lle.ipynb"  # another name and folder than the checkout's notebooks/02_lle.ipynb
    notebook.write_text((ROOT / "notebooks" / "02_lle.ipynb").read_text())
    small = yaml.safe_load((ROOT / "notebooks" / "params_small.yml").read_text())["02_lle"]
    env = {**os.environ, "PYTHONPATH": str(site), "EMBGEO_RESULTS": str(records), "HF_HUB_OFFLINE": "1"}
    args = [a for name, value in small.items() for a in ("-y", yaml.safe_dump({name: value}))]
    done = subprocess.run(
        [sys.executable, "-m", "papermill", str(notebook), str(work / "out.ipynb"), *args, "--cwd", str(work)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = records.glob("ch02_lle-*.json")
    run = json.loads(record.read_text())["run"]
    assert Path(run["package_folder"]).is_relative_to(site), run["package_folder"]
    assert run["parameters"]["n_tokens"] == small["n_tokens"]
