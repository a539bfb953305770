"""The LR multiplier both trainers use: linear warmup, then cosine, linear or no decay.

`metis sft` gives each phase its own curve (several bounds); `metis hdpo` one over its steps
(`hdpo.schedule`). A pure function of the step, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math


def lr_factor(step: int, bounds: list[tuple[int, int]], warmup_ratio: float, schedule: str) -> float:
    """The LR multiplier at optimizer step `step`. Each phase gets its own warmup and decay, as
    if it were a fine-tuning run of its own on the weights the previous phase left (a knowledge
    phase's decayed LR would otherwise starve the cold-start phase)."""
    for start, steps in bounds:
        if step < start + steps or (start, steps) == bounds[-1]:
            break
    local, steps = step - start, max(steps, 1)
    warmup = int(warmup_ratio * steps)
    if local < warmup:
        return (local + 1) / (warmup + 1)
    progress = min(1.0, (local - warmup) / max(1, steps - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0
