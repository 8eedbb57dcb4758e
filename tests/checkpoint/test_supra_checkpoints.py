"""supra folders (save -> load), openlm export, and the float32 decay slopes.

The reference in every round trip is the model that was saved: the reloaded model must hold the
same tensors (same dtypes) and give bit-identical logits. Weights are perturbed away from their
init first (norm gains off 1, biases nonzero), so a tensor that is rebuilt instead of loaded, or a
build argument that is not replayed, shows in the logits.
"""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torchtune.models.llama2 import llama2
from torchtune.modules import MultiHeadAttention, TiedLinear
from transformers import LlamaConfig, LlamaForCausalLM

import supra.checkpoint
from supra.checkpoint import build_from_spec, detect_format, export_openlm, load_checkpoint, save_checkpoint
from supra.convert import linearize
from supra.models import supra_decoder, supra_test_tiny
from supra.modules import LinearAttention, ReLUFeatureMap

VOCAB = 128
TOKENS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _perturbed(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_((0.1 * torch.randn(p.shape, generator=generator)).to(p.dtype))
    return model.eval()


@torch.no_grad()
def _logits(model):
    return model(TOKENS)


def _assert_same_model(loaded, model):
    assert type(loaded) is type(model)
    assert [type(layer.attn) for layer in loaded.layers] == [type(layer.attn) for layer in model.layers]
    expected, actual = model.state_dict(), loaded.state_dict()
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name
    assert torch.equal(_logits(loaded), _logits(model))


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return _perturbed(supra_test_tiny(**overrides), seed)


# Round trips.

TINY_VARIANTS = {
    "gqa": {},
    "mha": {"num_kv_heads": 4},
    "qk_norm": {"qk_norm": True},
    "retnet": {"decay": "retnet"},
    "decay_start": {"decay_start": 0.3},
    "no_decay": {"decay": "none"},
    "layer_norm_qk_norm": {"norm_type": "default_layer_norm", "qk_norm": True, "norm_eps": 0.05},
    "gain_only_layer_norm": {"norm_type": "gain_only_lp_layer_norm"},
    "no_wb_layer_norm": {"norm_type": "no_wb_layer_norm", "num_kv_heads": 1},
    "tied": {"tie_word_embeddings": True},
    "feature_dim": {"feature_dim": 12},
    "interleaved_rope_base": {"rope_style": "interleaved", "rope_base": 500.0},
    "denominator": {"normalization": "denominator"},
}


@pytest.mark.parametrize("overrides", TINY_VARIANTS.values(), ids=TINY_VARIANTS.keys())
def test_round_trip_tiny(tmp_path, overrides):
    model = _tiny(seed=len(overrides), **overrides)
    save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors", "supra_config.json"]
    assert detect_format(tmp_path / "ckpt") == "supra"
    loaded = load_checkpoint(tmp_path / "ckpt")
    _assert_same_model(loaded, model)
    assert loaded.supra_spec == model.supra_spec
    assert not loaded.training


def test_round_trip_keeps_tied_embeddings_tied(tmp_path):
    model = _tiny(tie_word_embeddings=True)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded.output, TiedLinear)
    with torch.no_grad():
        loaded.tok_embeddings.weight.zero_()
        assert torch.all(_logits(loaded) == 0)


def test_round_trip_hybrid(tmp_path):
    torch.manual_seed(1)
    model = _perturbed(supra_decoder(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
        max_seq_len=64, softmax_layers=[0],
    ), seed=1)
    assert isinstance(model.layers[0].attn, MultiHeadAttention)
    save_checkpoint(model, tmp_path / "ckpt")
    _assert_same_model(load_checkpoint(tmp_path / "ckpt"), model)


def test_round_trip_of_a_linearized_hf_model(tmp_path):
    torch.manual_seed(2)
    hf_model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ))
    hf_model.save_pretrained(tmp_path / "hf")
    model = _perturbed(load_checkpoint(
        tmp_path / "hf", linearize={"layers": [1], "decay": "retnet", "normalization": "denominator"}), seed=2)
    save_checkpoint(model, tmp_path / "ckpt")

    record = json.loads((tmp_path / "ckpt" / "supra_config.json").read_text())
    assert record["format"] == "supra" and record["builder"] == "supra_decoder"
    assert record["kwargs"]["softmax_layers"] == [0, 1] and record["kwargs"]["rope_base"] == 500.0
    assert [(call["layers"], call["decay"]) for call in record["linearize"]] == [([1], "retnet")]

    loaded = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded.layers[0].attn, MultiHeadAttention)
    assert isinstance(loaded.layers[1].attn, LinearAttention)
    assert loaded.layers[1].attn.denominator_eps is not None
    _assert_same_model(loaded, model)


# torchtune's RMSNorm normalizes in fp32 with the bf16 gain: torch warns, the result is right.
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_round_trip_bfloat16(tmp_path):
    model = _tiny(qk_norm=True).to(torch.bfloat16)
    save_checkpoint(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(layer.attn.decay.slopes.dtype == torch.float32 for layer in loaded.layers)
    _assert_same_model(loaded, model)


def test_load_with_dtype_casts_a_supra_folder(tmp_path):
    model = _tiny()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.layers[0].attn.q_proj.weight, model.layers[0].attn.q_proj.weight.bfloat16())


def test_save_an_explicit_state_dict(tmp_path):
    # As after FSDP training: the weights come from a gathered state dict, the record from the model.
    model, trained = _tiny(seed=8), _tiny(seed=9)
    save_checkpoint(model, tmp_path / "ckpt", state_dict=trained.state_dict())
    _assert_same_model(load_checkpoint(tmp_path / "ckpt"), trained)


def test_openlm_folder_to_supra_folder(tmp_path):
    model = _tiny(seed=10, qk_norm=True, norm_type="gain_only_lp_layer_norm", decay="retnet")
    export_openlm(model, tmp_path / "openlm")
    from_openlm = load_checkpoint(tmp_path / "openlm")
    save_checkpoint(from_openlm, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    _assert_same_model(loaded, from_openlm)
    assert torch.equal(_logits(loaded), _logits(model))


# Sharding.


def _shard_names(folder):
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


@pytest.mark.parametrize("size", [6000, "10KB", "16KiB"])
def test_sharded_save(tmp_path, size):
    limit = {6000: 6000, "10KB": 10_000, "16KiB": 16_384}[size]
    model = _tiny(seed=3)
    state = model.state_dict()
    save_checkpoint(model, tmp_path / "ckpt", max_shard_size=size)
    folder = tmp_path / "ckpt"
    names = _shard_names(folder)
    n = len(names)
    assert n >= 2
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (folder / "model.safetensors").exists()

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    order = list(state)
    shards = []
    for name in names:
        with safe_open(str(folder / name), framework="pt") as f:
            keys = sorted(f.keys(), key=order.index)
        assert all(index["weight_map"][k] == name for k in keys)
        shards.append(keys)
    assert sorted(k for keys in shards for k in keys) == sorted(state)

    def nbytes(keys):
        return sum(state[k].numel() * state[k].element_size() for k in keys)

    for keys, following in zip(shards, shards[1:] + [None]):
        # Within the limit unless one tensor alone exceeds it; and full: the next tensor did not fit.
        assert nbytes(keys) <= limit or len(keys) == 1, (keys, nbytes(keys), limit)
        if following:
            assert nbytes(keys) + nbytes(following[:1]) > limit, (keys, following[0], limit)

    _assert_same_model(load_checkpoint(folder), model)


@pytest.mark.parametrize("size", ["5GB", "500MB", 10**9])
def test_large_shard_size_gives_one_file(tmp_path, size):
    save_checkpoint(_tiny(), tmp_path / "ckpt", max_shard_size=size)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors", "supra_config.json"]


@pytest.mark.parametrize(
    "size,expected",
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("20KB", 20_000), ("2GiB", 2 * 2**30), ("1.5 mb", 1_500_000),
     ("123", 123), (4096, 4096)],
)
def test_shard_size_parsing(size, expected):
    assert supra.checkpoint._parse_size(size) == expected


@pytest.mark.parametrize("size", ["lots", "5 XB", "-3MB", "GB"])
def test_bad_shard_size(tmp_path, size):
    with pytest.raises(ValueError, match="max_shard_size"):
        save_checkpoint(_tiny(), tmp_path / "ckpt", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []


# Atomic writes.


def _fail_after(real, message):
    def fail(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(message)

    return fail


def test_interrupted_weight_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(supra.checkpoint, "save_safetensors_shards",
                        _fail_after(supra.checkpoint.save_safetensors_shards, "disk full"))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_tiny(), tmp_path / "ckpt", max_shard_size=6000)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_config_write_leaves_nothing(tmp_path, monkeypatch):
    def dumps(*args, **kwargs):
        raise OSError("interrupted")

    monkeypatch.setattr(supra.checkpoint, "json", SimpleNamespace(dumps=dumps))
    with pytest.raises(OSError, match="interrupted"):
        save_checkpoint(_tiny(), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    old = _tiny(seed=4)
    save_checkpoint(old, tmp_path / "ckpt")
    monkeypatch.setattr(supra.checkpoint, "save_safetensors_shards",
                        _fail_after(supra.checkpoint.save_safetensors_shards, "disk full"))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_tiny(seed=5), tmp_path / "ckpt", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    _assert_same_model(load_checkpoint(tmp_path / "ckpt"), old)


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _fail_after(torch.save, "disk full"))
    with pytest.raises(OSError, match="disk full"):
        export_openlm(_tiny(), tmp_path / "openlm")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination(tmp_path):
    first, second = _tiny(seed=6), _tiny(seed=7)
    save_checkpoint(first, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        save_checkpoint(second, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="already exists.*overwrite"):
        export_openlm(second, tmp_path / "ckpt")
    _assert_same_model(load_checkpoint(tmp_path / "ckpt"), first)

    (tmp_path / "ckpt" / "stale.txt").write_text("from the old folder")
    save_checkpoint(second, tmp_path / "ckpt", overwrite=True)
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    _assert_same_model(load_checkpoint(tmp_path / "ckpt"), second)

    export_openlm(first, tmp_path / "ckpt", overwrite=True)
    assert detect_format(tmp_path / "ckpt") == "openlm"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_overwrite_replaces_a_file_or_a_link(tmp_path):
    model = _tiny(seed=11)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt").write_text("not a checkpoint")
    save_checkpoint(model, tmp_path / "out" / "ckpt", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ckpt"]
    _assert_same_model(load_checkpoint(tmp_path / "out" / "ckpt"), model)

    # A link is replaced, not followed: the folder it pointed to stays as it was.
    (tmp_path / "link").symlink_to(tmp_path / "out")
    export_openlm(model, tmp_path / "link", overwrite=True)
    assert not (tmp_path / "link").is_symlink() and detect_format(tmp_path / "link") == "openlm"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out"]


# What cannot be saved, or loaded.


def test_plain_torchtune_model_has_no_build_record(tmp_path):
    model = llama2(vocab_size=VOCAB, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64)
    with pytest.raises(ValueError, match="build record"):
        save_checkpoint(model, tmp_path / "ckpt")
    linearize(model)
    with pytest.raises(ValueError, match="build record"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_custom_feature_map_cannot_be_saved(tmp_path):
    model = supra_decoder(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
        max_seq_len=64, softmax_layers=[0, 1],
    )
    linearize(model, layers=[0], feature_map=lambda in_dim, out_dim: ReLUFeatureMap(in_dim, out_dim))
    with pytest.raises(ValueError, match="custom feature map"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_builder_outside_supra_models(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("os.system", lambda *args: calls.append(args))
    save_checkpoint(_tiny(), tmp_path / "ckpt")
    record_file = tmp_path / "ckpt" / "supra_config.json"
    record = json.loads(record_file.read_text())
    for builder in ("os.system", "system", "NORM_TYPES"):
        record_file.write_text(json.dumps({**record, "builder": builder, "kwargs": {"command": "echo hacked"}}))
        with pytest.raises(ValueError, match=f"builder {re.escape(repr(builder))} is not a supra.models model builder"):
            load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="'os.system' is not a supra.models model builder"):
        build_from_spec({"builder": "os.system", "kwargs": {"command": "echo hacked"}})
    assert calls == []


def test_build_from_spec_replays_linearize():
    spec = {"builder": "supra_test_tiny", "kwargs": {"softmax_layers": [0, 1]}, "linearize": [{"layers": [0]}]}
    model = build_from_spec(spec)
    assert isinstance(model.layers[0].attn, LinearAttention)
    assert isinstance(model.layers[1].attn, MultiHeadAttention)


# openlm export.

EXPORT_VARIANTS = {
    "gqa": {},
    "mha": {"num_kv_heads": 4},
    "tied": {"tie_word_embeddings": True},
    "retnet": {"decay": "retnet"},
    "decay_start": {"decay_start": 0.3},
    "no_decay": {"decay": "none"},
    "qk_norm_rms": {"qk_norm": True},
    "qk_norm_default_layer_norm": {"qk_norm": True, "norm_type": "default_layer_norm", "norm_eps": 0.05},
    "gain_only_lp_layer_norm": {"norm_type": "gain_only_lp_layer_norm", "qk_norm": True, "num_kv_heads": 4},
    "feature_dim": {"feature_dim": 12},
}


@pytest.mark.parametrize("overrides", EXPORT_VARIANTS.values(), ids=EXPORT_VARIANTS.keys())
def test_export_openlm_round_trip(tmp_path, overrides):
    model = _tiny(seed=len(overrides) + 10, **overrides)
    export_openlm(model, tmp_path / "openlm")
    assert sorted(p.name for p in (tmp_path / "openlm").iterdir()) == ["config.json", "pytorch_model.bin"]
    assert detect_format(tmp_path / "openlm") == "openlm"
    loaded = load_checkpoint(tmp_path / "openlm")
    assert isinstance(loaded.output, TiedLinear) == ("tie_word_embeddings" in overrides)
    assert torch.equal(_logits(loaded), _logits(model))


def test_export_openlm_layout(tmp_path):
    model = _tiny(seed=20, qk_norm=True).to(torch.bfloat16)
    export_openlm(model, tmp_path / "openlm")
    config = json.loads((tmp_path / "openlm" / "config.json").read_text())
    assert config["model_type"] == "openlm"
    assert {k: config[k] for k in ("dim", "n_layers", "n_heads", "n_heads_kv", "vocab_size", "apply_qk_norm")} == dict(
        dim=32, n_layers=2, n_heads=4, n_heads_kv=2, vocab_size=VOCAB, apply_qk_norm=True
    )
    assert (config["use_decay"], config["use_retnet_slopes"], config["norm_type"]) == (True, False, "rms_norm")

    state = torch.load(tmp_path / "openlm" / "pytorch_model.bin", weights_only=True)
    # The published layout (docs/method.md).
    per_layer = ["attention.in_proj.weight", "attention.out_proj.weight", "attention._totrain_embed.weight",
                 "attention._totrain_embed.bias", "attention._totrain_embed_kv.weight",
                 "attention._totrain_embed_kv.bias", "attention._totrain_q_norm.weight",
                 "attention._totrain_k_norm.weight", "feed_forward.w12.weight", "feed_forward.w3.weight",
                 "attention_norm.weight", "ffn_norm.weight"]
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected |= {f"layers.{i}.{name}" for i in range(2) for name in per_layer}
    assert set(state) == {f"model.{name}" for name in expected}
    assert {t.dtype for t in state.values()} == {torch.float32}

    params = {name: p.float() for name, p in model.named_parameters()}
    for i in range(2):
        layer = f"model.layers.{i}."
        qkv = [params[f"layers.{i}.attn.{p}_proj.weight"] for p in "qkv"]
        assert torch.equal(state[layer + "attention.in_proj.weight"], torch.cat(qkv))
        gate_up = [params[f"layers.{i}.mlp.w1.weight"], params[f"layers.{i}.mlp.w3.weight"]]
        assert torch.equal(state[layer + "feed_forward.w12.weight"], torch.cat(gate_up))
        assert torch.equal(state[layer + "feed_forward.w3.weight"], params[f"layers.{i}.mlp.w2.weight"])
        k_bias = params[f"layers.{i}.attn.k_feature_map.proj.bias"]
        assert torch.equal(state[layer + "attention._totrain_embed_kv.bias"], k_bias)
        assert torch.equal(state[layer + "attention_norm.weight"], params[f"layers.{i}.sa_norm.scale"])
    assert torch.equal(state["model.output.weight"], params["output.weight"])

    # Loading casts nothing back: an fp32 model with the bf16 values.
    loaded = load_checkpoint(tmp_path / "openlm")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(_logits(loaded), _logits(_tiny(seed=20, qk_norm=True).to(torch.bfloat16).float()))


@pytest.mark.parametrize(
    "model,match",
    [
        (lambda: supra_test_tiny(softmax_layers=[0]), "softmax layers"),
        (lambda: supra_test_tiny(rope_style="interleaved"), "RoPE other than rotate-half"),
        (lambda: supra_test_tiny(rope_base=500.0), "RoPE other than rotate-half with base 10000"),
        (lambda: supra_test_tiny(normalization="denominator"), "output norm other than per-head GroupNorm"),
    ],
    ids=["hybrid", "interleaved_rope", "rope_base", "denominator"],
)
def test_export_openlm_refuses(tmp_path, model, match):
    with pytest.raises(ValueError, match=match) as info:
        export_openlm(model(), tmp_path / "openlm")
    assert "openlm" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def _linearized_with_qk_norm(**linearize_args):
    torch.manual_seed(0)
    model = supra_decoder(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
        max_seq_len=64, softmax_layers=[0, 1],
    )
    return _perturbed(linearize(model, qk_norm=True, **linearize_args))


# open_lm has one norm_type and one norm_eps for every norm, the q/k norms included.
@pytest.mark.parametrize("linearize_args", [{"norm_eps": 0.5}, {"norm_type": "gain_only_layer_norm"}],
                         ids=["qk_norm_eps", "qk_norm_type"])
def test_export_openlm_refuses_qk_norms_unlike_the_block_norms(tmp_path, linearize_args):
    with pytest.raises(ValueError, match="q/k norms of another type or eps than the block norms"):
        export_openlm(_linearized_with_qk_norm(**linearize_args), tmp_path / "openlm")


def test_export_openlm_of_linearized_qk_norm_model(tmp_path):
    # The same model with q/k norms like its block norms (the linearize defaults) exports exactly.
    model = _linearized_with_qk_norm()
    export_openlm(model, tmp_path / "openlm")
    assert torch.equal(_logits(load_checkpoint(tmp_path / "openlm")), _logits(model))


# Decay slopes stay float32 and exact under dtype casts.


def _expected_slopes(rule, heads):
    if rule == "alibi":
        values = [2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)]
    else:
        values = [-math.log1p(-(2.0 ** (-5.0 - h))) for h in range(heads)]
    return torch.tensor(values, dtype=torch.float64).float()


@pytest.mark.parametrize("rule", ["alibi", "retnet"])
def test_slopes_stay_float32_under_casts(rule):
    heads = 32
    model = supra_test_tiny(num_heads=heads, num_kv_heads=heads, embed_dim=64, decay=rule)
    expected = _expected_slopes(rule, heads)
    # The guarantee is only visible if bf16 rounding would change the slopes.
    assert not torch.equal(expected.bfloat16().float(), expected)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(), lambda m: m.float()):
        cast(model)
        for layer in model.layers:
            assert layer.attn.decay.slopes.dtype == torch.float32
            assert torch.equal(layer.attn.decay.slopes, expected)


def test_a_config_may_only_name_model_builders(tmp_path):
    model = supra_test_tiny()
    save_checkpoint(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "supra_config.json").read_text())
    config["builder"] = "build_norm"
    (tmp_path / "ckpt" / "supra_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'build_norm' is not a supra.models model builder"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_flipped_byte_in_a_weight_file_fails_naming_it_unless_verification_is_skipped(tmp_path):
    save_checkpoint(supra_test_tiny(vocab_size=VOCAB), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    recorded = json.loads((tmp_path / "ckpt" / "supra_config.json").read_text())["sha256"]
    assert set(recorded) == {"model.safetensors"}
    data = bytearray(weights.read_bytes())
    # A byte in the last tensor's data, not in the header: the file still parses.
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} does not match the checksum recorded when it "
                                         r"was saved .* verify_checksums=False"):
        load_checkpoint(tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt", verify_checksums=False) is not None


def test_non_finite_weights_are_refused_on_load_naming_the_tensor(tmp_path):
    model = supra_test_tiny(vocab_size=VOCAB)
    with torch.no_grad():
        model.layers[1].mlp.w1.weight[0, 0] = float("nan")
    save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"holds NaN or infinite values in layers.1.mlp.w1.weight \(1 in all\)"):
        load_checkpoint(tmp_path / "ckpt")
