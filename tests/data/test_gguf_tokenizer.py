"""Tokenizers stored in GGUF files: our ids against transformers' GGUF tokenizer.

The vocabularies are trained here on Python's documentation and written into tiny GGUF files the
way llama.cpp's converter writes them: a byte-level BPE (``tokenizers``, with control and
user-defined tokens; tokenizer.ggml.model "gpt2") under several pre-tokenizer names, and a
sentencepiece BPE with byte fallback (``sentencepiece``; tokens, scores and token types, no
merges; tokenizer.ggml.model "llama"). The reference is
``AutoTokenizer.from_pretrained(folder, gguf_file=name)``: its ids (with its own BOS rule) must
equal ours (BOS when ``add_bos_token``, then ``encode``) on text with runs of spaces, newlines,
tabs, accents, CJK, emoji, digits, code and special tokens.
"""

import json
import pickle

import gguf
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from supra.data import load_tokenizer, save_tokenizer_files
from supra.data.gguf_tokenizer import GGUFTokenizer, merges_from_scores
from supra.loading import resolve_tokenizer

transformers = pytest.importorskip("transformers")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "Hello world",
    " leading space, and  two   three    spaces  ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows\tand\ttabs",
    "déjà vu, naïve café — “quotes” and 日本語のテキスト 🙂🚀",
    "digits 0 7 12 345 6789 3.14159 1,000,000 2024-12-05 x86_64",
    "def f(x):\n    return x ** 2  # squares\n\nprint(f(12))",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "isn't it? they'll, we've, I'M, you'd",
    "<think>reasoning</think> plain <|im_end|>",
    "",
    " ",
    "\n",
]


def _write(path, tokens, token_types, *, model, bos, eos, unk=None, add_bos=None, pre=None, merges=None, scores=None,
           chat_template=None, add_space_prefix=None):
    """A GGUF file holding only a llama architecture's shape and a tokenizer (no tensors)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if merges is not None:
        writer.add_token_merges(merges)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if unk is not None:
        writer.add_unk_token_id(unk)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def byte_level(corpus):
    """(tokens, token types, merges) of a byte-level BPE (vocab 400) as llama.cpp writes them:
    special tokens CONTROL (3), "<think>" / "</think>" USER_DEFINED (4), the rest NORMAL (1)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Numbers, so that digits merge: the pre-tokenizers differ most in how they split digit runs.
    numbers = ["-".join(str(n) for n in range(start, 20_000, 997)) for start in range(0, 1000, 50)]
    tokenizer.train_from_iterator(corpus[:800] + numbers * 10, trainer=trainer)
    tokenizer.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)])
    saved = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    types = [3 if t in SPECIAL else 4 if t in ("<think>", "</think>") else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in saved["model"]["merges"]]
    return tokens, types, merges


@pytest.fixture(scope="module")
def sentencepiece_vocab(tmp_path_factory, corpus):
    """(pieces, scores, token types) of a sentencepiece BPE (vocab 400, byte fallback) as
    llama.cpp's converter writes them, plus a user-defined "<tool>"."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm_gguf")
    (folder / "train.txt").write_text("\n".join(corpus[:800]) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "train.txt"), model_prefix=str(folder / "sp"), vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, user_defined_symbols=["<tool>"], minloglevel=2, num_threads=1,
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
        types.append(4 if pieces[-1] == "<tool>" else kind)
    return pieces, scores, types


def _reference(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _assert_same_ids(path, texts=TEXTS):
    ours = load_tokenizer(path)
    reference = _reference(path)
    for text in texts:
        expected = reference(text)["input_ids"]
        assert ([ours.bos_id] if ours.add_bos_token else []) + ours.encode(text) == expected, text
        assert ours.encode_batch([text, text]) == [ours.encode(text)] * 2
        ids = ours.encode(text)
        assert ours.decode(ids) == reference.decode(ids), text
    assert ours.vocab_size == len(reference)
    return ours, reference


@pytest.mark.parametrize("pre", [None, "smollm", "llama-bpe", "qwen2"])
def test_byte_level_bpe_ids_equal_transformers(tmp_path, byte_level, pre):
    tokens, types, merges = byte_level
    path = _write(tmp_path / "bpe.gguf", tokens, types, model="gpt2", pre=pre, merges=merges, bos=1, eos=2,
                  add_bos=False, chat_template="{{ messages }}")
    ours, reference = _assert_same_ids(path)
    assert isinstance(ours, GGUFTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.add_bos_token) == (1, 2, False)
    assert ours.chat_template == reference.chat_template == "{{ messages }}"
    # Special and user-defined tokens are single ids; text round-trips.
    assert ours.encode("<|im_start|><think>") == [tokens.index("<|im_start|>"), tokens.index("<think>")]
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text


def test_byte_level_bpe_with_add_bos(tmp_path, byte_level):
    tokens, types, merges = byte_level
    path = _write(tmp_path / "bpe.gguf", tokens, types, model="gpt2", merges=merges, bos=0, eos=0, add_bos=True)
    ours, _ = _assert_same_ids(path)
    assert ours.add_bos_token and ours.bos_id == 0


@pytest.mark.parametrize("add_bos", [None, True, False])
def test_sentencepiece_ids_equal_transformers(tmp_path, sentencepiece_vocab, add_bos):
    pieces, scores, types = sentencepiece_vocab
    path = _write(tmp_path / "spm.gguf", pieces, types, model="llama", scores=scores, bos=1, eos=2, unk=0, add_bos=add_bos)
    ours, _ = _assert_same_ids(path, TEXTS + ["<s>inside</s> text <tool> and <unk>"])
    # No flag: llama.cpp and transformers add BOS to a sentencepiece vocabulary.
    assert ours.add_bos_token == (add_bos is not False)
    assert ours.encode("<tool>") == [pieces.index("<tool>")]
    assert ours.decode(ours.encode("naïve 日本 🙂 x")) == "naïve 日本 🙂 x"


def test_sentencepiece_without_space_prefix(tmp_path, sentencepiece_vocab):
    """``add_space_prefix`` false (which transformers ignores): no "▁" is put before the text."""
    pieces, scores, types = sentencepiece_vocab
    path = _write(tmp_path / "spm.gguf", pieces, types, model="llama", scores=scores, bos=1, eos=2, add_space_prefix=False)
    with_prefix = _write(tmp_path / "prefix.gguf", pieces, types, model="llama", scores=scores, bos=1, eos=2)
    ours, prefixed = load_tokenizer(path), load_tokenizer(with_prefix)
    assert ours.encode("the") != prefixed.encode("the") == prefixed.encode(" the")[-len(prefixed.encode("the")):]
    assert ours.decode(ours.encode("the value")) == "the value"


def test_merges_from_scores_rank_by_the_merged_piece():
    merges = merges_from_scores(["a", "b", "c", "ab", "bc", "abc"], [0, 0, 0, -2.0, -1.0, -3.0])
    assert merges == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_load_tokenizer_finds_the_gguf_in_a_folder_and_pickles(tmp_path, byte_level):
    tokens, types, merges = byte_level
    path = _write(tmp_path / "model.gguf", tokens, types, model="gpt2", merges=merges, bos=1, eos=2)
    from_folder = load_tokenizer(tmp_path)
    assert from_folder.path == path and from_folder.encode("Hello world") == load_tokenizer(path).encode("Hello world")
    assert pickle.loads(pickle.dumps(from_folder)).encode("Hello world") == from_folder.encode("Hello world")
    assert resolve_tokenizer(None, path).fingerprint == resolve_tokenizer(None, tmp_path).fingerprint == from_folder.fingerprint


@pytest.mark.parametrize("kind", ["bpe", "bpe_with_bos", "sentencepiece"])
def test_saved_hf_files_give_the_same_tokenizer_to_us_and_to_transformers(tmp_path, byte_level, sentencepiece_vocab, kind):
    from transformers import AutoTokenizer

    if kind == "sentencepiece":
        pieces, scores, types = sentencepiece_vocab
        path = _write(tmp_path / "m.gguf", pieces, types, model="llama", scores=scores, bos=1, eos=2, unk=0)
    else:
        tokens, types, merges = byte_level
        path = _write(tmp_path / "m.gguf", tokens, types, model="gpt2", merges=merges, bos=1, eos=2,
                      add_bos=kind == "bpe_with_bos", chat_template="{{ messages }}")
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    assert save_tokenizer_files(path, folder) == ["tokenizer.json", "tokenizer_config.json"]
    original, saved = load_tokenizer(path), load_tokenizer(folder)
    assert (saved.bos_id, saved.eos_id, saved.add_bos_token, saved.vocab_size) == (
        original.bos_id, original.eos_id, original.add_bos_token, original.vocab_size)
    reference, reloaded = _reference(path), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert saved.encode(text) == original.encode(text), text
        assert reloaded(text)["input_ids"] == reference(text)["input_ids"], text
    assert reloaded.chat_template == reference.chat_template


def test_a_gguf_without_a_tokenizer_saves_none(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert save_tokenizer_files(tmp_path / "bare.gguf", tmp_path) == []


def test_unsupported_tokenizer_model_is_named(tmp_path):
    path = _write(tmp_path / "bert.gguf", ["[PAD]", "[CLS]", "a"], [3, 3, 1], model="bert", bos=1, eos=1)
    with pytest.raises(ValueError, match=r"bert\.gguf: GGUF tokenizer model 'bert' is not supported; supported: \['gpt2', 'llama'\]"):
        load_tokenizer(path)
