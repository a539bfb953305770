"""Load prompt sets and trajectories from files or `datasets` sources into `Example`s.

Sources (the recipe's `DataSource`: path, split, layout, subset_field, limit):
  - a `.jsonl` file (streamed line by line), a `.json` file (a JSON array of rows, or JSON lines),
    a `.parquet` file (streamed in batches);
  - a folder written by `datasets` `save_to_disk` (a Dataset, or a DatasetDict + `split`);
  - `hf:NAME` or `hf:NAME:CONFIG`, loaded with `datasets.load_dataset` (offline here, so it must
    already be in the local Hugging Face cache).
Row layouts (`layout: auto` picks per row):
  - messages: OpenAI chat `messages` (system/user/assistant/tool, string content) + `answer`,
    optional `id`, `images` and a subset column (`subset_field`, default "subset");
  - verl: the parquet layout of verl and the official Metis-RL / Metis-ColdStart data: `prompt`
    (list of messages), `images`, `data_source` (used as subset), `reward_model.ground_truth`
    (the answer), `extra_info` (kept in meta; `extra_info.index` becomes the id).
Assistant messages in OpenAI's native `tool_calls` form are rewritten into the text form our chat
templates use, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Every malformed row raises DataError naming the file, the line (JSONL, 1-based) or row (tables,
0-based) and what is wrong; with malformed_rows="skip" it is dropped and reported instead.
`datasets` and `pyarrow` are imported only inside functions so that the CLI starts without them.
Chat templating and tokenisation live elsewhere (data/chat.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metis_cli.errors import DataError

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "messages", "verl")
ROLES = ("system", "user", "assistant", "tool")
DEFAULT_SUBSET = "default"


@dataclass
class Example:
    """One prompt (and, for SFT, its full trajectory).

    messages: the prompt, every message up to and including the last user turn.
    trajectory: the whole conversation when assistant turns follow the last user turn (SFT
        data); None for prompt-only rows (RL / eval data).
    answer: the gold answer as text, None when the row has none.
    """

    id: str
    messages: list[dict]
    answer: str | None
    subset: str = DEFAULT_SUBSET
    images: list = field(default_factory=list)
    trajectory: list[dict] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def question(self) -> str:
        """Text of the last user turn (what a judge is shown as the question)."""
        return self.messages[-1]["content"]


@dataclass
class SourceSpec:
    """Where examples come from; mirrors the recipe's DataSource. `split` only applies to
    `datasets` sources (saved DatasetDicts, hf:); plain files have no splits."""

    path: str
    split: str | None = None
    layout: str = "auto"
    subset_field: str = "subset"
    limit: int | None = None


def as_source(source: Any = None, **overrides: Any) -> SourceSpec:
    """A SourceSpec from a path, a recipe DataSource-like object, a dict, and/or keyword args."""
    values: dict[str, Any] = {}
    if isinstance(source, (str, Path)):
        values["path"] = str(source)
    elif isinstance(source, dict):
        values.update(source)
    elif source is not None:
        for name in SourceSpec.__dataclass_fields__:
            if hasattr(source, name):
                values[name] = getattr(source, name)
    values.update(overrides)
    values = {key: value for key, value in values.items() if value is not None}
    if "path" not in values:
        raise DataError("data source has no `path`; name a file, a saved dataset folder or hf:NAME")
    spec = SourceSpec(**{k: v for k, v in values.items() if k in SourceSpec.__dataclass_fields__})
    spec.path = str(spec.path)
    if spec.layout not in LAYOUTS:
        raise DataError(
            f"{spec.path}: unknown layout {spec.layout!r}; use one of {', '.join(LAYOUTS)}"
        )
    if spec.limit is not None and spec.limit < 1:
        raise DataError(f"{spec.path}: limit must be at least 1 (or unset), got {spec.limit}")
    return spec


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
    spec = as_source(source, **overrides)
    count = 0
    stem = Path(spec.path.removeprefix("hf:").split(":")[0]).stem
    for where, position, row in _iter_rows(spec):
        try:
            if isinstance(row, DataError):
                raise row
            example = _row_to_example(row, where, spec, need_answer, f"{stem}-{position}")
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


# ---- reading raw rows: yields (where, position, row), `where` like "data.jsonl line 7";
# a row that cannot even be parsed is yielded as a DataError ----

RawRows = Iterator[tuple[str, int, Any]]


def _iter_rows(spec: SourceSpec) -> RawRows:
    if spec.path.startswith("hf:"):
        yield from _iter_dataset(_load_hub(spec), spec.path)
        return
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: data file or folder not found; check the data path in the recipe")
    if path.is_dir():
        yield from _iter_dataset(_load_saved(path, spec.split), str(path))
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif path.suffix == ".json":
        yield from _iter_json(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise DataError(
            f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .json, .parquet, "
            "a `datasets` save_to_disk folder, or hf:NAME"
        )


def _iter_jsonl(path: Path) -> RawRows:
    # Binary lines decoded one by one, so a bad byte is reported on its own line number.
    with path.open("rb") as lines:
        for line_number, raw_line in enumerate(lines, start=1):
            if not raw_line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                row = json.loads(raw_line.decode("utf-8").lstrip("\ufeff"))
            except UnicodeDecodeError:
                row = DataError(f"{where}: not UTF-8 text; save the file as UTF-8 JSON lines")
            except json.JSONDecodeError as error:
                # Yielded, not raised, so that malformed_rows="skip" can move on to the next line.
                row = DataError(
                    f"{where}: not valid JSON ({error.msg} at column {error.colno}); "
                    "each line must be one JSON object"
                )
            yield where, line_number, row


def _iter_json(path: Path) -> RawRows:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the file as UTF-8 JSON") from None
    if not text.lstrip().startswith("["):
        yield from _iter_jsonl(path)  # many ".json" files are really JSON lines
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} line {error.lineno}: not valid JSON ({error.msg}); "
            "a .json file must hold one JSON array of row objects, or one object per line"
        ) from None
    for index, row in enumerate(rows):
        yield f"{path} item {index} (0-based)", index, row


def _iter_parquet(path: Path) -> RawRows:
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    index = 0
    for batch in table_file.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"{path} row {index} (0-based)", index, row
            index += 1


def _load_saved(path: Path, split: str | None) -> Any:
    import datasets

    if not any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        raise DataError(
            f"{path}: folder is not a `datasets` save_to_disk folder (no dataset_info.json or "
            "dataset_dict.json); point data paths at a file or a saved dataset"
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001
        raise DataError(f"{path}: could not load saved dataset ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, split, str(path))
    return loaded


def _load_hub(spec: SourceSpec) -> Any:
    import datasets

    name, _, config = spec.path.removeprefix("hf:").partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None, split=spec.split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise DataError(
            f"{spec.path}: datasets.load_dataset({name!r}) failed: {error}. Without network access "
            "the dataset must already be in the local Hugging Face cache; or save it to a file"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(loaded, spec.split, spec.path)
    return loaded


def _pick_split(splits: Any, split: str | None, label: str) -> Any:
    names = list(splits.keys())
    if split is None:
        if "train" in names:
            return splits["train"]
        if len(names) == 1:
            return splits[names[0]]
        raise DataError(f"{label}: has splits {names}; choose one with `split`")
    if split not in names:
        raise DataError(f"{label}: no split {split!r}; available splits: {names}")
    return splits[split]


def _iter_dataset(dataset: Any, label: str) -> RawRows:
    for index, row in enumerate(dataset):
        yield f"{label} row {index} (0-based)", index, row


# ---- turning one row into an Example ----


def _row_to_example(
    row: Any, where: str, spec: SourceSpec, need_answer: bool, fallback_id: str
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
    conversation = _normalise_messages(row[conversation_field], where, conversation_field)
    prompt, trajectory = _split_prompt(conversation, where, conversation_field)
    return Example(
        id=str(row_id) if row_id is not None else fallback_id,
        messages=prompt,
        answer=_answer_text(answer_value, where, answer_field, need_answer),
        subset=str(subset) if subset not in (None, "") else DEFAULT_SUBSET,
        images=_as_list(row.get("images")),
        trajectory=trajectory,
        meta={key: value for key, value in row.items() if key not in consumed},
    )


def _normalise_messages(raw: Any, where: str, field_name: str) -> list[dict]:
    """Validated copies of the messages: known role, string content, no None-valued keys."""
    if hasattr(raw, "tolist"):  # numpy arrays from pandas-built parquet
        raw = raw.tolist()
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: `{field_name}` must be a non-empty list of chat messages")
    messages = []
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
            message["content"] = _with_text_tool_calls(message, label)
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(
                f"{label} ({role}) content must be a string, got {type(content).__name__}; "
                "multimodal content lists are not supported: put images in the `images` field "
                "and mark them with <image> in the text"
            )
        messages.append(message)
    return messages


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


def _answer_text(value: Any, where: str, field_name: str, need_answer: bool) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if need_answer:
            raise DataError(
                f"{where}: missing `{field_name}`; RL and eval rows need the gold answer"
            )
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"{where}: `{field_name}` must be a string or a number, got {type(value).__name__}"
        )
    return str(value).strip()


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]
