"""The generate recipe: any checkpoint plus its tokenizer, streamed text, speed and state size."""

import re
import runpy

import pytest
import torch

from supra.checkpoint import load_checkpoint, save_checkpoint
from supra.config import load_config, recipe_root, resolve_path
from supra.data import load_tokenizer
from supra.generation import generate
from supra.models import supra_test_tiny

RECIPE = runpy.run_path(str(recipe_root() / "generate.py"), run_name="generate_under_test")


def _config(*overrides):
    return load_config("tiny/generate", list(overrides), defaults=RECIPE["DEFAULTS"])


def test_streams_the_greedy_continuation_and_reports_speed_and_state(tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(supra_test_tiny(vocab_size=258), tmp_path / "ckpt")
    tokens = RECIPE["recipe_main"](_config(f"checkpoint={tmp_path / 'ckpt'}", "temperature=0", "max_new_tokens=12",
                                           "stop_at_eos=false", "prompt=Hello", "tokenizer=bytes"))
    out = capsys.readouterr().out
    expected = generate(load_checkpoint(tmp_path / "ckpt"), [list(b"Hello")], max_new_tokens=12)[0]
    assert tokens == expected
    assert out.startswith("Hello")
    assert re.search(r"prefill: 5 tokens in .* decode: 12 tokens at", out)
    # 2 layers x 4 heads x 8 x 8 float32 values.
    assert f"recurrent state: {2 * 4 * 8 * 8 * 4 / 2**20:.2f} MiB per sequence" in out


@pytest.mark.slow
def test_compiled_decode_reports_compilation_apart_from_tokens_per_second(tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(supra_test_tiny(vocab_size=258), tmp_path / "ckpt")
    tokens = RECIPE["recipe_main"](_config(f"checkpoint={tmp_path / 'ckpt'}", "temperature=0", "max_new_tokens=6",
                                           "stop_at_eos=false", "prompt=Hello", "tokenizer=bytes", "compile=true"))
    assert tokens == generate(load_checkpoint(tmp_path / "ckpt"), [list(b"Hello")], max_new_tokens=6)[0]
    assert re.search(r"compilation: the first decode step took [0-9.]+ s \(not counted in tokens/s\)",
                     capsys.readouterr().out)


def test_streamed_sentencepiece_text_equals_decoding_the_whole_sequence(capsys):
    # The shipped teacher (a supra: path) and its sentencepiece tokenizer: pieces open with a space
    # that decoding the new tokens alone would drop.
    tokens = RECIPE["recipe_main"](_config("checkpoint=supra:assets/tiny_teacher", "temperature=0",
                                           "max_new_tokens=12", "stop_at_eos=false", "prompt=Return a list of"))
    tokenizer = load_tokenizer(resolve_path("supra:assets/tiny_teacher") / "tokenizer.model")
    prompt = [tokenizer.bos_id] + tokenizer.encode("Return a list of")
    out = capsys.readouterr().out
    streamed = out[: out.index("\nprefill:")]
    assert streamed == tokenizer.decode(prompt + tokens)
    # The continuation opens with a space-led piece here (" the ..."), the case a decode of the
    # new tokens alone gets wrong.
    assert streamed.startswith("Return a list of ")


def test_uptrain_output_dir_resolves_to_its_latest_checkpoint(tmp_path):
    for step in (3, 12):
        save_checkpoint(supra_test_tiny(vocab_size=258), tmp_path / "checkpoints" / f"step_{step:07d}" / "model")
    assert RECIPE["resolve_checkpoint"](str(tmp_path)) == tmp_path / "checkpoints" / "step_0000012" / "model"


def test_missing_checkpoint_and_tokenizer_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        RECIPE["recipe_main"](_config(f"checkpoint={tmp_path / 'nothing'}"))
    save_checkpoint(supra_test_tiny(vocab_size=258), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="has no tokenizer.json or tokenizer.model"):
        RECIPE["recipe_main"](_config(f"checkpoint={tmp_path / 'ckpt'}", "tokenizer=null"))
