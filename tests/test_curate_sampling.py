"""`metis curate`'s model-sampling filters on a random-weight tiny model built here: tool necessity
(sft) and the RL pass-rate filter. Random weights answer nothing correctly, so every question
"needs" its tool and every RL prompt is "too hard"; the tests check counts and written pass rates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_curate import direct_row, filter_entry, read_jsonl, tool_row, write_jsonl
from typer.testing import CliRunner

from metis_cli.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    torch.set_num_threads(1)
    return tiny_model_dir


def write_recipe(tmp_path: Path, model_dir: Path, data: Path, curate: dict) -> Path:
    recipe = {
        "run": {"name": "t", "output_dir": str(tmp_path / "run"), "threads": 1},
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "tools": {"enabled": ["calculator"]},
        "rollout": {"max_turns": 2, "max_new_tokens": 6, "max_total_tokens": 400, "batch_size": 16},
        "reward": {"checker": "numeric"},
        "curate": {"input": [{"path": str(data)}], **curate},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_curate(recipe: Path) -> dict:
    result = runner.invoke(app, ["curate", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_tool_necessity_samples_without_tools_and_writes_pass_rates(tmp_path, model_dir):
    rows = [tool_row("hard-1", "What is 123 * 45?", "123 * 45", "5535", "5535"),
            tool_row("hard-2", "What is 321 * 54?", "321 * 54", "17334", "17334"),
            direct_row("direct", "What is 3 + 5?", "8")]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    report = run_curate(write_recipe(tmp_path, model_dir, data, {"filters": {"necessity": {"k": 2}}}))

    necessity = filter_entry(report, "necessity")
    assert (necessity["in"], necessity["kept"], necessity["dropped"]) == (3, 3, 0)
    assert necessity["notes"] == {"no tool calls": 1}  # the direct answer is not sampled
    assert necessity["pass_rate_mean"] == 0.0
    out = tmp_path / "run" / "curated"
    assert read_jsonl(out / "pass_rates.jsonl") == [
        {"id": "hard-1", "subset": "default", "filter": "necessity", "pass_rate": 0.0, "kept": True},
        {"id": "hard-2", "subset": "default", "filter": "necessity", "pass_rate": 0.0, "kept": True},
    ]
    kept = read_jsonl(out / "curated.jsonl")
    assert kept[0]["curation"] == {"source": str(data), "pass_rates": {"necessity": 0.0},
                                   "filters": ["validity", "execution", "necessity", "dedup"]}


def test_rl_filter_drops_prompts_without_signal_and_writes_pass_rates(tmp_path, model_dir):
    prompts = [{"id": f"p{i}", "subset": "hard", "answer": str(i * 37),
                "messages": [{"role": "user", "content": f"What is {i} * 37?"}]} for i in range(3)]
    prompts.append({**prompts[0], "id": "p0-again"})
    prompts.append({"id": "no-gold", "messages": [{"role": "user", "content": "What is 1 + 1?"}]})
    data = write_jsonl(tmp_path / "rl.jsonl", prompts)
    curate = {"mode": "rl", "filters": {"rl_filter": {"k": 2, "model": str(model_dir)}}}
    report = run_curate(write_recipe(tmp_path, model_dir, data, curate))

    assert [entry["name"] for entry in report["filters"] if entry["ran"]] == ["validity", "dedup", "rl_filter"]
    assert filter_entry(report, "validity")["reasons"] == {"no gold answer": 1}
    assert filter_entry(report, "dedup")["reasons"] == {"duplicate prompt": 1}
    rl = filter_entry(report, "rl_filter")
    assert (rl["in"], rl["kept"], rl["dropped"]) == (3, 0, 3)
    assert rl["reasons"] == {"all rollouts wrong (too hard)": 3}
    out = tmp_path / "run" / "curated"
    rates = read_jsonl(out / "pass_rates.jsonl")
    assert [(r["id"], r["filter"], r["pass_rate"], r["kept"]) for r in rates] == [
        ("p0", "rl_filter", 0.0, False), ("p1", "rl_filter", 0.0, False), ("p2", "rl_filter", 0.0, False)]
    assert (out / "curated.jsonl").read_text() == ""
    assert report["kept"] == 0 and report["rows_read"] == 5
