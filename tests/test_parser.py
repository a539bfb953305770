"""Tool-call parsing: every malformed call the model can write becomes a counted error observation."""

from __future__ import annotations

import json
import random

import pytest

from metis_cli.agent.parser import MAX_TOOL_CALL_CHARS, parse_tool_calls
from metis_cli.agent.tools import ToolErrorKind, ToolRegistry
from metis_cli.agent.tools.calculator import CalculatorTool

MALFORMED = ToolErrorKind.MALFORMED
UNKNOWN = ToolErrorKind.UNKNOWN_TOOL
BAD_ARGS = ToolErrorKind.BAD_ARGUMENTS


def call(body: str) -> str:
    return f"<tool_call>{body}</tool_call>"


def good(expression: str = "123 * 45") -> str:
    return json.dumps({"name": "calculator", "arguments": {"expression": expression}})


# (model text, error kind the model gets back, words the observation must contain)
BROKEN_CALLS = [
    (call('{"name": "calculator", "arguments": {"expression": "1+2"'), MALFORMED, "invalid JSON"),
    (call(call(good())), MALFORMED, "nested"),
    ("<tool_call>" + good(), MALFORMED, "never closed"),
    (call(""), MALFORMED, "empty"),
    (call("\n   \n"), MALFORMED, "empty"),
    (call('{"name": "calculator", "arguments": "{\\"expression\\": \\"1+2\\"}"}'), MALFORMED, "not a string"),
    (call('{"name": "calculator", "arguments": {"expression": "1"}, "id": "call_1"}'), MALFORMED, "'id'"),
    (call(good() + good()), MALFORMED, "own <tool_call>"),
    (call("[" + good() + "]"), MALFORMED, "got an array"),
    (call('{"name": 42, "arguments": {}}'), MALFORMED, '"name"'),
    (call('{"arguments": {"expression": "1"}}'), MALFORMED, '"name"'),
    (call(good("1+" * (MAX_TOOL_CALL_CHARS // 2))), MALFORMED, "limit"),
    (call('\x00\ufffd💥{"na\udcff'), MALFORMED, "invalid JSON"),
    (call('{"name": "calculator", "arguments": {"expression": "\\ud800"}}'), MALFORMED, "unicode"),
    ("so the answer is 5</tool_call>", MALFORMED, "without a matching"),
    (call("{'name': 'calculator', 'arguments': {'expression': '1'}}"), MALFORMED, "invalid JSON"),
    (call("```json\n" + good() + "\n```"), MALFORMED, "invalid JSON"),
    (call('{"name": "calculator", "arguments": {"expression": NaN}}'), MALFORMED, "NaN"),
    (call('{"name": "calculator", "name": "python", "arguments": {}}'), MALFORMED, "duplicate"),
    (call('{"name": "calculator", "arguments": ["1+2"]}'), MALFORMED, "got array"),
    (call('{"name": "calculator", "arguments": null}'), MALFORMED, "got null"),
    (call('{"name": "calculator", "arguments": {"expression": "1"},}'), MALFORMED, "invalid JSON"),
    (call('"calculator"'), MALFORMED, "got string"),
    (call('{"name": "calculater", "arguments": {"expression": "1"}}'), UNKNOWN, "available tools: calculator"),
    (call('{"name": "calculator\\u200b", "arguments": {"expression": "1"}}'), UNKNOWN, "unknown tool"),
    (call('{"name": "python", "arguments": {"code": "print(1)"}}'), UNKNOWN, "unknown tool 'python'"),
    (call('{"name": "calculator", "arguments": {"expression": 5}}'), BAD_ARGS, "not of type 'string'"),
    (call('{"name": "calculator", "arguments": {"expression": "1", "precision": 3}}'), BAD_ARGS, "precision"),
    (call('{"name": "calculator", "arguments": {}}'), BAD_ARGS, "'expression' is a required property"),
    (call('{"name": "calculator"}'), BAD_ARGS, "required"),
    (call('{"name": "calculator", "arguments": {"expression": ["1", "+", "2"]}}'), BAD_ARGS, "string"),
]


@pytest.fixture(scope="module")
def registry() -> ToolRegistry:
    return ToolRegistry([CalculatorTool()], timeout_s=5, max_calls_per_rollout=4, max_concurrency=4)


@pytest.mark.parametrize(("text", "kind", "hint"), BROKEN_CALLS, ids=range(len(BROKEN_CALLS)))
def test_broken_call_gives_its_error_kind(registry, text, kind, hint):
    [parsed] = parse_tool_calls(f"Let me compute.\n{text}\n")
    [result] = registry.execute_many([(parsed, 0)])
    assert result.error == kind
    assert result.text.startswith("Error: ")
    assert hint in result.text
    if kind == MALFORMED:
        assert parsed.error and parsed.name is None and parsed.arguments is None


def test_corpus_covers_at_least_fifteen_malformed_calls():
    assert sum(kind == MALFORMED for _, kind, _ in BROKEN_CALLS) >= 15


def test_valid_call_parses_and_runs(registry):
    text = f"I will use the tool.\n<tool_call>\n{good('123 * 45')}\n</tool_call>"
    [parsed] = parse_tool_calls(text)
    assert (parsed.name, parsed.arguments, parsed.error) == ("calculator", {"expression": "123 * 45"}, None)
    assert parsed.raw == text[text.index("<tool_call>") :]
    [result] = registry.execute_many([(parsed, 0)])
    assert (result.text, result.error) == ("5535", None)


def test_several_calls_in_one_turn_parse_in_order():
    text = f"a {call(good('1+1'))} b {call('oops')} c {call(good('2*3'))} <answer>2</answer>"
    calls = parse_tool_calls(text)
    assert [c.arguments["expression"] if c.arguments else None for c in calls] == ["1+1", None, "2*3"]
    assert [c.error is None for c in calls] == [True, False, True]


def test_text_without_tool_calls_has_none():
    assert parse_tool_calls("The answer is <answer>42</answer>, no tools needed.") == []


def test_missing_arguments_key_means_no_arguments():
    [parsed] = parse_tool_calls(call('{"name": "get_time"}'))
    assert (parsed.name, parsed.arguments, parsed.error) == ("get_time", {}, None)


def test_parser_never_raises_on_garbage():
    pieces = ["<tool_call>", "</tool_call>", "{", "}", '"name"', ":", '"calculator"', ",", '"arguments"',
              "[", "]", "\\u00", "\udc80", "💥", "null", " ", "\n", "<answer>", "1e999"]  # fmt: skip
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        for parsed in parse_tool_calls(text):
            assert (parsed.error is None) == (parsed.name is not None and parsed.arguments is not None)
            assert parsed.raw in text
