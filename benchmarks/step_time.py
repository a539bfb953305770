"""Benchmark: wall time of one RL step -- metis's HDPO step vs TRL's GRPOTrainer step -- on the
same tool workload, side by side in one run, as ratios (target: metis <= 0.5x TRL).

Run (alone: it uses the CPU fully; about 2 minutes with the defaults):
    .venv/bin/python benchmarks/step_time.py [--steps 5 --warmup-steps 1 --only metis_hf trl_hf]
The first run creates benchmarks/.venv-trl (benchmarks/_trl_env.py), so TRL never enters the
project's venv.

Workload, identical for every side: benchmarks/_workload.py (the fitted tiny model, the synthetic
task's RL prompts, G = 8 samples of 8 prompts per step, at most 64 tokens after the prompt,
temperature 1, the calculator, 1 torch thread, float32, lr 1e-6, no KL). Rewards are cheap on both
sides (metis: the numeric checker; its default, math_verify, costs about 2.5 ms a rollout more).
- metis: `metis hdpo` on a recipe holding that workload (HF backend, then vLLM), `--warmup-steps`
  + `--steps` steps, no eval and no checkpoints inside the loop; each step's `step_s`, `rollout_s`
  and `update_s` come from its metrics.jsonl (rollout + scoring, advantages, PPO-clip update,
  weight sync). The micro-batch is the recipe default unless `--micro-batch-size` says otherwise.
- TRL: GRPOTrainer (HF generation, then vLLM colocate), the same number of steps; each step's
  wall time from on_step_begin to on_step_end (generation with tools, rewards, loss, backward,
  optimizer step) and its generation time, via benchmarks/trl_rollouts.py.
Engine start-up and model loading are outside every figure. Figures are medians over the
measured steps; ratios are metis median / TRL median for the same generation engine, and
"metis/trl" compares each side's faster engine.

Prints a few lines of text and one JSON line, and writes the JSON to benchmarks/results/step_time.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _trl_env import run_trl
from _workload import (BENCHMARKS, add_workload_args, check_same_tool_listing, prepare_model, rl_prompt_rows,
                       rollout_recipe)

REPO = BENCHMARKS.parent
RESULT_PATH = BENCHMARKS / "results" / "step_time.json"
TARGET_RATIO = 0.5
SIDES = {"metis_hf": ("metis", "hf"), "metis_vllm": ("metis", "vllm"),
         "trl_hf": ("trl", "hf"), "trl_vllm": ("trl", "vllm_colocate")}
ENGINE_PAIRS = (("metis_hf", "trl_hf"), ("metis_vllm", "trl_vllm"))
NEVER = 1_000_000  # a step count no run reaches: eval, checkpoints and samples stay out of the loop


def metis_steps(backend_name: str, model_dir: Path, rows: list[dict], args, work_dir: Path) -> dict:
    """`metis hdpo` for warm-up + measured steps on one backend; medians of its metrics.jsonl."""
    from metis_cli.agent.factory import build_registry
    from metis_cli.data.synthetic import write_jsonl
    from metis_cli.recipe.load import recipe_to_yaml, validate_data

    run_dir = work_dir / f"metis_{backend_name}"
    prompts_path = write_jsonl(rows, run_dir / "rl_prompts.jsonl")
    data = rollout_recipe(backend_name, model_dir, [r["messages"] for r in rows], args)
    data["run"].update(name=f"step-time-{backend_name}", output_dir=str(run_dir))
    data["data"] = {"rl": [{"path": str(prompts_path)}]}
    data["reward"] = {"checker": "numeric"}
    data["hdpo"] = {"init_from": str(model_dir), "steps": args.warmup_steps + args.steps,
                    "prompts_per_step": len(rows), "group_size": args.group_size,
                    "eval_every": NEVER, "save_every": NEVER, "sample_every": NEVER, "samples_to_save": 0,
                    **({"micro_batch_size": args.micro_batch_size} if args.micro_batch_size else {})}
    recipe = validate_data(data)
    check_same_tool_listing(build_registry(recipe).specs())
    recipe_path = run_dir / "recipe.yaml"
    recipe_path.write_text(recipe_to_yaml(recipe))
    result = subprocess.run([sys.executable, "-m", "metis_cli", "hdpo", str(recipe_path), "--quiet", "--overwrite"],
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"metis hdpo ({backend_name}) failed:\n{result.stderr[-4000:]}")
    from metis_cli.telemetry import metrics as m

    records = m.read_metrics(Path(recipe.hdpo.output) / "metrics.jsonl")
    measured = [r for r in records if m.STEP_S in r and r[m.STEP] > args.warmup_steps]
    return {"engine": backend_name, "steps": len(measured),
            "micro_batch_size": recipe.hdpo.micro_batch_size,
            "step_s": [r[m.STEP_S] for r in measured],
            "step_s_median": _median(r[m.STEP_S] for r in measured),
            "generation_s_median": _median(r[m.ROLLOUT_S] for r in measured),
            "update_s_median": _median(r[m.UPDATE_S] for r in measured),
            "generated_tokens_per_step": _median(r[m.GENERATED_TOKENS] for r in measured),
            "tool_call_ratio": _median(r[m.TOOL_CALL_RATIO] for r in measured)}


def trl_steps(mode: str, model_dir: Path, rows: list[dict], args, work_dir: Path) -> dict:
    """GRPOTrainer for warm-up + measured steps in one generation mode; per-step medians."""
    raw = run_trl(mode, model_dir, [r["messages"] for r in rows], args, work_dir)
    rest = [step - generation for step, generation in zip(raw["step_s"], raw["generation_s_per_step"])]
    return {"engine": mode, "steps": len(raw["step_s"]), "step_s": raw["step_s"],
            "step_s_median": _median(raw["step_s"]),
            "generation_s_median": _median(raw["generation_s_per_step"]),
            "update_s_median": _median(rest),
            "generated_tokens_per_step": raw["generated_tokens"] / len(raw["step_s"]),
            "tool_call_ratio": raw["tool_call_ratio"]}


def _median(values) -> float:
    return statistics.median(list(values))


def ratios(results: dict) -> dict:
    """metis median / TRL median per generation engine, and each side's fastest against the other's."""
    out = {f"{metis}/{trl}": results[metis]["step_s_median"] / results[trl]["step_s_median"]
           for metis, trl in ENGINE_PAIRS if metis in results and trl in results}
    fastest = {side: min((r["step_s_median"] for name, r in results.items() if name.startswith(side)), default=None)
               for side in ("metis", "trl")}
    if None not in fastest.values():
        out["metis/trl"] = fastest["metis"] / fastest["trl"]
    return out


def report(results: dict, step_ratios: dict) -> list[str]:
    lines = [f"{name:10s} step {r['step_s_median']:6.2f} s  (generation {r['generation_s_median']:5.2f} s, "
             f"rest {r['update_s_median']:5.2f} s)  {r['generated_tokens_per_step']:6.0f} tokens/step  "
             f"tool-call ratio {r['tool_call_ratio']:.2f}  median of {r['steps']}"
             for name, r in results.items()]
    if step_ratios:
        lines.append("  ".join(f"{k} = {v:.2f}x" for k, v in step_ratios.items()))
    if "metis/trl" in step_ratios:
        verdict = "met" if step_ratios["metis/trl"] <= TARGET_RATIO else "MISSED"
        lines.append(f"target metis/trl <= {TARGET_RATIO}x: {verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, steps=8)
    parser.add_argument("--only", nargs="+", choices=list(SIDES), default=list(SIDES), help="sides to measure")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="metis hdpo.micro_batch_size (default: the recipe default)")
    parser.add_argument("--out", type=Path, default=RESULT_PATH, help="where the JSON result goes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = rl_prompt_rows(args.prompts)
    results = {}
    with tempfile.TemporaryDirectory(prefix="step-time-") as tmp:
        work_dir = Path(tmp)
        model_dir = prepare_model(work_dir)
        for name in args.only:
            side, engine = SIDES[name]
            measure = metis_steps if side == "metis" else trl_steps
            results[name] = measure(engine, model_dir, rows, args, work_dir)
    step_ratios = ratios(results)
    payload = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "results": results, "ratios": step_ratios, "target_ratio": TARGET_RATIO}
    print("\n".join(report(results, step_ratios)))
    print(json.dumps(payload))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
