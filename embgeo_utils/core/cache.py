"""The on-disk cache used by every chapter: content keys, atomic writes and the one cache helper.

Files live under ``EMBGEO_CACHE`` (default ``~/.cache/embgeo``). Every cached result
goes through :func:`cached`, a decorator: the entry is named by a hash of the
function's kind and version and of every argument (arrays by the digest of their
values, models by their weights' sha256 and dtype, devices by their type), so a
rerun with the same inputs reads it and any change of inputs misses. An entry is a
folder of ``.npy`` files and a JSON manifest holding their sha256: nothing is
unpickled, and a damaged entry is recomputed with a notice. Writes go to a
temporary folder beside the entry and are renamed into place, so an interrupted
run never leaves a half-written entry; a lock per entry makes a second process
that asks for the same key wait for the first and read its result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Generic, ParamSpec, TypeVar

from .errors import CacheError, EmbgeoInputError
from .progress import LOG

__all__ = [
    "array_digest",
    "atomic_path",
    "cache_dir",
    "cache_root",
    "clean_staging",
    "content_key",
    "folder_size",
    "notice",
    "package_dir",
    "sha256_file",
    "key_part",
    "Cached",
    "cached",
    "save_entry",
    "load_entry",
    "ENTRY_FORMAT",
]


#: Staging folders of writes that died without their process are removed after this many seconds
#: when their name does not say which process owns them (written by older versions).
STALE_SECONDS = 3600


_STAGING = re.compile(r"^\.(?P<target>.+?)\.(?:(?P<pid>\d+)\.)?(?P<rand>[a-z0-9_]{8})$")


def cache_root() -> Path:
    """The cache's root folder: ``EMBGEO_CACHE`` or ``~/.cache/embgeo`` (not created)."""
    return Path(os.environ.get("EMBGEO_CACHE") or Path.home() / ".cache" / "embgeo")


def notice(message: str) -> None:
    """One line for the reader, e.g. that a damaged cache entry is being rebuilt (every chapter).

    It goes to the ``embgeo`` logger (:data:`embgeo_utils.core.progress.LOG`); chapters show it as a line of output.
    """
    LOG.warning(message)


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
    """sha256 of an array's values, dtype and shape (numpy or torch), for content keys of cached results.

    Raises:
        EmbgeoInputError: for an array of Python objects, whose bytes are addresses, not values (pass ``x.astype(str)``).
    """
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.ascontiguousarray(x)
    if arr.dtype == object:
        raise EmbgeoInputError("array_digest cannot hash an array of Python objects; convert it (e.g. astype(str)).")
    digest = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(arr.data.cast("B"))
    return digest.hexdigest()


#: Version of the layout of a cache entry (the manifest and its files); part of every key.
ENTRY_FORMAT = 1

P = ParamSpec("P")
T = TypeVar("T")


def key_part(value: Any) -> Any:
    """JSON-able key material for ``value`` (every cached result).

    Numbers, strings, ``None`` and booleans stand for themselves; numpy arrays, torch tensors and
    DataFrames by the digest of their values (:func:`array_digest`); a torch device by its type; a
    ``torch.nn.Module`` by the digests of its state; lists, tuples, mappings and dataclasses element by
    element; any other object by its ``cache_key()`` method (models have one: name, weights' sha256 and
    dtype).

    Raises:
        EmbgeoInputError: for an object none of these describes (a cache key must never be guessed).
    """
    import numpy as np

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray) and value.dtype == object:
        return {"text array": array_digest(value.astype(str))}  # object arrays: by their values, never by addresses
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return {"array": array_digest(value)}
    if hasattr(value, "cache_key"):
        return key_part(value.cache_key())
    kind = type(value).__name__
    if kind == "device" and hasattr(value, "type"):
        return {"device": value.type}
    if kind == "DataFrame":
        return {"frame": [[str(c), key_part(value[c].to_numpy())] for c in value.columns]}
    if hasattr(value, "state_dict") and hasattr(value, "parameters"):
        return {"module": kind, "state": {k: array_digest(v) for k, v in value.state_dict().items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {kind: {f.name: key_part(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, Mapping):
        return {"map": sorted([json.dumps(key_part(k), sort_keys=True), key_part(v)] for k, v in value.items())}
    if isinstance(value, (list, tuple, range)):
        return [key_part(v) for v in value]
    raise EmbgeoInputError(
        f"Cannot build a cache key from a {type(value).__module__}.{kind}: give it a cache_key() method, or pass"
        " the values it stands for."
    )


def _save_frame(frame: Any, files: dict[str, Any]) -> dict[str, Any]:
    # one array per column: numbers bit for bit, text as fixed-width unicode; the index is not kept
    names = []
    for column in frame.columns:
        values = frame[column].to_numpy()
        names.append(_save_array(values.astype(str) if values.dtype == object else values, files))
    return {"t": "frame", "columns": [str(c) for c in frame.columns], "files": names}


def _save_array(array: Any, files: dict[str, Any]) -> str:
    name = f"a{len(files)}.npy"
    files[name] = array
    return name


def _encode(value: Any, files: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    if value is None or isinstance(value, (bool, int, float, str)):
        return {"t": "json", "v": value}
    if isinstance(value, np.generic):
        return {"t": "json", "v": value.item()}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise EmbgeoInputError("An object array cannot be cached without pickling; convert it to numbers or text.")
        return {"t": "array", "f": _save_array(value, files)}
    if hasattr(value, "detach"):
        array = value.detach().cpu().numpy()
        return {"t": "tensor", "f": _save_array(array, files)}
    if type(value).__name__ == "DataFrame":
        return _save_frame(value, files)
    if isinstance(value, Mapping):
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int, tuple)):
                raise EmbgeoInputError(f"Cached mappings take str, int or tuple keys, got {type(k).__name__}.")
            items.append([list(k) if isinstance(k, tuple) else k, isinstance(k, tuple), _encode(v, files)])
        return {"t": "dict", "items": items}
    if isinstance(value, (list, tuple)):
        return {"t": type(value).__name__, "items": [_encode(v, files) for v in value]}
    raise EmbgeoInputError(
        f"A {type(value).__name__} cannot be cached: return arrays, tensors, DataFrames, numbers, text, or lists and"
        " dicts of them."
    )


def _decode(node: dict[str, Any], arrays: dict[str, Any]) -> Any:
    kind = node["t"]
    if kind == "json":
        return node["v"]
    if kind == "array":
        return arrays[node["f"]]
    if kind == "tensor":
        import torch

        return torch.from_numpy(arrays[node["f"]])
    if kind == "frame":
        import pandas as pd

        return pd.DataFrame({c: arrays[f] for c, f in zip(node["columns"], node["files"], strict=True)})
    if kind == "dict":
        return {(tuple(k) if is_tuple else k): _decode(v, arrays) for k, is_tuple, v in node["items"]}
    if kind in ("list", "tuple"):
        items = [_decode(v, arrays) for v in node["items"]]
        return items if kind == "list" else tuple(items)
    raise CacheError(f"unknown node type {kind!r}")


def save_entry(folder: str | Path, value: Any, meta: Mapping[str, Any] | None = None) -> None:
    """Write ``value`` as a cache entry (a folder) atomically: one ``.npy`` per array and a manifest (every chapter).

    ``value`` may be an array, a tensor, a DataFrame, a JSON scalar, or lists, tuples and dicts of them.
    The manifest holds the sha256 of every file, checked by :func:`load_entry`.
    """
    import numpy as np

    files: dict[str, Any] = {}
    tree = _encode(value, files)
    with atomic_path(folder) as staged:
        staged.mkdir(parents=True)
        sums = {}
        for name, array in files.items():
            with open(staged / name, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
            sums[name] = sha256_file(staged / name)
        manifest = {"format": ENTRY_FORMAT, "tree": tree, "sha256": sums, "meta": dict(meta or {})}
        (staged / "entry.json").write_text(json.dumps(manifest, default=str))


def load_entry(folder: str | Path) -> Any:
    """The value :func:`save_entry` wrote (every chapter).

    Raises:
        CacheError: the entry is missing a file, a file does not match its sha256, or it cannot be read.
    """
    import numpy as np

    folder = Path(folder)
    try:
        manifest = json.loads((folder / "entry.json").read_text())
        arrays = {}
        for name, digest in manifest["sha256"].items():
            if sha256_file(folder / name) != digest:
                raise CacheError(f"{folder / name} does not match its checksum")
            arrays[name] = np.load(folder / name, allow_pickle=False)
        return _decode(manifest["tree"], arrays)
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        raise CacheError(f"{folder} is unreadable ({type(exc).__name__}: {exc})") from exc


@contextlib.contextmanager
def _entry_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock for one entry while it is read or computed (other processes wait)."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): atomic renames still keep entries whole
        yield
        return
    locks = folder.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{folder.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Cached(Generic[P, T]):
    """A function whose results are cached on disk under a key of its arguments (see :func:`cached`)."""

    def __init__(self, fn: Callable[P, T], kind: str, version: int, ignore: tuple[str, ...]) -> None:
        self.fn = fn
        self.kind = kind
        self.version = version
        self.ignore = ignore
        self.signature = inspect.signature(fn)
        unknown = [name for name in ignore if name not in self.signature.parameters]
        if unknown:
            raise EmbgeoInputError(f"{fn.__qualname__} has no arguments {unknown} to leave out of its cache key.")
        functools.update_wrapper(self, fn)

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The entry's name: a hash of the kind, the version, the entry format and every argument not ignored."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        parts = {name: key_part(value) for name, value in bound.arguments.items() if name not in self.ignore}
        return content_key(self.kind, self.version, ENTRY_FORMAT, parts)

    def path(self, *args: P.args, **kwargs: P.kwargs) -> Path:
        """The entry's folder under ``cache_dir(kind)``."""
        return cache_dir(self.kind) / self.key(*args, **kwargs)

    def compute(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the function without reading or writing the cache."""
        return self.fn(*args, **kwargs)

    def peek(self, *args: P.args, **kwargs: P.kwargs) -> T | None:
        """The cached result for these arguments, or ``None`` when there is none (a damaged entry is removed)."""
        return self._read(self.path(*args, **kwargs))

    def put(self, value: T, *args: P.args, **kwargs: P.kwargs) -> T:
        """Store ``value`` as the result for these arguments (computed elsewhere, e.g. in a batch); returns it as read back."""
        folder = self.path(*args, **kwargs)
        save_entry(folder, value, {"kind": self.kind, "version": self.version, "function": self.fn.__qualname__})
        return load_entry(folder)

    def _read(self, folder: Path) -> Any:
        if not (folder / "entry.json").exists():
            if folder.exists():
                notice(f"cached {self.kind} entry {folder.name} is incomplete; recomputing it")
                _remove(folder)
            return None
        try:
            return load_entry(folder)
        except CacheError as exc:
            notice(f"cached {self.kind} entry is damaged ({exc}); recomputing it")
            _remove(folder)
            return None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        folder = self.path(*args, **kwargs)
        clean_staging(folder.parent)
        with _entry_lock(folder):
            value = self._read(folder)
            if value is not None:
                return value
            value = self.fn(*args, **kwargs)
            return self.put(value, *args, **kwargs)


def cached(kind: str, version: int, ignore: tuple[str, ...] = ()) -> Callable[[Callable[P, T]], Cached[P, T]]:
    """Decorator: cache a function's results on disk, keyed by its arguments (every chapter).

    The key holds ``kind``, ``version`` (bump it when the computation changes), the entry format and every
    argument except those named in ``ignore`` (arguments that cannot change the result, such as ``progress``),
    each turned into key material by :func:`key_part`. The result must be made of arrays, tensors, DataFrames,
    JSON scalars, lists, tuples and dicts; it is returned as read back from the entry, so a first run and a
    rerun see the same values. ``f.compute(...)`` bypasses the cache; ``f.peek(...)`` and ``f.put(value, ...)``
    let a caller look entries up one by one and compute the misses in a batch.

    Example::

        @cached("similarity", version=1, ignore=("progress",))
        def pair_statistics(x: np.ndarray, y: np.ndarray, n_permutations: int, seed: int, device: torch.device,
                            progress: bool = False) -> pd.DataFrame: ...
    """
    if not kind or "/" in kind or kind.startswith("."):
        raise EmbgeoInputError(f"A cache kind is a plain folder name, got {kind!r}.")

    def wrap(fn: Callable[P, T]) -> Cached[P, T]:
        return Cached(fn, kind, version, ignore)

    return wrap
