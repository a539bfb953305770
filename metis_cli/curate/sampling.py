"""Filters that sample the model: tool necessity (sft, filter 3) and the RL pass-rate filter.

Both draw k multi-turn rollouts per question through the rollout engine, score them with the
recipe's answer checker (`reward.checker`) and compute pass rate = correct / scored (a rollout
the answer judge cannot score is left out, never counted wrong):
  necessity: tools disabled (`engine.run(..., use_tools=False)`); a tool-using trajectory whose
    question the model already solves in at least one of k samples (pass@k) does not teach
    necessary tool use and is dropped. Rows without tool calls or without a gold answer pass
    with a note.
  rl_filter: tools enabled, the current policy; a prompt whose k rollouts are all right or all
    wrong gives no learning signal (every group advantage is 0) and is dropped; 0 < rate < 1 kept.
The pass rate of every scored row is stored (`pass_rates[filter]`) and written out. The
model is shown each prompt's images (a text-only model refuses image rows: ModelError).
Seeds depend only on the batch's first row, so a resumed run samples what the first run would.
"""

from __future__ import annotations

from dataclasses import replace

from metis_cli.curate.rows import Candidate, prompt_images
from metis_cli.curate.validity import recorded_calls


class PassRateSampler:
    """k rollouts per example with one model, scored against the gold answers."""

    def __init__(self, recipe, model_path: str, *, field: str, use_tools: bool):
        from metis_cli.agent.factory import build_agent, build_registry
        from metis_cli.model.runtime import setup_threads
        from metis_cli.rewards.batch import build_checker

        setup_threads(recipe.run.threads)
        agent = build_agent(recipe, model_path, registry=build_registry(recipe) if use_tools else None, field=field)
        self.engine = agent.engine
        self.checker = build_checker(recipe.reward)
        self.reward_cfg = recipe.reward
        self.use_tools = use_tools
        self.base_seed = recipe.run.seed

    def correct_counts(self, rows: list[Candidate], k: int) -> list[tuple[int, int]]:
        """(correct, scored) out of k rollouts for each row's prompt."""
        import torch

        from metis_cli.model.runtime import CURATE_BATCH_SEED, derive_seed
        from metis_cli.rewards.batch import score_rollouts

        examples = [row.example for row in rows]
        seed = derive_seed(CURATE_BATCH_SEED, self.base_seed, rows[0].source, rows[0].ordinal)
        with torch.inference_mode():
            # The prompts' own images (not a trajectory's tool images); a text-only model given
            # image rows is a clear ModelError from the engine.
            images = ([replace(e, images=prompt_images(e)).load_images() for e in examples]
                      if any(e.images for e in examples) else None)
            rollouts = self.engine.run([e.messages for e in examples], k, use_tools=self.use_tools, seed=seed,
                                       images=images)
        scores = score_rollouts(rollouts, examples, self.checker, self.reward_cfg, retries=1)
        counts = [[0, 0] for _ in rows]
        for rollout, score in zip(rollouts, scores):
            if score.correct is not None:
                counts[rollout.prompt_index][0] += int(score.correct)
                counts[rollout.prompt_index][1] += 1
        return [(correct, scored) for correct, scored in counts]


class NecessityFilter:
    name = "necessity"

    def __init__(self, sampler: PassRateSampler, k: int):
        self.sampler, self.k = sampler, k

    def apply(self, rows: list[Candidate]) -> None:
        checked = []
        for row in rows:
            if not recorded_calls(row.example.trajectory or []):
                row.note(self.name, "no tool calls")
            elif row.example.answer is None:
                row.note(self.name, "no gold answer")
            else:
                checked.append(row)
        if not checked:
            return
        for row, (correct, scored) in zip(checked, self.sampler.correct_counts(checked, self.k)):
            if scored == 0:
                row.note(self.name, "no sample could be scored")
                continue
            row.pass_rates[self.name] = correct / scored
            if correct:
                row.drop(self.name, "solved without tools",
                         f"{correct}/{scored} tool-free samples answered correctly (pass@{self.k})")


class RlPassRateFilter:
    name = "rl_filter"

    def __init__(self, sampler: PassRateSampler, k: int):
        self.sampler, self.k = sampler, k

    def apply(self, rows: list[Candidate]) -> None:
        for row in rows:
            if row.example.answer is None:
                row.drop(self.name, "no gold answer", "the prompt has no `answer` to score rollouts against")
        rows = [row for row in rows if row.kept]
        if not rows:
            return
        for row, (correct, scored) in zip(rows, self.sampler.correct_counts(rows, self.k)):
            if scored == 0:
                row.drop(self.name, "no rollout could be scored", f"the answer checker scored none of {self.k} rollouts")
                continue
            rate = correct / scored
            row.pass_rates[self.name] = rate
            if rate == 0:
                row.drop(self.name, "all rollouts wrong (too hard)", f"0/{scored} rollouts correct")
            elif rate == 1:
                row.drop(self.name, "all rollouts right (too easy)", f"{scored}/{scored} rollouts correct")
