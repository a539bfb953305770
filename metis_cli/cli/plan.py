"""`metis plan RECIPE --gpus N`: memory per GPU of the recipe's sft and hdpo steps, and whether
they fit on GPUs of `--gpu-memory-gib` (what is counted: metis_cli/model/memory_plan.py)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from metis_cli.cli.common import JsonOpt, RecipeArg, SetOpt, cli_command, print_json

GpusOpt = Annotated[int, typer.Option("--gpus", min=1, help="Processes (GPUs) the run shards over (FSDP2 when above 1).")]
GpuMemoryOpt = Annotated[float, typer.Option("--gpu-memory-gib", min=1, help="Memory of one GPU in GiB.")]


@cli_command
def plan(recipe: RecipeArg, gpus: GpusOpt = 1, gpu_memory_gib: GpuMemoryOpt = 80.0, overrides: SetOpt = None,
         json_output: JsonOpt = False) -> None:
    """Estimate the GPU memory each process needs (weights, gradients, Adam, activations, vLLM)."""
    from metis_cli.model.memory_plan import lora_params, model_shape, plan_stage
    from metis_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    shape = model_shape(loaded)
    stages = (["sft"] if loaded.sft.phases else []) + ["hdpo"]
    checkpointing = loaded.run.distributed.gradient_checkpointing
    plans = {stage: plan_stage(shape, loaded, stage, gpus, gpu_memory_gib) for stage in stages}
    other = {stage: plan_stage(shape, loaded, stage, gpus, gpu_memory_gib, checkpointing=not checkpointing)
             for stage in stages}
    trainable = lora_params(shape, loaded.model.lora) if loaded.model.lora.enabled else shape.params
    if json_output:
        print_json({
            "model": shape.name, "params": shape.params, "trainable_params": trainable, "gpus": gpus,
            "gpu_memory_gib": gpu_memory_gib, "gradient_checkpointing": checkpointing,
            "stages": {stage: {"rows_gib": p.rows, "total_gib": p.total_gib, "fits": p.total_gib <= gpu_memory_gib,
                               "update_gib": p.update_gib, "rollout_gib": p.rollout_gib,
                               "tokens_per_micro_batch": p.tokens_per_micro_batch,
                               "engine_weights_gib": p.engine_weights_gib, "engine_kv_gib": p.engine_kv_gib,
                               "total_gib_checkpointing_flipped": other[stage].total_gib}
                       for stage, p in plans.items()},
        })
        return
    _print(shape, trainable, gpus, gpu_memory_gib, checkpointing, plans, other)


def _print(shape, trainable, gpus, gpu_memory_gib, checkpointing, plans, other) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)
    layout = "one process" if gpus == 1 else f"FSDP2 over {gpus} processes"
    tokens = ", ".join(f"{stage} {p.tokens_per_micro_batch}" for stage, p in plans.items())
    table = Table(title=f"{shape.name}: {_count(shape.params)} parameters ({_count(trainable)} trained), {layout}",
                  caption=f"GiB per GPU; tokens per micro-batch and GPU: {tokens}")
    table.add_column("component")
    for stage in plans:
        table.add_column(stage, justify="right")
    names = list(dict.fromkeys(name for p in plans.values() for name in p.rows))
    for name in names:
        table.add_row(name, *(f"{p.rows[name]:.1f}" if name in p.rows else "-" for p in plans.values()))
    if any(p.rollout_gib is not None for p in plans.values()):
        table.add_row("update", *(f"{p.update_gib:.1f}" for p in plans.values()))
        table.add_row("rollout (engine awake)", *("-" if p.rollout_gib is None else f"{p.rollout_gib:.1f}"
                                                  for p in plans.values()))
    table.add_row("total", *(f"{p.total_gib:.1f}" for p in plans.values()), style="bold")
    console.print(table)
    flipped = "with" if not checkpointing else "without"
    for stage, p in plans.items():
        spare = gpu_memory_gib - p.total_gib
        verdict = f"fits ({spare:.1f} GiB spare)" if spare >= 0 else f"does NOT fit ({-spare:.1f} GiB short)"
        console.print(f"{stage}: {p.total_gib:.1f} of {gpu_memory_gib:g} GiB per GPU: {verdict}; "
                      f"{flipped} run.distributed.gradient_checkpointing: {other[stage].total_gib:.1f} GiB",
                      highlight=False)
    if any("vLLM engine" in p.rows for p in plans.values()):
        console.print("vLLM engine: rollout.vllm.gpu_memory_utilization of the GPU, held through the update "
                      "(rollout.vllm.sleep_mode frees it there)", highlight=False)
    for p in plans.values():
        if p.engine_gib is None:
            continue
        room = (f"leaving {p.engine_kv_gib:.1f} GiB for its KV cache" if p.engine_kv_gib > 0 else
                "which does NOT fit: raise rollout.vllm.gpu_memory_utilization or rollout.vllm.tensor_parallel_size")
        slices = ("" if p.engine_tensor_parallel == 1 else
                  f" (1/{p.engine_tensor_parallel} of them: rollout.vllm.tensor_parallel_size {p.engine_tensor_parallel})")
        console.print(f"vLLM engine share: {p.engine_gib:.1f} GiB per GPU; the policy's weights take "
                      f"{p.engine_weights_gib:.1f} GiB of it{slices}, {room}", highlight=False)
    if any(p.rollout_gib is not None for p in plans.values()):
        console.print("rollout.vllm.sleep_mode: the engine sleeps in the update; total = the larger of the "
                      "update and the rollout (the engine beside the weights, masters and Adam states kept "
                      "between updates; the gradients are freed after each update)", highlight=False)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
