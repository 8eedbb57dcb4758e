"""generate(): prefill + recurrent decode against independent references.

The reference for every decode is the plainest computation there is: run the whole sequence so
far through one parallel forward (no cache, no padding) and take the last position's logits.
Greedy picks their argmax; seeded sampling feeds them to ``sample_next`` with a generator seeded
the same way (``sample_next`` itself is checked against transformers in test_sampling.py), and
the repetition penalty comes from transformers' own ``RepetitionPenaltyLogitsProcessor``.
"""

import pytest
import torch
from torch._dynamo.utils import counters
from torchtune.models.llama3_2 import llama3_2
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from supra.convert import linearize
from supra.generation import generate, sample_next
from supra.models import supra_decoder, supra_test_tiny

VOCAB = 128
LENGTHS = [1, 5, 17, 30]
NEW = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronization (and, on a busy machine,
    spinning that slows these tests several times over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(**overrides):
    torch.manual_seed(0)
    return supra_test_tiny(**overrides).eval()


def _hybrid():
    torch.manual_seed(0)
    return supra_decoder(
        vocab_size=VOCAB, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32,
        intermediate_dim=64, max_seq_len=64, softmax_layers=[1],
    ).eval()


def _linearized_llama():
    torch.manual_seed(0)
    model = llama3_2(
        vocab_size=VOCAB, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32,
        intermediate_dim=64, max_seq_len=64,
    )
    # Layer 1 stays softmax; the linearized layers get fresh (random) feature maps.
    return linearize(model, layers=[0, 2]).eval()


MODELS = {
    "mha": lambda: _tiny(num_kv_heads=4),
    "gqa": lambda: _tiny(),
    "qk_norm": lambda: _tiny(qk_norm=True),
    "retnet": lambda: _tiny(decay="retnet"),
    "hybrid": _hybrid,
    "linearized_llama3_2": _linearized_llama,
}


def _prompts(seed=1, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _last_logits(model, sequence):
    """Logits of the last position from one parallel forward of the whole sequence (no cache)."""
    assert not model.caches_are_setup()
    return model(torch.tensor([sequence]))[:, -1].float()


def _reference_greedy(model, prompt, max_new_tokens, repetition_penalty=1.0):
    sequence, out = list(prompt), []
    penalty = RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty)
    for _ in range(max_new_tokens):
        logits = _last_logits(model, sequence)
        if repetition_penalty != 1.0:
            logits = penalty(torch.tensor([sequence]), logits)
        token = int(logits.argmax(-1))
        out.append(token)
        sequence.append(token)
    return out


def _reference_sampled(model, prompt, max_new_tokens, seed, **sampling):
    generator = torch.Generator().manual_seed(seed)
    sequence, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(sample_next(_last_logits(model, sequence), generators=[generator], **sampling)[0])
        out.append(token)
        sequence.append(token)
    return out


# --- correctness of the decode ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_equals_argmax_of_repeated_parallel_forwards(name):
    model = MODELS[name]()
    prompts = _prompts()
    outputs = generate(model, prompts, max_new_tokens=NEW)
    expected = [_reference_greedy(model, p, NEW) for p in prompts]
    assert outputs == expected


def test_batched_equals_alone_for_lengths_1_5_17_30_whatever_the_pad_id():
    model = _tiny()
    prompts = _prompts(seed=2)
    alone = [generate(model, [p], max_new_tokens=NEW)[0] for p in prompts]
    for pad_id in (0, prompts[3][0], VOCAB - 1):
        assert generate(model, prompts, max_new_tokens=NEW, pad_id=pad_id) == alone
    # Order in the batch does not matter either.
    assert generate(model, prompts[::-1], max_new_tokens=NEW) == alone[::-1]


@pytest.mark.parametrize("name", ["gqa", "hybrid"])
def test_seeded_sampling_per_request_seeds_batched_equals_alone_and_reference(name):
    model = MODELS[name]()
    prompts = _prompts(seed=3)
    seeds = [11, 22, 33, 44]
    sampling = dict(temperature=1.0, top_k=40, top_p=0.95)
    batched = generate(model, prompts, max_new_tokens=NEW, seed=seeds, **sampling)
    for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
        assert generate(model, [prompt], max_new_tokens=NEW, seed=[seed], **sampling)[0] == batched[row]
        assert batched[row] == _reference_sampled(model, prompt, NEW, seed, **sampling)
    # An int seed gives row i the seed + i.
    assert generate(model, [prompts[2]], max_new_tokens=NEW, seed=33, **sampling)[0] == batched[2]
    consecutive = generate(model, prompts, max_new_tokens=NEW, seed=[11, 12, 13, 14], **sampling)
    assert generate(model, prompts, max_new_tokens=NEW, seed=11, **sampling) == consecutive


def test_seeded_sampling_is_reproducible_and_seeds_matter():
    model = _tiny()
    prompts = _prompts(seed=4, lengths=[3, 9])
    first = generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=[5, 6])
    assert generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=[5, 6]) == first
    other = generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=[7, 8])
    assert other[0] != first[0] and other[1] != first[1]
    # seed=None draws from the global generator: reproducible under torch.manual_seed.
    torch.manual_seed(123)
    unseeded = generate(model, prompts, max_new_tokens=16, temperature=1.0)
    torch.manual_seed(123)
    assert generate(model, prompts, max_new_tokens=16, temperature=1.0) == unseeded
    # Sampling at temperature 1 on a random model is not greedy.
    assert first != generate(model, prompts, max_new_tokens=16)


@pytest.mark.parametrize("penalty", [1.5, 0.5, 100.0])
def test_greedy_with_repetition_penalty_matches_transformers_processor(penalty):
    model = _tiny()
    # The prompts hold tokens of the unpenalized greedy path, so the penalty changes the outcome.
    prompts = [[5, 61, 77, 31, 34, 12], [9, 0, 0, 3, 84, 24, 77, 14, 49, 0]]
    plain = generate(model, prompts, max_new_tokens=10)
    expected = [_reference_greedy(model, p, 10, repetition_penalty=penalty) for p in prompts]
    assert expected[0] != plain[0] and expected[1] != plain[1]
    # Pads are not "seen" tokens: neither pad id 0 (which the longer prompt holds) nor the token
    # the short prompt picks first (penalty 100 would surely replace it) changes anything.
    assert plain[0][0] not in prompts[0] and expected[0][0] == plain[0][0]
    for pad_id in (0, plain[0][0]):
        assert generate(model, prompts, max_new_tokens=10, repetition_penalty=penalty, pad_id=pad_id) == expected


# --- stop tokens and streaming ------------------------------------------------------------------


def _first_unique_token(outputs):
    """(row, step, token) with the token produced once in the whole batch, at a step >= 1."""
    counts = {}
    for row in outputs:
        for token in row:
            counts[token] = counts.get(token, 0) + 1
    for row, tokens in enumerate(outputs):
        for step, token in enumerate(tokens[1:-1], start=1):
            if counts[token] == 1:
                return row, step, token
    raise AssertionError(f"no token occurs once in {outputs}; pick other prompts")


def test_stop_token_ends_only_its_sequence():
    model = _tiny()
    prompts = _prompts(seed=5)
    n = 12
    full = generate(model, prompts, max_new_tokens=n)
    row, step, token = _first_unique_token(full)
    streamed = []
    pad_id = 3
    outputs = generate(
        model, prompts, max_new_tokens=n, stop_tokens=[token], pad_id=pad_id,
        callback=lambda s, t: streamed.append((s, t.tolist())),
    )
    assert outputs[row] == full[row][: step + 1]
    assert [o for i, o in enumerate(outputs) if i != row] == [f for i, f in enumerate(full) if i != row]
    assert [s for s, _ in streamed] == list(range(n))
    # After its stop token, the finished sequence streams the pad id.
    for s, tokens in streamed:
        assert tokens == [out[s] if s < len(out) else pad_id for out in outputs]


def test_loop_ends_early_when_every_sequence_has_stopped():
    model = _tiny()
    prompts = _prompts(seed=6)
    n = 12
    full = generate(model, prompts, max_new_tokens=n)
    stop = {row[2] for row in full}
    # Independent expectation: each row cut at its first stop token.
    cut = [next(i for i, t in enumerate(row) if t in stop) for row in full]
    assert max(cut) + 1 < n
    streamed = []
    pad_id = 3
    outputs = generate(
        model, prompts, max_new_tokens=n, stop_tokens=sorted(stop), pad_id=pad_id,
        callback=lambda s, t: streamed.append((s, t.tolist())),
    )
    assert outputs == [row[: c + 1] for row, c in zip(full, cut)]
    assert [s for s, _ in streamed] == list(range(max(cut) + 1))
    # Finished sequences stream the pad id.
    for s, tokens in streamed:
        assert tokens == [out[s] if s < len(out) else pad_id for out in outputs]


def test_streaming_callback_sees_every_step_in_order():
    model = _hybrid()
    prompts = _prompts(seed=7)
    streamed = []

    def callback(step, tokens):
        assert isinstance(tokens, torch.Tensor) and tokens.shape == (len(prompts),)
        streamed.append((step, tokens.tolist()))

    outputs = generate(model, prompts, max_new_tokens=NEW, temperature=0.8, seed=[1, 2, 3, 4], callback=callback)
    assert [s for s, _ in streamed] == list(range(NEW))
    assert [list(col) for col in zip(*[t for _, t in streamed])] == outputs


# --- the model is left as found -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["gqa", "hybrid"])
def test_model_without_caches_is_left_without_caches_and_in_training_mode(name):
    model = MODELS[name]().train()
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        before = model(tokens)
    modes = []
    generate(model, _prompts(seed=8), max_new_tokens=NEW, callback=lambda s, t: modes.append(model.training))
    # Generation runs in eval mode (dropout off), and the training mode comes back afterwards.
    assert modes == [False] * NEW
    assert not model.caches_are_setup()
    assert model.training and all(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


def _states(model):
    return [layer.attn.kv_cache for layer in model.layers]


def test_model_with_caches_keeps_them_reset_and_stays_in_eval_mode():
    model = _tiny()
    fresh = generate(model, _prompts(seed=9, lengths=[4, 11]), max_new_tokens=NEW)
    model.setup_caches(batch_size=4, dtype=torch.float32)
    tokens = torch.randint(0, VOCAB, (4, 10))
    with torch.no_grad():
        expected = model(tokens)
        model.reset_caches()
        model(torch.randint(0, VOCAB, (4, 6)))
    assert any(cache.state.abs().sum() > 0 for cache in _states(model))

    # Stale state in the cache must not leak into generation.
    assert generate(model, _prompts(seed=9, lengths=[4, 11]), max_new_tokens=NEW) == fresh
    assert model.caches_are_setup() and not model.training
    for cache in _states(model):
        assert cache.state.abs().sum() == 0 and cache.positions.abs().sum() == 0
    # Reset means usable: the cache now continues from an empty state.
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)


def test_hybrid_with_caches_set_up_by_the_user():
    model = _hybrid()
    prompts = _prompts(seed=10, lengths=[3, 8])
    fresh = generate(model, prompts, max_new_tokens=NEW)
    model.setup_caches(batch_size=2, dtype=torch.float32)
    assert generate(model, prompts, max_new_tokens=NEW) == fresh
    assert model.caches_are_setup()


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_greedy_tokens():
    model = _tiny()
    prompts = _prompts(seed=11)
    eager = generate(model, prompts, max_new_tokens=NEW)
    counters.clear()
    assert generate(model, prompts, max_new_tokens=NEW, compile=True) == eager
    # The decode step really went through dynamo (fullgraph: a graph break would raise).
    assert counters["stats"]["unique_graphs"] >= 1
    assert not model.caches_are_setup()
    # A second call reuses the compiled step (no new graph) and still matches.
    graphs = counters["stats"]["unique_graphs"]
    assert generate(model, prompts, max_new_tokens=NEW, compile=True) == eager
    assert counters["stats"]["unique_graphs"] == graphs
    # A new batch size must not reuse the old graph: the first step of each call checks the guards
    # that later steps skip.
    alone = generate(model, prompts[:1], max_new_tokens=NEW)
    assert generate(model, prompts[:1], max_new_tokens=NEW, compile=True) == alone


@pytest.mark.slow
def test_compiled_decode_of_a_hybrid_gives_the_eager_greedy_tokens():
    # Softmax layers decode from torchtune's KV caches inside the same compiled step.
    model = _hybrid()
    prompts = _prompts(seed=12, lengths=[4, 9])
    assert generate(model, prompts, max_new_tokens=NEW, compile=True) == generate(model, prompts, max_new_tokens=NEW)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([], {}, "prompts is empty"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, -1]], {}, r"outside the vocabulary \[0, 128\).*-1"),
        ([[1, VOCAB]], {}, r"outside the vocabulary \[0, 128\).*128"),
        ([[1]], dict(temperature=-0.1), "temperature must be a finite number >= 0"),
        ([[1]], dict(temperature=float("nan")), "temperature must be a finite number >= 0 .*; got nan"),
        ([[1]], dict(temperature="abc"), "temperature must be a finite number >= 0 .*; got 'abc'"),
        ([[1]], dict(temperature=1.0, top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        ([[1]], dict(temperature=1.0, top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        ([[1]], dict(temperature=1.0, top_k=0), "top_k must be an integer >= 1"),
        ([[1]], dict(temperature=1.0, top_k=2.5), r"top_k must be an integer >= 1 \(or None\); got 2.5"),
        ([[1]], dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        ([[1]], dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1; got 2.5"),
        ([[1]], dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
        ([[1]], dict(repetition_penalty=-1.2), "repetition_penalty must be a finite number > 0"),
        ([[1]], dict(pad_id=VOCAB), r"pad_id must be an integer in the vocabulary \[0, 128\); got 128"),
        ([[1], [2]], dict(seed=[1, 2, 3]), "one seed per prompt"),
        ([[1.5, 2.0]], {}, r"prompt 0 holds values that are not integer token ids: \[1.5, 2.0\]"),
        ([torch.tensor([1.0, 2.0])], {}, "prompt 0 holds values that are not integer token ids"),
        ("Hello", {}, "prompts must be token ids, one list per prompt; got the text 'Hello'"),
        ([1, 2, 3], {}, r"prompts must be a list of prompts, each a list of token ids; prompt 0 is 1: wrap"),
    ],
    ids=[
        "no-prompts", "empty-prompt", "negative-id", "id-too-large", "negative-temperature", "nan-temperature",
        "string-temperature", "top_p-0", "top_p-1.5", "top_k-0", "top_k-float", "max_new_tokens-0",
        "max_new_tokens-float", "penalty-0", "penalty-negative", "pad_id", "seed-count", "float-ids",
        "float-tensor", "string-prompt", "flat-list",
    ],
)
def test_bad_input_raises_value_error(prompts, kwargs, match):
    model = _tiny().train()
    kwargs = dict(dict(max_new_tokens=4), **kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, **kwargs)
    assert not model.caches_are_setup() and model.training


def test_batch_larger_than_the_caches_raises_value_error():
    model = _tiny()
    model.setup_caches(batch_size=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch of 3 prompts exceeds the caches set up for 2"):
        generate(model, [[1], [2, 3], [4]], max_new_tokens=4)
    assert model.caches_are_setup()
    # Two prompts still fit.
    model2 = _tiny()
    assert generate(model, [[1], [2, 3]], max_new_tokens=4) == generate(model2, [[1], [2, 3]], max_new_tokens=4)
