"""Optimizer groups, freezing, the cosine schedule and the token-normalized LM loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from supra.convert import new_parameter_names
from supra.models import supra_test_tiny
from supra.training.loss import LossParts, lm_loss, normalize
from supra.training.optim import FreezeSchedule, build_optimizer, build_param_groups
from supra.training.schedule import cosine_with_warmup


def _model(**overrides):
    torch.manual_seed(0)
    return supra_test_tiny(**overrides)


def _names_by_group(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}


# ---------------------------------------------------------------- parameter groups


def test_groups_split_pretrained_new_and_decay():
    model = _model()
    new = new_parameter_names(model)
    groups = build_param_groups(model, lr=3e-5, new_lr=1e-3, weight_decay=0.1, new_param_names=new)
    by_name = _names_by_group(model, groups)

    assert [g["name"] for g in groups] == ["pretrained", "pretrained_no_decay", "new", "new_no_decay"]
    listed = [n for names in by_name.values() for n in names]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert set(by_name["new"]) | set(by_name["new_no_decay"]) == set(new)
    params = dict(model.named_parameters())
    for group in groups:
        decayed = not group["name"].endswith("no_decay")
        assert group["weight_decay"] == (0.1 if decayed else 0.0)
        assert group["lr"] == group["initial_lr"] == (1e-3 if group["name"].startswith("new") else 3e-5)
        for name in by_name[group["name"]]:
            assert (params[name].ndim >= 2) == decayed, name
    # Embeddings are 2-D and decayed unless named.
    assert "tok_embeddings.weight" in by_name["pretrained"]
    assert "layers.0.sa_norm.scale" in by_name["pretrained_no_decay"]
    assert "layers.0.attn.feature_map.proj.bias" in by_name["new_no_decay"]


def test_groups_no_decay_names_new_lr_default_and_empty_groups_dropped():
    model = _model()
    groups = build_param_groups(model, lr=1e-4, no_decay_names=["tok_embeddings.weight"])
    by_name = _names_by_group(model, groups)
    assert [g["name"] for g in groups] == ["pretrained", "pretrained_no_decay"]
    assert "tok_embeddings.weight" in by_name["pretrained_no_decay"]

    groups = build_param_groups(model, lr=1e-4, new_param_names=new_parameter_names(model))
    assert {g["lr"] for g in groups} == {1e-4}


def test_groups_list_a_tied_weight_once():
    model = _model(tie_word_embeddings=True)
    groups = build_param_groups(model, lr=1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_groups_skip_frozen_unless_included():
    model = _model()
    model.tok_embeddings.weight.requires_grad_(False)
    names = lambda gs: {n for ns in _names_by_group(model, gs).values() for n in ns}  # noqa: E731
    assert "tok_embeddings.weight" not in names(build_param_groups(model, lr=1e-3))
    assert "tok_embeddings.weight" in names(build_param_groups(model, lr=1e-3, include_frozen=True))


def test_names_match_through_compile_and_checkpoint_wrappers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _model()
    names = new_parameter_names(model)
    model.layers[0] = checkpoint_wrapper(model.layers[0])
    model.layers[1] = torch.compile(model.layers[1], backend="eager")
    assert any("_orig_mod" in n for n, _ in model.named_parameters())
    groups = build_param_groups(model, lr=1e-3, new_lr=1e-2, new_param_names=names)
    assert sum(len(g["params"]) for g in groups if g["name"].startswith("new")) == len(names)
    freeze = FreezeSchedule(model, frozen_names=["layers.1.mlp.w1.weight"])
    assert freeze.is_frozen and not model.layers[1]._orig_mod.mlp.w1.weight.requires_grad


def test_groups_validate_names_and_values():
    model = _model()
    with pytest.raises(ValueError, match="new_param_names.*layers.9.attn.nope"):
        build_param_groups(model, lr=1e-3, new_param_names=["layers.9.attn.nope"])
    with pytest.raises(ValueError, match="no_decay_names"):
        build_param_groups(model, lr=1e-3, no_decay_names=["embedding"])
    with pytest.raises(ValueError, match="new_lr must be >= 0"):
        build_param_groups(model, lr=1e-3, new_lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        build_param_groups(model, lr=1e-3, weight_decay=-0.1)


def test_build_optimizer_is_adamw_with_paper_betas():
    model = _model()
    opt = build_optimizer(model, lr=3e-5, new_lr=3e-4, new_param_names=new_parameter_names(model))
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 for g in opt.param_groups)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["new"] == 3e-4

    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters.*include_frozen"):
        build_optimizer(model, lr=1e-3)


# ---------------------------------------------------------------- freezing


def test_unfreezing_at_step_n_trains_pretrained_parameters_from_step_n_only():
    model = _model()
    new = set(new_parameter_names(model))
    pretrained = [n for n, _ in model.named_parameters() if n not in new]
    freeze = FreezeSchedule(model, frozen_names=pretrained, unfreeze_at_step=3)
    opt = build_optimizer(model, lr=1e-2, new_param_names=new, include_frozen=True)
    assert freeze.is_frozen
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))

    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = []
    for step in range(6):
        freeze.step(step)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        logits = model(tokens[:, :-1])
        lm_loss(logits, tokens[:, 1:]).total().backward()
        opt.step()
        opt.zero_grad()
        after = dict(model.named_parameters())
        changed.append({n for n in before if not torch.equal(before[n], after[n])})

    for step, names in enumerate(changed):
        assert new <= names, step
        if step < 3:
            assert names == new, f"step {step} changed frozen parameters {sorted(names - new)[:3]}"
        else:
            assert set(pretrained) <= names, step
    assert not freeze.is_frozen


def test_freeze_schedule_forever_state_dict_and_validation():
    model = _model()
    freeze = FreezeSchedule(model, frozen_names=["norm.scale"])
    assert not freeze.step(10**9) and freeze.is_frozen
    assert not model.norm.scale.requires_grad

    freeze = FreezeSchedule(model, frozen_names=["norm.scale"], unfreeze_at_step=2)
    assert freeze.step(5) and model.norm.scale.requires_grad
    state = freeze.state_dict()
    assert state == {"frozen_names": ["norm.scale"], "unfreeze_at_step": 2, "is_frozen": False}

    resumed = FreezeSchedule(_model(), frozen_names=["norm.scale"], unfreeze_at_step=2)
    assert resumed.is_frozen
    resumed.load_state_dict(state)
    assert not resumed.is_frozen and resumed.model.norm.scale.requires_grad
    with pytest.raises(ValueError, match="other frozen_names"):
        FreezeSchedule(_model(), frozen_names=["output.weight"]).load_state_dict(state)
    with pytest.raises(ValueError, match="frozen_names.*nope"):
        FreezeSchedule(model, frozen_names=["nope"])
    with pytest.raises(ValueError, match="unfreeze_at_step must be >= 0"):
        FreezeSchedule(model, frozen_names=["norm.scale"], unfreeze_at_step=-1)


# ---------------------------------------------------------------- schedule


def _two_group_optimizer(lrs=(3e-5, 3e-4)):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in lrs]
    return torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])


def _lrs_at(steps, lrs, **kwargs):
    opt = _two_group_optimizer(lrs)
    scheduler = cosine_with_warmup(opt, **kwargs)
    seen = {}
    # The parameters get no gradients: one optimizer step (a no-op) keeps the scheduler quiet.
    opt.step()
    for step in range(max(steps) + 1):
        if step in steps:
            seen[step] = [g["lr"] for g in opt.param_groups]
        scheduler.step()
    return seen


@pytest.mark.parametrize(
    "lrs, min_lr",
    [((3e-5,), 1e-5), ((3e-5, 3e-4), 1e-4)],
    ids=["paper_3e-5_to_1e-5", "new_params_at_10x_lr"],
)
def test_paper_schedule_exact_lrs(lrs, min_lr):
    warmup, max_steps = 1000, 11_000
    steps = [0, 499, 999, 1000, 6000, 11_000, 11_500]
    seen = _lrs_at(steps, lrs, warmup_steps=warmup, max_steps=max_steps, min_lr=min_lr)
    # min_lr is the floor of the largest group; every group keeps its ratio to it.
    ratio = min_lr / max(lrs)
    for i, peak in enumerate(lrs):
        expected = {
            0: peak * 1 / (warmup + 1),
            499: peak * 500 / (warmup + 1),
            999: peak * warmup / (warmup + 1),
            1000: peak,
            6000: peak * (ratio + (1 - ratio) * 0.5),  # cosine midpoint
            11_000: peak * ratio,
            11_500: peak * ratio,
        }
        for step in steps:
            assert seen[step][i] == pytest.approx(expected[step], rel=1e-12, abs=0), (step, i)
    assert seen[11_000][0] == pytest.approx(1e-5, rel=1e-12)
    assert seen[6000][0] == pytest.approx(2e-5, rel=1e-12)


def test_schedule_ratio_quarter_point_and_no_warmup():
    opt = _two_group_optimizer()
    scheduler = cosine_with_warmup(opt, warmup_steps=0, max_steps=100, min_lr_ratio=0.1)
    factor = scheduler.lr_lambdas[0]
    assert [g["lr"] for g in opt.param_groups] == [3e-5, 3e-4]
    assert factor(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert factor(100) == pytest.approx(0.1) and factor(10**6) == pytest.approx(0.1)
    assert cosine_with_warmup(_two_group_optimizer(), warmup_steps=5, max_steps=10).lr_lambdas[0](10) == 0.0


def test_run_shorter_than_warmup_stays_on_the_ramp():
    factor = cosine_with_warmup(_two_group_optimizer(), warmup_steps=10, max_steps=4).lr_lambdas[0]
    assert [factor(s) for s in range(4)] == pytest.approx([1 / 11, 2 / 11, 3 / 11, 4 / 11], rel=1e-12)


def test_schedule_state_dict_resumes_step():
    opt = _two_group_optimizer()
    scheduler = cosine_with_warmup(opt, warmup_steps=10, max_steps=50)
    for _ in range(17):
        opt.step()
        scheduler.step()
    opt2 = _two_group_optimizer()
    opt2.load_state_dict(opt.state_dict())
    resumed = cosine_with_warmup(opt2, warmup_steps=10, max_steps=50)
    resumed.load_state_dict(scheduler.state_dict())
    opt.step(), scheduler.step(), opt2.step(), resumed.step()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(warmup_steps=-1, max_steps=10), "warmup_steps must be >= 0"),
        (dict(warmup_steps=0, max_steps=10, min_lr_ratio=1.5), r"min_lr_ratio must lie in \[0, 1\]"),
        (dict(warmup_steps=0, max_steps=10, min_lr=1e-3), "cannot exceed the peak"),
        (dict(warmup_steps=0, max_steps=10, min_lr=1e-6, min_lr_ratio=0.1), "not both"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_with_warmup(_two_group_optimizer(), **kwargs)


# ---------------------------------------------------------------- loss


def _logits_labels(B=2, T=7, V=11, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels.view(-1)[::ignore_every] = -100
    return logits, labels


def test_cross_entropy_sum_matches_torch_with_ignore_index_and_gradients():
    logits, labels = _logits_labels()
    logits.requires_grad_(True)
    parts = lm_loss(logits, labels)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    assert parts.ce_sum.dtype == torch.float32
    torch.testing.assert_close(parts.ce_sum, ref)
    assert parts.num_tokens.item() == (labels != -100).sum().item()
    assert parts.z_sum.item() == 0.0

    (grad,) = torch.autograd.grad(parts.total(), logits)
    (ref_grad,) = torch.autograd.grad(ref / (labels != -100).sum(), logits)
    torch.testing.assert_close(grad, ref_grad)
    assert grad[labels == -100].abs().max() == 0


def test_z_loss_and_custom_ignore_index():
    logits, labels = _logits_labels(ignore_every=2)
    labels[labels == -100] = 5
    labels[0, 0] = 5
    parts = lm_loss(logits, labels, z_loss_weight=1e-4, ignore_index=5)
    keep = labels != 5
    log_z = torch.log(torch.exp(logits.double()).sum(-1))
    z_ref = (log_z[keep] ** 2).sum()
    ce_ref = (log_z - logits.double().gather(-1, labels[..., None])[..., 0])[keep].sum()
    torch.testing.assert_close(parts.z_sum.double(), z_ref)
    torch.testing.assert_close(parts.total().double(), (ce_ref + 1e-4 * z_ref) / keep.sum())


def test_bf16_logits_are_computed_in_float32():
    logits, labels = _logits_labels()
    parts = lm_loss(logits.bfloat16(), labels, z_loss_weight=1e-3)
    ref = lm_loss(logits.bfloat16().float(), labels, z_loss_weight=1e-3)
    assert parts.ce_sum.dtype == parts.z_sum.dtype == torch.float32
    torch.testing.assert_close(parts.total(), ref.total())


def test_summed_micro_batches_normalized_by_total_tokens_equal_the_concatenation():
    a_logits, a_labels = _logits_labels(B=2, T=5, seed=1, ignore_every=2)
    b_logits, b_labels = _logits_labels(B=3, T=5, seed=2, ignore_every=7)
    a = lm_loss(a_logits, a_labels, z_loss_weight=1e-2)
    b = lm_loss(b_logits, b_labels, z_loss_weight=1e-2)
    assert a.num_tokens != b.num_tokens
    whole = lm_loss(torch.cat([a_logits, b_logits]), torch.cat([a_labels, b_labels]), z_loss_weight=1e-2)
    total_tokens = a.num_tokens + b.num_tokens
    torch.testing.assert_close(normalize(a + b, total_tokens), whole.total())
    # Per-micro-batch normalization by the step total sums to the same loss (pattern 1).
    torch.testing.assert_close(normalize(a, total_tokens) + normalize(b, total_tokens), whole.total())
    # The mean of per-micro-batch means does not.
    assert not torch.allclose((a.total() + b.total()) / 2, whole.total())


def test_all_ignored_gives_zero_not_nan_and_validation():
    logits, labels = _logits_labels()
    parts = lm_loss(logits, torch.full_like(labels, -100))
    assert parts.total().item() == 0.0 and parts.num_tokens.item() == 0
    with pytest.raises(ValueError, match="logits must be"):
        lm_loss(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="z_loss_weight must be >= 0"):
        lm_loss(logits, labels, z_loss_weight=-1.0)
    with pytest.raises(ValueError, match="same weight"):
        lm_loss(logits, labels) + lm_loss(logits, labels, z_loss_weight=1e-4)
    assert isinstance(lm_loss(logits, labels).detach(), LossParts)
    torch.testing.assert_close(lm_loss(logits, labels.int()).total(), lm_loss(logits, labels).total())
