"""A recipe copied with ``supra cp`` runs under torchtune's own launcher, ``tune run``, single
process and with ``--nproc_per_node 2``, and saves a checkpoint that ``load_checkpoint`` reads."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from supra._cli.main import main
from supra.checkpoint import load_checkpoint
from supra.config import recipe_root

TUNE = Path(sys.executable).parent / "tune"
SHORT = ["--config", "tiny/uptrain", "max_steps=2", "scheduler.warmup_steps=1", "eval_before_training=false",
         "eval_every_n_steps=null", "save_every_n_steps=2", "data.seq_len=64", "batch_size=2"]


def test_cp_copies_a_recipe_as_well_as_a_config(tmp_path):
    main(["cp", "uptrain", str(tmp_path / "my_uptrain.py")])
    assert (tmp_path / "my_uptrain.py").read_text() == (recipe_root() / "uptrain.py").read_text()
    main(["cp", "generate", str(tmp_path)])
    assert (tmp_path / "generate.py").exists()
    with pytest.raises(SystemExit, match="'uptrian' is not a shipped recipe .*did you mean"):
        main(["cp", "uptrian", str(tmp_path / "x.py")])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["--nproc_per_node", "2"]], ids=["single", "two_processes"])
def test_copied_recipe_trains_under_tune_run(tmp_path, launcher):
    if not TUNE.exists():
        pytest.skip(f"torchtune's tune command is not beside {sys.executable}")
    main(["cp", "uptrain", str(tmp_path / "my_uptrain.py")])
    # tune run imports a custom recipe as a module named after its path, from the current folder.
    command = [str(TUNE), "run", *launcher, "my_uptrain.py", *SHORT, "output_dir=out"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    model = load_checkpoint(tmp_path / "out" / "checkpoints" / "step_0000002" / "model", dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model(torch.tensor([[1, 2, 3]])).shape[:2] == (1, 3)
