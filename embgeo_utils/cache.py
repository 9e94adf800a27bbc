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
import re
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "cache_dir",
    "cache_root",
    "content_key",
    "atomic_path",
    "sha256_file",
    "package_dir",
    "clean_staging",
    "folder_size",
    "notice",
    "array_digest",
    "save_arrays",
    "load_arrays",
    "save_frame",
    "load_frame",
    "frame_row",
]

#: Staging folders of writes that died without their process are removed after this many seconds
#: when their name does not say which process owns them (written by older versions).
STALE_SECONDS = 3600

_STAGING = re.compile(r"^\.(?P<target>.+?)\.(?:(?P<pid>\d+)\.)?(?P<rand>[a-z0-9_]{8})$")


def cache_root() -> Path:
    """The cache's root folder: ``EMBGEO_CACHE`` or ``~/.cache/embgeo`` (not created)."""
    return Path(os.environ.get("EMBGEO_CACHE") or Path.home() / ".cache" / "embgeo")


def notice(message: str) -> None:
    """One line for the reader, e.g. that a damaged cache entry is being rebuilt (every chapter)."""
    print(f"[embgeo] {message}", flush=True)


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder of the cache, e.g. ``cache_dir("models")``."""
    path = cache_root().joinpath(*parts)
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
    ``target`` is left as it was. The temporary folder's name carries the process id,
    so that :func:`clean_staging` can remove what a killed process left behind.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_staging(folder: str | Path, stale_seconds: float = STALE_SECONDS) -> list[Path]:
    """Remove staging folders that killed writes left in ``folder`` (every cache, before it is used).

    A staging folder (``.<name>.<pid>.<random>``, made by :func:`atomic_path`) is removed when its process no longer
    runs; one without a process id (older versions) when it was last changed more than ``stale_seconds`` ago.

    Returns:
        The folders removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _STAGING.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        pid = match.group("pid")
        if pid is not None:
            stale = int(pid) != os.getpid() and not _alive(int(pid))
        else:
            try:
                stale = time.time() - entry.stat().st_mtime > stale_seconds
            except OSError:
                continue
        if stale:
            size = folder_size(entry)
            try:
                _remove(entry)
            except OSError:
                continue
            removed.append(entry)
            notice(f"removed {entry} ({size / 2**20:.0f} MiB), left by a write that was interrupted")
    return removed


def folder_size(path: str | Path) -> int:
    """Bytes in a folder (recursively) or a file; 0 when it does not exist."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                pass
    return total


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


def array_digest(x: Any) -> str:
    """sha256 of an array's values, dtype and shape (numpy or torch), for content keys of cached results."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.ascontiguousarray(x)
    digest = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(arr.data.cast("B"))
    return digest.hexdigest()


def save_arrays(path: str | Path, arrays: dict[str, Any]) -> None:
    """Write named numpy arrays to ``path`` (``.npz``) atomically; read back with :func:`load_arrays`."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_arrays(path: str | Path) -> dict[str, Any] | None:
    """The arrays :func:`save_arrays` wrote, or ``None`` when the file is missing or unreadable.

    An unreadable file (cut short, overwritten) is removed with a notice, so the
    caller recomputes it. Nothing is unpickled.
    """
    import numpy as np

    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        notice(f"cached file {path.name} is unreadable ({type(err).__name__}); recomputing it.")
        path.unlink(missing_ok=True)
        return None


def save_frame(frame: Any, path: str | Path) -> None:
    """Write a pandas DataFrame to ``path`` (``.npz``) atomically, exactly (every chapter's cached tables).

    One array per column: numbers keep their dtype bit for bit, text is stored as
    fixed-width unicode, so reading needs no pickle (:func:`load_frame`).
    """
    import numpy as np

    arrays: dict[str, Any] = {"__columns__": np.array([str(c) for c in frame.columns])}
    for i, column in enumerate(frame.columns):
        values = frame[column].to_numpy()
        arrays[f"c{i}"] = values.astype(str) if values.dtype == object else values
    save_arrays(path, arrays)


def load_frame(path: str | Path) -> Any | None:
    """The DataFrame :func:`save_frame` wrote, or ``None`` when the file is missing or unreadable (then removed)."""
    import pandas as pd

    data = load_arrays(path)
    if data is None:
        return None
    try:
        columns = [str(c) for c in data["__columns__"]]
        return pd.DataFrame({c: data[f"c{i}"] for i, c in enumerate(columns)})
    except KeyError:
        notice(f"cached table {Path(path).name} is incomplete; recomputing it.")
        Path(path).unlink(missing_ok=True)
        return None


def frame_row(frame: Any, i: int = 0) -> dict[str, Any]:
    """Row ``i`` of a DataFrame as a dict of Python scalars, column by column (so integers stay integers)."""
    import numpy as np

    out = {}
    for column in frame.columns:
        value = frame[column].to_numpy()[i]
        out[str(column)] = value.item() if isinstance(value, np.generic) else value
    return out
