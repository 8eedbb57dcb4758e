"""``from_pretrained`` / ``save_pretrained`` arguments: where the folder is, dtype, device, stale files."""

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

# from_pretrained arguments transformers passes (or users pass out of habit) that mean nothing here:
# supra's loader already streams weights tensor by tensor and runs no remote code.
IGNORED_LOAD_ARGUMENTS = (
    "_from_auto", "_from_pipeline", "adapter_kwargs", "attn_implementation", "low_cpu_mem_usage",
    "trust_remote_code", "use_safetensors",
)
# Config attributes a from_pretrained argument may set even when the folder's config lacks them.
TOKEN_ID_ATTRIBUTES = ("bos_token_id", "eos_token_id", "pad_token_id")
HUB_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "revision", "token")
# What a model folder needs from the hub (tokenizer files are fetched by AutoTokenizer).
HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin"]
# Files of an earlier save that must not survive next to new weights (an index would win over them).
STALE_WEIGHTS = (
    "supra_config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin",
)


def local_folder(name_or_path: Union[str, Path], subfolder: str = "", **hub: Any) -> Path:
    """A local folder as is, or a hub repository id downloaded with ``huggingface_hub``.

    Args:
        name_or_path: a folder, or a hub repo id such as ``"tri-ml/mistral-supra"``.
        subfolder (str): a folder inside it.
        **hub: ``cache_dir``, ``force_download``, ``local_files_only``, ``revision``, ``token``.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        options = {key: value for key, value in hub.items() if value is not None}
        path = Path(snapshot_download(str(name_or_path), allow_patterns=HUB_PATTERNS, **options))
    return path / subfolder if subfolder else path


def load_dtype(dtype: Any, torch_dtype: Any, config: Any = None) -> Optional[torch.dtype]:
    """``dtype`` (or the older name ``torch_dtype``) as a torch dtype; None keeps the stored dtypes.

    ``"auto"`` (the default) takes the config's dtype when it names one, as transformers does
    (some transformers 5 versions hand a ``dtype`` argument over through the config).

    Raises:
        ValueError: if both are given, or for a name that is not a torch floating dtype.
    """
    if dtype is not None and torch_dtype is not None:
        raise ValueError(f"pass dtype or torch_dtype, not both (got {dtype} and {torch_dtype})")
    value = dtype if dtype is not None else torch_dtype
    if value is None or value == "auto":
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if value is None:
        return None
    if isinstance(value, str):
        value = getattr(torch, value, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be 'auto', a torch floating dtype or its name ('bfloat16'); got {value!r}")
    return value


def load_device(device_map: Any) -> Optional[torch.device]:
    """The one device ``device_map`` names; ``"auto"`` is the GPU when there is one.

    Raises:
        ValueError: for a per-module map (a dict): the model loads whole on one device.
    """
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        raise ValueError(
            "device_map as a per-module dict is not supported: supra models load whole on one device; "
            "pass a device ('cuda', 'cuda:1', 'cpu') or 'auto'"
        )
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def config_overrides(config: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The from_pretrained arguments that set config attributes (ones the config has, or token ids).

    Raises:
        ValueError: for any other argument (not one transformers passes for its own bookkeeping).
    """
    overrides, unknown = {}, []
    for name, value in kwargs.items():
        if name in TOKEN_ID_ATTRIBUTES or (config is not None and hasattr(config, name)):
            overrides[name] = value
        elif name not in IGNORED_LOAD_ARGUMENTS:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"from_pretrained got arguments it does not support: {sorted(unknown)}; supported: dtype, device_map, "
            f"subfolder, config, {', '.join(HUB_ARGUMENTS)} and config attributes"
        )
    return overrides


def remove_stale_weights(folder: Path) -> None:
    """Deletes the weight files (and supra_config.json) of an earlier save in ``folder``."""
    for pattern in STALE_WEIGHTS:
        for path in folder.glob(pattern):
            os.remove(path)
