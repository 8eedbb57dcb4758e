"""Reading weight files tensor by tensor, writing folders atomically."""

import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# madvise(MADV_DONTNEED) frees the pages of memory-mapped pickles tensor by tensor (Linux only).
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PAGE_SIZE = mmap.PAGESIZE
MADV_DONTNEED = 4


def read_json(path: Path) -> dict:
    """Parses a JSON file, naming it in the error when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read JSON file {path}: {error}") from error


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_sha256(folder: Path, recorded: Dict[str, str], skip_hint: Optional[str] = None) -> None:
    """Checks the files of ``folder`` against the sha256 digests recorded when they were written.

    Args:
        folder: where the files are.
        recorded: file name (relative to ``folder``) -> hex sha256.
        skip_hint: how to load without this check, for the message; None when it cannot be skipped.

    Raises:
        ValueError: naming the first file that is missing or whose bytes changed.
    """
    for name, digest in recorded.items():
        file = Path(folder) / name
        if not file.is_file():
            raise ValueError(f"{file} is missing (its checksum was recorded when the checkpoint was saved)")
        actual = sha256_file(file)
        if actual != digest:
            raise ValueError(
                f"{file} does not match the checksum recorded when it was saved (sha256 {digest[:16]}..., now "
                f"{actual[:16]}...): it is damaged (flipped bits, a partial copy). Copy it again from its source "
                f"or use an earlier checkpoint" + (f"; {skip_hint} skips this check" if skip_hint else "")
            )


def weight_files(folder: Path) -> List[Path]:
    """The weight files of an HF-style folder, in order: an index's shards, or the single file.

    Prefers safetensors over pickled ``.bin`` files when both exist (as transformers does).
    Returns [] when the folder holds none.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise ValueError(f"{index} lists shards that are not in {folder}: {missing[:5]}")
            return [folder / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    return sorted(folder.glob("model-*-of-*.safetensors")) or sorted(folder.glob("pytorch_model-*-of-*.bin"))


def iter_tensors(path: Path, *, transient: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields (name, tensor) from one weight file, one tensor at a time where the format allows
    (safetensors is read lazily; pickles are memory-mapped).

    ``transient=True`` (the caller converts each tensor and drops it, never writing into it)
    reads safetensors into a buffer per tensor instead of one file mapping, and hands a memory-
    mapped pickle's pages of each tensor back to the kernel once the caller asks for the next,
    so the pages of converted tensors are freed at once rather than when the file closes.

    Raises:
        ValueError: naming the file, when it is truncated, corrupt or not a weight file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            options = {"backend": "pread"} if transient else {}
            with safe_open(str(path), framework="pt", device="cpu", **options) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            if isinstance(error, ValueError) and str(path) in str(error):
                raise
            raise ValueError(f"cannot read weight file {path} (truncated or corrupt?): {error}") from error
        return
    tensors, mapped = _pickled_state_dict(path)
    for name, tensor in tensors.items():
        yield name, tensor
        # Only file-backed pages: dropping anonymous ones would zero tensors sharing the storage.
        if transient and mapped:
            release_file_pages(tensor)


def release_file_pages(tensor: torch.Tensor) -> None:
    """Drops the resident pages of a tensor read from a private file mapping (``torch.load(mmap=
    True)``); a later read of it reloads them from the file. Only for tensors nobody wrote into:
    the written pages of a private mapping would be lost. Does nothing off Linux."""
    storage = tensor.untyped_storage()
    if LIBC is None or storage.device.type != "cpu" or storage.nbytes() == 0:
        return
    start = storage.data_ptr() // PAGE_SIZE * PAGE_SIZE
    end = storage.data_ptr() + storage.nbytes()
    # Only whole pages inside the storage: its neighbours may still be in use.
    start = start + PAGE_SIZE if start < storage.data_ptr() else start
    end = end // PAGE_SIZE * PAGE_SIZE
    if end > start:
        LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def load_pickled_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """``torch.load`` of a state dict (or a training checkpoint holding one under ``state_dict``),
    memory-mapped, tensors only (no arbitrary code), naming the file on failure."""
    return _pickled_state_dict(path)[0]


def _pickled_state_dict(path: Path) -> Tuple[Dict[str, torch.Tensor], bool]:
    """``load_pickled_state_dict``'s tensors, and whether they are memory-mapped from the file."""
    mapped = True
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # Files from torch.save(_use_new_zipfile_serialization=False) cannot be memory-mapped.
            data, mapped = torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as error:
        raise ValueError(f"cannot read weight file {path} (truncated, corrupt or not a torch checkpoint): {error}") from error
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (nor a 'state_dict' entry with one)")
    return data, mapped


@contextlib.contextmanager
def atomic_folder(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder to fill; renames it to ``path`` only when the block ends
    without error, so an interrupted save never leaves a folder that looks complete.

    Raises:
        ValueError: if ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass overwrite=True (or --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    temporary = path.parent / f".{path.name}.tmp-{tag}"
    temporary.mkdir()
    try:
        yield temporary
        old = path.parent / f".{path.name}.old-{tag}"
        if path.exists():
            os.rename(path, old)
        os.rename(temporary, path)
        if old.exists():
            (shutil.rmtree if old.is_dir() and not old.is_symlink() else os.remove)(old)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)


def save_safetensors_shards(
    tensors: Dict[str, torch.Tensor], folder: Path, max_shard_bytes: int, metadata: Dict[str, str]
) -> List[str]:
    """Writes ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards plus
    ``model.safetensors.index.json`` when the tensors exceed ``max_shard_bytes``. Returns the files."""
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata=metadata)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + ["model.safetensors.index.json"]
