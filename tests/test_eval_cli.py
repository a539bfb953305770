"""`metis eval` end to end on tiny random-weight models, and its user errors (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from metis_cli.cli.main import app
from metis_cli.data import synthetic
from metis_cli.model.tiny import build_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("models")
    return build_tiny_model(folder / "sft" / "final", seed=0, **TINY), build_tiny_model(folder / "hdpo" / "final", seed=1, **TINY)


def eval_row(index: int, subset: str, expression: str, answer: str) -> dict:
    return {"id": f"{subset}-{index}", "subset": subset, "answer": answer,
            "messages": [{"role": "system", "content": synthetic.SYSTEM_PROMPT},
                         {"role": "user", "content": f"What is {expression}?"}]}


def write_eval_set(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def two_subsets() -> list[dict]:
    return [eval_row(0, "easy", "3 + 4", "7"), eval_row(1, "easy", "2 + 2", "4"),
            eval_row(2, "hard", "123 * 45", "5535"), eval_row(3, "hard", "456 * 12", "5472")]


def write_recipe(tmp_path, eval_path: str, **sections) -> str:
    recipe = {
        "run": {"name": "evaltest", "output_dir": str(tmp_path / "run"), "threads": 1},
        "model": {"name_or_path": str(tmp_path / "base")},
        "data": {"eval": [{"path": eval_path}]},
        "tools": {"enabled": ["calculator"], "costs": {"calculator": {"usd_per_call": 0.01, "latency_s": 0.3}}},
        "rollout": {"max_turns": 2, "max_new_tokens": 6, "max_total_tokens": 256, "batch_size": 8},
        "reward": {"checker": "numeric"},
    }
    recipe.update(sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def invoke(*argv: str):
    return CliRunner().invoke(app, list(argv))


def test_eval_compares_two_models_on_two_subsets(tmp_path, models):
    sft, hdpo = models
    recipe = write_recipe(tmp_path, write_eval_set(tmp_path / "eval.jsonl", two_subsets()))
    metrics = tmp_path / "run" / "hdpo" / "metrics.jsonl"  # the recipe's hdpo run: its curves go into the plot
    metrics.parent.mkdir(parents=True)
    metrics.write_text("".join(json.dumps({"stage": "hdpo", "step": s, "accuracy": s / 10, "tool_call_ratio": 1 - s / 10,
                                           "eval/easy/accuracy": 0.5}) + "\n" for s in range(5)))

    result = invoke("eval", recipe, "--model", str(sft), "--model", f"coupled={hdpo}", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [m["name"] for m in report["models"]] == ["sft/final", "coupled"]
    out = tmp_path / "run" / "eval"
    on_disk = json.loads((out / "report.json").read_text())
    assert len(on_disk["models"]) == 2 and on_disk["subsets"] == ["easy", "hard"]
    for model in on_disk["models"]:
        assert set(model["subsets"]) == {"easy", "hard", "all"}
        easy = model["subsets"]["easy"]
        assert easy["questions"] == 2 and easy["answers"] == 2
        assert 0.0 <= easy["accuracy"] <= 1.0 and 0.0 <= easy["tool_call_ratio"] <= 1.0
        assert easy["generated_tokens_mean"] > 0 and easy["wall_s_per_question"] > 0
    assert on_disk["training_run"] == str(metrics)
    assert (out / "plot.png").read_bytes()[:8] == PNG_MAGIC
    markdown = (out / "report.md").read_text()
    assert "coupled" in markdown and "| easy |" in markdown and "| hard |" in markdown
    answers = [json.loads(line) for line in (out / "answers" / "coupled.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and {a["subset"] for a in answers} == {"easy", "hard"}
    assert all(a["messages"][0]["role"] == "assistant" for a in answers)  # generated turns only


def test_eval_sampling_redundancy_and_subset_filter(tmp_path, models):
    sft, _ = models
    recipe = write_recipe(tmp_path, write_eval_set(tmp_path / "eval.jsonl", two_subsets()))

    result = invoke("eval", recipe, "--model", str(sft), "--samples", "2", "--redundancy", "--subset", "hard", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["subsets"] == ["hard"] and report["samples"] == 2 and report["redundancy"]
    hard = report["models"][0]["subsets"]["hard"]
    assert hard["questions"] == 2 and hard["answers"] == 4
    assert "pass@2" in hard
    for key in ("no_tool_accuracy", "solved_alone_share", "redundant_tool_share", "needed_tool_share"):
        assert key in hard
    assert report["training_run"] is None


def test_eval_prints_tables_without_json(tmp_path, models):
    sft, _ = models
    recipe = write_recipe(tmp_path, write_eval_set(tmp_path / "eval.jsonl", two_subsets()))
    result = invoke("eval", recipe, "--model", str(sft), "--subset", "easy")
    assert result.exit_code == 0, result.output
    assert "answers" in result.stdout and "tool economy" in result.stdout and "report.md" in result.stdout


def test_eval_a_lora_adapter(tmp_path, models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models[0])
    adapter = tmp_path / "lora" / "final"
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    assert not (adapter / "config.json").exists()  # only the adapter: the base comes from adapter_config.json
    recipe = write_recipe(tmp_path, write_eval_set(tmp_path / "eval.jsonl", two_subsets()))

    result = invoke("eval", recipe, "--model", str(adapter), "--subset", "easy", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["models"][0]["name"] == "lora/final"
    assert report["models"][0]["subsets"]["easy"]["answers"] == 2


def test_missing_model_folder_is_exit_2(tmp_path, models):
    recipe = write_recipe(tmp_path, write_eval_set(tmp_path / "eval.jsonl", two_subsets()))
    result = invoke("eval", recipe, "--model", str(models[0]), "--model", str(tmp_path / "nope" / "final"))
    assert result.exit_code == 2
    assert "model folder not found" in result.stderr and "nope" in result.stderr


def test_default_models_are_the_recipes_stage_folders(tmp_path):
    recipe = write_recipe(tmp_path, write_eval_set(tmp_path / "eval.jsonl", two_subsets()))
    result = invoke("eval", recipe)
    assert result.exit_code == 2
    assert "eval.models[0]" in result.stderr and "sft/final" in result.stderr


def test_malformed_eval_row_names_file_and_line(tmp_path, models):
    path = tmp_path / "broken.jsonl"
    rows = [json.dumps(r) for r in two_subsets()]
    rows[2] = '{"id": "x", "messages": [{"role": "user", "content": "What is 1 + 1?"}]'  # cut off
    path.write_text("\n".join(rows) + "\n")
    result = invoke("eval", write_recipe(tmp_path, str(path)), "--model", str(models[0]))
    assert result.exit_code == 2
    assert "broken.jsonl line 3" in result.stderr


def test_eval_row_without_answer_is_exit_2(tmp_path, models):
    rows = two_subsets()
    del rows[1]["answer"]
    path = write_eval_set(tmp_path / "noanswer.jsonl", rows)
    result = invoke("eval", write_recipe(tmp_path, path), "--model", str(models[0]))
    assert result.exit_code == 2
    assert "noanswer.jsonl line 2" in result.stderr


def test_unknown_subset_is_exit_2(tmp_path, models):
    recipe = write_recipe(tmp_path, write_eval_set(tmp_path / "eval.jsonl", two_subsets()))
    result = invoke("eval", recipe, "--model", str(models[0]), "--subset", "medium")
    assert result.exit_code == 2
    assert "'medium'" in result.stderr and "easy, hard" in result.stderr


def test_run_folder_without_metrics_is_exit_2(tmp_path, models):
    recipe = write_recipe(tmp_path, write_eval_set(tmp_path / "eval.jsonl", two_subsets()))
    result = invoke("eval", recipe, "--model", str(models[0]), "--run", str(tmp_path))
    assert result.exit_code == 2
    assert "no metrics.jsonl" in result.stderr
