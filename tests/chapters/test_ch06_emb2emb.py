"""Transferred steering (chapter 6): the claim-9 checks find planted effects and no absent ones, the native vector
gates the verdict, the units are prompts, the texts are disjoint, and the sweep and continuations are exact and
cached."""

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from embgeo_utils.chapters import ch06_emb2emb as ch06
from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.lm import corpus, models, steering

TOPICS = ["Arts", "Geography", "Mathematics"]
STRENGTHS = [1.0, 2.0]


def _sweep(rng, emb=0.6, native=1.0, lexical=0.0, null_map=0.0, n_prompts=12, n_random=60, swap=0.0):
    """A synthetic next-token table: each condition's own-topic rise per strength unit; random directions add noise."""
    rows = []
    effects = {"native": native, "emb2emb": emb, "lexical": lexical, "null map": null_map}
    for i in range(n_prompts):
        shift = rng.normal(0, 0.3)  # a prompt-level effect shared by every condition and topic
        for t in TOPICS:
            rows.append(("none", "", -1, 0.0, i, t, 0.0))
            for c, e in effects.items():
                for st in TOPICS:
                    for s in STRENGTHS:
                        mean = e * s if st == t else swap * e * s
                        rows.append((c, st, -1, s, i, t, mean + 0.1 * shift + 0.1 * rng.normal()))
    for kind in ch06.RANDOM_KINDS:
        for k in range(n_random):
            d = rng.normal(0, 0.04)
            for i in range(min(4, n_prompts)):
                for t in TOPICS:
                    for s in STRENGTHS:
                        rows.append((kind, "", k, s, i, t, d * s + 0.05 * rng.normal()))
    cols = ["condition", "topic", "direction", "strength", "prompt", "scored", "rise"]
    return pd.DataFrame(rows, columns=cols).assign(score=lambda d: d["rise"])


def _gens(rng, emb=0.2, native=0.4, rand=0.0, n_prompts=40, pair="A → B"):
    """A synthetic table of scored continuations with the chapter's rotation of topics over samples."""
    rows = []
    for i in range(n_prompts):
        shift = rng.normal(0, 0.1)
        for k in range(3):
            t = TOPICS[(i + k) % 3]
            base = {f"P({x})": float(np.clip(0.1 + shift + 0.03 * rng.normal(), 0, 1)) for x in TOPICS}
            rows.append({"condition": "none", "strength": 0.0, "prompt": i, "sample": k, "topic": t, **base})
            for c, e in (("native", native), ("emb2emb", emb), ("random (residual)", rand)):
                for s in STRENGTHS:
                    ps = {x: v + (e * s / 2 if x == f"P({t})" else 0) + 0.05 * rng.normal() for x, v in base.items()}
                    rows.append({"condition": c, "strength": s, "prompt": i, "sample": k, "topic": t, **ps})
    df = pd.DataFrame(rows)
    df["score"] = [r[f"P({r['topic']})"] for _, r in df.iterrows()]
    df["ppl ratio"] = np.where(df["condition"] == "none", 1.0, 1.2)
    return df.assign(pair=pair)


def _params(chapter_params, **kw):
    return chapter_params(ch06, strengths=STRENGTHS, n_random_prompts=4, n_permutations=5000, **kw)


def _analysis(chapter_params, rng, pair="A → B", sweep_kw=None, gen_kw=None):
    p = _params(chapter_params)
    return ch06.pair_analysis(_sweep(rng, **(sweep_kw or {})), _gens(rng, pair=pair, **(gen_kw or {})), p, pair)


def test_claim9_finds_a_planted_transfer_and_rules_out_an_absent_one(chapter_params):
    rng = np.random.default_rng(0)
    planted = ch06.check_claim9({"A → B": _analysis(chapter_params, rng)})
    assert planted.verdict == "reproduced", planted.table()
    # at each of the two fluent strengths: two controls, eight claim checks and the six further twins as controls
    assert sum(c.control for c in planted.checks) == 16 and planted.n_claim_checks == 16
    # an absent transfer is ruled out where B's own vector's effect (and so the minimum) stands clear of the noise
    zero = _analysis(chapter_params, rng, sweep_kw={"emb": 0.0, "native": 2.0}, gen_kw={"emb": 0.0})
    absent = ch06.check_claim9({"A → B": zero})
    assert absent.verdict == "not reproduced", absent.table()
    mixed = ch06.check_claim9(
        {
            "A → B": _analysis(chapter_params, rng),
            "C → D": _analysis(chapter_params, rng, "C → D", {"emb": 0.0}, {"emb": 0.0}),
        }
    )
    assert mixed.verdict == "partly reproduced"
    assert all(h for c, h in zip(mixed.checks, mixed.holds) if c.name.startswith("A → B"))


def test_a_native_vector_that_does_not_steer_makes_the_claim_inconclusive(chapter_params):
    rng = np.random.default_rng(1)
    dead = _analysis(chapter_params, rng, sweep_kw={"native": 0.0}, gen_kw={"native": 0.0, "emb": 0.0})
    v = ch06.check_claim9({"A → B": dead})
    assert v.verdict == "inconclusive (positive control failed)"
    # the minimum a carried vector needs is a fraction of the native effect, never zero
    assert all(c.min_effect > 0 and c.min_effect_source for c in v.checks)


def test_controls_can_fail_the_claim(chapter_params):
    """A lexical vector as strong as the carried one, a carried vector as strong on every topic, and random
    directions as strong as it each fail their own check and no other."""
    rng = np.random.default_rng(2)
    lexical = ch06.check_claim9({"A → B": _analysis(chapter_params, rng, sweep_kw={"lexical": 0.6})})
    failed = [c.name for c, h in zip(lexical.checks, lexical.holds) if not h]
    assert failed == [f"A → B: EMB2EMB > lexical vector of the topic's tokens (next token) at strength {s:g}"
                      for s in STRENGTHS]  # fmt: skip
    unspecific = _analysis(chapter_params, rng, gen_kw={"emb": 0.2})
    gens = _gens(rng)
    emb = gens["condition"] == "emb2emb"
    for t in TOPICS:  # the carried vector raises every topic alike
        gens.loc[emb, f"P({t})"] = gens.loc[emb, "score"]
    unspecific = ch06.pair_analysis(_sweep(rng), gens, _params(chapter_params), "A → B")
    assert unspecific.generation["emb2emb: own topic − swapped topic"].effect == pytest.approx(0, abs=0.02)
    assert unspecific.by_strength[1.0].generation["emb2emb: own topic − swapped topic"].effect == pytest.approx(
        0, abs=0.03
    )
    strong_random = ch06.pair_analysis(_sweep(rng), _gens(rng, rand=0.2), _params(chapter_params), "A → B")
    v = ch06.check_claim9({"A → B": strong_random})
    names = [c.name for c in v.checks]
    assert not v.holds[names.index("A → B: EMB2EMB > random residual directions (continuations) at strength 1")]


def test_broken_text_is_not_steering(chapter_params):
    """A carried vector whose continuations are broken text (median perplexity ratio above the gate) is not read at
    that strength, however on-topic the scorer finds it; broken at every strength, the claim is inconclusive."""
    rng = np.random.default_rng(6)
    p = _params(chapter_params)
    gens = _gens(rng, emb=0.4)
    gens.loc[(gens["condition"] == "emb2emb") & (gens["strength"] == 2.0), "ppl ratio"] = 50.0
    a = ch06.pair_analysis(_sweep(rng), gens, p, "A → B")
    assert ch06.usable_strengths(a) == [1.0]
    v = ch06.check_claim9({"A → B": a})
    assert v.verdict == "reproduced" and all(c.name.endswith("at strength 1") for c in v.checks)
    gens.loc[gens["condition"] == "emb2emb", "ppl ratio"] = 50.0
    broken = ch06.check_claim9({"A → B": ch06.pair_analysis(_sweep(rng), gens, p, "A → B")})
    assert broken.verdict == "inconclusive", broken.table()
    assert any("keeps its continuations fluent" in c.name for c in broken.checks)


def test_a_comparison_the_native_vector_fails_is_not_informative(chapter_params):
    """A lexical vector stronger than B's own vector: the lexical comparison says nothing about the carried vector,
    so it is left out of the checks (and listed as not informative), and the rest of the verdict stands."""
    rng = np.random.default_rng(7)
    a = _analysis(chapter_params, rng, sweep_kw={"lexical": 1.5})
    v = ch06.check_claim9({"A → B": a})
    assert v.verdict == "reproduced" and not any("lexical" in c.name for c in v.checks)
    table = ch06.claim_checks(a)[1]
    lexical = table[table["check"].str.contains("lexical")]
    assert len(lexical) == 2 and not lexical["informative"].any() and table["informative"].sum() == 14


def test_the_unit_is_the_prompt(chapter_params):
    """Every comparison has one unit per prompt; with noise shared by all of a prompt's topics, samples and strengths
    the prompt-level sign flip keeps its level, where nine units per prompt taken as independent would not."""
    rng = np.random.default_rng(3)
    a = ch06.pair_analysis(_sweep(rng), _gens(rng, n_prompts=20), _params(chapter_params), "A → B")
    assert {c.n for c in a.generation.values()} == {20} and {c.n for c in a.forward.values()} == {12}
    prompt_level, unit_level = 0, 0
    for _ in range(100):
        shared = np.repeat(rng.normal(0, 1, size=16), 9) + 0.1 * rng.normal(size=16 * 9)
        prompt_level += (
            ch06.compare_prompts(pd.Series(shared).groupby(np.arange(16 * 9) // 9).mean(), 500).p_value < 0.05
        )
        unit_level += ch06.compare_prompts(pd.Series(shared), 500).p_value < 0.05
    assert prompt_level <= 12 and unit_level >= 25


def test_a_vector_is_compared_with_random_directions_as_a_distribution():
    null = np.random.default_rng(4).normal(0, 1, size=100)
    far = ch06.beyond_random(6.0, null)
    assert far.p_value < 1 / 101 and far.empirical_p == pytest.approx(1 / 101) and far.n == 100
    inside = ch06.beyond_random(float(np.median(null)), null)
    assert inside.p_value > 0.3 and inside.empirical_p > 0.3
    with pytest.raises(EmbgeoInputError, match="at least 3"):
        ch06.beyond_random(1.0, null[:2])


def test_texts_are_disjoint_and_prompts_are_not_summaries(chapter_params):
    small = {"n_build": 5, "n_classifier": 10, "n_score_texts": 6, "n_heldout": 7, "n_other": 20, "n_map_texts": 12}
    p = chapter_params(ch06, topics=TOPICS, confirm_topics=["History"], **small)
    tx = ch06.topic_texts(p, TOPICS)
    for t in TOPICS:
        parts = [tx.build[t], tx.classifier[t], tx.score[t], tx.heldout[t]]
        assert [len(x) for x in parts] == [5, 10, 6, 7] and len({x for part in parts for x in part}) == 28
    every = {x for d in (tx.build, tx.classifier, tx.score, tx.heldout) for v in d.values() for x in v}
    rest = tx.other + tx.other_heldout + tx.map_texts
    assert len(set(rest)) == 52 and not set(rest) & every
    history = {r["extract"] for r in corpus.wiki_summaries() if r["topic"] == "History"}
    assert not set(rest) & history  # a topic of either set never feeds the controls or the scorer's "other" class
    # a topic's split does not depend on the other topics of its set
    assert ch06.topic_texts(p, ["Arts", "Mathematics"]).build["Arts"] == tx.build["Arts"]
    neutral = ch06.neutral_texts(chapter_params(ch06, n_prompts=9, prompt_words=8, n_other=10, window_words=6))
    assert len(set(neutral.prompts)) == 9 and all(len(x.split()) == 8 for x in neutral.prompts)
    assert all(len(x.split()) <= 6 for x in neutral.fit + neutral.heldout) and len(neutral.fit) == 10
    summaries = " ".join(r["extract"] for r in corpus.wiki_summaries())
    assert not any(x in summaries for x in neutral.prompts)
    assert not any(x in " ".join(neutral.prompts) for x in neutral.fit + neutral.heldout)
    with pytest.raises(EmbgeoInputError, match="Unknown topic"):
        ch06.topic_texts(p, ["Cooking", "Arts"])
    with pytest.raises(EmbgeoInputError, match="two distinct"):
        ch06.topic_texts(p, ["Arts"])


def test_topic_tokens_find_the_planted_word(smollm):
    texts = {
        "a": ["The violin and the violin again, a violin concerto."] * 3,
        "b": ["The river and the mountain, the river valley."] * 3,
    }
    toks = ch06.topic_tokens(smollm.tokenizer, texts, k=3, min_count=3)
    assert " violin" in [smollm.tokenizer.decode([i]) for i in toks["a"]]
    assert " river" in [smollm.tokenizer.decode([i]) for i in toks["b"]]


def test_scorer_is_fitted_and_validated_on_windows(chapter_params):
    enc = models.load("minilm-l6")
    small = {"n_build": 2, "n_classifier": 20, "n_score_texts": 2, "n_heldout": 10, "n_other": 30, "n_map_texts": 6}
    p = chapter_params(ch06, topics=TOPICS, confirm_topics=[], n_prompts=4, window_words=15, **small)
    scorer = ch06.fit_scorer(enc, ch06.topic_texts(p, TOPICS), ch06.neutral_texts(p), p)
    assert scorer.classes == sorted([*TOPICS, ch06.OTHER]) and scorer.accuracy > 0.5
    assert scorer.validation.set_index("class")["windows"].to_dict() == {**{t: 10 for t in TOPICS}, "other": 60}
    proba = scorer.proba(["The painting hangs in the museum beside a sculpture.", ""])
    assert proba.shape == (2, 4) and np.allclose(proba.sum(axis=1), 1)


def _transfer(loaded, n_random=3):
    g = torch.Generator().manual_seed(0)
    d = loaded.info.d_model
    vectors = {c: {t: torch.randn(d, generator=g) for t in TOPICS[:2]} for c in ("native", "emb2emb")}
    random = {k: torch.nn.functional.normalize(torch.randn(n_random, d, generator=g), dim=1) for k in ch06.RANDOM_KINDS}
    scales = {"median norm": 10.0, "massive dims": 0.0, "median norm without massive dims": 10.0}
    return ch06.Transfer(("smollm2-135m", "smollm2-135m"), (30, 30), 6, 6, TOPICS[:2], 5.0, scales, {}, vectors, random)


@torch.no_grad()
def test_next_token_scores_are_the_steered_forward_pass_and_cached(
    smollm, chapter_params, tmp_cache, monkeypatch, caplog
):
    tr = _transfer(smollm)
    p = chapter_params(
        ch06, strengths=[2.0], sweep_strengths=[2.0], n_sweep_prompts=2, n_random=3, n_random_prompts=1, batch_size=4
    )
    prompts = ["The cat sat on the mat and looked at the door.", "Rain fell on the quiet town."]
    tokens = {t: [100 + i, 200 + i] for i, t in enumerate(TOPICS[:2])}
    table = ch06.next_token_scores(smollm, tr, prompts, tokens, p)
    assert len(table) == (2 * 2 * 1 * 2 + 2 * 3 * 1 * 1 + 2) * 2
    row = table[
        (table["condition"] == "emb2emb")
        & (table["topic"] == TOPICS[1])
        & (table["prompt"] == 1)
        & (table["scored"] == TOPICS[1])
    ]
    ids = torch.tensor([steering.encode_texts(smollm, prompts[1:])[0]], device=smollm.device)
    with steering.steer(smollm, 6, tr.direction("emb2emb", TOPICS[1]) * 2.0 * tr.unit, 1.0):
        logp = torch.log_softmax(smollm.model(input_ids=ids).logits[0, -1].float(), dim=-1)
    assert float(row["score"].iloc[0]) == pytest.approx(float(torch.logsumexp(logp[tokens[TOPICS[1]]], 0)), abs=1e-4)
    none = table[(table["condition"] == "none") & (table["prompt"] == 1) & (table["scored"] == TOPICS[1])]
    assert float(row["rise"].iloc[0]) == pytest.approx(float(row["score"].iloc[0] - none["score"].iloc[0]), abs=1e-6)

    def broken(*args, **kwargs):
        raise AssertionError("the cached table should have been read")

    with monkeypatch.context() as m:
        m.setattr(smollm.model, "forward", broken)
        again = ch06.next_token_scores(smollm, tr, prompts, tokens, p)
    pd.testing.assert_frame_equal(table, again)
    entries = list(tmp_cache.glob("next_token_scores/*/entry.json"))
    for column in entries[0].parent.glob("a*.npy"):
        column.write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING, logger="embgeo"):
        rebuilt = ch06.next_token_scores(smollm, tr, prompts, tokens, p)
    assert "damaged" in caplog.text
    pd.testing.assert_frame_equal(table, rebuilt)


def test_continuations_rotate_topics_share_the_unsteered_ones_and_are_cached(
    smollm, chapter_params, tmp_cache, monkeypatch
):
    tr = _transfer(smollm)
    p = chapter_params(
        ch06, strengths=[1.0, 2.0], n_samples=1, max_new_tokens=3, n_ppl_prompts=1, n_random=3, gen_batch_size=8
    )
    prompts = ["The cat sat on the mat and", "Rain fell on the quiet town", "In the laboratory, the"]
    gens = ch06.steered_continuations(smollm, tr, prompts, p)
    steered = gens[gens["condition"] != "none"]
    assert len(gens) == 3 * 2 + 3 * 2 * 3 * 2 and set(steered["condition"]) == set(ch06.GENERATED[1:])
    # sample s of prompt i goes to topic (i + s) mod topics, in every condition and strength
    assert all(t == TOPICS[(i + s) % 2] for t, i, s in zip(gens["topic"], gens["prompt"], gens["sample"]))
    assert gens["nll"].notna().sum() == gens["prompt"].eq(0).sum()
    assert np.allclose(gens.loc[(gens["condition"] == "none") & gens["nll"].notna(), "ppl ratio"], 1.0)
    assert (gens["tokens"] <= 3).all()
    other = ch06.Transfer(**{**tr.__dict__, "topics": TOPICS[:2][::-1]})

    def broken(*args, **kwargs):
        raise AssertionError("the cached continuations should have been read")

    with monkeypatch.context() as m:
        m.setattr(smollm.model, "forward", broken)
        again = ch06.steered_continuations(smollm, tr, prompts, p)
        with pytest.raises(AssertionError, match="cached continuations"):
            ch06.steered_continuations(smollm, other, prompts, p)  # other topics: new steered continuations ...
    assert len(list(tmp_cache.glob("steered_continuations/*/entry.json"))) == 2  # ... but the unsteered ones are shared
    pd.testing.assert_frame_equal(gens, again)
    scored = ch06.score_continuations(gens, _Uniform())
    assert set(scored["score"]) == {0.5} and "P(Arts)" in scored


class _Uniform:
    """A stand-in scorer: the same probability for every class."""

    classes = TOPICS[:2]

    def proba(self, texts):
        return np.full((len(texts), 2), 0.5)


def test_a_topic_sets_claim_reports_power_checks_and_dose_response(chapter_params):
    """evaluate_claim9 on a planted transfer: the summary names every check with its status, the detectable effect
    and the power target; the dose-response table has one row per condition and strength of each measure."""
    rng = np.random.default_rng(5)
    d = 8
    scales = {"median norm": 10.0, "massive dims": 1.0, "median norm without massive dims": 5.0}
    vectors = {"native": {t: torch.ones(d) for t in TOPICS}}
    tr = ch06.Transfer(("A", "B"), (4, 4), 2, 2, TOPICS, 2.0, scales, {}, vectors, {})
    run = ch06.PairRun(tr, {}, _sweep(rng), _gens(rng))
    scorer = type("S", (), {"accuracy": 0.9})()
    claim = ch06.evaluate_claim9({"A → B": run}, scorer, _params(chapter_params), "development")
    by_strength = claim.analyses["A → B"].by_strength
    assert claim.verdict.verdict == "reproduced" and claim.value == pytest.approx(
        min(by_strength[s].generation["emb2emb − none"].effect for s in STRENGTHS)
    )
    power = claim.power_table()
    assert len(power) == 6 and (power["n"] == 40).all() and power["target met"].all()
    text = claim.summary()
    assert "detectable effect" in text and text.count(", holds") == 32 and "(control)" in text
    assert "emb2emb 1.2 at 1, 1.2 at 2" in text  # the median perplexity ratios, per condition and strength
    dose = ch06.dose_response({"A → B": run}, n_boot=200)
    cont = dose[dose["measure"] == "continuations"]
    assert set(cont["condition"]) == set(ch06.GENERATED[1:]) and (cont["n"] == 40).all()
    units = ch06.strength_units([tr], STRENGTHS)
    assert units["x median residual norm"].tolist() == pytest.approx([0.2, 0.4])
    assert units["x median norm without massive dims"].tolist() == pytest.approx([0.4, 0.8])
