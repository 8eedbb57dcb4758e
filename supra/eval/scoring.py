"""Log-likelihoods of token sequences from parallel forwards, in padded batches.

Sequences are right-padded: the model is causal, so tokens after a sequence's end never change
its logits, and every sequence starts at position 0 with no mask, for SUPRA, hybrid and plain
torchtune softmax decoders alike. Longer sequences than ``chunk_size`` run through an all-linear
model chunk by chunk, carrying the recurrent state, so memory stays that of one chunk's logits
whatever the length.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm import tqdm

# Generation's cache handling: empty caches for the call, the model left as found afterwards.
from supra.generation import prepared_caches
from supra.modules import SupraDecoder, is_linear_layer


def is_recurrent(model: nn.Module) -> bool:
    """True for a ``SupraDecoder`` whose every layer is linear attention (unbounded context)."""
    return isinstance(model, SupraDecoder) and all(is_linear_layer(layer) for layer in model.layers)


def _next_token_scores(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return logprobs, logits.argmax(dim=-1) == targets


@torch.no_grad()
def token_scores(
    model: nn.Module, tokens: torch.Tensor, *, chunk_size: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token, and whether it is the greedy (argmax) choice.

    Args:
        model (nn.Module): a decoder whose ``model(tokens)`` gives logits [B, T, V].
        tokens (torch.Tensor): [B, T] token ids, T >= 2.
        chunk_size (Optional[int]): for an all-linear ``SupraDecoder``, inputs longer than this
            run in chunks that carry the recurrent state (same numbers, memory of one chunk).
            None: one forward.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: float32 log p(tokens[:, t + 1] | tokens[:, :t + 1])
        and a bool "is the argmax", both [B, T - 1].

    Raises:
        ValueError: for T < 2 or ``chunk_size < 1``.
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, T] with T >= 2 (a token to condition on and one to score); got {tuple(tokens.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for one forward); got {chunk_size}")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if chunk_size is None or inputs.shape[1] <= chunk_size or not is_recurrent(model):
        return _next_token_scores(model(inputs), targets)
    parts = []
    with prepared_caches(model, tokens.shape[0], tokens.shape[1]):
        for start in range(0, inputs.shape[1], chunk_size):
            end = start + chunk_size
            parts.append(_next_token_scores(model(inputs[:, start:end]), targets[:, start:end]))
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def _check_sequences(sequences: Sequence[Tuple[Sequence[int], int]]) -> None:
    for i, (tokens, num_scored) in enumerate(sequences):
        if not 0 <= num_scored < len(tokens):
            raise ValueError(
                f"sequence {i} has {len(tokens)} tokens and asks to score the last {num_scored}: score between 0 "
                "and len - 1 tokens (the first token is only conditioned on; start with BOS)"
            )


def score_continuations(
    model: nn.Module,
    sequences: Sequence[Tuple[Sequence[int], int]],
    *,
    batch_size: int = 8,
    chunk_size: Optional[int] = None,
    pad_id: int = 0,
    progress: bool = False,
) -> List[Tuple[float, bool]]:
    """Sums the log-probabilities of the last tokens of each sequence, in right-padded batches.

    Sequences are sorted longest first (the first batch is the largest, so running out of memory
    happens at once) and scored in batches of ``batch_size``; results come back in input order and
    do not depend on the batching.

    Args:
        model (nn.Module): any decoder with ``model(tokens) -> logits [B, T, V]``.
        sequences: ``(tokens, n)`` pairs: score the last ``n`` tokens of ``tokens`` given the rest.
        batch_size (int): sequences per forward.
        chunk_size (Optional[int]): see ``token_scores``.
        pad_id (int): fills the padding (any valid id: pads come after every scored token).
        progress (bool): show a tqdm bar over batches.

    Returns:
        List[Tuple[float, bool]]: per sequence, the summed log-probability of its last ``n``
        tokens and whether each of them is the greedy choice (True for ``n == 0``).

    Raises:
        ValueError: for ``batch_size < 1`` or a sequence with ``n`` outside ``[0, len - 1]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    _check_sequences(sequences)
    device = next(model.parameters()).device
    results: List[Tuple[float, bool]] = [(0.0, True)] * len(sequences)
    scored_ids = [i for i, (_, num_scored) in enumerate(sequences) if num_scored > 0]
    order = sorted(scored_ids, key=lambda i: -len(sequences[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
        length = len(sequences[batch[0]][0])
        tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, : len(sequences[i][0])] = torch.as_tensor(list(sequences[i][0]), dtype=torch.long)
        logprobs, greedy = token_scores(model, tokens.to(device), chunk_size=chunk_size)
        for row, i in enumerate(batch):
            seq_len, num_scored = len(sequences[i][0]), sequences[i][1]
            # Logits at position t predict token t + 1: the last n tokens are predicted at [L-1-n, L-1).
            scored = slice(seq_len - 1 - num_scored, seq_len - 1)
            results[i] = (float(logprobs[row, scored].sum()), bool(greedy[row, scored].all()))
    return results
