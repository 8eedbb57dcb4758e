"""The benchmarks' ``--checkpoint`` option: it parses, leaves the synthetic defaults alone, and runs
end to end on a tiny checkpoint the test writes (an HF llama folder with tied embeddings whose
``max_position_embeddings`` is shorter than the caches and prompts the benchmark uses)."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name, monkeypatch):
    # generation.py sets OMP_WAIT_POLICY on import (for its own process): undone after the test.
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
        intermediate_size=64, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )).save_pretrained(folder)
    return folder


def test_generation_defaults_unchanged_and_option_checked(monkeypatch, tiny_checkpoint):
    generation = _load("generation", monkeypatch)
    args = generation.parse_args([])
    assert args.checkpoint is None and args.kv_heads == generation.HEADS and args.prefill_lens == [8192]
    assert args.plot.endswith("generation_benchmark.png")
    args = generation.parse_args(["--checkpoint", str(tiny_checkpoint), "--prefill-len", "2048", "512"])
    assert args.kv_heads is None and args.prefill_lens == [512, 2048] and args.plot == "none"
    with pytest.raises(SystemExit):
        generation.parse_args(["--checkpoint", str(tiny_checkpoint), "--kv-heads", "2"])


def test_generation_runs_on_a_checkpoint(monkeypatch, tiny_checkpoint, capsys):
    generation = _load("generation", monkeypatch)
    generation.main([
        "--checkpoint", str(tiny_checkpoint), "--contexts", "8", "40", "--rounds", "1", "--steps", "1",
        "--prefill-len", "16", "48", "--prefill-reps", "1", "--loop-tokens", "2", "--generate-tokens", "2",
        "--no-compile", "--no-memory", "--threads", "1",
    ])
    out = capsys.readouterr().out
    assert "2 layers x 32 wide, GQA 4/2 heads of 8, SwiGLU 64, vocab 96, tied embeddings" in out
    assert "Prefill of 16 tokens" in out and "Prefill of 48 tokens" in out
    # Caches of 40 + steps and a 48-token prompt, past the checkpoint's 32 positions.
    assert "      40 |" in out and "Targets (set for the synthetic" in out


def test_generation_weight_floor_counts_the_tied_output(monkeypatch, tiny_checkpoint, tmp_path):
    from supra.checkpoint import save_checkpoint

    generation = _load("generation", monkeypatch)
    softmax, linear = generation.build_models(64, None, 0, checkpoint=str(tiny_checkpoint))
    assert softmax.max_seq_len == 64
    shape = generation.model_shape(softmax)
    linear_bytes = sum(m.weight.numel() * 4 for m in softmax.modules() if isinstance(m, torch.nn.Linear))
    assert generation.weight_bytes(softmax) == linear_bytes + shape["vocab"] * shape["dim"] * 4
    save_checkpoint(linear, tmp_path / "supra")
    with pytest.raises(ValueError, match="SUPRA layers"):
        generation.build_models(64, None, 0, checkpoint=str(tmp_path / "supra"))


def test_uptrain_defaults_unchanged_and_option_checked(monkeypatch, tiny_checkpoint):
    uptrain = _load("uptrain_cpu", monkeypatch)
    args = uptrain.parse_args([])
    assert (args.layers, args.dim, args.heads, args.kv_heads, args.intermediate, args.vocab) == (6, 512, 8, 2, 1536, 32000)
    args = uptrain.parse_args(["--checkpoint", str(tiny_checkpoint)])
    assert args.layers is None and args.vocab is None
    with pytest.raises(SystemExit):
        uptrain.parse_args(["--checkpoint", str(tiny_checkpoint), "--layers", "4"])


@pytest.mark.slow
def test_uptrain_runs_on_a_checkpoint(monkeypatch, tiny_checkpoint, capsys):
    uptrain = _load("uptrain_cpu", monkeypatch)
    argv = ["--checkpoint", str(tiny_checkpoint), "--seq-lens", "48", "--steps", "1", "--warmup", "0", "--threads", "1"]
    uptrain.main(uptrain.parse_args(argv), argv)
    out = capsys.readouterr().out
    assert "the checkpoint's shape: 2 layers x 32, heads 4/2, SwiGLU 64, vocab 96, tied embeddings" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("   48 ")]
    assert [row[1] for row in rows] == ["softmax", "supra"]
    assert "NON-FINITE" not in out
