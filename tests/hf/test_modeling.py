"""supra.hf models: Auto-class loading, forward against supra's own model and the float64
reference, padding, loss, hidden states, caches, save_pretrained / from_pretrained.

References: the logits of the supra decoder that ``supra.checkpoint.load_checkpoint`` returns
(called directly, no transformers code), the independent float64 re-implementation of the
reference model (tests/checkpoint/openlm_reference.py), and hand-written cross entropy.
"""

import json

import hf_tiny
import pytest
import torch
import torch.nn.functional as F
from hf_tiny import VOCAB, ref, tiny_hybrid, tiny_supra, wrap
from torchtune.modules import TiedLinear
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationConfig

import supra.modules.attention
from supra.checkpoint import load_checkpoint, save_checkpoint
from supra.hf import OpenLMConfig, OpenLMForCausalLM, SupraCache, SupraConfig, SupraForCausalLM

# As tests/checkpoint/test_openlm_checkpoints.py: float32 against float64 on tiny random models.
REFERENCE_RTOL = 3e-5


def _tokens(rows, length, seed=0):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


OPENLM_CASES = {
    "gqa": {},
    "mha_qk_norm": {"n_heads_kv": 4, "apply_qk_norm": True},
    "weight_tying": {"weight_tying": True},
    "retnet_layer_norm": {"use_retnet_slopes": True, "norm_type": "gain_only_lp_layer_norm"},
}


@pytest.mark.parametrize("overrides", OPENLM_CASES.values(), ids=OPENLM_CASES.keys())
@torch.no_grad()
def test_openlm_folder_loads_with_auto_classes(tmp_path, overrides):
    folder, config, state_dict = hf_tiny.write_openlm_folder(tmp_path / "openlm", seed=3, **overrides)
    assert isinstance(AutoConfig.from_pretrained(folder), OpenLMConfig)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is OpenLMForCausalLM and not model.training
    assert model.config.hidden_size == config["dim"] and model.config.num_hidden_layers == config["n_layers"]
    assert model.config.tie_word_embeddings == config["weight_tying"]
    assert isinstance(model.model.output, TiedLinear) == config["weight_tying"]
    assert (model.get_output_embeddings() is None) == config["weight_tying"]

    tokens = _tokens(2, 11)
    logits = model(tokens).logits
    assert torch.equal(logits, load_checkpoint(folder)(tokens))
    error = _relative_error(logits, ref.reference_logits(config, state_dict, tokens))
    assert error <= REFERENCE_RTOL, f"relative error {error:.2e} against the float64 reference"


@torch.no_grad()
def test_openlm_folder_with_safetensors_and_dtype(tmp_path):
    folder, config, state_dict = hf_tiny.write_openlm_folder(tmp_path / "openlm", safetensors=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = _tokens(1, 9)
    assert torch.equal(model(tokens).logits, load_checkpoint(folder, dtype=torch.bfloat16)(tokens))


SUPRA_MODELS = {
    "gqa": lambda: tiny_supra(),
    "mha_qk_norm_retnet": lambda: tiny_supra(seed=1, num_kv_heads=4, qk_norm=True, decay="retnet"),
    "tied": lambda: tiny_supra(seed=2, tie_word_embeddings=True),
    "hybrid": lambda: tiny_hybrid(),
}


@pytest.mark.parametrize("make", SUPRA_MODELS.values(), ids=SUPRA_MODELS.keys())
@torch.no_grad()
def test_save_pretrained_round_trip(tmp_path, make):
    decoder = make()
    tokens = _tokens(2, 10)
    expected = decoder(tokens)
    wrap(decoder, eos_token_id=2).save_pretrained(tmp_path / "saved")
    files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "supra_config.json"]
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "supra"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(loaded) is SupraForCausalLM and isinstance(loaded.config, SupraConfig)
    assert torch.equal(loaded(tokens).logits, expected)
    assert loaded.generation_config.eos_token_id == 2
    assert isinstance(loaded.model.output, TiedLinear) == loaded.config.tie_word_embeddings
    assert isinstance(loaded.model.output, TiedLinear) == isinstance(decoder.output, TiedLinear)


@torch.no_grad()
def test_openlm_model_saves_as_supra_folder(openlm_folder, tmp_path):
    folder, _, _ = openlm_folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(loaded) is SupraForCausalLM
    tokens = _tokens(1, 8)
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


@torch.no_grad()
def test_save_pretrained_keeps_other_files_and_replaces_old_weights(tmp_path):
    folder = hf_tiny.write_tokenizer(tmp_path / "saved")
    wrap(tiny_supra(seed=0)).save_pretrained(folder, max_shard_size=20_000)
    assert (folder / "model.safetensors.index.json").exists()
    second = tiny_supra(seed=1)
    wrap(second).save_pretrained(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "supra_config.json", "tokenizer.json",
    ]
    tokens = _tokens(1, 6)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(tokens).logits, second(tokens))


@torch.no_grad()
def test_from_pretrained_reads_a_supra_folder_without_config_json(tmp_path):
    decoder = tiny_supra()
    save_checkpoint(decoder, tmp_path / "ckpt")
    model = SupraForCausalLM.from_pretrained(tmp_path / "ckpt")
    tokens = _tokens(1, 7)
    assert torch.equal(model(tokens).logits, decoder(tokens))
    assert model.config.vocab_size == VOCAB


def test_from_config_builds_the_same_architecture():
    decoder = tiny_hybrid()
    model = AutoModelForCausalLM.from_config(SupraConfig.from_model(decoder))
    assert type(model) is SupraForCausalLM
    expected = {name: tensor.shape for name, tensor in decoder.state_dict().items()}
    assert {name: tensor.shape for name, tensor in model.model.state_dict().items()} == expected


def test_from_pretrained_errors(openlm_folder, tmp_path):
    folder, _, _ = openlm_folder
    with pytest.raises(ValueError, match="is a 'openlm' checkpoint; SupraForCausalLM loads 'supra'"):
        SupraForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"cannot honour \['quantization_config'\].*quantized loading"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config={"load_in_4bit": True})
    with pytest.raises(ValueError, match=r"cannot honour \['attn_implementation'\].*'flash_attention_2'"):
        OpenLMForCausalLM.from_pretrained(folder, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match=r"cannot honour \['adapter_kwargs', 'variant'\]"):
        AutoModelForCausalLM.from_pretrained(folder, variant="fp16", adapter_kwargs={"revision": "x"})
    with pytest.raises(ValueError, match="per-module dict is not supported"):
        AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"})
    with pytest.raises(ValueError, match="dtype must be 'auto', a torch floating dtype"):
        AutoModelForCausalLM.from_pretrained(folder, dtype="int8")
    with pytest.raises(ValueError, match="safetensors only"):
        AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "x", safe_serialization=False)


# What transformers' own from_pretrained (auto class and model class) hands down: hub, download,
# cache and memory options, several of them None or defaults.
TRANSFORMERS_LOAD_OPTIONS = dict(
    cache_dir=None, proxies=None, revision="main", token=None, local_files_only=True, force_download=False,
    trust_remote_code=False, code_revision=None, _commit_hash=None, _from_auto=True, _from_pipeline=None,
    use_safetensors=None, low_cpu_mem_usage=True, weights_only=True, max_memory=None, offload_folder=None,
    quantization_config=None, attn_implementation=None, variant=None, adapter_kwargs={}, adapter_name="default",
    gguf_file=None, key_mapping=None, tp_plan=None, state_dict=None, output_loading_info=False,
)


# What a user hands AutoModelForCausalLM (transformers resolves some and passes them on).
HUB_OPTIONS = dict(cache_dir=None, proxies=None, revision="main", token=None, local_files_only=True,
                   force_download=False, trust_remote_code=False)


@torch.no_grad()
def test_from_pretrained_takes_what_transformers_passes(openlm_folder, caplog):
    folder, _, _ = openlm_folder
    reference = OpenLMForCausalLM.from_pretrained(folder)
    tokens = _tokens(1, 6)
    with caplog.at_level("WARNING"):
        auto = AutoModelForCausalLM.from_pretrained(folder, **HUB_OPTIONS)
        direct = OpenLMForCausalLM.from_pretrained(folder, **TRANSFORMERS_LOAD_OPTIONS)
    for model in (auto, direct):
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
    assert not [r for r in caplog.records if "ignoring" in r.getMessage()]


def test_from_pretrained_ignores_unknown_options_with_a_warning(openlm_folder, caplog):
    folder, _, _ = openlm_folder
    with caplog.at_level("WARNING"):
        AutoModelForCausalLM.from_pretrained(folder, a_future_hub_option=1)
    assert any("ignoring ['a_future_hub_option']" in r.getMessage() for r in caplog.records)


def test_from_pretrained_uses_a_given_generation_config(openlm_folder):
    from transformers import GenerationConfig

    folder, _, _ = openlm_folder
    model = AutoModelForCausalLM.from_pretrained(folder, generation_config=GenerationConfig(max_new_tokens=7))
    assert model.generation_config.max_new_tokens == 7


def test_save_pretrained_ignores_hub_options_and_refuses_variants(openlm_folder, tmp_path):
    folder, _, _ = openlm_folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "saved", token=None, save_peft_format=True, save_original_format=True)
    assert (tmp_path / "saved" / "config.json").exists()
    with pytest.raises(ValueError, match="variant='fp16'"):
        model.save_pretrained(tmp_path / "other", variant="fp16")


def test_hub_repo_id_is_downloaded_with_huggingface_hub(openlm_folder, monkeypatch):
    import huggingface_hub

    folder, _, _ = openlm_folder
    asked = {}

    def snapshot_download(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = OpenLMForCausalLM.from_pretrained("tri-ml/mistral-supra", revision="v1", local_files_only=True)
    assert asked["repo_id"] == "tri-ml/mistral-supra" and asked["revision"] == "v1" and asked["local_files_only"]
    assert "*.safetensors" in asked["allow_patterns"]
    assert model.name_or_path == "tri-ml/mistral-supra"


def test_from_pretrained_applies_config_overrides(openlm_folder):
    folder, _, _ = openlm_folder
    model = AutoModelForCausalLM.from_pretrained(folder, eos_token_id=2)
    assert model.config.eos_token_id == 2 and model.generation_config.eos_token_id == 2


@pytest.mark.parametrize("make", [tiny_supra, tiny_hybrid], ids=["linear", "hybrid"])
@torch.no_grad()
def test_left_padded_batch_gives_each_row_its_own_logits(make):
    model = wrap(make())
    lengths = [9, 4, 1]
    rows = [_tokens(1, n, seed=n)[0] for n in lengths]
    tokens = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, tokens.shape[1] - len(row):] = row
        mask[i, tokens.shape[1] - len(row):] = 1
    for use_cache in (False, True):
        logits = model(tokens, attention_mask=mask, use_cache=use_cache).logits
        for i, row in enumerate(rows):
            alone = model.model(row[None])
            torch.testing.assert_close(logits[i, tokens.shape[1] - len(row):], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_supra, tiny_hybrid], ids=["linear", "hybrid"])
@torch.no_grad()
def test_forward_continues_from_the_cache(make):
    model = wrap(make())
    tokens = _tokens(2, 12)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    full = model(tokens, attention_mask=mask, use_cache=False).logits
    first = model(tokens[:, :7], attention_mask=mask[:, :7], use_cache=True)
    cache = first.cache if hasattr(first, "cache") else first.past_key_values
    assert isinstance(cache, SupraCache) and cache.get_seq_length() == 7
    second = model(tokens[:, 7:], attention_mask=mask, past_key_values=cache).logits
    valid = mask.bool()
    torch.testing.assert_close(torch.cat([first.logits, second], dim=1)[valid], full[valid], rtol=1e-5, atol=1e-5)


def test_plain_forward_is_one_parallel_pass(monkeypatch):
    # The reference's wrapper runs a plain forward token by token. Here every SUPRA layer must run
    # the linear attention op once, over all T tokens.
    calls = []
    op = supra.modules.attention.linear_attention

    def spy(q, *args, **kwargs):
        calls.append(q.shape[1])
        return op(q, *args, **kwargs)

    monkeypatch.setattr(supra.modules.attention, "linear_attention", spy)
    model = wrap(tiny_supra())
    with torch.no_grad():
        for use_cache in (None, False, True):
            calls.clear()
            model(_tokens(2, 40), use_cache=use_cache)
            assert calls == [40, 40], use_cache
    model.train()
    calls.clear()
    model(_tokens(2, 40), labels=_tokens(2, 40)).loss.backward()
    assert calls == [40, 40]


def test_loss_is_next_token_cross_entropy():
    model = wrap(tiny_supra())
    tokens = _tokens(2, 10)
    labels = tokens.clone()
    labels[0, :4] = -100
    out = model(tokens, labels=labels)
    logits = out.logits.detach()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert model.model.tok_embeddings.weight.grad is not None


@torch.no_grad()
def test_hidden_states_follow_transformers_convention():
    model = wrap(tiny_supra())
    decoder = model.model
    tokens = _tokens(1, 8)
    out = model(tokens, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == len(decoder.layers) + 1
    torch.testing.assert_close(hidden[0], decoder.tok_embeddings(tokens))
    torch.testing.assert_close(hidden[1], decoder.layers[0](hidden[0]))
    # The last entry is the normalized output of the last layer.
    torch.testing.assert_close(hidden[-1], decoder.norm(decoder.layers[1](hidden[1])))
    torch.testing.assert_close(out.logits, decoder.output(hidden[-1]).float())
    assert decoder.output_hidden_states == []


@torch.no_grad()
def test_logits_to_keep():
    model = wrap(tiny_supra())
    tokens = _tokens(2, 9)
    full = model(tokens).logits
    assert torch.equal(model(tokens, logits_to_keep=1).logits, full[:, -1:])
    picked = torch.tensor([0, 4])
    assert torch.equal(model(tokens, logits_to_keep=picked).logits, full[:, picked])
    out = model(tokens, logits_to_keep=2, output_hidden_states=True)
    assert torch.equal(out.logits, full[:, -2:]) and out.hidden_states[-1].shape[1] == tokens.shape[1]
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        model(tokens, logits_to_keep=-1)


@torch.no_grad()
def test_model_keeps_its_own_caches():
    decoder = tiny_supra()
    decoder.setup_caches(batch_size=1, dtype=torch.float32)
    model = wrap(decoder)
    model(_tokens(1, 5))
    assert decoder.caches_are_enabled()
    assert all(int(layer.attn.kv_cache.positions[0]) == 0 for layer in decoder.layers)


def test_forward_errors():
    model = wrap(tiny_supra())
    tokens = _tokens(2, 6)
    right_padded = torch.ones_like(tokens)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match="right padding.*padding_side = 'left'"):
        model(tokens, attention_mask=right_padded)
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(tokens, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        model(inputs_embeds=torch.zeros(2, 6, 32))
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model(tokens, output_attentions=True)
    with pytest.raises(ValueError, match="labels need the logits of every position"):
        model(tokens, labels=tokens, logits_to_keep=1)
    filled = DynamicCache()
    filled.update(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="DynamicCache cannot hold a SUPRA model's recurrent states"):
        model(tokens, past_key_values=filled)
    cache = SupraCache()
    model(tokens, past_key_values=cache)
    with pytest.raises(ValueError, match="the cache holds 2 sequences but input_ids has 1 rows"):
        model(tokens[:1], past_key_values=cache)
    with pytest.raises(ValueError, match="cannot crop a SUPRA cache"):
        cache.crop(2)


@torch.no_grad()
def test_empty_transformers_cache_is_replaced():
    model = wrap(tiny_supra())
    out = model(_tokens(1, 5), past_key_values=DynamicCache())
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, SupraCache) and cache.get_seq_length() == 5


def test_generation_config_from_the_folder(openlm_folder):
    folder, _, _ = openlm_folder
    GenerationConfig(eos_token_id=2, max_new_tokens=3).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.max_new_tokens == 3
