"""Benchmark: generated tokens/s of multi-turn tool rollouts -- metis's vLLM backend (continuous
batching, and `vllm_waves`: the same engine turn by turn), metis's HF backend, and TRL's
GRPOTrainer (HF generation and vLLM colocate) -- in one run, as ratios.

Run (alone: it uses the CPU fully):
    .venv/bin/python benchmarks/rollout_throughput.py [--prompts 8 --group-size 8 --max-new-tokens 64 --steps 3]
    .venv/bin/python benchmarks/rollout_throughput.py --skip-trl     (metis backends only)
    .venv/bin/python benchmarks/rollout_throughput.py --tool-latency-ms 50   (a tool with a 50 ms round trip)
The first run creates benchmarks/.venv-trl (benchmarks/_trl_env.py), so TRL never enters the
project's venv.

Workload, identical for all four: benchmarks/_workload.py (the fitted tiny model, the RL prompts,
G, lengths, the calculator, 1 torch thread). `--warmup-steps` warm-up steps (default 1), then
`--steps` measured steps. Measured per step: wall time of the generation phase -- sampling, tool
calls, and for vLLM the weight sync every step needs (metis: `update_weights` +
`RolloutEngine.run`; TRL: `GRPOTrainer._generate`) -- and the tokens the model sampled (tool
output excluded). tokens_per_s = sum of tokens / sum of seconds. tool-call ratio
is printed to show the workloads match; metis counts malformed calls too, TRL only parsed ones.

Two regimes. With the in-process calculator (default) a tool call costs microseconds and every
side is bound by the same model forward passes. With `--tool-latency-ms`, each call waits that
long first, as a sandboxed code run or a web API would: then how tool calls are scheduled
matters (metis: concurrently, `tools.max_concurrency` at a time, and with vLLM each rollout's next
turn starts as soon as its own call returns; TRL: one rollout's calls at a time).

Prints a table and one JSON line with every figure and the ratios vllm/trl_hf, vllm/trl_vllm and
vllm/hf.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _trl_env import run_trl
from _workload import (add_workload_args, check_same_tool_listing, prepare_model, rl_prompt_rows, rollout_recipe,
                       workload_registry)


def metis_rollouts(backend_name: str, model_dir: Path, prompts: list[list[dict]], args) -> dict:
    """args.warmup_steps + args.steps steps of RolloutEngine.run on one backend; the warm-up ones are dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metis_cli.agent.factory import build_backend, build_engine
    from metis_cli.recipe.load import validate_data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = rollout_recipe(backend_name.removesuffix("_waves"), model_dir, prompts, args)
    data["rollout"]["vllm"]["continuous"] = not backend_name.endswith("_waves")
    recipe = validate_data(data)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    registry = workload_registry(recipe, args)
    check_same_tool_listing(registry.specs())
    backend = build_backend(recipe, model, tokenizer, model_path=str(model_dir))
    engine = build_engine(recipe, backend, tokenizer, registry)
    steps = []
    try:
        for step in range(args.warmup_steps + args.steps):
            started = time.perf_counter()
            backend.update_weights(model)
            rollouts = engine.run(prompts, args.group_size, seed=step)
            steps.append({"seconds": time.perf_counter() - started,
                          "generated_tokens": sum(r.generated_tokens for r in rollouts),
                          "rollouts": len(rollouts), "with_tools": sum(r.tool_calls > 0 for r in rollouts)})
    finally:
        backend.close()
    return _summary(backend_name, steps[args.warmup_steps:])


def _summary(name: str, steps: list[dict]) -> dict:
    seconds = sum(s["seconds"] for s in steps)
    tokens = sum(s["generated_tokens"] for s in steps)
    rollouts = sum(s["rollouts"] for s in steps)
    return {"mode": name, "steps": len(steps), "rollouts": rollouts, "generated_tokens": tokens,
            "generation_s": seconds, "tokens_per_s": tokens / seconds,
            "tool_call_ratio": sum(s["with_tools"] for s in steps) / rollouts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, steps=3)
    parser.add_argument("--skip-trl", action="store_true", help="measure the metis backends only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    prompts = [row["messages"] for row in rl_prompt_rows(args.prompts)]
    with tempfile.TemporaryDirectory(prefix="rollout-throughput-") as tmp:
        work_dir = Path(tmp)
        model_dir = prepare_model(work_dir)
        results = {name: metis_rollouts(name, model_dir, prompts, args) for name in ("vllm", "vllm_waves", "hf")}
        if not args.skip_trl:
            for name, mode in (("trl_hf", "hf"), ("trl_vllm", "vllm_colocate")):
                results[name] = run_trl(mode, model_dir, prompts, args, work_dir)
    speed = {name: r["tokens_per_s"] for name, r in results.items()}
    ratios = {f"vllm/{other}": speed["vllm"] / speed[other] for other in speed if other != "vllm"}
    for name, r in results.items():
        print(f"{name:9s} {r['tokens_per_s']:9.0f} tokens/s  {r['generated_tokens'] / r['rollouts']:5.1f} tokens/rollout"
              f"  tool-call ratio {r['tool_call_ratio']:.2f}  ({r['generated_tokens']} tokens in {r['generation_s']:.2f} s)")
    print("  ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    print(json.dumps({"config": vars(args), "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
