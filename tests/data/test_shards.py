"""write_token_shards -> TokenShardDataset, checked against plain numpy slicing of the stream built here."""

import json
import pickle
import re

import numpy as np
import pytest
import torch

from supra.data import TokenShardDataset, write_token_shards


def random_documents(seed, count=40, vocab_size=1000, max_len=30):
    rng = np.random.default_rng(seed)
    # Some empty documents: with EOS they become a lone EOS.
    return [rng.integers(0, vocab_size - 1, size=rng.integers(0, max_len)).tolist() for _ in range(count)]


def expected_stream(documents, eos_id):
    parts = [list(d) + ([eos_id] if eos_id is not None else []) for d in documents]
    starts = np.cumsum([0] + [len(p) for p in parts])[:-1]
    lengths = np.array([len(p) for p in parts])
    return np.array(sum(parts, []), dtype=np.int64), starts[lengths > 0]


def test_round_trip_across_shards(tmp_path):
    documents = random_documents(0)
    stream, _ = expected_stream(documents, eos_id=999)
    out = write_token_shards(documents, tmp_path / "ds", vocab_size=1000, eos_id=999, shard_tokens=37)
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "supra-token-shards" and index["version"] == 1 and index["dtype"] == "uint16"
    assert index["num_tokens"] == len(stream) and index["eos_id"] == 999
    assert len(index["shards"]) == -(-len(stream) // 37)
    on_disk = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in index["shards"]])
    np.testing.assert_array_equal(on_disk, stream)

    seq_len = 10
    dataset = TokenShardDataset(out, seq_len)
    assert len(dataset) == len(stream) // (seq_len + 1)
    assert dataset.num_tokens == len(stream) and dataset.vocab_size == 1000
    spanning = 0
    for i in range(len(dataset)):
        window = stream[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]
        item = dataset[i]
        assert item["tokens"].dtype == torch.long
        np.testing.assert_array_equal(item["tokens"].numpy(), window[:-1])
        np.testing.assert_array_equal(item["labels"].numpy(), window[1:])
        np.testing.assert_array_equal(item["positions"].numpy(), np.arange(seq_len))
        spanning += (i * 11) // 37 != (i * 11 + 10) // 37
    assert spanning >= 3
    np.testing.assert_array_equal(dataset[-1]["tokens"].numpy(), stream[(len(dataset) - 1) * 11 :][:10])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_positions_restart_at_document_starts(tmp_path):
    documents = random_documents(1, count=60, max_len=12)
    # A document longer than a shard, so one continues through a whole shard.
    documents.insert(3, list(range(100, 190)))
    stream, starts = expected_stream(documents, eos_id=5)
    out = write_token_shards(documents, tmp_path / "ds", vocab_size=1000, eos_id=5, shard_tokens=29)
    seq_len = 16
    dataset = TokenShardDataset(out, seq_len, document_boundaries=True)
    plain = TokenShardDataset(out, seq_len)
    saw_restart = False
    for i in range(len(dataset)):
        begin = i * (seq_len + 1)
        expected = []
        for g in range(begin, begin + seq_len):
            doc_start = starts[starts <= g].max()
            expected.append(g - max(doc_start, begin))
        item = dataset[i]
        np.testing.assert_array_equal(item["positions"].numpy(), expected)
        np.testing.assert_array_equal(item["tokens"].numpy(), plain[i]["tokens"].numpy())
        # Labels are kept across boundaries: the EOS predicts the next document's first token.
        np.testing.assert_array_equal(item["labels"].numpy(), stream[begin + 1 : begin + seq_len + 1])
        saw_restart |= 0 in expected[1:]
    assert saw_restart


@pytest.mark.parametrize(
    "vocab_size, top_id, dtype", [(65536, 65535, np.uint16), (65537, 65536, np.uint32), (2**20, 2**20 - 1, np.uint32)]
)
def test_dtype_follows_vocab_size(tmp_path, vocab_size, top_id, dtype):
    documents = [[top_id, 0, 1, top_id], [7, top_id]]
    out = write_token_shards(documents, tmp_path / "ds", vocab_size=vocab_size)
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == np.dtype(dtype).name and index["eos_id"] is None
    assert (out / "shard_00000.bin").stat().st_size == 6 * np.dtype(dtype).itemsize
    np.testing.assert_array_equal(np.load(out / "shard_00000.docs.npy"), [0, 4])
    item = TokenShardDataset(out, 4)[0]
    assert item["tokens"].tolist() == [top_id, 0, 1, top_id] and item["labels"].tolist() == [0, 1, top_id, 7]


def test_bad_token_id_names_document_and_leaves_nothing(tmp_path):
    documents = [[1, 2], [3], [4, 1000, 5]]
    with pytest.raises(ValueError, match=r"document 2: token id 1000 .*vocab_size=1000"):
        write_token_shards(documents, tmp_path / "ds", vocab_size=1000, shard_tokens=2)
    with pytest.raises(ValueError, match=r"document 0: token id -1"):
        write_token_shards([[-1]], tmp_path / "ds", vocab_size=1000)
    with pytest.raises(ValueError, match="integer token ids"):
        write_token_shards([[0.5, 1.0]], tmp_path / "ds", vocab_size=1000)
    with pytest.raises(ValueError, match="eos_id=1000"):
        write_token_shards([[1]], tmp_path / "ds", vocab_size=1000, eos_id=1000)
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(tmp_path):
    out = write_token_shards([[1, 2, 3]], tmp_path / "ds", vocab_size=10)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_token_shards([[4, 5, 6]], out, vocab_size=10)
    write_token_shards([[4, 5, 6]], out, vocab_size=10, overwrite=True)
    assert np.fromfile(out / "shard_00000.bin", dtype=np.uint16).tolist() == [4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*index.json"):
        TokenShardDataset(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no index.json"):
        TokenShardDataset(tmp_path / "empty", 8)
    out = write_token_shards([[1, 2, 3], [4]], tmp_path / "ds", vocab_size=10, eos_id=0)
    with pytest.raises(ValueError, match="holds 6 tokens, fewer than one window of seq_len \\+ 1 = 7"):
        TokenShardDataset(out, 6)
    assert len(TokenShardDataset(out / "index.json", 5)) == 1

    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt .*not valid JSON"):
        TokenShardDataset(out, 2)
    (out / "index.json").write_text(json.dumps({**index, "format": "other"}))
    with pytest.raises(ValueError, match="corrupt .*'other'"):
        TokenShardDataset(out, 2)
    (out / "index.json").write_text(json.dumps({**index, "num_tokens": 7}))
    with pytest.raises(ValueError, match="corrupt .*num_tokens"):
        TokenShardDataset(out, 2)
    (out / "index.json").write_text(json.dumps(index))
    (out / "shard_00000.bin").write_bytes(b"\0" * 4)
    with pytest.raises(ValueError, match="holds 4 bytes"):
        TokenShardDataset(out, 2)


def test_pickles_without_open_memmaps(tmp_path):
    documents = random_documents(2, count=200, max_len=60)
    out = write_token_shards(documents, tmp_path / "ds", vocab_size=1000, eos_id=999, shard_tokens=500)
    dataset = TokenShardDataset(out, 32, document_boundaries=True)
    first = dataset[len(dataset) // 2]
    blob = pickle.dumps(dataset)
    assert len(blob) < 4000
    copy = pickle.loads(blob)
    for key in first:
        assert torch.equal(copy[len(dataset) // 2][key], first[key])


def test_each_shard_records_its_largest_token_id(tmp_path):
    out = write_token_shards([[1, 2, 300], [7, 5]], tmp_path / "s", vocab_size=1000, eos_id=0, shard_tokens=4)
    index = json.loads((out / "index.json").read_text())
    assert [s["max_id"] for s in index["shards"]] == [300, 7]
    assert TokenShardDataset(out, 1).max_token_id() == (300, out / "shard_00000.bin")


def _with_id_beyond_the_vocabulary(tmp_path, keep_max_id):
    """Shards of vocab 258 whose bytes were changed afterwards to hold id 300 (in the second shard)."""
    out = write_token_shards([list(range(10)), list(range(10))], tmp_path / "s", vocab_size=258, shard_tokens=10)
    shard = out / "shard_00001.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[3] = 300
    tokens.tofile(shard)
    index = json.loads((out / "index.json").read_text())
    for entry in index["shards"]:
        if not keep_max_id:
            del entry["max_id"]
    (out / "index.json").write_text(json.dumps(index))
    return out, shard


def test_a_token_id_beyond_the_vocabulary_is_named_with_its_shard(tmp_path):
    out, shard = _with_id_beyond_the_vocabulary(tmp_path, keep_max_id=False)
    # Written before ids were recorded: read from the files.
    assert TokenShardDataset(out, 4).max_token_id() == (300, shard)
    dataset = TokenShardDataset(out, 4)
    assert len(dataset[0]["tokens"]) == 4
    with pytest.raises(ValueError, match=rf"{re.escape(str(shard))} holds token id 300, outside \[0, vocab_size=258\) "
                                         r"\(window 2\)"):
        dataset[2]
    index = json.loads((out / "index.json").read_text())
    index["shards"][1]["max_id"] = 300
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{re.escape(str(shard))} holds token id 300, outside \[0, vocab_size=258\)"):
        TokenShardDataset(out, 4)
