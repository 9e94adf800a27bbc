"""Tests for chapter 3 (embgeo_utils.chapters.ch03_intrinsic_dimension): per-token ID, coherence, claim 8."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from embgeo_utils.chapters import ch03_intrinsic_dimension as ch03
from embgeo_utils.chapters.ch03_intrinsic_dimension import COHERENCE_LABEL, LocalIDs
from embgeo_utils.core import stats
from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry import intrinsic_dim, lle, neighbors, similarity
from embgeo_utils.lm import labels, steering

SYMBOLS = "!#$%&*+-"


def token_string(kind: int, t: int) -> str:
    """A unique token string of a known kind: number, punctuation/code, other, whitespace."""
    if kind == 0:
        return f" {t}"
    if kind == 1:
        return "".join(SYMBOLS[int(c)] for c in np.base_repr(t + 8, 8))
    if kind == 2:
        return f"x{t}"
    return "".join(" \t\n"[int(c)] for c in np.base_repr(t + 3, 3))


def kind_encoder(strings):
    """A stand-in sentence encoder: the unit one-hot of each string's kind (``labels.token_labels``).

    Two strings are "similar" exactly when they are of the same kind, so a neighbourhood's semantic
    coherence is known in advance.
    """

    kinds = labels.token_labels(list(strings)).kind
    out = np.zeros((len(kinds), len(labels.KINDS)))
    out[np.arange(len(kinds)), [labels.KINDS.index(k) for k in kinds]] = 1.0
    return out


K = 10
CLUSTER = 20
DIMS = np.repeat(np.arange(1, 7), 5)  # 30 clusters of dimension 1..6: 600 tokens


def _strings(planted: bool, seed: int) -> list[str]:
    """Planted: clusters of dimension <= 3 hold one kind each, the others mix kinds token by token."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(len(DIMS) * CLUSTER):
        c = t // CLUSTER
        kind = (c if DIMS[c] <= 3 else t) % 4 if planted else int(rng.integers(0, 4))
        out.append(token_string(kind, t))
    return out


def _clustered(seed: int, width: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = []
    for dim in DIMS:
        basis = np.linalg.qr(rng.normal(size=(width, dim)))[0].T
        points = rng.normal(scale=50, size=width) + rng.normal(size=(CLUSTER, dim)) @ basis
        blocks.append(points + 1e-4 * rng.normal(size=(CLUSTER, width)))
    return np.concatenate(blocks).astype(np.float32)


def _model(table: np.ndarray, strings: list[str], seed: int) -> tuple[np.ndarray, dict[str, int]]:
    """The table with its rows shuffled (a different tokenizer's ids), and its {string: id} vocabulary."""
    perm = np.random.default_rng(seed).permutation(len(strings))  # token t gets id perm[t]
    shuffled = np.empty_like(table)
    shuffled[perm] = table
    return shuffled, {s: int(perm[t]) for t, s in enumerate(strings)}


def _chapter(tables, vocabularies, chapter_params, device):
    p = chapter_params(
        ch03, device=device, k=K, variance=0.9, id_tokens="all", n_common=200, seed=0, coherence_k=K,
        n_permutations=1000, semantic_encoder="kinds", semantic_tokens=200,
    )  # fmt: skip
    ids = ch03.per_token_ids(tables, vocabularies, p, verbose=False)
    tokens = ch03.token_frame(ids, strata=False)
    coh = ch03.semantic_coherence(ids, kind_encoder, p)
    corr = ch03.id_correlations(tokens, p)
    return ids, tokens, coh, corr


@pytest.fixture(scope="module")
def planted(device, chapter_params):
    strings = _strings(True, 0)
    a, va = _model(_clustered(1), strings, 11)
    b, vb = _model(_clustered(2), strings, 12)
    return _chapter({"A": a, "B": b}, {"A": va, "B": vb}, chapter_params, device)


def test_per_token_ids_on_planted_clusters(planted):
    ids, tokens, _, _ = planted
    a = ids["A"]
    assert len(a.rows) == 600 and a.width == 64 and a.n_table_rows == 600 and a.neighbors.shape == (600, K)
    assert np.median(a.local_id) <= 4 and np.median(a.random_id) >= 6
    # A token's ID is at most its cluster's dimension (90 % of the variance may need fewer) and follows it.
    token_of = {s: t for t, s in enumerate(_strings(True, 0))}
    dims = DIMS[[token_of[a.strings[int(r)]] // CLUSTER for r in a.rows]]
    assert np.all(a.local_id <= dims) and np.corrcoef(dims, a.local_id)[0, 1] > 0.9
    # The order sorts by ID (ties broken at random).
    assert np.all(np.diff(a.local_id[a.order]) >= 0)
    # The common sample is the same strings in both models, at different ids.
    assert len(a.common_rows) == 200
    common_a = [a.strings[int(r)] for r in a.common_rows]
    common_b = [ids["B"].strings[int(r)] for r in ids["B"].common_rows]
    assert common_a == common_b == sorted(common_a)
    assert set(tokens.columns) == {"model", "token", "text", "width", "local ID", "random ID", "common index"}
    assert (tokens["common index"] >= 0).sum() == 400


def test_local_ids_match_the_estimators(planted, device):
    ids = planted[0]
    a = ids["A"]
    table = _model(_clustered(1), _strings(True, 0), 11)[0]
    rows = a.rows[::50]
    np.testing.assert_array_equal(
        intrinsic_dim.local_pca_id(table, k=K, variance=0.9, device=device, rows=rows), a.local_id[::50]
    )
    hood = lle.random_neighbors(600, K, seed=0)[rows]
    np.testing.assert_array_equal(
        intrinsic_dim.local_pca_id(table, k=K, variance=0.9, device=device, rows=rows, indices=hood), a.random_id[::50]
    )


def test_id_summary(planted):
    summary = ch03.id_summary(planted[1])
    assert list(summary.index) == ["A", "B"]
    assert summary.loc["A", "width d"] == 64 and summary.loc["A", "tokens"] == 600
    assert summary.loc["A", "median ID"] < summary.loc["A", "median ID, random neighbourhoods"]
    assert summary.loc["A", "median ID / d"] == pytest.approx(summary.loc["A", "median ID"] / 64)


def test_claim8_planted_is_reproduced(planted):
    _, tokens, coh, corr = planted
    assert corr.loc[0, "Spearman"] > 0.8
    verdict = ch03.check_claim8(tokens, coh, corr, 1000, alpha=0.01)
    assert verdict.verdict == "reproduced", verdict.table()
    assert len(verdict.checks) == 5  # 2 models x (ID << d, coherence) + 1 pair


def test_claim8_absent_never_holds_and_a_short_sample_stays_inconclusive(device, chapter_params):
    rng = np.random.default_rng(5)
    strings = _strings(False, 1)
    a, va = _model(rng.normal(size=(600, 16)).astype(np.float32), strings, 11)
    b, vb = _model(rng.normal(size=(600, 16)).astype(np.float32), strings, 12)
    _, tokens, coh, corr = _chapter({"A": a, "B": b}, {"A": va, "B": vb}, chapter_params, device)
    verdict = ch03.check_claim8(tokens, coh, corr, 1000, alpha=0.01)
    # random clouds: no model's ID is far below its width (the data rule it out), but about 60 tokens per decile
    # and 200 common tokens cannot rule out a coherence gap of 0.02 or a rank correlation of 0.1: those parts,
    # and the claim, stay open rather than "not reproduced"
    assert verdict.status == ("absent", "absent", "inconclusive", "inconclusive", "inconclusive"), verdict.table()
    assert verdict.verdict == "inconclusive" and not any(verdict.holds)


def test_claim8_partly_when_coherence_is_absent(device, chapter_params):
    strings = _strings(False, 2)  # flat neighbourhoods and shared IDs, but labels at random
    a, va = _model(_clustered(1), strings, 11)
    b, vb = _model(_clustered(2), strings, 12)
    _, tokens, coh, corr = _chapter({"A": a, "B": b}, {"A": va, "B": vb}, chapter_params, device)
    verdict = ch03.check_claim8(tokens, coh, corr, 1000, alpha=0.01)
    assert verdict.verdict == "partly reproduced", verdict.table()
    assert verdict.status[:2] == ("holds", "holds") and verdict.status[4] == "holds"
    assert verdict.status[2] != "holds" and verdict.status[3] != "holds"


def test_claim8_rule_is_faithful_to_the_chapter():
    """One check per sub-test: median at most half the reference's (ID), gap > 0 (coherence), rho > 0 (pairs)."""
    tokens = pd.DataFrame(
        {"model": ["A"] * 40 + ["B"] * 40, "width": [64] * 40 + [40] * 40,
         "local ID": [3] * 40 + [5] * 40, "random ID": [9] * 40 + [9] * 40}
    )  # fmt: skip
    coh = pd.DataFrame(
        {"model": ["A", "B", "enc"], "independent": [True, True, False],
         "difference": [0.2, -0.1, 0.3], "p": [0.0001, 0.0001, 0.0001], "tokens per group": [4, 4, 2]}
    )  # fmt: skip
    corr = pd.DataFrame({"model A": ["A"], "model B": ["B"], "tokens": [40], "Spearman": [0.3], "p": [0.5]})
    verdict = ch03.check_claim8(tokens, coh, corr, 10_000, alpha=0.01, correction="none")
    # B's median 5 is more than half the random neighbourhoods' 9 (every B token has ID 5: absent); B's coherence
    # gap is negative; the correlation is not significant; the encoder judging its own neighbourhoods is the positive control.
    assert verdict.status == ("holds", "absent", "holds", "inconclusive", "holds", "inconclusive")
    assert [c.control for c in verdict.checks] == [False] * 4 + [True, False]
    assert verdict.checks[0].effect == pytest.approx(1 - 3 / 9) and verdict.checks[1].effect == pytest.approx(1 - 5 / 9)
    assert verdict.checks[2].n == 4 and verdict.checks[5].n == 40 and verdict.verdict == "partly reproduced"
    assert ch03.failing_checks(verdict) == [verdict.checks[i].name for i in (1, 3, 5)]
    assert all(c.min_effect > 0 and c.min_effect_source for c in verdict.checks)
    # a control that fails makes the claim inconclusive, whatever the other checks say
    blind = ch03.check_claim8(tokens, coh.assign(difference=[0.2, -0.1, 0.0]), corr, 10_000, correction="none")
    assert blind.verdict == "inconclusive (positive control failed)"
    # A single model: no pair, and the verdict still comes from the rule.
    single = ch03.check_claim8(tokens[tokens.model == "A"], coh[coh.model == "A"], corr.iloc[:0], 10_000)
    assert single.verdict == "reproduced" and len(single.checks) == 2
    assert isinstance(single, stats.Verdict)


def test_claim8_width_check_is_not_passed_by_structureless_neighbourhoods():
    """The local ID of 51 points cannot exceed 50, far below d/10 of a wide model: the check reads the reference."""
    rng = np.random.default_rng(0)
    tokens = pd.DataFrame(
        {"model": "wide", "width": 896, "local ID": rng.integers(36, 42, 5000), "random ID": rng.integers(38, 42, 5000)}
    )
    coh = pd.DataFrame(
        {"model": ["enc"], "independent": [False], "difference": [0.3], "p": [1e-4], "tokens per group": [50]}
    )
    verdict = ch03.check_claim8(
        tokens, coh, pd.DataFrame(columns=["model A", "model B", "tokens", "Spearman", "p"]), 1000
    )
    # median 39 of 896 is "below d/10 = 89.6", yet no better than random neighbourhoods: the check is absent
    assert verdict.status[0] == "absent" and verdict.verdict == "not reproduced"


def test_correlation_summary():
    corr = pd.DataFrame({"Spearman": [0.4, -0.02, 0.3, 0.05], "p": [0.001, 0.9, 0.001, 0.2]})
    summary = ch03.correlation_summary(corr)
    assert summary == ch03.CorrelationSummary(
        median=pytest.approx(0.175), min=-0.02, max=0.4, pairs=4, pairs_significant=2
    )
    assert ch03.correlation_summary(corr.iloc[:0]) == ch03.CorrelationSummary(None, None, None, 0, 0)


def test_drop_tokens(planted, chapter_params):
    ids = planted[0]
    a, b = ids["A"], ids["B"]
    gone_a = a.rows[::3]  # a third of A's tokens, including some of the common sample
    kept = ch03.drop_tokens(ids, {"A": gone_a})
    ka, kb = kept["A"], kept["B"]
    assert len(ka.rows) == len(a.rows) - len(gone_a) and not np.isin(gone_a, ka.rows).any()
    assert len(kb.rows) == len(b.rows)  # B keeps its evaluated tokens ...
    # ... but the common sample keeps only strings kept in both, in the same order in both.
    common_a = [ka.strings[int(r)] for r in ka.common_rows]
    assert common_a == [kb.strings[int(r)] for r in kb.common_rows] and 0 < len(common_a) < len(a.common_rows)
    # IDs and neighbours travel with their token; the order still sorts by ID.
    pos = np.searchsorted(a.rows, ka.rows)
    np.testing.assert_array_equal(ka.local_id, a.local_id[pos])
    np.testing.assert_array_equal(ka.neighbors, a.neighbors[pos])
    assert sorted(ka.order) == list(range(len(ka.rows))) and np.all(np.diff(ka.local_id[ka.order]) >= 0)
    frame = ch03.token_frame(kept, strata=False)
    assert (frame["common index"] >= 0).sum() == 2 * len(common_a)
    ch03.id_correlations(frame, chapter_params(ch03, n_permutations=10))  # the samples line up
    mask = np.zeros(a.n_table_rows, dtype=bool)
    mask[gone_a] = True
    assert np.array_equal(ch03.drop_tokens(ids, {"A": mask})["A"].rows, ka.rows)
    with pytest.raises(EmbgeoInputError, match="leaves no"):
        ch03.drop_tokens(ids, {"A": a.rows})


def test_check_claim8_errors():
    tokens = pd.DataFrame({"model": ["A"], "width": [8], "local ID": [1], "random ID": [2]})
    coh = pd.DataFrame(columns=["model", "independent", "difference", "p", "tokens per group"])
    corr = pd.DataFrame(columns=["model A", "model B", "tokens", "Spearman", "p"])
    with pytest.raises(EmbgeoInputError, match="random ID"):
        ch03.check_claim8(tokens.drop(columns="random ID"), coh, corr, 1000)
    with pytest.raises(EmbgeoInputError, match="independent"):
        ch03.check_claim8(tokens, coh.drop(columns="independent"), corr, 1000)
    with pytest.raises(EmbgeoInputError, match="empty"):
        ch03.check_claim8(tokens.iloc[:0], coh, corr, 1000)
    with pytest.raises(EmbgeoInputError, match="alpha"):
        ch03.check_claim8(tokens, coh, corr, 1000, alpha=2.0)


def _pair_frame(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    n = len(x)
    return pd.DataFrame(
        {"model": ["A"] * n + ["B"] * n, "local ID": np.concatenate([x, y]),
         "common index": np.concatenate([np.arange(n), np.arange(n)])}
    )  # fmt: skip


def test_id_correlations_match_the_chapter_1_permutation_test(chapter_params):
    rng = np.random.default_rng(3)
    x = rng.integers(1, 30, size=150).astype(float)
    y = x + rng.normal(scale=8, size=150)
    corr = ch03.id_correlations(_pair_frame(x, y), chapter_params(ch03, n_permutations=300, seed=4))

    def spearman(X, Y):
        from scipy.stats import spearmanr

        return spearmanr(np.asarray(X)[:, 0], np.asarray(Y)[:, 0]).statistic

    ref = similarity.permutation_test(spearman, x[:, None], y[:, None], n=300, seed=4, device="cpu")
    row = corr.iloc[0]
    assert row["Spearman"] == pytest.approx(ref.statistic, abs=1e-12)
    assert row["p"] == ref.p_value and row["null mean"] == pytest.approx(ref.null_mean, abs=1e-12)
    assert row["z"] == pytest.approx(ref.z, rel=1e-9) and row["tokens"] == 150


def test_id_correlations_planted_and_absent(chapter_params):
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    p200, p50, p10 = (chapter_params(ch03, n_permutations=n, seed=0) for n in (200, 50, 10))
    planted = ch03.id_correlations(_pair_frame(x, x + 0.3 * rng.normal(size=200)), p200)
    assert planted.loc[0, "Spearman"] > 0.9 and planted.loc[0, "p"] == pytest.approx(1 / 201)
    absent = ch03.id_correlations(_pair_frame(x, rng.normal(size=200)), p200)
    assert abs(absent.loc[0, "Spearman"]) < 0.2 and absent.loc[0, "p"] > 0.01
    # Rows in any order: pairing is by the common index.
    frame = _pair_frame(x, x).sample(frac=1.0, random_state=1)
    assert ch03.id_correlations(frame, p50).loc[0, "Spearman"] == pytest.approx(1.0)
    single = ch03.id_correlations(_pair_frame(x, x).query("model == 'A'"), p10)
    assert single.empty and "Spearman" in single.columns


def test_id_correlations_errors(chapter_params):
    x = np.arange(10.0)
    p10 = chapter_params(ch03, n_permutations=10)
    with pytest.raises(EmbgeoInputError, match="same ID"):
        ch03.id_correlations(_pair_frame(np.ones(10), x), p10)
    with pytest.raises(EmbgeoInputError, match="different sizes"):
        ch03.id_correlations(_pair_frame(x, x).iloc[:-1], p10)
    with pytest.raises(EmbgeoInputError, match="positive integer"):
        ch03.id_correlations(_pair_frame(x, x), chapter_params(ch03, n_permutations=0))
    with pytest.raises(EmbgeoInputError, match="common index"):
        ch03.id_correlations(_pair_frame(x, x).drop(columns="common index"), chapter_params(ch03))


def test_global_ids_on_a_known_dimension(device, chapter_params):
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(1500, 3)) @ rng.normal(size=(3, 20))
    found = ch03.global_ids({"flat": flat}, chapter_params(ch03, global_points=1000, seed=0, device=device))
    summary, curves = found.summary, found.curves
    assert summary.loc["flat", "points"] == 1000 and summary.loc["flat", "width d"] == 20
    assert summary.loc["flat", "TwoNN"] == pytest.approx(3, abs=0.4)
    assert summary.loc["flat", "GRIDE n2=2"] == pytest.approx(3, abs=0.4)
    assert list(curves.columns) == ["model", "n2", "ID", "error"] and curves["n2"].max() <= 1000 // 4
    pick = np.sort(np.random.default_rng(0).choice(1500, size=1000, replace=False))
    assert summary.loc["flat", "TwoNN"] == pytest.approx(intrinsic_dim.twonn(flat[pick], device=device))
    with pytest.raises(EmbgeoInputError, match="global_points"):
        ch03.global_ids({"flat": flat}, chapter_params(ch03, global_points=4))
    with pytest.raises(EmbgeoInputError, match="No embedding table"):
        ch03.global_ids({}, chapter_params(ch03))


def test_tokens_to_evaluate():
    assert ch03.tokens_to_evaluate(10**6, "all", "cpu") == "all"
    assert ch03.tokens_to_evaluate(10**6, 300, "cpu") == 300
    assert ch03.tokens_to_evaluate(40_000, "auto", "cpu") == "all"
    assert ch03.tokens_to_evaluate(60_000, "auto", "cpu", cpu_id_tokens=5000) == 5000
    for bad in ("some", 0, -3, True):
        with pytest.raises(EmbgeoInputError, match="id_tokens"):
            ch03.tokens_to_evaluate(10, bad, "cpu")


def test_per_token_ids_sample_and_errors(device, chapter_params):
    table = _clustered(1)
    vocabulary = {s: t for t, s in enumerate(_strings(True, 0))}
    p = chapter_params(ch03, k=K, id_tokens=50, n_common=20, seed=0, device=device)
    ids = ch03.per_token_ids({"A": table}, {"A": vocabulary}, p, verbose=False)
    a = ids["A"]
    assert 50 <= len(a.rows) <= 70 and set(a.common_rows) <= set(a.rows) and a.n_alignable == 600
    frame = a.frame(strata=True)
    assert "Zipf stratum" in frame and (frame["common index"] >= 0).sum() == 20
    with pytest.raises(EmbgeoInputError, match="No embedding table"):
        ch03.per_token_ids({}, {}, p)
    with pytest.raises(EmbgeoInputError, match="No vocabulary"):
        ch03.per_token_ids({"A": table}, {"B": vocabulary}, p)
    with pytest.raises(EmbgeoInputError, match="No model"):
        ch03.token_frame({})


def test_chapter3_figures(planted, device, chapter_params):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids, tokens, coh, corr = planted
    with_strata = ch03.token_frame(ids, strata=True)
    curves = ch03.global_ids({"A": _clustered(1)}, chapter_params(ch03, global_points=200, device=device)).curves
    surface = ch03.coherence_table(ids, chapter_params(ch03, coherence_k=K, n_permutations=50, seed=0))
    flagged = tokens.assign(**{"under-trained": tokens["local ID"] <= 1})
    figures = [
        ch03.plot_token_id_distributions(tokens, k=K, variance=0.9),
        ch03.plot_token_id_by_frequency(with_strata),
        ch03.plot_token_id_correlation_heatmap(corr),
        ch03.plot_neighbourhood_coherence_bars(surface, K),
        ch03.plot_semantic_coherence_bars(coh, K),
        ch03.plot_undertrained_id_histograms(flagged, K),
        ch03.plot_embedding_gride_curves(curves, 200),
    ]
    for fig in figures:
        ax = fig.axes[0]
        assert ax.get_title() and (ax.get_ylabel() or ax.get_xlabel() or fig.axes[-1].get_ylabel())
        plt.close(fig)
    assert ch03.plot_token_id_correlation_heatmap(corr.iloc[:0]) is None
    assert ch03.plot_semantic_coherence_bars(coh.iloc[:0], K) is None
    # Both halves of the violins are drawn: two violin bodies per model, the random half as wide as the other.
    fig = ch03.plot_token_id_distributions(tokens, k=K, variance=0.9)
    bodies = [c for c in fig.axes[0].collections if c.get_paths() and len(c.get_paths()[0].vertices) > 4]
    widths = [np.ptp(c.get_paths()[0].vertices[:, 0]) for c in bodies]
    assert len(bodies) == 4 and min(widths) > 0.3 * max(widths)
    assert all("\n" in t.get_text() for t in fig.axes[0].get_xticklabels())  # "name\n(d = ...)": no overlap
    plt.close(fig)
    with pytest.raises(EmbgeoInputError, match="Zipf stratum"):
        ch03.plot_token_id_by_frequency(tokens)


def test_per_token_ids_are_cached_by_content(tmp_cache, monkeypatch, chapter_params):

    rng = np.random.default_rng(0)
    table = rng.normal(size=(300, 16)).astype(np.float32)
    vocabulary = {f"w{i}": i for i in range(300)}
    p = chapter_params(ch03, k=10, id_tokens=100, n_common=20)
    first = ch03.per_token_ids({"m": table}, {"m": vocabulary}, p, verbose=False)
    entries = list((tmp_cache / "token_ids").glob("*/entry.json"))
    assert len(entries) == 1 and len(list(entries[0].parent.glob("a*.npy"))) == 3
    fresh = ch03.per_token_ids({"m": table}, {"m": vocabulary}, p, verbose=False, cache=False)
    for field in ("rows", "local_id", "random_id", "neighbors", "order", "common_rows"):  # read back exactly
        np.testing.assert_array_equal(getattr(first["m"], field), getattr(fresh["m"], field))

    def no_search(*args, **kwargs):
        raise AssertionError("the cached neighbours should have been read")

    monkeypatch.setattr(neighbors, "knn", no_search)
    again = ch03.per_token_ids({"m": table}, {"m": vocabulary}, p, verbose=False)
    for field in ("rows", "local_id", "random_id", "neighbors", "order", "common_rows"):
        np.testing.assert_array_equal(getattr(first["m"], field), getattr(again["m"], field))
    changed = table.copy()
    changed[0, 0] += 1.0  # other values, other key: recomputed
    with pytest.raises(AssertionError, match="cached neighbours"):
        ch03.per_token_ids({"m": changed}, {"m": vocabulary}, p, verbose=False)
    for other in (dict(k=9), dict(variance=0.8), dict(seed=1)):  # every parameter of the old key is in the new one
        with pytest.raises(AssertionError, match="cached neighbours"):
            ch03.per_token_ids({"m": table}, {"m": vocabulary}, replace(p, **other), verbose=False)


def _local_ids(planted: bool, n: int = 400, k: int = 10, seed: int = 0) -> LocalIDs:
    """Tokens 0..n-1; the lower half has low IDs. Planted: low-ID tokens' neighbours share their kind."""
    rng = np.random.default_rng(seed)
    kinds = rng.integers(0, 4, size=n)
    local_id = np.where(np.arange(n) < n // 2, 2, 9)
    nbrs = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        pool = np.flatnonzero((kinds == kinds[i]) & (np.arange(n) != i)) if planted and i < n // 2 else None
        if pool is None:
            pool = np.delete(np.arange(n), i)
        nbrs[i] = rng.choice(pool, size=k, replace=False)
    order = np.argsort(local_id + rng.random(n) * 0.1, kind="stable")
    strings = {t: token_string(int(kinds[t]), t) for t in range(n)}
    return LocalIDs(
        "toy", np.arange(n), local_id, np.full(n, 9), nbrs, order, np.arange(10), strings, 64, n, n, (0.0, 0.0)
    )


def test_label_agreement():
    lab = np.array(["a"] * 50 + ["b"] * 50)
    same = np.array([[(i + 1) % 50 + 50 * (i >= 50)] for i in range(100)])
    assert np.all(ch03.neighbor_label_agreement(lab, same, adjust=False) == 1.0)
    assert np.allclose(ch03.neighbor_label_agreement(lab, same), 0.5)
    # Query rows: the neighbours of rows 3 and 60 only.
    agree = ch03.neighbor_label_agreement(lab, same[[3, 60]], rows=[3, 60], adjust=False)
    np.testing.assert_array_equal(agree, [1.0, 1.0])
    with pytest.raises(EmbgeoInputError, match="one row per query row"):
        ch03.neighbor_label_agreement(lab, same[:5], rows=[1, 2])


def test_coherence_test_planted_and_absent():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(1, 0.1, 30), rng.normal(0, 0.1, 30)])
    res = ch03.coherence_test(values, np.arange(30), np.arange(30, 60), n=200, seed=0)
    assert res.difference > 0.8 and res.p_value == pytest.approx(1 / 201) and res.z > 5
    res0 = ch03.coherence_test(values[30:], np.arange(15), np.arange(15, 30), n=200, seed=0)
    assert res0.p_value > 0.01
    mask = np.zeros(60, dtype=bool)
    mask[:30] = True
    assert ch03.coherence_test(values, mask, ~mask, n=200, seed=0) == res


def test_coherence_test_matches_the_permutation_loop():
    """The batched null is the loop `rng.permutation(pooled)` of the chapter's first version, draw for draw."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=80)
    lo, hi = np.arange(0, 25), np.arange(40, 80)
    res = ch03.coherence_test(values, lo, hi, n=300, seed=7)
    pooled = np.concatenate([values[lo], values[hi]])
    gen = np.random.default_rng(7)
    null = np.empty(300)
    for t in range(300):
        perm = gen.permutation(pooled)
        null[t] = perm[:25].mean() - perm[25:].mean()
    observed = pooled[:25].mean() - pooled[25:].mean()
    assert res.difference == pytest.approx(observed, abs=1e-15)
    assert res.p_value == (1 + int((null >= observed).sum())) / 301
    assert res.null_mean == pytest.approx(null.mean(), abs=1e-14)
    assert res.null_std == pytest.approx(null.std(ddof=1), rel=1e-12)


def test_coherence_test_errors():
    with pytest.raises(EmbgeoInputError, match="at least one token"):
        ch03.coherence_test(np.ones(5), np.array([], dtype=int), np.arange(5))
    with pytest.raises(EmbgeoInputError, match="positive integer"):
        ch03.coherence_test(np.ones(5), np.arange(2), np.arange(2, 5), n=0)


def test_coherence_table_planted_and_absent(chapter_params):
    p = chapter_params(ch03, coherence_k=5, n_permutations=200, seed=0)
    planted = ch03.coherence_table({"toy": _local_ids(True)}, p)
    assert list(planted.columns) == [
        "model",
        "label",
        "groups",
        "tokens per group",
        "coherence low ID",
        "coherence high ID",
        "difference",
        "z",
        "p",
    ]
    row = planted[planted["label"] == COHERENCE_LABEL].iloc[0]
    assert row["tokens per group"] == 40 and row["difference"] > 0.5 and row["p"] == pytest.approx(1 / 201)
    assert row["coherence low ID"] == pytest.approx(0.75, abs=0.05)  # 1 minus the chance of one of 4 kinds
    assert (planted["label"] == "analogy category").sum() == 0  # no whole word: that label is skipped
    absent = ch03.coherence_table({"toy": _local_ids(False)}, p)
    row = absent.iloc[0]
    assert abs(row["difference"]) < 0.1 and row["p"] > 0.01


def test_coherence_table_errors(chapter_params):
    with pytest.raises(EmbgeoInputError, match="No model"):
        ch03.coherence_table({}, chapter_params(ch03))
    with pytest.raises(EmbgeoInputError, match="coherence_k"):
        ch03.coherence_table({"toy": _local_ids(True)}, chapter_params(ch03, coherence_k=11))


def test_low_id_examples():
    ids = _local_ids(True)
    table = ch03.low_id_examples({"toy": ids}, n_examples=4, n_neighbours=3, seed=0)
    assert list(table.columns) == ["model", "token", "local ID", "nearest neighbours"] and len(table) == 4
    assert (table["local ID"] == 2).all()
    assert all(len(cell.split(", ")) == 3 for cell in table["nearest neighbours"])
    assert table.equals(ch03.low_id_examples({"toy": ids}, n_examples=4, n_neighbours=3, seed=0))
    with pytest.raises(EmbgeoInputError, match="positive"):
        ch03.low_id_examples({"toy": ids}, n_examples=0)


def test_stratified_test_removes_a_confound():
    """Low group over-represented in a high-value stratum: the plain difference is large, the stratified one not."""
    rng = np.random.default_rng(0)
    strata = np.repeat(["rare", "common"], 200)
    values = np.where(strata == "rare", 1.0, 0.0) + 0.1 * rng.normal(size=400)
    low = np.zeros(400, dtype=bool)
    low[:150] = True  # 150 of the 200 "rare" tokens ...
    low[200:250] = True  # ... and 50 of the "common" ones
    plain = values[low].mean() - values[~low].mean()
    res = ch03.stratified_difference_test(values, low, strata, n=500, seed=0)
    assert plain > 0.4 and abs(res.difference) < 0.05 and res.p_value > 0.01
    planted = values + 0.3 * low
    res = ch03.stratified_difference_test(planted, low, strata, n=500, seed=0)
    assert res.difference == pytest.approx(0.3, abs=0.05) and res.p_value == pytest.approx(1 / 501)
    assert res.n_low == 200 and res.n_high == 200
    with pytest.raises(EmbgeoInputError, match="both groups"):
        ch03.stratified_difference_test(values, low, np.arange(400), n=10)
    with pytest.raises(EmbgeoInputError, match="one entry"):
        ch03.stratified_difference_test(values, low[:5], strata, n=10)


def test_semantic_coherence_planted_and_absent(chapter_params):
    columns = ["model", "encoder", "independent", "tokens per group", "strata", "similarity low ID",
               "similarity high ID", "difference", "unstratified difference", "null std", "z", "p"]  # fmt: skip
    p = chapter_params(ch03, semantic_encoder="kinds", coherence_k=5, semantic_tokens=40, n_permutations=200, seed=0)
    planted = ch03.semantic_coherence(
        {"toy": _local_ids(True), "kinds": _local_ids(True)}, kind_encoder, p, n_reference=100
    )
    assert list(planted.columns) == columns and planted["independent"].tolist() == [True, False]
    row = planted.iloc[0]
    # Low-ID neighbours share the token's kind (similarity 1), high-ID ones do 1 time in 4; minus chance (~1/4).
    assert row["similarity low ID"] == pytest.approx(0.75, abs=0.1) and row["difference"] > 0.5
    assert row["p"] == pytest.approx(1 / 201) and 20 <= row["tokens per group"] <= 40  # in strata with both
    absent = ch03.semantic_coherence({"toy": _local_ids(False)}, kind_encoder, p)
    assert abs(absent.iloc[0]["difference"]) < 0.15 and absent.iloc[0]["p"] > 0.01
    with pytest.raises(EmbgeoInputError, match="coherence_k"):
        ch03.semantic_coherence({"toy": _local_ids(True)}, kind_encoder, chapter_params(ch03, coherence_k=11))


@pytest.mark.models
def test_string_encoder_caches(tmp_cache, monkeypatch):
    encode = ch03.string_encoder("minilm-l6")
    emb = encode([" Paris", " London", "ing", " Paris"])
    assert emb.shape == (4, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # two capitals are closer than a capital and a suffix
    np.testing.assert_array_equal(emb[0], emb[3])
    assert len(list((tmp_cache / "string_embeddings").glob("*/entry.json"))) == 1
    fresh = ch03.string_encoder("minilm-l6", use_cache=False)([" London"])  # one string alone, nothing cached
    np.testing.assert_allclose(fresh[0], emb[1], atol=1e-6)
    assert len(list((tmp_cache / "string_embeddings").glob("*/entry.json"))) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cached embeddings should have been read")

    monkeypatch.setattr(steering, "sentence_embeddings", no_encoding)
    again = ch03.string_encoder("minilm-l6")(["ing", " London", " Paris"])  # the same strings: read back
    np.testing.assert_array_equal(again, emb[[2, 1, 0]])
    with pytest.raises(AssertionError, match="cached embeddings"):
        encode([" Berlin"])


def test_extreme_id_examples():
    ids = _local_ids(True)
    table = ch03.extreme_id_examples({"toy": ids}, n_low=4, n_high=2, n_neighbours=3, low_fraction=0.1)
    assert list(table.columns) == ["model", "group", "token", "local ID", "nearest neighbours"]
    assert table["group"].tolist() == ["lowest ID"] * 4 + ["highest ID"] * 2
    assert (table.loc[table.group == "lowest ID", "local ID"] == 2).all()
    assert (table.loc[table.group == "highest ID", "local ID"] == 9).all()
    assert table.iloc[0]["token"] == repr(ids.strings[int(ids.rows[ids.order[0]])])  # the lowest comes first
    assert table.equals(ch03.extreme_id_examples({"toy": ids}, n_low=4, n_high=2, n_neighbours=3,
                                                      low_fraction=0.1))  # fmt: skip
    with pytest.raises(EmbgeoInputError, match="positive"):
        ch03.extreme_id_examples({"toy": ids}, n_low=0)
