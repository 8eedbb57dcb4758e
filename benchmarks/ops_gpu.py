"""GPU speed and correctness of supra's Triton linear attention kernels (``impl="triton"``).

One script for a lent GPU. It prints, in order:

1. correctness: ``impl="triton"`` against the naive op (float32 math on the same rounded inputs),
   in outputs, final states and the gradients of q, k, v and the initial state, dense and with
   ``cu_seqlens``, plus the fused recurrent decode kernel (in place) and, when installed, fla's
   ``chunk_simple_gla`` (g_gamma = -slopes) on the same inputs;
2. forward and forward+backward times at B*H = 256 (B = 256 / H), T = 2k .. 32k, K = V = 128, bf16:
   supra through the public op, supra's autograd Function without the op's checks and dispatch,
   fla's ``chunk_simple_gla`` (skipped if fla is not installed), PyTorch SDPA with the flash backend
   (causal softmax attention, the cost linear attention replaces), and the naive op where it fits in
   memory; median milliseconds, TFLOP/s and the ratios fla/supra and SDPA/supra (above 1: supra is
   faster);
3. the fused recurrent decode kernel: one token through every head, its effective bandwidth (state
   read and written, plus q, k, v, o) against a device-to-device copy of the same bytes, in place
   and through the op; then short inputs, recurrent kernel vs chunked kernels, which is what
   ``TRITON_RECURRENT_MAX_TOKENS`` in ``supra/ops/linear_attention/__init__.py`` encodes.

FLOP counts: supra and fla run the same chunked algorithm (chunk C = 64); per token and head the
forward costs 4KV + 2C(K + V) and the backward (states recomputed) 10KV + 2C(3K + 2V). Causal
softmax attention's forward costs T^2 (K + V) per head (QK^T and PV over the lower triangle) and
its backward 2.5 times that. The naive op's TFLOP/s are not printed.

    python benchmarks/ops_gpu.py                       # full run (needs a CUDA GPU)
    python benchmarks/ops_gpu.py --quick               # T = 2k and 8k only, fewer repetitions
    python benchmarks/ops_gpu.py --plan                # print the configurations and FLOP counts; no GPU needed
    python benchmarks/ops_gpu.py --out benchmarks/results/ops_gpu.txt

``--device cpu`` with ``TRITON_INTERPRET=1`` and tiny shapes (say ``--heads 2 --batch-heads 2
--head-dim 16 --lengths 80 --decode-batch 1 --short-lengths 1 2``) walks every section on CPU under
the Triton interpreter, timing with the wall clock and skipping fla: a check of the script itself,
not a measurement.
"""

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from supra.ops import linear_attention
from supra.ops.linear_attention import TRITON_RECURRENT_MAX_TOKENS

CHUNK = 64
NAIVE_MATRICES = 6
LINES: List[str] = []
DEVICE = "cuda"


def emit(line: str = "") -> None:
    LINES.append(line)
    print(line, flush=True)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=32, help="H; B = --batch-heads / H (default 32)")
    parser.add_argument("--batch-heads", type=int, default=256, help="B * H (default 256)")
    parser.add_argument("--head-dim", type=int, default=128, help="K = V (default 128)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--reps", type=int, default=20, help="most timed repetitions per cell")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="stop repeating a cell after this long")
    parser.add_argument("--memory-budget-gb", type=float, default=60.0, help="skip naive cells estimated above this")
    parser.add_argument("--decode-batch", type=int, default=64, help="B of the decode table (H from --heads)")
    parser.add_argument("--short-lengths", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--quick", action="store_true", help="T = 2k and 8k, at most 5 reps or 1 s per cell")
    parser.add_argument("--plan", action="store_true", help="print configurations and FLOP counts, time nothing")
    parser.add_argument("--out", default=None, help="also write the printed tables to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (see above)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths = [T for T in args.lengths if T in (2048, 8192)] or args.lengths[:1]
        args.reps, args.max_seconds = min(args.reps, 5), min(args.max_seconds, 1.0)
    if args.batch_heads % args.heads:
        parser.error(f"--batch-heads {args.batch_heads} must be a multiple of --heads {args.heads}")
    return args


def linear_flops(B: int, T: int, H: int, K: int, V: int, mode: str) -> float:
    """FLOPs of the chunked algorithm (chunk C = 64) that supra's and fla's kernels run."""
    fwd = 4 * K * V + 2 * CHUNK * (K + V)
    bwd = 10 * K * V + 2 * CHUNK * (3 * K + 2 * V)
    return B * H * T * (fwd + (bwd if mode == "fwd+bwd" else 0))


def causal_attention_flops(B: int, T: int, H: int, K: int, V: int, mode: str) -> float:
    """FLOPs of causal softmax attention (QK^T and PV over the lower triangle); backward 2.5x forward."""
    fwd = 2 * B * H * T * T * (K + V) / 2
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def naive_bytes(B: int, T: int, H: int) -> float:
    return NAIVE_MATRICES * B * H * T * T * 4


def decode_bytes(B: int, H: int, K: int, V: int, T: int, itemsize: int) -> float:
    """Bytes a fused recurrent step must move: the float32 state read and written, and q, k, v, o."""
    return B * H * (2 * K * V * 4 + T * (2 * K + 2 * V) * itemsize)


def alibi_slopes(H: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)])


def ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.2f}"


def plan(args: argparse.Namespace) -> None:
    H, K = args.heads, args.head_dim
    B = args.batch_heads // H
    emit(f"Plan: B={B} H={H} K=V={K} bf16; TFLOP counts per call")
    emit(f"{'T':>6} {'mode':<8} {'linear':>10} {'causal sdpa':>12} {'naive GiB':>10}")
    for T in args.lengths:
        for mode in ("fwd", "fwd+bwd"):
            naive = naive_bytes(B, T, H) / 2**30
            note = f"{naive:.0f}" + ("" if naive <= args.memory_budget_gb else " (skip)")
            emit(
                f"{T:>6} {mode:<8} {linear_flops(B, T, H, K, K, mode) / 1e12:>10.3f} "
                f"{causal_attention_flops(B, T, H, K, K, mode) / 1e12:>12.3f} {note:>10}"
            )
    state_mib = args.decode_batch * H * K * K * 4 / 2**20
    emit(f"decode: B={args.decode_batch} H={H}, state {state_mib:.0f} MiB, "
         f"{decode_bytes(args.decode_batch, H, K, K, 1, 2) / 2**20:.0f} MiB moved per token")


def median_ms(run: Callable[[], None], reps: int, max_seconds: float, warmup: int = 2) -> float:
    """Median milliseconds of ``run`` by CUDA events, after ``warmup`` calls (autotuning happens there)."""
    for _ in range(warmup):
        run()
    if DEVICE != "cuda":
        reps = 1
    else:
        torch.cuda.synchronize()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < max_seconds):
        if DEVICE != "cuda":
            begin_s = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - begin_s))
            continue
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def try_import_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as error:  # fla is optional: any import failure means "not available".
        return None, f"{type(error).__name__}: {error}"
    return chunk_simple_gla, None


def relative_errors(actual: torch.Tensor, expected: torch.Tensor) -> Tuple[float, float]:
    actual, expected = actual.double(), expected.double()
    diff = actual - expected
    rms = (diff.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp(min=1e-30)).item()
    worst = (diff.abs().max() / expected.abs().max().clamp(min=1e-30)).item()
    return rms, worst


def correctness(args: argparse.Namespace, fla) -> bool:
    """impl="triton" vs the naive op on moderate shapes; returns whether every check passed."""
    emit("\n== correctness: impl='triton' vs naive (float32 math on the same inputs) ==")
    tolerances = {torch.bfloat16: (1e-2, 3e-2), torch.float32: (1e-4, 1e-3)}
    ok = True
    H, K = args.heads if DEVICE != "cuda" else 4, args.head_dim
    slopes = alibi_slopes(H).to(DEVICE)
    # Off the GPU (a check of this script under the interpreter) the lengths shrink tenfold.
    shrink = 1 if DEVICE == "cuda" else 10
    cases = [
        ("dense", torch.bfloat16, 2, 1000 // shrink, None),
        ("dense", torch.float32, 2, 1000 // shrink, None),
        ("packed", torch.bfloat16, 1, 1300 // shrink, torch.tensor([0, 100, 100, 165, 1300]) // shrink),
    ]
    emit(f"{'case':<8} {'dtype':<9} {'T':>5} " + " ".join(f"{n + ' rms/max':>20}" for n in ("o", "state", "dq", "dk", "dv", "dh0")))
    for name, dtype, B, T, cu in cases:
        torch.manual_seed(args.seed)
        N = B if cu is None else cu.numel() - 1
        cu = None if cu is None else cu.to(DEVICE)
        q, k, v = (torch.randn(B, T, H, K, device=DEVICE).to(dtype).requires_grad_() for _ in range(3))
        h0 = torch.randn(N, H, K, K, device=DEVICE, requires_grad=True)
        o, s = linear_attention(q, k, v, slopes, initial_state=h0, output_final_state=True, cu_seqlens=cu, impl="triton")
        do, ds = torch.randn_like(o), torch.randn_like(s)
        grads = torch.autograd.grad((o, s), (q, k, v, h0), (do, ds))
        ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref_h0 = h0.detach().clone().requires_grad_()
        ro, rs = linear_attention(*ref_in, slopes, initial_state=ref_h0, output_final_state=True, cu_seqlens=cu, impl="naive")
        ref_grads = torch.autograd.grad((ro, rs), (*ref_in, ref_h0), (do.float(), ds))
        cells = []
        for actual, expected in zip((o, s, *grads), (ro, rs, *ref_grads)):
            rms, worst = relative_errors(actual, expected)
            good = rms <= tolerances[dtype][0] and worst <= tolerances[dtype][1] and bool(torch.isfinite(actual).all())
            ok &= good
            cells.append(f"{rms:.1e}/{worst:.1e}{'' if good else ' FAIL':>5}")
        emit(f"{name:<8} {str(dtype).replace('torch.', ''):<9} {T:>5} " + " ".join(f"{c:>20}" for c in cells))
        if fla is not None and cu is None:
            fo, fs = fla(q.detach(), k.detach(), v.detach(), g_gamma=-slopes, scale=K**-0.5,
                         initial_state=h0.detach() / K**-0.5, output_final_state=True)
            rms_o, _ = relative_errors(fo, ro)
            rms_s, _ = relative_errors(fs * K**-0.5, rs)
            emit(f"{'':<8} fla chunk_simple_gla on the same inputs: o rms {rms_o:.1e}, state rms {rms_s:.1e}")

    from supra.ops.linear_attention.triton_recurrent import fused_recurrent_linear_attention_

    torch.manual_seed(args.seed)
    B, T = 8, 3
    q, k, v = (torch.randn(B, T, H, K, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(B, H, K, K, device=DEVICE)
    ro, rs = linear_attention(q.float(), k.float(), v.float(), slopes, initial_state=state, output_final_state=True, impl="naive")
    o = fused_recurrent_linear_attention_(q, k, v, slopes, state)
    (rms_o, max_o), (rms_s, max_s) = relative_errors(o, ro), relative_errors(state, rs)
    good = rms_o <= 1e-2 and max_o <= 3e-2 and rms_s <= 1e-5 and max_s <= 1e-4
    ok &= good
    emit(f"decode in place, bf16, T={T}: o {rms_o:.1e}/{max_o:.1e}, state {rms_s:.1e}/{max_s:.1e} {'ok' if good else 'FAIL'}")
    emit(f"correctness: {'all passed' if ok else 'FAILURES above'}")
    return ok


def speed(args: argparse.Namespace, fla) -> None:
    H, K = args.heads, args.head_dim
    B = args.batch_heads // H
    scale = K**-0.5
    slopes = alibi_slopes(H).to(DEVICE)
    from supra.ops.linear_attention.triton_chunk import triton_chunk_linear_attention

    emit(f"\n== speed: B={B} H={H} K=V={K} bf16, median ms over at most {args.reps} reps / {args.max_seconds:g} s ==")
    emit("ratios above 1: supra is faster (fla/supra = fla ms / supra ms; sdpa/supra likewise)")
    impls = ["supra", "supra-fn", "fla", "sdpa-flash", "naive"]
    emit(f"{'mode':<8} {'T':>6} " + " ".join(f"{n:>17}" for n in impls) + f" {'fla/supra':>10} {'sdpa/supra':>11}")
    for mode in ("fwd", "fwd+bwd"):
        for T in args.lengths:
            torch.manual_seed(args.seed)
            grad = mode == "fwd+bwd"
            q, k, v = (torch.randn(B, T, H, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))
            do = torch.randn(B, T, H, K, device=DEVICE, dtype=torch.bfloat16)
            ds = torch.randn(B, H, K, K, device=DEVICE)

            def timed(forward: Callable[[], Tuple[torch.Tensor, ...]], grads: Tuple[torch.Tensor, ...]) -> float:
                def run() -> None:
                    if not grad:
                        with torch.no_grad():
                            forward()
                        return
                    outs = forward()
                    torch.autograd.backward(outs, grads[: len(outs)])
                    for x in (q, k, v):
                        x.grad = None

                return median_ms(run, args.reps, args.max_seconds)

            results: Dict[str, Optional[float]] = {}
            results["supra"] = timed(lambda: linear_attention(q, k, v, slopes, output_final_state=True, impl="triton"), (do, ds))
            results["supra-fn"] = timed(lambda: triton_chunk_linear_attention(q, k, v, slopes, scale), (do, ds))
            results["fla"] = (
                timed(lambda: fla(q, k, v, g_gamma=-slopes, scale=scale, output_final_state=True), (do, ds))
                if fla is not None else None
            )
            qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_(grad) for x in (q, k, v))
            dot = do.transpose(1, 2)

            def sdpa() -> Tuple[torch.Tensor]:
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    return (F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),)

            def sdpa_run() -> float:
                def run() -> None:
                    if not grad:
                        with torch.no_grad():
                            sdpa()
                        return
                    torch.autograd.backward(sdpa(), (dot,))
                    for x in (qt, kt, vt):
                        x.grad = None

                return median_ms(run, args.reps, args.max_seconds)

            results["sdpa-flash"] = sdpa_run()
            if naive_bytes(B, T, H) <= args.memory_budget_gb * 2**30:
                results["naive"] = timed(lambda: linear_attention(q, k, v, slopes, output_final_state=True, impl="naive"), (do, ds))
            else:
                results["naive"] = None
            flops = {
                "supra": linear_flops(B, T, H, K, K, mode), "supra-fn": linear_flops(B, T, H, K, K, mode),
                "fla": linear_flops(B, T, H, K, K, mode), "sdpa-flash": causal_attention_flops(B, T, H, K, K, mode),
            }
            cells = []
            for name in impls:
                ms = results[name]
                if ms is None:
                    cells.append(f"{'-':>17}")
                elif name in flops:
                    cells.append(f"{ms:>8.2f} {flops[name] / ms / 1e9:>5.0f}TF/s")
                else:
                    cells.append(f"{ms:>17.2f}")
            emit(
                f"{mode:<8} {T:>6} " + " ".join(cells)
                + f" {ratio(results['fla'], results['supra']):>10} {ratio(results['sdpa-flash'], results['supra']):>11}"
            )
            del q, k, v, qt, kt, vt
            torch.cuda.empty_cache()
    if fla is None:
        emit("fla: not installed, its column is empty")


def decode(args: argparse.Namespace) -> None:
    from supra.ops.linear_attention.triton_recurrent import fused_recurrent_linear_attention_

    H, K, B = args.heads, args.head_dim, args.decode_batch
    slopes = alibi_slopes(H).to(DEVICE)
    emit(f"\n== decode: one token, B={B} H={H} K=V={K} bf16, float32 state {B * H * K * K * 4 / 2**20:.0f} MiB ==")
    torch.manual_seed(args.seed)
    q, k, v = (torch.randn(B, 1, H, K, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(B, H, K, K, device=DEVICE)
    moved = decode_bytes(B, H, K, K, 1, 2)
    source, target = torch.randn(B * H * K * K, device=DEVICE), torch.empty(B * H * K * K, device=DEVICE)
    copy_ms = median_ms(lambda: target.copy_(source), 50, 2.0)
    in_place_ms = median_ms(lambda: fused_recurrent_linear_attention_(q, k, v, slopes, state), 50, 2.0)
    op_ms = median_ms(lambda: linear_attention(q, k, v, slopes, initial_state=state, output_final_state=True, impl="triton"), 50, 2.0)
    copy_bytes = 2 * source.numel() * 4
    emit(f"{'what':<34} {'ms':>8} {'GB/s':>8} {'vs copy':>8}")
    emit(f"{'device-to-device copy of the state':<34} {copy_ms:>8.3f} {copy_bytes / copy_ms / 1e6:>8.0f} {'1.00':>8}")
    for label, ms in (("fused recurrent, state in place", in_place_ms), ("public op (new state buffer)", op_ms)):
        bandwidth = moved / ms / 1e6
        emit(f"{label:<34} {ms:>8.3f} {bandwidth:>8.0f} {bandwidth / (copy_bytes / copy_ms / 1e6):>8.2f}")

    from supra.ops.linear_attention.triton_chunk import chunk_fwd
    from supra.ops.linear_attention.triton_recurrent import fused_recurrent_fwd

    emit(f"\nshort inputs, forward, B={B} H={H}: recurrent kernel vs chunked kernels "
         f"(TRITON_RECURRENT_MAX_TOKENS = {TRITON_RECURRENT_MAX_TOKENS} at the time of the run)")
    emit(f"{'T':>4} {'recurrent ms':>13} {'chunk ms':>9} {'rec/chunk':>10}")
    crossover, still = 0, True
    for T in args.short_lengths:
        q, k, v = (torch.randn(B, T, H, K, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
        rec = median_ms(lambda: fused_recurrent_fwd(q, k, v, slopes, K**-0.5, state), 30, 1.0)
        chunk = median_ms(lambda: chunk_fwd(q, k, v, slopes, K**-0.5, state), 30, 1.0)
        still = still and rec < chunk
        crossover = T if still else crossover
        emit(f"{T:>4} {rec:>13.3f} {chunk:>9.3f} {rec / chunk:>10.2f}")
    emit(f"recurrent faster up to T = {crossover}")


def main(argv: Optional[List[str]] = None) -> int:
    global DEVICE
    args = parse_args(argv)
    DEVICE = args.device
    if args.plan:
        plan(args)
    elif DEVICE == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/ops_gpu.py times CUDA kernels, and torch.cuda.is_available() is False here. "
            "Run it on a machine with an NVIDIA GPU, or pass --plan to print the configurations and FLOP "
            "counts without timing anything.",
            file=sys.stderr,
        )
        return 2
    else:
        fla, fla_error = try_import_fla() if DEVICE == "cuda" else (None, "not tried off the GPU")
        device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"{DEVICE} (script check, not a measurement)"
        emit(
            f"device: {device_name}; torch {torch.__version__}; "
            f"fla: {'available' if fla is not None else 'absent (' + str(fla_error) + ')'}"
        )
        import triton

        emit(f"triton {triton.__version__}")
        ok = correctness(args, fla)
        speed(args, fla)
        decode(args)
        if not ok:
            emit("\nWARNING: correctness checks failed; the timings above are of wrong results")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(LINES) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
