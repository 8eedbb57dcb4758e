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
    # [B, T, H, D] -> [B, H, N, C, D], zero-padded at the end (zero keys add nothing to the state).
    q, k, v = (
        F.pad(x.to(acc).transpose(1, 2), (0, 0, 0, pad)).reshape(B, H, N, C, -1)
        for x in (q, k, v)
    )
    k = k * scale
    s = slopes.to(acc)[:, None, None]
    i = torch.arange(C, device=q.device, dtype=acc)
    # The last chunk may be shorter: its state update decays over its true length only.
    lengths = torch.full((N,), C, device=q.device, dtype=acc)
    lengths[-1] = C - pad
    distance = i[:, None] - i[None, :]
    intra_decay = torch.exp(-s * distance.clamp(min=0)) * (distance >= 0)
    from_start = torch.exp(-s * (i + 1))
    to_end = torch.exp(-s * (lengths[:, None] - 1 - i).clamp(min=0))
    chunk_decay = torch.exp(-s[:, 0, 0, None] * lengths)

    scores = (q @ k.transpose(-1, -2)) * intra_decay[:, None]
    o = scores @ v
    chunk_kv = (k * to_end[..., None]).transpose(-1, -2) @ v

    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    states_before = []
    for n in range(N):
        states_before.append(state)
        state = chunk_decay[None, :, n, None, None] * state + chunk_kv[:, :, n]
    o = o + (q * from_start[..., None]) @ torch.stack(states_before, dim=2)
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(out_dtype), state
