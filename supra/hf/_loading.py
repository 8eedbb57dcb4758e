"""``from_pretrained`` / ``save_pretrained`` arguments: where the folder is, dtype, device, stale files."""

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

logger = logging.getLogger(__name__)

# from_pretrained arguments that would change which weights load or how the model computes.
# Ignoring them would silently give another model than the one asked for, so they are refused
# whenever they are set to anything but their default (transformers passes some as None).
RESULT_CHANGING_ARGUMENTS = {
    "quantization_config": "quantized loading is not supported; load, then quantize the module (e.g. torchao)",
    "load_in_8bit": "quantized loading is not supported; load, then quantize the module (e.g. torchao)",
    "load_in_4bit": "quantized loading is not supported; load, then quantize the module (e.g. torchao)",
    "gguf_file": "a GGUF file is a softmax checkpoint: supra.checkpoint.load_checkpoint(path) reads it",
    "variant": "weight variants are not supported: a supra folder holds one set of weights",
    "state_dict": "load the folder, then model.load_state_dict(state_dict)",
    "key_mapping": "supra folders use supra's own key names; there is nothing to map",
    "adapter_kwargs": "adapters are not supported: merge the adapter into the weights first",
    "adapter_name": "adapters are not supported: merge the adapter into the weights first",
    "tp_plan": "tensor parallelism is not supported here: load on one device",
    "tp_size": "tensor parallelism is not supported here: load on one device",
    "device_mesh": "tensor parallelism is not supported here: load on one device",
    "distributed_config": "distributed loading is not supported here: load on one device",
    "use_kernels": "hub kernels do not apply: supra runs its own linear-attention kernels",
    "kernel_config": "hub kernels do not apply: supra runs its own linear-attention kernels",
    "output_loading_info": "supra's loader is strict (every key must match), so there is no loading info",
    "ignore_mismatched_sizes": "supra's loader is strict: a size mismatch is an error, never skipped",
    "from_tf": "only PyTorch weights (safetensors or .bin) load",
    "from_flax": "only PyTorch weights (safetensors or .bin) load",
}
# Values of the arguments above that mean "not asked for".
UNSET_VALUES = (None, False, {}, "default")
# Attention implementations a user may name: SUPRA layers have one exact computation either way.
ATTENTION_IMPLEMENTATIONS = (None, "eager", "sdpa")
# Hub, download, cache and memory options transformers passes (or users pass out of habit): they
# never change the result. The ones huggingface_hub's snapshot_download takes are handed to it.
IGNORED_LOAD_ARGUMENTS = (
    "_commit_hash", "_fast_init", "_from_auto", "_from_pipeline", "allow_all_kernels", "cache_dir", "code_revision",
    "disable_mmap", "force_download", "fusion_config", "kernels_mode", "local_files_only", "low_cpu_mem_usage",
    "max_memory", "mirror", "offload_buffers", "offload_folder", "offload_state_dict", "proxies", "resume_download",
    "revision", "token", "tqdm_class", "trust_remote_code", "use_auth_token", "use_safetensors", "user_agent",
    "weights_only",
)
# Config attributes a from_pretrained argument may set even when the folder's config lacks them.
TOKEN_ID_ATTRIBUTES = ("bos_token_id", "eos_token_id", "pad_token_id")
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
        **hub: from_pretrained's hub options; those ``snapshot_download`` takes (``cache_dir``,
            ``force_download``, ``local_files_only``, ``revision``, ``token``, ... as its installed
            version names them) are handed to it, the others ignored.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        parameters = inspect.signature(snapshot_download).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        options = {key: value for key, value in hub.items() if value is not None and (takes_any or key in parameters)}
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
        value = getattr(config, "dtype", None)
        # Older configs know only torch_dtype; newer ones deprecate reading it (a warning per read).
        if value is None and not hasattr(type(config), "dtype"):
            value = getattr(config, "torch_dtype", None)
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
    """Sorts from_pretrained's remaining arguments: the ones that set config attributes (ones the
    config has, or token ids) are returned; hub, download and memory options are ignored; any other
    name is ignored with a warning (transformers releases add options; a user's typo shows there).

    Raises:
        ValueError: for an argument that would change the result if ignored (quantization, another
            attention implementation, adapters, a weight variant, ...), naming it and what to do.
    """
    refused = {
        name: RESULT_CHANGING_ARGUMENTS[name] for name, value in kwargs.items()
        if name in RESULT_CHANGING_ARGUMENTS and not _unset(value)
    }
    implementation = kwargs.get("attn_implementation")
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        refused["attn_implementation"] = (
            f"got {implementation!r}: SUPRA layers run linear attention (supra's own kernels); "
            f"leave it unset or pick one of {ATTENTION_IMPLEMENTATIONS[1:]}"
        )
    if refused:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(refused.items()))
        raise ValueError(f"from_pretrained cannot honour {sorted(refused)} for a supra model ({reasons})")
    overrides, unknown = {}, []
    for name, value in kwargs.items():
        if name in TOKEN_ID_ATTRIBUTES or (config is not None and hasattr(config, name)):
            overrides[name] = value
        elif name not in IGNORED_LOAD_ARGUMENTS and name not in RESULT_CHANGING_ARGUMENTS and name != "attn_implementation":
            unknown.append(name)
    if unknown:
        logger.warning(
            "from_pretrained: ignoring %s (neither a config attribute nor an option supra's loader uses)", sorted(unknown)
        )
    return overrides


def _unset(value: Any) -> bool:
    """Whether an argument's value means "not asked for" (None, False, an empty dict, "default")."""
    return any(value is unset or (type(value) is type(unset) and value == unset) for unset in UNSET_VALUES)


def remove_stale_weights(folder: Path) -> None:
    """Deletes the weight files (and supra_config.json) of an earlier save in ``folder``."""
    for pattern in STALE_WEIGHTS:
        for path in folder.glob(pattern):
            os.remove(path)
