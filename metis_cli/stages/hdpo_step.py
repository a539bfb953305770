"""The typed ends of one RL step: `step_prompts` (which prompts), `scored_batch` (rollouts and their
scores -> `algo.types.ScoredBatch`), `StepMetrics` (everything the step logs -> one metrics.jsonl
record), and what the step shows (`sample_rows` / `sample_record`: saved rollouts; `eval_line`).

`StepMetrics.to_record()` writes only names that `telemetry.metrics` defines (a test checks), in
the groups docs/metrics.md lists: the step's rollouts and rewards, the advantages, the update
(absent when nothing was trained), timing, and the held-out eval and checkpoint when the step had
them. Must not touch: models, optimizers, files.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import torch

from metis_cli.algo.advantages import advantage_stats, efficiency_group_share
from metis_cli.algo.types import Advantages, ScoredBatch
from metis_cli.model.runtime import HDPO_EPOCH_ORDER_SEED, derive_seed
from metis_cli.rewards.batch import RolloutFigures
from metis_cli.stages.hdpo_update import UpdateFigures
from metis_cli.telemetry import metrics as m


def step_prompts(prompt_count: int, per_step: int, run_seed: int, step: int) -> list[int]:
    """Prompt indices of a step: epochs of seeded permutations, so a resumed run continues
    exactly where the killed one was."""
    return seeded_walk(prompt_count, step * per_step, per_step, HDPO_EPOCH_ORDER_SEED, run_seed)


def seeded_walk(count: int, start: int, n: int, weights: tuple[int, int], run_seed: int) -> list[int]:
    """Positions start .. start + n - 1 of a walk through `count` items in epochs, each epoch a
    permutation seeded by `derive_seed(weights, run_seed, epoch)`: indices into the items. A pure
    function of its arguments, so a resumed run draws what the killed one would have."""
    indices, orders = [], {}
    for position in range(start, start + n):
        epoch, offset = divmod(position, count)
        if epoch not in orders:
            order = list(range(count))
            random.Random(derive_seed(weights, run_seed, epoch)).shuffle(order)
            orders[epoch] = order
        indices.append(orders[epoch][offset])
    return indices


def scored_batch(rollouts, scores) -> ScoredBatch:
    """The ScoredBatch of rollouts and their RolloutScores (same order); keep = scored."""
    scored = torch.tensor([s.correct is not None for s in scores])
    return ScoredBatch(
        r_acc=torch.tensor([s.r_acc if s.r_acc is not None else 0.0 for s in scores]),
        r_tool=torch.tensor([s.r_tool if s.r_tool is not None else 0.0 for s in scores]),
        scored=scored,
        group_ids=torch.tensor([r.prompt_index for r in rollouts]),
        tool_calls=torch.tensor([float(r.tool_calls) for r in rollouts]),
        keep=scored.clone(),
    )


@dataclass
class StepMetrics:
    """One hdpo step as logged. Field names are metrics.jsonl names (docs/metrics.md)."""

    step: int
    total_steps: int
    estimator: str
    rollouts: RolloutFigures  # the step's N rollouts (rewards/batch.py::rollout_figures)
    r_acc_mean: float | None  # over scored rollouts; None when none is scored
    r_tool_mean: float | None
    efficiency_group_share: float
    rollouts_trained: int
    adv_acc: dict[str, float]  # algo.advantages.advantage_stats over scored rollouts
    adv_tool: dict[str, float] | None  # None without an efficiency channel
    update: UpdateFigures | None  # None when no rollout was kept
    rollout_s: float
    update_s: float
    step_s: float
    elapsed_s: float
    lr: float
    world_size: int = 1  # processes that rolled out and trained this step together
    time: float = field(default_factory=time.time)
    eval: dict[str, float | None] = field(default_factory=dict)  # eval/<subset>/<figure>, on eval steps
    per_tool: dict[str, int] = field(default_factory=dict)  # tools/<tool>/calls|errors|timeouts
    checkpoint: str | None = None

    @classmethod
    def measure(cls, batch: ScoredBatch, advantages: Advantages, rollouts: RolloutFigures, **rest) -> StepMetrics:
        """The reward and advantage figures of `batch`; the rest (step, timing, update...) as given."""
        scored = batch.scored
        any_scored = bool(scored.any())
        return cls(
            rollouts=rollouts,
            r_acc_mean=float(batch.r_acc[scored].mean()) if any_scored else None,
            r_tool_mean=float(batch.r_tool[scored].mean()) if any_scored else None,
            efficiency_group_share=efficiency_group_share(batch.r_tool, batch.group_ids, scored=scored),
            rollouts_trained=int(batch.keep.sum()),
            adv_acc=advantage_stats(advantages.acc[scored]),
            adv_tool=advantage_stats(advantages.tool[scored]) if advantages.tool is not None else None,
            **rest,
        )

    @property
    def tokens_per_s(self) -> float:
        return self.rollouts.generated_tokens / max(self.rollout_s, 1e-9)

    def to_record(self) -> dict:
        """The metrics.jsonl line of this step (None is written as null)."""
        figures = asdict(self.rollouts)
        del figures["rollouts"]  # N is prompts_per_step * group_size, known from the recipe
        record = {
            m.STAGE: "hdpo", m.STEP: self.step, m.TOTAL_STEPS: self.total_steps, m.TIME: self.time,
            m.ESTIMATOR: self.estimator, **figures,
            m.R_ACC_MEAN: self.r_acc_mean, m.R_TOOL_MEAN: self.r_tool_mean,
            m.EFFICIENCY_GROUP_SHARE: self.efficiency_group_share, m.ROLLOUTS_TRAINED: self.rollouts_trained,
        }
        for channel, stats in (("adv_acc", self.adv_acc), ("adv_tool", self.adv_tool)):
            if stats is not None:
                record.update({f"{channel}_{name}": value for name, value in stats.items()})
        if self.update is not None:
            record.update({name: value for name, value in asdict(self.update).items() if value is not None})
        record.update({
            m.ROLLOUT_S: self.rollout_s, m.UPDATE_S: self.update_s, m.STEP_S: self.step_s,
            m.ELAPSED_S: self.elapsed_s, m.LR: self.lr, m.TOKENS_PER_S: self.tokens_per_s,
            m.WORLD_SIZE: self.world_size,
            **self.eval,
            **self.per_tool,
        })
        if self.checkpoint is not None:
            record[m.CHECKPOINT] = self.checkpoint
        return record


def eval_figures(summary: dict[str, dict]) -> dict[str, float | None]:
    """The `eval/<subset>/<figure>` entries of a `rewards.batch.subset_summary`."""
    return {m.eval_key(subset, figure.name): figures[figure.name]
            for subset, figures in summary.items() for figure in m.EVAL_FIGURES}


def sample_rows(cfg, step: int, rollouts: int) -> list[int]:
    """The rollouts (indices in step order, of `rollouts`) that `step` saves as samples: evenly
    spaced, `hdpo.samples_to_save` of them, on step 1 and every `hdpo.sample_every` steps."""
    if not cfg.samples_to_save or not (step % cfg.sample_every == 0 or step == 1):
        return []
    stride = max(1, rollouts // cfg.samples_to_save)
    return list(range(0, rollouts, stride))[: cfg.samples_to_save]


def sample_record(step: int, i: int, rollouts, scores, advantages: Advantages, examples) -> dict:
    """One line of rollouts/step_<step>.jsonl: rollout i of the step, its score and advantages."""
    r, s, example = rollouts[i], scores[i], examples[rollouts[i].prompt_index]
    return {
        "step": step, "prompt_id": example.id, "sample": r.sample_index, "subset": example.subset,
        "question": example.question, "gold": example.answer, "messages": r.messages,
        "images": [[image.width, image.height] for image in r.images],  # sizes in order of appearance, never pixels
        "final_answer": s.answer, "correct": s.correct, "tool_calls": r.tool_calls,
        "tool_errors": sum(r.tool_errors.values()), "r_acc": s.r_acc, "r_tool": s.r_tool,
        "adv_acc": float(advantages.acc[i]),
        "adv_tool": float(advantages.tool[i]) if advantages.tool is not None else 0.0,
    }


def eval_line(step: int, record: dict) -> str:
    """The progress line of a held-out eval: `hdpo eval @ step 5: easy.acc=0.50  easy.tools=...`."""
    short = {m.ACCURACY: "acc", m.TOOL_CALL_RATIO: "tools", m.TOOL_CALLS_MEAN: "calls"}
    parts = []
    for key, value in sorted(record.items()):
        split = m.split_eval_key(key)
        if split is not None and value is not None:
            subset, name = split
            parts.append(f"{subset}.{short[name]}={value:.2f}")
    return f"hdpo eval @ step {step}: " + "  ".join(parts)
