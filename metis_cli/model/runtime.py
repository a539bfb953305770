"""Process-level training setup: threads, device, dtype, seeds.

On a 2-core CPU two torch jobs with 2 threads each run 4x slower than one (DESIGN.md), so torch
and OpenMP threads are set to the cores this process may really use unless the recipe says.
"""

from __future__ import annotations

import os
import random


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def setup_threads(requested: int = 0) -> int:
    """Set torch intra-op threads (and OMP for children) to `requested` or the cores available."""
    import torch

    threads = requested or available_cores()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    return threads


def pick_device(setting: str = "auto") -> str:
    import torch

    from metis_cli.errors import MetisError

    if setting == "cuda" and not torch.cuda.is_available():
        raise MetisError("run.device is 'cuda' but no CUDA GPU is visible; set run.device: auto or cpu")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def pick_dtype(setting: str, device: str):
    """recipe model.dtype -> torch dtype; auto = bf16 on GPU, fp32 on CPU."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def quiet_libraries() -> None:
    """Silence transformers' per-load progress bars and info logs; metis shows its own progress."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
