"""Component builders: every hyperparameter an argument, strings turned into modules here."""

from typing import Any, Callable, Iterable, Mapping, Optional

from torch import nn
from torchtune.models.llama2._component_builders import llama2_mlp
from torchtune.modules import (
    TransformerSelfAttentionLayer,
    MultiHeadAttention,
    RMSNorm,
    TiedLinear,
)

from supra.models.supra._spec import recorded_builder
from supra.modules import (
    FixedDecay,
    HeadGroupNorm,
    LinearAttention,
    ReLUFeatureMap,
    RotaryEmbedding,
    SupraDecoder,
    SupraLayer,
    decay_slopes,
)

# open_lm's norm names; the "lp" variants compute the same function (in the input dtype).
NORM_TYPES = (
    "rms_norm",
    "default_layer_norm",
    "lp_layer_norm",
    "gain_only_layer_norm",
    "gain_only_lp_layer_norm",
    "no_wb_layer_norm",
)

FEATURE_MAPS = {"relu": ReLUFeatureMap}

# How linear attention outputs are normalized: SUPRA's GroupNorm, or T2R's denominator.
NORMALIZATIONS = ("group_norm", "denominator")
# Keeps the denominator away from zero: ReLU features can make every q.k zero.
DENOMINATOR_EPS = 1e-6


def build_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    """The normalization named ``norm_type`` over the last ``dim`` features.

    Raises:
        ValueError: for a name not in ``NORM_TYPES``.
    """
    if norm_type == "rms_norm":
        return RMSNorm(dim, eps=eps)
    if norm_type in ("default_layer_norm", "lp_layer_norm"):
        return nn.LayerNorm(dim, eps=eps)
    if norm_type in ("gain_only_layer_norm", "gain_only_lp_layer_norm"):
        return nn.LayerNorm(dim, eps=eps, bias=False)
    if norm_type == "no_wb_layer_norm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
    raise ValueError(f"norm_type {norm_type!r} is not supported; choose one of {NORM_TYPES}")


def build_component(spec: Mapping[str, Any], where: str, *args: Any) -> Any:
    """Calls the callable a component spec names (``{"_component_": "pkg.mod.Name", **kwargs}``,
    as a config writes it) with ``args`` first, through torchtune's ``config.instantiate``.

    Raises:
        ValueError: naming ``where`` and the component when it cannot be imported.
    """
    from omegaconf import OmegaConf
    from torchtune import config

    from supra.config import import_component

    import_component(spec.get("_component_"), where)
    return config.instantiate(OmegaConf.create(dict(spec)), *args)


def build_feature_map(feature_map: "str | Callable[[int, int], nn.Module] | Mapping", in_dim: int, out_dim: int) -> nn.Module:
    """A feature map ``in_dim -> out_dim`` from a name in ``FEATURE_MAPS``, a factory, or a
    component spec (``{"_component_": ..., **kwargs}``, called as ``(in_dim, out_dim, **kwargs)``)."""
    if isinstance(feature_map, Mapping):
        return build_component(feature_map, "feature_map", in_dim, out_dim)
    if callable(feature_map):
        return feature_map(in_dim, out_dim)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map {feature_map!r} is unknown; choose one of {sorted(FEATURE_MAPS)} or pass a callable")
    return FEATURE_MAPS[feature_map](in_dim, out_dim)


def build_decay(decay: "str | Callable[[int], nn.Module] | Mapping", num_heads: int, decay_start: Optional[float] = None) -> nn.Module:
    """The decay module of ``num_heads`` heads: ``FixedDecay`` for a slope rule name (``"alibi"``,
    ``"retnet"``, ``"none"``), or a module from a factory ``(num_heads) -> nn.Module`` or a component
    spec (called as ``(num_heads, **kwargs)``). A module returns the slopes [H] (>= 0) when called
    and has ``num_heads`` and ``gamma`` (= exp(-slopes), for one-token decode steps).

    Raises:
        ValueError: for an unknown rule, or ``decay_start`` with a module decay.
    """
    if isinstance(decay, str):
        return FixedDecay(decay_slopes(decay, num_heads, decay_start))
    if decay_start is not None:
        raise ValueError(f"decay_start={decay_start} applies to the 'alibi' rule only, not to a decay module {decay!r}")
    if isinstance(decay, Mapping):
        return build_component(decay, "decay", num_heads)
    return decay(num_heads)


def supra_attention(
    *,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_proj: nn.Module,
    k_proj: nn.Module,
    v_proj: nn.Module,
    output_proj: nn.Module,
    feature_dim: Optional[int] = None,
    feature_map: "str | Callable[[int, int], nn.Module] | Mapping" = "relu",
    decay: "str | Callable[[int], nn.Module] | Mapping" = "alibi",
    decay_start: Optional[float] = None,
    qk_norm: bool = False,
    norm_type: str = "rms_norm",
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
    rope_style: str = "half",
    out_norm_eps: float = 1e-5,
    normalization: str = "group_norm",
    impl: Optional[str] = None,
) -> LinearAttention:
    """SUPRA attention around given projections, with new feature maps, decay and norms.

    Under MHA queries and keys share one feature map; under GQA keys get their own. The q/k
    norms (``qk_norm``) are the model's ``norm_type`` over all H * d_k features.
    ``normalization`` is ``"group_norm"`` (SUPRA: per-head GroupNorm of the outputs) or
    ``"denominator"`` (divide by the decayed sum of q.k, as T2R; the paper's ablation).

    Raises:
        ValueError: if ``num_kv_heads`` does not divide ``num_heads``, or a name is unknown.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r} is unknown; choose one of {NORMALIZATIONS}")
    feature_dim = feature_dim or head_dim
    gqa = num_kv_heads != num_heads
    denominator = normalization == "denominator"
    return LinearAttention(
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        q_proj=q_proj,
        k_proj=k_proj,
        v_proj=v_proj,
        output_proj=output_proj,
        feature_map=build_feature_map(feature_map, num_heads * head_dim, num_heads * feature_dim),
        k_feature_map=build_feature_map(feature_map, num_kv_heads * head_dim, num_kv_heads * feature_dim) if gqa else None,
        decay=build_decay(decay, num_heads, decay_start),
        out_norm=nn.Identity() if denominator else HeadGroupNorm(eps=out_norm_eps),
        pos_embeddings=RotaryEmbedding(feature_dim, base=rope_base, style=rope_style),
        q_norm=build_norm(norm_type, num_heads * feature_dim, norm_eps) if qk_norm else None,
        k_norm=build_norm(norm_type, num_heads * feature_dim, norm_eps) if qk_norm else None,
        feature_dim=feature_dim,
        impl=impl,
        denominator_eps=DENOMINATOR_EPS if denominator else None,
    )


@recorded_builder("supra_decoder")
def supra_decoder(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    norm_type: str = "rms_norm",
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
    rope_style: str = "half",
    feature_dim: Optional[int] = None,
    feature_map: "str | Callable[[int, int], nn.Module]" = "relu",
    decay: str = "alibi",
    decay_start: Optional[float] = None,
    qk_norm: bool = False,
    tie_word_embeddings: bool = False,
    softmax_layers: Iterable[int] = (),
    head_dim: Optional[int] = None,
    attention_bias: bool = False,
    rope_scaling: Optional[dict] = None,
    normalization: str = "group_norm",
    impl: Optional[str] = None,
) -> SupraDecoder:
    """A Llama-architecture decoder (pre-norm, SwiGLU) whose attention layers are SUPRA.

    Args:
        vocab_size (int): vocabulary size.
        num_layers (int): number of blocks.
        num_heads (int): query heads H.
        num_kv_heads (int): key/value heads (GQA when < H).
        embed_dim (int): model dimension.
        intermediate_dim (int): SwiGLU hidden width.
        max_seq_len (int): training length (and the limit of any softmax layers).
        norm_type (str): one of ``NORM_TYPES`` for the block, final and q/k norms.
        norm_eps (float): their epsilon.
        rope_base (float): RoPE base.
        rope_style (str): ``"half"`` (open_lm / HF) or ``"interleaved"`` for SUPRA layers.
        feature_dim (Optional[int]): d_k; defaults to head_dim.
        feature_map (str | callable): ``"relu"`` or a factory ``(in_dim, out_dim) -> nn.Module``.
        decay (str): ``"alibi"``, ``"retnet"`` or ``"none"``.
        decay_start (Optional[float]): first alibi slope (the reference's ``decay_start``).
        qk_norm (bool): normalize the q and k features.
        tie_word_embeddings (bool): share the embedding and output matrices.
        softmax_layers (Iterable[int]): layer indices that use softmax attention (hybrids; all of
            them for a plain softmax model such as one loaded from a Hugging Face folder). Their RoPE
            follows ``rope_style`` too, so HF weights load without torchtune's q/k permutation.
        head_dim (Optional[int]): per-head width d; defaults to embed_dim // num_heads.
        attention_bias (bool): biases on the q/k/v projections (Qwen2).
        rope_scaling (Optional[dict]): Llama-3.1 RoPE scaling for the softmax layers (see
            ``supra.modules.RotaryEmbedding``).
        normalization (str): ``"group_norm"`` (SUPRA) or ``"denominator"`` (T2R-style ablation).
        impl (Optional[str]): forces an op implementation.

    Returns:
        SupraDecoder: the model.

    Raises:
        ValueError: for a head count that does not divide ``embed_dim``, a bad layer index, or
            an unknown name.
    """
    if head_dim is None and embed_dim % num_heads:
        raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({embed_dim}), or pass head_dim")
    softmax_layers = set(softmax_layers)
    bad = sorted(i for i in softmax_layers if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"softmax_layers {bad} are not layer indices in [0, {num_layers})")
    head_dim = head_dim or embed_dim // num_heads
    layers = nn.ModuleList()
    for i in range(num_layers):
        projections = dict(
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=attention_bias),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=attention_bias),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=attention_bias),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
        )
        if i in softmax_layers:
            attn = MultiHeadAttention(
                embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                pos_embeddings=RotaryEmbedding(head_dim, base=rope_base, style=rope_style, llama3_scaling=rope_scaling),
                max_seq_len=max_seq_len, **projections,
            )
        else:
            attn = supra_attention(
                embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                feature_dim=feature_dim, feature_map=feature_map, decay=decay, decay_start=decay_start,
                qk_norm=qk_norm, norm_type=norm_type, norm_eps=norm_eps, rope_base=rope_base,
                rope_style=rope_style, normalization=normalization, impl=impl, **projections,
            )
        block = TransformerSelfAttentionLayer if i in softmax_layers else SupraLayer
        layers.append(
            block(
                attn=attn,
                mlp=llama2_mlp(dim=embed_dim, hidden_dim=intermediate_dim),
                sa_norm=build_norm(norm_type, embed_dim, norm_eps),
                mlp_norm=build_norm(norm_type, embed_dim, norm_eps),
            )
        )
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else nn.Linear(embed_dim, vocab_size, bias=False)
    return SupraDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=build_norm(norm_type, embed_dim, norm_eps),
        output=output,
    )
