"""The python_docs corpus against what the interpreter itself reports (pydoc topics, inspect),
its split, record and token shards, and the committed tokenizer against a fresh training."""

import hashlib
import inspect
import json
import json as json_module
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
from pydoc_data.topics import topics

from supra.config import resolve_path
from supra.data import TokenShardDataset, load_tokenizer
from supra.data.python_docs import (
    HELDOUT_EVERY,
    ByteTokenizer,
    check_corpus,
    corpus_record,
    main,
    module_document,
    named_documents,
    paragraphs,
    prepare_python_docs,
    python_docs_documents,
    stdlib_documents,
    train_tokenizer,
)

TEACHER = resolve_path("supra:assets/tiny_teacher")


def _stream(folder):
    index = json.loads((folder / "index.json").read_text())
    return np.concatenate([np.fromfile(folder / s["file"], dtype=index["dtype"]) for s in index["shards"]]).tolist()


def test_topics_are_pydoc_topics_and_modules_are_the_stdlib_docstrings():
    assert dict(named_documents("all", "topics")) == {f"topics/{k}": v for k, v in topics.items()}
    stdlib = dict(stdlib_documents())
    assert "stdlib/json" in stdlib and "stdlib/json.decoder" in stdlib
    assert not [name for name in stdlib if ".test." in name or name.startswith("stdlib/test.")]
    document = stdlib["stdlib/json"]
    assert document.startswith(f"module json\n\n{inspect.getdoc(json_module)}\n\n")
    heading = f"def json.dumps{inspect.signature(json_module.dumps)}"
    assert f"{heading}\n\n{inspect.getdoc(json_module.dumps)}" in document
    assert f"class json.JSONEncoder" not in document  # defined in json.encoder, documented there
    assert "class json.encoder.JSONEncoder\n\n" + inspect.getdoc(json_module.JSONEncoder) in stdlib["stdlib/json.encoder"]


def test_module_without_docstrings_gives_no_document():
    assert module_document("x = 1\ndef f():\n    return x\n", "m") is None


def test_split_is_by_document_every_tenth_heldout():
    everything = named_documents("all")
    train, heldout = named_documents("train"), named_documents("heldout")
    assert [n for n, _ in everything] == sorted(n for n, _ in everything)
    assert heldout == everything[::HELDOUT_EVERY]
    assert sorted(train + heldout) == everything
    assert not {n for n, _ in train} & {n for n, _ in heldout}
    assert python_docs_documents("heldout", "stdlib") == [t for n, t in heldout if n.startswith("stdlib/")]
    with pytest.raises(ValueError, match="split 'test' is unknown"):
        named_documents("test")
    with pytest.raises(ValueError, match="source 'web' is unknown"):
        named_documents("train", "web")


def test_record_identifies_the_corpus_and_a_different_one_is_explained():
    record = corpus_record()
    assert record == corpus_record()
    assert record["heldout"]["documents"] == len(named_documents("heldout"))
    assert check_corpus(record) is None
    other = json.loads(json.dumps(record))
    other["python"] = "3.99.0"
    other["heldout"]["sha256"] = "0" * 64
    message = check_corpus(other)
    assert "builds a different python_docs corpus" in message and "heldout split differs" in message
    assert "Python 3.99.0" in message


def test_byte_shards_hold_every_document_followed_by_eos(tmp_path):
    folders = prepare_python_docs(tmp_path, source="topics")
    stream = _stream(folders["heldout"])
    expected = []
    for text in python_docs_documents("heldout", "topics"):
        expected += list(text.encode("utf-8")) + [ByteTokenizer.eos_id]
    assert stream == expected


def test_sentencepiece_shards_prepend_bos_and_are_rebuilt_for_another_tokenizer(tmp_path):
    tokenizer = load_tokenizer(TEACHER / "tokenizer.model")
    folders = prepare_python_docs(tmp_path, tokenizer, source="topics")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(TEACHER / "tokenizer.model"))
    expected = []
    for text in python_docs_documents("heldout", "topics"):
        expected += [processor.bos_id(), *processor.encode(text), processor.eos_id()]
    assert _stream(folders["heldout"]) == expected
    written = (folders["train"] / "index.json").stat().st_mtime_ns
    prepare_python_docs(tmp_path, tokenizer, source="topics")
    assert (folders["train"] / "index.json").stat().st_mtime_ns == written
    prepare_python_docs(tmp_path, None, source="topics")
    assert TokenShardDataset(folders["train"], 16).vocab_size == ByteTokenizer.vocab_size


def test_paragraphs_keep_the_text_and_respect_the_limit():
    text = "a" * 25 + "\n" + "b" * 30 + "\n\n\n" + "c" * 7
    pieces = list(paragraphs([text], max_chars=20))
    assert all(len(p) <= 20 for p in pieces)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")


def test_the_committed_tokenizer_is_what_training_reproduces(tmp_path):
    card = json.loads((TEACHER / "card.json").read_text())
    if check_corpus(card["corpus"]):
        pytest.skip(check_corpus(card["corpus"]))
    model = train_tokenizer(tmp_path / "tokenizer", card["tokenizer"]["vocab_size"])
    assert hashlib.sha256(model.read_bytes()).hexdigest() == card["tokenizer"]["sha256"]
    assert hashlib.sha256((TEACHER / "tokenizer.model").read_bytes()).hexdigest() == card["tokenizer"]["sha256"]
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
    sample = python_docs_documents("heldout")[:5]
    # Whitespace, newlines and indentation survive: decoding gives the text back.
    assert [processor.decode(processor.encode(t)) for t in sample] == sample


def test_command_line_prints_the_record_and_writes_shards(tmp_path, capsys):
    assert main(["record"]) == 0
    assert json.loads(capsys.readouterr().out) == corpus_record()
    assert main(["shards", "--out", str(tmp_path), "--tokenizer", str(TEACHER / "tokenizer.model")]) == 0
    out = capsys.readouterr().out
    assert f"heldout: {tmp_path / 'heldout'}" in out and TokenShardDataset(Path(tmp_path) / "heldout", 8).vocab_size == 4096
