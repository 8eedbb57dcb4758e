"""SUPRA's trainable feature map phi(x) = relu(W x + b)."""

import torch
import torch.nn.functional as F
from torch import nn


class ReLUFeatureMap(nn.Module):
    """One dense map over all heads concatenated, then relu (not a per-head map).

    Under MHA the queries and keys share one instance; under GQA the keys get their own
    (their input has H_kv heads). Initialized like ``nn.Linear``, as in the reference.

    Args:
        in_dim (int): H * d, the projected queries (or H_kv * d keys) concatenated.
        out_dim (int): H * d_k, the feature dimension over all heads.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_dim] -> [..., out_dim], non-negative."""
        return F.relu(self.proj(x))
