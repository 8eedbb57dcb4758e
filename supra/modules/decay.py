"""Fixed per-head decay slopes s_h (gamma_h = exp(-s_h)) and the module that holds them."""

import math
from typing import List, Optional

import torch
from torch import nn


def alibi_slopes(num_heads: int, start: Optional[float] = None) -> torch.Tensor:
    """Lightning / ALiBi slopes ``s_i = 2^(-8 (i + 1) / H)``, computed in float64.

    For a head count that is not a power of two, the ALiBi rule: the slopes of the closest
    lower power of two, then every other slope of the doubled set.

    Args:
        num_heads (int): number of heads H >= 1.
        start (Optional[float]): replaces the first slope (the reference's ``decay_start``);
            the others keep their ratio to it. Must be > 0.

    Returns:
        torch.Tensor: slopes [H], float64 (decreasing when H is a power of two).

    Raises:
        ValueError: if ``num_heads`` < 1 or ``start`` <= 0.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1; got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = _power_of_two_slopes(closest)
    if closest != num_heads:
        slopes += _power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    result = torch.tensor(slopes, dtype=torch.float64, device="cpu")
    if start is not None:
        if not start > 0:
            raise ValueError(f"decay start must be a positive slope; got {start}")
        result = result * (start / result[0])
    return result


def _power_of_two_slopes(n: int) -> List[float]:
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]


def retnet_slopes(num_heads: int) -> torch.Tensor:
    """RetNet slopes: ``gamma_h = 1 - 2^(-5 - h)``, ``s_h = -ln(gamma_h)``, in float64.

    float64 matters: in float32, gamma_h rounds to exactly 1 (no decay) for h >= 20.

    Returns:
        torch.Tensor: slopes [H], float64, decreasing.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1; got {num_heads}")
    h = torch.arange(num_heads, dtype=torch.float64, device="cpu")
    return -torch.log1p(-(2.0 ** (-5.0 - h)))


def no_decay_slopes(num_heads: int) -> torch.Tensor:
    """Zero slopes (gamma = 1): plain causal linear attention. Returns [H] float64."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1; got {num_heads}")
    return torch.zeros(num_heads, dtype=torch.float64, device="cpu")


SLOPE_RULES = {"alibi": alibi_slopes, "retnet": retnet_slopes, "none": no_decay_slopes}


def decay_slopes(rule: str, num_heads: int, start: Optional[float] = None) -> torch.Tensor:
    """Slopes [H] (float64) for a named rule: ``"alibi"`` (Lightning), ``"retnet"`` or ``"none"``.

    Raises:
        ValueError: for an unknown rule, or ``start`` with a rule other than alibi.
    """
    if rule not in SLOPE_RULES:
        raise ValueError(f"decay rule {rule!r} is unknown; choose one of {sorted(SLOPE_RULES)}")
    if start is not None and rule != "alibi":
        raise ValueError(f"decay start={start} only applies to the 'alibi' rule, not {rule!r}")
    return alibi_slopes(num_heads, start) if rule == "alibi" else SLOPE_RULES[rule](num_heads)


class FixedDecay(nn.Module):
    """Holds constant per-head slopes and their decay factors gamma = exp(-slopes) (not trained,
    not saved: they follow from the config).

    A float64 CPU copy is kept beside the float32 buffer, so that a model built on the meta
    device and materialized with ``to_empty`` can restore the values with ``reset_buffers()``.

    Args:
        slopes (torch.Tensor): slopes [H], finite and >= 0, with real values (not meta).

    Raises:
        ValueError: for a meta, non-1-D, negative or non-finite ``slopes``.
    """

    def __init__(self, slopes: torch.Tensor) -> None:
        super().__init__()
        if isinstance(slopes, torch.Tensor) and slopes.is_meta:
            raise ValueError(
                "decay slopes must hold real values, not meta tensors: compute them on the CPU "
                "(the supra slope functions always do)"
            )
        reference = torch.as_tensor(slopes, dtype=torch.float64, device="cpu")
        if reference.dim() != 1 or not bool(torch.isfinite(reference).all() and (reference >= 0).all()):
            raise ValueError(
                f"decay slopes must be a 1-D tensor of finite values >= 0; got {reference.tolist()}"
            )
        self._reference = reference
        self.register_buffer("slopes", reference.float(), persistent=False)
        # The decode step multiplies by gamma = exp(-s); computed in float64, then rounded once.
        self.register_buffer("gamma", torch.exp(-reference).float(), persistent=False)

    @property
    def num_heads(self) -> int:
        return self.slopes.shape[0]

    def _apply(self, fn, recurse=True):
        # .to(bf16), .half() or to_empty() must not round or erase the slopes: they stay exact
        # float32 on whatever device the module moves to; a meta buffer is rebuilt first, so
        # moving a meta-built model to a real device works.
        if self.slopes.is_meta:
            self.slopes, self.gamma = self._exact_buffers(torch.device("cpu"))
        super()._apply(fn, recurse)
        if not self.slopes.is_meta:
            self.slopes, self.gamma = self._exact_buffers(self.slopes.device)
        return self

    def _exact_buffers(self, device: torch.device):
        """(slopes, gamma) [H] float32 on ``device``, rounded once from the float64 reference."""
        return (
            self._reference.to(device=device, dtype=torch.float32),
            torch.exp(-self._reference).to(device=device, dtype=torch.float32),
        )

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Rewrites the buffers from the float64 copy (after ``to_empty`` or a meta-device build)."""
        slopes, gamma = self._exact_buffers(self.slopes.device)
        self.slopes.copy_(slopes)
        self.gamma.copy_(gamma)

    def forward(self) -> torch.Tensor:
        """Returns the slopes [H] in float32."""
        return self.slopes

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"
