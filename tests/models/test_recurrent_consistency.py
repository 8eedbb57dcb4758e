"""The key test of a recurrent model: chunked prefill + token-by-token decode == one parallel
forward, and a left-padded batch == each sequence alone."""

import itertools

import pytest
import torch
from torchtune.modules.common_utils import disable_kv_cache

from supra.models import supra_decoder, supra_test_tiny

VOCAB = 128
CONFIGS = [
    dict(num_kv_heads=kv, qk_norm=qk, decay=decay)
    for kv, qk, decay in itertools.product((4, 2), (False, True), ("alibi", "retnet"))
] + [dict(num_kv_heads=2, qk_norm=False, decay="alibi", normalization="denominator")]


def _ids(config):
    mha = "mha" if config["num_kv_heads"] == 4 else "gqa"
    return "{}-qk{}-{}-{}".format(mha, int(config["qk_norm"]), config["decay"], config.get("normalization", "group_norm"))


def _model(**overrides):
    torch.manual_seed(0)
    return supra_test_tiny(**overrides).eval()


def _incremental_logits(model, tokens, chunk_sizes):
    """Feeds ``tokens`` through the cache in chunks of the given sizes, then one at a time."""
    model.setup_caches(batch_size=tokens.shape[0], dtype=torch.float32)
    outputs, start = [], 0
    for size in chunk_sizes:
        outputs.append(model(tokens[:, start : start + size]))
        start += size
    for t in range(start, tokens.shape[1]):
        outputs.append(model(tokens[:, t : t + 1]))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@torch.no_grad()
def test_prefill_then_decode_equals_parallel(config):
    model = _model(**config)
    tokens = torch.randint(0, VOCAB, (3, 40))
    parallel = model(tokens)
    incremental = _incremental_logits(model, tokens, chunk_sizes=[17, 3, 2])
    torch.testing.assert_close(incremental, parallel, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone(config):
    model = _model(**config)
    lengths = [1, 5, 17, 30]
    T = max(lengths)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    tokens = torch.zeros(len(prompts), T, dtype=torch.long)
    padding_mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p) :] = p
        padding_mask[b, T - len(p) :] = True
    batched = model(tokens, padding_mask=padding_mask)
    alone = [model(p[None]) for p in prompts]
    for b, p in enumerate(prompts):
        torch.testing.assert_close(batched[b, T - len(p) :], alone[b][0], rtol=1e-4, atol=1e-4)

    # Same through the cache: padded prefill, then decode the same new tokens for everyone.
    new_tokens = torch.randint(1, VOCAB, (len(prompts), 4))
    model.setup_caches(batch_size=len(prompts), dtype=torch.float32)
    model(tokens, padding_mask=padding_mask)
    decoded = torch.cat([model(new_tokens[:, i : i + 1]) for i in range(4)], dim=1)
    for b, p in enumerate(prompts):
        with disable_kv_cache(model):
            reference = model(torch.cat([p, new_tokens[b]])[None])
        torch.testing.assert_close(decoded[b], reference[0, -4:], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_context_runs_past_max_seq_len():
    model = _model(max_seq_len=16)
    tokens = torch.randint(0, VOCAB, (1, 50))
    parallel = model(tokens)
    assert torch.isfinite(parallel).all()
    incremental = _incremental_logits(model, tokens, chunk_sizes=[20])
    torch.testing.assert_close(incremental, parallel, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_logits_to_keep_gives_the_last_positions():
    for model in (_model(), _model(softmax_layers=[0])):
        tokens = torch.randint(0, VOCAB, (2, 11))
        full = model(tokens)
        torch.testing.assert_close(model(tokens, logits_to_keep=1), full[:, -1:])
        torch.testing.assert_close(model(tokens, logits_to_keep=3), full[:, -3:])
        with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
            model(tokens, logits_to_keep=-1)


def test_cached_one_token_step_backpropagates():
    """With autograd on, a cached step backpropagates as the parallel forward does (the op keeps
    its own copy of the initial state, which the cache update then overwrites)."""
    model = _model()
    tokens = torch.randint(0, VOCAB, (1, 9))
    model.setup_caches(batch_size=1, dtype=torch.float32)
    with torch.no_grad():
        model(tokens[:, :8])
    model(tokens[:, 8:]).sum().backward()
    stepped = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with disable_kv_cache(model):
        model(tokens)[:, -1].sum().backward()
    # The prefix ran without gradients above: compare parameters whose gradient comes from the
    # last token's own activations alone (the state carries earlier tokens' gradients elsewhere).
    for name in ("layers.1.attn.output_proj.weight", "layers.1.mlp.w1.weight", "norm.scale", "output.weight"):
        torch.testing.assert_close(stepped[name], model.get_parameter(name).grad, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_reset_caches_starts_a_new_sequence():
    model = _model()
    tokens = torch.randint(0, VOCAB, (2, 12))
    first = _incremental_logits(model, tokens, chunk_sizes=[6])
    model.reset_caches()
    second = torch.cat([model(tokens[:, :6]), *(model(tokens[:, t : t + 1]) for t in range(6, 12))], dim=1)
    torch.testing.assert_close(second, first)


@torch.no_grad()
def test_smaller_batch_than_cache_and_too_large_batch():
    model = _model()
    tokens = torch.randint(0, VOCAB, (2, 10))
    model.setup_caches(batch_size=3, dtype=torch.float32)
    with disable_kv_cache(model):
        parallel = model(tokens)
    torch.testing.assert_close(model(tokens), parallel, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="exceeds the recurrent cache's batch size 3"):
        model(torch.randint(0, VOCAB, (4, 2)))


@torch.no_grad()
def test_bad_padding_masks_are_rejected():
    model = _model()
    tokens = torch.randint(0, VOCAB, (2, 6))
    right_padded = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with pytest.raises(ValueError, match="padding must be on the left"):
        model(tokens, padding_mask=right_padded)
    with pytest.raises(ValueError, match=r"boolean padding mask \[B, T\]"):
        model(tokens, padding_mask=right_padded.long())
    model.setup_caches(batch_size=2, dtype=torch.float32)
    model(tokens)
    left_padded = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])
    with pytest.raises(ValueError, match="already holds state"):
        model(tokens, padding_mask=left_padded)


@torch.no_grad()
def test_hybrid_model_padding_and_parallel():
    torch.manual_seed(0)
    model = supra_decoder(
        vocab_size=VOCAB, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32,
        intermediate_dim=64, max_seq_len=32, softmax_layers=[1],
    ).eval()
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (3, 9)]
    tokens = torch.zeros(2, 9, dtype=torch.long)
    padding_mask = torch.zeros(2, 9, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, 9 - len(p) :] = p
        padding_mask[b, 9 - len(p) :] = True
    batched = model(tokens, padding_mask=padding_mask)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(batched[b, 9 - len(p) :], model(p[None])[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="exceed max_seq_len=32"):
        model(torch.randint(0, VOCAB, (1, 33)))


@torch.no_grad()
def test_packed_documents_equal_each_document_alone():
    model = _model(num_kv_heads=2, qk_norm=True)
    docs = [torch.randint(0, VOCAB, (n,)) for n in (5, 11, 8, 3, 13)]
    rows = [torch.cat(docs[:3]), torch.cat(docs[3:]).tolist() + [0] * 8]
    tokens = torch.stack([rows[0], torch.tensor(rows[1])])
    positions = torch.cat([torch.arange(n) for n in (5, 11, 8, 3, 13, 8)]).view(2, 24)
    # Documents start at 0, 5, 16 (row 0) and 24, 27, 40 (row 1, the last one is filler).
    cu_seqlens = torch.tensor([0, 5, 16, 24, 27, 40, 48], dtype=torch.int32)
    packed = model(tokens, input_pos=positions, cu_seqlens=cu_seqlens)
    starts = [(0, 0), (0, 5), (0, 16), (1, 0), (1, 3)]
    for doc, (row, start) in zip(docs, starts):
        alone = model(doc[None])[0]
        torch.testing.assert_close(packed[row, start : start + len(doc)], alone, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot be combined with a recurrent cache"):
        model.setup_caches(batch_size=2, dtype=torch.float32)
        model(tokens, input_pos=positions, cu_seqlens=cu_seqlens)
