"""Tests for embgeo_utils.geometry.lle (chapter 2)."""

from __future__ import annotations

import numpy as np

from embgeo_utils.chapters import ch02_lle as ch02
from embgeo_utils.chapters.ch02_lle import CONDITIONS, compare_pairs
from embgeo_utils.lm.vocab import SharedVocabulary


def _swiss_pair(noise: float, n: int = 300) -> dict[str, np.ndarray]:
    """A curved cloud in A and a rotated copy in B with isotropic noise of the given size."""
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 3 * np.pi, n)
    h = rng.uniform(-1, 1, n)
    X = np.c_[t * np.cos(t), h * 5, t * np.sin(t)] @ rng.normal(size=(3, 8)) + 0.05 * rng.normal(size=(n, 8))
    Y = X @ np.linalg.qr(rng.normal(size=(8, 8)))[0] + noise * np.random.default_rng(1).normal(size=(n, 8))
    return {"a": X, "b": Y}


def _shared(n: int = 300):

    ids = np.arange(n)
    return {("a", "b"): SharedVocabulary(ids, ids, tuple(map(str, ids)), True, "byte-bpe", "byte-bpe")}


def test_chapter2_figures(device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, errors = compare_pairs(_swiss_pair(1.0, 80), _shared(80), n_tokens=80, k=5, device=device)
    ch02.plot_lle_errors(errors, 5, 80, order=CONDITIONS)
    ch02.plot_neighbour_overlap(summary, 5)
    plt.close("all")
