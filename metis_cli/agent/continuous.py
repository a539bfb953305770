"""Continuous batching for the rollout engine (agent/rollout.py): every rollout moves on its own.

A rollout's next turn is submitted to the backend (`ContinuousBackend.submit`) the moment its
tool results are in, while the backend keeps generating the others, so no rollout waits for the
slowest one of its turn. Tools run on an asyncio event loop in a helper thread; tokenizing, the
backend and the listener's hooks stay on the engine's thread. The steps of one rollout's turn
(ending it, parsing and showing tool calls) are `EngineRun`'s, shared with the waves schedule.

Seeds: a request's seed is derived from the run's seed and its first rollout's key (model/runtime.py
`ROLLOUT_REQUEST_SEED`), so a run samples the same rollouts whatever order tools finish in.

Must not touch: the turn logic (agent/rollout.py), sampling internals (backends).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable

from metis_cli.model.runtime import ROLLOUT_REQUEST_SEED, derive_seed

if TYPE_CHECKING:
    from metis_cli.agent.rollout import EngineRun
    from metis_cli.agent.rollout_types import Rollout

_FAST_TOOL_S = 0.005
"""A tool call that took less than this counts as fast: the next turns wait for such calls."""
_FAST_TOOL_WAIT_S = 0.05
"""The most one engine step is held back waiting for fast tool calls."""
_TOOL_CANCEL_S = 30.0
"""How long calls still running when a run stops get to tear down."""


class ContinuousScheduler:
    """Drives one engine run over a ContinuousBackend; remembers across runs which tools are fast."""

    def __init__(self):
        self._fast_tools: set[str | None] = {None}  # tool names whose calls return in < _FAST_TOOL_S (None: malformed)

    def run(self, run: EngineRun, rollouts: list[Rollout], active: list[Rollout], seed: int | None,
            on_progress: Callable[[int, int], None] | None) -> None:
        """Sample `active` (rollouts still to generate, among all `rollouts`) to the end."""
        backend, tools = run.engine.backend, run.engine.tools
        in_flight: dict[int, tuple[Rollout, int, float]] = {}  # key -> (rollout, budget, submitted at)
        tool_jobs: dict[Future, tuple[Rollout, list]] = {}
        position = {id(rollout): index for index, rollout in enumerate(rollouts)}

        def submit(group: list[Rollout]) -> None:
            """The next turn of `group`, rollouts at the very same point (one, or a prompt's G at the start)."""
            budget = run.turn_budget(group[0])
            keys = [len(position) * rollout.num_turns + position[id(rollout)] for rollout in group]
            for key, rollout in zip(keys, group):
                run.listener.on_turn_start(rollout)
                in_flight[key] = (rollout, budget, time.perf_counter())
            request_seed = None if seed is None else derive_seed(ROLLOUT_REQUEST_SEED, seed, keys[0])
            backend.submit(keys, group[0].token_ids, run.sampling(budget, request_seed),
                           **({"images": group[0].images} if run.engine.vision is not None else {}))

        async def execute(requests: list, session: int, context) -> list:
            extra = {"context": context} if context is not None else {}
            return list(await asyncio.gather(*(tools.execute(call, so_far, session, **extra)
                                               for call, so_far in requests)))

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
                    if run.end_turn(rollout, generation, budget, time.perf_counter() - submitted):
                        requests = run.tool_requests(rollout)
                        for call, _ in requests:
                            run.listener.on_tool_start(rollout, call)
                        started_jobs.append(tool_loop.run(execute(requests, id(rollout), run.tool_context(rollout)
                                                                  if run.engine.vision is not None else None)))
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
                    run.show_tool_results(rollout, requests, results)
                    if rollout.finish_reason is None:
                        submit([rollout])
                if on_progress is not None and finished:
                    on_progress(sum(r.finish_reason is not None for r in rollouts), len(rollouts))


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


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
