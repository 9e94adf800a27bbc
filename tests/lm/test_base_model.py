"""Tests for models.base_model (the transformer body without its language-model head)."""

from __future__ import annotations

import pytest
import torch

from embgeo_utils.core.errors import EmbgeoInputError
from embgeo_utils.lm import models


class _WithDecoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(2, 2)
        self.head = torch.nn.Linear(2, 5)

    def get_decoder(self) -> torch.nn.Module:
        return self.body


class _WithModelAttribute(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(2, 2)


def test_base_model_finds_the_body() -> None:
    with_decoder = _WithDecoder()
    assert models.base_model(with_decoder) is with_decoder.body
    with_attribute = _WithModelAttribute()
    assert models.base_model(with_attribute) is with_attribute.model
    plain = torch.nn.Linear(2, 2)
    assert models.base_model(plain) is plain
    with pytest.raises(EmbgeoInputError, match="torch module"):
        models.base_model("smollm2-135m")


@pytest.mark.models
def test_base_model_of_a_packaged_model_gives_the_same_hidden_states(smollm) -> None:
    ids = torch.tensor([[1, 2, 3, 4]], device=smollm.device)
    with torch.no_grad():
        body = models.base_model(smollm.model)(input_ids=ids, output_hidden_states=True).hidden_states
        full = smollm.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert body is not None and len(body) == len(full)
    for a, b in zip(body, full):
        torch.testing.assert_close(a, b)
