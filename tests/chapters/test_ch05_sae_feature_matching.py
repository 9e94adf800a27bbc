"""Feature matching and decoder-geometry similarity (chapter 5) against numpy/scipy and planted structure."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from embgeo_utils.chapters import ch05_sae_feature_matching as ch05
from embgeo_utils.core.cache import load_entry
from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry import matching
from embgeo_utils.lm import corpus


def _grid(rsa_values, p_values, pairs=500):
    import pandas as pd

    rows = []
    for (la, lb), r, p in zip([(1, 1), (2, 2), (3, 3)], rsa_values, p_values):
        rows.append(
            {
                "layer A": la,
                "layer B": lb,
                "pairs": pairs,
                "RSA": r,
                "RSA null mean": 0.0,
                "RSA p": p,
                "SVCCA": 0.3 + r,
                "SVCCA null mean": 0.3,
                "SVCCA p": p,
                "SVCCA n": 20,
                "RSA null std": 0.002,
                "SVCCA null std": 0.002,
            }
        )
    return pd.DataFrame(rows)


def test_filter_pairs_counts_each_step():
    ids = np.array([10, 11, 12, 13, 1, 1, 14, 15])  # token 1 is punctuation
    za = np.zeros((8, 3))
    zb = np.zeros((8, 3))
    za[[0, 1], 0] = [2, 1]
    zb[[0, 2], 0] = [1, 2]  # shares token 10 with A latent 0: kept
    za[[4, 5], 1] = [3, 3]
    zb[[4, 5], 1] = [3, 3]  # top tokens are punctuation: dropped
    za[[2, 3], 2] = [1, 1]
    zb[[6, 7], 2] = [1, 1]  # top tokens do not intersect: dropped
    pairs = matching.FeaturePairs(
        np.array([0, 1, 2, 0]), np.array([0, 1, 2, 2]), np.array([0.5, 0.9, 0.05, 0.2]), "max"
    )
    non_concept = np.zeros(20, dtype=bool)
    non_concept[1] = True
    zb_dead = zb.copy()
    kept, counts = ch05.filter_pairs(pairs, za, zb_dead, ids, non_concept, top=2)
    assert [c["pairs left"] for c in counts] == [4, 4, 3, 1, 1]
    assert list(kept.a) == [0] and list(kept.b) == [0]


def test_pair_layers_and_errors():
    assert ch05.pair_layers(24, 28, [0.25, 0.5, 1.0]) == [(6, 7), (12, 14), (24, 28)]
    with pytest.raises(EmbgeoInputError):
        ch05.pair_layers(24, 28, [0.0])
    with pytest.raises(EmbgeoInputError, match="below the number"):
        matching.svcca(np.ones((5, 3)) + np.arange(5)[:, None], np.ones((5, 3)), n_components=5)


def test_non_concept_tokens_on_a_real_tokenizer(smollm):
    mask = ch05.non_concept_tokens(smollm.tokenizer)
    tok = smollm.tokenizer
    for text in [",", ".", "\n", " ", ")"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert mask[ids].all(), text
    assert not mask[tok.encode(" house", add_special_tokens=False)].any()
    assert mask[tok.all_special_ids].all()
    torch.manual_seed(0)


def test_check_claim10_planted_absent_and_partly():
    matched = [(1, 1), (2, 2), (3, 3)]
    depth = {1: 0.25, 2: 0.5, 3: 0.75}
    middle = np.full(50, 0.5)  # every subsample puts the maximum at the middle depth
    planted = ch05.check_claim10(_grid([0.05, 0.08, 0.04], [1e-3] * 3), matched, depth, depth, middle)
    assert planted.verdict == "reproduced" and planted.n_hold == 7
    edge = np.full(50, 0.75)
    absent = ch05.check_claim10(_grid([-0.02, -0.03, -0.02], [0.9, 0.95, 0.9]), matched, depth, depth, edge)
    assert absent.verdict == "not reproduced"
    # geometry beats the null everywhere, but the maximum sits at the deepest layer: partly
    partly = ch05.check_claim10(_grid([0.02, 0.03, 0.09], [1e-3] * 3), matched, depth, depth, edge)
    assert partly.verdict == "partly reproduced" and partly.holds[-1] is False


def _ceiling(rsa_excess, p=1e-3):
    return {"layer": 2, "pairs": 400, "RSA": rsa_excess, "RSA null mean": 0.0, "RSA null std": 0.002, "RSA p": p,
            "SVCCA": 0.3 + rsa_excess, "SVCCA null mean": 0.3, "SVCCA null std": 0.002, "SVCCA p": p, "SVCCA n": 20}  # fmt: skip


def test_check_claim10_minimums_come_from_the_seed_ceiling_which_is_the_positive_control():
    matched = [(1, 1), (2, 2), (3, 3)]
    depth = {1: 0.25, 2: 0.5, 3: 0.75}
    middle = np.full(50, 0.5)
    grid = _grid([0.05, 0.08, 0.04], [1e-3] * 3)
    # a ceiling of 0.1: minimum 0.025, every cross-model check clears it and the control holds
    ok = ch05.check_claim10(grid, matched, depth, depth, middle, ceiling=_ceiling(0.1), n_permutations=5000)
    assert ok.verdict == "reproduced" and ok.n_claim_checks == 7
    assert all(c.min_effect == pytest.approx(0.025) for c in ok.checks[:6])
    assert all(c.n_permutations == 5000 for c in ok.checks[:6])
    # a ceiling of 0.4: the same cross-model RSA (0.04-0.08) is no longer a quarter of it; with se 0.002 it is absent
    high = ch05.check_claim10(grid, matched, depth, depth, middle, ceiling=_ceiling(0.4))
    assert high.verdict == "partly reproduced" and high.status[:6].count("absent") == 6
    # the pipeline cannot tell two seeds of one model from chance: the claim is inconclusive whatever else holds
    failed = ch05.check_claim10(grid, matched, depth, depth, middle, ceiling=_ceiling(0.01, p=0.4))
    assert failed.verdict == "inconclusive (positive control failed)"


def test_best_depth_subsamples_finds_the_planted_layer_pair(device):
    g = np.random.default_rng(7)
    decoders, depth = {}, {}
    for key, noise, d in [((1, 1), 3.0, 0.25), ((2, 2), 0.3, 0.5), ((3, 3), 3.0, 0.75)]:
        x = g.normal(size=(120, 16))
        decoders[key] = (x, x @ g.normal(size=(16, 12)) + noise * g.normal(size=(120, 12)))
        depth[key] = d
    best = ch05.best_depth_subsamples(decoders, depth, n_subsamples=10, rsa_rows=None, seed=0, device=device)
    assert np.all(best == 0.5)


def test_run_pair_reads_its_layer_comparisons_from_the_cache(smollm, gemma, tmp_cache, monkeypatch, chapter_params):

    texts = [p.text for p in corpus.load_passages(6, smollm.tokenizer, min_tokens=48, max_tokens=48, seed=0)]
    p = chapter_params(ch05, passage_tokens=48, expansion=1, k=4, epochs=1, batch_size=64, lr=None, n_permutations=20,
                       n_components=[5], rsa_rows=100, seed=0)  # fmt: skip
    first = ch05.run_pair(smollm, gemma, texts, [0.5], p)
    entries = [e for e in (tmp_cache / "sae_compare").iterdir() if not e.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "entry.json").exists()  # one layer pair, one entry
    assert list(entries[0].glob("a*.npy"))  # the kept pairs' arrays
    stored = load_entry(entries[0])
    assert stored["row"]["pairs"] == first.grid["pairs"].iloc[0] == len(first.kept[first.matched[0]])

    def no_compare(*args, **kwargs):
        raise AssertionError("the cached comparison should have been read")

    monkeypatch.setattr(ch05, "compare_layer", no_compare)
    again = ch05.run_pair(smollm, gemma, texts, [0.5], p)
    pd.testing.assert_frame_equal(first.grid, again.grid)
    pd.testing.assert_frame_equal(first.curves, again.curves)
    for key, kept in first.kept.items():
        np.testing.assert_array_equal(kept.a, again.kept[key].a)
        np.testing.assert_array_equal(kept.corr, again.kept[key].corr)
    with pytest.raises(AssertionError, match="cached comparison"):  # another permutation count: another key
        ch05.run_pair(smollm, gemma, texts, [0.5], replace(p, n_permutations=21))
    monkeypatch.undo()

    ceiling = ch05.seed_ceiling(first, p)
    assert ceiling.layer == first.layers_a[0] and ceiling.model == smollm.info.name
    assert ceiling.record() == {"model": ceiling.model, "layer": ceiling.layer, **ceiling.statistics}
    assert ceiling.pairs == ceiling.statistics["pairs"]
    assert np.isnan(ceiling.rsa) == ("RSA" not in ceiling.statistics)
    assert (ceiling.svcca_n is None) == np.isnan(ceiling.svcca) == ("SVCCA" not in ceiling.statistics)
