"""Training-step speed and peak memory on CPU: a SUPRA model vs the softmax backbone it came from.

One mid-size Llama-style decoder (``supra.models.supra_decoder``, default 6 layers x 512, 8 query
heads and 2 key/value heads (GQA), SwiGLU 1536, vocab 32000) is built twice from the same seed:

- ``softmax``: every layer softmax attention (``softmax_layers`` = all; torchtune's
  ``MultiHeadAttention``, causal ``scaled_dot_product_attention``), the pretrained backbone;
- ``supra``: the same weights linearized with ``supra.convert.linearize`` (ReLU feature maps,
  ALiBi decay, chunked linear attention), as the uptrain recipe does.

Both run full training steps at batch 1 x ``seq_len``, as ``recipes/uptrain.py`` does on one
process: forward, ``supra.training.loss.lm_loss`` (mean over the tokens), backward, gradient
clipping at 1.0, and an AdamW step over ``build_param_groups`` (pretrained / new groups), then
``zero_grad(set_to_none=True)``, on fresh random tokens each step. For each ``seq_len``:

- time: one fresh process builds both variants, runs ``--warmup`` untimed steps of each, then
  ``--steps`` timed steps of each, alternating softmax and SUPRA, so that a change in the load of
  a shared machine falls on both alike; the table gives the median step time and tokens/s;
- memory: one fresh process per variant runs two steps (the AdamW moments appear in the first),
  so ``ru_maxrss`` (peak resident memory) is that variant's alone: weights, gradients, AdamW
  moments and activations. The table gives that peak minus the RSS right after imports.

The ratios are SUPRA / softmax at the same length, measured in the same run.

``--checkpoint PATH`` trains a real model instead: the softmax model a checkpoint holds (any path
``supra.checkpoint.load_checkpoint`` reads, or ``model:NAME`` / ``supra:REL`` as configs name
them), fine-tuned as it is (``softmax``) against ``linearize`` of it with the default arguments
(``supra``), the same step and optimizer for both, in float32. The shape comes from the
checkpoint, so the shape options (``--layers`` ... ``--vocab``) do not apply; every process loads
the checkpoint.

Softmax attention costs O(T^2) per sequence, SUPRA's chunked linear attention O(T); the rest of
the step (projections, MLPs, the 32000-way output and its loss) is the same in both and linear
in T, so the ratio moves towards SUPRA as T grows. ``cpu/wall`` is the process CPU time over wall
time during the timed steps: near the thread count on an idle machine, lower when other work
competed for the cores (then the times are inflated and noisy).

Lengths run in the order given (by default 2048, the length of the paper's uptraining, first),
and the table lists them in increasing order. ``--time-budget`` (seconds, default 480) bounds the
run: before each length, its cost is extrapolated from the lengths measured (at most quadratically
in T) and a length that would not fit is skipped, with a line that says so.

    python benchmarks/uptrain_cpu.py                          # T = 512 1024 2048 4096
    python benchmarks/uptrain_cpu.py --quick                  # T = 512 2048, fewer steps
    python benchmarks/uptrain_cpu.py --seq-lens 2048 --layers 4 --dim 256 --steps 5
    python benchmarks/uptrain_cpu.py --checkpoint model:smollm2-135m --seq-lens 512 1024
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

VARIANTS = ("softmax", "supra")
# The synthetic model's shape options and their defaults (None: derived, see parse_args).
SHAPE_DEFAULTS = {"layers": 6, "dim": 512, "heads": 8, "kv_heads": 2, "intermediate": None, "vocab": 32000}
# Training steps of a memory cell (see memory_cell).
MEMORY_STEPS = 2


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None,
                        help="sequence lengths, run in this order (default 2048 512 1024 4096; --quick: 2048 512)")
    parser.add_argument("--checkpoint", default=None,
                        help="train this softmax checkpoint (any load_checkpoint path, or model:NAME) and its "
                             "linearization instead of the synthetic model")
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks (default 6)")
    parser.add_argument("--dim", type=int, default=None, help="model width (default 512)")
    parser.add_argument("--heads", type=int, default=None, help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 2)")
    parser.add_argument("--intermediate", type=int, default=None, help="SwiGLU width (default 3 x dim)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 3; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each cell (default 2)")
    parser.add_argument("--time-budget", type=float, default=480.0,
                        help="skip sequence lengths whose estimated cost would exceed this many seconds in all")
    parser.add_argument("--quick", action="store_true", help="T = 512 2048 and 2 timed steps unless given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seq_lens is None:
        args.seq_lens = [2048, 512] if args.quick else [2048, 512, 1024, 4096]
    if args.steps is None:
        args.steps = 2 if args.quick else 3
    given = [name for name in SHAPE_DEFAULTS if getattr(args, name) is not None]
    if args.checkpoint is not None:
        if given:
            parser.error(f"--{given[0].replace('_', '-')} shapes the synthetic model; a --checkpoint brings its own shape")
    else:
        for name, default in SHAPE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        args.intermediate = args.intermediate or 3 * args.dim
    checked = ("steps", "batch", "threads") + (() if args.checkpoint else ("layers", "dim", "heads", "kv_heads", "vocab"))
    for name in checked:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0 or min(args.seq_lens) < 1:
        parser.error("--warmup must be >= 0 and every --seq-lens value >= 1")
    args.seq_lens = list(dict.fromkeys(args.seq_lens))
    return args


def peak_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def model_kwargs(args: argparse.Namespace, seq_len: int) -> Dict[str, Any]:
    return dict(
        vocab_size=args.vocab, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        embed_dim=args.dim, intermediate_dim=args.intermediate, max_seq_len=max(2048, seq_len),
        softmax_layers=list(range(args.layers)),
    )


def load_softmax(checkpoint: str, seq_len: int):
    """The softmax model ``checkpoint`` holds, its length check lifted to ``seq_len``."""
    import torch

    from supra.checkpoint import load_checkpoint
    from supra.config import resolve_path
    from supra.modules.decoder import is_linear_layer

    # float32 as the synthetic model (a supra folder may store bf16).
    model = load_checkpoint(resolve_path(checkpoint), dtype=torch.float32)
    if any(is_linear_layer(layer) for layer in model.layers):
        raise ValueError(f"--checkpoint {checkpoint} holds SUPRA layers; pass the softmax model (the teacher), "
                         "which the benchmark linearizes itself")
    # RoPE here has no table: max_seq_len is only the softmax layers' length check.
    model.max_seq_len = max(model.max_seq_len, seq_len)
    return model


def describe(model) -> str:
    """The shape of a built decoder, for the report."""
    from torchtune.modules import TiedLinear

    attn = model.layers[0].attn
    return (f"{len(model.layers)} layers x {model.tok_embeddings.embedding_dim}, heads {attn.num_heads}/"
            f"{attn.num_kv_heads}, SwiGLU {model.layers[0].mlp.w1.out_features}, vocab "
            f"{model.tok_embeddings.num_embeddings}{', tied embeddings' if isinstance(model.output, TiedLinear) else ''}")


def build(args: argparse.Namespace, variant: str, seq_len: int):
    """The variant's model (every pretrained tensor from ``args.seed``, or from ``--checkpoint``)
    and the recipe's AdamW."""
    import torch

    from supra.convert import linearize, new_parameter_names
    from supra.models import supra_decoder
    from supra.training.optim import build_param_groups

    torch.manual_seed(args.seed)
    if args.checkpoint is None:
        model = supra_decoder(**model_kwargs(args, seq_len))
    else:
        model = load_softmax(args.checkpoint, seq_len)
    if variant == "supra":
        # The feature maps draw from the RNG after the backbone: every pretrained tensor is the
        # softmax variant's.
        linearize(model)
    model.train()
    groups = build_param_groups(model, lr=3e-5, new_lr=3e-4, weight_decay=0.1,
                                new_param_names=new_parameter_names(model))
    optimizer = torch.optim.AdamW(groups, lr=3e-5, betas=(0.9, 0.95), eps=1e-8)
    return model, optimizer


def make_step(args: argparse.Namespace, model, optimizer, seq_len: int):
    """A closure running one training step on fresh random tokens; returns the loss."""
    import torch

    from supra.training.loss import lm_loss

    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.tok_embeddings.num_embeddings

    def step() -> float:
        window = torch.randint(0, vocab, (args.batch, seq_len + 1), generator=generator)
        loss = lm_loss(model(window[:, :-1]), window[:, 1:]).total()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_cell(args: argparse.Namespace, seq_len: int) -> Dict[str, Dict[str, Any]]:
    """Runs in a fresh process: both variants side by side, their timed steps alternating, so a
    change in the machine's load during the run affects both alike."""
    import torch

    torch.set_num_threads(args.threads)
    steps, losses = {}, {}
    for variant in VARIANTS:
        model, optimizer = build(args, variant, seq_len)
        shape = describe(model)
        steps[variant] = make_step(args, model, optimizer, seq_len)
        losses[variant] = [steps[variant]() for _ in range(args.warmup)]
    times = {variant: [] for variant in VARIANTS}
    cpu = {variant: 0.0 for variant in VARIANTS}
    for _ in range(args.steps):
        for variant in VARIANTS:
            cpu_start, start = cpu_seconds(), time.perf_counter()
            losses[variant].append(steps[variant]())
            times[variant].append(time.perf_counter() - start)
            cpu[variant] += cpu_seconds() - cpu_start
    out: Dict[str, Any] = {
        variant: {
            "times": times[variant], "median_s": statistics.median(times[variant]),
            "cpu_per_wall": cpu[variant] / sum(times[variant]),
            "finite": all(math.isfinite(x) for x in losses[variant]),
        }
        for variant in VARIANTS
    }
    out["shape"] = shape
    return out


def memory_cell(args: argparse.Namespace, variant: str, seq_len: int) -> Dict[str, Any]:
    """Runs in a fresh process: peak RSS of one variant over ``MEMORY_STEPS`` training steps."""
    import torch

    # Everything the steps import is loaded before the baseline, so the peak above it is training's.
    import supra.convert  # noqa: F401
    import supra.models  # noqa: F401
    import supra.training.loss  # noqa: F401
    import supra.training.optim  # noqa: F401

    if args.checkpoint is not None:
        import supra.checkpoint  # noqa: F401
    torch.set_num_threads(args.threads)
    baseline = peak_mib()
    model, optimizer = build(args, variant, seq_len)
    step = make_step(args, model, optimizer, seq_len)
    # The AdamW moments appear in the first step; the second runs with everything allocated.
    losses = [step() for _ in range(MEMORY_STEPS)]
    return {
        "baseline_mib": baseline, "peak_mib": peak_mib(), "params": sum(p.numel() for p in model.parameters()),
        "finite": all(math.isfinite(x) for x in losses),
    }


def spawn(args: argparse.Namespace, job: Dict[str, Any]) -> Dict[str, Any]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job),
            "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.checkpoint is None:
        argv += ["--layers", str(args.layers), "--dim", str(args.dim), "--heads", str(args.heads),
                 "--kv-heads", str(args.kv_heads), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab)]
    else:
        argv += ["--checkpoint", args.checkpoint]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker {job} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def estimate_seconds(done: Dict[int, Dict[str, Any]], seq_len: int, args: argparse.Namespace) -> Optional[float]:
    """Extrapolated wall time of everything run at ``seq_len``, from the measured length nearest
    below it (else the shortest measured): each variant's step time scaled by the exponent seen
    between the two longest lengths measured, clamped to [1, 2] (with one length measured: 2 going
    up, 1 going down, erring long both ways), plus the fixed cost seen there (start-up, builds)."""
    if not done:
        return None
    lengths = sorted(done)
    below = [n for n in lengths if n <= seq_len]
    base = below[-1] if below else lengths[0]
    steps_per_variant = args.warmup + args.steps + MEMORY_STEPS
    fixed = done[base]["seconds"]
    total = 0.0
    for variant in VARIANTS:
        step_s = done[base]["time"][variant]["median_s"]
        if len(lengths) > 1:
            n0, n1 = lengths[-2], lengths[-1]
            exponent = _exponent(done[n0]["time"][variant]["median_s"], done[n1]["time"][variant]["median_s"], n0, n1)
        else:
            exponent = 2.0 if seq_len > base else 1.0
        fixed -= steps_per_variant * step_s
        total += steps_per_variant * step_s * (seq_len / base) ** exponent
    return total + max(fixed, 0.0)


def _exponent(t0: float, t1: float, n0: int, n1: int) -> float:
    if t0 <= 0 or t1 <= 0:
        return 2.0
    return min(2.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))


def load_before_run(seconds: float = 1.0) -> Optional[float]:
    """Fraction of all cores busy over ``seconds`` before the run (Linux /proc/stat)."""
    def sample():
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def emit(line: str = "") -> None:
    print(line, flush=True)


def main(args: argparse.Namespace, argv: Optional[List[str]] = None) -> None:
    import torch

    busy = load_before_run()
    argv = sys.argv[1:] if argv is None else argv
    emit(f"$ python benchmarks/uptrain_cpu.py {' '.join(argv)}".rstrip())
    emit(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores; other load before the run: "
        f"{'unknown' if busy is None else f'{100 * busy:.0f}% of the cores'}, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    if args.checkpoint is None:
        emit(
            f"model: supra_decoder {args.layers} layers x {args.dim}, heads {args.heads}/{args.kv_heads}, "
            f"SwiGLU {args.intermediate}, vocab {args.vocab}, fp32; batch {args.batch}"
        )
    else:
        emit(f"model: {args.checkpoint} (load_checkpoint), fine-tuned as it is (softmax) and linearized with the "
             f"defaults (supra), fp32; batch {args.batch}")
    emit(
        "step = forward + lm_loss + backward + clip_grad_norm + AdamW step. Time: both variants in one process, "
        f"{args.warmup} warm-up + {args.steps} timed steps each, alternating; memory: one fresh process per "
        f"variant and T, {MEMORY_STEPS} steps"
    )
    emit()
    started = time.perf_counter()
    done: Dict[int, Dict[str, Any]] = {}
    skipped: List[int] = []
    for index, seq_len in enumerate(args.seq_lens):
        estimate = estimate_seconds(done, seq_len, args)
        if estimate is not None and time.perf_counter() - started + estimate > args.time_budget:
            skipped.append(seq_len)
            continue
        cell_start = time.perf_counter()
        timing = spawn(args, {"kind": "time", "seq_len": seq_len})
        order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]
        memory = {v: spawn(args, {"kind": "memory", "variant": v, "seq_len": seq_len}) for v in order}
        done[seq_len] = {"time": timing, "memory": memory, "seconds": time.perf_counter() - cell_start}
        emit(f"measured T={seq_len} in {done[seq_len]['seconds']:.0f} s")
        if args.checkpoint is not None and len(done) == 1:
            emit(f"  the checkpoint's shape: {timing['shape']}")
    emit()
    emit(f"{'T':>5} {'variant':<8} {'params':>7} {'step s':>8} {'tokens/s':>9} {'cpu/wall':>8} "
         f"{'peak MiB':>9} {'ratio tok/s':>11} {'ratio mem':>9}")
    for seq_len in sorted(done):
        timing, memory = done[seq_len]["time"], done[seq_len]["memory"]
        tokens = args.batch * seq_len
        rates = {v: tokens / timing[v]["median_s"] for v in VARIANTS}
        peaks = {v: memory[v]["peak_mib"] - memory[v]["baseline_mib"] for v in VARIANTS}
        for variant in VARIANTS:
            ratios = ("", "")
            if variant == "supra":
                # A model too small to lift the peak above the imports' leaves no memory ratio.
                ratios = (f"{rates['supra'] / rates['softmax']:.2f}",
                          f"{peaks['supra'] / peaks['softmax']:.2f}" if peaks["softmax"] > 0 else "-")
            finite = timing[variant]["finite"] and memory[variant]["finite"]
            emit(f"{seq_len:>5} {variant:<8} {memory[variant]['params'] / 1e6:>6.1f}M "
                 f"{timing[variant]['median_s']:>8.2f} {rates[variant]:>9.0f} {timing[variant]['cpu_per_wall']:>8.2f} "
                 f"{peaks[variant]:>9.0f} {ratios[0]:>11} {ratios[1]:>9}{'' if finite else '  NON-FINITE LOSS'}")
    emit()
    emit("step s: median of the timed steps; tokens/s = batch x T / step s; cpu/wall: process CPU seconds per "
         f"wall second in the timed steps (about {args.threads} when nothing else ran);")
    emit("peak MiB: ru_maxrss minus the RSS after imports (weights, gradients, AdamW moments, activations); "
         "ratio: supra / softmax at the same T")
    if skipped:
        emit(f"skipped T = {' '.join(map(str, skipped))}: the extrapolated cost would exceed --time-budget "
             f"{args.time_budget:g} s")
    emit(f"total {time.perf_counter() - started:.0f} s, load average after the run {os.getloadavg()[0]:.1f}")


def worker(args: argparse.Namespace) -> None:
    job = json.loads(args.worker)
    if job["kind"] == "time":
        result = time_cell(args, job["seq_len"])
    else:
        result = memory_cell(args, job["variant"], job["seq_len"])
    print(json.dumps(result))


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker(arguments)
    else:
        main(arguments)
