"""The tiny built-in model: loads like a hub model, tokenizes the task compactly and exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from metis_cli.data import synthetic
from metis_cli.errors import ModelError
from metis_cli.data.chat import stop_token_ids
from metis_cli.model.tiny import MARKER_TOKENS, SPECIAL_TOKENS, build_tiny_model

torch.set_num_threads(1)
TOOLS = [synthetic.CALCULATOR_TOOL_SPEC]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _hard_tool_trajectory() -> list[dict]:
    return synthetic.cold_start_trajectories(2, seed=0, hard_share=1.0)[0]["messages"]


def test_folder_reloads_as_a_standard_float32_qwen3(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert config.model_type == "qwen3"
    assert config.tie_word_embeddings
    assert model.dtype == torch.float32
    assert config.vocab_size == len(tokenizer) < 1000
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    end_of_turn_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == end_of_turn_id == model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.pad_token == "<|endoftext|>"


def test_markers_and_digits_are_single_tokens(tokenizer):
    for marker in SPECIAL_TOKENS + MARKER_TOKENS:
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    assert len(tokenizer.encode("0123456789", add_special_tokens=False)) == 10
    # digits stay separate even inside text the merges were trained on
    pieces = tokenizer.tokenize("What is 123 * 45?")
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == ["1", "2", "3", "4", "5"]


def test_rendered_tool_conversation_round_trips_exactly(tokenizer):
    text = tokenizer.apply_chat_template(_hard_tool_trajectory(), tools=TOOLS, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", [
    "héllo wörld 🎉\n\n  two  spaces\tand a tab ",
    " <tool_call>x</tool_call> <answer> 5 </answer>\n",
    'Traceback (most recent call last):\n  File "<stdin>", line 1\n$ ls ~/ | grep [a-z]*',
])
def test_arbitrary_text_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tool_using_trajectory_stays_short(tokenizer):
    rows = synthetic.cold_start_trajectories(200, seed=0)
    lengths = [len(tokenizer.apply_chat_template(row["messages"], tools=TOOLS)["input_ids"])
               for row in rows]
    assert max(lengths) <= 60  # hard question, tool call, 5-digit answer, system turn included
    prompt = synthetic.rl_prompts(1, seed=0, hard_share=1.0)[0]["messages"]
    prompt_ids = tokenizer.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True)
    assert len(prompt_ids["input_ids"]) <= 25


def test_chat_template_renders_tools_and_tool_turns_like_qwen(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function",
             "function": {"name": "calculator", "arguments": {"expression": "2 + 2"}}},
            {"type": "function",
             "function": {"name": "calculator", "arguments": '{"expression": "2 * 2"}'}},
        ]},
        {"role": "tool", "name": "calculator", "content": "4"},
        {"role": "tool", "name": "calculator", "content": "4"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True,
                                         tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.\n<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools><|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n" + synthetic.calculator_call("2 + 2")
        + synthetic.calculator_call("2 * 2") + "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<tool_response>\n4\n"
        "</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_tools = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert without_tools == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                             "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n")


def test_tool_calls_field_and_text_form_render_identically(tokenizer):
    as_text = _hard_tool_trajectory()
    expression = json.loads(as_text[2]["content"].removeprefix("<tool_call>")
                            .removesuffix("</tool_call>"))["arguments"]["expression"]
    as_field = [*as_text[:2], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function",
         "function": {"name": "calculator", "arguments": {"expression": expression}}}]},
        *as_text[3:]]
    assert (tokenizer.apply_chat_template(as_field, tools=TOOLS, tokenize=False)
            == tokenizer.apply_chat_template(as_text, tools=TOOLS, tokenize=False))


def test_assistant_mask_covers_exactly_what_the_assistant_wrote(tokenizer):
    rendered = tokenizer.apply_chat_template(
        _hard_tool_trajectory(), tools=TOOLS, return_dict=True, return_assistant_tokens_mask=True)
    written = [i for i, keep in zip(rendered["input_ids"], rendered["assistant_masks"]) if keep]
    text = tokenizer.decode(written)
    assert text.startswith("<tool_call>") and text.endswith("</answer><|im_end|>")
    assert "<tool_response>" not in text and "What is" not in text


def test_forward_pass_and_generation_stop_on_the_stop_tokens(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = synthetic.rl_prompts(1, seed=0)[0]["messages"]
    inputs = tokenizer.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs, labels=inputs["input_ids"])
    assert output.logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(output.loss)
    stop_ids = stop_token_ids(tokenizer)
    assert stop_ids == [tokenizer.convert_tokens_to_ids(t) for t in ("</tool_call>", "<|im_end|>")]
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=stop_ids)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_stop_token_ids_skip_strings_that_are_not_single_tokens():
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(
        pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_end|>"])
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    assert stop_token_ids(plain) == [plain.convert_tokens_to_ids("<|im_end|>")]


def test_build_is_idempotent_and_deterministic(model_dir, tmp_path):
    weights_file = model_dir / "model.safetensors"
    written_at_ns = weights_file.stat().st_mtime_ns
    assert build_tiny_model(model_dir, hidden_size=64) == model_dir
    assert weights_file.stat().st_mtime_ns == written_at_ns
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["model"]  # no temp left behind

    again = build_tiny_model(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    first, second = load_file(weights_file), load_file(again / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_refuses_to_overwrite_a_folder_that_is_not_a_tiny_model(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="not a tiny model folder"):
        build_tiny_model(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
