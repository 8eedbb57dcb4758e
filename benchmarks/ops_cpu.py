"""CPU speed of the linear attention implementations: naive vs chunk vs recurrent.

Prints two tables of median wall-clock milliseconds through the public
``supra.ops.linear_attention`` (validation and custom-op dispatch included, as a model sees it):

1. long sequences (default T = 512 .. 8192), forward and forward+backward, each implementation's
   time and its ratio to chunk measured in the same run;
2. short chunks (default T = 1 .. 64), recurrent vs chunk, the regime of decoding and of small
   prefill chunks, with the largest T at which recurrent is still faster. That crossover is what
   ``RECURRENT_MAX_TOKENS`` in ``supra/ops/linear_attention/__init__.py`` encodes for ``impl=None``.

Forward runs under ``torch.no_grad()`` (inference); forward+backward runs the forward with inputs
that require grad and back-propagates into q, k, v from both the output and the final state.
Naive materializes [B, H, T, T] matrices: configurations whose estimate exceeds
``--memory-budget-gb`` print "skipped". Slow configurations stop repeating after
``--max-seconds`` per cell.

    python benchmarks/ops_cpu.py                 # full run
    python benchmarks/ops_cpu.py --quick         # fewer repetitions, shorter budget per cell
    python benchmarks/ops_cpu.py --threads 1 --lengths 1024 4096 --short-configs 1x32x128x128
"""

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from supra.ops import linear_attention
from supra.ops.linear_attention import RECURRENT_MAX_TOKENS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Peak naive memory in units of one float32 [B, H, T, T] matrix. Peak RSS measured about 5 at
# T = 4096 for both modes (the backward frees the recomputed forward's matrices as it goes); 6 leaves
# room for the allocator.
NAIVE_MATRICES = {"fwd": 6, "fwd+bwd": 6}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=64)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--impls", nargs="+", default=["naive", "chunk", "recurrent"])
    parser.add_argument(
        "--short-lengths", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64],
        help="lengths of the recurrent-vs-chunk table (none to skip it)",
    )
    parser.add_argument(
        "--short-configs", nargs="+", default=None,
        help="BxHxKxV shapes of the short table (default: the long table's shape)",
    )
    parser.add_argument("--reps", type=int, default=10, help="most timed repetitions per cell")
    parser.add_argument("--short-reps", type=int, default=50, help="most timed repetitions per short cell")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="stop repeating a cell after this long")
    parser.add_argument("--memory-budget-gb", type=float, default=4.0, help="skip naive cells estimated above this")
    parser.add_argument("--quick", action="store_true", help="3 reps (20 short), at most 3 s per cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.reps, args.short_reps, args.max_seconds = min(args.reps, 3), min(args.short_reps, 20), min(args.max_seconds, 3.0)
    return args


def make_inputs(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, grad: bool):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    # ALiBi / Lightning slopes, the SUPRA default.
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)])
    if grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v, slopes


def step_fn(shape: Tuple[int, int, int, int, int], dtype: torch.dtype, impl: str, mode: str) -> Callable[[], None]:
    """A closure that runs one forward (or forward+backward) of ``impl`` on fixed random inputs."""
    B, T, H, K, V = shape
    q, k, v, slopes = make_inputs(B, T, H, K, V, dtype, grad=mode == "fwd+bwd")
    if mode == "fwd":

        def run() -> None:
            with torch.no_grad():
                linear_attention(q, k, v, slopes, output_final_state=True, impl=impl)

        return run
    grad_o = torch.randn(B, T, H, V, dtype=dtype)
    grad_state = torch.randn(B, H, K, V)

    def run() -> None:
        o, state = linear_attention(q, k, v, slopes, output_final_state=True, impl=impl)
        torch.autograd.backward((o, state), (grad_o, grad_state))
        for x in (q, k, v):
            x.grad = None

    return run


def median_ms(run: Callable[[], None], reps: int, max_seconds: float, warmup: int = 1) -> Tuple[float, int]:
    """Median milliseconds of up to ``reps`` calls after ``warmup``, stopping once ``max_seconds`` are spent."""
    start = time.perf_counter()
    for _ in range(warmup):
        run()
        if time.perf_counter() - start > max_seconds:
            break
    times: List[float] = []
    while len(times) < reps and (not times or sum(times) < max_seconds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), len(times)


def naive_bytes(shape: Tuple[int, int, int, int, int], mode: str) -> float:
    B, T, H, _, _ = shape
    return NAIVE_MATRICES[mode] * B * H * T * T * 4


def cpu_busy_fraction(seconds: float = 1.0) -> Optional[float]:
    """The fraction of all cores busy over ``seconds`` (Linux /proc/stat), before this script loads them."""
    def sample() -> Tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def header(args: argparse.Namespace) -> str:
    busy = cpu_busy_fraction()
    busy_text = "unknown" if busy is None else f"{100 * busy:.0f}%"
    lines = [
        f"supra.ops.linear_attention on CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, dtype {args.dtype}; other load before the run: {busy_text} of the cores",
    ]
    if busy is not None and busy > 0.1:
        lines.append("WARNING: the machine was busy before the run; timings may be inflated and noisy.")
    return "\n".join(lines)


def emit(line: str) -> None:
    print(line, flush=True)


def long_table(args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype]
    B, H, K, V = args.batch, args.heads, args.key_dim, args.value_dim
    emit(
        f"\nLong sequences: B={B} H={H} K={K} V={V}; median ms (ratio to chunk), n = timed reps; "
        f"at most {args.reps} reps or {args.max_seconds:g} s per cell"
    )
    emit(f"{'mode':<8}{'T':>6}" + "".join(f"{impl:>26}" for impl in args.impls))
    for mode in ("fwd", "fwd+bwd"):
        for T in args.lengths:
            shape = (B, T, H, K, V)
            results: Dict[str, Tuple[float, int]] = {}
            skipped: Dict[str, str] = {}
            for impl in args.impls:
                if impl == "naive" and naive_bytes(shape, mode) > args.memory_budget_gb * 2**30:
                    skipped[impl] = f"skipped (~{naive_bytes(shape, mode) / 2**30:.0f} GiB)"
                    continue
                torch.manual_seed(args.seed)
                results[impl] = median_ms(step_fn(shape, dtype, impl, mode), args.reps, args.max_seconds)
            cells = []
            for impl in args.impls:
                if impl in skipped:
                    cells.append(f"{skipped[impl]:>26}")
                    continue
                ms, n = results[impl]
                ratio = f"(x{ms / results['chunk'][0]:.2f})" if "chunk" in results else ""
                cells.append(f"{ms:>12.2f} {ratio:>8} n={n:<3}")
            emit(f"{mode:<8}{T:>6}" + "".join(cells))
    emit(
        f"naive is skipped where its estimated peak ({NAIVE_MATRICES['fwd']} fwd / {NAIVE_MATRICES['fwd+bwd']} "
        f"fwd+bwd float32 [B, H, T, T] matrices) exceeds --memory-budget-gb {args.memory_budget_gb:g}"
    )


def short_table(args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype]
    configs = args.short_configs or [f"{args.batch}x{args.heads}x{args.key_dim}x{args.value_dim}"]
    emit(
        f"\nShort chunks: recurrent vs chunk, median ms over at most {args.short_reps} reps; "
        f"RECURRENT_MAX_TOKENS = {RECURRENT_MAX_TOKENS} at the time of the run"
    )
    for config in configs:
        B, H, K, V = (int(x) for x in config.split("x"))
        emit(f"B={B} H={H} K={K} V={V}")
        emit(
            f"{'T':>4}{'fwd rec':>10}{'fwd chunk':>11}{'rec/chunk':>11}"
            f"{'f+b rec':>10}{'f+b chunk':>11}{'rec/chunk':>11}"
        )
        # The largest T such that recurrent won at every measured length up to it.
        crossover = {"fwd": 0, "fwd+bwd": 0}
        still_faster = {"fwd": True, "fwd+bwd": True}
        for T in args.short_lengths:
            cells = []
            for mode in ("fwd", "fwd+bwd"):
                times = {}
                for impl in ("recurrent", "chunk"):
                    torch.manual_seed(args.seed)
                    run = step_fn((B, T, H, K, V), dtype, impl, mode)
                    times[impl] = median_ms(run, args.short_reps, args.max_seconds, warmup=3)[0]
                ratio = times["recurrent"] / times["chunk"]
                still_faster[mode] = still_faster[mode] and ratio < 1
                if still_faster[mode]:
                    crossover[mode] = T
                cells.append(f"{times['recurrent']:>10.3f}{times['chunk']:>11.3f}{ratio:>11.2f}")
            emit(f"{T:>4}" + "".join(cells))
        emit(
            f"recurrent is faster at every measured T up to: fwd {crossover['fwd'] or 'none'}, "
            f"fwd+bwd {crossover['fwd+bwd'] or 'none'}"
        )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(header(args), flush=True)
    if args.lengths:
        long_table(args)
    if args.short_lengths:
        short_table(args)


if __name__ == "__main__":
    main()
