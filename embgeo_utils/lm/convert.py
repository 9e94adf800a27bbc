"""A packaged GGUF model turned into a float safetensors folder in one pass over the file (chapter 0).

Chapter 0 converts each packaged GGUF model once, on its first load, into the folder that every later load reads
(:func:`embgeo_utils.lm.models.load`). ``transformers`` can do the conversion itself, but its GGUF path parses the
file's metadata three times with a pure-Python reader (for the model's config, for its weights and again for the
tokenizer's config: about a third of the time), builds the model twice and holds every weight in memory at once.
Here the metadata is parsed once (:func:`read_gguf`) and handed to every step:

- the config is derived from it by the same rules ``transformers`` applies (:func:`config_dict`);
- the weights are dequantized one tensor at a time with the ``gguf`` package's vectorized numpy kernels (the ones
  ``transformers`` calls), reordered by the same per-architecture processors, cast to the storage dtype and streamed
  into ``model.safetensors`` (:func:`write_weights`), so memory holds one tensor, not the model;
- the tokenizer is still built by ``transformers`` (its class choice and saved files are its own), with its two
  metadata reads answered from the parsed file (:func:`parsed_once`).

The files written are byte for byte those of ``from_pretrained(gguf_file=...)`` followed by ``save_pretrained``:
the same tensor names (tied weights written once, under the name ``save_pretrained`` keeps), the same bytes, the same
safetensors header, the same config, generation config and tokenizer files (``tests/lm/test_convert.py`` compares
the two paths file by file).
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..core.errors import EmbgeoInputError

__all__ = [
    "GgufFile",
    "GgufTensor",
    "config_dict",
    "convert_with_transformers",
    "parsed_once",
    "read_gguf",
    "weight_names",
    "write_config",
    "write_weights",
]

#: struct formats of the fixed-size metadata value types of GGUF (u8, i8, u16, i16, u32, i32, f32, bool, u64, i64, f64)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
#: numpy dtypes of the same types, for arrays
_ARRAY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY_TYPE = 8, 9
#: architectures whose config transformers derives with rules of their own beyond the key mapping
_SPECIAL = ("t5", "stablelm", "falcon", "bloom", "qwen2moe", "qwen3moe", "gpt_oss", "gpt-oss", "minimax", "lfm2")
#: safetensors' names of the storage dtypes
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
#: elements dequantized at once: bounds the numpy temporaries of a large table
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF file: its shape in torch order, its ggml type and where its bytes lie in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    start: int
    nbytes: int


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file's metadata (every key, string arrays decoded) and its tensor table, read once (chapter 0)."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])


class _Cursor:
    """Reads GGUF values from a mapped file, front to back."""

    def __init__(self, blob: mmap.mmap) -> None:
        self.blob = blob
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        start, self.pos = self.pos, self.pos + length
        return self.blob[start : self.pos].decode("utf-8")

    def strings(self, count: int) -> list[str]:
        """``count`` strings in a row (a vocabulary, a merge table): the one loop that runs per token."""
        blob, pos, length_of, out = self.blob, self.pos, struct.Struct("<Q").unpack_from, []
        for _ in range(count):
            (length,) = length_of(blob, pos)
            pos += 8 + length
            out.append(blob[pos - length : pos].decode("utf-8"))
        self.pos = pos
        return out

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR:
            return self.scalar(_SCALAR[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type != _ARRAY_TYPE:
            raise EmbgeoInputError(f"GGUF metadata holds a value of unknown type {value_type}.")
        element_type, count = self.scalar("<I"), self.scalar("<Q")
        if element_type == _STRING:
            return self.strings(count)
        if element_type not in _ARRAY:
            raise EmbgeoInputError(f"GGUF metadata holds an array of unsupported type {element_type}.")
        values = np.frombuffer(self.blob, dtype=_ARRAY[element_type], count=count, offset=self.pos)
        self.pos += values.nbytes
        return values.tolist()


def read_gguf(path: str | Path) -> GgufFile:
    """Parse a GGUF file's header, metadata and tensor table in one pass (chapter 0); tensor data is not read.

    Raises:
        EmbgeoInputError: the file is not GGUF version 2 or 3, or holds a metadata type this reader does not know.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        cursor = _Cursor(blob)
        if cursor.blob[:4] != b"GGUF":
            raise EmbgeoInputError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")
        cursor.pos = 4
        version, tensor_count, key_count = cursor.scalar("<I"), cursor.scalar("<Q"), cursor.scalar("<Q")
        if version not in (2, 3):
            raise EmbgeoInputError(f"{path} is GGUF version {version}; only versions 2 and 3 are read.")
        metadata: dict[str, Any] = {}
        for _ in range(key_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        table = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
            table.append((name, tuple(reversed(dims)), cursor.scalar("<I"), cursor.scalar("<Q")))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = (cursor.pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, ggml_type, offset in table:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        nbytes = int(np.prod(shape)) // block * size
        tensors[name] = GgufTensor(name, shape, ggml_type, data_start + offset, nbytes)
    return GgufFile(path, metadata, tensors)


def config_dict(gg: GgufFile) -> dict[str, Any]:
    """The config ``transformers`` derives from a GGUF's metadata (chapter 0), for architectures without special rules.

    The rules of ``load_gguf_checkpoint``: tied embeddings when the file has no ``output.weight``, the
    architecture's defaults, every metadata key the config mapping names (a one-element array read as its element),
    Gemma 3's text-only model type, and the vocabulary size from the token list when no key gives it.

    Raises:
        EmbgeoInputError: an architecture whose config transformers derives with rules of its own.
    """
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = gg.architecture
    name = gg.metadata.get("general.name")
    if any(special in arch for special in _SPECIAL) or ("llama" in arch and name == "mistral") or arch == "gemma4":
        raise EmbgeoInputError(f"The GGUF architecture {arch!r} needs transformers' own converter.")
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in gg.tensors}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}).items():
        config.setdefault(key, value)
    for gguf_key, value in gg.metadata.items():
        prefix, _, config_key = gguf_key.partition(".")
        renamed = cast(dict[str, dict[str, Any]], GGUF_CONFIG_MAPPING).get(prefix, {}).get(config_key)
        if renamed is None or renamed == -1:
            continue
        config[renamed] = value[0] if isinstance(value, list) and len(value) == 1 else value
    if config.get("model_type") == "gemma3":
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in gg.metadata:
        config["vocab_size"] = len(gg.metadata["tokenizer.ggml.tokens"])
    return config


def weight_names(gg: GgufFile, model: torch.nn.Module) -> dict[str, str]:
    """The tensors ``save_pretrained`` writes, each with the GGUF tensor it comes from (chapter 0): ``{hf: gguf}``.

    ``model`` is the architecture (on the meta device: no weights needed). A weight tied to another one is written
    once, under its first name (the input embeddings, not the LM head), as ``save_pretrained`` does.

    Raises:
        EmbgeoInputError: a weight of the model that the file does not hold.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == gg.architecture), None)
    if arch is None:
        raise EmbgeoInputError(f"The gguf package does not know the architecture {gg.architecture!r}.")
    n_layers = int(cast(Any, model).config.num_hidden_layers)
    name_map = get_tensor_name_map(arch, n_layers)
    names: dict[str, str] = {}
    seen: set[int] = set()
    for hf_name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        base, dot, suffix = hf_name.rpartition(".")
        mapped = name_map.get_name(base) if suffix in ("weight", "bias") else name_map.get_name(hf_name)
        gguf_name = f"{mapped}{dot}{suffix}" if suffix in ("weight", "bias") and mapped else mapped
        if gguf_name is None or gguf_name not in gg.tensors:
            raise EmbgeoInputError(f"{gg.path} holds no tensor for the weight {hf_name!r} of {type(model).__name__}.")
        names[hf_name] = gguf_name
    return names


def _dequantized(tensor: GgufTensor, data: np.ndarray) -> np.ndarray:
    """One tensor as float32 (chapter 0), dequantized by the gguf package's block kernels in chunks of rows.

    The kernels are those ``gguf.dequantize`` runs (each block is decoded on its own, so chunks of rows give the
    same values as the whole tensor); called on large chunks directly instead of through its 16-row groups.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize, quants

    qtype = GGMLQuantizationType(tensor.ggml_type)
    raw = data[tensor.start : tensor.start + tensor.nbytes]
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.array(dequantize(raw, qtype), dtype=np.float32).reshape(tensor.shape)
    kernel = getattr(quants, qtype.name, None)
    if kernel is None:
        raise EmbgeoInputError(f"The gguf package cannot dequantize tensors of type {qtype.name} ({tensor.name}).")
    kernel.init_grid()
    block, size = GGML_QUANT_SIZES[qtype]
    row = tensor.shape[-1]
    rows = raw.reshape(-1, row // block * size)
    out = np.empty((rows.shape[0], row), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // row)
    for first in range(0, rows.shape[0], step):
        out[first : first + step] = kernel.dequantize_rows(rows[first : first + step])
    return out.reshape(tensor.shape)


def _header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The safetensors header for tensors written in this order: compact JSON, padded with spaces to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_weights(
    gg: GgufFile,
    names: dict[str, str],
    config: dict[str, Any],
    dtype: torch.dtype,
    target: Path,
    check: Callable[[str, torch.Tensor], None],
) -> None:
    """Dequantize, reorder, cast and write every weight into one safetensors file, a tensor at a time (chapter 0).

    Tensors go in ``save_pretrained``'s order (all share one dtype, so by name) after a header that lists them
    with ``{"format": "pt"}``, as ``safetensors.torch.save_file`` writes it. The architecture's processor from
    ``transformers`` undoes llama.cpp's reorderings (Llama's rotary halves, Gemma's ``1 + w`` norms) on the
    float32 values, and the cast to ``dtype`` is the same torch cast. ``check(name, tensor)`` sees each final tensor.
    """
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    if dtype not in _SAFETENSORS_DTYPE:
        raise EmbgeoInputError(f"Weights are stored in float32, bfloat16 or float16, not {dtype}.")
    processor = TENSOR_PROCESSORS.get(gg.architecture, TensorProcessor)(config=config)
    mapping = {gguf_name: hf_name for hf_name, gguf_name in names.items()}
    order = sorted(names)
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries = [
        (name, _SAFETENSORS_DTYPE[dtype], gg.tensors[names[name]].shape, itemsize * _count(gg.tensors[names[name]]))
        for name in order
    ]
    data = np.memmap(gg.path, dtype=np.uint8, mode="r").view(np.ndarray)  # slices without memmap's overhead
    with open(target, "wb") as out:
        out.write(_header(entries))
        for name in order:
            tensor = gg.tensors[names[name]]
            values = processor.process(
                weights=_dequantized(tensor, data),
                name=tensor.name,
                tensor_key_mapping=mapping,
                parsed_parameters={"config": config, "tensors": {}},
            ).weights
            final = torch.from_numpy(np.ascontiguousarray(values)).to(dtype).contiguous()
            if tuple(final.shape) != tensor.shape:
                raise EmbgeoInputError(f"{name} came out with shape {tuple(final.shape)}, not {tensor.shape}.")
            check(name, final)
            out.write(final.view(torch.uint8).numpy().data)
            del values, final
    del data


def _count(tensor: GgufTensor) -> int:
    return int(np.prod(tensor.shape))


def write_config(model: Any, target: Path) -> None:
    """``config.json`` and ``generation_config.json`` as ``save_pretrained`` writes them for ``model`` (chapter 0)."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(target)
    if model.can_generate():
        model.generation_config.save_pretrained(target)


def _metadata_view(gg: GgufFile, string_arrays: Any = ()) -> tuple[dict[str, Any], tuple[str, ...]]:
    """What ``transformers``' own metadata reader returns: string arrays not asked for are given as their length."""
    metadata = {
        key: len(value)
        if isinstance(value, list) and value and isinstance(value[0], str) and key not in string_arrays
        else value
        for key, value in gg.metadata.items()
    }
    return metadata, tuple(gg.tensors)


@contextmanager
def parsed_once(gg: GgufFile, config: dict[str, Any]) -> Iterator[None]:
    """While active, ``transformers``' GGUF metadata reads of this file are answered from ``gg`` (chapter 0).

    ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` reads the file's config (with the slow reader that parses
    every key) to choose the tokenizer class, and its metadata again to build the vocabulary. Both get what their own
    readers would return; any other file goes to the readers themselves. Where ``transformers`` moves these functions,
    nothing is replaced and the tokenizer reads the file itself (slower, same files).
    """
    import transformers.integrations.gguf as gguf_integration
    import transformers.integrations.gguf.reader as gguf_reader
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    own = gg.path.resolve()

    def answered(original: Callable[..., Any], answer: Callable[..., Any]) -> Callable[..., Any]:
        def read(path: Any, *args: Any, **kwargs: Any) -> Any:
            reply = answer(*args, **kwargs) if Path(path).resolve() == own else None
            return reply if reply is not None else original(path, *args, **kwargs)

        return read

    def checkpoint(return_tensors: bool = False, *_args: Any, **_kwargs: Any) -> Any:
        return None if return_tensors else {"config": dict(config)}

    def metadata(string_arrays: Any = ()) -> Any:
        return _metadata_view(gg, string_arrays)

    swaps: list[tuple[Any, str, Callable[..., Any]]] = [
        (module, name, answer)
        for module, name, answer in (
            (gguf_utils, "load_gguf_checkpoint", checkpoint),
            (gguf_reader, "read_gguf_metadata", metadata),
            (gguf_integration, "read_gguf_metadata", metadata),
        )
        if callable(getattr(module, name, None))
    ]
    originals = [getattr(module, name) for module, name, _answer in swaps]
    for (module, name, answer), original in zip(swaps, originals):
        setattr(module, name, answered(original, answer))
    try:
        yield
    finally:
        for (module, name, _answer), original in zip(swaps, originals):
            setattr(module, name, original)


def convert_with_transformers(gguf_file: Path, target: Path, storage_dtype: str) -> None:
    """The conversion as ``transformers`` alone does it (chapter 0): the reference the one-pass conversion must equal.

    ``from_pretrained(gguf_file=...)`` loads the GGUF, a plain model is rebuilt from its config without the
    quantization settings, and ``save_pretrained`` writes it and the tokenizer into ``target`` (created). Slow:
    it parses the file's metadata three times. The conversion test and the conversion benchmark compare against it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    storage = getattr(torch, storage_dtype)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=storage, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_dict()), dtype=storage)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    target.mkdir(parents=True)
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
