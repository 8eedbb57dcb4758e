"""AdamW parameter groups for uptraining (pretrained vs new SUPRA parameters) and freezing.

Uptraining a linearized model trains two kinds of parameters: the pretrained ones (projections,
MLPs, norms, embeddings), which are already good, and the new SUPRA ones (feature maps, q/k
norms, see ``supra.convert.new_parameter_names``), which start from a random init. The groups
built here let them use different learning rates, and ``FreezeSchedule`` can hold the pretrained
ones still for the first steps so the new ones settle first.
"""

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

GROUP_NAMES = ("pretrained", "pretrained_no_decay", "new", "new_no_decay")

# Wrappers that torch.compile and activation checkpointing insert into parameter names.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.")


def canonical_name(name: str) -> str:
    """A parameter name without the ``_orig_mod.`` (torch.compile) and
    ``_checkpoint_wrapped_module.`` (activation checkpointing) segments, so names taken from the
    plain model match the wrapped one."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _named_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Every name a parameter is reachable under (tied weights appear under each name)."""
    return {canonical_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}


def _check_names(names: Iterable[str], known: Dict[str, nn.Parameter], argument: str) -> List[str]:
    names = [canonical_name(n) for n in names]
    unknown = sorted(set(n for n in names if n not in known))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(
            f"{argument} names parameters the model does not have: {shown}. Use names from "
            "model.named_parameters() (e.g. supra.convert.new_parameter_names(model))"
        )
    return names


def build_param_groups(
    model: nn.Module,
    *,
    lr: float,
    new_lr: Optional[float] = None,
    weight_decay: float = 0.1,
    new_param_names: Iterable[str] = (),
    no_decay_names: Optional[Iterable[str]] = None,
    include_frozen: bool = False,
) -> List[dict]:
    """AdamW parameter groups: pretrained vs new parameters, with and without weight decay.

    Weight decay follows common practice (nanoGPT, OLMo, Megatron): it applies to tensors with
    two or more dimensions (the matmul weights, and the embedding tables) and not to 1-D ones
    (biases, norm weights and scales). Names in ``no_decay_names`` are also exempt, e.g.
    ``["tok_embeddings.weight"]`` to exempt the embeddings too.

    Each group is a dict with ``params``, ``lr``, ``initial_lr``, ``weight_decay`` and ``name``,
    in this order of names: ``"pretrained"``, ``"pretrained_no_decay"``, ``"new"``,
    ``"new_no_decay"``; empty groups are left out. A tied weight is listed once.

    Args:
        model (nn.Module): the model (after FSDP/compile if they are applied: the groups hold
            the parameter objects the optimizer will update).
        lr (float): learning rate of the pretrained parameters.
        new_lr (Optional[float]): learning rate of the new parameters; defaults to ``lr``.
        weight_decay (float): decoupled weight decay of the decayed groups.
        new_param_names (Iterable[str]): names of the new SUPRA parameters, as in
            ``model.named_parameters()``; all others are pretrained.
        no_decay_names (Optional[Iterable[str]]): further parameter names without weight decay.
        include_frozen (bool): also list parameters with ``requires_grad=False``. Use it with
            ``FreezeSchedule``: AdamW skips parameters whose ``.grad`` is None, so frozen ones
            stay untouched and start training, with fresh AdamW moments, once unfrozen, without
            rebuilding the optimizer. By default they are skipped.

    Returns:
        list[dict]: the non-empty groups, for ``torch.optim.AdamW``.

    Raises:
        ValueError: if ``lr``, ``new_lr`` or ``weight_decay`` is negative, or
            ``new_param_names`` / ``no_decay_names`` name parameters the model does not have.
    """
    new_lr = lr if new_lr is None else new_lr
    for argument, value in (("lr", lr), ("new_lr", new_lr), ("weight_decay", weight_decay)):
        if value < 0:
            raise ValueError(f"{argument} must be >= 0; got {value}")
    known = _named_parameters(model)
    new_ids = {id(known[n]) for n in _check_names(new_param_names, known, "new_param_names")}
    no_decay_ids = {id(known[n]) for n in _check_names(no_decay_names or (), known, "no_decay_names")}

    groups = {name: [] for name in GROUP_NAMES}
    for _, param in model.named_parameters():
        if not param.requires_grad and not include_frozen:
            continue
        kind = "new" if id(param) in new_ids else "pretrained"
        if param.ndim < 2 or id(param) in no_decay_ids:
            kind += "_no_decay"
        groups[kind].append(param)

    result = []
    for name, params in groups.items():
        if not params:
            continue
        group_lr = new_lr if name.startswith("new") else lr
        result.append(
            dict(
                params=params,
                lr=group_lr,
                initial_lr=group_lr,
                weight_decay=0.0 if name.endswith("no_decay") else weight_decay,
                name=name,
            )
        )
    return result


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    new_lr: Optional[float] = None,
    betas: Tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    new_param_names: Iterable[str] = (),
    fused: Optional[bool] = None,
    no_decay_names: Optional[Iterable[str]] = None,
    include_frozen: bool = False,
) -> torch.optim.AdamW:
    """AdamW over ``build_param_groups`` (the paper: betas (0.9, 0.95), lr 3e-5 for 7B).

    Args:
        model (nn.Module): the model, already sharded/compiled if it will be.
        lr (float): learning rate of the pretrained parameters.
        new_lr (Optional[float]): learning rate of the new SUPRA parameters; defaults to ``lr``.
        betas (Tuple[float, float]): AdamW betas.
        eps (float): AdamW epsilon.
        weight_decay (float): weight decay of the >= 2-D parameters.
        new_param_names (Iterable[str]): names of the new SUPRA parameters.
        fused (Optional[bool]): AdamW's fused implementation; None lets torch choose.
        no_decay_names (Optional[Iterable[str]]): further parameter names without weight decay.
        include_frozen (bool): also optimize parameters that are frozen now (see
            ``build_param_groups`` and ``FreezeSchedule``).

    Returns:
        torch.optim.AdamW: the optimizer; each group keeps its ``name``.

    Raises:
        ValueError: for invalid groups (see ``build_param_groups``), or when no parameter is
            left to optimize (all frozen and ``include_frozen`` is False).
    """
    groups = build_param_groups(
        model, lr=lr, new_lr=new_lr, weight_decay=weight_decay, new_param_names=new_param_names,
        no_decay_names=no_decay_names, include_frozen=include_frozen,
    )
    if not groups:
        raise ValueError(
            "the model has no trainable parameters to optimize; unfreeze some, or pass "
            "include_frozen=True to optimize parameters that a FreezeSchedule will unfreeze"
        )
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


class FreezeSchedule:
    """Freezes parameters (usually the pretrained ones) until a given training step.

    Freezing sets ``requires_grad=False``, so the parameters get no gradient, and AdamW skips
    parameters whose ``.grad`` is None (no update, no weight decay, no moments). Build the
    optimizer once with ``include_frozen=True`` so it already holds them: when they are unfrozen,
    their AdamW state starts fresh at that step (its own bias correction), and nothing is rebuilt.
    Keep ``zero_grad(set_to_none=True)`` (the default) so frozen parameters keep ``grad=None``.

    Parameters are looked up by name at every change, so the schedule also works after
    ``fully_shard`` (FSDP2 copies ``requires_grad`` from the sharded parameter at each unshard)
    and ``torch.compile`` (which recompiles once when ``requires_grad`` changes). DDP, by
    contrast, fixes the set of parameters it reduces when it is built: do not combine it with
    a schedule that unfreezes later.

    Step convention: call ``step(step)`` before the forward pass of optimizer step ``step``
    (0-based). With ``unfreeze_at_step=N``, optimizer steps 0 .. N-1 leave the frozen
    parameters unchanged and step N is the first to update them.

    Args:
        model (nn.Module): the model.
        frozen_names (Iterable[str]): names, as in ``model.named_parameters()``, to freeze.
        unfreeze_at_step (Optional[int]): first step that trains them; None keeps them frozen.

    Raises:
        ValueError: if a name is not a parameter of the model or ``unfreeze_at_step`` < 0.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        frozen_names: Iterable[str],
        unfreeze_at_step: Optional[int] = None,
    ) -> None:
        if unfreeze_at_step is not None and unfreeze_at_step < 0:
            raise ValueError(f"unfreeze_at_step must be >= 0 or None; got {unfreeze_at_step}")
        self.model = model
        known = _named_parameters(model)
        self.frozen_names: Sequence[str] = _check_names(frozen_names, known, "frozen_names")
        self.unfreeze_at_step = unfreeze_at_step
        self._frozen = False
        self._set_requires_grad(False)

    @property
    def is_frozen(self) -> bool:
        """True while the named parameters are frozen."""
        return self._frozen

    def step(self, step: int) -> bool:
        """Unfreezes the parameters once ``step`` reaches ``unfreeze_at_step``.

        Args:
            step (int): the optimizer step about to run (0-based).

        Returns:
            bool: True if this call unfroze them.
        """
        if self._frozen and self.unfreeze_at_step is not None and step >= self.unfreeze_at_step:
            self._set_requires_grad(True)
            return True
        return False

    def state_dict(self) -> dict:
        """The names, the unfreeze step and whether the parameters are frozen now."""
        return {
            "frozen_names": list(self.frozen_names),
            "unfreeze_at_step": self.unfreeze_at_step,
            "is_frozen": self._frozen,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores the frozen state saved by ``state_dict`` (keeps this schedule's names and step).

        Raises:
            ValueError: if the saved names differ from this schedule's.
        """
        if list(state["frozen_names"]) != list(self.frozen_names):
            raise ValueError(
                "FreezeSchedule state was saved for other frozen_names "
                f"({len(state['frozen_names'])} names vs {len(self.frozen_names)} here); "
                "build the schedule with the same names as the run that saved it"
            )
        self._set_requires_grad(not state["is_frozen"])

    def _set_requires_grad(self, requires_grad: bool) -> None:
        params = _named_parameters(self.model)
        for name in self.frozen_names:
            params[name].requires_grad_(requires_grad)
        self._frozen = not requires_grad
