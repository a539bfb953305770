"""The multi-turn rollout engine: prompts x G samples -> token ids, loss masks, sampler log-probs.

Tool use lives inside the sampler. A turn generates until `</tool_call>`, the end-of-turn token,
or a length limit. A turn that stopped at `</tool_call>` has its call parsed and run through the
tool registry; the results become `tool` turns, and the template text that closes the assistant
turn, shows the tool turns and opens the next assistant turn is queued as forced tokens with
loss mask 0 (data/chat.py `render_tool_turns`). The model never trains on tool output.

Two schedules, same rollouts:
- continuous batching (backends with `submit`/`poll`, i.e. vLLM; `rollout.vllm.continuous`;
  agent/continuous.py): each rollout moves on its own -- the moment its tool returns, its next
  turn joins the backend's running batch -- so no rollout waits for the slowest one of its turn;
- turn-synchronous waves (the HF backend, here): each turn, every unfinished rollout generates in
  one backend call, then all their tool calls run concurrently.
Both share `EngineRun`, the steps of one rollout's turn, and tell a `RolloutListener` about each
turn and tool call as it happens.

Precisely what gets loss mask 1: the tokens the backend sampled, and nothing else -- the same set
`data.chat.tokenize_conversation` marks for SFT. A rollout ends when a turn ends without a tool
call ("answer" if it holds `<answer>...</answer>`, else "eos"), when the turn that used up
max_turns calls a tool ("max_turns"; that call is not run, so at most max_turns - 1 calls run), or
at a token limit ("length": max_new_tokens_per_turn hit, or prompt + turns would exceed
max_total_tokens, or the turns -- generated and forced tokens alike, the prompt not counted --
would exceed max_response_tokens; forced tokens that do not fit are not appended, so token_ids
never end in a cut-off tool turn). With max_observation_tokens, a tool result longer than that is
cut to its last max_observation_tokens tokens, behind a mark, before it is shown.
Images (vision-language policies, an engine built with `vision`, model/vision.py): `run(...,
images=)` gives each prompt's images; a rollout's `images` are those, then every image a tool
returned, in order. Each rendered `<|image_pad|>` is expanded to its image's token count as it is
appended (prompt or forced tokens, loss mask 0); the backend gets each rollout's images with its
tokens, and tools that need the conversation (zoom_in) get them as their `ToolContext`. A tool's
images come back inside its forced `tool` turn, before its text, as in the official agent loop.

Rollout, RolloutBatch (the trainer's tensors) and RolloutListener live in agent/rollout_types.py.

Must not touch: rewards (rewards/*), advantages and losses (algo/*), sampling internals (backends).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Callable

from metis_cli.agent.backend import ContinuousBackend, Generation, GenerationBackend, SamplingParams
from metis_cli.agent.continuous import ContinuousScheduler
from metis_cli.agent.parser import parse_tool_calls
from metis_cli.agent.rollout_types import Rollout, RolloutBatch, RolloutFinish, RolloutListener
from metis_cli.data.chat import TOOL_CALL_END, encode_text, end_of_turn_id, render, render_tool_turns, stop_token_ids
from metis_cli.errors import ModelError
from metis_cli.model.runtime import ROLLOUT_TURN_SEED, derive_seed
from metis_cli.rewards.answer import extract_answer

if TYPE_CHECKING:
    from metis_cli.agent.tools.registry import ToolRegistry

__all__ = ["EngineRun", "Rollout", "RolloutBatch", "RolloutEngine", "RolloutFinish", "RolloutListener"]

OBSERVATION_CUT_MARK = "...(truncated) "
"""Put before a tool result cut to rollout.max_observation_tokens, so the model can tell."""


class RolloutEngine:
    """Samples groups of multi-turn rollouts through a GenerationBackend and a ToolRegistry."""

    def __init__(
        self,
        backend: GenerationBackend,
        tokenizer,
        tools: ToolRegistry | None,
        *,
        max_turns: int,
        max_new_tokens_per_turn: int,
        max_total_tokens: int,
        temperature: float,
        top_p: float,
        continuous: bool = True,
        max_response_tokens: int | None = None,
        max_observation_tokens: int | None = None,
        vision=None,
    ):
        self.backend = backend
        self.vision = vision
        self.continuous = continuous
        self._scheduler = ContinuousScheduler()
        self.tokenizer = tokenizer
        self.tools = tools
        self.max_turns = max_turns
        self.max_new_tokens_per_turn = max_new_tokens_per_turn
        self.max_total_tokens = max_total_tokens
        self.max_response_tokens = max_response_tokens
        self.max_observation_tokens = max_observation_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.tool_call_end_id = _single_token_id(tokenizer, TOOL_CALL_END)
        # </tool_call> stops a turn even with tools off: there a tool call just ends the turn.
        self.stop_ids = stop_token_ids(tokenizer)
        if self.tool_call_end_id not in self.stop_ids:
            self.stop_ids.append(self.tool_call_end_id)
        self.end_of_turn_ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None}

    def run(
        self,
        prompts: list[list[dict]],
        group_size: int,
        *,
        greedy: bool = False,
        use_tools: bool = True,
        seed: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        listener: RolloutListener | None = None,
        images: list[list] | None = None,
    ) -> list[Rollout]:
        """group_size rollouts per prompt, ordered by (prompt_index, sample_index).

        use_tools=False renders no tools into the prompt, and a tool call ends the rollout.
        on_progress(finished, total) is called after every turn; `listener` hears of every turn
        and tool call as it happens. `images[i]`: prompt i's PIL images, in order of appearance.
        """
        if images is not None and any(images) and self.vision is None:
            raise ModelError("these prompts have images, but the policy is a text-only model (no vision tower); "
                             "use a vision-language model (e.g. Qwen3-VL) or text-only data")
        run = EngineRun(self, greedy=greedy, use_tools=use_tools and self.tools is not None,
                        listener=listener or RolloutListener())
        rollouts = []
        for prompt_index, messages in enumerate(prompts):
            text = render(self.tokenizer, messages, run.tool_specs, add_generation_prompt=True)
            ids = encode_text(self.tokenizer, text)
            prompt_images = list(images[prompt_index]) if images is not None else []
            if self.vision is not None:
                ids = self.vision.expand(ids, prompt_images, where=f"prompt {prompt_index}")[0]
            for sample_index in range(group_size):
                rollout = Rollout(prompt_index, sample_index, list(ids), len(ids), [0] * len(ids),
                                  [0.0] * len(ids), [dict(m) for m in messages], images=list(prompt_images))
                rollout._turn_start = text
                rollouts.append(rollout)
        active = [r for r in rollouts if not run.out_of_room(r)]
        try:
            if self.continuous and isinstance(self.backend, ContinuousBackend):
                self._scheduler.run(run, rollouts, active, seed, on_progress)
            else:
                self._run_waves(run, rollouts, active, seed, on_progress)
        finally:  # finished or stopped half-way: no rollout's tool session (a python kernel) outlives the run
            if run.use_tools:
                for rollout in rollouts:
                    self.tools.end_session(id(rollout))
        return rollouts

    # ------------------------------------------------------------------ turn-synchronous waves
    def _run_waves(self, run: EngineRun, rollouts: list[Rollout], active: list[Rollout], seed: int | None,
                   on_progress: Callable[[int, int], None] | None) -> None:
        turn = 0
        while active:
            turn += 1
            awaiting_tools = self._generate_turn(run, active, None if seed is None else
                                                 derive_seed(ROLLOUT_TURN_SEED, seed, turn))
            if awaiting_tools:
                self._run_tools(run, awaiting_tools)
            active = [r for r in awaiting_tools if r.finish_reason is None]
            if on_progress is not None:
                on_progress(sum(r.finish_reason is not None for r in rollouts), len(rollouts))

    def _generate_turn(self, run: EngineRun, active: list[Rollout], seed: int | None) -> list[Rollout]:
        """One backend call for every active rollout; returns those that stopped at a tool call to run."""
        budgets = [run.turn_budget(r) for r in active]
        for rollout in active:
            run.listener.on_turn_start(rollout)
        started = time.perf_counter()
        generations = self.backend.generate([r.token_ids for r in active], run.sampling(max(budgets), seed),
                                            **run.images_kwargs(active))
        generation_s = time.perf_counter() - started
        return [rollout for rollout, generation, budget in zip(active, generations, budgets)
                if run.end_turn(rollout, generation, budget, generation_s)]

    def _run_tools(self, run: EngineRun, rollouts: list[Rollout]) -> None:
        """Run every rollout's tool call(s) in one concurrent registry call; queue results as forced tokens."""
        requests = [run.tool_requests(rollout) for rollout in rollouts]
        for rollout, per_rollout in zip(rollouts, requests):
            for call, _ in per_rollout:
                run.listener.on_tool_start(rollout, call)
        contexts = {"contexts": [run.tool_context(r) for r, per_rollout in zip(rollouts, requests)
                                 for _ in per_rollout]} if self.vision is not None else {}
        results = iter(self.tools.execute_many([request for per_rollout in requests for request in per_rollout],
                                               sessions=[id(r) for r, per_rollout in zip(rollouts, requests)
                                                         for _ in per_rollout], **contexts))
        for rollout, per_rollout in zip(rollouts, requests):
            run.show_tool_results(rollout, per_rollout, [next(results) for _ in per_rollout])


class EngineRun:
    """One `RolloutEngine.run` call: its options, and the steps of a rollout's turn that both
    schedules share (the turn's token budget and sampling params, ending a turn, showing the
    results of its tool calls)."""

    def __init__(self, engine: RolloutEngine, *, greedy: bool, use_tools: bool, listener: RolloutListener):
        self.engine, self.greedy, self.use_tools, self.listener = engine, greedy, use_tools, listener
        self.tool_specs = engine.tools.specs() if use_tools else None
        # The G samples of a group often make the very same call: each distinct history is rendered once.
        self._forced_cache: dict[str, tuple[list[int], str]] = {}

    def room(self, rollout: Rollout) -> int:
        """Tokens the rollout may still add: max_total_tokens counts the prompt, max_response_tokens
        (when set) everything after it."""
        engine = self.engine
        room = engine.max_total_tokens - len(rollout.token_ids)
        if engine.max_response_tokens is not None:
            room = min(room, engine.max_response_tokens - (len(rollout.token_ids) - rollout.prompt_len))
        return room

    def images_kwargs(self, rollouts: list[Rollout]) -> dict:
        """The backend's `images=` argument for these rollouts ({} for a text-only policy)."""
        return {"images": [r.images for r in rollouts]} if self.engine.vision is not None else {}

    def tool_context(self, rollout: Rollout):
        """What a tool that needs the conversation sees: its images so far."""
        from metis_cli.agent.tools.base import ToolContext

        return ToolContext(images=tuple(rollout.images))

    def turn_budget(self, rollout: Rollout) -> int:
        return min(self.engine.max_new_tokens_per_turn, self.room(rollout))

    def sampling(self, max_new_tokens: int, seed: int | None) -> SamplingParams:
        engine = self.engine
        return SamplingParams(max_new_tokens, engine.temperature, engine.top_p, engine.stop_ids, self.greedy, seed)

    def out_of_room(self, rollout: Rollout) -> bool:
        if self.room(rollout) > 0:
            return False
        rollout.finish_reason = "length"
        return True

    def end_turn(self, rollout: Rollout, generation: Generation, budget: int, generation_s: float) -> bool:
        """Append a finished turn's tokens and decide what comes next: True if the turn stopped at
        a tool call to run, else the rollout gets its finish_reason."""
        engine = self.engine
        # One backend call may serve several rows, so rows with less room left are cut to their own budget.
        token_ids = generation.token_ids[:budget]
        stopped = generation.finish_reason == "stop" and len(generation.token_ids) <= budget
        rollout._append(token_ids, generation.logprobs[:budget])
        rollout.num_turns += 1
        rollout.generation_s += generation_s
        content_ids = token_ids[:-1] if stopped and token_ids[-1] in engine.end_of_turn_ids else token_ids
        content = engine.tokenizer.decode(content_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        rollout.messages.append({"role": "assistant", "content": content})
        if not stopped:
            rollout.finish_reason = "length"
        elif token_ids[-1] != engine.tool_call_end_id or not self.use_tools:
            rollout.finish_reason = "answer" if extract_answer(content) is not None else "eos"
        elif rollout.num_turns >= engine.max_turns:
            rollout.finish_reason = "max_turns"
        else:
            return True
        if self.use_tools:
            engine.tools.end_session(id(rollout))  # the rollout is done: its tool session (if any) ends now
        return False

    def tool_requests(self, rollout: Rollout) -> list[tuple]:
        """(parsed call, calls the rollout made before it) for each call in its last turn."""
        return [(call, rollout.tool_calls + offset)
                for offset, call in enumerate(parse_tool_calls(rollout.messages[-1]["content"]))]

    def show_tool_results(self, rollout: Rollout, requests: list[tuple], results: list) -> None:
        """Record the calls' results as `tool` turns and queue their rendering as forced tokens."""
        tool_messages, new_images = [], []
        for (call, _), result in zip(requests, results):
            images = list(result.images) if self.engine.vision is not None else []
            text = self._observation(result.text)
            message = {"role": "tool", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
                       if images else text}
            new_images += images
            if call.name:
                message["name"] = call.name
            tool_messages.append(message)
            rollout.tool_calls += 1
            rollout.tool_trace.append((call.name, result.error))
            rollout.tool_s += result.runtime_s
            if result.error:
                rollout.tool_errors[result.error] = rollout.tool_errors.get(result.error, 0) + 1
            self.listener.on_tool_result(rollout, call, result)
        cache_key = json.dumps([rollout.messages, tool_messages], sort_keys=True)
        if cache_key not in self._forced_cache:
            self._forced_cache[cache_key] = render_tool_turns(self.engine.tokenizer, rollout.messages, tool_messages,
                                                              self.tool_specs, rollout._turn_start)
        forced, rollout._turn_start = self._forced_cache[cache_key]
        rollout.messages += tool_messages
        if self.engine.vision is not None:
            forced = self.engine.vision.expand(forced, new_images, where=f"the tool turn of rollout {rollout.prompt_index}")[0]
            rollout.images += new_images
        if len(forced) >= self.room(rollout):
            rollout.finish_reason = "length"  # no room to show the result and generate after it
            return
        rollout._append(forced, None)

    def _observation(self, text: str) -> str:
        """A tool result as the model sees it: cut to its last max_observation_tokens tokens
        (the end of an output holds its result or its error), behind OBSERVATION_CUT_MARK."""
        cap, tokenizer = self.engine.max_observation_tokens, self.engine.tokenizer
        if cap is None:
            return text
        ids = encode_text(tokenizer, text)
        if len(ids) <= cap:
            return text
        return OBSERVATION_CUT_MARK + tokenizer.decode(ids[-cap:], skip_special_tokens=False,
                                                        clean_up_tokenization_spaces=False)


def _single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ModelError(
            f"tokenizer {tokenizer.name_or_path} splits {text} into {len(ids)} tokens; the rollout engine "
            f"stops generation on it and needs it as one token (add it with tokenizer.add_tokens)"
        )
    return ids[0]
