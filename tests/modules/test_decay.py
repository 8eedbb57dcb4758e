"""Tests of the decay slopes against docs/method.md (decay slopes), each rule rewritten here from its text.

The expected values are computed in this file (plain Python floats, float64) without calling the
library: the ALiBi rule as the ALiBi paper's code states it, RetNet from gamma_h = 1 - 2^(-5-h).
"""

import math

import pytest
import torch

from supra.modules import FixedDecay, alibi_slopes, decay_slopes, no_decay_slopes, retnet_slopes

POWERS_OF_TWO = (1, 2, 4, 8, 16, 32, 64)


def alibi_rule(num_heads):
    """ALiBi's published rule: a geometric series from 2^(-8/n) with ratio 2^(-8/n) for a power of
    two n; otherwise the closest lower power of two, then every other slope of the doubled set."""

    def geometric(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return geometric(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return geometric(closest) + alibi_rule(2 * closest)[0::2][: num_heads - closest]


def assert_relative_close(actual, expected, rtol=1e-12):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape
    error = ((actual - expected).abs() / expected.abs()).max().item()
    assert error < rtol, f"relative error {error:.3e} >= {rtol:.0e}"


def test_alibi_32_heads_matches_the_paper():
    s = alibi_slopes(32)
    assert s.dtype == torch.float64 and s.shape == (32,)
    assert s[0].item() == pytest.approx(2.0**-0.25, rel=1e-15)
    assert s[0].item() == pytest.approx(0.8409, abs=1e-4)
    assert s[-1].item() == 2.0**-8
    # The paper's figure: the slowest head keeps gamma_max^2048 = e^-8 = 3.35e-4 of a token 2048 back.
    assert math.exp(-s.min().item() * 2048) == pytest.approx(math.exp(-8), rel=1e-12)
    assert round(math.exp(-8), 6) == 3.35e-4


@pytest.mark.parametrize("num_heads", POWERS_OF_TWO)
def test_alibi_power_of_two_general_formula(num_heads):
    expected = [2.0 ** (-8.0 * (i + 1) / num_heads) for i in range(num_heads)]
    s = alibi_slopes(num_heads)
    assert_relative_close(s, expected)
    assert bool((s > 0).all()) and bool((s[1:] < s[:-1]).all())


@pytest.mark.parametrize("num_heads", (3, 5, 6, 12, 20, 40, 48))
def test_alibi_non_power_of_two_follows_the_alibi_rule(num_heads):
    assert_relative_close(alibi_slopes(num_heads), alibi_rule(num_heads))


def test_alibi_12_heads_spelled_out():
    # 8 heads' slopes 2^-1 .. 2^-8, then every other one of 16 heads' slopes: 2^-0.5, 2^-1.5, ...
    expected = [2.0**-k for k in range(1, 9)] + [2.0 ** -(k + 0.5) for k in range(4)]
    assert_relative_close(alibi_slopes(12), expected)


def test_alibi_40_heads_works():
    s = alibi_slopes(40)
    assert s.shape == (40,) and s.dtype == torch.float64
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all()) and bool((s < 1).all())
    # Each part of the ALiBi rule is decreasing; the extra 8 slopes fall between the first 32
    # (the rule interleaves them, so the whole list is not sorted), and no two heads share one.
    assert bool((s[1:32] < s[:31]).all()) and bool((s[33:] < s[32:39]).all())
    assert torch.unique(s).numel() == 40
    assert s.max().item() < 1 and s.min().item() == 2.0**-8


@pytest.mark.parametrize("num_heads", (4, 8, 32))
@pytest.mark.parametrize("start", (0.5, 1.0, 2.0**-3))
def test_decay_start_replaces_first_slope_and_keeps_ratio(num_heads, start):
    s = alibi_slopes(num_heads, start=start)
    assert s[0].item() == pytest.approx(start, rel=1e-15)
    expected = [start * 2.0 ** (-8.0 * i / num_heads) for i in range(num_heads)]
    assert_relative_close(s, expected)
    assert_relative_close(s[1:] / s[:-1], [2.0 ** (-8.0 / num_heads)] * (num_heads - 1))


def test_retnet_gammas_recovered_in_float64():
    num_heads = 64
    s = retnet_slopes(num_heads)
    assert s.dtype == torch.float64 and s.shape == (num_heads,)
    # 1 - exp(-s) evaluated as -expm1(-s): written as 1 - exp(-s) in float64 it would itself
    # lose all precision once 2^(-5-h) nears float64's epsilon.
    one_minus_gamma = [-math.expm1(-x) for x in s.tolist()]
    assert_relative_close(one_minus_gamma, [2.0 ** (-5 - h) for h in range(num_heads)])
    assert bool((s[1:] < s[:-1]).all())


def test_retnet_heads_past_20_still_decay():
    # The reference's defect: in float32, gamma = 1 - 2^(-5-h) rounds to exactly 1 for h >= 20.
    gammas32 = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(32)], dtype=torch.float32)
    assert bool((gammas32[20:] == 1).all()) and bool((gammas32[:20] < 1).all())
    s = retnet_slopes(32)
    assert bool((s[20:] > 0).all())
    # Also after the float32 cast FixedDecay applies (slopes, unlike gammas, stay representable).
    assert bool((FixedDecay(s)()[20:] > 0).all())
    assert FixedDecay(s)()[-1].item() == pytest.approx(2.0**-36, rel=1e-6)


def test_no_decay_is_zeros():
    s = no_decay_slopes(7)
    assert s.dtype == torch.float64
    assert torch.equal(s, torch.zeros(7, dtype=torch.float64))


def test_decay_slopes_dispatch():
    assert torch.equal(decay_slopes("alibi", 12), alibi_slopes(12))
    assert torch.equal(decay_slopes("alibi", 8, start=0.25), alibi_slopes(8, start=0.25))
    assert torch.equal(decay_slopes("retnet", 12), retnet_slopes(12))
    assert torch.equal(decay_slopes("none", 12), no_decay_slopes(12))


def test_decay_slopes_unknown_rule():
    with pytest.raises(ValueError, match="lightning"):
        decay_slopes("lightning", 8)


@pytest.mark.parametrize("rule", ("retnet", "none"))
def test_decay_start_only_with_alibi(rule):
    with pytest.raises(ValueError, match="start"):
        decay_slopes(rule, 8, start=0.5)


@pytest.mark.parametrize("fn", (alibi_slopes, retnet_slopes, no_decay_slopes))
@pytest.mark.parametrize("num_heads", (0, -3))
def test_num_heads_below_one(fn, num_heads):
    with pytest.raises(ValueError, match="num_heads"):
        fn(num_heads)


@pytest.mark.parametrize("start", (0.0, -0.5, float("nan")))
def test_start_must_be_positive(start):
    with pytest.raises(ValueError, match="start"):
        alibi_slopes(8, start=start)


def test_fixed_decay_holds_float32_slopes():
    slopes = alibi_slopes(8)
    decay = FixedDecay(slopes)
    assert decay.num_heads == 8
    out = decay()
    assert out.dtype == torch.float32
    assert torch.equal(out, slopes.float())
    assert not list(decay.parameters())
    assert "num_heads=8" in repr(decay)


def test_fixed_decay_accepts_zero_slopes():
    assert torch.equal(FixedDecay(no_decay_slopes(3))(), torch.zeros(3))


@pytest.mark.parametrize(
    "slopes",
    (
        torch.tensor([0.5, -0.1]),
        torch.tensor([0.5, float("inf")]),
        torch.tensor([float("nan"), 0.5]),
        torch.ones(2, 2),
        torch.tensor(0.5),
    ),
    ids=("negative", "inf", "nan", "2-D", "0-D"),
)
def test_fixed_decay_rejects_bad_slopes(slopes):
    with pytest.raises(ValueError, match="1-D tensor of finite values >= 0"):
        FixedDecay(slopes)


def test_fixed_decay_is_not_saved():
    decay = FixedDecay(alibi_slopes(4))
    assert "slopes" in dict(decay.named_buffers())
    assert decay.state_dict() == {}
    wrapper = torch.nn.Module()
    wrapper.decay = decay
    assert "decay.slopes" not in wrapper.state_dict()
    # Loading a checkpoint (which has no slopes) strictly must work.
    wrapper.load_state_dict({}, strict=True)


def test_fixed_decay_rejects_meta_slopes():
    with pytest.raises(ValueError, match="not meta tensors"):
        FixedDecay(torch.zeros(4, device="meta"))


def test_meta_built_model_restores_its_slopes_after_to_empty():
    from supra.models import supra_test_tiny

    with torch.device("meta"):
        model = supra_test_tiny(num_heads=8, num_kv_heads=8, embed_dim=64, decay="retnet")
    model.to_empty(device="cpu")
    decays = [m for m in model.modules() if isinstance(m, FixedDecay)]
    for decay in decays:
        decay.slopes.fill_(float("nan"))
        decay.reset_buffers()
    expected = torch.tensor([-math.log1p(-(2.0 ** (-5 - h))) for h in range(8)], dtype=torch.float64)
    assert len(decays) == 2
    for decay in decays:
        torch.testing.assert_close(decay.slopes, expected.float())
