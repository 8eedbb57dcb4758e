"""Quadratic reference for decayed linear attention: the oracle every other path is tested against."""

from typing import Optional, Tuple

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decayed linear attention with an explicit [T, T] decay matrix.

    ``o_t = sum_{j<=t} exp(-s_h (t - j)) (q_t . scale k_j) v_j + exp(-s_h (t + 1)) q_t S_0``.

    Args:
        q (torch.Tensor): queries [B, T, H, K].
        k (torch.Tensor): keys [B, T, H, K].
        v (torch.Tensor): values [B, T, H, V].
        slopes (torch.Tensor): per-head decay slopes [H], >= 0.
        scale (float): multiplies the keys.
        initial_state (Optional[torch.Tensor]): state before the first token [B, H, K, V].

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: output [B, T, H, V] in q's dtype and the
        state after the last token [B, H, K, V] in the accumulation dtype.
    """
    out_dtype, acc = q.dtype, compute_dtype(q.dtype)
    T = q.shape[1]
    q, k, v = q.to(acc), k.to(acc) * scale, v.to(acc)
    slopes = slopes.to(acc)
    pos = torch.arange(T, device=q.device, dtype=acc)
    distance = pos[:, None] - pos[None, :]
    # Mask before exp so that no exponent is ever positive (future positions would overflow).
    exponent = -slopes[:, None, None] * distance.clamp(min=0)
    decay = torch.exp(exponent) * (distance >= 0)
    scores = torch.einsum("bthk,bshk->bhts", q, k) * decay
    o = torch.einsum("bhts,bshv->bthv", scores, v)
    to_end = torch.exp(-slopes[:, None] * (T - 1 - pos))
    state = torch.einsum("bshk,hs,bshv->bhkv", k, to_end, v)
    if initial_state is not None:
        h0 = initial_state.to(acc)
        from_start = torch.exp(-slopes[:, None] * (pos + 1))
        o = o + torch.einsum("bthk,ht,bhkv->bthv", q, from_start, h0)
        state = state + torch.exp(-slopes * T)[None, :, None, None] * h0
    return o.to(out_dtype), state


def repeat_kv(k: torch.Tensor, v: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Repeats grouped keys and values [B, T, H_kv, D] to the H query heads (head h reads h // (H / H_kv)).

    The PyTorch implementations take one key/value head per query head; autograd sums the
    repeated heads' gradients back.
    """
    repeats = num_heads // k.shape[2]
    if repeats == 1:
        return k, v
    return k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
