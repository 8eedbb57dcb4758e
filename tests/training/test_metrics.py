"""Metric logging backends, the progress bar, throughput/MFU and FLOPs per token."""

import json
import sys
import types

import pytest
import torch

from supra.models import supra_test_tiny
from supra.training.flops import device_peak_flops, flops_per_token, peak_flops_from_name
from supra.training.metrics import MetricLogger, ProgressBar, Throughput


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- MetricLogger


def test_jsonl_records_are_rounded_flushed_and_appended_on_resume(tmp_path):
    logger = MetricLogger(tmp_path / "run")
    logger.log(1, {"loss": torch.tensor(2.123456789), "lr": 2.9999999999e-5, "tokens": 4096, "phase": "warmup"})
    # Flushed: readable before close.
    first = _records(tmp_path / "run" / "metrics.jsonl")
    assert first[0]["step"] == 1
    assert first[0]["loss"] == 2.12346 and first[0]["lr"] == 3e-5
    assert first[0]["tokens"] == 4096 and first[0]["phase"] == "warmup"
    assert isinstance(first[0]["timestamp"], float)
    logger.close()
    logger.close()

    with MetricLogger(tmp_path / "run") as resumed:
        resumed.log(2, {"loss": float("nan")})
    records = _records(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["loss"] != records[1]["loss"]


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricLogger(tmp_path / "run", rank=1)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_log_validation(tmp_path):
    with MetricLogger(tmp_path) as logger:
        with pytest.raises(ValueError, match="'step'"):
            logger.log(1, {"step": 3})
        with pytest.raises(ValueError, match="'hist' must be a scalar"):
            logger.log(1, {"hist": torch.zeros(3)})
        with pytest.raises(ValueError, match="'cfg' must be a number"):
            logger.log(1, {"cfg": [1, 2]})


def test_missing_backends_name_the_pip_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"supra-lm\[tensorboard\]"):
        MetricLogger(tmp_path, tensorboard_dir=tmp_path / "tb")
    # Every rank fails alike, so none is left waiting for the others.
    with pytest.raises(ImportError, match=r"supra-lm\[wandb\]"):
        MetricLogger(tmp_path, rank=3, wandb={"project": "p"})


def test_tensorboard_and_wandb_backends_receive_scalars(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("tb_init", log_dir))

        def add_scalar(self, key, value, global_step):
            calls.append(("tb", key, value, global_step))

        def close(self):
            calls.append(("tb_close",))

    class FakeRun:
        def log(self, values, step):
            calls.append(("wandb", values, step))

        def finish(self):
            calls.append(("wandb_finish",))

    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = FakeWriter
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: calls.append(("wandb_init", kwargs)) or FakeRun()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    with MetricLogger(tmp_path, tensorboard_dir=tmp_path / "tb", wandb={"project": "supra"}) as logger:
        logger.log(7, {"loss": 1.5, "phase": "a"})
    assert calls == [
        ("tb_init", str(tmp_path / "tb")),
        ("wandb_init", {"project": "supra"}),
        ("tb", "loss", 1.5, 7),
        ("wandb", {"loss": 1.5, "phase": "a"}, 7),
        ("tb_close",),
        ("wandb_finish",),
    ]


# ---------------------------------------------------------------- ProgressBar


def test_progress_bar_shows_metrics_on_stderr(capsys):
    bar = ProgressBar(total_steps=10, initial_step=2)
    bar.update(3, {"loss": 2.5, "lr": 3e-5, "tokens_per_s": 12345.6, "mfu_pct": 41.25, "other": 1})
    bar.update(5)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "5/10" in captured.err
    assert "loss=2.5000" in captured.err and "lr=3e-05" in captured.err
    assert "tok/s=12,346" in captured.err and "mfu=41.2%" in captured.err


def test_disabled_progress_bar_prints_nothing(capsys):
    bar = ProgressBar(total_steps=10, enabled=False)
    bar.update(4, {"loss": 1.0})
    bar.close()
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- Throughput


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_per_rank_global_and_mfu():
    clock = FakeClock()
    meter = Throughput(world_size=4, flops_per_token=1e9, peak_flops=1e12, clock=clock)
    meter.add(1000)
    meter.add(torch.tensor(1000))
    clock.now += 2.0
    rates = meter.compute()
    assert rates == pytest.approx({"tokens_per_s": 4000.0, "tokens_per_s_per_rank": 1000.0, "mfu_pct": 100.0})

    # A new window starts at each compute; an exact global count replaces world_size * local.
    meter.add(500, global_num_tokens=1800)
    clock.now += 1.0
    rates = meter.compute()
    assert rates["tokens_per_s_per_rank"] == 500.0 and rates["tokens_per_s"] == 1800.0
    assert rates["mfu_pct"] == pytest.approx(100.0 * 1e9 * 450.0 / 1e12)


def test_throughput_without_flops_or_time():
    clock = FakeClock()
    meter = Throughput(clock=clock)
    assert meter.compute() == {"tokens_per_s": 0.0, "tokens_per_s_per_rank": 0.0}
    meter.add(10)
    clock.now += 0.5
    assert meter.compute() == {"tokens_per_s": 20.0, "tokens_per_s_per_rank": 20.0}
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        Throughput(world_size=0)


# ---------------------------------------------------------------- FLOPs


def _dims(model):
    embedding = model.tok_embeddings.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return total, embedding


def test_flops_per_token_supra_closed_form():
    model = supra_test_tiny()  # 2 layers, H=4, d=d_k=d_v=8
    total, embedding = _dims(model)
    H, d, T, C = 4, 8, 48, 64
    linear_layer = 3 * H * (2 * min(C, T) * (d + d) + 4 * d * d)
    assert flops_per_token(model, T) == 6 * (total - embedding) + 2 * linear_layer
    # Linear in T beyond one chunk: the attention term stops growing with T.
    assert flops_per_token(model, 4096) == flops_per_token(model, 64)
    assert flops_per_token(model, 4096, chunk_size=16) < flops_per_token(model, 4096)


def test_flops_per_token_hybrid_and_tied():
    model = supra_test_tiny(softmax_layers=[1], tie_word_embeddings=True)
    total, embedding = _dims(model)
    H, d, T = 4, 8, 48
    linear_layer = 3 * H * (2 * 48 * (d + d) + 4 * d * d)
    softmax_layer = 12 * H * d * T
    # Tied: the output matmul still costs 6 * V * D though its weight is the embedding table.
    assert flops_per_token(model, T) == 6 * total + linear_layer + softmax_layer
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        flops_per_token(model, 0)
    with pytest.raises(ValueError, match="tok_embeddings"):
        flops_per_token(torch.nn.Linear(2, 2), 8)


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA H200", torch.bfloat16, 989e12),
        ("NVIDIA A100-SXM4-80GB", torch.float16, 312e12),
        ("NVIDIA GB200", torch.bfloat16, 2.5e15),
        ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, None),
        ("NVIDIA H100 80GB HBM3", torch.float32, None),
        ("Some Future GPU", torch.bfloat16, None),
    ],
)
def test_peak_flops_by_name(name, dtype, peak):
    assert peak_flops_from_name(name, dtype) == peak


def test_no_peak_flops_on_cpu():
    assert device_peak_flops("cpu", torch.bfloat16) is None
    assert device_peak_flops(torch.device("cpu"), torch.float32) is None
