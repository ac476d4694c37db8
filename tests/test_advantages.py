"""group_advantages: hand-computed cases, properties, and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_core.advantages import (
    DynamicSampling,
    group_advantages,
    group_reward_std,
    informative_groups,
)

pytestmark = pytest.mark.numerics   # also run under other CPUs' kernel paths (make test-numerics)


def test_group_scale_by_hand():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(((.5²)·4)/3) = sqrt(1/3)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0])
    a = group_advantages(r, 4, scale="group", eps=0.0)
    s1 = math.sqrt(1 / 3)
    s2 = math.sqrt((9 + 1 + 1 + 9) / 3)  # group [2,4,6,8]: mean 5
    want = torch.tensor([0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, -3 / s2, -1 / s2, 1 / s2, 3 / s2])
    torch.testing.assert_close(a, want)


def test_eps_is_added_to_std():
    r = torch.tensor([0.0, 1.0])
    a = group_advantages(r, 2, scale="group", eps=0.5)
    s = math.sqrt(0.5)  # unbiased std of [0, 1]
    torch.testing.assert_close(a, torch.tensor([-0.5 / (s + 0.5), 0.5 / (s + 0.5)]))


def test_batch_scale_by_hand():
    r = torch.tensor([0.0, 2.0, 4.0, 4.0])
    a = group_advantages(r, 2, scale="batch", eps=0.0)
    mean = 2.5
    std = math.sqrt(((2.5**2) + 0.25 + 2.25 + 2.25) / 3)
    del mean
    torch.testing.assert_close(a, torch.tensor([-1 / std, 1 / std, 0.0, 0.0]))


def test_none_scale_is_dr_grpo():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    a = group_advantages(r, 4, scale="none")
    torch.testing.assert_close(a, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_identical_rewards_give_zero_not_nan():
    r = torch.tensor([0.7] * 8)
    for scale in ("group", "batch", "none"):
        a = group_advantages(r, 4, scale=scale)
        assert torch.equal(a, torch.zeros(8)), scale


def test_group_size_one_gives_zero():
    a = group_advantages(torch.tensor([1.0, 3.0]), 1)
    assert torch.equal(a, torch.zeros(2))


@pytest.mark.parametrize(
    "rewards,g,match",
    [
        (torch.ones(5), 2, "multiple of group_size"),
        (torch.tensor([1.0, float("nan")]), 2, "NaN"),
        (torch.tensor([1.0, float("inf")]), 2, "NaN/inf"),
        (torch.ones(2, 2), 2, "1-D"),
        (torch.ones(4), 0, "positive int"),
    ],
)
def test_bad_input(rewards, g, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, g)


def test_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(4), 2, scale="std")


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 8),
    st.sampled_from(["group", "batch", "none"]),
    st.data(),
)
def test_groups_sum_to_zero(b, g, scale, data):
    vals = data.draw(st.lists(st.floats(-100, 100), min_size=b * g, max_size=b * g))
    a = group_advantages(torch.tensor(vals, dtype=torch.float64).float(), g, scale=scale)
    assert torch.isfinite(a).all()
    sums = a.view(b, g).sum(1)
    # centred within each group: sums vanish up to fp32 rounding of values scaled by ≤ 1/eps
    tol = 1e-3 * (1 + a.abs().max().item())
    assert sums.abs().max().item() <= tol


def test_group_reward_std():
    std = group_reward_std(torch.tensor([1.0, 1.0, 0.0, 2.0]), 2)
    torch.testing.assert_close(std, torch.tensor([0.0, math.sqrt(2.0)]))


def test_equal_rewards_exactly_zero_where_fp32_mean_is_inexact():
    # 33 × 0.7 in fp32: the fp32 mean is an ulp off 0.7, and /eps would turn that into ~6e-4
    r = torch.full((33,), 0.7)
    assert torch.equal(group_advantages(r, 33), torch.zeros(33))
    mixed = torch.cat([torch.full((33,), 0.7), torch.arange(33.0)])
    a = group_advantages(mixed, 33)
    assert torch.equal(a[:33], torch.zeros(33)) and a[33:].abs().max() > 1


# ---- RLOO baseline ------------------------------------------------------------------------------

def test_leave_one_out_by_hand():
    # group [1, 0, 0, 1]: b_0 = (0 + 0 + 1)/3 = 1/3 → A_0 = 2/3; b_1 = 2/3 → A_1 = −2/3
    # group [2, 4, 6, 8]: b_0 = 18/3 = 6 → −4; b_1 = 16/3 → −4/3; b_2 = 14/3 → 4/3; b_3 = 4 → 4
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0])
    a = group_advantages(r, 4, scale="none", baseline="leave_one_out")
    torch.testing.assert_close(a, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, -4.0, -4 / 3, 4 / 3, 4.0]))
    # with std scaling: the same numerators over the group std (+ eps), as for the mean baseline
    s1, s2 = math.sqrt(1 / 3), math.sqrt(20 / 3)
    a = group_advantages(r, 4, scale="group", eps=0.0, baseline="leave_one_out")
    torch.testing.assert_close(a, torch.tensor([2 / 3 / s1, -2 / 3 / s1, -2 / 3 / s1, 2 / 3 / s1,
                                                -4 / s2, -4 / 3 / s2, 4 / 3 / s2, 4 / s2]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(2, 8), st.sampled_from(["group", "batch", "none"]), st.data())
def test_leave_one_out_is_mean_baseline_times_g_over_g_minus_1(b, g, scale, data):
    vals = data.draw(st.lists(st.floats(-100, 100), min_size=b * g, max_size=b * g))
    r = torch.tensor(vals, dtype=torch.float64)
    loo = group_advantages(r, g, scale=scale, baseline="leave_one_out", eps=1e-4).double()
    mean = group_advantages(r, g, scale=scale, baseline="mean", eps=1e-4).double()
    # r_i − (S − r_i)/(G − 1) = G/(G − 1)·(r_i − S/G); both stored in fp32 once
    torch.testing.assert_close(loo, mean * g / (g - 1), rtol=4 * 2 ** -23,
                               atol=1e-30 + 4 * 2 ** -23 * float(loo.abs().max()))


def test_leave_one_out_equal_rewards_exactly_zero_and_bad_input():
    r = torch.full((33,), 0.7)
    assert torch.equal(group_advantages(r, 33, baseline="leave_one_out"), torch.zeros(33))
    with pytest.raises(ValueError, match="baseline must be one of"):
        group_advantages(torch.ones(4), 2, baseline="loo")
    with pytest.raises(ValueError, match="needs group_size >= 2"):
        group_advantages(torch.ones(4), 1, baseline="leave_one_out")


# ---- DAPO dynamic sampling ----------------------------------------------------------------------

def test_informative_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    assert informative_groups(r, 2).tolist() == [False, True, False, False]
    assert informative_groups(torch.full((33,), 0.7), 33).tolist() == [False]


def test_dynamic_sampling_refills_then_stops():
    # B = 3 groups of G = 2 wanted; round 1 has 1 informative group, round 2 has 3 (only 2 are needed)
    ds = DynamicSampling(3, 2, max_rounds=4)
    assert ds.wants_more() and ds.prompts_per_round == 3
    assert ds.add(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])) == [1]
    assert ds.add(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.5])) == [0, 1]
    assert not ds.wants_more()
    assert ds.metrics() == {"dynamic_sampling/prompts_drawn": 6, "dynamic_sampling/rounds": 2,
                            "dynamic_sampling/groups_kept": 3, "dynamic_sampling/short": 0}
    with pytest.raises(ValueError, match="already full"):
        ds.add(torch.tensor([0.0, 1.0] * 3))
    # all-equal batches: gives up after max_rounds and says how many groups are missing
    ds = DynamicSampling(2, 2, max_rounds=2)
    while ds.wants_more():
        assert ds.add(torch.ones(4)) == []
    assert ds.metrics()["dynamic_sampling/short"] == 2 and ds.metrics()["dynamic_sampling/prompts_drawn"] == 4
