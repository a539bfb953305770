"""The synthetic arithmetic task behind the embedded tiny default (`recipes/tiny.yaml`).

It owns the questions, their exact answers, the system prompt and the calculator tool spec the
task is rendered with, and the four generators the pipeline consumes. It does not tokenize,
render chat templates or run tools.

Two kinds of question, so "when to call a tool" has a right answer:
- `easy`: single-digit sums ("What is 3 + 5?"). Stand-ins for what a real base model already
  knows; calling a tool for them is the blind tool use HDPO should train away.
- `hard`: 3-digit x 2-digit products ("What is 123 * 45?"). A tiny model cannot do them in its
  head, so the calculator stays necessary.

Held-out choice. There are only 100 distinct easy sums, and the premise is that the base model
knows all of them, so SFT knowledge, RL and eval all draw from the same 100 pairs: easy eval
measures whether the policy *uses* what it knows, not whether it generalises. Hard products are
split once, independently of any seed, by a stable hash of the operand pair: about 10% are
eval-only (`is_held_out_hard`), the rest feed SFT and RL. So eval hard prompts never appear in
any training set, whatever seeds the recipe uses.

Rows use the messages layout shared by every dataset in metis:
`{"id": str, "messages": [OpenAI chat messages], "answer": "8", "subset": "easy" | "hard"}`.
Tool calls are kept as text in the assistant content (Qwen/Hermes form).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from contextlib import suppress
from pathlib import Path
from typing import Iterable, Literal

from metis_cli.files import storage_errors

Subset = Literal["easy", "hard"]

SYSTEM_PROMPT = "Answer the question. Use the calculator if needed."

CALCULATOR_TOOL_SPEC: dict = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "The expression to evaluate."}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}
"""The calculator as the chat template sees it (OpenAI function format), written out here so the
data layer needs no tool code; tests/test_tools.py checks it equals `agent.tools.calculator`'s
spec. The tiny tokenizer's merges are trained on this exact text, so a tool registry that renders
the same spec gets a short system turn; a different description still works, with more tokens."""

_HELD_OUT_HARD_PERCENT = 10
HARD_MIN_PRODUCT = 10_000
"""Hard products all have five digits. With one fixed length, copying the calculator's result
into the answer is a fixed-offset copy a 4-layer model learns reliably; with 4- and 5-digit
results mixed, the tiny model often blended a half-computed guess into the copied digits."""
_EASY_PAIRS = [(a, b) for a in range(10) for b in range(10)]


def is_held_out_hard(left: int, right: int) -> bool:
    """True if the product `left * right` is reserved for eval (seed-independent split)."""
    digest = hashlib.blake2b(f"{left}*{right}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < _HELD_OUT_HARD_PERCENT


def is_hard_pair(left: int, right: int) -> bool:
    """A 3-digit x 2-digit product with a five-digit result (see HARD_MIN_PRODUCT)."""
    return 100 <= left <= 999 and 10 <= right <= 99 and left * right >= HARD_MIN_PRODUCT


@functools.cache
def held_out_hard_count() -> int:
    """How many distinct hard products are reserved for eval (about 10% of the hard pairs)."""
    return sum(
        is_held_out_hard(left, right) and is_hard_pair(left, right)
        for left in range(100, 1000) for right in range(10, 100)
    )


def calculator_call(expression: str) -> str:
    """The assistant text of one calculator call, exactly as the rollout parser expects it."""
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return f"<tool_call>{json.dumps(call)}</tool_call>"


def answer_text(answer: str) -> str:
    return f"<answer>{answer}</answer>"


def knowledge_examples(n: int, seed: int) -> list[dict]:
    """`n` direct answers to easy questions: what a real base model would already know.

    Cycles through all 100 sums in shuffled passes, so every sum is seen about equally often.
    """
    rng = random.Random(f"knowledge-{seed}")
    rows = []
    for index, (left, right) in enumerate(_cycled_easy_pairs(n, rng)):
        expression, answer = _problem("easy", left, right)
        rows.append(_row(f"knowledge-{seed}-{index}", "easy", _question(expression), answer,
                         [{"role": "assistant", "content": answer_text(answer)}]))
    return rows


def cold_start_trajectories(
    n: int, seed: int, direct_answer_share: float = 0.1, hard_share: float = 0.5, answer_noise: float = 0.0
) -> list[dict]:
    """`n` full cold-start conversations: mostly blind tool use, like a freshly tool-tuned agent.

    Every hard question calls the calculator; of the easy ones, `direct_answer_share` (rounded to a
    whole count) answer directly and the rest call the calculator too. Shares are exact counts,
    not coin flips, and the rows come shuffled.

    `answer_noise` makes the demonstrations imperfect the way distilled cold-start data is: each
    digit of a hard question's final answer (after the calculator's correct result) is redrawn at
    random with this probability (`noisy_answer`). The cold-started model then copies the result
    right on average, so greedy answers stay right, but its *sampled* hard answers are often
    wrong -- errors RL's accuracy channel can train away, which is what lets the share of groups
    with >= 2 correct rollouts rise during RL (the implicit curriculum). The row's `answer` stays
    the exact one.
    """
    _check_share("direct_answer_share", direct_answer_share)
    _check_share("answer_noise", answer_noise)
    n_hard = _count(n, hard_share, "hard_share")
    n_easy = n - n_hard
    n_direct = round(n_easy * direct_answer_share)
    rng = random.Random(f"cold-start-{seed}")
    noise_rng = random.Random(f"answer-noise-{seed}")  # its own stream: the questions do not depend on the noise
    plans = ([("hard", False)] * n_hard + [("easy", True)] * n_direct
             + [("easy", False)] * (n_easy - n_direct))
    rng.shuffle(plans)
    easy_pairs = iter(_cycled_easy_pairs(n_easy, rng))
    rows = []
    for index, (subset, direct) in enumerate(plans):
        left, right = next(easy_pairs) if subset == "easy" else _training_hard_pair(rng)
        expression, answer = _problem(subset, left, right)
        if direct:
            turns = [{"role": "assistant", "content": answer_text(answer)}]
        else:
            turns = [
                {"role": "assistant", "content": calculator_call(expression)},
                {"role": "tool", "name": "calculator", "content": answer},
                {"role": "assistant", "content": answer_text(
                    noisy_answer(answer, answer_noise, noise_rng) if subset == "hard" else answer)},
            ]
        rows.append(_row(f"cold-start-{seed}-{index}", subset, _question(expression), answer,
                         turns))
    return rows


def noisy_answer(answer: str, noise: float, rng: random.Random) -> str:
    """`answer` with each digit redrawn uniformly (a leading digit from 1-9) with probability `noise`."""
    if noise <= 0:
        return answer
    return "".join(
        str(rng.randint(1 if index == 0 else 0, 9)) if rng.random() < noise else digit
        for index, digit in enumerate(answer)
    )


def with_easy_answer_noise(rows: list[dict], noise: float, seed: int) -> list[dict]:
    """`rows` with the final `<answer>` of every easy row passed through `noisy_answer`: the
    "mixed" task (`data.synthetic.task: mixed`, recipes/tiny-mixed.yaml).

    The model then half-knows the easy sums and copies the calculator's easy results imperfectly
    too, so its *sampled* easy answers are right only part of the time with and without the tool:
    most easy groups are mixed (0 < correct < G), where a coupled reward's tool penalty competes
    with the accuracy spread, while HDPO compares tool use among the correct rollouts only.
    Greedy answers stay right (each digit's most likely value is the right one while noise < 0.9).
    The row's `answer` stays exact; with `noise` 0 the rows come back unchanged.
    """
    _check_share("noise", noise)
    if noise <= 0:
        return rows
    rng = random.Random(f"easy-answer-noise-{seed}")  # its own stream: the questions do not depend on it
    noisy = []
    for row in rows:
        if row["subset"] == "easy" and row["messages"][-1]["role"] == "assistant":
            last = {**row["messages"][-1], "content": answer_text(noisy_answer(row["answer"], noise, rng))}
            row = {**row, "messages": [*row["messages"][:-1], last]}
        noisy.append(row)
    return noisy


def rl_prompts(n: int, seed: int, hard_share: float = 0.5) -> list[dict]:
    """`n` RL prompts (system + user), `hard_share` of them hard, hard ones never eval-held-out."""
    n_hard = _count(n, hard_share, "hard_share")
    rng = random.Random(f"rl-{seed}")
    subsets: list[Subset] = ["hard"] * n_hard + ["easy"] * (n - n_hard)
    rng.shuffle(subsets)
    easy_pairs = iter(_cycled_easy_pairs(n - n_hard, rng))
    rows = []
    for index, subset in enumerate(subsets):
        left, right = next(easy_pairs) if subset == "easy" else _training_hard_pair(rng)
        expression, answer = _problem(subset, left, right)
        rows.append(_row(f"rl-{seed}-{index}", subset, _question(expression), answer, []))
    return rows


def eval_prompts(n_per_subset: int, seed: int) -> list[dict]:
    """`n_per_subset` easy then `n_per_subset` hard eval prompts.

    Easy prompts are distinct sums while `n_per_subset` <= 100; hard prompts are distinct products
    drawn only from the held-out split, so no training set contains them.
    """
    if not 0 <= n_per_subset <= held_out_hard_count():
        raise ValueError(
            f"n_per_subset must be within [0, {held_out_hard_count()}] (the held-out hard "
            f"products), got {n_per_subset}"
        )
    rng = random.Random(f"eval-{seed}")
    rows = []
    for index, (left, right) in enumerate(_cycled_easy_pairs(n_per_subset, rng)):
        expression, answer = _problem("easy", left, right)
        rows.append(_row(f"eval-easy-{seed}-{index}", "easy", _question(expression), answer, []))
    seen: set[tuple[int, int]] = set()
    while len(seen) < n_per_subset:
        pair = (rng.randint(100, 999), rng.randint(10, 99))
        if pair in seen or not is_held_out_hard(*pair) or not is_hard_pair(*pair):
            continue
        seen.add(pair)
        expression, answer = _problem("hard", *pair)
        rows.append(_row(f"eval-hard-{seed}-{len(seen) - 1}", "hard", _question(expression),
                         answer, []))
    return rows


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    """Write one JSON object per line, atomically (temp file then rename). Returns `path`."""
    path = Path(path)
    temp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with temp_path.open("w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(temp_path, path)
        finally:
            with suppress(OSError):
                temp_path.unlink(missing_ok=True)
    return path


def _problem(subset: Subset, left: int, right: int) -> tuple[str, str]:
    """(expression, exact answer), e.g. ("3 + 5", "8")."""
    if subset == "easy":
        return f"{left} + {right}", str(left + right)
    return f"{left} * {right}", str(left * right)


def _question(expression: str) -> str:
    return f"What is {expression}?"


def _row(row_id: str, subset: Subset, question: str, answer: str, turns: list[dict]) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question}, *turns]
    return {"id": row_id, "messages": messages, "answer": answer, "subset": subset}


def _cycled_easy_pairs(n: int, rng: random.Random) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        batch = list(_EASY_PAIRS)
        rng.shuffle(batch)
        pairs.extend(batch)
    return pairs[:n]


def _training_hard_pair(rng: random.Random) -> tuple[int, int]:
    while True:
        pair = (rng.randint(100, 999), rng.randint(10, 99))
        if is_hard_pair(*pair) and not is_held_out_hard(*pair):
            return pair


def _check_share(name: str, share: float) -> None:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {share}")


def _count(n: int, share: float, name: str) -> int:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_share(name, share)
    return round(n * share)
