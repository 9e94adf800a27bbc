"""Tests for the chapter-4 run, tables and claim checks in embgeo_utils.chapters.ch04_layerwise_geometry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from embgeo_utils.chapters import ch04_layerwise_geometry as ch04
from embgeo_utils.chapters.claims import CLAIMS
from embgeo_utils.core import stats
from embgeo_utils.core.errors import EmbgeoInputError

N_LAYERS, N_PROMPTS, N_TOKENS = 12, 16, 256


def _model(
    name: str,
    levels: tuple[int, ...],
    rng: np.random.Generator,
    n_prompts: int = N_PROMPTS,
    hump: bool = True,
    loss_up: bool = True,
    id_up: bool = True,
    cosine_up: bool = True,
    overlap_down: bool = True,
    correlated: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Synthetic geometry and losses of one model; each flag plants one effect of claims 1-5."""
    layer = np.arange(1, N_LAYERS + 1)
    u = rng.standard_normal(n_prompts)  # per-prompt difficulty
    rows, loss_rows = [], []
    for S in levels:
        frac = S / max(max(levels), 1)
        loss = 2.0 + (3.0 * frac if loss_up else 0.0) + 0.3 * u
        shape = np.sin(np.pi * layer / (N_LAYERS + 1)) if hump else np.zeros(N_LAYERS)
        for p in range(n_prompts):
            id_ = 4.0 + 6.0 * shape + (3.0 * frac * shape if id_up else 0.0)
            id_ = id_ + (0.8 * u[p] if correlated else -0.8 * u[p]) + 0.05 * rng.standard_normal(N_LAYERS) * hump
            cos = 0.3 + (0.3 * frac * (layer > 2 * N_LAYERS / 3) if cosine_up else 0.0)
            cos = cos + 0.01 * rng.standard_normal(N_LAYERS) * cosine_up
            chi = 0.8 - (0.3 * frac if overlap_down else 0.0) + 0.01 * rng.standard_normal(N_LAYERS) * overlap_down
            chi = np.where(layer < N_LAYERS, chi, np.nan)
            for j, lay in enumerate(layer):
                rows.append(
                    {
                        "model": name,
                        "S": S,
                        "prompt": p,
                        "layer": int(lay),
                        "depth": lay / N_LAYERS,
                        "ID": float(id_[j]),
                        "cos_mean": float(cos[j]),
                        "chi_1": float(chi[j]),
                        "loss": float(loss[p]),
                    }
                )
            loss_rows.append({"model": name, "S": S, "prompt": p, "loss": float(loss[p])})
    return pd.DataFrame(rows), pd.DataFrame(loss_rows)


def _run(
    levels: tuple[int, ...] = (0, 1, 2, 5), seed: int = 0, n_prompts: int = N_PROMPTS, **per_model: dict
) -> ch04.LayerwiseRun:
    rng = np.random.default_rng(seed)
    parts = [_model(name, levels, rng, n_prompts, **flags) for name, flags in per_model.items()]
    return ch04.LayerwiseRun(
        geometry=pd.concat([g for g, _ in parts], ignore_index=True),
        losses=pd.concat([lo for _, lo in parts], ignore_index=True),
        curves=pd.DataFrame(),
        sources=pd.DataFrame(),
        n_tokens=N_TOKENS,
    )


ABSENT = {
    "hump": False,
    "loss_up": False,
    "id_up": False,
    "cosine_up": False,
    "overlap_down": False,
    "correlated": False,
}


def _verdicts(run: ch04.LayerwiseRun) -> list[str]:
    return [c.verdict.verdict for c in ch04.check_claims(run, alpha=0.01)]


def test_planted_effects_are_reproduced() -> None:
    run = _run(a={}, b={})
    claims = ch04.check_claims(run, alpha=0.01)
    assert [c.number for c in claims] == [1, 2, 3, 4, 5]
    assert [c.verdict.verdict for c in claims] == ["reproduced"] * 5
    for c in claims:
        assert isinstance(c.verdict, stats.Verdict)
        assert list(c.table.index) == ["a", "b"] and c.table["holds"].all()
        assert c.verdict.correction == "holm" and c.verdict.alpha == 0.01
    assert claims[0].table.loc["a", "peak layer"] in (6, 7)
    assert len(claims[1].verdict.checks) == 8  # loss, peak ID and two monotonicity checks per model
    assert claims[0].statement == CLAIMS[1][0] and "rises then falls" in claims[0].statement


def test_absent_effects_are_not_reproduced() -> None:
    # 64 prompts: enough to rule out every minimum effect (with 16, a rank correlation of 0.3 cannot be ruled out)
    assert _verdicts(_run(n_prompts=64, a=ABSENT, b=ABSENT)) == ["not reproduced"] * 5
    short = ch04.check_claim2(*(lambda r: (r.geometry, r.losses))(_run(a=ABSENT, b=ABSENT)), N_TOKENS)
    assert short.verdict.verdict == "inconclusive"  # 16 prompts: absence of the rank correlation not shown


def test_mixed_models_are_partly_reproduced() -> None:
    run = _run(a={}, b=ABSENT)
    assert _verdicts(run) == ["partly reproduced"] * 5
    claims = ch04.check_claims(run)
    assert claims[0].table["holds"].tolist() == [True, False]
    assert claims[0].table.loc["b", "checks holding"] == "0 of 3"


def test_loss_half_alone_makes_claim2_partly() -> None:
    run = _run(a={"id_up": False}, b={"id_up": False})
    c = ch04.check_claim2(run.geometry, run.losses, N_TOKENS, alpha=0.01)
    assert c.verdict.verdict == "partly reproduced"
    table = c.verdict.table()
    loss_checks = table.loc[[n for n in table.index if "loss rises" in n or "mean loss" in n]]
    id_checks = table.loc[[n for n in table.index if "peak ID" in n]]
    assert (loss_checks["status"] == "holds").all() and not (id_checks["status"] == "holds").any()


def test_claim1_descriptive_peak_check() -> None:
    run = _run(a={})
    c = ch04.check_claim1(run.geometry)
    interior = c.verdict.checks[0]
    assert "interior" in interior.name and interior.p_value is None and interior.min_effect == 1.0
    rising = run.geometry.assign(ID=run.geometry["ID"] + 2.0 * run.geometry["layer"])  # peak at the last layer
    c = ch04.check_claim1(rising)
    assert c.verdict.verdict == "partly reproduced"  # only "peak > first layer" holds
    assert c.verdict.holds == (False, True, False)


def test_claim5_uses_bonferroni_over_layers() -> None:
    run = _run(a={})
    c = ch04.check_claim5(run.geometry)
    row = c.table.loc["a"]
    assert row["p (Bonferroni)"] == pytest.approx(min(1.0, row["p"] * N_LAYERS))
    assert c.verdict.checks[0].p_value == pytest.approx(row["p (Bonferroni)"])
    assert c.value == pytest.approx(row["max r"])


def test_monotonicity_uses_distinct_levels_only() -> None:
    assert ch04.distinct_levels([0, 1, 2, 3, 4, 5], 256) == [0, 1, 2, 3, 4]
    assert ch04.distinct_levels([5, 0], 64) == [0, 5]
    assert ch04.distinct_levels([4, 5], 64) == [4]
    with pytest.raises(EmbgeoInputError, match="non-negative integers"):
        ch04.distinct_levels([0, -1], 64)


def test_claims_need_two_levels_and_the_columns() -> None:
    run = _run(levels=(0,), a={})
    assert ch04.check_claim1(run.geometry).verdict.verdict == "reproduced"
    with pytest.raises(EmbgeoInputError, match="add a higher level"):
        ch04.check_claim3(run.geometry)
    with pytest.raises(EmbgeoInputError, match="lacks the column"):
        ch04.check_claim4(run.geometry.drop(columns="chi_1"))
    with pytest.raises(EmbgeoInputError, match="LayerwiseRun"):
        ch04.check_claims(run.geometry)


def test_tables() -> None:
    run = _run(a={}, b=ABSENT)
    peaks = ch04.id_peaks(run.geometry)
    assert list(peaks.columns) == ["peak ID", "peak layer", "layers", "first-layer ID", "last-layer ID"]
    assert peaks.loc[("a", 0), "peak layer"] in (6, 7) and peaks.loc[("a", 0), "layers"] == N_LAYERS
    mean_id = run.geometry.query("model == 'a' and S == 5").groupby("layer")["ID"].mean()
    assert peaks.loc[("a", 5), "peak ID"] == pytest.approx(mean_id.max())
    losses = ch04.loss_table(run.losses)
    assert losses.shape == (2, 4) and losses.loc["a", 5] > losses.loc["a", 0]
    cos = ch04.max_mean_cosine(run.geometry)
    assert cos.loc["a", 5] > cos.loc["a", 0]
    corr = ch04.id_loss_correlation(run.geometry)
    assert set(corr["prompts"]) == {"S = 0", "all S pooled"} and len(corr) == 2 * 2 * N_LAYERS
    best = ch04.strongest_correlation(corr)
    assert best.loc[("a", "S = 0"), "r"] > 0.9
    assert best.loc[("b", "S = 0"), "r"] < 0
    comparison = ch04.paper_comparison(peaks, losses, cos, models=["b", "a"])
    assert list(comparison.index[-2:]) == ["b", "a"]
    assert {"peak ID S=0", "peak ID S=5", "loss S=5", "max mean cos S=0"} <= set(comparison.columns)
    assert comparison.loc["Llama-3-8B (P2)", "loss S=5"] == 7.49
    curves = pd.DataFrame(
        {"model": "a", "S": 0, "peak layer": 3, "prompt": [0, 0, 1, 1], "n2": [2, 4, 2, 4], "ID": [1.0, 2.0, 3.0, 4.0]}
    )
    np.testing.assert_allclose(ch04.scale_curve_table(curves).to_numpy(), [[2.0, 3.0]])
    with pytest.raises(EmbgeoInputError, match="lacks the column"):
        ch04.loss_table(run.geometry.drop(columns="loss"))


def test_summary_names_verdicts_and_models() -> None:
    run = _run(a={}, b=ABSENT)
    text = ch04.claims_summary(ch04.check_claims(run), ch04.id_peaks(run.geometry))
    assert text.count("*partly reproduced* — holds in a.") == 5
    assert "ID–loss correlation at S = 0" in text


def test_plots_return_figures() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = _run(a={})
    curves = pd.DataFrame(
        {"model": "a", "S": [0, 0, 5, 5], "peak layer": 3, "prompt": 0, "n2": [2, 4, 2, 4], "ID": [1.0, 2.0, 3.0, 4.0]}
    )
    figures = [
        ch04.plot_layer_profiles(run.geometry, "ID", "ID", "title", show=False),
        ch04.plot_gride_scale_curves(curves, show=False),
        ch04.plot_loss_by_shuffle_level(run.losses, show=False),
        ch04.plot_id_loss_correlation_by_layer(ch04.id_loss_correlation(run.geometry), show=False),
    ]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures)
    plt.close("all")
    with pytest.raises(EmbgeoInputError, match="lacks the column"):
        ch04.plot_layer_profiles(run.geometry, "chi_9", "", "", show=False)


def test_parameters_list_the_models(chapter_params) -> None:
    p = chapter_params(ch04, model_names=["smollm2-135m", "gemma3-270m"])
    assert ch04.CHAPTER == "ch04_layerwise_geometry" and ch04.TITLE == "Layerwise token geometry"
    assert p.models() == ["smollm2-135m", "gemma3-270m"]


@pytest.mark.models
def test_run_layerwise_on_a_real_model(smollm, device, tmp_cache, chapter_params) -> None:
    p = chapter_params(
        ch04, model_names=["smollm2-135m"], n_prompts=3, n_tokens=24, shuffle_levels=[5, 0], scales=[2, 4],
        scale_curve_max=8, overlap_k=[1], device=str(device),
    )  # fmt: skip
    run = ch04.run_layerwise(["smollm2-135m"], p, loader=lambda name: smollm)
    L = smollm.info.n_layers
    assert run.models == ["smollm2-135m"] and run.shuffle_levels == [0, 5] and run.n_tokens == 24
    assert len(run.geometry) == 2 * 3 * L and len(run.losses) == 2 * 3 and len(run.sources) == 3
    assert {"ID", "ID n2=4", "TwoNN", "cos_mean", "cos_std", "chi_1", "loss", "depth"} <= set(run.geometry.columns)
    assert run.geometry.query("layer == @L")["chi_1"].isna().all()
    assert run.geometry.drop(columns="chi_1").notna().all().all()
    assert sorted(run.curves["n2"].unique()) == [2, 4, 8] and set(run.curves["S"]) == {0, 5}
    mean_loss = run.losses.groupby("S")["loss"].mean()
    assert mean_loss[5] > mean_loss[0]
    # one cache entry per shuffle level, under the layerwise kind
    entries = sorted((tmp_cache / "layerwise").glob("*/entry.json"))
    assert len(entries) == 2 and all(list(e.parent.glob("a*.npy")) for e in entries)
    # a rerun reads every table from the cache, without the hidden states
    with pytest.MonkeyPatch.context() as m:
        m.setattr("embgeo_utils.lm.activations.hidden_states", lambda *a, **k: pytest.fail("should read the cache"))
        again = ch04.run_layerwise(["smollm2-135m"], p, loader=lambda name: smollm)
    pd.testing.assert_frame_equal(run.geometry, again.geometry)
    pd.testing.assert_frame_equal(run.losses, again.losses)
    pd.testing.assert_frame_equal(run.curves, again.curves)
    # without the cache every level is computed again, with the same numbers
    fresh = ch04.run_model(smollm, "smollm2-135m", p, cache=False)
    pd.testing.assert_frame_equal(run.geometry, fresh.geometry)
    with pytest.raises(EmbgeoInputError, match="non-negative integers"):
        ch04.run_layerwise(["smollm2-135m"], chapter_params(ch04, shuffle_levels=[0.5]), loader=lambda name: smollm)
