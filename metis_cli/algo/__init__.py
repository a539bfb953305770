"""Pure tensor functions of the RL step: advantages (HDPO and its baselines), the estimator
registry, clipped losses, KL. No models, no I/O; unit-tested against hand-computed values."""
