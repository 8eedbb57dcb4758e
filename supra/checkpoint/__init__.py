"""Load any supported checkpoint into a ready model; save supra folders; export openlm folders.

Formats (detected from the files):

- ``supra``: ``supra_config.json`` (builder, arguments, linearize calls) + safetensors weights.
- ``hf``: a Hugging Face llama / mistral / qwen2 softmax folder (``config.json`` + ``model.safetensors``,
  sharded safetensors with an index, or ``pytorch_model*.bin``).
- ``openlm``: a Hugging Face "openlm" folder like TRI-ML/mistral-supra (``config.json`` with
  ``model_type: "openlm"`` + ``pytorch_model.bin`` or safetensors, keys prefixed ``model.``).
- ``open_lm_raw``: a linear_open_lm training checkpoint (``torch.save`` dict with ``state_dict``)
  plus the open_lm model config it was trained with (``config=``).
- ``gguf``: a llama.cpp ``.gguf`` file (llama or qwen2 architecture; float or quantized tensors,
  dequantized to float32), or a folder holding exactly one.
"""

import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

import supra
from supra.checkpoint._io import (
    atomic_folder,
    iter_tensors,
    load_pickled_state_dict,
    read_json,
    save_safetensors_shards,
    sha256_file,
    verify_sha256,
    weight_files,
)
from supra.checkpoint._load import build_on_meta, load_tensors_into
from supra.checkpoint.gguf import gguf_hf_config, gguf_tensors, read_gguf_header
from supra.checkpoint.hf import hf_decoder_kwargs, hf_key_map
from supra.models.supra._spec import RECORDED_BUILDERS
from supra.checkpoint.openlm import (
    normalize_openlm_config,
    openlm_config_from_model,
    openlm_decoder_kwargs,
    openlm_key_map,
    openlm_state_dict,
)

logger = logging.getLogger(__name__)

SUPRA_CONFIG = "supra_config.json"
FORMAT_VERSION = 1
FORMATS = {
    "supra": f"a folder with {SUPRA_CONFIG} and model.safetensors (or shards with model.safetensors.index.json)",
    "hf": "a folder with config.json (model_type llama, mistral or qwen2) and model.safetensors, "
          "model.safetensors.index.json + shards, or pytorch_model*.bin",
    "openlm": "a folder with config.json (model_type 'openlm') and pytorch_model.bin or model.safetensors",
    "open_lm_raw": "a .pt/.pth/.bin training checkpoint file, with config= its open_lm model config (JSON path or dict)",
    "gguf": "a .gguf file (architecture llama or qwen2), or a folder holding exactly one .gguf file",
}
PathLike = Union[str, Path]


def detect_format(path: PathLike) -> str:
    """The checkpoint format of ``path``: ``"supra"``, ``"hf"``, ``"openlm"``, ``"open_lm_raw"`` or ``"gguf"``.

    Raises:
        ValueError: for a path of no known format, listing the formats tried and their files.
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        return "open_lm_raw"
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        if (path / SUPRA_CONFIG).exists():
            return "supra"
        if (path / "config.json").exists():
            return "openlm" if read_json(path / "config.json").get("model_type") == "openlm" else "hf"
        if any(path.glob("*.gguf")):
            return "gguf"
    tried = "\n  ".join(f"{name}: {needs}" for name, needs in FORMATS.items())
    state = "does not exist" if not path.exists() else "matches no known checkpoint format"
    raise ValueError(f"{path} {state}. Formats tried:\n  {tried}")


def load_checkpoint(
    path: PathLike,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    config: Optional[Union[PathLike, Dict[str, Any]]] = None,
    linearize: Optional[Union[bool, Dict[str, Any]]] = None,
    verify_checksums: bool = True,
) -> nn.Module:
    """Builds the model a checkpoint describes and loads its weights, strictly.

    The model is built on the meta device and filled tensor by tensor (safetensors lazily,
    pickles memory-mapped), so peak host memory stays near one copy of the weights. Weights
    that are NaN or infinite are refused, whatever the format.

    Args:
        path: a checkpoint folder or, for ``open_lm_raw`` and ``gguf``, a file (see ``FORMATS``);
            ``supra:REL`` and ``model:NAME`` as in ``supra.config.resolve_path``.
        dtype (Optional[torch.dtype]): cast floating weights; None keeps the stored dtypes
            (float32 for GGUF files, whose tensors are dequantized).
        device: where the model goes (default CPU).
        config: the open_lm model config (path or dict), for ``open_lm_raw`` checkpoints only.
        linearize: for softmax (``hf``, ``gguf``) checkpoints: True (defaults) or a dict of
            ``supra.convert.linearize`` arguments (``{}`` also means defaults) to load them into a
            SUPRA model; its new parameters are initialized (and logged). None or False: as stored.
        verify_checksums (bool): check a supra folder's weight files against the sha256 digests
            ``save_checkpoint`` recorded (reads every byte once more); False skips it for speed.

    Returns:
        nn.Module: a ``supra.modules.SupraDecoder`` (a torchtune ``TransformerDecoder``) in eval mode.

    Raises:
        ValueError: for an unknown format, unsupported config values, missing / unexpected /
            wrongly shaped / non-finite tensors, unreadable weight files, or weight files whose
            checksum changed (each error names the culprit).
    """
    from supra.config import resolve_path
    from supra.convert import linearize as linearize_model, new_parameter_names

    # A config's path: supra:REL (shipped with supra) and model:NAME (supra's model cache) too.
    path = resolve_path(path)
    fmt = detect_format(path)
    if config is not None and fmt != "open_lm_raw":
        raise ValueError(f"config= is only for open_lm_raw checkpoint files; {path} is a {fmt!r} checkpoint")
    linearize = None if linearize is False else linearize
    if linearize is not None and fmt not in ("hf", "gguf"):
        raise ValueError(f"linearize= applies to softmax (hf, gguf) checkpoints; {path} is a {fmt!r} checkpoint, already SUPRA")
    linearize_args = {} if linearize is True else dict(linearize or {})
    may_be_missing = []

    if fmt == "supra":
        spec = read_json(path / SUPRA_CONFIG)
        if verify_checksums:
            verify_sha256(path, spec.get("sha256", {}), skip_hint="verify_checksums=False (verify_checksums=false)")
        model = build_on_meta(lambda: build_from_spec(spec, source=path / SUPRA_CONFIG))
        tensors, key_map = _folder_tensors(path, transient=dtype is not None), _identity
    elif fmt in ("hf", "gguf"):
        if fmt == "hf":
            kwargs = hf_decoder_kwargs(read_json(path / "config.json"))
            tensors = _folder_tensors(path, transient=dtype is not None)
        else:
            header = read_gguf_header(path)
            gguf_config = gguf_hf_config(header)
            kwargs = hf_decoder_kwargs(gguf_config)
            tensors = gguf_tensors(header, gguf_config)
        model = build_on_meta(lambda: supra.models.supra_decoder(**kwargs))
        if linearize is not None:
            build_on_meta(lambda: linearize_model(model, **linearize_args))
            may_be_missing = new_parameter_names(model)
        key_map = hf_key_map(kwargs["tie_word_embeddings"])
    else:
        if fmt == "openlm":
            openlm_config = normalize_openlm_config(read_json(path / "config.json"))
            tensors = _folder_tensors(path, transient=dtype is not None)
        else:
            if config is None:
                raise ValueError(
                    f"{path} is a raw open_lm checkpoint: pass config= the open_lm model config it was trained with "
                    "(JSON path or dict)"
                )
            openlm_config = normalize_openlm_config(config if isinstance(config, dict) else read_json(Path(config)))
            tensors = load_pickled_state_dict(path).items()
        kwargs = openlm_decoder_kwargs(openlm_config)
        model = build_on_meta(lambda: supra.models.supra_decoder(**kwargs))
        key_map = openlm_key_map(openlm_config)

    model = load_tensors_into(
        model, tensors, key_map=key_map, source=f"{fmt} checkpoint {path}", dtype=dtype, device=device, may_be_missing=may_be_missing
    )
    logger.info("loaded %s checkpoint %s", fmt, path)
    return model.eval()


def _identity(name, tensor):
    return [(name, tensor)]


def _folder_tensors(folder: Path, transient: bool = False):
    files = weight_files(folder)
    if not files:
        tried = "\n  ".join(f"{name}: {needs}" for name, needs in FORMATS.items())
        raise ValueError(f"{folder} has a config but no weight files. Formats:\n  {tried}")
    for file in files:
        yield from iter_tensors(file, transient=transient)


def build_from_spec(spec: Dict[str, Any], source: PathLike = "build record") -> nn.Module:
    """Rebuilds a model from a build record: the ``supra.models`` builder, its arguments and
    the ``linearize`` calls that followed.

    Raises:
        ValueError: for a builder that is not a public ``supra.models`` builder.
    """
    from supra.convert import linearize

    name = spec.get("builder")
    if name not in RECORDED_BUILDERS:
        raise ValueError(f"{source}: builder {name!r} is not a supra.models model builder; known: {sorted(RECORDED_BUILDERS)}")
    model = RECORDED_BUILDERS[name](**spec.get("kwargs", {}))
    for call in spec.get("linearize", []):
        linearize(model, **{k: v for k, v in call.items() if not (k in ("feature_map", "decay") and v is None)})
    return model


def save_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    state_dict: Optional[Dict[str, torch.Tensor]] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
) -> Path:
    """Writes a supra folder: safetensors weights (sharded above ``max_shard_size``, with an index)
    and ``supra_config.json`` recording the builder, its arguments and linearize calls, so that
    ``load_checkpoint(path)`` rebuilds the exact model, and the sha256 of every weight file, which
    ``load_checkpoint`` verifies. Written to a temporary folder, then renamed.
    ``state_dict`` replaces ``model.state_dict()`` (e.g. the full state dict gathered from an
    FSDP-sharded model on rank 0).

    Raises:
        ValueError: if the model has no build record (build it with ``supra.models`` builders or
            ``load_checkpoint``), was linearized with a custom feature map, or ``path`` exists.
    """
    spec = getattr(model, "supra_spec", None)
    if spec is None:
        raise ValueError(
            "this model has no build record: build it with a supra.models builder or load_checkpoint "
            "(supra_decoder builds softmax, hybrid and SUPRA models) so that the checkpoint can rebuild it"
        )
    if spec.get("unsaveable"):
        raise ValueError(f"cannot record how to rebuild this model: it was {spec['unsaveable']}")
    tensors = _owned_contiguous(model.state_dict() if state_dict is None else state_dict)
    record = {"format": "supra", "format_version": FORMAT_VERSION, "supra_version": supra.__version__, **spec}
    path = Path(path)
    with atomic_folder(path, overwrite=overwrite) as folder:
        files = save_safetensors_shards(tensors, folder, _parse_size(max_shard_size), metadata={"format": "pt"})
        # Checked by load_checkpoint: a damaged copy fails naming its file instead of loading garbage.
        record["sha256"] = {name: sha256_file(folder / name) for name in files}
        (folder / SUPRA_CONFIG).write_text(json.dumps(record, indent=2))
    logger.info("saved %s", path)
    return path


def export_openlm(model: nn.Module, path: PathLike, *, overwrite: bool = False) -> Path:
    """Writes an HF "openlm" folder (config.json + fp32 pytorch_model.bin, keys prefixed ``model.``)
    that the reference's own HF wrapper loads, and ``load_checkpoint`` too.

    Raises:
        ValueError: naming what the openlm layout cannot express about ``model``.
    """
    config = openlm_config_from_model(model)
    state = {f"model.{k}": v.detach().float().cpu() for k, v in openlm_state_dict(model, config).items()}
    if config["weight_tying"]:
        state["model.output.weight"] = state["model.tok_embeddings.weight"]
    path = Path(path)
    with atomic_folder(path, overwrite=overwrite) as folder:
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    logger.info("exported openlm folder %s", path)
    return path


def _owned_contiguous(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous tensors that do not share storage (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or a number of bytes")
    units = {None: 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[match.group(2).lower() if match.group(2) else None])


__all__ = ["FORMATS", "build_from_spec", "detect_format", "export_openlm", "load_checkpoint", "save_checkpoint"]
