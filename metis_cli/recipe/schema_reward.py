"""The recipe's `reward` section: answer checking, the format rule, reward weights and the LLM
judge's endpoint and contract. Part of the recipe schema (recipe/schema.py re-exports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metis_cli.recipe.section import Section


class JudgeConfig(Section):
    base_url: str = Field(..., description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    model: str = Field(..., description="Judge model name at that endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    max_retries: int = Field(3, ge=0, description="Retries with exponential backoff before 'unscored'.")
    backoff_s: float = Field(1.0, ge=0, description="First backoff delay.")
    timeout_s: float = Field(30.0, gt=0, description="Per-request timeout.")


_JUDGE_PLACEHOLDERS = ("question", "ground_truth", "prediction")


class RewardJudgeConfig(JudgeConfig):
    """The answer judge: the endpoint settings of JudgeConfig plus its contract (what it is asked
    and must reply). Fields left null take the named contract's value."""

    contract: Literal["metis", "official"] = Field(
        "metis", description="metis: last user turn as the question, yes/no reply, 3 retries; official (the "
        "official Metis code): whole prompt as the question, reply CORRECT/INCORRECT, temperature 0, 30 s "
        "timeout, 2 attempts."
    )
    prompt: str | None = Field(
        None, description="The judge's user message with placeholders {question}, {ground_truth}, {prediction} "
        "(write {{ and }} for literal braces); null = the contract's."
    )
    system_prompt: str | None = Field(None, description="System message before the prompt; '' sends none; null = the contract's.")
    reply_correct: str | None = Field(None, description="The reply meaning correct (read from the reply's start, any case); null = the contract's.")
    reply_incorrect: str | None = Field(None, description="The reply meaning incorrect; null = the contract's.")
    question: Literal["last_user", "whole_prompt"] | None = Field(
        None, description="What {question} is: the last user turn, or every prompt message (system prompt "
        "included); null = the contract's."
    )
    temperature: float | None = Field(None, ge=0, description="Judge sampling temperature; null = the contract's (0).")
    max_retries: int | None = Field(
        None, ge=0, description="Retries with exponential backoff before 'unscored'; null = the contract's (metis 3, official 1)."
    )
    timeout_s: float | None = Field(None, gt=0, description="Per-request timeout; null = the contract's (30 s).")
    on_failure: Literal["unscored", "incorrect"] = Field(
        "unscored", description="A rollout the judge cannot score (calls keep failing, or the reply is neither "
        "verdict): unscored = excluded from its group and counted; incorrect = scored as a wrong answer, which is "
        "what the official code does and we think is wrong (network luck becomes negative reward)."
    )
    max_unscored_share: float = Field(
        0.5, ge=0, le=1, description="hdpo stops (after a checkpoint; --resume continues) when the judge gives no "
        "verdict for more than this share of a step's answers for `patience` steps in a row, and at once when it "
        "gives none at all (docs/faults.md)."
    )
    patience: int = Field(3, gt=0, description="Steps in a row over max_unscored_share before hdpo stops.")

    @model_validator(mode="after")
    def _prompt_placeholders(self) -> RewardJudgeConfig:
        if self.prompt is not None:
            try:
                self.prompt.format(**{name: "" for name in _JUDGE_PLACEHOLDERS})
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(
                    f"prompt: bad placeholder ({type(error).__name__}: {error}); use only "
                    "{question}, {ground_truth}, {prediction} and write {{ and }} for literal braces"
                ) from None
            missing = [name for name in ("ground_truth", "prediction") if "{" + name + "}" not in self.prompt]
            if missing:
                raise ValueError(f"prompt: needs the placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
        replies = [reply for reply in (self.reply_correct, self.reply_incorrect) if reply is not None]
        if any(not reply.strip() for reply in replies):
            raise ValueError("reply_correct / reply_incorrect must not be blank")
        if len(replies) == 2 and replies[0].casefold() == replies[1].casefold():
            raise ValueError("reply_correct and reply_incorrect must differ")
        return self


class RewardConfig(Section):
    checker: Literal["exact", "numeric", "math_verify", "judge"] = Field(
        "math_verify", description="How an extracted <answer> is compared with the gold answer (a list gold "
        "answer: the best match counts)."
    )
    acc_weight: float = Field(0.9, ge=0, description="r_acc = acc_weight*correct + format_weight*format_ok.")
    format_weight: float = Field(0.1, ge=0, description="Weight of the format reward inside r_acc.")
    format: Literal["metis", "reason", "think", "none"] = Field(
        "metis", description="format_ok rule. metis: tags closed per turn, exactly one non-blank answer, in the "
        "final turn, last; reason (official Metis code): over the whole response <reason>/</reason> and "
        "<tool_call>/</tool_call> counts equal, and after the last </reason> <answer>/</answer> counts equal "
        "and >= 1; think: reason with <think>; none: every rollout counts as well formed."
    )
    answer_position: Literal["last", "first"] = Field(
        "last", description="Which <answer> is checked: last = the last one of the final turn; first = the first "
        "one of the whole response (official Metis code)."
    )
    judge: RewardJudgeConfig | None = Field(None, description="LLM judge (required when checker is 'judge').")
