"""Build the tiny softmax teacher that ``tiny/uptrain`` linearizes, from nothing but Python's own text.

    supra run tiny_teacher --out supra/assets/tiny_teacher        (what ``make teacher`` runs)

1. trains the sentencepiece tokenizer (vocabulary 4096) on the training split of the python_docs
   corpus (``supra.data.python_docs``);
2. pretrains a softmax Llama-style decoder on it with the uptrain recipe and ``tiny/teacher``;
3. saves it in bf16 as a supra checkpoint folder with ``tokenizer.model`` and ``card.json``: the
   corpus record (Python version, SHA-256 of each split), the held-out loss of the saved weights
   over the whole held-out split, and the command.

Offline, CPU, about 20 minutes on one thread. Training runs in fp32 with the threads given; the same
torch version and thread count reproduce the weights, other ones the losses to about 1e-3.
"""

import argparse
import hashlib
import json
import logging
import platform
import runpy
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from supra.checkpoint import load_checkpoint, save_checkpoint
from supra.config import load_config, recipe_root
from supra.data import TokenShardDataset, build_dataloader, load_tokenizer
from supra.data.python_docs import corpus_record, prepare_python_docs, train_tokenizer
from supra.training.loss import lm_loss

CONFIG = "tiny/teacher"
VOCAB_SIZE = 4096
CARD = "card.json"


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, folder: Path, seq_len: int, batch_size: int = 8) -> Dict[str, float]:
    """Mean next-token loss of ``model`` over every window of ``seq_len`` tokens of a shard folder.

    Returns:
        {"loss": mean cross-entropy in nats, "tokens": target tokens counted}.
    """
    dataset = TokenShardDataset(folder, seq_len)
    loader = build_dataloader(dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    ce, tokens = 0.0, 0
    model.eval()
    for batch in loader:
        parts = lm_loss(model(batch["tokens"]), batch["labels"])
        ce += parts.ce_sum.double().item()
        tokens += int(parts.num_tokens)
    return {"loss": ce / tokens, "tokens": tokens}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _heldout_curve(metrics: Path, tokens_per_step: int) -> List[Dict[str, float]]:
    """The held-out losses logged while training (fp32 weights), with the tokens seen by then."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "loss": r["heldout_loss"]}
            for r in records if "heldout_loss" in r]


def build_teacher(out: Path, work: Path, overrides: List[str]) -> Dict[str, Any]:
    """Runs the three stages; returns the card written to ``out/card.json``."""
    start = time.perf_counter()
    print(f"[1/3] tokenizer: sentencepiece BPE, vocabulary {VOCAB_SIZE}, on the python_docs training split", flush=True)
    tokenizer_path = train_tokenizer(work / "tokenizer", VOCAB_SIZE)

    print(f"[2/3] pretraining the softmax teacher with {CONFIG} in {work / 'run'}", flush=True)
    uptrain = runpy.run_path(str(recipe_root() / "uptrain.py"), run_name="tiny_teacher_uptrain")
    args = [f"output_dir={work / 'run'}", f"data.tokenizer={tokenizer_path}", *overrides]
    cfg = load_config(CONFIG, args, defaults=uptrain["DEFAULTS"], free_form=uptrain["FREE_FORM"], rules=uptrain["RULES"],
                      components=uptrain["COMPONENTS"])
    uptrain["recipe_main"](cfg)
    final = sorted((work / "run" / "checkpoints").glob("step_*"))[-1] / "model"

    print(f"[3/3] saving {final} in bf16 to {out}, measuring its held-out loss", flush=True)
    model = load_checkpoint(final, dtype=torch.bfloat16)
    save_checkpoint(model, out, overwrite=True)
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    folders = prepare_python_docs(work / "data", load_tokenizer(out / "tokenizer.model"))
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.data.seq_len
    measured = heldout_loss(load_checkpoint(out, dtype=torch.float32), folders["heldout"], cfg.data.seq_len)
    card = {
        "name": "tiny_teacher",
        "what": "softmax Llama-style decoder pretrained on the python_docs corpus; the teacher of tiny/uptrain",
        "command": "make teacher  (python recipes/tiny_teacher.py --out supra/assets/tiny_teacher)",
        "config": CONFIG,
        "overrides": overrides,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "bf16",
        "train_tokens": cfg.max_steps * tokens_per_step,
        "tokenizer": {"file": "tokenizer.model", "vocab_size": VOCAB_SIZE, "sha256": _sha256(out / "tokenizer.model")},
        "corpus": corpus_record(),
        "heldout": {"loss": round(measured["loss"], 5), "tokens": measured["tokens"], "seq_len": cfg.data.seq_len,
                    "how": "mean next-token cross-entropy (nats) of the saved weights in fp32 over every "
                           "non-overlapping window of the held-out split"},
        "heldout_curve": _heldout_curve(work / "run" / "metrics.jsonl", tokens_per_step),
        "built_with": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - start)},
    }
    (out / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/tiny_teacher/teacher", help="the teacher folder to write")
    parser.add_argument("--work", default="outputs/tiny_teacher", help="folder for the tokenizer, run and data")
    parser.add_argument("overrides", nargs="*", help="uptrain overrides for tiny/teacher (e.g. max_steps=10 for a smoke test)")
    args = parser.parse_args(argv)
    card = build_teacher(Path(args.out), Path(args.work), args.overrides)
    print(f"teacher: {args.out} ({card['parameters']:,} parameters, bf16); held-out loss "
          f"{card['heldout']['loss']:.4f} over {card['heldout']['tokens']:,} tokens (Python {card['corpus']['python']})")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    main()
