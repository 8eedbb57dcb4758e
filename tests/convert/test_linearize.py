"""linearize: pretrained tensors kept bit-identical, only SUPRA parameters added, models that run."""

import pytest
import torch
from torchtune.models.llama2 import llama2
from torchtune.models.llama3_2 import llama3_2
from torchtune.models.mistral import mistral
from torchtune.models.qwen2 import qwen2
from torchtune.modules import MultiHeadAttention

from supra.convert import linearize, new_parameter_names
from supra.modules import LinearAttention, SupraDecoder

VOCAB = 96
TINY = dict(vocab_size=VOCAB, num_layers=3, num_heads=4, embed_dim=32, max_seq_len=64)
FAMILIES = {
    "llama2": lambda: llama2(num_kv_heads=4, intermediate_dim=64, **TINY),
    "llama3_2": lambda: llama3_2(num_kv_heads=2, intermediate_dim=64, **TINY),
    "mistral": lambda: mistral(num_kv_heads=2, intermediate_dim=64, **TINY),
    "qwen2": lambda: qwen2(num_kv_heads=2, intermediate_dim=64, tie_word_embeddings=True, **TINY),
}


def _softmax_model(family):
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pretrained_tensors_are_bit_identical_and_only_supra_parameters_are_new(family):
    model = _softmax_model(family)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    pointers = {name: p.data_ptr() for name, p in model.state_dict().items()}

    assert linearize(model, qk_norm=True) is model
    after = model.state_dict()

    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
        assert after[name].data_ptr() == pointers[name], f"{name} was copied, not reused"
    new = set(new_parameter_names(model))
    assert new == set(after) - set(before)
    assert all(".attn." in n and any(s in n for s in ("feature_map", "q_norm", "k_norm")) for n in new)
    assert isinstance(model, SupraDecoder)
    assert all(isinstance(layer.attn, LinearAttention) for layer in model.layers)
    gqa = model.layers[0].attn.num_kv_heads != model.layers[0].attn.num_heads
    assert (model.layers[0].attn.k_feature_map is not None) == gqa


@pytest.mark.parametrize("family", ["llama3_2", "qwen2"])
@torch.no_grad()
def test_linearized_model_runs_in_parallel_and_recurrent_mode(family):
    model = linearize(_softmax_model(family))
    tokens = torch.randint(0, VOCAB, (2, 30))
    parallel = model(tokens)
    model.setup_caches(batch_size=2, dtype=torch.float32)
    incremental = torch.cat([model(tokens[:, :20]), *(model(tokens[:, t : t + 1]) for t in range(20, 30))], dim=1)
    torch.testing.assert_close(incremental, parallel, rtol=1e-4, atol=1e-4)


def test_chosen_layers_make_a_hybrid_and_leave_the_rest_untouched():
    model = _softmax_model("mistral")
    kept = model.layers[1].attn
    linearize(model, layers=[0, -1])
    assert isinstance(model.layers[0].attn, LinearAttention)
    assert model.layers[1].attn is kept and isinstance(kept, MultiHeadAttention)
    assert isinstance(model.layers[2].attn, LinearAttention)
    assert all(n.startswith(("layers.0.", "layers.2.")) for n in new_parameter_names(model))
    with torch.no_grad():
        assert model(torch.randint(0, VOCAB, (1, 10))).shape == (1, 10, VOCAB)


def test_linearize_defaults_come_from_the_model():
    model = _softmax_model("llama3_2")
    linearize(model, decay="retnet")
    attn = model.layers[0].attn
    assert attn.pos_embeddings.base == 500_000 and attn.pos_embeddings.style == "half"
    assert attn.feature_dim == attn.head_dim and attn.scale == attn.head_dim**-0.5
    expected = -torch.log1p(-(2.0 ** (-5.0 - torch.arange(4, dtype=torch.float64))))
    torch.testing.assert_close(attn.decay.slopes, expected.float())


def test_new_parameters_follow_the_model_dtype():
    model = _softmax_model("llama2").to(torch.bfloat16)
    linearize(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="takes a torchtune TransformerDecoder"):
        linearize(torch.nn.Linear(2, 2))
    model = _softmax_model("llama2")
    with pytest.raises(ValueError, match="layer index 3 is out of range for a model of 3 layers"):
        linearize(model, layers=[3])
    linearize(model, layers=[0])
    with pytest.raises(ValueError, match="layer 0 is already linear attention"):
        linearize(model, layers=[0])
    with pytest.raises(ValueError, match="decay rule 'exp' is unknown"):
        linearize(model, layers=[1], decay="exp")


@pytest.mark.slow
def test_linearized_model_compiles_with_fullgraph():
    model = linearize(_softmax_model("mistral"))
    tokens = torch.randint(0, VOCAB, (2, 24))
    eager = model(tokens)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(tokens)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    out.float().pow(2).mean().backward()
    assert model.layers[0].attn.feature_map.proj.weight.grad is not None

    # The decode step: a cached one-token forward compiles as one graph too.
    with torch.no_grad():
        model.setup_caches(batch_size=2, dtype=torch.float32)
        model(tokens[:, :20])
        step = torch.compile(model, fullgraph=True)
        decoded = torch.cat([step(tokens[:, t : t + 1]) for t in range(20, 24)], dim=1)
    torch.testing.assert_close(decoded, eager[:, 20:].detach(), rtol=1e-4, atol=1e-4)
