"""The README's Quickstart: the `supra` command, the shipped tiny teacher, and the `make demo`
commands end to end (fewer steps)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from supra._cli.main import main
from supra.checkpoint import load_checkpoint
from supra.config import list_recipes as find_recipes
from supra.config import resolve_path
from supra.data import TokenShardDataset, load_tokenizer
from supra.data.python_docs import check_corpus, prepare_python_docs

ROOT = Path(__file__).resolve().parents[2]
TEACHER = resolve_path("supra:assets/tiny_teacher")


def _make_commands(target: str):
    """The shell lines of a Makefile target, ``$(SUPRA)`` replaced by this interpreter's CLI."""
    lines, inside = [], False
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith(f"{target}:"):
            inside = True
        elif inside and line.startswith("\t"):
            lines.append(line.strip())
        elif inside and line.strip() and not line.startswith("#"):
            break
    return [shlex.split(line.replace("$(SUPRA)", f"{sys.executable} -m supra._cli.main")) for line in lines
            if line.startswith("$(SUPRA)")]


def test_ls_lists_the_recipes(capsys):
    main(["ls"])
    out = capsys.readouterr().out
    for name in ("uptrain", "generate", "tiny_teacher", "mini_supra"):
        assert name in out and name in find_recipes()


def test_unknown_recipe_names_the_available_ones():
    with pytest.raises(SystemExit, match="no recipe named 'nope'; available: .*uptrain"):
        main(["run", "nope"])


def test_run_help_prints_the_usage_and_the_recipes(capsys):
    main(["run", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: supra run RECIPE") and "--config CONFIG" in out and "--nproc-per-node" in out
    assert all(name in out for name in find_recipes())


def test_ls_lists_shipped_configs_and_cp_copies_one(tmp_path, capsys):
    from supra.config import find_config

    main(["ls"])
    listing = capsys.readouterr().out
    assert "tiny/uptrain" in listing and "tiny/teacher" in listing and "mistral_7b/uptrain" in listing
    main(["cp", "tiny/uptrain", str(tmp_path)])
    copied = tmp_path / "uptrain.yaml"
    assert copied.read_text() == find_config("tiny/uptrain").read_text()
    with pytest.raises(SystemExit, match="already exists"):
        main(["cp", "tiny/uptrain", str(copied)])
    with pytest.raises(SystemExit, match="did you mean \\['tiny/uptrain'"):
        main(["cp", "tiny/uptrian", str(tmp_path / "x.yaml")])


def test_the_teacher_reloads_and_reproduces_its_recorded_heldout_loss(tmp_path):
    card = json.loads((TEACHER / "card.json").read_text())
    if check_corpus(card["corpus"]):
        pytest.skip(check_corpus(card["corpus"]))
    model = load_checkpoint(TEACHER, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    heldout = prepare_python_docs(tmp_path, load_tokenizer(TEACHER))["heldout"]
    dataset = TokenShardDataset(heldout, card["heldout"]["seq_len"])
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            logits = model(item["tokens"][None])[0]
            total += F.cross_entropy(logits.double(), item["labels"], reduction="sum").item()
            count += item["labels"].numel()
    assert count == card["heldout"]["tokens"]
    assert total / count == pytest.approx(card["heldout"]["loss"], abs=2e-4)


@pytest.mark.slow
def test_make_demo_uptrains_the_teacher_then_generates_from_the_checkpoint(tmp_path):
    uptrain, *generates = _make_commands("demo")
    assert uptrain[-3:] == ["uptrain", "--config", "tiny/uptrain"] and generates
    out = tmp_path / "demo"
    short = [f"output_dir={out}", "max_steps=6", "scheduler.warmup_steps=1", "eval_every_n_steps=6", "save_every_n_steps=6"]
    run = subprocess.run(uptrain + short, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    losses = dict(re.findall(r"^  (teacher \(softmax\)|linearized, before uptraining|after 6 steps) +([0-9.]+)$",
                             run.stdout, re.MULTILINE))
    assert len(losses) == 3, run.stdout[-2000:]
    card = json.loads((TEACHER / "card.json").read_text())
    if not check_corpus(card["corpus"]):
        # The recipe's evaluation covers the whole held-out split, like the card's.
        assert float(losses["teacher (softmax)"]) == pytest.approx(card["heldout"]["loss"], abs=2e-4)
    teacher, start, end = (float(losses[k]) for k in ("teacher (softmax)", "linearized, before uptraining", "after 6 steps"))
    assert start > teacher + 1.0 and end < start - 0.5
    saved = out / "checkpoints" / "step_0000006" / "model"
    assert f"saved {saved}" in run.stdout and (saved / "tokenizer.model").is_file()
    for command in generates:
        prompt = next(a for a in command if a.startswith("prompt="))[len("prompt="):]
        gen = subprocess.run(command + [f"checkpoint={out}", "max_new_tokens=8"], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
        assert gen.returncode == 0, gen.stdout[-3000:] + gen.stderr[-3000:]
        assert gen.stdout.startswith(prompt) and "recurrent state:" in gen.stdout
