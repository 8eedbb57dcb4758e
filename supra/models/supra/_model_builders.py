"""Named presets: the published SUPRA shapes, the reference's from-scratch configs, a test model."""

from supra.models.supra._component_builders import supra_decoder
from supra.models.supra._spec import recorded_builder
from supra.modules import SupraDecoder


@recorded_builder("supra_llama2_7b")
def supra_llama2_7b() -> SupraDecoder:
    """Llama-2-7B linearized: 32 layers, 4096 wide, MHA 32 heads (q and k share one feature map)."""
    return supra_decoder(
        vocab_size=32_000, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096,
        intermediate_dim=11_008, max_seq_len=4096, norm_eps=1e-5, rope_base=10_000.0,
    )


@recorded_builder("supra_mistral_7b")
def supra_mistral_7b() -> SupraDecoder:
    """The published Mistral-SUPRA shapes (TRI-ML/mistral-supra): GQA 32/8 with a separate key
    feature map, no q/k norm, Lightning slopes, trained at 2048 tokens."""
    return supra_decoder(
        vocab_size=32_000, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
        intermediate_dim=14_336, max_seq_len=2048, norm_eps=1e-5, rope_base=10_000.0,
    )


def _open_lm_swiglu_hidden(dim: int) -> int:
    """open_lm's SwiGLU width: 2/3 of 4 * dim, rounded up to a multiple of 256."""
    return 256 * ((int(2 * 4 * dim / 3) + 256 - 1) // 256)


def _linear_open_lm(dim: int, num_layers: int, num_heads: int, qk_norm: bool) -> SupraDecoder:
    return supra_decoder(
        vocab_size=50_432, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_heads,
        embed_dim=dim, intermediate_dim=_open_lm_swiglu_hidden(dim), max_seq_len=2048,
        norm_type="gain_only_lp_layer_norm", norm_eps=1e-5, qk_norm=qk_norm,
    )


@recorded_builder("linear_tiny")
def linear_tiny() -> SupraDecoder:
    """The reference's ``linear_tiny`` from-scratch config: 12 x 768, 12 heads, q/k norm."""
    return _linear_open_lm(768, 12, 12, qk_norm=True)


@recorded_builder("linear_1b")
def linear_1b() -> SupraDecoder:
    """The reference's ``linear_1b``: 24 x 2048, 16 heads, q/k norm."""
    return _linear_open_lm(2048, 24, 16, qk_norm=True)


@recorded_builder("linear_7b")
def linear_7b() -> SupraDecoder:
    """The reference's ``linear_7b``: 32 x 4096, 32 heads, no q/k norm."""
    return _linear_open_lm(4096, 32, 32, qk_norm=False)


@recorded_builder("supra_test_tiny")
def supra_test_tiny(**overrides) -> SupraDecoder:
    """A few-thousand-parameter GQA model for tests and examples; any argument can be overridden."""
    args = dict(
        vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
        intermediate_dim=64, max_seq_len=64, norm_eps=1e-5,
    )
    args.update(overrides)
    return supra_decoder(**args)
