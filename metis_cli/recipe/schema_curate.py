"""The recipe's `curate` section: what `metis curate` reads and writes, and its filters in the
order they run (validity, execution, necessity, LLM judge, dedup; the pass-rate filter for RL
prompts). Part of the recipe schema (recipe/schema.py re-exports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metis_cli.recipe.schema_data import DataSource
from metis_cli.recipe.schema_reward import JudgeConfig
from metis_cli.recipe.section import Section


class ValidityFilterConfig(Section):
    enabled: bool = Field(True, description="Drop rows that are not well-formed trajectories (sft) or prompts (rl).")
    require_gold_answer: bool = Field(
        True, description="sft: also drop rows without a gold `answer` (rl prompts always need one)."
    )


class ExecutionFilterConfig(Section):
    enabled: bool = Field(
        True, description="Re-run every recorded tool call; drop trajectories whose calls fail or whose "
        "recorded outputs differ from re-execution (hallucinated environment dynamics). sft only.",
    )
    ignore_output_of: list[str] = Field(
        default_factory=list,
        description="Tools whose calls must still succeed but whose outputs are not compared (non-deterministic tools).",
    )


class NecessityFilterConfig(Section):
    enabled: bool = Field(
        True, description="Drop tool-using trajectories whose question the model already solves without "
        "tools in at least one of k samples (pass@k > 0). sft only.",
    )
    k: int = Field(4, gt=0, description="Tool-free samples per question.")
    model: str = Field("${model.name_or_path}", description="Model asked without tools (the base model).")


class JudgeFilterConfig(JudgeConfig):
    """The LLM-judge filter: the judge endpoint settings of `reward.judge`, plus a switch."""

    enabled: bool = Field(
        False, description="Keep only trajectories an LLM judge rates as strategic tool use. sft only."
    )
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    model: str | None = Field(None, description="Judge model name at that endpoint.")
    max_concurrency: int = Field(8, gt=0, description="Judge requests in flight at once.")

    @model_validator(mode="after")
    def _endpoint_when_enabled(self) -> JudgeFilterConfig:
        if self.enabled and not (self.base_url and self.model):
            raise ValueError("an enabled judge filter needs base_url and model (an OpenAI-compatible endpoint)")
        return self


class DedupFilterConfig(Section):
    enabled: bool = Field(True, description="Keep only the first surviving row per normalized prompt.")


class RlFilterConfig(Section):
    enabled: bool = Field(
        True, description="Sample k rollouts per prompt; keep prompts with 0 < pass rate < 1. rl only."
    )
    k: int = Field(8, gt=1, description="Rollouts per prompt (with tools).")
    model: str = Field("${hdpo.init_from}", description="The current policy (the model RL starts from).")


class CurateFilters(Section):
    validity: ValidityFilterConfig = Field(
        default_factory=ValidityFilterConfig, description="1. Schema and format validity."
    )
    execution: ExecutionFilterConfig = Field(
        default_factory=ExecutionFilterConfig, description="2. Execution consistency (sft)."
    )
    necessity: NecessityFilterConfig = Field(
        default_factory=NecessityFilterConfig, description="3. Tool necessity (sft)."
    )
    judge: JudgeFilterConfig = Field(default_factory=JudgeFilterConfig, description="4. LLM judge (sft).")
    dedup: DedupFilterConfig = Field(default_factory=DedupFilterConfig, description="5. Dedup by prompt.")
    rl_filter: RlFilterConfig = Field(default_factory=RlFilterConfig, description="Pass-rate filter (rl).")


class CurateConfig(Section):
    mode: Literal["sft", "rl"] = Field(
        "sft", description="sft: filter cold-start trajectories (validity, execution, necessity, judge, dedup); "
        "rl: filter RL prompts (validity, dedup, rl_filter).",
    )
    input: list[DataSource] = Field(default_factory=list, description="Trajectories (sft) or prompts (rl) to curate.")
    output: str = Field("${run.output_dir}/curated", description="Folder for curated data and report.json.")
    format: Literal["jsonl", "parquet"] = Field("jsonl", description="File format of the curated rows.")
    batch_size: int = Field(
        64, gt=0, description="Rows decided together; finished batches survive a crash (--resume skips them)."
    )
    filters: CurateFilters = Field(default_factory=CurateFilters, description="Filters, run in the order listed.")
