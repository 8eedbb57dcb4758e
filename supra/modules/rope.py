"""Rotary position embeddings computed from positions on the fly, in float32.

No table means no maximum length: a recurrent model's context may run past any ``max_seq_len``,
and positions are never rounded to a low-precision dtype.
"""

import math
from typing import Optional

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
        llama3_scaling (Optional[dict]): Llama-3.1 frequency scaling, HF's ``rope_scaling`` keys
            ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``.

    Raises:
        ValueError: for an odd ``dim`` or an unknown ``style``.
    """

    # (positions, their version, settings, (cos, sin)) of the last eager ``cos_sin`` call, any instance.
    _last_cos_sin = None

    def __init__(
        self, dim: int, base: float = 10_000.0, style: str = "half", llama3_scaling: Optional[dict] = None
    ) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE needs an even head dimension; got {dim}")
        if style not in ROPE_STYLES:
            raise ValueError(f"RoPE style {style!r} is unknown; choose one of {ROPE_STYLES}")
        self.dim, self.base, self.style = dim, base, style
        self.llama3_scaling = dict(llama3_scaling) if llama3_scaling else None
        # Not a buffer: a meta-device build would leave a buffer unset, and nothing here is saved.
        self._inv_freq_memo = {}

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        """[D/2] float32, ``base^(-2i/D)`` (Llama-3-scaled if configured), computed in float64 first."""
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim
        inv_freq = 1.0 / self.base**exponent
        if self.llama3_scaling:
            inv_freq = _llama3_scale(inv_freq, **self.llama3_scaling)
        return inv_freq.float()

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None, *, input_pos=None) -> torch.Tensor:
        """Rotates x by its positions.

        Args:
            x (torch.Tensor): [B, T, H, D].
            positions (Optional[torch.Tensor]): integer positions [B, T] or [T]; default 0..T-1.
            input_pos (Optional[torch.Tensor]): the same, under torchtune's keyword (its attention
                calls ``pos_embeddings(q, input_pos=...)``).

        Returns:
            torch.Tensor: [B, T, H, D] in x's dtype.
        """
        positions = positions if positions is not None else input_pos
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        return self.rotate(x, *self.cos_sin(positions))

    def cos_sin(self, positions: torch.Tensor):
        """The rotation of each position, laid out to match the features it multiplies: (cos, sin),
        each [B, T, 1, D] (or [T, 1, D]) float32, with sin signed for ``rotate``'s partner features.

        Computed once, they rotate queries and keys alike (``rotate``). In eager mode the last
        result is kept: the layers of one forward pass hand every RoPE the same positions tensor.
        """
        if torch.compiler.is_compiling() or positions.is_inference():
            # Compiled graphs share the computation themselves; inference tensors have no version.
            return self._cos_sin(positions)
        settings = (self.dim, self.base, self.style, repr(self.llama3_scaling))
        # One read of the memo (an immutable tuple): safe if another thread replaces it meanwhile.
        memo = RotaryEmbedding._last_cos_sin
        if memo is not None and memo[0] is positions and memo[1] == positions._version and memo[2] == settings:
            return memo[3]
        cos_sin = self._cos_sin(positions)
        RotaryEmbedding._last_cos_sin = (positions, positions._version, settings, cos_sin)
        return cos_sin

    def _cos_sin(self, positions: torch.Tensor):
        angles = positions.float()[..., None] * self._inverse_frequencies(positions.device)
        cos, sin = angles.cos(), angles.sin()
        if self.style == "half":
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        else:
            cos, sin = cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)
        return cos[..., None, :], sin[..., None, :]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates x [B, T, H, D] by ``cos_sin``'s angles, in float32; returns x's dtype.

        Each feature pairs with a partner (i with i + D/2 for ``"half"``, 2i with 2i + 1 for
        ``"interleaved"``): ``x * cos + partner * signed sin``, three passes over x.
        """
        x32 = x.float()
        if self.style == "half":
            partner = torch.cat((x32[..., self.dim // 2 :], x32[..., : self.dim // 2]), dim=-1)
        else:
            partner = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return torch.addcmul(x32 * cos, partner, sin).to(x.dtype)

    def _inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        """``inverse_frequencies``, memoized per device in eager mode (a decode step would
        otherwise rebuild them in every layer); traced afresh under compile, where they fold."""
        if torch.compiler.is_compiling():
            return self.inverse_frequencies(device)
        if device not in self._inv_freq_memo:
            self._inv_freq_memo[device] = self.inverse_frequencies(device)
        return self._inv_freq_memo[device]

    def extra_repr(self) -> str:
        scaling = f", llama3_scaling={self.llama3_scaling}" if self.llama3_scaling else ""
        return f"dim={self.dim}, base={self.base}, style={self.style!r}{scaling}"


def _llama3_scale(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama-3.1 RoPE scaling: long wavelengths divided by ``factor``, short ones kept, a smooth
    blend between (as in Meta's and HF's reference code)."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)
