"""Passkey prompts (length, depth) and the accuracy grid, checked with a copying oracle."""

import pytest
import torch
from torch import nn

from supra.data.python_docs import ByteTokenizer
from supra.eval.passkey import FILLER, INTRO, QUESTION, format_grid, passkey_example, passkey_grid, plot_grid

VOCAB = 258


class CopyingOracle(nn.Module):
    """Predicts the token that followed the latest earlier occurrence of the last ``k`` tokens,
    looking back at most ``window`` tokens: it retrieves a passkey exactly when the needle lies
    within its window."""

    def __init__(self, k: int = 8, window: int = 200):
        super().__init__()
        self.k, self.window = k, window
        self.tok_embeddings = nn.Embedding(VOCAB, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, VOCAB)
        for b, row in enumerate(tokens.tolist()):
            for t in range(self.k - 1, len(row)):
                suffix = row[t - self.k + 1 : t + 1]
                for j in range(t - 1, max(self.k - 2, t - self.window), -1):
                    if row[j - self.k + 1 : j + 1] == suffix:
                        logits[b, t, row[j + 1]] = 1.0
                        break
        return logits


def test_prompts_fill_the_length_and_put_the_needle_at_the_depth():
    tokenizer = ByteTokenizer()
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = passkey_example(tokenizer, 600, depth, "4096")
        text = tokenizer.decode(prompt)
        sentence = min(len(s) for s in FILLER)
        assert 600 - max(len(s) for s in FILLER) < len(prompt) <= 600
        assert text.startswith(INTRO) and text.endswith(QUESTION) and tokenizer.decode(answer) == " 4096"
        needle = text.index("The pass key is 4096.")
        filler = len(text) - len(INTRO) - len(QUESTION) - len("The pass key is 4096. Remember it. 4096 is the pass key. ")
        assert needle - len(INTRO) == pytest.approx(depth * filler, abs=sentence + 2)
    with pytest.raises(ValueError, match=r"length 100 is shorter than the passkey prompt without filler \(2\d\d tokens\)"):
        passkey_example(tokenizer, 100, 0.5, "1")
    with pytest.raises(ValueError, match=r"depth must be a fraction in \[0, 1\]"):
        passkey_example(tokenizer, 600, 1.5, "1")


def test_the_grid_scores_greedy_retrieval_by_length_and_depth():
    # The oracle sees 200 tokens back: at 300 tokens every needle is in view; at 700 only the
    # needle placed last (depth 1) is.
    grid = passkey_grid(CopyingOracle(), ByteTokenizer(), [300, 700], [0.0, 1.0], trials=2, digits=4, progress=False)
    assert grid["accuracy"] == [[1.0, 1.0], [0.0, 1.0]]
    assert [(e["length"], e["depth"]) for e in grid["examples"]] == [(300, 0.0)] * 2 + [(300, 1.0)] * 2 + [(700, 0.0)] * 2 + [(700, 1.0)] * 2
    assert len({e["key"] for e in grid["examples"]}) == 8 and all(len(e["key"]) == 4 for e in grid["examples"])
    assert format_grid(grid).splitlines() == [
        "depth \\ length       300      700", "           0.00     1.00     0.00", "           1.00     1.00     1.00",
    ]


def test_grid_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    grid = {"lengths": [256, 512], "depths": [0.0, 1.0], "accuracy": [[1.0, 0.5], [0.0, 1.0]]}
    assert plot_grid(grid, tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"
