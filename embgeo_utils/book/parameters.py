"""Chapter parameters: declared once in the cell tagged ``parameters``, checked before anything runs (every chapter).

Each line of a chapter's parameters cell declares one parameter with its type,
its default and, at the start of the comment, what values are allowed::

    n_tokens: int = 4000  # [100, inf) shared tokens sampled per pair
    alpha: float = 0.01  # (0, 1) significance level of the checks
    id_tokens: "int or str" = "auto"  # [10, inf) or {"all", "auto"} tokens per model with an ID
    model_names: list[str] = ["smollm2-135m", "gemma3-270m"]  # registry names, HF ids or paths

Types: ``int``, ``float`` (an int is accepted), ``bool``, ``str``, ``None``, ``list[T]``
and alternatives written as a quoted ``"A or B"``. A line without a type
(``name = value``) still works: its type is taken from the default, and nothing
restricts its values beyond that. Allowed values: intervals
``[lo, hi]``, ``(lo, hi)``, ``[lo, inf)`` for numbers (each element of a list) and
sets ``{"a", "b"}`` for strings, joined by ``or``. The declaration stays
readable by papermill (``papermill --help-notebook`` lists every parameter with
its type and help; a line holds one ``=`` only, so no ``>=`` in comments).

The runner and the ``embgeo`` command check overrides against the declaration
before a notebook starts (:func:`check_overrides`); the chapter-opening call
:func:`embgeo_utils.book.results.start_chapter` checks the values again in the
notebook's first cells (:func:`check_values`), including names that papermill
injected but the chapter does not declare.
"""

from __future__ import annotations

import ast
import difflib
import io
import json
import math
import re
import tokenize
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..core.cache import content_key
from ..core.errors import ParameterError

__all__ = [
    "HASH_EXCLUDES",
    "Parameter",
    "session_declarations",
    "chapter_sources",
    "check_overrides",
    "check_values",
    "injected_names",
    "notebook_parameters",
    "parameters_hash",
    "parse_cell",
    "parse_cli_value",
    "small_parameters",
]


#: Parameters that do not change a chapter's numbers (left out of the record's parameters hash).
HASH_EXCLUDES = ("device",)


_NUMBER = r"[-+]?(?:inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"


_INTERVAL = re.compile(rf"([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])")


_SET = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Parameter:
    """One declared parameter of a chapter (every chapter).

    Attributes:
        name: the variable name.
        type: the declared type, e.g. ``"int"``, ``"list[str]"``, ``"int or str"``.
        default: the default value (a Python literal).
        allowed: the allowed values as written, e.g. ``"[100, inf)"``; empty when any value of the type is allowed.
        help: the rest of the comment.
        typed: whether the type was declared (``False``: a plain ``name = value`` line, type taken from the value).
    """

    name: str
    type: str
    default: Any
    allowed: str
    help: str
    typed: bool = True

    def describe(self) -> str:
        """One line: ``name: type = default  allowed help``."""
        parts = [f"{self.name}: {self.type} = {self.default!r}"]
        if self.allowed:
            parts.append(f"allowed {self.allowed}")
        if self.help:
            parts.append(self.help)
        return "  ".join(parts)


def _split_comment(comment: str) -> tuple[str, str]:
    """Split a parameter's comment into its leading allowed-values part and the help text."""
    text = comment.lstrip("#").strip()
    parts = []
    rest = text
    while True:
        match = _INTERVAL.match(rest) or _SET.match(rest)
        if not match:
            break
        parts.append(match.group(0))
        rest = rest[match.end() :].lstrip()
        if rest.startswith("or ") and (_INTERVAL.match(rest[3:].lstrip()) or _SET.match(rest[3:].lstrip())):
            rest = rest[3:].lstrip()
            continue
        break
    if parts:
        rest = rest.lstrip(":;,").strip()
    return " or ".join(parts), rest


def _annotation_text(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.strip()
    return ast.unparse(node)


def parse_cell(source: str, where: str = "the parameters cell") -> dict[str, Parameter]:
    """Read the declarations of a parameters cell (every chapter).

    Args:
        source: the cell's source.
        where: how messages name the cell (e.g. the notebook's file name).

    Returns:
        The parameters by name, in cell order.

    Raises:
        ParameterError: a line that is not ``name: type = literal  # comment``, an unknown type, a default that does
            not fit its own declaration, or a line papermill cannot parse (two ``=``).
    """
    lines = source.splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.strip().startswith("#") and line.count("=") > 1:
            raise ParameterError(
                f"Line {number} of {where} holds more than one '=' ({line.strip()!r}); papermill cannot parse it. "
                "Write bounds as intervals such as [100, inf) instead of >= 100."
            )
    try:
        tree = ast.parse(source)
        comments = {
            tok.start[0]: tok.string
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT
        }
    except (SyntaxError, tokenize.TokenError) as exc:
        raise ParameterError(f"{where} is not valid Python ({exc}).") from exc
    declared: dict[str, Parameter] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value_node, kind = node.target.id, node.value, _annotation_text(node.annotation)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value_node, kind = node.targets[0].id, node.value, ""
        else:
            raise ParameterError(
                f"Line {node.lineno} of {where} is not a parameter declaration; write `name: type = value  # help`."
            )
        try:
            default = ast.literal_eval(value_node)
        except ValueError as exc:
            raise ParameterError(f"The default of {name!r} in {where} must be a plain literal.") from exc
        allowed, help_text = _split_comment(comments.get(node.end_lineno or node.lineno, ""))
        param = Parameter(name, kind or _infer_type(default), default, allowed, help_text, typed=bool(kind))
        _parse_type(param.type, name)  # an unknown type is a mistake in the declaration
        problem = _problem(param, default)
        if problem:
            raise ParameterError(f"The default of {name!r} in {where} does not fit its declaration: {problem}.")
        declared[name] = param
    return declared


def _infer_type(value: Any) -> str:
    """The type of an undeclared parameter, from its default (lines written ``name = value``)."""
    if value is None:
        return "any"
    if isinstance(value, (list, tuple)):
        inner = {_infer_type(v) for v in value}
        return f"list[{inner.pop()}]" if len(inner) == 1 else "list[any]"
    return type(value).__name__ if type(value).__name__ in _BASE else "any"


def _parameters_cell(path: Path) -> str:
    try:
        nb = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ParameterError(f"Cannot read notebook {path} ({exc}).") from exc
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            source = cell.get("source", "")
            return "".join(source) if isinstance(source, list) else source
    raise ParameterError(f"{path} has no cell tagged 'parameters'.")


def notebook_parameters(path: str | Path) -> dict[str, Parameter]:
    """The declared parameters of a notebook's cell tagged ``parameters`` (every chapter; the runner)."""
    return parse_cell(_parameters_cell(Path(path)), Path(path).name)


def session_declarations(fields: list[str], where: str) -> dict[str, Parameter]:
    """The declarations of the parameters cell the running kernel executed last (every chapter, ``start_chapter``).

    The cell is found among the kernel's executed cells (IPython's ``In``), as the last one that declares exactly the
    names ``fields``, so nothing depends on the working folder or on where the notebook file lies.

    Raises:
        ParameterError: outside a kernel, or when no executed cell declares those names.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return _no_cell(where)
    shell = get_ipython()
    history = (shell.user_ns.get("In") or []) if shell is not None else []
    for source in reversed(history):
        if not isinstance(source, str) or not all(name in source for name in fields):
            continue
        try:
            declared = parse_cell(source, where)
        except ParameterError:
            continue
        if sorted(declared) == sorted(fields):
            return declared
    return _no_cell(where)


def _no_cell(where: str) -> dict[str, Parameter]:
    raise ParameterError(
        f"Found no executed parameters cell of {where}: run the chapter's cell tagged 'parameters' first, or, outside "
        "a notebook, pass values= and declarations=parameters.notebook_parameters(<the notebook>) to start_chapter."
    )


# ---------------------------------------------------------------------------- types and allowed values


_BASE = {"int", "float", "bool", "str", "None", "any"}


def _parse_type(text: str, name: str = "") -> list[Any]:
    """Alternatives of a type text: each a base name or ``("list", alternatives)``."""
    alternatives = []
    for part in re.split(r"\s+or\s+|\s*\|\s*", text.strip()):
        part = part.strip()
        if part in _BASE:
            alternatives.append(part)
        elif part.startswith(("list[", "tuple[")) and part.endswith("]"):
            inner = part[part.index("[") + 1 : -1]
            alternatives.append(("list", _parse_type(inner, name)))
        else:
            raise ParameterError(
                f"Parameter {name!r} has type {text!r}, which the checks do not know; use int, float, bool, str, "
                'None, list[...] or "A or B".'
            )
    return alternatives


def _fits_type(value: Any, alternatives: list[Any]) -> bool:
    for alt in alternatives:
        if alt == "any":
            return True
        if alt == "None" and value is None:
            return True
        if alt == "bool" and isinstance(value, bool):
            return True
        if alt == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if alt == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if alt == "str" and isinstance(value, str):
            return True
        if isinstance(alt, tuple) and isinstance(value, (list, tuple)):
            if all(_fits_type(v, alt[1]) for v in value):
                return True
    return False


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _allowed_leaf(leaf: Any, allowed: str) -> bool:
    intervals = _INTERVAL.findall(allowed)
    sets = [ast.literal_eval("{" + m + "}") if m.strip() else set() for m in _SET.findall(allowed)]
    if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
        if not intervals:
            return True
        if isinstance(leaf, float) and math.isnan(leaf):
            return False
        for left, lo, hi, right in intervals:
            low, high = float(lo), float(hi)
            if (leaf > low or (left == "[" and leaf == low)) and (leaf < high or (right == "]" and leaf == high)):
                return True
        return False
    if isinstance(leaf, str):
        return not sets or any(leaf in s for s in sets)
    return True


def _problem(param: Parameter, value: Any) -> str | None:
    """What is wrong with ``value`` for ``param`` (``None`` when it fits)."""
    if not _fits_type(value, _parse_type(param.type, param.name)):
        return f"expected {param.type}, got {value!r} ({type(value).__name__})"
    if param.allowed:
        bad = [leaf for leaf in _leaves(value) if not _allowed_leaf(leaf, param.allowed)]
        if bad:
            shown = bad[0] if not isinstance(value, (list, tuple)) else value
            return f"allowed values are {param.allowed}, got {shown!r}"
    return None


def _allowed_names(declared: Mapping[str, Parameter]) -> str:
    return ", ".join(declared)


def _unknown_message(name: str, declared: Mapping[str, Parameter], where: str) -> str:
    close = difflib.get_close_matches(name, list(declared), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"Unknown parameter {name!r} for {where}.{hint} Allowed parameters: {_allowed_names(declared)}."


def check_values(
    declared: Mapping[str, Parameter], values: dict[str, Any], where: str, unknown: list[str] | None = None
) -> None:
    """Check parameter values against their declarations (every chapter, in ``start_chapter``).

    Args:
        declared: from :func:`notebook_parameters` or :func:`parse_cell`.
        values: values by name; names that are not declared are left alone (a chapter may pass derived values).
        where: how messages name the chapter.
        unknown: names that were given from outside (papermill's injected cell, command-line overrides); each must be
            declared.

    Raises:
        ParameterError: naming the parameter, what was given and what is allowed.
    """
    for name in unknown or []:
        if name not in declared:
            raise ParameterError(_unknown_message(name, declared, where))
    for name, value in values.items():
        param = declared.get(name)
        if param is None:
            continue
        problem = _problem(param, value)
        if problem:
            detail = f" ({param.help})" if param.help else ""
            raise ParameterError(f"Parameter {name!r} of {where}{detail}: {problem}.")


def check_overrides(path: str | Path, overrides: dict[str, Any]) -> dict[str, Parameter]:
    """Check overrides for a notebook before it runs (the runner and ``embgeo run``); returns its declarations.

    Raises:
        ParameterError: an unknown name (the message lists the allowed ones), a wrong type or a value out of range.
    """
    declared = notebook_parameters(path)
    check_values(declared, overrides, Path(path).stem, unknown=list(overrides))
    return declared


def parse_cli_value(text: str) -> Any:
    """A command-line value as papermill reads ``-p``: ints, floats, True/False/None, lists in JSON/YAML, else text."""
    import yaml

    stripped = text.strip()
    if stripped in ("True", "true"):
        return True
    if stripped in ("False", "false"):
        return False
    if stripped in ("None", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(stripped)
        except ValueError:
            pass
    if stripped.startswith(("[", "{")):
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError as exc:
            raise ParameterError(f"Cannot read the list {text!r} ({exc}); write it as [a, b, c].") from exc
    return text


def injected_names() -> list[str]:
    """Names that papermill injected into the running kernel (its cell starts with ``# Parameters``); [] elsewhere."""
    try:
        from IPython import get_ipython
    except ImportError:
        return []
    shell = get_ipython()
    if shell is None:
        return []
    history = shell.user_ns.get("In") or []
    for source in reversed(history):
        if isinstance(source, str) and source.startswith("# Parameters"):
            try:
                tree = ast.parse(source)
            except SyntaxError:
                return []
            return [
                target.id
                for node in tree.body
                if isinstance(node, ast.Assign)
                for target in node.targets
                if isinstance(target, ast.Name)
            ]
    return []


def session_value(name: str) -> tuple[bool, Any]:
    """``(True, value)`` of a variable in the running IPython kernel, ``(False, None)`` when absent."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False, None
    shell = get_ipython()
    if shell is None or name not in shell.user_ns:
        return False, None
    return True, shell.user_ns[name]


def parameters_hash(values: dict[str, Any]) -> str:
    """A short hash of a run's parameters (every record's file name); ``device`` is left out."""
    kept = {k: v for k, v in values.items() if k not in HASH_EXCLUDES}
    return content_key(kept, length=10)


def chapter_sources(root: str | Path = ".") -> list[Path]:
    """Chapter notebooks in book order (their file names start with the chapter number)."""
    folder = Path(root) / "notebooks"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No notebooks/ folder under {Path(root).resolve()}; run from the repository root or pass --root."
        )
    return sorted(folder.glob("[0-9][0-9]_*.ipynb"))


def small_parameters(root: str | Path = ".") -> dict[str, dict[str, Any]]:
    """Small parameters per chapter stem, from ``notebooks/params_small.yml``."""
    path = Path(root) / "notebooks" / "params_small.yml"
    return yaml.safe_load(path.read_text()) or {}
