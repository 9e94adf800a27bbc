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


def test_bootstrap_se_of_a_mean_matches_its_formula():
    x = np.random.default_rng(5).normal(0, 2.0, 400)
    assert stats.bootstrap_se(x, np.mean, n_boot=4000) == pytest.approx(x.std() / np.sqrt(x.size), rel=0.05)
    assert stats.bootstrap_se(x, np.median, seed=1) == stats.bootstrap_se(x, np.median, seed=1)
    with pytest.raises(EmbgeoInputError):
        stats.bootstrap_se([1.0])


def test_holm_and_bonferroni_known_values():
    p = [0.01, 0.04, 0.03, 0.005]
    assert stats.bonferroni(p) == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.adjust(p, "none") == pytest.approx(p)
    with pytest.raises(EmbgeoInputError, match="correction"):
        stats.adjust(p, "fdr")


def _check(name, effect, p=None, minimum=0.1, **kw):
    """A check with a declared minimum effect and its source (what every tested check needs)."""
    return stats.Check(name, effect, p, min_effect=minimum, min_effect_source="test threshold", **kw)


def test_verdict_planted_absent_and_mixed():
    rng = np.random.default_rng(4)
    strong = stats.wilcoxon(rng.normal(1.0, 1, 200))
    absent = stats.wilcoxon(rng.normal(0.0, 1, 200))
    planted = stats.verdict([_check("a", strong.effect, strong.p_value, se=strong.se)] * 2)
    assert planted.verdict == "reproduced" and planted.status == ("holds", "holds") and planted.n_hold == 2
    none = stats.verdict([_check("a", absent.effect, absent.p_value, 0.5, se=absent.se)] * 2)
    assert none.status == ("absent", "absent") and none.verdict == "not reproduced"
    mixed = stats.verdict(
        [_check("a", strong.effect, strong.p_value, se=strong.se), _check("b", absent.effect, absent.p_value, 0.5, se=absent.se)]
    )  # fmt: skip
    assert mixed.verdict == "partly reproduced" and mixed.status == ("holds", "absent")
    assert list(mixed.table()["status"]) == ["holds", "absent"]


def test_absent_needs_an_upper_bound_below_the_minimum_else_inconclusive():
    # an effect of 0.02 against a minimum of 0.3: with se 0.05 the upper bound (0.02 + 2.33 * 0.05 = 0.14) rules
    # the minimum out; with se 0.5 it does not (the sample cannot tell), and without an se it cannot be absent
    precise = stats.verdict([_check("x", 0.02, 0.4, 0.3, se=0.05)])
    assert precise.status == ("absent",) and precise.verdict == "not reproduced"
    assert precise.upper[0] == pytest.approx(0.02 + 2.326348 * 0.05, rel=1e-5)
    vague = stats.verdict([_check("x", 0.02, 0.4, 0.3, se=0.5)])
    assert vague.status == ("inconclusive",) and vague.verdict == "inconclusive"
    blind = stats.verdict([_check("x", 0.02, 0.4, 0.3)])
    assert blind.status == ("inconclusive",) and blind.verdict == "inconclusive"
    # one absent and one inconclusive check: the claim is inconclusive, not "not reproduced"
    both = stats.verdict([_check("x", 0.02, 0.4, 0.3, se=0.05), _check("y", 0.02, 0.4, 0.3, se=0.5)])
    assert both.status == ("absent", "inconclusive") and both.verdict == "inconclusive"
    assert "1 absent, 1 inconclusive" in both.summary()


def test_a_failing_positive_control_makes_the_claim_inconclusive():
    control = _check("native vector moves the topic", 0.3, 1e-4, 0.1, se=0.05, control=True)
    failed = _check("native vector moves the topic", 0.01, 0.4, 0.1, se=0.05, control=True)
    claim = _check("mapped vector moves the topic", 0.2, 1e-4, 0.1, se=0.05)
    gone = _check("mapped vector moves the topic", 0.0, 0.5, 0.1, se=0.01)
    assert stats.verdict([control, claim]).verdict == "reproduced"
    assert stats.verdict([control, gone]).verdict == "not reproduced"
    for other in (claim, gone):
        assert stats.verdict([failed, other]).verdict == "inconclusive (positive control failed)"
    # controls are their own Holm family and do not count among the claim's checks
    v = stats.verdict([control, claim])
    assert v.adjusted == (pytest.approx(1e-4), pytest.approx(1e-4)) and v.n_hold == 1 and v.n_claim_checks == 1
    with pytest.raises(EmbgeoInputError, match="not only positive controls"):
        stats.verdict([control])


def test_tested_checks_need_a_positive_minimum_and_its_source():
    with pytest.raises(EmbgeoInputError, match="min_effect > 0"):
        stats.verdict([stats.Check("zero", 1.0, 0.001, min_effect=0.0, min_effect_source="none")])
    with pytest.raises(EmbgeoInputError, match="min_effect_source"):
        stats.verdict([stats.Check("unsourced", 1.0, 0.001, min_effect=0.1)])
    # a descriptive check (no test) may keep a zero minimum: it is a condition, not a test
    assert stats.verdict([stats.Check("interior peak", 1.0), _check("t", 1.0, 0.001)]).verdict == "reproduced"


def test_permutation_floors_are_refused_with_the_permutations_needed():
    # 8 checks, 1,000 permutations: the smallest adjusted p is 8 / 1001 = 0.008 < 0.01: allowed
    ok = [_check(f"c{i}", 1.0, 1 / 1001, n_permutations=1000) for i in range(8)]
    assert stats.verdict(ok).verdict == "reproduced"
    # 12 checks, 200 permutations: 12 / 201 = 0.06 >= 0.01, no check could ever hold
    floor = [_check(f"c{i}", 1.0, 1 / 201, n_permutations=200) for i in range(12)]
    with pytest.raises(EmbgeoInputError, match="at least 1200 permutations"):
        stats.verdict(floor)
    assert stats.permutation_floor(ok) == [] and len(stats.permutation_floor(floor)) == 12
    # a p-value already Bonferroni-corrected over 10 layers needs ten times as many
    with pytest.raises(EmbgeoInputError, match="at least 1000 permutations"):
        stats.verdict([_check("c", 1.0, 10 / 501, n_permutations=500, corrected_for=10)])


def test_verdict_size_direction_and_correction():
    # Significant but smaller than the declared minimum: does not hold.
    assert stats.verdict([_check("small", 0.05, 1e-6, se=0.001)]).verdict == "not reproduced"
    # Wrong direction, however significant: does not hold.
    assert stats.verdict([_check("wrong", -1.0, 1e-9, se=0.01)]).verdict == "not reproduced"
    # p = 0.006 twice: passes alone, fails after Holm at alpha = 0.01 (0.012), passes uncorrected.
    two = [_check("x", 1.0, 0.006), _check("y", 1.0, 0.006)]
    assert stats.verdict(two, 0.01, "holm").verdict == "inconclusive"
    assert stats.verdict(two, 0.01, "none").verdict == "reproduced"
    # Descriptive checks carry no p-value and are not corrected.
    v = stats.verdict([stats.Check("interior peak", 1.0), _check("t", 1.0, 0.001)])
    assert v.verdict == "reproduced" and v.adjusted[0] is None and v.p_value == pytest.approx(0.001)


def test_verdict_rejects_bad_input():
    with pytest.raises(EmbgeoInputError):
        stats.verdict([])
    with pytest.raises(EmbgeoError, match="NaN"):
        stats.verdict([_check("n", float("nan"), 0.1)])
    with pytest.raises(EmbgeoError, match="outside"):
        stats.verdict([_check("p", 1.0, 1.5)])
    for word in ("reproduced", "Holm", "absent", "inconclusive", "positive control"):
        assert word in stats.VERDICT_RULE


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
        _check("a", 0.5, 0.001, n=40, se=0.1),
        _check("b", 0.5, 0.001, n=40, se=0.1, corrected_for=10),
        stats.Check("descriptive", 1.0, None, n=3),
        _check("no se", 0.5, 0.001, n=40),
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
        stats.verdict([_check("bad", 0.5, 0.001, se=float("nan"))])


def test_a_t_check_uses_t_quantiles_for_its_bound_and_detectable_effect():
    """With few degrees of freedom a bound from the normal quantile is too narrow: 'absent' needs the t bound."""
    from scipy.stats import norm
    from scipy.stats import t as student

    common = dict(effect=-0.002, p_value=0.6, min_effect=0.006, n=3, se=0.002, min_effect_source="test")
    normal = stats.verdict([stats.Check("c", **common)], alpha=0.01)
    with_df = stats.verdict([stats.Check("c", **common, df=2)], alpha=0.01)
    assert normal.status == ("absent",)  # -0.002 + 2.33 * 0.002 = 0.0027 < 0.006
    assert with_df.status == ("inconclusive",)  # -0.002 + 6.96 * 0.002 = 0.0119 > 0.006
    assert with_df.upper[0] == pytest.approx(-0.002 + student.ppf(0.99, 2) * 0.002)
    assert stats.detectable_effect(1.0, 0.01, 1, df=2) == pytest.approx(student.ppf(0.99, 2) + student.ppf(0.8, 2))
    assert stats.detectable_effect(1.0, 0.01, 1) == pytest.approx(norm.ppf(0.99) + norm.ppf(0.8))
    with pytest.raises(EmbgeoInputError, match="degrees of freedom"):
        stats.detectable_effect(1.0, 0.01, 1, df=0)


def test_permutation_tests_share_the_draws_of_permutation_test():
    weights = torch.linspace(-1.0, 1.0, 23, dtype=torch.float64)

    def one(perms):
        return (weights[perms] * weights).sum(dim=1)

    def two(perms):
        return torch.stack([one(perms), -one(perms)], dim=1)

    both = stats.permutation_tests(two, 23, 150, seed=4, device="cpu", chunk_size=16)
    first = stats.permutation_test(one, 23, 150, seed=4, device="cpu", chunk_size=64)
    np.testing.assert_array_equal(both[0].null, first.null)
    assert both[0].p_value == first.p_value and both[0].statistic == first.statistic
    np.testing.assert_array_equal(both[1].null, -first.null)
