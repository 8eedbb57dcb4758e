"""Loading Hugging Face softmax folders (llama, mistral, qwen2): logits against transformers.

Every folder is written by transformers itself (``save_pretrained`` of a tiny random model), or
from its state dict in the layouts transformers reads (pickled ``pytorch_model.bin``, sharded
``.bin`` with an index). The reference is the transformers model that wrote the folder, in fp32:
``load_checkpoint`` must give its logits within max|diff| / max|ref| <= 1e-5. Weights are drawn
far from transformers' tiny default init (std 0.02, norms at exactly 1), so that attention is
peaked, RoPE matters, and a norm weight loaded into the wrong place changes the logits.
"""

import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune.modules import MultiHeadAttention
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from supra.checkpoint import detect_format, export_openlm, load_checkpoint, save_checkpoint
from supra.convert import new_parameter_names
from supra.models import supra_test_tiny
from supra.modules import LinearAttention

RTOL = 1e-5
# The recurrent state accumulates in float32 over more, smaller steps than the chunked form.
RECURRENT_RTOL = 2e-5
BATCH, SEQ = 2, 17
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, intermediate_size=64, max_position_embeddings=64,
)
LLAMA3_SCALING = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)


def _relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _tokens(vocab_size=128, seed=0):
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_model(family="llama", seed=0, **overrides):
    """A tiny transformers model with O(1) random weights (norm gains around 1, biases nonzero)."""
    config_class, model_class = FAMILIES[family]
    config = config_class(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(seed + 1000)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
    return model


@torch.no_grad()
def _hf_logits(model, tokens):
    return model(tokens).logits.float()


def _write(model, folder, layout="safetensors"):
    """Writes ``model`` as transformers would read it, in one of four layouts."""
    if layout == "safetensors":
        model.save_pretrained(folder)
    elif layout == "sharded_safetensors":
        model.save_pretrained(folder, max_shard_size="20KB")
    else:
        # transformers 5 always writes safetensors: write its pickled layouts by hand.
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if layout == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            names = list(state)
            parts = [names[: len(names) // 2], names[len(names) // 2 :]]
            weight_map = {}
            for i, part in enumerate(parts):
                shard = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
                torch.save({k: state[k] for k in part}, folder / shard)
                weight_map.update({k: shard for k in part})
            index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _to_top_level_rope(config):
    """Rewrites transformers 5's ``rope_parameters`` as the older top-level ``rope_theta`` + ``rope_scaling``."""
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None


def _assert_matches(folder, hf_model, tokens=None, **load_kwargs):
    tokens = _tokens(hf_model.config.vocab_size) if tokens is None else tokens
    model = load_checkpoint(folder, **load_kwargs)
    with torch.no_grad():
        logits = model(tokens)
    expected = _hf_logits(hf_model, tokens)
    assert logits.shape == expected.shape == (BATCH, SEQ, hf_model.config.vocab_size)
    error = _relative_error(logits, expected)
    assert error <= RTOL, f"relative error {error:.2e} > {RTOL:.0e}"
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A GQA llama model and its safetensors folder, shared by the read-only tests."""
    model = _hf_model("llama", seed=1)
    return model, _write(model, tmp_path_factory.mktemp("llama") / "hf")


# Formats and families.

LAYOUTS = ["safetensors", "bin", "sharded_safetensors", "sharded_bin"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tmp_path, family, layout):
    hf_model = _hf_model(family, seed=len(family) + len(layout))
    folder = _write(hf_model, tmp_path / "hf", layout)
    files = sorted(p.name for p in folder.iterdir())
    weights = {
        "safetensors": ["model.safetensors"],
        "bin": ["pytorch_model.bin"],
        "sharded_safetensors": ["model.safetensors.index.json"],
        "sharded_bin": ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                        "pytorch_model.bin.index.json"],
    }[layout]
    assert set(weights) <= set(files), files
    assert layout.startswith("sharded") != any(f in files for f in ("model.safetensors", "pytorch_model.bin"))
    assert layout.endswith("bin") != any(f.endswith(".safetensors") for f in files), files
    if layout == "sharded_safetensors":
        assert len([f for f in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]) >= 2, files
    assert detect_format(folder) == "hf"
    model = _assert_matches(folder, hf_model)
    assert all(isinstance(layer.attn, MultiHeadAttention) for layer in model.layers)
    assert not model.training


def test_qwen2_biases_matter(tmp_path):
    # Guards the qwen2 case above: with its q/k/v biases zeroed, transformers' logits move.
    hf_model = _hf_model("qwen2", seed=3)
    tokens = _tokens()
    expected = _hf_logits(hf_model, tokens)
    with torch.no_grad():
        for layer in hf_model.model.layers:
            layer.self_attn.q_proj.bias.zero_()
            layer.self_attn.k_proj.bias.zero_()
            layer.self_attn.v_proj.bias.zero_()
    assert _relative_error(_hf_logits(hf_model, tokens), expected) > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_multi_head_attention(tmp_path, family):
    hf_model = _hf_model(family, seed=5, num_key_value_heads=4)
    model = _assert_matches(_write(hf_model, tmp_path / "hf"), hf_model)
    assert model.layers[0].attn.num_kv_heads == model.layers[0].attn.num_heads == 4


# save_pretrained drops the tied lm_head.weight; a torch.save'd state dict holds it under both names.
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_tied_word_embeddings(tmp_path, layout):
    hf_model = _hf_model("llama", seed=6, tie_word_embeddings=True)
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    model = _assert_matches(_write(hf_model, tmp_path / "hf", layout), hf_model)
    # One matrix: training the embedding trains the output layer too.
    with torch.no_grad():
        model.tok_embeddings.weight.zero_()
        assert torch.all(model(_tokens()) == 0)


def test_tied_word_embeddings_that_differ(tmp_path):
    hf_model = _hf_model("llama", seed=6, tie_word_embeddings=True)
    folder = _write(hf_model, tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # Whichever of the two names comes second is reported, with the tensor both map to.
    with pytest.raises(ValueError, match="tok_embeddings.weight") as info:
        load_checkpoint(folder)
    assert "tied" in str(info.value)


# RoPE configs: transformers 5 writes ``rope_parameters``; older files put ``rope_theta`` (and
# ``rope_scaling``) at the top level. Both must give the same model.

ROPE_CASES = {
    "theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "llama3": dict(rope_parameters={**LLAMA3_SCALING, "rope_theta": 10_000.0}),
}


@pytest.mark.parametrize("style", ["rope_parameters", "top_level"])
@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_config_styles(tmp_path, case, style):
    hf_model = _hf_model("llama", seed=8, **ROPE_CASES[case])
    folder = _write(hf_model, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == ("llama3" if case == "llama3" else "default")
    if style == "top_level":
        _edit_config(folder, _to_top_level_rope)
        config = json.loads((folder / "config.json").read_text())
        assert "rope_parameters" not in config and "rope_theta" in config
    _assert_matches(folder, hf_model)


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_cases_change_the_logits(case):
    # Guards the RoPE tests: a loader ignoring rope_theta or the llama3 scaling must fail them.
    tokens = _tokens()
    configured = _hf_logits(_hf_model("llama", seed=8, **ROPE_CASES[case]), tokens)
    plain = _hf_logits(_hf_model("llama", seed=8), tokens)
    assert _relative_error(configured, plain) > 1e-3


def test_sliding_window_longer_than_input_is_full_attention(tmp_path, caplog):
    # mistral with sliding_window < max_position_embeddings: a warning, and exact logits for inputs within the window.
    hf_model = _hf_model("mistral", seed=9, sliding_window=32)
    with caplog.at_level(logging.WARNING):
        _assert_matches(_write(hf_model, tmp_path / "hf"), hf_model)
    assert "sliding_window" in caplog.text


# Loading options: dtype, linearize.


def test_dtype_bfloat16_keeps_slopes_float32(llama):
    hf_model, folder = llama
    model = load_checkpoint(folder, dtype=torch.bfloat16, linearize=True)
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.bfloat16}, dtypes
    heads = hf_model.config.num_attention_heads
    expected = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], dtype=torch.float32)
    for layer in model.layers:
        assert layer.attn.decay.slopes.dtype == torch.float32
        assert torch.equal(layer.attn.decay.slopes, expected)
    # The pretrained tensors are transformers' rounded once to bf16.
    assert torch.equal(model.layers[1].attn.q_proj.weight, hf_model.model.layers[1].self_attn.q_proj.weight.bfloat16())


def test_dtype_bfloat16_softmax_model(llama):
    hf_model, folder = llama
    model = load_checkpoint(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.tok_embeddings.weight, hf_model.model.embed_tokens.weight.bfloat16())


def _hf_name_to_supra(name):
    """The supra name of an HF tensor, written out independently of the library's key map."""
    fixed = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.scale",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
    rest = {
        "input_layernorm.weight": "sa_norm.scale",
        "post_attention_layernorm.weight": "mlp_norm.scale",
        "self_attn.o_proj.weight": "attn.output_proj.weight",
        "mlp.gate_proj.weight": "mlp.w1.weight",
        "mlp.up_proj.weight": "mlp.w3.weight",
        "mlp.down_proj.weight": "mlp.w2.weight",
    }.get(rest, rest.replace("self_attn.", "attn."))
    return f"layers.{layer}.{rest}"


def test_linearize_keeps_pretrained_tensors(llama):
    hf_model, folder = llama
    model = load_checkpoint(folder, linearize=True)
    assert all(isinstance(layer.attn, LinearAttention) for layer in model.layers)
    params = dict(model.named_parameters())
    hf_state = hf_model.state_dict()
    for hf_name, hf_tensor in hf_state.items():
        assert torch.equal(params.pop(_hf_name_to_supra(hf_name)), hf_tensor), hf_name
    # What is left is exactly the new SUPRA parameters: GQA gives queries and keys their own feature maps.
    expected_new = {
        f"layers.{i}.attn.{fm}.proj.{kind}"
        for i in range(2) for fm in ("feature_map", "k_feature_map") for kind in ("weight", "bias")
    }
    assert set(params) == expected_new
    assert set(new_parameter_names(model)) == expected_new
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in params.values())
    assert torch.equal(model.tok_embeddings.weight, hf_model.model.embed_tokens.weight)
    assert torch.equal(model.layers[0].attn.q_proj.weight, hf_model.model.layers[0].self_attn.q_proj.weight)


def test_linearize_logs_new_parameters(llama, caplog):
    _, folder = llama
    with caplog.at_level(logging.WARNING, logger="supra"):
        load_checkpoint(folder, linearize=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("new SUPRA parameters" in w and "layers.0.attn.feature_map.proj.weight" in w for w in warnings), warnings
    caplog.clear()
    # A plain softmax load initializes nothing and says nothing of it.
    with caplog.at_level(logging.WARNING, logger="supra"):
        load_checkpoint(folder)
    assert "new SUPRA parameters" not in caplog.text


@torch.no_grad()
def test_linearized_recurrent_equals_parallel(llama):
    _, folder = llama
    model = load_checkpoint(folder, linearize=True)
    tokens = _tokens(seed=4)
    parallel = model(tokens)
    model.setup_caches(batch_size=BATCH, dtype=torch.float32)
    chunks = [model(tokens[:, :9])] + [model(tokens[:, t : t + 1]) for t in range(9, SEQ)]
    recurrent = torch.cat(chunks, dim=1)
    error = _relative_error(recurrent, parallel)
    assert error <= RECURRENT_RTOL, f"relative error {error:.2e} > {RECURRENT_RTOL:.0e}"
    # After a reset the state starts over: a shorter prefill matches the parallel prefix.
    model.reset_caches()
    error = _relative_error(model(tokens[:, :5]), parallel[:, :5])
    assert error <= RECURRENT_RTOL, f"after reset_caches: relative error {error:.2e}"


@torch.no_grad()
def test_linearize_some_layers_gives_hybrid(llama):
    hf_model, folder = llama
    model = load_checkpoint(folder, linearize={"layers": [1]})
    assert isinstance(model.layers[0].attn, MultiHeadAttention)
    assert isinstance(model.layers[1].attn, LinearAttention)
    assert set(new_parameter_names(model)) == {
        f"layers.1.attn.{fm}.proj.{kind}" for fm in ("feature_map", "k_feature_map") for kind in ("weight", "bias")
    }
    # The softmax layer 0 is still transformers' layer 0: same hidden state after it.
    tokens = _tokens(seed=2)
    model.output_hidden_states = [1]
    hidden, logits = model(tokens)
    expected = hf_model(tokens, output_hidden_states=True).hidden_states[1]
    assert _relative_error(hidden, expected) <= RTOL
    # And layer 1 is linear now: the logits are no longer transformers'.
    assert _relative_error(logits, _hf_logits(hf_model, tokens)) > 1e-3


# Errors: ValueErrors naming the culprit.


def _folder_with_config(tmp_path, edit):
    folder = _write(_hf_model("llama", seed=2), tmp_path / "hf")
    _edit_config(folder, edit)
    return folder


def test_unsupported_model_type(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64}
    ))
    save_file({"wte.weight": torch.zeros(128, 32)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_checkpoint(folder)


def test_unsupported_rope_type(tmp_path):
    def yarn(config):
        config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10_000.0,
                                     "original_max_position_embeddings": 16}

    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        load_checkpoint(_folder_with_config(tmp_path, yarn))


def test_unsupported_rope_type_top_level(tmp_path):
    def dynamic(config):
        config.pop("rope_parameters")
        config["rope_theta"] = 10_000.0
        config["rope_scaling"] = {"type": "dynamic", "factor": 2.0}

    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        load_checkpoint(_folder_with_config(tmp_path, dynamic))


def test_unsupported_activation(tmp_path):
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        load_checkpoint(_folder_with_config(tmp_path, lambda c: c.update(hidden_act="gelu")))


def test_config_missing_a_key(tmp_path):
    with pytest.raises(ValueError, match=r"HF config.json lacks \['num_hidden_layers'\]"):
        load_checkpoint(_folder_with_config(tmp_path, lambda c: c.pop("num_hidden_layers")))


def _edit_weights(tmp_path, edit):
    folder = _write(_hf_model("llama", seed=2), tmp_path / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_missing_tensor(tmp_path):
    folder = _edit_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="missing") as info:
        load_checkpoint(folder)
    assert "layers.1.mlp.w3.weight" in str(info.value)
    assert str(folder) in str(info.value)


def test_missing_tensor_not_excused_by_linearize(tmp_path):
    # linearize excuses the new parameters only, not a pretrained projection.
    folder = _edit_weights(tmp_path, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match="missing") as info:
        load_checkpoint(folder, linearize=True)
    assert "layers.0.attn.k_proj.weight" in str(info.value)


def test_unexpected_tensor(tmp_path):
    folder = _edit_weights(tmp_path, lambda t: t.update({"model.layers.0.self_attn.rogue.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match="unexpected") as info:
        load_checkpoint(folder)
    assert "model.layers.0.self_attn.rogue.weight" in str(info.value)


def test_wrongly_shaped_tensor(tmp_path):
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    folder = _edit_weights(tmp_path, lambda t: t.update({q_proj: torch.zeros(31, 32)}))
    with pytest.raises(ValueError, match="wrongly shaped") as info:
        load_checkpoint(folder)
    assert "layers.0.attn.q_proj.weight" in str(info.value)
    assert "31" in str(info.value)


def test_truncated_safetensors(tmp_path):
    folder = _write(_hf_model("llama", seed=2), tmp_path / "hf")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        load_checkpoint(folder)
    assert str(weights) in str(info.value)


def test_truncated_bin(tmp_path):
    folder = _write(_hf_model("llama", seed=2), tmp_path / "hf", "bin")
    weights = folder / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        load_checkpoint(folder)
    assert str(weights) in str(info.value)


def test_index_lists_missing_shard(tmp_path):
    folder = _write(_hf_model("llama", seed=2), tmp_path / "hf", "sharded_safetensors")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00099-of-00099.safetensors"):
        load_checkpoint(folder)


def test_config_without_weights(tmp_path):
    folder = tmp_path / "hf"
    _hf_model("llama").config.save_pretrained(folder)
    with pytest.raises(ValueError, match="no weight files") as info:
        load_checkpoint(folder)
    assert str(folder) in str(info.value)


def test_unknown_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="matches no known checkpoint format"):
        load_checkpoint(tmp_path / "empty")


def test_config_argument_for_a_folder(llama):
    _, folder = llama
    with pytest.raises(ValueError, match="config= is only for open_lm_raw"):
        load_checkpoint(folder, config={"dim": 32})


@pytest.mark.parametrize("fmt", ["supra", "openlm"])
def test_linearize_argument_for_a_supra_model(tmp_path, fmt):
    folder = tmp_path / fmt
    (save_checkpoint if fmt == "supra" else export_openlm)(supra_test_tiny(), folder)
    assert detect_format(folder) == fmt
    for linearize in (True, {"layers": [0]}):
        with pytest.raises(ValueError, match=f"linearize= applies to softmax .*{fmt!r} checkpoint"):
            load_checkpoint(folder, linearize=linearize)
