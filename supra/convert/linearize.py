"""Turn a torchtune softmax decoder into a SUPRA (or hybrid) model in place."""

import logging
from typing import Callable, Iterable, List, Mapping, Optional

import torch
from torch import nn
from torchtune.modules import MultiHeadAttention, TransformerDecoder, TransformerSelfAttentionLayer

from supra.models.supra._component_builders import supra_attention
from supra.models.supra._spec import SPEC_ATTRIBUTE, record_linearize
from supra.modules import LinearAttention, SupraDecoder, SupraLayer

logger = logging.getLogger(__name__)

# Submodules of LinearAttention that linearization adds (all others are pretrained).
NEW_SUBMODULES = ("feature_map", "k_feature_map", "q_norm", "k_norm", "decay")


def linearize(
    model: TransformerDecoder,
    *,
    layers: Optional[Iterable[int]] = None,
    feature_map: "str | Callable[[int, int], nn.Module] | Mapping" = "relu",
    feature_dim: Optional[int] = None,
    decay: "str | Callable[[int], nn.Module] | Mapping" = "alibi",
    decay_start: Optional[float] = None,
    qk_norm: bool = False,
    norm_type: str = "rms_norm",
    norm_eps: Optional[float] = None,
    rope_base: Optional[float] = None,
    rope_style: str = "half",
    normalization: str = "group_norm",
    impl: Optional[str] = None,
) -> SupraDecoder:
    """Swaps softmax attention for SUPRA attention, keeping every pretrained tensor.

    Each chosen layer's q/k/v/output projections move unchanged (the same tensors) into a
    ``LinearAttention`` that adds new feature maps (and q/k norms if asked); decay slopes and
    the per-head GroupNorm have no parameters. The decoder becomes a ``SupraDecoder`` (same
    attributes, mask-free caches). List the added parameters with ``new_parameter_names``.

    Args:
        model (TransformerDecoder): a torchtune softmax decoder (llama2, llama3.x, mistral, qwen2).
        layers (Optional[Iterable[int]]): layer indices to linearize (negative ones count from
            the end); None means all. The rest stay softmax (a hybrid model).
        feature_map (str | callable | Mapping): ``"relu"``, a factory ``(in_dim, out_dim) ->
            nn.Module``, or a component spec ``{"_component_": "pkg.mod.Name", **kwargs}`` called as
            ``Name(in_dim, out_dim, **kwargs)`` (a config's form; recorded, so checkpoints rebuild it).
        feature_dim (Optional[int]): d_k; defaults to the head dimension.
        decay (str | callable | Mapping): ``"alibi"`` (Lightning), ``"retnet"`` or ``"none"``
            (fixed slopes), a factory ``(num_heads) -> nn.Module``, or a component spec called as
            ``Name(num_heads, **kwargs)`` (see ``build_decay`` in ``supra.models.supra._component_builders``; a module's parameters
            count as new).
        decay_start (Optional[float]): first alibi slope.
        qk_norm (bool): add q/k norms over all head features.
        norm_type (str): their type (see ``supra.models.NORM_TYPES``).
        norm_eps (Optional[float]): their epsilon; defaults to the layer's own norm epsilon.
        rope_base (Optional[float]): RoPE base; defaults to the model's.
        rope_style (str): ``"half"`` or ``"interleaved"``.
        normalization (str): ``"group_norm"`` (SUPRA) or ``"denominator"`` (the T2R-style
            normalization the paper ablates).
        impl (Optional[str]): forces an op implementation.

    Returns:
        SupraDecoder: ``model`` itself, converted.

    Raises:
        ValueError: if ``model`` is not a torchtune decoder of softmax self-attention layers, a
            layer index is out of range or already linear, or an attention carries parameters
            SUPRA would drop (per-head q/k norms).
    """
    if not isinstance(model, TransformerDecoder):
        raise ValueError(f"linearize takes a torchtune TransformerDecoder; got {type(model).__name__}")
    if type(model) not in (TransformerDecoder, SupraDecoder):
        raise ValueError(
            f"linearize converts TransformerDecoder in place; {type(model).__name__} is a subclass it "
            "cannot safely convert"
        )
    chosen = _layer_indices(layers, len(model.layers))
    new_params = 0
    for i in chosen:
        attn = model.layers[i].attn
        if isinstance(attn, LinearAttention):
            raise ValueError(f"layer {i} is already linear attention")
        if not isinstance(attn, MultiHeadAttention):
            raise ValueError(f"layer {i} has {type(attn).__name__}, not torchtune softmax MultiHeadAttention")
        if attn.q_norm is not None or attn.k_norm is not None:
            raise ValueError(
                f"layer {i} has per-head q/k norms; SUPRA would drop their pretrained weights, "
                "which is not supported"
            )
        linear = supra_attention(
            embed_dim=attn.embed_dim,
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            v_proj=attn.v_proj,
            output_proj=attn.output_proj,
            feature_dim=feature_dim,
            feature_map=feature_map,
            decay=decay,
            decay_start=decay_start,
            qk_norm=qk_norm,
            norm_type=norm_type,
            norm_eps=norm_eps if norm_eps is not None else _layer_norm_eps(model.layers[i]),
            rope_base=rope_base if rope_base is not None else getattr(attn.pos_embeddings, "base", 10_000.0),
            rope_style=rope_style,
            normalization=normalization,
            impl=impl,
        )
        weight = attn.q_proj.weight
        _move_new_modules(linear, device=weight.device, dtype=weight.dtype)
        new_params += sum(p.numel() for name in NEW_SUBMODULES if getattr(linear, name) is not None
                          for p in getattr(linear, name).parameters())
        model.layers[i].attn = linear
        if type(model.layers[i]) is TransformerSelfAttentionLayer:
            # SupraLayer adds only the cu_seqlens pass-through, so the swap keeps the block valid.
            model.layers[i].__class__ = SupraLayer
    # SupraDecoder adds methods only, so swapping the class keeps the object valid.
    model.__class__ = SupraDecoder
    for name, part in (("feature map", feature_map), ("decay", decay)):
        if callable(part) and hasattr(model, SPEC_ATTRIBUTE):
            # A factory cannot be written to a config (a component spec can): such a model cannot
            # be saved by its build record.
            model.supra_spec["unsaveable"] = f"linearized with a custom {name} {part!r} (pass a component spec instead)"
    record_linearize(model, dict(
        layers=chosen, feature_map=None if callable(feature_map) else feature_map,
        feature_dim=feature_dim, decay=None if callable(decay) else decay, decay_start=decay_start, qk_norm=qk_norm,
        norm_type=norm_type, norm_eps=norm_eps, rope_base=rope_base, rope_style=rope_style, normalization=normalization, impl=impl,
    ))
    logger.info(
        "linearized %d of %d layers; added %d new parameters", len(chosen), len(model.layers), new_params
    )
    return model


def new_parameter_names(model: nn.Module) -> List[str]:
    """Names (as in ``model.named_parameters()``) of the parameters linearization added:
    the SUPRA feature maps and q/k norms. Everything else is pretrained."""
    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LinearAttention):
            continue
        for sub in NEW_SUBMODULES:
            child = getattr(module, sub)
            if child is not None:
                prefix = f"{module_name}.{sub}." if module_name else f"{sub}."
                names.extend(prefix + name for name, _ in child.named_parameters())
    return names


def _layer_indices(layers: Optional[Iterable[int]], num_layers: int) -> List[int]:
    if layers is None:
        return list(range(num_layers))
    chosen = []
    for i in layers:
        if not -num_layers <= i < num_layers:
            raise ValueError(f"layer index {i} is out of range for a model of {num_layers} layers")
        chosen.append(i % num_layers)
    return sorted(set(chosen))


def _layer_norm_eps(layer: nn.Module) -> float:
    return float(getattr(layer.sa_norm, "eps", 1e-5))


def _move_new_modules(linear: LinearAttention, device: torch.device, dtype: torch.dtype) -> None:
    for name in NEW_SUBMODULES:
        child = getattr(linear, name)
        if child is not None:
            child.to(device=device, dtype=dtype)
    linear.decay.to(device=device)
