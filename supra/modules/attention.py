"""SUPRA linear attention: a drop-in for torchtune's ``MultiHeadAttention``."""

import logging
from typing import Optional

import torch
from torch import nn
from torchtune.generation import get_position_ids_from_padding_mask

from supra.modules.cache import RecurrentStateCache
from supra.modules.decay import FixedDecay
from supra.modules.rope import RotaryEmbedding
from supra.ops import linear_attention
from supra.ops.linear_attention import repeat_kv
from supra.ops.linear_attention.fused_recurrent import recurrent_step_

logger = logging.getLogger(__name__)


class LinearAttention(nn.Module):
    """Decayed linear attention with SUPRA's feature map and per-head output norm.

    Computes, for input x [B, T, D] (already normalized by the layer):
    ``q = phi_q(W_q x)``, ``k = phi_k(W_k x)`` (H_kv heads, each read by H / H_kv query heads;
    repeated to H heads only for a key norm, which spans all H * d_k features), optional q/k
    norm over all heads, RoPE on the features, then
    ``o_t = sum_{j<=t} gamma_h^(t-j) (q_t . scale k_j) v_j``, ``out_norm(o)`` and ``W_o``.
    With ``denominator_eps`` set, ``o_t`` is instead divided by
    ``sum_{j<=t} gamma_h^(t-j) (q_t . scale k_j) + eps`` (the T2R / linear-transformer
    normalization SUPRA replaces with GroupNorm; computed as one extra value column of ones).
    Without a cache it runs the chunked parallel op; with one (``setup_cache``) it continues
    from the stored state, for a chunk of any length, and stores the new state.

    Args:
        embed_dim (int): model dimension D.
        num_heads (int): query heads H (each has its own decay).
        num_kv_heads (int): key/value heads H_kv; must divide H.
        head_dim (int): d, the per-head width of the projections.
        q_proj (nn.Module): D -> H * d.
        k_proj (nn.Module): D -> H_kv * d.
        v_proj (nn.Module): D -> H_kv * d_v.
        output_proj (nn.Module): H * d_v -> D.
        feature_map (nn.Module): H * d -> H * d_k for the queries (and the keys under MHA).
        decay (nn.Module): per-head slopes [H] when called, with ``num_heads`` and ``gamma``
            (``FixedDecay``, or a learned decay such as components/learned_decay.py).
        out_norm (nn.Module): normalizes [B, T, H, d_v] per head.
        k_feature_map (Optional[nn.Module]): H_kv * d -> H_kv * d_k for the keys; None shares
            ``feature_map`` (only possible when H == H_kv).
        pos_embeddings (Optional[RotaryEmbedding]): RoPE applied to the features.
        q_norm (Optional[nn.Module]): norm over the H * d_k query features.
        k_norm (Optional[nn.Module]): norm over the H * d_k (repeated) key features.
        feature_dim (Optional[int]): d_k; defaults to ``head_dim``.
        scale (Optional[float]): key scale; defaults to ``d_k ** -0.5``.
        impl (Optional[str]): forces an op implementation (see ``supra.ops.linear_attention``).
        denominator_eps (Optional[float]): normalize by the attention denominator (plus this
            epsilon) before ``out_norm``; None (SUPRA) does not.

    Raises:
        ValueError: if H_kv does not divide H, the decay has the wrong number of heads, or the
            keys share the query feature map under GQA.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        output_proj: nn.Module,
        feature_map: nn.Module,
        decay: FixedDecay,
        out_norm: nn.Module,
        k_feature_map: Optional[nn.Module] = None,
        pos_embeddings: Optional[RotaryEmbedding] = None,
        q_norm: Optional[nn.Module] = None,
        k_norm: Optional[nn.Module] = None,
        feature_dim: Optional[int] = None,
        scale: Optional[float] = None,
        impl: Optional[str] = None,
        denominator_eps: Optional[float] = None,
    ) -> None:
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}): each query "
                "head reads one key/value head"
            )
        if decay.num_heads != num_heads:
            raise ValueError(
                f"decay has {decay.num_heads} slopes but the attention has {num_heads} query heads; "
                "each query head needs its own slope"
            )
        if k_feature_map is None and num_kv_heads != num_heads:
            raise ValueError(
                f"keys need their own feature map under GQA (num_kv_heads={num_kv_heads} != "
                f"num_heads={num_heads}); pass k_feature_map"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.feature_dim = feature_dim or head_dim
        self.scale = scale if scale is not None else self.feature_dim**-0.5
        self.impl = impl
        self.denominator_eps = denominator_eps
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.output_proj = output_proj
        self.feature_map = feature_map
        self.k_feature_map = k_feature_map
        self.decay = decay
        self.out_norm = out_norm
        self.pos_embeddings = pos_embeddings
        self.q_norm = q_norm
        self.k_norm = k_norm
        # torchtune's layers and decoder look for these two attributes.
        self.kv_cache: Optional[RecurrentStateCache] = None
        self.cache_enabled = False

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: Optional[int] = None) -> None:
        """Allocates the recurrent state (float32 whatever ``dtype``; ``max_seq_len`` is unused:
        the state does not grow). A second call keeps the existing cache, as torchtune does."""
        if self.kv_cache is not None:
            logger.warning("Recurrent caches are already set up; keeping the existing ones.")
            return
        _, num_heads, key_dim, value_dim = self.state_shape(batch_size)
        device = self.q_proj.weight.device
        self.kv_cache = RecurrentStateCache(batch_size, num_heads, key_dim, value_dim, device)
        self.cache_enabled = True

    def state_shape(self, batch_size: int = 1):
        """The recurrent state's shape [B, H, d_k, V] (float32): fixed, whatever the context."""
        value_dim = self.output_proj.weight.shape[1] // self.num_heads
        if self.denominator_eps is not None:
            # The denominator is carried as one extra value column of the state.
            value_dim += 1
        return (batch_size, self.num_heads, self.feature_dim, value_dim)

    def reset_cache(self) -> None:
        """Empties the recurrent state and position counters."""
        if self.kv_cache is None:
            raise RuntimeError("Recurrent caches are not set up. Call model.setup_caches(...) first.")
        self.kv_cache.reset()

    def forward(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): layer input [B, T, D].
            y (Optional[torch.Tensor]): must be None or x (self-attention only).
            mask (Optional[torch.Tensor]): padding mask [B, T], True for real tokens. Padding must
                be on the left and, with a cache, only before a sequence's first real token.
                Pad tokens never enter the state and do not advance positions.
            input_pos (Optional[torch.Tensor]): RoPE positions [B, T] or [T]. By default they count
                the real tokens seen so far (continuing from the cache). With packed documents,
                pass positions that restart at each document.
            cu_seqlens (Optional[torch.Tensor]): packed-document boundaries [N + 1] over the B * T
                flattened tokens (``supra.data.cu_seqlens_from_positions``): the state restarts at
                each one. Training / parallel mode only.

        Returns:
            torch.Tensor: [B, T, D].
        """
        if y is not None and y is not x:
            raise ValueError("LinearAttention is self-attention only: pass y=None or y=x")
        B, T, _ = x.shape
        caching = self.kv_cache is not None and self.cache_enabled
        if caching:
            self.kv_cache.check_batch(B)
        if mask is not None:
            self._check_padding_mask(mask, B, T, caching)
        if cu_seqlens is not None and caching:
            raise ValueError("cu_seqlens (packed documents) is for parallel mode; it cannot be combined with a recurrent cache")

        q, k = self._features(x)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, -1)
        k = k.view(B, T, self.num_kv_heads, self.feature_dim)
        if self.k_norm is not None:
            # The key norm spans the H * d_k features of the repeated keys (the reference's layout);
            # otherwise keys and values stay grouped and the op reads them by index.
            k, v = repeat_kv(k, v, self.num_heads)
            k = self.k_norm(k.reshape(B, T, -1)).view(B, T, self.num_heads, self.feature_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.view(B, T, self.num_heads, self.feature_dim)

        if self.pos_embeddings is not None:
            q, k = self._rotate(q, k, self.positions(B, T, x.device, mask, input_pos))
        if mask is not None:
            # A zero key adds nothing to the state; left pads meet an empty state, so they leave no trace.
            k = k * mask[:, :, None, None].to(k.dtype)
        if self.denominator_eps is not None:
            v = torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)

        if caching and T == 1 and self._decode_in_place(q, k, v):
            o = recurrent_step_(q, k, v, self.decay.gamma, self.scale, self.kv_cache.state[:B])
            self.kv_cache.positions[:B].add_(mask[:, 0].long() if mask is not None else 1)
        else:
            o = self._parallel(q, k, v, cu_seqlens, caching, mask)
        return self._output(o.reshape(B, T, self.num_heads, -1))

    def _features(self, x: torch.Tensor):
        """Feature-mapped queries and keys, [B, T, H * d_k] and [B, T, H_kv * d_k]."""
        if self.k_feature_map is None and x.shape[1] == 1:
            # A one-token step under MHA: one product reads the shared feature map's weight once.
            q, k = self.feature_map(torch.cat([self.q_proj(x), self.k_proj(x)], dim=1)).split(1, dim=1)
            return q, k
        return self.feature_map(self.q_proj(x)), (self.k_feature_map or self.feature_map)(self.k_proj(x))

    def _decode_in_place(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether a one-token step may update the cache in place, outside the custom op: at
        inference (nothing needs a gradient) with the default or the recurrent implementation."""
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return not needs_grad and self.impl in (None, "recurrent")

    def _parallel(self, q, k, v, cu_seqlens, caching, mask) -> torch.Tensor:
        """The op over all T tokens (from the cached state, storing the new one): [B, T, H, V]."""
        B, T = q.shape[:2]
        initial_state = self.kv_cache.state[:B] if caching else None
        if caching and torch.is_grad_enabled():
            # Autograd keeps the initial state for the backward; the cache is rewritten below.
            initial_state = initial_state.clone()
        if cu_seqlens is not None:
            # Documents are packed across rows too: run them as one row of B * T tokens.
            q, k, v = (t.reshape(1, B * T, t.shape[2], -1) for t in (q, k, v))
        o, final_state = linear_attention(
            q, k, v, self.decay(), scale=self.scale, initial_state=initial_state,
            output_final_state=caching, cu_seqlens=cu_seqlens, impl=self.impl,
        )
        if caching:
            consumed = mask.sum(dim=1) if mask is not None else T
            self.kv_cache.update(final_state, consumed)
        return o

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        """Normalizes the attention output [B, T, H, V(+1)] and projects it: [B, T, D]."""
        if self.denominator_eps is not None:
            o = o[..., :-1] / (o[..., -1:] + self.denominator_eps)
        return self.output_proj(self.out_norm(o).flatten(2))

    def positions(
        self,
        batch_size: int,
        seq_len: int,
        device: torch.device,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """RoPE positions [B, T] of the next ``seq_len`` tokens: ``input_pos`` if given, else the
        real tokens (``mask``, [B, T]) counted on from the cache's counters (from 0 without one)."""
        if input_pos is not None:
            return input_pos
        if mask is not None:
            positions = get_position_ids_from_padding_mask(mask)
        else:
            positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
        if self.kv_cache is not None and self.cache_enabled:
            self.kv_cache.check_batch(batch_size)
            positions = positions + self.kv_cache.positions[:batch_size, None]
        return positions

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """RoPE on queries [B, T, H, d_k] and keys [B, T, H_k, d_k], with one set of angles."""
        cos, sin = self.pos_embeddings.cos_sin(positions)
        if q.shape[1] != 1:
            return self.pos_embeddings.rotate(q, cos, sin), self.pos_embeddings.rotate(k, cos, sin)
        # One token: a decode step is bound by per-op overhead, so rotate both as one tensor.
        qk = self.pos_embeddings.rotate(torch.cat([q, k], dim=2), cos, sin)
        return qk.split([q.shape[2], k.shape[2]], dim=2)

    def _check_padding_mask(self, mask: torch.Tensor, batch_size: int, seq_len: int, caching: bool) -> None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch_size, seq_len):
            raise ValueError(
                f"LinearAttention takes a boolean padding mask [B, T] = [{batch_size}, {seq_len}] "
                f"(True = real token); got {mask.dtype} {list(mask.shape)}. Linear attention is causal "
                "by construction and needs no [B, T, S] attention mask"
            )
        if torch.compiler.is_compiling():
            return
        if bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
            raise ValueError(
                "padding must be on the left (pads before every real token of a sequence): a pad after "
                "a real token would decay the state; use left padding"
            )
        if caching and bool(((~mask).any(dim=1) & (self.kv_cache.positions[:batch_size] > 0)).any()):
            raise ValueError(
                "a sequence that already holds state in the cache received pad tokens; pads may only "
                "precede a sequence's first real token (reset_caches() starts new sequences)"
            )
