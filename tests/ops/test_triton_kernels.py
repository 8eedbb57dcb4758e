"""Tests of the Triton kernels of ``supra.ops.linear_attention`` (``impl="triton"``).

Without a GPU the kernels run on CPU tensors under the Triton interpreter. Triton decides between
compiling and interpreting when a ``triton.jit`` function is defined, its own ``triton.language``
helpers included, so ``TRITON_INTERPRET=1`` must be set before triton is first imported. Inside a
larger pytest run something may already have imported it, and switching the whole process to the
interpreter could change other tests: so, on a machine without CUDA and without the variable,
this module's tests skip and ``test_kernels_in_an_interpreter_process`` reruns this file in a fresh
process with ``TRITON_INTERPRET=1`` (its failures are printed there). To run the cases directly:

    TRITON_INTERPRET=1 python -m pytest tests/ops/test_triton_kernels.py

On a machine with CUDA the cases run in-process on the GPU. Every output and work buffer the
kernels write is allocated NaN-filled, so memory a kernel fails to write shows up as NaN. The
oracle is a float64 loop over tokens written from the math (``_reference.py``, shared with
test_linear_attention.py).
"""

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from supra.ops import linear_attention

# Test folders are not packages (--import-mode=importlib): the shared oracle is imported from here,
# in this process and in the interpreter process, which runs this file by path.
sys.path.insert(0, str(Path(__file__).parent))
import _reference  # noqa: E402
from _reference import alibi_slopes, make_inputs, reference  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETER_PROCESS = not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1"
IN_PROCESS = HAS_TRITON and (ON_GPU or INTERPRETER_PROCESS)

if IN_PROCESS:
    import triton.language as tl

    from supra.ops.linear_attention import triton_chunk, triton_recurrent

    LANGUAGE_INTERPRETED = type(tl.zeros).__name__ == "InterpretedFunction"
    skip_reason = (
        "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on CPU here"
        if INTERPRETER_PROCESS and not (LANGUAGE_INTERPRETED and triton_chunk.INTERPRETED)
        else None
    )
elif HAS_TRITON:
    skip_reason = "no CUDA: these cases run in a separate TRITON_INTERPRET=1 process (test_kernels_in_an_interpreter_process)"
else:
    skip_reason = "triton is not installed"

in_process = pytest.mark.skipif(skip_reason is not None, reason=str(skip_reason))
pytestmark = pytest.mark.slow


def test_kernels_in_an_interpreter_process():
    if IN_PROCESS or not HAS_TRITON:
        pytest.skip("the cases run in this process" if IN_PROCESS else "triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    # There, every case runs; this runner and the compile test (which needs real kernels) do not.
    selection = "not in_an_interpreter_process and not compile_for_hopper"
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", selection]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"interpreter run failed (rc {result.returncode}):\n{output[-20000:]}"
    assert re.search(r"\d+ passed", output) and "skipped" not in output, output[-5000:]


# Relative (rms error / rms of the reference, max error / max |reference|). bf16 tensor-core
# products round their operands (decayed values and queries, intra-chunk scores, per-chunk
# states) to bf16.
TOLERANCES = {
    torch.float32: (1e-5, 5e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1e-2, 3e-2),
}
assert_close = functools.partial(_reference.assert_close, tolerances=TOLERANCES)


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    if skip_reason is None:
        monkeypatch.setattr(triton_chunk, "_empty", _nan_empty)
        monkeypatch.setattr(triton_recurrent, "_empty", _nan_empty)


def run_and_compare(fn, q, k, v, slopes, h0, dtype, scale, cu_seqlens=None):
    """Forward and backward of ``fn(q, k, v, h0) -> (o, state)`` against the float64 reference."""
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    dev_h0 = None if h0 is None else h0.to(DEVICE).requires_grad_()
    o, state = fn(*leaves, dev_h0)
    assert o.dtype == dtype and state.dtype == torch.float32

    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_h0 = None if h0 is None else h0.double().requires_grad_()
    ref_o, ref_state = reference(*ref_leaves, slopes, scale, ref_h0, cu_seqlens)
    assert_close("o", o, ref_o, dtype)
    assert_close("final_state", state, ref_state, dtype)

    grad_o = torch.randn(ref_o.shape).to(dtype)
    grad_state = torch.randn(ref_state.shape)
    wrt = leaves + ([dev_h0] if dev_h0 is not None else [])
    grads = torch.autograd.grad((o, state), wrt, (grad_o.to(DEVICE), grad_state.to(DEVICE)))
    ref_wrt = ref_leaves + ([ref_h0] if ref_h0 is not None else [])
    ref_grads = torch.autograd.grad((ref_o, ref_state), ref_wrt, (grad_o.double(), grad_state.double()))
    for name, g, ref_g, x in zip(("dq", "dk", "dv", "dh0"), grads, ref_grads, wrt):
        assert g.dtype == x.dtype, f"{name} dtype {g.dtype} != input dtype {x.dtype}"
        assert_close(name, g, ref_g, dtype)


def public(slopes, scale=None, cu_seqlens=None):
    def fn(q, k, v, h0):
        cu = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
        return linear_attention(
            q, k, v, slopes.to(DEVICE), scale=scale, initial_state=h0, output_final_state=True,
            cu_seqlens=cu, impl="triton",
        )

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 17, 131])
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
@in_process
def test_public_op_matches_reference(dtype, T, with_h0):
    # T = 1 runs the fused recurrent kernel forward; 17 and 131 (three chunks) the chunked kernels.
    torch.manual_seed(T)
    B, H, K, V = 2, 2, 32, 16
    q, k, v, h0 = make_inputs(B, T, H, K, V, dtype, initial_state=with_h0)
    slopes = alibi_slopes(H)
    run_and_compare(public(slopes), q, k, v, slopes, h0, dtype, K**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [3, 131])
@in_process
def test_grouped_query_heads_read_by_index(dtype, T):
    # GQA 4/2: keys and values stay [B, T, 2, D]; dk and dv sum over each group's query heads.
    torch.manual_seed(40 + T)
    B, H, K, V = 2, 4, 16, 32
    q, k, v, h0 = make_inputs(B, T, H, K, V, dtype, initial_state=True, kv_heads=2)
    slopes = alibi_slopes(H)
    run_and_compare(public(slopes), q, k, v, slopes, h0, dtype, K**-0.5)


@in_process
def test_grouped_query_heads_with_cu_seqlens():
    torch.manual_seed(44)
    lengths = [70, 1, 9]
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v, h0 = make_inputs(1, sum(lengths), 6, 16, 16, torch.float32, initial_state=True, num_states=3, kv_heads=2)
    slopes = alibi_slopes(6)
    run_and_compare(public(slopes, cu_seqlens=cu_seqlens), q, k, v, slopes, h0, torch.float32, 0.25, cu_seqlens)


@pytest.mark.parametrize("T", [1, 17, 67])
@in_process
def test_chunk_function_matches_reference(T):
    # The chunked kernels and their autograd Function directly, also for a single token.
    torch.manual_seed(100 + T)
    B, H, K, V = 1, 2, 16, 16
    q, k, v, h0 = make_inputs(B, T, H, K, V, torch.float32, initial_state=True)
    slopes = torch.tensor([0.05, 1.3])

    def fn(q, k, v, h0):
        return triton_chunk.triton_chunk_linear_attention(q, k, v, slopes.to(DEVICE), 0.3, h0)

    run_and_compare(fn, q, k, v, slopes, h0, torch.float32, 0.3)


@in_process
def test_float16_and_explicit_scale():
    torch.manual_seed(12)
    q, k, v, h0 = make_inputs(1, 70, 2, 16, 32, torch.float16, initial_state=True)
    slopes = alibi_slopes(2)
    run_and_compare(public(slopes, scale=0.5), q, k, v, slopes, h0, torch.float16, 0.5)


@pytest.mark.parametrize("K, V", [(20, 12), (80, 72)], ids=["K20-V12", "K80-V72"])
@in_process
def test_head_dims_that_need_masking(K, V):
    # 20 and 12 fill part of one 16- or 32-wide tile; 80 and 72 span two 64-wide tiles.
    torch.manual_seed(K)
    q, k, v, h0 = make_inputs(1, 70, 1, K, V, torch.float32, initial_state=True)
    slopes = torch.tensor([0.2])
    run_and_compare(public(slopes), q, k, v, slopes, h0, torch.float32, K**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=None", "h0"])
@in_process
def test_cu_seqlens_matches_reference(dtype, with_h0):
    torch.manual_seed(13)
    H, K, V = 2, 16, 16
    # An empty document, a one-token one, and documents that cross chunk boundaries.
    lengths = [5, 0, 70, 1, 60]
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v, h0 = make_inputs(1, sum(lengths), H, K, V, dtype, num_states=len(lengths), initial_state=with_h0)
    slopes = alibi_slopes(H)
    run_and_compare(public(slopes, cu_seqlens=cu_seqlens), q, k, v, slopes, h0, dtype, K**-0.5, cu_seqlens)


# Ways a tensor's values reach the host; the cu_seqlens bookkeeping must use none of them.
HOST_SYNCS = ("item", "tolist", "__int__", "__bool__", "__index__", "cpu", "numpy")


@in_process
def test_cu_seqlens_bookkeeping_does_not_sync(monkeypatch):
    cu_seqlens = torch.tensor([0, 5, 5, 75, 76, 136], device=DEVICE)

    def host_sync(*args, **kwargs):
        raise AssertionError("prepare_chunks read a tensor value on the host")

    with monkeypatch.context() as patch:
        for name in HOST_SYNCS:
            patch.setattr(torch.Tensor, name, host_sync)
        # On a GPU, syncs inside PyTorch's own ops raise too.
        if ON_GPU:
            torch.cuda.set_sync_debug_mode("error")
        try:
            chunks = triton_chunk.prepare_chunks(cu_seqlens, 1, 136)
        finally:
            if ON_GPU:
                torch.cuda.set_sync_debug_mode("default")
    # 136 // 64 + 5 documents bound the 5 real chunks; the two rows past them are padding (-1).
    assert chunks.num_seqs == 5 and chunks.num_rows == 7
    assert chunks.chunk_offsets.tolist() == [0, 1, 1, 3, 4, 5]
    assert chunks.chunk_indices.tolist() == [[0, 0], [2, 0], [2, 1], [3, 0], [4, 0], [-1, 0], [-1, 1]]


@pytest.mark.parametrize("entry", ["op", "function"])
@in_process
def test_cu_seqlens_with_padding_rows_matches_reference(entry):
    # Many short documents (empty and one-token ones among them) and one long one: 8 real chunks,
    # 11 rows (106 // 64 + 10 documents): every chunk kernel also launches programs for 3 padding rows.
    torch.manual_seed(21)
    H, K, V = 2, 16, 16
    lengths = [3, 0, 1, 2, 0, 5, 1, 90, 0, 4]
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    chunks = triton_chunk.prepare_chunks(cu_seqlens, 1, sum(lengths))
    assert chunks.num_rows == 11 and chunks.chunk_offsets[-1].item() == 8
    q, k, v, h0 = make_inputs(1, sum(lengths), H, K, V, torch.float32, initial_state=True, num_states=len(lengths))
    slopes = alibi_slopes(H)
    if entry == "op":
        fn = public(slopes, cu_seqlens=cu_seqlens)
    else:

        def fn(q, k, v, h0):
            return triton_chunk.triton_chunk_linear_attention(
                q, k, v, slopes.to(DEVICE), K**-0.5, h0, cu_seqlens.to(DEVICE)
            )

    run_and_compare(fn, q, k, v, slopes, h0, torch.float32, K**-0.5, cu_seqlens)


@in_process
def test_cu_seqlens_short_input_uses_recurrent_kernel():
    torch.manual_seed(14)
    H, K, V = 2, 16, 16
    cu_seqlens = torch.tensor([0, 3, 3, 5, 6])
    q, k, v, h0 = make_inputs(1, 6, H, K, V, torch.float32, initial_state=True, num_states=4)
    slopes = alibi_slopes(H)
    run_and_compare(public(slopes, cu_seqlens=cu_seqlens), q, k, v, slopes, h0, torch.float32, K**-0.5, cu_seqlens)


@in_process
def test_non_contiguous_inputs():
    torch.manual_seed(19)
    B, T, H, K = 2, 37, 2, 16
    # q, k, v as views of one fused projection in [B, H, T, D] order; the state transposed.
    qkv = torch.randn(B, H, T, 3 * K)
    q, k, v = (x.transpose(1, 2) for x in qkv.split(K, dim=-1))
    h0 = torch.randn(B, H, K, K).transpose(-1, -2)
    assert not q.is_contiguous() and not h0.is_contiguous()
    slopes = alibi_slopes(H)
    run_and_compare(public(slopes), q, k, v, slopes, h0, torch.float32, K**-0.5)


@in_process
def test_large_slopes_stay_finite():
    torch.manual_seed(15)
    # From no decay to decays whose exponents over a chunk underflow far below float32's range.
    slopes = torch.tensor([0.0, 1e-3, 5.0, 80.0])
    q, k, v, h0 = make_inputs(1, 131, 4, 16, 16, torch.float32, initial_state=True)
    run_and_compare(public(slopes), q, k, v, slopes, h0, torch.float32, 0.25)


@in_process
def test_in_place_decode_steps_equal_one_chunked_pass():
    torch.manual_seed(16)
    B, T, H, K, V, P = 2, 80, 2, 32, 16, 70
    q, k, v, _ = make_inputs(B, T, H, K, V, torch.float32)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    slopes = alibi_slopes(H).to(DEVICE)
    o_full, s_full = linear_attention(q, k, v, slopes, output_final_state=True, impl="triton")
    o_pre, state = linear_attention(q[:, :P], k[:, :P], v[:, :P], slopes, output_final_state=True, impl="triton")
    state = state.clone()
    address = state.data_ptr()
    steps = [o_pre]
    for t in range(P, T, 2):
        window = slice(t, t + 2)
        steps.append(triton_recurrent.fused_recurrent_linear_attention_(q[:, window], k[:, window], v[:, window], slopes, state))
    assert state.data_ptr() == address
    torch.testing.assert_close(torch.cat(steps, dim=1), o_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, s_full, rtol=1e-5, atol=1e-5)
    ref_o, ref_s = reference(q.cpu(), k.cpu(), v.cpu(), slopes.cpu(), K**-0.5)
    assert_close("o", o_full, ref_o, torch.float32)
    assert_close("state", state, ref_s, torch.float32)


@in_process
def test_in_place_decode_rejects_a_state_it_cannot_update():
    q, k, v, _ = make_inputs(1, 1, 2, 16, 16, torch.float32)
    slopes = alibi_slopes(2)
    bad = torch.zeros(1, 2, 16, 16, device=DEVICE).transpose(-1, -2)
    with pytest.raises(ValueError, match=r"state must be a contiguous float32 tensor of shape \[1, 2, 16, 16\]"):
        triton_recurrent.fused_recurrent_linear_attention_(q, k, v, slopes.to(DEVICE), bad)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "cu_seqlens"])
@in_process
def test_opcheck(packed):
    torch.manual_seed(17)
    H, K, V = 2, 16, 16
    if packed:
        cu_seqlens = torch.tensor([0, 3, 3, 20], device=DEVICE)
        q, k, v, h0 = make_inputs(1, 20, H, K, V, torch.float32, initial_state=True, num_states=3)
    else:
        cu_seqlens = None
        q, k, v, h0 = make_inputs(2, 20, H, K, V, torch.float32, initial_state=True)
    q, k, v, h0 = (x.to(DEVICE).requires_grad_() for x in (q, k, v, h0))
    slopes = torch.tensor([0.2, 0.9], device=DEVICE)
    torch.library.opcheck(torch.ops.supra.linear_attention.default, (q, k, v, slopes, K**-0.5, h0, cu_seqlens, "triton"))


@in_process
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(18)
    torch._dynamo.reset()
    slopes = alibi_slopes(2).to(DEVICE)

    def fn(q, k, v, h0):
        o, state = linear_attention(q, k, v, slopes, initial_state=h0, output_final_state=True, impl="triton")
        return (o * o).sum() + state.sum()

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    inputs = [x.to(DEVICE).requires_grad_() for x in make_inputs(1, 20, 2, 16, 16, torch.float32, initial_state=True)]
    eager_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = compiled(*inputs)
    eager_loss = fn(*eager_inputs)
    torch.testing.assert_close(loss, eager_loss)
    loss.backward()
    eager_loss.backward()
    for x, y in zip(inputs, eager_inputs):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU gate of impl='triton'")
@in_process
def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v, _ = make_inputs(1, 4, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=r"Triton needs CUDA tensors, or TRITON_INTERPRET=1"):
        linear_attention(q, k, v, alibi_slopes(2), impl="triton")
    # The CPU default stays on the PyTorch paths.
    from supra.ops.linear_attention import _pick_impl

    assert _pick_impl(q, None) == "recurrent" and _pick_impl(torch.zeros(1, 64, 1, 1), None) == "chunk"


@in_process
def test_float64_inputs_raise():
    q, k, v, _ = make_inputs(1, 4, 2, 16, 16, torch.float64)
    with pytest.raises(ValueError, match=r"impl='triton' takes float32, bfloat16 or float16 inputs; got torch.float64"):
        linear_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), alibi_slopes(2).to(DEVICE), impl="triton")


@in_process
def test_single_config_under_interpreter():
    # Autotuning with several configs cannot run without a GPU.
    if triton_chunk.INTERPRETED:
        assert len(triton_chunk._configs()) == 1
    else:
        assert len(triton_chunk._configs()) > 1


def _signature(fn, pointers, constexprs):
    scalars = {"scale": "fp32", "T": "i32"}
    return {
        name: "constexpr" if name in constexprs else pointers.get(name) or scalars.get(name) or "*i32"
        for name in fn.arg_names
    }


@pytest.mark.skipif(INTERPRETER_PROCESS or not HAS_TRITON, reason="compiles real (not interpreted) kernels")
def test_kernels_compile_for_hopper():
    # Without a GPU, compile every kernel to a Hopper (sm_90) cubin with the ptxas that triton ships:
    # catches what the interpreter accepts but the compiler rejects (dot shapes, types, layouts).
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from supra.ops.linear_attention import triton_chunk as chunk, triton_recurrent as recurrent

    # bf16, the training dtype; float32 and float16 inputs differ only in tile dtypes.
    data = {name: "*bf16" for name in ("q", "k", "v", "o", "do", "dq", "dk", "dv", "h", "dh")}
    pointers = {**data, "h0": "*fp32", "ht": "*fp32", "dht": "*fp32", "dh0": "*fp32", "slopes": "*fp32"}
    # GQA 4/2 where a kernel reads keys or values (HKV); the others take no HKV.
    common = dict(H=4, HKV=2, K=128, V=128, BT=64, BK=64, BV=64, PRECISION="tf32", UPCAST=False)
    kernels = [
        (chunk._chunk_fwd_h_kernel.fn, dict(common, USE_INITIAL_STATE=True)),
        (chunk._chunk_fwd_o_kernel.fn, common),
        (chunk._chunk_bwd_dh_kernel.fn, dict(common, USE_FINAL_STATE_GRADIENT=True, USE_INITIAL_STATE=True)),
        (chunk._chunk_bwd_dv_kernel.fn, common),
        (chunk._chunk_bwd_dqk_kernel.fn, common),
        (recurrent._fused_recurrent_fwd_kernel, dict(H=4, HKV=2, K=128, V=128, BK=128, BV=64, USE_INITIAL_STATE=True)),
    ]
    for fn, constexprs in kernels:
        for varlen in (False, True):
            values = {name: value for name, value in dict(constexprs, IS_VARLEN=varlen).items() if name in fn.arg_names}
            source = ASTSource(
                fn=fn, signature=_signature(fn, pointers, values),
                constexprs={(fn.arg_names.index(name),): value for name, value in values.items()},
            )
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
            assert compiled.asm["cubin"], f"{fn.__name__} produced no cubin"
