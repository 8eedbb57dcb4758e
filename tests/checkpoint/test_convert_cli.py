"""``supra convert``: hf -> supra (linearized, bf16) -> openlm, and its error messages.

Called through ``supra._cli.main.main([...])``, as the console script does. The HF folder is
written by transformers; the reference for each step is the tensor it started from (the
transformers weights, rounded once to bf16) and the logits of an fp32 model holding those values.
"""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from supra._cli.main import main
from supra.checkpoint import detect_format, load_checkpoint
from supra.modules import LinearAttention

TOKENS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An HF llama folder, converted to a linearized bf16 supra folder, then to an openlm folder."""
    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-5,
    )).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(root / "hf")
    main(["convert", str(root / "hf"), str(root / "supra"), "--linearize", "--dtype", "bf16"])
    main(["convert", str(root / "supra"), str(root / "openlm"), "--to", "openlm"])
    return hf_model, root


def test_hf_to_supra_linearized_bf16(folders):
    hf_model, root = folders
    assert detect_format(root / "supra") == "supra"
    with safe_open(str(root / "supra" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    record = json.loads((root / "supra" / "supra_config.json").read_text())
    assert len(record["linearize"]) == 1 and record["linearize"][0]["layers"] == [0, 1]

    model = load_checkpoint(root / "supra")
    assert all(isinstance(layer.attn, LinearAttention) for layer in model.layers)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    hf_layer = hf_model.model.layers[1]
    assert torch.equal(model.tok_embeddings.weight, hf_model.model.embed_tokens.weight.bfloat16())
    assert torch.equal(model.layers[1].attn.q_proj.weight, hf_layer.self_attn.q_proj.weight.bfloat16())
    assert torch.equal(model.layers[1].mlp.w2.weight, hf_layer.mlp.down_proj.weight.bfloat16())
    assert torch.equal(model.output.weight, hf_model.lm_head.weight.bfloat16())


# torchtune's RMSNorm normalizes in fp32 with the bf16 gain: torch warns, the result is right.
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_supra_to_openlm_keeps_the_model(folders):
    _, root = folders
    assert detect_format(root / "openlm") == "openlm"
    assert json.loads((root / "openlm" / "config.json").read_text())["model_type"] == "openlm"
    exported = load_checkpoint(root / "openlm")
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    # The export casts bf16 -> fp32 exactly: the same values as the supra folder's, upcast.
    reference = load_checkpoint(root / "supra")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor.float()), name
    # So an fp32 model of the supra folder's values gives exactly the exported model's logits.
    upcast = load_checkpoint(root / "supra", dtype=torch.float32)
    with torch.no_grad():
        expected = upcast(TOKENS)
        assert torch.equal(exported(TOKENS), expected)
        # And the bf16 model itself is close to it (bf16 arithmetic).
        bf16_logits = reference(TOKENS).float()
    assert ((bf16_logits - expected).abs().max() / expected.abs().max()).item() < 0.05


def test_prints_what_it_wrote(folders, capsys, tmp_path):
    _, root = folders
    main(["convert", str(root / "supra"), str(tmp_path / "copy"), "--max-shard-size", "10KB"])
    out = capsys.readouterr().out
    assert "wrote supra checkpoint" in out and str(tmp_path / "copy") in out
    assert (tmp_path / "copy" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "copy").glob("model-*-of-*.safetensors"))) >= 2


def _convert_error(*argv):
    with pytest.raises(SystemExit) as info:
        main(["convert", *map(str, argv)])
    message = info.value.code
    assert isinstance(message, str) and message.startswith("supra convert:"), message
    return message


def test_unknown_source(tmp_path):
    message = _convert_error(tmp_path / "nowhere", tmp_path / "out")
    assert "nowhere" in message and "does not exist" in message
    assert not (tmp_path / "out").exists()


def test_hf_to_openlm_needs_linearize(folders, tmp_path):
    _, root = folders
    message = _convert_error(root / "hf", tmp_path / "out", "--to", "openlm")
    assert "linearize" in message
    assert not (tmp_path / "out").exists()


def test_linearize_of_a_supra_folder(folders, tmp_path):
    _, root = folders
    message = _convert_error(root / "supra", tmp_path / "out", "--linearize")
    assert "linearize" in message and "'supra'" in message


def test_overwrite(folders, tmp_path):
    _, root = folders
    out = tmp_path / "out"
    main(["convert", str(root / "hf"), str(out), "--linearize", "--dtype", "bf16"])
    message = _convert_error(root / "hf", out, "--linearize")
    assert "already exists" in message and "--overwrite" in message
    assert {p.dtype for p in load_checkpoint(out).parameters()} == {torch.bfloat16}

    main(["convert", str(root / "hf"), str(out), "--overwrite"])
    model = load_checkpoint(out)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(isinstance(layer.attn, LinearAttention) for layer in model.layers)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
