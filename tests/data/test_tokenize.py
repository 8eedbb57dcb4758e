"""tokenize_files against direct sentencepiece / tokenizers encodes of the same texts."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece
from tokenizers import Tokenizer

from supra.data import load_tokenizer, tokenize_files
from supra.data.tokenize import main


def read_stream(folder):
    index = json.loads((folder / "index.json").read_text())
    dtype = np.dtype(index["dtype"])
    return np.concatenate([np.fromfile(folder / s["file"], dtype=dtype) for s in index["shards"]]).astype(np.int64)


def test_txt_with_sentencepiece_one_document_per_nonempty_line(tmp_path, corpus, spm_model, capsys):
    lines = corpus[600:700]
    text = "\n".join(lines[:50]) + "\n\n   \n" + "\r\n".join(lines[50:]) + "\n"
    (tmp_path / "a.txt").write_text(text)
    out = tokenize_files([tmp_path / "a.txt"], tmp_path / "out", tokenizer=spm_model, shard_tokens=1000)
    assert "100doc" in capsys.readouterr().err.replace(" ", "")

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    expected = np.concatenate([sp.encode(line) + [sp.eos_id()] for line in lines])
    np.testing.assert_array_equal(read_stream(out), expected)
    index = json.loads((out / "index.json").read_text())
    assert index["num_documents"] == len(lines) and index["eos_id"] == sp.eos_id() == 2
    assert index["vocab_size"] == 200 and len(index["shards"]) > 1
    assert index["metadata"]["tokenizer"] == str(spm_model)


def test_jsonl_and_parquet_with_hf_tokenizer(tmp_path, corpus, hf_tokenizer_dir):
    docs = corpus[700:760]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        for doc in docs[:30]:
            f.write(json.dumps({"id": 1, "content": doc}) + "\n")
    pq.write_table(pa.table({"content": docs[30:], "n": list(range(30))}), tmp_path / "b.parquet", row_group_size=7)
    out = tokenize_files(
        [tmp_path / "a.jsonl.gz", tmp_path / "b.parquet"], tmp_path / "out", tokenizer=hf_tokenizer_dir,
        text_key="content", progress=False,
    )
    reference = Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json"))
    eos = reference.token_to_id("<|end|>")
    expected = np.concatenate([reference.encode(d, add_special_tokens=False).ids + [eos] for d in docs])
    np.testing.assert_array_equal(read_stream(out), expected)


def test_load_tokenizer_kinds(tmp_path, corpus, spm_model, hf_tokenizer_dir):
    sp = load_tokenizer(spm_model.parent)
    assert (sp.vocab_size, sp.eos_id, sp.bos_id) == (200, 2, 1)
    hf = load_tokenizer(hf_tokenizer_dir)
    reference = Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json"))
    assert hf.vocab_size == reference.get_vocab_size() == 300
    assert (hf.eos_id, hf.bos_id) == (reference.token_to_id("<|end|>"), reference.token_to_id("<|start|>"))
    for tokenizer in (sp, hf):
        assert tokenizer.decode(tokenizer.encode(corpus[3])) == corpus[3]
        assert tokenizer.encode_batch(corpus[:3]) == [tokenizer.encode(t) for t in corpus[:3]]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    assert load_tokenizer(bare).eos_id is None


def test_workers_give_the_same_shards(tmp_path, corpus, spm_model, monkeypatch):
    # Small batches, so more are in flight than the pool's window holds.
    monkeypatch.setattr("supra.data.tokenize.BATCH_DOCUMENTS", 50)
    (tmp_path / "a.txt").write_text("\n".join(corpus[:1200]) + "\n")
    one = tokenize_files(tmp_path / "a.txt", tmp_path / "one", tokenizer=spm_model, progress=False)
    two = tokenize_files(tmp_path / "a.txt", tmp_path / "two", tokenizer=spm_model, num_workers=2, progress=False)
    np.testing.assert_array_equal(read_stream(one), read_stream(two))
    np.testing.assert_array_equal(np.load(one / "shard_00000.docs.npy"), np.load(two / "shard_00000.docs.npy"))
    assert len(np.load(one / "shard_00000.docs.npy")) == 1200


def test_input_and_tokenizer_errors(tmp_path, spm_model):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x", "title": "y"}) + "\n")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    (tmp_path / "c.csv").write_text("text\nx\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="missing.txt does not exist"):
        tokenize_files(tmp_path / "missing.txt", out, tokenizer=spm_model)
    with pytest.raises(ValueError, match="c.csv has an unsupported extension"):
        tokenize_files(tmp_path / "c.csv", out, tokenizer=spm_model)
    with pytest.raises(ValueError, match=r"a.jsonl:1: no field 'text'.*\['body', 'title'\]"):
        tokenize_files(tmp_path / "a.jsonl", out, tokenizer=spm_model)
    with pytest.raises(ValueError, match=r"b.parquet has no column 'text'.*\['body'\]"):
        tokenize_files(tmp_path / "b.parquet", out, tokenizer=spm_model)
    with pytest.raises(ValueError, match="tokenizer path .*nope.model does not exist"):
        tokenize_files(tmp_path / "a.jsonl", out, tokenizer=tmp_path / "nope.model", text_key="body")
    with pytest.raises(ValueError, match="c.csv is of unknown type"):
        load_tokenizer(tmp_path / "c.csv")
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    assert not out.exists()


def test_main_entry_point(tmp_path, corpus, spm_model, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in corpus[:20]))
    argv = [str(tmp_path / "a.jsonl"), "--tokenizer", str(spm_model), "--out", str(tmp_path / "out"),
            "--text-key", "body", "--no-eos", "--bos", "--shard-tokens", "64", "--no-progress"]
    assert main(argv) == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    expected = np.concatenate([[sp.bos_id()] + sp.encode(t) for t in corpus[:20]])
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected)
    assert "wrote" in capsys.readouterr().out
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl", "latin1.txt.gz"])
def test_text_that_is_not_utf8_is_named_with_its_file_and_line(tmp_path, spm_model, capsys, name):
    first, second = "première ligne", "deuxième ligne"
    if "json" in name:
        first, second = (json.dumps({"text": text}, ensure_ascii=False) for text in (first, second))
    # Line 2 in Latin-1: its "è" is the byte 0xe8, which UTF-8 cannot decode there.
    data = first.encode("utf-8") + b"\n" + second.encode("latin1")
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert main([str(path), "--tokenizer", str(spm_model), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert f"supra tokenize: error: {path}:2: not UTF-8 text (byte 0xe8 at column " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_or_full_output_location_names_the_path(tmp_path, corpus, spm_model, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("\n".join(corpus[:5]))
    argv = [str(tmp_path / "a.txt"), "--tokenizer", str(spm_model), "--no-progress", "--out"]
    # /sys refuses new folders even to root.
    assert main([*argv, "/sys/supra_tokens"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supra tokenize: error: ") and "/sys/supra_tokens" in err and "Traceback" not in err

    def full(self, data):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "shard_00000.bin"))

    monkeypatch.setattr("supra.data.shards._ShardWriter.write_document", full)
    assert main([*argv, str(tmp_path / "out")]) == 2
    assert f"supra tokenize: error: No space left on device: {tmp_path / 'out' / 'shard_00000.bin'}" in capsys.readouterr().err
