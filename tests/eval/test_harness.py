"""The lm-eval adapter: log-likelihoods, rolling log-likelihoods and generation against direct
computations, batching, registration, and its errors."""

import math
import shutil

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model, model_registry
from torchtune.models.llama3_2 import llama3_2

from supra.data.python_docs import ByteTokenizer
from supra.eval.harness import SupraLM
from supra.generation import generate

PAIRS = [("The cat", " sat"), ("Question: why?\nAnswer: ", "because"), ("", "hello"), ("a", " b c d e f g h")]


def instances(request_type, arguments):
    return [Instance(request_type=request_type, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def direct_loglikelihood(model, context_ids, continuation_ids):
    tokens = context_ids + continuation_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0].float(), dim=-1)
    start = len(context_ids) - 1
    picked = [logprobs[start + i].argmax() == token for i, token in enumerate(continuation_ids)]
    return sum(float(logprobs[start + i, token]) for i, token in enumerate(continuation_ids)), all(picked)


def test_loglikelihoods_equal_a_direct_log_softmax_and_do_not_depend_on_batching(tiny_model):
    lm = SupraLM(model=tiny_model, tokenizer="bytes", device="cpu", batch_size=3)
    results = lm.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
        # lm-eval's rule: trailing spaces of the context move to the continuation; an empty
        # context is conditioned on EOS (the byte tokenizer gets no BOS).
        spaces = len(context) - len(context.rstrip())
        context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
        context_ids = list(context.encode()) if context else [ByteTokenizer.eos_id]
        expected, expected_greedy = direct_loglikelihood(tiny_model, context_ids, list(continuation.encode()))
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    one_by_one = SupraLM(model=tiny_model, tokenizer="bytes", device="cpu", batch_size=1)
    for a, b in zip(results, one_by_one.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]


def test_rolling_loglikelihood_scores_the_whole_document_after_the_prefix_token(tiny_model):
    text = "def f(x):\n    return x + 1\n" * 3
    lm = SupraLM(model=tiny_model, tokenizer="bytes", device="cpu")
    assert lm.max_length is None  # all-linear: the whole document is one window
    expected, _ = direct_loglikelihood(tiny_model, [ByteTokenizer.eos_id], list(text.encode()))
    [whole] = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert whole == pytest.approx(expected, abs=1e-3)
    # Windows of 16 tokens predict each token once, with less context: a different, finite total.
    [windowed] = SupraLM(model=tiny_model, tokenizer="bytes", device="cpu", max_length=16).loglikelihood_rolling(
        instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert math.isfinite(windowed) and windowed != pytest.approx(whole, abs=1e-3)


def test_generation_is_recurrent_greedy_decoding_cut_at_the_stop_strings(tiny_model):
    lm = SupraLM(model=tiny_model, tokenizer="bytes", device="cpu", batch_size=2)
    prompts = ["import os", "The with statement", "x"]
    requests = instances("generate_until", [(p, {"until": ["\n"], "max_gen_toks": 12}) for p in prompts])
    outputs = lm.generate_until(requests, disable_tqdm=True)
    for prompt, output in zip(prompts, outputs):
        new = generate(tiny_model, [list(prompt.encode())], max_new_tokens=12, stop_tokens=[ByteTokenizer.eos_id])[0]
        text = ByteTokenizer().decode([t for t in new if t != ByteTokenizer.eos_id])
        assert output == text.split("\n")[0]


def test_a_plain_torchtune_model_generates_greedily():
    torch.manual_seed(0)
    teacher = llama3_2(vocab_size=258, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16,
                       intermediate_dim=32, max_seq_len=64).eval()
    lm = SupraLM(model=teacher, tokenizer="bytes", device="cpu")
    [output] = lm.generate_until(instances("generate_until", [("abc", {"until": [], "max_gen_toks": 5})]), disable_tqdm=True)
    tokens = list(b"abc")
    with torch.no_grad():
        for _ in range(5):
            tokens.append(int(teacher(torch.tensor([tokens]))[0, -1].argmax()))
    new = tokens[3:]
    assert output == ByteTokenizer().decode(new[: new.index(257)] if 257 in new else new)


def test_registered_as_supra_beside_the_builtin_models(tiny_checkpoint):
    assert get_model("supra") is SupraLM
    # Registering into an empty registry would have hidden lm-eval's own models.
    assert "hf" in model_registry and "vllm" in model_registry
    lm = get_model("supra").create_from_arg_string(f"checkpoint={tiny_checkpoint},tokenizer=bytes,batch_size=4", {"device": "cpu"})
    assert lm.batch_size == 4 and lm.max_length is None and lm.add_bos is False


def test_model_args_are_strict_and_lm_evals_own_settings_tolerant(tiny_checkpoint, caplog):
    create = get_model("supra").create_from_arg_string
    with pytest.raises(ValueError, match=r"unknown supra model argument\(s\) \['dtyp'\]"):
        create(f"checkpoint={tiny_checkpoint},tokenizer=bytes,dtyp=bf16", {"device": "cpu"})
    with caplog.at_level("WARNING"):
        lm = create(f"checkpoint={tiny_checkpoint},tokenizer=bytes", {"device": "cpu", "batch_size": 3, "a_future_setting": 1})
    assert lm.batch_size == 3
    assert any("ignoring lm-eval settings ['a_future_setting']" in r.getMessage() for r in caplog.records)


def test_clear_errors(tmp_path, tiny_model, tiny_checkpoint):
    with pytest.raises(ValueError, match="does not exist"):
        SupraLM(checkpoint=str(tmp_path / "missing"), tokenizer="bytes")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=f"checkpoint {broken} failed to load: HF config.json lacks .*'num_hidden_layers'"):
        SupraLM(checkpoint=str(broken), tokenizer="bytes")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_checkpoint, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"checkpoint {corrupt} failed to load: .*model.safetensors does not match the checksum"):
        SupraLM(checkpoint=str(corrupt), tokenizer="bytes")
    with pytest.raises(ValueError, match=r"unknown supra model argument\(s\) \['pretrained'\]"):
        SupraLM(model=tiny_model, tokenizer="bytes", pretrained="x")
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        SupraLM(tokenizer="bytes")
    with pytest.raises(ValueError, match="automatic batch sizes are not supported"):
        SupraLM(model=tiny_model, tokenizer="bytes", batch_size="auto")
    with pytest.raises(ValueError, match="tokenizer .* has 258 ids but the model's vocabulary has 128"):
        SupraLM(model=llama3_2(vocab_size=128, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16,
                               intermediate_dim=32, max_seq_len=64), tokenizer="bytes")
