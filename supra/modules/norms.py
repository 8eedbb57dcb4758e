"""Normalizations used by SUPRA attention."""

import torch
import torch.nn.functional as F
from torch import nn


class HeadGroupNorm(nn.Module):
    """GroupNorm with one group per head, no affine, applied per token.

    Replaces softmax's denominator: each head's value vector is brought to zero mean and unit
    variance, in float32 whatever the input dtype.

    Args:
        eps (float): added to the variance.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, V] -> [B, T, H, V] in x's dtype."""
        # Per-token, per-head layer norm without affine is exactly one group per head.
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
