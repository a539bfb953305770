"""`metis sft`: cold-start supervised fine-tuning on chat trajectories.

Loss is next-token cross-entropy on assistant tokens only (prompt and tool output masked; the
mask comes from `data.chat.tokenize_runs`, the same token cut the rollout engine uses),
averaged over the assistant tokens of each optimizer step. Phases train in order (for the tiny
recipe: "knowledge" direct answers, then cold-start tool-use trajectories). Full fine-tuning or
LoRA, gradient accumulation, warmup + cosine/linear decay, held-out eval loss, atomic
checkpoints, `--resume`. AdamW updates fp32 master weights (`train.optimizer`). A micro-batch
becomes model inputs in `train.sft_batch`: packed into one padding-free sequence (`sft.packing`)
or padded rows. What it trains on and in which order (rows, held-out split, the seeded
micro-batch plan, each phase's LR schedule): `stages.sft_data`.

Under torchrun (`--nproc-per-node N`) every rank plans the same global micro-batches and trains on
its share of each (rows rank, rank + N, ...); FSDP2 reduces the gradients, so a step is the step
one process would take on the whole batch. Rank 0 writes the metrics (global figures) and the
final HF folder; checkpoints are sharded (`train.checkpoint.save_sharded_checkpoint`).

Shape: `SftStage(recipe, ...)` with `setup()` (`_setup_model`, `_setup_data`, `_setup_optimizer`,
`_resume`), `train()`, `save()`, `cleanup()`; `run()` wires them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from metis_cli.errors import DataError, RunFolderError
from metis_cli.stages.sft_data import batch_plan, epoch_of, phase_bounds, tokenize_phases
from metis_cli.telemetry import metrics as m
from metis_cli.train.lr_schedule import lr_factor


@dataclass
class SftResult:
    stage_dir: Path
    final_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    stopped: bool = False


class SftStage:
    def __init__(self, recipe, *, resume: bool = False, overwrite: bool = False, quiet: bool = False):
        self.recipe, self.cfg = recipe, recipe.sft
        self.resume, self.overwrite, self.quiet = resume, overwrite, quiet
        self.stage_dir = Path(self.cfg.output)
        self.step = 0
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.stopped = False

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from metis_cli.telemetry.run import MetricsLog, prepare_stage_dir, stage_inputs, write_resolved_recipe
        from metis_cli.host import available_cores
        from metis_cli.model.runtime import pick_device, quiet_libraries, seed_everything, setup_threads
        from metis_cli.train.distributed import init_distributed, run_on_main, training_timeouts

        if not self.cfg.phases:
            raise DataError("sft.phases is empty: add at least one phase with data, e.g. "
                            "phases: [{data: [{path: data/sft.jsonl}], epochs: 2}]")
        self.dist = init_distributed(self.recipe.run.device)
        self.quiet = self.quiet or not self.dist.is_main
        run_on_main(self.dist, lambda: prepare_stage_dir(
            self.stage_dir, resume=self.resume, overwrite=self.overwrite, command="sft",
            inputs=stage_inputs(self.recipe, "sft")))
        run_on_main(self.dist, lambda: write_resolved_recipe(self.recipe))
        quiet_libraries()
        self.threads = setup_threads(self.dist.threads(self.recipe.run.threads, available_cores()))
        self.device = self.dist.device if self.dist.enabled else pick_device(self.recipe.run.device)
        seed_everything(self.recipe.run.seed)
        self.metrics = MetricsLog(self.stage_dir / "metrics.jsonl")
        self._setup_model()
        self._setup_data()
        self._setup_packing()
        self._setup_optimizer()
        if self.resume:
            self._resume()
        training_timeouts(self.dist, self.recipe.run.distributed.timeout_s)

    def _setup_model(self) -> None:
        from metis_cli.model.loading import ensure_base_model, load_policy
        from metis_cli.train.distributed import run_on_main, shard_model

        run_on_main(self.dist, lambda: ensure_base_model(self.recipe))
        self.model, self.tokenizer = load_policy(self.cfg.init_from, self.recipe, field="sft.init_from",
                                                 device="cpu" if self.dist.enabled else self.device)
        from metis_cli.model.vision import load_vision

        # A vision-language policy's image handling (model/vision.py); None for a text-only one.
        self.vision = load_vision(self.cfg.init_from, model=self.model, field="sft.init_from",
                                  trust_remote_code=self.recipe.model.trust_remote_code)
        self.model = shard_model(self.model, self.recipe, self.dist)
        self.model.train()

    def _setup_data(self) -> None:
        """Rows per phase, the held-out rows, the micro-batch plan and each phase's steps (stages/sft_data.py)."""
        self.phases, self.eval_set, self.dropped_too_long = tokenize_phases(
            self.recipe, self.tokenizer, self.vision, quiet=self.quiet)
        self.plan = batch_plan(self.cfg, self.phases, self.recipe.run.seed)
        self.total_steps = math.ceil(len(self.plan) / self.cfg.grad_accum)
        self.bounds = phase_bounds(self.plan, len(self.phases), self.cfg.grad_accum)

    def _setup_packing(self) -> None:
        """`sft.packing`, once the packed layout is shown to give this model's padded losses."""
        from metis_cli.train import sft_batch
        from metis_cli.train.distributed import broadcast_object, compute_dtype, reshard

        self.packing = self.cfg.packing
        if self.packing:
            # Several processes: every rank runs the check's forwards (FSDP collectives) on the same
            # rows, and rank 0's verdict holds for all; the root's parameters, left gathered by a
            # forward without backward, go back to their shards.
            dtype = compute_dtype(self.recipe, self.device) if self.dist.enabled else None
            reason = sft_batch.check_packing(self.model, self.phases[0], pad_id=self.tokenizer.pad_token_id,
                                             device=self.device, dtype=dtype)
            reason = broadcast_object(self.dist, reason)
            if self.dist.enabled:
                reshard(self.model)
            if reason:
                self.packing = False
                if not self.quiet:
                    sft_batch.warn_unpacked(reason, self.cfg.init_from)

    def _setup_optimizer(self) -> None:
        import torch

        from metis_cli.train.optimizer import MasterWeights

        self.weights = MasterWeights(self.model, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.optimizer = self.weights.optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        """Each phase warms up and decays on its own (`train.lr_schedule.lr_factor`). Kept a
        method: LambdaLR's state_dict stores a method's (empty) __dict__, a function's as None,
        so checkpoints stay as they were."""
        return lr_factor(step, self.bounds, self.cfg.warmup_ratio, self.cfg.schedule)

    def _resume(self) -> None:
        from metis_cli.train.checkpoint import is_sharded, latest_checkpoint, load_sharded_checkpoint, load_trainer_state
        from metis_cli.model.runtime import set_rng_state
        from metis_cli.train.distributed import shard_model

        checkpoint = latest_checkpoint(self.stage_dir)
        if checkpoint is None:
            return
        if is_sharded(checkpoint) != self.dist.enabled:
            written_by = "several processes" if is_sharded(checkpoint) else "one process"
            raise RunFolderError(f"{checkpoint} was written by {written_by}: resume it the same way "
                                 f"({'with' if is_sharded(checkpoint) else 'without'} --nproc-per-node), "
                                 "or pass --overwrite to start over")
        if self.dist.enabled:
            state = load_sharded_checkpoint(checkpoint, self.model, self.optimizer, self.dist)
        else:
            from metis_cli.model.loading import load_policy

            self.model, _ = load_policy(str(checkpoint), self.recipe, device=self.device, field="checkpoint")
            self.model = shard_model(self.model, self.recipe, self.dist)
            self.model.train()
            state = load_trainer_state(checkpoint)
            self._setup_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
            self.weights.load_state_dict(state.get("master_weights"))
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        if self.dist.is_main:
            self.metrics.truncate_after(self.step)
        if not self.quiet:
            print(f"sft: resumed from {checkpoint} at step {self.step}/{self.total_steps}")

    # ------------------------------------------------------------------------------ train
    def _inputs(self, batch: list, rows: list):
        """This rank's `rows` of the global micro-batch `batch` as model inputs: packed when
        packing is on and every row of `batch` is a text row (the same choice on every rank)."""
        from metis_cli.train import sft_batch

        packing = self.packing and all(sft_batch.is_packable(row) for row in batch)
        return sft_batch.build(rows, packing=packing, pad_id=self.tokenizer.pad_token_id, device=self.device)

    def _share(self, batch: list) -> tuple[list, int]:
        """This rank's rows of a global micro-batch (rank, rank + N, ...) and the factor its loss
        is scaled by: FSDP averages gradients over the N ranks, so N gives back the gradient of
        the whole batch. A rank left without rows runs the first one scaled by 0 (every rank
        must take part in each forward and backward)."""
        rows = batch[self.dist.rank :: self.dist.world_size]
        return (rows, self.dist.world_size) if rows else (batch[:1], 0)

    def evaluate(self) -> float | None:
        import torch

        from metis_cli.train import sft_batch
        from metis_cli.train.distributed import all_reduce_sum

        if not self.eval_set:
            return None
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.eval_set), self.cfg.batch_size):
                batch = self.eval_set[i : i + self.cfg.batch_size]
                rows, scale = self._share(batch)
                inputs = self._inputs(batch, rows)
                with sft_batch.routing(self.model, inputs):
                    loss, n = sft_batch.loss_sum(self.model, inputs, self.vision)
                if scale:
                    total, count = total + float(loss), count + n
        total, count = all_reduce_sum(self.dist, [total, count])
        self.model.train()
        return total / max(count, 1)

    def train(self) -> None:
        from metis_cli.telemetry import control
        from metis_cli.telemetry.progress import StageProgress
        from metis_cli.train import sft_batch
        from metis_cli.train.distributed import all_reduce_sum, broadcast_object

        accum = self.cfg.grad_accum
        started = time.time()
        with StageProgress("sft", self.total_steps, quiet=self.quiet, completed=self.step) as bar:
            while self.step < self.total_steps:
                step_start = time.time()
                micro = self.plan[self.step * accum : (self.step + 1) * accum]
                batches = [[self.phases[p][i] for i in indices] for p, indices in micro]
                tokens = sum(int(sum(row[1])) for batch in batches for row in batch)
                self.weights.zero_grad()
                total = 0.0
                for batch in batches:
                    rows, scale = self._share(batch)
                    inputs = self._inputs(batch, rows)
                    with sft_batch.routing(self.model, inputs):  # also for backward (checkpointing recomputes)
                        loss_sum, _ = sft_batch.loss_sum(self.model, inputs, self.vision)
                        (loss_sum * scale / max(tokens, 1)).backward()
                    if scale:  # summed on the device, read once per step: one sync, not one per micro-batch
                        total = total + loss_sum.detach().double()
                (total,) = all_reduce_sum(self.dist, [float(total)])
                lr = self.scheduler.get_last_lr()[0]
                stats = self.weights.step(self.cfg.grad_clip)
                self.scheduler.step()
                self.step += 1
                self.last_loss = total / max(tokens, 1)
                step_s = time.time() - step_start
                epoch = epoch_of(self.step, self.plan, self.phases, grad_accum=accum, batch_size=self.cfg.batch_size)
                record = {  # names: telemetry/metrics.py
                    m.STAGE: "sft", m.STEP: self.step, m.TOTAL_STEPS: self.total_steps,
                    m.EPOCH: epoch, m.PHASE: micro[0][0], m.LOSS: self.last_loss,
                    m.LR: lr, m.TOKENS_PER_S: tokens / max(step_s, 1e-9), m.STEP_S: step_s,
                    m.ELAPSED_S: time.time() - started, m.TIME: time.time(),
                    m.GRAD_NORM: stats.grad_norm, m.UPDATE_RMS: stats.update_rms, m.WORLD_SIZE: self.dist.world_size,
                }
                if self.step % self.cfg.eval_every == 0 or self.step == self.total_steps:
                    self.last_eval_loss = record[m.EVAL_LOSS] = self.evaluate()
                requests = broadcast_object(self.dist, control.pending(self.stage_dir) if self.dist.is_main else None)
                if self.step % self.cfg.save_every == 0 or requests:
                    record[m.CHECKPOINT] = str(self.save_checkpoint())
                    for what in requests if self.dist.is_main else ():
                        control.clear(self.stage_dir, what)
                if self.dist.is_main:
                    self.metrics.append(record)
                bar.update(self.step, loss=self.last_loss, eval_loss=self.last_eval_loss, lr=lr)
                if "stop" in requests:
                    bar.log(f"sft: stopped at step {self.step} on request; resume with --resume")
                    self.stopped = True
                    return

    # ------------------------------------------------------------------------------- save
    def save_checkpoint(self) -> Path:
        from metis_cli.train.checkpoint import save_checkpoint, save_sharded_checkpoint
        from metis_cli.model.runtime import rng_state

        if self.dist.enabled:
            state = {"scheduler": self.scheduler.state_dict(), "rng": rng_state()}
            return save_sharded_checkpoint(self.stage_dir, self.step, self.model, self.optimizer, state, self.dist)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng_state()}
        if self.weights.has_copies:
            state["master_weights"] = self.weights.state_dict()
        return save_checkpoint(self.stage_dir, self.step, self.model, self.tokenizer, state)

    def save(self) -> Path:
        from metis_cli.model.runtime import pick_dtype
        from metis_cli.telemetry.run import mark_done, stage_inputs
        from metis_cli.train.checkpoint import save_gathered_model_folder, save_model_folder
        from metis_cli.train.distributed import run_on_main

        merge = self.recipe.model.lora.merge
        if self.dist.enabled:
            final = save_gathered_model_folder(self.model, self.tokenizer, self.stage_dir / "final", self.dist,
                                               dtype=pick_dtype(self.recipe.model.dtype, self.device), merge_lora=merge)
        else:
            final = save_model_folder(self.model, self.tokenizer, self.stage_dir / "final", merge_lora=merge)
        run_on_main(self.dist, lambda: mark_done(self.stage_dir, {
            "steps": self.step, "loss": self.last_loss, "eval_loss": self.last_eval_loss,
            "dropped_too_long": self.dropped_too_long, "packing": self.packing, "final": str(final),
            "world_size": self.dist.world_size,
            "inputs": stage_inputs(self.recipe, "sft")}))
        return final

    def cleanup(self) -> None:
        import gc

        for name in ("model", "optimizer", "scheduler", "weights"):
            self.__dict__.pop(name, None)
        gc.collect()


def run(recipe, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> SftResult:
    from metis_cli.train.distributed import stop_together, teardown

    stage = SftStage(recipe, resume=resume, overwrite=overwrite, quiet=quiet)
    stage.setup()
    try:
        with stop_together(stage.dist):
            stage.train()
            final = stage.save() if not stage.stopped else stage.stage_dir / "final"
        result = SftResult(stage.stage_dir, final, stage.step, stage.last_loss, stage.last_eval_loss, stage.stopped)
    finally:
        stage.cleanup()
    teardown()  # only after success: after a failed collective the process just exits
    return result
