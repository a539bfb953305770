"""What the rollout engine (agent/rollout.py) produces and tells: `Rollout` (one trajectory),
`RolloutBatch` (rollouts collated into the trainer's tensors, shapes in its docstring) and
`RolloutListener` (the hooks a caller sees while rollouts are sampled).

Must not touch: sampling, tools, rewards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from metis_cli.agent.parser import ParsedToolCall
    from metis_cli.agent.tools.base import ToolResult

RolloutFinish = Literal["answer", "eos", "max_turns", "length"]


@dataclass
class Rollout:
    """One sampled multi-turn trajectory.

    token_ids: prompt + every assistant turn + every forced tool turn, length S.
    loss_mask: [S] ints, 1 exactly on tokens the backend sampled; 0 on prompt and forced tokens.
    sampler_logprobs: [S] floats, log p(token_ids[t] | token_ids[:t]) as the backend reported it
        (agent/backend.py defines it) where loss_mask is 1, 0.0 elsewhere.
    messages: prompt messages + assistant turns as text (tool calls stay in the content as
        `<tool_call>...</tool_call>`) + `tool` turns.
    tool_calls: T, the calls the model made that went to the tool registry, malformed ones and
        ones refused by max_calls_per_rollout included (each one cost the model a turn, so
        r_tool = 1 / (T + 1) charges for it). A call in the turn that hit max_turns is not run
        and not counted.
    tool_errors: kind -> count, from the registry's ToolResult.error of each counted call.
    tool_trace: (tool name, error kind) of each counted call in order; name None for a malformed
        call, error None for a call that succeeded (per-tool figures: rewards/tool_economy.py).
    generation_s: wall time of the batched backend calls this rollout took part in.
    tool_s: sum of the registry's runtime_s over this rollout's calls.
    images: the images its token_ids show, in order (vision-language policies; agent/rollout.py).
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    prompt_len: int
    loss_mask: list[int]
    sampler_logprobs: list[float]
    messages: list[dict]
    tool_calls: int = 0
    tool_errors: dict[str, int] = field(default_factory=dict)
    tool_trace: list[tuple[str | None, str | None]] = field(default_factory=list)
    finish_reason: RolloutFinish | None = None
    num_turns: int = 0
    generated_tokens: int = 0
    generation_s: float = 0.0
    tool_s: float = 0.0
    images: list = field(default_factory=list)  # PIL images in order of their (expanded) pads: prompt's, then tools'
    _turn_start: str = field(default="", repr=False)  # rendered text up to the open assistant turn

    @property
    def assistant_texts(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    def _append(self, token_ids: list[int], logprobs: list[float] | None) -> None:
        """Sampled tokens when logprobs are given (loss 1), forced tokens otherwise (loss 0)."""
        self.token_ids += token_ids
        if logprobs is None:
            self.loss_mask += [0] * len(token_ids)
            self.sampler_logprobs += [0.0] * len(token_ids)
        else:
            self.loss_mask += [1] * len(token_ids)
            self.sampler_logprobs += logprobs
            self.generated_tokens += len(token_ids)


@dataclass
class RolloutBatch:
    """N rollouts collated for the trainer; L = the longest rollout's len(token_ids).

    input_ids: [N, L] long, right-padded with pad_id.
    attention_mask: [N, L] long, 1 on real tokens, 0 on padding.
    loss_mask: [N, L] float, 1.0 on sampled tokens; 0.0 on prompt, tool turns and padding.
    sampler_logprobs: [N, L] float, the sampler's log-prob of input_ids[:, t]; 0.0 where loss_mask is 0.
    group_ids: [N] long, the prompt index (rollouts of one prompt form one advantage group).
    Column t describes token t itself (not shifted): the trainer's logits[:, t - 1] predict it,
    so loss_mask[:, 1:] and sampler_logprobs[:, 1:] line up with logits[:, :-1].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    group_ids: torch.Tensor

    @classmethod
    def from_rollouts(cls, rollouts: list[Rollout], pad_id: int) -> RolloutBatch:
        if not rollouts:
            raise ValueError("RolloutBatch.from_rollouts needs at least one rollout")
        width = max(len(r.token_ids) for r in rollouts)
        shape = (len(rollouts), width)
        input_ids = torch.full(shape, pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        loss_mask = torch.zeros(shape, dtype=torch.float32)
        sampler_logprobs = torch.zeros(shape, dtype=torch.float32)
        for row, rollout in enumerate(rollouts):
            length = len(rollout.token_ids)
            input_ids[row, :length] = torch.tensor(rollout.token_ids, dtype=torch.long)
            attention_mask[row, :length] = 1
            loss_mask[row, :length] = torch.tensor(rollout.loss_mask, dtype=torch.float32)
            sampler_logprobs[row, :length] = torch.tensor(rollout.sampler_logprobs, dtype=torch.float32)
        group_ids = torch.tensor([r.prompt_index for r in rollouts], dtype=torch.long)
        return cls(input_ids, attention_mask, loss_mask, sampler_logprobs, group_ids)


class RolloutListener:
    """What the engine tells a caller while it samples, in both schedules and on the engine's
    thread (`metis chat` shows it as it happens). Every hook does nothing here; override some."""

    def on_turn_start(self, rollout: Rollout) -> None:
        """A turn of `rollout` (its `num_turns + 1`-th) is about to be generated."""

    def on_tool_start(self, rollout: Rollout, call: ParsedToolCall) -> None:
        """`call`, parsed from the turn that just ended (malformed ones too), is about to run."""

    def on_tool_result(self, rollout: Rollout, call: ParsedToolCall, result: ToolResult) -> None:
        """`call` came back with `result`, which becomes a `tool` turn of `rollout`."""
