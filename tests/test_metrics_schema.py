"""The metrics.jsonl contract (telemetry/metrics.py): what the hdpo step record holds, the one
computation of rollout figures, null accuracy when nothing is scored, eval keys, the reader.
A real sft and hdpo run is checked against the schema in tests/test_training.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from metis_cli.algo.estimators import estimate
from metis_cli.recipe.schema import HdpoConfig
from metis_cli.rewards.batch import rollout_figures, subset_summary
from metis_cli.rewards.scoring import RolloutScore
from metis_cli.stages.hdpo_step import StepMetrics, eval_figures, scored_batch
from metis_cli.stages.hdpo_update import UpdateFigures
from metis_cli.telemetry import metrics as m
from metis_cli.telemetry.history import load_history
from metis_cli.telemetry.run import MetricsLog


def rollout(prompt_index: int, tool_calls: int = 0, errors: dict | None = None, finish: str = "answer",
            tokens: int = 10):
    return SimpleNamespace(prompt_index=prompt_index, tool_calls=tool_calls, tool_errors=errors or {},
                           finish_reason=finish, generated_tokens=tokens)


def score(correct: bool | None, tool_calls: int = 0) -> RolloutScore:
    if correct is None:
        return RolloutScore(None, True, None, None, None)
    return RolloutScore(correct, True, 0.9 * correct + 0.1, 1 / (tool_calls + 1) if correct else 0.0, "5")


ROLLOUTS = [rollout(0, 1, {"timeout": 1}), rollout(0, 0, finish="length", tokens=24), rollout(1, 2, {"malformed": 2}),
            rollout(1, 0)]
SCORES = [score(True, 1), score(False), score(None), score(True)]


def step_metrics(rollouts, scores, estimator="hdpo", update=None, **extra) -> StepMetrics:
    batch = scored_batch(rollouts, scores)
    advantages = estimate(estimator, batch, HdpoConfig())
    return StepMetrics.measure(batch, advantages, rollout_figures(rollouts, scores), step=3, total_steps=10,
                               estimator=estimator, update=update, rollout_s=2.0, update_s=1.0, step_s=3.5,
                               elapsed_s=9.0, lr=1e-6, **extra)


def test_step_record_writes_only_schema_names_and_every_hdpo_name():
    record = step_metrics(ROLLOUTS, SCORES, update=UpdateFigures(loss=0.5, ptx_loss=1.5), checkpoint="ckpt",
                          eval={m.eval_key("easy", m.ACCURACY): 0.5}).to_record()
    assert m.unknown_keys(record) == []
    assert set(m.fields("hdpo")) == {key for key in record if m.split_eval_key(key) is None}
    assert record[m.TOOL_TIMEOUTS] == 1 and record[m.MALFORMED_TOOL_CALLS] == 2 and record[m.TRUNCATED] == 1
    assert record[m.UNSCORED] == 1 and record[m.ACCURACY] == 2 / 3 and record[m.ROLLOUTS_TRAINED] == 3
    assert record[m.TOKENS_PER_S] == 54 / 2.0 and record[m.RESPONSE_TOKENS_MEAN] == 54 / 4


def test_step_record_leaves_out_what_the_step_did_not_measure():
    record = step_metrics(ROLLOUTS, SCORES, estimator="grpo").to_record()
    assert m.ADV_ACC_MEAN in record and m.ADV_TOOL_MEAN not in record  # one channel
    assert m.LOSS not in record and m.CHECKPOINT not in record  # nothing trained, nothing saved
    assert m.PTX_LOSS not in step_metrics(ROLLOUTS, SCORES, update=UpdateFigures(loss=0.5)).to_record()  # ptx off
    assert not [key for key in record if m.split_eval_key(key)]


def test_unknown_keys_catches_a_misspelt_or_misplaced_name():
    assert m.unknown_keys({m.STAGE: "hdpo", m.STEP: 1, "tool_call_rate": 0.5}) == ["tool_call_rate"]
    assert m.unknown_keys({m.STAGE: "sft", m.STEP: 1, m.ACCURACY: 0.5}) == [m.ACCURACY]  # an hdpo field
    assert m.unknown_keys({m.STAGE: "hdpo", "eval/easy/entropy": 1.0}) == ["eval/easy/entropy"]


def test_eval_keys_round_trip():
    key = m.eval_key("hard", m.TOOL_CALL_RATIO)
    assert key == "eval/hard/tool_call_ratio" and m.split_eval_key(key) == ("hard", m.TOOL_CALL_RATIO)
    assert m.split_eval_key(m.TOOL_CALL_RATIO) is None and m.split_eval_key("eval//accuracy") is None


def test_nothing_scored_logs_null_accuracy_in_step_and_eval(tmp_path):
    unscored = [score(None) for _ in ROLLOUTS]
    examples = [SimpleNamespace(subset="easy"), SimpleNamespace(subset="hard")]
    step = step_metrics(ROLLOUTS, unscored)
    step.eval = eval_figures(subset_summary(ROLLOUTS, unscored, examples))
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(step.to_record())
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line[m.ACCURACY] is None and line[m.R_ACC_MEAN] is None and line[m.UNSCORED] == 4
    assert line[m.eval_key("easy", m.ACCURACY)] is None and line[m.eval_key("hard", m.ACCURACY)] is None
    assert line[m.eval_key("hard", m.TOOL_CALLS_MEAN)] == 1.0
    assert load_history(tmp_path / "metrics.jsonl").eval_subsets() == ["easy", "hard"]


def test_subset_summary_is_rollout_figures_per_subset():
    examples = [SimpleNamespace(subset="easy"), SimpleNamespace(subset="hard")]
    summary = subset_summary(ROLLOUTS, SCORES, examples)
    hard = rollout_figures(ROLLOUTS[2:], SCORES[2:])
    assert summary["hard"] == {"n": 2, "accuracy": hard.accuracy, "tool_call_ratio": hard.tool_call_ratio,
                               "tool_calls_mean": hard.tool_calls_mean, "tool_errors": hard.tool_errors,
                               "generated_tokens_mean": hard.response_tokens_mean, "unscored": hard.unscored}
    assert summary["hard"]["accuracy"] == 1.0 and summary["easy"]["accuracy"] == 0.5


def test_scored_batch_tensors():
    batch = scored_batch(ROLLOUTS, SCORES)
    assert batch.scored.tolist() == [True, True, False, True] and torch.equal(batch.keep, batch.scored)
    assert batch.r_acc[2] == 0.0 and batch.group_ids.tolist() == [0, 0, 1, 1]
    assert batch.tool_calls.tolist() == [1.0, 0.0, 2.0, 0.0] and batch.r_tool.tolist() == [0.5, 0.0, 0.0, 1.0]


def test_reader_skips_corrupt_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "sft", "step": 1, "loss": 2.0}\nnot json\n[1]\n{"stage": "sft", "step": 2}\n{"st')
    assert [r[m.STEP] for r in m.read_metrics(path)] == [1, 2]
    assert m.parse_json_lines([b'{"a": 1}', b"", b"{", b"3"]) == ([{"a": 1}], 2)
