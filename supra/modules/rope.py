"""Rotary position embeddings computed from positions on the fly, in float32.

No table means no maximum length: a recurrent model's context may run past any ``max_seq_len``,
and positions are never rounded to a low-precision dtype.
"""

import torch
from torch import nn

ROPE_STYLES = ("half", "interleaved")


class RotaryEmbedding(nn.Module):
    """RoPE in either convention.

    ``"half"`` rotates pairs (x[i], x[i + D/2]) (GPT-NeoX / HF / open_lm: the published
    SUPRA checkpoints); ``"interleaved"`` rotates pairs (x[2i], x[2i+1]) (Meta / torchtune).

    Args:
        dim (int): head dimension D (even).
        base (float): frequency base.
        style (str): ``"half"`` or ``"interleaved"``.

    Raises:
        ValueError: for an odd ``dim`` or an unknown ``style``.
    """

    def __init__(self, dim: int, base: float = 10_000.0, style: str = "half") -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE needs an even head dimension; got {dim}")
        if style not in ROPE_STYLES:
            raise ValueError(f"RoPE style {style!r} is unknown; choose one of {ROPE_STYLES}")
        self.dim, self.base, self.style = dim, base, style

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        """[D/2] float32, ``base^(-2i/D)``, computed in float64 first."""
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim
        return (1.0 / self.base**exponent).float()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotates x by its positions.

        Args:
            x (torch.Tensor): [B, T, H, D].
            positions (torch.Tensor): integer positions [B, T] or [T].

        Returns:
            torch.Tensor: [B, T, H, D] in x's dtype.
        """
        angles = positions.float()[..., None] * self.inverse_frequencies(x.device)
        cos, sin = angles.cos()[..., None, :], angles.sin()[..., None, :]
        x32 = x.float()
        if self.style == "half":
            x1, x2 = x32[..., : self.dim // 2], x32[..., self.dim // 2 :]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = x32[..., 0::2], x32[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, style={self.style!r}"
