"""Fixtures of the transformers interop tests; the helpers live in hf_tiny.py."""

import sys
from pathlib import Path

import pytest
import torch

# Test directories are not packages (--import-mode=importlib): this one goes on the path so the
# test modules can `import hf_tiny`.
sys.path.insert(0, str(Path(__file__).parent))

import hf_tiny  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronization on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def openlm_folder(tmp_path):
    """(folder, config, state_dict) of a tiny GQA openlm checkpoint with a BPE tokenizer."""
    folder, config, state_dict = hf_tiny.write_openlm_folder(tmp_path / "openlm")
    hf_tiny.write_tokenizer(folder)
    return folder, config, state_dict
