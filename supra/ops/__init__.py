"""Functional kernels (no nn.Module): one folder per op, each with a naive reference."""

from supra.ops.linear_attention import linear_attention

__all__ = ["linear_attention"]
