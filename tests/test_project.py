"""The project's own promises: README commands, environment file, CI entry point."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_readme_leads_with_the_two_commands():
    head = (ROOT / "README.md").read_text()[:1500]
    assert "make book" in head and "make test" in head


def test_ci_calls_the_readme_test_command():
    assert re.search(r"^\s*make test\b", (ROOT / ".ci" / "run").read_text(), flags=re.M)


def test_environment_file_installs_the_project_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = re.search(r"-e \.\[(.*)\]", pip[0]).group(1).split(",")
    assert set(extras) == set(project["optional-dependencies"])
    assert any(str(d).startswith("python=") for d in env["dependencies"] if isinstance(d, str))


def test_design_packages_are_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}
    names |= {re.split(r"[<>=\[ ]", d)[0] for ds in project["optional-dependencies"].values() for d in ds}
    assert {"jupyter-book", "jupyterlab", "papermill", "torch", "transformers", "seaborn", "numpy"} <= names
