"""Per-token log-probs (and entropy) of a batch under a model, the trainer's side of the
log-prob definition in agent/backend.py: `log_softmax(logits / temperature)[token]`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   temperature: float = 1.0, with_entropy: bool = False):
    """Log-prob of every token given its prefix.

    Args: input_ids, attention_mask: [N, L].
    Returns: logp [N, L] float32 where column t is log p(input_ids[:, t] | input_ids[:, :t]) and
    column 0 is 0 (no prefix); entropy [N, L] of the same distributions (or None).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    log_probs = F.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    zeros = torch.zeros_like(picked[:, :1])
    logp = torch.cat([zeros, picked], dim=1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            ent = -(log_probs.exp() * log_probs).sum(-1)
        entropy = torch.cat([zeros, ent], dim=1)
    return logp, entropy
