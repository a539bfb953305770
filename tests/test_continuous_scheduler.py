"""The rollout engine's continuous-batching schedule, on CPU, with a scripted continuous backend.

The schedule is the one vLLM gets (a backend with `submit`/`poll`/`cancel`/`pending`, the
`ContinuousBackend` protocol of agent/backend.py); tests/test_vllm_backend.py checks it against
real vLLM and is skipped without it. Here a backend written below continues each prompt with a
fixed script (no weights), one token per `poll`, so the checks run everywhere: a rollout's next
turn is submitted as soon as its own tool returns, the rollouts equal those of turn-synchronous
waves, sampling seeds do not depend on the order tools finish in, and a run that stops half-way
leaves nothing behind in the backend or the tool loop.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from metis_cli.agent.backend import ContinuousBackend, Generation
from metis_cli.agent.rollout import RolloutEngine, RolloutListener
from metis_cli.agent.tools.calculator import CalculatorTool
from metis_cli.agent.tools.registry import ToolRegistry
from metis_cli.data import synthetic

POLL_S = 0.005
"""Wall time of one scripted decoding step."""
MAX_TURNS = 3
MAX_NEW_TOKENS = 64
EXPRESSIONS = ["1 + 1", "2 * 3", "3 * 4", "5 * 6", "6 + 7", "8 * 9"]
"""One plan each (see `policy`): direct answer, one call, two calls, calls until max_turns, a
malformed call then an answer, babble cut at max_new_tokens."""
FILLERS = ["", "so ", "then ", "thus "]


def policy(prompt_text: str, seed: int | None) -> str:
    """The scripted model: what it writes next, given everything so far."""
    expression = re.findall(r"What is (\d+ [*+] \d+)\?", prompt_text)[-1]
    results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", prompt_text)
    filler = FILLERS[seed % len(FILLERS)] if seed is not None else ""
    call = synthetic.calculator_call
    left, op, right = expression.split()
    value = int(left) * int(right) if op == "*" else int(left) + int(right)
    answer = f"{filler}<answer>{value}</answer><|im_end|>"
    if expression == "2 * 3" and not results:
        return call(expression)
    if expression == "3 * 4" and len(results) < 2:
        return call(expression if not results else f"{results[-1]} * 1")
    if expression == "5 * 6":
        return call(expression)
    if expression == "6 + 7" and not results:
        return '<tool_call>{"name": "calculator", "arguments": {</tool_call>'
    if expression == "8 * 9":
        return "blah " * 200
    return answer


class ScriptedContinuousBackend:
    """A ContinuousBackend whose continuations follow `policy`, one token per `poll` (which takes
    POLL_S). Records every submit as (question, turn number, step) and counts cancels."""

    def __init__(self, tokenizer, lose_turn: int | None = None):
        self.tokenizer = tokenizer
        self.lose_turn = lose_turn  # submits of this turn number are dropped (a backend losing requests)
        self.running: dict[int, tuple[Generation, int]] = {}  # key -> (continuation, tokens emitted)
        self.steps = 0
        self.submitted: list[tuple[str, int, int]] = []
        self.finished_at: dict[tuple[str, int], int] = {}
        self.cancels = 0
        self._labels: dict[int, tuple[str, int]] = {}

    def _continue(self, prompt: list[int], params, seed: int | None) -> Generation:
        ids = self.tokenizer.encode(policy(self.tokenizer.decode(prompt), seed), add_special_tokens=False)
        stop = next((i for i, token in enumerate(ids) if token in params.stop_token_ids), None)
        if stop is not None and stop < params.max_new_tokens:
            ids, finish = ids[: stop + 1], "stop"
        else:
            ids, finish = ids[: params.max_new_tokens], "length"
        return Generation(ids, [-0.01 * (i + 1) for i in range(len(ids))], finish)

    def _label(self, prompt: list[int]) -> tuple[str, int]:
        text = self.tokenizer.decode(prompt)
        return re.findall(r"What is (\d+ [*+] \d+)\?", text)[-1], text.count("<|im_start|>assistant")

    def generate(self, prompts, params):
        seeds = [None if params.seed is None else params.seed + row for row in range(len(prompts))]
        return [self._continue(prompt, params, seed) for prompt, seed in zip(prompts, seeds)]

    def submit(self, keys, prompt, params):
        question, turn = self._label(prompt)
        for offset, key in enumerate(keys):
            self.submitted.append((question, turn, self.steps))
            if turn == self.lose_turn:
                continue
            seed = None if params.seed is None else params.seed + offset
            self.running[key] = (self._continue(prompt, params, seed), 0)
            self._labels[key] = (question, turn)

    def poll(self):
        time.sleep(POLL_S)
        self.steps += 1
        finished = []
        for key, (generation, emitted) in list(self.running.items()):
            if emitted + 1 >= len(generation.token_ids):
                del self.running[key]
                self.finished_at[self._labels[key]] = self.steps
                finished.append((key, generation))
            else:
                self.running[key] = (generation, emitted + 1)
        return finished

    def cancel(self):
        self.cancels += 1
        self.running.clear()

    @property
    def pending(self) -> int:
        return len(self.running)

    def update_weights(self, model):
        pass

    def close(self):
        pass


class GatedCalculator(CalculatorTool):
    """The calculator; a call on `slow_expression` returns only once the backend has made
    `open_at_step` decoding steps (a slow tool, measured in the backend's own clock)."""

    def __init__(self, backend: ScriptedContinuousBackend, slow_expression: str | None = None, open_at_step: int = 0):
        self.backend, self.slow_expression, self.open_at_step = backend, slow_expression, open_at_step
        self.returned_at_step: int | None = None
        self.cancelled = False

    async def call(self, arguments):
        if arguments.get("expression") == self.slow_expression:
            try:
                while self.backend.steps < self.open_at_step:
                    await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                self.cancelled = True
                raise
            self.returned_at_step = self.backend.steps
        return await super().call(arguments)


def prompts(*expressions: str) -> list[list[dict]]:
    return [[{"role": "system", "content": synthetic.SYSTEM_PROMPT}, {"role": "user", "content": f"What is {e}?"}]
            for e in expressions]


def make_engine(tokenizer, backend, tool, *, continuous: bool = True) -> RolloutEngine:
    registry = ToolRegistry([tool], timeout_s=10, max_calls_per_rollout=4, max_concurrency=8)
    return RolloutEngine(backend, tokenizer, registry, max_turns=MAX_TURNS, max_new_tokens_per_turn=MAX_NEW_TOKENS,
                         max_total_tokens=512, temperature=1.0, top_p=1.0, continuous=continuous)


def summary(rollouts) -> list[tuple]:
    """Everything a rollout is made of, except wall times."""
    return [(r.prompt_index, r.sample_index, r.token_ids, r.loss_mask, r.sampler_logprobs, r.messages, r.tool_calls,
             r.tool_errors, r.finish_reason, r.num_turns, r.generated_tokens) for r in rollouts]


def test_scripted_backend_takes_the_continuous_schedule(tiny_tokenizer):
    backend = ScriptedContinuousBackend(tiny_tokenizer)
    assert isinstance(backend, ContinuousBackend)
    rollouts = make_engine(tiny_tokenizer, backend, GatedCalculator(backend)).run(prompts(*EXPRESSIONS), 1)
    assert backend.steps > 0 and backend.submitted, "the engine did not use submit/poll"
    assert {r.finish_reason for r in rollouts} == {"answer", "max_turns", "length"}


def test_a_rollouts_next_turn_is_submitted_as_soon_as_its_own_tool_returns(tiny_tokenizer):
    backend = ScriptedContinuousBackend(tiny_tokenizer)
    slow = GatedCalculator(backend, slow_expression="2 * 3", open_at_step=30)
    rollouts = make_engine(tiny_tokenizer, backend, slow).run(prompts(*EXPRESSIONS), 1)
    submitted_at = {(question, turn): step for question, turn, step in backend.submitted}
    assert slow.returned_at_step is not None
    # While the slow call ran, another rollout went through two more turns.
    assert submitted_at[("3 * 4", 2)] < submitted_at[("3 * 4", 3)] < slow.returned_at_step
    # The slow rollout moved on within a step of its tool returning, not when the turn's slowest
    # generation (the babbling one, MAX_NEW_TOKENS steps) finished, as a wave would.
    assert submitted_at[("2 * 3", 2)] - slow.returned_at_step <= 2
    assert submitted_at[("2 * 3", 2)] < backend.finished_at[("8 * 9", 1)]
    assert rollouts[1].messages[-1]["content"] == "<answer>6</answer>"


@pytest.mark.parametrize("group_size", [1, 3])
def test_continuous_rollouts_equal_the_waves_schedule(tiny_tokenizer, group_size):
    waves_backend = ScriptedContinuousBackend(tiny_tokenizer)
    waves = make_engine(tiny_tokenizer, waves_backend, GatedCalculator(waves_backend), continuous=False)
    by_waves = waves.run(prompts(*EXPRESSIONS), group_size)
    assert waves_backend.steps == 0  # the waves schedule only calls generate
    backend = ScriptedContinuousBackend(tiny_tokenizer)
    tool = GatedCalculator(backend, slow_expression="3 * 4", open_at_step=20)  # reorders the turns
    continuous = make_engine(tiny_tokenizer, backend, tool).run(prompts(*EXPRESSIONS), group_size)
    assert summary(continuous) == summary(by_waves)
    finish = {r.prompt_index: r.finish_reason for r in continuous}
    assert finish == {0: "answer", 1: "answer", 2: "answer", 3: "max_turns", 4: "answer", 5: "length"}
    assert [r.tool_calls for r in continuous[::group_size]] == [0, 1, 2, 2, 1, 0]
    assert continuous[4 * group_size].tool_errors == {"malformed": 1}


def test_seeded_rollouts_do_not_depend_on_the_order_tools_finish_in(tiny_tokenizer):
    def sample(slow_expression: str | None, seed: int):
        backend = ScriptedContinuousBackend(tiny_tokenizer)
        tool = GatedCalculator(backend, slow_expression=slow_expression, open_at_step=25)
        return summary(make_engine(tiny_tokenizer, backend, tool).run(prompts(*EXPRESSIONS), 3, seed=seed))

    first = sample("2 * 3", seed=7)
    assert len({str(r[5]) for r in first}) > len(EXPRESSIONS)  # the seed picks different texts within a group
    assert sample("3 * 4", seed=7) == first
    assert sample(None, seed=7) == first
    assert sample("2 * 3", seed=8) != first


class StopAtTurn(RolloutListener):
    """A listener that raises when `question`'s turn `turn` is about to start (like Ctrl-C)."""

    def __init__(self, question: str, turn: int):
        self.question, self.turn = question, turn

    def on_turn_start(self, rollout):
        if rollout.messages[1]["content"] == f"What is {self.question}?" and rollout.num_turns + 1 == self.turn:
            raise KeyboardInterrupt


def test_a_run_stopped_half_way_cancels_generation_and_tool_calls(tiny_tokenizer):
    backend = ScriptedContinuousBackend(tiny_tokenizer)
    slow = GatedCalculator(backend, slow_expression="2 * 3", open_at_step=10_000)
    engine = make_engine(tiny_tokenizer, backend, slow)
    with pytest.raises(KeyboardInterrupt):
        engine.run(prompts(*EXPRESSIONS), 2, listener=StopAtTurn("3 * 4", 2))
    assert backend.cancels == 1 and backend.pending == 0
    assert slow.cancelled, "the tool call still running was not cancelled"
    # Nothing of the stopped run surfaces in the next one.
    slow.slow_expression = None
    again = engine.run(prompts(*EXPRESSIONS), 2)
    fresh_backend = ScriptedContinuousBackend(tiny_tokenizer)
    fresh = make_engine(tiny_tokenizer, fresh_backend, GatedCalculator(fresh_backend)).run(prompts(*EXPRESSIONS), 2)
    assert summary(again) == summary(fresh)


def test_a_backend_that_loses_requests_is_an_error_not_a_hang(tiny_tokenizer):
    backend = ScriptedContinuousBackend(tiny_tokenizer, lose_turn=2)
    with pytest.raises(RuntimeError, match="lost"):
        make_engine(tiny_tokenizer, backend, GatedCalculator(backend)).run(prompts("2 * 3", "8 * 9"), 1)
    assert backend.cancels == 1 and backend.pending == 0


class SessionRecordingCalculator(CalculatorTool):
    """A calculator with per-rollout sessions (like the persistent python tool) that records the
    session key of every call and every end_session, in order."""

    uses_sessions = True

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, object]] = []

    async def call(self, arguments, session=None):
        self.events.append(("call", session))
        return await super().call(arguments)

    def end_session(self, session):
        self.events.append(("end", session))


@pytest.mark.parametrize("continuous", [True, False])
def test_tool_sessions_are_one_per_rollout_and_end_with_it(tiny_tokenizer, continuous):
    backend = ScriptedContinuousBackend(tiny_tokenizer)
    tool = SessionRecordingCalculator()
    rollouts = make_engine(tiny_tokenizer, backend, tool, continuous=continuous).run(prompts(*EXPRESSIONS), 2)
    events = tool.events
    for rollout in rollouts:
        key = id(rollout)
        calls = [i for i, event in enumerate(events) if event == ("call", key)]
        assert len(calls) == rollout.tool_calls - rollout.tool_errors.get("malformed", 0)
        ends = [i for i, event in enumerate(events) if event == ("end", key)]
        assert ends and all(call < ends[0] for call in calls), "a session ended before its rollout's last call"
    assert {key for kind, key in events} == {id(r) for r in rollouts}


def test_a_run_stopped_half_way_ends_every_tool_session(tiny_tokenizer):
    backend = ScriptedContinuousBackend(tiny_tokenizer)
    tool = SessionRecordingCalculator()
    engine = make_engine(tiny_tokenizer, backend, tool)
    with pytest.raises(KeyboardInterrupt):
        engine.run(prompts(*EXPRESSIONS), 2, listener=StopAtTurn("3 * 4", 2))
    started = {key for kind, key in tool.events if kind == "call"}
    ended = {key for kind, key in tool.events if kind == "end"}
    assert started and started <= ended
