"""The on-disk cache used by every chapter: content keys and atomic writes.

Files live under ``EMBGEO_CACHE`` (default ``~/.cache/embgeo``). Every entry is
named by a hash of everything that determines its content, so a rerun with the
same inputs reuses it and any change of inputs misses. Writes go to a temporary
file in the same folder and are renamed into place, so an interrupted run never
leaves a half-written entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "content_key", "atomic_path", "sha256_file", "package_dir"]


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder of the cache, e.g. ``cache_dir("models")``."""
    root = Path(os.environ.get("EMBGEO_CACHE") or Path.home() / ".cache" / "embgeo")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_key(*items: Any, length: int = 24) -> str:
    """Hash JSON-serialisable items (and raw bytes) into a short hex key."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, (bytes, bytearray, memoryview)):
            digest.update(bytes(item))
        else:
            digest.update(json.dumps(item, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:length]


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    Works for files and folders. On any exception the temporary is removed and
    ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if target.is_dir() and not target.is_symlink():
            _remove(target)
        os.replace(staged, target)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_dir(module: str) -> Path | None:
    """Folder of an installed package (model and text wheels), or ``None`` when absent.

    ``find_spec`` locates the package without executing it (some model wheels
    import plugin hosts that the book does not need).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
