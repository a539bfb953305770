"""Pull the final answer out of a model reply: the text inside `<answer>...</answer>`.

Owns only extraction. Whether the reply is well formed (exactly one answer tag, in the last
turn) is `rewards/format.py`'s question; whether the answer is right is `rewards/checkers.py`'s.
"""

from __future__ import annotations

import re

ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


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
