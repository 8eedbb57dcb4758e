"""Tests of ``supra.ops.linear_attention`` against an independent float64 recurrent loop.

The oracle (``reference`` in ``_reference.py``) is written from the math, one token at a time in
float64, and shares no code with the library. Every implementation is compared with it in output,
final state and the gradients of q, k, v and the initial state.
"""

import functools
import math
import sys
from pathlib import Path

import pytest
import torch

from supra.ops import linear_attention
from supra.ops.linear_attention import IMPLEMENTATIONS
from supra.ops.linear_attention.naive import naive_linear_attention
from supra.ops.linear_attention.fused_recurrent import recurrent_step_

# Test folders are not packages (--import-mode=importlib): the shared oracle is imported from here.
sys.path.insert(0, str(Path(__file__).parent))
import _reference  # noqa: E402
from _reference import alibi_slopes, make_inputs, reference  # noqa: E402

IMPLS = sorted(IMPLEMENTATIONS)

# Relative tolerances on (rms error / rms of the reference, max error / max |reference|).
# bf16 outputs and gradients are rounded to 8 mantissa bits (relative step 2**-8).
TOLERANCES = {
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (5e-3, 1e-2),
    torch.float64: (1e-12, 1e-11),
}
assert_close = functools.partial(_reference.assert_close, tolerances=TOLERANCES)


def check_against_reference(q, k, v, slopes, h0, dtype, impl, scale=None, cu_seqlens=None):
    """Forward and backward of ``impl`` and of the float64 reference on the same (rounded) inputs."""
    K = q.shape[-1]
    o, state = linear_attention(
        q, k, v, slopes, scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, impl=impl
    )
    assert o.dtype == dtype
    assert state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_h0 = None if h0 is None else h0.detach().double().requires_grad_()
    ref_scale = K**-0.5 if scale is None else scale
    ref_o, ref_state = reference(*ref_leaves, slopes, ref_scale, ref_h0, cu_seqlens)
    assert_close("o", o, ref_o, dtype)
    assert_close("final_state", state, ref_state, dtype if dtype == torch.float64 else torch.float32)

    grad_o = torch.randn_like(ref_o).to(dtype)
    grad_state = torch.randn_like(ref_state).to(state.dtype)
    wrt = [q, k, v] + ([h0] if h0 is not None else [])
    grads = torch.autograd.grad((o, state), wrt, (grad_o, grad_state))
    ref_wrt = ref_leaves + ([ref_h0] if ref_h0 is not None else [])
    ref_grads = torch.autograd.grad((ref_o, ref_state), ref_wrt, (grad_o.double(), grad_state.double()))
    for name, g, ref_g, x in zip(("dq", "dk", "dv", "dh0"), grads, ref_grads, wrt):
        assert g.dtype == x.dtype, f"{name} dtype {g.dtype} != input dtype {x.dtype}"
        # dh0 stays float32 under bf16 inputs: it is held to float32 accuracy.
        assert_close(name, g, ref_g, x.dtype)


def test_reference_matches_hand_computation():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 3), torch.randn(1, 2, 1, 2)
    slopes, scale = torch.tensor([0.7]), 0.5
    gamma = math.exp(-0.7)
    s1 = scale * torch.outer(k[0, 0, 0], v[0, 0, 0])
    s2 = gamma * s1 + scale * torch.outer(k[0, 1, 0], v[0, 1, 0])
    o, state = reference(q, k, v, slopes, scale)
    torch.testing.assert_close(o[0, 0, 0].float(), q[0, 0, 0] @ s1)
    torch.testing.assert_close(o[0, 1, 0].float(), q[0, 1, 0] @ s2)
    torch.testing.assert_close(state[0, 0].float(), s2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 63, 128, 200])
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
def test_matches_reference(impl, dtype, T, with_h0):
    torch.manual_seed(T)
    B, H, K, V = 2, 3, 16, 8
    q, k, v, h0 = make_inputs(B, T, H, K, V, dtype, initial_state=with_h0, requires_grad=True)
    check_against_reference(q, k, v, alibi_slopes(H), h0, dtype, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
def test_cu_seqlens_matches_reference(impl, dtype, with_h0):
    torch.manual_seed(1)
    H, K, V = 3, 16, 8
    # An empty document, a one-token one, and documents that cross chunk boundaries.
    lengths = [5, 0, 70, 1, 60]
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v, h0 = make_inputs(
        1, sum(lengths), H, K, V, dtype, initial_state=with_h0, num_states=len(lengths), requires_grad=True
    )
    check_against_reference(q, k, v, alibi_slopes(H), h0, dtype, impl, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("impl", IMPLS)
def test_cu_seqlens_equals_separate_calls(impl):
    torch.manual_seed(2)
    H, K, V = 3, 16, 8
    cu_seqlens = torch.tensor([0, 7, 7, 40])
    q, k, v, h0 = make_inputs(1, 40, H, K, V, torch.float32, initial_state=True, num_states=3)
    slopes = alibi_slopes(H)
    o, states = linear_attention(
        q, k, v, slopes, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, impl=impl
    )
    assert states.shape == (3, H, K, V)
    # The empty document hands its initial state through unchanged.
    torch.testing.assert_close(states[1], h0[1])
    for n, (a, b) in enumerate([(0, 7), (7, 40)]):
        doc = 0 if n == 0 else 2
        o_doc, s_doc = linear_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], slopes, initial_state=h0[doc : doc + 1], output_final_state=True, impl=impl
        )
        torch.testing.assert_close(o[:, a:b], o_doc)
        torch.testing.assert_close(states[doc : doc + 1], s_doc)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    torch.manual_seed(3)
    slopes = torch.tensor([0.0, 0.3])
    q, k, v, h0 = make_inputs(1, 5, 2, 3, 2, torch.float64, initial_state=True, requires_grad=True)

    def fn(q, k, v, h0):
        return linear_attention(q, k, v, slopes, initial_state=h0, output_final_state=True, impl=impl)

    assert torch.autograd.gradcheck(fn, (q, k, v, h0))
    cu_seqlens = torch.tensor([0, 2, 2, 5])
    h0 = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)

    def packed(q, k, v, h0):
        return linear_attention(
            q, k, v, slopes, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens, impl=impl
        )

    assert torch.autograd.gradcheck(packed, (q, k, v, h0))


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_inputs_keep_float64(impl):
    torch.manual_seed(4)
    q, k, v, h0 = make_inputs(2, 33, 3, 16, 8, torch.float64, initial_state=True, requires_grad=True)
    check_against_reference(q, k, v, alibi_slopes(3), h0, torch.float64, impl)


@pytest.mark.parametrize("impl", IMPLS + [None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_output_and_state_dtypes(impl, dtype):
    q, k, v, _ = make_inputs(1, 9, 2, 8, 4, dtype)
    o, state = linear_attention(q, k, v, torch.ones(2), output_final_state=True, impl=impl)
    assert o.dtype == dtype and o.shape == (1, 9, 2, 4)
    assert state.dtype == torch.float32 and state.shape == (1, 2, 8, 4)
    o, state = linear_attention(q, k, v, torch.ones(2), impl=impl)
    assert state is None


@pytest.mark.parametrize("impl", IMPLS + [None])
def test_default_scale_is_inverse_sqrt_key_dim(impl):
    torch.manual_seed(5)
    K = 16
    q, k, v, _ = make_inputs(1, 20, 3, K, 8, torch.float32)
    slopes = alibi_slopes(3)
    o_default, _ = linear_attention(q, k, v, slopes, impl=impl)
    o_explicit, _ = linear_attention(q, k, v, slopes, scale=K**-0.5, impl=impl)
    torch.testing.assert_close(o_default, o_explicit)
    assert_close("o", o_default, reference(q, k, v, slopes, K**-0.5)[0], torch.float32)
    o_one, _ = linear_attention(q, k, v, slopes, scale=1.0, impl=impl)
    assert_close("o(scale=1)", o_one, reference(q, k, v, slopes, 1.0)[0], torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_slopes_is_plain_causal_linear_attention(impl):
    torch.manual_seed(6)
    q, k, v, h0 = make_inputs(1, 100, 3, 16, 8, torch.float32, initial_state=True, requires_grad=True)
    slopes = torch.zeros(3)
    check_against_reference(q, k, v, slopes, h0, torch.float32, impl)
    # Without decay the output is the running sum of (q_t . k_j) v_j: a masked, unnormalized attention.
    o, _ = linear_attention(q, k, v, slopes, scale=1.0, impl=impl)
    scores = torch.einsum("bthk,bshk->bhts", q, k).tril()
    torch.testing.assert_close(o, torch.einsum("bhts,bshv->bthv", scores, v), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_slopes_get_the_gradient_of_the_naive_reference_with_state(impl):
    # A learned decay (components/learned_decay.py) trains its slopes through this gradient.
    q, k, v, _ = make_inputs(1, 70, 2, 4, 4, torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    slopes = torch.tensor([0.1, 0.5], dtype=torch.float64, requires_grad=True)
    o, state = linear_attention(q, k, v, slopes, initial_state=h0, output_final_state=True, impl=impl)
    (o.square().sum() + state.sum()).backward()
    got = slopes.grad.clone()
    slopes.grad = None
    ref_o, ref_state = naive_linear_attention(q, k, v, slopes, q.shape[-1] ** -0.5, h0)
    (ref_o.square().sum() + ref_state.sum()).backward()
    torch.testing.assert_close(got, slopes.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_constant_slopes_get_no_gradient(impl):
    q, k, v, _ = make_inputs(1, 6, 2, 4, 4, torch.float32, requires_grad=True)
    slopes = torch.tensor([0.1, 0.5])
    o, _ = linear_attention(q, k, v, slopes, impl=impl)
    o.sum().backward()
    assert slopes.grad is None
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    torch.manual_seed(7)
    B, T, H, K, V = 2, 37, 3, 8, 8
    # q, k, v as views of one fused projection in [B, H, T, D] order, as modules produce them.
    qkv = torch.randn(B, H, T, 3 * K)
    q, k, v = (x.transpose(1, 2) for x in qkv.split(K, dim=-1))
    assert not q.is_contiguous()
    h0 = torch.randn(B, H, V, K).transpose(-1, -2)
    slopes = alibi_slopes(H)
    o, s = linear_attention(q, k, v, slopes, initial_state=h0, output_final_state=True, impl=impl)
    ref_o, ref_s = reference(q, k, v, slopes, K**-0.5, h0)
    assert_close("o", o, ref_o, torch.float32)
    assert_close("final_state", s, ref_s, torch.float32)


@pytest.mark.parametrize("prefill_impl", ["chunk", "naive", None])
def test_prefill_then_step_by_step_decode_equals_one_pass(prefill_impl):
    torch.manual_seed(8)
    B, T, H, K, V, P = 2, 50, 3, 16, 8, 37
    q, k, v, _ = make_inputs(B, T, H, K, V, torch.float32)
    slopes = alibi_slopes(H)
    o_full, s_full = linear_attention(q, k, v, slopes, output_final_state=True, impl="chunk")
    o_pre, state = linear_attention(q[:, :P], k[:, :P], v[:, :P], slopes, output_final_state=True, impl=prefill_impl)
    steps = [o_pre]
    for t in range(P, T):
        o_t, state = linear_attention(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], slopes, initial_state=state, output_final_state=True
        )
        steps.append(o_t)
    torch.testing.assert_close(torch.cat(steps, dim=1), o_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_grouped_keys_and_values_match_repeated_ones(impl):
    """GQA: k, v [B, T, H_kv, D] with query head h reading h // (H / H_kv); the reference gets the
    heads repeated explicitly, and dk / dv must come back summed over each group."""
    torch.manual_seed(21)
    B, T, H, H_kv, K, V = 2, 40, 6, 2, 8, 4
    q = torch.randn(B, T, H, K, requires_grad=True)
    k, v = (torch.randn(B, T, H_kv, d, requires_grad=True) for d in (K, V))
    h0 = torch.randn(B, H, K, V, requires_grad=True)
    slopes = alibi_slopes(H)
    o, state = linear_attention(q, k, v, slopes, initial_state=h0, output_final_state=True, impl=impl)
    repeated = [x.detach().double().repeat_interleave(H // H_kv, dim=2) for x in (k, v)]
    ref_o, ref_state = reference(q.detach().double(), *repeated, slopes, K**-0.5, h0.detach().double())
    assert_close("o", o, ref_o, torch.float32)
    assert_close("state", state, ref_state, torch.float32)

    grad_o = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), grad_o)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_k, ref_v = (x.repeat_interleave(H // H_kv, dim=2) for x in ref_leaves[1:])
    ref_o, _ = reference(ref_leaves[0], ref_k, ref_v, slopes, K**-0.5, h0.detach().double())
    for name, g, ref_g in zip(("dq", "dk", "dv"), (dq, dk, dv), torch.autograd.grad(ref_o, ref_leaves, grad_o.double())):
        assert g.shape == ref_g.shape
        assert_close(name, g, ref_g, torch.float32)


@pytest.mark.parametrize("kv_heads", [6, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_decode_step_matches_reference(dtype, kv_heads):
    torch.manual_seed(9)
    B, T, H, K, V = 2, 6, 6, 16, 8
    q, _, _, h0 = make_inputs(B, T, H, K, V, dtype, initial_state=True)
    k, v = (torch.randn(B, T, kv_heads, d).to(dtype) for d in (K, V))
    slopes = alibi_slopes(H)
    state = h0.clone()
    outputs = [
        recurrent_step_(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], torch.exp(-slopes), 0.3, state)
        for t in range(T)
    ]
    repeated = [x.repeat_interleave(H // kv_heads, dim=2) for x in (k, v)]
    ref_o, ref_state = reference(q, *repeated, slopes, 0.3, h0)
    assert outputs[0].shape == (B, 1, H, V) and outputs[0].dtype == dtype
    assert_close("o", torch.cat(outputs, dim=1), ref_o, dtype)
    # The state was rewritten where it lies, in float32.
    assert state.dtype == torch.float32
    assert_close("state", state, ref_state, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_compiled_in_place_decode_step_matches_reference(kv_heads):
    # Under torch.compile the step takes its elementwise form: it must agree with the reference too.
    torch.manual_seed(10)
    B, T, H, K, V = 2, 4, 4, 16, 8
    q, _, _, h0 = make_inputs(B, T, H, K, V, torch.float32, initial_state=True)
    k, v = (torch.randn(B, T, kv_heads, d) for d in (K, V))
    slopes = alibi_slopes(H)
    step = torch.compile(recurrent_step_, fullgraph=True, dynamic=False)
    state = h0.clone()
    outputs = [step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], torch.exp(-slopes), 0.3, state) for t in range(T)]
    repeated = [x.repeat_interleave(H // kv_heads, dim=2) for x in (k, v)]
    ref_o, ref_state = reference(q, *repeated, slopes, 0.3, h0)
    assert_close("o", torch.cat(outputs, dim=1), ref_o, torch.float32)
    assert_close("state", state, ref_state, torch.float32)


def test_long_sequence_with_large_slopes_stays_finite():
    torch.manual_seed(9)
    B, T, H, K, V = 1, 4096, 4, 16, 16
    # From no decay to decays whose exponents over T underflow far below float32's range.
    slopes = torch.tensor([0.0, 1e-3, 5.0, 80.0])
    q, k, v, _ = make_inputs(B, T, H, K, V, torch.float32, requires_grad=True)
    o_chunk, s_chunk = linear_attention(q, k, v, slopes, output_final_state=True, impl="chunk")
    (o_chunk.sum() + s_chunk.sum()).backward()
    for name, x in [("o", o_chunk), ("state", s_chunk), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)]:
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
    with torch.no_grad():
        o_rec, s_rec = linear_attention(q, k, v, slopes, output_final_state=True, impl="recurrent")
        ref_o, ref_s = reference(q, k, v, slopes, K**-0.5)
    assert_close("o chunk vs recurrent", o_chunk.detach(), o_rec, torch.float32)
    assert_close("state chunk vs recurrent", s_chunk.detach(), s_rec, torch.float32)
    assert_close("o chunk vs reference", o_chunk.detach(), ref_o, torch.float32)
    assert_close("state chunk vs reference", s_chunk.detach(), ref_s, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "cu_seqlens"])
def test_opcheck(impl, packed):
    torch.manual_seed(10)
    H, K, V = 2, 4, 3
    if packed:
        cu_seqlens = torch.tensor([0, 3, 3, 9])
        q, k, v, h0 = make_inputs(1, 9, H, K, V, torch.float32, initial_state=True, num_states=3, requires_grad=True)
    else:
        cu_seqlens = None
        q, k, v, h0 = make_inputs(2, 9, H, K, V, torch.float32, initial_state=True, requires_grad=True)
    args = (q, k, v, torch.tensor([0.2, 0.9]), K**-0.5, h0, cu_seqlens, impl)
    torch.library.opcheck(torch.ops.supra.linear_attention.default, args)
    no_state = (q, k, v, torch.tensor([0.2, 0.9]), K**-0.5, None, cu_seqlens, impl)
    torch.library.opcheck(torch.ops.supra.linear_attention.default, no_state)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "cu_seqlens"])
def test_torch_compile_fullgraph_matches_eager(packed):
    torch.manual_seed(11)
    torch._dynamo.reset()
    H = 3
    slopes = alibi_slopes(H)
    cu_seqlens = torch.tensor([0, 15, 15, 40]) if packed else None

    def fn(q, k, v, h0):
        o, state = linear_attention(q, k, v, slopes, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
        return (o * o).sum() + state.sum()

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    B, N = (1, 3) if packed else (2, None)
    inputs = make_inputs(B, 40, H, 8, 4, torch.float32, initial_state=True, num_states=N, requires_grad=True)
    eager_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = compiled(*inputs)
    eager_loss = fn(*eager_inputs)
    torch.testing.assert_close(loss, eager_loss)
    loss.backward()
    eager_loss.backward()
    for x, y in zip(inputs, eager_inputs):
        torch.testing.assert_close(x.grad, y.grad)


def _small(B=1, T=4, H=2, K=4, V=3):
    q, k, v, _ = make_inputs(B, T, H, K, V, torch.float32)
    return q, k, v, torch.full((H,), 0.5)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q, k, v, s: (q, k[..., :3], v, s), r"k \(1, 4, 2, 3\) must be \[B, T, H_kv, K\] for q \(1, 4, 2, 4\)"),
        (lambda q, k, v, s: (q, k[:, :3], v, s), r"must be \[B, T, H_kv, K\] for q"),
        (lambda q, k, v, s: (q, torch.cat([k] * 2, 2)[:, :, :3], torch.cat([v] * 2, 2)[:, :, :3], s),
         r"with H_kv dividing H"),
        (lambda q, k, v, s: (q, k, torch.cat([v, v]), s), r"v \(2, 4, 2, 3\) must share batch, time and heads"),
        (lambda q, k, v, s: (q, k, v[:, :3], s), r"v \(1, 3, 2, 3\) must share batch, time and heads"),
        (lambda q, k, v, s: (q, k, v[:, :, :1], s), r"v \(1, 4, 1, 3\) must share batch, time and heads"),
        (lambda q, k, v, s: (q[0], k[0], v[0], s), r"q, k, v must be \[B, T, H, D\]"),
        (lambda q, k, v, s: (q, k, v.double(), s), r"q, k, v must share one floating dtype"),
        (lambda q, k, v, s: (q, k, v, torch.ones(3)), r"slopes must have shape \[H\] = \[2\].*got \(3,\)"),
        (lambda q, k, v, s: (q, k, v, torch.ones(1, 2)), r"slopes must have shape \[H\] = \[2\].*got \(1, 2\)"),
        (lambda q, k, v, s: (q, k, v, torch.tensor([0.5, -0.1])), r"slopes must be finite and >= 0"),
        (lambda q, k, v, s: (q, k, v, torch.tensor([float("nan"), 0.5])), r"slopes must be finite and >= 0"),
        (lambda q, k, v, s: (q, k, v, torch.tensor([0.5, float("inf")])), r"slopes must be finite and >= 0"),
        (lambda q, k, v, s: (q[:, :0], k[:, :0], v[:, :0], s), r"no tokens \(T == 0\)"),
    ],
    ids=[
        "k-head-dim",
        "k-time",
        "kv-heads-not-dividing",
        "v-batch",
        "v-time",
        "v-heads",
        "not-4d",
        "dtype-mismatch",
        "slopes-length",
        "slopes-2d",
        "slopes-negative",
        "slopes-nan",
        "slopes-inf",
        "empty-T",
    ],
)
def test_invalid_inputs_raise(change, match):
    q, k, v, s = change(*_small())
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, s)


@pytest.mark.parametrize(
    "B, cu_seqlens, match",
    [
        (2, [0, 2, 4], r"batch of one \(B == 1\); got B = 2"),
        (1, [1, 2, 4], r"cu_seqlens must rise from 0 to T = 4 without decreasing; got \[1, 2, 4\]"),
        (1, [0, 2, 3], r"cu_seqlens must rise from 0 to T = 4 without decreasing; got \[0, 2, 3\]"),
        (1, [0, 2, 5], r"cu_seqlens must rise from 0 to T = 4 without decreasing; got \[0, 2, 5\]"),
        (1, [0, 3, 1, 4], r"cu_seqlens must rise from 0 to T = 4 without decreasing; got \[0, 3, 1, 4\]"),
        (1, [4], r"1-D integer tensor \[N \+ 1\]"),
        (1, [0.0, 4.0], r"1-D integer tensor \[N \+ 1\]"),
    ],
    ids=["batch-2", "not-from-0", "short-of-T", "past-T", "decreasing", "one-boundary", "float"],
)
def test_invalid_cu_seqlens_raise(B, cu_seqlens, match):
    q, k, v, s = _small(B=B)
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, s, cu_seqlens=torch.tensor(cu_seqlens))


@pytest.mark.parametrize(
    "B, shape, cu_seqlens, match",
    [
        (2, (1, 2, 4, 3), None, r"initial_state must have shape \[B, H, K, V\] = \[2, 2, 4, 3\]; got \[1, 2, 4, 3\]"),
        (1, (1, 2, 3, 4), None, r"initial_state must have shape \[B, H, K, V\] = \[1, 2, 4, 3\]; got \[1, 2, 3, 4\]"),
        (1, (2, 4, 3), None, r"initial_state must have shape \[B, H, K, V\]"),
        (1, (1, 2, 4, 3), [0, 1, 4], r"initial_state must have shape \[N, H, K, V\] = \[2, 2, 4, 3\]; got \[1, 2, 4, 3\]"),
    ],
    ids=["batch", "k-v-swapped", "3d", "per-document"],
)
def test_invalid_initial_state_raises(B, shape, cu_seqlens, match):
    q, k, v, s = _small(B=B)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, s, initial_state=torch.zeros(shape), cu_seqlens=cu)


def test_unknown_impl_raises():
    q, k, v, s = _small()
    with pytest.raises(ValueError, match=r"impl='triton' is not a linear attention implementation; choose one of"):
        linear_attention(q, k, v, s, impl="triton")
