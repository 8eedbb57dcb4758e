"""The `supra` command and the quickstart recipe, end to end (small sizes)."""

import re

import pytest

from supra._cli.main import main
from supra.config import list_recipes as find_recipes


def test_ls_lists_the_quickstart(capsys):
    main(["ls"])
    assert "quickstart" in capsys.readouterr().out
    assert "quickstart" in find_recipes()


def test_run_quickstart_checks_recurrent_against_parallel(capsys):
    main(["run", "quickstart", "--prompt-len", "70", "--new-tokens", "3"])
    out = capsys.readouterr().out
    error = float(re.search(r"differs by at most ([0-9.e+-]+)", out).group(1))
    assert error < 1e-3
    generated = re.search(r"from the recurrent state: \[([0-9, ]+)\]", out).group(1)
    assert len(generated.split(",")) == 3


def test_unknown_recipe_names_the_available_ones():
    with pytest.raises(SystemExit, match="no recipe named 'nope'; available: .*quickstart"):
        main(["run", "nope"])


def test_ls_lists_shipped_configs_and_cp_copies_one(tmp_path, capsys):
    from supra.config import find_config

    main(["ls"])
    listing = capsys.readouterr().out
    assert "tiny/uptrain" in listing and "mistral_7b/uptrain" in listing and "uptrain" in listing
    main(["cp", "tiny/uptrain", str(tmp_path)])
    copied = tmp_path / "uptrain.yaml"
    assert copied.read_text() == find_config("tiny/uptrain").read_text()
    with pytest.raises(SystemExit, match="already exists"):
        main(["cp", "tiny/uptrain", str(copied)])
    with pytest.raises(SystemExit, match="did you mean \\['tiny/uptrain'"):
        main(["cp", "tiny/uptrian", str(tmp_path / "x.yaml")])
