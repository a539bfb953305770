"""The synthetic arithmetic task: exact answers, exact shares, seeds, and a clean eval split."""

from __future__ import annotations

import json
import re

import pytest

from metis_cli.data import synthetic

QUESTION = re.compile(r"What is (\d+) ([+*]) (\d+)\?")


def _operands(row: dict) -> tuple[int, str, int]:
    left, operator, right = QUESTION.fullmatch(row["messages"][1]["content"]).groups()
    return int(left), operator, int(right)


def _hard_pairs(rows: list[dict]) -> set[tuple[int, int]]:
    return {(left, right) for left, op, right in map(_operands, rows) if op == "*"}


def _all_rows(seed: int) -> list[dict]:
    return (synthetic.knowledge_examples(50, seed) + synthetic.cold_start_trajectories(50, seed)
            + synthetic.rl_prompts(50, seed) + synthetic.eval_prompts(25, seed))


def test_same_seed_same_rows_other_seed_other_questions():
    assert _all_rows(3) == _all_rows(3)
    questions = [[row["messages"][1]["content"] for row in _all_rows(seed)] for seed in (3, 4)]
    assert questions[0] != questions[1]


def test_answers_are_exact_and_subsets_match_the_question_kind():
    for row in _all_rows(0):
        left, operator, right = _operands(row)
        if row["subset"] == "easy":
            assert operator == "+" and 0 <= left <= 9 and 0 <= right <= 9
            assert row["answer"] == str(left + right)
        else:
            assert operator == "*" and 100 <= left <= 999 and 10 <= right <= 99
            assert row["answer"] == str(left * right)


def test_rows_have_the_messages_layout_and_unique_ids():
    rows = _all_rows(0)
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"id", "messages", "answer", "subset"}
        assert [m["role"] for m in row["messages"][:2]] == ["system", "user"]
        assert row["messages"][0]["content"] == synthetic.SYSTEM_PROMPT


def test_prompts_end_at_the_question():
    for row in synthetic.rl_prompts(20, 0) + synthetic.eval_prompts(5, 0):
        assert len(row["messages"]) == 2


def test_knowledge_examples_answer_directly_and_cover_every_sum():
    rows = synthetic.knowledge_examples(100, seed=0)
    assert {(left, right) for left, _, right in map(_operands, rows)} == {
        (a, b) for a in range(10) for b in range(10)}
    for row in rows:
        assert row["subset"] == "easy"
        assert row["messages"][2:] == [
            {"role": "assistant", "content": f"<answer>{row['answer']}</answer>"}]


def test_cold_start_shares_are_exact_and_hard_questions_always_call_the_tool():
    rows = synthetic.cold_start_trajectories(400, seed=1, direct_answer_share=0.1, hard_share=0.25)
    hard = [row for row in rows if row["subset"] == "hard"]
    easy_direct = [row for row in rows if row["subset"] == "easy" and len(row["messages"]) == 3]
    assert len(hard) == 100
    assert len(easy_direct) == 30
    assert all(len(row["messages"]) == 5 for row in hard)


def test_tool_using_trajectory_calls_the_calculator_then_answers_with_its_result():
    for row in synthetic.cold_start_trajectories(40, seed=2, direct_answer_share=0.0):
        call, result, final = row["messages"][2:]
        assert call["role"] == "assistant" and result["role"] == "tool"
        payload = json.loads(call["content"].removeprefix("<tool_call>")
                             .removesuffix("</tool_call>"))
        assert payload["name"] == "calculator"
        left, operator, right = _operands(row)
        assert payload["arguments"] == {"expression": f"{left} {operator} {right}"}
        assert result["content"] == row["answer"]
        assert final == {"role": "assistant", "content": f"<answer>{row['answer']}</answer>"}


def test_rl_prompt_hard_share_is_exact():
    rows = synthetic.rl_prompts(30, seed=0, hard_share=0.4)
    assert sum(row["subset"] == "hard" for row in rows) == 12


def test_eval_hard_prompts_never_appear_in_training_data():
    training_hard = set()
    for seed in range(5):
        training_hard |= _hard_pairs(synthetic.cold_start_trajectories(2000, seed))
        training_hard |= _hard_pairs(synthetic.rl_prompts(2000, seed))
    eval_hard = set()
    for seed in range(5):
        eval_hard |= _hard_pairs(synthetic.eval_prompts(200, seed))
    assert len(training_hard) > 8000 and len(eval_hard) > 500
    assert not training_hard & eval_hard


def test_eval_prompts_are_distinct_within_a_subset():
    rows = synthetic.eval_prompts(100, seed=0)
    for subset in ("easy", "hard"):
        questions = [row["messages"][1]["content"] for row in rows if row["subset"] == subset]
        assert len(questions) == len(set(questions)) == 100


def test_eval_prompts_refuse_more_hard_products_than_are_held_out():
    with pytest.raises(ValueError, match="held-out hard"):
        synthetic.eval_prompts(synthetic.held_out_hard_count() + 1, seed=0)


def test_invalid_shares_are_refused():
    with pytest.raises(ValueError, match="direct_answer_share"):
        synthetic.cold_start_trajectories(10, seed=0, direct_answer_share=1.5)
    with pytest.raises(ValueError, match="hard_share"):
        synthetic.rl_prompts(10, seed=0, hard_share=-0.1)


def test_write_jsonl_writes_one_row_per_line(tmp_path):
    rows = synthetic.cold_start_trajectories(5, seed=0)
    path = synthetic.write_jsonl(rows, tmp_path / "data" / "cold_start.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert [p.name for p in path.parent.iterdir()] == ["cold_start.jsonl"]


def test_answer_noise_corrupts_hard_answers_digit_by_digit_and_keeps_the_gold():
    clean = synthetic.cold_start_trajectories(2000, seed=3)
    noisy = synthetic.cold_start_trajectories(2000, seed=3, answer_noise=0.3)
    hard = [(c, n) for c, n in zip(clean, noisy) if n["subset"] == "hard"]
    assert [c["messages"][:-1] for c, _ in hard] == [n["messages"][:-1] for _, n in hard]  # calls, tool results
    assert all(n["answer"] == c["answer"] for c, n in hard)
    said = [n["messages"][-1]["content"][len("<answer>"):-len("</answer>")] for _, n in hard]
    assert all(len(s) == 5 and s[0] != "0" for s in said)
    wrong_digits = sum(a != b for (_, n), s in zip(hard, said) for a, b in zip(n["answer"], s))
    # each digit redrawn with p = 0.3, and a redraw keeps the digit 1 time in 10 (9 for the first)
    assert 0.22 < wrong_digits / (5 * len(hard)) < 0.32
    easy = [(c, n) for c, n in zip(clean, noisy) if n["subset"] == "easy"]
    assert all(c["messages"] == n["messages"] for c, n in easy)


def test_synthetic_files_follow_the_recipe_parameters(tmp_path):
    from metis_cli.data.sources import materialize_synthetic
    from metis_cli.recipe.load import validate_data

    def recipe(**synthetic_cfg):
        return validate_data({"run": {"output_dir": str(tmp_path)}, "model": {"name_or_path": "m"},
                              "data": {"synthetic": {"cold_start_examples": 50, **synthetic_cfg}}})

    first = materialize_synthetic("cold_start", recipe())
    assert materialize_synthetic("cold_start", recipe()) == first
    changed = materialize_synthetic("cold_start", recipe(answer_noise=0.5))
    assert changed != first and changed.read_text() != first.read_text()


def test_a_field_only_another_task_reads_leaves_a_set_file_unchanged(tmp_path):
    from metis_cli.data.sources import materialize_synthetic
    from metis_cli.recipe.load import validate_data

    def recipe(**synthetic_cfg):
        return validate_data({"run": {"output_dir": str(tmp_path)}, "model": {"name_or_path": "m"},
                              "data": {"synthetic": {"knowledge_examples": 4, **synthetic_cfg}}})

    text = materialize_synthetic("knowledge", recipe())
    assert materialize_synthetic("knowledge", recipe(closeup_share=0.5)) == text  # vision-only field
    vision = materialize_synthetic("knowledge", recipe(task="vision"))
    assert materialize_synthetic("knowledge", recipe(task="vision", closeup_share=0.5)) != vision


def test_every_synthetic_set_a_recipe_may_name_has_rows_and_others_are_refused():
    from metis_cli.data.sources import synthetic_rows
    from metis_cli.errors import DataError, RecipeError
    from metis_cli.recipe.load import validate_data
    from metis_cli.recipe.schema import SYNTHETIC_SETS, SyntheticConfig

    small = SyntheticConfig(knowledge_examples=5, cold_start_examples=5, rl_prompts=5, eval_per_subset=2)
    for name in SYNTHETIC_SETS:
        assert synthetic_rows(name, small), name
    with pytest.raises(DataError, match="known: knowledge, cold_start, rl, eval"):
        synthetic_rows("nope", small)
    with pytest.raises(RecipeError, match=r"data\.rl.*unknown synthetic set 'nope'"):
        validate_data({"model": {"name_or_path": "m"}, "data": {"rl": [{"path": "synthetic:nope"}]}})
