"""nn.Modules that take modules: feature maps, decay, norms, RoPE, linear attention, the cache."""

from supra.modules.attention import LinearAttention
from supra.modules.cache import RecurrentStateCache
from supra.modules.decoder import SupraDecoder, SupraLayer, is_linear_layer
from supra.modules.decay import (
    FixedDecay,
    alibi_slopes,
    decay_slopes,
    no_decay_slopes,
    retnet_slopes,
)
from supra.modules.feature_map import ReLUFeatureMap
from supra.modules.norms import HeadGroupNorm
from supra.modules.rope import RotaryEmbedding

__all__ = [
    "FixedDecay",
    "HeadGroupNorm",
    "LinearAttention",
    "SupraDecoder",
    "SupraLayer",
    "is_linear_layer",
    "RecurrentStateCache",
    "ReLUFeatureMap",
    "RotaryEmbedding",
    "alibi_slopes",
    "decay_slopes",
    "no_decay_slopes",
    "retnet_slopes",
]
