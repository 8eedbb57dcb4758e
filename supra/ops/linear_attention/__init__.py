"""Decayed linear attention: ``S_t = gamma_h S_{t-1} + (scale k_t)^T v_t``, ``o_t = q_t S_t``.

The public function validates its inputs and calls the ``supra::linear_attention`` custom op,
so ``torch.compile(fullgraph=True)`` traces models that use it as one opaque node.
"""

import contextlib
import importlib.util
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from supra.ops.linear_attention.chunk import chunk_linear_attention
from supra.ops.linear_attention.fused_recurrent import recurrent_linear_attention
from supra.ops.linear_attention.naive import compute_dtype, naive_linear_attention, repeat_kv

IMPLEMENTATIONS: Dict[str, Callable] = {
    "naive": naive_linear_attention,
    "chunk": chunk_linear_attention,
    "recurrent": recurrent_linear_attention,
}

# Up to this many tokens the step loop beats the chunked form (see benchmarks/ops_cpu.py).
RECURRENT_MAX_TOKENS = 4

# impl="triton": the Triton kernels (triton_chunk.py, triton_recurrent.py), imported on first use.
# The default on CUDA tensors; on CPU only when requested and TRITON_INTERPRET=1 is set.
TRITON = "triton"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Up to this many tokens impl="triton" runs the fused recurrent kernel instead of the chunked
# ones (a guess, unmeasured on a GPU: benchmarks/ops_gpu.py prints the crossover).
TRITON_RECURRENT_MAX_TOKENS = 16
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    impl: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Decayed linear attention (no softmax, no denominator), per head h:

    ``o_t = sum_{j<=t} gamma_h^(t-j) (q_t . scale k_j) v_j``, ``gamma_h = exp(-slopes[h])``.

    Args:
        q (torch.Tensor): queries [B, T, H, K].
        k (torch.Tensor): keys [B, T, H_kv, K]; H_kv divides H (grouped-query attention: query
            head h reads key/value head h // (H / H_kv), without the keys being repeated in memory
            by the Triton kernels).
        v (torch.Tensor): values [B, T, H_kv, V].
        slopes (torch.Tensor): per-head decay slopes [H], finite and >= 0 (0 = no decay).
            Differentiable (learned decays) except with ``impl="triton"``, whose backward has no
            slope gradient.
        scale (Optional[float]): multiplies the keys; defaults to ``K ** -0.5``.
        initial_state (Optional[torch.Tensor]): state before the first token, [B, H, K, V]
            (one per document [N, H, K, V] with ``cu_seqlens``). Differentiable.
        output_final_state (bool): also return the state after the last token.
        cu_seqlens (Optional[torch.Tensor]): int boundaries [N + 1] of N documents packed in a
            batch of one (B == 1), starting at 0 and ending at T. The state restarts at each one.
        impl (Optional[str]): ``"naive"``, ``"chunk"``, ``"recurrent"`` or ``"triton"``; None picks
            the fastest for the device and length (``"triton"`` for float32/bf16/fp16 CUDA tensors).

    Returns:
        Tuple[torch.Tensor, Optional[torch.Tensor]]: the output [B, T, H, V] in q's dtype and,
        if ``output_final_state``, the final state [B or N, H, K, V] in float32 (float64 for
        float64 inputs); otherwise None.

    Raises:
        ValueError: for mismatched shapes or dtypes, negative or non-finite slopes, bad
            ``cu_seqlens`` or ``initial_state``, an unknown ``impl``, or ``impl="triton"`` on CPU
            tensors without ``TRITON_INTERPRET=1`` or on float64 inputs.
    """
    _check_inputs(q, k, v, slopes, initial_state, cu_seqlens)
    impl = _pick_impl(q, impl)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    o, final_state = torch.ops.supra.linear_attention(
        q, k, v, slopes, scale, initial_state, cu_seqlens, impl
    )
    return o, (final_state if output_final_state else None)


def _pick_impl(q: torch.Tensor, impl: Optional[str]) -> str:
    if impl is None:
        if q.is_cuda and q.dtype in TRITON_DTYPES and _HAS_TRITON:
            return TRITON
        return "recurrent" if q.shape[1] <= RECURRENT_MAX_TOKENS else "chunk"
    if impl == TRITON:
        _check_triton(q)
        return impl
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"impl={impl!r} is not a linear attention implementation; "
            f"choose one of {sorted(IMPLEMENTATIONS)} or None"
        )
    return impl


def _check_triton(q: torch.Tensor) -> None:
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # The start of this message is also the unknown-impl error's: on CPU "triton" is not one.
        raise ValueError(
            f"impl='triton' is not a linear attention implementation; choose one of {sorted(IMPLEMENTATIONS)} "
            f"or None for {q.device.type} tensors: Triton needs CUDA tensors, or TRITON_INTERPRET=1 "
            "set before the first triton call to run its kernels on CPU under the Triton interpreter"
        )
    if not _HAS_TRITON:
        raise ValueError("impl='triton' needs the triton package (pip install triton); or pick another impl")
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"impl='triton' takes float32, bfloat16 or float16 inputs; got {q.dtype}: use impl='chunk'"
        )


def _triton_forward(q, k, v, slopes, scale, initial_state, cu_seqlens) -> Tuple[torch.Tensor, torch.Tensor]:
    if q.shape[1] <= TRITON_RECURRENT_MAX_TOKENS:
        from supra.ops.linear_attention.triton_recurrent import fused_recurrent_fwd

        return fused_recurrent_fwd(q, k, v, slopes, scale, initial_state, cu_seqlens)
    from supra.ops.linear_attention.triton_chunk import chunk_fwd

    return chunk_fwd(q, k, v, slopes, scale, initial_state, cu_seqlens)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, T, H, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"k {tuple(k.shape)} must be [B, T, H_kv, K] for q {tuple(q.shape)} = [B, T, H, K], with "
            "H_kv dividing H (grouped-query attention)"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v {tuple(v.shape)} must share batch, time and heads with k {tuple(k.shape)}: [B, T, H_kv, V]"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("q, k, v have no tokens (T == 0); pass at least one token")
    if slopes.shape != (H,):
        raise ValueError(f"slopes must have shape [H] = [{H}], one per head; got {tuple(slopes.shape)}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(slopes).all() and (slopes >= 0).all()):
        raise ValueError(
            f"slopes must be finite and >= 0 (gamma = exp(-slope) <= 1); got {slopes.tolist()}"
        )
    num_states = B
    if cu_seqlens is not None:
        num_states = _check_cu_seqlens(cu_seqlens, B, T)
    expected = (num_states, H, K, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(
            f"initial_state must have shape [{'N' if cu_seqlens is not None else 'B'}, H, K, V] = "
            f"{list(expected)}; got {list(initial_state.shape)}"
        )


def _check_cu_seqlens(cu_seqlens: torch.Tensor, batch_size: int, num_tokens: int) -> int:
    """Validates packed-document boundaries and returns the number of documents."""
    if batch_size != 1:
        raise ValueError(f"cu_seqlens needs the documents packed in a batch of one (B == 1); got B = {batch_size}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor [N + 1] of boundaries; got shape "
            f"{tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}"
        )
    if not torch.compiler.is_compiling():
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != num_tokens or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(
                f"cu_seqlens must rise from 0 to T = {num_tokens} without decreasing; got {bounds}"
            )
    return cu_seqlens.numel() - 1


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    impl: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Runs one implementation, once per packed document when ``cu_seqlens`` is given."""
    if impl == TRITON:
        # The kernels restart the state at document starts themselves: one launch for all documents.
        return _triton_forward(q, k, v, slopes, scale, initial_state, cu_seqlens)
    fn = IMPLEMENTATIONS[impl]
    k, v = repeat_kv(k, v, q.shape[2])
    if cu_seqlens is None:
        return fn(q, k, v, slopes, scale, initial_state)
    bounds: List[int] = cu_seqlens.tolist()
    outputs, states = [], []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        if start == end:
            shape = (1, q.shape[2], q.shape[3], v.shape[3])
            states.append(q.new_zeros(shape, dtype=compute_dtype(q.dtype)) if h0 is None else h0.to(compute_dtype(q.dtype)))
            continue
        o, state = fn(q[:, start:end], k[:, start:end], v[:, start:end], slopes, scale, h0)
        outputs.append(o)
        states.append(state)
    return torch.cat(outputs, dim=1), torch.cat(states, dim=0)


@torch.library.custom_op("supra::linear_attention", mutates_args=())
def _linear_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    impl: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    o, state = _forward(q, k, v, slopes, scale, initial_state, cu_seqlens, impl)
    # The fake kernel promises contiguous outputs; compiled graphs check the strides.
    return o.contiguous(), state.contiguous()


@_linear_attention_op.register_fake
def _linear_attention_fake(q, k, v, slopes, scale, initial_state, cu_seqlens, impl):
    B, T, H, K = q.shape
    num_states = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(B, T, H, v.shape[-1])
    state = q.new_empty(num_states, H, K, v.shape[-1], dtype=compute_dtype(q.dtype))
    return o, state


@contextlib.contextmanager
def _autograd_inside_custom_op():
    """Re-enables autograd recording, which the custom-op dispatcher turns off inside op bodies.

    The backward op recomputes the forward with autograd; without this, the dispatcher's
    "below autograd" guard would make the recomputed graph record nothing.
    """
    excluded = torch._C._dispatch_tls_local_exclude_set()
    included = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(included, excluded.remove(torch._C.DispatchKey.AutogradFunctionality)):
        yield


@torch.library.custom_op("supra::linear_attention_backward", mutates_args=())
def _linear_attention_backward_op(
    grad_o: torch.Tensor,
    grad_state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    impl: str,
    slopes_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients by recomputing the forward under autograd (cheaper than storing its graph); the
    slopes' (empty unless ``slopes_grad``) last.

    ``impl="triton"`` runs the Triton backward kernels instead (they recompute the chunk states).
    """
    if impl == TRITON:
        if slopes_grad:
            raise ValueError("impl='triton' computes no gradient for the decay slopes; a learned decay "
                             "needs impl='chunk' (or 'recurrent' / 'naive')")
        from supra.ops.linear_attention.triton_chunk import chunk_bwd

        grad_q, grad_k, grad_v, grad_h0 = chunk_bwd(
            grad_o, grad_state, q, k, v, slopes, scale, initial_state, cu_seqlens
        )
        return grad_q, grad_k, grad_v, (q.new_empty(0) if grad_h0 is None else grad_h0), slopes.new_empty(0)
    with _autograd_inside_custom_op(), torch.enable_grad():
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        h0 = None if initial_state is None else initial_state.detach().requires_grad_()
        s = slopes.detach().requires_grad_(slopes_grad)
        o, state = _forward(*inputs, s, scale, h0, cu_seqlens, impl)
        wrt = inputs + ([h0] if h0 is not None else []) + ([s] if slopes_grad else [])
        grads = torch.autograd.grad((o, state), wrt, (grad_o, grad_state), allow_unused=True)
    grads = [x.new_zeros(x.shape) if g is None else g.contiguous() for g, x in zip(grads, wrt)]
    grad_h0 = grads[3] if h0 is not None else q.new_empty(0)
    grad_slopes = grads[-1] if slopes_grad else slopes.new_empty(0)
    return grads[0], grads[1], grads[2], grad_h0, grad_slopes


@_linear_attention_backward_op.register_fake
def _linear_attention_backward_fake(grad_o, grad_state, q, k, v, slopes, scale, initial_state, cu_seqlens, impl, slopes_grad):
    grad_h0 = q.new_empty(0) if initial_state is None else initial_state.new_empty(initial_state.shape)
    grad_slopes = slopes.new_empty(slopes.shape) if slopes_grad else slopes.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), grad_h0, grad_slopes


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, scale, initial_state, cu_seqlens, impl = inputs
    ctx.save_for_backward(q, k, v, slopes, initial_state, cu_seqlens)
    ctx.scale, ctx.impl = scale, impl
    ctx.has_initial_state = initial_state is not None


def _backward(ctx, grad_o, grad_state):
    q, k, v, slopes, initial_state, cu_seqlens = ctx.saved_tensors
    slopes_grad = bool(ctx.needs_input_grad[3])
    grad_q, grad_k, grad_v, grad_h0, grad_slopes = torch.ops.supra.linear_attention_backward(
        grad_o, grad_state, q, k, v, slopes, ctx.scale, initial_state, cu_seqlens, ctx.impl, slopes_grad
    )
    return (grad_q, grad_k, grad_v, grad_slopes if slopes_grad else None, None,
            (grad_h0 if ctx.has_initial_state else None), None, None)


_linear_attention_op.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["linear_attention", "naive_linear_attention", "chunk_linear_attention", "recurrent_linear_attention"]
