"""Hugging Face softmax folders (llama, mistral, qwen2): config and key map.

Weights keep HF's q/k row layout: supra builds these models with rotate-half RoPE (HF's own
convention), so no permutation is needed and logits equal transformers'.
"""

import logging
import re
from typing import Any, Dict, List, Tuple

import torch

logger = logging.getLogger(__name__)

HF_MODEL_TYPES = ("llama", "mistral", "qwen2")

_LAYER_KEYS = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.output_proj",
    "mlp.gate_proj": "mlp.w1",
    "mlp.up_proj": "mlp.w3",
    "mlp.down_proj": "mlp.w2",
}
_LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


HF_REQUIRED_KEYS = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")


def hf_decoder_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """``supra_decoder`` arguments for an HF softmax ``config.json`` (all layers softmax).

    Raises:
        ValueError: for an unsupported model type, activation, RoPE type or option, or a missing key.
    """
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"HF model_type {model_type!r} is not supported; supported: {HF_MODEL_TYPES} (and 'openlm')")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported; supported: ['silu']")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported; supported: false")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported for qwen2; supported: false")
    window = config.get("sliding_window")
    if model_type == "mistral" and window and window < config.get("max_position_embeddings", 0):
        logger.warning(
            "sliding_window=%s is not applied: attention is full (identical for sequences up to the window)",
            config["sliding_window"],
        )
    missing = [key for key in HF_REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"HF config.json lacks {missing}; a {model_type} config needs {list(HF_REQUIRED_KEYS)}")
    rope = _rope_parameters(config)
    num_layers = config["num_hidden_layers"]
    return dict(
        vocab_size=config["vocab_size"],
        num_layers=num_layers,
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        embed_dim=config["hidden_size"],
        intermediate_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 4096),
        norm_type="rms_norm",
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_base=float(rope.get("rope_theta", 10_000.0)),
        rope_style="half",
        rope_scaling=_llama3_scaling(rope),
        head_dim=config.get("head_dim"),
        attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        softmax_layers=list(range(num_layers)),
    )


def _rope_parameters(config: Dict[str, Any]) -> Dict[str, Any]:
    """RoPE settings from either config style: ``rope_theta`` + ``rope_scaling`` at top level,
    or a ``rope_parameters`` dict (newer transformers)."""
    rope = dict(config.get("rope_parameters") or {})
    if "rope_theta" in config and "rope_theta" not in rope:
        rope["rope_theta"] = config["rope_theta"]
    if config.get("rope_scaling"):
        rope.update(config["rope_scaling"])
    return rope


def _llama3_scaling(rope: Dict[str, Any]):
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: ['default', 'llama3']")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return {key: rope[key] for key in keys}


def hf_key_map(tie_word_embeddings: bool):
    """Returns a key map HF name -> supra name (see ``supra.checkpoint._load.KeyMap``)."""

    def key_map(name: str, tensor: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
        if name.endswith("rotary_emb.inv_freq"):
            return []
        if name == "lm_head.weight" and tie_word_embeddings:
            return [("tok_embeddings.weight", tensor)]
        if name == "model.embed_tokens.weight":
            return [("tok_embeddings.weight", tensor)]
        if name == "model.norm.weight":
            return [("norm.scale", tensor)]
        if name == "lm_head.weight":
            return [("output.weight", tensor)]
        match = _LAYER_PATTERN.match(name)
        if match:
            layer, module, kind = match.groups()
            if module == "input_layernorm" and kind == "weight":
                return [(f"layers.{layer}.sa_norm.scale", tensor)]
            if module == "post_attention_layernorm" and kind == "weight":
                return [(f"layers.{layer}.mlp_norm.scale", tensor)]
            if module in _LAYER_KEYS:
                return [(f"layers.{layer}.{_LAYER_KEYS[module]}.{kind}", tensor)]
        return [(name, tensor)]

    return key_map
