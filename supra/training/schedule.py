"""Learning-rate schedules."""

import math
from typing import Optional

import torch
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: Optional[float] = None,
    min_lr: Optional[float] = None,
) -> LambdaLR:
    """Linear warmup, then cosine decay to a floor reached at ``max_steps``, flat after.

    The factor multiplying each group's initial lr at step ``s`` (the number of
    ``scheduler.step()`` calls so far, i.e. the 0-based index of the optimizer step about to run):

    - warmup, ``s < warmup_steps``: ``(s + 1) / (warmup_steps + 1)``. As in torchtitan, the ramp
      starts near 0 but not at 0, so the first optimizer step is not wasted; it reaches 1 at
      ``s = warmup_steps``.
    - decay, ``warmup_steps <= s <= max_steps``: ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with
      ``p = (s - warmup_steps) / (max_steps - warmup_steps)`` and ``r`` the floor ratio.
    - after, ``s > max_steps``: ``r``.

    Every group keeps its ratio to the others: the floor of a group is ``r`` times its own lr.
    ``min_lr`` (absolute) is turned into ``r = min_lr / largest group lr``, so the group with
    the largest lr ends at exactly ``min_lr``. The paper's 7B setting, lr 3e-5 cosine to 1e-5
    with 1000 warmup steps, is ``cosine_with_warmup(opt, warmup_steps=1000, max_steps=N,
    min_lr=1e-5)`` on an optimizer whose lr is 3e-5.

    Resuming: ``load_state_dict`` restores the step count; the shape (steps, floor) comes from
    the arguments given here, not from the checkpoint.

    Args:
        optimizer (torch.optim.Optimizer): the optimizer; its groups' ``initial_lr`` (or ``lr``)
            are the peak learning rates.
        warmup_steps (int): warmup length, >= 0.
        max_steps (int): step at which the floor is reached. A run shorter than its warmup
            (``max_steps <= warmup_steps``, a smoke test) stays on the warmup ramp throughout.
        min_lr_ratio (Optional[float]): floor as a fraction of each group's lr, in [0, 1].
        min_lr (Optional[float]): floor as an absolute lr, for the group with the largest lr.
            Give at most one of ``min_lr_ratio`` and ``min_lr``; neither means a floor of 0.

    Returns:
        LambdaLR: the scheduler (it has already set the lrs of step 0).

    Raises:
        ValueError: if ``warmup_steps`` < 0, both floors are given, or the floor ratio is outside
            [0, 1].
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
    if min_lr_ratio is not None and min_lr is not None:
        raise ValueError(
            f"give either min_lr_ratio ({min_lr_ratio}) or min_lr ({min_lr}), not both"
        )
    if min_lr is not None:
        peak = max(group.get("initial_lr", group["lr"]) for group in optimizer.param_groups)
        if peak <= 0:
            raise ValueError(f"min_lr={min_lr} needs a positive peak lr; the largest group lr is {peak}")
        ratio = min_lr / peak
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(
                f"min_lr ({min_lr}) must lie in [0, largest group lr ({peak})]: the floor cannot "
                "exceed the peak"
            )
    else:
        ratio = 0.0 if min_lr_ratio is None else min_lr_ratio
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1]; got {ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        decay_steps = max_steps - warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
        return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
