"""The statistics every chapter uses, and the one rule that turns them into verdicts.

Every claim of the book is tested with the functions of this module: permutation
tests with ``p = (1 + #{null >= observed}) / (1 + n)``, bootstrap confidence
intervals, paired tests (Wilcoxon signed-rank, sign-flip permutation), Holm and
Bonferroni corrections, and :func:`verdict`, the single rule that judges each
check of a claim (holds, absent or inconclusive) and maps them to *reproduced*,
*partly reproduced*, *not reproduced* or *inconclusive*, with positive controls
that must hold first. The Claims ledger page prints :data:`VERDICT_RULE`.

References:
    B. Phipson, G. K. Smyth (2010), Permutation p-values should never be zero,
    Stat. Appl. Genet. Mol. Biol. 9(1).

    S. Holm (1979), A simple sequentially rejective multiple test procedure,
    Scand. J. Statist. 6, 65-70.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .device import NUMPY_CHUNK_BYTES, chunk_rows, get_device
from .errors import EmbgeoInputError

__all__ = [
    "Check",
    "DETECTABLE_POWER",
    "PermutationResult",
    "TestResult",
    "VERDICTS",
    "VERDICT_RULE",
    "STATUSES",
    "permutation_floor",
    "Verdict",
    "adjust",
    "bonferroni",
    "bootstrap_ci",
    "bootstrap_se",
    "detectable_effect",
    "from_null",
    "holm",
    "paired_permutation",
    "permutation_p",
    "permutation_test",
    "permutation_tests",
    "spearman",
    "verdict",
    "wilcoxon",
]


Alternative = Literal["greater", "less", "two-sided"]


#: The verdicts a claim can get.
VERDICTS = (
    "reproduced",
    "partly reproduced",
    "not reproduced",
    "inconclusive",
    "inconclusive (positive control failed)",
)


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of a permutation test (every chapter).

    Attributes:
        statistic: the observed value.
        null_mean: mean of the statistic over permutations.
        null_std: its standard deviation (ddof = 1) over permutations.
        null_max: the largest null value.
        z: ``(statistic - null_mean) / null_std`` (nan when the null has no spread).
        p_value: one-sided ``(1 + #{null >= statistic}) / (1 + n_permutations)``.
        n_permutations: number of permutations.
        null: the null values themselves.
    """

    statistic: float
    null_mean: float
    null_std: float
    null_max: float
    z: float
    p_value: float
    n_permutations: int
    null: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False, compare=False)


@dataclass(frozen=True)
class TestResult:
    """Outcome of a paired test or a correlation test (every chapter).

    Attributes:
        statistic: the test statistic.
        p_value: its p-value.
        n: pairs used.
        effect: the mean difference (paired tests) or the correlation.
        se: standard error of ``effect`` (``sd / sqrt(n)`` of the differences;
            ``1 / sqrt(n - 1)`` for a correlation under independence), what
            :func:`detectable_effect` turns into the smallest detectable effect.
    """

    statistic: float
    p_value: float
    n: int
    effect: float
    se: float | None = None


#: Power at which :func:`verdict` reports each check's detectable effect.
DETECTABLE_POWER = 0.8


def detectable_effect(
    se: float, alpha: float = 0.01, m: int = 1, power: float = DETECTABLE_POWER, df: float | None = None
) -> float:
    """Smallest effect a one-sided test at level ``alpha / m`` detects with probability ``power`` (every chapter).

    The normal approximation ``(z_{1 - alpha/m} + z_power) * se``, with ``se`` the
    standard error of the effect under the null (for a permutation test, the
    standard deviation of its null). ``m`` is the number of tested checks of the
    claim: Holm's first step is Bonferroni's, so this is the conservative bound.
    With ``df`` (a t statistic, e.g. over a few seeds) both quantiles are those of
    the t distribution with ``df`` degrees of freedom. The Claims ledger reports it
    next to each check with its ``n``.
    """
    if df is not None and not (np.isfinite(df) and df > 0):
        raise EmbgeoInputError(f"df must be a positive number of degrees of freedom, got {df}.")

    if not (np.isfinite(se) and se >= 0):
        raise EmbgeoInputError(f"se must be a finite non-negative number, got {se}.")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise EmbgeoInputError(f"alpha and power must lie in (0, 1), got {alpha} and {power}.")
    m = _check_count(m, "m")
    return float((_quantile(1 - alpha / m, df) + _quantile(power, df)) * se)


def _quantile(q: float, df: float | None) -> float:
    """The standard normal quantile, or Student's t with ``df`` degrees of freedom."""
    from scipy.stats import norm, t

    return float(norm.ppf(q) if df is None else t.ppf(q, df))


def _check_alternative(alternative: str) -> None:
    if alternative not in ("greater", "less", "two-sided"):
        raise EmbgeoInputError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}.")


def _check_count(n: int, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise EmbgeoInputError(f"{name} must be a positive integer, got {n!r}.")
    return int(n)


def permutation_p(observed: float, null: np.ndarray | Sequence[float], alternative: Alternative = "greater") -> float:
    """Permutation p-value ``(1 + #{null at least as extreme}) / (1 + n)`` (every chapter).

    ``"greater"`` counts ``null >= observed``, ``"less"`` counts ``null <= observed``;
    ``"two-sided"`` doubles the smaller one-sided p (capped at 1).
    """
    _check_alternative(alternative)
    values = np.asarray(null, dtype=np.float64).ravel()
    if values.size == 0:
        raise EmbgeoInputError("The null distribution is empty; use at least one permutation.")
    if not np.isfinite(values).all() or not np.isfinite(observed):
        raise EmbgeoInputError("The observed statistic or its null holds NaN/inf; check the inputs of the statistic.")
    n = values.size
    greater = (1 + int((values >= observed).sum())) / (1 + n)
    less = (1 + int((values <= observed).sum())) / (1 + n)
    if alternative == "greater":
        return greater
    if alternative == "less":
        return less
    return min(1.0, 2 * min(greater, less))


def from_null(
    observed: float, null: np.ndarray | Sequence[float], alternative: Alternative = "greater"
) -> PermutationResult:
    """A :class:`PermutationResult` from an observed value and its null values (every chapter)."""
    values = np.asarray(null, dtype=np.float64).ravel()
    p = permutation_p(observed, values, alternative)
    n = values.size
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if n > 1 else float("nan")
    z = (float(observed) - mean) / std if std > 0 else float("nan")
    return PermutationResult(float(observed), mean, std, float(values.max()), float(z), float(p), int(n), values)


def permutation_test(
    statistic: Callable[[torch.Tensor], torch.Tensor],
    n_items: int,
    n_permutations: int = 1000,
    seed: int = 0,
    device: str | torch.device = "auto",
    chunk_size: int | None = None,
    alternative: Alternative = "greater",
) -> PermutationResult:
    """Batched permutation test (every chapter).

    ``statistic`` receives a ``(b, n_items)`` int64 tensor of index permutations on
    ``device`` and returns the ``b`` statistics, one per row; the observed value
    is its value on the identity. Permutations come from a seeded generator, in
    chunks of ``chunk_size`` rows, so the same seed gives the same null.

    Args:
        statistic: batched statistic of a re-pairing of the items.
        n_items: number of items that are re-paired.
        n_permutations: permutations of the null (the book uses at least 200, 1,000 where cheap).
        seed: seed of the permutations.
        device: where the permutations live.
        chunk_size: permutations per call of ``statistic`` (default: at most 1,024, within 16 MiB of indices).
        alternative: direction of the test.

    Returns:
        A :class:`PermutationResult`.
    """
    return permutation_tests(
        lambda perms: torch.as_tensor(statistic(perms)).reshape(-1, 1),
        n_items, n_permutations, seed, device, chunk_size, alternative,
    )[0]  # fmt: skip


def permutation_tests(
    statistic: Callable[[torch.Tensor], torch.Tensor],
    n_items: int,
    n_permutations: int = 1000,
    seed: int = 0,
    device: str | torch.device = "auto",
    chunk_size: int | None = None,
    alternative: Alternative = "greater",
) -> list[PermutationResult]:
    """Several statistics tested on the same seeded permutations (every chapter; chapter 5's SVCCA curve).

    As :func:`permutation_test`, but ``statistic`` returns a ``(b, m)`` tensor, ``m`` statistics of each of the
    ``b`` permutations, so that work they share (chapter 5: one product for every number of SVCCA directions) is
    done once. The permutations are those :func:`permutation_test` draws with the same seed; one
    :class:`PermutationResult` per statistic, in order.
    """
    n_items = _check_count(n_items, "n_items")
    n_permutations = _check_count(n_permutations, "n_permutations")
    if n_items < 2:
        raise EmbgeoInputError("A permutation test needs at least 2 items.")
    dev = get_device(device)
    step = chunk_rows(8 * n_items, dev, chunk_size, max_rows=1024, budget_bytes=1 << 24)
    gen = torch.Generator().manual_seed(int(seed))
    observed = torch.as_tensor(statistic(torch.arange(n_items, device=dev)[None, :]))
    observed_values = observed.reshape(1, -1)[0].detach().double().cpu().numpy()
    null = []
    for start in range(0, n_permutations, step):
        b = min(step, n_permutations - start)
        perms = torch.argsort(torch.rand((b, n_items), generator=gen), dim=1).to(dev)
        values = torch.as_tensor(statistic(perms))
        if values.shape[0] != b:
            raise EmbgeoInputError(
                f"statistic returned {values.shape[0]} values for {b} permutations; return one per row."
            )
        null.append(values.reshape(b, -1).detach().double().cpu().numpy())
    table = np.concatenate(null)
    return [from_null(float(o), table[:, i], alternative) for i, o in enumerate(observed_values)]


def _paired(a: Any, b: Any | None) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64).ravel()
    if b is not None:
        y = np.asarray(b, dtype=np.float64).ravel()
        if x.shape != y.shape:
            raise EmbgeoInputError(f"Paired samples must have the same length, got {x.size} and {y.size}.")
        x = x - y
    if x.size == 0:
        raise EmbgeoInputError("A paired test needs at least one pair.")
    if not np.isfinite(x).all():
        raise EmbgeoInputError("Paired samples hold NaN/inf; drop or fix those pairs first.")
    return x


def wilcoxon(a: Any, b: Any | None = None, alternative: Alternative = "greater") -> TestResult:
    """Wilcoxon signed-rank test of ``a - b`` (or of ``a``) against zero (every chapter).

    A thin wrapper of :func:`scipy.stats.wilcoxon` that returns p = 1 when every
    difference is zero (no evidence either way) instead of raising, and reports
    the mean difference as the effect.
    """
    from scipy import stats as sps

    _check_alternative(alternative)
    diff = _paired(a, b)
    effect = float(diff.mean())
    se = _mean_se(diff)
    if not np.any(diff != 0):
        return TestResult(0.0, 1.0, int(diff.size), effect, se)
    res = sps.wilcoxon(diff, alternative=alternative)
    return TestResult(float(res.statistic), float(res.pvalue), int(diff.size), effect, se)


def _mean_se(diff: np.ndarray) -> float | None:
    return float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else None


def spearman(x: Any, y: Any, alternative: Alternative = "greater") -> TestResult:
    """Spearman rank correlation of ``x`` and ``y`` with its p-value (every chapter).

    A thin wrapper of :func:`scipy.stats.spearmanr`; ``effect`` is rho and ``se``
    its standard error under independence, ``1 / sqrt(n - 1)``.
    """
    from scipy import stats as sps

    _check_alternative(alternative)
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 3:
        raise EmbgeoInputError(f"spearman needs two samples of the same length, at least 3; got {a.size} and {b.size}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise EmbgeoInputError("spearman's samples hold NaN/inf; drop those points first.")
    se = float(1 / np.sqrt(a.size - 1))
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # a constant sample: no evidence either way
        return TestResult(0.0, 1.0, int(a.size), 0.0, se)
    res = sps.spearmanr(a, b, alternative=alternative)
    return TestResult(float(res.statistic), float(res.pvalue), int(a.size), float(res.statistic), se)


def paired_permutation(
    a: Any,
    b: Any | None = None,
    n_permutations: int = 10_000,
    alternative: Alternative = "greater",
    seed: int = 0,
) -> TestResult:
    """Sign-flip permutation test of the mean of ``a - b`` (every chapter).

    Under the null each difference is as likely to be positive as negative; the
    null flips signs at random (seeded) and the p-value is
    ``(1 + #{null >= observed}) / (1 + n)`` for ``"greater"``.
    """
    diff = _paired(a, b)
    n_permutations = _check_count(n_permutations, "n_permutations")
    rng = np.random.default_rng(seed)
    observed = float(diff.mean())
    null = np.empty(n_permutations)
    step = chunk_rows(8 * diff.size, budget_bytes=NUMPY_CHUNK_BYTES)
    for start in range(0, n_permutations, step):
        stop = min(n_permutations, start + step)
        signs = rng.integers(0, 2, size=(stop - start, diff.size)) * 2 - 1
        null[start:stop] = (signs * diff).mean(axis=1)
    return TestResult(observed, permutation_p(observed, null, alternative), int(diff.size), observed, _mean_se(diff))


def bootstrap_ci(
    data: Any,
    statistic: Callable[..., Any] = np.mean,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval (every chapter).

    Rows of ``data`` (a 1-D sample, or 2-D with one row per unit: paired values
    stay together) are resampled with replacement; ``statistic(sample, axis=0)``
    must reduce the row axis, as numpy reductions do.

    Returns:
        ``(low, high)`` at the given level.
    """
    values = np.asarray(data, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] < 2:
        raise EmbgeoInputError("The bootstrap needs at least 2 units (rows of data).")
    if not 0 < level < 1:
        raise EmbgeoInputError(f"level must lie in (0, 1), got {level}.")
    n_boot = _check_count(n_boot, "n_boot")
    if not np.isfinite(values).all():
        raise EmbgeoInputError("data holds NaN/inf; drop or fix those rows before bootstrapping.")
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    stats_ = np.empty(n_boot)
    step = chunk_rows(8 * max(1, values.size), budget_bytes=NUMPY_CHUNK_BYTES)
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        idx = rng.integers(0, n, size=(stop - start, n))
        sample = np.moveaxis(values[idx], 0, -1)  # (n, ..., b): the statistic reduces axis 0
        stats_[start:stop] = np.asarray(statistic(sample, axis=0), dtype=np.float64).reshape(-1)[: stop - start]
    tail = (1 - level) / 2
    low, high = np.quantile(stats_, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_se(data: Any, statistic: Callable[..., Any] = np.median, n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of a statistic of a 1-D sample (every chapter): the std of its resampled values.

    ``statistic(sample, axis=0)`` must reduce the first axis, as numpy reductions do. Seeded.
    """
    values = np.asarray(data, dtype=np.float64).ravel()
    if values.size < 2 or not np.isfinite(values).all():
        raise EmbgeoInputError("bootstrap_se needs at least 2 finite values.")
    rng = np.random.default_rng(seed)
    n_boot = _check_count(n_boot, "n_boot")
    draws = np.empty(n_boot)
    step = chunk_rows(8 * values.size, budget_bytes=NUMPY_CHUNK_BYTES)
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        idx = rng.integers(0, values.size, size=(stop - start, values.size))
        draws[start:stop] = np.asarray(statistic(values[idx].T, axis=0), dtype=np.float64)
    return float(draws.std(ddof=1))


def bonferroni(p_values: Any) -> np.ndarray:
    """Bonferroni-adjusted p-values, ``min(1, m * p)`` (every chapter)."""
    p = np.asarray(p_values, dtype=np.float64)
    return np.minimum(1.0, p * p.size)


def holm(p_values: Any) -> np.ndarray:
    """Holm step-down adjusted p-values, in the input order (every chapter)."""
    p = np.asarray(p_values, dtype=np.float64).ravel()
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(1.0, stepped)
    return out


def adjust(p_values: Any, correction: str = "holm") -> np.ndarray:
    """Adjust p-values with ``"holm"``, ``"bonferroni"`` or ``"none"`` (every chapter)."""
    if correction == "holm":
        return holm(p_values)
    if correction == "bonferroni":
        return bonferroni(p_values)
    if correction == "none":
        return np.asarray(p_values, dtype=np.float64)
    raise EmbgeoInputError(f"correction must be 'holm', 'bonferroni' or 'none', got {correction!r}.")


#: What a check can come to: its effect clears the minimum with significance, the data rule the minimum out, or neither.
STATUSES = ("holds", "absent", "inconclusive")


@dataclass(frozen=True)
class Check:
    """One check of a claim (every chapter).

    Attributes:
        name: what is checked and where, e.g. ``"gemma3-270m: peak > last layer"``.
        effect: the effect, signed so that the claimed direction is positive.
        p_value: the test's raw p-value, or ``None`` for a descriptive condition
            (one that has no test, such as "the peak is an interior layer").
        min_effect: the smallest effect that counts, in the effect's units; it must be positive for a tested
            check (a minimum of zero would turn the check into a bare significance test).
        n: sample size behind the test (reported with the verdict).
        se: standard error of ``effect``, in the effect's units (for a permutation test the null's standard
            deviation); it gives the smallest detectable effect (:func:`detectable_effect`) and the upper
            confidence bound that can show an effect to be absent.
        corrected_for: how many tests ``p_value`` is already corrected for (e.g.
            Bonferroni over layers), so the detectable effect uses the same level.
        min_effect_source: where that minimum comes from: the paper's number, a fraction of a ceiling (the seed
            ceiling, the floor of a baseline), or a practical threshold with its reason. Required for a tested check.
        n_permutations: the number of permutations behind ``p_value`` when it comes from a permutation test
            (its smallest possible value is ``1 / (n_permutations + 1)``); ``None`` otherwise.
        control: a positive control: an effect known to be there on the same data, which the pipeline must see
            before the absence of another effect counts. A claim whose control does not hold is inconclusive.
        df: degrees of freedom when ``p_value`` comes from a t distribution (e.g. a mean over a few seeds); the
            upper confidence bound and the detectable effect then use t quantiles too. ``None``: normal.
    """

    name: str
    effect: float
    p_value: float | None = None
    min_effect: float = 0.0
    n: int | None = None
    se: float | None = None
    corrected_for: int = 1
    min_effect_source: str = ""
    n_permutations: int | None = None
    control: bool = False
    df: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The verdict of a claim and the checks behind it (every chapter).

    Attributes:
        verdict: one of :data:`VERDICTS`.
        checks: the checks as given.
        adjusted: adjusted p-values (``None`` for descriptive checks).
        status: per check, one of :data:`STATUSES` (``"holds"``, ``"absent"``, ``"inconclusive"``), in the order given.
        alpha: significance level used.
        correction: the multiple-testing correction used.
        detectable: per check, the smallest effect its test detects with power
            :data:`DETECTABLE_POWER` at this alpha and number of tests (``None``
            where the check has no test or no standard error).
        upper: per check, the one-sided upper confidence bound of the effect at the checks' level (``None``
            without a standard error): below ``min_effect``, the check is ``"absent"``.
    """

    verdict: str
    checks: tuple[Check, ...]
    adjusted: tuple[float | None, ...]
    status: tuple[str, ...]
    alpha: float
    correction: str
    detectable: tuple[float | None, ...] = ()
    upper: tuple[float | None, ...] = ()

    @property
    def holds(self) -> tuple[bool, ...]:
        """Per check, whether it holds."""
        return tuple(s == "holds" for s in self.status)

    @property
    def p_value(self) -> float | None:
        """Largest adjusted p-value over the claim's checks that have one (controls left out)."""
        ps = [p for p, c in zip(self.adjusted, self.checks) if p is not None and not c.control]
        return max(ps) if ps else None

    @property
    def n_hold(self) -> int:
        """How many of the claim's checks hold (controls left out)."""
        return sum(s == "holds" for s, c in zip(self.status, self.checks) if not c.control)

    @property
    def n_claim_checks(self) -> int:
        """How many checks test the claim itself (controls left out)."""
        return sum(not c.control for c in self.checks)

    def table(self) -> Any:
        """The checks as a pandas DataFrame: effect, minimum and its source, n, detectable effect, p, status."""
        import pandas as pd

        detectable = self.detectable or (None,) * len(self.checks)
        upper = self.upper or (None,) * len(self.checks)
        return pd.DataFrame(
            [
                {
                    "check": c.name + (" (positive control)" if c.control else ""),
                    "effect": c.effect,
                    "upper bound": u,
                    "min effect": c.min_effect,
                    "source of the minimum": c.min_effect_source,
                    "n": c.n,
                    "detectable effect": d,
                    "p": c.p_value,
                    "p adjusted": p_adj,
                    "status": status,
                }
                for c, p_adj, status, d, u in zip(self.checks, self.adjusted, self.status, detectable, upper)
            ]
        ).set_index("check")

    def summary(self) -> str:
        """One line: the verdict, how many checks hold, are absent or inconclusive, and the sample sizes behind them."""
        ns = sorted({c.n for c in self.checks if c.n is not None})
        size = f"; n {ns[0]}" if len(ns) == 1 else (f"; n {ns[0]}-{ns[-1]}" if ns else "")
        claim = [s for s, c in zip(self.status, self.checks) if not c.control]
        counts = ", ".join(f"{claim.count(s)} {s}" for s in STATUSES if claim.count(s))
        return f"{self.verdict} ({counts} of {len(claim)} checks; alpha {self.alpha}, {self.correction}{size})"


def _validate(checks: Sequence[Check], alpha: float) -> None:
    """Refuse checks the rule cannot judge fairly, saying what to declare instead."""
    if not checks:
        raise EmbgeoInputError("A verdict needs at least one check.")
    if not 0 < alpha < 1:
        raise EmbgeoInputError(f"alpha must lie in (0, 1), got {alpha}.")
    if all(c.control for c in checks):
        raise EmbgeoInputError("A verdict needs at least one check of the claim itself, not only positive controls.")
    for c in checks:
        if not np.isfinite(c.effect):
            raise EmbgeoInputError(f"Check {c.name!r} has a NaN/inf effect; compute it on valid data.")
        if c.p_value is not None and not (0 <= c.p_value <= 1):
            raise EmbgeoInputError(f"Check {c.name!r} has p-value {c.p_value}, outside [0, 1].")
        if c.se is not None and not (np.isfinite(c.se) and c.se >= 0):
            raise EmbgeoInputError(f"Check {c.name!r} has standard error {c.se}; it must be finite and non-negative.")
        if c.p_value is not None and not (np.isfinite(c.min_effect) and c.min_effect > 0):
            raise EmbgeoInputError(
                f"Check {c.name!r} is tested but its smallest effect that counts is {c.min_effect}: declare the "
                "minimum the claim's words need (min_effect > 0) and where it comes from (min_effect_source)."
            )
        if c.p_value is not None and not c.min_effect_source.strip():
            raise EmbgeoInputError(
                f"Check {c.name!r} has no min_effect_source: say where its minimum of {c.min_effect} comes from "
                "(the paper's number, a fraction of a ceiling, or a practical threshold with its reason)."
            )


def permutation_floor(checks: Sequence[Check], alpha: float = 0.01) -> list[str]:
    """Checks whose permutation p-value can never pass, with the permutations each would need (every chapter).

    A permutation p-value is at least ``1 / (n_permutations + 1)``; times ``corrected_for`` and, at Holm's first
    step, times the number ``m`` of tested checks in its family, its adjusted value is at least
    ``m * corrected_for / (n_permutations + 1)``. When that is not below ``alpha`` the check could not hold
    whatever the data say. Returns one message per such check (empty when every check can pass).
    """
    problems = []
    for family in (False, True):
        members = [c for c in checks if c.p_value is not None and c.control == family]
        m = len(members)
        for c in members:
            if c.n_permutations is None:
                continue
            floor = m * c.corrected_for / (c.n_permutations + 1)
            if floor >= alpha:
                needed = int(np.floor(m * c.corrected_for / alpha))
                problems.append(
                    f"{c.name!r}: {c.n_permutations} permutations give an adjusted p of at least {floor:.3g} "
                    f"(>= alpha {alpha}) over {m} tested checks; use at least {needed} permutations"
                )
    return problems


def _status(c: Check, p_adj: float | None, alpha: float, level_m: int) -> tuple[str, float | None]:
    """A check's status and its effect's one-sided upper confidence bound at level ``alpha / level_m``.

    The bound uses the normal quantile, or Student's t with ``c.df`` degrees of freedom when the check has them.
    """
    upper = None if c.se is None else float(c.effect + _quantile(1 - alpha / level_m, c.df) * c.se)
    if c.effect > 0 and c.effect >= c.min_effect and (p_adj is None or p_adj < alpha):
        return "holds", upper
    if upper is None:
        return "inconclusive", None
    return ("absent" if upper < c.min_effect else "inconclusive"), upper


def verdict(checks: Sequence[Check], alpha: float = 0.01, correction: str = "holm") -> Verdict:
    """The book's one verdict rule (every chapter; the Claims ledger prints it).

    A claim is tested by checks, each with an effect signed so that the claimed direction is positive, a smallest
    effect that counts (positive, with its source: the paper's number, a fraction of a ceiling, or a practical
    threshold) and, unless it is descriptive, a p-value. The p-values of the claim's checks are adjusted together
    (Holm by default); positive controls form a family of their own. A check **holds** when its effect is positive,
    at least its minimum and its adjusted p-value below ``alpha``; it is **absent** when the one-sided upper
    confidence bound of its effect (from its standard error, at level ``alpha`` over the number of tested checks)
    lies below the minimum, so the data rule out an effect as large as the claim needs; otherwise it is
    **inconclusive** (a check without a standard error cannot be absent). A claim whose positive control does not
    hold is **inconclusive (positive control failed)**, whatever its other checks say. Otherwise the claim is
    **reproduced** when every check holds, **partly reproduced** when some do, **not reproduced** when none holds
    and every check is absent, and **inconclusive** when none holds and at least one is inconclusive.

    Next to each tested check with a standard error the verdict reports the smallest effect its test detects with
    power 0.8 (:func:`detectable_effect`) and the upper confidence bound of its effect.

    Raises:
        EmbgeoInputError: on no checks, only controls, an alpha outside (0, 1), a NaN effect, a p-value outside
            [0, 1], a tested check without a positive minimum effect and its source, or a permutation test whose
            smallest achievable adjusted p-value cannot go below alpha (the message names the permutations needed).
    """
    _validate(checks, alpha)
    floors = permutation_floor(checks, alpha)
    if floors:
        raise EmbgeoInputError("Permutation tests too small to ever pass: " + "; ".join(floors) + ".")
    adjusted: list[float | None] = [None] * len(checks)
    for family in (False, True):
        tested = [i for i, c in enumerate(checks) if c.p_value is not None and c.control == family]
        for i, p in zip(tested, adjust([checks[i].p_value for i in tested], correction) if tested else []):
            adjusted[i] = float(p)
    family_size = {
        family: max(1, sum(c.p_value is not None and c.control == family for c in checks)) for family in (False, True)
    }
    judged = [_status(c, p, alpha, family_size[c.control] * c.corrected_for) for c, p in zip(checks, adjusted)]
    status = tuple(s for s, _ in judged)
    detectable = tuple(
        detectable_effect(c.se, alpha, family_size[c.control] * c.corrected_for, df=c.df)
        if c.se is not None and c.p_value is not None
        else None
        for c in checks
    )
    return Verdict(
        _claim_label(checks, status), tuple(checks), tuple(adjusted), status, float(alpha), correction, detectable,
        tuple(u for _, u in judged),
    )  # fmt: skip


def _claim_label(checks: Sequence[Check], status: Sequence[str]) -> str:
    if any(c.control and s != "holds" for c, s in zip(checks, status)):
        return "inconclusive (positive control failed)"
    claim = [s for c, s in zip(checks, status) if not c.control]
    if all(s == "holds" for s in claim):
        return "reproduced"
    if any(s == "holds" for s in claim):
        return "partly reproduced"
    return "not reproduced" if all(s == "absent" for s in claim) else "inconclusive"


#: The rule in words, as the Claims ledger shows it.
VERDICT_RULE = " ".join((verdict.__doc__ or "").split("\n\n")[1].split())
