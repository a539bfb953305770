"""The multi-turn rollout engine (agent/rollout.py) and the HF backend (agent/hf_backend.py).

Engine behaviour is pinned with a scripted backend that writes fixed text (no weights involved),
on the tiny model's real tokenizer and chat template; one HFBackend run on random weights checks
that the sampler's log-probs are the ones the trainer recomputes.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from metis_cli.agent.backend import Generation, GenerationBackend, SamplingParams
from metis_cli.agent.hf_backend import HFBackend
from metis_cli.agent.rollout import OBSERVATION_CUT_MARK, RolloutBatch, RolloutEngine, RolloutListener
from metis_cli.agent.tools.base import ToolErrorKind, ToolResult, error_result
from metis_cli.data import synthetic
from metis_cli.data.chat import tokenize_conversation

SCRIPTED_LOGPROB = -0.5


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    torch.set_num_threads(1)
    return tiny_model_dir


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


class ScriptedBackend:
    """Writes `policy(prompt_text)` for every prompt, cut at the first stop id or max_new_tokens."""

    def __init__(self, tokenizer, policy):
        self.tokenizer = tokenizer
        self.policy = policy
        self.calls = 0

    def generate(self, prompts, params: SamplingParams):
        self.calls += 1
        generations = []
        for prompt in prompts:
            ids = self.tokenizer.encode(self.policy(self.tokenizer.decode(prompt)), add_special_tokens=False)
            stop_at = next((i for i, t in enumerate(ids) if t in params.stop_token_ids), None)
            if stop_at is not None and stop_at < params.max_new_tokens:
                ids, finish = ids[: stop_at + 1], "stop"
            else:
                ids, finish = ids[: params.max_new_tokens], "length"
            generations.append(Generation(ids, [SCRIPTED_LOGPROB] * len(ids), finish))
        return generations

    def update_weights(self, model):
        pass

    def close(self):
        pass


class ScriptedCalculator:
    """The ToolRegistry interface with one calculator that multiplies/adds two integers."""

    def __init__(self, max_calls_per_rollout: int = 4):
        self.max_calls_per_rollout = max_calls_per_rollout
        self.batches: list[int] = []

    def specs(self):
        return [synthetic.CALCULATOR_TOOL_SPEC]

    def names(self):
        return ["calculator"]

    def end_session(self, session):
        pass

    def execute_many(self, requests, sessions=None):
        self.batches.append(len(requests))
        results = []
        for call, calls_so_far in requests:
            if call.error:
                results.append(error_result(ToolErrorKind.MALFORMED, call.error))
            elif calls_so_far >= self.max_calls_per_rollout:
                results.append(error_result(ToolErrorKind.LIMIT_EXCEEDED, "too many calls"))
            else:
                left, op, right = call.arguments["expression"].split()
                value = int(left) * int(right) if op == "*" else int(left) + int(right)
                results.append(ToolResult(text=str(value), runtime_s=0.01))
        return results


def question(prompt_text: str) -> str:
    return re.findall(r"What is (\d+ [*+] \d+)\?", prompt_text)[-1]


def call_then_answer(prompt_text: str) -> str:
    """Calls the calculator once, then answers with the tool's result."""
    results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", prompt_text)
    if not results:
        return synthetic.calculator_call(question(prompt_text)) + " ignored text after the stop"
    return f"<answer>{results[-1]}</answer><|im_end|>"


def prompts(*expressions: str) -> list[list[dict]]:
    return [
        [{"role": "system", "content": synthetic.SYSTEM_PROMPT}, {"role": "user", "content": f"What is {e}?"}]
        for e in expressions
    ]


def engine(tokenizer, policy, tools=None, **limits) -> RolloutEngine:
    settings = dict(max_turns=4, max_new_tokens_per_turn=64, max_total_tokens=512, temperature=1.0, top_p=1.0)
    settings.update(limits)
    return RolloutEngine(ScriptedBackend(tokenizer, policy), tokenizer, tools, **settings)


def sampled_text(tokenizer, rollout) -> list[str]:
    """Decoded runs of loss-mask-1 tokens."""
    runs, run = [], []
    for token, mask in zip(rollout.token_ids + [None], rollout.loss_mask + [0]):
        if mask:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def test_tool_output_is_forced_with_loss_mask_zero(tokenizer):
    tools = ScriptedCalculator()
    rollouts = engine(tokenizer, call_then_answer, tools).run(prompts("278 * 14"), group_size=2)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(0, 0), (0, 1)]
    rollout = rollouts[0]
    call = synthetic.calculator_call("278 * 14")
    assert sampled_text(tokenizer, rollout) == [call, "<answer>3892</answer><|im_end|>"]
    assert "<tool_response>\n3892\n</tool_response>" in tokenizer.decode(rollout.token_ids)
    assert rollout.tool_calls == 1 and rollout.tool_errors == {}
    assert rollout.finish_reason == "answer" and rollout.num_turns == 2
    assert rollout.messages[2:] == [
        {"role": "assistant", "content": call},
        {"role": "tool", "name": "calculator", "content": "3892"},
        {"role": "assistant", "content": "<answer>3892</answer>"},
    ]
    assert rollout.loss_mask[: rollout.prompt_len] == [0] * rollout.prompt_len
    assert rollout.generated_tokens == sum(rollout.loss_mask)


def test_sft_tokenization_of_a_rollout_reproduces_its_ids_and_mask(tokenizer):
    tools = ScriptedCalculator()
    rollout = engine(tokenizer, call_then_answer, tools).run(prompts("31 * 62"), group_size=1)[0]
    ids, mask = tokenize_conversation(tokenizer, rollout.messages, tools.specs())
    length = len(rollout.token_ids)
    assert ids[:length] == rollout.token_ids
    assert mask[:length] == rollout.loss_mask
    assert sum(mask[length:]) == 0  # only the template's trailing newline follows


def test_sampler_logprobs_are_aligned_with_the_loss_mask(tokenizer):
    rollout = engine(tokenizer, call_then_answer, ScriptedCalculator()).run(prompts("5 + 3"), group_size=1)[0]
    assert len(rollout.sampler_logprobs) == len(rollout.loss_mask) == len(rollout.token_ids)
    assert rollout.sampler_logprobs == [SCRIPTED_LOGPROB if m else 0.0 for m in rollout.loss_mask]


def test_all_rollouts_share_one_backend_call_and_one_tool_batch_per_turn(tokenizer):
    tools = ScriptedCalculator()
    runner = engine(tokenizer, call_then_answer, tools)
    rollouts = runner.run(prompts("278 * 14", "9 + 1"), group_size=3)
    assert runner.backend.calls == 2
    assert tools.batches == [6]
    assert [r.messages[-1]["content"] for r in rollouts] == ["<answer>3892</answer>"] * 3 + ["<answer>10</answer>"] * 3


def test_max_turns_ends_a_rollout_that_keeps_calling_tools(tokenizer):
    tools = ScriptedCalculator(max_calls_per_rollout=1)
    always_call = lambda text: synthetic.calculator_call(question(text))  # noqa: E731
    rollout = engine(tokenizer, always_call, tools, max_turns=3).run(prompts("2 + 2"), group_size=1)[0]
    assert rollout.finish_reason == "max_turns" and rollout.num_turns == 3
    # The call in the last turn is not run; the second one is refused by the registry's limit.
    assert rollout.tool_calls == 2
    assert rollout.tool_errors == {ToolErrorKind.LIMIT_EXCEEDED: 1}
    assert tokenizer.decode(rollout.token_ids).endswith("</tool_call>")
    assert [m["role"] for m in rollout.messages[2:]] == ["assistant", "tool", "assistant", "tool", "assistant"]


def test_malformed_tool_call_is_observed_by_the_model_not_raised(tokenizer):
    def broken_call_then_answer(text):
        if "<tool_response>" not in text:
            return '<tool_call>{"name": "calculator", "arguments": </tool_call>'
        return "<answer>?</answer><|im_end|>"

    rollout = engine(tokenizer, broken_call_then_answer, ScriptedCalculator()).run(prompts("2 + 2"), group_size=1)[0]
    assert rollout.tool_calls == 1  # a malformed attempt still counts towards T
    assert rollout.tool_errors == {ToolErrorKind.MALFORMED: 1}
    assert rollout.messages[3]["role"] == "tool" and rollout.messages[3]["content"].startswith("Error: invalid JSON")
    assert "Error: invalid JSON" in tokenizer.decode(rollout.token_ids)
    assert rollout.finish_reason == "answer"


def test_turn_length_limit_cuts_the_rollout(tokenizer):
    rambling = lambda text: "la " * 100  # noqa: E731
    rollout = engine(tokenizer, rambling, ScriptedCalculator(), max_new_tokens_per_turn=10).run(
        prompts("2 + 2"), group_size=1
    )[0]
    assert rollout.finish_reason == "length" and rollout.num_turns == 1
    assert rollout.generated_tokens == 10 == len(rollout.token_ids) - rollout.prompt_len


def test_total_token_limit_is_never_exceeded_and_never_ends_in_a_cut_tool_turn(tokenizer):
    tools = ScriptedCalculator()
    always_call = lambda text: synthetic.calculator_call(question(text))  # noqa: E731
    # Prompts of different lengths share each backend call but not their remaining budgets.
    questions = prompts("2 + 2", "278 * 14")
    short, long = engine(tokenizer, always_call, tools, max_turns=1).run(questions, 1)
    prompt_len, call_len = long.prompt_len, len(short.token_ids) - short.prompt_len
    for max_total in range(prompt_len + 1, prompt_len + 3 * call_len + 40, 3):
        runner = engine(tokenizer, always_call, tools, max_turns=10, max_total_tokens=max_total)
        for rollout in runner.run(questions, group_size=1):
            assert len(rollout.token_ids) <= max_total
            assert rollout.finish_reason == "length"
            assert rollout.loss_mask[-1] == 1  # ends in sampled text, not in a half-rendered tool turn


def test_prompt_longer_than_the_total_limit_generates_nothing(tokenizer):
    runner = engine(tokenizer, call_then_answer, ScriptedCalculator(), max_total_tokens=5)
    rollout = runner.run(prompts("2 + 2"), group_size=2)[0]
    assert runner.backend.calls == 0
    assert rollout.finish_reason == "length" and rollout.generated_tokens == 0


def test_response_budget_excludes_the_prompt_and_counts_tool_turns(tokenizer):
    tools = ScriptedCalculator()
    always_call = lambda text: synthetic.calculator_call(question(text))  # noqa: E731
    # The same question behind prompts of different lengths: the same turns follow both.
    questions = prompts("2 + 2") + [[{"role": "user", "content": "Please help. " * 30 + "What is 2 + 2?"}]]
    for budget in (5, 40, 77, 150):
        runner = engine(tokenizer, always_call, tools, max_turns=10, max_total_tokens=2048, max_response_tokens=budget)
        short, long = runner.run(questions, group_size=1)
        assert long.prompt_len > short.prompt_len + 30
        for rollout in (short, long):
            response = rollout.loss_mask[rollout.prompt_len:]
            assert len(response) <= budget and rollout.finish_reason == "length"
            assert rollout.loss_mask[-1] == 1  # ends in sampled text, not in a half-rendered tool turn
        assert short.token_ids[short.prompt_len:] == long.token_ids[long.prompt_len:]  # the prompt is not counted
        if budget >= 77:
            assert 0 in short.loss_mask[short.prompt_len:]  # the tool turns shown so far count against it


class LongOutputTool(ScriptedCalculator):
    """Answers every call with the numbers 0..299 (far more tokens than the cap below)."""

    def execute_many(self, requests, sessions=None):
        return [ToolResult(text=" ".join(str(i) for i in range(300)), runtime_s=0.01) for _ in requests]


@pytest.mark.parametrize("cap", [None, 20, 5000])
def test_a_long_observation_is_cut_to_its_last_tokens(tokenizer, cap):
    full = " ".join(str(i) for i in range(300))
    rollout = engine(tokenizer, call_then_answer, LongOutputTool(), max_total_tokens=4096,
                     max_observation_tokens=cap).run(prompts("2 + 2"), group_size=1)[0]
    shown = rollout.messages[3]["content"]
    assert rollout.messages[3]["role"] == "tool"
    if cap is None or cap == 5000:  # no cap, or one the output fits under: shown whole
        assert shown == full
    else:
        assert shown.startswith(OBSERVATION_CUT_MARK) and shown.endswith(" 298 299")
        assert len(tokenizer.encode(shown.removeprefix(OBSERVATION_CUT_MARK), add_special_tokens=False)) <= cap
    assert shown in tokenizer.decode(rollout.token_ids)  # what the model saw


def test_real_tool_registry_answers_calls_and_malformed_ones(tokenizer):
    from metis_cli.agent.tools.registry import ToolRegistry
    from metis_cli.recipe.schema import ToolsConfig

    registry = ToolRegistry.from_config(ToolsConfig(enabled=["calculator"]))

    def policy(text):
        if "What is 1 + 1?" in text and "<tool_response>" not in text:
            return "<tool_call>calculator(1 + 1)</tool_call>"
        return call_then_answer(text)

    good, broken = engine(tokenizer, policy, registry).run(prompts("278 * 14", "1 + 1"), group_size=1)
    assert good.messages[3]["content"] == "3892" and good.finish_reason == "answer"
    assert broken.tool_calls == 1 and broken.tool_errors == {ToolErrorKind.MALFORMED: 1}
    assert broken.messages[3]["content"].startswith("Error: malformed tool call")


def test_tools_disabled_render_no_tools_and_a_call_ends_the_rollout(tokenizer):
    tools = ScriptedCalculator()
    seen_prompts = []

    def policy(text):
        seen_prompts.append(text)
        return call_then_answer(text)

    rollout = engine(tokenizer, policy, tools).run(prompts("278 * 14"), group_size=1, use_tools=False)[0]
    assert "<tools>" not in seen_prompts[0]
    assert tools.batches == []
    assert rollout.tool_calls == 0 and rollout.num_turns == 1 and rollout.finish_reason == "eos"


def test_collated_batch_shapes_padding_and_groups(tokenizer):
    rollouts = engine(tokenizer, call_then_answer, ScriptedCalculator()).run(prompts("278 * 14", "9 + 1"), 2)
    batch = RolloutBatch.from_rollouts(rollouts, pad_id=tokenizer.pad_token_id)
    width = max(len(r.token_ids) for r in rollouts)
    assert batch.input_ids.shape == batch.attention_mask.shape == (4, width)
    assert batch.loss_mask.shape == batch.sampler_logprobs.shape == (4, width)
    assert batch.input_ids.dtype == torch.long and batch.loss_mask.dtype == torch.float32
    assert batch.group_ids.tolist() == [0, 0, 1, 1]
    for row, rollout in enumerate(rollouts):
        length = len(rollout.token_ids)
        assert batch.attention_mask[row].sum() == length
        assert batch.input_ids[row, length:].eq(tokenizer.pad_token_id).all()
        assert batch.loss_mask[row, length:].eq(0).all()
        assert batch.loss_mask[row].sum() == rollout.generated_tokens


def tool_happy_model(model_dir):
    """Random weights with `</tool_call>` made likely, so sampled rollouts take several turns."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids("</tool_call>")] *= 40
    return model


def test_hf_rollout_logprobs_are_what_the_trainer_recomputes(model_dir, tokenizer):
    model = tool_happy_model(model_dir)
    model.train()
    temperature = 0.8
    runner = RolloutEngine(HFBackend(model, tokenizer, batch_size=4), tokenizer, ScriptedCalculator(), max_turns=3,
                           max_new_tokens_per_turn=12, max_total_tokens=400, temperature=temperature, top_p=0.95)
    rollouts = runner.run(prompts("278 * 14", "9 + 1"), group_size=3, seed=0)
    assert model.training  # the backend put it in eval mode and back
    assert any(r.num_turns > 1 for r in rollouts), "the sampled rollouts should include tool turns"
    assert all(len(r.token_ids) <= 400 for r in rollouts)
    # Random text stopped at </tool_call> is a malformed call the model saw an error for.
    assert sum(r.tool_errors.get(ToolErrorKind.MALFORMED, 0) for r in rollouts) >= 1

    batch = RolloutBatch.from_rollouts(rollouts, pad_id=tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    recomputed = torch.log_softmax(logits[:, :-1] / temperature, dim=-1).gather(2, batch.input_ids[:, 1:, None])[..., 0]
    sampled = batch.loss_mask[:, 1:].bool()
    assert torch.allclose(recomputed[sampled], batch.sampler_logprobs[:, 1:][sampled], atol=1e-4)


def test_hf_backend_batches_left_padded_prompts_like_single_ones(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    backend = HFBackend(model, tokenizer, batch_size=8)
    assert isinstance(backend, GenerationBackend)
    batch = [tokenizer.encode(text) for text in ("What is 2 + 2?", "Hi", "What is 278 * 14? Think step by step.")]
    stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    greedy = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0, stop_token_ids=stop_ids, greedy=True)
    together = backend.generate(batch, greedy)
    alone = [backend.generate([prompt], greedy)[0] for prompt in batch]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    for a, b in zip(together, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert len(a.token_ids) == 16 or a.token_ids[-1] in stop_ids
    # A vanishing top-p keeps only the most likely token: sampling becomes greedy.
    nucleus = backend.generate(batch, dataclasses.replace(greedy, greedy=False, top_p=1e-9, seed=3))
    assert [g.token_ids for g in nucleus] == [g.token_ids for g in together]


def test_hf_backend_stops_each_row_at_its_own_stop_token(model_dir, tokenizer):
    backend = HFBackend(tool_happy_model(model_dir), tokenizer)
    stop_id = tokenizer.convert_tokens_to_ids("</tool_call>")
    generations = backend.generate([tokenizer.encode("What is 2 + 2?")] * 8,
                                   SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0,
                                                  stop_token_ids=[stop_id], seed=0))
    assert {g.finish_reason for g in generations} == {"stop", "length"}
    for g in generations:
        assert len(g.token_ids) == len(g.logprobs)
        assert stop_id not in g.token_ids[:-1]
        assert (g.finish_reason == "stop") == (g.token_ids[-1] == stop_id)
        assert g.finish_reason == "stop" or len(g.token_ids) == 6


def test_tool_calls_still_running_when_a_run_stops_are_cancelled():
    import asyncio

    from metis_cli.agent.continuous import _ToolLoop

    events = []

    async def long_tool_call():
        try:
            await asyncio.sleep(60)
        finally:
            events.append("torn down")

    with pytest.raises(RuntimeError, match="bug"):
        with _ToolLoop() as loop:
            job = loop.run(long_tool_call())
            raise RuntimeError("a bug half-way through a run")
    assert events == ["torn down"] and job.cancelled()


class RecordingListener(RolloutListener):
    """Every event the engine reports, per rollout, in the order it came."""

    def __init__(self):
        self.events: dict[tuple[int, int], list[tuple]] = {}

    def _add(self, rollout, *event):
        self.events.setdefault((rollout.prompt_index, rollout.sample_index), []).append(event)

    def on_turn_start(self, rollout):
        self._add(rollout, "turn", rollout.num_turns + 1)

    def on_tool_start(self, rollout, call):
        self._add(rollout, "call", call.name, call.error is not None)

    def on_tool_result(self, rollout, call, result):
        self._add(rollout, "result", result.text, result.error)


@pytest.mark.parametrize("continuous", [False, True])
def test_the_listener_hears_every_turn_and_tool_call_in_both_schedules(tiny_tokenizer, continuous):
    from test_continuous_scheduler import GatedCalculator, ScriptedContinuousBackend, make_engine
    from test_continuous_scheduler import prompts as scheduler_prompts

    backend = ScriptedContinuousBackend(tiny_tokenizer)
    listener = RecordingListener()
    runner = make_engine(tiny_tokenizer, backend, GatedCalculator(backend), continuous=continuous)
    rollouts = runner.run(scheduler_prompts("1 + 1", "3 * 4", "6 + 7"), 2, listener=listener)
    assert (backend.steps > 0) == continuous
    assert listener.events[(0, 1)] == [("turn", 1)]
    assert listener.events[(1, 0)] == [("turn", 1), ("call", "calculator", False), ("result", "12", None),
                                       ("turn", 2), ("call", "calculator", False), ("result", "12", None),
                                       ("turn", 3)]
    assert listener.events[(2, 1)] == [("turn", 1), ("call", None, True),
                                       ("result", listener.events[(2, 1)][2][1], "malformed"), ("turn", 2)]
    for rollout in rollouts:  # one turn event per turn, one result per counted call
        events = listener.events[(rollout.prompt_index, rollout.sample_index)]
        assert sum(e[0] == "turn" for e in events) == rollout.num_turns
        assert sum(e[0] == "result" for e in events) == rollout.tool_calls
