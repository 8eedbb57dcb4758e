"""Filling a model built on the meta device from a stream of (name, tensor), strictly."""

import logging
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import nn
from torchtune.modules import RMSNorm

logger = logging.getLogger(__name__)

KeyMap = Callable[[str, torch.Tensor], List[Tuple[str, torch.Tensor]]]


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Runs ``build`` with parameters on the meta device: no memory until weights are assigned."""
    with torch.device("meta"):
        return build()


def load_tensors_into(
    model: nn.Module,
    tensors: Iterable[Tuple[str, torch.Tensor]],
    *,
    key_map: KeyMap,
    source: str,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    may_be_missing: Iterable[str] = (),
) -> nn.Module:
    """Assigns checkpoint tensors to a meta-device model, one tensor at a time.

    Every model tensor must be provided exactly once with the right shape; tensors the model
    does not have are errors. Only names in ``may_be_missing`` (the new SUPRA parameters of a
    softmax checkpoint loaded into a SUPRA model) may be absent: they are initialized and listed
    in the log.

    Args:
        model (nn.Module): built on the meta device.
        tensors (Iterable): (checkpoint name, tensor) pairs, streamed.
        key_map (KeyMap): checkpoint (name, tensor) -> model (name, tensor) pairs; [] to drop.
        source (str): the checkpoint's format and path, for messages.
        dtype (Optional[torch.dtype]): cast floating tensors to it; None keeps the stored dtype.
        device (Optional[torch.device]): where the model ends up (default CPU).
        may_be_missing (Iterable[str]): model names allowed to be absent.

    Returns:
        nn.Module: the model, materialized on ``device``.

    Raises:
        ValueError: naming missing, unexpected and wrongly shaped tensors (first few and counts), or
            the tensors holding NaN or infinite values.
    """
    device = torch.device(device or "cpu")
    expected = {name: t.shape for name, t in model.state_dict(keep_vars=True).items()}
    loaded: Dict[str, torch.Tensor] = {}
    unexpected: List[str] = []
    wrong_shape: List[str] = []
    non_finite: List[str] = []
    misshapen: Set[str] = set()
    for checkpoint_name, tensor in tensors:
        for name, value in key_map(checkpoint_name, tensor):
            shown = checkpoint_name if name == checkpoint_name else f"{checkpoint_name} (as {name})"
            if name not in expected:
                unexpected.append(shown)
            elif tuple(value.shape) != tuple(expected[name]):
                wrong_shape.append(f"{shown}: checkpoint {list(value.shape)} vs model {list(expected[name])}")
                misshapen.add(name)
            elif name in loaded:
                # Tied weights arrive under two names; they must agree.
                if not torch.equal(loaded[name].to(value.device, value.dtype), value):
                    wrong_shape.append(f"{shown}: a second, different value for {name} (tied weights must be equal)")
            else:
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    non_finite.append(shown)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                loaded[name] = value.to(device)
    missing = sorted(set(expected) - set(loaded) - misshapen)
    allowed = set(may_be_missing)
    not_allowed = [name for name in missing if name not in allowed]
    if not_allowed or unexpected or wrong_shape:
        raise ValueError(_mismatch_message(source, not_allowed, unexpected, wrong_shape))
    if non_finite:
        raise ValueError(
            f"{source} holds NaN or infinite values in {_first(non_finite)}: the weights are damaged or come "
            "from a diverged run; use an earlier checkpoint"
        )
    model.load_state_dict(loaded, strict=False, assign=True)
    initialized = _initialize_meta_parameters(model, device, dtype or _floating_dtype(loaded))
    if initialized:
        logger.warning(
            "%s has no tensors for %d new SUPRA parameters; initialized them: %s",
            source, len(initialized), _first(initialized),
        )
    return model.to(device)


def _floating_dtype(loaded: Dict[str, torch.Tensor]) -> torch.dtype:
    for tensor in loaded.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


@torch.no_grad()
def _initialize_meta_parameters(model: nn.Module, device: torch.device, dtype: torch.dtype) -> List[str]:
    """Materializes and initializes every module whose own parameters are still on meta."""
    initialized = []
    for module_name, module in model.named_modules():
        own = [name for name, p in module.named_parameters(recurse=False) if p.is_meta]
        if not own:
            continue
        module.to_empty(device=device, recurse=False)
        if isinstance(module, RMSNorm):
            module.scale.fill_(1.0)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            raise ValueError(f"cannot initialize the new parameters of {module_name} ({type(module).__name__})")
        module.to(dtype=dtype)
        initialized += [f"{module_name}.{name}" for name in own]
    return initialized


def _first(names: List[str], count: int = 5) -> str:
    shown = ", ".join(names[:count])
    return shown + (f", ... ({len(names)} in all)" if len(names) > count else f" ({len(names)} in all)")


def _mismatch_message(source: str, missing: List[str], unexpected: List[str], wrong_shape: List[str]) -> str:
    parts = [f"{source} does not match the model it describes:"]
    if missing:
        parts.append(f"missing tensors (model names): {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected tensors: {_first(unexpected)}")
    if wrong_shape:
        parts.append(f"wrongly shaped or conflicting tensors: {_first(wrong_shape)}")
    return "\n  ".join(parts)
