"""HDPO and baseline advantages against hand-computed groups."""

from __future__ import annotations

import math

import pytest
import torch

from metis_cli.algo.advantages import (
    EPS,
    advantage_stats,
    coupled_rewards,
    efficiency_group_share,
    gdpo_advantages,
    grpo_advantages,
    hdpo_advantages,
)

torch.set_num_threads(1)
NAN = float("nan")


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def ids(values):
    return torch.tensor(values, dtype=torch.long)


def close(actual, expected, tol=1e-5):
    assert actual.tolist() == pytest.approx(expected, abs=tol)


def rewards_for(correct, tool_calls, well_formed=None):
    """r_acc and r_tool as docs/algorithm.md defines them."""
    well_formed = well_formed or [1] * len(correct)
    r_acc = [0.9 * c + 0.1 * f for c, f in zip(correct, well_formed, strict=True)]
    r_tool = [1 / (n + 1) if c else 0.0 for c, n in zip(correct, tool_calls, strict=True)]
    return t(r_acc), t(r_tool)


def test_accuracy_channel_is_group_normalised_with_unbiased_std():
    r_acc, r_tool = rewards_for([1, 0, 1, 0], [0, 2, 1, 0], well_formed=[1, 1, 1, 0])
    a_acc, _ = hdpo_advantages(r_acc, r_tool, ids([7, 7, 7, 7]))
    # r_acc = [1, .1, 1, 0]; mean .525; unbiased std sqrt(.9075 / 3) = .55
    close(a_acc, [0.475 / 0.55, -0.425 / 0.55, 0.475 / 0.55, -0.525 / 0.55])


def test_efficiency_channel_off_when_no_rollout_is_correct():
    r_acc, r_tool = rewards_for([0, 0, 0], [0, 1, 2])
    a_acc, a_tool = hdpo_advantages(r_acc, r_tool, ids([0, 0, 0]))
    close(a_tool, [0, 0, 0])
    close(a_acc, [0, 0, 0])  # all equal: (r - mean) / (0 + eps) = 0


def test_efficiency_channel_off_when_only_one_rollout_is_correct():
    r_acc, r_tool = rewards_for([1, 0, 0, 0], [0, 0, 1, 3])
    a_acc, a_tool = hdpo_advantages(r_acc, r_tool, ids([0, 0, 0, 0]))
    close(a_tool, [0, 0, 0, 0])
    assert a_acc[0] > 0 and (a_acc[1:] < 0).all()


def test_efficiency_channel_with_two_correct_rewards_fewer_tool_calls():
    # correct with T=0 (r_tool 1) and T=1 (r_tool .5); mean .75, unbiased std sqrt(.125)
    r_acc, r_tool = rewards_for([1, 0, 1, 0], [0, 4, 1, 0])
    _, a_tool = hdpo_advantages(r_acc, r_tool, ids([3, 3, 3, 3]))
    std = math.sqrt(0.125)
    close(a_tool, [0.25 / std, 0, -0.25 / std, 0])


def test_efficiency_channel_when_the_whole_group_is_correct():
    r_acc, r_tool = rewards_for([1, 1, 1, 1], [0, 1, 3, 1])
    a_acc, a_tool = hdpo_advantages(r_acc, r_tool, ids([0, 0, 0, 0]))
    values = [1.0, 0.5, 0.25, 0.5]
    mean = sum(values) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    close(a_tool, [(v - mean) / (std + EPS) for v in values])
    close(a_acc, [0, 0, 0, 0])  # all correct and well formed: no accuracy signal


def test_same_tool_count_in_q_gives_zero_efficiency_advantage():
    r_acc, r_tool = rewards_for([1, 1, 1, 0], [2, 2, 2, 0])
    _, a_tool = hdpo_advantages(r_acc, r_tool, ids([0, 0, 0, 0]))
    close(a_tool, [0, 0, 0, 0])


def test_wrong_rollouts_never_get_efficiency_credit():
    r_acc, r_tool = rewards_for([1, 0, 1, 0, 1], [3, 0, 1, 0, 2])
    _, a_tool = hdpo_advantages(r_acc, r_tool, ids([0] * 5))
    assert a_tool[1] == 0 and a_tool[3] == 0
    assert a_tool[2] > 0 > a_tool[0]  # the correct rollout with fewer calls wins


def test_single_sample_group_uses_mean_zero_std_one():
    # docs/algorithm.md: a group of one gets mean 0, std 1, i.e. its advantage is its raw reward.
    r_acc, r_tool = rewards_for([1], [0])
    a_acc, a_tool = hdpo_advantages(r_acc, r_tool, ids([5]))
    close(a_acc, [1.0 / (1 + EPS)])
    close(a_tool, [0.0])  # |Q| = 1 < 2


def test_unscored_rollouts_are_excluded_and_get_zero():
    r_acc, r_tool = rewards_for([1, 0, 1, 0], [0, 0, 1, 0])
    scored = torch.tensor([True, True, True, False])
    a_acc, a_tool = hdpo_advantages(r_acc, r_tool, ids([0] * 4), scored=scored)
    # statistics over the three scored rollouts only
    expected_acc, expected_tool = hdpo_advantages(r_acc[:3], r_tool[:3], ids([0] * 3))
    close(a_acc, expected_acc.tolist() + [0.0])
    close(a_tool, expected_tool.tolist() + [0.0])


def test_nan_rewards_mean_unscored_when_no_mask_is_given():
    r_acc = t([1.0, NAN, 0.1, 1.0])
    r_tool = t([1.0, NAN, 0.0, 0.5])
    a_acc, a_tool = hdpo_advantages(r_acc, r_tool, ids([0] * 4))
    assert torch.isfinite(a_acc).all() and torch.isfinite(a_tool).all()
    assert a_acc[1] == 0 and a_tool[1] == 0
    expected_acc, _ = hdpo_advantages(t([1.0, 0.1, 1.0]), t([1.0, 0.0, 0.5]), ids([0] * 3))
    close(a_acc[[0, 2, 3]], expected_acc.tolist())


def test_unscored_rollout_cannot_complete_q():
    # two correct rollouts, but one is unscored: |Q| = 1, channel off
    r_acc, r_tool = rewards_for([1, 1, 0], [0, 1, 0])
    _, a_tool = hdpo_advantages(r_acc, r_tool, ids([0] * 3), scored=torch.tensor([1, 0, 1]).bool())
    close(a_tool, [0, 0, 0])


def test_interleaved_groups_match_groups_computed_separately():
    group_a = rewards_for([1, 0, 1, 1], [0, 1, 2, 1])
    group_b = rewards_for([0, 1, 0, 0], [1, 0, 0, 2])
    group_c = rewards_for([1], [1])
    order = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    groups = [group_a, group_b, group_c]
    r_acc = t([groups[g][0][i].item() for g, i in order])
    r_tool = t([groups[g][1][i].item() for g, i in order])
    group_ids = ids([[101, 55, 9][g] for g, _ in order])  # arbitrary, unsorted ids
    a_acc, a_tool = hdpo_advantages(r_acc, r_tool, group_ids)
    separate = [hdpo_advantages(acc, tool, ids([0] * len(acc))) for acc, tool in groups]
    for position, (g, i) in enumerate(order):
        assert a_acc[position].item() == pytest.approx(separate[g][0][i].item(), abs=1e-9)
        assert a_tool[position].item() == pytest.approx(separate[g][1][i].item(), abs=1e-9)


def test_float32_inputs_give_float32_advantages():
    a_acc, a_tool = hdpo_advantages(
        torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), ids([0, 0])
    )
    assert a_acc.dtype == torch.float32 and a_tool.dtype == torch.float32


def test_grpo_normalises_one_reward_per_group():
    a = grpo_advantages(t([1.0, 0.0, 3.0, 3.0]), ids([0, 0, 1, 1]))
    std = math.sqrt(0.5)
    close(a, [0.5 / std, -0.5 / std, 0, 0])


def test_coupled_penalty_and_bonus():
    r_acc, r_tool = t([1.0, 0.1]), t([0.5, 0.0])
    tool_calls = torch.tensor([1, 3])
    close(coupled_rewards(r_acc, tool_calls, r_tool, "penalty", 0.1), [0.9, -0.2])
    close(coupled_rewards(r_acc, tool_calls, r_tool, "bonus", 0.2), [1.1, 0.1])
    with pytest.raises(ValueError):
        coupled_rewards(r_acc, tool_calls, r_tool, "both", 0.1)


def test_coupled_penalty_small_lambda_is_drowned_by_accuracy():
    # The paper's point: one normalisation, a small penalty barely moves the ranking.
    r_acc, r_tool = rewards_for([1, 1, 0, 0], [0, 3, 0, 3])
    coupled = coupled_rewards(r_acc, t([0, 3, 0, 3]), r_tool, "penalty", 0.01)
    a = grpo_advantages(coupled, ids([0] * 4))
    assert a[0] - a[1] < 0.1 * (a[1] - a[2])


def test_gdpo_sums_separately_normalised_rewards():
    r_acc, r_tool = t([1.0, 0.0, 1.0]), t([1.0, 0.0, 0.5])
    group = ids([0, 0, 0])
    expected = grpo_advantages(r_acc, group) + grpo_advantages(r_tool, group)
    close(gdpo_advantages([r_acc, r_tool], group), expected.tolist())


def test_efficiency_group_share_counts_groups_with_two_correct():
    # group 0: two correct; group 1: one correct; group 2: none; group 3: three correct
    r_tool = t([1.0, 0.5, 0, 1.0, 0, 0, 0, 0, 0.5, 0.5, 1.0])
    group_ids = ids([0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 1])
    # group 1 has two correct too (positions 3 and 10)
    assert efficiency_group_share(r_tool, group_ids) == pytest.approx(3 / 4)
    scored = torch.ones(11, dtype=torch.bool)
    scored[10] = False
    assert efficiency_group_share(r_tool, group_ids, scored) == pytest.approx(2 / 4)


def test_advantage_stats():
    stats = advantage_stats(t([1.0, -1.0, 0.0, 0.0]))
    assert stats == pytest.approx({"mean": 0.0, "std": math.sqrt(0.5), "nonzero": 0.5})
    assert advantage_stats(t([])) == {"mean": 0.0, "std": 0.0, "nonzero": 0.0}
