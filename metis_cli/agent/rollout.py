"""The multi-turn rollout engine: prompts x G samples -> token ids, loss masks, sampler log-probs.

Tool use lives inside the sampler. A turn generates until `</tool_call>`, the end-of-turn token,
or a length limit. A turn that stopped at `</tool_call>` has its call parsed and run through the
tool registry; the results become `tool` turns, and the template text that closes the assistant
turn, shows the tool turns and opens the next assistant turn is queued as forced tokens with
loss mask 0 (data/chat.py `render_tool_turns`). The model never trains on tool output.

Two schedules, same rollouts:
- continuous batching (backends with `submit`/`poll`, i.e. vLLM; `rollout.vllm.continuous`):
  each rollout moves on its own -- the moment its tool returns, its next turn joins the
  backend's running batch -- so no rollout waits for the slowest one of its turn;
- turn-synchronous waves (the HF backend): each turn, every unfinished rollout generates in one
  backend call, then all their tool calls run concurrently.

Precisely what gets loss mask 1: the tokens the backend sampled, and nothing else -- the same set
`data.chat.tokenize_conversation` marks for SFT. A rollout ends when a turn ends without a tool
call ("answer" if it holds `<answer>...</answer>`, else "eos"), when the turn that used up
max_turns calls a tool ("max_turns"; that call is not run), or at a token limit ("length":
max_new_tokens_per_turn hit, or prompt + turns would exceed max_total_tokens; forced tokens that
do not fit are not appended, so token_ids never end in a cut-off tool turn).

Must not touch: rewards (rewards/*), advantages and losses (algo/*), sampling internals (backends).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

import torch

from metis_cli.agent.backend import ContinuousBackend, Generation, GenerationBackend
from metis_cli.agent.parser import parse_tool_calls
from metis_cli.data.chat import TOOL_CALL_END, encode_text, end_of_turn_id, render, render_tool_turns, stop_token_ids
from metis_cli.errors import ModelError
from metis_cli.rewards.answer import extract_answer

if TYPE_CHECKING:
    from metis_cli.agent.tools.registry import ToolRegistry

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
    generation_s: wall time of the batched backend calls this rollout took part in.
    tool_s: sum of the registry's runtime_s over this rollout's calls.
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
    finish_reason: RolloutFinish | None = None
    num_turns: int = 0
    generated_tokens: int = 0
    generation_s: float = 0.0
    tool_s: float = 0.0
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
    ):
        self.backend = backend
        self.continuous = continuous
        self._fast_tools: set[str | None] = {None}  # tool names whose calls return in < _FAST_TOOL_S (None: malformed)
        self.tokenizer = tokenizer
        self.tools = tools
        self.max_turns = max_turns
        self.max_new_tokens_per_turn = max_new_tokens_per_turn
        self.max_total_tokens = max_total_tokens
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
    ) -> list[Rollout]:
        """group_size rollouts per prompt, ordered by (prompt_index, sample_index).

        use_tools=False renders no tools into the prompt, and a tool call ends the rollout.
        on_progress(finished, total) is called after every turn.
        """
        use_tools = use_tools and self.tools is not None
        tool_specs = self.tools.specs() if use_tools else None
        rollouts = []
        for prompt_index, messages in enumerate(prompts):
            text = render(self.tokenizer, messages, tool_specs, add_generation_prompt=True)
            ids = encode_text(self.tokenizer, text)
            for sample_index in range(group_size):
                rollout = Rollout(prompt_index, sample_index, list(ids), len(ids), [0] * len(ids),
                                  [0.0] * len(ids), [dict(m) for m in messages])
                rollout._turn_start = text
                rollouts.append(rollout)
        active = [r for r in rollouts if not self._out_of_room(r)]
        forced_cache: dict[str, tuple[list[int], str]] = {}
        if self.continuous and isinstance(self.backend, ContinuousBackend):
            self._run_continuous(rollouts, active, greedy, use_tools, seed, tool_specs, forced_cache, on_progress)
            return rollouts
        turn = 0
        while active:
            turn += 1
            awaiting_tools = self._generate_turn(active, greedy, use_tools, None if seed is None else seed + turn)
            if awaiting_tools:
                self._run_tools(awaiting_tools, tool_specs, forced_cache)
            active = [r for r in awaiting_tools if r.finish_reason is None]
            if on_progress is not None:
                on_progress(sum(r.finish_reason is not None for r in rollouts), len(rollouts))
        return rollouts

    # ------------------------------------------------------------------ turn-synchronous waves
    def _generate_turn(self, active: list[Rollout], greedy: bool, use_tools: bool, seed: int | None) -> list[Rollout]:
        """One backend call for every active rollout; returns those that stopped at a tool call to run."""
        budgets = [self._turn_budget(r) for r in active]
        started = time.perf_counter()
        generations = self.backend.generate(
            [r.token_ids for r in active],
            max_new_tokens=max(budgets),
            temperature=self.temperature,
            top_p=self.top_p,
            stop_token_ids=self.stop_ids,
            greedy=greedy,
            seed=seed,
        )
        generation_s = time.perf_counter() - started
        return [rollout for rollout, generation, budget in zip(active, generations, budgets)
                if self._end_turn(rollout, generation, budget, use_tools, generation_s)]

    def _run_tools(self, rollouts: list[Rollout], tool_specs: list[dict] | None, forced_cache: dict) -> None:
        """Run every rollout's tool call(s) in one concurrent registry call; queue results as forced tokens."""
        requests = [self._tool_requests(rollout) for rollout in rollouts]
        results = iter(self.tools.execute_many([request for per_rollout in requests for request in per_rollout]))
        for rollout, per_rollout in zip(rollouts, requests):
            self._show_tool_results(rollout, per_rollout, [next(results) for _ in per_rollout], tool_specs,
                                    forced_cache)

    # ------------------------------------------------------------------ continuous batching
    def _run_continuous(self, rollouts: list[Rollout], active: list[Rollout], greedy: bool, use_tools: bool,
                        seed: int | None, tool_specs: list[dict] | None, forced_cache: dict,
                        on_progress: Callable[[int, int], None] | None) -> None:
        """Every rollout moves on its own: its next turn is submitted the moment its tool results
        are in, while the backend keeps generating the others (no turn-wide barrier). Tools run
        on an event loop in a helper thread; tokenizing and the backend stay on this thread."""
        backend = self.backend
        in_flight: dict[int, tuple[Rollout, int, float]] = {}  # key -> (rollout, budget, submitted at)
        tool_jobs: dict[Future, tuple[Rollout, list]] = {}
        position = {id(rollout): index for index, rollout in enumerate(rollouts)}

        def submit(group: list[Rollout]) -> None:
            """The next turn of `group`, rollouts at the very same point (one, or a prompt's G at the start)."""
            budget = self._turn_budget(group[0])
            keys = [len(position) * rollout.num_turns + position[id(rollout)] for rollout in group]
            for key, rollout in zip(keys, group):
                in_flight[key] = (rollout, budget, time.perf_counter())
            backend.submit(keys, group[0].token_ids, max_new_tokens=budget, temperature=self.temperature,
                           top_p=self.top_p, stop_token_ids=self.stop_ids, greedy=greedy,
                           seed=None if seed is None else _request_seed(seed, keys[0]))

        with _ToolLoop() as tool_loop, _cancelled_on_error(backend):
            for prompt_index in sorted({r.prompt_index for r in active}):
                submit([r for r in active if r.prompt_index == prompt_index])
            while in_flight or tool_jobs:
                if in_flight:
                    finished = backend.poll()
                    if not finished and not backend.pending:
                        raise RuntimeError(f"the backend lost {len(in_flight)} submitted continuation(s)")
                else:
                    wait(tool_jobs, return_when=FIRST_COMPLETED)
                    finished = []
                started_jobs = []
                for key, generation in finished:
                    rollout, budget, submitted = in_flight.pop(key)
                    if self._end_turn(rollout, generation, budget, use_tools, time.perf_counter() - submitted):
                        requests = self._tool_requests(rollout)
                        started_jobs.append(tool_loop.run(self._execute(requests)))
                        tool_jobs[started_jobs[-1]] = (rollout, requests)
                if started_jobs and in_flight and all(call.name in self._fast_tools for job in started_jobs
                                                      for call, _ in tool_jobs[job][1]):
                    # Tools that answered within a few milliseconds so far (an in-process calculator):
                    # wait for them, so their rollouts join the very next engine step.
                    wait(started_jobs, timeout=_FAST_TOOL_WAIT_S)
                for job in [job for job in tool_jobs if job.done()]:
                    rollout, requests = tool_jobs.pop(job)
                    results = job.result()
                    for (call, _), result in zip(requests, results):
                        if result.runtime_s < _FAST_TOOL_S:
                            self._fast_tools.add(call.name)
                        else:
                            self._fast_tools.discard(call.name)
                    self._show_tool_results(rollout, requests, results, tool_specs, forced_cache)
                    if rollout.finish_reason is None:
                        submit([rollout])
                if on_progress is not None and finished:
                    on_progress(sum(r.finish_reason is not None for r in rollouts), len(rollouts))

    async def _execute(self, requests: list) -> list:
        return list(await asyncio.gather(*(self.tools.execute(call, so_far) for call, so_far in requests)))

    # ------------------------------------------------------------------ one rollout's turn
    def _turn_budget(self, rollout: Rollout) -> int:
        return min(self.max_new_tokens_per_turn, self.max_total_tokens - len(rollout.token_ids))

    def _end_turn(self, rollout: Rollout, generation: Generation, budget: int, use_tools: bool,
                  generation_s: float) -> bool:
        """Append a finished turn's tokens and decide what comes next: True if the turn stopped at
        a tool call to run, else the rollout gets its finish_reason."""
        # One backend call may serve several rows, so rows with less room left are cut to their own budget.
        token_ids = generation.token_ids[:budget]
        stopped = generation.finish_reason == "stop" and len(generation.token_ids) <= budget
        rollout._append(token_ids, generation.logprobs[:budget])
        rollout.num_turns += 1
        rollout.generation_s += generation_s
        content_ids = token_ids[:-1] if stopped and token_ids[-1] in self.end_of_turn_ids else token_ids
        content = self.tokenizer.decode(content_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        rollout.messages.append({"role": "assistant", "content": content})
        if not stopped:
            rollout.finish_reason = "length"
        elif token_ids[-1] != self.tool_call_end_id or not use_tools:
            rollout.finish_reason = "answer" if extract_answer(content) is not None else "eos"
        elif rollout.num_turns >= self.max_turns:
            rollout.finish_reason = "max_turns"
        else:
            return True
        return False

    def _tool_requests(self, rollout: Rollout) -> list[tuple]:
        """(parsed call, calls the rollout made before it) for each call in its last turn."""
        return [(call, rollout.tool_calls + offset)
                for offset, call in enumerate(parse_tool_calls(rollout.messages[-1]["content"]))]

    def _show_tool_results(self, rollout: Rollout, requests: list[tuple], results: list, tool_specs: list[dict] | None,
                           forced_cache: dict) -> None:
        """Record the calls' results as `tool` turns and queue their rendering as forced tokens."""
        tool_messages = []
        for (call, _), result in zip(requests, results):
            message = {"role": "tool", "content": result.text}
            if call.name:
                message["name"] = call.name
            tool_messages.append(message)
            rollout.tool_calls += 1
            rollout.tool_s += result.runtime_s
            if result.error:
                rollout.tool_errors[result.error] = rollout.tool_errors.get(result.error, 0) + 1
        # The G samples of a group often make the very same call: render each distinct history once.
        cache_key = json.dumps([rollout.messages, tool_messages], sort_keys=True)
        if cache_key not in forced_cache:
            forced_cache[cache_key] = render_tool_turns(self.tokenizer, rollout.messages, tool_messages, tool_specs,
                                                        rollout._turn_start)
        forced, rollout._turn_start = forced_cache[cache_key]
        rollout.messages += tool_messages
        if len(rollout.token_ids) + len(forced) >= self.max_total_tokens:
            rollout.finish_reason = "length"  # no room to show the result and generate after it
            return
        rollout._append(forced, None)

    def _out_of_room(self, rollout: Rollout) -> bool:
        if len(rollout.token_ids) < self.max_total_tokens:
            return False
        rollout.finish_reason = "length"
        return True


_FAST_TOOL_S = 0.005
"""A tool call that took less than this counts as fast: the next turns wait for such calls."""
_FAST_TOOL_WAIT_S = 0.05
"""The most one engine step is held back waiting for fast tool calls."""


def _request_seed(seed: int, key: int) -> int:
    """A per-request seed, distinct for every (step seed, first rollout key); a request's i-th
    continuation gets this + i, which stays clear of the next key's range."""
    return (seed * 1_000_003 + key) * 65_537


@contextmanager
def _cancelled_on_error(backend):
    """If a run stops half-way (a bug, Ctrl-C), drop its unfinished requests from the backend so
    they cannot surface in the next run."""
    try:
        yield
    except BaseException:
        backend.cancel()
        raise


class _ToolLoop:
    """An asyncio event loop in a helper thread: `run(coroutine)` returns a concurrent Future, so
    tool calls proceed while this thread keeps driving the generation backend."""

    def __enter__(self) -> _ToolLoop:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="metis-tools", daemon=True)
        self.thread.start()
        return self

    def run(self, coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def __exit__(self, *exc_info) -> None:
        # Calls still running (the run stopped early) are cancelled, so a sandboxed tool is torn
        # down now rather than left behind.
        asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self.loop).result(timeout=_TOOL_CANCEL_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


_TOOL_CANCEL_S = 30.0


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ModelError(
            f"tokenizer {tokenizer.name_or_path} splits {text} into {len(ids)} tokens; the rollout engine "
            f"stops generation on it and needs it as one token (add it with tokenizer.add_tokens)"
        )
    return ids[0]
