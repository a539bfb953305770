"""Per-rollout advantages for HDPO and its baselines: pure functions over 1-D tensors.

Every function takes per-rollout tensors of shape [N] (one entry per sampled rollout) plus
`group_ids` [N] (integer prompt id per rollout; any values, in any order, groups may be
interleaved) and returns advantages of shape [N]. Nothing here knows about models, tokens or
rollouts; the losses that consume these live in `algo/losses.py`.

HDPO (docs/algorithm.md), for one group of rollouts of the same prompt:

    A_acc_i  = (r_acc_i - mean(r_acc)) / (std(r_acc) + eps)         over the whole group
    Q        = { i : r_tool_i > 0 }                                   (the correct rollouts)
    A_tool_i = (r_tool_i - mean_Q) / (std_Q + eps)   if i in Q and |Q| >= 2, else 0

`std` is the unbiased (n - 1) standard deviation. A group with one member gets mean 0 and std 1
(as in verl's GRPO), which means its advantage is the raw reward r / (1 + eps), not 0: a lone
rollout is pushed up by its own reward rather than ignored. This only applies to the accuracy
channel (and the single-channel baselines); the efficiency channel needs |Q| >= 2.

Unscored rollouts (the judge could not score them) are left out of their group's statistics
and get advantage 0 in every channel. Pass `scored` explicitly, or mark them with NaN rewards:
when `scored` is None, a rollout counts as scored when its reward is finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6


def _dense_group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids [N] to 0..G-1 so per-group sums can use index_add."""
    _, dense = torch.unique(group_ids, return_inverse=True)
    return dense, int(dense.max().item()) + 1 if dense.numel() else 0


def _scored_mask(rewards: Tensor, scored: Tensor | None) -> Tensor:
    finite = torch.isfinite(rewards)
    return finite if scored is None else scored.to(torch.bool) & finite


def _group_normalise(
    values: Tensor,
    group_ids: Tensor,
    members: Tensor,
    eps: float,
    min_members: int,
) -> Tensor:
    """(v - group mean) / (group std + eps) over `members` of each group; 0 for non-members.

    Groups with fewer than `min_members` members get 0. A group with exactly one member
    (reachable only when min_members <= 1) gets mean 0 and std 1.
    """
    dense, num_groups = _dense_group_index(group_ids)
    weight = members.to(values.dtype)
    v = torch.where(members, values, torch.zeros_like(values))
    zeros = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    count = zeros.index_add(0, dense, weight)
    mean = zeros.index_add(0, dense, v) / count.clamp(min=1)
    deviation = (v - mean[dense]) * weight
    squared_sum = zeros.index_add(0, dense, deviation * deviation)
    std = torch.sqrt(squared_sum / (count - 1).clamp(min=1))
    lone = count == 1
    mean = torch.where(lone, torch.zeros_like(mean), mean)
    std = torch.where(lone, torch.ones_like(std), std)
    advantages = (v - mean[dense]) / (std[dense] + eps)
    keep = members & (count[dense] >= min_members)
    return torch.where(keep, advantages, torch.zeros_like(advantages))


def hdpo_advantages(
    r_acc: Tensor,
    r_tool: Tensor,
    group_ids: Tensor,
    scored: Tensor | None = None,
    eps: float = EPS,
) -> tuple[Tensor, Tensor]:
    """HDPO's two decoupled advantages (A_acc, A_tool), each [N].

    Args:
        r_acc: [N] accuracy reward, 0.9 * correct + 0.1 * format_ok (NaN = unscored).
        r_tool: [N] efficiency reward, 1 / (T + 1) when correct else 0.
        group_ids: [N] prompt id per rollout.
        scored: optional [N] bool; False rollouts are excluded and get 0 in both channels.
    """
    members = _scored_mask(r_acc, scored)
    a_acc = _group_normalise(r_acc, group_ids, members, eps, min_members=1)
    in_q = members & torch.isfinite(r_tool) & (torch.nan_to_num(r_tool) > 0)
    a_tool = _group_normalise(r_tool, group_ids, in_q, eps, min_members=2)
    return a_acc, a_tool


def grpo_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    scored: Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """Plain GRPO: one group normalisation of one scalar reward per rollout. [N] -> [N]."""
    members = _scored_mask(rewards, scored)
    return _group_normalise(rewards, group_ids, members, eps, min_members=1)


def coupled_rewards(
    r_acc: Tensor, tool_calls: Tensor, r_tool: Tensor, mode: str, coef: float
) -> Tensor:
    """One scalar reward mixing accuracy and tool use, for the coupled-reward baseline. [N].

    mode "penalty": r_acc - coef * T   (T = tool calls per rollout)
    mode "bonus":   r_acc + coef * r_tool
    NaN (unscored) r_acc stays NaN, so `grpo_advantages` still excludes it.
    """
    if mode == "penalty":
        return r_acc - coef * tool_calls.to(r_acc.dtype)
    if mode == "bonus":
        return r_acc + coef * r_tool.to(r_acc.dtype)
    raise ValueError(f"coupled reward mode must be 'penalty' or 'bonus', got {mode!r}")


def gdpo_advantages(
    reward_columns: list[Tensor],
    group_ids: Tensor,
    scored: Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """GDPO-style baseline: normalise each reward per group separately, then sum. [N].

    A rollout is scored only if every reward column is finite for it (and `scored` allows it),
    so all columns are normalised over the same rollouts.
    """
    if not reward_columns:
        raise ValueError("gdpo_advantages needs at least one reward column")
    members = _scored_mask(reward_columns[0], scored)
    for column in reward_columns[1:]:
        members = members & torch.isfinite(column)
    total = torch.zeros_like(reward_columns[0])
    for column in reward_columns:
        total = total + _group_normalise(column, group_ids, members, eps, min_members=1)
    return total


def efficiency_group_share(
    r_tool: Tensor, group_ids: Tensor, scored: Tensor | None = None
) -> float:
    """Share of groups whose efficiency channel is on (|Q| >= 2 scored correct rollouts).

    The denominator is every group present in `group_ids`, including groups whose rollouts are
    all unscored: this is the "implicit curriculum" gauge, it should rise with accuracy.
    """
    if group_ids.numel() == 0:
        return 0.0
    members = _scored_mask(r_tool, scored) & (torch.nan_to_num(r_tool) > 0)
    dense, num_groups = _dense_group_index(group_ids)
    q_size = torch.zeros(num_groups, dtype=torch.long).index_add(
        0, dense.cpu(), members.cpu().to(torch.long)
    )
    return float((q_size >= 2).sum().item()) / num_groups


def advantage_stats(a: Tensor) -> dict[str, float]:
    """mean, std (population) and nonzero (share of rollouts with a non-zero advantage)."""
    if a.numel() == 0:
        return {"mean": 0.0, "std": 0.0, "nonzero": 0.0}
    a = a.detach().to(torch.float64)
    return {
        "mean": float(a.mean().item()),
        "std": float(a.std(unbiased=False).item()),
        "nonzero": float((a != 0).to(torch.float64).mean().item()),
    }
