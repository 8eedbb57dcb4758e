"""A two-layer MLP feature map instead of SUPRA's single dense layer: phi(x) = relu(W2 gelu(W1 x)).

Named in a config as a ``linearize`` argument (recipes/configs/tiny/uptrain_mlp_feature_map.yaml)::

    linearize:
      _component_: supra.convert.linearize
      feature_map:
        _component_: components.mlp_feature_map.MLPFeatureMap
        hidden_mult: 2

``linearize`` calls it as ``MLPFeatureMap(in_dim, out_dim, hidden_mult=2)`` for every layer (the
queries' map, and the keys' own under GQA) and records the spec in the checkpoint's build record,
so ``load_checkpoint`` rebuilds it (from a directory where ``components`` imports).
"""

import torch
import torch.nn.functional as F
from torch import nn


class MLPFeatureMap(nn.Module):
    """``in_dim -> hidden_mult * out_dim -> out_dim`` over all heads concatenated, non-negative.

    Args:
        in_dim (int): H * d, the projected queries (or H_kv * d keys) concatenated.
        out_dim (int): H * d_k, the feature dimension over all heads.
        hidden_mult (int): width of the hidden layer as a multiple of ``out_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, hidden_mult: int = 2) -> None:
        super().__init__()
        if hidden_mult < 1:
            raise ValueError(f"hidden_mult must be >= 1; got {hidden_mult}")
        self.hidden = nn.Linear(in_dim, hidden_mult * out_dim)
        self.out = nn.Linear(hidden_mult * out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_dim] -> [..., out_dim], non-negative."""
        return F.relu(self.out(F.gelu(self.hidden(x))))
