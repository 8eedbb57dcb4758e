"""SUPRA models: component builders and named presets."""

from supra.models.supra._component_builders import (
    NORM_TYPES,
    NORMALIZATIONS,
    build_norm,
    supra_attention,
    supra_decoder,
)
from supra.models.supra._model_builders import (
    linear_1b,
    linear_7b,
    linear_tiny,
    supra_llama2_7b,
    supra_mistral_7b,
    supra_test_tiny,
)

__all__ = [
    "NORM_TYPES",
    "NORMALIZATIONS",
    "build_norm",
    "linear_1b",
    "linear_7b",
    "linear_tiny",
    "supra_attention",
    "supra_decoder",
    "supra_llama2_7b",
    "supra_mistral_7b",
    "supra_test_tiny",
]
