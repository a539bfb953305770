"""Benchmark: the paper's effect on the embedded tiny recipe, HDPO vs its baselines.

Runs `recipes/tiny.yaml` end to end on this CPU: cold-start SFT once, then RL from the same SFT
model with each estimator (hdpo, grpo, coupled with a small and a large tool-call penalty), and
reports held-out greedy accuracy and tool-call ratio per subset before and after RL, the share
of groups with |Q| >= 2 over training (the implicit curriculum), and wall times.

The cold start's hard answers are imperfect (`data.synthetic.answer_noise: 0.3`), so at first
many groups of hard rollouts have fewer than two right answers and get no efficiency signal; as
RL's accuracy channel sharpens them the share of groups with |Q| >= 2 rises (the paper's
implicit curriculum). `hdpo-clean-start` runs HDPO from a cold start with exact answers
(answer_noise 0, its own SFT): nearly every group is right from the first step, so there is no
curriculum to see. `coupled-1.0-clean-start` shows the coupled penalty's failure from that cold
start; `coupled-1.0-100-steps` that it does not occur from the imperfect one within 100 steps.

Run:   .venv/bin/python benchmarks/tiny_effect.py [--out DIR] [--only hdpo grpo ...] [--set run.threads=1]
Output: <out>/results.json and <out>/results.md (the README table comes from here).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from metis_cli.telemetry import metrics as m

REPO = Path(__file__).resolve().parents[1]
EXACT_ANSWERS = ["data.synthetic.answer_noise=0.0"]
COUPLED_LARGE = ["hdpo.estimator=coupled", "hdpo.coupled.mode=penalty", "hdpo.coupled.coef=1.0"]
VARIANTS = {  # name: (sft overrides, hdpo overrides); variants with the same sft overrides share one SFT
    "hdpo": ([], ["hdpo.estimator=hdpo"]),
    "hdpo-clean-start": (EXACT_ANSWERS, ["hdpo.estimator=hdpo"]),
    "grpo": ([], ["hdpo.estimator=grpo"]),
    "coupled-0.1": ([], ["hdpo.estimator=coupled", "hdpo.coupled.mode=penalty", "hdpo.coupled.coef=0.1"]),
    "coupled-1.0": ([], COUPLED_LARGE),
    "coupled-1.0-100-steps": ([], [*COUPLED_LARGE, "hdpo.steps=100"]),
    "coupled-1.0-clean-start": (EXACT_ANSWERS, COUPLED_LARGE),
}


def metis(args: list[str]) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-m", "metis_cli", *args], cwd=REPO, check=True)
    return time.time() - start


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def curriculum(records: list[dict]) -> list[float]:
    return [r[m.EFFICIENCY_GROUP_SHARE] for r in records if m.EFFICIENCY_GROUP_SHARE in r]


def third_means(values: list[float]) -> tuple[float | None, float | None]:
    """Means of the first and the last third of `values` (None when there are none)."""
    if not values:
        return None, None
    third = max(1, len(values) // 3)
    return sum(values[:third]) / third, sum(values[-third:]) / third


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tiny_effect")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra recipe override for every stage, e.g. --set run.threads=1")
    args = parser.parse_args()
    out = args.out.resolve()
    run_dir = out / "run"
    base = [f"run.output_dir={run_dir}", *args.overrides]
    results: dict = {"variants": {}}
    for name in args.only:
        sft_overrides, hdpo_overrides = VARIANTS[name]
        sft_dir = run_dir / ("sft" if not sft_overrides else "sft-" + re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(sft_overrides)))
        if not (sft_dir / "DONE.json").exists():
            seconds = metis(["sft", "recipes/tiny.yaml", "--overwrite", "--quiet",
                             *sets(base + sft_overrides + [f"sft.output={sft_dir}"])])
            results.setdefault("sft_s", {})[sft_dir.name] = round(seconds, 1)
        stage_dir = run_dir / f"hdpo-{name}"
        seconds = metis(["hdpo", "recipes/tiny.yaml", "--overwrite", "--quiet",
                         *sets(base + sft_overrides + hdpo_overrides
                               + [f"hdpo.init_from={sft_dir}/final", f"hdpo.output={stage_dir}"])])
        done = json.loads((stage_dir / "DONE.json").read_text())
        records = m.read_metrics(stage_dir / "metrics.jsonl")
        share_first, share_last = third_means(curriculum(records))
        # accuracy is null at a step where nothing was scored
        accuracy_first, accuracy_last = third_means(
            [r[m.ACCURACY] for r in records if m.EFFICIENCY_GROUP_SHARE in r and r.get(m.ACCURACY) is not None])
        results["variants"][name] = {
            "hdpo_s": round(seconds, 1), "before": done["eval_first"], "after": done["eval_last"],
            "efficiency_group_share_first_third": share_first, "efficiency_group_share_last_third": share_last,
            "train_accuracy_first_third": accuracy_first, "train_accuracy_last_third": accuracy_last,
        }
        print(json.dumps({name: results["variants"][name]}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "results.json"
    if previous.exists() and set(args.only) != set(VARIANTS):  # a partial rerun keeps the others
        old = json.loads(previous.read_text())
        results = {**old, **{k: v for k, v in results.items() if k != "variants"},
                   "variants": {**old.get("variants", {}), **results["variants"]}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| estimator | easy acc | easy tool ratio | hard acc | hard tool ratio | share of groups with \\|Q\\|>=2 (first -> last third) | sampled accuracy in training (first -> last third) | RL wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        b, a = v["before"], v["after"]

        def pair(subset: str, key: str) -> str:
            return f"{_percent(b[subset].get(key))} -> {_percent(a[subset].get(key))}"

        def trend(key: str) -> str:
            first, last = v[f"{key}_first_third"], v[f"{key}_last_third"]
            return "–" if first is None else f"{first:.2f} -> {last:.2f}"

        lines.append(f"| {name} | {pair('easy', m.ACCURACY)} | {pair('easy', m.TOOL_CALL_RATIO)} | "
                     f"{pair('hard', m.ACCURACY)} | {pair('hard', m.TOOL_CALL_RATIO)} | "
                     f"{trend('efficiency_group_share')} | {trend('train_accuracy')} | {v['hdpo_s']} |")
    for sft_name, seconds in results.get("sft_s", {}).items():
        lines.append(f"\nSFT ({sft_name}) wall time: {seconds:.0f} s")
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    main()
