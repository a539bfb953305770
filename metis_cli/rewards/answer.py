"""Pull the answer out of a model reply: the text inside `<answer>...</answer>`.

Owns only extraction. Whether the reply is well formed is `rewards/format.py`'s question;
whether the answer is right is `rewards/checkers.py`'s. Which answer of a rollout counts is the
recipe's `reward.answer_position` (`ANSWER_POSITIONS`):
  - last (default): the last complete answer tag of the final assistant turn;
  - first (the official Metis code): the first complete answer tag of the whole response (the
    assistant turns joined, earlier turns included).
"""

from __future__ import annotations

import re

ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
ANSWER_POSITIONS = ("last", "first")


def extract_answer(text: str | None) -> str | None:
    """The stripped text of the last complete `<answer>...</answer>` in `text`.

    Several answer tags: the last one counts (it is the model's final word; format_ok still
    penalises the repetition). No complete tag (none, or `<answer>` never closed): None, which
    scoring treats as a wrong answer, not as unscored.
    """
    if not text:
        return None
    matches = ANSWER_PATTERN.findall(text)
    if not matches:
        return None
    return matches[-1].strip()


def final_answer(assistant_texts: list[str]) -> str | None:
    """The answer of a multi-turn rollout: extracted from its final assistant turn only."""
    return extract_answer(assistant_texts[-1]) if assistant_texts else None


def rollout_answer(assistant_texts: list[str], position: str = "last") -> str | None:
    """The answer of a rollout at `position` (one of ANSWER_POSITIONS, see the module docstring)."""
    if position == "last":
        return final_answer(assistant_texts)
    if position == "first":
        match = ANSWER_PATTERN.search("\n".join(assistant_texts))
        return match.group(1).strip() if match else None
    raise ValueError(f"unknown answer position {position!r}; use one of {', '.join(ANSWER_POSITIONS)}")
