"""The tool-use workload the metis-vs-TRL benchmarks share (rollout_throughput.py, step_time.py):
the fitted tiny model, the RL prompts, the command-line options that size the workload, and the
metis recipe sections that reproduce it -- so both sides of every comparison run the same thing.

Workload: a tiny Qwen3 (default `build_tiny_model` sizes, about 1.1M parameters) taught in a few
seconds of SFT to call the calculator, so most rollouts are multi-turn (call, tool result,
answer); the same `--prompts` RL prompts of the synthetic task every step, G = `--group-size`
samples each, temperature 1, at most `--max-new-tokens` tokens after the prompt, tool output
included (TRL's max_completion_length; metis: rollout.max_total_tokens = longest prompt + that),
`--max-tool-calls` calls per rollout, `--threads` torch threads, float32. With
`--tool-latency-ms`, each calculator call also waits that long (asyncio sleep on both sides:
TRL gets it as an async tool, its fastest tool path), as a tool running elsewhere would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
SFT_STEPS = 60
PROMPT_SEED = 1


def add_workload_args(parser: argparse.ArgumentParser, *, steps: int) -> None:
    parser.add_argument("--prompts", type=int, default=8, help="RL prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens after the prompt, tool output included")
    parser.add_argument("--max-tool-calls", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps run first and not measured")
    parser.add_argument("--steps", type=int, default=steps, help="measured steps after the warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-gb", type=float, default=0.5, help="vLLM KV cache (CPU RAM)")
    parser.add_argument("--tool-latency-ms", type=float, default=0.0,
                        help="wait added to every calculator call, standing in for a tool that runs elsewhere "
                             "(a sandboxed code run, a search or web API); 0 = the in-process calculator")


def rl_prompt_rows(count: int) -> list[dict]:
    """The synthetic task's RL prompts (id, messages, answer, subset), the same for every side."""
    from metis_cli.data import synthetic

    return synthetic.rl_prompts(count, seed=PROMPT_SEED)


def prepare_model(folder: Path) -> Path:
    """The tiny model, fitted on cold-start trajectories so that it calls the calculator."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metis_cli.algo.losses import masked_mean
    from metis_cli.data import synthetic
    from metis_cli.data.chat import tokenize_conversation
    from metis_cli.train.logprobs import token_logprobs
    from metis_cli.model.tiny import build_tiny_model

    base = build_tiny_model(folder / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = synthetic.cold_start_trajectories(64, seed=0)
    examples = [tokenize_conversation(tokenizer, r["messages"], [synthetic.CALCULATOR_TOOL_SPEC]) for r in rows]
    # TRL ends a tool-call turn when the model samples <|im_end|> after </tool_call>; metis stops at
    # </tool_call> and adds <|im_end|> itself. Training on that token too serves both conventions.
    tool_call_end, end_of_turn = tokenizer.convert_tokens_to_ids(["</tool_call>", tokenizer.eos_token])
    for ids, mask in examples:
        for i in range(1, len(ids)):
            if ids[i - 1] == tool_call_end and ids[i] == end_of_turn:
                mask[i] = 1
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    attention_mask, loss_mask = torch.zeros_like(input_ids), torch.zeros((len(examples), width))
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, : len(ids)], attention_mask[row, : len(ids)] = torch.tensor(ids), 1
        loss_mask[row, : len(ids)] = torch.tensor(mask, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(SFT_STEPS):
        loss = -masked_mean(token_logprobs(model, input_ids, attention_mask)[0], loss_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fitted = folder / "fitted"
    model.save_pretrained(fitted)
    tokenizer.save_pretrained(fitted)
    return fitted


def prompt_token_ids(model_dir: Path, prompts: list[list[dict]]) -> list[list[int]]:
    """Each prompt as metis renders it (chat template, calculator listing, open assistant turn);
    TRL's side checks that it renders the very same ids (trl_rollouts.py)."""
    from transformers import AutoTokenizer

    from metis_cli.data import synthetic
    from metis_cli.data.chat import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [prompt_ids(tokenizer, p, [synthetic.CALCULATOR_TOOL_SPEC]) for p in prompts]


def rollout_recipe(backend_name: str, model_dir: Path, prompts: list[list[dict]], args) -> dict:
    """The run, model, tools and rollout recipe sections that sample this workload in metis."""
    longest_prompt = max(map(len, prompt_token_ids(model_dir, prompts)))
    return {
        "run": {"seed": 0, "device": "cpu", "threads": args.threads},
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "tools": {"enabled": ["calculator"], "max_calls_per_rollout": args.max_tool_calls},
        "rollout": {"backend": backend_name, "max_turns": args.max_tool_calls + 1,
                    "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                    # TRL's max_completion_length bounds all turns + tool output together: so here.
                    "max_total_tokens": longest_prompt + args.max_new_tokens,
                    "batch_size": len(prompts) * args.group_size, "vllm": {"cpu_kv_cache_gb": args.kv_cache_gb}},
    }


def check_same_tool_listing(specs: list[dict]) -> None:
    """Same prompts for all: metis's calculator spec must be the one the model was fitted on (and
    that run_trl hands TRL to render)."""
    from metis_cli.data import synthetic

    if specs != [synthetic.CALCULATOR_TOOL_SPEC]:
        raise SystemExit(f"the calculator registry renders {specs}, the fitting data "
                         f"{[synthetic.CALCULATOR_TOOL_SPEC]}: the workload would differ between sides")


class DelayedTool:
    """`tool` with `latency_s` of waiting added to every call (a remote or sandboxed tool's round
    trip); same name, description and schema, so prompts do not change."""

    def __init__(self, tool, latency_s: float):
        self.tool, self.latency_s = tool, latency_s
        self.name, self.description, self.parameters = tool.name, tool.description, tool.parameters

    async def call(self, arguments: dict):
        import asyncio

        await asyncio.sleep(self.latency_s)
        return await self.tool.call(arguments)


def workload_registry(recipe, args):
    """The recipe's tool registry; with --tool-latency-ms, its calculator answers after that wait."""
    from metis_cli.agent.factory import build_registry
    from metis_cli.agent.tools.calculator import CalculatorTool
    from metis_cli.agent.tools.registry import ToolRegistry

    if args.tool_latency_ms <= 0:
        return build_registry(recipe)
    tools = recipe.tools
    return ToolRegistry([DelayedTool(CalculatorTool(), args.tool_latency_ms / 1000)], timeout_s=tools.timeout_s,
                        max_calls_per_rollout=tools.max_calls_per_rollout, max_concurrency=tools.max_concurrency)
