"""BOS like lm-eval: by default the eval adapter puts BOS before a context exactly when the
tokenizer itself would, as lm-eval's ``hf`` model leaves it to the tokenizer.

The reference for each tokenizer is transformers' own ``encode`` with its default special tokens
(what lm-eval's ``hf`` model calls): a GGUF file's ``add_bos_token`` (absent: BOS for a
sentencepiece vocabulary only); for an HF folder, its ``tokenizer.json`` post-processor, which
transformers follows whatever ``tokenizer_config.json``'s ``add_bos_token`` says. A bare
sentencepiece ``.model`` keeps adding BOS (as Llama and Mistral use it) and the byte tokenizer
adds none; ``add_bos=`` overrides.
"""

import json
from types import SimpleNamespace

import gguf
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from supra.data import load_tokenizer
from supra.eval.harness import SupraLM
from supra.loading import default_add_bos
from supra.models import supra_test_tiny

transformers = pytest.importorskip("transformers")

TEXT = "Question: which is it?"
SPECIAL = ["<unk>", "<s>", "</s>"]


def _gguf(path, kind, add_bos):
    """A GGUF file with a vocabulary of single characters (one merge): byte-level ("gpt2"), or
    sentencepiece-style ("llama": byte-fallback pieces and the letters), BOS 1 and EOS 2."""
    if kind == "gpt2":
        tokens = SPECIAL + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Qu"]
        types = [3, 3, 3] + [1] * (len(tokens) - 3)
    else:
        tokens = SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"] + [chr(c) for c in range(ord("A"), ord("z") + 1)]
        types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": 32, "feed_forward_length": 64,
                       "attention.head_count": 4}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "gpt2":
        writer.add_token_merges(["Q u"])
    else:
        writer.add_token_scores([0.0] * len(tokens))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hf_folder(folder, post_processor_bos, add_bos):
    """An HF tokenizer folder: byte-level characters, a post-processor that does or does not put
    <s> first, and a tokenizer_config.json with or without ``add_bos_token``."""
    folder.mkdir()
    vocab = {token: i for i, token in enumerate(SPECIAL + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL)
    if post_processor_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if add_bos is not None:
        config["add_bos_token"] = add_bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _lm(tokenizer, **kwargs):
    return SupraLM(model=supra_test_tiny(vocab_size=512), tokenizer=tokenizer, device="cpu", **kwargs)


@pytest.mark.parametrize("kind, add_bos", [("gpt2", None), ("gpt2", True), ("gpt2", False), ("llama", None), ("llama", False)])
def test_gguf_tokenizers_follow_their_add_bos_token(tmp_path, kind, add_bos):
    path = _gguf(tmp_path / "model.gguf", kind, add_bos)
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name).encode(TEXT)
    lm = _lm(str(path))
    assert lm.tok_encode(TEXT) == expected
    assert lm.add_bos == (add_bos if add_bos is not None else kind == "llama")


@pytest.mark.parametrize("post_processor_bos, add_bos", [(False, None), (True, None), (True, False), (False, True)])
def test_hf_tokenizers_follow_their_post_processor(tmp_path, post_processor_bos, add_bos):
    folder = _hf_folder(tmp_path / "tok", post_processor_bos, add_bos)
    expected = transformers.AutoTokenizer.from_pretrained(folder).encode(TEXT)
    lm = _lm(str(folder))
    assert lm.tok_encode(TEXT) == expected
    assert lm.add_bos == post_processor_bos


def test_sentencepiece_model_and_bytes_keep_todays_rule(tmp_path):
    import sentencepiece

    (tmp_path / "train.txt").write_text("\n".join(f"line {i} of some text to learn from" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=40, model_type="bpe",
        minloglevel=2, num_threads=1,
    )
    sp = load_tokenizer(tmp_path / "sp.model")
    assert _lm(str(tmp_path / "sp.model")).tok_encode(TEXT) == [sp.bos_id] + sp.encode(TEXT)
    assert _lm("bytes").add_bos is False


def test_add_bos_overrides_the_tokenizer(tmp_path):
    no_bos_default = load_tokenizer(_gguf(tmp_path / "model.gguf", "gpt2", False))
    assert default_add_bos(no_bos_default) is False
    assert default_add_bos(no_bos_default, True) is True
    lm = _lm(str(tmp_path / "model.gguf"), add_bos=True)
    assert lm.tok_encode(TEXT)[0] == 1
    assert _lm("bytes", add_bos=True).tok_encode("x") == [256, ord("x")]
    without_bos = SimpleNamespace(bos_id=None, add_bos_token=True)
    assert default_add_bos(without_bos) is False
    with pytest.raises(ValueError, match=r"add_bos=True but tokenizer .* has no BOS token; set add_bos=false"):
        default_add_bos(without_bos, True)
