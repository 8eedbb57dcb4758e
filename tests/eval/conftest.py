"""Tiny models, a saved checkpoint and small llm-foundry task files for the evaluation tests."""

import json

import pytest
import torch
from torch import nn

from supra.checkpoint import save_checkpoint
from supra.models import supra_test_tiny

BYTE_VOCAB = 258


class UniformModel(nn.Module):
    """Equal logits everywhere: every token has log-probability -log(vocab), so scores are known by hand."""

    def __init__(self, vocab_size: int = BYTE_VOCAB):
        super().__init__()
        self.vocab_size = vocab_size
        self.tok_embeddings = nn.Embedding(vocab_size, 1)
        self.max_seq_len = 4096

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, self.vocab_size)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def write_jsonl():
    """``write_jsonl(path, records) -> path``: one JSON record per line."""
    return _write_jsonl


@pytest.fixture
def uniform_model():
    return UniformModel()


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return supra_test_tiny(vocab_size=BYTE_VOCAB).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(supra_test_tiny(vocab_size=BYTE_VOCAB), tmp_path_factory.mktemp("eval") / "ckpt")


# Under the uniform model a choice's score is -(len + 1) log V (its bytes plus the space before
# it): acc picks the shortest choice and acc_norm (divided by len) the longest. Gold is the
# shortest in questions 1, 4, 5 and the longest in 2, 3: acc = 3/5, acc_norm = 2/5.
MULTIPLE_CHOICE = [
    {"query": "Question: first?\n", "choices": ["a", "bbb", "cc"], "gold": 0},
    {"query": "Question: second?\n", "choices": ["dddd", "e"], "gold": 0},
    {"query": "Question: third?\n", "choices": ["ff", "g", "hhhhh"], "gold": 2},
    {"query": "Question: fourth?\n", "choices": ["ii", "jjjjjj"], "gold": 0},
    {"query": "Question: fifth?\n", "choices": ["kk", "l", "mmm"], "gold": 1},
]
SCHEMA = [
    {"context_options": ["The cat sat", "The dog ran"], "continuation": "on the mat.", "gold": 0},
    {"context_options": ["Rain fell", "Snow fell", "Sun shone"], "continuation": "all day.", "gold": 2},
]
LANGUAGE_MODELING = [
    {"context": "one two three", "continuation": "four"},
    {"context": "aaaaaaaaaaaaaaaa", "continuation": "a"},
]


@pytest.fixture
def icl_dir(tmp_path):
    """A folder with one file per format; the multiple-choice one named like the reference's ARC file."""
    folder = tmp_path / "icl"
    folder.mkdir()
    _write_jsonl(folder / "arc_easy.jsonl", MULTIPLE_CHOICE)
    _write_jsonl(folder / "schema_mini.jsonl", SCHEMA)
    _write_jsonl(folder / "lm_mini.jsonl", LANGUAGE_MODELING)
    return folder


@pytest.fixture
def icl_records():
    """The records of the three fixture files, by format."""
    return {"multiple_choice": MULTIPLE_CHOICE, "schema": SCHEMA, "language_modeling": LANGUAGE_MODELING}
