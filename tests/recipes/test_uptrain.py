"""The uptrain recipe end to end on CPU: configs, bad input, resume, loss, FSDP2 with 2 processes."""

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from supra.config import list_configs, load_config, recipe_root, resolve_path
from supra.data import write_token_shards

RECIPE = runpy.run_path(str(recipe_root() / "uptrain.py"), run_name="uptrain_under_test")
# A small softmax model built from scratch on byte tokens instead of tiny/uptrain's teacher.
SMALL = [
    "model={_component_: supra.models.supra_decoder, vocab_size: 258, num_layers: 2, num_heads: 4, num_kv_heads: 2, "
    "embed_dim: 64, intermediate_dim: 128, max_seq_len: 64, softmax_layers: [0, 1]}",
    "data.tokenizer=null", "data.seq_len=64", "batch_size=4", "log_every_n_steps=1", "eval_every_n_steps=null",
    "eval_before_training=false", "eval_batches=4", "scheduler.warmup_steps=2",
]
TEACHER_TOKENIZER = "supra:assets/tiny_teacher/tokenizer.model"


def _config(tmp_path, *overrides):
    return load_config(
        "tiny/uptrain", [f"output_dir={tmp_path}", *SMALL, *overrides],
        defaults=RECIPE["DEFAULTS"], free_form=RECIPE["FREE_FORM"], rules=RECIPE["RULES"], components=RECIPE["COMPONENTS"],
    )


def _losses(output_dir):
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    # A resumed run appends to the same file; the last record of each step wins.
    return {record["step"]: record["loss"] for record in lines if "loss" in record}


UPTRAIN_CONFIGS = sorted(n for n in list_configs() if "uptrain" in n.split("/")[1] or n.endswith(("pretrain", "tiny/teacher")))


@pytest.mark.parametrize("name", UPTRAIN_CONFIGS)
def test_every_shipped_uptrain_config_validates(name):
    config = RECIPE["parse_args"](["--config", name])
    assert config.max_steps > config.scheduler.warmup_steps
    assert config.model._component_ and config.optimizer._component_ and config.scheduler._component_


def test_misspelled_keys_list_the_valid_ones_nearby(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optimzer'. Did you mean 'optimizer'"):
        _config(tmp_path, "optimzer.lr=1e-4")
    with pytest.raises(ValueError, match=r"optimizer: torch.optim.AdamW has no argument 'weight_decy'. Did you mean "
                                         r"'weight_decay'\? Its arguments: \['lr', 'betas'"):
        _config(tmp_path, "optimizer.weight_decy=0.1")
    with pytest.raises(ValueError, match=r"linearize: supra.convert.linearize has no argument 'feature_mapp'. Did you mean 'feature_map'"):
        _config(tmp_path, "linearize.feature_mapp=relu")
    with pytest.raises(ValueError, match=r"linearize.feature_map: components.mlp_feature_map.MLPFeatureMap has no argument "
                                         r"'hiden_mult'. Did you mean 'hidden_mult'"):
        _config(tmp_path, "linearize.feature_map={_component_: components.mlp_feature_map.MLPFeatureMap, hiden_mult: 2}")
    with pytest.raises(ValueError, match=r"model._component_ 'supra.models.no_such_builder' cannot be imported"):
        _config(tmp_path, "model._component_=supra.models.no_such_builder")
    with pytest.raises(ValueError, match=r"scheduler.max_steps is passed by the recipe"):
        _config(tmp_path, "scheduler.max_steps=3")
    with pytest.raises(ValueError, match="overrides must look like key=value"):
        _config(tmp_path, "max_steps")


def _setup(config):
    recipe = RECIPE["UptrainRecipe"](config)
    recipe.setup()
    return recipe


def test_run_shorter_than_warmup_trains_on_the_ramp_with_one_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="supra.uptrain"):
        recipe = _setup(_config(tmp_path, "max_steps=3", "scheduler.warmup_steps=10", "save_every_n_steps=3"))
        recipe.train()
    warnings = [r.getMessage() for r in caplog.records if "never leaves warmup" in r.getMessage()]
    assert len(warnings) == 1
    assert len(_losses(tmp_path)) == 3
    # Each step's lr is (step + 1) / (warmup + 1) of the peak: the ramp, never the decay.
    assert recipe.optimizer.param_groups[0]["lr"] == pytest.approx(recipe.cfg.optimizer.lr * 4 / 11, rel=1e-9)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model={_component_: supra.checkpoint.load_checkpoint, path: /no/such/checkpoint}"], "model.path /no/such/checkpoint does not exist"),
        (["data.type=shards", "data.path=/no/such/shards"], "data.path /no/such/shards does not exist"),
        (["model={_component_: supra.checkpoint.load_checkpoint, path: supra:assets/no_such_model}"], "model.path supra:assets/no_such_model does not exist"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _setup(_config(tmp_path, *overrides))


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=0", "batch_size must be an integer >= 1; got 0 \\(int\\)"),
        ("batch_size=abc", "batch_size must be an integer >= 1; got 'abc' \\(str\\)"),
        ("max_steps=abc", "max_steps must be an integer >= 1; got 'abc' \\(str\\)"),
        ("max_steps=2.5", "max_steps must be an integer >= 1; got 2.5 \\(float\\)"),
        ("optimizer.lr=abc", "optimizer.lr must be a finite number > 0; got 'abc' \\(str\\)"),
        ("optimizer.lr=.nan", "optimizer.lr must be a finite number > 0; got nan \\(float\\)"),
        ("dtype=fp8", r"dtype must be one of \['bf16', 'bfloat16', .*\]; got 'fp8' \(str\)"),
        ("data.type=parquet", r"data.type must be one of \['open_lm', 'python_docs', 'shards', 'text'\]; got 'parquet'"),
        ("eval_batches=0", "eval_batches must be an integer >= 1, or null; got 0"),
        ("compile=yes please", "compile must be true or false; got 'yes please' \\(str\\)"),
        ("scheduler.min_lr_ratio=2", r"scheduler.min_lr_ratio must be a finite number >= 0 and <= 1, or null; got 2 \(int\)"),
        ("optimizer=3", "optimizer must be a component"),
    ],
)
def test_bad_values_are_refused_when_the_config_loads_naming_the_rule_and_the_value(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, override)


def test_empty_dataset_vocab_mismatch_and_indivisible_batch_fail_before_training(tmp_path):
    tiny = write_token_shards([[1, 2, 3]], tmp_path / "tiny", vocab_size=258)
    with pytest.raises(ValueError, match="fewer than one window"):
        _setup(_config(tmp_path / "a", "data.type=shards", f"data.path={tiny}"))
    big_vocab = write_token_shards([list(range(1000)) * 3], tmp_path / "big", vocab_size=1000)
    with pytest.raises(ValueError, match="vocabulary of 1000 ids but the model embeds only 258"):
        _setup(_config(tmp_path / "b", "data.type=shards", f"data.path={big_vocab}"))
    few = write_token_shards([list(range(200))], tmp_path / "few", vocab_size=258)
    with pytest.raises(ValueError, match="batch"):
        _setup(_config(tmp_path / "c", "data.type=shards", f"data.path={few}"))


def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    common = ["max_steps=8", "save_every_n_steps=4"]
    RECIPE["recipe_main"](_config(tmp_path / "straight", *common))
    RECIPE["recipe_main"](_config(tmp_path / "resumed", *common, "stop_after_n_steps=4"))
    assert sorted(_losses(tmp_path / "resumed")) == [1, 2, 3, 4]
    RECIPE["recipe_main"](_config(tmp_path / "resumed", *common, "resume=true"))
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == straight
    from supra.checkpoint import load_checkpoint

    model = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_0000008" / "model")
    assert model(torch.randint(0, 258, (1, 8))).shape == (1, 8, 258)


def test_loss_goes_down_on_real_text(tmp_path):
    RECIPE["recipe_main"](_config(tmp_path, "max_steps=25", "save_every_n_steps=25", "eval_every_n_steps=25"))
    losses = _losses(tmp_path)
    assert sum(losses[s] for s in (23, 24, 25)) / 3 < sum(losses[s] for s in (1, 2, 3)) / 3 - 0.5
    heldout = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "heldout_loss" in l]
    assert heldout and heldout[-1]["heldout_loss"] < 5.0


@pytest.mark.slow
def test_two_processes_with_fsdp_and_compile_match_one_process(tmp_path):
    steps = ["max_steps=4", "save_every_n_steps=4", "compile=true", "activation_checkpointing=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--config", "tiny/uptrain", *SMALL, *steps]
    two = subprocess.run(
        [sys.executable, "-m", "supra._cli.main", "run", "uptrain", "--nproc-per-node", "2", "--master-port", "29533",
         *args, f"output_dir={tmp_path / 'two'}", "batch_size=2"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    RECIPE["recipe_main"](_config(tmp_path / "one", *steps))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)


def test_non_finite_loss_stops_naming_the_step_and_saves_nothing_bad(tmp_path):
    # An absurd learning rate blows the weights up after the first update.
    config = _config(tmp_path, "max_steps=6", "save_every_n_steps=1", "optimizer.lr=1e30", "new_lr=1e30",
                     "scheduler.warmup_steps=0", "clip_grad_norm=null")
    with pytest.raises(FloatingPointError, match=r"(loss|gradient norm) is (nan|inf) at step 2; stopping without saving. "
                                                r"The checkpoint saved after step 1 holds the weights that gave it: moved "
                                                r"to .*\.step_0000001\.diverged. There is no good checkpoint in"):
        RECIPE["recipe_main"](config)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == [".step_0000001.diverged"]


def test_tokenize_command_writes_shards_the_recipe_trains_on(tmp_path):
    from supra._cli.main import main
    from supra.data.python_docs import python_docs_documents

    texts = tmp_path / "docs.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in python_docs_documents("heldout")))
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(python_docs_documents("heldout")), model_prefix=str(tmp_path / "sp"),
        vocab_size=200, model_type="bpe", eos_id=1, bos_id=2, unk_id=0, pad_id=-1,
    )
    assert main(["tokenize", str(texts), "--tokenizer", str(tmp_path / "sp.model"), "--out", str(tmp_path / "shards")]) in (0, None)
    recipe = _setup(_config(tmp_path / "run", "data.type=shards", f"data.path={tmp_path / 'shards'}", "model.vocab_size=200"))
    assert recipe.train_data.vocab_size == 200 and len(recipe.train_data) > 4


def test_supra_paths_name_files_inside_the_installed_package(tmp_path):
    import supra

    package = Path(supra.__file__).resolve().parent
    assert resolve_path("supra:assets/tiny_teacher") == package / "assets" / "tiny_teacher"
    assert resolve_path(TEACHER_TOKENIZER).is_file()
    assert resolve_path(tmp_path / "x") == tmp_path / "x" and resolve_path("rel/x") == Path("rel/x")
    assert resolve_path(None) is None


def test_eval_before_training_reports_softmax_linearized_and_final_losses(tmp_path, capsys):
    RECIPE["recipe_main"](_config(tmp_path, "max_steps=3", "eval_every_n_steps=3", "eval_before_training=true",
                                  "eval_batches=2", "save_every_n_steps=3"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start, end = records[0], records[-1]
    assert start["step"] == 0 and set(start) == {"step", "heldout_loss", "heldout_loss_teacher", "timestamp"}
    # A random softmax model predicts about uniformly; the untrained feature maps change its outputs.
    assert start["heldout_loss_teacher"] != start["heldout_loss"]
    out = capsys.readouterr().out
    assert "held-out loss (512 tokens):" in out
    for name, value in (("teacher (softmax)", start["heldout_loss_teacher"]),
                        ("linearized, before uptraining", start["heldout_loss"]), ("after 3 steps", end["heldout_loss"])):
        assert re.search(rf"  {re.escape(name)} +{value:.4f}", out), (name, out)
    assert f"saved {tmp_path / 'checkpoints' / 'step_0000003' / 'model'}" in out


def test_without_linearization_the_start_is_before_training(tmp_path, capsys):
    RECIPE["recipe_main"](_config(tmp_path, "max_steps=1", "scheduler.warmup_steps=0", "eval_before_training=true",
                                  "eval_batches=1", "linearize=null"))
    out = capsys.readouterr().out
    assert re.search(r"  before training +\d", out) and "teacher" not in out


def test_every_checkpoint_carries_the_data_tokenizer(tmp_path):
    RECIPE["recipe_main"](_config(tmp_path, "max_steps=1", "scheduler.warmup_steps=0", "model.vocab_size=4096",
                                  f"data.tokenizer={TEACHER_TOKENIZER}"))
    saved = tmp_path / "checkpoints" / "step_0000001" / "model"
    assert (saved / "tokenizer.model").read_bytes() == resolve_path(TEACHER_TOKENIZER).read_bytes()
    from supra.data import load_tokenizer

    assert load_tokenizer(saved).vocab_size == 4096


def _checkpoints(output_dir):
    return sorted(p.name for p in (Path(output_dir) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run stopped after 4 of 6 steps, checkpoints at 2 and 4, and the uninterrupted run's losses."""
    root = tmp_path_factory.mktemp("four_steps")
    common = ["max_steps=6", "save_every_n_steps=2", "keep_last_n_checkpoints=2"]
    RECIPE["recipe_main"](_config(root / "straight", *common))
    RECIPE["recipe_main"](_config(root / "stopped", *common, "stop_after_n_steps=4"))
    return root, common, _losses(root / "straight")


def _copy_of_stopped(four_steps, tmp_path):
    import shutil

    root, common, straight = four_steps
    shutil.copytree(root / "stopped", tmp_path / "run")
    return tmp_path / "run", common, straight


def test_every_checkpoint_records_the_sha256_of_each_of_its_files(four_steps):
    import hashlib

    checkpoint = four_steps[0] / "stopped" / "checkpoints" / "step_0000004"
    manifest = json.loads((checkpoint / "sha256.json").read_text())
    files = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != "sha256.json")
    assert sorted(manifest) == files and "config.yaml" in files and "trainer_rank0.pt" in files
    for name, digest in manifest.items():
        assert hashlib.sha256((checkpoint / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize(
    "override, shown",
    [
        ("optimizer.lr=2e-3", "optimizer.lr: 0.001 -> 0.002"),
        ("batch_size=2", "batch_size: 4 -> 2"),
        ("data.seq_len=32", "data.seq_len: 64 -> 32"),
        ("linearize.qk_norm=true", "linearize.qk_norm: 'unset' -> True"),
    ],
)
def test_resume_refuses_changes_to_the_model_data_or_optimization_listing_them(four_steps, tmp_path, override, shown):
    run, common, _ = _copy_of_stopped(four_steps, tmp_path)
    with pytest.raises(ValueError, match=rf"resume=true, but this config differs from the one that trained .*step_0000004 "
                                         rf".*in keys that change the model, the data or the optimization: {re.escape(shown)}\. "
                                         "Set them back"):
        RECIPE["recipe_main"](_config(run, *common, "resume=true", override))


def test_resume_with_max_steps_below_the_checkpoint_step_is_an_error(four_steps, tmp_path):
    run, common, _ = _copy_of_stopped(four_steps, tmp_path)
    with pytest.raises(ValueError, match="max_steps=3 is below the step of the checkpoint to resume, 4 .* nothing to train"):
        RECIPE["recipe_main"](_config(run, *common, "resume=true", "max_steps=3"))


def test_resume_allows_and_logs_safe_changes(four_steps, tmp_path, caplog):
    run, common, straight = _copy_of_stopped(four_steps, tmp_path)
    with caplog.at_level("INFO", logger="supra.uptrain"):
        RECIPE["recipe_main"](_config(run, *common, "resume=true", "max_steps=7", "log_every_n_steps=2",
                                      "keep_last_n_checkpoints=1"))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "resume: changed since step_0000004 (safe to change): " in logged
    assert "log_every_n_steps 1 -> 2" in logged and "max_steps 6 -> 7" in logged
    assert sorted(_losses(run)) == [1, 2, 3, 4, 6, 7]
    assert _checkpoints(run) == ["step_0000007"]


@pytest.mark.parametrize("damage", ["truncate trainer state", "truncate optimizer shard", "flip a weight byte"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_naming_the_file(four_steps, tmp_path, caplog, damage):
    run, common, straight = _copy_of_stopped(four_steps, tmp_path)
    latest = run / "checkpoints" / "step_0000004"
    file = {"truncate trainer state": latest / "trainer_rank0.pt",
            "truncate optimizer shard": next((latest / "optimizer").glob("*.distcp")),
            "flip a weight byte": latest / "model" / "model.safetensors"}[damage]
    data = bytearray(file.read_bytes())
    if damage.startswith("truncate"):
        data = data[: len(data) // 2]
    else:
        data[-3] ^= 0x10
    file.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="supra.uptrain"):
        RECIPE["recipe_main"](_config(run, *common, "resume=true"))
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert str(file) in warning and ".step_0000004.damaged" in warning
    # Resumed from step 2: steps 3 to 6 again, with the uninterrupted run's losses.
    assert _losses(run) == straight


def test_resume_fails_naming_the_files_when_every_checkpoint_is_damaged(four_steps, tmp_path):
    run, common, _ = _copy_of_stopped(four_steps, tmp_path)
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:07d}" / "trainer_rank0.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no checkpoint in .* is intact:\n  .*step_0000004/trainer_rank0.pt does not "
                                         r"match the checksum.*\n  .*step_0000002/trainer_rank0.pt"):
        RECIPE["recipe_main"](_config(run, *common, "resume=true"))


def test_a_checkpoint_is_not_called_good_when_its_weights_give_a_non_finite_loss(tmp_path):
    # The case: lr=100 leaves finite weights after step 1 (saved) whose logits are not finite.
    config = _config(tmp_path, "max_steps=4", "save_every_n_steps=1", "keep_last_n_checkpoints=1", "optimizer.lr=100",
                     "new_lr=100", "scheduler.warmup_steps=0")
    with pytest.raises(FloatingPointError, match="holds the weights that gave it: moved to") as raised:
        RECIPE["recipe_main"](config)
    step = int(re.search(r"at step (\d+)", str(raised.value)).group(1))
    names = _checkpoints(tmp_path)
    assert f".step_{step - 1:07d}.diverged" in names
    good = [n for n in names if n.startswith("step_")]
    # The one before the diverged checkpoint was kept (pruning waits for the next finite loss).
    assert good == ([f"step_{step - 2:07d}"] if step > 2 else [])
    assert ("is intact" if good else "There is no good checkpoint") in str(raised.value)


def test_a_full_disk_at_save_says_so_naming_the_path_and_the_intact_checkpoint(tmp_path, monkeypatch):
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step_0000004" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"saving the checkpoint of step 4 failed: the disk is full \(.* MiB free on the "
                                      rf"filesystem of {re.escape(str(tmp_path / 'checkpoints'))}\).*The last good "
                                      r"checkpoint, .*step_0000002, is intact"):
        RECIPE["recipe_main"](_config(tmp_path, "max_steps=4", "save_every_n_steps=2"))
    monkeypatch.setattr(torch, "save", save)
    assert "step_0000002" in _checkpoints(tmp_path)
    RECIPE["recipe_main"](_config(tmp_path, "max_steps=4", "save_every_n_steps=2", "resume=true"))
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]


def test_a_second_live_run_on_the_same_output_dir_is_refused_and_a_dead_one_holds_nothing(tmp_path):
    first = _setup(_config(tmp_path, "max_steps=1"))
    with pytest.raises(ValueError, match=rf"output_dir {re.escape(str(tmp_path))} is in use by another run \(pid "
                                         rf"{os.getpid()} on .*; lock .*\.lock\)"):
        _setup(_config(tmp_path, "max_steps=1"))
    first.cleanup()
    # A run killed with -9 leaves its lock file, but no lock: the kernel released it.
    killed = subprocess.run([sys.executable, "-c", f"import fcntl, os; f = open({str(tmp_path / '.lock')!r}, 'a'); "
                             "fcntl.flock(f, fcntl.LOCK_EX); os.kill(os.getpid(), 9)"])
    assert killed.returncode == -9 and (tmp_path / ".lock").exists()
    _setup(_config(tmp_path, "max_steps=1")).cleanup()


def test_an_unwritable_output_dir_names_the_path(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=rf"cannot write to output_dir {re.escape(str(tmp_path / 'file' / 'run'))}: "):
        _setup(_config(tmp_path / "file" / "run"))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(output_dir, *overrides, log):
    """``supra run uptrain --nproc-per-node 2`` in a session of its own, as a shell would start it."""
    from supra.data.python_docs import prepare_python_docs

    # Written here once, so that rank 0 does not keep rank 1 waiting at the first barrier.
    prepare_python_docs(Path(output_dir) / "data")
    command = [sys.executable, "-m", "supra._cli.main", "run", "uptrain", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "--config", "tiny/uptrain", *SMALL, "batch_size=2", f"output_dir={output_dir}", *overrides]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _workers(launcher_pid):
    """The live processes below ``launcher_pid`` that run the recipe."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [launcher_pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return [pid for pid in found if _alive(pid) and b"uptrain.py" in _read(f"/proc/{pid}/cmdline")]


def _read(path):
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _alive(pid):
    """Running (a zombie waiting for its parent to reap it runs nothing)."""
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def _kill_group(pid):
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _wait_for_steps(output_dir, steps, process, timeout=900):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = Path(output_dir) / "metrics.jsonl"
        if metrics.exists() and len(_losses(output_dir)) >= steps:
            return
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before step {steps}"
        time.sleep(0.2)
    raise AssertionError(f"no step {steps} within {timeout} s")


@pytest.mark.slow
def test_killing_the_launcher_at_a_random_step_kills_every_worker_and_resume_reproduces_the_losses(tmp_path):
    import random
    import signal
    import time

    common = ["max_steps=6", "save_every_n_steps=2"]
    straight = _launch_two(tmp_path / "straight", *common, log=tmp_path / "straight.log")
    assert straight.wait(timeout=900) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    kill_at = random.randint(1, 5)
    run = tmp_path / "killed"
    launcher = _launch_two(run, *common, log=tmp_path / "killed.log")
    try:
        _wait_for_steps(run, kill_at, launcher)
        workers = _workers(launcher.pid)
        assert len(workers) == 2, (kill_at, workers)
    finally:
        # What a job scheduler or a terminal's kill does: SIGKILL to the launcher's process group.
        _kill_group(launcher.pid)
        launcher.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their launcher (killed after step {kill_at})"
    resumed = _launch_two(run, *common, "resume=true", log=tmp_path / "resumed.log")
    assert resumed.wait(timeout=900) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert _losses(run) == _losses(tmp_path / "straight"), f"killed after step {kill_at}"


@pytest.mark.slow
def test_a_stopped_worker_makes_the_run_fail_naming_the_rank_and_the_step(tmp_path):
    import signal

    run = tmp_path / "run"
    launcher = _launch_two(run, "max_steps=200", "save_every_n_steps=200", "collective_timeout_s=20", log=tmp_path / "log")
    stopped = None
    try:
        _wait_for_steps(run, 1, launcher)
        stopped = next(pid for pid in _workers(launcher.pid) if b"\0RANK=1\0" in b"\0" + _read(f"/proc/{pid}/environ"))
        os.kill(stopped, signal.SIGSTOP)
        returncode = launcher.wait(timeout=600)
    finally:
        _kill_group(launcher.pid)
        if stopped is not None and _alive(stopped):
            os.kill(stopped, signal.SIGKILL)
    output = (tmp_path / "log").read_text()
    assert returncode != 0
    assert re.search(r"rank 0: a collective operation timed out after collective_timeout_s=20 s at step \d+: another "
                     r"process stopped, hangs or died", output), output[-3000:]


def test_a_shard_holding_ids_beyond_the_model_vocabulary_fails_at_setup_naming_it(tmp_path):
    # Written for the model's 200 ids, then damaged; an index from before max_id was recorded.
    shards = write_token_shards([list(range(100)) * 3], tmp_path / "shards", vocab_size=200)
    tokens = np.fromfile(shards / "shard_00000.bin", dtype=np.uint16)
    tokens[-1] = 257
    tokens.tofile(shards / "shard_00000.bin")
    index = json.loads((shards / "index.json").read_text())
    del index["shards"][0]["max_id"]
    (shards / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{re.escape(str(shards / 'shard_00000.bin'))} holds token id 257, but the "
                                         r"model embeds only 200 ids"):
        _setup(_config(tmp_path / "run", "data.type=shards", f"data.path={shards}", "model.vocab_size=200",
                       "data.seq_len=16"))


@pytest.mark.parametrize("name, module", [("tiny/uptrain_mlp_feature_map", "MLPFeatureMap"),
                                          ("tiny/uptrain_learned_decay", "LearnedDecay")])
def test_a_config_naming_a_user_component_trains_and_its_checkpoint_rebuilds_it(tmp_path, monkeypatch, name, module):
    from supra.checkpoint import load_checkpoint

    # components/ imports from the repository root, where configs that name it run.
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    config = RECIPE["parse_args"](["--config", name, f"output_dir={tmp_path}", "max_steps=2", "scheduler.warmup_steps=1",
                                   "eval_every_n_steps=null", "eval_before_training=false", "save_every_n_steps=2",
                                   "batch_size=2", "data.seq_len=64"])
    RECIPE["recipe_main"](config)
    saved = tmp_path / "checkpoints" / "step_0000002" / "model"
    model = load_checkpoint(saved)
    attn = model.layers[0].attn
    assert module in {type(attn.feature_map).__name__, type(attn.decay).__name__}
    if module == "LearnedDecay":
        from supra.modules import alibi_slopes

        # The slopes are trained: the op passes their gradient.
        assert not torch.allclose(attn.decay().double(), alibi_slopes(attn.decay.num_heads), atol=1e-7)
    record = json.loads((saved / "supra_config.json").read_text())
    record["linearize"][0]["feature_map" if module == "MLPFeatureMap" else "decay"]["_component_"] = "components.gone.Missing"
    (saved / "supra_config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"_component_ 'components.gone.Missing' cannot be imported"):
        load_checkpoint(saved, verify_checksums=False)


@pytest.mark.parametrize("name", sorted(list_configs()))
def test_supra_validate_checks_every_shipped_config_without_running_it(name, capsys, monkeypatch):
    from supra._cli.main import main

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    main(["validate", name])
    assert f"{name}: valid for the" in capsys.readouterr().out


def test_supra_validate_names_a_misspelled_component_argument_and_the_nearest(monkeypatch):
    from supra._cli.main import main

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    with pytest.raises(SystemExit, match=r"supra validate: optimizer: torch.optim.AdamW has no argument 'bettas'. "
                                         r"Did you mean 'betas'"):
        main(["validate", "tiny/uptrain", "optimizer.bettas=[0.9, 0.99]"])
