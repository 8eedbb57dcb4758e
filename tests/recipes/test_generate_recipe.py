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
    return load_config("tiny/generate", list(overrides), defaults=RECIPE["DEFAULTS"], rules=RECIPE["RULES"])


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


@pytest.mark.parametrize(
    "override, message",
    [
        ("temperature=abc", r"temperature must be a finite number >= 0; got 'abc' \(str\)"),
        ("temperature=.nan", r"temperature must be a finite number >= 0; got nan \(float\)"),
        ("max_new_tokens=abc", r"max_new_tokens must be an integer >= 1; got 'abc' \(str\)"),
        ("max_new_tokens=2.5", r"max_new_tokens must be an integer >= 1; got 2.5 \(float\)"),
        ("top_k=2.5", r"top_k must be an integer >= 1, or null; got 2.5"),
        ("prompt=", r"prompt must be a string; got None \(NoneType\)"),
        ("dtype=fp8", r"dtype must be one of \[.*'auto'.*\], or null; got 'fp8'"),
    ],
)
def test_bad_values_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ValueError, match=message):
        _config(override)


def test_a_folder_without_a_checkpoint_says_so_before_looking_for_a_tokenizer(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"{tmp_path} matches no known checkpoint format"):
        RECIPE["recipe_main"](_config(f"checkpoint={tmp_path}", "tokenizer=null"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="is an uptrain output_dir without a complete checkpoint yet"):
        RECIPE["recipe_main"](_config(f"checkpoint={tmp_path / 'run'}", "tokenizer=null"))


def test_a_damaged_checkpoint_fails_naming_the_file_unless_verification_is_off(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(supra_test_tiny(vocab_size=258), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    common = [f"checkpoint={tmp_path / 'ckpt'}", "tokenizer=bytes", "max_new_tokens=2"]
    with pytest.raises(ValueError, match=f"{weights} does not match the checksum"):
        RECIPE["recipe_main"](_config(*common))
    assert len(RECIPE["recipe_main"](_config(*common, "verify_checksums=false", "stop_at_eos=false"))) == 2
