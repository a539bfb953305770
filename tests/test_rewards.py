"""Answer extraction, checkers, the format reward and per-rollout scoring."""

from __future__ import annotations

import threading

import pytest

from metis_cli.errors import MetisError
from metis_cli.rewards.answer import extract_answer, final_answer, rollout_answer
from metis_cli.rewards.checkers import (
    best_match,
    exact_match,
    get_checker,
    math_verify_match,
    numeric_match,
)
from metis_cli.rewards.format import format_ok
from metis_cli.rewards.scoring import score_rollout, scored_incorrect

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 45"}}</tool_call>'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I know it. <answer> 8 </answer>", "8"),
        ("<answer>\nmulti\nline\n</answer>", "multi\nline"),
        ("<answer>1</answer> wait, no <answer>2</answer>", "2"),  # last one wins
        ("no tags at all", None),
        ("<answer>never closed", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_final_answer_reads_only_the_last_assistant_turn():
    assert final_answer(["<answer>early</answer>" + CALL, "the result is <answer>5535</answer>"]) == "5535"
    assert final_answer(["<answer>early</answer>", "no answer here"]) is None
    assert final_answer([]) is None


def test_exact_match_ignores_case_and_whitespace():
    assert exact_match("  New   York ", "new york")
    assert not exact_match("New York City", "new york")


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [("1,234", "1234"), ("1234.0", "1234"), (" 5535 ", "5535"), ("$5", "5"), ("3/4", "0.75"),
     ("-2", "-2.00"), ("3.3333333", "10/3"), ("1e3", "1000")],
)
def test_numeric_match_accepts_the_same_number_written_differently(prediction, gold):
    assert numeric_match(prediction, gold)


@pytest.mark.parametrize(("prediction", "gold"), [("5534", "5535"), ("abc", "5"), ("", "0"), ("1/0", "1")])
def test_numeric_match_rejects_other_numbers_and_non_numbers(prediction, gold):
    assert not numeric_match(prediction, gold)


def test_math_verify_match():
    assert math_verify_match("0.5", "\\frac{1}{2}")
    assert math_verify_match("$1+x$", "x+1")
    assert math_verify_match("\\boxed{42}", "42")
    assert not math_verify_match("43", "42")
    assert not math_verify_match("", "42")
    # a word gold falls back to exact matching, not symbolic products of letters
    assert math_verify_match("Paris", "paris")
    assert not math_verify_match("pairs", "paris")


def test_math_verify_works_off_the_main_thread():
    # math-verify's own timeout uses signal.alarm, which raises in threads.
    results = []
    worker = threading.Thread(target=lambda: results.append(math_verify_match("0.5", "1/2")))
    worker.start()
    worker.join()
    assert results == [True]


def test_get_checker_names_and_unknown_name():
    assert get_checker("numeric")("1,000", "1000")
    assert get_checker("exact") is exact_match
    with pytest.raises(MetisError, match="reward.checker"):
        get_checker("fuzzy")


@pytest.mark.parametrize(
    "turns",
    [
        ["<answer>8</answer>"],
        ["<think>easy</think>\n<answer>8</answer>\n"],
        [f"Let me compute. {CALL}", "The tool says 5535. <answer>5535</answer>"],
        [f"{CALL}\n{CALL}", "<think>ok</think><answer>5535</answer>"],
    ],
)
def test_format_ok_accepts_well_formed_rollouts(turns):
    assert format_ok(turns)


@pytest.mark.parametrize(
    ("turns", "why"),
    [
        ([], "no turns"),
        (["8"], "no answer"),
        (["<answer>1</answer><answer>2</answer>"], "two answers"),
        (["<answer>1</answer>", "<answer>2</answer>"], "answer in an earlier turn too"),
        (["<answer>1</answer>" + CALL, "done"], "answer not in the final turn"),
        (['<tool_call>{"name": "calculator"}', "<answer>1</answer>"], "unclosed tool call"),
        (["</tool_call><tool_call>", "<answer>1</answer>"], "close before open"),
        (["<answer>1</answer>" + CALL], "tool call after the answer"),
        (["<answer>1</answer> and some more text"], "text after the answer"),
        (["<answer>1</answer><think>hmm</think>"], "reasoning after the answer"),
        (["<think>thinking <answer>1</answer></think>"], "answer inside reasoning"),
        (["<think>never closed <answer>1</answer>"], "unclosed think"),
        (["<answer>   </answer>"], "blank answer"),
        (["</answer>1<answer>"], "tags reversed"),
    ],
)
def test_format_ok_rejects(turns, why):
    assert not format_ok(turns), why


def test_score_rollout_correct_with_tool_calls():
    score = score_rollout([f"hmm {CALL}", "<answer>5,535</answer>"], "5535", 1, numeric_match)
    assert score.correct is True and score.format_ok is True
    assert score.r_acc == pytest.approx(1.0)
    assert score.r_tool == pytest.approx(0.5)
    assert score.answer == "5,535"


def test_score_rollout_correct_without_tools_gets_full_efficiency_reward():
    score = score_rollout(["<answer>8</answer>"], "8", 0, exact_match)
    assert (score.r_acc, score.r_tool) == pytest.approx((1.0, 1.0))


def test_score_rollout_wrong_but_well_formed():
    score = score_rollout(["<answer>9</answer>"], "8", 0, exact_match)
    assert score.correct is False
    assert (score.r_acc, score.r_tool) == pytest.approx((0.1, 0.0))


def test_score_rollout_correct_but_malformed_and_custom_weights():
    score = score_rollout(["<answer>8</answer> trailing"], "8", 2, exact_match, 0.8, 0.2)
    assert score.correct is True and score.format_ok is False
    assert (score.r_acc, score.r_tool) == pytest.approx((0.8, 1 / 3))


def test_score_rollout_without_answer_is_wrong_not_unscored():
    score = score_rollout(["I give up"], "8", 0, lambda prediction, gold: None)
    assert score.correct is False and score.r_acc == 0.0 and score.r_tool == 0.0


def test_score_rollout_unscored_when_checker_cannot_decide():
    score = score_rollout(["<answer>8</answer>"], "8", 0, lambda prediction, gold: None)
    assert score.correct is None
    assert score.r_acc is None and score.r_tool is None
    assert score.format_ok is True and score.answer == "8"


# ------------------------------------------------------- official rules: reason / think / none
REASON_CALL = f"<reason>need the product</reason>{CALL}"


@pytest.mark.parametrize(
    ("turns", "rule", "ok"),
    [
        ([REASON_CALL, "<reason>got it</reason><answer>5535</answer>"], "reason", True),
        (["<answer>8</answer>"], "reason", True),  # no reasoning at all: counts are 0 == 0
        # counts only: text after the answer and two answers still pass
        (["<reason>r</reason><answer>8</answer> trailing"], "reason", True),
        (["<reason>r</reason><answer>1</answer><answer>2</answer>"], "reason", True),
        # an answer in an earlier turn counts too (the whole response)
        (["<reason>r</reason><answer>1</answer>" + CALL, "done"], "reason", True),
        (["<reason>r</reason>", "<answer>8</answer>"], "reason", True),
        (["<reason>unclosed <answer>8</answer>"], "reason", False),
        (['<reason>r</reason><tool_call>{"name": "calculator"}', "<answer>8</answer>"], "reason", False),
        (["<answer>8</answer><reason>after</reason>"], "reason", False),  # nothing after the last </reason>
        (["<reason>r</reason><answer>8"], "reason", False),
        (["<reason>r</reason> no answer"], "reason", False),
        # <think> is not <reason>: the reason rule ignores it, the think rule checks it
        (["<think>unclosed <answer>8</answer>"], "reason", True),
        (["<think>unclosed <answer>8</answer>"], "think", False),
        (["<think>t</think><answer>8</answer>"], "think", True),
        (["<answer>8</answer><think>after</think>"], "think", False),
        (["no answer, no tags"], "none", True),
        ([], "none", True),
        ([], "reason", False),
    ],
)
def test_format_rules(turns, rule, ok):
    assert format_ok(turns, rule) is ok


def test_metis_rule_is_the_default_and_stricter_than_reason():
    turns = ["<answer>1</answer><answer>2</answer>"]
    assert not format_ok(turns) and not format_ok(turns, "metis")
    assert format_ok(turns, "reason")


def test_unknown_format_rule():
    with pytest.raises(ValueError, match="unknown format rule"):
        format_ok(["<answer>1</answer>"], "xml")


def test_answer_position_first_reads_the_whole_response():
    turns = ["<reason>r</reason><answer> early </answer>" + CALL, "<answer>1</answer> no, <answer>2</answer>"]
    assert rollout_answer(turns, "last") == "2"
    assert rollout_answer(turns, "first") == "early"
    assert rollout_answer(["no tag"], "first") is None


def test_answer_position_first_is_a_search_over_the_joined_turns():
    # like the official regex over the decoded response: an open <answer> runs to the next </answer>
    assert rollout_answer(["<answer>never closed", "<answer>x</answer>"], "first") == "never closed\n<answer>x"
    assert rollout_answer(["<answer>a</answer>", "<answer>b</answer>"], "first") == "a"


def test_score_rollout_official_rules():
    turns = [REASON_CALL, "<reason>checked</reason><answer>5535</answer> trailing <answer>9</answer>"]
    official = score_rollout(turns, "5535", 1, exact_match, format_rule="reason", answer_position="first")
    assert official.correct is True and official.format_ok is True and official.answer == "5535"
    assert (official.r_acc, official.r_tool) == pytest.approx((1.0, 0.5))
    metis = score_rollout(turns, "5535", 1, exact_match)
    assert metis.correct is False and metis.format_ok is False and metis.answer == "9"
    assert (metis.r_acc, metis.r_tool) == pytest.approx((0.0, 0.0))


# -------------------------------------------------------------------- list ground truths
@pytest.mark.parametrize("checker", [exact_match, numeric_match, math_verify_match])
def test_list_gold_scores_the_best_match_for_every_checker(checker):
    assert score_rollout(["<answer>7</answer>"], ["6", "7"], 0, checker).correct is True
    assert score_rollout(["<answer>8</answer>"], ["6", "7"], 0, checker).correct is False
    assert score_rollout(["<answer>7</answer>"], "7", 0, checker).correct is True


def test_best_match_stops_at_a_match_and_keeps_undecided():
    asked = []

    def check(prediction, gold):
        asked.append(gold)
        return {"a": None, "b": False, "c": True}[gold]

    assert best_match(check, "p", ["b", "c", "a"]) is True and asked == ["b", "c"]
    assert best_match(check, "p", ["b", "a"]) is None  # a match is still possible: unscored, not wrong
    assert best_match(check, "p", ["b"]) is False
    assert best_match(check, "p", []) is False


def test_scored_incorrect_keeps_the_format_reward():
    unscored = score_rollout(["<answer>8</answer>"], "8", 2, lambda prediction, gold: None)
    wrong = scored_incorrect(unscored, format_weight=0.1)
    assert (wrong.correct, wrong.r_acc, wrong.r_tool, wrong.scoring_failed) == (False, pytest.approx(0.1), 0.0, True)
    assert wrong.answer == "8" and not unscored.scoring_failed
