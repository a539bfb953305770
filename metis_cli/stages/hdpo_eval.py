"""What `metis hdpo` shows of the policy besides the step figures: the greedy held-out eval
(`data.eval`, at step 0 and every `hdpo.eval_every` steps) and the sampled training rollouts it
saves to `rollouts/step_<n>.jsonl` (docs/run-folder.md).

The held-out eval answers the same prompts at every pass, so a vision-language policy's eval
images are read from their files once, at the first pass, and kept for the run. On several
processes each answers its share of the prompts (`stages.hdpo_dist.share`: its replica's, when
ranks share a tensor-parallel engine) and the scores are gathered, so every rank gets the same
summary. Must not touch the model's weights, the optimizer
or the metrics log.
"""

from __future__ import annotations

import json
from pathlib import Path

from metis_cli.files import storage_errors, write_atomic


class HeldOutEval:
    """The held-out prompts of a run and this process's share of them."""

    def __init__(self, examples: list, replicas, *, with_images: bool):
        """replicas: `stages.hdpo_dist.Replicas`, how the processes share the rollout engines."""
        from metis_cli.stages.hdpo_dist import share

        self.examples, self.replicas, self.with_images = examples, replicas, with_images
        self.mine = share(examples, replicas)
        self._images: list[list] | None = None

    def share_images(self) -> list[list] | None:
        """The images of this process's prompts (None for a text-only policy), read at the first
        call and the same objects after."""
        if self.with_images and self._images is None:
            self._images = [e.load_images() for e in self.mine]
        return self._images

    def summary(self, engine, checker, reward, *, retries: int) -> dict:
        """One greedy answer per held-out prompt, scored: `rewards.batch.subset_summary`'s figures
        per subset."""
        from metis_cli.rewards.batch import score_rollouts, subset_summary
        from metis_cli.stages.hdpo_dist import gather, own, place

        rollouts = own(place(engine.run([e.messages for e in self.mine], 1, greedy=True,
                                        images=self.share_images()), self.replicas), self.replicas) if self.mine else []
        scores = score_rollouts(rollouts, self.examples, checker, reward, retries=retries)
        rollouts, scores = gather(self.replicas.context, rollouts, scores)
        return subset_summary(rollouts, scores, self.examples)


def save_samples(stage_dir: Path, step: int, rollouts, scores, examples, advantages, rows: list[int]) -> None:
    """rollouts/step_<step>.jsonl: the rollouts at positions `rows` of the step, one JSON line each
    (`stages.hdpo_step.sample_record`)."""
    from metis_cli.stages.hdpo_step import sample_record

    folder = stage_dir / "rollouts"
    with storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(sample_record(step, i, rollouts, scores, advantages, examples)) for i in rows]
    write_atomic(folder / f"step_{step:06d}.jsonl", "\n".join(lines) + "\n")
