"""Checkpoint, tokenizer, device and dtype from the strings a config or ``--model_args`` holds."""

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from supra.checkpoint import detect_format, load_checkpoint
from supra.config import resolve_path
from supra.data import load_tokenizer
from supra.data.python_docs import ByteTokenizer

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def resolve_checkpoint(path: Optional[Union[str, Path]]) -> Path:
    """A checkpoint folder or file, or an uptrain ``output_dir`` (then its latest checkpoint);
    ``supra:REL`` names one shipped with supra (``supra:assets/tiny_teacher``).

    Raises:
        ValueError: for None, a path that does not exist, an uptrain output_dir without a complete
            checkpoint, or a path that holds no checkpoint of a known format.
    """
    if path is None:
        raise ValueError("no checkpoint given: set checkpoint= (a checkpoint folder, or an uptrain output_dir)")
    folder = resolve_path(path)
    steps = sorted((folder / "checkpoints").glob("step_*")) if (folder / "checkpoints").is_dir() else []
    if steps:
        return steps[-1] / "model"
    if not folder.exists():
        raise ValueError(f"checkpoint {folder} does not exist (run the uptrain recipe first, or point at a checkpoint folder)")
    if (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file():
        raise ValueError(f"{folder} is an uptrain output_dir without a complete checkpoint yet (none in "
                         f"{folder / 'checkpoints'}); wait for its first save, or point at a checkpoint folder")
    # Said before any tokenizer is looked for: a folder with no checkpoint has no tokenizer either.
    detect_format(folder)
    return folder


def resolve_tokenizer(name: Optional[str], checkpoint: Optional[Path] = None):
    """``"bytes"`` (``ByteTokenizer``), a tokenizer path, or None: the tokenizer files in ``checkpoint``,
    or the tokenizer a GGUF checkpoint (a ``.gguf`` file, or a folder holding one) stores.

    Raises:
        ValueError: when no tokenizer is given and the checkpoint holds none.
    """
    if name == "bytes":
        return ByteTokenizer()
    if name is not None:
        return load_tokenizer(name)
    if checkpoint is not None:
        for file in TOKENIZER_FILES:
            if (checkpoint / file).exists():
                return load_tokenizer(checkpoint / file)
        if checkpoint.suffix == ".gguf" or (checkpoint.is_dir() and any(checkpoint.glob("*.gguf"))):
            return load_tokenizer(checkpoint)
    raise ValueError(
        f"{checkpoint} has no {' or '.join(TOKENIZER_FILES)} and is no GGUF file; set tokenizer= (a path, or 'bytes')"
    )


def resolve_device(name: Optional[str]) -> torch.device:
    """``"auto"`` / None: CUDA when available, else CPU; otherwise the named device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: Optional[Union[str, torch.dtype]]) -> Optional[torch.dtype]:
    """None / ``"auto"`` keeps the stored dtype; else one of ``DTYPES``.

    Raises:
        ValueError: for an unknown name.
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is unknown; use one of {sorted(DTYPES)} or auto (keep the checkpoint's)")
    return DTYPES[name]


def load_model(
    checkpoint: Union[str, Path], *, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
    linearize: Optional[bool] = None, verify_checksums: bool = True,
) -> nn.Module:
    """``load_checkpoint`` with one clear message whatever goes wrong.

    Raises:
        ValueError: "checkpoint <path> failed to load: <why>", with the underlying error chained.
    """
    path = resolve_checkpoint(checkpoint)
    try:
        return load_checkpoint(path, dtype=dtype, device=device, linearize=linearize, verify_checksums=verify_checksums)
    except (ValueError, OSError, RuntimeError, KeyError) as error:
        # A KeyError's text is just the key (a config missing one that no loader checks): say what it is.
        reason = f"its config lacks the key {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(
            f"checkpoint {path} failed to load: {reason}. Check the path and its files (supra convert reads "
            "the same formats: supra, hf, openlm)"
        ) from error


def default_add_bos(tokenizer, add_bos: Optional[bool] = None) -> bool:
    """Whether contexts start with BOS: ``add_bos`` when given, else the tokenizer's own default,
    the rule lm-eval's ``hf`` model follows (it lets the tokenizer decide):

    - a tokenizer with an ``add_bos_token`` attribute follows it (a GGUF file's flag; for an HF
      ``tokenizer.json``, whether its post-processor adds BOS, which transformers follows);
    - a tokenizer without BOS, and the byte tokenizer (supra's byte-level corpora carry no BOS),
      add none;
    - others with a BOS (a bare sentencepiece ``.model``, as Llama and Mistral use it) add it.

    Raises:
        ValueError: for ``add_bos=True`` with a tokenizer that has no BOS.
    """
    bos = getattr(tokenizer, "bos_id", None)
    # sentencepiece reports a disabled BOS as -1.
    bos = None if bos is None or bos < 0 else bos
    if add_bos is None:
        if bos is None or isinstance(tokenizer, ByteTokenizer):
            return False
        own = getattr(tokenizer, "add_bos_token", None)
        return True if own is None else bool(own)
    if add_bos and bos is None:
        raise ValueError(f"add_bos=True but tokenizer {tokenizer!r} has no BOS token; set add_bos=false")
    return bool(add_bos)
