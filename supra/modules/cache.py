"""Fixed-size recurrent state for generation."""

import torch
from torch import nn


class RecurrentStateCache(nn.Module):
    """Pre-allocated float32 state of one linear attention layer, updated in place.

    Memory is fixed at construction: B * H * K * V floats plus one position counter per
    sequence, whatever the context length.

    Args:
        batch_size (int): the largest batch it will serve.
        num_heads (int): H.
        key_dim (int): K, the feature dimension.
        value_dim (int): V.
        device (torch.device): where the state lives.
    """

    def __init__(
        self, batch_size: int, num_heads: int, key_dim: int, value_dim: int, device=None
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        state = torch.zeros(batch_size, num_heads, key_dim, value_dim, dtype=torch.float32, device=device)
        self.register_buffer("state", state, persistent=False)
        # Real tokens consumed per sequence: the RoPE position of the next one.
        positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.register_buffer("positions", positions, persistent=False)

    def check_batch(self, batch_size: int) -> None:
        """Raises ValueError if a batch of ``batch_size`` does not fit."""
        if batch_size > self.batch_size:
            raise ValueError(
                f"batch of {batch_size} sequences exceeds the recurrent cache's batch size "
                f"{self.batch_size}; call model.setup_caches(batch_size={batch_size}, ...) again "
                "after deleting the caches, or split the batch"
            )

    def reset(self) -> None:
        """Empties the state and the position counters."""
        self.state.zero_()
        self.positions.zero_()

    def update(self, new_state: torch.Tensor, num_new_tokens: torch.Tensor) -> None:
        """Stores the state of the first B sequences and advances their positions.

        Args:
            new_state (torch.Tensor): [B, H, K, V].
            num_new_tokens (torch.Tensor): real tokens consumed per sequence [B] (or a scalar).
        """
        batch_size = new_state.shape[0]
        self.state[:batch_size].copy_(new_state)
        self.positions[:batch_size].add_(num_new_tokens)

    def size_bytes(self) -> int:
        """Bytes held by the state and counters: constant in context length."""
        return self.state.numel() * self.state.element_size() + self.positions.numel() * 8
