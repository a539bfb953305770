"""Benchmark: tokens/s of `metis sft` on the tiny recipe -- padded batches (the layout before
packing, `sft.packing: false`) vs packed ones (`sft.packing: true`, the default) -- side by side
in one run, as a ratio (target: packed >= 2x padded, recipe-weighted).

Run (alone: it uses the CPU fully; about 4 minutes with the defaults):
    .venv/bin/python benchmarks/sft_throughput.py [--rounds 2 --knowledge-epochs 1 --cold-start-epochs 0.1]

Workload: recipes/tiny.yaml as the main job runs it (the ~1M-parameter Qwen3 built from its
config, batch 64, its data, `run.threads: 0` = every core), cut short: the knowledge phase for
`--knowledge-epochs` and the cold-start phase for `--cold-start-epochs`, no checkpoints, eval
loss only at the last step. Both sides start from the same base model folder and train on the
same batches in the same order. Each round runs padded, then packed (machine speed drifts over
minutes on shared CPUs, so the sides alternate); figures pool the rounds.

Measured per side and phase from metrics.jsonl: tokens/s = assistant tokens trained / summed
`step_s` (the forward, backward and optimizer step, without setup or eval), over every step but
each phase's first. "recipe-weighted" projects the full tiny recipe's SFT training time from each
phase's median step time and its step count in the full recipe; tokens/s over that projection is
the figure the main job sees. `wall_s` is the whole `metis sft` command (setup, tokenizing, eval
included). Loss agreement: the largest per-step loss difference between the sides over the first
`--compare-steps` steps (float rounding only; later steps drift apart chaotically at lr 3e-3, as
they do between thread counts), and each side's final loss and eval loss.

Prints a few lines of text and one JSON line, and writes the JSON to benchmarks/results/sft_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RECIPE = REPO / "recipes" / "tiny.yaml"
RESULT_PATH = BENCHMARKS / "results" / "sft_throughput.json"
TARGET_RATIO = 2.0
SIDES = {"padded": "false", "packed": "true"}
NEVER = 1_000_000  # a step count no run reaches: no checkpoints inside the loop


def run_sft(side: str, work_dir: Path, round_index: int, args) -> dict:
    """One `metis sft` of the shortened tiny recipe on `side`; its metrics and wall time."""
    run_dir = work_dir / f"{side}-{round_index}"
    settings = {
        "run.output_dir": str(run_dir), "model.name_or_path": str(work_dir / "base"),
        "sft.phases.0.epochs": str(args.knowledge_epochs), "sft.phases.1.epochs": str(args.cold_start_epochs),
        "sft.eval_every": str(NEVER), "sft.save_every": str(NEVER), "sft.packing": SIDES[side],
    }
    command = [sys.executable, "-m", "metis_cli", "sft", str(RECIPE), "--quiet", "--overwrite"]
    command += [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"metis sft ({side}) failed:\n{result.stderr[-4000:]}")
    from metis_cli.telemetry import metrics as m

    return {"wall_s": wall_s, "records": m.read_metrics(run_dir / "sft" / "metrics.jsonl")}


def phase_figures(records: list[dict]) -> dict:
    """Per phase: measured steps (its first skipped), tokens, summed and median step_s."""
    from metis_cli.telemetry import metrics as m

    phases: dict[int, list[dict]] = {}
    for record in records:
        phases.setdefault(record[m.PHASE], []).append(record)
    out = {}
    for phase, rows in sorted(phases.items()):
        measured = rows[1:] or rows
        tokens = sum(r[m.TOKENS_PER_S] * r[m.STEP_S] for r in measured)
        seconds = sum(r[m.STEP_S] for r in measured)
        out[phase] = {"steps": len(rows), "measured_steps": len(measured), "tokens": tokens, "step_s_sum": seconds,
                      "step_s_median": statistics.median(r[m.STEP_S] for r in measured),
                      "tokens_per_step": tokens / len(measured), "tokens_per_s": tokens / seconds}
    return out


def pooled(runs: list[dict]) -> dict:
    """Phase figures over every round of one side."""
    per_round = [phase_figures(run["records"]) for run in runs]
    out = {}
    for phase in per_round[0]:
        parts = [figures[phase] for figures in per_round]
        tokens, seconds = sum(p["tokens"] for p in parts), sum(p["step_s_sum"] for p in parts)
        out[phase] = {"steps": parts[0]["steps"], "tokens_per_s": tokens / seconds,
                      "tokens_per_s_by_round": [p["tokens_per_s"] for p in parts],
                      "step_s_median": statistics.median(p["step_s_median"] for p in parts),
                      "tokens_per_step": tokens / sum(p["measured_steps"] for p in parts)}
    return out


def recipe_weighted(figures: dict, full_steps: dict[int, float]) -> dict:
    """The full tiny recipe's SFT training time and tokens/s, from per-phase median step times."""
    seconds = sum(figures[p]["step_s_median"] * full_steps[p] for p in figures)
    tokens = sum(figures[p]["tokens_per_step"] * full_steps[p] for p in figures)
    return {"train_s": seconds, "tokens_per_s": tokens / seconds}


def full_recipe_steps(measured_steps: dict[int, int], args) -> dict[int, float]:
    """Steps of each phase in the full recipe: the measured count scaled by the epoch ratio."""
    from metis_cli.recipe.load import load_recipe

    full = load_recipe(RECIPE).sft.phases
    short = {0: args.knowledge_epochs, 1: args.cold_start_epochs}
    return {p: steps * full[p].epochs / short[p] for p, steps in measured_steps.items()}


def loss_agreement(before: list[dict], after: list[dict], steps: int) -> dict:
    from metis_cli.telemetry import metrics as m

    diffs = [abs(a[m.LOSS] - b[m.LOSS]) for a, b in zip(before[:steps], after[:steps])]
    final = {name: {"loss": records[-1][m.LOSS], "eval_loss": records[-1].get(m.EVAL_LOSS)}
             for name, records in (("padded", before), ("packed", after))}
    return {"compared_steps": len(diffs), "loss_max_abs_diff": max(diffs), "final": final}


def report(payload: dict) -> list[str]:
    lines = []
    names = {0: "knowledge", 1: "cold start"}
    for phase, name in names.items():
        before, after = payload["results"]["padded"][phase], payload["results"]["packed"][phase]
        lines.append(f"{name:10s} padded {before['tokens_per_s']:6.0f} tok/s ({before['step_s_median'] * 1000:4.0f} ms/step)"
                     f"  packed {after['tokens_per_s']:6.0f} tok/s ({after['step_s_median'] * 1000:4.0f} ms/step)"
                     f"  = {payload['ratios'][name]:.2f}x")
    weighted = payload["recipe_weighted"]
    lines.append(f"recipe-weighted: padded {weighted['padded']['tokens_per_s']:.0f} tok/s "
                 f"(SFT training {weighted['padded']['train_s']:.0f} s), packed {weighted['packed']['tokens_per_s']:.0f} "
                 f"tok/s ({weighted['packed']['train_s']:.0f} s) = {payload['ratios']['recipe_weighted']:.2f}x")
    walls = payload["wall_s"]
    lines.append(f"wall of the shortened metis sft: padded {statistics.median(walls['padded']):.0f} s, "
                 f"packed {statistics.median(walls['packed']):.0f} s (setup and tokenizing included)")
    agree = payload["loss_agreement"]
    lines.append(f"loss: max |padded - packed| over the first {agree['compared_steps']} steps "
                 f"{agree['loss_max_abs_diff']:.1e}; final loss {agree['final']['padded']['loss']:.4f} vs "
                 f"{agree['final']['packed']['loss']:.4f}, eval {agree['final']['padded']['eval_loss']:.4f} vs "
                 f"{agree['final']['packed']['eval_loss']:.4f}")
    verdict = "met" if payload["ratios"]["recipe_weighted"] >= TARGET_RATIO else "MISSED"
    lines.append(f"target packed/padded >= {TARGET_RATIO}x (recipe-weighted): {verdict}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="padded-then-packed pairs to run")
    parser.add_argument("--knowledge-epochs", type=float, default=1.0, help="of phase 0 (the recipe: 8)")
    parser.add_argument("--cold-start-epochs", type=float, default=0.1, help="of phase 1 (the recipe: 2)")
    parser.add_argument("--compare-steps", type=int, default=10, help="first steps whose losses are compared")
    parser.add_argument("--out", type=Path, default=RESULT_PATH, help="where the JSON result goes")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="sft-throughput-") as tmp:
        for round_index in range(args.rounds):
            for side in SIDES:
                runs[side].append(run_sft(side, Path(tmp), round_index, args))
    results = {side: pooled(side_runs) for side, side_runs in runs.items()}
    full_steps = full_recipe_steps({p: f["steps"] for p, f in results["padded"].items()}, args)
    weighted = {side: recipe_weighted(figures, full_steps) for side, figures in results.items()}
    ratios = {name: results["packed"][p]["tokens_per_s"] / results["padded"][p]["tokens_per_s"]
              for p, name in ((0, "knowledge"), (1, "cold start"))}
    ratios["recipe_weighted"] = weighted["packed"]["tokens_per_s"] / weighted["padded"]["tokens_per_s"]
    payload = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "results": results, "full_recipe_steps": full_steps, "recipe_weighted": weighted, "ratios": ratios,
               "wall_s": {side: [run["wall_s"] for run in side_runs] for side, side_runs in runs.items()},
               "loss_agreement": loss_agreement(runs["padded"][0]["records"], runs["packed"][0]["records"],
                                                args.compare_steps),
               "target_ratio": TARGET_RATIO}
    print("\n".join(report(payload)))
    print(json.dumps(payload))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
