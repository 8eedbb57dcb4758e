"""Oracle and inputs shared by the tests of ``supra.ops.linear_attention``.

``reference`` is written from the math, one token at a time in float64, and shares no code with
the library: every implementation (PyTorch paths and Triton kernels) is held to it.
"""

from typing import Dict, List, Optional, Tuple

import torch


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``S_t = exp(-s) S_{t-1} + (scale k_t)^T v_t``, ``o_t = q_t S_t``, one token at a time in float64.

    Args:
        q (torch.Tensor): queries [B, T, H, K] on the CPU.
        k (torch.Tensor): keys [B, T, H_kv, K]; grouped heads (H_kv < H) are first repeated to the H
            query heads in memory (head h reads h // (H / H_kv)), what the implementations do by index.
        v (torch.Tensor): values [B, T, H_kv, V].
        slopes (torch.Tensor): per-head decay slopes [H] (any device).
        scale (float): multiplies the keys.
        initial_state (Optional[torch.Tensor]): [B or N, H, K, V], or None for zeros.
        cu_seqlens (Optional[torch.Tensor]): boundaries [N + 1] of packed documents (B == 1).

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: output [B, T, H, V] and final states [B or N, H, K, V],
        float64, differentiable with respect to the inputs.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q = q.double()
    k, v = (x.double().repeat_interleave(H // x.shape[2], dim=2) for x in (k, v))
    gamma = torch.exp(-slopes.double().cpu()).view(1, H, 1, 1)
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    outputs: List[torch.Tensor] = []
    finals: List[torch.Tensor] = []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if initial_state is None:
            state = torch.zeros(B, H, K, V, dtype=torch.float64)
        else:
            state = initial_state.double() if cu_seqlens is None else initial_state[n : n + 1].double()
        for t in range(start, end):
            state = gamma * state + (scale * k[:, t]).unsqueeze(-1) * v[:, t].unsqueeze(-2)
            outputs.append((q[:, t].unsqueeze(-1) * state).sum(dim=-2))
        finals.append(state)
    return torch.stack(outputs, dim=1), torch.cat(finals, dim=0)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes [num_heads]: 2 ** (-8 (h + 1) / num_heads)."""
    return torch.tensor([2.0 ** (-8 * (i + 1) / num_heads) for i in range(num_heads)])


def make_inputs(B, T, H, K, V, dtype, initial_state=False, num_states=None, kv_heads=None, requires_grad=False):
    """Random q [B, T, H, K], k [B, T, H_kv, K], v [B, T, H_kv, V] in ``dtype`` (H_kv = ``kv_heads``
    or H) and, with ``initial_state``, h0 [num_states or B, H, K, V] (float64 for float64 inputs,
    float32 otherwise), else None. ``requires_grad`` makes them all leaves that need gradients."""
    q = torch.randn(B, T, H, K).to(dtype)
    k, v = (torch.randn(B, T, kv_heads or H, d).to(dtype) for d in (K, V))
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = torch.randn(num_states or B, H, K, V, dtype=state_dtype) if initial_state else None
    for x in [q, k, v] + ([h0] if h0 is not None else []):
        x.requires_grad_(requires_grad)
    return q, k, v, h0


def assert_close(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    tolerances: Dict[torch.dtype, Tuple[float, float]],
) -> None:
    """Asserts ``actual`` is finite and close to ``expected`` (either on any device).

    ``tolerances[dtype]`` bounds (rms error / rms of ``expected``, max error / max |``expected``|).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (memory left unwritten?)"
    rms_tol, max_tol = tolerances[dtype]
    diff = actual - expected
    rms_err = (diff.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp(min=1e-30)).item()
    max_err = (diff.abs().max() / expected.abs().max().clamp(min=1e-30)).item()
    assert rms_err <= rms_tol and max_err <= max_tol, (
        f"{name} ({dtype}): relative rms error {rms_err:.2e} (tol {rms_tol:.0e}), "
        f"relative max error {max_err:.2e} (tol {max_tol:.0e})"
    )
