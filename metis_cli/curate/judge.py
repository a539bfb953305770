"""Filter 4 (optional): an LLM judge keeps only trajectories whose tool use is strategic.

The judge client, its retries with backoff and its configuration errors (rejected key, unknown
model) are `rewards/judge.py`'s `OpenAIJudge`; this module only changes the question it asks:
is every tool call needed, and is no needed call missing? A judge that gives no verdict after
its retries (unreachable, failing, or not answering yes/no) stops the run with an EndpointError:
silently keeping or dropping the row would make the curated set depend on network luck. Rows
already decided are saved, so `--resume` continues once the judge is back.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from metis_cli.curate.rows import Candidate
from metis_cli.curate.validity import reply_of
from metis_cli.errors import EndpointError
from metis_cli.rewards.judge import OpenAIJudge
from metis_cli.telemetry.message_text import message_text

STRATEGIC_SYSTEM_PROMPT = (
    "You review how an AI agent used tools to answer a question. Reply with exactly one word: "
    "yes if its tool use is strategic (every tool call was needed to reach the answer, none is "
    "redundant or replaceable by knowledge the agent should have, and no needed call is "
    "missing), no otherwise."
)


class StrategicToolJudge(OpenAIJudge):
    """`score(question, transcript, gold)` -> True (strategic), False, or None (no verdict)."""

    def _messages(self, question: str, prediction: str, gold: str) -> list[dict]:
        user = (
            f"Question:\n{question}\n\nGold answer:\n{gold}\n\n"
            f"Agent transcript:\n{prediction}\n\nIs the agent's tool use strategic? (yes/no)"
        )
        return [{"role": "system", "content": STRATEGIC_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def transcript(reply: list[dict]) -> str:
    """The agent's turns as plain text: `assistant: ...` and `tool (name): ...` blocks, image parts
    as `[image]` (the judge is shown text only)."""
    blocks = []
    for message in reply:
        label = message["role"] if message["role"] != "tool" else f"tool ({message.get('name', 'unnamed')})"
        blocks.append(f"[{label}]\n{message_text(message).strip()}")
    return "\n\n".join(blocks)


class JudgeFilter:
    name = "judge"

    def __init__(self, judge_cfg):
        self.cfg = judge_cfg
        self.judge = StrategicToolJudge(
            judge_cfg.base_url, judge_cfg.model, api_key_env=judge_cfg.api_key_env,
            max_retries=judge_cfg.max_retries, backoff_s=judge_cfg.backoff_s, timeout_s=judge_cfg.timeout_s,
        )

    def _verdict(self, row: Candidate) -> bool | None:
        example = row.example
        return self.judge.score(example.question, transcript(reply_of(example)), example.answer or "(not given)")

    def apply(self, rows: list[Candidate]) -> None:
        if not rows:
            return
        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            verdicts = list(pool.map(self._verdict, rows))
        for row, verdict in zip(rows, verdicts):
            if verdict is None:
                raise EndpointError(
                    f"curate.filters.judge: the judge at {self.cfg.base_url} (model {self.cfg.model!r}) gave no "
                    f"yes/no verdict for row {row.example.id!r} after {self.cfg.max_retries} retries: it is "
                    "unreachable, failing, or not answering yes/no. Check base_url and model, then rerun "
                    "with --resume (finished rows are kept)"
                )
            if not verdict:
                row.drop(self.name, "judge: tool use not strategic", f"judge {self.cfg.model} said no")
