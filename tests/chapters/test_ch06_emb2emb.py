"""Transferred steering (chapter 6): the sweep's shortcuts are exact, and the claim-9 check finds planted effects."""

import logging
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from embgeo_utils.chapters import ch06_emb2emb as ch06
from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.lm import corpus, models, steering

TOPICS = ["Arts", "Geography", "Mathematics"]


def _sweep(pair, effect, rng, alphas=(0.5, 1.0), ratio=1.2, n_prompts=12, native=1.0):
    """A synthetic sweep table: ``effect`` is the transferred vector's rise in nats, random vectors do nothing."""
    rows = []
    for t in TOPICS:
        for p in range(n_prompts):
            rows.append((pair, "none", t, 0.0, p, 0.0, 1.0))
            for al in alphas:
                for cond, mean in (("emb2emb", effect * al), ("random", 0.0), ("native", native * al)):
                    rows.append((pair, cond, t, al, p, mean + 0.3 * rng.normal(), ratio * np.exp(0.05 * rng.normal())))
    return pd.DataFrame(rows, columns=["pair", "condition", "topic", "alpha", "prompt", "rise", "ppl ratio"])


def _gens(pair, effect, rng, n_prompts=6, ratio=1.3):
    rows = []
    for t in TOPICS:
        for p in range(n_prompts):
            rows.append((pair, "none", t, 0.5, p, 0.3 + 0.05 * rng.normal(), 1.0))
            rows.append((pair, "random", t, 0.5, p, 0.3 + 0.05 * rng.normal(), ratio))
            rows.append((pair, "native", t, 0.5, p, 0.8 + 0.05 * rng.normal(), ratio))
            rows.append((pair, "emb2emb", t, 0.5, p, 0.3 + effect + 0.05 * rng.normal(), ratio))
    return pd.DataFrame(rows, columns=["pair", "condition", "topic", "alpha", "prompt", "score", "ppl ratio"])


def test_claim9_planted_effect_is_found_and_absent_is_not():
    rng = np.random.default_rng(0)
    planted = ch06.check_claim9(_sweep("A → B", 0.8, rng), _gens("A → B", 0.3, rng), n_permutations=2000)
    assert planted.verdict == "reproduced", planted.table()
    # with enough units, an absent transfer is ruled out (every upper bound below a tenth of the native effect) ...
    zero_sweep, zero_gens = _sweep("A → B", 0.0, rng, n_prompts=200, native=3.0), _gens("A → B", 0.0, rng, n_prompts=24)
    absent = ch06.check_claim9(zero_sweep, zero_gens, n_permutations=2000)
    assert absent.verdict == "not reproduced", absent.table()
    # ... with few units it is not: inconclusive, never "not reproduced"
    few = ch06.check_claim9(_sweep("A → B", 0.0, rng, n_prompts=3), _gens("A → B", 0.0, rng, n_prompts=3))
    assert few.verdict == "inconclusive", few.table()
    # the generation test cannot see B's own vector: the positive control fails and the claim is inconclusive
    blind = _gens("A → B", 0.3, rng)
    blind.loc[blind["condition"] == "native", "score"] = blind.loc[blind["condition"] == "none", "score"].to_numpy()
    failed = ch06.check_claim9(_sweep("A → B", 0.8, rng), blind, n_permutations=2000)
    assert failed.verdict == "inconclusive (positive control failed)", failed.table()
    both = pd.concat([_sweep("A → B", 0.8, rng), _sweep("C → D", 0.0, rng)])
    gens = pd.concat([_gens("A → B", 0.3, rng), _gens("C → D", 0.0, rng)])
    mixed = ch06.check_claim9(both, gens, n_permutations=2000)
    assert mixed.verdict == "partly reproduced"
    assert all(h for c, h in zip(mixed.checks, mixed.holds) if c.name.startswith("A → B"))


def test_claim9_needs_fluency_and_reports_the_native_fraction():
    rng = np.random.default_rng(1)
    broken = ch06.check_claim9(_sweep("A → B", 0.8, rng, ratio=3.0), n_permutations=500)
    # no fluent strength on the grid is no evidence that none exists: inconclusive, not "not reproduced"
    assert broken.verdict == "inconclusive" and "perplexity" in broken.checks[0].name
    r = ch06.pair_analysis(_sweep("A → B", 0.5, rng, native=1.0), n_permutations=500)
    assert r.alpha_star == 1.0 and r.admissible_alphas == [0.5, 1.0] and r.generations is None
    assert r.sweep is not None and r.sweep.fraction_of_native == pytest.approx(0.5, abs=0.15)
    assert ch06.best_strength(_sweep("A → B", 0.5, rng, native=1.0)) == 1.0


def test_pair_analysis_records_the_keys_of_the_chapter_record():
    rng = np.random.default_rng(2)
    sweep_keys = ["alpha*", "units", "rise", "rise random", "rise native", "ppl ratio", "p vs none", "p vs random"]
    sweep_keys += ["se vs none", "se vs random", "effect vs random", "fraction of native"]
    gen_keys = ["gen alpha", "gen units", "gen score", "gen score none", "gen score random", "gen p vs none"]
    gen_keys += ["gen p vs random", "gen se vs none", "gen se vs random", "gen ppl ratio"]
    full = ch06.pair_analysis(_sweep("A → B", 0.8, rng), _gens("A → B", 0.3, rng), n_permutations=200)
    native = ["gen score native", "gen fraction of native", "gen p native vs none", "gen se native vs none"]
    assert list(full.record()) == ["transfer", "admissible alphas", *sweep_keys, *gen_keys, *native]
    assert full.record()["effect vs random"] == full.sweep.effect_vs_random
    no_native = _gens("A → B", 0.3, rng).query("condition != 'native'")
    partial = ch06.pair_analysis(_sweep("A → B", 0.8, rng), no_native, n_permutations=200)
    assert partial.generations.score_native is None and list(partial.record())[-1] == "gen ppl ratio"
    broken = ch06.pair_analysis(_sweep("A → B", 0.8, rng, ratio=3.0), _gens("A → B", 0.3, rng), n_permutations=200)
    assert broken.record() == {"transfer": "emb2emb", "admissible alphas": []} and broken.alpha_star is None


def test_texts_are_split_and_prompts_are_not_summaries(chapter_params):
    split = {"n_build": 5, "n_classifier": 20, "n_heldout": 10, "n_map_texts": 30, "seed": 0}
    tx = ch06.topic_texts(chapter_params(ch06, topics=TOPICS, **split))
    for t in TOPICS:
        assert tx.build[t] == tx.classifier[t][:5] and not set(tx.heldout[t]) & set(tx.classifier[t])
    assert not set(tx.map_texts) & {x for t in TOPICS for x in tx.classifier[t] + tx.heldout[t]}
    prompts = ch06.neutral_prompts(9, n_words=8, seed=0)
    assert prompts == ch06.neutral_prompts(9, n_words=8, seed=0) and len(set(prompts)) == 9
    assert all(len(p.split()) == 8 and "|" not in p for p in prompts)
    summaries = " ".join(r["extract"] for r in corpus.wiki_summaries())
    assert not any(p in summaries for p in prompts)
    tiny = {"n_build": 1, "n_classifier": 2, "n_heldout": 1, "n_map_texts": 1}
    with pytest.raises(EmbgeoInputError, match="Unknown topic"):
        ch06.topic_texts(chapter_params(ch06, topics=["Cooking", "Arts"], **tiny))
    with pytest.raises(EmbgeoInputError, match="two distinct"):
        ch06.topic_texts(chapter_params(ch06, topics=["Arts"], **tiny))


def test_topic_tokens_find_the_planted_word(smollm):
    texts = {
        "a": ["The violin and the violin again, a violin concerto."] * 3,
        "b": ["The river and the mountain, the river valley."] * 3,
    }
    toks = ch06.topic_tokens(smollm.tokenizer, texts, k=3, min_count=3)
    assert " violin" in [smollm.tokenizer.decode([i]) for i in toks["a"]]
    assert " river" in [smollm.tokenizer.decode([i]) for i in toks["b"]]


@torch.no_grad()
def test_token_states_stop_early_and_match_the_full_pass(smollm):
    texts = ["The cat sat on the mat.", "Rain fell on the quiet town all night long."]
    states = steering.token_states(smollm, texts, 5, skip_first=1)
    for text, h in zip(texts, states):
        ids = torch.tensor([steering.encode_texts(smollm, [text])[0]], device=smollm.device)
        full = smollm.model(input_ids=ids, output_hidden_states=True).hidden_states[5][0, 1:]
        assert torch.allclose(h, full.float().cpu(), atol=1e-4)


@torch.no_grad()
def test_resume_after_and_per_row_vectors_give_the_full_steered_pass(smollm):
    texts = ["The cat sat on the mat and looked at the door.", "Rain fell all night."]
    seqs = steering.encode_texts(smollm, texts)
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=smollm.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=smollm.device)
    layer = 12
    base = smollm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(2, smollm.info.d_model, generator=g)
    with steering.steer(smollm, layer, vecs, 3.0):
        full = smollm.model(input_ids=ids, attention_mask=mask).logits
    with steering.steer(smollm, layer, vecs[0], 3.0):  # one row at a time gives the same
        first = smollm.model(input_ids=ids[:1], attention_mask=mask[:1]).logits
    hidden = base.hidden_states[layer]
    with steering.resume_after(smollm, layer, hidden), steering.steer(smollm, layer, vecs, 3.0):
        resumed = smollm.model(input_ids=ids, attention_mask=mask).logits
    m = mask.bool()
    assert torch.allclose(resumed[m], full[m], atol=1e-4)
    assert torch.allclose(first[0, : len(seqs[0])], full[0, : len(seqs[0])], atol=1e-4)
    assert torch.equal(smollm.model(input_ids=ids, attention_mask=mask).logits, base.logits)
    with pytest.raises(EmbgeoInputError, match="per-sequence"):
        with steering.steer(smollm, layer, vecs, 1.0):
            smollm.model(input_ids=ids[:1])
    with pytest.raises(EmbgeoInputError, match="shape"):
        with steering.resume_after(smollm, layer, hidden[:1]):
            smollm.model(input_ids=ids, attention_mask=mask)
    assert all("forward" not in b.__dict__ for b in models.transformer_blocks(smollm.model))


def test_topic_classifier_beats_chance_on_heldout_summaries(chapter_params):
    enc = models.load("minilm-l6")
    split = {"n_build": 5, "n_classifier": 30, "n_heldout": 15, "n_map_texts": 1, "seed": 0}
    tx = ch06.topic_texts(chapter_params(ch06, topics=TOPICS, **split))
    clf = ch06.fit_classifier(enc, tx, seed=0)
    assert clf.heldout_accuracy > 1 / len(TOPICS) + 0.3
    assert clf.score(tx.heldout["Arts"][:3], "Arts").shape == (3,)


def test_sweep_table_is_cached_by_content_and_rebuilt_when_damaged(smollm, tmp_cache, monkeypatch, caplog):
    g = torch.Generator().manual_seed(0)
    d = smollm.info.d_model
    vectors = {c: {t: torch.randn(d, generator=g) for t in TOPICS[:2]} for c in ("native", "random")}
    tr = ch06.Transfer(("smollm2-135m", "smollm2-135m"), 6, 6, 10.0, TOPICS[:2], {}, vectors, {}, True)
    prompts = ["The cat sat on the mat and looked at the door.", "Rain fell on the quiet town all night."]
    tokens = {t: [100 + i, 200 + i] for i, t in enumerate(TOPICS[:2])}
    first = ch06.concept_sweep(smollm, tr, prompts, [0.5], tokens, batch_size=4)
    entries = list(tmp_cache.glob("concept_sweep/*/entry.json"))
    assert len(entries) == 1

    def broken(*args, **kwargs):
        raise AssertionError("the cached table should have been read")

    with monkeypatch.context() as m:
        m.setattr(smollm.model, "forward", broken)
        again = ch06.concept_sweep(smollm, tr, prompts, [0.5], tokens, batch_size=4)
        # an equal transfer made anew (copied vectors, a table of text) has the same key
        copy = {c: {t: v.clone() for t, v in vs.items()} for c, vs in vectors.items()}
        table = pd.DataFrame({"condition": ["native", "random"], "topic": TOPICS[:2]})
        same = ch06.concept_sweep(
            smollm, replace(tr, vectors=copy, cosines=table), prompts, [0.5], tokens, batch_size=4
        )
    pd.testing.assert_frame_equal(first, again)  # bit for bit
    pd.testing.assert_frame_equal(first, same)
    # another strength is another entry; a damaged entry is recomputed with a notice
    other = ch06.concept_sweep(smollm, tr, prompts, [0.25], tokens, batch_size=4)
    assert set(other["alpha"]) == {0.0, 0.25} and len(list(tmp_cache.glob("concept_sweep/*/entry.json"))) == 2
    for column in entries[0].parent.glob("a*.npy"):
        column.write_bytes(b"not a table")
    with caplog.at_level(logging.WARNING, logger="embgeo"):
        rebuilt = ch06.concept_sweep(smollm, tr, prompts, [0.5], tokens, batch_size=4)
    assert "concept_sweep entry is damaged" in caplog.text and "recomputing it" in caplog.text
    pd.testing.assert_frame_equal(first, rebuilt)
    assert len(list(tmp_cache.glob("concept_sweep/*/entry.json"))) == 2


class _HalfAndHalf:
    """A stand-in topic classifier: the same probability for every topic."""

    topics = TOPICS[:2]

    def proba(self, texts):
        return np.full((len(texts), 2), 0.5)


def test_continuations_are_cached_and_scored_afresh(smollm, tmp_cache, monkeypatch):
    g = torch.Generator().manual_seed(0)
    vectors = {"native": {t: torch.randn(smollm.info.d_model, generator=g) for t in TOPICS[:2]}}
    tr = ch06.Transfer(("smollm2-135m", "smollm2-135m"), 6, 6, 10.0, TOPICS[:2], {}, vectors, {}, True)
    prompts = ["The cat sat on the mat and", "Rain fell on the quiet town"]
    first = ch06.steered_generations(smollm, tr, prompts, 0.5, _HalfAndHalf(), ["none", "native"], max_new_tokens=3)
    assert len(first) == 2 * 2 * 2 and set(first["score"]) == {0.5}
    assert len(list(tmp_cache.glob("steered_continuations/*/entry.json"))) == 1
    unsteered = first[first["condition"] == "none"]
    assert np.allclose(unsteered["ppl ratio"], 1.0) and (first["ppl"] > 1).all()

    def broken(*args, **kwargs):
        raise AssertionError("the cached continuations should have been read")

    with monkeypatch.context() as m:
        m.setattr(smollm.model, "forward", broken)
        again = ch06.steered_generations(smollm, tr, prompts, 0.5, _HalfAndHalf(), ["none", "native"], max_new_tokens=3)
    pd.testing.assert_frame_equal(first, again)
    with pytest.raises(EmbgeoInputError, match="Unknown condition"):
        ch06.steered_generations(smollm, tr, prompts, 0.5, _HalfAndHalf(), ["emb2emb"])
