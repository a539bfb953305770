"""What `metis sft` trains on and in which order (stages/sft.py runs it).

- Rows: each phase's trajectories tokenized into (ids, mask) rows, or (ids, mask, images) for
  an example with images (`train.vision_rows`); the assistant-token mask comes from
  `data.chat.tokenize_runs`, the same token cut the rollout engine uses. Rows longer than
  `sft.max_seq_len` are dropped and counted; a seeded shuffle holds out `sft.eval_share` of each
  phase for the eval loss.
- Plan: every micro-batch of the run as (phase, row indices), fixed by the seed, so a resumed
  run skips exactly the batches already trained.
- Schedule: each phase's optimizer steps (the LR curve over them: `train.lr_schedule.lr_factor`),
  and the epoch a step is in.

Pure bookkeeping: must not touch the model, the optimizer or the run folder.
"""

from __future__ import annotations

import math
import random

from metis_cli.errors import DataError

Row = tuple
"""(ids, mask) of a text row; (ids, mask, images) of a row with images."""


def tokenize_phases(recipe, tokenizer, vision, *, quiet: bool) -> tuple[list[list[Row]], list[Row], int]:
    """(training rows of each phase, held-out rows of all phases, rows dropped as longer than
    sft.max_seq_len). `vision`: a vision-language policy's image handling, None for text-only."""
    from metis_cli.data.chat import tokenize_runs
    from metis_cli.data.sources import load_sources
    from metis_cli.telemetry.progress import spinner

    cfg = recipe.sft
    rng = random.Random(recipe.run.seed)
    phases: list[list[Row]] = []
    eval_set: list[Row] = []
    dropped_too_long = 0
    cache: dict[str, list[Row]] = {}
    specs: list[dict] | None = None

    def tool_specs() -> list[dict] | None:
        """Tools are rendered for conversations that use them (as at rollout time)."""
        nonlocal specs
        if specs is None:
            from metis_cli.agent.tools.registry import ToolRegistry

            specs = ToolRegistry.from_config(recipe.tools).specs()
        return specs or None

    with spinner("sft: tokenizing trajectories", quiet=quiet):
        for p, phase in enumerate(cfg.phases):
            examples = load_sources(phase.data, recipe, need_answer=False)
            encoded = []
            for example in examples:
                conversation = example.trajectory or example.messages
                if not any(m["role"] == "assistant" for m in conversation):
                    raise DataError(f"sft.phases[{p}]: example {example.id} has no assistant turn to train on")
                tools = tool_specs()
                if example.images:
                    rows = _image_rows(example, conversation, tools, p, tokenizer, vision, cfg.init_from)
                else:
                    key = repr((conversation, bool(tools)))
                    if key not in cache:
                        cache[key] = tokenize_runs(tokenizer, conversation, tools)
                    rows = cache[key]
                for row in rows:  # one sequence unless the template re-renders at a new question
                    if len(row[0]) > cfg.max_seq_len:
                        dropped_too_long += 1
                        continue
                    encoded.append(tuple(row))
            rng.shuffle(encoded)
            n_eval = int(len(encoded) * cfg.eval_share)
            eval_set += encoded[:n_eval]
            phases.append(encoded[n_eval:])
    return phases, eval_set, dropped_too_long


def _image_rows(example, conversation, tools, phase: int, tokenizer, vision, init_from: str) -> list[Row]:
    """(ids, mask, images) rows of an example with images (train/vision_rows.py)."""
    from metis_cli.train.vision_rows import tokenize_with_images

    if vision is None:
        raise DataError(f"sft.phases[{phase}]: example {example.id} has images, but sft.init_from "
                        f"({init_from}) is a text-only model; use a vision-language model")
    return tokenize_with_images(tokenizer, vision, conversation, tools, example.load_images(),
                                where=f"sft.phases[{phase}] example {example.id!r}")


def batch_plan(cfg, phases: list[list[Row]], seed: int) -> list[tuple[int, list[int]]]:
    """Every micro-batch of the run as (phase, example indices), fixed by the seed, so a
    resumed run skips exactly the batches already trained. `cfg`: the recipe's sft section."""
    from metis_cli.model.runtime import SFT_PHASE_ORDER_SEED, derive_seed

    plan: list[tuple[int, list[int]]] = []
    size = cfg.batch_size
    for p, (phase, data) in enumerate(zip(cfg.phases, phases)):
        n = len(data)
        if n == 0:
            raise DataError(f"sft.phases[{p}]: no examples left (all longer than sft.max_seq_len?)")
        order: list[int] = []
        rng = random.Random(derive_seed(SFT_PHASE_ORDER_SEED, seed, p))
        for _ in range(math.ceil(phase.epochs)):
            epoch = list(range(n))
            rng.shuffle(epoch)
            order += epoch
        order = order[: round(phase.epochs * n)]
        plan += [(p, order[i : i + size]) for i in range(0, len(order), size)]
    return plan


def phase_bounds(plan: list[tuple[int, list[int]]], phase_count: int, grad_accum: int) -> list[tuple[int, int]]:
    """(first optimizer step, step count) of each phase."""
    bounds, start = [], 0
    for p in range(phase_count):
        micro = sum(1 for phase, _ in plan if phase == p)
        steps = math.ceil(micro / grad_accum)
        bounds.append((start, steps))
        start += steps
    return bounds


def epoch_of(step: int, plan: list[tuple[int, list[int]]], phases: list[list[Row]], *, grad_accum: int,
             batch_size: int) -> float:
    """The epoch (of its phase, 3 decimals) that optimizer step `step` ends in."""
    micro_index = min(step * grad_accum, len(plan)) - 1
    phase = plan[micro_index][0]
    before = sum(1 for p, _ in plan[:micro_index + 1] if p == phase)
    per_epoch = math.ceil(len(phases[phase]) / batch_size)
    return round(before / per_epoch, 3)
