"""The policy update of one RL step: PPO-clip over the kept rollouts, in mini-batches of whole
groups, each micro-batched by prompt.

`policy_update` collates the kept rollouts, splits the step's groups into `hdpo.mini_batches`
mini-batches, and for each of `hdpo.ppo_epochs` epochs takes one optimizer step per mini-batch;
it returns the figures metrics.jsonl logs (`UpdateFigures`). The loss is `algo.losses.hdpo_loss`,
normalised per `hdpo.loss_agg` (`algo.losses.micro_batch_norms`): by default with the mini-batch's
token denominators, so splitting it into micro-batches leaves it unchanged (docs/rl-step.md,
step 5). Old log-probs are the trainer's own: with one mini-batch and one epoch they are the
current log-probs detached (ratio 1, clipping never acts); otherwise they are computed once,
before the first optimizer step, so every later step is off-policy and the clip (and dual-clip)
acts. With several processes each trains its own whole groups; `scope` (`stages.hdpo_dist`) makes
the denominators and figures the step's and keeps every process's forward passes in step.

Must not touch: sampling, rewards, advantages, weight sync to the backend (the stage does that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metis_cli.agent.rollout import Rollout, RolloutBatch
from metis_cli.algo.losses import hdpo_loss, kl_k3, masked_mean, micro_batch_norms
from metis_cli.algo.types import Advantages
from metis_cli.train.logprobs import (DEFAULT_LOGITS_BUDGET_MIB, grouped_token_logprobs, micro_batches_by_prompt,
                                      token_logprobs)


@dataclass
class UpdateFigures:
    """What one update logs (metrics.jsonl names; docs/metrics.md).

    loss, loss_acc, loss_tool: of the first PPO epoch, the mean over the mini-batches of each
        mini-batch's loss (its scaled micro-batch losses summed), so with one mini-batch the
        step's loss;
    clip_frac_acc, clip_frac_tool, entropy, logprob_mismatch: first epoch, each micro-batch
        weighted by its share of the step's trained tokens (later mini-batches are off-policy,
        so their clip fractions can be > 0);
    kl: the same token-share weighting, averaged over all PPO epochs (0 without a reference);
    grad_norm, update_rms: of the first optimizer step (`train.optimizer.StepStats`);
    ptx_loss: with `hdpo.ptx` on, the rehearsal rows' token-mean cross-entropy, first epoch, mean
        over the mini-batches (`stages.hdpo_ptx`); None (not logged) when it is off.
    """

    loss: float = 0.0
    loss_acc: float = 0.0
    loss_tool: float = 0.0
    clip_frac_acc: float = 0.0
    clip_frac_tool: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    logprob_mismatch: float = 0.0
    grad_norm: float = 0.0
    update_rms: float = 0.0
    ptx_loss: float | None = None


@dataclass(frozen=True)
class MicroBatch:
    """The rows of the collated batch that go through one forward/backward, trimmed to their
    longest row and moved to the training device. K = rows, W = that longest length."""

    input_ids: Tensor  # [K, W] long
    attention_mask: Tensor  # [K, W] long
    prompt_lens: Tensor  # [K] long, tokens before the first generated one
    loss_mask: Tensor  # [K, W] float, 1.0 on sampled tokens
    sampler_logprobs: Tensor  # [K, W] float
    a_acc: Tensor  # [K]
    a_tool: Tensor | None  # [K], or None without an efficiency channel
    images: tuple = ()  # each row's images (vision-language policies), else ()
    vision: object = None  # model/vision.py Vision of such a policy
    padding: bool = False  # a stand-in that trains nothing (several processes: `stages.hdpo_dist`)
    share_prompt: bool = True  # False: one plain forward, no prompt KV reuse (`stages.hdpo_dist`)
    logits_budget_mib: float | None = DEFAULT_LOGITS_BUDGET_MIB  # LM head in chunks above it (train/logit_chunks.py)

    @property
    def tokens(self) -> float:
        """Trained tokens (L_acc's mask)."""
        return float(self.loss_mask.sum())

    @property
    def tool_tokens(self) -> float:
        """Trained tokens of rollouts with A_tool != 0 (L_tool's mask); 0 without that channel."""
        return float(self.loss_mask[self.a_tool != 0].sum()) if self.a_tool is not None else 0.0

    def logprobs(self, policy, temperature: float, with_entropy: bool = False):
        """(token log-probs [K, W], entropy [K, W] or None) of `policy` on these rows."""
        if not self.share_prompt:
            return token_logprobs(policy, self.input_ids, self.attention_mask, temperature=temperature,
                                  with_entropy=with_entropy, vision=self.vision, images=list(self.images) or None,
                                  logits_budget_mib=self.logits_budget_mib)
        return grouped_token_logprobs(policy, self.input_ids, self.attention_mask, self.prompt_lens,
                                      temperature=temperature, with_entropy=with_entropy,
                                      vision=self.vision, images=list(self.images) or None,
                                      logits_budget_mib=self.logits_budget_mib)


def micro_batches(kept: list[Rollout], advantages: Advantages, size: int, *, pad_token_id: int,
                  device, vision=None, max_tokens: int | None = None,
                  logits_budget_mib: float | None = DEFAULT_LOGITS_BUDGET_MIB) -> list[MicroBatch]:
    """The kept rollouts collated and cut into micro-batches of at most `size` rollouts (and
    `max_tokens` padded tokens) that hold whole groups where they fit, so each prompt runs once per
    micro-batch and its KV cache serves the group's rollouts (`train.logprobs.micro_batches_by_prompt`)."""
    batch = RolloutBatch.from_rollouts(kept, pad_token_id)
    prompt_lens = torch.tensor([r.prompt_len for r in kept])
    lengths = batch.attention_mask.sum(1)
    chunks = []
    for rows in micro_batches_by_prompt(batch.group_ids, lengths, size, max_tokens):
        width = int(lengths[rows].max())

        def cut(tensor: Tensor) -> Tensor:
            return (tensor[rows, :width] if tensor.dim() == 2 else tensor[rows]).to(device)

        chunks.append(MicroBatch(
            cut(batch.input_ids), cut(batch.attention_mask), cut(prompt_lens), cut(batch.loss_mask),
            cut(batch.sampler_logprobs), cut(advantages.acc),
            cut(advantages.tool) if advantages.tool is not None else None,
            tuple(kept[i].images for i in rows.tolist()) if vision is not None else (), vision,
            logits_budget_mib=logits_budget_mib,
        ))
    return chunks


def mini_batch_rows(group_ids: Tensor, count: int, groups: Tensor | None = None) -> list[Tensor]:
    """Row indices of `count` mini-batches of whole groups (fewer when there are fewer groups):
    the groups in order, split as evenly as possible. Args: group_ids [K]; groups: the sorted
    group ids to split (default: those of `group_ids`; several processes pass the step's, so a
    process's part of a mini-batch can be empty). Returns: [k_b] long tensors, rows in their
    original order, covering every row once."""
    groups = group_ids.unique() if groups is None else groups
    return [torch.isin(group_ids, part).nonzero().squeeze(-1)
            for part in groups.tensor_split(min(count, len(groups)))]


def policy_update(model, optimizer, kept: list[Rollout], advantages: Advantages, cfg, *, pad_token_id: int,
                  temperature: float, device, reference=None, vision=None, scope=None, rehearse=None,
                  logits_budget_mib: float | None = DEFAULT_LOGITS_BUDGET_MIB) -> UpdateFigures:
    """`cfg.ppo_epochs` x `cfg.mini_batches` PPO-clip optimizer steps on the `kept` rollouts (at least one).

    Args:
        model: the policy (trained in place); optimizer: its `train.optimizer.MasterWeights`
            (clips to `cfg.grad_clip` and steps the fp32 masters).
        kept: the rollouts to train on, in group order; `advantages` holds one [K] entry per kept rollout.
        cfg: the recipe's `hdpo` section (w_acc, w_tool, clip_eps, dual_clip_c, kl_coef, ppo_epochs,
            mini_batches, micro_batch_size, micro_batch_tokens, loss_agg, grad_clip).
        logits_budget_mib: `model.logits_budget_mib` (train/logit_chunks.py).
        temperature: the sampling temperature (log-probs are of the temperature-scaled policy).
        reference: the frozen initial policy for the k3 KL term, or None (no KL).
        vision: a vision-language policy's image handling (model/vision.py); rollouts keep their images.
        scope: with several processes, this process's view of the others
            (`stages.hdpo_dist.UpdateScope`): `kept` are then its own whole groups (possibly none),
            denominators and figures cover every process's rollouts; None on one process.
        rehearse: with `hdpo.ptx` on, `(index, scope) -> float` that backpropagates the rehearsal
            loss of the step's `index`-th optimizer step (epoch x cfg.mini_batches + mini-batch)
            and returns its figure (`stages.hdpo_ptx.Rehearsal.backward`); None: off.
    """
    group_ids = torch.tensor([r.prompt_index for r in kept], dtype=torch.long)
    minis = [micro_batches([kept[i] for i in rows.tolist()], advantages.select(rows), cfg.micro_batch_size,
                           pad_token_id=pad_token_id, device=device, vision=vision, max_tokens=cfg.micro_batch_tokens,
                           logits_budget_mib=logits_budget_mib) if len(rows) else []
             for rows in mini_batch_rows(group_ids, cfg.mini_batches, None if scope is None else scope.kept_groups)]
    if scope is not None:  # the same micro-batches and forward passes on every process (FSDP collectives)
        minis = scope.align(minis)
    two_channels = advantages.tool is not None
    step_tokens = sum(chunk.tokens for chunks in minis for chunk in chunks)
    step_tokens = max(step_tokens if scope is None else scope.total(step_tokens), 1.0)
    old_logp = None
    if cfg.ppo_epochs > 1 or len(minis) > 1:  # off-policy after the first step: fix the old policy now
        with torch.no_grad():
            old_logp = [[chunk.logprobs(model, temperature)[0] for chunk in chunks] for chunks in minis]
    figures = UpdateFigures()
    first_step = True
    for epoch in range(cfg.ppo_epochs):
        for mini, chunks in enumerate(minis):
            norms = _norms(chunks, cfg.loss_agg, scope)
            optimizer.zero_grad()
            for number, (chunk, norm) in enumerate(zip(chunks, norms)):
                logp, entropy = chunk.logprobs(model, temperature, with_entropy=epoch == 0)
                old = old_logp[mini][number] if old_logp is not None else logp.detach()
                parts = hdpo_loss(
                    logp, old, chunk.loss_mask, chunk.a_acc, chunk.a_tool,
                    cfg.w_acc, cfg.w_tool if two_channels else 0.0, cfg.clip_eps, dual_clip_c=cfg.dual_clip_c,
                    acc_token_total=norm.acc_token_total, tool_token_total=norm.tool_token_total,
                )
                loss = parts.loss * norm.scale
                share = chunk.tokens / step_tokens
                if reference is not None:
                    with torch.no_grad():
                        ref_logp, _ = chunk.logprobs(reference, temperature)
                    kl = kl_k3(logp, ref_logp, chunk.loss_mask)
                    loss = loss + cfg.kl_coef * kl * norm.token_mean_weight(chunk.tokens)
                    figures.kl += float(kl.detach()) * share / cfg.ppo_epochs
                if scope is not None:
                    loss = loss * scope.world_size  # FSDP averages the gradients over the processes
                loss.backward()
                if epoch == 0:
                    figures.loss += float(parts.loss.detach()) * norm.scale / len(minis)
                    figures.loss_acc += float(parts.loss_acc) * norm.scale / len(minis)
                    figures.loss_tool += float(parts.loss_tool) * norm.scale / len(minis)
                    figures.clip_frac_acc += parts.clip_frac_acc * share
                    figures.clip_frac_tool += parts.clip_frac_tool * share
                    figures.entropy += float(masked_mean(entropy, chunk.loss_mask)) * share
                    mismatch = (logp.detach() - chunk.sampler_logprobs).abs()
                    figures.logprob_mismatch += float(masked_mean(mismatch, chunk.loss_mask)) * share
            if rehearse is not None:
                ptx = rehearse(epoch * cfg.mini_batches + mini, scope)
                if epoch == 0:
                    figures.ptx_loss = (figures.ptx_loss or 0.0) + ptx / len(minis)
            stats = optimizer.step(cfg.grad_clip)
            if first_step:
                figures.grad_norm, figures.update_rms = stats.grad_norm, stats.update_rms
                first_step = False
    return figures if scope is None else scope.reduce(figures)


def _norms(chunks: list[MicroBatch], loss_agg, scope):
    """The `micro_batch_norms` of one mini-batch's micro-batches; with several processes the
    other processes' tokens and rollouts count in the denominators too (one extra entry)."""
    acc = [c.tokens for c in chunks]
    tool = [c.tool_tokens for c in chunks]
    rollouts = [0 if c.padding else len(c.a_acc) for c in chunks]
    if scope is None:
        return micro_batch_norms(acc, tool, rollouts, loss_agg)
    others = scope.others([sum(acc), sum(tool), sum(rollouts)])
    return micro_batch_norms(acc + [others[0]], tool + [others[1]], rollouts + [others[2]], loss_agg)[:-1]
