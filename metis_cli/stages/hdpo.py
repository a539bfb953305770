"""`metis hdpo`: RL with Hierarchical Decoupled Policy Optimization (and its baselines).

What one step does (DESIGN.md "HDPO, exactly"):
  1. Take `prompts_per_step` prompts; sample G = `group_size` multi-turn rollouts each (tools run
     inside the sampler; tool output tokens are forced and never trained on).
  2. Rewards per rollout i with T_i tool calls:
        r_acc_i  = 0.9 * correct_i + 0.1 * format_ok_i
        r_tool_i = 1 / (T_i + 1) if correct_i else 0
     A rollout the judge cannot score (after retries) is excluded from its group and counted.
  3. Advantages per group (`algo.advantages.hdpo_advantages`):
        A_acc_i  = (r_acc_i - mean(r_acc)) / (std(r_acc) + 1e-6)           over all G
        Q        = { i : r_tool_i > 0 }                                     (correct rollouts)
        A_tool_i = (r_tool_i - mean_Q) / (std_Q + 1e-6) for i in Q if |Q| >= 2, else 0
  4. Loss: L = w_acc * L_clip(A_acc) + w_tool * L_clip(A_tool), PPO clip 0.2, on the same
     log-probs; L_acc averages over all sampled tokens, L_tool over sampled tokens of rollouts
     with A_tool != 0. Optional k3 KL to the frozen initial policy (off by default, as in the
     paper). Old log-probs are the trainer's own (recomputed), not the sampler's; the gap is
     logged as `logprob_mismatch`.
  Early on few groups have two correct rollouts, so the efficiency channel is mostly silent and
  accuracy dominates; as accuracy rises it switches on by itself (`efficiency_group_share`).
Baselines (`hdpo.estimator`): grpo (accuracy channel only), coupled (one scalar reward
r_acc - coef*T or r_acc + coef*r_tool, one normalisation), gdpo (each reward normalised per
group, summed, one loss).

Shape: `HdpoStage` with `setup()` (`_setup_model`, `_setup_engine`, `_setup_data`,
`_setup_optimizer`, `_resume`), `train()` (`rollout_step`, `update`, `evaluate`), `save()`,
`cleanup()`; `run()` wires them.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from metis_cli.errors import DataError
from metis_cli.files import write_atomic


@dataclass
class HdpoResult:
    stage_dir: Path
    final_dir: Path
    steps: int
    stopped: bool
    eval_first: dict = field(default_factory=dict)
    eval_last: dict = field(default_factory=dict)


class HdpoStage:
    def __init__(self, recipe, *, resume: bool = False, overwrite: bool = False, quiet: bool = False):
        self.recipe, self.cfg = recipe, recipe.hdpo
        self.resume, self.overwrite, self.quiet = resume, overwrite, quiet
        self.stage_dir = Path(self.cfg.output)
        self.step = 0
        self.stopped = False
        self.eval_history: list[tuple[int, dict]] = []

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from metis_cli.telemetry.run import MetricsLog, prepare_stage_dir, stage_inputs, write_resolved_recipe
        from metis_cli.model.runtime import pick_device, quiet_libraries, seed_everything, setup_threads

        prepare_stage_dir(self.stage_dir, resume=self.resume, overwrite=self.overwrite, command="hdpo",
                          inputs=stage_inputs(self.recipe, "hdpo"))
        write_resolved_recipe(self.recipe)
        quiet_libraries()
        setup_threads(self.recipe.run.threads)
        self.device = pick_device(self.recipe.run.device)
        seed_everything(self.recipe.run.seed)
        self.metrics = MetricsLog(self.stage_dir / "metrics.jsonl")
        self._setup_data()
        self._setup_model(self.cfg.init_from, field_name="hdpo.init_from")
        self._setup_engine()
        self._setup_optimizer()
        if self.resume:
            self._resume()

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

        self.model, self.tokenizer = load_policy(path, self.recipe, device=self.device, field=field_name)
        self.model.train()
        self.reference = None
        if self.cfg.kl_coef > 0:
            from metis_cli.model.loading import load_model
            from metis_cli.model.runtime import pick_dtype

            self.reference = load_model(self.cfg.init_from, dtype=pick_dtype(self.recipe.model.dtype, self.device),
                                        device=self.device, field="hdpo.init_from").eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)

    def _setup_engine(self) -> None:
        from metis_cli.agent.factory import build_backend, build_engine, build_registry
        from metis_cli.rewards.batch import build_checker

        self.registry = build_registry(self.recipe)
        self.backend = build_backend(self.recipe, self.model, self.tokenizer, model_path=self.cfg.init_from)
        self.engine = build_engine(self.recipe, self.backend, self.tokenizer, self.registry)
        self.checker = build_checker(self.recipe.reward)

    def _setup_optimizer(self) -> None:
        import torch

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _resume(self) -> None:
        from metis_cli.train.checkpoint import latest_checkpoint, load_trainer_state
        from metis_cli.model.runtime import set_rng_state

        checkpoint = latest_checkpoint(self.stage_dir)
        if checkpoint is None:
            return
        self._setup_model(str(checkpoint), field_name="checkpoint")
        self.backend.update_weights(self.model)
        self.engine.backend = self.backend
        self._setup_optimizer()
        state = load_trainer_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.eval_history = state.get("eval_history", [])
        self.metrics.truncate_after(self.step)
        if not self.quiet:
            print(f"hdpo: resumed from {checkpoint} at step {self.step}/{self.cfg.steps}")

    # ------------------------------------------------------------------------------ data
    def _step_prompts(self, step: int) -> list[int]:
        """Prompt indices of a step: epochs of seeded permutations, so a resumed run continues
        exactly where the killed one was."""
        n, per_step = len(self.prompts), self.cfg.prompts_per_step
        indices = []
        for position in range(step * per_step, (step + 1) * per_step):
            epoch, offset = divmod(position, n)
            order = list(range(n))
            random.Random(self.recipe.run.seed * 7919 + epoch).shuffle(order)
            indices.append(order[offset])
        return indices

    # ------------------------------------------------------------------------------ step
    def rollout_step(self, examples):
        """Sample G rollouts per example and score them. Returns (rollouts, scores)."""
        from metis_cli.rewards.batch import score_rollouts

        rollouts = self.engine.run([e.messages for e in examples], self.cfg.group_size,
                                   seed=self.recipe.run.seed * 100003 + self.step)
        scores = score_rollouts(rollouts, examples, self.checker, self.recipe.reward, retries=self.cfg.unscored_retries)
        return rollouts, scores

    def advantages(self, rollouts, scores):
        """(a_acc, a_tool or None, scored mask, group ids, r_acc, r_tool) as [N] tensors."""
        import torch

        from metis_cli.algo import advantages as adv

        scored = torch.tensor([s.correct is not None for s in scores])
        r_acc = torch.tensor([s.r_acc if s.r_acc is not None else 0.0 for s in scores])
        r_tool = torch.tensor([s.r_tool if s.r_tool is not None else 0.0 for s in scores])
        calls = torch.tensor([float(r.tool_calls) for r in rollouts])
        groups = torch.tensor([r.prompt_index for r in rollouts])
        estimator = self.cfg.estimator
        a_tool = None
        if estimator == "hdpo":
            a_acc, a_tool = adv.hdpo_advantages(r_acc, r_tool, groups, scored=scored)
        elif estimator == "grpo":
            a_acc = adv.grpo_advantages(r_acc, groups, scored=scored)
        elif estimator == "coupled":
            coupled = adv.coupled_rewards(r_acc, calls, r_tool, self.cfg.coupled.mode, self.cfg.coupled.coef)
            a_acc = adv.grpo_advantages(coupled, groups, scored=scored)
        else:
            a_acc = adv.gdpo_advantages([r_acc, r_tool], groups, scored=scored)
        return a_acc, a_tool, scored, groups, r_acc, r_tool

    def update(self, rollouts, a_acc, a_tool, keep) -> dict:
        """PPO-clip update(s) on the kept rollouts; returns loss figures for metrics."""
        import torch

        from metis_cli.agent.rollout import RolloutBatch
        from metis_cli.algo.losses import hdpo_loss, kl_k3, masked_mean
        from metis_cli.train.logprobs import grouped_token_logprobs, micro_batches_by_prompt

        kept = [r for r, k in zip(rollouts, keep.tolist()) if k]
        if not kept:
            return {}
        index = keep.nonzero().squeeze(-1)
        a_acc, a_tool = a_acc[index], (a_tool[index] if a_tool is not None else None)
        batch = RolloutBatch.from_rollouts(kept, self.tokenizer.pad_token_id)
        prompt_lens = torch.tensor([r.prompt_len for r in kept])
        mask = batch.loss_mask
        acc_total = float(mask.sum())
        tool_total = float(mask[a_tool != 0].sum()) if a_tool is not None else None
        temperature = self.recipe.rollout.temperature
        # Micro-batches hold whole groups, so each prompt runs once per micro-batch and its KV cache
        # serves all of the group's rollouts; each is trimmed to its longest rollout. The loss is
        # unchanged: it divides by batch-wide token totals.
        lengths = batch.attention_mask.sum(1)
        chunks = [(rows, int(lengths[rows].max()))
                  for rows in micro_batches_by_prompt(batch.group_ids, lengths, self.cfg.micro_batch_size)]

        def cut(tensor, chunk):
            rows, width = chunk
            return (tensor[rows, :width] if tensor.dim() == 2 else tensor[rows]).to(self.device)

        def forward(model, chunk, with_entropy=False):
            return grouped_token_logprobs(model, cut(batch.input_ids, chunk),
                                          cut(batch.attention_mask, chunk), cut(prompt_lens, chunk),
                                          temperature=temperature, with_entropy=with_entropy)

        old_logp = None
        if self.cfg.ppo_epochs > 1:
            with torch.no_grad():
                old_logp = [forward(self.model, c)[0] for c in chunks]
        figures = {"loss": 0.0, "loss_acc": 0.0, "loss_tool": 0.0, "clip_frac_acc": 0.0, "clip_frac_tool": 0.0,
                   "kl": 0.0, "entropy": 0.0, "logprob_mismatch": 0.0}
        for epoch in range(self.cfg.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for number, chunk in enumerate(chunks):
                logp, entropy = forward(self.model, chunk, with_entropy=epoch == 0)
                chunk_mask = cut(mask, chunk)
                old = old_logp[number] if old_logp is not None else logp.detach()
                parts = hdpo_loss(
                    logp, old, chunk_mask, cut(a_acc, chunk),
                    cut(a_tool, chunk) if a_tool is not None else None,
                    self.cfg.w_acc, self.cfg.w_tool if a_tool is not None else 0.0, self.cfg.clip_eps,
                    acc_token_total=acc_total, tool_token_total=tool_total or None,
                )
                loss = parts.loss
                share = float(chunk_mask.sum()) / max(acc_total, 1.0)
                if self.reference is not None:
                    with torch.no_grad():
                        ref_logp, _ = forward(self.reference, chunk)
                    kl = kl_k3(logp, ref_logp, chunk_mask)
                    loss = loss + self.cfg.kl_coef * kl * share
                    figures["kl"] += float(kl.detach()) * share / self.cfg.ppo_epochs
                loss.backward()
                if epoch == 0:
                    figures["loss"] += float(parts.loss.detach())
                    figures["loss_acc"] += float(parts.loss_acc)
                    figures["loss_tool"] += float(parts.loss_tool)
                    figures["clip_frac_acc"] += parts.clip_frac_acc * share
                    figures["clip_frac_tool"] += parts.clip_frac_tool * share
                    figures["entropy"] += float(masked_mean(entropy, chunk_mask)) * share
                    sampler = cut(batch.sampler_logprobs, chunk)
                    figures["logprob_mismatch"] += float(masked_mean((logp.detach() - sampler).abs(), chunk_mask)) * share
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
        self.backend.update_weights(self.model)
        return figures

    def evaluate(self) -> dict:
        """Greedy pass over the held-out prompts; `eval/<subset>/<figure>` entries."""
        from metis_cli.rewards.batch import score_rollouts, subset_summary

        if not self.eval_examples:
            return {}
        rollouts = self.engine.run([e.messages for e in self.eval_examples], 1, greedy=True)
        scores = score_rollouts(rollouts, self.eval_examples, self.checker, self.recipe.reward,
                                retries=self.cfg.unscored_retries)
        summary = subset_summary(rollouts, scores, self.eval_examples)
        self.eval_history.append((self.step, summary))
        return {f"eval/{subset}/{name}": value for subset, figures in summary.items() for name, value in figures.items()
                if name in ("accuracy", "tool_call_ratio", "tool_calls_mean")}

    def train(self) -> None:
        from metis_cli.algo.advantages import advantage_stats, efficiency_group_share
        from metis_cli.telemetry import control
        from metis_cli.telemetry.progress import StageProgress

        started = time.time()
        with StageProgress(f"hdpo[{self.cfg.estimator}]", self.cfg.steps, quiet=self.quiet, completed=self.step) as bar:
            if self.step == 0:
                record = {"stage": "hdpo", "step": 0, "total_steps": self.cfg.steps, "time": time.time(), **self.evaluate()}
                self.metrics.append(record)
                bar.log(_eval_line(0, record))
            while self.step < self.cfg.steps:
                step_start = time.time()
                examples = [self.prompts[i] for i in self._step_prompts(self.step)]
                rollouts, scores = self.rollout_step(examples)
                rollout_s = time.time() - step_start
                a_acc, a_tool, scored, groups, r_acc, r_tool = self.advantages(rollouts, scores)
                keep = scored.clone()
                if self.cfg.drop_no_signal_groups:
                    signal = (a_acc != 0) | ((a_tool != 0) if a_tool is not None else False)
                    for g in groups.unique():
                        if not bool(signal[groups == g].any()):
                            keep[groups == g] = False
                update_start = time.time()
                figures = self.update(rollouts, a_acc, a_tool, keep)
                update_s = time.time() - update_start
                self.step += 1
                record = self._step_record(rollouts, scores, a_acc, a_tool, scored, groups, r_acc, r_tool, keep)
                record.update(figures)
                record.update({"rollout_s": rollout_s, "update_s": update_s, "step_s": time.time() - step_start,
                               "elapsed_s": time.time() - started, "lr": self.optimizer.param_groups[0]["lr"],
                               "efficiency_group_share": efficiency_group_share(r_tool, groups, scored=scored)})
                record["tokens_per_s"] = record["generated_tokens"] / max(rollout_s, 1e-9)
                for name, values in (("adv_acc", a_acc), ("adv_tool", a_tool)):
                    if values is not None:
                        stats = advantage_stats(values[scored])
                        record.update({f"{name}_{k}": v for k, v in stats.items()})
                if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                    record.update(self.evaluate())
                    bar.log(_eval_line(self.step, record))
                if self.cfg.samples_to_save and (self.step % self.cfg.sample_every == 0 or self.step == 1):
                    self._save_samples(rollouts, scores, examples, a_acc, a_tool)
                requests = control.pending(self.stage_dir)
                if self.step % self.cfg.save_every == 0 or requests:
                    record["checkpoint"] = str(self.save_checkpoint())
                    for what in requests:
                        control.clear(self.stage_dir, what)
                self.metrics.append(record)
                bar.update(self.step, acc=record["accuracy"], tools=record["tool_call_ratio"],
                           q2=record["efficiency_group_share"], step_s=record["step_s"])
                if "stop" in requests:
                    bar.log(f"hdpo: stopped at step {self.step} on request; resume with --resume")
                    self.stopped = True
                    return

    def _step_record(self, rollouts, scores, a_acc, a_tool, scored, groups, r_acc, r_tool, keep) -> dict:
        n = len(rollouts)
        scored_list = [s for s in scores if s.correct is not None]
        errors = [sum(r.tool_errors.values()) for r in rollouts]
        return {
            "stage": "hdpo", "step": self.step, "total_steps": self.cfg.steps, "time": time.time(),
            "estimator": self.cfg.estimator,
            "accuracy": sum(s.correct for s in scored_list) / max(len(scored_list), 1),
            "r_acc_mean": float(r_acc[scored].mean()) if bool(scored.any()) else None,
            "r_tool_mean": float(r_tool[scored].mean()) if bool(scored.any()) else None,
            "format_ok": sum(s.format_ok for s in scores) / n,
            "tool_call_ratio": sum(r.tool_calls >= 1 for r in rollouts) / n,
            "tool_calls_mean": sum(r.tool_calls for r in rollouts) / n,
            "tool_errors": sum(errors),
            "tool_timeouts": sum(r.tool_errors.get("timeout", 0) for r in rollouts),
            "malformed_tool_calls": sum(r.tool_errors.get("malformed", 0) for r in rollouts),
            "unscored": n - len(scored_list),
            "truncated": sum(r.finish_reason == "length" for r in rollouts),
            "rollouts_trained": int(keep.sum()),
            "generated_tokens": sum(r.generated_tokens for r in rollouts),
            "response_tokens_mean": sum(r.generated_tokens for r in rollouts) / n,
        }

    def _save_samples(self, rollouts, scores, examples, a_acc, a_tool) -> None:
        folder = self.stage_dir / "rollouts"
        folder.mkdir(parents=True, exist_ok=True)
        stride = max(1, len(rollouts) // self.cfg.samples_to_save)
        lines = []
        for i in list(range(0, len(rollouts), stride))[: self.cfg.samples_to_save]:
            r, s, example = rollouts[i], scores[i], examples[rollouts[i].prompt_index]
            lines.append(json.dumps({
                "step": self.step, "prompt_id": example.id, "sample": r.sample_index, "subset": example.subset,
                "question": example.question, "gold": example.answer, "messages": r.messages,
                "final_answer": s.answer, "correct": s.correct, "tool_calls": r.tool_calls,
                "tool_errors": sum(r.tool_errors.values()), "r_acc": s.r_acc, "r_tool": s.r_tool,
                "adv_acc": float(a_acc[i]), "adv_tool": float(a_tool[i]) if a_tool is not None else 0.0,
            }))
        write_atomic(folder / f"step_{self.step:06d}.jsonl", "\n".join(lines) + "\n")

    # ------------------------------------------------------------------------------- save
    def save_checkpoint(self) -> Path:
        from metis_cli.train.checkpoint import save_checkpoint
        from metis_cli.model.runtime import rng_state

        state = {"optimizer": self.optimizer.state_dict(), "rng": rng_state(), "eval_history": self.eval_history}
        return save_checkpoint(self.stage_dir, self.step, self.model, self.tokenizer, state)

    def save(self) -> Path:
        from metis_cli.telemetry.run import mark_done, stage_inputs
        from metis_cli.train.checkpoint import save_model_folder

        final = save_model_folder(self.model, self.tokenizer, self.stage_dir / "final", merge_lora=self.recipe.model.lora.merge)
        first = self.eval_history[0][1] if self.eval_history else {}
        last = self.eval_history[-1][1] if self.eval_history else {}
        mark_done(self.stage_dir, {"steps": self.step, "estimator": self.cfg.estimator, "final": str(final),
                                   "eval_first": first, "eval_last": last, "inputs": stage_inputs(self.recipe, "hdpo")})
        return final

    def cleanup(self) -> None:
        import gc

        close = getattr(self.backend, "close", None) if hasattr(self, "backend") else None
        if close is not None:
            close()
        for name in ("model", "reference", "optimizer", "backend", "engine"):
            self.__dict__.pop(name, None)
        gc.collect()


def _eval_line(step: int, record: dict) -> str:
    parts = []
    for key, value in sorted(record.items()):
        if key.startswith("eval/") and value is not None and not (isinstance(value, float) and math.isnan(value)):
            _, subset, name = key.split("/")
            short = {"accuracy": "acc", "tool_call_ratio": "tools", "tool_calls_mean": "calls"}[name]
            parts.append(f"{subset}.{short}={value:.2f}")
    return f"hdpo eval @ step {step}: " + "  ".join(parts)


def run(recipe, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> HdpoResult:
    stage = HdpoStage(recipe, resume=resume, overwrite=overwrite, quiet=quiet)
    stage.setup()
    try:
        stage.train()
        final = stage.save() if not stage.stopped else stage.stage_dir / "final"
        first = stage.eval_history[0][1] if stage.eval_history else {}
        last = stage.eval_history[-1][1] if stage.eval_history else {}
        return HdpoResult(stage.stage_dir, final, stage.step, stage.stopped, first, last)
    finally:
        stage.cleanup()
