"""Steering (chapter 6): the hook adds exactly alpha * v, leaves no trace, and the vectors are what they say."""

import numpy as np
import pytest
import torch

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.lm import models, steering

TEXTS = ["The cat sat on the mat and looked at the door.", "Rain fell on the quiet town all night long."]


def _block_output(loaded, layer, ids):
    seen = []
    with models.block_output_hook(models.transformer_blocks(loaded.model)[layer - 1], lambda h: seen.append(h) or h):
        loaded.model(input_ids=ids)
    return seen[0]


@torch.no_grad()
def test_steer_adds_alpha_v_at_every_position_and_is_removed(smollm):
    ids = torch.tensor([steering.encode_texts(smollm, TEXTS[:1])[0]], device=smollm.device)
    layer = 6
    hooks_before = [len(b._forward_hooks) for b in models.transformer_blocks(smollm.model)]
    clean = _block_output(smollm, layer, ids)
    clean_logits = smollm.model(input_ids=ids).logits
    v = torch.randn(smollm.info.d_model, generator=torch.Generator().manual_seed(0))
    with steering.steer(smollm, layer, v, 2.5):
        steered = _block_output(smollm, layer, ids)
        with steering.steer(smollm, layer, v, 1.0):  # two active hooks add up
            both = _block_output(smollm, layer, ids)
    assert torch.allclose(steered, clean + 2.5 * v.to(clean.device), atol=1e-5)
    assert torch.allclose(both, clean + 3.5 * v.to(clean.device), atol=1e-5)
    assert torch.equal(smollm.model(input_ids=ids).logits, clean_logits)
    with pytest.raises(RuntimeError, match="boom"):
        with steering.steer(smollm, layer, v, 5.0):
            raise RuntimeError("boom")
    assert torch.equal(smollm.model(input_ids=ids).logits, clean_logits)
    assert [len(b._forward_hooks) for b in models.transformer_blocks(smollm.model)] == hooks_before


def test_steering_vector_is_the_difference_of_text_means(smollm):
    layer = 4
    pos, neg = TEXTS[:1], TEXTS[1:]
    v = steering.steering_vector(smollm, pos, neg, layer)
    ids_p = torch.tensor([steering.encode_texts(smollm, pos)[0]], device=smollm.device)
    ids_n = torch.tensor([steering.encode_texts(smollm, neg)[0]], device=smollm.device)
    with torch.no_grad():
        ref = _block_output(smollm, layer, ids_p)[0].mean(0) - _block_output(smollm, layer, ids_n)[0].mean(0)
    assert torch.allclose(v, ref.float().cpu(), atol=1e-4)
    # padding in a batch does not change a text's mean
    both = steering.residual_means(smollm, TEXTS, layer, batch_size=2)
    alone = torch.cat([steering.residual_means(smollm, [t], layer) for t in TEXTS])
    assert torch.allclose(both, alone, atol=1e-4)


def test_generate_is_batched_greedy_and_steerable(smollm):
    one = steering.generate(smollm, TEXTS, max_new_tokens=6, batch_size=1)
    two = steering.generate(smollm, TEXTS, max_new_tokens=6, batch_size=2)
    assert one == two and all(isinstance(t, str) and t for t in one)
    v = torch.randn(smollm.info.d_model, generator=torch.Generator().manual_seed(1))
    with steering.steer(smollm, 10, v, 40.0):
        pushed = steering.generate(smollm, TEXTS, max_new_tokens=6)
    assert pushed != one
    nll = steering.continuation_nll(smollm, TEXTS, one)
    assert np.all(np.isfinite(nll)) and np.all(nll > 0)


def test_clear_errors(smollm):
    v = torch.zeros(smollm.info.d_model)
    with pytest.raises(EmbgeoInputError, match="layer must be"):
        with steering.steer(smollm, 99, v, 1.0):
            pass
    with pytest.raises(EmbgeoInputError, match="width"):
        with steering.steer(smollm, 3, torch.zeros(10), 1.0):
            pass
    with pytest.raises(EmbgeoInputError, match="NaN"):
        with steering.steer(smollm, 3, torch.full((smollm.info.d_model,), float("nan")), 1.0):
            pass
    with pytest.raises(EmbgeoInputError, match="empty"):
        steering.steering_vector(smollm, [], TEXTS, 3)


@torch.no_grad()
def test_last_token_logits_are_the_full_pass_at_each_rows_last_token(smollm):
    seqs = steering.encode_texts(smollm, TEXTS + ["A short one."])
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=smollm.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=smollm.device)
    full = smollm.model(input_ids=ids, attention_mask=mask).logits.float()
    last = steering.last_token_logits(smollm, ids, mask)
    for i, s in enumerate(seqs):
        assert torch.allclose(last[i], full[i, len(s) - 1], atol=1e-4)
    with pytest.raises(EmbgeoInputError, match="real token"):
        steering.last_token_logits(smollm, ids, torch.zeros_like(mask))


def test_steered_generation_is_the_same_with_and_without_the_kv_cache(smollm):
    """Left padding (prompts of different lengths), one vector per row, greedy and seeded rows in one batch."""
    prompts = ["The history of the city begins", "Rain", "In the laboratory, the scientists found that the"]
    seqs = steering.encode_texts(smollm, prompts)
    assert len({len(s) for s in seqs}) == 3
    vecs = 4.0 * torch.randn(3, smollm.info.d_model, generator=torch.Generator().manual_seed(3))
    kw = {"seeds": [None, 11, 12], "vectors": vecs, "layer": 10, "top_k": 20}
    cached = steering.generate_ids(smollm, seqs, 8, use_cache=True, **kw)
    recomputed = steering.generate_ids(smollm, seqs, 8, use_cache=False, **kw)
    assert cached == recomputed and all(len(c) > 0 for c in cached)
    unsteered = steering.generate_ids(smollm, seqs, 8, seeds=kw["seeds"], top_k=20)
    assert unsteered != cached


def test_a_rows_continuation_depends_on_its_seed_not_on_its_batch(smollm):
    seqs = steering.encode_texts(smollm, TEXTS + ["The history of the city begins"])
    seeds = [5, None, 7]
    together = steering.generate_ids(smollm, seqs, 6, seeds=seeds, batch_size=3)
    alone = [steering.generate_ids(smollm, [s], 6, seeds=[k])[0] for s, k in zip(seqs, seeds)]
    assert together == alone
    assert together[1] == steering.generate_ids(smollm, seqs[1:2], 6)[0]  # None: greedy
    other = steering.generate_ids(smollm, seqs, 6, seeds=[6, None, 8], batch_size=3)
    assert other[0] != together[0] or other[2] != together[2]
    with pytest.raises(EmbgeoInputError, match="one per sequence"):
        steering.generate_ids(smollm, seqs, 2, seeds=[1])
    with pytest.raises(EmbgeoInputError, match="one steering vector per sequence"):
        steering.generate_ids(smollm, seqs, 2, vectors=torch.zeros(2, smollm.info.d_model), layer=3)


@torch.no_grad()
def test_sequence_nll_is_the_mean_loss_of_the_continuation(smollm):
    heads = steering.encode_texts(smollm, TEXTS)
    tails = [smollm.tokenizer(" and then it rained.", add_special_tokens=False)["input_ids"], []]
    nll = steering.sequence_nll(smollm, heads, tails)
    ids = torch.tensor([heads[0] + tails[0]], device=smollm.device)
    logp = torch.log_softmax(smollm.model(input_ids=ids).logits.float()[0], dim=-1)
    n = len(heads[0])
    ref = -logp[torch.arange(n - 1, n + len(tails[0]) - 1), torch.tensor(tails[0])].mean()
    assert nll[0] == pytest.approx(float(ref), abs=1e-4) and np.isnan(nll[1])
