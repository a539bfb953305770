"""Per-token log-probs without the full logits tensor: the LM head runs chunk by chunk.

A forward over N rows of T tokens normally returns logits [N, T, V]; the log-prob of each target
then needs their fp32 copy and the fp32 log-softmax kept for backward. For an 8B model (V =
151,936) and a 40,960-token micro-batch that is ~23 GiB in logits alone, more than the model's
shards. `chunked_head(model, targets, ...)` swaps the model's output layer for `LogprobHead`
during one forward: the layer receives the final hidden states [N, T, H] as before and returns,
instead of logits, [N, T, 2] holding each position's (log-prob of its target, entropy). It
computes them `chunk` positions at a time under activation checkpointing, so at most one chunk's
logits exist at once, in forward and in backward (which recomputes the chunk's logits from its
hidden states). Everything happens inside the model's own forward and backward, so FSDP2 has the
head's weight gathered when it is used.

Same numbers as `log_softmax(head(h) / temperature)[target]` over the whole tensor: the softmax
is per position, so cutting positions into chunks changes no sum (the head's matmul may round
differently for another chunk size; tests/test_logit_chunks.py compares values and gradients).

When: `chunk_tokens(vocab_size, budget_mib)` (`model.memory_plan.logit_chunk_positions`) positions
fit the fp32 logits budget (`model.logits_budget_mib`); a pass with no more positions than that runs the plain way, untouched
(the tiny models never chunk). Only for output layers that are one `nn.Linear` whose result the
model returns as it is (`supports`): not for models that post-process logits (soft-capping, a
logit scale), which take the plain path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from metis_cli.model.loading import unwrapped
from metis_cli.model.memory_plan import logit_chunk_positions as chunk_tokens

POSTPROCESSING_CONFIG_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
"""Config fields of architectures whose forward changes the head's output before returning it."""


def chunk_for(model, positions: int, budget_mib: float | None) -> int:
    """Positions per LM-head chunk for a pass over `positions` positions, or 0 for the plain
    head: no budget, a pass whose logits fit the budget, or a model this module cannot serve."""
    if budget_mib is None:
        return 0
    vocab = unwrapped(model).get_output_embeddings().weight.shape[0]
    chunk = chunk_tokens(vocab, budget_mib)
    return chunk if positions > chunk and supports(model) else 0


def supports(model) -> bool:
    """Whether `model`'s output layer can be swapped for `LogprobHead` (module docstring)."""
    base = unwrapped(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or _head_name(base, head) is None:
        return False
    configs = [base.config] + [getattr(base.config, name, None) for name in getattr(base.config, "sub_configs", {}) or {}]
    return not any(getattr(config, field, None) for config in configs if config is not None
                   for field in POSTPROCESSING_CONFIG_FIELDS)


class LogprobHead(torch.nn.Module):
    """The output layer's stand-in for one forward (module docstring): hidden [N, T, H] ->
    [N, T, 2] (log-prob of `targets` [N, T], entropy or 0), `chunk` positions at a time."""

    def __init__(self, head: torch.nn.Linear, targets: torch.Tensor, *, temperature: float, with_entropy: bool,
                 chunk: int):
        super().__init__()
        self.head, self.targets, self.chunk = head, targets, chunk
        self.temperature, self.with_entropy = temperature, with_entropy

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows, width = self.targets.shape
        if hidden.shape[:2] != (rows, width):
            raise ValueError(f"chunked log-probs: the head got hidden states {tuple(hidden.shape[:2])} for targets "
                             f"{(rows, width)}")
        flat, targets = hidden.reshape(rows * width, -1), self.targets.reshape(-1)
        pieces = [checkpoint(self._piece, flat[start : start + self.chunk], targets[start : start + self.chunk],
                             use_reentrant=False)
                  for start in range(0, flat.shape[0], self.chunk)]
        return torch.cat(pieces).view(rows, width, 2)

    def _piece(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.temperature > 0 and self.temperature != 1.0:
            logits = logits / self.temperature
        log_probs = F.log_softmax(logits, dim=-1)
        picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if self.with_entropy:
            with torch.no_grad():
                entropy = -(log_probs.exp() * log_probs).sum(-1)
        else:
            entropy = torch.zeros_like(picked)
        return torch.stack([picked, entropy.detach()], dim=-1)


@contextmanager
def chunked_head(model, targets: torch.Tensor, *, temperature: float, with_entropy: bool, chunk: int):
    """Inside the block, `model(...)`'s `.logits` are `LogprobHead`'s [N, T, 2] for `targets`
    [N, T] (the target of each position the forward returns logits for)."""
    base = unwrapped(model)
    head = base.get_output_embeddings()
    name = _head_name(base, head)
    owner = base.get_submodule(name.rpartition(".")[0]) if "." in name else base
    attribute = name.rpartition(".")[2]
    setattr(owner, attribute, LogprobHead(head, targets, temperature=temperature, with_entropy=with_entropy,
                                          chunk=chunk))
    try:
        yield
    finally:
        setattr(owner, attribute, head)


def split(output: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`LogprobHead`'s [N, T, 2] -> (log-prob [N, T], entropy [N, T] or None)."""
    return output[..., 0], (output[..., 1] if with_entropy else None)


def _head_name(base, head) -> str | None:
    return next((name for name, module in base.named_modules() if module is head and name), None)
