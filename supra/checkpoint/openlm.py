"""linear_open_lm checkpoints: HF "openlm" folders (TRI-ML/mistral-supra), raw training
checkpoints, and export back to the HF "openlm" layout."""

import re
from typing import Any, Dict, List, Tuple

import torch
from torch import nn
from torchtune.modules import RMSNorm, TiedLinear

from supra.models.supra._component_builders import NORM_TYPES
from supra.modules import (
    HeadGroupNorm,
    LinearAttention,
    ReLUFeatureMap,
    RotaryEmbedding,
    SupraDecoder,
    alibi_slopes,
    is_linear_layer,
    retnet_slopes,
)

SUPPORTED = {
    "attn_name": ("linear_attn",),
    "positional_embedding_type": ("rotary",),
    "ffn_type": ("swiglu", "swiglu_torch"),
    "norm_type": NORM_TYPES,
}
# Raw open_lm model JSONs and CLI params use other names for some HF-openlm config keys.
ALIASES = {"hidden_dim": "dim", "qk_norm": "apply_qk_norm", "model_norm": "norm_type"}
REQUIRED = ("dim", "n_layers", "n_heads", "vocab_size", "seq_len", "norm_type", "attn_name")
OPENLM_ROPE_BASE = 10_000.0
_PREFIXES = ("module.", "_orig_mod.", "model.")


def normalize_openlm_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Renames aliases and checks that every value is one supra implements.

    Raises:
        ValueError: for a missing required key or an unsupported value (naming the supported ones).
    """
    config = {ALIASES.get(key, key): value for key, value in config.items()}
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise ValueError(f"open_lm config lacks {missing}; add them (e.g. norm_type 'rms_norm', attn_name 'linear_attn')")
    config.setdefault("positional_embedding_type", "rotary")
    config.setdefault("ffn_type", "swiglu")
    for key, supported in SUPPORTED.items():
        if config[key] not in supported:
            raise ValueError(f"open_lm {key} {config[key]!r} is not supported; supported: {list(supported)}")
    if config.get("post_embed_norm"):
        raise ValueError("open_lm post_embed_norm=true is not supported; supported: false")
    head_dim = config["dim"] // config["n_heads"]
    if config.get("v_head_dim", head_dim) != head_dim:
        raise ValueError(f"open_lm v_head_dim {config['v_head_dim']} is not supported; supported: dim / n_heads = {head_dim}")
    return config


def openlm_decoder_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """``supra_decoder`` arguments for an (already normalized) open_lm config."""
    dim, heads = config["dim"], config["n_heads"]
    decay = "none"
    if config.get("use_decay", True):
        decay = "retnet" if config.get("use_retnet_slopes", False) else "alibi"
    return dict(
        vocab_size=config["vocab_size"],
        num_layers=config["n_layers"],
        num_heads=heads,
        num_kv_heads=config.get("n_heads_kv") or heads,
        embed_dim=dim,
        intermediate_dim=config.get("intermediate_dim_ffn") or 256 * ((int(2 * 4 * dim / 3) + 255) // 256),
        max_seq_len=config["seq_len"],
        norm_type=config["norm_type"],
        norm_eps=config.get("norm_eps", 1e-5),
        rope_base=OPENLM_ROPE_BASE,
        rope_style="half",
        feature_dim=config.get("qk_head_dim") or dim // heads,
        decay=decay,
        decay_start=config.get("decay_start") if decay == "alibi" else None,
        qk_norm=bool(config.get("apply_qk_norm", False)),
        tie_word_embeddings=bool(config.get("weight_tying", False)),
    )


def _norm_parameter(norm_type: str, kind: str) -> str:
    """open_lm's ``weight`` is torchtune RMSNorm's ``scale``."""
    return "scale" if norm_type == "rms_norm" and kind == "weight" else kind


_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_NORMS = {"attention_norm": "sa_norm", "ffn_norm": "mlp_norm", "attention._totrain_q_norm": "attn.q_norm",
          "attention._totrain_k_norm": "attn.k_norm"}
_RENAMES = {"attention.out_proj.weight": "attn.output_proj.weight",
            "attention._totrain_embed.weight": "attn.feature_map.proj.weight",
            "attention._totrain_embed.bias": "attn.feature_map.proj.bias",
            "attention._totrain_embed_kv.weight": "attn.k_feature_map.proj.weight",
            "attention._totrain_embed_kv.bias": "attn.k_feature_map.proj.bias",
            "feed_forward.w3.weight": "mlp.w2.weight"}


def strip_prefixes(name: str) -> str:
    """Removes the DDP (``module.``), torch.compile (``_orig_mod.``) and HF (``model.``) prefixes."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def openlm_key_map(config: Dict[str, Any]):
    """Returns a key map open_lm name -> supra name(s), splitting the fused in_proj and w12."""
    kwargs = openlm_decoder_kwargs(config)
    head_dim = kwargs["embed_dim"] // kwargs["num_heads"]
    qkv_rows = [kwargs["num_heads"] * head_dim, kwargs["num_kv_heads"] * head_dim, kwargs["num_kv_heads"] * head_dim]
    norm_type, tied = kwargs["norm_type"], kwargs["tie_word_embeddings"]

    def key_map(name: str, tensor: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
        name = strip_prefixes(name)
        if name == "output.weight" and tied:
            return [("tok_embeddings.weight", tensor)]
        if name.startswith("norm."):
            return [("norm." + _norm_parameter(norm_type, name[5:]), tensor)]
        match = _LAYER.match(name)
        if not match:
            return [(name, tensor)]
        layer, rest = match.groups()
        prefix = f"layers.{layer}."
        if rest == "attention.in_proj.weight":
            q, k, v = _split_rows(name, tensor, qkv_rows)
            return [(prefix + "attn.q_proj.weight", q), (prefix + "attn.k_proj.weight", k), (prefix + "attn.v_proj.weight", v)]
        if rest == "feed_forward.w12.weight":
            gate, up = _split_rows(name, tensor, [tensor.shape[0] // 2] * 2)
            return [(prefix + "mlp.w1.weight", gate), (prefix + "mlp.w3.weight", up)]
        if rest in _RENAMES:
            return [(prefix + _RENAMES[rest], tensor)]
        module, _, kind = rest.rpartition(".")
        if module in _NORMS:
            return [(prefix + f"{_NORMS[module]}.{_norm_parameter(norm_type, kind)}", tensor)]
        return [(name, tensor)]

    return key_map


def _split_rows(name: str, tensor: torch.Tensor, rows: List[int]) -> List[torch.Tensor]:
    if tensor.dim() != 2 or tensor.shape[0] != sum(rows):
        raise ValueError(
            f"wrongly shaped tensor {name}: {list(tensor.shape)}, expected {sum(rows)} rows ({' + '.join(map(str, rows))})"
        )
    # Views, not copies: memory stays at one copy of the weights (save_checkpoint copies
    # tensors that share storage before writing safetensors).
    return list(torch.split(tensor, rows, dim=0))


def openlm_config_from_model(model: nn.Module) -> Dict[str, Any]:
    """The HF "openlm" config.json that describes ``model``.

    Raises:
        ValueError: naming the first property the openlm layout cannot express (softmax layers,
            a custom feature map, interleaved RoPE or a base other than 10000, custom slopes, ...).
    """
    if not isinstance(model, SupraDecoder) or not all(is_linear_layer(layer) for layer in model.layers):
        raise ValueError("the openlm layout holds all-linear SUPRA models; this model has softmax layers (linearize it first: linearize=True, or supra convert --linearize)")
    attn: LinearAttention = model.layers[0].attn
    _check_expressible(model, attn)
    norm_type = _norm_type(model)
    heads = attn.num_heads
    config = {
        "model_type": "openlm",
        "architectures": ["OpenLMforCausalLM"],
        "dim": attn.embed_dim,
        "intermediate_dim_ffn": model.layers[0].mlp.w1.weight.shape[0],
        "n_layers": len(model.layers),
        "n_heads": heads,
        "n_heads_kv": attn.num_kv_heads,
        "vocab_size": model.tok_embeddings.num_embeddings,
        "norm_eps": _norm_eps(model.norm),
        "seq_len": model.max_seq_len,
        "weight_tying": isinstance(model.output, TiedLinear),
        "apply_qk_norm": attn.q_norm is not None,
        "qk_head_dim": attn.feature_dim,
        "v_head_dim": attn.head_dim,
        "norm_type": norm_type,
        "attn_name": "linear_attn",
        "positional_embedding_type": "rotary",
        "ffn_type": "swiglu",
        "post_embed_norm": False,
    }
    config.update(_decay_config(attn.decay.slopes.double().cpu()))
    return config


def _check_expressible(model: nn.Module, first: LinearAttention) -> None:
    for i, layer in enumerate(model.layers):
        attn: LinearAttention = layer.attn
        rope = attn.pos_embeddings
        problems = {
            "a feature map other than relu(Wx+b)": not isinstance(attn.feature_map, ReLUFeatureMap),
            "RoPE other than rotate-half with base 10000": not (
                isinstance(rope, RotaryEmbedding) and rope.style == "half" and rope.base == OPENLM_ROPE_BASE
                and not rope.llama3_scaling and rope.dim == attn.feature_dim
            ),
            "an output norm other than per-head GroupNorm with eps 1e-5": not (
                isinstance(attn.out_norm, HeadGroupNorm) and attn.out_norm.eps == 1e-5
            ),
            "projection biases": any(getattr(p, "bias", None) is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.output_proj)),
            "a key scale other than 1/sqrt(d_k)": abs(attn.scale - attn.feature_dim**-0.5) > 1e-12,
            "shapes that differ between layers": (attn.num_heads, attn.num_kv_heads, attn.feature_dim) != (first.num_heads, first.num_kv_heads, first.feature_dim),
            "decay slopes that differ between layers": not torch.equal(attn.decay.slopes, first.decay.slopes),
            "q/k norms on some layers only": (attn.q_norm is None) != (first.q_norm is None),
            "q/k norms of another type or eps than the block norms (open_lm uses one norm everywhere)": any(
                norm is not None and not _same_norm_module(norm, model.norm) for norm in (attn.q_norm, attn.k_norm)
            ),
        }
        for problem, present in problems.items():
            if present:
                raise ValueError(f"layer {i} has {problem}, which the openlm layout cannot express")


def _same_norm_module(a: nn.Module, b: nn.Module) -> bool:
    """Same class, same affine parameters present and same eps."""
    def signature(norm):
        return (type(norm), getattr(norm, "weight", None) is not None, getattr(norm, "bias", None) is not None, _norm_eps(norm))
    return signature(a) == signature(b)


def _norm_type(model: nn.Module) -> str:
    spec_norm = getattr(model, "supra_spec", {}).get("kwargs", {}).get("norm_type")
    norm = model.norm
    if isinstance(norm, RMSNorm):
        inferred = "rms_norm"
    elif isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None:
        inferred = "default_layer_norm"
    elif isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        inferred = "gain_only_lp_layer_norm"
    elif isinstance(norm, nn.LayerNorm):
        inferred = "no_wb_layer_norm"
    else:
        raise ValueError(f"norm {type(norm).__name__} has no openlm norm_type")
    # The spec keeps the exact name when several names compute the same function.
    return spec_norm if spec_norm in NORM_TYPES and _same_norm(spec_norm, inferred) else inferred


def _same_norm(a: str, b: str) -> bool:
    families = [{"rms_norm"}, {"default_layer_norm", "lp_layer_norm"},
                {"gain_only_layer_norm", "gain_only_lp_layer_norm"}, {"no_wb_layer_norm"}]
    return any(a in f and b in f for f in families)


def _norm_eps(norm: nn.Module) -> float:
    return float(norm.eps[0] if isinstance(norm.eps, tuple) else norm.eps)


def _decay_config(slopes: torch.Tensor) -> Dict[str, Any]:
    heads = slopes.shape[0]
    if torch.all(slopes == 0):
        return {"use_decay": False, "use_retnet_slopes": False, "decay_start": None}
    if torch.allclose(slopes, retnet_slopes(heads), rtol=1e-6, atol=0):
        return {"use_decay": True, "use_retnet_slopes": True, "decay_start": None}
    alibi = alibi_slopes(heads)
    if torch.allclose(slopes, alibi, rtol=1e-6, atol=0):
        return {"use_decay": True, "use_retnet_slopes": False, "decay_start": None}
    start = float(slopes[0])
    if torch.allclose(slopes, alibi_slopes(heads, start), rtol=1e-6, atol=0):
        return {"use_decay": True, "use_retnet_slopes": False, "decay_start": start}
    raise ValueError(f"decay slopes {slopes.tolist()} follow no openlm rule (alibi, alibi with decay_start, retnet, none)")


def openlm_state_dict(model: nn.Module, config: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """supra state dict -> open_lm names (HF "openlm" folders add the ``model.`` prefix)."""
    state = model.state_dict()
    norm_type = config["norm_type"]

    def norm(src: str, dst: str) -> Dict[str, torch.Tensor]:
        out = {}
        for kind in ("weight", "bias"):
            key = f"{src}.{_norm_parameter(norm_type, kind)}"
            if key in state:
                out[f"{dst}.{kind}"] = state[key]
        return out

    out = {"tok_embeddings.weight": state["tok_embeddings.weight"]}
    out.update(norm("norm", "norm"))
    # open_lm ties by sharing one tensor under both names.
    out["output.weight"] = state["tok_embeddings.weight"] if config["weight_tying"] else state["output.weight"]
    for i in range(config["n_layers"]):
        src, dst = f"layers.{i}.", f"layers.{i}."
        out[dst + "attention.in_proj.weight"] = torch.cat(
            [state[src + f"attn.{p}_proj.weight"] for p in "qkv"], dim=0
        )
        out[dst + "feed_forward.w12.weight"] = torch.cat([state[src + "mlp.w1.weight"], state[src + "mlp.w3.weight"]], dim=0)
        for openlm_name, supra_name in _RENAMES.items():
            if src + supra_name in state:
                out[dst + openlm_name] = state[src + supra_name]
        for openlm_name, supra_name in _NORMS.items():
            out.update(norm(src + supra_name, dst + openlm_name))
    return out
