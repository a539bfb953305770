"""Rewards: answer extraction and checking (exact, math, LLM judge), the format reward, and
scoring a batch of rollouts into per-rollout rewards; an unscored rollout is `None`, never 0."""
