"""Policy-gradient losses over token log-probs: PPO-clip surrogates, HDPO's two-channel loss, KL.

Shapes used throughout:
    logp, old_logp, ref_logp: [N, L] log-prob of each response token under the current, the
        sampling-time and the reference policy (N rollouts, L padded response length)
    mask: [N, L] 1 for tokens the policy generated and is trained on; 0 for padding and for
        tool-output (observation) tokens, which are never trained on
    advantages: [N] one value per rollout, broadcast to all of its tokens

By default the loss is a token mean over the batch (every trained token weighs the same), which is
what docs/algorithm.md gives: L_acc averages over all response tokens, L_tool only over tokens of
rollouts whose A_tool != 0. `micro_batch_norms` also offers the reference trainer's aggregation (a
token mean per micro-batch, scaled by the micro-batch's share of rollouts; `hdpo.loss_agg`).
This module computes numbers only; it never touches models or optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
"""|logp - old_logp| is clamped to this before exp(), as the reference trainer does: a token whose
probability moved by more than e^20 gets no gradient instead of an overflowing ratio."""

LossAgg = Literal["batch_token_mean", "micro_batch_token_mean"]
"""How token losses become one loss (`hdpo.loss_agg`, docs/algorithm.md): batch_token_mean divides
by the token count of the whole (mini-)batch, so micro-batching leaves the loss unchanged;
micro_batch_token_mean takes each micro-batch's own token mean and scales it by the micro-batch's
share of the batch's rollouts (the reference verl trainer)."""


@dataclass
class LossParts:
    """What one HDPO loss evaluation produced.

    `loss` carries the gradient; the rest are for metrics.jsonl (loss_acc, loss_tool,
    clip_frac_acc, clip_frac_tool). `loss_acc` / `loss_tool` are the unweighted channel losses.
    """

    loss: Tensor
    loss_acc: Tensor
    loss_tool: Tensor
    clip_frac_acc: float
    clip_frac_tool: float


def masked_mean(x: Tensor, mask: Tensor, total: float | None = None) -> Tensor:
    """Mean of x over positions where mask is non-zero; 0 when the mask is empty.

    `total` replaces the mask's own count as the denominator; pass the token count of the whole
    batch when it is split into micro-batches, so the micro-batch losses sum to the batch loss.
    """
    mask = mask.to(x.dtype)
    denominator = mask.sum() if total is None else torch.as_tensor(total, dtype=x.dtype)
    # where(), not x * mask: masked positions may hold inf/nan (e.g. padding logits)
    masked = torch.where(mask > 0, x, torch.zeros_like(x))
    return masked.sum() / denominator.clamp(min=1)


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO-clip per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), and with dual-clip
    (Ye et al. 2020) for A < 0 at most -c * A, so a token whose ratio ran past c stops pushing.

    The log-ratio is clamped to +-LOG_RATIO_CLAMP first.

    Args:
        logp: [N, L] current log-probs (carries the gradient).
        old_logp: [N, L] log-probs at sampling time (no gradient needed).
        advantages: [N] per rollout.
        mask: [N, L] trained tokens.
        dual_clip_c: the dual-clip bound c (> 1), or None for plain PPO-clip.
    Returns:
        loss [N, L] per-token loss (0 on masked tokens) and clipped [N, L] bool, True where a
        clipped term was the one used (so that token's gradient is zero).
    """
    trained = mask > 0
    # Zero the log-ratio on masked tokens so exp() cannot overflow into nan gradients there.
    log_ratio = torch.where(trained, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    a = advantages.detach().to(logp.dtype).unsqueeze(-1)
    unclipped_loss = -ratio * a
    clipped_loss = -torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a
    loss = torch.maximum(unclipped_loss, clipped_loss)
    clipped = clipped_loss > unclipped_loss
    if dual_clip_c is not None:
        bound = -dual_clip_c * a
        dual_clipped = (a < 0) & (loss > bound)
        loss = torch.where(dual_clipped, bound, loss)
        clipped = clipped | dual_clipped
    return torch.where(trained, loss, torch.zeros_like(loss)), clipped & trained


def hdpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    a_acc: Tensor,
    a_tool: Tensor | None,
    w_acc: float = 1.0,
    w_tool: float = 0.15,
    clip_eps: float = 0.2,
    *,
    dual_clip_c: float | None = None,
    acc_token_total: float | None = None,
    tool_token_total: float | None = None,
) -> LossParts:
    """L = w_acc * L_clip(A_acc) + w_tool * L_clip(A_tool) on the same log-probs.

    Args:
        logp, old_logp, mask: [N, L] (see module docstring).
        a_acc: [N] accuracy-channel advantages (or the single advantage of GRPO / coupled /
            GDPO baselines).
        a_tool: [N] efficiency-channel advantages, or None for the single-loss baselines
            (then loss_tool is 0 and only the first term is trained).
        dual_clip_c: see clipped_surrogate.
        acc_token_total / tool_token_total: denominators for micro-batching (see masked_mean and
            micro_batch_norms); None = this call's own token counts.

    L_acc averages over all trained tokens; L_tool only over trained tokens of rollouts whose
    A_tool != 0 (and is 0 when there are none, e.g. early in training when no group has two
    correct rollouts).
    """
    token_loss_acc, clipped_acc = clipped_surrogate(logp, old_logp, a_acc, mask, clip_eps, dual_clip_c)
    loss_acc = masked_mean(token_loss_acc, mask, acc_token_total)
    clip_frac_acc = float(masked_mean(clipped_acc.to(logp.dtype), mask).item())

    if a_tool is None:
        loss_tool = torch.zeros((), dtype=logp.dtype, device=logp.device)
        clip_frac_tool = 0.0
    else:
        tool_mask = (mask > 0) & (a_tool != 0).unsqueeze(-1)
        token_loss_tool, clipped_tool = clipped_surrogate(logp, old_logp, a_tool, tool_mask, clip_eps, dual_clip_c)
        loss_tool = masked_mean(token_loss_tool, tool_mask, tool_token_total)
        clip_frac_tool = float(masked_mean(clipped_tool.to(logp.dtype), tool_mask).item())

    return LossParts(
        loss=w_acc * loss_acc + w_tool * loss_tool,
        loss_acc=loss_acc.detach(),
        loss_tool=loss_tool.detach(),
        clip_frac_acc=clip_frac_acc,
        clip_frac_tool=clip_frac_tool,
    )


@dataclass(frozen=True)
class MicroBatchNorm:
    """How one micro-batch's hdpo_loss is normalised: its denominators (None = its own token
    counts) and the factor its loss is multiplied by before backward()."""

    acc_token_total: float | None
    tool_token_total: float | None
    scale: float

    def token_mean_weight(self, tokens: float) -> float:
        """The factor on a token mean over this micro-batch's `tokens` trained tokens (the KL term)
        that aggregates it the way the loss is aggregated."""
        if self.acc_token_total is None:
            return self.scale
        return self.scale * (tokens / max(self.acc_token_total, 1.0))


def micro_batch_norms(acc_tokens: list[float], tool_tokens: list[float], rollouts: list[int],
                      loss_agg: LossAgg) -> list[MicroBatchNorm]:
    """The normalisation of each micro-batch of one optimizer step, so that the scaled
    micro-batch losses sum to the step's loss.

    Args:
        acc_tokens: trained tokens of each micro-batch (L_acc's mask).
        tool_tokens: trained tokens of its rollouts with A_tool != 0 (L_tool's mask; zeros
            without an efficiency channel).
        rollouts: rollouts in each micro-batch.
        loss_agg: batch_token_mean: every micro-batch divides by the batch-wide token counts and
            is not scaled (the loss is the batch's token mean, whatever the micro-batch size);
            micro_batch_token_mean: each divides by its own counts and is scaled by its share of
            the rollouts (a micro-batch without an A_tool != 0 rollout adds 0 to L_tool).
    """
    if loss_agg == "batch_token_mean":
        tool_total = sum(tool_tokens) or None  # none: every L_tool is 0 whatever the denominator
        return [MicroBatchNorm(sum(acc_tokens), tool_total, 1.0) for _ in acc_tokens]
    total_rollouts = sum(rollouts)
    return [MicroBatchNorm(None, None, count / total_rollouts) for count in rollouts]


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || reference), masked token mean. Scalar.

    k3 = exp(ref - logp) - (ref - logp) - 1, which is >= 0 and unbiased. logp, ref_logp,
    mask: [N, L].
    """
    trained = mask > 0
    log_ratio = torch.where(trained, ref_logp.detach() - logp, torch.zeros_like(logp))
    k3 = torch.exp(log_ratio) - log_ratio - 1.0
    return masked_mean(k3, mask)
