"""Batched log-likelihoods against a direct log-softmax of ``model(tokens)`` logits."""

import pytest
import torch
from torchtune.models.llama3_2 import llama3_2

from supra.eval.scoring import score_continuations, token_scores


def direct(model, tokens, num_scored):
    """log p of the last ``num_scored`` tokens and all-greedy, from one unpadded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    positions = range(len(tokens) - 1 - num_scored, len(tokens) - 1)
    total = sum(float(logprobs[t, tokens[t + 1]]) for t in positions)
    greedy = all(int(logits[t].argmax()) == tokens[t + 1] for t in positions)
    return total, greedy


def sequences(seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths, scored = [5, 23, 2, 17, 40, 9, 31], [2, 5, 1, 16, 3, 1, 7]
    return [(torch.randint(0, 128, (n,), generator=generator).tolist(), k) for n, k in zip(lengths, scored)]


def test_token_scores_are_the_log_softmax_of_the_logits(tiny_model):
    tokens = torch.randint(0, 258, (3, 21), generator=torch.Generator().manual_seed(1))
    logprobs, greedy = token_scores(tiny_model, tokens)
    with torch.no_grad():
        logits = tiny_model(tokens[:, :-1])
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(logprobs, expected)
    assert torch.equal(greedy, logits.argmax(-1) == tokens[:, 1:])


def test_chunks_that_carry_the_recurrent_state_give_the_same_scores(tiny_model):
    tokens = torch.randint(0, 258, (2, 50), generator=torch.Generator().manual_seed(2))
    whole, greedy = token_scores(tiny_model, tokens)
    chunked, chunked_greedy = token_scores(tiny_model, tokens, chunk_size=8)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked_greedy, greedy)
    assert not tiny_model.caches_are_setup()


def test_batches_of_different_lengths_give_the_numbers_of_one_by_one(tiny_model):
    items = sequences()
    expected = [direct(tiny_model, tokens, k) for tokens, k in items]
    for batch_size in (3, 7):
        # chunk_size 16: the longer sequences also go through the state-carrying path.
        results = score_continuations(tiny_model, items, batch_size=batch_size, chunk_size=16)
        for (logprob, greedy), (expected_logprob, expected_greedy) in zip(results, expected):
            assert logprob == pytest.approx(expected_logprob, abs=1e-4)
            assert greedy == expected_greedy


def test_plain_torchtune_softmax_models_are_scored_too():
    torch.manual_seed(0)
    teacher = llama3_2(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                       intermediate_dim=64, max_seq_len=64).eval()
    items = sequences(seed=3)
    for (tokens, k), (logprob, _) in zip(items, score_continuations(teacher, items, batch_size=4)):
        assert logprob == pytest.approx(direct(teacher, tokens, k)[0], abs=1e-4)


def test_scoring_zero_tokens_and_invalid_requests(tiny_model):
    assert score_continuations(tiny_model, [([3], 0), ([4, 5, 6], 0)]) == [(0.0, True), (0.0, True)]
    with pytest.raises(ValueError, match="sequence 1 has 3 tokens and asks to score the last 3"):
        score_continuations(tiny_model, [([1, 2], 1), ([1, 2, 3], 3)])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score_continuations(tiny_model, [([1, 2], 1)], batch_size=0)
    with pytest.raises(ValueError, match="T >= 2"):
        token_scores(tiny_model, torch.tensor([[1]]))
