"""The statistics module against scipy and on planted effects."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from embgeo_utils.core import stats
from embgeo_utils.core.errors import EmbgeoError, EmbgeoInputError


def test_permutation_p_counts_ties_and_never_zero():
    null = np.array([0.0, 1.0, 2.0, 3.0])
    assert stats.permutation_p(2.0, null) == pytest.approx(3 / 5)
    assert stats.permutation_p(10.0, null) == pytest.approx(1 / 5)
    assert stats.permutation_p(-1.0, null, "less") == pytest.approx(1 / 5)
    assert stats.permutation_p(-1.0, null, "two-sided") == pytest.approx(2 / 5)


def test_from_null_summary():
    res = stats.from_null(5.0, [1.0, 2.0, 3.0])
    assert res.null_mean == pytest.approx(2.0)
    assert res.null_std == pytest.approx(1.0)
    assert res.null_max == 3.0
    assert res.z == pytest.approx(3.0)
    assert res.p_value == pytest.approx(0.25)
    assert res.n_permutations == 3


def _corr_statistic(x, y):
    xs = (x - x.mean()) / x.std(correction=0)
    ys = (y - y.mean()) / y.std(correction=0)

    def statistic(perms):
        return (xs[None, :] * ys[perms]).mean(dim=1)

    return statistic


def test_permutation_test_finds_planted_correlation(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=gen, dtype=torch.float64)
    y = 0.5 * x + torch.randn(200, generator=gen, dtype=torch.float64)
    res = stats.permutation_test(_corr_statistic(x.to(device), y.to(device)), 200, 500, seed=1, device=device)
    assert res.p_value == pytest.approx(1 / 501)
    assert res.statistic == pytest.approx(float(np.corrcoef(x, y)[0, 1]), rel=1e-9)
    assert abs(res.null_mean) < 0.02


def test_permutation_test_is_seeded_and_uniform_under_independence(device):
    ps = []
    for rep in range(60):
        gen = torch.Generator().manual_seed(100 + rep)
        x, y = torch.randn(30, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen, dtype=torch.float64)
        x, y = x.to(device), y.to(device)
        ps.append(stats.permutation_test(_corr_statistic(x, y), 30, 199, seed=rep, device=device).p_value)
    # Under independence p is uniform: a KS test does not reject, and about 5 % fall below 0.05.
    assert sps.kstest(ps, "uniform").pvalue > 0.01
    again = stats.permutation_test(_corr_statistic(x, y), 30, 199, seed=59, device=device)
    assert again.p_value == ps[-1]


def test_permutation_test_rejects_wrong_shapes(device):
    with pytest.raises(EmbgeoInputError, match="one per row"):
        stats.permutation_test(lambda p: p.sum(), 10, 20, device=device)
    with pytest.raises(EmbgeoInputError, match="positive integer"):
        stats.permutation_test(lambda p: p.sum(1), 10, 0, device=device)


def test_wilcoxon_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, 40), rng.normal(0, 1, 40)
    res = stats.wilcoxon(a, b, "greater")
    ref = sps.wilcoxon(a, b, alternative="greater")
    assert res.p_value == pytest.approx(ref.pvalue)
    assert res.statistic == pytest.approx(ref.statistic)
    assert res.effect == pytest.approx((a - b).mean())
    assert stats.wilcoxon(a, a).p_value == 1.0


def test_paired_permutation_agrees_with_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.4, 1, 25), rng.normal(0, 1, 25)
    ours = stats.paired_permutation(a, b, 20_000, seed=0)
    ref = sps.permutation_test(
        (a - b,), np.mean, permutation_type="samples", n_resamples=20_000, alternative="greater", random_state=0
    )
    assert ours.p_value == pytest.approx(ref.pvalue, abs=0.01)
    none = stats.paired_permutation(rng.normal(0, 1, 25), rng.normal(0, 1, 25), 2000, seed=0)
    assert none.p_value > 0.01


def test_bootstrap_ci_matches_scipy_percentile():
    rng = np.random.default_rng(2)
    x = rng.exponential(2.0, 300)
    low, high = stats.bootstrap_ci(x, np.mean, n_boot=4000, seed=0)
    ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert low == pytest.approx(ref.low, rel=0.03)
    assert high == pytest.approx(ref.high, rel=0.03)
    assert low < x.mean() < high


def test_bootstrap_ci_paired_rows_and_median():
    rng = np.random.default_rng(3)
    pairs = rng.normal(size=(200, 2)) + np.array([1.0, 0.0])
    low, high = stats.bootstrap_ci(pairs, lambda s, axis: np.mean(s[0] - s[1], axis=0), n_boot=2000)
    assert low < 1.0 < high
    low_m, high_m = stats.bootstrap_ci(rng.normal(5, 1, 300), np.median, n_boot=1000)
    assert low_m < 5 < high_m
    with pytest.raises(EmbgeoInputError, match="NaN"):
        stats.bootstrap_ci([1.0, np.nan, 2.0])


def test_holm_and_bonferroni_known_values():
    p = [0.01, 0.04, 0.03, 0.005]
    assert stats.bonferroni(p) == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.adjust(p, "none") == pytest.approx(p)
    with pytest.raises(EmbgeoInputError, match="correction"):
        stats.adjust(p, "fdr")


def test_verdict_planted_absent_and_borderline():
    rng = np.random.default_rng(4)
    strong = stats.wilcoxon(rng.normal(1.0, 1, 50))
    absent = stats.wilcoxon(rng.normal(0.0, 1, 50))
    planted = stats.verdict(
        [stats.Check("a", strong.effect, strong.p_value), stats.Check("b", strong.effect, strong.p_value)]
    )
    assert planted.verdict == "reproduced" and planted.n_hold == 2
    none = stats.verdict([stats.Check("a", absent.effect, absent.p_value), stats.Check("b", -0.5, 0.9)])
    assert none.verdict == "not reproduced"
    mixed = stats.verdict(
        [stats.Check("a", strong.effect, strong.p_value), stats.Check("b", absent.effect, absent.p_value)]
    )
    assert mixed.verdict == "partly reproduced"
    assert list(mixed.table()["holds"]) == [True, False]


def test_verdict_size_direction_and_correction():
    # Significant but smaller than the declared minimum: does not hold.
    assert stats.verdict([stats.Check("small", 0.05, 1e-6, min_effect=0.1)]).verdict == "not reproduced"
    # Wrong direction, however significant: does not hold.
    assert stats.verdict([stats.Check("wrong", -1.0, 1e-9)]).verdict == "not reproduced"
    # p = 0.006 twice: passes alone, fails after Holm at alpha = 0.01 (0.012), passes uncorrected.
    two = [stats.Check("x", 1.0, 0.006), stats.Check("y", 1.0, 0.006)]
    assert stats.verdict(two, 0.01, "holm").verdict == "not reproduced"
    assert stats.verdict(two, 0.01, "none").verdict == "reproduced"
    # Descriptive checks carry no p-value and are not corrected.
    v = stats.verdict([stats.Check("interior peak", 1.0), stats.Check("t", 1.0, 0.001)])
    assert v.verdict == "reproduced" and v.adjusted[0] is None and v.p_value == pytest.approx(0.001)


def test_verdict_rejects_bad_input():
    with pytest.raises(EmbgeoInputError):
        stats.verdict([])
    with pytest.raises(EmbgeoError, match="NaN"):
        stats.verdict([stats.Check("n", float("nan"), 0.1)])
    with pytest.raises(EmbgeoError, match="outside"):
        stats.verdict([stats.Check("p", 1.0, 1.5)])
    assert "reproduced" in stats.VERDICT_RULE and "Holm" in stats.VERDICT_RULE


def test_detectable_effect_known_value_and_errors():
    # (z_0.95 + z_0.8) * se = (1.6449 + 0.8416) * 2
    assert stats.detectable_effect(2.0, alpha=0.05) == pytest.approx(2 * (1.644854 + 0.841621), rel=1e-5)
    # Bonferroni over m tests lowers the level: alpha 0.05 / 5 = 0.01
    assert stats.detectable_effect(1.0, alpha=0.05, m=5) == pytest.approx(stats.detectable_effect(1.0, alpha=0.01))
    for bad in (dict(se=float("nan")), dict(se=-1.0), dict(se=1.0, alpha=0.0), dict(se=1.0, m=0)):
        with pytest.raises(EmbgeoInputError):
            stats.detectable_effect(**bad)


def test_detectable_effect_has_its_power():
    """A planted effect of exactly the detectable size is found about 80 % of the time; half of it much less often."""
    rng = np.random.default_rng(0)
    n, alpha, reps = 40, 0.01, 400
    se = 1 / np.sqrt(n)
    mde = stats.detectable_effect(se, alpha)

    def power(mu: float) -> float:
        hits = [stats.wilcoxon(rng.normal(mu, 1.0, n)).p_value < alpha for _ in range(reps)]
        return float(np.mean(hits))

    assert 0.68 <= power(mde) <= 0.9
    assert power(mde / 2) < 0.35
    assert power(0.0) < 0.04


def test_tests_report_their_standard_error():
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 2.0, 50)
    se = d.std(ddof=1) / np.sqrt(50)
    assert stats.wilcoxon(d).se == pytest.approx(se)
    assert stats.paired_permutation(d, n_permutations=200).se == pytest.approx(se)
    x = rng.normal(size=30)
    y = x + rng.normal(size=30)
    res = stats.spearman(x, y)
    sp = sps.spearmanr(x, y, alternative="greater")
    assert res.effect == pytest.approx(sp.statistic) and res.p_value == pytest.approx(sp.pvalue)
    assert res.se == pytest.approx(1 / np.sqrt(29))
    assert stats.spearman(x, np.ones(30)).p_value == 1.0
    with pytest.raises(EmbgeoInputError):
        stats.spearman(x, x[:10])


def test_verdict_reports_detectable_effects():
    checks = [
        stats.Check("a", 0.5, 0.001, n=40, se=0.1),
        stats.Check("b", 0.5, 0.001, n=40, se=0.1, corrected_for=10),
        stats.Check("descriptive", 1.0, None, n=3),
        stats.Check("no se", 0.5, 0.001, n=40),
    ]
    v = stats.verdict(checks, alpha=0.01)
    assert v.detectable[0] == pytest.approx(stats.detectable_effect(0.1, 0.01, m=3))
    assert v.detectable[1] == pytest.approx(stats.detectable_effect(0.1, 0.01, m=30))
    assert v.detectable[1] > v.detectable[0]
    assert v.detectable[2] is None and v.detectable[3] is None
    table = v.table()
    assert list(table["detectable effect"].isna()) == [False, False, True, True]
    assert "n 3-40" in v.summary()
    with pytest.raises(EmbgeoInputError, match="standard error"):
        stats.verdict([stats.Check("bad", 0.5, 0.001, se=float("nan"))])
