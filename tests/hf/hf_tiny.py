"""Tiny checkpoints for the transformers interop tests: HF "openlm" folders written by the
reference helpers of tests/checkpoint, supra models, and a BPE tokenizer for them.

conftest.py puts this folder on the import path (test directories are not packages).
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import supra.hf  # noqa: F401  (registers the Auto classes)
from supra.hf import SupraForCausalLM
from supra.models import supra_decoder, supra_test_tiny

VOCAB = 64
SPECIAL = ["<unk>", "<s>", "</s>"]


def load_by_path(name: str, path: Path):
    """Imports the file ``path`` as module ``name`` (once)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


# The float64 reference model of the linear_open_lm decoder and its folder writers.
ref = load_by_path("openlm_reference", Path(__file__).parents[1] / "checkpoint" / "openlm_reference.py")


def write_openlm_folder(folder: Path, seed: int = 0, safetensors: bool = False, **overrides):
    """An HF "openlm" folder (config.json + weights) as the reference writes it.

    Returns:
        tuple: (folder, open_lm config dict, state dict in the reference's names).
    """
    config = ref.make_openlm_config(vocab_size=VOCAB, **overrides)
    state_dict = ref.random_openlm_state_dict(config, seed)
    return ref.write_hf_openlm_folder(folder, config, state_dict, safetensors=safetensors), config, state_dict


@torch.no_grad()
def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights moved off their init (norm gains off 1, ...), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_((0.1 * torch.randn(p.shape, generator=generator)).to(p.dtype))
    return model.eval()


def tiny_supra(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer SUPRA decoder (32 wide, GQA 4/2 heads, vocab 64)."""
    torch.manual_seed(seed)
    return perturbed(supra_test_tiny(vocab_size=VOCAB, **overrides), seed)


def tiny_hybrid(seed: int = 0) -> torch.nn.Module:
    """3 layers, the middle one softmax attention with a KV cache."""
    torch.manual_seed(seed)
    return perturbed(supra_decoder(
        vocab_size=VOCAB, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32,
        intermediate_dim=64, max_seq_len=64, softmax_layers=[1],
    ), seed)


def wrap(decoder: torch.nn.Module, **config) -> SupraForCausalLM:
    """The transformers model around a supra decoder, in eval mode."""
    return SupraForCausalLM.from_decoder(decoder, **config).eval()


TOKENIZER_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "machine learning is the study of programs that improve with data",
    "a recurrent state holds everything the model has read so far",
    "linear attention replaces the softmax with a decayed sum of outer products",
]


def write_tokenizer(folder: Path) -> Path:
    """A sentencepiece-style BPE ``tokenizer.json`` (Metaspace, lowercase letters) with exactly
    the model's 64 ids, <unk> <s> </s> first. No tokenizer_config.json: AutoTokenizer must find the
    tokenizer through the folder's config.json."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=list("abcdefghijklmnopqrstuvwxyz"),
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT * 4, trainer)
    if tokenizer.get_vocab_size() != VOCAB:
        raise ValueError(f"the test tokenizer has {tokenizer.get_vocab_size()} tokens, not {VOCAB}: add text")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder
