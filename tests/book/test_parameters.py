"""Chapter parameters: declarations papermill can read, and checks that stop a bad run before anything loads."""

from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path

import pytest

from embgeo_utils.book import parameters, results, runner
from embgeo_utils.chapters import ch02_lle as ch02
from embgeo_utils.core.errors import ParameterError, UnknownModelError

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = runner.chapter_sources(ROOT) + [ROOT / runner.LEDGER]
#: Chapters whose parameters cell still declares no types (they get types inferred from the defaults).
NOT_YET_TYPED: set[str] = set()

CELL = """model_names: list[str] = ["smollm2-135m"]  # registry names, HF ids or paths
n_tokens: int = 4000  # [100, inf) shared tokens sampled per pair
alpha: float = 0.01  # (0, 1) significance level
variance: float = 0.9  # (0, 1] fraction of variance
id_tokens: "int or str" = "auto"  # [10, inf) or {"all", "auto"} tokens with an ID
levels: list[int] = [0, 5]  # [0, 12] shuffle levels
center: bool = True  # remove the mean first
folder: "str or None" = None  # default: the cache
pairs: list[list[str]] = [["a", "b"]]  # (A, B)
"""


def test_cell_declarations_are_read_with_types_ranges_and_help():
    declared = parameters.parse_cell(CELL)
    assert list(declared) == [
        "model_names",
        "n_tokens",
        "alpha",
        "variance",
        "id_tokens",
        "levels",
        "center",
        "folder",
        "pairs",
    ]
    n = declared["n_tokens"]
    assert (n.type, n.default, n.allowed, n.help) == ("int", 4000, "[100, inf)", "shared tokens sampled per pair")
    assert declared["id_tokens"].allowed == '[10, inf) or {"all", "auto"}'
    assert declared["pairs"].help == "(A, B)" and declared["pairs"].allowed == ""


@pytest.mark.parametrize(
    "name, value",
    [
        ("n_tokens", 100),
        ("n_tokens", 10**6),
        ("alpha", 0.5),
        ("alpha", 1e-9),
        ("variance", 1),
        ("id_tokens", 300),
        ("id_tokens", "all"),
        ("levels", []),
        ("levels", [0, 12]),
        ("folder", "/tmp/x"),
        ("folder", None),
        ("pairs", [["a", "c"], ["d", "e"]]),
    ],
)
def test_allowed_values_pass(name, value):
    parameters.check_values(parameters.parse_cell(CELL), {name: value}, "test")


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("n_tokens", "abc", r"'n_tokens'.*expected int, got 'abc' \(str\)"),
        ("n_tokens", 0, r"'n_tokens'.*allowed values are \[100, inf\), got 0"),
        ("n_tokens", 99, r"got 99"),
        ("n_tokens", 4000.5, r"expected int"),
        ("n_tokens", True, r"expected int"),
        ("alpha", 0, r"\(0, 1\), got 0"),
        ("alpha", 1.0, r"\(0, 1\), got 1.0"),
        ("alpha", float("nan"), r"got nan"),
        ("variance", 1.01, r"\(0, 1\]"),
        ("id_tokens", "some", r"\{\"all\", \"auto\"\}, got 'some'"),
        ("id_tokens", 5, r"got 5"),
        ("levels", [0, 13], r"\[0, 12\], got \[0, 13\]"),
        ("levels", 3, r"expected list\[int\]"),
        ("center", "yes", r"expected bool"),
        ("model_names", "smollm2-135m", r"expected list\[str\]"),
        ("pairs", [["a", 1]], r"expected list\[list\[str\]\]"),
    ],
)
def test_wrong_types_and_values_out_of_range_are_named(name, value, message):
    with pytest.raises(ParameterError, match=message):
        parameters.check_values(parameters.parse_cell(CELL), {name: value}, "test")


def test_an_unknown_name_lists_the_allowed_ones_and_the_closest():
    with pytest.raises(ParameterError, match=r"Unknown parameter 'n_token'.*Did you mean 'n_tokens'.*Allowed.*alpha"):
        parameters.check_values(parameters.parse_cell(CELL), {"n_token": 300}, "test", unknown=["n_token"])


@pytest.mark.parametrize(
    "cell, message",
    [
        ("n: int = 4000  # n >= 100\n", "more than one '='"),
        ("n: int = 10  # [100, inf) tokens\n", "default of 'n'.*does not fit"),
        ("n: integer = 10\n", "type 'integer'"),
        ("n: int = 2 * 5\n", "plain literal"),
        ("import os\n", "not a parameter declaration"),
    ],
)
def test_bad_declarations_are_refused(cell, message):
    with pytest.raises(ParameterError, match=message):
        parameters.parse_cell(cell)


def test_untyped_lines_get_their_type_from_the_default():
    declared = parameters.parse_cell('n = 3  # count\nnames = ["a"]\nx = None\n')
    assert [(p.type, p.typed) for p in declared.values()] == [("int", False), ("list[str]", False), ("any", False)]
    with pytest.raises(ParameterError, match="expected int"):
        parameters.check_values(declared, {"n": "3"}, "test")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_parameters_cell_parses_for_papermill_and_for_the_checks(path):
    from papermill.translators import PythonTranslator

    declared = parameters.notebook_parameters(path)
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    seen = {p.name: p for p in PythonTranslator.inspect(cell)}
    assert list(seen) == list(declared), "papermill must list every parameter"
    if path.stem not in NOT_YET_TYPED:
        assert all(p.typed for p in declared.values()), "declare every parameter's type"
        assert all(seen[name].inferred_type_name == p.type for name, p in declared.items())


def test_small_parameters_fit_the_declarations():
    for stem, params in runner.small_parameters(ROOT).items():
        parameters.check_overrides(ROOT / "notebooks" / f"{stem}.ipynb", params)


def test_cli_values_are_read_like_papermill():
    read = parameters.parse_cli_value
    assert [read("300"), read("1e-3"), read("True"), read("None"), read("abc")] == [300, 1e-3, True, None, "abc"]
    assert read("[smollm2-135m, gemma3-270m]") == ["smollm2-135m", "gemma3-270m"]


def test_runner_refuses_a_typo_before_a_kernel_starts(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ParameterError, match="Allowed parameters: model_pairs, n_tokens"):
        runner.execute(ROOT / "notebooks" / "02_lle.ipynb", tmp_path, {"n_token": 300})
    assert time.perf_counter() - start < 2 and not list(tmp_path.iterdir())


def test_start_chapter_checks_parameters_and_model_names_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBGEO_RESULTS", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # nothing depends on the working folder
    cell = parameters.notebook_parameters(ROOT / "notebooks" / "02_lle.ipynb")
    good = {"model_pairs": [["smollm2-135m", "gemma3-270m"]], "n_tokens": 300, "k": 10, "reg": 1e-3}
    good |= {"center": True, "alpha": 0.01, "seed": 0, "device": "cpu"}
    loads = []
    monkeypatch.setattr("embgeo_utils.lm.models.load", lambda *a, **k: loads.append(a))

    def start(values):
        return results.start_chapter(ch02, values, declarations=cell)

    with pytest.raises(ParameterError, match=r"'n_tokens' of ch02_lle.*expected int, got 'abc'"):
        start({**good, "n_tokens": "abc"})
    with pytest.raises(ParameterError, match=r"allowed values are \[50, inf\), got 0"):
        start({**good, "n_tokens": 0})
    with pytest.raises(ParameterError, match="Did you mean 'n_tokens'"):  # a name the chapter does not declare
        start({**good, "n_token": 300})
    # every model name is checked, before any model loads
    pairs = [["smollm2-135m", "gemma3-270m"], ["smollm2-135m", "no-such-model-xyz"]]
    with pytest.raises(UnknownModelError, match="no-such-model-xyz"):
        start({**good, "model_pairs": pairs})
    assert not loads
    ch = start(good)
    assert isinstance(ch.params, ch02.Parameters) and ch.params.n_tokens == 300 and ch.params.device == "cpu"
    assert ch.record.parameters_hash and not ch.record.defaults
    book = start({"device": "cpu"})  # every other parameter at its declared default
    assert book.record.defaults and book.record.parameters_hash != ch.record.parameters_hash
    assert book.params.n_tokens == cell["n_tokens"].default
    with pytest.raises(ParameterError, match="run the chapter's cell tagged 'parameters'"):
        results.start_chapter(ch02)  # outside a kernel, nothing to read the declarations from
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="rerun its chapter"):
        results.load_records(tmp_path)


def _type_text(annotation) -> str:
    """A field's annotation as the parameters cell writes types: ``float | None`` -> ``float or None``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return " or ".join(part.strip() for part in text.split("|"))


@pytest.mark.parametrize("path", runner.chapter_sources(ROOT), ids=lambda p: p.stem)
def test_one_line_from_notebook_to_chapter_module_record_and_tests(path):
    """notebooks/NN_name.ipynb <-> chapters/chNN_name.py <-> record chNN_name <-> tests/chapters/test_chNN_name.py."""
    module = importlib.import_module(f"embgeo_utils.chapters.ch{path.stem}")
    assert module.CHAPTER == f"ch{path.stem}"
    assert (ROOT / "tests" / "chapters" / f"test_ch{path.stem}.py").exists()
    declared = parameters.notebook_parameters(path)
    fields = dataclasses.fields(module.Parameters)
    assert [f.name for f in fields] == list(declared), "Parameters has the fields of the parameters cell, in order"
    for f in fields:
        assert _type_text(f.type) == declared[f.name].type.replace('"', ""), (
            f"{f.name}: {f.type} vs {declared[f.name].type}"
        )
    defaults = {name: p.default for name, p in declared.items()}
    assert isinstance(module.Parameters(**defaults), module.Parameters)
