"""Sampling pieces against transformers' own logits processors and against the softmax
distribution they should draw from."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from supra.generation import apply_repetition_penalty, filter_top_k, filter_top_p, sample_next

V = 50


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronization (and, on a busy machine,
    spinning that slows these tests several times over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_logits(rows=64, vocab=V, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        # Few distinct values: many ties, also at the top-k / top-p boundaries.
        return torch.randint(-3, 3, (rows, vocab), generator=g).float()
    return torch.randn(rows, vocab, generator=g) * 3


def _kept(logits):
    return logits != float("-inf")


# --- top-k ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("top_k", [1, 2, 7, V - 1, V, V + 10])
def test_filter_top_k_equals_transformers(top_k, ties):
    logits = _random_logits(ties=ties)
    expected = TopKLogitsWarper(top_k=top_k)(None, logits.clone())
    assert torch.equal(filter_top_k(logits, top_k), expected)


def test_filter_top_k_keeps_exactly_k_without_ties_and_all_ties_at_the_boundary():
    logits = _random_logits()
    assert (_kept(filter_top_k(logits, 7)).sum(-1) == 7).all()
    tied = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert _kept(filter_top_k(tied, 2)).tolist() == [[True, False, True, True, False]]
    assert torch.equal(filter_top_k(logits, None), logits)


# --- top-p ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_p", [1e-9, 0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_filter_top_p_equals_transformers(top_p):
    logits = _random_logits()
    expected = TopPLogitsWarper(top_p=top_p)(None, logits.clone())
    assert torch.equal(filter_top_p(logits, top_p), expected)


def _nucleus_size(logits, top_p):
    """Independent rule in float64: the fewest most-likely tokens whose mass reaches top_p."""
    probs = logits.double().softmax(-1).sort(-1, descending=True).values
    return [int((row.cumsum(0) < top_p).sum()) + 1 for row in probs]


@pytest.mark.parametrize("top_p", [0.2, 0.5, 0.8, 0.95])
def test_filter_top_p_with_ties_keeps_as_many_tokens_of_the_same_values_as_transformers(top_p):
    # Among equal logits at the boundary, which indices survive is arbitrary (transformers keeps
    # the last in its ascending sort); the number kept and their values must agree.
    logits = _random_logits(rows=200, ties=True)
    ours, theirs = filter_top_p(logits, top_p), TopPLogitsWarper(top_p=top_p)(None, logits.clone())
    assert _kept(ours).sum(-1).tolist() == _kept(theirs).sum(-1).tolist()
    assert _kept(ours).sum(-1).tolist() == _nucleus_size(logits, top_p)
    for row in range(logits.shape[0]):
        kept, dropped = logits[row][_kept(ours[row])], logits[row][~_kept(ours[row])]
        assert torch.equal(kept.sort().values, logits[row][_kept(theirs[row])].sort().values)
        # The nucleus is a top set: nothing dropped beats anything kept.
        assert dropped.numel() == 0 or dropped.max() <= kept.min()
        assert torch.equal(ours[row][_kept(ours[row])], kept)


def test_filter_top_p_edge_cases():
    logits = _random_logits()
    # A tiny top_p keeps exactly the argmax; top_p = 1 (or None) keeps everything.
    tiny = filter_top_p(logits, 1e-9)
    assert torch.equal(_kept(tiny), torch.nn.functional.one_hot(logits.argmax(-1), V).bool())
    assert torch.equal(tiny.max(-1).values, logits.max(-1).values)
    assert torch.equal(filter_top_p(logits, 1.0), logits)
    assert torch.equal(filter_top_p(logits, None), logits)
    # Tied maxima with a tiny top_p: still exactly one token, one of the maxima.
    tied = torch.tensor([[1.0, 4.0, 4.0, 2.0]])
    kept = _kept(filter_top_p(tied, 1e-6))
    assert kept.sum() == 1 and tied[kept].item() == 4.0
    # Exact boundaries (equal logits give probabilities 1/4): the nucleus stops as soon as its mass
    # reaches top_p.
    flat = torch.zeros(1, 4)
    for top_p, size in [(0.25, 1), (0.3, 2), (0.5, 2), (0.75, 3), (0.76, 4)]:
        assert _kept(filter_top_p(flat, top_p)).sum() == size
        assert _kept(TopPLogitsWarper(top_p=top_p)(None, flat.clone())).sum() == size
    # A distribution 0.5 / 0.3 / 0.2 with top_p 0.6 keeps two tokens.
    probs = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    assert _kept(filter_top_p(probs.log(), 0.6)).tolist() == [[False, True, True]]
    assert _nucleus_size(_random_logits(), 0.5) == _kept(filter_top_p(_random_logits(), 0.5)).sum(-1).tolist()


# --- repetition penalty -------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, V, generator=g)
    # Exact zeros, which neither rule changes.
    logits[:, :3] = 0.0
    input_ids = torch.randint(0, V, (8, 30), generator=g)
    input_ids[:, :2] = torch.tensor([0, 1])
    seen = torch.zeros(8, V, dtype=torch.bool).scatter_(1, input_ids, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty=penalty)(input_ids, logits.clone())
    ours = apply_repetition_penalty(logits, seen, penalty)
    assert torch.equal(ours, expected)
    if penalty != 1.0:
        assert not torch.equal(ours, logits)
        assert torch.equal(ours[~seen], logits[~seen])


# --- sample_next ----------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_whatever_the_filters():
    logits = _random_logits(rows=32)
    for kwargs in (dict(top_k=None, top_p=None), dict(top_k=3, top_p=0.5)):
        tokens = sample_next(logits, temperature=0.0, generators=None, **kwargs)
        assert tokens.dtype == torch.int64 and tokens.shape == (32,)
        assert torch.equal(tokens, logits.argmax(-1))


def _frequencies(tokens, vocab):
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


DRAWS = 20_000
LOGITS5 = torch.tensor([1.0, -0.5, 2.0, 0.3, -2.0])


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, None), (0.5, None, None), (2.0, None, None), (1.0, 3, None), (1.5, None, 0.8), (2.0, 4, 0.9)],
)
def test_sampling_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = LOGITS5.expand(DRAWS, 5).contiguous()
    tokens = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generators=None)
    # The distribution transformers would sample from: temperature, then top-k, then top-p.
    scores = LOGITS5[None] / temperature
    if top_k is not None:
        scores = TopKLogitsWarper(top_k=top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p=top_p)(None, scores)
    expected = scores.double().softmax(-1)[0]
    freq = _frequencies(tokens, 5)
    assert (freq - expected).abs().max() < 0.01, (freq, expected)
    # Pearson chi-square over the tokens that may be drawn (df <= 4; 18.5 is p = 0.001).
    allowed = expected > 0
    counts, want = freq[allowed] * DRAWS, expected[allowed] * DRAWS
    assert ((counts - want) ** 2 / want).sum() < 18.5
    assert (freq[~allowed] == 0).all()


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.3), (8, 0.5)])
def test_sampling_never_draws_a_filtered_token(top_k, top_p):
    logits = _random_logits(rows=8, seed=3)
    allowed = _kept(filter_top_p(filter_top_k(logits, top_k), top_p))
    assert not allowed.all(dim=-1).any()
    torch.manual_seed(1)
    for _ in range(200):
        tokens = sample_next(logits, temperature=1.0, top_k=top_k, top_p=top_p, generators=None)
        assert allowed.gather(1, tokens[:, None]).all()
    # Temperature 50 flattens the distribution, so filtered tokens would be drawn if the masks
    # leaked (the filters apply to the tempered logits).
    tempered = _kept(filter_top_p(filter_top_k(logits / 50, top_k), top_p))
    seen = torch.zeros_like(tempered)
    for _ in range(200):
        tokens = sample_next(logits, temperature=50.0, top_k=top_k, top_p=top_p, generators=None)
        assert tempered.gather(1, tokens[:, None]).all()
        seen.scatter_(1, tokens[:, None], True)
    # ... and it does draw more than the argmax.
    assert (seen.sum(-1) > 1).any()


def test_per_row_generators_make_each_row_independent_of_the_batch():
    logits = _random_logits(rows=3, seed=4)

    def draw(rows, seeds, steps=20):
        generators = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        return torch.stack([
            sample_next(logits[rows], temperature=1.0, top_k=None, top_p=None, generators=generators)
            for _ in range(steps)
        ], dim=1)

    batch = draw([0, 1, 2], [10, 20, 30])
    assert torch.equal(draw([1], [20])[0], batch[1])
    assert torch.equal(draw([2, 0], [30, 10]), batch[[2, 0]])
    assert torch.equal(draw([0, 1, 2], [10, 20, 30]), batch)
    assert not torch.equal(draw([0], [11])[0], batch[0])
    # A None entry draws from the global generator.
    torch.manual_seed(5)
    mixed = draw([0, 1], [None, 20])
    torch.manual_seed(5)
    assert torch.equal(draw([0, 1], [None, 20]), mixed)
    assert torch.equal(mixed[1], batch[1])
