"""Training mechanics shared by `sft` and `hdpo`: per-token log-probs with the shared-prompt KV
reuse (`logprobs`), atomic resumable checkpoints and final model folders (`checkpoint`).

It sits above `model/` (it trains what `model/` loads) and below `stages/`; it knows nothing
about rollouts or rewards.
"""
