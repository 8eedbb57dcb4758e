"""Shared fixtures: real English text (Python's own documentation) and two tiny tokenizers trained on it."""

import json
import re

import pytest
from pydoc_data.topics import topics


@pytest.fixture(scope="session")
def corpus():
    """Sentences of Python's language reference (pydoc_data.topics), 15..300 characters each."""
    lines = []
    for name in sorted(topics):
        for line in topics[name].splitlines():
            line = line.strip()
            if 15 <= len(line) <= 300 and re.search("[a-z]{3}", line):
                lines.append(line)
    return lines[:1500]


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus):
    """A sentencepiece BPE model (vocab 200, with <unk>=0, <s>=1, </s>=2) trained on the corpus."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    text = folder / "train.txt"
    text.write_text("\n".join(corpus[:600]) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=200, model_type="bpe",
        character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, corpus):
    """A folder with an HF tokenizer.json (byte-level BPE, vocab 300) and a tokenizer_config.json
    that names "<|end|>" as EOS, which is not one of the names guessed without a config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("hf_tok")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<|start|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(corpus[:600], trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "bos_token": {"content": "<|start|>"}}))
    return folder
