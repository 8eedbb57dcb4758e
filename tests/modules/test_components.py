"""Tests of SUPRA's building blocks and builders against independent formulas.

RoPE, the per-head GroupNorm, the feature map and the norms are compared with references written
here (float64 where it matters) or taken from torch / torchtune; the presets are built on the meta
device, so a 7B model costs no memory, and checked against the published shapes.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import RMSNorm, RotaryPositionalEmbeddings

from supra.models import (
    NORM_TYPES,
    build_norm,
    linear_1b,
    linear_7b,
    linear_tiny,
    supra_attention,
    supra_llama2_7b,
    supra_mistral_7b,
)
from supra.models.supra import _component_builders
from supra.modules import (
    FixedDecay,
    HeadGroupNorm,
    LinearAttention,
    RecurrentStateCache,
    ReLUFeatureMap,
    RotaryEmbedding,
    alibi_slopes,
    retnet_slopes,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def hf_rope_half(x, positions, base=10_000.0):
    """HF / GPT-NeoX rotate-half RoPE in float64: x [B, T, H, D], positions [B, T] or [T]."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs = positions.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[..., None, :], emb.sin()[..., None, :]
    x = x.double()
    rotate_half = torch.cat((-x[..., D // 2 :], x[..., : D // 2]), dim=-1)
    return x * cos + rotate_half * sin


# RoPE


@pytest.mark.parametrize("base", (10_000.0, 500_000.0))
def test_rope_half_equals_hf_rotate_half(base):
    x = torch.randn(2, 9, 3, 16)
    positions = torch.arange(9)
    out = RotaryEmbedding(16, base=base, style="half")(x, positions)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), hf_rope_half(x, positions, base), rtol=0, atol=2e-6)


def test_rope_interleaved_equals_torchtune():
    B, T, H, D = 2, 11, 3, 16
    x = torch.randn(B, T, H, D)
    positions = torch.stack((torch.arange(T), torch.arange(T) + 5))
    torchtune_rope = RotaryPositionalEmbeddings(D, max_seq_len=64, base=10_000)
    expected = torchtune_rope(x, input_pos=positions)
    out = RotaryEmbedding(D, style="interleaved")(x, positions)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    # Default positions (0..T-1) as well.
    torch.testing.assert_close(
        RotaryEmbedding(D, style="interleaved")(x, torch.arange(T)), torchtune_rope(x), rtol=0, atol=2e-6
    )


def test_rope_styles_differ():
    x = torch.randn(1, 4, 2, 8)
    positions = torch.arange(4) + 1
    half = RotaryEmbedding(8, style="half")(x, positions)
    interleaved = RotaryEmbedding(8, style="interleaved")(x, positions)
    assert not torch.allclose(half, interleaved)


@pytest.mark.parametrize("style", ("half", "interleaved"))
def test_rope_per_sequence_positions(style):
    B, T, H, D = 3, 6, 2, 8
    x = torch.randn(B, T, H, D)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2], [40, 41, 42, 43, 44, 45]])
    rope = RotaryEmbedding(D, style=style)
    out = rope(x, positions)
    for b in range(B):
        torch.testing.assert_close(out[b : b + 1], rope(x[b : b + 1], positions[b]), rtol=0, atol=0)
    # Position 0 is the identity.
    torch.testing.assert_close(out[1, :4], x[1, :4], rtol=0, atol=1e-7)
    if style == "half":
        torch.testing.assert_close(out.double(), hf_rope_half(x, positions), rtol=0, atol=2e-6)


def test_rope_angles_are_reused_only_for_the_same_unchanged_positions():
    x = torch.randn(2, 3, 2, 8)
    positions = torch.tensor([[0, 1, 2], [5, 6, 7]])
    first, second = RotaryEmbedding(8), RotaryEmbedding(8)
    # Layers of one forward pass share the positions tensor: the second RoPE reuses the angles.
    assert second.cos_sin(positions)[0] is first.cos_sin(positions)[0]
    # Other settings, or positions changed in place, get their own angles, and the right ones.
    assert RotaryEmbedding(8, base=500.0).cos_sin(positions)[0] is not first.cos_sin(positions)[0]
    positions.add_(10)
    torch.testing.assert_close(second(x, positions).double(), hf_rope_half(x, positions), rtol=0, atol=2e-6)


@pytest.mark.parametrize("style", ("half", "interleaved"))
def test_rope_far_positions_are_finite_and_accurate(style):
    D = 16
    x = torch.randn(1, 4, 2, D)
    positions = torch.tensor([[4_095, 65_536, 99_999, 100_000]])
    out = RotaryEmbedding(D, style=style)(x, positions)
    assert bool(torch.isfinite(out).all())
    # Angles are float32: at position p the error is about p * 2^-24 radians per rounding.
    atol = 4 * 100_000 * 2.0**-24 * x.abs().max().item()
    if style == "half":
        expected = hf_rope_half(x, positions)
    else:
        # The interleaved pairs are the half pairs after a permutation of the last dimension.
        perm = torch.cat((torch.arange(0, D, 2), torch.arange(1, D, 2)))
        expected = hf_rope_half(x[..., perm], positions)[..., torch.argsort(perm)]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=atol)
    # Rotation keeps each pair's norm.
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ("half", "interleaved"))
def test_rope_bf16_in_bf16_out_computed_in_float32(style):
    x = torch.randn(2, 5, 2, 8).bfloat16()
    positions = torch.arange(5) + 1000
    rope = RotaryEmbedding(8, style=style)
    out = rope(x, positions)
    assert out.dtype == torch.bfloat16
    # The rotation runs in float32 and is rounded once at the end.
    torch.testing.assert_close(out, rope(x.float(), positions).bfloat16(), rtol=0, atol=0)


def test_rope_rejects_odd_dim_and_unknown_style():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="neox"):
        RotaryEmbedding(8, style="neox")


# HeadGroupNorm


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_head_group_norm_equals_group_norm(dtype):
    B, T, H, V = 2, 7, 4, 8
    x = (torch.randn(B, T, H, V) * 3 + 1).to(dtype)
    out = HeadGroupNorm(eps=1e-5)(x)
    assert out.dtype == dtype and out.shape == x.shape
    expected = F.group_norm(x.float().reshape(B * T, H * V), num_groups=H, eps=1e-5).reshape(B, T, H, V)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), expected, **tol)


def test_head_group_norm_eps_and_no_parameters():
    norm = HeadGroupNorm(eps=0.5)
    assert not list(norm.parameters()) and "eps=0.5" in repr(norm)
    x = torch.randn(1, 3, 2, 4)
    expected = F.group_norm(x.reshape(3, 8), num_groups=2, eps=0.5).reshape(1, 3, 2, 4)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


# ReLUFeatureMap


def test_relu_feature_map_is_relu_of_linear_with_bias():
    fm = ReLUFeatureMap(12, 20)
    assert fm.proj.bias is not None and fm.proj.weight.shape == (20, 12)
    x = torch.randn(3, 5, 12)
    out = fm(x)
    assert out.shape == (3, 5, 20)
    assert bool((out >= 0).all()) and bool((out == 0).any()) and bool((out > 0).any())
    torch.testing.assert_close(out, torch.relu(x @ fm.proj.weight.T + fm.proj.bias))
    assert sum(p.numel() for p in fm.parameters()) == 12 * 20 + 20


# RecurrentStateCache


def test_cache_state_shape_and_dtype():
    cache = RecurrentStateCache(batch_size=3, num_heads=4, key_dim=8, value_dim=6)
    assert cache.state.shape == (3, 4, 8, 6) and cache.state.dtype == torch.float32
    assert cache.positions.shape == (3,) and cache.positions.dtype == torch.long
    assert not bool(cache.state.any()) and not bool(cache.positions.any())
    # Rebuilt by setup_caches, never saved with the model.
    assert cache.state_dict() == {}


def test_cache_update_and_reset():
    cache = RecurrentStateCache(batch_size=4, num_heads=2, key_dim=3, value_dim=5)
    new_state = torch.randn(2, 2, 3, 5)
    cache.update(new_state, torch.tensor([3, 1]))
    torch.testing.assert_close(cache.state[:2], new_state, rtol=0, atol=0)
    assert not bool(cache.state[2:].any())
    assert cache.positions.tolist() == [3, 1, 0, 0]
    cache.update(new_state * 2, 4)
    torch.testing.assert_close(cache.state[:2], new_state * 2, rtol=0, atol=0)
    assert cache.positions.tolist() == [7, 5, 0, 0]
    # The cache holds a copy, not the caller's tensor.
    new_state.zero_()
    assert bool(cache.state[:2].any())
    cache.reset()
    assert not bool(cache.state.any()) and cache.positions.tolist() == [0, 0, 0, 0]


def test_cache_check_batch():
    cache = RecurrentStateCache(batch_size=2, num_heads=1, key_dim=2, value_dim=2)
    cache.check_batch(1)
    cache.check_batch(2)
    with pytest.raises(ValueError, match="batch of 3 sequences exceeds"):
        cache.check_batch(3)


def test_cache_size_depends_only_on_shapes():
    B, H, K, V = 3, 4, 8, 6
    cache = RecurrentStateCache(B, H, K, V)
    expected = B * H * K * V * 4 + B * 8
    assert cache.size_bytes() == expected
    cache.update(torch.randn(B, H, K, V), torch.tensor([1000, 10, 100_000]))
    assert cache.size_bytes() == expected
    assert RecurrentStateCache(B, H, K, V).size_bytes() == expected
    # Mistral-SUPRA: 32 heads of 128 x 128 float32 per layer, 32 layers: 64 MiB per sequence.
    per_layer = RecurrentStateCache(1, 32, 128, 128, device="meta").size_bytes()
    assert 32 * (per_layer - 8) == 64 * 2**20


# build_norm


def test_build_norm_rms_norm():
    norm = build_norm("rms_norm", 16, 1e-5)
    assert isinstance(norm, RMSNorm) and norm.eps == 1e-5
    with torch.no_grad():
        norm.scale.copy_(torch.randn(16))
    x = torch.randn(2, 3, 16) * 4
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.scale
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    assert [name for name, _ in norm.named_parameters()] == ["scale"]


# open_lm names: "default" = weight and bias, "gain_only" = weight only, "no_wb" = neither;
# "lp" is the low-precision variant of the same function.
LAYER_NORMS = {
    "default_layer_norm": (True, True),
    "lp_layer_norm": (True, True),
    "gain_only_layer_norm": (True, False),
    "gain_only_lp_layer_norm": (True, False),
    "no_wb_layer_norm": (False, False),
}


def test_norm_types_are_all_covered():
    assert set(NORM_TYPES) == {"rms_norm", *LAYER_NORMS}


@pytest.mark.parametrize("norm_type", sorted(LAYER_NORMS))
def test_build_norm_layer_norms(norm_type):
    has_weight, has_bias = LAYER_NORMS[norm_type]
    norm = build_norm(norm_type, 16, 1e-6)
    assert isinstance(norm, nn.LayerNorm) and norm.eps == 1e-6 and norm.normalized_shape == (16,)
    assert (norm.weight is not None) == has_weight and (norm.bias is not None) == has_bias
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 3, 16) * 2 + 1
    mean = x.mean(-1, keepdim=True)
    expected = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-6)
    if has_weight:
        expected = expected * norm.weight
    if has_bias:
        expected = expected + norm.bias
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_build_norm_unknown():
    with pytest.raises(ValueError, match="batch_norm"):
        build_norm("batch_norm", 16, 1e-5)


# supra_attention and LinearAttention


def _projections(embed_dim, num_heads, num_kv_heads, head_dim):
    return dict(
        q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
        k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
        v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
        output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
    )


def _attention(num_heads=4, num_kv_heads=4, head_dim=8, **kwargs):
    embed_dim = num_heads * head_dim
    return supra_attention(
        embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        **_projections(embed_dim, num_heads, num_kv_heads, head_dim), **kwargs,
    )


def test_supra_attention_mha_shares_one_feature_map():
    attn = _attention(num_heads=4, num_kv_heads=4, head_dim=8)
    assert isinstance(attn, LinearAttention)
    assert attn.k_feature_map is None
    assert isinstance(attn.feature_map, ReLUFeatureMap)
    assert attn.feature_map.proj.weight.shape == (32, 32)
    assert attn.q_norm is None and attn.k_norm is None
    assert attn.scale == pytest.approx(8**-0.5)
    assert isinstance(attn.out_norm, HeadGroupNorm) and attn.out_norm.eps == 1e-5
    assert attn.pos_embeddings.dim == 8 and attn.pos_embeddings.style == "half"
    assert attn.pos_embeddings.base == 10_000.0
    torch.testing.assert_close(attn.decay(), alibi_slopes(4).float(), rtol=0, atol=0)
    out = attn(torch.randn(2, 5, 32))
    assert out.shape == (2, 5, 32)


def test_supra_attention_gqa_has_a_key_feature_map():
    attn = _attention(num_heads=8, num_kv_heads=2, head_dim=4, feature_dim=6)
    assert attn.feature_map.proj.weight.shape == (8 * 6, 8 * 4)
    assert attn.k_feature_map is not attn.feature_map
    assert attn.k_feature_map.proj.weight.shape == (2 * 6, 2 * 4)
    assert attn.k_feature_map.proj.bias.shape == (2 * 6,)
    assert attn.feature_dim == 6 and attn.scale == pytest.approx(6**-0.5)
    assert attn.pos_embeddings.dim == 6
    assert attn(torch.randn(1, 3, 32)).shape == (1, 3, 32)


@pytest.mark.parametrize("norm_type", ("rms_norm", "gain_only_lp_layer_norm"))
def test_supra_attention_qk_norm_over_all_head_features(norm_type):
    attn = _attention(
        num_heads=4, num_kv_heads=2, head_dim=8, feature_dim=4, qk_norm=True, norm_type=norm_type, norm_eps=1e-6
    )
    for norm in (attn.q_norm, attn.k_norm):
        assert norm is not None and tuple(norm.normalized_shape) == (4 * 4,) and norm.eps == 1e-6
    assert attn.q_norm is not attn.k_norm
    assert attn(torch.randn(1, 3, 32)).shape == (1, 3, 32)


def test_supra_attention_passes_its_options():
    attn = _attention(decay="retnet", rope_style="interleaved", rope_base=500_000.0, out_norm_eps=1e-6)
    torch.testing.assert_close(attn.decay(), retnet_slopes(4).float(), rtol=0, atol=0)
    assert attn.pos_embeddings.style == "interleaved" and attn.pos_embeddings.base == 500_000.0
    assert attn.out_norm.eps == 1e-6
    started = _attention(decay_start=0.5)
    torch.testing.assert_close(started.decay(), alibi_slopes(4, start=0.5).float(), rtol=0, atol=0)


def _denominator_reference(attn, x):
    """T2R-normalized decayed linear attention as one explicit float64 sum over j <= t."""
    B, T, _ = x.shape
    H, d = attn.num_heads, attn.feature_dim
    q = attn.feature_map(attn.q_proj(x)).view(B, T, H, d)
    k = attn.feature_map(attn.k_proj(x)).view(B, T, H, d)
    v = attn.v_proj(x).view(B, T, H, -1)
    positions = torch.arange(T)
    q, k = attn.pos_embeddings(q, positions), attn.pos_embeddings(k, positions)
    t, j = positions[:, None], positions[None, :]
    decay = torch.exp(-attn.decay().double()[:, None, None] * (t - j)) * (j <= t)  # [H, T, T]
    scores = torch.einsum("bthd,bjhd->bhtj", q, k) * attn.scale * decay
    o = torch.einsum("bhtj,bjhv->bthv", scores, v) / (scores.sum(-1).transpose(1, 2)[..., None] + 1e-6)
    return attn.output_proj(o.reshape(B, T, -1))


@torch.no_grad()
def test_supra_attention_denominator_normalization_equals_explicit_sum():
    torch.manual_seed(0)
    attn = _attention(normalization="denominator").double()
    assert isinstance(attn.out_norm, nn.Identity)
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _denominator_reference(attn, x), rtol=1e-9, atol=1e-9)
    # Through the recurrent cache: the denominator is one more state column.
    attn.setup_cache(batch_size=2, dtype=torch.float64)
    assert attn.kv_cache.state.shape == (2, 4, 8, 8 + 1)
    stepped = torch.cat([attn(x[:, :20]), *(attn(x[:, t : t + 1]) for t in range(20, 37))], dim=1)
    torch.testing.assert_close(stepped.double(), _denominator_reference(attn, x), rtol=1e-5, atol=1e-5)


def test_supra_attention_unknown_normalization():
    with pytest.raises(ValueError, match="normalization 'softmax' is unknown"):
        _attention(normalization="softmax")


@pytest.mark.parametrize("num_kv_heads", (3, 0))
def test_supra_attention_kv_heads_must_divide(num_kv_heads):
    with pytest.raises(ValueError, match="must divide num_heads"):
        supra_attention(
            embed_dim=32, num_heads=4, num_kv_heads=num_kv_heads, head_dim=8,
            **_projections(32, 4, max(num_kv_heads, 1), 8),
        )


def _linear_attention_parts(num_heads=4, num_kv_heads=4, head_dim=8):
    return dict(
        embed_dim=num_heads * head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        **_projections(num_heads * head_dim, num_heads, num_kv_heads, head_dim),
        feature_map=ReLUFeatureMap(num_heads * head_dim, num_heads * head_dim),
        decay=FixedDecay(alibi_slopes(num_heads)),
        out_norm=HeadGroupNorm(),
        pos_embeddings=RotaryEmbedding(head_dim),
    )


def test_linear_attention_injection():
    parts = _linear_attention_parts()
    attn = LinearAttention(**parts)
    assert attn.feature_map is parts["feature_map"] and attn.decay is parts["decay"]
    assert attn.k_feature_map is None and attn.pos_embeddings is parts["pos_embeddings"]
    assert attn(torch.randn(1, 4, 32)).shape == (1, 4, 32)


def test_linear_attention_decay_head_count():
    parts = _linear_attention_parts()
    parts["decay"] = FixedDecay(alibi_slopes(8))
    with pytest.raises(ValueError, match="decay has 8 slopes but the attention has 4"):
        LinearAttention(**parts)


def test_linear_attention_gqa_needs_key_feature_map():
    parts = _linear_attention_parts(num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="pass k_feature_map"):
        LinearAttention(**parts)
    LinearAttention(**parts, k_feature_map=ReLUFeatureMap(2 * 8, 2 * 8))


def test_linear_attention_kv_heads_must_divide():
    parts = _linear_attention_parts(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="must divide num_heads"):
        LinearAttention(**parts, k_feature_map=ReLUFeatureMap(3 * 8, 3 * 8))


# Presets, built on the meta device


@pytest.fixture
def decay_calls(monkeypatch):
    """Records the (rule, num_heads, start) each SUPRA layer's slopes are built with: on the meta
    device the slope values themselves cannot be read."""
    calls = []
    real = _component_builders.decay_slopes

    def spy(rule, num_heads, start=None):
        calls.append((rule, num_heads, start))
        return real(rule, num_heads, start)

    monkeypatch.setattr(_component_builders, "decay_slopes", spy)
    return calls


def _on_meta(builder):
    with torch.device("meta"):
        model = builder()
    assert all(p.is_meta for p in model.parameters())
    return model


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_supra_mistral_7b(decay_calls):
    model = _on_meta(supra_mistral_7b)
    assert len(model.layers) == 32 and model.max_seq_len == 2048
    assert model.tok_embeddings.weight.shape == (32_000, 4096)
    assert model.output.weight.shape == (32_000, 4096)
    for layer in model.layers:
        attn = layer.attn
        assert isinstance(attn, LinearAttention)
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.feature_dim) == (32, 8, 128, 128)
        assert attn.feature_map.proj.weight.shape == (4096, 4096)
        assert attn.k_feature_map.proj.weight.shape == (1024, 1024)
        assert attn.k_feature_map.proj.bias.shape == (1024,)
        assert attn.q_norm is None and attn.k_norm is None
        assert attn.pos_embeddings.style == "half" and attn.pos_embeddings.base == 10_000.0
        assert attn.decay.slopes.shape == (32,)
        assert layer.mlp.w1.weight.shape == (14_336, 4096)
        assert layer.mlp.w2.weight.shape == (4096, 14_336)
        assert isinstance(layer.sa_norm, RMSNorm) and layer.sa_norm.eps == 1e-5
    assert decay_calls == [("alibi", 32, None)] * 32
    mistral_7b = 7_241_732_096
    new_per_layer = (4096 * 4096 + 4096) + (1024 * 1024 + 1024)
    assert _num_params(model) == mistral_7b + 32 * new_per_layer


def test_supra_llama2_7b(decay_calls):
    model = _on_meta(supra_llama2_7b)
    assert len(model.layers) == 32 and model.max_seq_len == 4096
    for layer in model.layers:
        attn = layer.attn
        assert (attn.num_heads, attn.num_kv_heads) == (32, 32)
        assert attn.k_feature_map is None
        assert attn.feature_map.proj.weight.shape == (4096, 4096)
        assert attn.q_norm is None
        assert layer.mlp.w1.weight.shape == (11_008, 4096)
    assert model.tok_embeddings.weight.shape == (32_000, 4096)
    assert decay_calls == [("alibi", 32, None)] * 32
    llama2_7b = 6_738_415_616
    assert _num_params(model) == llama2_7b + 32 * (4096 * 4096 + 4096)


# (builder, layers, dim, heads, SwiGLU width = open_lm's 256 * ceil(int(8 dim / 3) / 256), q/k norm)
OPEN_LM_PRESETS = [
    (linear_tiny, 12, 768, 12, 2048, True),
    (linear_1b, 24, 2048, 16, 5632, True),
    (linear_7b, 32, 4096, 32, 11_008, False),
]


@pytest.mark.parametrize("preset", OPEN_LM_PRESETS, ids=lambda p: p[0].__name__)
def test_open_lm_presets(preset, decay_calls):
    builder, num_layers, dim, heads, hidden, qk_norm = preset
    model = _on_meta(builder)
    assert len(model.layers) == num_layers
    assert model.tok_embeddings.weight.shape == (50_432, dim)
    assert model.output.weight.shape == (50_432, dim)
    for layer in model.layers:
        attn = layer.attn
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (heads, heads, dim // heads)
        assert attn.k_feature_map is None
        assert layer.mlp.w1.weight.shape == (hidden, dim)
        # gain_only_lp_layer_norm: a LayerNorm with a gain and no bias, everywhere.
        for norm in (layer.sa_norm, layer.mlp_norm):
            assert isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is None
        if qk_norm:
            for norm in (attn.q_norm, attn.k_norm):
                assert isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (dim,) and norm.bias is None
        else:
            assert attn.q_norm is None and attn.k_norm is None
    assert isinstance(model.norm, nn.LayerNorm) and model.norm.bias is None
    assert decay_calls == [("alibi", heads, None)] * num_layers
    assert hidden == 256 * math.ceil(int(8 * dim / 3) / 256)
