"""Evaluate any checkpoint ``load_checkpoint`` reads: lm-eval tasks, perplexity, loss by position,
passkey retrieval.

    supra run eval --config tiny/eval
    supra run eval --config tiny/eval tasks=[local_copa,local_piqa] local_data=supra:assets/eval_data limit=20
    supra run eval --config mistral_7b/eval checkpoint=checkpoints/mistral-supra

Each part runs when configured: ``tasks`` (lm-eval harness: its own tasks online, local llm-foundry
files from ``local_data``), ``perplexity.data``, ``position_perplexity.data``, ``passkey.lengths``.
Prints each table; writes ``output_dir/harness.json`` (lm-eval's results), ``results.json`` (all
numbers) and the plots.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from supra.config import Rule, parse_recipe_args, to_dict
from supra.loading import DTYPES, default_add_bos, load_model, resolve_checkpoint, resolve_device, resolve_dtype, resolve_tokenizer
from supra.eval.passkey import format_grid, passkey_grid, plot_grid
from supra.eval.perplexity import (
    bucket_losses,
    eval_windows,
    format_buckets,
    perplexity,
    plot_position_losses,
    position_buckets,
    window_losses,
)

DEFAULTS = {
    "checkpoint": None,
    "tokenizer": None,
    "linearize": None,
    "device": "auto",
    "dtype": None,
    "batch_size": 8,
    "max_length": None,
    "add_bos": None,
    "chunk_size": 4096,
    "output_dir": "outputs/eval",
    "seed": 0,
    "tasks": [],
    "local_data": None,
    "include_path": None,
    "num_fewshot": None,
    "limit": None,
    "log_samples": False,
    "perplexity": {"data": None, "seq_len": 2048, "max_windows": 64, "text_key": "text"},
    "position_perplexity": {
        "data": None, "seq_len": 16384, "max_windows": 8, "first_bucket": 64, "single_document": True, "text_key": "text",
    },
    "passkey": {"lengths": [], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "trials": 5, "digits": 5},
    "verify_checksums": True,
}
# What the defaults' types do not say: ranges, choices, and the keys that may be null.
RULES = {
    "checkpoint": Rule(str, nullable=True),
    "tokenizer": Rule(str, nullable=True),
    "linearize": Rule(bool, nullable=True),
    "dtype": Rule(choices=[*DTYPES, "auto"], nullable=True),
    "batch_size": Rule(int, low=1),
    "max_length": Rule(int, low=1, nullable=True),
    "add_bos": Rule(bool, nullable=True),
    "chunk_size": Rule(int, low=1),
    "seed": Rule(int, low=0),
    "limit": Rule(float, low=0, low_open=True, nullable=True),
    "perplexity.data": Rule(str, nullable=True),
    "perplexity.seq_len": Rule(int, low=1),
    "perplexity.max_windows": Rule(int, low=1, nullable=True),
    "position_perplexity.data": Rule(str, nullable=True),
    "position_perplexity.seq_len": Rule(int, low=1),
    "position_perplexity.max_windows": Rule(int, low=1, nullable=True),
    "position_perplexity.first_bucket": Rule(int, low=1),
    "passkey.trials": Rule(int, low=1),
    "passkey.digits": Rule(int, low=1),
}


def _plot(plot, data, path: Path) -> None:
    """Plots, or says why not: a missing matplotlib must not throw away the numbers."""
    try:
        print(f"plot: {plot(data, path)}")
    except ValueError as error:
        print(f"no plot: {error}")


def _harness(cfg: DictConfig, model, tokenizer, output_dir: Path, manager) -> Dict[str, Any]:
    from supra.eval.harness import SupraLM
    from supra.eval.runner import harness_table, run_harness, write_harness_json

    lm = SupraLM(
        model=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(next(model.parameters()).device),
        max_length=cfg.max_length, add_bos=cfg.add_bos, chunk_size=cfg.chunk_size,
    )
    shots = OmegaConf.to_container(cfg.num_fewshot) if OmegaConf.is_dict(cfg.num_fewshot) else cfg.num_fewshot
    results = run_harness(
        lm, list(cfg.tasks), manager, num_fewshot=shots, limit=cfg.limit, log_samples=cfg.log_samples, seed=cfg.seed,
    )
    print(harness_table(results))
    print(f"lm-eval results: {write_harness_json(results, output_dir / 'harness.json')}")
    return {"results": results["results"], "groups": results.get("groups", {}), "n-shot": results.get("n-shot", {})}


def _perplexity(cfg: DictConfig, model, tokenizer, add_bos: bool) -> Dict[str, Any]:
    section = cfg.perplexity
    windows = eval_windows(
        section.data, section.seq_len, tokenizer=tokenizer, max_windows=section.max_windows, add_bos=add_bos,
        text_key=section.text_key,
    )
    result = perplexity(window_losses(model, windows, batch_size=cfg.batch_size, chunk_size=cfg.chunk_size))
    print(f"perplexity on {section.data}: {result['perplexity']:.3f} (loss {result['loss']:.4f} over "
          f"{result['tokens']:,} tokens in windows of {section.seq_len})")
    return {"data": str(section.data), "seq_len": section.seq_len, **result}


def _position_perplexity(cfg: DictConfig, model, tokenizer, add_bos: bool, output_dir: Path) -> Dict[str, Any]:
    section = cfg.position_perplexity
    windows = eval_windows(
        section.data, section.seq_len, tokenizer=tokenizer, max_windows=section.max_windows,
        single_document=section.single_document, add_bos=add_bos, text_key=section.text_key,
    )
    # Long windows one at a time: their logits dominate memory.
    losses = window_losses(model, windows, batch_size=1, chunk_size=cfg.chunk_size)
    rows = bucket_losses(losses, position_buckets(section.seq_len, section.first_bucket))
    print(f"loss by position ({len(windows)} windows of {section.seq_len} tokens from {section.data}):")
    print(format_buckets(rows))
    _plot(plot_position_losses, {Path(str(cfg.checkpoint)).name: rows}, output_dir / "position_loss.png")
    return {"data": str(section.data), "seq_len": section.seq_len, "windows": len(windows), "buckets": rows}


def _passkey(cfg: DictConfig, model, tokenizer, add_bos: bool, output_dir: Path) -> Dict[str, Any]:
    section = cfg.passkey
    grid = passkey_grid(
        model, tokenizer, list(section.lengths), list(section.depths), trials=section.trials, digits=section.digits,
        seed=cfg.seed, add_bos=add_bos, batch_size=1, chunk_size=cfg.chunk_size,
    )
    print(f"passkey retrieval accuracy ({section.trials} keys per cell):")
    print(format_grid(grid))
    _plot(plot_grid, grid, output_dir / "passkey.png")
    return grid


def recipe_main(cfg: DictConfig) -> Dict[str, Any]:
    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create output_dir {output_dir}: {error.strerror} ({error.filename}); choose a "
                         "writable folder") from error
    manager = None
    if cfg.tasks:
        # Check task names and local files before spending minutes loading the model.
        try:
            from supra.eval.runner import prepare_tasks
        except ImportError as error:
            raise ValueError(f"tasks= needs lm-eval ({error}): pip install 'supra-lm[eval]'") from error

        local = OmegaConf.to_container(cfg.local_data) if OmegaConf.is_list(cfg.local_data) else cfg.local_data
        manager = prepare_tasks(list(cfg.tasks), local_data=local, include_path=cfg.include_path, work_dir=output_dir)
    elif not (cfg.perplexity.data or cfg.position_perplexity.data or cfg.passkey.lengths):
        raise ValueError("nothing to evaluate: set tasks=[...], perplexity.data, position_perplexity.data or passkey.lengths")
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    tokenizer = resolve_tokenizer(cfg.tokenizer, checkpoint)
    model = load_model(checkpoint, dtype=resolve_dtype(cfg.dtype), device=resolve_device(cfg.device), linearize=cfg.linearize,
                       verify_checksums=cfg.verify_checksums)
    add_bos = default_add_bos(tokenizer, cfg.add_bos)
    summary: Dict[str, Any] = {"checkpoint": str(checkpoint), "config": to_dict(cfg)}
    if cfg.tasks:
        summary["harness"] = _harness(cfg, model, tokenizer, output_dir, manager)
    if cfg.perplexity.data:
        summary["perplexity"] = _perplexity(cfg, model, tokenizer, add_bos)
    if cfg.position_perplexity.data:
        summary["position_perplexity"] = _position_perplexity(cfg, model, tokenizer, add_bos, output_dir)
    if cfg.passkey.lengths:
        summary["passkey"] = _passkey(cfg, model, tokenizer, add_bos, output_dir)
    path = output_dir / "results.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"all results: {path}")
    return summary


def parse_args(argv: Optional[List[str]] = None) -> DictConfig:
    return parse_recipe_args(__doc__, DEFAULTS, 'tasks=[local_copa] limit=50', argv, rules=RULES)


if __name__ == "__main__":
    try:
        recipe_main(parse_args())
    except ValueError as error:
        raise SystemExit(f"eval: {error}") from error
