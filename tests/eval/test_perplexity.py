"""Held-out windows from every source, per-token losses against cross entropy, position buckets."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from supra.data import write_token_shards
from supra.data.python_docs import ByteTokenizer
from supra.eval.perplexity import (
    bucket_losses,
    eval_windows,
    format_buckets,
    perplexity,
    plot_position_losses,
    position_buckets,
    window_losses,
)

EOS = ByteTokenizer.eos_id


DOCUMENTS = [f"document {i}: " + " ".join(str(i * j) for j in range(5 + 7 * i)) for i in range(30)]


def test_text_and_token_shards_give_the_same_windows(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCUMENTS))
    documents = [list(d.encode()) for d in DOCUMENTS]
    write_token_shards(documents, tmp_path / "shards", vocab_size=258, eos_id=EOS, shard_tokens=500)
    from_shards = eval_windows(tmp_path / "shards", 100, max_windows=30)
    from_text = eval_windows(tmp_path / "docs.jsonl", 100, tokenizer=ByteTokenizer(), max_windows=30, text_key="body")
    stream = [t for d in documents for t in d + [EOS]]
    assert from_shards.shape == (30, 101)
    assert torch.equal(from_shards, from_text)
    assert torch.equal(from_text.flatten(), torch.tensor(stream[: 30 * 101]))


def test_single_document_windows_stay_inside_one_document(tmp_path):
    lines = ["a" * 50, "b" * 250, "c" * 10, "d" * 130]
    (tmp_path / "docs.txt").write_text("\n".join(lines) + "\n")
    windows = eval_windows(tmp_path / "docs.txt", 60, tokenizer=ByteTokenizer(), single_document=True)
    # 250 b's hold 4 windows of 61 tokens, 130 d's hold 2; the other documents are too short.
    assert [bytes(w.tolist()) for w in windows] == [b"b" * 61] * 4 + [b"d" * 61] * 2
    write_token_shards([list(line.encode()) for line in lines], tmp_path / "shards", vocab_size=258, eos_id=EOS)
    for window in eval_windows(tmp_path / "shards", 20, single_document=True):
        assert EOS not in window[:-2].tolist()


def test_losses_are_the_cross_entropy_and_chunking_changes_nothing(tiny_model):
    windows = torch.tensor([list(d.encode()[:49]) for d in DOCUMENTS[10:13]])
    losses = window_losses(tiny_model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = tiny_model(windows[:, :-1])
    expected = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(window_losses(tiny_model, windows, chunk_size=10, progress=False), losses, atol=1e-5, rtol=1e-5)
    result = perplexity(losses)
    assert result["tokens"] == 3 * 48
    assert result["perplexity"] == pytest.approx(math.exp(float(expected.mean())), rel=1e-5)


def test_position_buckets_double_and_average_every_window():
    assert position_buckets(100, first=16) == [(0, 16), (16, 32), (32, 64), (64, 100)]
    losses = torch.arange(8.0).repeat(2, 1)
    losses[1] += 1.0
    rows = bucket_losses(losses, position_buckets(8, first=2))
    # Buckets [0,2) [2,4) [4,8): means of 0..1, 2..3, 4..7 in row 0, plus 1 in row 1 (half the tokens).
    assert [(r["start"], r["end"], r["tokens"]) for r in rows] == [(0, 2, 4), (2, 4, 4), (4, 8, 8)]
    assert [r["loss"] for r in rows] == pytest.approx([1.0, 3.0, 6.0])
    assert rows[2]["perplexity"] == pytest.approx(math.exp(6.0))
    assert format_buckets(rows).splitlines()[3].split() == ["4-8", "8", "6.0000", f"{math.exp(6.0):.3f}"]
    with pytest.raises(ValueError, match=r"position bucket \[4, 9\) must be non-empty and inside \[0, 8\)"):
        bucket_losses(losses, [(4, 9)])


def test_clear_errors_for_unusable_data(tmp_path):
    (tmp_path / "short.txt").write_text("tiny\n")
    with pytest.raises(ValueError, match="has no window of 101 tokens inside one document"):
        eval_windows(tmp_path / "short.txt", 100, tokenizer=ByteTokenizer(), single_document=True)
    with pytest.raises(ValueError, match="pass a tokenizer"):
        eval_windows(tmp_path / "short.txt", 100)


def test_position_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = bucket_losses(torch.rand(2, 64), position_buckets(64, first=8))
    path = plot_position_losses({"tiny": rows}, tmp_path / "plots" / "loss.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
