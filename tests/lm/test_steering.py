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
