"""Execute the book's notebooks with papermill (used by ``make book`` and the tests).

``python -m embgeo_utils.runner`` runs every chapter in ``notebooks/`` in order
with its default parameters, then the Claims ledger page (``book/ledger.ipynb``),
writing executed copies to ``_executed/`` and chapter records to
``_executed/results/``. ``--small`` uses the small parameters of
``notebooks/params_small.yml`` (what the tests run); ``--only`` picks chapters.
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

__all__ = ["chapter_sources", "small_parameters", "execute", "main"]

LEDGER = Path("book") / "ledger.ipynb"


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

    The executed copy shows its parameters once, as a table (:func:`publish.show_parameters`).
    """
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / source.name
    start = time.perf_counter()
    pm.execute_notebook(
        str(source),
        str(target),
        parameters=parameters or {},
        cwd=str(source.parent),
        kernel_name="python3",
        execution_timeout=timeout,
        progress_bar=False,
        log_output=False,
    )
    publish.show_parameters(target, source, parameters)
    return target, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument("--out", default="_executed", help="folder for executed notebooks (default: _executed)")
    parser.add_argument("--small", action="store_true", help="use the small test parameters")
    parser.add_argument("--only", nargs="*", help="chapter stems or numbers to run, e.g. 00 04_layerwise")
    args = parser.parse_args(argv)

    root = Path(args.root).resolve()
    out = (root / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    os.environ["EMBGEO_RESULTS"] = str(results)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    small = small_parameters(root) if args.small else {}
    sources = chapter_sources(root)
    if args.only:
        sources = [s for s in sources if any(s.stem == o or s.stem.startswith(o) for o in args.only)]
    import papermill as pm

    failed = []
    for source in sources + [root / LEDGER]:
        print(f"[embgeo] executing {source.name} ...", flush=True)
        try:
            _, seconds = execute(source, out, {} if source.parent.name == "book" else small.get(source.stem, {}))
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
    if failed:
        print(f"[embgeo] {len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"[embgeo] executed notebooks in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
