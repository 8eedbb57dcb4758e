"""The eval recipe: lm-eval local tasks, perplexity, loss by position and passkey in one run."""

import json
import math
import runpy

import pytest
import torch
import torch.nn.functional as F

from supra.checkpoint import load_checkpoint, save_checkpoint
from supra.config import load_config, recipe_root
from supra.models import supra_test_tiny

RECIPE = runpy.run_path(str(recipe_root() / "eval.py"), run_name="eval_under_test")
TEXT = "The with statement wraps a block in methods of a context manager. " * 12


def _config(*overrides):
    # The test checkpoints are byte-level models without tokenizer files.
    return load_config("tiny/eval", ["tokenizer=bytes", *overrides], defaults=RECIPE["DEFAULTS"], rules=RECIPE["RULES"])


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(supra_test_tiny(vocab_size=258), tmp_path / "ckpt")


@pytest.mark.slow
def test_one_run_prints_every_table_and_writes_the_json(tmp_path, checkpoint, capsys):
    (tmp_path / "copa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"query": "The man turned on the faucet, therefore", "choices": ["water flowed.", "it rained."], "gold": 0},
        {"query": "The girl was hungry, therefore", "choices": ["she slept.", "she ate."], "gold": 1},
    ]))
    (tmp_path / "held_out.txt").write_text(TEXT + "\n")
    summary = RECIPE["recipe_main"](_config(
        f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'out'}", "tasks=[local_copa]", f"local_data={tmp_path / 'copa.jsonl'}",
        f"perplexity.data={tmp_path / 'held_out.txt'}", "perplexity.seq_len=100", "perplexity.max_windows=1",
        f"position_perplexity.data={tmp_path / 'held_out.txt'}", "position_perplexity.seq_len=64",
        "position_perplexity.first_bucket=16", "passkey.lengths=[260]", "passkey.depths=[0.0,1.0]", "passkey.trials=1",
    ))
    out = capsys.readouterr().out
    assert "|local_copa|" in out.replace(" ", "") and "acc_norm" in out
    assert "perplexity on" in out and "loss by position" in out and "depth \\ length" in out
    tokens = torch.tensor([list(TEXT.encode()[:101])])
    with torch.no_grad():
        logits = load_checkpoint(checkpoint)(tokens[:, :-1])
    expected = math.exp(float(F.cross_entropy(logits[0], tokens[0, 1:])))
    assert summary["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert [(b["start"], b["end"]) for b in summary["position_perplexity"]["buckets"]] == [(0, 16), (16, 32), (32, 64)]
    assert summary["passkey"]["lengths"] == [260] and len(summary["passkey"]["examples"]) == 2
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-4)
    harness = json.loads((tmp_path / "out" / "harness.json").read_text())
    assert set(harness["results"]["local_copa"]) >= {"acc,none", "acc_norm,none"}
    for plot in ("position_loss.png", "passkey.png"):
        assert (tmp_path / "out" / plot).is_file()


def test_clear_errors(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        RECIPE["recipe_main"](_config(f"checkpoint={checkpoint}", f"output_dir={tmp_path}", "perplexity.data=null",
                                      "position_perplexity.data=null", "passkey.lengths=[]"))
    with pytest.raises(ValueError, match="does not exist"):
        RECIPE["recipe_main"](_config(f"checkpoint={tmp_path / 'missing'}", f"output_dir={tmp_path}"))
    with pytest.raises(ValueError, match="unknown config key 'taks'"):
        _config("taks=[local_copa]")
    # /sys refuses new folders even to root.
    with pytest.raises(ValueError, match="cannot create output_dir /sys/supra_eval: .*choose a writable folder"):
        RECIPE["recipe_main"](_config(f"checkpoint={checkpoint}", "output_dir=/sys/supra_eval"))


def test_command_line_reads_config_and_overrides():
    cfg = RECIPE["parse_args"](["--config", "tiny/eval", "limit=5", "tasks=[local_copa]"])
    assert cfg.limit == 5 and list(cfg.tasks) == ["local_copa"] and cfg.checkpoint == "outputs/tiny_uptrain"
    with pytest.raises(ValueError, match="unknown config key 'taks'"):
        RECIPE["parse_args"](["--config", "tiny/eval", "taks=[x]"])


def test_bad_values_are_refused_when_the_config_loads():
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1; got 'abc' \(str\)"):
        RECIPE["parse_args"](["--config", "tiny/eval", "batch_size=abc"])
    with pytest.raises(ValueError, match=r"passkey.trials must be an integer >= 1; got 0"):
        RECIPE["parse_args"](["--config", "tiny/eval", "passkey.trials=0"])
