"""Benchmark: HF-backend generation and multi-turn rollout throughput on the tiny model (CPU).

Run: .venv/bin/python benchmarks/rollout_hf.py [--prompts 16 --group-size 8 --max-new-tokens 64]
Prints one JSON line:
- backend_tokens_per_s: one HFBackend.generate call over prompts x group_size chat prompts
  (no stop ids, so every row generates max_new_tokens), sampled tokens per wall second;
- hf_generate_tokens_per_s: the same prompts through `model.generate` (sampling, with
  output_logits) in batches of the same size -- the alternative HFBackend's own loop replaced;
- rollout_tokens_per_s: RolloutEngine.run with the calculator tool, generated tokens per wall
  second including tool calls and template rendering; plus turn and tool-call counts.
Uses 1 torch thread by default (the machines this runs on have 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from metis_cli.agent.backend import SamplingParams
from metis_cli.agent.hf_backend import HFBackend
from metis_cli.agent.rollout import RolloutEngine
from metis_cli.agent.tools.registry import ToolRegistry
from metis_cli.data import synthetic
from metis_cli.data.chat import prompt_ids
from metis_cli.recipe.schema import ToolsConfig
from metis_cli.model.tiny import build_tiny_model


def backend_tokens_per_s(backend: HFBackend, prompts: list[list[int]], max_new_tokens: int) -> float:
    started = time.perf_counter()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, stop_token_ids=[], seed=0)
    generations = backend.generate(prompts, params)
    return sum(len(g.token_ids) for g in generations) / (time.perf_counter() - started)


def hf_generate_tokens_per_s(
    model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, pad_id: int
) -> float:
    generated = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=pad_id)
            generated += (out.sequences.shape[1] - width) * len(batch)
    return generated / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per turn")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=None, help="tiny model folder (default: built in a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_tiny_model(args.model_dir or Path(scratch) / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    backend = HFBackend(model, tokenizer, batch_size=args.batch_size)
    registry = ToolRegistry.from_config(ToolsConfig(enabled=["calculator"]))
    conversations = [row["messages"] for row in synthetic.rl_prompts(args.prompts, seed=0)]
    token_prompts = [prompt_ids(tokenizer, c, registry.specs()) for c in conversations for _ in range(args.group_size)]

    report = {
        "benchmark": "rollout_hf",
        "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sequences": len(token_prompts),
        "prompt_tokens_mean": sum(map(len, token_prompts)) / len(token_prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "backend_tokens_per_s": round(backend_tokens_per_s(backend, token_prompts, args.max_new_tokens)),
        "hf_generate_tokens_per_s": round(hf_generate_tokens_per_s(
            model, token_prompts, args.max_new_tokens, args.batch_size, tokenizer.pad_token_id)),
    }

    engine = RolloutEngine(backend, tokenizer, registry, max_turns=args.max_turns,
                           max_new_tokens_per_turn=args.max_new_tokens, max_total_tokens=1024,
                           temperature=1.0, top_p=1.0)
    started = time.perf_counter()
    rollouts = engine.run(conversations, args.group_size, seed=0)
    rollout_s = time.perf_counter() - started
    generated = sum(r.generated_tokens for r in rollouts)
    report.update(
        rollout_s=round(rollout_s, 3),
        rollout_generated_tokens=generated,
        rollout_tokens_per_s=round(generated / rollout_s),
        turns_mean=sum(r.num_turns for r in rollouts) / len(rollouts),
        tool_calls_mean=sum(r.tool_calls for r in rollouts) / len(rollouts),
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
