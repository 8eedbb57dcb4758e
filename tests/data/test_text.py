"""TextDataset (HF datasets, offline, cache in tmp) against a stream encoded here with sentencepiece."""

import json

import numpy as np
import pytest
import sentencepiece

from supra.data import TextDataset, TokenShardDataset, tokenize_files


def test_jsonl_windows_and_positions(tmp_path, corpus, spm_model):
    docs = corpus[800:880]
    files = []
    for name, part in (("a.jsonl", docs[:40]), ("b.jsonl", docs[40:])):
        (tmp_path / name).write_text("".join(json.dumps({"body": d, "x": 1}) + "\n" for d in part))
        files.append(tmp_path / name)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    encoded = [sp.encode(d) + [sp.eos_id()] for d in docs]
    stream = np.concatenate(encoded)
    starts = np.cumsum([0] + [len(e) for e in encoded])[:-1]

    seq_len = 24
    dataset = TextDataset(files, spm_model, seq_len, text_key="body", document_boundaries=True, cache_dir=tmp_path / "cache")
    assert len(dataset) == len(stream) // (seq_len + 1) and dataset.num_tokens == len(stream)
    for i in range(len(dataset)):
        begin = i * (seq_len + 1)
        item = dataset[i]
        np.testing.assert_array_equal(item["tokens"].numpy(), stream[begin : begin + seq_len])
        np.testing.assert_array_equal(item["labels"].numpy(), stream[begin + 1 : begin + seq_len + 1])
        expected = [g - max(starts[starts <= g].max(), begin) for g in range(begin, begin + seq_len)]
        np.testing.assert_array_equal(item["positions"].numpy(), expected)

    with pytest.raises(ValueError, match=r"no field 'text'.*\['body', 'x'\]"):
        TextDataset(files, spm_model, seq_len, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="fewer than one window"):
        TextDataset(files, spm_model, len(stream), text_key="body", cache_dir=tmp_path / "cache")


def test_txt_matches_tokenize_files(tmp_path, corpus, spm_model):
    (tmp_path / "a.txt").write_text("\n".join(corpus[900:960]) + "\n\n\n" + "\n".join(corpus[960:1000]) + "\n")
    for bos in (False, True):
        text = TextDataset(tmp_path / "a.txt", spm_model, 16, cache_dir=tmp_path / "cache", prepend_bos=bos,
                           document_boundaries=True)
        out = tokenize_files(tmp_path / "a.txt", tmp_path / f"out{bos}", tokenizer=spm_model, progress=False, prepend_bos=bos)
        shards = TokenShardDataset(out, 16, document_boundaries=True)
        assert len(text) == len(shards) > 0
        for i in range(len(text)):
            for key in ("tokens", "labels", "positions"):
                assert text[i][key].tolist() == shards[i][key].tolist()
    assert text[0]["tokens"][0] == 1
