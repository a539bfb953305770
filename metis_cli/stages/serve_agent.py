"""The agent behind `metis serve`: one model, its tools, and many requests at once.

Each request runs the same `RolloutEngine` as RL, eval and chat (prompt rendering, stopping at
`</tool_call>`, the tool registry, forced tool turns, turn and token limits) in its own worker
thread, with its own sampling settings. The model is shared through `TurnBatcher`: every
engine's generate call (one assistant turn of one request) is queued, and the batcher's thread
runs all queued turns with the same sampling settings as one backend call. So requests are
batched turn by turn: while one request's tools run (in its own thread, concurrently with other
requests' tools), the others keep generating, and a request joins the next batch the moment its
tool returns. Requests that ask for a `seed` are never batched with others, so the seed alone
decides their samples.

Streaming: the HF backend's token stream (agent/hf_backend.py) reports every sampled token; the
batch's `BatchStream` hands each to its request's `_RequestRun`, which decodes the turn and
passes on the new text (`serve_openai.visible_text`: tool calls go to the tool trace, not the
text). The streamed text adds up to the reply's `content`. With the vLLM backend a turn's text
arrives when the turn ends.

Must not touch: HTTP and the wire format (stages/serve.py, stages/serve_openai.py).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Callable

from metis_cli.agent.backend import Generation, SamplingParams
from metis_cli.agent.rollout_types import RolloutListener
from metis_cli.stages.serve_openai import BadRequest, ChatRequest, ServerLimits, visible_text

EventSink = Callable[[str, object], None]
"""on_event(kind, payload) from a worker thread: ("text", str) and ("tool", dict)."""


@dataclass
class CompletionResult:
    """What one request produced. finish_reason: the rollout's ("answer", "eos", "length",
    "max_turns"); tool_calls: the trace (name, arguments, observation, seconds, error)."""

    content: str
    answer: str | None
    finish_reason: str
    tool_calls: list[dict]
    turns: int
    prompt_tokens: int
    generated_tokens: int
    total_tokens: int
    seconds: dict = field(default_factory=dict)

    def usage(self) -> dict:
        """prompt_tokens counts everything the model read: the request and the tool turns the server
        added (`tool_tokens` of them); total_tokens = prompt_tokens + completion_tokens."""
        return {"prompt_tokens": self.total_tokens - self.generated_tokens, "completion_tokens": self.generated_tokens,
                "total_tokens": self.total_tokens, "tool_calls": len(self.tool_calls),
                "tool_tokens": self.total_tokens - self.generated_tokens - self.prompt_tokens}

    def metis(self) -> dict:
        return {"tool_calls": self.tool_calls, "answer": self.answer, "finish_reason": self.finish_reason,
                "turns": self.turns, "seconds": self.seconds}


# ------------------------------------------------------------------------------ one request
class _RequestRun(RolloutListener):
    """One request's view of its rollout: the tool trace, and (when streamed) its text as it grows."""

    def __init__(self, service: AgentService, on_event: EventSink | None, cancelled: threading.Event):
        self.service, self.on_event, self.cancelled = service, on_event, cancelled
        self.records: list[dict] = []
        self.sent = ""
        self._finished_turns: list[str] = []
        self._turn_ids: list[int] = []
        self._turn = 0

    # token stream of this request (from BatchStream)
    def on_tokens(self, token_ids: list[int]) -> None:
        self._turn_ids += token_ids
        service = self.service
        text = service.decode([t for t in self._turn_ids if t not in service.end_of_turn_ids])
        self._send("".join(self._finished_turns) + service.clean(visible_text(text, finished=False)))

    def _send(self, text: str) -> None:
        # A turn cut to its own token budget can end shorter than what was streamed; nothing is unsent.
        if self.on_event is not None and text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_event("text", text[len(self.sent):])
            self.sent = text

    # RolloutListener
    def on_turn_start(self, rollout) -> None:
        self._turn_ids = []

    def on_tool_start(self, rollout, call) -> None:
        if self._turn != rollout.num_turns:  # the turn that made this call has ended
            self._turn = rollout.num_turns
            self._finished_turns.append(self.service.visible(rollout.messages[-1]["content"]))
            self._send("".join(self._finished_turns))

    def on_tool_result(self, rollout, call, result) -> None:
        record = {"name": call.name, "arguments": call.arguments, "observation": result.text,
                  "seconds": round(result.runtime_s, 6), "error": result.error, "parse_error": call.error}
        self.records.append(record)
        if self.on_event is not None:
            self.on_event("tool", record)

    def finish(self, content: str) -> None:
        self._send(content)


class _RequestBackend:
    """The generation backend one request's engine sees: its turns go through the shared batcher."""

    def __init__(self, batcher: TurnBatcher, run: _RequestRun):
        self.batcher, self.run = batcher, run

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        if self.run.cancelled.is_set():  # the client went away: no more turns
            return [Generation([], [], "length") for _ in prompts]
        return self.batcher.generate(prompts, params, self.run)

    def update_weights(self, model) -> None:
        raise NotImplementedError("a served model is not trained")

    def close(self) -> None:
        """The shared backend is the service's to close."""


# ------------------------------------------------------------------------------ the batcher
@dataclass
class _Pending:
    prompts: list[list[int]]
    params: SamplingParams
    run: _RequestRun | None
    future: Future


class BatchStream:
    """The HF backend's token stream: routes each sampled token to the request it belongs to."""

    def __init__(self):
        self.rows: list[_RequestRun | None] = []

    def on_tokens(self, prompt_indices: list[int], token_ids: list[int]) -> None:
        for index, token in zip(prompt_indices, token_ids):
            run = self.rows[index]
            if run is not None and run.on_event is not None:
                run.on_tokens([token])

    @property
    def interrupted(self) -> bool:
        """Only when every request of the batch is gone (one backend call serves them all)."""
        return bool(self.rows) and all(run is not None and run.cancelled.is_set() for run in self.rows)


class TurnBatcher:
    """Runs the queued turns of all requests on one backend, from one thread (module docstring)."""

    def __init__(self, backend, stream: BatchStream):
        self.backend, self.stream = backend, stream
        self._queue: list[_Pending] = []
        self._wake = threading.Condition()
        self._closed = False
        self.batches = 0  # backend calls so far (tests and /health read it)
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="metis-serve-model", daemon=True)
        self._thread.start()

    def generate(self, prompts: list[list[int]], params: SamplingParams, run: _RequestRun | None) -> list[Generation]:
        pending = _Pending(prompts, params, run, Future())
        with self._wake:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.append(pending)
            self._wake.notify()
        return pending.future.result()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    for pending in self._queue:
                        pending.future.set_exception(RuntimeError("the server is shutting down"))
                    return
                key = _batch_key(self._queue[0].params)
                batch = [p for p in self._queue if _batch_key(p.params) == key]
                self._queue = [p for p in self._queue if _batch_key(p.params) != key]
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        # Each row is cut to its own budget by its engine, so the batch generates for the longest.
        params = replace(batch[0].params, max_new_tokens=max(p.params.max_new_tokens for p in batch))
        prompts = [prompt for pending in batch for prompt in pending.prompts]
        self.stream.rows = [pending.run for pending in batch for _ in pending.prompts]
        try:
            generations = self.backend.generate(prompts, params)
        except Exception as error:  # noqa: BLE001 - the requests fail, the server stays up
            for pending in batch:
                pending.future.set_exception(error)
            return
        finally:
            self.stream.rows = []
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(prompts))
        start = 0
        for pending in batch:
            pending.future.set_result(generations[start:start + len(pending.prompts)])
            start += len(pending.prompts)


def _batch_key(params: SamplingParams) -> tuple:
    """Turns with equal keys share one backend call; a seeded turn only its own (its object id)."""
    if params.seed is not None:
        return ("seeded", id(params))
    sampling = ("greedy",) if params.is_greedy else (params.temperature, params.top_p)
    return (*sampling, tuple(params.stop_token_ids))


# ------------------------------------------------------------------------------ the service
class AgentService:
    """The served model: `complete(request)` from any worker thread."""

    def __init__(self, agent, stream: BatchStream, *, limits: ServerLimits, system_prompt: str | None):
        from metis_cli.data.chat import end_of_turn_id

        self.agent, self.tokenizer, self.registry, self.limits = agent, agent.tokenizer, agent.registry, limits
        self.system_prompt = system_prompt
        self.batcher = TurnBatcher(agent.backend, stream)
        self.end_of_turn_ids = {end_of_turn_id(self.tokenizer), self.tokenizer.eos_token_id} - {None}
        self._special = sorted(set(self.tokenizer.all_special_tokens), key=len, reverse=True)
        self.in_flight = 0
        self._count_lock = threading.Lock()

    def decode(self, token_ids: list[int]) -> str:
        """Decoded the way the engine decodes an assistant turn into its message."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def clean(self, text: str) -> str:
        """Control tokens (`<|im_start|>`, padding) a model may sample are not shown to clients."""
        for token in self._special:
            text = text.replace(token, "")
        return text

    def visible(self, turn_text: str) -> str:
        return self.clean(visible_text(turn_text, finished=True))

    def conversation(self, request: ChatRequest) -> list[dict]:
        """The request's messages, with the server's system prompt when the client sent none."""
        if self.system_prompt and not any(m["role"] == "system" for m in request.messages):
            return [{"role": "system", "content": self.system_prompt}, *request.messages]
        return list(request.messages)

    def check_length(self, request: ChatRequest) -> None:
        """BadRequest when the conversation leaves no room in the model's context to answer."""
        from metis_cli.data.chat import prompt_ids

        tools = self.registry.specs() if self.registry is not None else None
        length = len(prompt_ids(self.tokenizer, self.conversation(request), tools))
        if length >= self.limits.context_tokens:
            raise BadRequest(f"the conversation is {length} tokens (system prompt and tool descriptions included); "
                             f"this server's context is {self.limits.context_tokens} tokens and the answer needs room: "
                             "send fewer or shorter messages", param="messages", code="context_length_exceeded")

    def complete(self, request: ChatRequest, on_event: EventSink | None = None,
                 cancelled: threading.Event | None = None) -> CompletionResult:
        from metis_cli.agent.rollout import RolloutEngine
        from metis_cli.rewards.answer import final_answer

        run = _RequestRun(self, on_event, cancelled or threading.Event())
        engine = RolloutEngine(
            _RequestBackend(self.batcher, run), self.tokenizer, self.registry, max_turns=self.limits.max_turns,
            max_new_tokens_per_turn=request.max_tokens, max_total_tokens=self.limits.context_tokens,
            temperature=request.temperature, top_p=request.top_p, continuous=False,
        )
        started = time.perf_counter()
        with self._count_lock:
            self.in_flight += 1
        try:
            rollout = engine.run([self.conversation(request)], 1, greedy=request.temperature <= 0, seed=request.seed,
                                 listener=run)[0]
        finally:
            with self._count_lock:
                self.in_flight -= 1
        turns = rollout.assistant_texts
        content = "".join(self.visible(turn) for turn in turns)
        run.finish(content)
        return CompletionResult(
            content=content, answer=final_answer(turns), finish_reason=rollout.finish_reason or "length",
            tool_calls=run.records, turns=rollout.num_turns, prompt_tokens=rollout.prompt_len,
            generated_tokens=rollout.generated_tokens, total_tokens=len(rollout.token_ids),
            seconds={"total": round(time.perf_counter() - started, 6), "generation": round(rollout.generation_s, 6),
                     "tools": round(rollout.tool_s, 6)},
        )

    def close(self) -> None:
        self.batcher.close()
        self.agent.close()
