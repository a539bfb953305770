"""Per-tool calls/errors/timeouts, the tool-call ratio among correct and wrong rollouts, and the
budget shares (rewards/tool_economy.py), from hand-made rollouts and from the real engine."""

from __future__ import annotations

import json
from types import SimpleNamespace

from metis_cli.agent.backend import Generation
from metis_cli.rewards.tool_economy import correctness_and_budgets, per_tool_figures
from metis_cli.telemetry.metrics import unknown_keys


def rollout(trace, finish="answer"):
    return SimpleNamespace(tool_calls=len(trace), tool_trace=trace, finish_reason=finish)


def score(correct):
    return SimpleNamespace(correct=correct)


def test_figures_from_hand_made_rollouts():
    rollouts = [
        rollout([("calculator", None)]),                                   # correct, used the tool
        rollout([]),                                                        # correct, no tool
        rollout([]),                                                        # correct, no tool
        rollout([("python", "timeout"), ("python", None)], "max_turns"),   # wrong
        rollout([("calc", "unknown_tool"), (None, "malformed")], "length"),  # wrong
        rollout([("calculator", "tool_error")]),                            # unscored
    ]
    scores = [score(True), score(True), score(True), score(False), score(False), score(None)]
    assert correctness_and_budgets(rollouts, scores) == {
        "tool_call_ratio_correct": 1 / 3, "tool_call_ratio_wrong": 1.0,
        "turn_budget_share": 1 / 6, "token_budget_share": 1 / 6}
    record = per_tool_figures(rollouts, ["calculator", "python"])
    assert record == {
        "tools/calculator/calls": 2, "tools/calculator/errors": 1, "tools/calculator/timeouts": 0,
        "tools/python/calls": 2, "tools/python/errors": 1, "tools/python/timeouts": 1,
        "tools/other/calls": 1, "tools/other/errors": 1, "tools/other/timeouts": 0,
    }
    assert unknown_keys({"stage": "hdpo", "step": 1, **record}) == []


def test_no_correct_rollout_is_null_not_zero():
    record = correctness_and_budgets([rollout([("calculator", None)])], [score(False)])
    assert record["tool_call_ratio_correct"] is None and record["tool_call_ratio_wrong"] == 1.0


class ScriptedBackend:
    """Calls the calculator with the question's expression once, then answers."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompts, params):
        generations = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt)
            expression = text.rsplit("What is ", 1)[1].split("?")[0]
            if "<tool_response>" in text.rsplit("What is ", 1)[1]:
                reply = "<answer>done</answer><|im_end|>"
            else:
                reply = f'<tool_call>{json.dumps({"name": "calculator", "arguments": {"expression": expression}})}' \
                        "</tool_call>"
            ids = self.tokenizer.encode(reply, add_special_tokens=False)
            generations.append(Generation(ids, [0.0] * len(ids), "stop"))
        return generations

    def update_weights(self, model):
        pass

    def close(self):
        pass


def test_the_engine_records_each_call_s_tool_and_error(tiny_tokenizer):
    from metis_cli.agent.rollout import RolloutEngine
    from metis_cli.agent.tools.registry import ToolRegistry
    from metis_cli.recipe import validate_data

    tools = validate_data({"run": {"output_dir": "."}, "model": {"name_or_path": "x"}}, source="test").tools
    engine = RolloutEngine(ScriptedBackend(tiny_tokenizer), tiny_tokenizer, ToolRegistry.from_config(tools),
                           max_turns=3, max_new_tokens_per_turn=64, max_total_tokens=512, temperature=1.0, top_p=1.0)
    prompts = [[{"role": "user", "content": f"What is {expression}?"}] for expression in ("2 + 2", "5 / 0")]
    done = engine.run(prompts, 1, greedy=True)
    assert [r.tool_trace for r in done] == [[("calculator", None)], [("calculator", "tool_error")]]
    record = per_tool_figures(done, ["calculator", "python"])
    assert record["tools/calculator/calls"] == 2 and record["tools/calculator/errors"] == 1
    assert record["tools/python/calls"] == 0
