"""An independent float64 model of the reference (linear_open_lm) SUPRA decoder, and checkpoint writers.

Everything here is written from docs/method.md (one layer, the decay slopes, the published checkpoint
layout) and the open_lm conventions it names, without importing the library, so the loader's tests
compare it with a second implementation rather than with itself. The model is plain functions over a
state dict in the reference's key names; the writers produce tiny checkpoints in the two formats the
reference ships: HF "openlm" folders (config.json + pytorch_model.bin or model.safetensors, keys
prefixed "model.") and raw open_lm training checkpoints (torch.save of {"state_dict", "epoch",
"optimizer", ...}) with a model JSON.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

OPENLM_NORM_TYPES = [
    "rms_norm",
    "gain_only_lp_layer_norm",
    "default_layer_norm",
    "lp_layer_norm",
    "gain_only_layer_norm",
    "no_wb_layer_norm",
]

# open_lm's norm classes: which affine parameters each one owns. The "lp" variants only change the
# autocast precision, so in float32/float64 they compute the plain LayerNorm.
_NORM_PARAMS = {
    "rms_norm": ("weight",),
    "gain_only_lp_layer_norm": ("weight",),
    "default_layer_norm": ("weight", "bias"),
    "lp_layer_norm": ("weight", "bias"),
    "gain_only_layer_norm": ("weight",),
    "no_wb_layer_norm": (),
}

_ROPE_BASE = 10000.0
_GROUP_NORM_EPS = 1e-5


def make_openlm_config(**overrides):
    """A tiny HF "openlm" config.json dict with the keys of the published layout (docs/method.md).

    Args:
        **overrides: keys to replace or add. When ``dim`` or ``n_heads`` change and ``qk_head_dim``
            / ``v_head_dim`` are not given, both follow ``dim // n_heads``.

    Returns:
        dict: the config.
    """
    config = {
        "model_type": "openlm",
        "dim": 32,
        "intermediate_dim_ffn": 48,
        "n_layers": 2,
        "n_heads": 4,
        "n_heads_kv": 2,
        "vocab_size": 64,
        "norm_eps": 1e-5,
        "seq_len": 64,
        "weight_tying": False,
        "apply_qk_norm": False,
        "qk_head_dim": None,
        "v_head_dim": None,
        "norm_type": "rms_norm",
        "attn_name": "linear_attn",
        "positional_embedding_type": "rotary",
        "ffn_type": "swiglu",
        "use_decay": True,
        "use_retnet_slopes": False,
        "decay_start": None,
        "post_embed_norm": False,
    }
    config.update(overrides)
    head_dim = config["dim"] // config["n_heads"]
    if config["qk_head_dim"] is None:
        config["qk_head_dim"] = head_dim
    if config["v_head_dim"] is None:
        config["v_head_dim"] = head_dim
    return config


def _norm_shapes(config, prefix, size):
    return {f"{prefix}.{name}": (size,) for name in _NORM_PARAMS[config["norm_type"]]}


def openlm_shapes(config):
    """The reference's parameter names (no prefix) and shapes for ``config``, in a stable order."""
    dim, heads, heads_kv = config["dim"], config["n_heads"], config["n_heads_kv"]
    d = dim // heads
    d_k, d_v = config["qk_head_dim"], config["v_head_dim"]
    hidden = config["intermediate_dim_ffn"]
    vocab = config["vocab_size"]
    shapes = {"tok_embeddings.weight": (vocab, dim)}
    for i in range(config["n_layers"]):
        p = f"layers.{i}"
        shapes[f"{p}.attention.in_proj.weight"] = (heads * d + heads_kv * d + heads_kv * d_v, dim)
        shapes[f"{p}.attention.out_proj.weight"] = (dim, heads * d_v)
        shapes[f"{p}.attention._totrain_embed.weight"] = (heads * d_k, heads * d)
        shapes[f"{p}.attention._totrain_embed.bias"] = (heads * d_k,)
        if heads != heads_kv:
            shapes[f"{p}.attention._totrain_embed_kv.weight"] = (heads_kv * d_k, heads_kv * d)
            shapes[f"{p}.attention._totrain_embed_kv.bias"] = (heads_kv * d_k,)
        if config["apply_qk_norm"]:
            shapes.update(_norm_shapes(config, f"{p}.attention._totrain_q_norm", heads * d_k))
            shapes.update(_norm_shapes(config, f"{p}.attention._totrain_k_norm", heads * d_k))
        shapes[f"{p}.feed_forward.w12.weight"] = (2 * hidden, dim)
        shapes[f"{p}.feed_forward.w3.weight"] = (dim, hidden)
        shapes.update(_norm_shapes(config, f"{p}.attention_norm", dim))
        shapes.update(_norm_shapes(config, f"{p}.ffn_norm", dim))
    shapes.update(_norm_shapes(config, "norm", dim))
    if not config["weight_tying"]:
        shapes["output.weight"] = (vocab, dim)
    return shapes


def random_openlm_state_dict(config, seed):
    """Random float32 weights in the reference's key names (no "model." / "module." prefix).

    Scales are chosen so every term moves the logits: projections ~N(0, 0.2^2), norm gains
    1 + 0.1 N(0, 1), biases 0.1 N(0, 1), feature-map biases positive on average so relu keeps
    most features alive.
    """
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, shape in openlm_shapes(config).items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        is_norm = "norm" in name
        if is_norm and name.endswith(".weight"):
            value = 1.0 + 0.1 * noise
        elif is_norm and name.endswith(".bias"):
            value = 0.1 * noise
        elif "_totrain_embed" in name and name.endswith(".bias"):
            value = 0.1 + 0.1 * noise
        elif name == "tok_embeddings.weight":
            value = noise
        else:
            value = 0.2 * noise
        state_dict[name] = value.contiguous()
    return state_dict


def _norm(config, x, state_dict, prefix):
    """open_lm's norm of ``config["norm_type"]`` over the last dimension, in float64."""
    norm_type = config["norm_type"]
    if norm_type not in _NORM_PARAMS:
        raise ValueError(f"unknown norm_type {norm_type!r}")
    eps = config["norm_eps"]
    if norm_type == "rms_norm":
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + eps)
    params = _NORM_PARAMS[norm_type]
    if "weight" in params:
        y = y * state_dict[f"{prefix}.weight"].double()
    if "bias" in params:
        y = y + state_dict[f"{prefix}.bias"].double()
    return y


def _alibi_slopes(num_heads):
    def geometric(n):
        ratio = 2.0 ** (-8.0 / n)
        return [ratio ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return geometric(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return geometric(closest) + _alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def reference_slopes(config):
    """Per-head decay slopes s_h (gamma_h = exp(-s_h)) as a float64 tensor [H], docs/method.md."""
    heads = config["n_heads"]
    if not config.get("use_decay", True):
        return torch.zeros(heads, dtype=torch.float64)
    if config.get("use_retnet_slopes", False):
        gammas = [1.0 - 2.0 ** (-5 - h) for h in range(heads)]
        return torch.tensor([-math.log(g) for g in gammas], dtype=torch.float64)
    decay_start = config.get("decay_start")
    if decay_start is not None:
        if not math.log2(heads).is_integer():
            raise ValueError("the reference defines decay_start only for a power-of-two head count")
        ratio = 2.0 ** (-8.0 / heads)
        return torch.tensor([decay_start * ratio**i for i in range(heads)], dtype=torch.float64)
    return torch.tensor(_alibi_slopes(heads), dtype=torch.float64)


def _rope(x):
    """Rotate-half RoPE, base 10000, positions 0..T-1, on x [B, T, H, K] in float64."""
    _, t, _, k = x.shape
    inv_freq = 1.0 / (_ROPE_BASE ** (torch.arange(0, k, 2, dtype=torch.float64) / k))
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos = angles.cos()[None, :, None, :]
    sin = angles.sin()[None, :, None, :]
    x1, x2 = x[..., : k // 2], x[..., k // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def decayed_linear_attention(q, k, v, slopes):
    """o_t = sum_{j<=t} exp(-s_h (t-j)) (q_t . k_j) v_j, with a masked matrix. q, k [B,T,H,K], v [B,T,H,V]."""
    t = q.shape[1]
    pos = torch.arange(t, dtype=torch.float64)
    distance = pos[:, None] - pos[None, :]
    causal = distance >= 0
    # [H, T, T]; the exponent of non-causal entries is clamped so exp cannot overflow before masking.
    weights = torch.exp(-slopes[:, None, None] * distance.clamp(min=0)[None]) * causal[None]
    scores = torch.einsum("bthk,bshk->bhts", q, k) * weights[None]
    return torch.einsum("bhts,bshv->bthv", scores, v)


def recurrent_linear_attention(q, k, v, slopes):
    """The same attention as a Python loop over the recurrence S_t = gamma S_{t-1} + k_t^T v_t, o_t = q_t S_t."""
    b, t, h, dk = q.shape
    gamma = torch.exp(-slopes)[None, :, None, None]
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float64)
    outputs = []
    for i in range(t):
        state = gamma * state + k[:, i, :, :, None] * v[:, i, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, i], state))
    return torch.stack(outputs, dim=1)


def _attention(config, x, sd, prefix, attention_fn):
    b, t, dim = x.shape
    heads, heads_kv = config["n_heads"], config["n_heads_kv"]
    d = dim // heads
    d_k, d_v = config["qk_head_dim"], config["v_head_dim"]
    qkv = x @ sd[f"{prefix}.in_proj.weight"].double().T
    q, k, v = qkv.split([heads * d, heads_kv * d, heads_kv * d_v], dim=-1)
    key_map = "_totrain_embed" if heads == heads_kv else "_totrain_embed_kv"
    phi_q = F.relu(q @ sd[f"{prefix}._totrain_embed.weight"].double().T + sd[f"{prefix}._totrain_embed.bias"].double())
    phi_k = F.relu(k @ sd[f"{prefix}.{key_map}.weight"].double().T + sd[f"{prefix}.{key_map}.bias"].double())
    phi_q = phi_q.view(b, t, heads, d_k)
    phi_k = phi_k.view(b, t, heads_kv, d_k)
    v = v.view(b, t, heads_kv, d_v)
    # GQA: query head h reads kv head h // (H / H_kv).
    group = heads // heads_kv
    phi_k = phi_k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    if config["apply_qk_norm"]:
        phi_q = _norm(config, phi_q.reshape(b, t, heads * d_k), sd, f"{prefix}._totrain_q_norm")
        phi_k = _norm(config, phi_k.reshape(b, t, heads * d_k), sd, f"{prefix}._totrain_k_norm")
        phi_q = phi_q.view(b, t, heads, d_k)
        phi_k = phi_k.view(b, t, heads, d_k)
    phi_q = _rope(phi_q)
    phi_k = _rope(phi_k) / math.sqrt(d_k)
    o = attention_fn(phi_q, phi_k, v, reference_slopes(config))
    mean = o.mean(-1, keepdim=True)
    var = (o - mean).pow(2).mean(-1, keepdim=True)
    o = (o - mean) * torch.rsqrt(var + _GROUP_NORM_EPS)
    return o.reshape(b, t, heads * d_v) @ sd[f"{prefix}.out_proj.weight"].double().T


def reference_logits(config, state_dict, tokens, *, recurrent=False):
    """Float64 logits of the reference SUPRA decoder.

    Args:
        config (dict): an HF "openlm" config (see ``make_openlm_config``).
        state_dict (dict[str, Tensor]): weights in the reference's names, without prefix.
        tokens (Tensor): token ids [B, T].
        recurrent (bool): compute attention with the step-by-step recurrence instead of the
            masked matrix (the two must agree; used to check this module itself).

    Returns:
        Tensor: logits [B, T, vocab_size], float64.
    """
    for key, expected in (
        ("attn_name", "linear_attn"),
        ("positional_embedding_type", "rotary"),
        ("ffn_type", "swiglu"),
    ):
        if config.get(key, expected) != expected:
            raise ValueError(f"the reference model only covers {key}={expected!r}")
    if config.get("post_embed_norm", False):
        raise ValueError("the reference model does not cover post_embed_norm")
    attention_fn = recurrent_linear_attention if recurrent else decayed_linear_attention
    sd = state_dict
    embeddings = sd["tok_embeddings.weight"].double()
    h = embeddings[tokens]
    hidden = config["intermediate_dim_ffn"]
    for i in range(config["n_layers"]):
        p = f"layers.{i}"
        h = h + _attention(config, _norm(config, h, sd, f"{p}.attention_norm"), sd, f"{p}.attention", attention_fn)
        x = _norm(config, h, sd, f"{p}.ffn_norm")
        gate, up = (x @ sd[f"{p}.feed_forward.w12.weight"].double().T).split([hidden, hidden], dim=-1)
        h = h + (F.silu(gate) * up) @ sd[f"{p}.feed_forward.w3.weight"].double().T
    h = _norm(config, h, sd, "norm")
    output = embeddings if config["weight_tying"] else sd["output.weight"].double()
    return h @ output.T


def write_hf_openlm_folder(path, config, state_dict, *, safetensors=False):
    """Write an HF "openlm" folder: config.json + pytorch_model.bin (or model.safetensors), keys "model."-prefixed.

    Returns:
        Path: the folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    prefixed = {f"model.{k}": v.contiguous() for k, v in state_dict.items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(prefixed, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(prefixed, path / "pytorch_model.bin")
    return path


def write_raw_open_lm_checkpoint(path_pt, state_dict, *, module_prefix=True, extra=True):
    """Write a raw open_lm training checkpoint: torch.save({"state_dict": ..., "epoch", "optimizer", ...}).

    Args:
        path_pt: the .pt file to write.
        state_dict (dict[str, Tensor]): weights without prefix.
        module_prefix (bool): prefix every key with "module." (as DDP/FSDP training saves them).
        extra (bool): add the training entries ("epoch", "optimizer", "name", "evaluation_metrics").

    Returns:
        Path: the file.
    """
    path_pt = Path(path_pt)
    path_pt.parent.mkdir(parents=True, exist_ok=True)
    prefix = "module." if module_prefix else ""
    checkpoint = {"state_dict": {prefix + k: v for k, v in state_dict.items()}}
    if extra:
        first = next(iter(state_dict))
        checkpoint.update(
            {
                "epoch": 3,
                "name": "tiny-supra",
                "optimizer": {
                    "state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(state_dict[first])}},
                    "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": [0]}],
                },
                "evaluation_metrics": {"loss": 2.5},
            }
        )
    torch.save(checkpoint, path_pt)
    return path_pt


# open_lm's own model JSONs (and its CLI) name three of the HF-openlm keys differently.
OPEN_LM_JSON_NAMES = {"dim": "hidden_dim", "apply_qk_norm": "qk_norm", "norm_type": "model_norm"}


def write_open_lm_model_json(path_json, config, *, open_lm_names=False):
    """Write the open_lm model config JSON.

    Args:
        path_json: the file to write.
        config (dict): an HF "openlm" config.
        open_lm_names (bool): use open_lm's own key names (``hidden_dim``, ``qk_norm``,
            ``model_norm``) instead of the HF-openlm ones.

    Returns:
        Path: the file.
    """
    path_json = Path(path_json)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    if open_lm_names:
        config = {OPEN_LM_JSON_NAMES.get(k, k): v for k, v in config.items() if k != "model_type"}
    path_json.write_text(json.dumps(config, indent=2))
    return path_json
