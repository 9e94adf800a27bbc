from __future__ import annotations

import pytest
import torch

from embgeo_utils.core.cache import atomic_path, content_key, load_frame, save_frame, sha256_file
from embgeo_utils.core.device import get_device


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


def test_frames_round_trip_exactly_and_damage_is_recomputed(tmp_path, capsys):
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame(
        {
            "pair": ["a → b", "a → b", "c"],
            "text": ["", 'quote " and\nnewline', "ünïcode"],
            "alpha": [0.1, 1 / 3, np.nan],
            "ratio": [np.inf, 1e-300, -0.0],
            "prompt": np.array([0, 1, 2], dtype=np.int64),
            "ok": [True, False, True],
        }
    )
    path = tmp_path / "t.npz"
    assert load_frame(path) is None
    save_frame(frame, path)
    pd.testing.assert_frame_equal(load_frame(path), frame)
    assert load_frame(path)["alpha"].iloc[1] == 1 / 3  # bit for bit
    path.write_bytes(b"PK\x03\x04 cut short")
    assert load_frame(path) is None and not path.exists()
    assert "unreadable" in capsys.readouterr().out
