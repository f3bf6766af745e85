"""Group-relative advantages, with every number worked out by hand."""

import math

import pytest
import torch

from grpokit.algos import ADVANTAGE_ESTIMATORS, group_advantages, groups_with_signal

NAN = float("nan")


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_group_scaling_with_nan_and_equal_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,  # mean 0.5, Bessel var (4 * 0.25) / 3, std 0.57735
                            2.0, 2.0, 2.0, 2.0,  # all equal: no signal -> 0
                            1.0, NAN, 0.0, 0.5])  # valid 1, 0, .5: mean .5, var (.25+.25+0)/2, std .5
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # 0.86588
    b = 0.5 / (0.5 + 1e-4)  # 0.99980
    close(group_advantages(rewards, 4), [a, -a, -a, a, 0, 0, 0, 0, b, 0, -b, 0])
    assert group_advantages(rewards, 4)[0].item() == pytest.approx(0.86588, abs=1e-5)


def test_bool_scale_rewards_are_trl_aliases():
    rewards = torch.tensor([3.0, 1.0, 0.0, NAN, 2.0, 5.0])
    torch.testing.assert_close(group_advantages(rewards, 3, True), group_advantages(rewards, 3, "group"))
    torch.testing.assert_close(group_advantages(rewards, 3, False), group_advantages(rewards, 3, "none"))


def test_none_is_mean_only_dr_grpo():
    rewards = torch.tensor([0.0, 2.0, NAN,  # valid 0, 2: mean 1 -> -1, +1, NaN -> 0
                            1.0, 1.0, 4.0,  # mean 2 -> -1, -1, +2
                            7.0, 7.0, 7.0])  # equal -> 0
    close(group_advantages(rewards, 3, "none"), [-1, 1, 0, -1, -1, 2, 0, 0, 0])


def test_batch_scaling_uses_group_mean_and_batch_std():
    rewards = torch.tensor([0.0, 2.0, NAN, 1.0, 1.0, 4.0])
    # Valid rewards 0, 2, 1, 1, 4: mean 1.6, squared deviations 2.56 .16 .36 .36 5.76 = 9.2,
    # Bessel var 9.2 / 4 = 2.3, std 1.516575. Group means 1 and 2.
    s = math.sqrt(2.3) + 1e-4
    close(group_advantages(rewards, 3, "batch"), [-1 / s, 1 / s, 0, -1 / s, -1 / s, 2 / s])
    # An all-equal group stays 0 even though the batch std is not 0.
    with_equal = torch.tensor([0.0, 2.0, 5.0, 5.0])  # batch std > 0; group 2 equal
    assert group_advantages(with_equal, 2, "batch")[2:].tolist() == [0.0, 0.0]


def test_rloo_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,  # r=1: others (0+0+1)/3 -> 1 - 1/3 = 2/3; r=0: 0 - 2/3
                            1.0, NAN, 0.0, 0.5])  # valid 1, 0, .5: 1 - .25 = .75, 0 - .75, .5 - .5 = 0
    close(group_advantages(rewards, 4, "none", estimator="rloo"),
          [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.75, 0, -0.75, 0])
    # With "group" scaling the same centred values are divided by the group's std + 1e-4.
    s1, s2 = math.sqrt(1 / 3) + 1e-4, 0.5 + 1e-4
    close(group_advantages(rewards, 4, "group", estimator="rloo"),
          [2 / 3 / s1, -2 / 3 / s1, -2 / 3 / s1, 2 / 3 / s1, 0.75 / s2, 0, -0.75 / s2, 0])


def test_rloo_equals_scaled_grpo_loop():
    # Leave-one-out baseline == n/(n-1) * (r - mean): check against a plain Python loop.
    torch.manual_seed(0)
    rewards = torch.randn(12)
    rewards[[2, 7]] = NAN
    got = group_advantages(rewards, 4, "none", estimator="rloo")
    for g in range(3):
        group = rewards[4 * g: 4 * g + 4].tolist()
        valid = [r for r in group if not math.isnan(r)]
        for j, r in enumerate(group):
            expected = 0.0 if math.isnan(r) else r - (sum(valid) - r) / (len(valid) - 1)
            assert got[4 * g + j].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("estimator", sorted(ADVANTAGE_ESTIMATORS))
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_degenerate_groups_give_exact_zero(estimator, scale):
    rewards = torch.tensor([0.1] * 7 + [NAN, 3.0, NAN, NAN, NAN, NAN, NAN] + [NAN] * 7 + [0.0, 1.0] + [NAN] * 5)
    adv = group_advantages(rewards, 7, scale, estimator)
    # Group 1: seven equal 0.1 (no round-off leaks through /1e-4); group 2: one valid reward;
    # group 3: none valid. All exactly 0. Group 4 (0 and 1) has signal.
    assert adv[:21].tolist() == [0.0] * 21
    assert adv[21].item() < 0 < adv[22].item()
    assert adv[23:].tolist() == [0.0] * 5


def test_groups_are_independent_and_contiguous():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 5.0])
    swapped = torch.tensor([10.0, 0.0, 5.0, 1.0, 2.0, 3.0])
    a, b = group_advantages(rewards, 3), group_advantages(swapped, 3)
    torch.testing.assert_close(a[:3], b[3:])
    torch.testing.assert_close(a[3:], b[:3])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.zeros(4), 2, estimator="ppo")
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="global")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


def test_frac_reward_zero_std_counts_the_groups_the_advantages_ignore():
    """One definition of a group without signal: fewer than 2 valid rewards, or all valid ones
    equal. [1, None, None, None] has one valid reward and [1, 1, None, None] two equal ones: both
    get advantage 0, so both count in frac_reward_zero_std (a None read as 0 would count neither)."""

    rewards = torch.tensor([1.0, NAN, NAN, NAN,
                            1.0, 1.0, NAN, NAN])
    assert not group_advantages(rewards, 4).any()
    assert groups_with_signal(rewards, 4).tolist() == [False, False]
    # ... and a group of two differing valid rewards has signal, as its advantages say
    rewards = torch.tensor([1.0, NAN, 0.0, NAN, 3.0, 3.0, 3.0, 3.0])
    assert groups_with_signal(rewards, 4).tolist() == [True, False]
    assert group_advantages(rewards, 4).view(2, 4).ne(0).any(1).tolist() == [True, False]


def test_groups_with_signal_agrees_with_the_advantages_on_random_rewards():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        rewards = torch.randint(0, 3, (24,), generator=g).float()
        rewards[torch.rand(24, generator=g) < 0.4] = NAN
        for estimator in ADVANTAGE_ESTIMATORS:
            nonzero = group_advantages(rewards, 6, estimator=estimator).view(4, 6).ne(0).any(1)
            assert torch.equal(nonzero, groups_with_signal(rewards, 6))



def test_rank_advantages_worked_by_hand():
    """scale_rewards="rank": each valid reward is replaced by its rank within the group (1 = lowest,
    ties share their mean rank), centred, and divided by (n - 1) / 2, so a group of n distinct
    rewards spans [-1, 1] evenly whatever the reward gaps.
    [0.1, 0.5, 0.5, 2.0]: ranks 1, 2.5, 2.5, 4; mean 2.5; / 1.5 -> -1, 0, 0, +1.
    [1, None, 3, 2]: valid ranks 1, 3, 2 (n = 3); mean 2; / 1 -> -1, 0 (None), +1, 0.
    [7, 7, 7, 7]: no signal -> 0."""
    rewards = torch.tensor([0.1, 0.5, 0.5, 2.0,
                            1.0, NAN, 3.0, 2.0,
                            7.0, 7.0, 7.0, 7.0])
    close(group_advantages(rewards, 4, "rank"), [-1, 0, 0, 1, -1, 0, 1, 0, 0, 0, 0, 0])


def test_rank_advantages_ignore_the_size_of_reward_gaps():
    """A reward model's tiny score gaps (the 'illusory advantages' of std normalisation) and any
    monotone transform of the rewards give the same rank advantages."""
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(32, generator=g, dtype=torch.float64)
    rewards[torch.rand(32, generator=g) < 0.2] = NAN
    base = group_advantages(rewards, 8, "rank")
    torch.testing.assert_close(group_advantages(torch.exp(5 * rewards) * 1e-6, 8, "rank"), base)
    torch.testing.assert_close(group_advantages(rewards * 1e-5 + 3.0, 8, "rank"), base)
    # centred within each group, and the best valid completion of a group gets +1
    per_group = base.view(4, 8)
    assert torch.allclose(per_group.sum(1), torch.zeros(4, dtype=base.dtype), atol=1e-6)
    for k in range(4):
        row = rewards.view(4, 8)[k]
        if (~torch.isnan(row)).sum() >= 2:
            assert per_group[k, torch.nan_to_num(row, nan=-1.0).argmax()] == pytest.approx(1.0)
