"""Advantage estimators by name (`hdpo.estimator`), and the keep rule: from a `ScoredBatch` to
what the update trains on. Pure tensor functions; the maths is in `algo/advantages.py`.

Each estimator is a function (ScoredBatch, HdpoConfig) -> Advantages; adding one is one entry in
`ESTIMATORS` (plus its name in the recipe's `hdpo.estimator` choices, which a test keeps equal):

    hdpo     A_acc over the whole group, A_tool over the correct rollouts Q: two losses
    grpo     the accuracy channel alone
    coupled  one scalar reward r_acc - coef * T (`penalty`) or r_acc + coef * r_tool (`bonus`),
             one normalisation
    gdpo     r_acc and r_tool each normalised per group, summed: one advantage, one loss

(docs/algorithm.md has the equations and how the baselines differ.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metis_cli.algo import advantages as adv
from metis_cli.algo.types import Advantages, ScoredBatch

if TYPE_CHECKING:
    from metis_cli.recipe.schema import HdpoConfig

Estimator = Callable[[ScoredBatch, "HdpoConfig"], Advantages]


def hdpo(batch: ScoredBatch, cfg: HdpoConfig) -> Advantages:
    a_acc, a_tool = adv.hdpo_advantages(batch.r_acc, batch.r_tool, batch.group_ids, scored=batch.scored)
    return Advantages(a_acc, a_tool)


def grpo(batch: ScoredBatch, cfg: HdpoConfig) -> Advantages:
    return Advantages(adv.grpo_advantages(batch.r_acc, batch.group_ids, scored=batch.scored))


def coupled(batch: ScoredBatch, cfg: HdpoConfig) -> Advantages:
    reward = adv.coupled_rewards(batch.r_acc, batch.tool_calls, batch.r_tool, cfg.coupled.mode, cfg.coupled.coef)
    return Advantages(adv.grpo_advantages(reward, batch.group_ids, scored=batch.scored))


def gdpo(batch: ScoredBatch, cfg: HdpoConfig) -> Advantages:
    return Advantages(adv.gdpo_advantages([batch.r_acc, batch.r_tool], batch.group_ids, scored=batch.scored))


ESTIMATORS: dict[str, Estimator] = {"hdpo": hdpo, "grpo": grpo, "coupled": coupled, "gdpo": gdpo}


def estimate(name: str, batch: ScoredBatch, cfg: HdpoConfig) -> Advantages:
    """The advantages of estimator `name` (a key of ESTIMATORS) for `batch`."""
    return ESTIMATORS[name](batch, cfg)


def keep_mask(batch: ScoredBatch, advantages: Advantages, *, drop_no_signal_groups: bool) -> Tensor:
    """[N] bool: the rollouts the update trains on.

    Every scored rollout. With `drop_no_signal_groups`, minus each group without a learning
    signal in either channel: no rollout of it has A_acc != 0 or A_tool != 0. The tool channel
    counts: a group whose rollouts are all right has A_acc = 0 everywhere but still teaches
    efficiency when they used different numbers of calls. A dropped group adds nothing to the
    loss either way; leaving it out keeps its tokens out of the L_acc denominator.
    """
    keep = batch.scored.clone()
    if not drop_no_signal_groups:
        return keep
    signal = advantages.acc != 0
    if advantages.tool is not None:
        signal = signal | (advantages.tool != 0)
    _, dense = torch.unique(batch.group_ids, return_inverse=True)
    group_signal = torch.zeros(int(dense.max()) + 1 if dense.numel() else 0, dtype=torch.long)
    group_signal = group_signal.index_add(0, dense, signal.to(torch.long))
    return keep & (group_signal[dense] > 0)
