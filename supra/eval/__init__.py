"""Evaluation: lm-eval harness adapter, local llm-foundry tasks, perplexity, passkey retrieval.

- ``supra.eval.harness.SupraLM``: lm-eval model ``supra`` (needs the ``eval`` extra, lm-eval 0.4.x;
  imported on demand so that the rest works without it). ``python -m supra.eval`` is the
  ``lm_eval`` command with it registered.
- ``supra.eval.tasks``: llm-foundry ICL JSONL files (multiple choice, schema, language modeling)
  as lm-eval task YAMLs.
- ``supra.eval.scoring``: batched log-likelihoods from parallel (chunked) forwards.
- ``supra.eval.perplexity``: held-out perplexity, and loss by position bucket in long sequences.
- ``supra.eval.passkey``: passkey retrieval accuracy as a length x depth grid.
"""

from supra.eval.passkey import format_grid, passkey_example, passkey_grid, plot_grid
from supra.eval.perplexity import (
    bucket_losses,
    eval_windows,
    format_buckets,
    perplexity,
    plot_position_losses,
    position_buckets,
    window_losses,
)
from supra.eval.scoring import score_continuations, token_scores
from supra.eval.tasks import read_icl_file, write_task_yamls

__all__ = [
    "bucket_losses",
    "eval_windows",
    "format_buckets",
    "format_grid",
    "passkey_example",
    "passkey_grid",
    "perplexity",
    "plot_grid",
    "plot_position_losses",
    "position_buckets",
    "read_icl_file",
    "score_continuations",
    "token_scores",
    "window_losses",
    "write_task_yamls",
]
