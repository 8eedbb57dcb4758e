"""GGUF files (llama.cpp's format): header, config and dequantized tensors.

A GGUF file holds the model's hyperparameters and tokenizer as metadata (llama.cpp's key names)
and its tensors, most of them quantized in blocks. This module turns the metadata into the HF
``config.json`` fields that ``supra.checkpoint.hf`` already builds decoders from, and the tensors
into HF-named float32 tensors, one at a time, so the HF key map loads them.

The header is parsed here rather than with ``gguf.GGUFReader``, which builds numpy views for
every element of every metadata array: some 100k tokenizer strings take it seconds, and a
truncated file fails inside its numpy reshapes. The tensor data is dequantized with ``gguf``'s own
numpy code (``gguf.quants.dequantize``).

llama.cpp stores the q and k projections of ``llama`` models with their rows permuted per head,
so that its RoPE, which rotates adjacent pairs (x[2i], x[2i+1]), acts on the pairs that HF's
rotate-half RoPE rotates (x[i], x[i + d/2]). supra builds these models with rotate-half RoPE (as
for HF folders), so the permutation is undone here. ``qwen2`` files are converted without it
(llama.cpp uses rotate-half RoPE for qwen2) and load as stored.
"""

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple, Union

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# general.architecture -> the HF model_type whose config and key map serve it.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose q/k rows llama.cpp permutes (see the module docstring).
PERMUTED_QK = ("llama",)
# The tensor types gguf's numpy code dequantizes that the tests cover (F32 rows are copied as is).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_PATTERN = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# GGUF metadata value types (gguf.GGUFValueType): scalar struct formats, then STRING=8, ARRAY=9.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

PathLike = Union[str, Path]


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's data lies in the file.

    Attributes:
        name (str): its GGUF name (``blk.0.attn_q.weight``).
        type_name (str): its ggml type (``Q4_K``).
        shape (Tuple[int, ...]): its shape in PyTorch order (rows first; GGUF lists dims reversed).
        offset (int): the first byte of its data in the file.
        nbytes (int): the size of its data.
    """

    name: str
    type_name: str
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata (key -> value; arrays as lists) and tensor index, in file order."""

    path: Path
    metadata: Dict[str, Any]
    tensors: Dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")


class _Truncated(Exception):
    """The header ended before a value it announces."""


class _Corrupt(Exception):
    """The header holds a value no GGUF writer writes."""


class _Cursor:
    """Reads little-endian GGUF header values from a buffer."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.position = 0

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.position + size > len(self.buffer):
            raise _Truncated()
        values = struct.unpack_from("<" + fmt, self.buffer, self.position)
        self.position += size
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.unpack("Q")
        end = self.position + length
        if end > len(self.buffer):
            raise _Truncated()
        text = bytes(self.buffer[self.position : end]).decode("utf-8")
        self.position = end
        return text

    def value(self, value_type: int):
        if value_type == _STRING:
            return self.string()
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])
        if value_type != _ARRAY:
            raise _Corrupt(f"metadata value type {value_type} is not a GGUF type")
        item_type, count = self.unpack("IQ")
        if item_type in _SCALARS:
            dtype = np.dtype("<" + _SCALARS[item_type]) if item_type != 7 else np.dtype(np.bool_)
            end = self.position + count * dtype.itemsize
            if end > len(self.buffer):
                raise _Truncated()
            items = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.position).tolist()
            self.position = end
            return items
        return [self.value(item_type) for _ in range(count)]


def gguf_file(path: PathLike) -> Path:
    """The GGUF file ``path`` names: the file itself, or the one ``.gguf`` file in a folder.

    Raises:
        ValueError: for a folder holding no or several ``.gguf`` files.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise ValueError(
                f"{path} must hold exactly one .gguf file to be read as a GGUF checkpoint (found: {names}); "
                "pass the file itself"
            )
        return found[0]
    return path


def read_gguf_header(path: PathLike) -> GGUFHeader:
    """Parses a GGUF file's metadata and tensor index and checks that every tensor's data is present.

    Args:
        path: a ``.gguf`` file, or a folder holding exactly one.

    Returns:
        GGUFHeader: metadata and tensors (nothing of the tensor data is read).

    Raises:
        ValueError: naming the file, when it is not a GGUF file, has a version other than 2 or 3,
            is big-endian, is truncated (header or tensor data), or holds a tensor type gguf does
            not know.
    """
    import gguf

    path = gguf_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 24 or f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            cursor = _Cursor(buffer)
            cursor.position = 4
            try:
                version = cursor.unpack("I")
                if version & 0xFFFF == 0:
                    raise ValueError(f"{path} is a big-endian GGUF file; only little-endian files are supported")
                if version not in GGUF_VERSIONS:
                    raise ValueError(f"{path} is GGUF version {version}; supported versions: {GGUF_VERSIONS}")
                tensor_count, kv_count = cursor.unpack("QQ")
                metadata = {}
                for _ in range(kv_count):
                    key = cursor.string()
                    metadata[key] = cursor.value(cursor.unpack("I"))
                infos = []
                for _ in range(tensor_count):
                    name = cursor.string()
                    dims = [cursor.unpack("Q") for _ in range(cursor.unpack("I"))]
                    infos.append((name, dims, cursor.unpack("I"), cursor.unpack("Q")))
            except _Truncated:
                raise ValueError(
                    f"{path} is truncated: its header ends early (the file has {size:,} bytes); download or copy it again"
                ) from None
            except UnicodeDecodeError as error:
                raise ValueError(f"{path} is corrupt: a metadata string is not UTF-8 ({error})") from None
            except _Corrupt as error:
                raise ValueError(f"{path} is corrupt: {error}") from None
            header_end = cursor.position
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    data_start = -(-header_end // alignment) * alignment
    tensors = {}
    for name, dims, type_id, relative_offset in infos:
        try:
            ggml_type = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(
                f"{path}: tensor {name} has ggml type id {type_id}, unknown to gguf {_gguf_version()}; "
                f"supported types: {', '.join(SUPPORTED_TYPES)}"
            ) from None
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        elements = int(np.prod(dims, dtype=np.int64))
        tensor = GGUFTensor(
            name=name, type_name=ggml_type.name, shape=tuple(reversed(dims)),
            offset=data_start + relative_offset, nbytes=elements // block_size * type_size,
        )
        if tensor.offset + tensor.nbytes > size:
            raise ValueError(
                f"{path} is truncated: tensor {name} needs bytes up to {tensor.offset + tensor.nbytes:,} but the file "
                f"has {size:,}; download or copy it again"
            )
        tensors[name] = tensor
    return GGUFHeader(path=path, metadata=metadata, tensors=tensors)


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def gguf_hf_config(header: GGUFHeader) -> Dict[str, Any]:
    """The HF ``config.json`` fields a GGUF file's metadata states, for ``hf_decoder_kwargs``.

    Raises:
        ValueError: for an architecture other than ``ARCHITECTURES``, a missing hyperparameter,
            RoPE on part of the head, or RoPE scaling (none of which supra builds).
    """
    arch = header.architecture
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{header.path}: GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)} "
            "(Mistral files are stored as 'llama')"
        )

    def key(name: str, default: Any = None) -> Any:
        value = header.metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{header.path}: the GGUF metadata lacks {arch}.{name}, which a {arch} model needs")
        return value

    num_heads = key("attention.head_count")
    hidden = key("embedding_length")
    rope_dim = header.metadata.get(f"{arch}.rope.dimension_count")
    head_dim = header.metadata.get(f"{arch}.attention.key_length") or rope_dim or hidden // num_heads
    if rope_dim is not None and rope_dim != head_dim:
        raise ValueError(
            f"{header.path}: {arch}.rope.dimension_count={rope_dim} rotates part of each {head_dim}-wide head; "
            "supported: RoPE on whole heads"
        )
    scaling = header.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in header.tensors:
        what = f"{arch}.rope.scaling.type={scaling!r}" if scaling != "none" else "a rope_freqs tensor (Llama-3.1 scaling)"
        raise ValueError(f"{header.path} uses RoPE scaling ({what}); supported: none in GGUF files (load the HF folder)")
    embedding = header.tensors.get("token_embd.weight")
    if embedding is None:
        raise ValueError(f"{header.path} has no token_embd.weight tensor; a {arch} model needs one")
    return {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": embedding.shape[0],
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": header.metadata.get(f"{arch}.attention.head_count_kv", num_heads),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "head_dim": head_dim,
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": header.metadata.get(f"{arch}.rope.freq_base", 10_000.0),
        "attention_bias": "blk.0.attn_q.bias" in header.tensors,
        # llama.cpp writes output.weight only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }


def check_tensor_types(header: GGUFHeader) -> None:
    """Raises a ValueError naming the tensors of a type outside ``SUPPORTED_TYPES``."""
    unsupported = [f"{t.name} ({t.type_name})" for t in header.tensors.values() if t.type_name not in SUPPORTED_TYPES]
    if unsupported:
        shown = ", ".join(unsupported[:5]) + (f", ... ({len(unsupported)} in all)" if len(unsupported) > 5 else "")
        raise ValueError(
            f"{header.path} holds tensors of a quantization type supra does not read: {shown}; "
            f"supported types: {', '.join(SUPPORTED_TYPES)}"
        )


def hf_name(name: str) -> str:
    """The HF name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``);
    names without one are returned unchanged (the loader reports them as unexpected)."""
    if name in _TOP_TENSORS:
        return _TOP_TENSORS[name]
    match = _BLOCK_PATTERN.match(name)
    if match and match.group(2) in _BLOCK_TENSORS:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_TENSORS[part]}.{kind}"
    return name


def unpermute_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row permutation for ``num_heads`` heads.

    llama.cpp's converter reorders the rows of each head, viewed as (2, d/2), to (d/2, 2): row
    ``j * d/2 + i`` (half j of HF's rotate-half layout) moves to ``2 i + j``. This maps them back.

    Args:
        tensor (torch.Tensor): a weight [heads * d, in] or bias [heads * d] in llama.cpp's order.
        num_heads (int): the heads it holds (the kv heads for k).

    Returns:
        torch.Tensor: the same shape, rows in HF's order.
    """
    head_dim = tensor.shape[0] // num_heads
    rest = tensor.shape[1:]
    return tensor.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(tensor.shape)


def gguf_tensors(header: GGUFHeader, config: Dict[str, Any]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields (HF name, float32 tensor) for every tensor in the file, dequantized one at a time.

    Args:
        header (GGUFHeader): the file.
        config (Dict[str, Any]): its ``gguf_hf_config`` (head counts for the q/k permutation).

    Yields:
        Tuple[str, torch.Tensor]: the HF name and the dequantized tensor (owning its memory).
    """
    import gguf

    check_tensor_types(header)
    permuted = header.architecture in PERMUTED_QK
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    for tensor in header.tensors.values():
        ggml_type = gguf.GGMLQuantizationType[tensor.type_name]
        raw = data[tensor.offset : tensor.offset + tensor.nbytes]
        rows = raw.reshape(gguf.quant_shape_to_byte_shape(tensor.shape, ggml_type))
        values = gguf.quants.dequantize(rows, ggml_type)
        if ggml_type == gguf.GGMLQuantizationType.F32:
            # F32 data comes back as a view of the read-only file mapping: the model must own its weights.
            values = values.copy()
        weight = torch.from_numpy(values.reshape(tensor.shape))
        name = hf_name(tensor.name)
        projection = name.split(".")[-2]
        if permuted and projection in heads:
            weight = unpermute_rows(weight, heads[projection])
        yield name, weight


__all__ = [
    "ARCHITECTURES", "GGUFHeader", "GGUFTensor", "SUPPORTED_TYPES", "check_tensor_types", "gguf_file", "gguf_hf_config",
    "gguf_tensors", "hf_name", "read_gguf_header", "unpermute_rows",
]
