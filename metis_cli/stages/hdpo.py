"""`metis hdpo`: RL with Hierarchical Decoupled Policy Optimization (and its baselines).

What one step does (docs/algorithm.md; how it runs: docs/rl-step.md):
  1. Take `prompts_per_step` prompts; sample G = `group_size` multi-turn rollouts each (tools run
     inside the sampler; tool output tokens are forced and never trained on).
  2. Rewards per rollout i with T_i tool calls:
        r_acc_i  = 0.9 * correct_i + 0.1 * format_ok_i
        r_tool_i = 1 / (T_i + 1) if correct_i else 0
     A rollout the judge cannot score (after retries) is excluded from its group and counted.
     A judge or tool service that stops answering stops the run before the step is trained,
     after a checkpoint (`stages.hdpo_guard`, docs/faults.md); the endpoints are checked first.
  3. Advantages per group (`algo.estimators`, for hdpo `algo.advantages.hdpo_advantages`):
        A_acc_i  = (r_acc_i - mean(r_acc)) / (std(r_acc) + 1e-6)           over all G
        Q        = { i : r_tool_i > 0 }                                     (correct rollouts)
        A_tool_i = (r_tool_i - mean_Q) / (std_Q + 1e-6) for i in Q if |Q| >= 2, else 0
  4. Keep the scored rollouts; with `hdpo.drop_no_signal_groups`, not the groups in which no
     rollout has A_acc != 0 or A_tool != 0 (`algo.estimators.keep_mask`).
  5. Loss on the kept rollouts: L = w_acc * L_clip(A_acc) + w_tool * L_clip(A_tool), PPO clip
     0.2, on the same log-probs; L_acc averages over all sampled tokens, L_tool over sampled
     tokens of rollouts with A_tool != 0. Optional k3 KL to the frozen initial policy (off by
     default, as in the paper). Old log-probs are the trainer's own (recomputed), not the
     sampler's; the gap is logged as `logprob_mismatch`. One optimizer step per mini-batch of
     whole groups (`hdpo.mini_batches`, x `ppo_epochs`); after the first the ratio moves off 1
     and the clip (and `hdpo.dual_clip_c`) acts. Aggregation: `hdpo.loss_agg`. Optional
     rehearsal (`hdpo.ptx`, off by default): each optimizer step also trains coef x the SFT
     cross-entropy of a few rows it names (`stages.hdpo_ptx`).
  Early on few groups have two correct rollouts, so the efficiency channel is mostly silent and
  accuracy dominates; as accuracy rises it switches on by itself (`efficiency_group_share`).
Baselines (`hdpo.estimator`): grpo (accuracy channel only), coupled (one scalar reward
r_acc - coef*T or r_acc + coef*r_tool, one normalisation), gdpo (each reward normalised per
group, summed, one loss).

A step reads: rollouts -> `ScoredBatch` (`stages.hdpo_step.scored_batch`) -> `Advantages`
(`algo.estimators.estimate`) -> keep -> `update` (`stages.hdpo_update.policy_update`, then the
weight sync) -> `StepMetrics` (one metrics.jsonl record; names in `telemetry.metrics`).

Shape: `HdpoStage` with `setup()` (`_setup_model`, `_setup_engine`, `_setup_data`,
`_setup_optimizer`, `_resume`), `train()` (`rollout_step`, `advantages`, `update`, `evaluate`),
`save()`, `cleanup()`; `run()` wires them. What is written to disk of the policy (`save`,
`save_checkpoint`, `_resume`, the checkpoint before a stop for a fault) comes from
`stages.hdpo_checkpoint`; the held-out eval and the saved rollout samples from `stages.hdpo_eval`.

Several processes (`--nproc-per-node N`, torchrun; `stages.hdpo_dist`): each rolls out whole
groups of its share of the prompts, every rank computes the step's advantages from the gathered
rewards, FSDP2 trains (the update one process would make); rank 0 writes metrics (one row per
step), samples and final/ (one HF folder); checkpoints are sharded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from metis_cli.errors import DataError
from metis_cli.model.runtime import HDPO_STEP_SEED, derive_seed
from metis_cli.stages.hdpo_checkpoint import HdpoCheckpoints


@dataclass
class HdpoResult:
    stage_dir: Path
    final_dir: Path
    steps: int
    stopped: bool
    eval_first: dict = field(default_factory=dict)
    eval_last: dict = field(default_factory=dict)


class HdpoStage(HdpoCheckpoints):
    def __init__(self, recipe, *, resume: bool = False, overwrite: bool = False, quiet: bool = False):
        self.recipe, self.cfg = recipe, recipe.hdpo
        self.resume, self.overwrite, self.quiet = resume, overwrite, quiet
        self.stage_dir = Path(self.cfg.output)
        self.step = 0
        self.stopped = False
        self.eval_history: list[tuple[int, dict]] = []

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from metis_cli.rewards.preflight import preflight
        from metis_cli.telemetry.run import MetricsLog, prepare_stage_dir, stage_inputs, write_resolved_recipe
        from metis_cli.host import available_cores
        from metis_cli.model.runtime import pick_device, quiet_libraries, seed_everything, setup_threads
        from metis_cli.stages.hdpo_dist import Replicas, check
        from metis_cli.train.distributed import init_distributed, run_on_main, training_timeouts

        self.dist = init_distributed(self.recipe.run.device)
        self.quiet = self.quiet or not self.dist.is_main

        def prepare() -> None:
            check(self.recipe, self.dist)
            preflight(self.recipe, "hdpo")  # a dead judge or search API fails here, before any model loads
            prepare_stage_dir(self.stage_dir, resume=self.resume, overwrite=self.overwrite, command="hdpo",
                              inputs=stage_inputs(self.recipe, "hdpo"))
            write_resolved_recipe(self.recipe)

        run_on_main(self.dist, prepare)
        self.replicas = Replicas.for_recipe(self.recipe, self.dist)  # before any engine starts (its groups)
        quiet_libraries()
        setup_threads(self.dist.threads(self.recipe.run.threads, available_cores()))
        self.device = self.dist.device if self.dist.enabled else pick_device(self.recipe.run.device)
        seed_everything(self.recipe.run.seed)
        self.metrics = MetricsLog(self.stage_dir / "metrics.jsonl") if self.dist.is_main else None
        self._setup_data()
        self._setup_model(self.cfg.init_from, field_name="hdpo.init_from")
        self._setup_engine()
        self._setup_rehearsal()
        self._setup_optimizer()
        if self.resume:
            self._resume()
        training_timeouts(self.dist, self.recipe.run.distributed.timeout_s)

    def _setup_data(self) -> None:
        from metis_cli.data.sources import load_sources

        if not self.recipe.data.rl:
            raise DataError("data.rl is empty: hdpo needs RL prompts, e.g. data.rl: [{path: data/rl.jsonl}]")
        self.prompts = load_sources(self.recipe.data.rl, self.recipe)
        self.eval_examples = load_sources(self.recipe.data.eval, self.recipe) if self.recipe.data.eval else []
        for example in self.prompts:
            if example.answer is None:
                raise DataError(f"data.rl: example {example.id} has no answer to score against")

    def _setup_model(self, path: str, field_name: str) -> None:
        from metis_cli.model.loading import load_policy
        from metis_cli.model.runtime import pick_dtype
        from metis_cli.stages.hdpo_dist import rollout_copy
        from metis_cli.train.distributed import compute_dtype, shard_model

        several = self.dist.enabled
        self.model, self.tokenizer = load_policy(path, self.recipe, device="cpu" if several else self.device,
                                                 field=field_name)
        self.rollout_model = self.model  # one process samples from the very model it trains
        dtype = compute_dtype(self.recipe, self.device) if several else pick_dtype(self.recipe.model.dtype, self.device)
        if self.recipe.rollout.backend == "vllm" and hasattr(self.model, "peft_config"):
            from metis_cli.agent.lora_stream import lora_layers

            lora_layers(self.model)  # an adapter the engines' weight sync cannot merge is refused before training
        if several:  # HF samples from a copy; each rank's vLLM engine holds its own (hdpo_dist)
            self.rollout_model = rollout_copy(self.model, self.device, dtype) if self.recipe.rollout.backend == "hf" else None
            self.model = shard_model(self.model, self.recipe, self.dist)
        self.model.train()
        self.reference = None
        if self.cfg.kl_coef > 0:
            from metis_cli.model.loading import load_model

            self.reference = load_model(self.cfg.init_from, dtype=dtype,
                                        device=self.device, field="hdpo.init_from").eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)

    def _setup_engine(self) -> None:
        from metis_cli.agent.factory import build_agent, build_registry
        from metis_cli.rewards.batch import build_checker
        from metis_cli.stages.hdpo_eval import HeldOutEval

        agent = build_agent(self.recipe, self.cfg.init_from, registry=build_registry(self.recipe),
                            field="hdpo.init_from", model=self.rollout_model, tokenizer=self.tokenizer)
        self.registry, self.backend, self.engine = agent.registry, agent.backend, agent.engine
        if self.replicas.size > 1:  # a tensor-parallel engine: its ranks send it the same requests (hdpo_dist)
            from metis_cli.stages.hdpo_dist import LeaderTools, LockstepBackend

            self.engine.continuous = False
            self.engine.tools = LeaderTools(self.engine.tools, self.replicas)
            self.engine.backend = LockstepBackend(self.engine.backend, self.replicas)
        self.vision = agent.vision  # images of a vision-language policy (model/vision.py), else None
        self.checker = build_checker(self.recipe.reward)
        self.held_out = HeldOutEval(self.eval_examples, self.replicas, with_images=self.vision is not None)
        self._setup_guard()

    def _setup_rehearsal(self) -> None:
        """`hdpo.ptx` rows (`stages.hdpo_ptx`), or None when it is off."""
        from metis_cli.stages.hdpo_ptx import Rehearsal

        self.rehearsal = Rehearsal.from_recipe(self.recipe, self.tokenizer, self.registry.specs(),
                                               rank=self.dist.rank, world_size=self.dist.world_size, quiet=self.quiet)

    def _rehearse(self, index: int, scope) -> float:
        """The rehearsal loss of this step's `index`-th optimizer step, backpropagated."""
        updates_per_step = self.cfg.ppo_epochs * self.cfg.mini_batches
        return self.rehearsal.backward(self.model, self.step * updates_per_step + index, self.device, scope)

    def _setup_guard(self) -> None:
        from metis_cli.stages.hdpo_guard import FaultGuard

        judge = self.recipe.reward.judge if self.recipe.reward.checker == "judge" else None
        tools = [self.registry.get(name) for name in self.registry.names()]
        services = [tool.service for tool in tools if getattr(tool, "service", None) is not None]
        limits = {"max_unscored_share": judge.max_unscored_share, "patience": judge.patience} if judge else {}
        self.guard = FaultGuard(judge_url=judge.base_url if judge else None, services=services, **limits)

    def _setup_optimizer(self) -> None:
        from metis_cli.train.optimizer import MasterWeights

        self.weights = MasterWeights(self.model, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.optimizer = self.weights.optimizer

    def _set_lr(self) -> None:
        """The LR of the step about to train (`hdpo.schedule`), from the step count alone."""
        from metis_cli.train.lr_schedule import lr_factor

        lr = self.cfg.lr * lr_factor(self.step, [(0, self.cfg.steps)], self.cfg.warmup_ratio, self.cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------------------ step
    def rollout_step(self, examples):
        """Sample G rollouts per example of this process's share of `examples` (all of them on one
        process) and score them. Returns (rollouts, scores); prompt_index: position in `examples`."""
        from metis_cli.rewards.batch import score_rollouts
        from metis_cli.stages.hdpo_dist import own, place, rollout_seed, share

        mine = share(examples, self.replicas)
        seed = rollout_seed(derive_seed(HDPO_STEP_SEED, self.recipe.run.seed, self.step), self.replicas)
        rollouts = own(place(self.engine.run([e.messages for e in mine], self.cfg.group_size, seed=seed,
                                             images=self._images(mine)), self.replicas), self.replicas)
        scores = score_rollouts(rollouts, examples, self.checker, self.recipe.reward, retries=self.cfg.unscored_retries)
        return rollouts, scores

    def advantages(self, rollouts, scores):
        """(ScoredBatch with its keep mask, Advantages) of a step's scored rollouts."""
        from metis_cli.algo.estimators import estimate, keep_mask
        from metis_cli.stages.hdpo_step import scored_batch

        batch = scored_batch(rollouts, scores)
        advantages = estimate(self.cfg.estimator, batch, self.cfg)
        keep = keep_mask(batch, advantages, drop_no_signal_groups=self.cfg.drop_no_signal_groups)
        return batch.with_keep(keep), advantages

    def update(self, rollouts, batch, advantages, everyone=None):
        """PPO-clip update(s) on the kept rollouts, then the weight sync; UpdateFigures, or None
        when no rollout is kept (nothing trained, nothing synced). `rollouts`: this process's;
        `everyone`: the step's in `batch` order (`stages.hdpo_dist.gather`; one process: the same)."""
        from metis_cli.stages.hdpo_dist import update_share

        if not bool(batch.keep.any()):
            return None
        with self.backend.asleep():  # vLLM's sleep mode frees the engine's GPU memory for the update
            figures = update_share(
                self.model, self.weights, rollouts, everyone or rollouts, batch, advantages, self.cfg, self.dist,
                pad_token_id=self.tokenizer.pad_token_id, temperature=self.recipe.rollout.temperature,
                logits_budget_mib=self.recipe.model.logits_budget_mib,
                device=self.device, reference=self.reference, vision=self.vision,
                rehearse=self._rehearse if self.rehearsal is not None else None,
            )
            self.weights.zero_grad()  # the gradients' memory goes back before the engine wakes and the rollouts
        self.sync_weights()
        return figures

    def sync_weights(self) -> None:
        """The trained weights into the rollout backend (after an update, and on resume)."""
        from metis_cli.train.distributed import compute_dtype, copy_full_weights, full_state_dict_iter

        if not self.dist.enabled:
            self.backend.update_weights(self.model)
        elif self.rollout_model is not None:
            copy_full_weights(self.model, self.rollout_model)
            self.backend.update_weights(self.rollout_model)
        else:  # vLLM: each tensor gathered from the shards on its own, streamed into the engine (LoRA merged)
            from metis_cli.agent.lora_stream import merged_lora_stream

            gathered = full_state_dict_iter(self.model, dtype=compute_dtype(self.recipe, self.device),
                                            device=self.device, tied_names=True)
            self.backend.load_weights(merged_lora_stream(self.model, gathered))

    def _images(self, examples) -> list[list] | None:
        """Each training prompt's images, read now (a vision-language policy; None for a text-only
        one): a step's prompts change every step, so they are not kept (the held-out ones are)."""
        return [e.load_images() for e in examples] if self.vision is not None else None

    def evaluate(self) -> dict:
        """Greedy pass over the held-out prompts (`stages.hdpo_eval`); `eval/<subset>/<figure>` entries."""
        from metis_cli.stages.hdpo_step import eval_figures

        if not self.held_out.examples:
            return {}
        summary = self.held_out.summary(self.engine, self.checker, self.recipe.reward,
                                        retries=self.cfg.unscored_retries)
        self.eval_history.append((self.step, summary))
        return eval_figures(summary)

    def train(self) -> None:
        from metis_cli.model.runtime import rng_state
        from metis_cli.rewards.batch import rollout_figures
        from metis_cli.rewards.tool_economy import per_tool_figures
        from metis_cli.stages.hdpo_dist import first_fault, gather
        from metis_cli.stages.hdpo_eval import save_samples
        from metis_cli.stages.hdpo_guard import JudgeFigures
        from metis_cli.stages.hdpo_step import StepMetrics, eval_line, sample_rows, step_prompts
        from metis_cli.telemetry import control
        from metis_cli.telemetry import metrics as m
        from metis_cli.telemetry.progress import StageProgress
        from metis_cli.train.distributed import broadcast_object

        started = time.time()
        with StageProgress(f"hdpo[{self.cfg.estimator}]", self.cfg.steps, quiet=self.quiet, completed=self.step) as bar:
            if self.step == 0:
                record = {m.STAGE: "hdpo", m.STEP: 0, m.TOTAL_STEPS: self.cfg.steps, m.TIME: time.time(),
                          **self.evaluate()}
                self._log(record)
                bar.log(eval_line(0, record))
            while self.step < self.cfg.steps:
                step_start = time.time()
                rng_at_start = rng_state()
                self.guard.begin_step()
                examples = [self.prompts[i] for i in step_prompts(len(self.prompts), self.cfg.prompts_per_step,
                                                                  self.recipe.run.seed, self.step)]
                rollouts, scores = self.rollout_step(examples)  # this process's share
                samples = sample_rows(self.cfg, self.step + 1, len(examples) * self.cfg.group_size)
                group = self.cfg.group_size
                everyone, all_scores = gather(self.dist, rollouts, scores, {divmod(i, group) for i in samples})
                rollout_s = time.time() - step_start
                fault = first_fault(self.dist, self.guard.observe(JudgeFigures.of(all_scores)))
                if fault is not None:
                    self._stop_for_fault(fault, rng_at_start)
                batch, advantages = self.advantages(everyone, all_scores)
                update_start = time.time()
                self._set_lr()
                update = self.update(rollouts, batch, advantages, everyone)
                update_s = time.time() - update_start
                self.step += 1
                step_metrics = StepMetrics.measure(
                    batch, advantages, rollout_figures(everyone, all_scores), step=self.step,
                    total_steps=self.cfg.steps, estimator=self.cfg.estimator, update=update, rollout_s=rollout_s,
                    update_s=update_s, step_s=time.time() - step_start, elapsed_s=time.time() - started,
                    lr=self.optimizer.param_groups[0]["lr"], world_size=self.dist.world_size,
                    per_tool=per_tool_figures(everyone, self.registry.names()),
                )
                if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                    step_metrics.eval = self.evaluate()
                    bar.log(eval_line(self.step, step_metrics.eval))
                if samples and self.dist.is_main:
                    save_samples(self.stage_dir, self.step, everyone, all_scores, examples, advantages, samples)
                requests = broadcast_object(self.dist, control.pending(self.stage_dir) if self.dist.is_main else None)
                if self.step % self.cfg.save_every == 0 or requests:
                    step_metrics.checkpoint = str(self.save_checkpoint())
                    for what in requests if self.dist.is_main else ():
                        control.clear(self.stage_dir, what)
                self._log(step_metrics.to_record())
                figures = step_metrics.rollouts
                bar.update(self.step, acc="-" if figures.accuracy is None else figures.accuracy,  # none scored
                           tools=figures.tool_call_ratio, q2=step_metrics.efficiency_group_share,
                           step_s=step_metrics.step_s, unscored=figures.unscored or None)
                if "stop" in requests:
                    bar.log(f"hdpo: stopped at step {self.step} on request; resume with --resume")
                    self.stopped = True
                    return

    def _log(self, record: dict) -> None:
        """One metrics.jsonl row (rank 0 writes it)."""
        if self.metrics is not None:
            self.metrics.append(record)

    # ---------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        import gc

        if hasattr(self, "backend"):
            self.backend.close()
        for name in ("model", "rollout_model", "reference", "optimizer", "weights", "backend", "engine"):
            self.__dict__.pop(name, None)
        gc.collect()


def run(recipe, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> HdpoResult:
    from metis_cli.train.distributed import stop_together, teardown

    stage = HdpoStage(recipe, resume=resume, overwrite=overwrite, quiet=quiet)
    stage.setup()
    try:
        with stop_together(stage.dist):
            stage.train()
            final = stage.save() if not stage.stopped else stage.stage_dir / "final"
        first = stage.eval_history[0][1] if stage.eval_history else {}
        last = stage.eval_history[-1][1] if stage.eval_history else {}
        result = HdpoResult(stage.stage_dir, final, stage.step, stage.stopped, first, last)
    finally:
        stage.cleanup()
    teardown()  # only after success: after a failed collective the process just exits
    return result
