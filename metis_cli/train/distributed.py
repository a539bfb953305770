"""Training on several processes (torchrun): the process group, FSDP2 sharding, collectives for
metrics, and full weights gathered layer by layer.

One process is the default and goes through the same calls: `DistributedContext.from_env()`
outside torchrun is rank 0 of 1, `shard_model` only applies gradient checkpointing, the
collectives return their input. Under torchrun (`metis sft RECIPE --nproc-per-node N` starts it):
- `init_distributed` joins the group (gloo on CPU, NCCL on CUDA, one GPU per local rank) with a
  generous timeout for loading; `training_timeouts` then shortens it to `run.distributed.timeout_s`,
  so a collective waiting on a rank that died or hangs fails instead of waiting forever, and
  `patient()` lengthens it again around phases where ranks legitimately wait on each other.
- `shard_model`: `fully_shard` on every decoder layer, then on the root (FSDP2), with
  `MixedPrecisionPolicy(param_dtype=bf16 when the recipe's dtype is bf16, else fp32,
  reduce_dtype=fp32)`; trainable parameters are cast to float32 first, so the shards are the fp32
  master weights (`train.optimizer`) while the forward computes in bf16. LoRA works the same way
  (frozen base weights stay in their dtype).
- `full_state_dict_iter`: every full tensor of the model, gathered from the shards one at a time
  (the final HF folder; `copy_full_weights`: the weight sync into each rank's unsharded rollout
  model), never the whole model on one rank.

It knows nothing about stages, data or rollouts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

from metis_cli.errors import MetisError
from metis_cli.model.loading import unwrapped

STARTUP_TIMEOUT_S = 1800.0
"""Collective timeout while ranks load models and data (and inside `patient()`): loading an 8B
model from a cold disk takes minutes on one rank and seconds on the next."""


class DistributedError(MetisError):
    """The processes of a multi-process run cannot go on together (a rank died, hangs, or
    disagrees about the run folder)."""

    exit_code = 1


@dataclass
class DistributedContext:
    """Where this process stands in the job; the defaults are one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"
    timeout_s: float = STARTUP_TIMEOUT_S
    """What collectives wait for now (`training_timeouts` shortens it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(self.local_world_size, 1))

    @classmethod
    def from_env(cls, device: str = "cpu") -> DistributedContext:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (absent: one process)."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(rank=int(env.get("RANK", "0")), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))), device=device)

    def threads(self, requested: int, cores: int) -> int:
        """Torch threads for this process: the recipe's `run.threads`, else the cores shared out
        over the processes of this node (two processes with two threads on two cores run several
        times slower than with one each)."""
        return requested or max(1, cores // self.local_world_size)


def init_distributed(device_setting: str = "auto") -> DistributedContext:
    """Join the torchrun job this process belongs to (if any) and pick its device."""
    import torch

    context = DistributedContext.from_env()
    if not context.enabled:
        return context
    import torch.distributed as dist

    use_cuda = device_setting != "cpu" and torch.cuda.is_available()
    if device_setting == "cuda" and not use_cuda:
        raise MetisError("run.device is 'cuda' but no CUDA GPU is visible; set run.device: auto or cpu")
    device = f"cuda:{context.local_rank}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(context.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    context.device = device
    return context


def teardown() -> None:
    """End the job's process group after success (every rank calls it). The barrier first: a rank
    that destroys its group while a peer is still finishing its last collective can abort the
    process at exit ("terminate called without an active exception", seen once in CI)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _set_timeout(seconds: float) -> None:
    """Every process group's collective timeout (the default group and FSDP's mesh groups)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if not dist.is_initialized():
        return
    for group in list(distributed_c10d._world.pg_map):
        distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), group)


def training_timeouts(context: DistributedContext, timeout_s: float) -> None:
    """From now on a collective fails after `timeout_s` (`run.distributed.timeout_s`)."""
    if context.enabled:
        barrier(context)  # every rank has loaded; no one is legitimately far behind any more
        context.timeout_s = timeout_s
        _set_timeout(timeout_s)


@contextlib.contextmanager
def patient(context: DistributedContext):
    """Ranks may wait on each other for long inside (saving, rollouts of uneven length): the
    startup timeout holds there, the training timeout again after."""
    if not context.enabled:
        yield
        return
    _set_timeout(STARTUP_TIMEOUT_S)
    try:
        yield
    finally:
        _set_timeout(context.timeout_s)


@contextlib.contextmanager
def stop_together(context: DistributedContext):
    """A collective that fails inside (a partner rank died: connection closed; or hangs: timed
    out) becomes a DistributedError that says so, instead of an internal error."""
    try:
        yield
    except RuntimeError as error:
        import torch.distributed as dist

        text = str(error)
        if not context.enabled or not (isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text):
            raise
        first_line = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
        raise DistributedError(
            f"rank {context.rank}: a collective with the other processes failed ({first_line}); another rank "
            "probably died or hangs (its own error, if it printed one, names it); continue with --resume"
        ) from error


# --------------------------------------------------------------------------------- collectives
def barrier(context: DistributedContext) -> None:
    if context.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(context: DistributedContext, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over ranks (float64)."""
    if not context.enabled:
        return list(values)
    import torch
    import torch.distributed as dist

    device = context.device if context.device.startswith("cuda") else "cpu"
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def all_gather_objects(context: DistributedContext, value: Any, *, group=None) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank (of `group`, a subgroup)."""
    if not context.enabled:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * (context.world_size if group is None else dist.get_world_size(group))
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def broadcast_object(context: DistributedContext, value: Any = None, *, src: int = 0, group=None) -> Any:
    """Rank `src`'s `value`, on every rank (of `group`, a subgroup from `consecutive_groups`)."""
    if not context.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def consecutive_groups(context: DistributedContext, size: int):
    """This rank's group of `size` consecutive ranks (ranks 0..size-1, size..2*size-1, ...), a
    gloo group so it carries Python objects whatever the job's backend; None for size 1. Every
    rank creates every group, in the same order (torch.distributed's rule for new_group)."""
    if size <= 1 or not context.enabled:
        return None
    import torch.distributed as dist

    mine = None
    for first in range(0, context.world_size, size):
        group = dist.new_group(list(range(first, first + size)), backend="gloo")
        if first <= context.rank < first + size:
            mine = group
    return mine


def run_on_main(context: DistributedContext, work: Callable[[], Any]) -> Any:
    """Run `work` on rank 0 only (folder preparation, file writes) and return its result on every
    rank. An error there (e.g. a finished run that would be overwritten) stops every rank, so no
    rank waits for a partner that gave up: rank 0 raises it, the others exit with its exit code
    and print nothing (the message would be the same N times)."""
    if not context.enabled:
        return work()
    if not context.is_main:
        failed, value = broadcast_object(context)
        if failed:
            raise SystemExit(value)
        return value
    try:
        value = work()
    except BaseException as error:
        broadcast_object(context, (True, getattr(error, "exit_code", 1)))
        raise
    broadcast_object(context, (False, value))
    return value


# ---------------------------------------------------------------------------------- sharding
def decoder_layers(model) -> list:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes: decoder
    layers, and vision blocks of a VL model), found through a peft wrapper too."""
    base = unwrapped(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise MetisError(f"{type(base).__name__} names no decoder layer classes (_no_split_modules); "
                         "FSDP sharding needs them: train it on one process")
    return [module for module in model.modules() if type(module).__name__ in names]


def compute_dtype(recipe, device: str):
    """bf16 when the recipe's dtype resolves to bf16 on `device`, else float32 (fp16 needs loss
    scaling, which metis does not do, so it computes in fp32 under FSDP)."""
    import torch

    from metis_cli.model.runtime import pick_dtype

    kind = device.split(":")[0]  # "cuda:3" is a GPU as much as "cuda" (auto means bf16 there)
    return torch.bfloat16 if pick_dtype(recipe.model.dtype, kind) == torch.bfloat16 else torch.float32


def shard_model(model, recipe, context: DistributedContext):
    """Prepare a freshly loaded model for training: gradient checkpointing when
    `run.distributed.gradient_checkpointing`; under torchrun also FSDP2 sharding (module docstring).
    The model must be on the CPU when several processes train (each layer moves to the device as
    it is sharded)."""
    import torch

    settings = recipe.run.distributed
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not context.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh(context, settings.strategy)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype(recipe, context.device), reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        _trainable_to_fp32(layer)
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    _trainable_to_fp32(model)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def device_mesh(context: DistributedContext, strategy: str):
    """fsdp: one mesh dimension over all ranks; hsdp: (nodes, ranks per node), sharded within a
    node and replicated across nodes."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = "cuda" if context.device.startswith("cuda") else "cpu"
    if strategy == "hsdp" and context.nodes > 1:
        return init_device_mesh(kind, (context.nodes, context.local_world_size), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(kind, (context.world_size,), mesh_dim_names=("shard",))


def _trainable_to_fp32(module) -> None:
    import torch

    for param in module.parameters():
        if param.requires_grad and param.dtype != torch.float32 and not hasattr(param, "to_local"):
            param.data = param.data.to(torch.float32)


def unwrap(model):
    """The transformers model (or peft model) under any wrapper; FSDP2 wraps in place."""
    return getattr(model, "module", model)


def full_state_dict_iter(model, *, dtype=None, device: str = "cpu", trainable_only: bool = False,
                         tied_names: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, full tensor) for every parameter and persistent buffer of `model` (with
    `trainable_only`: every trainable parameter), in the order of `named_parameters`, each
    gathered from its shards on its own (every rank must iterate to the end: each tensor is a
    collective). Tied weights appear once, under their first name; with `tied_names` also under
    each other name the state dict has for them (`lm_head.weight` of a model with tied
    embeddings: an engine such as vLLM's CPU backend keeps its own copy of it). Names are the
    model's own (for a transformers model: those its safetensors files use)."""
    reshard(model)
    state = model.state_dict(keep_vars=True) if tied_names or not trainable_only else {}
    aliases: dict[int, list[str]] = {}
    if tied_names:
        for name, tensor in state.items():
            aliases.setdefault(id(tensor), []).append(name)
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        full = _gathered(param, dtype, device)
        yield name, full
        for alias in aliases.get(id(param), ()):
            if alias != name:
                yield alias, full
    if trainable_only:
        return
    for name, buffer in model.named_buffers():
        if name in state:  # persistent
            yield name, _gathered(buffer, dtype, device)


def copy_full_weights(model, target) -> None:
    """Copy the trainable weights of the sharded `model` into the same-named parameters of
    `target`, an unsharded copy of it made before sharding (a rank's rollout model), each tensor
    gathered on its own and cast to `target`'s dtype; frozen weights never change, so they are
    not sent. Every rank must call it (each tensor is a collective)."""
    import torch

    own = dict(target.named_parameters())
    device = str(next(iter(own.values())).device)
    with torch.no_grad():
        for name, tensor in full_state_dict_iter(model, device=device, trainable_only=True):
            own[name].copy_(tensor)


def reshard(model) -> None:
    """Put every FSDP module back to its sharded parameters. A forward without backward (eval
    under no_grad) leaves the root's parameters gathered, as plain bf16 tensors whose memory
    FSDP frees later: those must not be read as weights."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _gathered(tensor, dtype, device):
    value = tensor.detach()
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()  # gathered into new memory
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    value = value.to(device)
    # the caller keeps it (a file, an engine's load): never the model's own memory
    return value.clone() if value.data_ptr() == tensor.data_ptr() else value
