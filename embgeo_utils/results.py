"""Claims and run records written by every chapter, gathered by the Claims ledger page.

Each executed chapter calls :class:`ChapterRecord` and ends with ``record.save()``,
which writes ``<results dir>/<chapter>.json`` holding its claims (statistic, null,
p-value, verdict and numbers) and its run info (device, models, parameters,
wall time, package versions). The results folder is ``EMBGEO_RESULTS`` when set
(the book build sets it), else ``results/`` in the cache. The ledger page reads
every file with :func:`load_ledger`; nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .cache import atomic_path, cache_dir

__all__ = ["Claim", "ChapterRecord", "results_dir", "load_records", "load_ledger", "VERDICTS", "CLAIMS"]

VERDICTS = ("reproduced", "not reproduced", "partly reproduced", "inconclusive")

#: The claims the book tests (numbering of METHODS.md), with the chapter that tests each.
CLAIMS: dict[int, tuple[str, str]] = {
    1: ("Intrinsic dimension rises then falls over layers", "Chapter 4"),
    2: ("Shuffling raises loss and peak ID, monotone in S", "Chapter 4"),
    3: ("Shuffled prompts have higher mean cosine in late layers", "Chapter 4"),
    4: ("Neighbour overlap chi_1 is lower for shuffled prompts near the ID peak", "Chapter 4"),
    5: ("Pearson(ID, loss) > 0 with p < 0.01", "Chapter 4"),
    6: ("Cosine matrices of token embeddings correlate across models far above the null", "Chapter 1"),
    7: ("LLE weights transfer across models with error far below the null", "Chapter 2"),
    8: ("Per-token ID is far below the width, low-ID neighbourhoods are coherent, ID correlates across models", "Chapter 3"),
    9: ("Mapped steering vectors steer B better than random and no-steer controls", "Chapter 6"),
    10: ("Paired SAE decoder geometry beats the permutation null, highest in middle layers", "Chapter 5"),
}
_PACKAGES = ("torch", "transformers", "numpy", "scipy", "embgeo-utils")


def results_dir() -> Path:
    """Folder that chapters write their records to (``EMBGEO_RESULTS`` or the cache)."""
    env = os.environ.get("EMBGEO_RESULTS")
    path = Path(env) if env else cache_dir("results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
        self._start = time.perf_counter()

    def claim(
        self,
        number: int,
        claim: str,
        statistic: str,
        value: float | None,
        null: str,
        p_value: float | None,
        verdict: str,
        **details: Any,
    ) -> Claim:
        """Record one claim; ``verdict`` must be one of :data:`VERDICTS`."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}.")
        item = Claim(number, claim, statistic, _plain(value), null, _plain(p_value), verdict, _plain(details))
        self.claims.append(item)
        return item

    def run_info(self, device: str = "cpu") -> dict[str, Any]:
        versions = {}
        for pkg in _PACKAGES:
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        return {
            "device": device,
            "models": self.models,
            "parameters": _plain(self.parameters),
            "wall_seconds": round(time.perf_counter() - self._start, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": versions,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def save(self, device: str = "cpu") -> Path:
        """Write ``<results dir>/<chapter>.json`` atomically and return its path."""
        payload = {
            "chapter": self.chapter,
            "title": self.title,
            "claims": [asdict(c) for c in self.claims],
            "numbers": _plain(self.numbers),
            "run": self.run_info(device),
        }
        target = results_dir() / f"{self.chapter}.json"
        with atomic_path(target) as staged:
            staged.write_text(json.dumps(payload, indent=1, allow_nan=False))
        return target


def load_records(folder: str | Path | None = None) -> list[dict[str, Any]]:
    """All chapter records in a results folder, sorted by chapter id (Claims ledger page)."""
    root = Path(folder) if folder else results_dir()
    records = []
    for path in sorted(root.glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except ValueError as exc:
            raise ValueError(f"Results file {path} is not valid JSON ({exc}); rerun its chapter.") from exc
    return records


def load_ledger(folder: str | Path | None = None):
    """One row per recorded claim, as a pandas DataFrame sorted by claim number (Claims ledger page)."""
    import pandas as pd

    rows = []
    for rec in load_records(folder):
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
                }
            )
    tested = {row["claim"] for row in rows}
    for number, (statement, chapter) in CLAIMS.items():
        if number not in tested:
            rows.append(
                {"claim": number, "statement": statement, "chapter": chapter, "statistic": "", "value": None,
                 "null": "", "p": None, "verdict": "not yet run"}
            )
    columns = ["claim", "statement", "chapter", "statistic", "value", "null", "p", "verdict"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(["claim", "chapter"]).reset_index(drop=True)
