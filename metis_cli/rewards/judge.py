"""LLM-as-judge answer scoring over any OpenAI-compatible chat endpoint (OpenAI, vLLM serve, ...).

What the judge is asked, and what it must reply, is a `JudgeContract` (the recipe's
`reward.judge`, docs/algorithm.md): a named preset (`CONTRACTS`) with every part overridable.
  - metis (default): the question is the last user turn; a system prompt asks for one word,
    yes or no; 3 retries.
  - official (the official Metis code): the question is the whole prompt (every prompt message,
    system prompt included); the judge must reply CORRECT or INCORRECT; temperature 0, 30 s
    timeout, 2 attempts. The prompt text is ours, written to that contract.
A reply is read by its first word(s) (`parse_verdict`), case-insensitive, markdown and
punctuation around it ignored.

Unlike the reference trainer, which counts a failed judge call as "incorrect", a call that keeps
failing or a reply that is neither verdict is returned as None ("unscored"): the rollout is then
excluded from its group and counted in the `unscored` metric (`reward.judge.on_failure:
incorrect` restores the reference behaviour in rewards/batch.py). Failed calls (connection,
timeout, 429, 5xx, ...) are retried with exponential backoff. A rejected key or an unknown
model/endpoint is a configuration mistake and raises MetisError at once instead of silently
unscoring every rollout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass

from metis_cli.errors import MetisError

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You grade answers to questions. Reply with exactly one word: yes if the predicted answer "
    "is correct (means the same as the gold answer), no otherwise."
)
METIS_PROMPT = (
    "Question:\n{question}\n\nGold answer:\n{ground_truth}\n\n"
    "Predicted answer:\n{prediction}\n\nIs the predicted answer correct? (yes/no)"
)
OFFICIAL_PROMPT = (
    "You are grading a model's answer to a question against the ground truth answer.\n\n"
    "Question:\n{question}\n\nGround truth:\n{ground_truth}\n\nPrediction:\n{prediction}\n\n"
    "Does the prediction mean the same as the ground truth? Reply with exactly one word: "
    "CORRECT or INCORRECT."
)
QUESTION_SOURCES = ("last_user", "whole_prompt")


@dataclass(frozen=True)
class JudgeContract:
    """What the judge is asked and must answer.

    prompt: the user message, with placeholders {question}, {ground_truth}, {prediction}.
    system_prompt: a system message before it; "" sends none.
    question: "last_user" (the last user turn's text) or "whole_prompt" (every prompt message).
    max_retries: retries after the first attempt (2 attempts = 1 retry).
    """

    prompt: str
    system_prompt: str
    reply_correct: str
    reply_incorrect: str
    question: str
    temperature: float
    timeout_s: float
    max_retries: int


CONTRACTS: dict[str, JudgeContract] = {
    "metis": JudgeContract(METIS_PROMPT, SYSTEM_PROMPT, "yes", "no", "last_user", 0.0, 30.0, 3),
    "official": JudgeContract(OFFICIAL_PROMPT, "", "CORRECT", "INCORRECT", "whole_prompt", 0.0, 30.0, 1),
}


def contract_from_config(judge_cfg) -> JudgeContract:
    """The recipe's `reward.judge`: its named `contract`, with every field it sets overriding."""
    preset = CONTRACTS[getattr(judge_cfg, "contract", "metis")]
    overrides = {
        name: getattr(judge_cfg, name) for name in (field.name for field in dataclasses.fields(JudgeContract))
        if getattr(judge_cfg, name, None) is not None
    }
    return dataclasses.replace(preset, **overrides)


def prompt_question(messages: list[dict], source: str) -> str:
    """The question shown to the judge: the last user turn, or the whole prompt as
    `[role]\\ncontent` blocks."""
    if source == "last_user":
        return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


def parse_verdict(reply: str | None, correct: str = "yes", incorrect: str = "no") -> bool | None:
    """True / False when the reply starts with `correct` / `incorrect` ("Yes.", "**no**",
    "CORRECT"), case-insensitive; else None ("yesterday", "It depends")."""
    words = sorted((correct, incorrect), key=len, reverse=True)  # "incorrect" before "correct"
    pattern = r"^\W*(" + "|".join(re.escape(word) for word in words) + r")(?!\w)"
    match = re.match(pattern, reply or "", re.IGNORECASE)
    if not match:
        return None
    return match.group(1).casefold() == correct.casefold()


class OpenAIJudge:
    """Scores (question, prediction, gold) triples with a chat model behind `base_url`.

    Thread-safe: `rewards/batch.py` calls score() from a thread pool.

    The API key is read from the environment variable `api_key_env`; when it is unset the
    placeholder "EMPTY" is sent, which local OpenAI-compatible servers (vLLM) accept.
    `max_retries` counts retries after the first attempt; the n-th retry waits
    backoff_s * 2**(n-1) seconds. `contract` (default: metis's) sets the prompt and replies;
    `max_retries` and `timeout_s`, when given, override the contract's.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_retries: int | None = None,
        backoff_s: float = 1.0,
        timeout_s: float | None = None,
        contract: JudgeContract | None = None,
    ):
        import openai

        contract = contract or CONTRACTS["metis"]
        if max_retries is not None:
            contract = dataclasses.replace(contract, max_retries=max_retries)
        if timeout_s is not None:
            contract = dataclasses.replace(contract, timeout_s=timeout_s)
        self.contract = contract
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.max_retries = contract.max_retries
        self.backoff_s = backoff_s
        # Retries are ours (so that exhausting them means "unscored"), not the client's.
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            timeout=contract.timeout_s,
            max_retries=0,
        )

    @classmethod
    def from_config(cls, judge_cfg) -> OpenAIJudge:
        """The judge of a recipe's `reward.judge` section."""
        return cls(judge_cfg.base_url, judge_cfg.model, api_key_env=judge_cfg.api_key_env,
                   backoff_s=judge_cfg.backoff_s, contract=contract_from_config(judge_cfg))

    def _messages(self, question: str, prediction: str, gold: str) -> list[dict]:
        user = self.contract.prompt.format(question=question, ground_truth=gold, prediction=prediction)
        system = [{"role": "system", "content": self.contract.system_prompt}] if self.contract.system_prompt else []
        return [*system, {"role": "user", "content": user}]

    def _verdict(self, reply: str | None) -> bool | None:
        return parse_verdict(reply, self.contract.reply_correct, self.contract.reply_incorrect)

    def _raise_if_misconfigured(self, error: Exception) -> None:
        import openai

        if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
            raise MetisError(
                f"judge at {self.base_url} rejected the API key ({error.status_code}); "
                f"set the environment variable {self.api_key_env} to a valid key"
            ) from error
        if isinstance(error, openai.NotFoundError):
            raise MetisError(
                f"judge at {self.base_url} has no chat-completions model {self.model!r} (404); "
                "check the judge's base_url (usually ending in /v1) and model name"
            ) from error

    def score_example(self, example, prediction: str | None, gold: str) -> bool | None:
        """score() with the question the contract takes from the example's prompt messages."""
        return self.score(prompt_question(example.messages, self.contract.question), prediction, gold)

    def score(self, question: str, prediction: str | None, gold: str) -> bool | None:
        """True / False for the judge's verdict; None when it could not be scored.

        A missing prediction (no <answer> tag) is wrong without asking the judge.
        """
        if prediction is None:
            return False
        messages = self._messages(question, prediction, gold)
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.contract.temperature
                )
            except Exception as error:  # noqa: BLE001 - every transport/API error is retried
                self._raise_if_misconfigured(error)
                log.warning("judge call failed (attempt %d): %s", attempt + 1, error)
                continue
            reply = response.choices[0].message.content if response.choices else None
            verdict = self._verdict(reply)
            if verdict is None:
                # A model that rambles will likely ramble again at temperature 0: do not retry.
                log.warning("judge reply is neither %s nor %s: %r", self.contract.reply_correct,
                            self.contract.reply_incorrect, (reply or "")[:200])
            return verdict
        return None
