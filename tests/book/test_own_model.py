"""Your own model (book/own_model.md): a folder written by save_pretrained runs a chapter; mistakes say what to do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
import torch

from embgeo_utils.book import parameters, results, runner, timings
from embgeo_utils.chapters import ch04_layerwise_geometry as ch04
from embgeo_utils.core.errors import ParameterError, UnknownModelError
from embgeo_utils.lm import models

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "book" / "own_model.md"


def _quoted(kind: str) -> str:
    """The message the page quotes for an error of this kind (between backticks, after the class name)."""
    found = re.findall(rf"`{kind}: (.+?)`$", PAGE.read_text(), flags=re.M)
    assert found, f"the page quotes no {kind}"
    return found


def _on_page(message: str) -> bool:
    """Whether a message raised for ``./my-model`` is quoted on the page (``...`` stands for what varies)."""
    for quoted in _quoted("UnknownModelError") + _quoted("ParameterError"):
        pattern = ".*?".join(re.escape(part) for part in quoted.split("..."))
        if re.fullmatch(pattern, message):
            return True
    return False


def _folder(path: Path, config: dict | None = None, weights: bool = True, tokenizer: bool = True) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    if weights:
        (path / "model.safetensors").write_bytes(b"0")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return str(path)


def test_every_mistake_of_the_page_is_refused_with_the_message_it_quotes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    cases = {
        "no config.json": lambda: None,
        "no weights": lambda: (tmp_path / "my-model" / "config.json").write_text("{}"),
        "no tokenizer": lambda: (tmp_path / "my-model" / "model.safetensors").write_bytes(b"0"),
    }
    for case, make in cases.items():
        make()
        with pytest.raises(UnknownModelError) as error:
            models.check_name("./my-model")
        assert _on_page(str(error.value)), f"{case}: the page does not quote {error.value}"
    with pytest.raises(UnknownModelError) as error:
        models.check_name("./my-other-model")
    assert _on_page(str(error.value).replace("my-other-model", "my-model"))
    with pytest.raises(ParameterError) as error:
        models.check_causal(["minilm-l6"], f"{ch04.TITLE} ({ch04.CHAPTER})")
    assert _on_page(str(error.value))


def test_a_chapter_that_needs_causal_models_refuses_an_encoder_before_loading_it(tmp_path):
    encoder = _folder(tmp_path / "encoder", {"architectures": ["BertModel"], "model_type": "bert"})
    causal = _folder(tmp_path / "causal", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    assert models.is_causal(causal) and not models.is_causal(encoder)
    assert models.is_causal("smollm2-135m") and not models.is_causal("minilm-l6")
    declared = parameters.notebook_parameters(ROOT / "notebooks" / "04_layerwise_geometry.ipynb")
    values = {name: p.default for name, p in declared.items()}
    with pytest.raises(ParameterError, match="needs causal language models.*encoder"):
        results.start_chapter(ch04, {**values, "model_names": [encoder]}, declarations=declared)


def test_a_folder_is_keyed_in_the_cache_by_its_weight_files(tmp_path):
    folder = Path(_folder(tmp_path / "m"))
    first = models.folder_fingerprint(folder)
    assert first == models.folder_fingerprint(folder) and first.startswith("files:")
    (folder / "model.safetensors").write_bytes(b"01")  # save_pretrained wrote new weights
    assert models.folder_fingerprint(folder) != first


def test_relative_folders_are_made_absolute_for_the_notebooks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "my-model")
    params = {"model_names": ["./my-model", "smollm2-135m"], "model_pairs": [["./my-model", "gemma3-270m"]], "k": 5}
    fixed = runner.absolute_model_paths(params)
    assert fixed["model_names"] == [str(tmp_path / "my-model"), "smollm2-135m"]
    assert fixed["model_pairs"] == [[str(tmp_path / "my-model"), "gemma3-270m"]] and fixed["k"] == 5


def test_layer_l_is_the_output_of_block_l_and_the_last_has_the_final_norm(smollm):
    ids = torch.tensor([smollm.tokenizer("The cat sat on the mat.")["input_ids"]], device=smollm.device)
    blocks = models.transformer_blocks(smollm.model)
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o[0] if isinstance(o, tuple) else o))
        for k, b in enumerate(blocks, start=1)
    ]
    try:
        with torch.no_grad():
            states = models.base_model(smollm.model)(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    L = smollm.info.n_layers
    assert len(states) == L + 1
    torch.testing.assert_close(states[0], smollm.model.get_input_embeddings()(ids))
    for layer in (1, L // 2, L - 1):
        torch.testing.assert_close(states[layer], seen[layer])
    norm = smollm.model.model.norm
    torch.testing.assert_close(states[L], norm(seen[L]))


@pytest.mark.slow
def test_chapter_4_runs_its_small_parameters_on_a_folder_written_by_save_pretrained(
    smollm, tmp_path, tmp_cache, monkeypatch
):
    folder = tmp_path / "my-smollm2"
    smollm.model.save_pretrained(folder)
    smollm.tokenizer.save_pretrained(folder)
    assert models.check_name(str(folder)) == "local" and models.is_causal(str(folder))
    monkeypatch.setenv("EMBGEO_RESULTS", str(tmp_path / "unused"))  # run_notebooks sets it; restored afterwards
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "_executed"
    source = runner.select_chapters(ROOT, ["04"])
    overrides = {source[0].stem: {"model_names": ["./my-smollm2"]}}
    assert runner.run_notebooks(ROOT, out, source, overrides, small=True, ledger=False) == []
    (record,) = results.load_records(runner.results_folder(out, small=True))
    assert record["run"]["models"] == [str(folder)] and record["run"]["complete"]
    assert {c["number"] for c in record["claims"]} == {1, 2, 3, 4, 5}
    executed = nbformat.read(out / source[0].name, as_version=4)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert not timings.load_measurements(runner.results_folder(out, small=True))  # an override: not a book record
