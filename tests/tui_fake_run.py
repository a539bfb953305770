"""A fake HDPO / SFT run folder for the dashboard tests: metrics lines shaped like a real run.

The curves follow what HDPO should show: the tool-call ratio starts near 1 and falls, accuracy
rises, and the efficiency channel (share of groups with |Q| >= 2) switches on as accuracy rises.
Deterministic, so snapshots are stable. `python tests/tui_fake_run.py RUN_DIR` appends one step
every half second, for looking at the dashboard by hand.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

START_TIME = 1_760_000_000.0
STEP_S = 2.1


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hdpo_record(step: int, total_steps: int, *, eval_every: int = 20, checkpoint_every: int = 50) -> dict:
    progress = step / total_steps
    wiggle = 0.03 * math.sin(step * 1.7)
    accuracy = 0.35 + 0.5 * _sigmoid((progress - 0.3) * 10) + wiggle
    tool_call_ratio = 0.95 - 0.87 * _sigmoid((progress - 0.45) * 9) + wiggle / 2
    tool_calls_mean = 2.6 * tool_call_ratio + 0.1
    efficiency_share = 0.02 + 0.8 * _sigmoid((progress - 0.4) * 12)
    record = {
        "stage": "hdpo",
        "step": step,
        "total_steps": total_steps,
        "time": START_TIME + step * STEP_S,
        "elapsed_s": step * STEP_S,
        "accuracy": round(accuracy, 4),
        "r_acc_mean": round(0.9 * accuracy + 0.1 * min(1.0, 0.7 + progress), 4),
        "r_tool_mean": round(accuracy / (tool_calls_mean + 1), 4),
        "tool_call_ratio": round(tool_call_ratio, 4),
        "tool_calls_mean": round(tool_calls_mean, 4),
        "efficiency_group_share": round(efficiency_share, 4),
        "adv_acc_mean": 0.0,
        "adv_acc_std": 0.97,
        "adv_acc_nonzero": round(0.55 - 0.2 * progress, 4),
        "adv_tool_nonzero": round(0.9 * efficiency_share, 4),
        "loss": round(0.05 - 0.03 * progress, 5),
        "kl": 0.0,
        "entropy": round(0.9 - 0.3 * progress, 4),
        "tokens_per_s": 1500.0 + 10 * step,
        "response_tokens_mean": 60.0,
        "rollout_s": 1.5,
        "update_s": 0.6,
        "step_s": STEP_S,
        "tool_errors": 0,
        "tool_timeouts": 1 if step % 37 == 0 else 0,
        "malformed_tool_calls": 0,
        "unscored": 0,
        "lr": 1e-6,
    }
    if step % checkpoint_every == 0:
        record["checkpoint"] = f"checkpoints/step_{step:06d}"
    if step % eval_every == 0:
        for subset, shift in (("easy", 0.1), ("hard", -0.15)):
            record[f"eval/{subset}/accuracy"] = round(min(1.0, accuracy + shift), 4)
            record[f"eval/{subset}/tool_call_ratio"] = round(min(1.0, max(0.0, tool_call_ratio - shift)), 4)
            record[f"eval/{subset}/tool_calls_mean"] = round(max(0.0, tool_calls_mean - shift), 4)
    return record


def sft_record(step: int, total_steps: int, *, eval_every: int = 25) -> dict:
    record = {
        "stage": "sft",
        "step": step,
        "total_steps": total_steps,
        "epoch": round(step / 50, 3),
        "loss": round(2.5 * math.exp(-step / 40) + 0.3, 4),
        "lr": 2e-5 * min(1.0, step / 10),
        "tokens_per_s": 4200.0,
        "step_s": 0.8,
    }
    if step % eval_every == 0:
        record["eval_loss"] = round(2.5 * math.exp(-step / 40) + 0.4, 4)
    return record


def rollout_records(step: int) -> list[dict]:
    question = "What is 123 * 45?"
    system = {"role": "system", "content": "You can call the calculator tool."}
    user = {"role": "user", "content": question}
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 45"}}</tool_call>'
    common = {"step": step, "prompt_id": 7, "subset": "easy", "question": question, "gold": "5535"}
    return [
        {
            **common, "sample": 0, "correct": True, "tool_calls": 1, "tool_errors": 0,
            "r_acc": 1.0, "r_tool": 0.5, "adv_acc": 0.41, "adv_tool": -0.71, "final_answer": "5535",
            "messages": [
                system, user,
                {"role": "assistant", "content": f"Multiplying three digits by two is error-prone. {call}"},
                {"role": "tool", "content": "5535"},
                {"role": "assistant", "content": "<answer>5535</answer>"},
            ],
        },
        {
            **common, "sample": 1, "correct": True, "tool_calls": 0, "tool_errors": 0,
            "r_acc": 1.0, "r_tool": 1.0, "adv_acc": 0.41, "adv_tool": 0.71, "final_answer": "5535",
            "messages": [
                system, user,
                {"role": "assistant", "content": "123 * 45 = 123 * 40 + 123 * 5 = 4920 + 615. <answer>5535</answer>"},
            ],
        },
        {
            **common, "sample": 2, "correct": False, "tool_calls": 0, "tool_errors": 0,
            "r_acc": 0.1, "r_tool": 0.0, "adv_acc": -1.22, "adv_tool": 0.0, "final_answer": "5435",
            "messages": [system, user, {"role": "assistant", "content": "<answer>5435</answer>"}],
        },
    ]


def append_line(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)


def write_hdpo_run(run_dir: Path, steps: int, total_steps: int, *, rollouts: bool = True) -> Path:
    """A run folder with `steps` HDPO steps logged; returns the stage folder."""
    stage_dir = run_dir / "hdpo"
    for step in range(1, steps + 1):
        append_line(stage_dir / "metrics.jsonl", json.dumps(hdpo_record(step, total_steps)) + "\n")
    if rollouts:
        lines = "".join(json.dumps(r) + "\n" for r in rollout_records(steps))
        append_line(stage_dir / "rollouts" / f"step_{steps:06d}.jsonl", lines)
    return stage_dir


def write_sft_run(run_dir: Path, steps: int, total_steps: int) -> Path:
    stage_dir = run_dir / "sft"
    for step in range(1, steps + 1):
        append_line(stage_dir / "metrics.jsonl", json.dumps(sft_record(step, total_steps)) + "\n")
    return stage_dir


if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    total = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    delay_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    for live_step in range(1, total + 1):
        append_line(run_dir / "hdpo" / "metrics.jsonl", json.dumps(hdpo_record(live_step, total)) + "\n")
        if live_step % 5 == 0:
            lines = "".join(json.dumps(r) + "\n" for r in rollout_records(live_step))
            append_line(run_dir / "hdpo" / "rollouts" / f"step_{live_step:06d}.jsonl", lines)
        time.sleep(delay_s)
