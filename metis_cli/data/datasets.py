"""Load prompt sets and trajectories from a recipe `DataSource` into `Example`s.

The source (path, split, layout, subset_field, limit; validated by recipe/schema.py
`DataSource`) is read row by row by data/readers.py: `.jsonl`, `.json`, `.parquet`, a `datasets`
save_to_disk folder, or `hf:NAME[:CONFIG]`. Row layouts (`layout: auto` picks per row):
  - messages: OpenAI chat `messages` (system/user/assistant/tool) + `answer`, optional `id`,
    `images` and a subset column (`subset_field`, default "subset");
  - verl: the parquet layout of verl and the official Metis-RL / Metis-ColdStart data: `prompt`
    (list of messages), `images`, `data_source` (used as subset), `reward_model.ground_truth`
    (the answer: a string, or a list of acceptable answers), `extra_info` (kept in meta;
    `extra_info.index` becomes the id).
Assistant messages in OpenAI's native `tool_calls` form are rewritten into the text form our chat
templates use, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. docs/formats.md shows
both layouts.

Images: a content is a string or a list of text and image parts (data/content.py turns OpenAI
parts, `{"type": "image"}` parts and verl's `<image>` placeholders into that form);
`Example.images` holds the row's image sources in order of appearance (absolute paths, bytes or
data URLs, never decoded pixels), each checked cheaply here (data/images.py `check_image`) so a
missing, empty or corrupt image is a malformed row before training starts. Relative paths are
relative to the data file's folder (a saved dataset's own folder).

Every malformed row raises DataError naming the file, the line (JSONL, 1-based) or row (tables,
0-based) and what is wrong; with malformed_rows="skip" it is dropped and reported instead.
Chat templating and tokenisation live elsewhere (data/chat.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metis_cli.data.content import content_text, fill_slots, image_count, parse_content
from metis_cli.data.images import check_image
from metis_cli.data.readers import iter_rows
from metis_cli.errors import DataError
from metis_cli.recipe.schema import DataSource

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_SUBSET = "default"


@dataclass
class Example:
    """One prompt (and, for SFT, its full trajectory).

    messages: the prompt, every message up to and including the last user turn. Each content
        is a string, or a list of `{"type": "text", "text": ...}` and `{"type": "image"}` parts.
    trajectory: the whole conversation when assistant turns follow the last user turn (SFT
        data); None for prompt-only rows (RL / eval data).
    answer: the gold answer as text, or a list of acceptable answers (the best match scores,
        rewards/checkers.py); None when the row has none.
    images: the sources of the image parts in order of appearance over the trajectory (else
        the prompt): absolute paths, bytes or data URLs; `load_images` decodes them.
    origin: the data file or dataset the row came from (named in image errors).
    """

    id: str
    messages: list[dict]
    answer: str | list[str] | None
    subset: str = DEFAULT_SUBSET
    images: list = field(default_factory=list)
    trajectory: list[dict] | None = None
    meta: dict = field(default_factory=dict)
    origin: str = field(default="", compare=False)

    @property
    def question(self) -> str:
        """Text of the last user turn (what a judge is shown as the question)."""
        return content_text(self.messages[-1]["content"])

    def load_images(self, max_pixels: int | None = None) -> list:
        """The row's images as RGB PIL images sized for a processor (data/images.py `fit_image`,
        at most `max_pixels` pixels when given); decoded now, not kept."""
        from metis_cli.data.images import load_images

        return load_images(self.images, where=f"{self.origin} row {self.id!r}", max_pixels=max_pixels)


def _as_source(source: Any, overrides: dict[str, Any]) -> DataSource:
    """The recipe DataSource for a path, a mapping or a DataSource, with keyword overrides
    (None ones ignored); the recipe schema checks every field."""
    from pydantic import ValidationError

    if isinstance(source, DataSource):
        values = source.model_dump()
    elif isinstance(source, (str, Path)):
        values = {"path": str(source)}
    else:
        values = dict(source or {})
    values.update({key: value for key, value in overrides.items() if value is not None})
    if values.get("path") is None:
        raise DataError("data source has no `path`; name a file, a saved dataset folder or hf:NAME")
    try:
        return DataSource.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise DataError(f"{values['path']}: {problems}") from None


def load_examples(
    source: Any = None,
    *,
    need_answer: bool = True,
    malformed_rows: str = "error",
    skipped: list[str] | None = None,
    **overrides: Any,
) -> list[Example]:
    """All examples of a source (see module docstring and iter_examples)."""
    options = {"need_answer": need_answer, "malformed_rows": malformed_rows, "skipped": skipped}
    return list(iter_examples(source, **options, **overrides))


def iter_examples(
    source: Any = None,
    *,
    need_answer: bool = True,
    malformed_rows: str = "error",
    skipped: list[str] | None = None,
    **overrides: Any,
) -> Iterator[Example]:
    """Examples one at a time, reading the source lazily (for large inputs).

    need_answer: rows without a gold answer are malformed (RL and eval need one; SFT does not).
    malformed_rows: "error" raises DataError at the first malformed row (the recipe's
        `data.malformed_rows`); "skip" drops it, logs a warning and appends the message to
        `skipped` when a list is given. A missing or unreadable file is always an error.
    """
    if malformed_rows not in ("error", "skip"):
        raise ValueError(f"malformed_rows must be 'error' or 'skip', got {malformed_rows!r}")
    spec = _as_source(source, overrides)
    count = 0
    stem = Path(spec.path.removeprefix("hf:").split(":")[0]).stem
    base_dir = _image_base_dir(spec.path)
    for where, position, row in iter_rows(spec):
        try:
            if isinstance(row, DataError):
                raise row
            example = _row_to_example(row, where, spec, need_answer, f"{stem}-{position}", base_dir)
        except DataError as error:
            if malformed_rows == "error":
                raise
            log.warning("skipping malformed row: %s", error)
            if skipped is not None:
                skipped.append(str(error))
            continue
        yield example
        count += 1
        if spec.limit is not None and count >= spec.limit:
            return
    if count == 0:
        raise DataError(f"{spec.path}: no usable examples found")


# ---- turning one row into an Example ----


def _image_base_dir(path: str) -> Path | None:
    """Where a source's relative image paths start: a file's folder, a saved dataset's own
    folder; None (the working folder) for hub datasets."""
    if path.startswith("hf:"):
        return None
    location = Path(path).expanduser().absolute()
    return location if location.is_dir() else location.parent


def _row_to_example(
    row: Any, where: str, spec: DataSource, need_answer: bool, fallback_id: str, base_dir: Path | None
) -> Example:
    """fallback_id: the id used when the row has none ("<file stem>-<line or row>")."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    layout = spec.layout
    if layout == "auto":
        if "messages" in row:
            layout = "messages"
        elif "prompt" in row:
            layout = "verl"
        else:
            raise DataError(
                f"{where}: missing `messages` (OpenAI chat layout) or `prompt` (verl layout); "
                f"fields present: {sorted(row)}"
            )
    if layout == "messages":
        conversation_field, answer_field = "messages", "answer"
        answer_value, row_id = row.get("answer"), row.get("id")
        subset = row.get(spec.subset_field)
        consumed = {"messages", "answer", "id", "images", spec.subset_field}
    else:
        conversation_field, answer_field = "prompt", "reward_model.ground_truth"
        reward_model = row.get("reward_model") or {}
        if not isinstance(reward_model, dict):
            raise DataError(f"{where}: `reward_model` must be an object with `ground_truth`")
        answer_value = reward_model.get("ground_truth")
        extra_info = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
        row_id = extra_info.get("index")
        row_id = row.get("id") if row_id is None else row_id
        subset = row.get(spec.subset_field) or row.get("data_source")
        consumed = {"prompt", "images", "reward_model", "data_source", "id", spec.subset_field}

    if row.get(conversation_field) is None:
        raise DataError(f"{where}: missing `{conversation_field}` (a list of chat messages)")
    row_id = str(row_id) if row_id is not None else fallback_id
    conversation, slots = _normalise_messages(row[conversation_field], where, conversation_field, "images" in row)
    prompt, trajectory = _split_prompt(conversation, where, conversation_field)
    sources = fill_slots(slots, _as_list(row.get("images")), f"{where}: row {row_id!r}")
    if trajectory is None:  # images after the prompt belong to no kept message
        sources = sources[: sum(image_count(message["content"]) for message in prompt)]
    return Example(
        id=row_id,
        messages=prompt,
        answer=_answer_text(answer_value, where, answer_field, need_answer),
        subset=str(subset) if subset not in (None, "") else DEFAULT_SUBSET,
        images=[check_image(source, where=f"{where}: row {row_id!r} images[{index}]", base_dir=base_dir)
                for index, source in enumerate(sources)],
        trajectory=trajectory,
        meta={key: value for key, value in row.items() if key not in consumed},
        origin=spec.path,
    )


def _normalise_messages(raw: Any, where: str, field_name: str, has_images: bool) -> tuple[list[dict], list]:
    """Validated copies of the messages (known role, a string or parts content, no None-valued
    keys) and their image slots in order (data/content.py `parse_content`). `has_images`: the
    row has an `images` field, so `<image>` in a string marks one."""
    if hasattr(raw, "tolist"):  # numpy arrays from pandas-built parquet
        raw = raw.tolist()
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: `{field_name}` must be a non-empty list of chat messages")
    messages, slots = [], []
    for number, message in enumerate(raw, start=1):
        label = f"{where}: `{field_name}` message {number}"
        if not isinstance(message, dict):
            raise DataError(f"{label} must be an object with `role` and `content`")
        # Table formats give every message every key seen in the column, filled with None.
        message = {key: value for key, value in message.items() if value is not None}
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{label} has role {role!r}; roles must be one of {', '.join(ROLES)}")
        if role == "assistant" and message.get("tool_calls"):
            if message.get("content") is not None:
                message["content"], call_slots = parse_content(message["content"], f"{label} ({role})",
                                                               split_placeholders=False)
                if call_slots:
                    raise DataError(f"{label}: an assistant turn with `tool_calls` cannot hold images")
            message["content"] = _with_text_tool_calls(message, label)
        message["content"], message_slots = parse_content(message.get("content"), f"{label} ({role})",
                                                          split_placeholders=has_images)
        messages.append(message)
        slots.extend(message_slots)
    return messages, slots


def _with_text_tool_calls(message: dict, label: str) -> str:
    """Assistant content with OpenAI-native `tool_calls` appended as <tool_call> text."""
    parts = [message.get("content") or ""]
    for call in message.pop("tool_calls"):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or "name" not in function:
            raise DataError(f"{label}: each tool call needs a `function` with a `name`")
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise DataError(
                    f"{label}: tool call {function['name']!r} arguments are not valid JSON"
                ) from None
        payload = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
        parts.append(f"<tool_call>{payload}</tool_call>")
    return "\n".join(part for part in parts if part)


def _split_prompt(
    conversation: list[dict], where: str, field_name: str
) -> tuple[list[dict], list[dict] | None]:
    user_turns = [i for i, message in enumerate(conversation) if message["role"] == "user"]
    if not user_turns:
        raise DataError(f"{where}: `{field_name}` has no user message; a prompt needs one")
    last_user = user_turns[-1]
    replies = conversation[last_user + 1 :]
    has_reply = any(message["role"] == "assistant" for message in replies)
    return conversation[: last_user + 1], (conversation if has_reply else None)


def _answer_text(value: Any, where: str, field_name: str, need_answer: bool) -> str | list[str] | None:
    """The gold answer as text, or a list of acceptable answers (blank items dropped)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if need_answer:
            raise DataError(
                f"{where}: missing `{field_name}`; RL and eval rows need the gold answer"
            )
        return None
    if hasattr(value, "tolist"):  # numpy arrays from pandas-built parquet
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        answers = [_one_answer(item, where, f"{field_name}[{index}]") for index, item in enumerate(value)]
        answers = [answer for answer in answers if answer]
        if answers:
            return answers
        return _answer_text(None, where, field_name, need_answer)
    return _one_answer(value, where, field_name)


def _one_answer(value: Any, where: str, field_name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"{where}: `{field_name}` must be a string, a number or a list of them, got {type(value).__name__}"
        )
    return str(value).strip()


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]
