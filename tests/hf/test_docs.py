"""docs/huggingface.md: every Python block runs, in order, with a tiny checkpoint in place of the hub."""

import re
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "huggingface.md"
HUB_ID = "tri-ml/mistral-supra"


def _blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_quickstart_is_the_reference_line_for_line():
    diff = _blocks("diff")[0].splitlines()
    supra_lines = [line[1:] for line in diff if not line.startswith("-")]
    assert [line for line in diff if line.startswith("-")] == ["-from open_lm.open_lm_hf import *"]
    quickstart = _blocks("python")[0].splitlines()
    assert quickstart[: len(supra_lines)] == supra_lines


def test_every_python_block_runs(openlm_folder, tmp_path, monkeypatch, capsys):
    folder, _, _ = openlm_folder
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in _blocks("python"):
        exec(compile(block.replace(HUB_ID, str(folder)), str(DOC), "exec"), namespace)
    assert isinstance(namespace["output"], str) and namespace["output"]
    assert (tmp_path / "my-supra" / "model.safetensors").exists()
    assert "config.json" in capsys.readouterr().out
