"""Chapter 3's per-token and global ID tables and the claim-8 check (embgeo_utils.chapters.ch03_intrinsic_dimension).

The claim-8 tests build synthetic "models" whose answer is known: tables made of
clusters, each on a random low-dimensional affine subspace (nearest neighbourhoods
are flat, random ones are not; a token's ID is its cluster's dimension in every
model), token strings whose kinds are planted per cluster or drawn at random, and
isotropic Gaussian tables where nothing is planted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from synthetic_tokens import kind_encoder, token_string

from embgeo_utils.chapters import ch03_intrinsic_dimension as ch03
from embgeo_utils.core import stats
from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.geometry import intrinsic_dim, lle, neighbors, similarity

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


def _chapter(tables, vocabularies, device, n_common=200):
    ids = ch03.per_token_ids(
        tables, vocabularies, k=K, variance=0.9, id_tokens="all", n_common=n_common, seed=0, device=device,
        verbose=False,
    )  # fmt: skip
    tokens = ch03.token_frame(ids, strata=False)
    coh = ch03.semantic_coherence(ids, kind_encoder, "kinds", coherence_k=K, n_permutations=1000, seed=0)
    corr = ch03.id_correlations(tokens, n_permutations=1000, seed=0)
    return ids, tokens, coh, corr


@pytest.fixture(scope="module")
def planted(device):
    strings = _strings(True, 0)
    a, va = _model(_clustered(1), strings, 11)
    b, vb = _model(_clustered(2), strings, 12)
    return _chapter({"A": a, "B": b}, {"A": va, "B": vb}, device)


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
    verdict = ch03.check_claim8(tokens, coh, corr, alpha=0.01)
    assert verdict.verdict == "reproduced", verdict.table()
    assert len(verdict.checks) == 5  # 2 models x (ID << d, coherence) + 1 pair


def test_claim8_absent_is_not_reproduced(device):
    rng = np.random.default_rng(5)
    strings = _strings(False, 1)
    a, va = _model(rng.normal(size=(600, 16)).astype(np.float32), strings, 11)
    b, vb = _model(rng.normal(size=(600, 16)).astype(np.float32), strings, 12)
    _, tokens, coh, corr = _chapter({"A": a, "B": b}, {"A": va, "B": vb}, device)
    verdict = ch03.check_claim8(tokens, coh, corr, alpha=0.01)
    assert verdict.verdict == "not reproduced", verdict.table()
    assert not any(verdict.holds)


def test_claim8_partly_when_coherence_is_absent(device):
    strings = _strings(False, 2)  # flat neighbourhoods and shared IDs, but labels at random
    a, va = _model(_clustered(1), strings, 11)
    b, vb = _model(_clustered(2), strings, 12)
    _, tokens, coh, corr = _chapter({"A": a, "B": b}, {"A": va, "B": vb}, device)
    verdict = ch03.check_claim8(tokens, coh, corr, alpha=0.01)
    assert verdict.verdict == "partly reproduced", verdict.table()
    table = verdict.table()
    assert table["holds"].tolist() == [True, True, False, False, True]


def test_claim8_rule_is_faithful_to_the_chapter():
    """One check per sub-test: median below d/10 and Mann-Whitney (ID), gap > 0 (coherence), rho > 0 (pairs)."""
    tokens = pd.DataFrame(
        {"model": ["A"] * 40 + ["B"] * 40, "width": [64] * 40 + [40] * 40,
         "local ID": [3] * 40 + [5] * 40, "random ID": [9] * 40 + [9] * 40}
    )  # fmt: skip
    coh = pd.DataFrame(
        {"model": ["A", "B", "enc"], "independent": [True, True, False],
         "difference": [0.2, -0.1, 0.3], "p": [0.0001, 0.0001, 0.0001], "tokens per group": [4, 4, 2]}
    )  # fmt: skip
    corr = pd.DataFrame({"model A": ["A"], "model B": ["B"], "tokens": [40], "Spearman": [0.3], "p": [0.5]})
    verdict = ch03.check_claim8(tokens, coh, corr, alpha=0.01, correction="none")
    # B's median 5 is above d/10 = 4; B's coherence gap is negative; the correlation is not significant;
    # the encoder's own row is descriptive and not a check.
    assert verdict.holds == (True, False, True, False, False)
    assert verdict.checks[0].effect == pytest.approx(6.4 - 3) and verdict.checks[1].effect == pytest.approx(-1)
    assert verdict.checks[2].n == 4 and verdict.checks[4].n == 40
    assert ch03.failing_checks(verdict) == [verdict.checks[i].name for i in (1, 3, 4)]
    # A single model: no pair, and the verdict still comes from the rule.
    single = ch03.check_claim8(tokens[tokens.model == "A"], coh[coh.model == "A"], corr.iloc[:0])
    assert single.verdict == "reproduced" and len(single.checks) == 2
    assert isinstance(single, stats.Verdict)


def test_correlation_summary():
    corr = pd.DataFrame({"Spearman": [0.4, -0.02, 0.3, 0.05], "p": [0.001, 0.9, 0.001, 0.2]})
    summary = ch03.correlation_summary(corr)
    assert summary == {"median": pytest.approx(0.175), "min": -0.02, "max": 0.4, "pairs": 4, "pairs significant": 2}
    assert ch03.correlation_summary(corr.iloc[:0])["median"] is None


def test_drop_tokens(planted):
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
    ch03.id_correlations(frame, n_permutations=10)  # the samples line up
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
        ch03.check_claim8(tokens.drop(columns="random ID"), coh, corr)
    with pytest.raises(EmbgeoInputError, match="independent"):
        ch03.check_claim8(tokens, coh.drop(columns="independent"), corr)
    with pytest.raises(EmbgeoInputError, match="empty"):
        ch03.check_claim8(tokens.iloc[:0], coh, corr)
    with pytest.raises(EmbgeoInputError, match="alpha"):
        ch03.check_claim8(tokens, coh, corr, alpha=2.0)


def _pair_frame(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    n = len(x)
    return pd.DataFrame(
        {"model": ["A"] * n + ["B"] * n, "local ID": np.concatenate([x, y]),
         "common index": np.concatenate([np.arange(n), np.arange(n)])}
    )  # fmt: skip


def test_id_correlations_match_the_chapter_1_permutation_test():
    rng = np.random.default_rng(3)
    x = rng.integers(1, 30, size=150).astype(float)
    y = x + rng.normal(scale=8, size=150)
    corr = ch03.id_correlations(_pair_frame(x, y), n_permutations=300, seed=4)

    def spearman(X, Y):
        from scipy.stats import spearmanr

        return spearmanr(np.asarray(X)[:, 0], np.asarray(Y)[:, 0]).statistic

    ref = similarity.permutation_test(spearman, x[:, None], y[:, None], n=300, seed=4, device="cpu")
    row = corr.iloc[0]
    assert row["Spearman"] == pytest.approx(ref.statistic, abs=1e-12)
    assert row["p"] == ref.p_value and row["null mean"] == pytest.approx(ref.null_mean, abs=1e-12)
    assert row["z"] == pytest.approx(ref.z, rel=1e-9) and row["tokens"] == 150


def test_id_correlations_planted_and_absent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    planted = ch03.id_correlations(_pair_frame(x, x + 0.3 * rng.normal(size=200)), n_permutations=200)
    assert planted.loc[0, "Spearman"] > 0.9 and planted.loc[0, "p"] == pytest.approx(1 / 201)
    absent = ch03.id_correlations(_pair_frame(x, rng.normal(size=200)), n_permutations=200)
    assert abs(absent.loc[0, "Spearman"]) < 0.2 and absent.loc[0, "p"] > 0.01
    # Rows in any order: pairing is by the common index.
    frame = _pair_frame(x, x).sample(frac=1.0, random_state=1)
    assert ch03.id_correlations(frame, n_permutations=50).loc[0, "Spearman"] == pytest.approx(1.0)
    single = ch03.id_correlations(_pair_frame(x, x).query("model == 'A'"), n_permutations=10)
    assert single.empty and "Spearman" in single.columns


def test_id_correlations_errors():
    x = np.arange(10.0)
    with pytest.raises(EmbgeoInputError, match="same ID"):
        ch03.id_correlations(_pair_frame(np.ones(10), x), n_permutations=10)
    with pytest.raises(EmbgeoInputError, match="different sizes"):
        ch03.id_correlations(_pair_frame(x, x).iloc[:-1], n_permutations=10)
    with pytest.raises(EmbgeoInputError, match="positive integer"):
        ch03.id_correlations(_pair_frame(x, x), n_permutations=0)
    with pytest.raises(EmbgeoInputError, match="common index"):
        ch03.id_correlations(_pair_frame(x, x).drop(columns="common index"))


def test_global_ids_on_a_known_dimension(device):
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(1500, 3)) @ rng.normal(size=(3, 20))
    summary, curves = ch03.global_ids({"flat": flat}, n_points=1000, seed=0, device=device)
    assert summary.loc["flat", "points"] == 1000 and summary.loc["flat", "width d"] == 20
    assert summary.loc["flat", "TwoNN"] == pytest.approx(3, abs=0.4)
    assert summary.loc["flat", "GRIDE n2=2"] == pytest.approx(3, abs=0.4)
    assert list(curves.columns) == ["model", "n2", "ID", "error"] and curves["n2"].max() <= 1000 // 4
    pick = np.sort(np.random.default_rng(0).choice(1500, size=1000, replace=False))
    assert summary.loc["flat", "TwoNN"] == pytest.approx(intrinsic_dim.twonn(flat[pick], device=device))
    with pytest.raises(EmbgeoInputError, match="n_points"):
        ch03.global_ids({"flat": flat}, n_points=4)
    with pytest.raises(EmbgeoInputError, match="No embedding table"):
        ch03.global_ids({})


def test_tokens_to_evaluate():
    assert ch03.tokens_to_evaluate(10**6, "all", "cpu") == "all"
    assert ch03.tokens_to_evaluate(10**6, 300, "cpu") == 300
    assert ch03.tokens_to_evaluate(40_000, "auto", "cpu") == "all"
    assert ch03.tokens_to_evaluate(60_000, "auto", "cpu", cpu_id_tokens=5000) == 5000
    for bad in ("some", 0, -3, True):
        with pytest.raises(EmbgeoInputError, match="id_tokens"):
            ch03.tokens_to_evaluate(10, bad, "cpu")


def test_per_token_ids_sample_and_errors(device):
    table = _clustered(1)
    vocabulary = {s: t for t, s in enumerate(_strings(True, 0))}
    ids = ch03.per_token_ids(
        {"A": table}, {"A": vocabulary}, k=K, id_tokens=50, n_common=20, seed=0, device=device, verbose=False
    )
    a = ids["A"]
    assert 50 <= len(a.rows) <= 70 and set(a.common_rows) <= set(a.rows) and a.n_alignable == 600
    frame = a.frame(strata=True)
    assert "Zipf stratum" in frame and (frame["common index"] >= 0).sum() == 20
    with pytest.raises(EmbgeoInputError, match="No embedding table"):
        ch03.per_token_ids({}, {})
    with pytest.raises(EmbgeoInputError, match="No vocabulary"):
        ch03.per_token_ids({"A": table}, {"B": vocabulary})
    with pytest.raises(EmbgeoInputError, match="No model"):
        ch03.token_frame({})


def test_chapter3_figures(planted, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids, tokens, coh, corr = planted
    with_strata = ch03.token_frame(ids, strata=True)
    _, curves = ch03.global_ids({"A": _clustered(1)}, n_points=200, device=device)
    surface = ch03.coherence_table(ids, coherence_k=K, n_permutations=50, seed=0)
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


def test_per_token_ids_are_cached_by_content(tmp_cache, monkeypatch):

    rng = np.random.default_rng(0)
    table = rng.normal(size=(300, 16)).astype(np.float32)
    vocabulary = {f"w{i}": i for i in range(300)}
    first = ch03.per_token_ids({"m": table}, {"m": vocabulary}, k=10, id_tokens=100, n_common=20, verbose=False)
    assert len(list(tmp_cache.rglob("*.npz"))) == 1

    def no_search(*args, **kwargs):
        raise AssertionError("the cached neighbours should have been read")

    monkeypatch.setattr(neighbors, "knn", no_search)
    again = ch03.per_token_ids({"m": table}, {"m": vocabulary}, k=10, id_tokens=100, n_common=20, verbose=False)
    for field in ("rows", "local_id", "random_id", "neighbors", "order", "common_rows"):
        np.testing.assert_array_equal(getattr(first["m"], field), getattr(again["m"], field))
    changed = table.copy()
    changed[0, 0] += 1.0  # other values, other key: recomputed
    with pytest.raises(AssertionError, match="cached neighbours"):
        ch03.per_token_ids({"m": changed}, {"m": vocabulary}, k=10, id_tokens=100, n_common=20, verbose=False)
