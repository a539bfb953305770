"""The generation-backend protocol: token ids in, token ids + log-probs + finish reason out.

The rollout engine (agent/rollout.py) talks to every sampler through this protocol and never sees
text: it renders prompts and tool turns to ids itself (data/chat.py), so a backend only has to
continue token sequences. HF transformers (agent/hf_backend.py) and vLLM implement it.

Log-prob definition, shared with the trainer: for a sampled token t after prefix x,
`log_softmax(logits(x) / temperature)[t]` -- the temperature-scaled distribution before top-p
truncation, which is exactly what the trainer recomputes. Greedy decoding (or temperature 0)
reports `log_softmax(logits)[t]`.

Must not touch: chat templates, tools, rewards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt, the same for every prompt of one backend call.

    max_new_tokens: the most tokens a continuation may have.
    temperature, top_p: the sampling distribution (module docstring); ignored when greedy.
    stop_token_ids: a continuation ends at the first of these (included in its tokens).
    greedy: argmax instead of sampling (temperature <= 0 means greedy too).
    seed: makes sampling reproducible; None draws from the backend's own state.
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    stop_token_ids: Sequence[int]
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature <= 0


@dataclass
class Generation:
    """One continuation of one prompt.

    token_ids: the new tokens only; ends with the stop token when finish_reason == "stop".
    logprobs: one float per token of token_ids (definition in the module docstring).
    finish_reason: "stop" (a stop token id was sampled) or "length" (max_new_tokens reached).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


@runtime_checkable
class GenerationBackend(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[list] | None = None) -> list[Generation]:
        """One Generation per prompt, in order. `images[i]` (vision-language policies only): prompt
        i's PIL images, one per run of expanded image pads in its tokens, in order.

        A prompt may appear several times (n samples of it); each copy is sampled independently
        and a backend may share the prompt's prefill between copies. Generation stops at the
        first stop token id (included in the output) or after params.max_new_tokens.
        """
        ...

    def update_weights(self, model) -> None:
        """Make later generate calls sample from `model`'s current weights."""
        ...

    def close(self) -> None:
        """Release what the backend holds (an engine, its memory); a no-op where nothing is held."""
        ...


@runtime_checkable
class ContinuousBackend(GenerationBackend, Protocol):
    """A backend that also takes continuations one at a time while it generates others
    (continuous batching); the rollout engine then starts each rollout's next turn as soon as
    its tool returns. Sampling contract as in `generate`."""

    def submit(self, keys: list[int], prompt: list[int], params: SamplingParams, images: list | None = None) -> None:
        """Start len(keys) independent continuations of `prompt` (sharing its prefill); `poll`
        returns each under its key. Continuation i is seeded with params.seed + i. `images`: the
        prompt's images (as in `generate`)."""
        ...

    def poll(self) -> list[tuple[int, Generation]]:
        """Advance generation by one step; (key, Generation) of the continuations finished in it."""
        ...

    def cancel(self) -> None:
        """Drop every continuation submitted and not yet returned."""
        ...

    @property
    def pending(self) -> int:
        """Continuations submitted and not yet returned by `poll`."""
        ...
