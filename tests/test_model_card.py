"""The model card in every final folder, and `metis push` (which needs the Hub: here, its failures)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from metis_cli import __version__
from metis_cli.cli.main import app
from metis_cli.model.card import CARD_MARKER, write_card
from metis_cli.recipe import recipe_to_yaml, validate_data
from metis_cli.telemetry.run import stage_inputs

EVAL_RECORDS = [
    {"stage": "hdpo", "step": 0, "eval/easy/accuracy": 1.0, "eval/easy/tool_call_ratio": 0.75,
     "eval/easy/tool_calls_mean": 0.75, "eval/hard/accuracy": 0.25, "eval/hard/tool_call_ratio": 1.0,
     "eval/hard/tool_calls_mean": 1.5},
    {"stage": "hdpo", "step": 1, "loss": 0.1},
    {"stage": "hdpo", "step": 2, "eval/easy/accuracy": 1.0, "eval/easy/tool_call_ratio": 0.0,
     "eval/easy/tool_calls_mean": 0.0, "eval/hard/accuracy": 0.5, "eval/hard/tool_call_ratio": 1.0,
     "eval/hard/tool_calls_mean": 1.0},
]


def hdpo_run(tmp_path: Path) -> Path:
    """A run folder as hdpo leaves it before saving final/: recipe.yaml, inputs.json, metrics.jsonl."""
    run_dir = tmp_path / "run"
    recipe = validate_data({
        "run": {"name": "card-test", "output_dir": str(run_dir)}, "model": {"name_or_path": "Qwen/Qwen3-0.6B"},
        "data": {"rl": [{"path": "hf:org/rl-prompts", "split": "train"}], "eval": [{"path": "synthetic:eval"}]},
    }, source="test")
    stage_dir = run_dir / "hdpo"
    stage_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    (stage_dir / "inputs.json").write_text(json.dumps(stage_inputs(recipe, "hdpo")))
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL_RECORDS))
    return stage_dir


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def save_final(stage_dir: Path, tiny_model_dir: Path, *, lora: bool = False) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metis_cli.train.checkpoint import save_model_folder

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    return save_model_folder(model, AutoTokenizer.from_pretrained(tiny_model_dir), stage_dir / "final")


def test_final_folder_gets_a_hub_model_card(tmp_path, tiny_model_dir):
    final = save_final(hdpo_run(tmp_path), tiny_model_dir)
    card = (final / "README.md").read_text()
    front = front_matter(card)
    assert front["library_name"] == "transformers" and front["base_model"] == "Qwen/Qwen3-0.6B"
    assert {"metis", "hdpo", "tool:calculator"} <= set(front["tags"]) and front["datasets"] == ["org/rl-prompts"]
    assert "# card-test (hdpo)" in card and f"metis {__version__}" in card
    assert "| `hdpo.estimator` | `hdpo` |" in card and "| `tools.enabled` | calculator |" in card
    assert "step 0 (before) -> step 2 (after)" in card
    assert "| easy | 1 -> 1 | 0.75 -> 0 | 0.75 -> 0 |" in card and "| hard | 0.25 -> 0.5 | 1 -> 1 | 1.5 -> 1 |" in card
    assert "Tool economy" not in card  # metis eval has not run


def test_an_adapter_card_replaces_peft_s_and_says_peft(tmp_path, tiny_model_dir):
    final = save_final(hdpo_run(tmp_path), tiny_model_dir, lora=True)
    card = (final / "README.md").read_text()
    assert CARD_MARKER in card and front_matter(card)["library_name"] == "peft"


def test_folders_outside_a_stage_folder_get_no_card(tmp_path, tiny_model_dir):
    assert not (save_final(tmp_path / "elsewhere", tiny_model_dir) / "README.md").exists()


def test_a_readme_metis_did_not_write_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("# my own card\n")
    assert write_card(tmp_path) is None and (tmp_path / "README.md").read_text() == "# my own card\n"


def test_push_refreshes_the_card_with_the_eval_report_then_fails_clearly_without_the_hub(tmp_path, tiny_model_dir):
    stage_dir = hdpo_run(tmp_path)
    final = save_final(stage_dir, tiny_model_dir)
    report = {"decoding": "greedy", "models": [{"name": "hdpo", "path": str(final), "subsets": {
        "hard": {"accuracy": 0.5, "tool_call_ratio": 1.0, "tool_calls_mean": 1.0, "tool_errors": 0,
                 "cost_usd_per_1k_answers": 2.0, "tool_latency_s_per_answer": 0.1}}}]}
    (stage_dir.parent / "eval").mkdir()
    (stage_dir.parent / "eval" / "report.json").write_text(json.dumps(report))
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_not_a_real_token", "METIS_DEBUG": ""}
    result = subprocess.run([sys.executable, "-m", "metis_cli", "push", str(final), "--repo-id", "org/card-test"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "cannot be reached" in result.stderr and "127.0.0.1:9" in result.stderr and "Traceback" not in result.stderr
    card = (final / "README.md").read_text()
    assert "## Tool economy (`metis eval`)" in card and "| hard | 0.5 | 1 | 1 | 0 | 2 | 0.1 |" in card


def test_push_offline_mode_is_a_clear_error(tmp_path, tiny_model_dir):
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))  # push writes its card
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token"}
    result = subprocess.run([sys.executable, "-m", "metis_cli", "push", str(folder), "--repo-id", "org/x"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "HF_HUB_OFFLINE" in result.stderr
    assert CARD_MARKER in (folder / "README.md").read_text()  # a folder from no run gets the bare card


@pytest.mark.parametrize("args, message", [
    (["--repo-id", "not a repo"], "ORG/NAME"),
    (["--repo-id", "org/name"], "not a model folder"),
])
def test_push_refuses_bad_arguments(tmp_path, tiny_model_dir, args, message):
    folder = tiny_model_dir if message == "ORG/NAME" else tmp_path
    result = CliRunner().invoke(app, ["push", str(folder), *args])
    assert result.exit_code == 2 and message in result.output
