"""What this machine lets the process use, asked without torch: the CPU cores it may run on.

At the bottom of the layers so that data/ (parallel PNG writes) and model/runtime.py (torch
threads) count cores the same way.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
