"""The format reward: is a multi-turn rollout shaped the way the chat template expects?

format_ok is 1 when, across the rollout's assistant turns:
  - every `<tool_call>` and `<think>` tag in each turn is closed, in order, without nesting;
  - there is exactly one `<answer>...</answer>` (non-blank), and it is in the final turn;
  - the answer comes after any reasoning and tool call of that turn (after the last
    `</think>` and `</tool_call>`), and nothing but whitespace follows `</answer>` (so no tool
    call after the answer).
Tool (observation) turns are not the model's text and are not checked; pass assistant turns only.
"""

from __future__ import annotations

import re

_PAIRED_TAGS = ("tool_call", "think")
_TAG = re.compile(r"</?(tool_call|think|answer)>")


def _tags_balanced(text: str, name: str) -> bool:
    """Opening and closing `name` tags alternate, starting with an opening one, ending closed."""
    expect_open = True
    for match in re.finditer(rf"<(/?){name}>", text):
        is_open = match.group(1) == ""
        if is_open != expect_open:
            return False
        expect_open = not expect_open
    return expect_open


def _last_close_end(text: str, name: str) -> int:
    ends = [m.end() for m in re.finditer(rf"</{name}>", text)]
    return ends[-1] if ends else 0


def format_ok(assistant_texts: list[str]) -> bool:
    """True when the rollout's assistant turns follow the format above."""
    if not assistant_texts:
        return False
    for text in assistant_texts:
        if not all(_tags_balanced(text, name) for name in _PAIRED_TAGS):
            return False
    *earlier_turns, final = assistant_texts
    if any("<answer>" in text or "</answer>" in text for text in earlier_turns):
        return False
    if final.count("<answer>") != 1 or final.count("</answer>") != 1:
        return False
    answer_start = final.index("<answer>")
    answer_end = final.index("</answer>")
    if answer_end < answer_start:
        return False
    if not final[answer_start + len("<answer>") : answer_end].strip():
        return False
    if _TAG.search(final[answer_start + len("<answer>") : answer_end]):
        return False
    reasoning_end = max(_last_close_end(final, name) for name in _PAIRED_TAGS)
    if answer_start < reasoning_end:
        return False
    return not final[answer_end + len("</answer>") :].strip()
