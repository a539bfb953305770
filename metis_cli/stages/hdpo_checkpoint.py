"""What `metis hdpo` writes to disk of the policy and reads back: checkpoints
(`checkpoints/step_<n>/`, sharded on several processes; `train.checkpoint`), resuming from the
latest, the checkpoint taken before a stop for a dead judge or tool service (docs/faults.md), so
that `--resume` redoes the failed step, and the final HF folder with the stage's done marker.

`HdpoCheckpoints` is mixed into `HdpoStage` (stages/hdpo.py) and works on the attributes its
setup made: the policy (`model`, `rollout_model`, `tokenizer`), `optimizer` and `weights`, the
rollout `backend` and `engine`, `dist`, `metrics`, `step` and `eval_history`; resuming a
one-process checkpoint reloads the policy through the stage's `_setup_model` and
`_setup_optimizer`. Must not touch the step's maths (rollouts, advantages, update) or write
metrics rows.
"""

from __future__ import annotations

from pathlib import Path


class HdpoCheckpoints:
    """Checkpoints, resume, stop-for-fault and the final folder of `HdpoStage`."""

    def _resume(self) -> None:
        """Continue from the latest checkpoint (weights, optimizer, RNG, step, eval history); metrics
        rows past it are dropped, to be redone. Without one, the run starts over."""
        from metis_cli.train.checkpoint import is_sharded, latest_checkpoint, load_trainer_state
        from metis_cli.model.runtime import set_rng_state
        from metis_cli.stages.hdpo_dist import load_sharded

        checkpoint = latest_checkpoint(self.stage_dir)
        if checkpoint is None:
            if self.metrics is not None:
                self.metrics.truncate_after(-1)  # nothing was saved: every record, step 0's eval too, is redone
            return
        if self.dist.enabled or is_sharded(checkpoint):
            state = load_sharded(checkpoint, self.model, self.optimizer, self.dist)
            self.sync_weights()
        else:
            self._setup_model(str(checkpoint), field_name="checkpoint")
            self.sync_weights()
            self.engine.backend = self.backend
            self._setup_optimizer()
            state = load_trainer_state(checkpoint)
            self.optimizer.load_state_dict(state["optimizer"])
            self.weights.load_state_dict(state.get("master_weights"))
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.eval_history = state.get("eval_history", [])
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)
        if not self.quiet:
            print(f"hdpo: resumed from {checkpoint} at step {self.step}/{self.cfg.steps}")

    def save_checkpoint(self, rng: dict | None = None) -> Path:
        """checkpoints/step_<step>/ with the trainer state; `rng`: the RNG state to resume with
        (default: the current one)."""
        from metis_cli.train.checkpoint import save_checkpoint, save_sharded_checkpoint
        from metis_cli.model.runtime import rng_state

        if self.dist.enabled:
            state = {"rng": rng or rng_state(), "eval_history": self.eval_history}
            return save_sharded_checkpoint(self.stage_dir, self.step, self.model, self.optimizer, state, self.dist)
        state = {"optimizer": self.optimizer.state_dict(), "rng": rng or rng_state(), "eval_history": self.eval_history}
        if self.weights.has_copies:
            state["master_weights"] = self.weights.state_dict()
        return save_checkpoint(self.stage_dir, self.step, self.model, self.tokenizer, state)

    def _stop_for_fault(self, reason: str, rng_at_start: dict) -> None:
        """Checkpoint the state before the failing step (nothing of it is trained), then stop with
        an EndpointError (exit 2), so that --resume redoes the step once the service is back."""
        from metis_cli.errors import EndpointError
        from metis_cli.stages.hdpo_dist import stop_with
        from metis_cli.train.checkpoint import latest_checkpoint

        failing = self.step + 1
        if self.step == 0:
            saved = "nothing was trained yet"
        else:
            latest = latest_checkpoint(self.stage_dir)
            same = latest is not None and latest.name == f"step_{self.step:06d}"
            saved = f"{latest if same else self.save_checkpoint(rng=rng_at_start)} holds step {self.step}"
        stop_with(self.dist, EndpointError(
            f"hdpo stopped at step {failing}/{self.cfg.steps}: {reason}. Step {failing} was not trained; {saved}. "
            "Bring the service back, then rerun the same command with --resume"))

    def save(self) -> Path:
        """final/: the policy as one HF folder (and merged with `model.lora.merge`), then the
        done marker with the first and last held-out eval."""
        from metis_cli.telemetry.run import mark_done, stage_inputs
        from metis_cli.train.checkpoint import save_gathered_model_folder, save_model_folder
        from metis_cli.train.distributed import compute_dtype, run_on_main

        final, merge = self.stage_dir / "final", self.recipe.model.lora.merge
        if self.dist.enabled:  # rank 0 writes one HF folder from tensors gathered one at a time
            save_gathered_model_folder(self.model, self.tokenizer, final, self.dist,
                                       dtype=compute_dtype(self.recipe, self.device), merge_lora=merge)
        else:
            save_model_folder(self.model, self.tokenizer, final, merge_lora=merge)
        first = self.eval_history[0][1] if self.eval_history else {}
        last = self.eval_history[-1][1] if self.eval_history else {}
        run_on_main(self.dist, lambda: mark_done(self.stage_dir, {
            "steps": self.step, "estimator": self.cfg.estimator, "final": str(final), "eval_first": first,
            "eval_last": last, "world_size": self.dist.world_size, "inputs": stage_inputs(self.recipe, "hdpo")}))
        return final
