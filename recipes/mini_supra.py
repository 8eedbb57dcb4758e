"""A small-scale replication of SUPRA's central claims, on a CPU: every run, table and plot of
docs/results/mini_supra.md.

    python recipes/mini_supra.py                 (what ``make mini-supra`` runs; about an hour, one thread)
    python recipes/mini_supra.py --report-only   (tables and plots again from the finished runs)

Runs, each the uptrain recipe with ``tiny/uptrain`` plus the overrides in ``RUNS`` and the same
token budget (``--steps`` x 8 x 256 tokens), held-out loss on the whole held-out split every
``--eval-every`` steps:

- ``supra``: the teacher (supra/assets/tiny_teacher) linearized and uptrained (the paper's method);
- ``scratch``: the same linear architecture from random weights, with the teacher's pretraining
  optimizer settings;
- ``softmax``: the teacher itself trained on with the same data and settings, not linearized: what
  the extra tokens alone give a model that is still far from converged;
- ablations of the paper: ``no_decay``, ``denominator`` (no GroupNorm: a T2R-style denominator),
  ``retnet`` (RetNet slopes instead of Lightning ones), ``frozen`` (pretrained weights frozen,
  only the new feature maps train);
- ``supra_seed1``: ``supra`` with another seed, for the size of run-to-run differences.

Then the held-out loss by position in windows of ``--long-seq-len`` tokens (8x the training length)
for the teacher and the uptrained models. Writes ``results.json``, ``tables.md`` and PNG plots to
``--docs`` and prints the tables. Finished runs (their last checkpoint exists) are reused; pass
``--force`` to train them again.
"""

import argparse
import json
import logging
import platform
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from supra.checkpoint import load_checkpoint
from supra.config import load_config, recipe_root, resolve_path
from supra.data import TokenShardDataset, build_dataloader, load_tokenizer
from supra.data.python_docs import prepare_python_docs

TEACHER = "supra:assets/tiny_teacher"
SCRATCH_MODEL = [
    "linearize=null",
    "model={_component_: supra.models.supra_decoder, vocab_size: 4096, num_layers: 4, num_heads: 4, num_kv_heads: 2, "
    "embed_dim: 128, intermediate_dim: 384, max_seq_len: 256}",
    # The teacher's own pretraining settings (tiny/teacher), which suit training from random weights.
    "optimizer.lr=3.0e-3", "new_lr=null", "optimizer.weight_decay=0.1",
]
RUNS: Dict[str, Dict[str, Any]] = {
    "supra": {"label": "SUPRA (uptrained teacher)", "overrides": []},
    "scratch": {"label": "same linear model from scratch", "overrides": SCRATCH_MODEL},
    "softmax": {"label": "softmax teacher trained on, same budget", "overrides": ["linearize=null"]},
    "no_decay": {"label": "SUPRA, no decay", "overrides": ["linearize.decay=none"]},
    "denominator": {"label": "SUPRA, denominator instead of GroupNorm", "overrides": ["linearize.normalization=denominator"]},
    "retnet": {"label": "SUPRA, RetNet slopes", "overrides": ["linearize.decay=retnet"]},
    "frozen": {"label": "SUPRA, pretrained weights frozen", "overrides": ["freeze_pretrained.enabled=true"]},
    # Run to run noise: another data order and feature-map initialization.
    "supra_seed1": {"label": "SUPRA, seed 1", "overrides": ["seed=1"]},
}
POSITION_MODELS = ("supra", "no_decay", "retnet")


def position_buckets(seq_len: int, train_len: int) -> List[List[int]]:
    """[0, train_len), then doubling ranges up to ``seq_len``."""
    buckets, start = [[0, train_len]], train_len
    while start < seq_len:
        buckets.append([start, min(2 * start, seq_len)])
        start *= 2
    return buckets


def final_checkpoint(out: Path, name: str, steps: int) -> Path:
    return out / name / "checkpoints" / f"step_{steps:07d}" / "model"


def train_run(uptrain: Dict[str, Any], out: Path, name: str, args: argparse.Namespace) -> None:
    """Trains one run with the uptrain recipe, unless its last checkpoint exists (and not ``force``)."""
    steps = args.steps
    if final_checkpoint(out, name, steps).exists() and not args.force:
        print(f"[{name}] reusing {out / name}", flush=True)
        return
    folder = out / name
    if (folder / "metrics.jsonl").exists():
        (folder / "metrics.jsonl").unlink()
    overrides = [
        f"output_dir={folder}", f"max_steps={steps}", f"save_every_n_steps={steps}", f"eval_every_n_steps={args.eval_every}",
        f"eval_batches={args.eval_batches or 'null'}", "eval_before_training=true", "log_every_n_steps=10",
        f"scheduler.warmup_steps={min(10, steps - 1)}", *RUNS[name]["overrides"],
    ]
    print(f"[{name}] {RUNS[name]['label']}: supra run uptrain --config tiny/uptrain {' '.join(overrides)}", flush=True)
    start = time.perf_counter()
    cfg = load_config("tiny/uptrain", overrides, defaults=uptrain["DEFAULTS"], free_form=uptrain["FREE_FORM"], rules=uptrain["RULES"],
                      components=uptrain["COMPONENTS"])
    uptrain["recipe_main"](cfg)
    print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)


def heldout_curve(out: Path, name: str, tokens_per_step: int) -> List[Dict[str, float]]:
    """(step, tokens, held-out loss) of a run, from step 0 (before any update) on."""
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "loss": r["heldout_loss"]}
            for r in records if "heldout_loss" in r]


@torch.no_grad()
def loss_by_position(model: torch.nn.Module, dataset, seq_len: int, batch_size: int = 4) -> torch.Tensor:
    """Mean next-token loss at every position of the dataset's windows, float64 [seq_len]."""
    model.eval()
    total = torch.zeros(seq_len, dtype=torch.float64)
    windows = 0
    for batch in build_dataloader(dataset, batch_size=batch_size, shuffle=False, drop_last=False):
        logits = model(batch["tokens"]).float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
        total += ce.double().sum(0)
        windows += ce.shape[0]
    return total / windows


def position_table(out: Path, steps: int, seq_len: int, heldout: Path, train_len: int,
                   max_windows: Optional[int]) -> Dict[str, Any]:
    """Loss by position bucket for the teacher and the uptrained models, on ``seq_len`` windows."""
    dataset = TokenShardDataset(heldout, seq_len)
    if max_windows is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(max_windows, len(dataset))))
    teacher = load_checkpoint(resolve_path(TEACHER), dtype=torch.float32)
    # The teacher trained on 256 tokens; its RoPE has no table, so it runs longer windows once
    # the hybrid-length guard is lifted. How it fares there is what this measures.
    teacher.max_seq_len = seq_len
    models = {"teacher": teacher}
    models.update({name: load_checkpoint(final_checkpoint(out, name, steps), dtype=torch.float32) for name in POSITION_MODELS})
    buckets = position_buckets(seq_len, train_len)
    result = {"seq_len": seq_len, "windows": len(dataset), "buckets": buckets, "models": {}}
    for name, model in models.items():
        print(f"[positions] {name}: {len(dataset)} windows of {seq_len} tokens", flush=True)
        per_position = loss_by_position(model, dataset, seq_len)
        result["models"][name] = {
            "buckets": [per_position[a:b].mean().item() for a, b in buckets],
            "curve": [round(v, 4) for v in per_position.tolist()],
        }
    return result


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def tables(results: Dict[str, Any]) -> str:
    """The markdown tables of docs/results/mini_supra.md."""
    teacher = results["teacher_heldout_loss"]
    lines = [
        f"Held-out loss (nats/token, {results['heldout_tokens']:,} held-out tokens); teacher {_fmt(teacher)}.",
        "",
        "| run | start | " + " | ".join(f"{t / 1e3:.0f}k tokens" for t in results["report_tokens"]) + " | gap to teacher at the end |",
        "| --- | ---: | " + " | ".join("---:" for _ in results["report_tokens"]) + " | ---: |",
    ]
    for name, run in results["runs"].items():
        by_tokens = {p["tokens"]: p["loss"] for p in run["curve"]}
        cells = [_fmt(by_tokens[t]) for t in results["report_tokens"]]
        end = run["curve"][-1]["loss"]
        lines.append(f"| {name}: {RUNS[name]['label']} | {_fmt(run['curve'][0]['loss'])} | {' | '.join(cells)} | {end - teacher:+.3f} |")
    positions = results["positions"]
    lines += [
        "",
        f"Held-out loss by position, {positions['windows']} windows of {positions['seq_len']} tokens "
        "(trained on 256):",
        "",
        "| model | " + " | ".join(f"positions {a}-{b - 1}" for a, b in positions["buckets"]) + " |",
        "| --- | " + " | ".join("---:" for _ in positions["buckets"]) + " |",
    ]
    for name, model in positions["models"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in model["buckets"]) + " |")
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, Any], docs: Path) -> List[Path]:
    """loss vs tokens (SUPRA vs scratch; ablations) and loss vs position, as PNGs in ``docs``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = results["teacher_heldout_loss"]
    written = []

    def curves(ax, names):
        for name in names:
            curve = results["runs"][name]["curve"]
            ax.plot([p["tokens"] / 1e3 for p in curve], [p["loss"] for p in curve], marker="o", ms=3,
                    label=RUNS[name]["label"])
        ax.axhline(teacher, color="black", ls="--", lw=1, label=f"softmax teacher ({teacher:.2f})")
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    for filename, names, title in (
        ("mini_supra_uptrain_vs_scratch.png", ["supra", "scratch", "softmax"], "SUPRA uptraining vs the same model from scratch"),
        ("mini_supra_ablations.png", ["supra", "supra_seed1", "no_decay", "denominator", "retnet", "frozen"], "SUPRA ablations"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        curves(ax, names)
        ax.set_title(title)
        low = min(p["loss"] for n in names for p in results["runs"][n]["curve"])
        # Runs from random weights start far above; the range keeps the differences near the teacher readable.
        ax.set_ylim(min(low, teacher) - 0.1, min(low, teacher) + 2.5)
        fig.tight_layout()
        fig.savefig(docs / filename, dpi=110)
        plt.close(fig)
        written.append(docs / filename)

    positions = results["positions"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 64
    for name, model in positions["models"].items():
        curve = torch.tensor(model["curve"])
        smoothed = curve[: len(curve) // width * width].view(-1, width).mean(1)
        ax.plot([(i + 0.5) * width for i in range(len(smoothed))], smoothed.tolist(),
                label="softmax teacher" if name == "teacher" else RUNS[name]["label"])
    ax.axvline(256, color="black", ls=":", lw=1, label="training length")
    ax.set_xlabel(f"position in the window (mean over {width}-token bins)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Held-out loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "mini_supra_positions.png", dpi=110)
    plt.close(fig)
    written.append(docs / "mini_supra_positions.png")
    return written


def reproducing_command(args: argparse.Namespace) -> str:
    """The command line that trains these runs and reports them (the options the numbers depend on)."""
    options = {"--steps": args.steps, "--eval-every": args.eval_every, "--eval-batches": args.eval_batches,
               "--long-seq-len": args.long_seq_len, "--position-windows": args.position_windows}
    given = " ".join(f"{k} {v}" for k, v in options.items() if v is not None)
    return f"OMP_NUM_THREADS=1 python recipes/mini_supra.py {given}"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/mini_supra", help="folder of the runs")
    parser.add_argument("--docs", default="docs/results/mini_supra", help="folder for results.json, tables.md, PNGs")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (8 x 256 tokens each)")
    parser.add_argument("--eval-every", type=int, default=30, help="held-out evaluation interval in steps")
    parser.add_argument("--eval-batches", type=int, help="held-out batches per evaluation (default: all)")
    parser.add_argument("--long-seq-len", type=int, default=2048, help="window length of the by-position evaluation")
    parser.add_argument("--position-windows", type=int, help="windows of the by-position evaluation (default: all)")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS),
                        help="train only these runs, no report (to share the runs among processes; then --report-only)")
    parser.add_argument("--force", action="store_true", help="train finished runs again")
    parser.add_argument("--report-only", action="store_true", help="no training: tables and plots from finished runs")
    args = parser.parse_args(argv)
    out, docs = Path(args.out), Path(args.docs)
    start = time.perf_counter()
    uptrain = runpy.run_path(str(recipe_root() / "uptrain.py"), run_name="mini_supra_uptrain")
    if not args.report_only:
        for name in args.only or RUNS:
            train_run(uptrain, out, name, args)
    if args.only:
        return
    missing = [n for n in RUNS if not final_checkpoint(out, n, args.steps).exists()]
    if missing:
        raise SystemExit(f"mini_supra: runs {missing} have no step {args.steps} checkpoint in {out}; train them first")

    cfg = load_config("tiny/uptrain", defaults=uptrain["DEFAULTS"], free_form=uptrain["FREE_FORM"], rules=uptrain["RULES"],
                      components=uptrain["COMPONENTS"])
    tokens_per_step = cfg.batch_size * cfg.data.seq_len
    tokenizer = load_tokenizer(resolve_path(cfg.data.tokenizer))
    heldout = prepare_python_docs(out / "data", tokenizer)["heldout"]
    runs = {name: {"label": RUNS[name]["label"], "overrides": RUNS[name]["overrides"],
                   "curve": heldout_curve(out, name, tokens_per_step)} for name in RUNS}
    supra_start = json.loads((out / "supra" / "metrics.jsonl").read_text().splitlines()[0])
    evaluated = [p["step"] for p in runs["supra"]["curve"] if p["step"]]
    report_steps = sorted({min(evaluated, key=lambda s: abs(s - target)) for target in
                           (evaluated[0], args.steps / 4, args.steps / 2, args.steps)})
    results = {
        "command": reproducing_command(args),
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "teacher_heldout_loss": supra_start["heldout_loss_teacher"],
        "heldout_tokens": len(TokenShardDataset(heldout, cfg.data.seq_len)) * cfg.data.seq_len,
        "report_tokens": [s * tokens_per_step for s in report_steps],
        "runs": runs,
        "positions": position_table(out, args.steps, args.long_seq_len, heldout, cfg.data.seq_len, args.position_windows),
    }
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = tables(results)
    (docs / "tables.md").write_text(text)
    print(text)
    for path in plot(results, docs):
        print(f"wrote {path}")
    print(f"mini_supra: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    main()
