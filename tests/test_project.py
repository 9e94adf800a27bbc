"""The project's own promises: README commands, environment file, CI entry point."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import tomllib
import yaml

from embgeo_utils.core import errors

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


def _code_lines(path: Path) -> tuple[int, int]:
    """Code lines of a notebook's code cells (blank and comment lines excluded) and its def/class lines."""
    nb = json.loads(path.read_text())
    lines = [
        line
        for cell in nb["cells"]
        if cell["cell_type"] == "code"
        for line in "".join(cell["source"]).splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    defs = sum(1 for line in lines if line.lstrip().startswith(("def ", "class ", "async def ")))
    return len(lines), defs


def test_chapters_are_the_argument_not_the_machinery():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + [ROOT / "book" / "ledger.ipynb"]:
        n, defs = _code_lines(path)
        assert n <= 120, f"{path.name}: {n} code lines; move machinery into embgeo_utils (limit 120)"
        assert defs == 0, f"{path.name}: defines {defs} functions/classes; they belong in embgeo_utils"


def test_no_module_imports_a_private_name_from_another():
    hits = []
    for path in sorted((ROOT / "embgeo_utils").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("embgeo_utils")):
                hits += [
                    f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"
                ]
    assert not hits, hits


def test_every_project_exception_derives_from_the_base():

    classes = [getattr(errors, name) for name in errors.__all__]
    assert all(issubclass(c, errors.EmbgeoError) for c in classes)
    for path in sorted((ROOT / "embgeo_utils").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases
            ):
                assert path.name == "errors.py", f"{path.name} defines exception {node.name}: put it in errors.py"
