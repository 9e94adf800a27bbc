"""Execute the book's notebooks with papermill (used by ``make book`` and the tests).

``python -m embgeo_utils.runner`` runs every chapter in ``notebooks/`` in order
with its default parameters, then the Claims ledger page (``book/ledger.ipynb``),
writing executed copies to ``_executed/`` and chapter records to
``_executed/results/``. ``--small`` uses the small parameters of
``notebooks/params_small.yml`` (what the tests run) and keeps their records apart
in ``_executed/results-small/``; ``--only`` picks chapters. Every notebook's
parameters are checked against its declarations before the first one runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import publish
from .errors import ParameterError
from .parameters import check_overrides

__all__ = [
    "chapter_sources",
    "small_parameters",
    "execute",
    "results_folder",
    "run_notebooks",
    "select_chapters",
    "main",
]

LEDGER = Path("book") / "ledger.ipynb"
#: Parameters that name models (their overrides are checked with ``models.check_name`` before a run starts).
MODEL_PARAMETERS = ("model_names", "model_pairs", "model_a", "model_b", "layer_pair", "cross_pair")


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


def execute(
    source: Path, out_dir: Path, parameters: dict[str, Any] | None = None, timeout: int = 3600
) -> tuple[Path, float]:
    """Run one notebook with papermill into ``out_dir``; returns (executed path, seconds).

    The parameters are checked against the notebook's declarations first, so an unknown name, a wrong type or a
    value out of range fails before a kernel starts. The executed copy shows its parameters once, as a table
    (:func:`publish.show_parameters`).

    Raises:
        ParameterError: a parameter that the notebook does not declare or whose value it does not allow.
    """
    import papermill as pm

    parameters = dict(parameters or {})
    check_overrides(source, parameters)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / source.name
    start = time.perf_counter()
    pm.execute_notebook(
        str(source),
        str(target),
        parameters=parameters,
        cwd=str(source.parent),
        kernel_name="python3",
        execution_timeout=timeout,
        progress_bar=False,
        log_output=False,
    )
    publish.show_parameters(target, source, parameters)
    return target, time.perf_counter() - start


def results_folder(out: Path, small: bool = False) -> Path:
    """Where a run's records go: ``<out>/results``, or ``<out>/results-small`` for the small test parameters."""
    return out / ("results-small" if small else "results")


def run_notebooks(
    root: Path,
    out: Path,
    sources: list[Path],
    overrides: dict[str, dict[str, Any]] | None = None,
    small: bool = False,
    ledger: bool = True,
) -> list[str]:
    """Execute chapters (then the ledger page) into ``out``; returns the names of the notebooks that failed.

    Every notebook's parameters are checked before the first one runs. Records go to :func:`results_folder`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the book runs offline unless the caller says otherwise
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    small_params = small_parameters(root) if small else {}
    plan = [(s, {**small_params.get(s.stem, {}), **(overrides or {}).get(s.stem, {})}) for s in sources]
    if ledger:
        plan.append((root / LEDGER, {}))
    for source, params in plan:
        check_overrides(source, params)
    _check_model_names([params for _, params in plan])
    import papermill as pm

    results = results_folder(out, small)
    results.mkdir(parents=True, exist_ok=True)
    os.environ["EMBGEO_RESULTS"] = str(results)
    failed = []
    for source, params in plan:
        print(f"[embgeo] executing {source.name} ...", flush=True)
        try:
            _, seconds = execute(source, out, params)
        except pm.PapermillExecutionError as exc:
            failed.append(source.name)
            print(
                f"[embgeo] {source.name} FAILED in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
                f"         the executed copy with the traceback is {out / source.name}",
                file=sys.stderr,
                flush=True,
            )
            continue
        print(f"[embgeo] {source.name} done in {seconds:.0f} s", flush=True)
    return failed


def _check_model_names(plans: list[dict[str, Any]]) -> None:
    """Model names given as overrides are checked before a kernel starts (the chapter checks them again)."""
    names = []
    for params in plans:
        for key in MODEL_PARAMETERS:
            value = params.get(key)
            items = [value] if isinstance(value, str) else list(value or [])
            names += [n for item in items for n in (item if isinstance(item, (list, tuple)) else [item])]
    if names:
        from .models import check_name

        for name in dict.fromkeys(names):
            check_name(name)


def select_chapters(root: Path, only: list[str] | None) -> list[Path]:
    """Chapters named by number or stem (``"04"``, ``"04_layerwise"``); all when ``only`` is empty.

    Raises:
        ParameterError: a name that matches no chapter (the message lists the chapters).
    """
    sources = chapter_sources(root)
    if not only:
        return sources
    picked = []
    for name in only:
        found = [s for s in sources if s.stem == name or s.stem.startswith(name)]
        if not found:
            raise ParameterError(
                f"No chapter {name!r}. Chapters: {', '.join(s.stem for s in sources)} (a number such as 04 is enough)."
            )
        picked += [s for s in found if s not in picked]
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument("--out", default="_executed", help="folder for executed notebooks (default: _executed)")
    parser.add_argument("--small", action="store_true", help="use the small test parameters (records: results-small/)")
    parser.add_argument("--only", nargs="*", help="chapter stems or numbers to run, e.g. 00 04_layerwise")
    args = parser.parse_args(argv)

    root = Path(args.root).resolve()
    out = (root / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    try:
        failed = run_notebooks(root, out, select_chapters(root, args.only), small=args.small)
    except ParameterError as exc:
        print(f"[embgeo] nothing was run: {exc}", file=sys.stderr, flush=True)
        return 2
    if failed:
        print(f"[embgeo] {len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"[embgeo] executed notebooks in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
