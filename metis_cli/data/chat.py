"""Token-level rendering of chat conversations, shared by SFT and rollouts.

The one rule this file owns: the token ids a rollout produces are exactly the ids SFT trains on
and the ids the trainer recomputes log-probs on. Both sides therefore cut a conversation into the
same pieces and encode each piece on its own:

    [prompt + generation prompt] [assistant turn 1] [forced: close turn, tool turn, open turn] ...
           loss 0                     loss 1                       loss 0

- The prompt is the chat template's rendering of the messages before the turn, ending in the
  generation prompt (`<|im_start|>assistant\\n`, plus whatever the template adds there: an empty
  think block for Qwen3 with `enable_thinking: false`).
- An assistant turn is its text as the model generates it: what the template writes after the
  generation prompt when that message is the last one. For Qwen3-style templates this includes
  the `<think>...</think>` block (empty when the message has no reasoning). Loss 1 covers it and
  the end-of-turn token (`<|im_end|>`) that closes it -- except after `</tool_call>`: there the
  sampler stops and the engine forces `<|im_end|>` (loss 0), so SFT must not train it either.
- The forced text after a tool call (the rest of the turn, the tool turns, the next generation
  prompt) is taken from the rendering up to the next assistant turn, in which the turn is no
  longer last. Templates may render a turn differently once others follow it (Qwen3 drops its
  empty think block); the rollout keeps the text the model generated, so only the text *after*
  the turn comes from that rendering. The turn ends at its end-of-turn token.

So templates without `{% generation %}` blocks (the real Qwen ones) work, and a template needs
only this: appending tool turns leaves the turns before the one being extended as they were, and
the generation prompt opens a turn the way the template renders that turn as the last message.
A template that breaks it raises `ModelError` saying what it rewrote. A new user question starts
a new engine run (the chat REPL re-renders the history for each question), which a template may
render afresh (Qwen3 drops the reasoning of answered questions): `tokenize_runs` then gives one
sequence per run.

Extra template variables (`model.chat_template_kwargs`, e.g. `enable_thinking`) are stored on the
tokenizer when it is loaded (`set_chat_template_kwargs`), so every render here passes them.

For users: docs/formats.md (How conversations become tokens).

Must not touch: sampling (agent/rollout.py), dataset loading (data/*), model loading (model/*).
"""

from __future__ import annotations

from typing import Any

from metis_cli.errors import DataError, ModelError

TOOL_CALL_END = "</tool_call>"
# Qwen/ChatML end of an assistant turn; tokenizers without it fall back to their eos token.
CHATML_END_OF_TURN = "<|im_end|>"
CHAT_TEMPLATE_KWARGS = "metis_chat_template_kwargs"
"""The tokenizer attribute holding extra variables for its chat template (set_chat_template_kwargs)."""

Messages = list[dict[str, Any]]


def set_chat_template_kwargs(tokenizer, kwargs: dict[str, Any] | None) -> None:
    """Make every render of this tokenizer pass `kwargs` to its chat template (the recipe's
    `model.chat_template_kwargs`); stored on the tokenizer, so SFT, rollouts, eval and chat that
    share it render alike."""
    setattr(tokenizer, CHAT_TEMPLATE_KWARGS, dict(kwargs or {}))


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
    """The chat template's text for `messages` (tools rendered into the system turn), with the
    tokenizer's chat-template variables (set_chat_template_kwargs)."""
    if tokenizer.chat_template is None:
        raise ModelError(
            f"tokenizer {_template_name(tokenizer)} has no chat template; "
            "use an instruct model or add chat_template to tokenizer_config.json"
        )
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False,
        **getattr(tokenizer, CHAT_TEMPLATE_KWARGS, {}),
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
    previous turn, saving a render). Returns (forced ids, the rendered text up to the newly opened
    assistant turn: the next call's `turn_start`)."""
    messages = messages_so_far + tool_messages
    after = render(tokenizer, messages, tools, add_generation_prompt=True)
    forced = _after_turn(tokenizer, turn_start, after, messages, "the tool turn(s)", tool_call=True)
    return encode_text(tokenizer, forced), after


def tokenize_runs(tokenizer, messages: Messages, tools: list[dict] | None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, assistant_mask) of each engine run in a conversation, for SFT.

    A run is what one `RolloutEngine.run` produces: a prompt, then assistant turns, each after the
    tool turns answering the one before. Every other message before an assistant turn (a new user
    question) starts a new run from the prompt the engine would render for it, as the chat REPL
    does; it stays in the same sequence when that prompt extends the text so far (prefix-stable
    templates, so one sequence per conversation), else it is a sequence of its own (Qwen3-style
    templates, which drop the reasoning of answered questions).
    assistant_mask is 1 exactly on the tokens a rollout would have sampled (see module docstring),
    0 on the system/user/tool turns and on template text around the assistant content.
    """
    runs: list[list[tuple[str, int]]] = []
    text = ""  # the current sequence's text
    turn_start = closing = ""  # the previous assistant turn's prompt, and its text after the generated part
    ends_with_tool_call, previous = False, -1
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if index == 0:
            raise DataError("conversation starts with an assistant turn; it needs a user (or system) message first")
        opened = render(tokenizer, messages[:index], tools, add_generation_prompt=True)
        answers_call = ends_with_tool_call and index > previous + 1 and all(
            m.get("role") == "tool" for m in messages[previous + 1 : index])
        if answers_call:
            piece = _after_turn(tokenizer, turn_start, opened, messages[:index],
                                f"the tool turn(s) after assistant message {previous}", tool_call=True)
        elif runs and opened.startswith(text + closing):
            piece = opened[len(text) :]
        else:
            if runs:
                runs[-1].append((closing, 0))
            runs.append([])
            text, piece = "", opened
        with_turn = render(tokenizer, messages[: index + 1], tools, add_generation_prompt=False)
        _require_unchanged(tokenizer, opened, with_turn, messages[: index + 1], f"assistant message {index}")
        generated, closing, ends_with_tool_call = _split_assistant_turn(tokenizer, with_turn[len(opened) :])
        runs[-1] += [(piece, 0), (generated, 1)]
        text += piece + generated
        turn_start, previous = opened, index
    if not runs:
        runs.append([(render(tokenizer, messages, tools, add_generation_prompt=False), 0)])
    elif previous < len(messages) - 1:  # messages after the last assistant turn
        whole = render(tokenizer, messages, tools, add_generation_prompt=False)
        runs[-1].append((_after_turn(tokenizer, turn_start, whole, messages, "the last message(s)"), 0))
    else:
        runs[-1].append((closing, 0))
    return [_encode_pieces(tokenizer, pieces) for pieces in runs]


def tokenize_conversation(tokenizer, messages: Messages, tools: list[dict] | None) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_mask) of a conversation that is one sequence in `tokenize_runs` (any
    conversation under a prefix-stable template; one question under any template)."""
    runs = tokenize_runs(tokenizer, messages, tools)
    if len(runs) > 1:
        raise ValueError(f"under the chat template of {_template_name(tokenizer)} this conversation is "
                         f"{len(runs)} sequences (one per question); use tokenize_runs")
    return runs[0]


def _after_turn(tokenizer, turn_start: str, rendering: str, messages: Messages, appended: str, *,
                tool_call: bool = False) -> str:
    """The text of `rendering` after the assistant turn that `turn_start` opened.

    `turn_start` ends with the generation prompt of that turn; `rendering` renders the turn and
    `appended` after it, so the turn is no longer last and may look different (only its end is
    used). The turns `turn_start` completed must be unchanged in it. With `tool_call` the turn
    must end with `</tool_call>`: the text then starts with what closes the turn.
    """
    end_token = end_of_turn_token(tokenizer)
    done = turn_start.rfind(end_token) + len(end_token) if end_token in turn_start else 0
    _require_unchanged(tokenizer, turn_start[:done], rendering, messages, appended)
    generated, _, ends_with_tool_call = _split_assistant_turn(tokenizer, rendering[done:])
    if tool_call and not ends_with_tool_call:
        raise ModelError(
            f"chat template of {_template_name(tokenizer)} did not render the assistant turn ending in "
            f"{TOOL_CALL_END} as content followed by {end_token}; rendered: {generated!r}"
        )
    return rendering[done + len(generated) :]


def _split_assistant_turn(tokenizer, turn_text: str) -> tuple[str, str, bool]:
    """Cut text that starts with one rendered assistant turn into (generated, rest, ends_with_tool_call)."""
    end_token = end_of_turn_token(tokenizer)
    end_at = turn_text.find(end_token)
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


def _encode_pieces(tokenizer, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    assistant_mask: list[int] = []
    for text, mask in _merge_adjacent(pieces):
        ids = encode_text(tokenizer, text)
        input_ids += ids
        assistant_mask += [mask] * len(ids)
    return input_ids, assistant_mask


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


def _require_unchanged(tokenizer, shorter: str, longer: str, messages: Messages, appended: str) -> None:
    if longer.startswith(shorter):
        return
    at = next((i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b), min(len(shorter), len(longer)))
    raise ModelError(
        f"chat template of {_template_name(tokenizer)} is not prefix-stable where metis needs it: adding "
        f"{appended} rewrote {_part_at(tokenizer, shorter, at, messages)} ({shorter[at:at + 40]!r} became "
        f"{longer[at:at + 40]!r}). A rollout keeps each turn as the model saw or wrote it, so the generation "
        "prompt must open an assistant turn the way the template renders that turn as the last message, and "
        "adding tool turns may re-render only the turn before them (as the Qwen3 templates do with their think "
        "block), never earlier system, user, tool or assistant text. Edit chat_template in "
        "tokenizer_config.json (or chat_template.jinja)"
    )


def _part_at(tokenizer, text: str, at: int, messages: Messages) -> str:
    """Which turn of a rendering character `at` falls in, in words, found by locating each
    message's content in order (for error messages; a content the template rewrote is skipped)."""
    end_token = end_of_turn_token(tokenizer)
    cursor, last = 0, None  # end of the last content found, and that message's (index, role)
    for index, message in enumerate(messages):
        content = message.get("content")
        start = text.find(content, cursor) if isinstance(content, str) and content else -1
        if start < 0:
            continue
        role = message.get("role")
        if at < start:
            turn_end = text.find(end_token, cursor, start)
            if last is not None and turn_end >= 0 and at < turn_end + len(end_token):
                index, role = last
            return f"the assistant turn (message {index})" if role == "assistant" else (
                f"the template text of the {role} turn (message {index})")
        if at < start + len(content):
            return f"the content of the {role} turn (message {index})"
        cursor, last = start + len(content), (index, role)
    if end_token in text and at >= text.rfind(end_token) + len(end_token):
        return "the generation prompt"
    return "the text before the first message" if last is None else (
        f"the template text of the {last[1]} turn (message {last[0]})")


def _template_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
