"""Learned per-head decay slopes instead of SUPRA's fixed Lightning (ALiBi) ones.

Named in a config as a ``linearize`` argument (recipes/configs/tiny/uptrain_learned_decay.yaml)::

    linearize:
      _component_: supra.convert.linearize
      decay:
        _component_: components.learned_decay.LearnedDecay
        init: alibi

``linearize`` calls it as ``LearnedDecay(num_heads, init="alibi")`` for every layer; its parameter
counts as new (it gets the recipe's ``new_lr``). Slopes stay >= 0 through a softplus. The
gradient reaches them through supra's linear attention op (any impl but ``"triton"``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from supra.modules import decay_slopes


class LearnedDecay(nn.Module):
    """Per-head slopes ``s_h = softplus(p_h)``, ``p`` initialized so that ``s`` starts at a rule's.

    Args:
        num_heads (int): query heads H.
        init (str): the slope rule the slopes start from (``"alibi"`` or ``"retnet"``).
    """

    def __init__(self, num_heads: int, *, init: str = "alibi") -> None:
        super().__init__()
        start = decay_slopes(init, num_heads).float().clamp(min=1e-6)
        # softplus^-1(s) = s + log(1 - exp(-s)), stable for small s as log(-expm1(-s)).
        self.raw = nn.Parameter(start + torch.log(-torch.expm1(-start)))

    @property
    def num_heads(self) -> int:
        return self.raw.shape[0]

    @property
    def gamma(self) -> torch.Tensor:
        """exp(-slopes) [H], float32: the one-token decode step's factor."""
        return torch.exp(-self()).float()

    def forward(self) -> torch.Tensor:
        """The slopes [H], float32, >= 0."""
        return F.softplus(self.raw.float())
