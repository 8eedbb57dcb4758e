"""Next-token selection as Hugging Face ``generate`` users expect, with tensor ops only (no host
synchronization): repetition penalty, temperature, top-k, top-p, then a seeded draw."""

from typing import List, Optional

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / HF rule: a seen token's logit is divided by ``penalty`` if positive, multiplied if negative.

    Args:
        logits (torch.Tensor): [B, V] float32.
        seen (torch.Tensor): [B, V] bool, tokens already in the prompt or the output.
        penalty (float): > 0; 1.0 leaves the logits unchanged.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_top_k(logits: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """Keeps the ``top_k`` largest logits of each row ([B, V]); the rest become -inf."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: Optional[float]) -> torch.Tensor:
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probability reaches
    ``top_p`` (always at least the most likely one); the rest become -inf. [B, V] -> [B, V]."""
    if top_p is None or top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # A token is dropped when the tokens before it already reach top_p.
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    generators: Optional[List[Optional[torch.Generator]]],
) -> torch.Tensor:
    """Picks one token per row of ``logits`` [B, V] (float32, already penalized).

    Greedy (argmax) at temperature 0; otherwise softmax(logits / temperature) after top-k and
    top-p, sampled by the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, which equals a
    multinomial draw without a host synchronization. Each row draws its noise from its own
    generator, so a seeded request samples the same tokens alone or in a batch.

    Returns:
        torch.Tensor: [B] int64.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / temperature, top_k), top_p)
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs)
    for row, generator in enumerate(generators or [None] * probs.shape[0]):
        noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)
