"""Tests for embgeo_utils.chapters.ch04_layerwise_geometry (chapter 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry import intrinsic_dim as idm
from embgeo_utils.geometry.neighbors import neighborhood_overlap
from embgeo_utils.geometry.token_clouds import layer_observables


def _hidden(prompts: int = 2, layers: int = 4, tokens: int = 200, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Layers that drift from a shared low-dimensional signal, with a few duplicated tokens."""
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((prompts, 1, tokens, 5)) @ rng.standard_normal((5, dim))
    hidden = signal + np.linspace(0.1, 0.6, layers)[None, :, None, None] * rng.standard_normal(
        (prompts, layers, tokens, dim)
    )
    hidden = hidden.astype(np.float32)
    if layers > 1:
        hidden[0, 1, 3] = hidden[0, 1, 8]
        hidden[0, 1, 12] = hidden[0, 1, 8]
    if prompts > 1 and layers > 2:
        hidden[1, 2, 0] = hidden[1, 2, 1]
    return hidden


def _off_diagonal_cosines(X: np.ndarray) -> np.ndarray:
    X = X.astype(np.float64)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    cos = unit @ unit.T
    return cos[~np.eye(len(X), dtype=bool)]


def test_layer_observables_equals_per_cloud_loop(device) -> None:
    hidden = _hidden()
    scales = [2, 4, 8, 16, 32]
    out = layer_observables(hidden, scales=scales, overlap_k=(1, 2, 4), device=device, chunk_size=3)
    n_prompts, n_layers = hidden.shape[:2]
    assert out.gride.shape == (n_prompts, n_layers, len(scales))
    assert out.twonn.shape == out.cos_mean.shape == out.cos_std.shape == (n_prompts, n_layers)
    assert set(out.overlap) == {1, 2, 4}
    for p in range(n_prompts):
        for layer in range(n_layers):
            cloud = hidden[p, layer]
            s, ids, errs = idm.gride_scaling(cloud, max_scale=32, device=device)
            np.testing.assert_array_equal(out.scales, s)
            np.testing.assert_allclose(out.gride[p, layer], ids, rtol=1e-9)
            np.testing.assert_allclose(out.gride_err[p, layer], errs, rtol=1e-6)
            assert out.twonn[p, layer] == pytest.approx(idm.twonn(cloud, device=device), rel=1e-9)
            cos = _off_diagonal_cosines(cloud)
            assert out.cos_mean[p, layer] == pytest.approx(cos.mean(), rel=1e-9, abs=1e-12)
            assert out.cos_std[p, layer] == pytest.approx(cos.std(), rel=1e-7)
            if layer + 1 < n_layers:
                has_ties = len(np.unique(hidden[p, layer : layer + 2].reshape(-1, hidden.shape[-1]), axis=0)) < 2 * len(
                    cloud
                )
                for k in (1, 2, 4):
                    expected = neighborhood_overlap(cloud, hidden[p, layer + 1], k, device=device)
                    # Duplicated tokens are tied neighbours, listed in either order.
                    tolerance = 3 / len(cloud) if has_ties else 1e-12
                    assert out.overlap[k][p, layer] == pytest.approx(expected, abs=tolerance)


def test_float32_and_torch_input_agree(device) -> None:
    hidden = _hidden(prompts=1, layers=3, tokens=150, seed=1)
    ref = layer_observables(hidden, scales=[2, 4, 8], device=device)
    fast = layer_observables(torch.as_tensor(hidden), scales=[2, 4, 8], device=device, dtype=torch.float32)
    np.testing.assert_allclose(fast.gride, ref.gride, rtol=1e-3)
    np.testing.assert_allclose(fast.twonn, ref.twonn, rtol=1e-3)
    np.testing.assert_allclose(fast.cos_mean, ref.cos_mean, atol=1e-5)


def test_default_scales_are_capped(device) -> None:
    out = layer_observables(_hidden(prompts=1, layers=2, tokens=100), overlap_k=(1,), device=device)
    np.testing.assert_array_equal(out.scales, [2, 4, 8, 16, 32, 64])
    assert out.overlap[1].shape == (1, 1)
    assert np.isfinite(out.gride).all() and np.isfinite(out.twonn).all()


def test_errors(device) -> None:
    hidden = _hidden(prompts=1, layers=2, tokens=40)
    with pytest.raises(EmbgeoInputError, match="4-D"):
        layer_observables(hidden[0], device=device)
    bad = hidden.copy()
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(EmbgeoInputError, match="NaN"):
        layer_observables(bad, scales=[2], device=device)
    with pytest.raises(EmbgeoInputError, match="even integers"):
        layer_observables(hidden, scales=[2, 5], device=device)
    with pytest.raises(EmbgeoInputError, match="overlap_k"):
        layer_observables(hidden, scales=[2], overlap_k=(0,), device=device)
    with pytest.raises(EmbgeoInputError, match="distinct points"):
        layer_observables(hidden, scales=[64], device=device)
    zero = hidden.copy()
    zero[0, 0, 5] = 0.0
    with pytest.raises(EmbgeoInputError, match="zero vectors"):
        layer_observables(zero, scales=[2], device=device)


def test_float32_path_is_exact_and_chunking_does_not_matter(device) -> None:
    """dtype=float32 ranks in float32 but reads every decisive distance exactly: it equals the float64 path."""
    hidden = _hidden(prompts=2, layers=3, tokens=120, dim=24, seed=2)
    hidden[1, 0] += 40.0  # a large shared offset (anisotropy)
    hidden[0, 2, 7] *= 60.0  # a token of huge norm
    scales = [2, 4, 8, 16, 32]
    ref = layer_observables(hidden, scales=scales, device=device)
    one = layer_observables(hidden, scales=scales, device=device, dtype=torch.float32, chunk_size=1)
    many = layer_observables(hidden, scales=scales, device=device, dtype=torch.float32)
    for out in (one, many):
        np.testing.assert_allclose(out.gride, ref.gride, rtol=1e-10)
        np.testing.assert_allclose(out.twonn, ref.twonn, rtol=1e-10)
        np.testing.assert_allclose(out.cos_mean, ref.cos_mean, rtol=1e-10)
        np.testing.assert_allclose(out.cos_std, ref.cos_std, rtol=1e-6)
    for k in (1, 2, 4):
        np.testing.assert_array_equal(one.overlap[k], many.overlap[k])
    np.testing.assert_array_equal(one.gride, many.gride)


def test_float32_path_overlap_breaks_ties_by_index(device) -> None:
    """Duplicated tokens are tied neighbours: the overlap uses the exact order, ties broken by the lower index."""
    hidden = _hidden(prompts=1, layers=3, tokens=80, dim=16, seed=4)
    hidden[0, :, 30] = hidden[0, :, 31]  # the same duplicate pair in every layer
    out = layer_observables(hidden, scales=[2, 4], overlap_k=(1, 2), device=device, dtype=torch.float32)
    for k in (1, 2):
        for layer in range(2):
            expected = []
            for cloud in (hidden[0, layer], hidden[0, layer + 1]):
                X = cloud.astype(np.float64)
                e = ((X[:, None] - X[None]) ** 2).sum(-1)
                np.fill_diagonal(e, np.inf)
                expected.append(np.lexsort((np.broadcast_to(np.arange(len(X)), e.shape), e), axis=1)[:, :k])
            shared = [len(set(a) & set(b)) for a, b in zip(*expected)]
            assert out.overlap[k][0, layer] == pytest.approx(np.mean(shared) / k, abs=1e-12)
