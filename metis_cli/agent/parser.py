"""Finding tool calls in model text: the Qwen/Hermes form `<tool_call>{"name", "arguments"}</tool_call>`.

Every `<tool_call>` region in the text becomes one `ParsedToolCall`, in order. A region that is not
exactly one JSON object `{"name": str, "arguments": object}` is still returned, with `error`
saying why, so the rollout engine can answer it with an error observation and count it as a
`malformed` call instead of silently ignoring what the model tried to do. Stray closing tags,
nested tags and an unclosed tag at the end of the text are malformed calls too.

Whether a name is a known tool and whether the arguments fit its schema is the registry's
business (tools/registry.py); this module only reads the text and never raises.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
# Longer bodies are refused before JSON parsing: no real call needs them, and decoding a
# multi-megabyte blob per rollout would stall the batch.
MAX_TOOL_CALL_CHARS = 100_000

_TAG = re.compile(r"</?tool_call>")
_ALLOWED_KEYS = {"name", "arguments"}


@dataclass
class ParsedToolCall:
    """One `<tool_call>` region. `error` is why it is malformed (then name/arguments may be None)."""

    name: str | None
    arguments: dict | None
    raw: str  # the region as written, tags included
    error: str | None = None


class _Malformed(ValueError):
    pass


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _reject_constant(constant: str) -> None:
    raise _Malformed(f"{constant} is not valid JSON; write numbers as plain decimals")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _Malformed(f'duplicate key "{key}" in the JSON object')
        seen[key] = value
    return seen


def _decode_body(body: str) -> tuple[str, dict]:
    """The (name, arguments) of one tag body, or _Malformed saying what is wrong."""
    text = body.strip()
    if not text:
        raise _Malformed('empty <tool_call>; write {"name": "<tool>", "arguments": {...}} inside it')
    if len(text) > MAX_TOOL_CALL_CHARS:
        raise _Malformed(f"tool call is {len(text):,} characters long; the limit is {MAX_TOOL_CALL_CHARS:,}")
    try:
        payload = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":
            raise _Malformed(
                f"extra text after the JSON object at character {error.pos}; put each call in its own <tool_call>"
            ) from None
        raise _Malformed(f"invalid JSON: {error.msg} at character {error.pos}") from None
    except RecursionError:
        raise _Malformed("invalid JSON: nested too deeply") from None
    if isinstance(payload, list):
        raise _Malformed("expected one JSON object, got an array; put each call in its own <tool_call>")
    if not isinstance(payload, dict):
        raise _Malformed(f'expected a JSON object {{"name": ..., "arguments": {{...}}}}, got {_json_type(payload)}')
    extra = sorted(set(payload) - _ALLOWED_KEYS)
    if extra:
        raise _Malformed(f'unexpected key(s) {", ".join(map(repr, extra))}; a call has only "name" and "arguments"')
    name = payload.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _Malformed('"name" must be a non-empty string naming the tool')
    arguments = payload.get("arguments", {})
    if isinstance(arguments, str):
        raise _Malformed('"arguments" must be a JSON object, not a string holding JSON')
    if not isinstance(arguments, dict):
        raise _Malformed(f'"arguments" must be a JSON object, got {_json_type(arguments)}')
    try:
        # A lone surrogate ("\ud800") decodes fine but cannot be written anywhere as UTF-8.
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _Malformed("the call contains invalid unicode (a lone surrogate escape)") from None
    return name, arguments


def _region(text: str, start: int, end: int, body: str, problem: str | None) -> ParsedToolCall:
    raw = text[start:end]
    if problem is not None:
        return ParsedToolCall(name=None, arguments=None, raw=raw, error=problem)
    try:
        name, arguments = _decode_body(body)
    except _Malformed as error:
        return ParsedToolCall(name=None, arguments=None, raw=raw, error=str(error))
    return ParsedToolCall(name=name, arguments=arguments, raw=raw, error=None)


def parse_tool_calls(text: str) -> list[ParsedToolCall]:
    """All tool calls in `text`, in order; malformed ones carry `error`. Never raises."""
    calls: list[ParsedToolCall] = []
    depth = 0
    nested = False
    region_start = body_start = 0
    for tag in _TAG.finditer(text):
        if tag.group() == OPEN_TAG:
            if depth == 0:
                region_start, body_start, nested = tag.start(), tag.end(), False
            else:
                nested = True
            depth += 1
            continue
        if depth == 0:
            calls.append(_region(text, tag.start(), tag.end(), "", f"{CLOSE_TAG} without a matching {OPEN_TAG}"))
            continue
        depth -= 1
        if depth == 0:
            problem = f"nested {OPEN_TAG} tags; close each call before opening the next" if nested else None
            calls.append(_region(text, region_start, tag.end(), text[body_start : tag.start()], problem))
    if depth > 0:
        calls.append(_region(text, region_start, len(text), "", f"{OPEN_TAG} is never closed with {CLOSE_TAG}"))
    return calls
