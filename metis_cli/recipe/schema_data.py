"""The recipe's `data` section: data sources (`DataSource`, used by every section that reads data:
data.rl, data.eval, sft.phases[].data, curate.input), the built-in synthetic task's sets and
parameters, and the malformed-row rule. Part of the recipe schema (recipe/schema.py re-exports it);
reading the sources is data/sources.py's job, not this module's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metis_cli.recipe.section import Section


SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SETS = ("knowledge", "cold_start", "rl", "eval")
"""The built-in arithmetic task's sets, named `synthetic:<set>` in a DataSource path
(data/sources.py generates them; `metis validate` refuses other names)."""


class DataSource(Section):
    path: str = Field(
        ...,
        description="A .jsonl/.parquet file, a datasets save_to_disk folder, 'hf:NAME' for a datasets "
        f"source, or '{SYNTHETIC_PREFIX}<{'|'.join(SYNTHETIC_SETS)}>' for the built-in arithmetic task.",
    )
    split: str | None = Field(None, description="Split for datasets sources.")
    layout: Literal["auto", "messages", "verl"] = Field("auto", description="Row layout.")
    subset_field: str = Field("subset", description="Column naming the subset (e.g. easy/hard).")
    limit: int | None = Field(None, gt=0, description="Use at most this many rows.")


class SyntheticConfig(Section):
    task: Literal["arithmetic", "mixed", "vision"] = Field(
        "arithmetic", description="arithmetic: the calculator task of recipes/tiny.yaml; mixed: the same questions "
        "with every SFT answer imperfect, easy ones and direct ones too (answer_noise), so sampled groups are mixed "
        "with and without the tool (recipes/tiny-mixed.yaml); vision: the zoom_in task of recipes/tiny-vl.yaml "
        "(images drawn here and written beside each set's JSONL).",
    )
    seed: int = Field(0, description="Seed of the synthetic generators.")
    knowledge_examples: int = Field(4000, ge=0, description="Direct answers to easy questions (what a base model knows).")
    cold_start_examples: int = Field(20000, ge=0, description="Cold-start tool-use trajectories.")
    direct_answer_share: float = Field(
        0.1, ge=0, le=1, description="Share of easy cold-start questions answered without the tool (the rare direct "
        "answers of a real cold start; every task)."
    )
    hard_share: float = Field(0.5, ge=0, le=1, description="Share of hard questions in cold-start and RL data.")
    closeup_share: float = Field(
        0.0, ge=0, le=1, description="Vision task: share of knowledge examples that are hard questions answered "
        "directly on a close-up (the zoomed corner, as zoom_in returns it): the perception a pretrained VLM has."
    )
    answer_noise: float = Field(
        0.0, ge=0, le=1, description="Chance that each digit of a hard cold-start answer is redrawn at random "
        "(imperfect demonstrations: right on average, often wrong when sampled; RL's accuracy channel fixes it; "
        "arithmetic task only; task mixed: every digit of every easy and hard SFT answer)."
    )
    rl_prompts: int = Field(2000, ge=0, description="RL prompts.")
    eval_per_subset: int = Field(100, gt=0, description="Held-out eval prompts per subset (easy, hard).")

    def fields_for_other_tasks(self) -> set[str]:
        """Fields only another task reads. Data digests and stage inputs leave them out, so a
        run made before such a field was added still matches (reused, resumable)."""
        return {name for name, task in _ONE_TASK_FIELDS.items() if task != self.task}


_ONE_TASK_FIELDS = {"closeup_share": "vision"}
"""SyntheticConfig fields that only one task reads, and that task."""


class DataConfig(Section):
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="Parameters of 'synthetic:' sources."
    )
    rl: list[DataSource] = Field(default_factory=list, description="RL prompt sets (hdpo).")
    eval: list[DataSource] = Field(default_factory=list, description="Held-out eval sets (hdpo eval, metis eval).")
    malformed_rows: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first malformed row; skip: report and drop it."
    )
