"""The eval report's maths, tables and plot, on hand-made answers (no model, no torch)."""

from __future__ import annotations

import json

import pytest

from metis_cli.evaluation.plot import write_plot
from metis_cli.evaluation.report import (
    Answer,
    ModelAnswers,
    build_report,
    calls_by_tool,
    figures,
    pass_at_k,
    solved_alone,
    tool_prices,
)
from metis_cli.evaluation.tables import markdown
from metis_cli.stages.eval import model_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRICES = tool_prices({"calculator": {"usd_per_call": 0.002, "latency_s": 0.5}})


def calc(calls: int) -> dict[str, int]:
    return {"calculator": calls} if calls else {}


def easy_answers() -> list[Answer]:
    """q1 right without tools, q2 right with one call, q3 wrong after two calls (one failed), q4 unscored."""
    return [
        Answer("q1", "easy", True, 0, generated_tokens=10),
        Answer("q2", "easy", True, 1, calls_by_tool=calc(1), generated_tokens=20, tool_s=0.1),
        Answer("q3", "easy", False, 2, tool_errors={"tool_error": 1}, calls_by_tool=calc(2), generated_tokens=30),
        Answer("q4", "easy", None, 1, calls_by_tool=calc(1), generated_tokens=40, tool_s=0.3),
    ]


def tools_off_answers() -> list[Answer]:
    """Alone, the model solves q1 and q2 and fails q3 and q4."""
    return [Answer("q1", "easy", True), Answer("q2", "easy", True), Answer("q3", "easy", False),
            Answer("q4", "easy", False)]


def test_figures_from_known_answers():
    result = figures(easy_answers(), PRICES, wall_s=2.0)
    assert result["questions"] == 4 and result["answers"] == 4
    assert result["unscored"] == 1
    assert result["accuracy"] == pytest.approx(2 / 3)  # unscored q4 is not counted as wrong
    assert result["tool_call_ratio"] == pytest.approx(0.75)
    assert result["tool_calls_mean"] == pytest.approx(1.0)
    assert result["tool_errors"] == 1 and result["tool_error_kinds"] == {"tool_error": 1}
    assert result["generated_tokens_mean"] == pytest.approx(25.0)
    assert result["wall_s_per_question"] == pytest.approx(0.5)
    assert result["tool_s_mean"] == pytest.approx(0.1)
    # 4 calls x $0.002 over 4 answers = $0.002 per answer = $2 per 1000 answers.
    assert result["cost_usd_per_1k_answers"] == pytest.approx(2.0)
    assert result["tool_latency_s_per_answer"] == pytest.approx(0.5)
    assert "redundant_tool_share" not in result and "pass@1" not in result


def test_redundancy_against_tools_off_answers():
    result = figures(easy_answers(), PRICES, no_tool_answers=tools_off_answers())
    assert result["no_tool_accuracy"] == pytest.approx(0.5)
    assert result["solved_alone_share"] == pytest.approx(0.5)
    # Tool-using answers: q2 (solvable alone: redundant), q3 and q4 (needed the tool).
    assert result["redundant_tool_share"] == pytest.approx(1 / 3)
    assert result["needed_tool_share"] == pytest.approx(1.0)
    # The redundant call: one $0.002 call over 4 answers.
    assert result["redundant_cost_usd_per_1k_answers"] == pytest.approx(0.5)


def test_redundancy_without_tool_use_is_undefined_not_zero():
    answers = [Answer("q1", "easy", True), Answer("q2", "easy", False)]
    result = figures(answers, PRICES, no_tool_answers=[Answer("q1", "easy", True), Answer("q2", "easy", False)])
    assert result["redundant_tool_share"] is None
    assert result["needed_tool_share"] == 0.0  # q2 needed the tool and did not call it


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(3, 2, 2) == 1.0  # only one wrong sample: any 2 include a right one
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_sampled_answers_report_pass_at_k():
    answers = [Answer("q1", "hard", True, sample=0), Answer("q1", "hard", False, sample=1),
               Answer("q2", "hard", False, sample=0), Answer("q2", "hard", False, sample=1)]
    result = figures(answers, PRICES, samples=2)
    assert result["accuracy"] == pytest.approx(0.25)
    assert result["pass@2"] == pytest.approx(0.5)


def test_solved_alone_needs_half_of_the_samples():
    answers = [Answer("a", "s", True), Answer("a", "s", False),
               Answer("b", "s", True), Answer("b", "s", False), Answer("b", "s", False),
               Answer("c", "s", None)]
    assert solved_alone(answers) == {"a": True, "b": False}


def test_calls_by_tool_counts_named_tool_turns_only():
    messages = [
        {"role": "assistant", "content": "<tool_call>...</tool_call>"},
        {"role": "tool", "name": "calculator", "content": "5"},
        {"role": "tool", "name": "search", "content": "doc"},
        {"role": "tool", "content": "Error: invalid JSON"},  # a malformed call named no tool
        {"role": "tool", "name": "calculator", "content": "7"},
    ]
    assert calls_by_tool(messages) == {"calculator": 2, "search": 1}


def two_model_report(redundancy: bool = True) -> dict:
    hard = [Answer("h1", "hard", True, 1, calls_by_tool=calc(1)), Answer("h2", "hard", False, 1,
                                                                          calls_by_tool={"search": 1})]
    sft = ModelAnswers("sft/final", "runs/x/sft/final", easy_answers() + hard,
                       tools_off_answers() + [Answer("h1", "hard", False), Answer("h2", "hard", False)] if redundancy else None,
                       {"easy": 2.0, "hard": 1.0})
    hdpo_answers = [Answer(a.question_id, a.subset, a.correct) for a in sft.answers]
    hdpo = ModelAnswers("hdpo/final", "runs/x/hdpo/final", hdpo_answers,
                        tools_off_answers() if redundancy else None, {"easy": 1.0, "hard": 1.0})
    return build_report([sft, hdpo], {"calculator": {"usd_per_call": 0.002, "latency_s": 0.5}}, recipe_name="x")


def test_report_has_every_model_subset_and_all():
    report = two_model_report()
    json.dumps(report, allow_nan=False)  # no NaN ever reaches report.json
    assert [m["name"] for m in report["models"]] == ["sft/final", "hdpo/final"]
    assert report["subsets"] == ["easy", "hard"]
    sft = report["models"][0]
    assert set(sft["subsets"]) == {"easy", "hard", "all"}
    assert sft["subsets"]["all"]["answers"] == 6
    assert sft["subsets"]["all"]["wall_s_per_question"] == pytest.approx(3.0 / 6)
    assert sft["subsets"]["hard"]["tool_call_ratio"] == 1.0
    assert sft["unpriced_tools"] == ["search"]  # its cost is understated, and the report says so
    assert report["models"][1]["subsets"]["all"]["tool_call_ratio"] == 0.0


def test_markdown_table_rows_and_prices():
    text = markdown(two_model_report())
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 * (1 + 2 * 3)  # answers and economy tables: header + (easy, hard, all) per model
    answers, economy = rows[:7], rows[7:]
    sft_easy = next(r for r in answers if r.startswith("| sft/final | easy |"))
    assert "66.7%" in sft_easy and "75.0%" in sft_easy
    sft_easy_cost = next(r for r in economy if r.startswith("| sft/final | easy |"))
    assert "$2.00" in sft_easy_cost and "33.3%" in sft_easy_cost  # cost per 1k answers, redundant calls
    assert "redundant" in economy[0]
    assert "calculator $0.002/call" in text
    assert "sft/final called tools without a price: search" in text


def test_plot_is_a_png(tmp_path):
    path = write_plot(two_model_report(), tmp_path / "plot.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_with_training_curves(tmp_path):
    metrics = tmp_path / "hdpo" / "metrics.jsonl"
    metrics.parent.mkdir()
    lines = []
    for step in range(0, 21):
        record = {"stage": "hdpo", "step": step, "accuracy": 0.3 + step / 50, "tool_call_ratio": 1 - step / 25,
                  "r_acc_mean": 0.4 + step / 60, "r_tool_mean": step / 80, "efficiency_group_share": step / 20}
        if step % 5 == 0:
            record.update({"eval/easy/accuracy": 0.9, "eval/easy/tool_call_ratio": 1 - step / 20,
                           "eval/hard/accuracy": 0.2 + step / 40, "eval/hard/tool_call_ratio": 1.0})
        lines.append(json.dumps(record))
    metrics.write_text("\n".join(lines) + "\n{not json\n")
    plain = write_plot(two_model_report(), tmp_path / "plain.png")
    curves = write_plot(two_model_report(), tmp_path / "curves.png", metrics)
    assert curves.read_bytes()[:8] == PNG_MAGIC
    assert curves.stat().st_size > plain.stat().st_size  # four panels, not one


def test_model_labels_are_short_and_unique():
    assert model_labels(["runs/a/sft/final", "runs/a/hdpo/final"]) == ["sft/final", "hdpo/final"]
    assert model_labels(["runs/a/hdpo/final", "runs/b/hdpo/final"]) == ["a/hdpo/final", "b/hdpo/final"]
    assert model_labels(["runs/a/hdpo/checkpoints/step_000010"]) == ["hdpo/step_000010"]
    assert model_labels(["/models/base"]) == ["base"]
