"""The project's own promises: README commands, environment file, CI entry point."""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
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


def _code_lines(path: Path) -> tuple[int, int, int]:
    """Statements of a notebook's code cells (logical lines: a call wrapped over lines by the formatter is one), its
    def/class lines and its ``.get(``."""
    nb = json.loads(path.read_text())
    sources = ["".join(cell["source"]) for cell in nb["cells"] if cell["cell_type"] == "code"]
    statements = sum(
        token.type == tokenize.NEWLINE
        for source in sources
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
    )
    lines = [
        line for source in sources for line in source.splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    defs = sum(1 for line in lines if line.lstrip().startswith(("def ", "class ", "async def ")))
    return statements, defs, sum(".get(" in line for line in lines)


def test_chapters_are_the_argument_not_the_machinery():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + [ROOT / "book" / "ledger.ipynb"]:
        n, defs, gets = _code_lines(path)
        assert n <= 120, f"{path.name}: {n} statements of code; move machinery into embgeo_utils (limit 120)"
        assert defs == 0, f"{path.name}: defines {defs} functions/classes; they belong in embgeo_utils"
        assert gets == 0, f"{path.name}: reads {gets} keys with .get(...): results are typed, read their attributes"


def test_the_statement_count_does_not_change_when_the_formatter_wraps_a_call(tmp_path):
    one = ["x = f(a, b, c)\n", "y = 2"]
    wrapped = ["x = f(\n", "    a,\n", "    b,\n", "    c,\n", ")\n", "y = 2"]
    for name, source in (("one", one), ("wrapped", wrapped)):
        (tmp_path / f"{name}.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code", "source": source}]}))
    assert _code_lines(tmp_path / "one.ipynb")[0] == _code_lines(tmp_path / "wrapped.ipynb")[0] == 2


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


#: The package's layers, lowest first: a module imports only from its own layer or the ones below.
LAYERS = ("core", "geometry", "lm", "chapters", "book")


def _package_imports() -> dict[str, set[str]]:
    """For every module ``layer.name`` of embgeo_utils, the modules it imports (top level, in functions, for types)."""
    edges: dict[str, set[str]] = {}
    for path in sorted((ROOT / "embgeo_utils").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        layer = path.parent.name
        module = f"{layer}.{path.stem}"
        edges[module] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                parts = ([layer] if node.level == 1 else []) + (node.module.split(".") if node.module else [])
                targets = [f"{parts[0]}.{a.name}" for a in node.names] if len(parts) == 1 else [".".join(parts[:2])]
                edges[module].update(targets)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert not name.startswith("embgeo_utils"), f"{module} imports {name}: use a relative import"
    return edges


def test_layers_import_only_downward_and_without_circles():
    edges = _package_imports()
    assert {m.split(".")[0] for m in edges} == set(LAYERS), "every module lives in one of the layers"
    upward = [
        f"{m} -> {t}"
        for m, ts in edges.items()
        for t in ts
        if LAYERS.index(t.split(".")[0]) > LAYERS.index(m.split(".")[0])
    ]
    assert not upward, f"imports from a higher layer: {upward}"
    across = [
        f"{m} -> {t}"
        for m, ts in edges.items()
        for t in ts
        if m.startswith("chapters.ch") and t.startswith("chapters.ch")
    ]
    assert not across, f"a chapter module imports another chapter's: {across}"
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            assert state.get(target) != 1, f"import circle: {' -> '.join(path + [target])}"
            if not state.get(target):
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if not state.get(module):
            visit(module, [module])


def test_the_contract_test_sees_an_upward_import(tmp_path, monkeypatch):
    """A positive control for the test above: a planted upward import and a planted circle are found."""
    fake = tmp_path / "embgeo_utils"
    for layer, name, text in [
        ("core", "a", "from ..book import b\n"),
        ("book", "b", ""),
        ("lm", "c", "from . import d\n"),
        ("lm", "d", "from . import c\n"),
        ("geometry", "e", ""),
        ("chapters", "f", ""),
    ]:
        (fake / layer).mkdir(parents=True, exist_ok=True)
        (fake / layer / f"{name}.py").write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="higher layer"):
        test_layers_import_only_downward_and_without_circles()
    (fake / "core" / "a.py").write_text("")
    with pytest.raises(AssertionError, match="import circle"):
        test_layers_import_only_downward_and_without_circles()


#: Numeric kernels that do one job and may run past 80 lines (CONTRIBUTING.md gives each one's reason).
LONG_KERNELS = {
    "geometry/neighbors.py:exact_order_statistics",
    "geometry/neighbors.py:exact_rank_distances",
    "geometry/token_clouds.py:_clouds_float32",
    "geometry/token_clouds.py:layer_observables",
    "geometry/intrinsic_dim.py:local_pca_id",
}


def test_no_function_runs_past_80_lines_except_the_listed_kernels():
    long = []
    for path in sorted((ROOT / "embgeo_utils").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                name = f"{path.parent.name}/{path.name}:{node.name}"
                if name not in LONG_KERNELS:
                    long.append(f"{name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"split these into stages: {long}"
    text = (ROOT / "CONTRIBUTING.md").read_text()
    assert all(k.split(":")[1] in text for k in LONG_KERNELS), "CONTRIBUTING.md must name every listed kernel"


def test_citation_file_is_valid_cff_and_the_books_bibtex_says_the_same():
    import subprocess
    import sys

    path = ROOT / "CITATION.cff"
    checker = Path(sys.executable).with_name("check-jsonschema")
    done = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.citation-file-format", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    cff = yaml.safe_load(path.read_text())
    assert cff["cff-version"] == "1.2.0"
    intro = (ROOT / "book" / "intro.md").read_text()
    (block,) = re.findall(r"^## Cite this book$.*?^```bibtex\n(.*?)^```$", intro, flags=re.M | re.S)
    fields = dict(re.findall(r"^\s+(\w+)\s*=\s*\{(.*)\},?$", block, flags=re.M))
    assert fields["title"] == cff["title"]
    assert fields["year"] == str(cff["date-released"])[:4]
    assert fields["author"] == "{" + cff["authors"][0]["name"] + "}"
    assert fields["note"] == f"Version {cff['version']}"
    assert fields["url"] == cff["repository-code"] and cff["repository-code"] in fields["howpublished"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert cff["version"] == project["version"] and cff["license"] == project["license"]


def test_lint_covers_every_package_and_test_folder():
    """`make lint` reaches the book machinery and its tests: no exclude pattern of the project swallows them."""
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.is_file():
        pytest.skip("ruff is not installed in this environment")
    listed = subprocess.run(
        [str(ruff), "check", "--show-files", "embgeo_utils", "tests", "benchmarks", "notebooks"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    files = {Path(line).resolve() for line in listed.splitlines() if line.strip()}
    for expected in [
        "embgeo_utils/book/runner.py",
        "tests/book/test_site.py",
        "notebooks/05_sae_feature_matching.ipynb",
    ]:
        assert (ROOT / expected).resolve() in files, f"ruff does not check {expected}"
