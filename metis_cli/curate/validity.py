"""Filter 1, schema and format validity, and reading the tool calls a trajectory recorded.

Rows the loader cannot parse at all (bad JSON, unknown roles, malformed content) never get here:
they are malformed rows, handled by `data.malformed_rows`. This filter judges rows that parse but
are not usable:
  sft: an assistant reply follows the last user turn; every `<tool_call>` is valid JSON
       `{"name", "arguments"}` and is answered by exactly one `tool` turn (and no tool turn
       appears without a call); the conversation ends with an assistant turn holding
       `<answer>...</answer>` and the reply passes the format reward's rules (rewards/format.py);
       a gold answer is present unless `require_gold_answer` is off.
  rl:  a non-empty question and a gold answer (the pass-rate filter scores against it).
Contents may be lists of text and image parts (data/content.py); tool calls and answers are read
from the text parts, and a recorded tool output is its text plus where its images sit in the
row's `images`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from metis_cli.agent.parser import ParsedToolCall, parse_tool_calls
from metis_cli.curate.rows import Candidate
from metis_cli.data.content import content_text, image_count
from metis_cli.data.datasets import Example
from metis_cli.rewards.answer import extract_answer
from metis_cli.rewards.format import format_ok


@dataclass
class RecordedCall:
    """A tool call in a trajectory and the output recorded for it (None when no tool turn follows).

    Images (indices into the row's `images`, in order of appearance): the call saw the first
    `images_seen` (those before its assistant turn's tool turns, as in a rollout); its tool turn
    holds `recorded_images` of them from `image_offset` on.
    """

    number: int  # 1-based position among the trajectory's calls
    call: ParsedToolCall
    recorded_output: str | None
    images_seen: int = 0
    image_offset: int = 0
    recorded_images: int = 0

    def describe(self) -> str:
        if self.call.error:
            return f"call {self.number} {self.call.raw[:80]!r}"
        return f"call {self.number} {self.call.name}({_short(self.call.arguments)})"


def recorded_calls(conversation: list[dict]) -> list[RecordedCall]:
    """Every tool call of every assistant turn, paired in order with the tool turns that follow it."""
    calls: list[RecordedCall] = []
    position = images = 0  # images: image parts so far
    while position < len(conversation):
        message = conversation[position]
        position += 1
        images += image_count(message["content"])
        if message["role"] != "assistant":
            continue
        seen = images
        for call in parse_tool_calls(content_text(message["content"])):
            output, offset, count = None, images, 0
            if position < len(conversation) and conversation[position]["role"] == "tool":
                output = content_text(conversation[position]["content"])
                count = image_count(conversation[position]["content"])
                images += count
                position += 1
            calls.append(RecordedCall(len(calls) + 1, call, output, seen, offset, count))
    return calls


def reply_of(example: Example) -> list[dict]:
    """The turns after the prompt (assistant and tool turns answering the last user turn)."""
    return (example.trajectory or [])[len(example.messages):]


class ValidityFilter:
    name = "validity"

    def __init__(self, mode: str, require_gold_answer: bool):
        self.mode = mode
        self.require_gold_answer = require_gold_answer or mode == "rl"

    def apply(self, rows: list[Candidate]) -> None:
        for row in rows:
            problem = self.problem(row.example)
            if problem is not None:
                row.drop(self.name, *problem)

    def problem(self, example: Example) -> tuple[str, str] | None:
        """(reason, detail) when the row is unusable, else None."""
        if self.require_gold_answer and example.answer is None:
            return "no gold answer", "the row has no `answer`; the sampling filters score against it"
        if self.mode == "rl":
            if not example.question.strip():
                return "empty question", "the last user turn is blank"
            return None
        return trajectory_problem(example)


def trajectory_problem(example: Example) -> tuple[str, str] | None:
    conversation = example.trajectory
    if conversation is None:
        return "no assistant reply", "no assistant turn follows the last user turn (a prompt, not a trajectory)"
    owed = 0  # tool turns still owed to the calls of the last assistant turn
    call_names: list[str | None] = []
    for number, message in enumerate(conversation, start=1):
        role = message["role"]
        if role == "tool":
            if owed == 0:
                return "tool turn without a tool call", f"message {number} is a tool turn no call asked for"
            expected = call_names[-owed]
            owed -= 1
            if message.get("name") and expected and message["name"] != expected:
                return "tool turn names another tool", (
                    f"message {number} answers {message['name']!r} but the call was to {expected!r}"
                )
            continue
        if owed:
            return "tool call without a tool turn", (
                f"message {number} ({role}) comes while {owed} tool call(s) still have no tool turn"
            )
        if role == "assistant":
            calls = parse_tool_calls(content_text(message["content"]))
            broken = next((call for call in calls if call.error), None)
            if broken is not None:
                return "malformed tool-call JSON", f"message {number}: {broken.error}"
            call_names = [call.name for call in calls]
            owed = len(calls)
    if owed:
        return "tool call without a tool turn", f"the last {owed} tool call(s) have no tool turn"
    final = conversation[-1]
    final_text = content_text(final["content"])
    if final["role"] != "assistant" or parse_tool_calls(final_text):
        return "no final answer turn", "the conversation does not end with an assistant turn that answers"
    if extract_answer(final_text) is None:
        return "no <answer> in the final turn", f"final assistant turn: {final_text[:120]!r}"
    assistant_texts = [content_text(m["content"]) for m in reply_of(example) if m["role"] == "assistant"]
    if not format_ok(assistant_texts):
        return "answer format broken", (
            "the reply breaks the format reward's rules: unbalanced <tool_call>/<think> tags, an "
            "<answer> before the final turn or more than one, or text after </answer>"
        )
    return None


def _short(arguments: dict | None) -> str:
    text = json.dumps(arguments, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."
