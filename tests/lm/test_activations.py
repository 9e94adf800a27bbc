from __future__ import annotations

import numpy as np
import pytest
import torch

from embgeo_utils.core import errors
from embgeo_utils.lm import activations, corpus, models, vocab


@pytest.fixture(scope="module")
def prompts(smollm):
    return [p.token_ids for p in corpus.load_passages(3, smollm.tokenizer, min_tokens=48, max_tokens=48, seed=1)]


def test_hidden_states_shape_loss_and_cache(smollm, prompts, tmp_cache):
    first = activations.hidden_states(smollm, prompts, 32, batch_size=2, progress=False)
    assert first.hidden.shape == (3, 31, 32, 576) and first.hidden.dtype == np.float32
    assert first.cache_hits == 0 and np.all((first.loss > 0.5) & (first.loss < 8))
    again = activations.hidden_states(smollm, prompts, 32, progress=False)
    assert again.cache_hits == 3
    assert np.array_equal(again.hidden, first.hidden) and np.array_equal(again.loss, first.loss)
    other = activations.hidden_states(smollm, [p[::-1] for p in prompts], 32, progress=False)
    assert other.cache_hits == 0


def test_matches_a_plain_forward_pass(smollm, prompts, tmp_cache):
    acts = activations.hidden_states(smollm, prompts[:1], 24, progress=False, cache=False)
    ids = torch.tensor([prompts[0][:24]])
    with torch.no_grad():
        out = smollm.model(ids, output_hidden_states=True)
    assert np.allclose(acts.hidden[0, 5], out.hidden_states[5][0].numpy(), atol=1e-5)
    ce = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:]).item()
    assert acts.loss[0] == pytest.approx(ce, rel=1e-4)


def test_early_layers_skip_the_later_blocks_with_identical_results(smollm, gemma, prompts, tmp_cache):
    for loaded in (smollm, gemma):
        ids = [p[:20] for p in prompts[:2]]
        full = activations.hidden_states(loaded, ids, with_loss=False, cache=False, progress=False)
        part = activations.hidden_states(loaded, ids, with_loss=False, layers=[2, 5], cache=False, progress=False)
        assert np.array_equal(part.hidden, full.hidden[:, [2, 5]])
        assert len(models.transformer_blocks(loaded.model)) == loaded.info.n_layers  # restored


def test_corrupted_cache_entry_is_recomputed(smollm, prompts, tmp_cache):
    first = activations.hidden_states(smollm, prompts[:1], 16, progress=False)
    entry = next((tmp_cache / "activations").rglob("a0.npy"))
    entry.write_bytes(entry.read_bytes()[:100])
    again = activations.hidden_states(smollm, prompts[:1], 16, progress=False)
    assert again.cache_hits == 0 and np.array_equal(again.hidden, first.hidden)
    assert activations.hidden_states(smollm, prompts[:1], 16, progress=False).cache_hits == 1


def test_bos_is_added_for_gemma_and_left_out_of_the_cloud(gemma, tmp_cache):
    ids = corpus.load_passages(1, gemma.tokenizer, min_tokens=20, max_tokens=20, seed=0)[0].token_ids
    acts = activations.hidden_states(gemma, [ids], 20, progress=False, cache=False)
    assert acts.hidden.shape == (1, 19, 20, 640)
    with torch.no_grad():
        out = gemma.model(torch.tensor([[gemma.tokenizer.bos_token_id] + ids]), output_hidden_states=True)
    assert np.allclose(acts.hidden[0, -1], out.hidden_states[-1][0, 1:].numpy(), atol=1e-4)
    assert 0.5 < acts.loss[0] < 8


def test_bad_prompts_are_explained(smollm):
    with pytest.raises(errors.PromptTooShortError, match="fewer than 32 tokens"):
        activations.hidden_states(smollm, [[1, 2, 3]], 32, progress=False)
    with pytest.raises(ValueError, match="must lie in"):
        activations.hidden_states(smollm, [[10**6, 2, 3]], progress=False)


def test_lone_token_states_take_the_token_position(smollm, tmp_cache):

    ids = [100, 2000, 30000]
    states = activations.lone_token_states(smollm, ids, batch_size=2)
    assert states.shape == (3, 31, 576) and states.dtype == np.float32
    newline = vocab.normalized_vocabulary(smollm.tokenizer)["\n"]
    full = activations.hidden_states(smollm, [[newline, i] for i in ids], 2, with_loss=False, progress=False)
    np.testing.assert_array_equal(states, full.hidden[:, :, 1])
    table = smollm.model.get_input_embeddings().weight.detach().float().numpy()
    np.testing.assert_allclose(states[:, 0], table[ids], atol=1e-6)  # layer 0: the input embeddings
    with pytest.raises(errors.EmbgeoInputError, match="single token"):
        activations.lone_token_states(smollm, ids, context="not one token at all")


def test_a_first_pass_over_the_early_blocks_leaves_every_later_pass_whole(tmp_cache):
    """transformers hooks hidden states on the first pass that asks for them: a truncated first pass must not stick."""
    fresh = models.load("smollm2-135m", device="cpu")  # a new model object, never run before
    ids = [[504, 2644, 3290, 335, 260, 1109, 4408, 338, 553]]
    early = activations.hidden_states(fresh, ids, with_loss=False, layers=[3], cache=False, progress=False)
    full = activations.hidden_states(fresh, ids, with_loss=False, cache=False, progress=False)
    assert full.hidden.shape[1] == fresh.info.n_layers + 1
    assert np.array_equal(early.hidden[:, 0], full.hidden[:, 3])
