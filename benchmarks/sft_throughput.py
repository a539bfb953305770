"""Benchmark: tokens/s of `metis sft` on the tiny recipe, side by side in one run, three ways:
`before` -- the code issue 18 measured (`--before-ref`, default 8d2faeb, run from a temporary git
worktree of this repository), `padded` -- today's code with `sft.packing: false`, and `packed` --
today's default. Ratios packed/before (the issue's target: >= 2x, recipe-weighted) and
packed/padded (what packing alone gives on top of everything else since).

Run (alone: it uses the CPU fully; about 6 minutes with the defaults, 2 of them the before side;
--before-ref '' leaves it out):
    .venv/bin/python benchmarks/sft_throughput.py [--rounds 2 --knowledge-epochs 1 --cold-start-epochs 0.1]

Workload: recipes/tiny.yaml as the main job runs it (the ~1M-parameter Qwen3 built from its
config, batch 64, its data, `run.threads: 0` = every core), cut short: the knowledge phase for
`--knowledge-epochs` and the cold-start phase for `--cold-start-epochs`, no checkpoints, eval
loss only at the last step. Both sides start from the same base model folder and train on the
same batches in the same order (`before` reads the same recipe file from its own tree; the
recipe is unchanged since). Each round runs padded, packed, then before (machine speed drifts
over minutes on shared CPUs, so the sides alternate); figures pool the rounds.

Measured per side and phase from metrics.jsonl: tokens/s = assistant tokens trained / summed
`step_s` (the forward, backward and optimizer step, without setup or eval), over every step but
each phase's first. "recipe-weighted" projects the full tiny recipe's SFT training time from each
phase's median step time and its step count in the full recipe; tokens/s over that projection is
the figure the main job sees. `wall_s` is the whole `metis sft` command (setup, tokenizing, eval
included). Loss agreement: the largest per-step loss difference between the sides over the first
`--compare-steps` steps, of padded and of before against packed (float rounding only; later
steps drift apart chaotically at lr 3e-3, as they do between thread counts), and each side's final
loss and eval loss.

Prints a few lines of text and one JSON line, and writes the JSON to benchmarks/results/sft_throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
BEFORE_REF = "8d2faeb"
"""The code issue 18 measured ("SFT ran at ~2-2.5k tokens/s"): the last commit before this
round's first; its recipes/tiny.yaml equals today's."""
NEVER = 1_000_000  # a step count no run reaches: no checkpoints inside the loop


def run_sft(side: str, work_dir: Path, round_index: int, args, before_tree: Path | None = None) -> dict:
    """One `metis sft` of the shortened tiny recipe on `side` ("before": the code in
    `before_tree`, which has no `sft.packing`); its metrics and wall time."""
    run_dir = work_dir / f"{side}-{round_index}"
    settings = {
        "run.output_dir": str(run_dir), "model.name_or_path": str(work_dir / "base"),
        "sft.phases.0.epochs": str(args.knowledge_epochs), "sft.phases.1.epochs": str(args.cold_start_epochs),
        "sft.eval_every": str(NEVER), "sft.save_every": str(NEVER),
    }
    tree, env = REPO, None
    if side == "before":
        tree, env = before_tree, {**os.environ, "PYTHONPATH": str(before_tree)}
    else:
        settings["sft.packing"] = SIDES[side]
    command = [sys.executable, "-m", "metis_cli", "sft", str(tree / "recipes" / "tiny.yaml"), "--quiet", "--overwrite"]
    command += [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
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


def loss_agreement(first_runs: dict[str, list[dict]], steps: int) -> dict:
    """Each side's first-round losses against packed's: largest difference over `steps` steps."""
    from metis_cli.telemetry import metrics as m

    packed = first_runs["packed"]
    diffs = {side: max(abs(a[m.LOSS] - b[m.LOSS]) for a, b in zip(records[:steps], packed[:steps]))
             for side, records in first_runs.items() if side != "packed"}
    final = {side: {"loss": records[-1][m.LOSS], "eval_loss": records[-1].get(m.EVAL_LOSS)}
             for side, records in first_runs.items()}
    return {"compared_steps": min(steps, len(packed)), "loss_max_abs_diff": diffs, "final": final}


def report(payload: dict) -> list[str]:
    lines = []
    names = {0: "knowledge", 1: "cold start"}
    results, sides = payload["results"], list(payload["results"])
    for phase, name in names.items():
        parts = [f"{side} {results[side][phase]['tokens_per_s']:6.0f} tok/s "
                 f"({results[side][phase]['step_s_median'] * 1000:4.0f} ms/step)" for side in sides]
        ratios = "  ".join(f"{key} {value:.2f}x" for key, value in payload["ratios"][name].items())
        lines.append(f"{name:10s} " + "  ".join(parts) + f"  = {ratios}")
    weighted = payload["recipe_weighted"]
    lines.append("recipe-weighted: " + ", ".join(
        f"{side} {weighted[side]['tokens_per_s']:.0f} tok/s (SFT training {weighted[side]['train_s']:.0f} s)"
        for side in sides) + " = " + "  ".join(f"{key} {value:.2f}x"
                                               for key, value in payload["ratios"]["recipe_weighted"].items()))
    walls = payload["wall_s"]
    lines.append("wall of the shortened metis sft: " + ", ".join(
        f"{side} {statistics.median(walls[side]):.0f} s" for side in sides) + " (setup and tokenizing included)")
    agree = payload["loss_agreement"]
    lines.append(f"loss: max |side - packed| over the first {agree['compared_steps']} steps: " + ", ".join(
        f"{side} {diff:.1e}" for side, diff in agree["loss_max_abs_diff"].items()) + "; final loss " + ", ".join(
        f"{side} {final['loss']:.4f} (eval {final['eval_loss']:.4f})" for side, final in agree["final"].items()))
    target = payload["target"]
    verdict = "met" if payload["ratios"]["recipe_weighted"][target] >= TARGET_RATIO else "MISSED"
    lines.append(f"target {target} >= {TARGET_RATIO}x (recipe-weighted): {verdict}")
    return lines


@contextlib.contextmanager
def before_worktree(ref: str, tmp: Path):
    """A detached git worktree of `ref` under `tmp` for the 'before' side (None without a ref),
    removed afterwards."""
    if not ref:
        yield None
        return
    tree = tmp / "before-tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=REPO, check=True, capture_output=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="padded-then-packed pairs to run")
    parser.add_argument("--knowledge-epochs", type=float, default=1.0, help="of phase 0 (the recipe: 8)")
    parser.add_argument("--cold-start-epochs", type=float, default=0.1, help="of phase 1 (the recipe: 2)")
    parser.add_argument("--compare-steps", type=int, default=10, help="first steps whose losses are compared")
    parser.add_argument("--out", type=Path, default=RESULT_PATH, help="where the JSON result goes")
    parser.add_argument("--before-ref", default=BEFORE_REF,
                        help="git revision of the 'before' side ('' leaves it out: padded vs packed only)")
    args = parser.parse_args()

    sides = [*SIDES, "before"] if args.before_ref else list(SIDES)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="sft-throughput-") as tmp, before_worktree(args.before_ref, Path(tmp)) as tree:
        for round_index in range(args.rounds):
            for side in sides:
                runs[side].append(run_sft(side, Path(tmp), round_index, args, tree))
    results = {side: pooled(side_runs) for side, side_runs in runs.items()}
    full_steps = full_recipe_steps({p: f["steps"] for p, f in results["packed"].items()}, args)
    weighted = {side: recipe_weighted(figures, full_steps) for side, figures in results.items()}
    baselines = [side for side in ("before", "padded") if side in results]
    ratios = {name: {f"packed/{side}": results["packed"][p]["tokens_per_s"] / results[side][p]["tokens_per_s"]
                     for side in baselines}
              for p, name in ((0, "knowledge"), (1, "cold start"))}
    ratios["recipe_weighted"] = {f"packed/{side}": weighted["packed"]["tokens_per_s"] / weighted[side]["tokens_per_s"]
                                 for side in baselines}
    payload = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "results": results, "full_recipe_steps": full_steps, "recipe_weighted": weighted, "ratios": ratios,
               "wall_s": {side: [run["wall_s"] for run in side_runs] for side, side_runs in runs.items()},
               "loss_agreement": loss_agreement({side: side_runs[0]["records"] for side, side_runs in runs.items()},
                                                args.compare_steps),
               "target": f"packed/{baselines[0]}", "target_ratio": TARGET_RATIO}
    print("\n".join(report(payload)))
    print(json.dumps(payload))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
