"""The recipe schema: one pydantic model per recipe section, every field typed, defaulted and described.

One recipe YAML drives every stage (curate, sft, hdpo, eval, chat). This module only declares
the shape; loading, `--set` overrides, `${section.field}` interpolation and error reporting live
in `metis_cli.recipe.load`. No heavy imports here: `metis validate` must start instantly. Here:
the run, model, rollout, eval and chat sections and the whole `Recipe`; the other sections live
in schema_data.py (data), schema_tools.py (tools), schema_reward.py (reward), schema_train.py
(sft, hdpo) and schema_curate.py (curate), all re-exported here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

# The other sections, re-exported: every section is importable from here.
from metis_cli.recipe.schema_curate import (  # noqa: F401
    CurateConfig,
    CurateFilters,
    DedupFilterConfig,
    ExecutionFilterConfig,
    JudgeFilterConfig,
    NecessityFilterConfig,
    RlFilterConfig,
    ValidityFilterConfig,
)
from metis_cli.recipe.schema_data import (  # noqa: F401
    SYNTHETIC_PREFIX,
    SYNTHETIC_SETS,
    DataConfig,
    DataSource,
    SyntheticConfig,
)
from metis_cli.recipe.schema_reward import JudgeConfig, RewardConfig, RewardJudgeConfig  # noqa: F401
from metis_cli.recipe.schema_tools import (  # noqa: F401
    PythonToolConfig,
    SearchHttpConfig,
    SearchToolConfig,
    ToolCost,
    ToolsConfig,
)
from metis_cli.recipe.schema_train import CoupledConfig, HdpoConfig, SftConfig, SftPhase  # noqa: F401
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
    kind: Literal["text", "vision", "vision-qwen2.5"] = Field(
        "text", description="text: a tiny Qwen3 (the sizes below); vision: a tiny Qwen3-VL with its processor "
        "(model/tiny_vl.py, fixed sizes; the fields below are ignored); vision-qwen2.5: the same with a tiny "
        "Qwen2.5-VL (its own patch-14 image processor).")
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
    logits_budget_mib: float | None = Field(
        1024.0, gt=0, description="MiB of fp32 logits one training forward may hold; a pass with more positions runs "
        "the LM head in chunks under activation checkpointing (same numbers, far less memory for large "
        "vocabularies; train/logit_chunks.py). null: never chunk."
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(kwargs) & {"messages", "conversation", "tools", "documents", "chat_template",
                                      "add_generation_prompt", "continue_final_message", "tokenize"})
        if taken:  # apply_chat_template's own arguments
            raise ValueError(f"{', '.join(taken)} is set by metis itself; give only the template's own variables "
                             "(e.g. enable_thinking)")
        return kwargs


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
        1, gt=0, description="GPUs (processes) per engine. 1: each process runs its own engine on its GPU; "
        "T > 1 (hdpo on several processes): every T consecutive processes share one tensor-parallel engine, "
        "sampling in turn-synchronous waves with the tools run on the engine's first process."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache across shared prefixes.")
    sleep_mode: bool = Field(
        False, description="Free the engine's GPU memory during each update (vLLM sleep mode, level 1: the "
        "weights move to CPU memory and the KV cache is dropped; woken and synced after). CUDA only."
    )
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
