"""Loading reference (linear_open_lm) SUPRA checkpoints: logits against an independent float64 model.

``openlm_reference`` (beside this file) re-implements the reference decoder from docs/method.md without
the library and writes tiny checkpoints in the reference's formats: HF "openlm" folders
(pytorch_model.bin or model.safetensors) and raw open_lm training checkpoints with a model JSON.
Every test loads one with ``supra.checkpoint.load_checkpoint`` and compares logits with the float64
model, in parallel mode and in recurrent mode (prefill about half, then one token at a time).

Bounds, as max|diff| / max|ref|: parallel <= 3e-5, recurrent <= 5e-5. 1e-5 is not reachable in
float32 on these tiny random models: the head GroupNorm (eps 1e-5) meets near-zero head outputs
(relu features, q.k ~ 0 at early positions), which amplifies rounding. The reference itself run in
float32 differs from its float64 run by up to 2.3e-5 over 96 such models; the loaded models stay
within 1.2e-5. The plausible slips move the default model's logits far more: a GroupNorm eps of
1e-6 by 0.39, no key scale 0.39, interleaved RoPE 0.68, RoPE base 1e6 0.58, slopes shifted by one
head 0.55. Only a wrong norm_eps hides (8e-6 for 1e-6 instead of 1e-5, as the model's norms see
inputs of unit scale), hence the "norm_eps" case with eps 0.05 (0.09).
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from supra.checkpoint import load_checkpoint


def _import_reference():
    # Test directories are not packages (pytest runs with --import-mode=importlib): load the helper by path.
    name = "openlm_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ref = _import_reference()

PARALLEL_RTOL = 3e-5
RECURRENT_RTOL = 5e-5
BATCH, SEQ = 2, 12


def _relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def _tokens(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config["vocab_size"], (BATCH, SEQ), generator=generator)


@torch.no_grad()
def _check_logits(model, config, state_dict, tokens):
    """Parallel and recurrent logits of ``model`` against the float64 reference."""
    model.eval()
    expected = ref.reference_logits(config, state_dict, tokens)

    parallel = model(tokens)
    assert parallel.dtype == torch.float32
    assert parallel.shape == expected.shape
    error = _relative_error(parallel, expected)
    assert error <= PARALLEL_RTOL, f"parallel: relative error {error:.2e} > {PARALLEL_RTOL:.0e}"

    prefill = tokens.shape[1] // 2 + 1
    model.setup_caches(batch_size=tokens.shape[0], dtype=torch.float32)
    chunks = [model(tokens[:, :prefill])]
    chunks += [model(tokens[:, t : t + 1]) for t in range(prefill, tokens.shape[1])]
    recurrent = torch.cat(chunks, dim=1)
    error = _relative_error(recurrent, expected)
    assert error <= RECURRENT_RTOL, f"recurrent: relative error {error:.2e} > {RECURRENT_RTOL:.0e}"

    # After a reset the cache starts over: the prefill alone must match again.
    model.reset_caches()
    again = model(tokens[:, :prefill])
    error = _relative_error(again, expected[:, :prefill])
    assert error <= RECURRENT_RTOL, f"after reset_caches: relative error {error:.2e} > {RECURRENT_RTOL:.0e}"


def _hf_folder(tmp_path, config, seed=0, safetensors=False):
    state_dict = ref.random_openlm_state_dict(config, seed)
    folder = ref.write_hf_openlm_folder(tmp_path / "hf", config, state_dict, safetensors=safetensors)
    return folder, state_dict


# Every norm type with MHA and GQA; q/k norm on and off for the norm types that have both a gain and
# a bias or none at all, one setting each for the rest (16 cases).
NORM_CASES = [
    (norm_type, kv_heads, qk_norm)
    for norm_type in ref.OPENLM_NORM_TYPES
    for kv_heads in (4, 2)
    for qk_norm in (False, True)
    if norm_type in ("rms_norm", "default_layer_norm") or qk_norm == (kv_heads == 2)
]


@pytest.mark.parametrize(
    "norm_type,kv_heads,qk_norm",
    NORM_CASES,
    ids=[f"{n}-{'mha' if kv == 4 else 'gqa'}-qk{int(qk)}" for n, kv, qk in NORM_CASES],
)
def test_hf_openlm_folder_norm_types(tmp_path, norm_type, kv_heads, qk_norm):
    config = ref.make_openlm_config(norm_type=norm_type, n_heads_kv=kv_heads, apply_qk_norm=qk_norm)
    folder, state_dict = _hf_folder(tmp_path, config, seed=len(norm_type) + kv_heads)
    _check_logits(load_checkpoint(folder), config, state_dict, _tokens(config))


MODEL_CASES = {
    "alibi": {},
    "retnet": {"use_retnet_slopes": True},
    "decay_start": {"decay_start": 0.5},
    "no_decay": {"use_decay": False},
    "six_heads_gqa": {"n_heads": 6, "dim": 48, "n_heads_kv": 2},
    "six_heads_mha_qk_norm": {"n_heads": 6, "dim": 48, "n_heads_kv": 6, "apply_qk_norm": True},
    "six_heads_retnet": {"n_heads": 6, "dim": 48, "n_heads_kv": 3, "use_retnet_slopes": True},
    "feature_dim_differs_mha": {"qk_head_dim": 12, "n_heads_kv": 4, "apply_qk_norm": True},
    "feature_dim_differs_gqa": {"qk_head_dim": 12},
    # A large eps, so that a loader ignoring norm_eps (in any of the norms) fails.
    "norm_eps": {"norm_eps": 0.05, "norm_type": "default_layer_norm", "apply_qk_norm": True},
    "weight_tying": {"weight_tying": True},
}


@pytest.mark.parametrize("overrides", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_hf_openlm_folder_decays_and_shapes(tmp_path, overrides):
    config = ref.make_openlm_config(**overrides)
    folder, state_dict = _hf_folder(tmp_path, config, seed=7)
    _check_logits(load_checkpoint(folder), config, state_dict, _tokens(config, seed=1))


@pytest.mark.parametrize("overrides", [{}, {"n_heads_kv": 4, "apply_qk_norm": True}, {"n_heads": 6, "dim": 48}])
def test_reference_recurrent_form_equals_parallel_form(overrides):
    # Guards the reference: its masked-matrix attention equals the recurrence S = gamma S + k^T v.
    config = ref.make_openlm_config(**overrides)
    state_dict = ref.random_openlm_state_dict(config, 2)
    tokens = _tokens(config)
    parallel = ref.reference_logits(config, state_dict, tokens)
    recurrent = ref.reference_logits(config, state_dict, tokens, recurrent=True)
    assert _relative_error(recurrent, parallel) < 1e-12


def test_reference_distinguishes_the_decay_rules():
    # Guards the decay tests: each rule must change the reference logits on these shapes.
    tokens = _tokens(ref.make_openlm_config())
    logits = {}
    for name in ("alibi", "retnet", "decay_start", "no_decay"):
        config = ref.make_openlm_config(**MODEL_CASES[name])
        logits[name] = ref.reference_logits(config, ref.random_openlm_state_dict(config, 7), tokens)
    names = list(logits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert _relative_error(logits[a].float(), logits[b]) > 1e-3, (a, b)


def test_tied_checkpoint_that_also_saves_output_weight(tmp_path):
    # open_lm ties by sharing one parameter, so its state dict holds it under both names.
    config = ref.make_openlm_config(weight_tying=True)
    state_dict = ref.random_openlm_state_dict(config, 5)
    state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    folder = ref.write_hf_openlm_folder(tmp_path / "hf", config, state_dict)
    _check_logits(load_checkpoint(folder), config, state_dict, _tokens(config))


def test_hf_openlm_folder_safetensors(tmp_path):
    config = ref.make_openlm_config(apply_qk_norm=True)
    folder, state_dict = _hf_folder(tmp_path, config, seed=3, safetensors=True)
    assert not (folder / "pytorch_model.bin").exists()
    _check_logits(load_checkpoint(folder), config, state_dict, _tokens(config))


@pytest.mark.parametrize("module_prefix", [True, False], ids=["module_prefix", "bare_keys"])
def test_raw_open_lm_checkpoint(tmp_path, module_prefix):
    config = ref.make_openlm_config(norm_type="gain_only_lp_layer_norm", apply_qk_norm=True)
    state_dict = ref.random_openlm_state_dict(config, 11)
    checkpoint = ref.write_raw_open_lm_checkpoint(tmp_path / "epoch_3.pt", state_dict, module_prefix=module_prefix)
    model_json = ref.write_open_lm_model_json(tmp_path / "linear_tiny.json", config)
    _check_logits(load_checkpoint(checkpoint, config=model_json), config, state_dict, _tokens(config))


def test_raw_open_lm_checkpoint_without_training_entries_config_as_dict(tmp_path):
    config = ref.make_openlm_config(n_heads_kv=4)
    state_dict = ref.random_openlm_state_dict(config, 12)
    checkpoint = ref.write_raw_open_lm_checkpoint(tmp_path / "model.pt", state_dict, extra=False)
    _check_logits(load_checkpoint(checkpoint, config=dict(config)), config, state_dict, _tokens(config))


def test_raw_open_lm_checkpoint_with_open_lm_key_names(tmp_path):
    config = ref.make_openlm_config(norm_type="default_layer_norm", apply_qk_norm=True)
    state_dict = ref.random_openlm_state_dict(config, 13)
    checkpoint = ref.write_raw_open_lm_checkpoint(tmp_path / "epoch_1.pt", state_dict)
    model_json = ref.write_open_lm_model_json(tmp_path / "linear_tiny.json", config, open_lm_names=True)
    assert "hidden_dim" in json.loads(model_json.read_text())
    _check_logits(load_checkpoint(checkpoint, config=model_json), config, state_dict, _tokens(config))


# Errors: each must be a ValueError naming the offending value, key or file.


@pytest.mark.parametrize(
    "key,value",
    [
        ("attn_name", "torch_attn"),
        ("norm_type", "fancy_norm"),
        ("positional_embedding_type", "alibi"),
        ("ffn_type", "gelu"),
    ],
)
def test_unsupported_config_values(tmp_path, key, value):
    config = ref.make_openlm_config()
    folder, _ = _hf_folder(tmp_path, config)
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=value) as info:
        load_checkpoint(folder)
    assert key in str(info.value)


def _write_state_dict(folder, state_dict):
    torch.save({f"model.{k}": v for k, v in state_dict.items()}, folder / "pytorch_model.bin")


def test_missing_tensor(tmp_path):
    config = ref.make_openlm_config()
    folder, state_dict = _hf_folder(tmp_path, config)
    del state_dict["layers.1.attention.out_proj.weight"]
    _write_state_dict(folder, state_dict)
    with pytest.raises(ValueError, match="(?i)missing") as info:
        load_checkpoint(folder)
    # The reference's name, or the library's name for the same weight (torchtune: attn.output_proj).
    assert re.search(r"layers\.1\.(attention\.out_proj|attn\.output_proj)", str(info.value))


def test_unexpected_tensor(tmp_path):
    config = ref.make_openlm_config()
    folder, state_dict = _hf_folder(tmp_path, config)
    state_dict["layers.0.attention.rogue_gate.weight"] = torch.zeros(3, 3)
    _write_state_dict(folder, state_dict)
    with pytest.raises(ValueError, match="(?i)unexpected") as info:
        load_checkpoint(folder)
    assert "rogue_gate" in str(info.value)


@pytest.mark.parametrize(
    "key,shape,name_pattern,shape_pattern",
    [
        ("tok_embeddings.weight", (64, 33), r"tok_embeddings", r"64\D{1,3}33"),
        (
            "layers.1.feed_forward.w3.weight",
            (32, 49),
            r"layers\.1\.(feed_forward\.w3|mlp\.w2)",
            r"32\D{1,3}49",
        ),
        (
            "layers.0.attention._totrain_embed.bias",
            (31,),
            r"layers\.0\.attn.*|_totrain_embed",
            r"31",
        ),
        ("layers.0.attention.in_proj.weight", (63, 32), r"layers\.0\.(attention\.in_proj|attn\.[qkv]_proj)", r"63\D{1,3}32"),
    ],
    ids=["embeddings", "ffn_down", "feature_map_bias", "fused_qkv"],
)
def test_wrongly_shaped_tensor(tmp_path, key, shape, name_pattern, shape_pattern):
    config = ref.make_openlm_config()
    folder, state_dict = _hf_folder(tmp_path, config)
    state_dict[key] = torch.zeros(shape)
    _write_state_dict(folder, state_dict)
    with pytest.raises(ValueError, match=name_pattern) as info:
        load_checkpoint(folder)
    message = str(info.value)
    assert re.search(shape_pattern, message), message
    assert "shape" in message.lower(), message


def test_truncated_weights_file(tmp_path):
    config = ref.make_openlm_config()
    folder, _ = _hf_folder(tmp_path, config)
    weights = folder / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"pytorch_model\.bin"):
        load_checkpoint(folder)


def test_truncated_safetensors_file(tmp_path):
    config = ref.make_openlm_config()
    folder, _ = _hf_folder(tmp_path, config, safetensors=True)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_checkpoint(folder)


@pytest.mark.parametrize("with_readme", [False, True], ids=["empty", "readme_only"])
def test_folder_of_no_known_format(tmp_path, with_readme):
    folder = tmp_path / "nothing"
    folder.mkdir()
    if with_readme:
        (folder / "README.md").write_text("# not a checkpoint\n")
    # The message lists the formats it tried, among them the reference's HF "openlm" folders.
    with pytest.raises(ValueError, match=r"(?i)open_?lm"):
        load_checkpoint(folder)


def test_raw_checkpoint_needs_a_config(tmp_path):
    config = ref.make_openlm_config()
    checkpoint = ref.write_raw_open_lm_checkpoint(tmp_path / "epoch_3.pt", ref.random_openlm_state_dict(config, 0))
    with pytest.raises(ValueError, match=r"config"):
        load_checkpoint(checkpoint)
