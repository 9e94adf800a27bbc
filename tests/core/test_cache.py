from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from embgeo_utils.core.cache import (
    array_digest,
    atomic_path,
    cached,
    content_key,
    key_part,
    sha256_file,
)
from embgeo_utils.core.device import get_device
from embgeo_utils.core.errors import EmbgeoInputError

ROOT = Path(__file__).resolve().parents[2]


def test_auto_device_follows_cuda_and_env(monkeypatch):
    monkeypatch.delenv("EMBGEO_DEVICE", raising=False)
    assert get_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("EMBGEO_DEVICE", "cpu")
    assert get_device("auto") == torch.device("cpu")
    assert get_device(None) == torch.device("cpu")


def test_bad_device_names_are_explained():
    with pytest.raises(ValueError, match="Unknown device"):
        get_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            get_device("cuda")


def test_content_key_is_deterministic_and_sensitive():
    assert content_key("a", 1, b"\x00\x01") == content_key("a", 1, b"\x00\x01")
    assert content_key("a", 1) != content_key("a", 2)
    assert content_key({"x": 1, "y": 2}) == content_key({"y": 2, "x": 1})


def test_atomic_path_writes_whole_files_or_nothing(tmp_path):
    target = tmp_path / "entry.bin"
    with atomic_path(target) as staged:
        staged.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as staged:
            staged.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"]


def test_atomic_path_replaces_folders(tmp_path):
    target = tmp_path / "folder"
    for content in (b"one", b"two"):
        with atomic_path(target) as staged:
            staged.mkdir()
            (staged / "f").write_bytes(content)
    assert (target / "f").read_bytes() == b"two"


def test_sha256_of_known_bytes(tmp_path):
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@cached("test_values", version=1, ignore=("progress",))
def _summary(x: np.ndarray, scale: float, device: torch.device, progress: bool = False) -> dict:
    """A cached function of an array, a number and a device (every kind of value an entry holds)."""
    frame = pd.DataFrame({"i": np.arange(3, dtype=np.int64), "alpha": [0.1, 1 / 3, 2.0], "name": ["a", "b", "c"]})
    return {"sum": float(x.sum() * scale), "rows": x * scale, "frame": frame, "tensor": torch.ones(2),
            "pairs": [(1, "one"), (2, "two")], ("a", 1): None}  # fmt: skip


def test_cached_results_round_trip_exactly_and_are_keyed_by_every_argument(tmp_cache):
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    first = _summary(x, 1 / 3, torch.device("cpu"))
    assert first["sum"] == float(x.sum() * (1 / 3)) and np.array_equal(first["rows"], x * (1 / 3))
    assert first["frame"]["alpha"].iloc[1] == 1 / 3 and list(first["frame"]["name"]) == ["a", "b", "c"]
    assert torch.equal(first["tensor"], torch.ones(2)) and first["pairs"] == [(1, "one"), (2, "two")]
    assert first[("a", 1)] is None
    key = _summary.key(x, 1 / 3, torch.device("cpu"))
    assert key == _summary.key(x.copy(), 1 / 3, torch.device("cpu"), progress=True)  # ignored argument
    assert key != _summary.key(x + 1e-12, 1 / 3, torch.device("cpu"))  # any change of values
    assert key != _summary.key(x, 1 / 3 + 1e-15, torch.device("cpu"))
    assert key != _summary.key(x, 1 / 3, torch.device("meta"))  # the device type
    assert _summary.peek(x, 1 / 3, torch.device("cpu")) is not None
    assert _summary.peek(x, 0.5, torch.device("cpu")) is None
    assert len([p for p in (tmp_cache / "test_values").iterdir() if not p.name.startswith(".")]) == 1


def test_keys_of_text_are_made_from_the_text_not_from_addresses():
    """Two equal frames with a text column (pandas' str dtype) and two equal object arrays give one key each."""
    frames = [pd.DataFrame({"topic": ["science", "sport"], "x": [0.5, 1.5]}) for _ in range(2)]
    assert key_part(frames[0]) == key_part(frames[1])
    assert key_part(frames[0]) != key_part(frames[0].assign(topic=["science", "art"]))
    texts = [np.array(["a", None, "b"], dtype=object) for _ in range(2)]
    assert key_part(texts[0]) == key_part(texts[1])
    with pytest.raises(EmbgeoInputError, match="Python objects"):
        array_digest(texts[0])


def test_cache_keys_refuse_objects_they_cannot_describe():
    with pytest.raises(EmbgeoInputError, match="cache_key"):
        key_part(object())
    with pytest.raises(EmbgeoInputError, match="arguments"):
        cached("x", 1, ignore=("nothing",))(lambda a: a)


@pytest.mark.parametrize("damage", ["truncate", "delete manifest", "garble"])
def test_a_damaged_entry_is_recomputed_with_a_notice(tmp_cache, caplog, damage):
    calls = []

    @cached("test_damage", version=1)
    def double(x: np.ndarray) -> np.ndarray:
        calls.append(1)
        return 2 * x

    x = np.arange(1000.0)
    double(x)
    folder = double.path(x)
    if damage == "truncate":
        (folder / "a0.npy").write_bytes((folder / "a0.npy").read_bytes()[:200])
    elif damage == "delete manifest":
        (folder / "entry.json").unlink()
    else:
        data = bytearray((folder / "a0.npy").read_bytes())
        data[500] ^= 0xFF
        (folder / "a0.npy").write_bytes(bytes(data))
    assert np.array_equal(double(x), 2 * x) and len(calls) == 2
    assert "recomputing it" in caplog.text
    assert np.array_equal(double(x), 2 * x) and len(calls) == 2  # whole again: read


def test_an_interrupted_computation_leaves_no_entry(tmp_cache):
    @cached("test_interrupt", version=1)
    def fails(x: int) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fails(1)
    assert not fails.path(1).exists()


_TWO_PROCESSES = r"""
import sys, time
from pathlib import Path
import numpy as np
from embgeo_utils.core.cache import cached

@cached("test_race", version=1)
def slow(n: int) -> np.ndarray:
    with open(sys.argv[1], "a") as log:
        log.write("computed\n")
    time.sleep(1.5)
    return np.arange(n)

print(int(slow(5).sum()), flush=True)
"""


def test_two_processes_asking_for_one_key_compute_it_once(tmp_cache, tmp_path):
    log = tmp_path / "computations.log"
    env = {**os.environ, "EMBGEO_CACHE": str(tmp_cache), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(log)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["10", "10"]
    assert log.read_text().splitlines() == ["computed"]  # the second process waited and read the entry
