"""The drivers behind the committed teacher and docs/results/mini_supra.md, at smoke-test size."""

import json
import runpy

import pytest
import torch

from supra.checkpoint import load_checkpoint
from supra.config import recipe_root, resolve_path
from supra.data.python_docs import corpus_record

MINI = runpy.run_path(str(recipe_root() / "mini_supra.py"), run_name="mini_supra_under_test")
TEACHER = runpy.run_path(str(recipe_root() / "tiny_teacher.py"), run_name="tiny_teacher_under_test")


def test_position_buckets_start_at_the_training_length_and_double():
    assert MINI["position_buckets"](2048, 256) == [[0, 256], [256, 512], [512, 1024], [1024, 2048]]
    assert MINI["position_buckets"](600, 256) == [[0, 256], [256, 512], [512, 600]]
    assert MINI["position_buckets"](256, 256) == [[0, 256]]


@pytest.mark.slow
def test_tiny_teacher_writes_a_loadable_bf16_teacher_with_its_card(tmp_path, capsys):
    TEACHER["main"](["--out", str(tmp_path / "teacher"), "--work", str(tmp_path / "work"), "max_steps=2",
                     "scheduler.warmup_steps=1", "eval_every_n_steps=2"])
    card = json.loads((tmp_path / "teacher" / "card.json").read_text())
    model = load_checkpoint(tmp_path / "teacher")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["corpus"] == corpus_record()
    # The tokenizer is trained deterministically: the same file as the committed teacher's.
    committed = json.loads((resolve_path("supra:assets/tiny_teacher") / "card.json").read_text())
    if committed["corpus"] == card["corpus"]:
        assert card["tokenizer"]["sha256"] == committed["tokenizer"]["sha256"]
    assert [p["step"] for p in card["heldout_curve"]] == [0, 2]
    assert f"held-out loss {card['heldout']['loss']:.4f}" in capsys.readouterr().out


@pytest.mark.slow
def test_mini_supra_trains_every_run_and_writes_tables_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plots need the bench extra (pip install -e .[bench])")
    docs = tmp_path / "docs"
    MINI["main"](["--out", str(tmp_path / "runs"), "--docs", str(docs), "--steps", "2", "--eval-every", "1",
                  "--eval-batches", "1", "--long-seq-len", "512", "--position-windows", "1"])
    results = json.loads((docs / "results.json").read_text())
    assert sorted(results["runs"]) == sorted(MINI["RUNS"])
    for run in results["runs"].values():
        assert [p["step"] for p in run["curve"]] == [0, 1, 2]
    assert sorted(results["positions"]["models"]) == ["no_decay", "retnet", "supra", "teacher"]
    tables = (docs / "tables.md").read_text()
    assert tables in capsys.readouterr().out
    assert "| supra: SUPRA (uptrained teacher) |" in tables and "| softmax: " in tables and "positions 256-511" in tables
    for name in ("mini_supra_uptrain_vs_scratch.png", "mini_supra_ablations.png", "mini_supra_positions.png"):
        assert (docs / name).read_bytes()[:4] == b"\x89PNG"
    # A second call reuses the finished runs and rebuilds the same tables.
    MINI["main"](["--out", str(tmp_path / "runs"), "--docs", str(docs), "--steps", "2", "--eval-every", "1",
                  "--report-only", "--long-seq-len", "512", "--position-windows", "1"])
    assert (docs / "tables.md").read_text() == tables
