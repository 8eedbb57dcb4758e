"""OpenLMWebDataset on tiny open_lm-style tar shards written here with tarfile."""

import gzip
import io
import json
import tarfile

import numpy as np
import pytest

from supra.data import OpenLMWebDataset

ENCODINGS = {
    "json.gz": lambda ids: gzip.compress(json.dumps(ids).encode()),
    "json": lambda ids: json.dumps(ids).encode(),
    "txt": lambda ids: json.dumps(ids).encode(),
    "txt-spaces": lambda ids: " ".join(map(str, ids)).encode(),
}


def write_shards(folder, sequences, per_shard, encoding, extra_members=True):
    """Writes open_lm's layout: shard_XXXXXXXX.tar of <key>.<ext> samples and manifest.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = "txt" if encoding.startswith("txt") else encoding
    manifest = []
    for s, begin in enumerate(range(0, len(sequences), per_shard)):
        name = f"shard_{s:08d}"
        chunk = sequences[begin : begin + per_shard]
        with tarfile.open(folder / f"{name}.tar", "w") as tar:
            for j, ids in enumerate(chunk):
                members = [(f"{begin + j:09d}.{ext}", ENCODINGS[encoding](ids))]
                if extra_members:
                    members.insert(0, (f"{begin + j:09d}.meta.cls", b"7"))
                for member_name, data in members:
                    info = tarfile.TarInfo(member_name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        manifest.append({"shard": name, "num_sequences": len(chunk)})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    return folder


def make_sequences(count, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50000, size=seq_len + 1).tolist() for _ in range(count)]


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_reads_every_encoding(tmp_path, encoding):
    sequences = make_sequences(23, seq_len=12)
    folder = write_shards(tmp_path / "data", sequences, per_shard=5, encoding=encoding)
    dataset = OpenLMWebDataset(folder)
    assert dataset.seq_len == 12 and len(dataset) == 23 and dataset.num_tokens == 23 * 13
    for i, ids in enumerate(sequences):
        item = dataset[i]
        assert item["tokens"].tolist() == ids[:-1] and item["labels"].tolist() == ids[1:]
        assert item["positions"].tolist() == list(range(12))
    by_manifest = OpenLMWebDataset(folder / "manifest.jsonl", seq_len=12)
    assert by_manifest[22]["labels"].tolist() == sequences[22][1:]


def test_eos_restarts_positions(tmp_path):
    ids = [5, 0, 7, 8, 0, 0, 9, 3, 0]
    folder = write_shards(tmp_path / "data", [ids], per_shard=1, encoding="json.gz")
    item = OpenLMWebDataset(folder, eos_id=0)[0]
    # Inputs 5 0 | 7 8 0 | 0 | 9 3 ; the final input 3 is followed by label 0, which starts nothing inside.
    assert item["positions"].tolist() == [0, 1, 0, 1, 2, 0, 0, 1]


def test_seq_len_mismatch_and_bad_data(tmp_path):
    folder = write_shards(tmp_path / "data", make_sequences(4, seq_len=8), per_shard=2, encoding="txt")
    with pytest.raises(ValueError, match=r"samples hold 9 tokens \(seq_len 8\), but seq_len=16 needs 17"):
        OpenLMWebDataset(folder, seq_len=16)
    with pytest.raises(ValueError, match="expected a folder with manifest.jsonl"):
        OpenLMWebDataset(tmp_path)

    sequences = make_sequences(4, seq_len=8)
    sequences[3] = sequences[3][:5]
    folder = write_shards(tmp_path / "short", sequences, per_shard=2, encoding="json.gz")
    dataset = OpenLMWebDataset(folder)
    assert dataset[2]["tokens"].tolist() == sequences[2][:-1]
    with pytest.raises(ValueError, match="shard_00000001.tar: sample 1 holds 5 tokens, expected seq_len \\+ 1 = 9"):
        dataset[3]

    folder = write_shards(tmp_path / "count", make_sequences(4, seq_len=8), per_shard=4, encoding="json")
    (folder / "manifest.jsonl").write_text(json.dumps({"shard": "shard_00000000", "num_sequences": 5}) + "\n")
    with pytest.raises(ValueError, match="holds 4 samples .* num_sequences=5"):
        OpenLMWebDataset(folder)
    (folder / "manifest.jsonl").write_text(json.dumps({"shard": "shard_9", "num_sequences": 5}) + "\n")
    with pytest.raises(ValueError, match="shard_9.tar does not exist"):
        OpenLMWebDataset(folder)
