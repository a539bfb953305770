"""HF transformers generation backend: batched, left-padded, KV-cached sampling on the trainer's model.

A hand-written decode loop rather than `model.generate`: it is simpler to make per-row stop ids,
log-probs of the sampled token and dropping finished rows from the KV cache exact here than to
thread them through generate's processors, and it has less per-step overhead on CPU
(benchmarks/rollout_hf.py measures both: about 1.3-1.5x generate's tokens/s on the tiny model).

Sampling: logits / temperature, then top-p (nucleus) truncation, then a multinomial draw. The
reported log-prob is `log_softmax(logits / temperature)[token]`, before top-p, the quantity the
trainer recomputes (agent/backend.py). Greedy (or temperature <= 0) takes the argmax and reports
`log_softmax(logits)[token]`.

Vision-language policies: `generate(..., images=)` takes each prompt's images (in order of its
expanded image pads, model/vision.py); the prefill gets their pixel values and the model's
multimodal position ids, and decode steps continue each row from its last position + 1. The
vision tokens (`Vision.special_token_ids`: image pads, vision start/end) are never sampled: a pad
the model wrote would stand for no image. Their probability is removed before the draw only;
the reported log-prob stays the full distribution's (what the trainer recomputes).

An optional `TokenStream` sees every decode step's tokens as they are sampled and can end the
call early (`metis chat` streams the answer's text and stops on Ctrl-C through it).

Must not touch: chat templates and tools (agent/rollout.py owns multi-turn logic).
"""

from __future__ import annotations

from contextlib import nullcontext

from typing import Protocol

import torch
from transformers import DynamicCache

from metis_cli.agent.backend import Generation, SamplingParams


class TokenStream(Protocol):
    """Hooks into the decode loop (`metis chat` streams text and stops on Ctrl-C with them)."""

    def on_tokens(self, prompt_indices: list[int], token_ids: list[int]) -> None:
        """One decode step: token_ids[i] was just sampled for prompt prompt_indices[i] of the call."""
        ...

    @property
    def interrupted(self) -> bool:
        """True ends every continuation at the next token, as "length" (not a finished turn)."""
        ...


class HFBackend:
    """Samples from `model` in place; shares the object with the trainer, so weight sync is free."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, stream: TokenStream | None = None,
                 vision=None):
        self.model = model
        self.vision = vision  # model/vision.py Vision for a vision-language policy, else None
        self.banned = sorted(vision.special_token_ids) if vision is not None else []
        self.batch_size = batch_size
        self.stream = stream
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def update_weights(self, model) -> None:
        # The trainer updates this very object; only a different object needs re-pointing.
        self.model = model

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""

    def asleep(self):
        """Nothing to give back: the model it samples from is the trainer's (or its copy)."""
        return nullcontext()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[list] | None = None) -> list[Generation]:
        if images is not None and any(images) and self.vision is None:
            raise ValueError("HFBackend got images but was built without `vision` (a text-only policy)")
        if params.max_new_tokens <= 0 or self._interrupted():
            return [Generation([], [], "length") for _ in prompts]
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        # Longest first, so each batch holds prompts of similar length (less padding).
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        results: list[Generation | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    generations = self._generate_batch([prompts[i] for i in batch], params, generator, batch,
                                                       None if images is None else [images[i] for i in batch])
                    for index, generation in zip(batch, generations):
                        results[index] = generation
        finally:
            self.model.train(was_training)
        if self._interrupted():  # a turn cut short is not a finished one, whatever it ended with
            return [Generation(g.token_ids, g.logprobs, "length") for g in results]  # type: ignore[union-attr]
        return results  # type: ignore[return-value]

    def _interrupted(self) -> bool:
        return self.stream is not None and self.stream.interrupted

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None,
                        positions: list[int], images: list[list] | None = None) -> list[Generation]:
        """positions: each prompt's index in the generate call (what the stream is told)."""
        greedy, max_new_tokens = params.is_greedy, params.max_new_tokens
        temperature = 1.0 if greedy else params.temperature
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        vision_inputs = {}
        if images is not None and any(images):
            vision_inputs = self.vision.forward_inputs(self.model, input_ids, attention_mask, images)
            position_ids = vision_inputs.pop("position_ids")  # [3, B, L]
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)

        cache = DynamicCache(config=self.model.config)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **vision_inputs,
        ).logits[:, -1, :]
        # A row's next token comes after the highest position so far (images span fewer positions than tokens).
        next_position = (position_ids[..., -1] if position_ids.dim() == 2 else position_ids[..., -1].amax(0)) + 1
        live_rows = list(range(len(prompts)))  # prompt index of each row still in the batch
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str] = ["length"] * len(prompts)

        for step in range(max_new_tokens):
            token, logprob = _sample(logits.float(), temperature, params.top_p, greedy, generator, self.banned)
            is_stop = torch.isin(token, stop_ids)
            for row, (t, lp, stopped) in enumerate(zip(token.tolist(), logprob.tolist(), is_stop.tolist())):
                tokens[live_rows[row]].append(t)
                logprobs[live_rows[row]].append(lp)
                if stopped:
                    finish[live_rows[row]] = "stop"
            if self.stream is not None:
                self.stream.on_tokens([positions[index] for index in live_rows], token.tolist())
            if step == max_new_tokens - 1 or bool(is_stop.all()) or self._interrupted():
                break
            if bool(is_stop.any()):
                # Finished rows leave the batch and the KV cache: no compute is spent on them.
                keep = (~is_stop).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                attention_mask, next_position, token = attention_mask[keep], next_position[keep], token[keep]
                live_rows = [live_rows[i] for i in keep.tolist()]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(live_rows), 1))], dim=1)
            logits = self.model(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=next_position[:, None] if position_ids.dim() == 2 else
                next_position[None, :, None].expand(3, -1, 1),
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1, :]
            next_position = next_position + 1
        return [Generation(t, lp, f) for t, lp, f in zip(tokens, logprobs, finish)]  # type: ignore[arg-type]


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator | None,
    banned: list[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B], log-prob [B]) for logits [B, V]; log-prob is before top-p truncation and
    before `banned` token ids are taken out of the draw."""
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    drawn = logprobs
    if banned:
        drawn = logprobs.clone()
        drawn[:, banned] = float("-inf")
    if greedy:
        token = drawn.argmax(dim=-1)
    else:
        probs = drawn.exp()
        if top_p < 1.0:
            probs = _top_p_filter(probs, top_p)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return token, logprobs.gather(1, token[:, None]).squeeze(1)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose mass reaches top_p (the top token always stays)."""
    sorted_probs, sorted_index = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(1, sorted_index, sorted_probs)
