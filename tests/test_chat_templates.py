"""Real chat templates (data/chat.py): SFT ids equal rollout ids under a Qwen3-style template.

The templates here are written for these tests. QWEN3_LIKE behaves as the chat template the
Qwen3 models ship does, on the points metis depends on:
- the last assistant turn after the last user question is rendered with a think block, empty when
  the message has no reasoning; the same turn once messages follow it has none (so appending a
  tool turn re-renders it);
- reasoning comes from `reasoning_content`, else from a `<think>...</think>` prefix of the
  content, and assistant turns before the last user question lose it;
- consecutive `tool` messages share one user turn of `<tool_response>` blocks;
- the generation prompt is `<|im_start|>assistant\\n`, plus an empty think block when the
  template variable `enable_thinking` is false (recipe `model.chat_template_kwargs`).
Each behaviour is checked against the real RolloutEngine (scripted backend, tiny tokenizer) or
the render functions it calls, with exact loss masks; two more templates that rewrite earlier
tool and user text must be refused, saying what they rewrote.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_rollout import ScriptedCalculator, call_then_answer, engine, prompts, question, sampled_text

from metis_cli.data import synthetic
from metis_cli.data.chat import (
    continuation_after_tools,
    prompt_ids,
    render,
    tokenize_conversation,
    tokenize_runs,
)
from metis_cli.errors import ModelError
from metis_cli.model.loading import load_tokenizer

REPO = Path(__file__).resolve().parents[1]

QWEN3_LIKE = r"""
{%- set state = namespace(last_question=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{% set state.last_question = loop.index0 %}{% endif %}
{%- endfor %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- 'Tools you may call:\n<tools>' }}
    {%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
    {{- '\n</tools><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set text = message.content or '' %}
        {%- set thought = '' %}
        {%- if message.reasoning_content is string %}
            {%- set thought = message.reasoning_content %}
        {%- elif '</think>' in text %}
            {%- set thought = text.split('</think>')[0].split('<think>')[-1] %}
            {%- set text = text.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > state.last_question and (loop.last or thought.strip('\n')) %}
            {{- '<think>\n' + thought.strip('\n') + '\n</think>\n\n' }}
        {%- endif %}
        {{- text + '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
""".strip()

_PLAIN_TURNS = r"""
{%- for message in messages %}
    {%- if message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + TOOL + '\n</tool_response><|im_end|>\n' }}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + message.content + USER + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
SHORTENS_OLD_TOOL_RESULTS = _PLAIN_TURNS.replace("USER", "''").replace(
    "TOOL", "(message.content if messages[loop.index0:] | selectattr('role', 'eq', 'tool') | list | length == 1 "
            "else '[older result]')")
"""Shows only the latest tool result in full, so a new tool turn rewrites the previous one."""
COUNTS_TOOL_RESULTS_IN_THE_QUESTION = _PLAIN_TURNS.replace("TOOL", "message.content").replace(
    "USER", "' (' + (messages | selectattr('role', 'eq', 'tool') | list | length | string) + ' results)'")
"""Writes the number of tool results into the user turn, so every tool turn rewrites it."""

CALL = synthetic.calculator_call("278 * 14")
EMPTY_THINK = "<think>\n\n</think>\n\n"
FORCED_AFTER_CALL = ("<|im_end|>\n<|im_start|>user\n<tool_response>\n3892\n</tool_response><|im_end|>\n"
                     "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def template_dir(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model folder with a chat template of the test's choosing."""
    def make(template: str) -> Path:
        folder = tmp_path_factory.mktemp("template") / "model"
        shutil.copytree(tiny_model_dir, folder)
        (folder / "chat_template.jinja").write_text(template)
        return folder
    return make


@pytest.fixture(scope="module")
def qwen3(template_dir):
    return load_tokenizer(str(template_dir(QWEN3_LIKE)))


@pytest.fixture(scope="module")
def qwen3_no_thinking(template_dir):
    return load_tokenizer(str(template_dir(QWEN3_LIKE)), chat_template_kwargs={"enable_thinking": False})


def thinking(reasoning: str = ""):
    """A scripted policy of a thinking model: a think block, then call_then_answer's text."""
    return lambda prompt_text: f"<think>\n{reasoning}\n</think>\n\n" + call_then_answer(prompt_text)


def dataset_conversation(**assistant_fields) -> list[dict]:
    """A cold-start trajectory as data files hold it: no think blocks in the content."""
    return prompts("278 * 14")[0] + [
        {"role": "assistant", "content": CALL, **assistant_fields.get("call", {})},
        {"role": "tool", "name": "calculator", "content": "3892"},
        {"role": "assistant", "content": "<answer>3892</answer>", **assistant_fields.get("answer", {})},
    ]


def forced_texts(tokenizer, rollout) -> list[str]:
    """Decoded runs of loss-mask-0 tokens after the prompt."""
    after_prompt = slice(rollout.prompt_len, None)
    return sampled_text(tokenizer, SimpleNamespace(token_ids=rollout.token_ids[after_prompt],
                                                   loss_mask=[1 - m for m in rollout.loss_mask[after_prompt]]))


def assert_sft_reproduces(tokenizer, rollout, sft: tuple[list[int], list[int]]) -> None:
    ids, mask = sft
    length = len(rollout.token_ids)
    assert ids[:length] == rollout.token_ids
    assert mask[:length] == rollout.loss_mask
    assert tokenizer.decode(ids[length:]) == "\n" and not any(mask[length:])  # the template's last newline


def test_empty_think_block_is_trained_on_each_turn_and_dropped_once_tools_follow(qwen3):
    tools = ScriptedCalculator()
    rollout = engine(qwen3, thinking(), tools).run(prompts("278 * 14"), group_size=1)[0]
    assert sampled_text(qwen3, rollout) == [EMPTY_THINK + CALL, EMPTY_THINK + "<answer>3892</answer><|im_end|>"]
    assert forced_texts(qwen3, rollout) == [FORCED_AFTER_CALL]
    assert_sft_reproduces(qwen3, rollout, tokenize_conversation(qwen3, rollout.messages, tools.specs()))
    # The data file's spelling (no think block) is trained as the model writes it: the same ids.
    assert (tokenize_conversation(qwen3, dataset_conversation(), tools.specs())
            == tokenize_conversation(qwen3, rollout.messages, tools.specs()))


@pytest.mark.parametrize("spelling", ["reasoning_content", "think prefix"])
def test_reasoning_is_trained_where_the_model_writes_it(qwen3, spelling):
    tools = ScriptedCalculator()
    rollout = engine(qwen3, thinking("Use the calculator."), tools).run(prompts("278 * 14"), group_size=1)[0]
    think = "<think>\nUse the calculator.\n</think>\n\n"
    assert sampled_text(qwen3, rollout) == [think + CALL, think + "<answer>3892</answer><|im_end|>"]
    if spelling == "reasoning_content":
        fields = {"reasoning_content": "Use the calculator."}
        conversation = dataset_conversation(call=fields, answer=fields)
    else:
        conversation = rollout.messages
    assert_sft_reproduces(qwen3, rollout, tokenize_conversation(qwen3, conversation, tools.specs()))
    # A turn with reasoning keeps its think block once tools follow it (the next prompt shows it).
    assert render(qwen3, conversation[:4], tools.specs(), add_generation_prompt=True).count(think) == 1


def test_reasoning_of_an_answered_question_is_dropped_from_the_next_questions_prompt(qwen3, tiny_tokenizer):
    tools = ScriptedCalculator()
    first = "<think>\nI know this one.\n</think>\n\n<answer>3892</answer>"
    conversation = prompts("278 * 14")[0] + [{"role": "assistant", "content": first},
                                              {"role": "user", "content": "What is 31 * 62?"}]
    rollouts = [engine(qwen3, lambda _: first + "<|im_end|>", tools).run([conversation[:2]], group_size=1)[0],
                engine(qwen3, thinking(), tools).run([conversation], group_size=1)[0]]
    conversation = rollouts[1].messages
    runs = tokenize_runs(qwen3, conversation, tools.specs())
    assert len(runs) == 2  # the chat REPL asks each question as one engine run
    for rollout, run in zip(rollouts, runs):
        assert_sft_reproduces(qwen3, rollout, run)
    assert "I know this one." in qwen3.decode(runs[0][0]) and "I know this one." not in qwen3.decode(runs[1][0])
    assert sampled_text(qwen3, rollouts[1]) == [EMPTY_THINK + synthetic.calculator_call("31 * 62"),
                                                EMPTY_THINK + "<answer>1922</answer><|im_end|>"]
    # A prefix-stable template keeps the whole conversation in one sequence.
    assert len(tokenize_runs(tiny_tokenizer, conversation, tools.specs())) == 1


def test_tool_results_of_one_turn_share_one_user_turn(qwen3):
    calls = CALL + synthetic.calculator_call("2 + 2")
    conversation = prompts("278 * 14")[0] + [
        {"role": "assistant", "content": calls},
        {"role": "tool", "content": "3892"}, {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "<answer>3892</answer>"},
    ]
    forced = continuation_after_tools(qwen3, conversation[:3], conversation[3:5], None)
    assert qwen3.decode(forced) == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n3892\n</tool_response>\n"
                                    "<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    prompt = prompt_ids(qwen3, conversation[:2], None)
    turns = [qwen3.encode(text, add_special_tokens=False)
             for text in (EMPTY_THINK + calls, EMPTY_THINK + "<answer>3892</answer><|im_end|>")]
    ids, mask = tokenize_conversation(qwen3, conversation, None)
    assert ids[: len(prompt + turns[0] + forced + turns[1])] == prompt + turns[0] + forced + turns[1]
    assert mask == [0] * len(prompt) + [1] * len(turns[0]) + [0] * len(forced) + [1] * len(turns[1]) + [0]


def test_enable_thinking_false_puts_the_empty_think_block_in_every_generation_prompt(qwen3_no_thinking):
    tokenizer, tools = qwen3_no_thinking, ScriptedCalculator()
    rollout = engine(tokenizer, call_then_answer, tools).run(prompts("278 * 14"), group_size=1)[0]
    assert tokenizer.decode(rollout.token_ids[: rollout.prompt_len]).endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    assert sampled_text(tokenizer, rollout) == [CALL, "<answer>3892</answer><|im_end|>"]
    assert forced_texts(tokenizer, rollout) == [FORCED_AFTER_CALL + EMPTY_THINK]
    assert_sft_reproduces(tokenizer, rollout, tokenize_conversation(tokenizer, dataset_conversation(), tools.specs()))


def test_recipe_chat_template_kwargs_reach_the_policy_tokenizer(template_dir):
    from metis_cli.model.loading import load_policy
    from metis_cli.recipe import load_recipe

    folder = template_dir(QWEN3_LIKE)
    for kwargs, opening in (("{}", "<|im_start|>assistant\n"), ("{enable_thinking: false}", "<|im_start|>assistant\n"
                                                                                           + EMPTY_THINK)):
        recipe = load_recipe(REPO / "recipes" / "tiny.yaml", [f"model.name_or_path={folder}",
                                                              f"model.chat_template_kwargs={kwargs}"])
        _, tokenizer = load_policy(str(folder), recipe, device="cpu", field="model.name_or_path", trainable=False)
        prompt = render(tokenizer, prompts("2 + 2")[0], None, add_generation_prompt=True)
        assert prompt.split("What is 2 + 2?<|im_end|>\n")[1] == opening


@pytest.mark.parametrize(("template", "rewritten"), [
    (SHORTENS_OLD_TOOL_RESULTS, r"rewrote the content of the tool turn \(message 3\)"),
    (COUNTS_TOOL_RESULTS_IN_THE_QUESTION, r"rewrote the template text of the user turn \(message 1\)"),
], ids=["shortens old tool results", "counts tool results in the question"])
def test_template_that_rewrites_earlier_tool_or_user_text_is_refused_saying_what(template_dir, template, rewritten):
    tokenizer, tools = load_tokenizer(str(template_dir(template))), ScriptedCalculator()

    def call_twice(prompt_text: str) -> str:
        results = re.findall(r"<tool_response>\n(\d+)\n</tool_response>", prompt_text)
        if len(results) < 2:
            return synthetic.calculator_call(f"{results[-1]} + 1" if results else question(prompt_text))
        return f"<answer>{results[-1]}</answer><|im_end|>"

    conversation = dataset_conversation()[:4] + [
        {"role": "assistant", "content": synthetic.calculator_call("3892 + 1")},
        {"role": "tool", "name": "calculator", "content": "3893"},
        {"role": "assistant", "content": "<answer>3893</answer>"},
    ]
    with pytest.raises(ModelError, match="not prefix-stable where metis needs it: adding the tool turn") as raised:
        engine(tokenizer, call_twice, tools).run(prompts("278 * 14"), group_size=1)
    assert re.search(rewritten, str(raised.value)), raised.value
    with pytest.raises(ModelError, match=rewritten):
        tokenize_conversation(tokenizer, conversation, None)


def test_template_arguments_metis_sets_are_refused_as_template_variables():
    from metis_cli.errors import RecipeError
    from metis_cli.recipe import load_recipe

    with pytest.raises(RecipeError, match=r"model\.chat_template_kwargs: .*tools is set by metis itself"):
        load_recipe(REPO / "recipes" / "tiny.yaml", ["model.chat_template_kwargs={tools: [], enable_thinking: false}"])


@pytest.mark.slow
def test_sft_then_two_hdpo_steps_on_the_tiny_model_with_the_qwen3_like_template(template_dir, tmp_path, monkeypatch):
    from test_training import cli, small_overrides
    from typer.testing import CliRunner

    from metis_cli.cli.main import app

    model = template_dir(QWEN3_LIKE)
    monkeypatch.chdir(tmp_path)
    args = cli(small_overrides(tmp_path / "run", **{
        "model.name_or_path": str(model), "hdpo.steps": "2", "hdpo.prompts_per_step": "2", "hdpo.eval_every": "1000",
        "rollout.max_new_tokens": "48", "rollout.max_total_tokens": "256",  # room for the think block
    }))
    for stage in ("sft", "hdpo"):
        result = CliRunner().invoke(app, [stage, str(REPO / "recipes" / "tiny.yaml"), "--quiet", *args])
        assert result.exit_code == 0, result.output
    sft_records = map(json.loads, (tmp_path / "run" / "sft" / "metrics.jsonl").open())
    sft_losses = [r["loss"] for r in sft_records if "loss" in r]
    assert sft_losses and all(math.isfinite(loss) for loss in sft_losses)
    # hdpo starts from the sft model, whose saved tokenizer carries the template.
    assert (tmp_path / "run" / "sft" / "final" / "chat_template.jinja").read_text() == QWEN3_LIKE
    steps = [r for r in map(json.loads, (tmp_path / "run" / "hdpo" / "metrics.jsonl").open()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    samples = [json.loads(line) for line in (tmp_path / "run" / "hdpo" / "rollouts" / "step_000001.jsonl").open()]
    assert samples and all(any(m["role"] == "assistant" for m in s["messages"]) for s in samples)
