"""hdpo on several processes (`metis hdpo RECIPE --nproc-per-node N`, or torchrun): what a rank
does differently from one process, and what it must agree on with the others. With one process
every function here returns its input, so `stages.hdpo` runs the same code either way.

- Prompts: every rank computes the step's P prompts; rank r rolls out positions r, r + N, ...
  (`share`), whole groups of G, so the advantages -- normalised per group -- need no other rank.
  `place` renumbers its rollouts' `prompt_index` to the prompt's position in the step, so a
  group has one id on every rank. The held-out eval is split the same way.
- Tensor-parallel engines (`rollout.vllm.tensor_parallel_size` T > 1, `Replicas`): T consecutive
  ranks share one vLLM engine, and every rank of it must send the engine the same requests in
  the same order. So the N / T replicas, not the ranks, share out the prompts; a replica's ranks
  sample the same prompts with the same seed, in turn-synchronous waves (continuous batching
  would order requests by tool timing, which differs between processes), and see the same tool
  results: its first rank runs every call and broadcasts the results (`LeaderTools`). Then each
  of its ranks keeps every T-th of the replica's groups (`own`) to score, log and train, so every
  rollout counts once.
- Sampling: each rank samples from its own unsharded copy of the policy in the compute dtype:
  with the HF backend a model (`rollout_copy`) refreshed from the FSDP shards after each update
  (`train.distributed.copy_full_weights`, one tensor at a time); with vLLM the rank's own engine
  (agent/vllm_engine.py, `external_launcher`), into which each tensor is streamed as it is
  gathered (`HdpoStage.sync_weights`; a tensor-parallel engine keeps its slice of each), so no
  rank holds the whole model outside it. Not from the FSDP model itself: each of its forwards is
  a collective, and the ranks' rollouts end after different numbers of decode steps, so their
  forwards could not pair up. `rollout_seed`: one process keeps the step's seed; replica i of
  N > 1 processes samples with `derive_seed(HDPO_STEP_SEED, step_seed, i)`. A
  batched sampler draws every row of a call from one generator, so what a prompt gets depends
  on the prompts beside it: a run repeats exactly for the same number of processes, not across
  numbers.
- Figures: `gather` brings every rank's rollouts (without token ids; messages and images only for
  the saved samples) and scores to every rank in the step's order; every rank then
  computes the same ScoredBatch, advantages and keep mask, and rank 0 logs one metrics row with
  the step's figures. A fault (`stages.hdpo_guard`) seen by any rank stops all (`first_fault`).
- Update: `update_share` trains this rank's kept rollouts with the step's advantages; its
  `UpdateScope` makes `policy_update`'s token denominators the step's (the gradient equals one
  process's on the whole batch, FSDP averaging over ranks), pads a rank with fewer micro-batches
  with stand-ins that train nothing, and makes every rank run the same forward passes per
  micro-batch (a prompt's KV is reused only where every rank's micro-batch at that position can
  reuse one), because each FSDP forward and backward is a collective.

Writes no files (checkpoints: `train.checkpoint`); must not touch the optimizer step, rewards or
the advantage maths.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
from torch import Tensor

from metis_cli.algo.types import Advantages
from metis_cli.model.runtime import HDPO_STEP_SEED, derive_seed
from metis_cli.stages.hdpo_update import MicroBatch, UpdateFigures, micro_batches, policy_update
from metis_cli.train.distributed import (DistributedContext, DistributedError, all_gather_objects, all_reduce_sum,
                                         broadcast_object, consecutive_groups, patient)

PER_STEP_FIGURES = ("grad_norm", "update_rms")
"""UpdateFigures that are already the step's on every rank (the others are sums of shares)."""


# ------------------------------------------------------------------------------ prompts, sampling
@dataclass(frozen=True)
class Replicas:
    """The rollout engines of the job: `size` consecutive ranks per engine (a tensor-parallel vLLM
    engine; 1: every rank samples on its own), the replica of this rank, its place in it."""

    context: DistributedContext
    size: int = 1
    group: Any = None
    """The process group of this rank's replica (`train.distributed.consecutive_groups`); size > 1."""

    @classmethod
    def for_recipe(cls, recipe, context: DistributedContext) -> Replicas:
        """The layout `rollout.vllm.tensor_parallel_size` asks for (`check` has vetted it)."""
        size = recipe.rollout.vllm.tensor_parallel_size if recipe.rollout.backend == "vllm" else 1
        size = size if context.enabled else 1
        return cls(context, size, consecutive_groups(context, size))

    @property
    def index(self) -> int:
        return self.context.rank // self.size

    @property
    def count(self) -> int:
        return self.context.world_size // self.size

    @property
    def member(self) -> int:
        return self.context.rank % self.size

    @property
    def leader(self) -> int:
        """The global rank of the replica's first rank."""
        return self.index * self.size


def share(items: list, replicas: Replicas) -> list:
    """This rank's replica's items: positions i, i + R, ... of R replicas (every rank's own with
    tensor parallel 1; all of them on one process)."""
    return items[replicas.index :: replicas.count]


def place(rollouts: list, replicas: Replicas) -> list:
    """Renumber rollouts of `share(items)` (prompt_index = position in the share) to the
    position in `items`, in place; returns them."""
    for rollout in rollouts:
        rollout.prompt_index = replicas.index + rollout.prompt_index * replicas.count
    return rollouts


def own(rollouts: list, replicas: Replicas) -> list:
    """The placed rollouts this rank scores and trains: every group with tensor parallel 1; with
    T ranks per replica, the groups at positions member, member + T, ... of the replica's share."""
    if replicas.size == 1:
        return rollouts
    return [r for r in rollouts if (r.prompt_index // replicas.count) % replicas.size == replicas.member]


def rollout_seed(step_seed: int, replicas: Replicas) -> int:
    """One process keeps the step's seed; a replica of several derives its own, the same on each of its ranks."""
    if not replicas.context.enabled:
        return step_seed
    return derive_seed(HDPO_STEP_SEED, step_seed, replicas.index)


class LeaderTools:
    """The tool registry a tensor-parallel replica's rollout engines call: the replica's first
    rank runs each wave's calls and broadcasts the results, the others wait for them, so all its
    ranks append the same tool turns (a tool's timing, state or failure may differ between
    processes; the engine's requests must not). Tool sessions live on the first rank only."""

    def __init__(self, registry, replicas: Replicas):
        self.registry, self.replicas = registry, replicas

    def execute_many(self, calls: list, sessions: list | None = None, contexts: list | None = None) -> list:
        outcome = None
        if self.replicas.member == 0:
            try:
                outcome = ("results", self.registry.execute_many(calls, sessions=sessions, contexts=contexts))
            except Exception as error:  # noqa: BLE001 - the other ranks must not wait for results that never come
                outcome = ("error", f"{type(error).__name__}: {error}")
        with patient(self.replicas.context):  # the tools' own time limits bound the wait
            kind, value = broadcast_object(self.replicas.context, outcome, src=self.replicas.leader,
                                           group=self.replicas.group)
        if kind == "error":
            raise RuntimeError(f"a tool call on rank {self.replicas.leader} failed: {value}")
        return value

    def end_session(self, session) -> None:
        if self.replicas.member == 0:
            self.registry.end_session(session)

    def __getattr__(self, name: str):  # specs(), names(), get(): the registry's
        return getattr(self.registry, name)


class LockstepBackend:
    """The generation backend of a rank of a tensor-parallel replica: before each call its ranks
    compare a digest of what they are about to send. Different requests would be a metis bug (the
    replica's ranks run the same code on the same inputs), and the engine's collectives would
    pair mismatched batches and hang; this stops the job with a message instead."""

    def __init__(self, backend, replicas: Replicas):
        self.backend, self.replicas = backend, replicas

    def generate(self, prompts: list, params, **images):
        import hashlib

        digest = hashlib.sha1(repr((prompts, params, {k: len(v) for k, v in images.items()})).encode()).hexdigest()
        with patient(self.replicas.context):  # a rank may still be running its tools' share of the wave
            digests = all_gather_objects(self.replicas.context, digest, group=self.replicas.group)
        if len(set(digests)) > 1:
            raise DistributedError(f"the {self.replicas.size} processes of tensor-parallel engine {self.replicas.index} "
                                   "were about to send it different requests (a metis bug: please report it); "
                                   "stopping instead of letting the engine hang")
        return self.backend.generate(prompts, params, **images)

    def __getattr__(self, name: str):
        return getattr(self.backend, name)


def rollout_copy(model, device: str, dtype):
    """An unsharded copy of the freshly loaded `model` (before `shard_model`) that this rank
    samples from: `dtype` (the compute dtype), on `device`, frozen, in eval mode."""
    twin = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    for param in twin.parameters():
        param.requires_grad_(False)
    return twin


def check(recipe, context: DistributedContext) -> None:
    """Recipe settings several processes cannot run (a MetisError saying what to change)."""
    from metis_cli.errors import MetisError

    if not context.enabled:
        return
    if recipe.hdpo.prompts_per_step < context.world_size:
        raise MetisError(f"hdpo.prompts_per_step ({recipe.hdpo.prompts_per_step}) is below the number of processes "
                         f"({context.world_size}): each process rolls out whole groups; set it to at least "
                         f"{context.world_size} (a multiple of it keeps the processes evenly loaded)")
    ptx = recipe.hdpo.ptx
    if ptx.enabled and ptx.batch_size % context.world_size:
        raise MetisError(f"hdpo.ptx.batch_size ({ptx.batch_size}) is not a multiple of the number of processes "
                         f"({context.world_size}): each process rehearses an equal share of the rows (one FSDP "
                         f"forward each); set it to a multiple of {context.world_size}")
    tensor_parallel = recipe.rollout.vllm.tensor_parallel_size
    if recipe.rollout.backend == "vllm" and context.world_size % tensor_parallel:
        raise MetisError(f"rollout.vllm.tensor_parallel_size ({tensor_parallel}) does not divide the number of "
                         f"processes ({context.world_size}): each engine spans that many processes; use a divisor "
                         f"of {context.world_size}, or a multiple of {tensor_parallel} processes")


def load_sharded(checkpoint, model, optimizer, context: DistributedContext) -> dict:
    """Resume from a sharded checkpoint (any number of processes); the trainer state. The caller
    then syncs the rollout backend (`HdpoStage.sync_weights`). A checkpoint of one process cannot
    be resumed by several, nor the other way round (a RunFolderError says how to resume it)."""
    from metis_cli.errors import RunFolderError
    from metis_cli.train.checkpoint import is_sharded, load_sharded_checkpoint

    if is_sharded(checkpoint) != context.enabled:
        several = is_sharded(checkpoint)
        raise RunFolderError(f"{checkpoint} was written by {'several processes' if several else 'one process'}: "
                             f"resume it the same way ({'with' if several else 'without'} --nproc-per-node), "
                             "or pass --overwrite to start over")
    return load_sharded_checkpoint(checkpoint, model, optimizer, context)


# ------------------------------------------------------------------------------ figures, faults
def gather(context: DistributedContext, rollouts: list, scores: list, keep_messages=frozenset()):
    """(rollouts, scores) of every rank, on every rank, in the step's order (prompt position,
    then sample), light: no token ids or loss masks, and messages and images only for the
    (prompt_index, sample_index) keys in `keep_messages` (the step's saved samples)."""
    if not context.enabled:
        return rollouts, scores
    mine = [(_light(r, (r.prompt_index, r.sample_index) in keep_messages), s) for r, s in zip(rollouts, scores)]
    with patient(context):  # the first rank done with its rollouts waits here for the slowest
        parts = all_gather_objects(context, mine)
    pairs = [pair for part in parts for pair in part]
    pairs.sort(key=lambda pair: (pair[0].prompt_index, pair[0].sample_index))
    return [r for r, _ in pairs], [s for _, s in pairs]


def _light(rollout, keep_messages: bool):
    keep = keep_messages  # a saved sample keeps what its record shows: messages and images
    return replace(rollout, token_ids=[], loss_mask=[], sampler_logprobs=[], _turn_start="",
                   messages=rollout.messages if keep else [], images=rollout.images if keep else [])


def first_fault(context: DistributedContext, reason: str | None) -> str | None:
    """The first rank's reason to stop (`FaultGuard.observe`), the same on every rank."""
    if not context.enabled:
        return reason
    reasons = all_gather_objects(context, reason)
    return next((text if rank == 0 else f"rank {rank}: {text}" for rank, text in enumerate(reasons) if text), None)


def stop_with(context: DistributedContext, error: BaseException):
    """Stop every rank for `error`: rank 0 raises it (the CLI prints it once); the others exit
    quietly with 0, so torchrun waits for rank 0's exit code instead of stopping it first."""
    if context.is_main:
        raise error
    raise SystemExit(0)


# ------------------------------------------------------------------------------ update
def update_share(model, weights, local: list, everyone: list, batch, advantages: Advantages, cfg,
                 context: DistributedContext, *, pad_token_id: int, device, vision=None, **rest) -> UpdateFigures:
    """`policy_update` on this rank's kept rollouts.

    local: this rank's rollouts (full); everyone: the step's rollouts in `batch` order (`gather`);
    batch, advantages: the step's ScoredBatch (with its keep mask) and Advantages. `rest`: the
    other keywords of `policy_update` (temperature, reference)."""
    if not context.enabled:
        index = batch.keep.nonzero().squeeze(-1)
        return policy_update(model, weights, [local[i] for i in index.tolist()], advantages.select(index), cfg,
                             pad_token_id=pad_token_id, device=device, vision=vision, **rest)
    row_of = {(r.prompt_index, r.sample_index): row for row, r in enumerate(everyone)}
    mine = [(row_of[r.prompt_index, r.sample_index], r) for r in local]
    mine = [(row, r) for row, r in mine if bool(batch.keep[row])]
    index = torch.tensor([row for row, _ in mine], dtype=torch.long)

    def stand_in() -> MicroBatch:
        zeros = torch.zeros(1)
        return micro_batches(local[:1], Advantages(zeros, zeros if advantages.tool is not None else None), 1,
                             pad_token_id=pad_token_id, device=device, vision=vision)[0]

    scope = UpdateScope(context, batch.group_ids[batch.keep].unique(), stand_in)
    return policy_update(model, weights, [r for _, r in mine], advantages.select(index), cfg,
                         pad_token_id=pad_token_id, device=device, vision=vision, scope=scope, **rest)


@dataclass
class UpdateScope:
    """What `stages.hdpo_update.policy_update` needs to know about the other processes."""

    context: DistributedContext
    kept_groups: Tensor  # [g] sorted ids of the step's kept groups, every rank's
    stand_in: Callable[[], MicroBatch]  # a micro-batch of this rank's rollouts, for a rank that keeps none

    @property
    def world_size(self) -> int:
        return self.context.world_size

    def total(self, value: float) -> float:
        return all_reduce_sum(self.context, [value])[0]

    def others(self, values: list[float]) -> list[float]:
        """The other ranks' sums of `values` (each rank passes its own)."""
        return [total - value for total, value in zip(all_reduce_sum(self.context, values), values)]

    def align(self, minis: list[list[MicroBatch]]) -> list[list[MicroBatch]]:
        """Each mini-batch padded to the most micro-batches any rank has in it (with a copy of one
        of this rank's micro-batches that trains nothing: zero loss mask and advantages), and
        every micro-batch told whether to reuse its prompt's KV: only if every rank's micro-batch
        at that position runs the same two forward passes that way."""
        mine = [c for chunks in minis for c in chunks]
        filler = _as_padding(mine[0] if mine else self.stand_in())
        ranks = all_gather_objects(self.context, ([len(chunks) for chunks in minis],
                                                  [[_two_passes(c) for c in chunks] for chunks in minis],
                                                  _two_passes(filler)))
        aligned = []
        for number, chunks in enumerate(minis):
            count = max(counts[number] for counts, _, _ in ranks)
            chunks = chunks + [filler] * (count - len(chunks))
            agreed = [all(flags[number][j] if j < len(flags[number]) else fill for _, flags, fill in ranks)
                      for j in range(count)]
            aligned.append([c if shared else replace(c, share_prompt=False) for c, shared in zip(chunks, agreed)])
        return aligned

    def reduce(self, figures: UpdateFigures) -> UpdateFigures:
        """The step's figures from every rank's shares of them."""
        names = [f.name for f in fields(figures)
                 if f.name not in PER_STEP_FIGURES and getattr(figures, f.name) is not None]
        totals = all_reduce_sum(self.context, [getattr(figures, name) for name in names])
        return replace(figures, **dict(zip(names, totals)))


def _as_padding(chunk: MicroBatch) -> MicroBatch:
    return replace(chunk, loss_mask=torch.zeros_like(chunk.loss_mask), a_acc=torch.zeros_like(chunk.a_acc),
                   a_tool=None if chunk.a_tool is None else torch.zeros_like(chunk.a_tool), padding=True)


def _two_passes(chunk: MicroBatch) -> bool:
    """Whether `train.logprobs.grouped_token_logprobs` runs two forward passes on this micro-batch
    (a prompt shared by two rows, continuations longer than one token); rows with images count
    as not (their grouping also depends on the images), so they take the plain pass."""
    if any(chunk.images):
        return False
    lengths = chunk.attention_mask.sum(1)
    if int((lengths - chunk.prompt_lens).max()) <= 1:
        return False
    prompts = {tuple(row[:n].tolist()) for row, n in zip(chunk.input_ids, chunk.prompt_lens.tolist())}
    return len(prompts) < len(chunk.input_ids)
