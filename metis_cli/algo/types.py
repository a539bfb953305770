"""The typed data of one RL step, between the rollouts and the update: `ScoredBatch` (rewards per
rollout) and `Advantages` (what an estimator makes of them). Plain tensors with their shapes, in
the manner of torchtune's `rlhf/_types.py`; N is the number of rollouts of the step
(`prompts_per_step * group_size`), in the order the rollout engine returned them.

The step reads: rollouts -> `ScoredBatch` -> `Advantages` (`algo.estimators.ESTIMATORS`) -> keep
(`algo.estimators.keep_mask`) -> update -> metrics (docs/rl-step.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor


@dataclass(frozen=True)
class ScoredBatch:
    """The rewards of one step's N rollouts, one entry per rollout (docs/algorithm.md).

    Attributes:
        r_acc (Tensor): [N] float32, accuracy reward `acc_weight * correct + format_weight *
            format_ok` (0.9 / 0.1 by default); 0.0 where the rollout is unscored.
        r_tool (Tensor): [N] float32, efficiency reward `1 / (T + 1)` when correct, else 0; 0.0
            where unscored.
        scored (Tensor): [N] bool, False where the judge could not score the rollout after
            retries: such a rollout is left out of its group's statistics, gets advantage 0 and is
            never trained on.
        group_ids (Tensor): [N] int64, index of the rollout's prompt within the step; the G
            rollouts of one prompt form a group, the unit every advantage is normalised over.
        tool_calls (Tensor): [N] float32, T, the rollout's tool calls (malformed and refused ones
            included).
        keep (Tensor): [N] bool, the rollouts the update trains on: `scored` as built, narrowed
            by the keep rule (`algo.estimators.keep_mask`) through `with_keep` once the
            advantages are known.
    """

    r_acc: Tensor
    r_tool: Tensor
    scored: Tensor
    group_ids: Tensor
    tool_calls: Tensor
    keep: Tensor

    def with_keep(self, keep: Tensor) -> ScoredBatch:
        """The same batch with another [N] bool keep mask."""
        return replace(self, keep=keep)


@dataclass(frozen=True)
class Advantages:
    """One advantage per rollout and channel, broadcast to every trained token of that rollout.

    Attributes:
        acc (Tensor): [N] float32, accuracy-channel advantage A_acc; for the single-loss
            baselines (grpo, coupled, gdpo) their one advantage. 0 where unscored.
        tool (Tensor | None): [N] float32, efficiency-channel advantage A_tool (HDPO only; 0
            outside Q or when |Q| < 2), or None when the estimator has no second channel, in
            which case the update trains one loss and `w_tool` is unused.
    """

    acc: Tensor
    tool: Tensor | None = None

    def select(self, index: Tensor) -> Advantages:
        """The advantages of the rollouts at `index` ([K] int64 positions into N)."""
        return Advantages(self.acc[index], self.tool[index] if self.tool is not None else None)
