"""Data-parallel SAE training (chapter 5): two gloo processes under torchrun give the single-process SAE."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.lm import distributed, torchrun
from embgeo_utils.lm import sae as S

ROOT = Path(__file__).resolve().parents[2]
HYPER = {"epochs": 3, "batch_size": 125, "lr": 1e-2, "dead_tokens": 300, "seed": 3}
N_LATENTS, K = 96, 3


def _sparse_data(n=1500, d=24, atoms=48, k=3, seed=0):
    """Rows that are positive combinations of k atoms of a unit-norm dictionary, plus a little noise."""
    g = np.random.default_rng(seed)
    dictionary = g.normal(size=(atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    idx = np.stack([g.choice(atoms, k, replace=False) for _ in range(n)])
    coef = g.uniform(0.5, 1.5, size=(n, k))
    x = np.einsum("nk,nkd->nd", coef, dictionary[idx]) + 0.01 * g.normal(size=(n, d))
    return (x + 2.0).astype(np.float32)  # an offset, so that the mean and b_pre matter


def _torchrun(acts: Path, out: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    args = ["train-sae", "--acts", str(acts), "--out", str(out), "--n-latents", str(N_LATENTS), "--k", str(K)]
    return _launch(args + [f"--{name.replace('_', '-')}={value}" for name, value in HYPER.items()], nproc)


def _launch(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
    cmd += ["-m", "embgeo_utils.lm.torchrun", *args, "--backend", "gloo", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    x = _sparse_data()
    np.save(folder / "acts.npy", x)
    done = _torchrun(folder / "acts.npy", folder / "sae")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parallel, parallel_history = S.load_sae(folder / "sae")
    single, single_history = S.train_sae(x, N_LATENTS, K, device="cpu", progress=False, **HYPER)
    return x, parallel, parallel_history, single, single_history


def _max_relative(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[n] - sb[n]).abs().max() / sb[n].abs().max().clamp_min(1e-12)) for n in sb)


def test_two_processes_train_the_single_process_sae(runs):
    x, parallel, parallel_history, single, single_history = runs
    assert single_history.aux[-1] > 0, "the AuxK loss must be exercised (some latents dead)"
    assert _max_relative(parallel, single) < 1e-5  # measured 3e-7: float sums in another order
    assert np.allclose(parallel_history.fvu, single_history.fvu, rtol=1e-4)
    assert np.allclose(parallel_history.aux, single_history.aux, rtol=1e-3)
    assert parallel_history.dead_fraction == single_history.dead_fraction
    assert parallel_history.tokens == single_history.tokens == len(x)


def test_the_tolerance_separates_a_different_training_run(runs):
    """Halving the batch (what a rank would do alone, without the all-reduce) is far outside the tolerance."""
    x, parallel, _, _, _ = runs
    alone, _ = S.train_sae(x, N_LATENTS, K, device="cpu", progress=False, **{**HYPER, "batch_size": 63})
    assert _max_relative(parallel, alone) > 1e-2


def test_without_a_process_group_nothing_is_distributed(monkeypatch):
    assert distributed.rank_and_world() == (0, 1) and distributed.is_main()
    with pytest.raises(EmbgeoInputError, match="torchrun"):
        S.train_sae(_sparse_data(n=200), 16, 2, epochs=1, device="cpu", progress=False, distributed=True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(EmbgeoInputError, match="torchrun"):
        distributed.init_from_env()


@pytest.mark.slow
def test_sharded_extraction_and_training_on_real_hidden_states(tmp_path, monkeypatch):
    """Two ranks extract SmolLM2 hidden states of real passages (half each), gather them and train: the one-process SAE."""
    args = ["extract-train", "--model", "smollm2-135m", "--layer", "6", "--n-passages", "6", "--passage-tokens", "48"]
    args += ["--n-latents", "256", "--k", "8", "--epochs", "2", "--batch-size", "64"]
    done = _launch([*args, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert torchrun.main([*args, "--out", str(tmp_path / "one"), "--quiet"]) == 0
    (two, two_history), (one, one_history) = S.load_sae(tmp_path / "two"), S.load_sae(tmp_path / "one")
    assert two_history.tokens == one_history.tokens == 6 * 47
    assert _max_relative(two, one) < 1e-4  # measured 3e-5 (float sums in another order)
