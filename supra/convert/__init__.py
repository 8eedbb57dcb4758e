"""Attention replacers: turn softmax decoders into SUPRA ones in place."""

from supra.convert.linearize import linearize, new_parameter_names

__all__ = ["linearize", "new_parameter_names"]
