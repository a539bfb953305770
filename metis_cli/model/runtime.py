"""Process-level training setup: threads, device, dtype, seeds (`seed_everything`, and
`derive_seed` with its table of every seed derived from `run.seed`).

On a 2-core CPU two torch jobs with 2 threads each run 4x slower than one (docs/rl-step.md), so torch
and OpenMP threads are set to the cores this process may really use unless the recipe says.
"""

from __future__ import annotations

import os
import random

from metis_cli.host import available_cores


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


# Every seed metis derives from `run.seed` (or from a seed derived from it), in one table: the
# weights of `derive_seed`, one per value the seed depends on. Far-apart weights keep the streams
# of different steps, epochs or requests from sharing seeds. Changing a weight changes what a run
# samples (tests/test_golden.py pins it).
SFT_PHASE_ORDER_SEED = (1000, 1)
"""(run.seed, phase index): the order sft draws a phase's micro-batches in."""
HDPO_EPOCH_ORDER_SEED = (7919, 1)
"""(run.seed, epoch): the permutation of RL prompts hdpo walks through in that epoch."""
HDPO_STEP_SEED = (100_003, 1)
"""(run.seed, step): the seed of one hdpo step's rollouts."""
HDPO_PTX_ORDER_SEED = (104_729, 1)
"""(run.seed, epoch): the permutation of `hdpo.ptx` rehearsal rows hdpo walks through in that epoch."""
CURATE_BATCH_SEED = (1_000_003, 10_000_019, 1)
"""(run.seed, source index, ordinal of the batch's first row): a curate sampling batch's rollouts."""
CHAT_QUESTION_SEED = (1, 1)
"""(run.seed, question number from 1): one `metis chat` answer."""
ROLLOUT_TURN_SEED = (1, 1)
"""(run seed, turn from 1): one backend call of the rollout engine's turn-synchronous waves."""
ROLLOUT_REQUEST_SEED = (1_000_003 * 65_537, 65_537)
"""(run seed, key of the request's first rollout): one continuous-batching request; its i-th
continuation gets this + i, which stays clear of the next key's range."""
VLLM_REQUEST_SEED = (1_000_003 * 65_536, 65_536)
"""(generate's seed, index of the distinct prompt): one request of a vLLM `generate` call; its
i-th continuation gets this + i."""


def derive_seed(weights: tuple[int, ...], seed: int, *parts: int) -> int:
    """The seed of one use of randomness: sum of (seed, *parts) times `weights` (one of the
    `*_SEED` tables above), e.g. `derive_seed(HDPO_STEP_SEED, run_seed, step)`."""
    values = (seed, *parts)
    if len(values) != len(weights):
        raise ValueError(f"derive_seed: {len(weights)} weights for {len(values)} values")
    return sum(value * weight for value, weight in zip(values, weights))


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
