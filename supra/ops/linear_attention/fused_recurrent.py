"""Step-by-step recurrent form of decayed linear attention (decode and short chunks)."""

from typing import Optional, Tuple

import torch

from supra.ops.linear_attention.naive import compute_dtype, repeat_kv


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``S_t = exp(-s_h) S_{t-1} + (scale k_t)^T v_t``, ``o_t = q_t S_t``, one token at a time.

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
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = q.to(acc), k.to(acc) * scale, v.to(acc)
    gamma = torch.exp(-slopes.to(acc))[None, :, None, None]
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(T):
        state = gamma * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), state


def recurrent_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    state: torch.Tensor,
) -> torch.Tensor:
    """One decode step that updates ``state`` in place: ``S = gamma_h S + (scale k)^T v``, ``o = q S``.

    The inference fast path (no autograd, no validation, no new state tensor): a static-shape
    cache buffer is rewritten where it lies, so a compiled decode step is a few fused kernels.

    Args:
        q (torch.Tensor): queries [B, 1, H, K].
        k (torch.Tensor): keys [B, 1, H_kv, K] (H_kv divides H; query head h reads h // (H / H_kv)).
        v (torch.Tensor): values [B, 1, H_kv, V].
        gamma (torch.Tensor): per-head decay factors exp(-slopes) [H].
        scale (float): multiplies the keys.
        state (torch.Tensor): contiguous [B, H, K, V] in the accumulation dtype, updated in place.

    Returns:
        torch.Tensor: output [B, 1, H, V] in q's dtype.
    """
    out_dtype, acc = q.dtype, state.dtype
    B, _, H, K = q.shape
    V = v.shape[-1]
    # One token's keys and values are a few hundred numbers: repeating them costs less than a
    # grouped product would.
    k, v = repeat_kv(k.to(acc), v.to(acc), H)
    q = q.to(acc)
    decay = gamma.to(acc).view(1, H, 1, 1)
    key_column, value_row = k[:, 0, :, :, None], v[:, 0, :, None, :]
    if torch.compiler.is_compiling():
        # Elementwise, the update and the read-out fuse into one pass over the state under
        # inductor (a batched product would be an opaque call plus copies in and out).
        new_state = state * decay + scale * key_column * value_row
        state.copy_(new_state)
        return (q[:, 0, :, :, None] * new_state).sum(dim=-2)[:, None].to(out_dtype)
    # Eager: the rank-one update as one broadcast multiply-add in place, which allocates nothing of
    # the state's size and stays on one thread (a batched product would wake a second one for a
    # few microseconds of work).
    state.mul_(decay).addcmul_(key_column, value_row, value=scale)
    return torch.bmm(q.reshape(B * H, 1, K), state.view(B * H, K, V)).view(B, 1, H, V).to(out_dtype)
