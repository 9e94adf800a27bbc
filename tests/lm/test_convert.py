"""The one-pass GGUF conversion writes, byte for byte, the folder transformers' own GGUF path writes (chapter 0)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from embgeo_utils.core import cache, errors
from embgeo_utils.lm import convert, models

SPEC = models.REGISTRY["smollm2-135m"]


def sums(folder: Path) -> dict[str, str]:
    return {p.name: cache.sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> tuple[dict, Path, Path, list[str]]:
    """SmolLM2 converted by transformers (the reference, and its config) and by the one-pass path.

    Also returns the metadata reads made during the one-pass conversion: the one parse of ``convert.read_gguf``,
    and any by gguf's reader or transformers' own (there must be none).
    """
    import transformers.integrations.gguf.reader as reader
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    root = tmp_path_factory.mktemp("convert")
    source = models.gguf_path("smollm2-135m")
    with pytest.MonkeyPatch.context() as patch:
        # the reference parses the file three times with the same deterministic reader: one parse serves all
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(gguf.GGUFReader))
        convert.convert_with_transformers(source, root / "reference", SPEC.storage_dtype)
        config = load_gguf_checkpoint(str(source))["config"]
    reads: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        original, parse = reader.read_gguf_metadata, convert.read_gguf
        patch.setattr(gguf, "GGUFReader", lambda *a, **k: reads.append("gguf.GGUFReader"))
        patch.setattr(reader, "read_gguf_metadata", lambda *a, **k: reads.append("transformers") or original(*a, **k))
        patch.setattr(convert, "read_gguf", lambda path: reads.append("convert.read_gguf") or parse(path))
        models.convert_gguf(SPEC, source, str(SPEC.sha256), root / "one-pass")
    return config, root / "reference", root / "one-pass", reads


def test_every_file_equals_the_one_transformers_writes(both):
    _config, reference, one_pass, _reads = both
    expected, written = sums(reference), sums(one_pass)
    manifest = json.loads((one_pass / models.MANIFEST).read_text())
    del written[models.MANIFEST]
    assert set(written) == set(expected) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert {name: digest for name, digest in written.items() if expected[name] != digest} == {}
    assert manifest["files"] == expected and manifest["gguf_sha256"] == SPEC.sha256
    assert models.cache_problem(one_pass) is None


def test_the_config_is_the_one_transformers_derives(both):
    config, _reference, _one_pass, _reads = both
    assert convert.config_dict(convert.read_gguf(models.gguf_path("smollm2-135m"))) == config


def test_the_conversion_reads_the_metadata_once(both):
    """Neither gguf's reader nor transformers' own metadata reader runs: every step uses the one parse."""
    assert both[3] == ["convert.read_gguf"]


def test_a_non_finite_weight_is_refused_with_its_name_and_nothing_is_left(tmp_path, monkeypatch):
    """The check sees every written tensor: a NaN planted in one block names its tensor, and no folder remains."""
    real = convert.write_weights

    def planted(gg, names, config, dtype, target, check):
        def spoiled(name, tensor):
            check(
                name, tensor.clone().index_fill_(0, torch.tensor([0]), float("nan")) if ".21.mlp.up" in name else tensor
            )

        real(gg, names, config, dtype, target, spoiled)

    monkeypatch.setattr(convert, "write_weights", planted)
    with pytest.raises(
        errors.ChecksumError, match=r"NaN or infinite weights in 1 tensors \(model\.layers\.21\.mlp\.up"
    ):
        models.convert_gguf(SPEC, models.gguf_path("smollm2-135m"), str(SPEC.sha256), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_the_reader_decodes_every_metadata_type(tmp_path):
    """A small GGUF written by the gguf package: scalars, strings, numeric and string arrays, a tensor table."""
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("t.u32", 7)
    writer.add_int64("t.i64", -3)
    writer.add_float32("t.f32", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.strs", ["a", "Ġthe", ""])
    writer.add_tensor("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parsed = convert.read_gguf(path)
    meta = parsed.metadata
    assert (meta["t.u32"], meta["t.i64"], meta["t.bool"], meta["t.str"]) == (7, -3, True, "héllo")
    assert meta["t.f32"] == float(np.float32(0.1)) and meta["t.ints"] == [1, 2, 3]
    assert meta["t.strs"] == ["a", "Ġthe", ""] and parsed.architecture == "llama"
    (tensor,) = parsed.tensors.values()
    assert tensor.shape == (2, 3) and tensor.nbytes == 24
    data = np.memmap(path, dtype=np.uint8, mode="r")
    assert np.array_equal(data[tensor.start : tensor.start + 24].view(np.float32), np.arange(6, dtype=np.float32))
