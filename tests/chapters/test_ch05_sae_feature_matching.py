"""Chapter 5: filters, one-to-one matching against the many-to-one artefact, claim 10's checks, the pipeline."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from embgeo_utils.chapters import ch05_sae_feature_matching as ch05
from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry import matching
from embgeo_utils.lm import corpus


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
    kept, counts = ch05.filter_pairs(pairs, za, zb, ids, non_concept, top=2)
    assert [c["pairs left"] for c in counts] == [4, 4, 3, 1, 1]
    assert list(kept.a) == [0] and list(kept.b) == [0]


def test_top_tokens_count_only_active_positions():
    ids = np.array([7, 8, 9, 10, 11, 12])
    z = np.zeros((6, 3))
    z[[1, 4], 0] = [2.0, 1.0]  # active twice
    z[:, 1] = [1, 2, 3, 4, 5, 6]  # active everywhere
    tops = ch05.top_tokens(z, ids, np.array([0, 1, 2]), top=3)
    assert tops[0].tolist() == [8, 11, -1]  # fewer tokens, never a silent position
    assert tops[1].tolist() == [12, 11, 10]
    assert tops[2].tolist() == [-1, -1, -1]  # a dead latent has none
    # two rare latents that share no active token must not pass the intersection filter through silent positions
    za, zb = np.zeros((6, 1)), np.zeros((6, 1))
    za[0, 0], zb[5, 0] = 1.0, 1.0
    pairs = matching.FeaturePairs(np.array([0]), np.array([0]), np.array([0.5]), "max")
    kept, counts = ch05.filter_pairs(pairs, za, zb, ids, np.zeros(20, dtype=bool), top=5)
    assert len(kept) == 0 and counts[3]["pairs left"] == 0
    # and the non-concept filter judges the latent's own tokens, not the silent positions' (token 12 is punctuation)
    mask = np.zeros(20, dtype=bool)
    mask[12] = True
    zb[5, 0], zb[0, 0] = 0.0, 1.0
    kept, counts = ch05.filter_pairs(pairs, za, zb, ids, mask, top=5)
    assert counts[2]["pairs left"] == 1 and len(kept) == 1


def _split_latents(planted: bool, seed: int = 0, n_tokens: int = 6000, n_a: int = 120):
    """Two SAEs' latents and decoders where B's latents split A's: each A latent has a heavy-tailed group of B
    latents that fire on subsets of its tokens. B's latents of one group resemble each other (group cosine about
    0.1). Unrelated: the groups' common directions are random; planted: a linear image of A's decoder rows."""
    g = np.random.default_rng(seed)
    za = np.zeros((n_tokens, n_a))
    for j in range(n_a):
        on = g.random(n_tokens) < 0.03
        za[on, j] = g.exponential(1.0, on.sum())
    sizes = np.minimum(1 + g.zipf(1.8, size=n_a), 20)
    parent = np.repeat(np.arange(n_a), sizes)
    zb = np.zeros((n_tokens, parent.size))
    for i, j in enumerate(parent):
        rows = np.flatnonzero(za[:, j])
        rows = rows[g.random(rows.size) < 0.6]
        zb[rows, i] = za[rows, j] * g.uniform(0.8, 1.2, rows.size)
    dec_a = g.normal(size=(n_a, 24))
    centres = dec_a @ g.normal(size=(24, 32)) if planted else g.normal(size=(n_a, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = g.normal(size=(parent.size, 32))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    share = 0.9 if planted else np.sqrt(0.1)
    dec_b = share * centres[parent] + np.sqrt(1 - share**2) * noise
    ids = g.integers(0, 5000, n_tokens)
    return za.astype(np.float32), zb.astype(np.float32), dec_a, dec_b, ids, np.zeros(5000, dtype=bool)


def _compare(planted: bool, device):
    za, zb, dec_a, dec_b, ids, mask = _split_latents(planted)
    row, curve, kept = ch05.compare_layer(
        za, zb, dec_a, dec_b, ids, mask, n_components=(5, 10), n_permutations=200, rsa_rows=1000, seed=0, device=device
    )
    return row, curve, kept


def test_unrelated_geometry_with_many_to_one_groups_is_not_significant(device):
    row, curve, kept = _compare(False, device)
    assert row["pairs (many-to-one)"] > 2 * row["distinct A"] and row["largest group"] >= 10  # heavy-tailed groups
    assert row["RSA p (many-to-one, B shuffled)"] < 0.01  # the artefact a shuffled-B null reports
    assert row["RSA p (many-to-one, groups kept)"] > 0.05
    assert row["RSA p"] > 0.05 and row["RSA p (Hungarian)"] > 0.05  # the one-to-one pairs see nothing
    assert len(kept) == row["pairs"] == len(set(kept.a)) and row["distinct A"] == row["pairs"]
    assert all("p" in c for c in curve)


def test_planted_shared_geometry_is_significant(device):
    row, curve, kept = _compare(True, device)
    assert row["RSA p"] == pytest.approx(1 / 201)
    assert row["RSA p (Hungarian)"] == pytest.approx(1 / 201)
    assert row["RSA p (many-to-one, groups kept)"] <= 0.01
    assert row["SVCCA p"] <= 0.01


def test_pair_layers_and_errors():
    assert ch05.pair_layers(24, 28, [0.25, 0.5, 1.0]) == [(6, 7), (12, 14), (24, 28)]
    assert ch05.pair_layers(24, 28, [0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95]) == [
        (2, 3), (5, 6), (8, 10), (12, 14), (16, 18), (19, 22), (23, 27)
    ]  # fmt: skip
    with pytest.raises(EmbgeoInputError):
        ch05.pair_layers(24, 28, [0.0])


def test_non_concept_tokens_on_a_real_tokenizer(smollm):
    mask = ch05.non_concept_tokens(smollm.tokenizer)
    tok = smollm.tokenizer
    for text in [",", ".", "\n", " ", ")"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert mask[ids].all(), text
    assert not mask[tok.encode(" house", add_special_tokens=False)].any()
    assert mask[tok.all_special_ids].all()


def _profile(excess, ceiling=0.5, p=1e-4, depths=(0.2, 0.5, 0.8), ceiling_b=None):
    ceiling_b = ceiling if ceiling_b is None else ceiling_b
    return pd.DataFrame(
        [
            {
                "depth": d,
                "layer A": i + 1,
                "layer B": i + 1,
                "pairs": 400,
                "RSA excess": e,
                "RSA p": p,
                "RSA null std": 0.004,
                "RSA se": 0.005,
                "SVCCA excess": e,
                "SVCCA p": p,
                "SVCCA null std": 0.01,
                "SVCCA se": 0.01,
                "ceiling RSA excess": (ceiling + ceiling_b) / 2,
                "ceiling SVCCA excess": ceiling,
                "ceiling RSA excess A": ceiling,
                "ceiling RSA p A": 1e-4,
                "ceiling RSA null std A": 0.004,
                "ceiling RSA excess B": ceiling_b,
                "ceiling RSA p B": 1e-4,
                "ceiling RSA null std B": 0.004,
                "geometric ceiling": float(np.sqrt(ceiling * ceiling_b)),
            }  # fmt: skip
            for i, (d, e) in enumerate(zip(depths, excess))
        ]
    )


def _peak(effect, se=0.005, seeds=3):
    c = {"effect": effect, "se": se, "seed se": se, "boot se": 0.0, "low": effect - 2 * se, "high": effect + 2 * se}
    return {"contrast": c, "seeds": seeds, "draws": 9, "best depth": 0.5, "depths": [0.2, 0.5, 0.8], "middle": [0.5],
            "edges": [0.2, 0.8]}  # fmt: skip


def _random(excess, depths=(0.2, 0.5, 0.8)):
    return pd.DataFrame({"depth": list(depths), "RSA excess": excess, "RSA null std": 0.004})


def test_check_claim10_planted_absent_partly_and_control():
    planted = ch05.check_claim10(_profile([0.2, 0.3, 0.15]), _peak(0.1), 2000)
    assert planted.verdict == "reproduced" and planted.n_hold == 7 and planted.n_claim_checks == 7
    assert all(c.min_effect == pytest.approx(0.05) for c in planted.checks if c.name.startswith("one-to-one"))
    assert sum(c.control for c in planted.checks) == 6  # each model's own ceiling at every depth
    absent = ch05.check_claim10(_profile([0.0, 0.001, -0.002], p=0.6), _peak(-0.05), 2000)
    assert absent.verdict == "not reproduced"
    partly = ch05.check_claim10(_profile([0.2, 0.25, 0.3]), _peak(-0.05), 2000)  # beats the null, peak at the edge
    assert partly.verdict == "partly reproduced" and not partly.holds[-1]
    blind = ch05.check_claim10(_profile([0.0, 0.0, 0.0], ceiling=0.01, p=0.6), _peak(-0.05), 2000)
    assert blind.verdict == "inconclusive (positive control failed)"
    # a near-zero ceiling gives no near-zero minimum: a tenth of the smallest ceiling the control accepts
    assert all(c.min_effect == pytest.approx(0.1 * ch05.CONTROL_MIN_RSA) for c in blind.checks if not c.control)
    # one model's own ceiling failing is enough: the control is per model
    one_blind = ch05.check_claim10(_profile([0.2, 0.3, 0.15], ceiling_b=0.02), _peak(0.1), 2000)
    assert one_blind.verdict == "inconclusive (positive control failed)"
    # the minimum follows the geometric mean of the two ceilings
    uneven = ch05.check_claim10(_profile([0.2, 0.3, 0.15], ceiling=0.8, ceiling_b=0.2), _peak(0.1), 2000)
    assert uneven.checks[0].min_effect == pytest.approx(0.1 * 0.4)
    with pytest.raises(EmbgeoInputError, match="permutations"):  # the Holm floor binds at 200 permutations
        ch05.check_claim10(_profile([0.2, 0.3, 0.15]), _peak(0.1), 200)


def test_check_claim10_against_the_randomly_initialised_model():
    real = _profile([0.2, 0.3, 0.15])
    above = ch05.check_claim10(real, _peak(0.1), 2000, random=_random([0.0, 0.01, 0.0]))
    assert above.verdict == "reproduced" and above.n_claim_checks == 10
    # a pipeline that reports as much against random weights as against the trained model has shown nothing
    same = ch05.check_claim10(real, _peak(0.1), 2000, random=_random([0.2, 0.3, 0.15]))
    names = [c.name for c in same.checks]
    random_status = [st for n, st in zip(names, same.status) if "randomly initialised" in n]
    assert random_status == ["absent"] * 3 and same.verdict == "partly reproduced"


def _layers_for_part_b(sims_by_seed, boot_noise=0.002, null=0.01):
    """Fabricated comparisons: per seed a similarity (RSA minus its null mean) at each depth, with bootstrap draws."""
    rng = np.random.default_rng(0)
    depths = [0.1, 0.35, 0.5, 0.65, 0.95]
    cross, boot, table = [], [], []
    for seed, sims in sims_by_seed.items():
        for i, (d, s) in enumerate(zip(depths, sims)):
            cross.append({"depth": d, "layer A": i + 1, "layer B": i + 2, "seed": seed, "RSA": s + null,
                          "RSA null mean": null, "pairs": 300})  # fmt: skip
            boot += [{"depth": d, "seed": seed, "replicate": r, "RSA": s + null + rng.normal(0, boot_noise)}
                     for r in range(3)]  # fmt: skip
            table += [{"model": "A", "layer": i + 1, "seed": seed, "fvu": 0.4 + 0.01 * i},
                      {"model": "B", "layer": i + 2, "seed": seed, "fvu": 0.5}]  # fmt: skip
    empty = pd.DataFrame()
    layers = ch05.LayerComparisons(pd.DataFrame(cross), empty, empty, pd.DataFrame(boot), {}, {})
    return layers, pd.DataFrame(table)


def test_part_b_contrast_is_fixed_and_uses_seeds_and_draws(monkeypatch):
    monkeypatch.setattr(ch05, "depth_profile", lambda layers, table, names: _depth_rows_for(layers))
    bump = [0.01, 0.03, 0.05, 0.03, 0.01]
    layers, table = _layers_for_part_b({0: bump, 1: [x + 0.002 for x in bump], 2: [x - 0.002 for x in bump]})
    pk = ch05.peak_statistic(layers, table, ("A", "B"))
    assert pk["middle"] == [0.35, 0.5, 0.65] and pk["edges"] == [0.1, 0.95] and pk["seeds"] == 3
    assert pk["per seed raw"] == pytest.approx([0.02667] * 3, abs=1e-4)  # mean(.03, .05, .03) - mean(.01, .01)
    assert pk["draws"] == 9 and len(pk["draws table"]) == 12 and pk["contrast"]["boot se"] > 0
    assert pk["best depth"] == 0.5
    flat = [0.03] * 5
    layers, table = _layers_for_part_b({0: flat, 1: flat, 2: flat})
    pk_flat = ch05.peak_statistic(layers, table, ("A", "B"))
    assert abs(pk_flat["contrast"]["effect"]) < 0.003
    with pytest.raises(EmbgeoInputError, match="between 1/3 and 2/3"):
        ch05.middle_and_edges([0.1, 0.2, 0.9])


def _depth_rows_for(layers):
    first = layers.cross.drop_duplicates("depth")
    return first[["depth", "layer A", "layer B"]].reset_index(drop=True)


def test_run_pair_holds_out_caches_and_measures_the_ceiling(smollm, gemma, tmp_cache, monkeypatch, chapter_params):
    texts = [p.text for p in corpus.load_passages(8, smollm.tokenizer, min_tokens=48, max_tokens=48, seed=0)]
    p = chapter_params(ch05, passage_tokens=48, heldout_fraction=0.25, expansion=1, k=4, epochs=1, batch_size=64,
                       lr=None, seeds=[0, 1], token_fractions=[0.5, 1.0], loss_passages=2, n_permutations=40,
                       n_components=[5], rsa_rows=100, n_boot=2, seed=0)  # fmt: skip
    first = ch05.run_pair(smollm, gemma, texts, [0.3, 0.7], p)
    held = int(first.tokens.heldout.sum())
    assert 0 < held < len(first.aligned) and not (first.tokens.train & first.tokens.heldout).any()
    assert len(first.cross) == 2 * 2 and len(first.layers.ceiling) == 2 * 2  # depths x seeds; depths x models x pairs
    assert set(first.layers.boot["replicate"]) == {0, 1}
    assert len(first.curve) == 2 * 2 and (first.curve.groupby("model")["train tokens"].diff().dropna() > 0).all()
    row = first.cross.iloc[0]
    assert row["distinct A"] <= row["pairs (many-to-one)"] and row["pairs"] == row["distinct A"]

    def no_compare(*args, **kwargs):
        raise AssertionError("the cached comparison should have been read")

    monkeypatch.setattr(ch05, "compare_pairs", no_compare)
    again = ch05.run_pair(smollm, gemma, texts, [0.3, 0.7], p)
    pd.testing.assert_frame_equal(first.cross, again.cross)
    pd.testing.assert_frame_equal(first.layers.ceiling, again.layers.ceiling)
    for key, kept in first.kept.items():
        np.testing.assert_array_equal(kept.a, again.kept[key].a)
    with pytest.raises(AssertionError, match="cached comparison"):  # another permutation count: another key
        ch05.run_pair(smollm, gemma, texts, [0.3, 0.7], replace(p, n_permutations=41))
    monkeypatch.undo()
    profile = ch05.depth_profile(first.layers, first.saes, first.names)
    assert list(profile["depth"]) == [0.3, 0.7] and "ceiling RSA excess" in profile
    own = profile[["ceiling RSA excess A", "ceiling RSA excess B"]].to_numpy()
    geometric = profile["RSA excess"] / np.sqrt(own[:, 0] * own[:, 1])
    both_positive = (own > 0).all(axis=1)
    assert np.allclose(profile["fraction of geometric ceiling"][both_positive], geometric[both_positive])
    with pytest.raises(EmbgeoInputError, match="at least 3 matched depths"):  # part (b) needs an interior depth
        ch05.peak_statistic(first.layers, first.saes, first.names)
    control = ch05.random_control(smollm, gemma, texts, [0.3, 0.7], p)
    assert "random init" in control.name and list(control.profile["depth"]) == [0.3, 0.7]
    assert (control.cross["seed"] == 0).all() and set(control.saes["model"]) == {smollm.info.name, control.name}
    # A's side is the same data and SAE as in the study: only B changed
    np.testing.assert_array_equal(control.saes[control.saes["model"] == smollm.info.name]["fvu"],
                                  first.saes[(first.saes["model"] == smollm.info.name) & (first.saes["seed"] == 0)]["fvu"])  # fmt: skip


def test_precision_agreement_compares_stored_activations_with_float32(smollm, gemma, tmp_cache, chapter_params):
    texts = [p.text for p in corpus.load_passages(4, smollm.tokenizer, min_tokens=24, max_tokens=24, seed=0)]
    p = chapter_params(ch05, passage_tokens=24, heldout_fraction=0.25)
    tokens = ch05.extract(smollm, smollm, texts, [0.5], p)
    table = ch05.precision_agreement(smollm, smollm, tokens, p, n_passages=2)
    assert len(table) == 2 and (table["tokens"] == 2 * 23).all()
    assert (table["compute dtype"] == "torch.float32").all()
    assert (table["relative squared error"] < 1e-4).all() and (table["mean cosine"] > 0.9999).all()  # float16 storage
    two = ch05.precision_agreement(smollm, gemma, ch05.extract(smollm, gemma, texts, [0.5], p), p, n_passages=2)
    assert two.empty and "mean cosine" in two  # two tokenizers: nothing to compare position by position


def test_the_notebooks_defaults_give_the_holm_floor_room():
    """At the chapter's default depths and permutations every tested check can pass (with the negative control)."""
    from pathlib import Path

    from embgeo_utils.book.parameters import notebook_parameters

    source = Path(__file__).resolve().parents[2] / "notebooks" / "05_sae_feature_matching.ipynb"
    defaults = {name: p.default for name, p in notebook_parameters(source).items()}
    depths = defaults["depths"]
    excess = [0.2] * len(depths)
    verdict = ch05.check_claim10(
        _profile(excess, depths=depths), _peak(0.1), defaults["n_permutations"], alpha=defaults["alpha"],
        random=_random([0.0] * len(depths), depths=depths),
    )  # fmt: skip
    assert verdict.n_claim_checks == 3 * len(depths) + 1
    assert verdict.verdict == "reproduced"
