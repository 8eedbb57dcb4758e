"""A model folder's own tokenizer files load with ``AutoTokenizer``; references are the
``tokenizers`` and ``sentencepiece`` libraries reading the same files."""

import json

import pytest
import torch
from hf_tiny import TOKENIZER_TEXT, VOCAB, tiny_supra, wrap
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = "the lazy fox reads a linear state"


def test_tokenizer_json_without_tokenizer_config(openlm_folder):
    # Only tokenizer.json (and special_tokens_map.json): the class comes from config.json's model_type.
    folder, _, _ = openlm_folder
    assert not (folder / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT).ids
    assert tokenizer(TEXT, add_special_tokens=False).input_ids == expected
    assert tokenizer.decode(expected) == TEXT
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert len(tokenizer) == VOCAB


def test_sentencepiece_tokenizer_model(openlm_folder, tmp_path):
    # Mistral / Llama style: tokenizer.model + a tokenizer_config.json naming the class.
    sentencepiece = pytest.importorskip("sentencepiece")
    folder, _, _ = openlm_folder
    (folder / "tokenizer.json").unlink()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TOKENIZER_TEXT * 3))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=VOCAB, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    (tmp_path / "spm.model").rename(folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(TEXT)
    assert tokenizer(TEXT, add_special_tokens=False).input_ids == expected
    assert tokenizer.decode(expected) == TEXT


@torch.no_grad()
def test_saved_folder_holds_model_and_tokenizer(openlm_folder, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(openlm_folder[0])
    saved = tmp_path / "saved"
    tokenizer.save_pretrained(saved)
    decoder = tiny_supra()
    wrap(decoder).save_pretrained(saved)
    reloaded = AutoTokenizer.from_pretrained(saved)
    ids = reloaded(TEXT, return_tensors="pt").input_ids
    assert ids[0].tolist() == tokenizer(TEXT).input_ids
    assert torch.equal(AutoModelForCausalLM.from_pretrained(saved)(ids).logits, decoder(ids))
