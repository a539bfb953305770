"""Token-level rendering of chat conversations, shared by SFT and rollouts.

The one rule this file owns: the token ids a rollout produces are exactly the ids SFT trains on
and the ids the trainer recomputes log-probs on. Both sides therefore cut a conversation into the
same pieces and encode each piece on its own:

    [prompt + generation prompt] [assistant turn 1] [forced: close turn, tool turn, open turn] ...
           loss 0                     loss 1                       loss 0

Which tokens of an assistant turn count as model-generated (loss 1), precisely: every token of
the rendered turn content, plus the end-of-turn token (`<|im_end|>`) that closes it -- except when
the content ends with `</tool_call>`. There the sampler stops at `</tool_call>` and the rollout
engine forces `<|im_end|>` (loss 0), so SFT must not train it either. Everything the template
adds after the end-of-turn token (the newline, tool turns, the next `<|im_start|>assistant\\n`)
is loss 0.

Pieces come from rendering the chat template incrementally and taking text differences, so
templates without `{% generation %}` blocks (the real Qwen ones) work. That requires the template
to be prefix-stable: appending messages only appends text. A template that rewrites earlier turns
raises `ModelError` naming the template's tokenizer.

Must not touch: sampling (agent/rollout.py), dataset loading (data/*), model loading (train/*).
"""

from __future__ import annotations

from typing import Any

from metis_cli.errors import DataError, ModelError

TOOL_CALL_END = "</tool_call>"
# Qwen/ChatML end of an assistant turn; tokenizers without it fall back to their eos token.
CHATML_END_OF_TURN = "<|im_end|>"

Messages = list[dict[str, Any]]


def end_of_turn_token(tokenizer) -> str:
    """The token string that closes an assistant turn in this tokenizer's chat format."""
    # Not get_vocab(): it copies the whole vocabulary, and this runs for every tool turn.
    if tokenizer.convert_tokens_to_ids(CHATML_END_OF_TURN) not in (None, tokenizer.unk_token_id):
        return CHATML_END_OF_TURN
    if tokenizer.eos_token is None:
        raise ModelError(
            f"tokenizer {_template_name(tokenizer)} has neither {CHATML_END_OF_TURN} nor an eos token, "
            "so metis cannot tell where an assistant turn ends; set eos_token in tokenizer_config.json"
        )
    return tokenizer.eos_token


def end_of_turn_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids a rollout must stop generating at, for any chat tokenizer.

    The ids of `</tool_call>` (pause to run the tool) and `<|im_end|>` / the eos token (turn over),
    each included only when the tokenizer spells it as one token; otherwise the caller has to stop
    on the string instead. Order is stable and ids are unique.
    """
    stop_ids: list[int] = []
    for text in (TOOL_CALL_END, CHATML_END_OF_TURN):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in stop_ids:
            stop_ids.append(ids[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
        stop_ids.append(tokenizer.eos_token_id)
    return stop_ids


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of one rendered piece; the template already wrote every special token."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def render(tokenizer, messages: Messages, tools: list[dict] | None, *, add_generation_prompt: bool) -> str:
    """The chat template's text for `messages` (tools rendered into the system turn)."""
    if tokenizer.chat_template is None:
        raise ModelError(
            f"tokenizer {_template_name(tokenizer)} has no chat template; "
            "use an instruct model or add chat_template to tokenizer_config.json"
        )
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def prompt_ids(tokenizer, messages: Messages, tools: list[dict] | None) -> list[int]:
    """Ids of the prompt conversation followed by the opening of an assistant turn."""
    return encode_text(tokenizer, render(tokenizer, messages, tools, add_generation_prompt=True))


def continuation_after_tools(
    tokenizer, messages_so_far: Messages, tool_messages: Messages, tools: list[dict] | None
) -> list[int]:
    """Forced ids after a `</tool_call>` stop: close the turn, render tool turns, open the next turn.

    `messages_so_far` ends with the assistant message whose content ends with `</tool_call>`
    (the text the sampler produced); `tool_messages` are the `tool` turns answering it.
    """
    if not messages_so_far or messages_so_far[-1].get("role") != "assistant":
        raise ValueError("continuation_after_tools needs messages ending with the assistant tool-call turn")
    turn_start = render(tokenizer, messages_so_far[:-1], tools, add_generation_prompt=True)
    return render_tool_turns(tokenizer, messages_so_far, tool_messages, tools, turn_start)[0]


def render_tool_turns(
    tokenizer, messages_so_far: Messages, tool_messages: Messages, tools: list[dict] | None, turn_start: str
) -> tuple[list[int], str]:
    """`continuation_after_tools` for a caller that already has `turn_start`, the rendered text of
    `messages_so_far[:-1]` with the assistant turn opened (the rollout engine keeps it from the
    previous turn, saving one of three renders). Returns (forced ids, the rendered text up to the
    newly opened assistant turn: the next call's `turn_start`)."""
    before = render(tokenizer, messages_so_far, tools, add_generation_prompt=False)
    _require_prefix(tokenizer, turn_start, before, "the assistant turn")
    _, closing, ends_with_tool_call = _split_assistant_turn(tokenizer, before[len(turn_start) :])
    if not ends_with_tool_call:
        raise ModelError(
            f"chat template of {_template_name(tokenizer)} did not render the assistant turn ending in "
            f"{TOOL_CALL_END} as content followed by {end_of_turn_token(tokenizer)}; rendered: "
            f"{before[len(turn_start):]!r}"
        )
    after = render(tokenizer, messages_so_far + tool_messages, tools, add_generation_prompt=True)
    _require_prefix(tokenizer, before, after, "the tool turn(s)")
    return encode_text(tokenizer, closing + after[len(before) :]), after


def tokenize_conversation(tokenizer, messages: Messages, tools: list[dict] | None) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_mask) of a whole conversation for SFT.

    assistant_mask is 1 exactly on the tokens a rollout would have sampled (see module docstring),
    0 on the system/user/tool turns and on template text around the assistant content.
    """
    pieces: list[tuple[str, int]] = []
    covered = ""  # rendered text already cut into pieces
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if index == 0:
            raise DataError("conversation starts with an assistant turn; it needs a user (or system) message first")
        turn_start = render(tokenizer, messages[:index], tools, add_generation_prompt=True)
        with_turn = render(tokenizer, messages[: index + 1], tools, add_generation_prompt=False)
        _require_prefix(tokenizer, covered, turn_start, f"message {index - 1}")
        _require_prefix(tokenizer, turn_start, with_turn, f"assistant message {index}")
        generated, closing, _ = _split_assistant_turn(tokenizer, with_turn[len(turn_start) :])
        pieces += [(turn_start[len(covered) :], 0), (generated, 1), (closing, 0)]
        covered = with_turn
    whole = render(tokenizer, messages, tools, add_generation_prompt=False)
    _require_prefix(tokenizer, covered, whole, "the last message")
    pieces.append((whole[len(covered) :], 0))

    input_ids: list[int] = []
    assistant_mask: list[int] = []
    for text, mask in _merge_adjacent(pieces):
        ids = encode_text(tokenizer, text)
        input_ids += ids
        assistant_mask += [mask] * len(ids)
    return input_ids, assistant_mask


def _split_assistant_turn(tokenizer, turn_text: str) -> tuple[str, str, bool]:
    """Cut one rendered assistant turn into (generated, closing, ends_with_tool_call)."""
    end_token = end_of_turn_token(tokenizer)
    end_at = turn_text.rfind(end_token)
    if end_at < 0:
        raise ModelError(
            f"chat template of {_template_name(tokenizer)} does not close assistant turns with "
            f"{end_token}; rendered turn: {turn_text!r}"
        )
    content = turn_text[:end_at]
    if content.rstrip().endswith(TOOL_CALL_END):
        generated_len = len(content.rstrip())
        return turn_text[:generated_len], turn_text[generated_len:], True
    generated_len = end_at + len(end_token)
    return turn_text[:generated_len], turn_text[generated_len:], False


def _merge_adjacent(pieces: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Join neighbouring pieces with the same mask: the rollout encodes each forced run as one text."""
    merged: list[tuple[str, int]] = []
    for text, mask in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == mask:
            merged[-1] = (merged[-1][0] + text, mask)
        else:
            merged.append((text, mask))
    return merged


def _require_prefix(tokenizer, shorter: str, longer: str, appended: str) -> None:
    if longer.startswith(shorter):
        return
    at = next((i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
    raise ModelError(
        f"chat template of {_template_name(tokenizer)} is not prefix-stable: adding {appended} changed "
        f"earlier text at character {at} ({shorter[at:at + 40]!r} became {longer[at:at + 40]!r}). "
        "metis renders conversations incrementally and needs a template where appending a message only "
        "appends text (the Qwen2.5/Qwen3 ChatML templates are); edit chat_template in tokenizer_config.json"
    )


def _template_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
