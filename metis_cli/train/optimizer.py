"""The optimizer step every trainer takes: AdamW on fp32 master weights, with the step's
`grad_norm` (before clipping) and `update_rms` (how far the weights really moved).

Why masters: at lr 1e-6 an Adam step (~1e-6 per weight) is far below a bf16 weight's rounding step
(~1e-4 for a weight of 0.02), so AdamW run on bf16 weights rounds most of every update away. Here
the optimizer always updates float32 tensors:
- one process with a bf16 (or fp16) model: `MasterWeights` keeps a float32 copy of each trainable
  parameter; gradients are copied onto the copies, AdamW steps them, and the model's weights are
  refreshed from them (the model still computes in bf16);
- several processes (FSDP2, `train.distributed.shard_model`): the sharded parameters are float32
  already and the forward computes in bf16, so each master is the parameter itself;
- float32 models (the tiny recipe): the same, so nothing is copied and numbers are unchanged.

It owns no schedule and no gradient scaling; stages build their LR scheduler on `.optimizer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UPDATE_SAMPLES_PER_TENSOR = 65536
"""`update_rms` compares at most this many evenly spaced elements of each tensor before and after
the step (every element of smaller tensors): an exact figure for large models would need a second
copy of every trainable weight."""


@dataclass
class StepStats:
    grad_norm: float
    """Total L2 norm of the gradients before clipping (what `clip_grad_norm_` returns)."""
    update_rms: float
    """Root mean square of this step's change of the trainable fp32 master weights."""


class MasterWeights:
    """The trainable parameters of `model` and the float32 tensors AdamW updates for them."""

    def __init__(self, model, *, lr: float, weight_decay: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p if p.dtype == torch.float32 else _fp32_copy(p) for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay, **_kernel(self.masters))

    @property
    def has_copies(self) -> bool:
        return any(m is not p for p, m in zip(self.params, self.masters))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for param in self.params:
            param.grad = None

    def step(self, grad_clip: float) -> StepStats:
        """Clip the gradients to `grad_clip`, take one AdamW step, refresh the model's weights."""
        for param, master in zip(self.params, self.masters):
            if master is not param:
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None  # the fp32 copy is the one kept; spare the memory
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.masters, grad_clip))
        before = [_sample(master) for master in self.masters]
        self.optimizer.step()
        update_rms = _rms_change(self.masters, before)
        with torch.no_grad():
            for param, master in zip(self.params, self.masters):
                if master is not param:
                    param.copy_(master)
        return StepStats(grad_norm=float(grad_norm), update_rms=update_rms)

    def state_dict(self) -> dict:
        """The master copies (empty when the parameters are their own masters)."""
        return {"masters": [m.detach().clone() for p, m in zip(self.params, self.masters) if m is not p]}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore saved masters; without them (or for fp32 models) masters follow the model."""
        copies = [m for p, m in zip(self.params, self.masters) if m is not p]
        saved = (state or {}).get("masters") or []
        if len(saved) != len(copies):
            return
        with torch.no_grad():
            for master, value in zip(copies, saved):
                master.copy_(value)


def _kernel(masters: list[torch.Tensor]) -> dict:
    """AdamW's fused kernel (one pass over all tensors: 4x faster than the per-tensor loop for
    the tiny model's 47 tensors on a CPU, benchmarks/sft_throughput.py) for plain tensors on one CPU
    or CUDA device; the default implementation for sharded (DTensor) masters and other devices."""
    devices = {m.device.type for m in masters}
    plain = not any(hasattr(m, "to_local") for m in masters)
    return {"fused": True} if masters and plain and len(devices) == 1 and devices <= {"cpu", "cuda"} else {}


def _fp32_copy(param: torch.Tensor) -> torch.Tensor:
    return param.detach().to(torch.float32).clone().requires_grad_(True)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _sample(master: torch.Tensor) -> torch.Tensor:
    flat = _local(master).detach().reshape(-1)
    stride = max(1, flat.numel() // UPDATE_SAMPLES_PER_TENSOR)
    return flat[::stride].clone()


def _rms_change(masters: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    """RMS over all elements of every master (each tensor's sampled mean square weighted by its
    size); summed over ranks when the masters are shards. Batched over tensors (`_foreach_*`): one
    kernel per operation instead of one per tensor."""
    pairs = [(_local(m).detach().reshape(-1), old) for m, old in zip(masters, before)]
    pairs = [(flat, old) for flat, old in pairs if flat.numel()]
    squares = torch.zeros((), dtype=torch.float64)
    count = sum(flat.numel() for flat, _ in pairs)
    if pairs:
        after = [flat[:: max(1, flat.numel() // UPDATE_SAMPLES_PER_TENSOR)] for flat, _ in pairs]
        norms = torch.stack(torch._foreach_norm(torch._foreach_sub(after, [old for _, old in pairs]))).double().cpu()
        sizes = torch.tensor([[flat.numel(), old.numel()] for flat, old in pairs], dtype=torch.float64)
        squares = (norms.pow(2) / sizes[:, 1] * sizes[:, 0]).sum()
    if any(hasattr(m, "to_local") for m in masters):
        import torch.distributed as dist

        device = masters[0].to_local().device
        totals = torch.tensor([float(squares), float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        squares, count = totals[0].cpu(), int(totals[1])
    return float((squares / max(count, 1)).sqrt())
