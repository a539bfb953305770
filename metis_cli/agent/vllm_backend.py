"""vLLM generation backend: an in-process vLLM engine that samples rollouts, re-synced to the
trainer's weights after every optimizer step.

It implements agent/backend.py's protocols. Token-id prompts go in as `TokensPrompt`s. Two ways
in: `submit`/`poll` (continuous batching: a rollout's turn joins the running batch whenever the
rollout engine has it ready, and `poll` steps the engine and hands back what finished) and
`generate` (a whole turn of many rollouts at once, built on the same two; identical prompts, the
G samples of one group, become one request with `n=G`). Prefix caching reuses the KV of shared
prefixes (system prompt, earlier turns) in whole cache blocks across requests and turns.
Generation stops only at the caller's stop ids (`ignore_eos`, the model's generation_config is not
read), exactly like the HF backend.

Vision-language policies: as in the HF backend, the vision tokens (`Vision.special_token_ids`: image
pads, vision start/end) are never sampled, here through SamplingParams `logit_bias` at vLLM's limit
of -100 (it multiplies their odds by e^-100 ~ 4e-44, and wins a greedy argmax only against a lead of
100 logits, which no trained model gives a pad). Of the three bans vLLM 0.32 offers (all three
work on vLLM-CPU), `allowed_token_ids` fills a vocabulary-sized mask row per request (~30 ms at
Qwen3-VL's 152k tokens) and `bad_words` goes through the tokenizer's text; `logit_bias` is sparse.
The ban is applied before vLLM's sampler, so in "processed_logprobs" mode the reported log-prob is
renormalised without the banned tokens: log(1 - p_banned) above the trainer's, ~0 in practice.

Log-probs. vLLM reports the sampled token's log-prob (`logprobs=0`) under its engine-wide
`logprobs_mode`, chosen here so it equals the protocol's `log_softmax(logits / temperature)[t]`:
  - "processed_logprobs" (after temperature, after top-p): exact whenever top_p == 1 (the RL
    default), and for greedy calls, where vLLM reports log_softmax(logits).
  - "raw_logprobs" (before temperature): exact when temperature == 1 and top_p < 1.
  With both temperature != 1 and top_p < 1 neither is exact: vLLM then reports the log-prob
  renormalised over the top-p set, and `logprob_mismatch` in hdpo's metrics includes that gap.
The mode is fixed at engine start from `rollout.temperature` / `rollout.top_p`
(agent/vllm_engine.py starts the engine and turns start-up failures into recipe errors).

Weight sync (docs/rl-step.md). The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`),
so `update_weights` hands the trainer's tensors straight to vLLM's `reload_weights`, which also
repacks them for the CPU kernels (a plain `load_weights` fails there), then drops the prefix
cache that was computed with the old weights. A LoRA model is synced as base + B @ A * scale,
computed per layer, so the trainer's weights are never merged in place. `load_weights` takes
(name, tensor) pairs as they come, so a trainer under FSDP streams each tensor gathered from its
shards straight in (stages/hdpo.py), and no rank holds the whole model outside the engine.

Must not touch: chat templates and tools (agent/rollout.py), the trainer's model (read only).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from metis_cli.agent.backend import Generation, SamplingParams
from metis_cli.agent.vllm_engine import (
    engine_kwargs,
    logprobs_mode_for,
    model_path_field,
    release_engine,
    several_processes,
    start_engine,
)
from metis_cli.model.runtime import VLLM_REQUEST_SEED, derive_seed

BAN_LOGIT_BIAS = -100.0
"""The most negative logit bias vLLM accepts (it clamps to [-100, 100])."""

__all__ = ["VllmBackend", "checkpoint_weights", "engine_kwargs", "logprobs_mode_for", "start_engine"]


class VllmBackend:
    """Samples from an in-process `vllm.LLM`; `update_weights` copies the trainer's weights in."""

    def __init__(self, llm, *, max_model_len: int, logprobs_mode: str, banned_token_ids=(), sleep_mode: bool = False):
        self.llm = llm
        self.sleep_mode = sleep_mode  # `asleep` frees the engine's GPU memory (rollout.vllm.sleep_mode)
        self.max_model_len = max_model_len
        self.logprobs_mode = logprobs_mode
        self.banned_token_ids = sorted(banned_token_ids)  # never sampled (module docstring)
        self._in_flight: dict[str, _Request] = {}  # vLLM request id -> what submit/poll track of it
        self._done_without_engine: list[tuple[int, Generation]] = []
        self._next_request = 0

    @classmethod
    def from_recipe(cls, recipe, *, model_path: str | None = None, tokenizer=None, vision=None) -> VllmBackend:
        """Start the engine `rollout.vllm` describes on `model_path` (default `model.name_or_path`).

        A LoRA adapter folder is served as its base model with the adapter merged in. `tokenizer`
        is accepted for build_backend's sake and unused: prompts and outputs are token ids.
        `vision` (model/vision.py, a vision-language policy's): its special tokens are banned.
        """
        from metis_cli.model.loading import adapter_base, check_model_path, load_model
        from metis_cli.model.runtime import pick_device, pick_dtype

        path = str(model_path or recipe.model.name_or_path)
        path_field = model_path_field(recipe, path)
        check_model_path(path, path_field)
        device = pick_device(recipe.run.device)
        is_adapter = (Path(path) / "adapter_config.json").exists()
        kwargs = engine_kwargs(recipe, adapter_base(path) if is_adapter else path, device, several=several_processes())
        backend = cls(start_engine(kwargs, recipe, path_field=path_field),
                      max_model_len=kwargs["max_model_len"], logprobs_mode=kwargs["logprobs_mode"],
                      banned_token_ids=vision.special_token_ids if vision is not None else (),
                      sleep_mode=bool(kwargs.get("enable_sleep_mode")))
        if is_adapter:
            backend.update_weights(load_model(path, dtype=pick_dtype(recipe.model.dtype, device), device=device))
        return backend

    # ------------------------------------------------------------------------------ sampling
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 images: list[list] | None = None) -> list[Generation]:
        """A whole batch at once: `submit` each distinct prompt (its copies become one request with
        n = copies, sharing the prefill), then `poll` until every copy is back."""
        if self._in_flight or self._done_without_engine:
            raise RuntimeError("VllmBackend.generate called while submitted continuations are still pending")
        positions: dict[tuple, list[int]] = {}
        for index, prompt in enumerate(prompts):  # copies share the tokens and the very same image objects
            row_images = images[index] if images is not None else []
            positions.setdefault((tuple(prompt), tuple(id(image) for image in row_images)), []).append(index)
        for request_index, ((prompt, _), indices) in enumerate(positions.items()):
            seed = None if params.seed is None else derive_seed(VLLM_REQUEST_SEED, params.seed, request_index)
            self.submit(indices, list(prompt), replace(params, seed=seed),
                        images=images[indices[0]] if images is not None else None)
        results: list[Generation | None] = [None] * len(prompts)
        while self.pending:
            for index, generation in self.poll():
                results[index] = generation
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ continuous batching
    def submit(self, keys: list[int], prompt: list[int], params: SamplingParams, images: list | None = None) -> None:
        """Start len(keys) independent continuations of `prompt` now, alongside whatever the engine
        is generating; `poll` hands each back under its key as soon as it is done. One request with
        n = len(keys), so the prompt's prefill is shared; continuation i is seeded with seed + i.
        A prompt with no room left under max_model_len (vLLM would refuse it) comes back empty.
        `images`: the prompt's PIL images in order of its (already expanded) image pads, passed as
        `multi_modal_data` (vLLM's Qwen-VL processors find the expanded pads and do not expand again)."""
        from vllm.inputs import TokensPrompt

        room = min(params.max_new_tokens, self.max_model_len - len(prompt))
        if room <= 0:
            self._done_without_engine += [(key, Generation([], [], "length")) for key in keys]
            return
        # Greedy copies are identical: one continuation serves every key (vLLM wants n=1 there).
        request_id = str(self._next_request)
        self._next_request += 1
        streams = 1 if params.is_greedy else len(keys)
        self._in_flight[request_id] = _Request(list(keys), [[] for _ in range(streams)], [[] for _ in range(streams)])
        self.llm.llm_engine.add_request(request_id, _tokens_prompt(TokensPrompt, prompt, images),
                                        _vllm_sampling_params(params, n=streams, max_tokens=room,
                                                              banned=self.banned_token_ids))

    def poll(self) -> list[tuple[int, Generation]]:
        """One engine step over every submitted continuation; returns (key, Generation) of those
        that finished in it (possibly none)."""
        finished, self._done_without_engine = self._done_without_engine, []
        if not self._in_flight:
            return finished
        for output in self.llm.llm_engine.step():
            request = self._in_flight[output.request_id]
            if len(request.tokens) == 1:  # one stream, reported once, complete
                if output.finished:
                    generation = _to_generation(output.outputs[0])
                    finished += [(key, Generation(list(generation.token_ids), list(generation.logprobs),
                                                  generation.finish_reason)) for key in request.keys]
            else:
                for completion in output.outputs:  # new tokens of the streams that moved this step
                    part = _to_generation(completion)
                    request.tokens[completion.index] += part.token_ids
                    request.logprobs[completion.index] += part.logprobs
                    if completion.finish_reason is not None:
                        finished.append((request.keys[completion.index], Generation(
                            request.tokens[completion.index], request.logprobs[completion.index],
                            "stop" if completion.finish_reason == "stop" else "length")))
            if output.finished:
                del self._in_flight[output.request_id]
        return finished

    def cancel(self) -> None:
        """Drop every continuation submitted and not yet returned."""
        if self._in_flight:
            self.llm.llm_engine.abort_request(list(self._in_flight))
        self._in_flight, self._done_without_engine = {}, []

    @property
    def pending(self) -> int:
        """Requests submitted and not finished, plus results waiting for `poll`."""
        return len(self._in_flight) + len(self._done_without_engine)

    # ------------------------------------------------------------------------------ weights
    def update_weights(self, model) -> None:
        """Copy `model`'s current weights (LoRA merged) into the engine and drop stale KV cache."""
        self.load_weights(checkpoint_weights(model).items())

    @contextmanager
    def asleep(self):
        """With `sleep_mode`: the engine sleeps inside the block (level 1: its weights in CPU
        memory, its KV cache dropped), so a colocated trainer's update has the GPU memory; it
        wakes on leaving. Without: nothing happens. The caller syncs the weights after."""
        if not self.sleep_mode:
            yield
            return
        self.llm.sleep(level=1)
        try:
            yield
        finally:
            import torch

            if torch.cuda.is_available():  # the update's cached blocks back to the driver, for the engine
                torch.cuda.empty_cache()
            self.llm.wake_up()

    def load_weights(self, named_tensors) -> None:
        """Load (checkpoint name, tensor) pairs, consumed one at a time, into the engine and drop
        the stale KV cache."""
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(named_tensors), "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine and release its memory, so another engine can start in this process."""
        if self.llm is not None:
            llm, self.llm = self.llm, None
            release_engine(llm)


@dataclass
class _Request:
    """One submitted request: the caller's key per stream, and each stream's tokens so far (DELTA)."""

    keys: list[int]
    tokens: list[list[int]]
    logprobs: list[list[float]]


def _vllm_sampling_params(params: SamplingParams, *, n: int, max_tokens: int, banned: list[int] = ()):
    """vLLM's SamplingParams for the protocol's contract: stop only at the caller's ids, report
    the sampled token's log-prob, no text, never sample `banned` ids (module docstring)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    greedy = params.is_greedy
    return VllmSamplingParams(
        n=n,
        temperature=0.0 if greedy else params.temperature,
        top_p=1.0 if greedy else params.top_p,
        max_tokens=max_tokens,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=True,
        logprobs=0,
        detokenize=False,
        seed=None if params.seed is None else params.seed % (1 << 62),
        logit_bias={token: BAN_LOGIT_BIAS for token in banned} or None,
        # One stream: only its final output (no partial output built every step). Several: only
        # new tokens each step, so a finished stream is seen while its siblings run on.
        output_kind=RequestOutputKind.FINAL_ONLY if n == 1 else RequestOutputKind.DELTA,
    )


def _to_generation(completion) -> Generation:
    token_ids = list(completion.token_ids)
    logprobs = [position[token].logprob for token, position in zip(token_ids, completion.logprobs)]
    return Generation(token_ids, logprobs, "stop" if completion.finish_reason == "stop" else "length")


def checkpoint_weights(model) -> dict:
    """{checkpoint name: tensor} of `model` as vLLM loads it: a peft LoRA model's adapters are
    merged per layer (base + delta), names as in the base model's own `save_pretrained`
    (agent/lora_stream.py, over the unsharded model's state dict)."""
    from metis_cli.agent.lora_stream import merged_lora_stream

    return dict(merged_lora_stream(model, ((name, tensor.detach()) for name, tensor in model.state_dict().items())))


def _tokens_prompt(tokens_prompt, prompt: list[int], images: list | None):
    """vLLM's token prompt, with the images as multi_modal_data when there are any."""
    if images:
        return tokens_prompt(prompt_token_ids=list(prompt), multi_modal_data={"image": list(images)})
    return tokens_prompt(prompt_token_ids=list(prompt))
