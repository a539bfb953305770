"""The recipe's training sections: `sft` (phases, optimizer, schedule, packing, eval and saving
cadence) and `hdpo` (estimator, group sampling, channel weights, PPO clip, mini-batches, eval,
saving and sample cadence). Part of the recipe schema (recipe/schema.py re-exports it); the
stages that read them are stages/sft.py and stages/hdpo.py."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metis_cli.recipe.schema_data import DataSource
from metis_cli.recipe.section import Section


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


class PtxConfig(Section):
    coef: float = Field(
        0.0, ge=0, description="Weight of the rehearsal loss (PPO-ptx): each optimizer step of the policy update also "
        "trains coef x the token-mean SFT cross-entropy of `batch_size` rows of `data`. 0 = off (the paper)."
    )
    data: list[DataSource] = Field(
        default_factory=list, description="Trajectories to rehearse, as sft.phases[].data (e.g. what SFT taught "
        "the model to know, so RL does not erode it). Text rows only."
    )
    batch_size: int = Field(16, gt=0, description="Rehearsal rows per optimizer step (split over the processes).")
    train_after: str | None = Field(
        None, description="Train only the assistant tokens after the first occurrence of this text in a row (e.g. "
        "'<answer>': rehearse what the answers say, not the decision to answer without a tool, which is the policy "
        "RL is learning); rows without it are skipped. null: every assistant token."
    )

    @model_validator(mode="after")
    def _data_when_on(self) -> PtxConfig:
        if self.coef > 0 and not self.data:
            raise ValueError("coef > 0 needs data: the trajectories to rehearse, e.g. data: [{path: data/sft.jsonl}]")
        return self

    @property
    def enabled(self) -> bool:
        return self.coef > 0


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
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="LR over the RL steps: constant (the paper and the reference trainer), or a cosine "
        "or linear decay towards 0 at the last step after `warmup_ratio` of the steps of linear warmup. Set from "
        "the step count at every step, so a resumed run continues the same curve."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the RL steps with linear LR warmup.")
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
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="Also cap each micro-batch at this many padded tokens (rollouts x the longest), as "
        "verl's token-budget micro-batches (40,960 per GPU in the official run); a rollout longer than this runs "
        "alone. null: micro_batch_size only."
    )
    loss_agg: Literal["batch_token_mean", "micro_batch_token_mean"] = Field(
        "batch_token_mean", description="batch_token_mean: token mean over the whole mini-batch, independent of "
        "micro_batch_size; micro_batch_token_mean: token mean per micro-batch scaled by its share of the "
        "rollouts, as the reference trainer (depends on micro_batch_size; docs/algorithm.md)."
    )
    coupled: CoupledConfig = Field(default_factory=CoupledConfig, description="Settings of the coupled baseline.")
    ptx: PtxConfig = Field(default_factory=PtxConfig, description="Rehearsal of SFT rows during RL (PPO-ptx); off by "
                           "default (docs/algorithm.md).")
    drop_no_signal_groups: bool = Field(
        False, description="Leave out of the update the groups without a learning signal in either channel "
        "(every rollout has A_acc = 0 and A_tool = 0)."
    )
    unscored_retries: int = Field(1, ge=0, description="Re-score attempts for rollouts the judge could not score.")
    eval_every: int = Field(10, gt=0, description="Steps between greedy held-out evals (also at step 0).")
    save_every: int = Field(50, gt=0, description="Steps between checkpoints.")
    sample_every: int = Field(10, gt=0, description="Steps between saved rollout samples.")
    samples_to_save: int = Field(16, ge=0, description="Rollouts written per sample file.")
