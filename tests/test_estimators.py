"""The estimator registry and the keep rule (algo/estimators.py), on hand-made ScoredBatches."""

from __future__ import annotations

import typing

import pytest
import torch

from metis_cli.algo import advantages as adv
from metis_cli.algo.estimators import ESTIMATORS, estimate, keep_mask
from metis_cli.algo.types import Advantages, ScoredBatch
from metis_cli.recipe.schema import HdpoConfig


def batch(r_acc, r_tool, groups, scored=None, calls=None) -> ScoredBatch:
    n = len(r_acc)
    scored = torch.tensor(scored if scored is not None else [True] * n)
    return ScoredBatch(torch.tensor(r_acc), torch.tensor(r_tool), scored, torch.tensor(groups),
                       torch.tensor(calls if calls is not None else [0.0] * n), scored.clone())


# Two groups of three: group 0 all right with 0, 1 and 3 calls (A_acc = 0, A_tool != 0), group 1 mixed.
MIXED = dict(r_acc=[1.0, 1.0, 1.0, 1.0, 0.1, 0.0], r_tool=[1.0, 0.5, 0.25, 1.0, 0.0, 0.0],
             groups=[0, 0, 0, 1, 1, 1], calls=[0.0, 1.0, 3.0, 0.0, 0.0, 2.0])


def test_registry_names_are_the_recipe_choices():
    """Adding an estimator is one registry entry plus its name in `hdpo.estimator`."""
    choices = typing.get_args(HdpoConfig.model_fields["estimator"].annotation)
    assert set(ESTIMATORS) == set(choices)


def test_each_estimator_is_its_advantage_function():
    b = batch(**MIXED)
    cfg = HdpoConfig(coupled={"mode": "penalty", "coef": 0.1})
    a_acc, a_tool = adv.hdpo_advantages(b.r_acc, b.r_tool, b.group_ids)
    hdpo = estimate("hdpo", b, cfg)
    assert torch.equal(hdpo.acc, a_acc) and torch.equal(hdpo.tool, a_tool)
    assert estimate("grpo", b, cfg).tool is None
    assert torch.equal(estimate("grpo", b, cfg).acc, adv.grpo_advantages(b.r_acc, b.group_ids))
    penalised = b.r_acc - 0.1 * b.tool_calls
    assert torch.equal(estimate("coupled", b, cfg).acc, adv.grpo_advantages(penalised, b.group_ids))
    assert torch.equal(estimate("gdpo", b, cfg).acc, adv.gdpo_advantages([b.r_acc, b.r_tool], b.group_ids))


def test_keep_is_every_scored_rollout_by_default():
    b = batch(**MIXED, scored=[True, True, False, True, True, True])
    keep = keep_mask(b, estimate("hdpo", b, HdpoConfig()), drop_no_signal_groups=False)
    assert keep.tolist() == [True, True, False, True, True, True]


def test_drop_no_signal_keeps_a_group_with_only_efficiency_signal():
    b = batch(**MIXED)
    advantages = estimate("hdpo", b, HdpoConfig())
    assert not bool(advantages.acc[:3].any()) and bool(advantages.tool[:3].any())  # the case in point
    assert keep_mask(b, advantages, drop_no_signal_groups=True).tolist() == [True] * 6
    # grpo sees only the accuracy channel: group 0 has no signal there and is dropped.
    grpo = estimate("grpo", b, HdpoConfig())
    assert keep_mask(b, grpo, drop_no_signal_groups=True).tolist() == [False] * 3 + [True] * 3


def test_drop_no_signal_drops_groups_with_zero_advantages_in_both_channels():
    # group 7: every rollout wrong alike; group 3: right and wrong; unscored rollouts are never kept
    b = batch(r_acc=[0.1, 0.1, 1.0, 0.0, 0.0], r_tool=[0.0] * 5, groups=[7, 7, 3, 3, 3],
              scored=[True, True, True, True, False])
    advantages = Advantages(torch.tensor([0.0, 0.0, 0.7, -0.7, 0.0]), torch.zeros(5))
    assert keep_mask(b, advantages, drop_no_signal_groups=True).tolist() == [False, False, True, True, False]


@pytest.mark.parametrize("tool", [None, torch.tensor([0.0, 1.0, -1.0])])
def test_advantages_select(tool):
    picked = Advantages(torch.tensor([1.0, 2.0, 3.0]), tool).select(torch.tensor([2, 0]))
    assert picked.acc.tolist() == [3.0, 1.0]
    assert picked.tool is None if tool is None else picked.tool.tolist() == [-1.0, 0.0]
