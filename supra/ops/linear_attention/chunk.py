"""Chunked parallel form of decayed linear attention in PyTorch.

Within a chunk of C tokens the output is a small masked [C, C] attention; across chunks a
[K, V] state is carried. Every exponent is <= 0, so long sequences never overflow, and memory
is O(T * C) for the intra-chunk scores plus one [K, V] state per chunk.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from supra.ops.linear_attention.naive import compute_dtype

DEFAULT_CHUNK_SIZE = 64


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decayed linear attention, chunked.

    Args:
        q (torch.Tensor): queries [B, T, H, K].
        k (torch.Tensor): keys [B, T, H, K].
        v (torch.Tensor): values [B, T, H, V].
        slopes (torch.Tensor): per-head decay slopes [H], >= 0.
        scale (float): multiplies the keys.
        initial_state (Optional[torch.Tensor]): state before the first token [B, H, K, V].
        chunk_size (int): tokens per chunk C.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: output [B, T, H, V] in q's dtype and the
        state after the last token [B, H, K, V] in the accumulation dtype.
    """
    out_dtype, acc = q.dtype, compute_dtype(q.dtype)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = (T + C - 1) // C
    pad = N * C - T
    # [B, T, H, D] -> [B * H * N, C, D] (one copy each), zero-padded at the end: zero keys add
    # nothing to the state. Every product below is a 3-D bmm on these, which needs no more copies.
    q, k, v = (_to_chunks(x.to(acc), N, C, pad) for x in (q, k, v))
    s = slopes.to(acc)[:, None, None]
    i = torch.arange(C, device=q.device, dtype=acc)
    # The last chunk may be shorter: its state update decays over its true length only.
    lengths = torch.full((N,), C, device=q.device, dtype=acc)
    lengths[-1] = C - pad
    distance = i[:, None] - i[None, :]
    # The key scale rides on the small decay factors instead of on the keys.
    intra_decay = torch.exp(-s * distance.clamp(min=0)) * (distance >= 0) * scale  # [H, C, C]
    from_start = torch.exp(-s * (i + 1))  # [H, 1, C]
    to_end = torch.exp(-s * (lengths[:, None] - 1 - i).clamp(min=0)) * scale  # [H, N, C]
    chunk_decay = torch.exp(-s[:, 0, 0, None] * lengths)  # [H, N]

    k_to_end = (k.view(B, H, N, C, K) * to_end[..., None]).view(B * H * N, C, K)
    chunk_kv = torch.bmm(k_to_end.transpose(1, 2), v).view(B, H, N, K, V)
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    states_before = q.new_empty(B, H, N, K, V)
    for n in range(N):
        states_before[:, :, n] = state
        state = chunk_decay[None, :, n, None, None] * state + chunk_kv[:, :, n]

    # Contribution of earlier chunks (through the state), decayed to each position ...
    o = torch.bmm(q, states_before.view(B * H * N, K, V))
    o.view(B, H, N, C, V).mul_(from_start[None, :, 0, None, :, None])
    # ... plus the masked, decayed attention inside the chunk.
    scores = torch.bmm(q, k.transpose(1, 2))
    scores.view(B, H, N, C, C).mul_(intra_decay[None, :, None])
    o.baddbmm_(scores, v)
    o = o.view(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(out_dtype), state


def _to_chunks(x: torch.Tensor, num_chunks: int, chunk_size: int, pad: int) -> torch.Tensor:
    """[B, T, H, D] -> [B * H * N, C, D], zero-padded by ``pad`` tokens at the end."""
    B, _, H, D = x.shape
    x = x.transpose(1, 2)
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(B * H * num_chunks, chunk_size, D)
