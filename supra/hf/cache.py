"""A transformers ``Cache`` that holds a SUPRA model's fixed-size recurrent states (and the KV of
the softmax layers of a hybrid model)."""

import contextlib
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache

from supra.modules import is_linear_layer


class GrowingKVCache(nn.Module):
    """Keys and values of one softmax layer, grown by concatenation.

    transformers does not say how long a generation will be when the cache is made, so unlike
    torchtune's fixed-size ``KVCache`` this one grows by each chunk (like transformers' own
    ``DynamicCache``). It offers what torchtune's ``MultiHeadAttention`` uses: ``update``.

    Args:
        batch_size (int): B.
        num_kv_heads (int): H_kv.
        head_dim (int): D.
        dtype (torch.dtype): the keys' dtype (the model's).
        device (torch.device): where they live.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.batch_size = batch_size
        empty = torch.zeros(batch_size, num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.register_buffer("k_cache", empty, persistent=False)
        self.register_buffer("v_cache", empty.clone(), persistent=False)

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor):
        """Appends a chunk's keys and values [B, H_kv, T, D]; returns all of them [B, H_kv, S + T, D]."""
        self.k_cache = torch.cat([self.k_cache, k_val], dim=2)
        self.v_cache = torch.cat([self.v_cache, v_val], dim=2)
        return self.k_cache, self.v_cache


@contextlib.contextmanager
def lent_states(attns: Sequence[nn.Module], states: Sequence[Optional[nn.Module]]) -> Iterator[None]:
    """Gives each attention module a cache (None: no cache, parallel mode) for the duration of the
    block, then puts back the caches they had: a model's own caches never see transformers' calls."""
    saved = [(attn.kv_cache, attn.cache_enabled) for attn in attns]
    try:
        for attn, state in zip(attns, states):
            attn.kv_cache, attn.cache_enabled = state, state is not None
        yield
    finally:
        for attn, (state, enabled) in zip(attns, saved):
            attn.kv_cache, attn.cache_enabled = state, enabled


def _fresh_recurrent_state(attn: nn.Module, batch_size: int, dtype: torch.dtype) -> nn.Module:
    """A new, empty ``RecurrentStateCache`` shaped for ``attn``, made by the layer's own ``setup_cache``."""
    with lent_states([attn], [None]):
        attn.setup_cache(batch_size, dtype)
        return attn.kv_cache


class SupraCache(Cache):
    """Generation state of a supra model in transformers' ``Cache`` API.

    Holds one ``supra.modules.RecurrentStateCache`` per SUPRA layer (a float32 state
    [B, H, d_k, d_v] and a per-sequence position counter: fixed size, whatever the context
    length) and one ``GrowingKVCache`` per softmax layer of a hybrid model, with the padding
    mask of every token seen so far (which keys the softmax layers may attend to). It starts
    empty; the model's first forward with it allocates the states for that batch.

    Beam search reorders it (``reorder_cache``); rolling it back (``crop``) is impossible,
    since a recurrent state cannot forget tokens.
    """

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.seen_tokens = 0
        # Real tokens seen per sequence [B] (the RoPE position of the next one).
        self.positions: Optional[torch.Tensor] = None
        # Hybrid models only: [B, seen_tokens] bool, True for real tokens.
        self.padding: Optional[torch.Tensor] = None

    def allocate(self, decoder: nn.Module, batch_size: int) -> None:
        """Creates empty states for ``decoder``'s layers and a batch of ``batch_size`` sequences.

        Raises:
            ValueError: if the cache already holds states.
        """
        if self.layers:
            raise ValueError("this SupraCache already holds states; call reset() to start new sequences")
        first = next(decoder.parameters())
        for layer in decoder.layers:
            attn = layer.attn
            if is_linear_layer(layer):
                self.layers.append(_fresh_recurrent_state(attn, batch_size, first.dtype))
            else:
                self.layers.append(GrowingKVCache(batch_size, attn.num_kv_heads, attn.head_dim, first.dtype, first.device))
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=first.device)
        if not all(is_linear_layer(layer) for layer in decoder.layers):
            self.padding = torch.zeros(batch_size, 0, dtype=torch.bool, device=first.device)

    def advance(self, chunk_mask: Optional[torch.Tensor], num_tokens: int) -> None:
        """Records a chunk of ``num_tokens`` tokens the layers just consumed.

        Args:
            chunk_mask (Optional[torch.Tensor]): [B, T] bool, True for real tokens; None: all real.
            num_tokens (int): T.
        """
        self.seen_tokens += num_tokens
        self.positions += num_tokens if chunk_mask is None else chunk_mask.sum(dim=1)
        if self.padding is not None:
            if chunk_mask is None:
                chunk_mask = self.padding.new_ones(self.padding.shape[0], num_tokens)
            self.padding = torch.cat([self.padding, chunk_mask], dim=1)

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        """Tokens consumed so far, pads included (what generate slices its inputs by)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        """-1: no limit on the context length (the states do not grow)."""
        return -1

    def get_max_cache_shape(self, layer_idx: Optional[int] = 0) -> int:
        """-1: no limit (the name transformers 4.x uses)."""
        return -1

    def reset(self) -> None:
        """Drops every state: the next forward starts new sequences (of any batch size)."""
        self.layers.clear()
        self.seen_tokens = 0
        self.positions = None
        self.padding = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes the old row ``beam_idx[i]``."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the rows ``indices`` (a tensor of indices or a bool mask over rows)."""
        self._map_rows(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeats every row ``repeats`` times in place (row i becomes rows i * repeats ...)."""
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        """Only a no-op crop is possible.

        Raises:
            ValueError: for a crop that would drop tokens.
        """
        # transformers 5 passes the number of tokens to remove, 4.x the length to keep.
        if max_length == 0 or max_length == self.seen_tokens:
            return
        raise ValueError(
            f"cannot crop a SUPRA cache (asked for {max_length} with {self.seen_tokens} tokens seen): a recurrent "
            "state cannot forget tokens. Assisted / speculative decoding needs that; use plain generate"
        )

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Applies ``fn`` to every batch-major tensor the cache holds."""
        for module in self.layers:
            for name, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, name, fn(buffer))
            module.batch_size = next(module.buffers()).shape[0]
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.padding is not None:
            self.padding = fn(self.padding)

    @property
    def batch_size(self) -> int:
        """Sequences held; -1 before the first forward."""
        return -1 if self.positions is None else self.positions.shape[0]

    @property
    def is_compileable(self) -> bool:
        # Its softmax KV grows and it is allocated by the first forward: not a static cache.
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.layers)

    @property
    def is_sliding(self) -> List[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> List[bool]:
        # Reported False although the SUPRA layers are recurrent: transformers skips slicing the
        # tokens it passes for "linear" caches, while this cache counts its tokens (get_seq_length),
        # so generate can continue from it with the whole sequence.
        return [False] * len(self.layers)
