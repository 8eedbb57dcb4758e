"""Triton kernels for the chunked form of decayed linear attention, forward and backward.

The sequence is cut into chunks of ``BT = 64`` tokens. With ``s`` the head's slope, ``i, j`` token
offsets inside a chunk of ``L`` tokens and ``S_n`` the state before chunk ``n``:

    o_i     = exp(-s (i + 1)) q_i S_n  +  sum_{j <= i} exp(-s (i - j)) scale (q_i . k_j) v_j
    S_{n+1} = exp(-s L) S_n  +  sum_j exp(-s (L - 1 - j)) scale k_j^T v_j

Forward: ``_chunk_fwd_h_kernel`` walks the chunks of each sequence in order and stores every
``S_n`` (a [K, V] tile per chunk) and the final state; ``_chunk_fwd_o_kernel`` then computes every
chunk's output in parallel on tensor cores (``q S_n`` plus the masked, decayed [BT, BT] intra-chunk
attention). Backward: the states are recomputed (cheaper than storing them between forward and
backward), ``_chunk_bwd_dh_kernel`` walks the chunks in reverse to get the gradient of the state
after every chunk and of the initial state, and ``_chunk_bwd_dv_kernel`` / ``_chunk_bwd_dqk_kernel``
compute dv, dq and dk chunk by chunk. No [T, T] matrix exists anywhere.

Every exponent is ``-s * distance`` with ``distance >= 0``, masked before ``exp``: decays never
overflow. Products accumulate in float32; with bf16 inputs the decayed operands and the stored
per-chunk states are rounded to bf16 before the tensor-core products (as fla does), so states and
their gradients are bf16-accurate. Packed documents (``cu_seqlens``) restart the chunking at every
document start: each program finds its document and chunk through ``chunk_indices``, a table built
on the device and sized by an upper bound on the chunk count (no host sync, see ``prepare_chunks``).
"""

import itertools
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

CHUNK_SIZE = 64
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float32 inputs get float32 products (the op's contract), not the TF32 default of tl.dot.
FP32_DOT_PRECISION = "ieee"


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation."""
    # The interpreter multiplies bf16 tiles as their raw uint16 bits: UPCAST is set there only.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


INTERPRETED = type(_dot).__name__ == "InterpretedFunction"


def _configs(blocks: Tuple[Tuple[int, int], ...] = ()) -> List[triton.Config]:
    """Launch configurations to autotune over, with (BK, BV) tile sizes when ``blocks`` is given."""
    tiles = [{"BK": bk, "BV": bv} for bk, bv in blocks] or [{}]
    # Autotuning benchmarks every config on a GPU; the interpreter can only run one.
    if INTERPRETED:
        return [triton.Config(tiles[0], num_warps=4, num_stages=1)]
    return [
        triton.Config(tile, num_warps=w, num_stages=s)
        for tile, w, s in itertools.product(tiles, (2, 4, 8), (2, 3))
    ]


def _prune_tiles(configs, named_args, **kwargs):
    # Tiles wider than the (16-padded) head dims only add masked work.
    K, V = kwargs.get("K", named_args.get("K")), kwargs.get("V", named_args.get("V"))
    kept = [c for c in configs if c.kwargs["BK"] <= _block(K, 64) and c.kwargs["BV"] <= _block(V, 64)]
    return kept or configs[:1]


# The state passes loop over chunks with one [BK, BV] tile per program: smaller tiles give more
# programs, larger ones fewer loads of each token; the autotuner picks per shape.
_STATE_TILES = ((32, 32), (64, 64), (32, 64), (64, 32))
_STATE_KEY = ["H", "K", "V", "BT", "IS_VARLEN", "PRECISION"]
_CHUNK_KEY = ["H", "K", "V", "BT", "BK", "BV", "IS_VARLEN", "PRECISION"]


@triton.jit
def _sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence ``i_n``: packed document ``i_n``, or row ``i_n`` of a [B, T] batch."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T
    return bos, seq_len


@triton.jit
def _state_pass_position(cu_seqlens, chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token, length, row of its first chunk in the per-chunk state buffers) of sequence ``i_n``."""
    bos, seq_len = _sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    if IS_VARLEN:
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        boh = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, seq_len, boh


@triton.jit
def _chunk_position(
    cu_seqlens, chunk_indices, i_c, i_bh, T,
    H: tl.constexpr, HKV: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Where the program of chunk ``i_c`` and batch-head ``i_bh`` of a chunk kernel works.

    Returns:
        i_h: the query head.
        row: the chunk's first token as a row of the queries and outputs [B * T * H, D].
        row_kv: the same as a row of the keys and values [B * T * HKV, D] (grouped-query attention
            reads the query head's key/value head by index).
        i_tg: the chunk's row in the per-chunk state buffers [rows, H, K, V].
        length: the chunk's token count, BT or fewer in a sequence's last chunk. A padding row of
            ``chunk_indices`` (sequence -1, past the real chunks) gives length <= 0: the calling
            kernel returns at once.
    """
    i_b, i_h = i_bh // H, i_bh % H
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2)
        i_t = tl.load(chunk_indices + i_c * 2 + 1)
        # A padding row reads document 0's bounds (never cu_seqlens[-1]) and gets length 0.
        bos, seq_len = _sequence_bounds(cu_seqlens, tl.maximum(i_n, 0), T, IS_VARLEN)
        seq_len = tl.where(i_n >= 0, seq_len, 0)
        i_tg = i_c.to(tl.int64)
    else:
        i_t = i_c
        bos, seq_len = _sequence_bounds(cu_seqlens, i_b, T, IS_VARLEN)
        i_tg = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_c
    start = bos + i_t * BT
    length = tl.minimum(seq_len - i_t * BT, BT)
    return i_h, start * H + i_h, start * HKV + i_h // (H // HKV), i_tg, length


@triton.jit
def _chunk_decays(slopes, i_h, o_t, length):
    """Decay factors of head ``i_h`` over a chunk of ``length`` tokens, at token offsets ``o_t`` [BT].

    Returns:
        s: the head's slope, float32.
        b_from_start [BT]: exp(-s (i + 1)), from the state before the chunk to token i.
        b_to_end [BT]: exp(-s (length - 1 - i)), from token i to the chunk's last token; 0 past it.
    """
    s = tl.load(slopes + i_h).to(tl.float32)
    m_t = o_t < length
    b_from_start = tl.exp(-s * (o_t + 1))
    b_to_end = tl.where(m_t, tl.exp(-s * tl.where(m_t, length - 1 - o_t, 0)), 0)
    return s, b_from_start, b_to_end


@triton.jit
def _decay_scores(b_A, distance, s, scale):
    """Causal, decayed [BT, BT] intra-chunk scores: ``b_A exp(-s distance) scale`` where ``distance``
    (query offset minus key offset) is >= 0, and 0 elsewhere."""
    m_A = distance >= 0
    return tl.where(m_A, b_A * tl.exp(-s * tl.where(m_A, distance, 0)) * scale, 0)


@triton.autotune(configs=_configs(_STATE_TILES), key=_STATE_KEY, prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit(do_not_specialize=["T"])
def _chunk_fwd_h_kernel(
    k, v, h, h0, ht, slopes, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    # Grouped-query attention: this query head's state reads its key/value head by index.
    i_hkv = i_h // (H // HKV)
    bos, seq_len, boh = _state_pass_position(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)
    s = tl.load(slopes + i_h).to(tl.float32)
    # Log-decay from each token to the end of a full chunk, <= 0.
    b_g = -s * (BT - 1 - tl.arange(0, BT))

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0).to(tl.float32)
    for i_t in range(0, tl.cdiv(seq_len, BT)):
        # Token offsets in 64 bits: T * H * K may pass 2**31 in long packed batches.
        o_t = (i_t * BT + tl.arange(0, BT)).to(tl.int64)
        m_t = o_t < seq_len
        p_h = h + ((boh + i_t) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_h, b_h.to(p_h.dtype.element_ty), mask=m_kv)
        # Keys loaded transposed, [BK, BT], straight into the product.
        b_kT = tl.load(k + (bos * HKV + i_hkv) * K + o_k[:, None] + o_t[None, :] * (HKV * K), mask=(o_k[:, None] < K) & m_t[None, :], other=0)
        b_v = tl.load(v + (bos * HKV + i_hkv) * V + o_t[:, None] * (HKV * V) + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V), other=0)
        # A last, shorter chunk ends `short` tokens early: shift every distance to its end.
        short = tl.maximum(i_t * BT + BT - seq_len, 0)
        b_h *= tl.exp(-s * (BT - short))
        b_v = (b_v * (tl.exp(tl.minimum(b_g + s * short, 0)) * scale)[:, None]).to(b_v.dtype)
        b_h = _dot(b_kT, b_v, b_h, PRECISION, UPCAST)
    tl.store(ht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_kv)


@triton.autotune(configs=_configs(), key=_CHUNK_KEY)
@triton.jit(do_not_specialize=["T"])
def _chunk_fwd_o_kernel(
    q, k, v, h, o, slopes, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, row, row_kv, i_tg, length = _chunk_position(cu_seqlens, chunk_indices, i_c, i_bh, T, H, HKV, BT, IS_VARLEN)
    if IS_VARLEN:
        if length <= 0:
            return

    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = o_t < length
    m_v = o_v < V
    p_q = q + row * K
    p_k = k + row_kv * K
    p_v = v + row_kv * V
    p_o = o + row * V
    p_h = h + (i_tg * H + i_h) * K * V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(p_q + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0)
        b_kT = tl.load(p_k + o_k[:, None] + o_t[None, :] * (HKV * K), mask=m_k[:, None] & m_t[None, :], other=0)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
        b_o = _dot(b_q.to(b_h.dtype), b_h, b_o, PRECISION, UPCAST)
        b_A = _dot(b_q, b_kT, b_A, PRECISION, UPCAST)
    s, b_from_start, _ = _chunk_decays(slopes, i_h, o_t, length)
    b_o = b_o * b_from_start[:, None]
    b_A = _decay_scores(b_A, o_t[:, None] - o_t[None, :], s, scale)
    b_v = tl.load(p_v + o_t[:, None] * (HKV * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
    b_o = _dot(b_A.to(b_v.dtype), b_v, b_o, PRECISION, UPCAST)
    tl.store(p_o + o_t[:, None] * (H * V) + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.autotune(configs=_configs(_STATE_TILES), key=_STATE_KEY, prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit(do_not_specialize=["T"])
def _chunk_bwd_dh_kernel(
    q, do, dh, dht, dh0, slopes, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len, boh = _state_pass_position(cu_seqlens, chunk_offsets, i_n, T, BT, IS_VARLEN)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    # The decay from a chunk's start to its tokens does not depend on the chunk's length.
    s, b_from_start, _ = _chunk_decays(slopes, i_h, o_t, BT)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0).to(tl.float32)
    num_chunks = tl.cdiv(seq_len, BT)
    for i_r in range(0, num_chunks):
        i_t = num_chunks - 1 - i_r
        # dh[n] is the gradient of the state after chunk n (what chunk n's keys and values feed).
        tl.store(dh + ((boh + i_t) * H + i_h) * K * V + p_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        m_t = i_t * BT + o_t < seq_len
        row = (bos + i_t * BT) * H + i_h
        b_qT = tl.load(q + row * K + o_k[:, None] + o_t[None, :] * (H * K), mask=m_k[:, None] & m_t[None, :], other=0)
        b_do = tl.load(do + row * V + o_t[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
        length = tl.minimum(seq_len - i_t * BT, BT)
        b_qd = (b_qT * b_from_start[None, :]).to(b_qT.dtype)
        b_dh = _dot(b_qd, b_do, b_dh * tl.exp(-s * length), PRECISION, UPCAST)
    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + p_kv, b_dh, mask=m_kv)


@triton.autotune(configs=_configs(), key=_CHUNK_KEY)
@triton.jit(do_not_specialize=["T"])
def _chunk_bwd_dv_kernel(
    q, k, do, dh, dv, slopes, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, row, row_kv, i_tg, length = _chunk_position(cu_seqlens, chunk_indices, i_c, i_bh, T, H, HKV, BT, IS_VARLEN)
    if IS_VARLEN:
        if length <= 0:
            return

    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = o_t < length
    m_v = o_v < V
    p_q = q + row * K
    p_k = k + row_kv * K
    p_dh = dh + (i_tg * H + i_h) * K * V

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    # Transposed scores: rows are keys j, columns queries i.
    b_At = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(p_k + o_t[:, None] * (HKV * K) + o_k[None, :], mask=m_tk, other=0)
        b_qT = tl.load(p_q + o_k[:, None] + o_t[None, :] * (H * K), mask=m_k[:, None] & m_t[None, :], other=0)
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
        b_dv = _dot(b_k.to(b_dh.dtype), b_dh, b_dv, PRECISION, UPCAST)
        b_At = _dot(b_k, b_qT, b_At, PRECISION, UPCAST)
    s, _, b_to_end = _chunk_decays(slopes, i_h, o_t, length)
    b_dv = b_dv * (b_to_end * scale)[:, None]
    b_At = _decay_scores(b_At, o_t[None, :] - o_t[:, None], s, scale)
    p_tv = o_t[:, None] * (H * V) + o_v[None, :]
    b_do = tl.load(do + row * V + p_tv, mask=m_t[:, None] & m_v[None, :], other=0)
    b_dv = _dot(b_At.to(b_do.dtype), b_do, b_dv, PRECISION, UPCAST)
    tl.store(dv + row * V + p_tv, b_dv.to(dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.autotune(configs=_configs(), key=_CHUNK_KEY)
@triton.jit(do_not_specialize=["T"])
def _chunk_bwd_dqk_kernel(
    q, k, v, do, h, dh, dq, dk, slopes, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h, row, row_kv, i_tg, length = _chunk_position(cu_seqlens, chunk_indices, i_c, i_bh, T, H, HKV, BT, IS_VARLEN)
    if IS_VARLEN:
        if length <= 0:
            return

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t = o_t < length
    m_k = o_k < K
    p_v = v + row_kv * V
    p_do = do + row * V
    p_h = h + (i_tg * H + i_h) * K * V
    p_dh = dh + (i_tg * H + i_h) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_vk = m_v[:, None] & m_k[None, :]
        b_v = tl.load(p_v + o_t[:, None] * (HKV * V) + o_v[None, :], mask=m_tv, other=0)
        b_do = tl.load(p_do + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0)
        # [BV, BK] tiles of the state before the chunk and of the gradient of the state after it.
        p_vk = o_k[None, :] * V + o_v[:, None]
        b_hT = tl.load(p_h + p_vk, mask=m_vk, other=0)
        b_dhT = tl.load(p_dh + p_vk, mask=m_vk, other=0)
        b_dA = _dot(b_do, tl.trans(b_v), b_dA, PRECISION, UPCAST)
        b_dq = _dot(b_do.to(b_hT.dtype), b_hT, b_dq, PRECISION, UPCAST)
        b_dk = _dot(b_v.to(b_dhT.dtype), b_dhT, b_dk, PRECISION, UPCAST)
    s, b_from_start, b_to_end = _chunk_decays(slopes, i_h, o_t, length)
    b_dq = b_dq * b_from_start[:, None]
    b_dk = b_dk * (b_to_end * scale)[:, None]
    b_dA = _decay_scores(b_dA, o_t[:, None] - o_t[None, :], s, scale)
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = o_t[:, None] * (H * K) + o_k[None, :]
    b_q = tl.load(q + row * K + p_tk, mask=m_tk, other=0)
    b_k = tl.load(k + row_kv * K + o_t[:, None] * (HKV * K) + o_k[None, :], mask=m_tk, other=0)
    b_dq = _dot(b_dA.to(b_k.dtype), b_k, b_dq, PRECISION, UPCAST)
    b_dk = _dot(tl.trans(b_dA).to(b_q.dtype), b_q, b_dk, PRECISION, UPCAST)
    tl.store(dq + row * K + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + row * K + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)


def _empty(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocates every buffer the kernels write (tests swap in NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(x: torch.Tensor) -> None:
    """Raises unless the kernels can run on ``x``'s device: CUDA, or CPU under the interpreter."""
    if x.device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "Triton kernels need CUDA tensors; got CPU tensors. To run them on CPU under the Triton "
            "interpreter, set TRITON_INTERPRET=1 before supra.ops.linear_attention.triton_chunk is imported"
        )


def _block(dim: int, largest: int) -> int:
    # tl.dot needs every tile side >= 16; larger head dims loop over blocks, smaller ones are masked.
    return max(16, min(largest, triton.next_power_of_2(dim)))


def _state_grid(K: int, V: int, num_heads: int):
    return lambda meta: (triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"]), num_heads)


def _launch_options(dtype: torch.dtype) -> dict:
    # Products of bf16 or fp16 tiles ignore the precision; float32 tiles are the float32 inputs' own
    # and, under fp16, the float32 states against queries cast up.
    upcast = INTERPRETED and dtype == torch.bfloat16
    return {"PRECISION": "tf32" if dtype == torch.bfloat16 and not upcast else FP32_DOT_PRECISION, "UPCAST": upcast}


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    # Per-chunk states feed tensor-core products with q: bf16 under bf16; float32 otherwise,
    # since float16's range cannot hold the state of a long sequence without decay.
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


class Chunks(NamedTuple):
    """Chunk bookkeeping shared by the kernels of one forward or one backward call.

    Attributes:
        num_seqs (int): number of sequences N: B, or the number of packed documents.
        num_rows (int): rows of the per-chunk state buffers [num_rows, H, K, V] and of
            ``chunk_indices``: every chunk densely; an upper bound with ``cu_seqlens``.
        cu_seqlens (Optional[torch.Tensor]): int32 document boundaries [N + 1], or None.
        chunk_offsets (Optional[torch.Tensor]): int32 [N + 1], each document's first row, or None.
        chunk_indices (Optional[torch.Tensor]): int32 [num_rows, 2], (document, chunk within it) per
            row; -1 as the document marks the padding rows past the real chunks. None when dense.
    """

    num_seqs: int
    num_rows: int
    cu_seqlens: Optional[torch.Tensor]
    chunk_offsets: Optional[torch.Tensor]
    chunk_indices: Optional[torch.Tensor]


def prepare_chunks(
    cu_seqlens: Optional[torch.Tensor], batch_size: int, num_tokens: int, chunk_size: int = CHUNK_SIZE
) -> Chunks:
    """Chunk bookkeeping for B sequences of ``num_tokens`` tokens, or for packed documents.

    With ``cu_seqlens`` [N + 1] everything is built on its device by tensor ops and sized from shapes
    alone, never from values: no device-to-host sync, so the op can be captured in a CUDA graph.
    """
    if cu_seqlens is None:
        return Chunks(batch_size, batch_size * triton.cdiv(num_tokens, chunk_size), None, None, None)
    cu = cu_seqlens.to(torch.int32).contiguous()
    num_seqs = cu.numel() - 1
    # A document of L tokens has cdiv(L, C) <= L // C + 1 chunks, and the L // C sum to at most
    # T // C: N documents have at most T // C + N chunks.
    num_rows = num_tokens // chunk_size + num_seqs
    counts = (cu[1:] - cu[:-1] + chunk_size - 1) // chunk_size
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0, dtype=torch.int32)])
    rows = torch.arange(num_rows, dtype=torch.int32, device=cu.device)
    # Row r belongs to the last document starting at or before it (empty documents own no row);
    # rows from the real chunk count offsets[-1] on are padding.
    seq = torch.searchsorted(offsets, rows, right=True, out_int32=True) - 1
    within = rows - offsets[seq]
    seq = torch.where(rows < offsets[-1], seq, -1)
    return Chunks(num_seqs, num_rows, cu, offsets, torch.stack([seq, within], dim=1))


def chunk_fwd_h(
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    chunks: Chunks,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """States before every chunk [chunks.num_rows, H, K, V] and the final states [N, H, K, V]
    (float32), one per query head (H = the number of slopes) from keys/values [B, T, H_kv, *].
    Padding rows (with ``cu_seqlens``) stay unwritten."""
    B, T, HKV, K = k.shape
    H = slopes.shape[0]
    V = v.shape[-1]
    N, cu = chunks.num_seqs, chunks.cu_seqlens
    h = _empty((chunks.num_rows, H, K, V), _state_dtype(k.dtype), k.device)
    ht = _empty((N, H, K, V), torch.float32, k.device)
    _chunk_fwd_h_kernel[_state_grid(K, V, N * H)](
        k, v, h, initial_state, ht, slopes, cu, chunks.chunk_offsets, scale, T,
        H=H, HKV=HKV, K=K, V=V, BT=CHUNK_SIZE,
        USE_INITIAL_STATE=initial_state is not None, IS_VARLEN=cu is not None, **_launch_options(k.dtype),
    )
    return h, ht


def prepare_inputs(q, k, v, slopes, initial_state):
    """Checks the device and dtype, and gives the kernels contiguous inputs and float32 slopes / state."""
    check_device(q)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Triton kernels take float32, bfloat16 or float16 inputs; got {q.dtype}")
    q, k, v = (x.contiguous() for x in (q, k, v))
    slopes = slopes.detach().to(device=q.device, dtype=torch.float32).contiguous()
    if initial_state is not None:
        initial_state = initial_state.detach().to(torch.float32).contiguous()
    return q, k, v, slopes, initial_state


def chunk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked forward on Triton kernels (no autograd).

    Args:
        q (torch.Tensor): queries [B, T, H, K] in float32, bfloat16 or float16.
        k (torch.Tensor): keys [B, T, H_kv, K] (H_kv divides H; read by index, never repeated).
        v (torch.Tensor): values [B, T, H_kv, V].
        slopes (torch.Tensor): per-head decay slopes [H], >= 0.
        scale (float): multiplies the keys.
        initial_state (Optional[torch.Tensor]): [B or N, H, K, V].
        cu_seqlens (Optional[torch.Tensor]): boundaries [N + 1] of packed documents (B == 1).

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: output [B, T, H, V] in q's dtype, final states
        [B or N, H, K, V] in float32.
    """
    q, k, v, slopes, initial_state = prepare_inputs(q, k, v, slopes, initial_state)
    B, T, H, K = q.shape
    HKV = k.shape[2]
    V = v.shape[-1]
    chunks = prepare_chunks(cu_seqlens, B, T)
    h, ht = chunk_fwd_h(k, v, slopes, scale, initial_state, chunks)
    cu = chunks.cu_seqlens
    o = _empty((B, T, H, V), q.dtype, q.device)
    BK, BV = _block(K, 64), _block(V, 64)
    grid = (triton.cdiv(V, BV), chunks.num_rows // B, B * H)
    _chunk_fwd_o_kernel[grid](
        q, k, v, h, o, slopes, cu, chunks.chunk_indices, scale, T,
        H=H, HKV=HKV, K=K, V=V, BT=CHUNK_SIZE, BK=BK, BV=BV, IS_VARLEN=cu is not None, **_launch_options(q.dtype),
    )
    return o, ht


def chunk_bwd(
    do: torch.Tensor,
    dht: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Chunked backward on Triton kernels: recomputes the chunk states, then dh, dv, dq and dk.

    Args:
        do (torch.Tensor): gradient of the output [B, T, H, V].
        dht (Optional[torch.Tensor]): gradient of the final states [B or N, H, K, V], or None.
        q, k, v, slopes, scale, initial_state, cu_seqlens: the forward's inputs.

    Returns:
        Tuple: dq, dk, dv in the dtypes of q, k, v, and the gradient of ``initial_state`` in its
        dtype (None without an initial state).
    """
    state_dtype = None if initial_state is None else initial_state.dtype
    q, k, v, slopes, initial_state = prepare_inputs(q, k, v, slopes, initial_state)
    do = do.to(q.dtype).contiguous()
    dht = None if dht is None else dht.to(torch.float32).contiguous()
    B, T, H, K = q.shape
    HKV = k.shape[2]
    V = v.shape[-1]
    chunks = prepare_chunks(cu_seqlens, B, T)
    h, _ = chunk_fwd_h(k, v, slopes, scale, initial_state, chunks)
    N, num_rows, cu, offsets, indices = chunks
    options = _launch_options(q.dtype)
    BK, BV = _block(K, 64), _block(V, 64)

    dh = _empty((num_rows, H, K, V), _state_dtype(q.dtype), q.device)
    dh0 = _empty((N, H, K, V), torch.float32, q.device) if initial_state is not None else None
    _chunk_bwd_dh_kernel[_state_grid(K, V, N * H)](
        q, do, dh, dht, dh0, slopes, cu, offsets, T,
        H=H, K=K, V=V, BT=CHUNK_SIZE,
        USE_FINAL_STATE_GRADIENT=dht is not None, USE_INITIAL_STATE=dh0 is not None,
        IS_VARLEN=cu is not None, **options,
    )
    # Under GQA every query head writes its own key/value gradient (float32, summed per group below).
    grad_dtype = (lambda dtype: dtype) if HKV == H else (lambda dtype: torch.float32)
    dv = _empty((B, T, H, V), grad_dtype(v.dtype), q.device)
    _chunk_bwd_dv_kernel[(triton.cdiv(V, BV), num_rows // B, B * H)](
        q, k, do, dh, dv, slopes, cu, indices, scale, T,
        H=H, HKV=HKV, K=K, V=V, BT=CHUNK_SIZE, BK=BK, BV=BV, IS_VARLEN=cu is not None, **options,
    )
    dq = _empty((B, T, H, K), q.dtype, q.device)
    dk = _empty((B, T, H, K), grad_dtype(k.dtype), q.device)
    _chunk_bwd_dqk_kernel[(triton.cdiv(K, BK), num_rows // B, B * H)](
        q, k, v, do, h, dh, dq, dk, slopes, cu, indices, scale, T,
        H=H, HKV=HKV, K=K, V=V, BT=CHUNK_SIZE, BK=BK, BV=BV, IS_VARLEN=cu is not None, **options,
    )
    dk, dv = _sum_groups(dk, HKV, k.dtype), _sum_groups(dv, HKV, v.dtype)
    return dq, dk, dv, (None if dh0 is None else dh0.to(state_dtype))


def _sum_groups(grad: torch.Tensor, num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-query-head gradients [B, T, H, D] -> their key/value heads' [B, T, H_kv, D] in ``dtype``."""
    B, T, H, D = grad.shape
    if H == num_kv_heads:
        return grad
    return grad.view(B, T, num_kv_heads, H // num_kv_heads, D).sum(dim=3).to(dtype)


class ChunkLinearAttentionFunction(torch.autograd.Function):
    """Chunked Triton forward and backward as one autograd node (saves only the inputs)."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, initial_state, cu_seqlens):
        o, ht = chunk_fwd(q, k, v, slopes, scale, initial_state, cu_seqlens)
        ctx.save_for_backward(q, k, v, slopes, initial_state, cu_seqlens)
        ctx.scale = scale
        return o, ht

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dht):
        q, k, v, slopes, initial_state, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dh0 = chunk_bwd(do, dht, q, k, v, slopes, ctx.scale, initial_state, cu_seqlens)
        return dq, dk, dv, None, None, dh0, None


def triton_chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable chunked Triton linear attention, without the custom op's checks and dispatch.

    Takes the inputs of ``supra.ops.linear_attention`` (already validated; ``scale`` resolved) and
    returns ``(o, final_state)``; gradients reach q, k, v and ``initial_state``.
    """
    return ChunkLinearAttentionFunction.apply(q, k, v, slopes, scale, initial_state, cu_seqlens)
