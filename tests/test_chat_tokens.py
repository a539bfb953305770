"""Chat rendering at token level (data/chat.py) on the tiny model's tokenizer and template."""

from __future__ import annotations

import pytest

from metis_cli.data import synthetic
from metis_cli.data.chat import continuation_after_tools, prompt_ids, tokenize_conversation
from metis_cli.errors import DataError, ModelError

TOOLS = [synthetic.CALCULATOR_TOOL_SPEC]
CALL = synthetic.calculator_call("278 * 14")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


def conversation() -> list[dict]:
    return [
        {"role": "system", "content": synthetic.SYSTEM_PROMPT},
        {"role": "user", "content": "What is 278 * 14?"},
        {"role": "assistant", "content": CALL},
        {"role": "tool", "name": "calculator", "content": "3892"},
        {"role": "assistant", "content": "<answer>3892</answer>"},
    ]


def trained_pieces(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of consecutive mask-1 tokens."""
    pieces, run = [], []
    for token, keep in zip(ids + [None], mask + [0]):
        if keep:
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    return pieces


def test_sft_mask_covers_exactly_what_the_sampler_generates(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, conversation(), TOOLS)
    assert len(ids) == len(mask)
    # The tool-call turn ends at </tool_call> (the sampler stops there; <|im_end|> is forced),
    # the answer turn includes the <|im_end|> the model must learn to emit.
    assert trained_pieces(tokenizer, ids, mask) == [CALL, "<answer>3892</answer><|im_end|>"]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conversation(), tools=TOOLS, tokenize=False)


def test_tool_output_and_prompt_are_never_trained(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, conversation(), TOOLS)
    untrained = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "<tool_response>\n3892\n</tool_response>" in untrained
    assert "What is 278 * 14?" in untrained
    assert '"description": "Evaluate an arithmetic expression."' in untrained


def test_pieces_concatenate_to_the_rollout_token_stream(tokenizer):
    messages = conversation()
    ids, _ = tokenize_conversation(tokenizer, messages, TOOLS)
    prompt = prompt_ids(tokenizer, messages[:2], TOOLS)
    call = tokenizer.encode(CALL, add_special_tokens=False)
    forced = continuation_after_tools(tokenizer, messages[:3], messages[3:4], TOOLS)
    answer = tokenizer.encode("<answer>3892</answer><|im_end|>", add_special_tokens=False)
    assert ids[: len(prompt) + len(call) + len(forced) + len(answer)] == prompt + call + forced + answer
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(forced) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n3892\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_several_tool_results_render_as_one_forced_block(tokenizer):
    calls = CALL + synthetic.calculator_call("2 + 2")
    messages = [conversation()[1], {"role": "assistant", "content": calls}]
    results = [{"role": "tool", "content": "3892"}, {"role": "tool", "content": "4"}]
    forced = tokenizer.decode(continuation_after_tools(tokenizer, messages, results, None))
    assert forced == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n3892\n</tool_response>"
        "\n<tool_response>\n4\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    ids, mask = tokenize_conversation(tokenizer, messages + results + [{"role": "assistant", "content": "ok"}], None)
    assert trained_pieces(tokenizer, ids, mask) == [calls, "ok<|im_end|>"]


def test_prompt_without_tools_renders_no_tool_listing(tokenizer):
    text = tokenizer.decode(prompt_ids(tokenizer, conversation()[:2], None))
    assert "<tools>" not in text and text.endswith("<|im_start|>assistant\n")


def test_template_that_rewrites_earlier_turns_is_refused_by_name(tokenizer):
    unstable = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # Announces the number of messages up front, so every appended turn changes the first line.
    unstable.chat_template = (
        "{{ messages|length }} turns\n{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ModelError, match="not prefix-stable") as raised:
        tokenize_conversation(unstable, conversation(), None)
    assert str(tokenizer.name_or_path) in str(raised.value)
    with pytest.raises(ModelError, match="not prefix-stable"):
        continuation_after_tools(unstable, conversation()[:3], conversation()[3:4], None)


def test_conversation_must_not_start_with_the_assistant(tokenizer):
    with pytest.raises(DataError, match="starts with an assistant turn"):
        tokenize_conversation(tokenizer, [{"role": "assistant", "content": "hi"}], None)
