"""Language-model loss as sums, normalized by the true token count of the whole step.

A training step may span several gradient-accumulation micro-batches and ranks with unequal
numbers of real (not ignored) tokens. Averaging per-micro-batch means would weight their tokens
unequally; instead ``lm_loss`` returns sums and the token count, and the step divides by the
total count. Two recipe patterns give exactly the loss of the concatenated batch:

1. Count first (labels are known before the forward passes)::

       total = sum((labels != ignore_index).sum() for labels in micro_batch_labels)
       dist.all_reduce(total)                        # over data-parallel ranks
       for tokens, labels in micro_batches:
           parts = lm_loss(model(tokens), labels, z_loss_weight=w)
           # FSDP/DDP average gradients over ranks: multiply by world_size to get a sum.
           (normalize(parts, total) * world_size).backward()

2. Sum, then scale the gradients once::

       step_parts = None
       for tokens, labels in micro_batches:
           parts = lm_loss(model(tokens), labels, z_loss_weight=w)
           parts.unnormalized().backward()
           step_parts = parts.detach() if step_parts is None else step_parts + parts.detach()
       total = step_parts.num_tokens.clone(); dist.all_reduce(total)
       for p in model.parameters():
           if p.grad is not None:
               p.grad.mul_(world_size / total.clamp(min=1))

In both, the logged loss is ``normalize(step_parts, total)`` with ``step_parts`` all-reduced.
"""

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class LossParts:
    """Sums that make up a loss; add the parts of micro-batches with ``+``.

    Attributes:
        ce_sum (torch.Tensor): float32 scalar, sum of the token cross-entropies.
        z_sum (torch.Tensor): float32 scalar, sum over tokens of ``logsumexp(logits)^2``
            (0 when the z-loss weight is 0).
        num_tokens (torch.Tensor): int64 scalar, number of labels != ``ignore_index``.
        z_loss_weight (float): weight of ``z_sum`` in the total.
    """

    ce_sum: torch.Tensor
    z_sum: torch.Tensor
    num_tokens: torch.Tensor
    z_loss_weight: float = 0.0

    def __add__(self, other: "LossParts") -> "LossParts":
        if not isinstance(other, LossParts):
            return NotImplemented
        if other.z_loss_weight != self.z_loss_weight:
            raise ValueError(
                f"cannot add LossParts with z_loss_weight {self.z_loss_weight} and "
                f"{other.z_loss_weight}: every micro-batch must use the same weight"
            )
        return LossParts(
            self.ce_sum + other.ce_sum, self.z_sum + other.z_sum,
            self.num_tokens + other.num_tokens, self.z_loss_weight,
        )

    def unnormalized(self) -> torch.Tensor:
        """``ce_sum + z_loss_weight * z_sum``: float32 scalar."""
        if self.z_loss_weight == 0.0:
            return self.ce_sum
        return self.ce_sum + self.z_loss_weight * self.z_sum

    def total(self) -> torch.Tensor:
        """The loss of these tokens alone: ``(ce_sum + z_loss_weight * z_sum) / num_tokens``."""
        return normalize(self, self.num_tokens)

    def detach(self) -> "LossParts":
        """The same parts without autograd history (for logging)."""
        return LossParts(self.ce_sum.detach(), self.z_sum.detach(), self.num_tokens, self.z_loss_weight)


def normalize(parts: LossParts, total_tokens: Union[torch.Tensor, int]) -> torch.Tensor:
    """``(ce_sum + z_loss_weight * z_sum) / total_tokens``: the mean loss per real token.

    Args:
        parts (LossParts): the parts of one micro-batch (or their sum over several).
        total_tokens (torch.Tensor | int): the token count to divide by: the sum of
            ``num_tokens`` over every micro-batch and rank of the step. A count of 0 (only
            ignored labels) is treated as 1, giving a loss of 0 rather than NaN.

    Returns:
        torch.Tensor: float32 scalar.
    """
    if not torch.is_tensor(total_tokens):
        total_tokens = torch.tensor(total_tokens, device=parts.ce_sum.device)
    return parts.unnormalized() / total_tokens.clamp(min=1).to(torch.float32)


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss_weight: float = 0.0,
    ignore_index: int = -100,
) -> LossParts:
    """Summed next-token cross-entropy and z-loss, in float32.

    ``labels`` are aligned with ``logits``: ``labels[b, t]`` is the target of ``logits[b, t]``
    (shift the tokens before calling). The z-loss (PaLM) pushes ``log Z = logsumexp(logits)``
    towards 0 to keep the softmax normalizer stable in low precision. Both terms come from one
    logsumexp: ``ce = logsumexp(logits) - logits[label]``, which saves less for backward than
    ``F.cross_entropy`` (no float32 log-softmax copy when the logits are already float32).

    Args:
        logits (torch.Tensor): [B, T, V], any floating dtype (upcast to float32).
        labels (torch.Tensor): [B, T] integer targets (any integer dtype) in [0, V) or
            ``ignore_index``.
        z_loss_weight (float): weight of the z-loss, >= 0 (PaLM uses 1e-4).
        ignore_index (int): label value that contributes nothing and is not counted.

    Returns:
        LossParts: ``ce_sum``, ``z_sum``, ``num_tokens`` and the weight; ``.total()`` is the
        mean over this batch, ``normalize(parts, n)`` divides by another count.

    Raises:
        ValueError: if the shapes do not match, the logits are not floating point, or
            ``z_loss_weight`` is negative.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T] with the same B and T; got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point; got {logits.dtype}")
    if z_loss_weight < 0:
        raise ValueError(f"z_loss_weight must be >= 0; got {z_loss_weight}")
    logits = logits.float()
    valid = labels != ignore_index
    targets = labels.masked_fill(~valid, 0).long()
    log_z = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    zero = log_z.new_zeros(())
    ce_sum = torch.where(valid, log_z - target_logits, zero).sum()
    if z_loss_weight > 0:
        z_sum = torch.where(valid, log_z.square(), zero).sum()
    else:
        z_sum = zero
    return LossParts(ce_sum, z_sum, valid.sum(), float(z_loss_weight))


class LMLoss:
    """``lm_loss`` with its options bound: the uptrain recipe's ``loss`` component
    (``_component_: supra.training.loss.LMLoss``), called as ``loss(logits, labels) -> LossParts``.

    Args:
        z_loss_weight (float): weight of the z-loss, >= 0 (PaLM uses 1e-4).
        ignore_index (int): label value that contributes nothing and is not counted.
    """

    def __init__(self, *, z_loss_weight: float = 0.0, ignore_index: int = -100) -> None:
        if not z_loss_weight >= 0:
            raise ValueError(f"z_loss_weight must be >= 0; got {z_loss_weight}")
        self.z_loss_weight, self.ignore_index = z_loss_weight, ignore_index

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> LossParts:
        return lm_loss(logits, labels, z_loss_weight=self.z_loss_weight, ignore_index=self.ignore_index)
