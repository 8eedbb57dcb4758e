"""lm-eval end to end on local llm-foundry tasks: a tiny checkpoint through the registered model,
hand-checked acc / acc_norm, the ``python -m supra.eval`` command line, and unknown task names."""

from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval._cli import HarnessCLI

from supra.checkpoint import load_checkpoint
from supra.eval.__main__ import main as lm_eval_main
from supra.eval.harness import SupraLM
from supra.eval.runner import harness_table, prepare_tasks, run_harness

pytestmark = pytest.mark.slow
TASKS = ["local_arc_easy", "local_schema_mini", "local_lm_mini"]


def direct_logprob(model, context: str, continuation: str) -> float:
    context_ids, continuation_ids = list(context.encode()), list(continuation.encode())
    tokens = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens[:, :-1])[0], dim=-1)
    start = len(context_ids) - 1
    return sum(float(logprobs[start + i, t]) for i, t in enumerate(continuation_ids))


def test_local_tasks_run_end_to_end_and_match_direct_scores(tiny_checkpoint, icl_dir, icl_records, tmp_path):
    manager = prepare_tasks(TASKS, local_data=icl_dir, work_dir=tmp_path)
    results = simple_evaluate(
        model="supra", model_args={"checkpoint": str(tiny_checkpoint), "tokenizer": "bytes", "batch_size": 3},
        device="cpu", tasks=TASKS, task_manager=manager, log_samples=True, bootstrap_iters=0,
    )
    model = load_checkpoint(tiny_checkpoint)
    # Multiple choice: "<query stripped>\nAnswer:" then " <choice>" (ARC's llm-foundry delimiter).
    hits = hits_norm = 0
    for sample, doc in zip(results["samples"]["local_arc_easy"], icl_records["multiple_choice"]):
        expected = [direct_logprob(model, doc["query"].strip() + "\nAnswer:", " " + c) for c in doc["choices"]]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, abs=1e-3)
        hits += int(np.argmax(expected) == doc["gold"])
        hits_norm += int(np.argmax(np.array(expected) / [len(c) for c in doc["choices"]]) == doc["gold"])
    arc = results["results"]["local_arc_easy"]
    assert (arc["acc,none"], arc["acc_norm,none"]) == pytest.approx((hits / 5, hits_norm / 5))
    # Schema: each option is the context of " <continuation>".
    for sample, doc in zip(results["samples"]["local_schema_mini"], icl_records["schema"]):
        expected = [direct_logprob(model, option, " " + doc["continuation"]) for option in doc["context_options"]]
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, abs=1e-3)
    # Language modeling: the continuation after a space, correct only if greedy all along.
    for sample, doc in zip(results["samples"]["local_lm_mini"], icl_records["language_modeling"]):
        assert sample["resps"][0][0][0] == pytest.approx(direct_logprob(model, doc["context"], " " + doc["continuation"]), abs=1e-3)
    assert "local_arc_easy" in harness_table(results)


def test_acc_and_acc_norm_equal_the_hand_computed_values(icl_dir, uniform_model, tmp_path):
    # conftest.MULTIPLE_CHOICE: under equal logits acc picks the shortest choice (right 3 times
    # out of 5) and acc_norm the longest (right twice).
    tasks = ["local_arc_easy", "local_lm_mini"]
    manager = prepare_tasks(tasks, local_data=icl_dir, work_dir=tmp_path)
    lm = SupraLM(model=uniform_model, tokenizer="bytes", device="cpu")
    # Per-task shot counts (the paper's MMLU is 5-shot, the rest 0): one harness run per count, merged.
    results = run_harness(lm, tasks, manager, num_fewshot={"local_lm_mini": 1}, bootstrap_iters=0)
    arc = results["results"]["local_arc_easy"]
    assert (arc["acc,none"], arc["acc_norm,none"]) == (pytest.approx(0.6), pytest.approx(0.4))
    assert results["n-shot"] == {"local_arc_easy": 0, "local_lm_mini": 1}
    assert "local_lm_mini" in harness_table(results)


def test_the_lm_eval_command_gets_supra_and_the_local_tasks(tiny_checkpoint, icl_dir, tmp_path, monkeypatch):
    # lm-eval's own command line parses the arguments; its run (tested through simple_evaluate
    # above, and reading the harness's whole task index, slow) is replaced by a recorder.
    executed = []
    monkeypatch.setattr(HarnessCLI, "execute", lambda self, args: executed.append(args))
    lm_eval_main([
        "--model", "supra", "--model_args", f"checkpoint={tiny_checkpoint},tokenizer=bytes", "--device", "cpu",
        "--local_data", str(icl_dir), "--tasks", "local_icl",
    ])
    [args] = executed
    assert (args.command, args.model, args.tasks) == ("run", "supra", ["local_icl"])
    written = sorted(p.name for p in Path(args.include_path).glob("*.yaml"))
    assert written == ["local_arc_easy.yaml", "local_lm_mini.yaml", "local_schema_mini.yaml"]
    with pytest.raises(SystemExit, match="give one of the two"):
        lm_eval_main(["--local_data", str(icl_dir), "--include_path", str(tmp_path), "--tasks", "x"])


def test_supra_lm_eval_subcommand_is_the_same_command(tiny_checkpoint, monkeypatch):
    from supra._cli.main import main as supra_main

    executed = []
    monkeypatch.setattr(HarnessCLI, "execute", lambda self, args: executed.append(args))
    supra_main(["lm-eval", "--model", "supra", "--model_args", f"checkpoint={tiny_checkpoint}", "--tasks", "piqa"])
    [args] = executed
    assert (args.model, args.tasks) == ("supra", ["piqa"])


def test_unknown_task_names_and_malformed_files_fail_before_any_model_loads(icl_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task\(s\): 'local_arc_esay' \(closest: \['local_arc_easy'"):
        prepare_tasks(["local_arc_esay"], local_data=icl_dir, work_dir=tmp_path)
    (icl_dir / "lm_mini.jsonl").write_text('{"context": "a", "continuation": "b"}\n{"context": "a"\n')
    with pytest.raises(ValueError, match=r"lm_mini.jsonl:2: not valid JSON"):
        prepare_tasks(["local_lm_mini"], local_data=icl_dir, work_dir=tmp_path)
