"""The recipe schema: one pydantic model per recipe section, every field typed, defaulted and described.

One recipe YAML drives every stage (curate, sft, hdpo, eval, chat). This module only declares
the shape; loading, `--set` overrides, `${section.field}` interpolation and error reporting live
in `metis_cli.recipe.load`. No heavy imports here: `metis validate` must start instantly. The
tools and reward sections live in schema_tools.py and schema_reward.py (re-exported here).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

# The tools and reward sections, re-exported: every section is importable from here.
from metis_cli.recipe.schema_reward import JudgeConfig, RewardConfig, RewardJudgeConfig  # noqa: F401
from metis_cli.recipe.schema_tools import (  # noqa: F401
    PythonToolConfig,
    SearchHttpConfig,
    SearchToolConfig,
    ToolCost,
    ToolsConfig,
)
from metis_cli.recipe.section import Section


# ----------------------------------------------------------------------------------------- run
class DistributedConfig(Section):
    """How a run on several processes (`--nproc-per-node`, torchrun) splits the model; the launch
    itself (processes, nodes, rendezvous) is given on the command line, never in the recipe."""

    strategy: Literal["fsdp", "hsdp"] = Field(
        "fsdp", description="fsdp: shard fp32 master weights, gradients and Adam states over every process "
        "(FSDP2); hsdp: shard within a node, replicate across nodes (less traffic between nodes)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in backward instead of keeping them "
        "(about a third more compute, most activation memory saved); also applies to one process."
    )
    timeout_s: float = Field(
        60.0, gt=0, description="A collective that waits longer than this (a rank died or hangs) stops the job "
        "with an error; slow phases (loading, rollouts, saving) get a longer allowance."
    )


class RunConfig(Section):
    name: str = Field("metis-run", description="Run name; the run folder defaults to runs/<name>.")
    output_dir: str = Field("runs/${run.name}", description="Run folder: resolved recipe, metrics, checkpoints, reports.")
    seed: int = Field(0, description="Seed for data sampling, model init and generation.")
    threads: int = Field(0, ge=0, description="Torch/OpenMP threads; 0 = the CPU cores this process may really use.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when a GPU is present.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Sharding and checkpointing when several processes train."
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that get every metrics.jsonl row, the recipe and "
        "sampled rollouts (pip install 'metis-cli[track]'); metrics.jsonl is written either way.",
    )


# --------------------------------------------------------------------------------------- model
class TinyModelConfig(Section):
    kind: Literal["text", "vision"] = Field(
        "text", description="text: a tiny Qwen3 (the sizes below); vision: a tiny Qwen3-VL with its processor "
        "(model/tiny_vl.py, fixed sizes; the fields below are ignored).")
    hidden_size: int = Field(128, gt=0, description="Hidden width of the tiny Qwen3 model.")
    num_layers: int = Field(4, gt=0, description="Transformer layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads.")
    intermediate_size: int = Field(512, gt=0, description="MLP width.")


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train a LoRA adapter instead of all weights.")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get adapters.",
    )
    merge: bool = Field(False, description="Also save weights with the adapter merged in (final/merged).")


class ModelConfig(Section):
    name_or_path: str = Field(..., description="HF model folder or hub id (hub ids need network).")
    build_tiny: TinyModelConfig | None = Field(
        None, description="Build a tiny random-init Qwen3 + local tokenizer at name_or_path if it does not exist."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Passed to transformers from_pretrained.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra variables for the model's chat template, the same in sft, rollouts, "
        "eval and chat, e.g. {enable_thinking: false} for Qwen3."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (sft and hdpo).")
    freeze_vision: bool = Field(True, description="Vision-language models: vision tower frozen in full fine-tuning.")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(kwargs) & {"messages", "conversation", "tools", "documents", "chat_template",
                                      "add_generation_prompt", "continue_final_message", "tokenize"})
        if taken:  # apply_chat_template's own arguments
            raise ValueError(f"{', '.join(taken)} is set by metis itself; give only the template's own variables "
                             "(e.g. enable_thinking)")
        return kwargs


# ---------------------------------------------------------------------------------------- data
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
        0.1, ge=0, le=1, description="Share of easy cold-start questions answered without the tool (arithmetic task; "
        "the vision cold start zooms for every question)."
    )
    hard_share: float = Field(0.5, ge=0, le=1, description="Share of hard questions in cold-start and RL data.")
    answer_noise: float = Field(
        0.0, ge=0, le=1, description="Chance that each digit of a hard cold-start answer is redrawn at random "
        "(imperfect demonstrations: right on average, often wrong when sampled; RL's accuracy channel fixes it; "
        "arithmetic task only; task mixed: every digit of every easy and hard SFT answer)."
    )
    rl_prompts: int = Field(2000, ge=0, description="RL prompts.")
    eval_per_subset: int = Field(100, gt=0, description="Held-out eval prompts per subset (easy, hard).")


class DataConfig(Section):
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="Parameters of 'synthetic:' sources."
    )
    rl: list[DataSource] = Field(default_factory=list, description="RL prompt sets (hdpo).")
    eval: list[DataSource] = Field(default_factory=list, description="Held-out eval sets (hdpo eval, metis eval).")
    malformed_rows: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first malformed row; skip: report and drop it."
    )


# ------------------------------------------------------------------------------------- rollout
class VllmConfig(Section):
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1,
        description="Share of GPU memory vLLM may take (weights + KV cache); GPU only, CPU uses cpu_kv_cache_gb.",
    )
    cpu_kv_cache_gb: float = Field(
        1.0, gt=0,
        description="KV-cache RAM of CPU vLLM in GiB (on CPU gpu_memory_utilization would reserve a share of all RAM).",
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Longest sequence vLLM will serve; null = rollout.max_total_tokens."
    )
    tensor_parallel_size: int = Field(
        1, gt=0, description="GPUs per engine; per-step weight sync needs the in-process engine, so 1."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache across shared prefixes.")
    continuous: bool = Field(
        True, description="Continuous batching per rollout: a rollout's next turn starts as soon as its tool "
        "returns, while the others keep generating (1.3x faster with 50 ms tool calls in "
        "benchmarks/rollout_throughput.py; it also spares early finishers the wait for a turn's longest "
        "generation). false = turn-synchronous waves, like the hf backend (~15% faster on the tiny model, "
        "whose turns are all ~10 tokens, when every tool answers in microseconds)."
    )


class RolloutConfig(Section):
    backend: Literal["hf", "vllm"] = Field("hf", description="Generation backend.")
    max_turns: int = Field(
        10, gt=0, description="Assistant turns per rollout. A turn ends at its first </tool_call> (that call runs) "
        "or answers; a call in the last turn is not run and ends the rollout, so at most max_turns - 1 tool calls "
        "run (the reference's 'max_turns=10', up to 10 tool calls, is 11 here)."
    )
    max_new_tokens: int = Field(512, gt=0, description="Tokens generated per assistant turn.")
    max_total_tokens: int = Field(4096, gt=0, description="Whole rollout length cap (prompt + all turns).")
    max_response_tokens: int | None = Field(
        None, gt=0, description="Budget of everything after the prompt, across all turns: generated tokens and "
        "the forced tool-turn tokens (observations) alike; null = only max_total_tokens caps the rollout."
    )
    max_observation_tokens: int | None = Field(
        None, gt=0, description="One tool result is cut to its last this many tokens (marked as cut) before it is "
        "shown to the model, as the reference agent loop does; null = no cap (each tool's own output limit stays)."
    )
    temperature: float = Field(1.0, ge=0, description="Sampling temperature for RL rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for RL rollouts.")
    batch_size: int = Field(64, gt=0, description="Sequences per generate call (hf backend).")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="vLLM engine settings.")


# ----------------------------------------------------------------------------------------- sft
class SftPhase(Section):
    data: list[DataSource] = Field(..., min_length=1, description="Trajectory sets trained in this phase.")
    epochs: float = Field(1.0, gt=0, description="Passes over this phase's data.")


class SftConfig(Section):
    init_from: str = Field("${model.name_or_path}", description="Model to start from.")
    output: str = Field("${run.output_dir}/sft", description="Stage folder (metrics, checkpoints, final/).")
    phases: list[SftPhase] = Field(default_factory=list, description="Trained in order (e.g. knowledge, then cold start).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, gt=0, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Share of each phase's steps with linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR decay after warmup; each phase warms up and decays on its own."
    )
    grad_clip: float = Field(1.0, gt=0, description="Max gradient norm.")
    max_seq_len: int = Field(4096, gt=0, description="Longer conversations are dropped (and counted).")
    packing: bool = Field(True, description="Pack each micro-batch's text rows into one padding-free sequence (shared "
                          "prefix once, attention kept within each row); same losses, fewer tokens computed. "
                          "false: one padded row per sequence (docs/formats.md).")
    eval_share: float = Field(0.02, ge=0, lt=1, description="Held-out share for eval loss.")
    eval_every: int = Field(200, gt=0, description="Steps between held-out eval-loss passes.")
    save_every: int = Field(500, gt=0, description="Steps between checkpoints.")


# ---------------------------------------------------------------------------------------- hdpo
class CoupledConfig(Section):
    mode: Literal["penalty", "bonus"] = Field(
        "penalty", description="penalty: r_acc - coef*T; bonus: r_acc + coef*r_tool."
    )
    coef: float = Field(0.1, ge=0, description="lambda (penalty) or alpha (bonus).")


class HdpoConfig(Section):
    estimator: Literal["hdpo", "grpo", "coupled", "gdpo"] = Field(
        "hdpo", description="hdpo: decoupled channels; grpo: accuracy only; coupled: one scalar; gdpo: per-reward norm."
    )
    init_from: str = Field("${sft.output}/final", description="Policy to start RL from.")
    output: str = Field("${run.output_dir}/hdpo", description="Stage folder (metrics, rollouts, checkpoints, final/).")
    steps: int = Field(500, gt=0, description="RL steps (one batch of prompts each).")
    prompts_per_step: int = Field(16, gt=0, description="Prompts per step.")
    group_size: int = Field(16, gt=0, description="Rollouts per prompt (G).")
    w_acc: float = Field(1.0, ge=0, description="Weight of the accuracy-channel loss.")
    w_tool: float = Field(0.15, ge=0, description="Weight of the efficiency-channel loss (paper: 0.15).")
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range.")
    dual_clip_c: float | None = Field(
        None, gt=1, description="Dual-clip bound c: for A < 0 a token's loss is at most -c * A, so a ratio past c "
        "stops pushing (the reference trainer: 3); null = plain PPO-clip. Acts only off-policy (mini_batches or "
        "ppo_epochs > 1); with one update per step the ratio is 1."
    )
    kl_coef: float = Field(0.0, ge=0, description="k3 KL to the frozen initial policy (paper: 0).")
    lr: float = Field(1e-6, gt=0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Max gradient norm.")
    ppo_epochs: int = Field(1, gt=0, description="Passes over each step's rollouts (each pass: one optimizer "
                            "step per mini-batch).")
    mini_batches: int = Field(
        1, gt=0, description="Optimizer steps per pass: the step's groups are split into this many mini-batches of "
        "whole groups (fewer when fewer groups are kept). Old log-probs are taken once before the first, so later "
        "ones are off-policy and clipping acts (the reference: 128 prompts in 2 mini-batches of 64)."
    )
    micro_batch_size: int = Field(16, gt=0, description="Rollouts per forward/backward.")
    loss_agg: Literal["batch_token_mean", "micro_batch_token_mean"] = Field(
        "batch_token_mean", description="batch_token_mean: token mean over the whole mini-batch, independent of "
        "micro_batch_size; micro_batch_token_mean: token mean per micro-batch scaled by its share of the "
        "rollouts, as the reference trainer (depends on micro_batch_size; docs/algorithm.md)."
    )
    coupled: CoupledConfig = Field(default_factory=CoupledConfig, description="Settings of the coupled baseline.")
    drop_no_signal_groups: bool = Field(
        False, description="Leave out of the update the groups without a learning signal in either channel "
        "(every rollout has A_acc = 0 and A_tool = 0)."
    )
    unscored_retries: int = Field(1, ge=0, description="Re-score attempts for rollouts the judge could not score.")
    eval_every: int = Field(10, gt=0, description="Steps between greedy held-out evals (also at step 0).")
    save_every: int = Field(50, gt=0, description="Steps between checkpoints.")
    sample_every: int = Field(10, gt=0, description="Steps between saved rollout samples.")
    samples_to_save: int = Field(16, ge=0, description="Rollouts written per sample file.")


# ---------------------------------------------------------------------------------- eval, chat
class EvalConfig(Section):
    output: str = Field("${run.output_dir}/eval", description="Where report.json/report.md/plot.png go.")
    models: list[str] = Field(
        default_factory=lambda: ["${sft.output}/final", "${hdpo.output}/final"],
        description="Models compared when --model is not given.",
    )
    samples: int = Field(1, gt=0, description="Samples per question; > 1 turns on sampling and pass@k.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature when samples > 1.")
    max_questions: int | None = Field(None, gt=0, description="Cap per subset (quick checks).")


class ChatConfig(Section):
    system_prompt: str | None = Field(None, description="System prompt; default: the task's.")
    max_turns: int = Field(10, gt=0, description="Assistant turns per answer.")
    max_new_tokens: int = Field(512, gt=0, description="Tokens per assistant turn.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")


# ------------------------------------------------------------------------------------ curate
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


class Recipe(Section):
    """A whole recipe: one YAML for every stage."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run name, folder, seed, threads, device.")
    model: ModelConfig = Field(..., description="Base model (and tiny-model build, LoRA).")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets.")
    tools: ToolsConfig = Field(default_factory=ToolsConfig, description="Tools and their limits.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Multi-turn generation.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Answer checking and reward weights.")
    sft: SftConfig = Field(default_factory=SftConfig, description="Cold-start supervised fine-tuning.")
    hdpo: HdpoConfig = Field(default_factory=HdpoConfig, description="RL with HDPO and baselines.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="metis eval.")
    chat: ChatConfig = Field(default_factory=ChatConfig, description="metis chat.")
    curate: CurateConfig = Field(default_factory=CurateConfig, description="metis curate.")
