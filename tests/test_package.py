"""What importing supra does to the process: torchao's extension notice silenced, nothing else."""

import subprocess
import sys

import pytest

NOTICE = "Skipping import of cpp extensions due to incompatible torch version"


def _stderr(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_importing_supra_silences_only_torchaos_extension_notice():
    if NOTICE not in _stderr("import torchtune"):
        pytest.skip("this torchao build matches torch: it prints no extension notice to silence")
    stderr = _stderr("import supra, torchtune, logging; logging.getLogger('torchao').warning('another torchao warning')")
    assert NOTICE not in stderr
    assert "another torchao warning" in stderr


def test_supra_command_prints_no_torchao_notice():
    stderr = _stderr("import sys; from supra._cli.main import main; sys.argv = ['supra', 'ls']; main()")
    assert NOTICE not in stderr
