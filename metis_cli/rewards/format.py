"""The format reward: is a multi-turn rollout shaped the way the recipe's `reward.format` asks?

Rules (`FORMAT_RULES`; pass assistant turns only: tool turns are not the model's text):
  - metis (default): across the rollout's assistant turns
      - every `<tool_call>` and `<think>` tag in each turn is closed, in order, without nesting;
      - there is exactly one `<answer>...</answer>` (non-blank), and it is in the final turn;
      - the answer comes after any reasoning and tool call of that turn (after the last
        `</think>` and `</tool_call>`), and nothing but whitespace follows `</answer>`.
  - reason (the official Metis code's rule): over the whole response (the assistant turns
    joined), the counts of `<reason>` and `</reason>` are equal, the counts of `<tool_call>` and
    `</tool_call>` are equal, and after the last `</reason>` (the whole text when there is none)
    the counts of `<answer>` and `</answer>` are equal and at least 1. Counts only: order,
    nesting and text after the answer are not checked.
  - think: the reason rule with `<think>` in place of `<reason>`.
  - none: no format requirement; every rollout is well formed, so the format term adds the same
    constant to every rollout and only accuracy moves the advantages.
The official code counts over its decoded response, tool observations included; here only the
model's own turns are counted (an observation that prints a tag cannot change the reward).
"""

from __future__ import annotations

import re

FORMAT_RULES = ("metis", "reason", "think", "none")
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


def _metis_format_ok(assistant_texts: list[str]) -> bool:
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


def _counts_format_ok(text: str, reasoning_tag: str) -> bool:
    """The official rule: tag counts only (see the module docstring)."""
    if text.count(f"<{reasoning_tag}>") != text.count(f"</{reasoning_tag}>"):
        return False
    if text.count("<tool_call>") != text.count("</tool_call>"):
        return False
    after_reasoning = text.rsplit(f"</{reasoning_tag}>", 1)[-1]
    answers = after_reasoning.count("<answer>")
    return answers >= 1 and answers == after_reasoning.count("</answer>")


def format_ok(assistant_texts: list[str], rule: str = "metis") -> bool:
    """True when the rollout's assistant turns follow `rule` (one of FORMAT_RULES)."""
    if rule == "none":
        return True
    if not assistant_texts:
        return False
    if rule == "metis":
        return _metis_format_ok(assistant_texts)
    if rule in ("reason", "think"):
        return _counts_format_ok("\n".join(assistant_texts), rule)
    raise ValueError(f"unknown format rule {rule!r}; use one of {', '.join(FORMAT_RULES)}")
