"""LLM-as-judge answer scoring over any OpenAI-compatible chat endpoint (OpenAI, vLLM serve, ...).

The judge answers "is this prediction correct?" with yes or no. Unlike the reference trainer,
which counts a failed judge call as "incorrect", a call that keeps failing or a reply that is
neither yes nor no is returned as None ("unscored"): the rollout is then excluded from its group
and counted in the `unscored` metric. Failed calls (connection, timeout, 429, 5xx, ...) are
retried with exponential backoff. A rejected key or an unknown model/endpoint is a configuration
mistake and raises MetisError at once instead of silently unscoring every rollout.
"""

from __future__ import annotations

import logging
import os
import re
import time

from metis_cli.errors import MetisError

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You grade answers to questions. Reply with exactly one word: yes if the predicted answer "
    "is correct (means the same as the gold answer), no otherwise."
)
_VERDICT = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def parse_verdict(reply: str | None) -> bool | None:
    """Map a reply starting with yes / no ("Yes.", "**no**") to True / False; else None."""
    match = _VERDICT.match(reply or "")
    if not match:
        return None
    return match.group(1).lower() == "yes"


class OpenAIJudge:
    """Scores (question, prediction, gold) triples with a chat model behind `base_url`.

    Thread-safe: `rewards/batch.py` calls score() from a thread pool.

    The API key is read from the environment variable `api_key_env`; when it is unset the
    placeholder "EMPTY" is sent, which local OpenAI-compatible servers (vLLM) accept.
    `max_retries` counts retries after the first attempt; the n-th retry waits
    backoff_s * 2**(n-1) seconds.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_retries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 30.0,
    ):
        import openai

        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        # Retries are ours (so that exhausting them means "unscored"), not the client's.
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=os.environ.get(api_key_env) or "EMPTY",
            timeout=timeout_s,
            max_retries=0,
        )

    def _messages(self, question: str, prediction: str, gold: str) -> list[dict]:
        user = (
            f"Question:\n{question}\n\nGold answer:\n{gold}\n\n"
            f"Predicted answer:\n{prediction}\n\nIs the predicted answer correct? (yes/no)"
        )
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

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

    def score(self, question: str, prediction: str | None, gold: str) -> bool | None:
        """True / False when the judge answered yes / no; None when it could not be scored.

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
                    model=self.model, messages=messages, temperature=0.0
                )
            except Exception as error:  # noqa: BLE001 - every transport/API error is retried
                self._raise_if_misconfigured(error)
                log.warning("judge call failed (attempt %d): %s", attempt + 1, error)
                continue
            reply = response.choices[0].message.content if response.choices else None
            verdict = parse_verdict(reply)
            if verdict is None:
                # A model that rambles will likely ramble again at temperature 0: do not retry.
                log.warning("judge reply is neither yes nor no: %r", (reply or "")[:200])
            return verdict
        return None
