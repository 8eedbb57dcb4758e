"""Fused recurrent Triton kernel for decoding: one launch steps every head through a few tokens.

Each program holds a [K, BV] float32 tile of one head's state in registers, reads it once, applies
``S_t = exp(-s) S_{t-1} + (scale k_t)^T v_t`` and ``o_t = q_t S_t`` for each token of its sequence,
and writes the tile once. The read and the write may be the same memory, so a recurrent cache can
be updated in place (``fused_recurrent_linear_attention_``). Memory traffic is the state twice plus
the tokens: the kernel is bandwidth-bound, which is what decoding one token per step needs.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from supra.ops.linear_attention.triton_chunk import _sequence_bounds, prepare_inputs


@triton.jit(do_not_specialize=["T"])
def _fused_recurrent_fwd_kernel(
    q, k, v, o, h0, ht, slopes, cu_seqlens, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = _sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    gamma = tl.exp(-tl.load(slopes + i_h).to(tl.float32))

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + p_kv, mask=m_kv, other=0).to(tl.float32)
    for t in range(0, seq_len):
        row = (bos + t) * H + i_h
        # Grouped-query attention: the key/value head of this query head, by index.
        row_kv = (bos + t) * HKV + i_h // (H // HKV)
        b_q = tl.load(q + row * K + o_k, mask=m_k, other=0).to(tl.float32)
        b_k = tl.load(k + row_kv * K + o_k, mask=m_k, other=0).to(tl.float32) * scale
        b_v = tl.load(v + row_kv * V + o_v, mask=m_v, other=0).to(tl.float32)
        b_h = b_h * gamma + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(o + row * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    tl.store(ht + p_kv, b_h, mask=m_kv)


def _empty(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocates every buffer the kernel writes (tests swap in NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(q, k, v, slopes, scale, initial_state, final_state, cu_seqlens) -> torch.Tensor:
    # The state is passed apart: the in-place variant reads and writes the caller's buffer.
    q, k, v, slopes, _ = prepare_inputs(q, k, v, slopes, None)
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous()
    o = _empty((B, T, H, V), q.dtype, q.device)
    BK = max(16, triton.next_power_of_2(K))
    # A [BK, BV] float32 tile per program: about 8K values, held in registers.
    BV = max(16, min(triton.next_power_of_2(V), 8192 // BK))
    _fused_recurrent_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, o, initial_state, final_state, slopes, cu, scale, T,
        H=H, HKV=k.shape[2], K=K, V=V, BK=BK, BV=BV, USE_INITIAL_STATE=initial_state is not None, IS_VARLEN=cu is not None,
        num_warps=4,
    )
    return o


def fused_recurrent_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token forward in one launch, writing the final state to a new buffer.

    Args:
        q (torch.Tensor): queries [B, T, H, K] in float32, bfloat16 or float16.
        k (torch.Tensor): keys [B, T, H_kv, K] (H_kv divides H).
        v (torch.Tensor): values [B, T, H_kv, V].
        slopes (torch.Tensor): per-head decay slopes [H], >= 0.
        scale (float): multiplies the keys.
        initial_state (Optional[torch.Tensor]): [B or N, H, K, V]; read, not modified.
        cu_seqlens (Optional[torch.Tensor]): boundaries [N + 1] of packed documents (B == 1).

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: output [B, T, H, V] in q's dtype and the final states
        [B or N, H, K, V] in float32.
    """
    B, _, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = None if initial_state is None else initial_state.detach().to(torch.float32).contiguous()
    ht = _empty((N, H, K, v.shape[-1]), torch.float32, q.device)
    o = _launch(q, k, v, slopes, scale, h0, ht, cu_seqlens)
    return o, ht


def fused_recurrent_linear_attention_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    state: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Decode step that updates ``state`` in place (no autograd): one kernel launch.

    Args:
        q (torch.Tensor): queries [B, T, H, K] (T is small: one token or a few).
        k (torch.Tensor): keys [B, T, H_kv, K] (H_kv divides H).
        v (torch.Tensor): values [B, T, H_kv, V].
        slopes (torch.Tensor): per-head decay slopes [H], >= 0.
        state (torch.Tensor): the recurrent state [B, H, K, V], contiguous float32; it becomes the
            state after the last token.
        scale (Optional[float]): multiplies the keys; defaults to ``K ** -0.5``.

    Returns:
        torch.Tensor: the output [B, T, H, V] in q's dtype.

    Raises:
        ValueError: if ``state`` is not a contiguous float32 [B, H, K, V] tensor.
    """
    B, _, H, K = q.shape
    expected = (B, H, K, v.shape[-1])
    if tuple(state.shape) != expected or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(
            f"state must be a contiguous float32 tensor of shape {list(expected)} to be updated in place; "
            f"got {list(state.shape)}, {state.dtype}, contiguous={state.is_contiguous()}"
        )
    scale = K**-0.5 if scale is None else float(scale)
    return _launch(q, k, v, slopes, scale, state, state, None)
