"""The OpenAI chat-completions wire format of `metis serve`: checking a request, shaping replies.

Pure functions and plain data, no web framework and no model: `parse_chat_request` turns a
request body into a `ChatRequest` or raises `BadRequest` (an OpenAI-style 400 error body);
`completion_body` and the `*_chunk` functions build the JSON of a reply and of its server-sent
events. What the fields mean, including the `metis` extra field with the tool trace, is written
down in docs/serve.md.

Must not touch: generation, tools (stages/serve_agent.py), HTTP (stages/serve.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

ALLOWED_ROLES = ("system", "developer", "user", "assistant")
"""Roles a client may send; `developer` (newer OpenAI clients) is read as `system`. `tool`
turns are the server's: it runs the tools itself."""

TOOL_CALL_OPEN = "<tool_call>"
MAX_TEMPERATURE = 2.0


class BadRequest(Exception):
    """A request the server refuses; `body()` is the OpenAI error object."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict:
        return error_body(self.message, param=self.param, code=self.code,
                          kind="authentication_error" if self.status == 401 else "invalid_request_error")


def error_body(message: str, *, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    """{"error": {...}} as OpenAI writes it (the openai client reads `message` and `code`)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ServerLimits:
    """What a request may ask for; the defaults apply where it asks for nothing.

    max_tokens: the most tokens of one assistant turn (a request's max_tokens is capped to it).
    max_turns: assistant turns per answer (tool calls + the answer).
    context_tokens: the most tokens of the whole conversation the model reads and writes.
    """

    max_tokens: int
    max_turns: int
    context_tokens: int
    temperature: float
    top_p: float = 1.0


@dataclass(frozen=True)
class ChatRequest:
    """A checked request. messages: role/content dicts with text content; max_tokens: per turn."""

    model: str
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool


def parse_chat_request(raw: bytes, *, model_id: str, limits: ServerLimits) -> ChatRequest:
    """The request in `raw` (a JSON body), checked against the server's model and limits."""
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if model != model_id:
        raise BadRequest(f"model {model!r} is not served here; this server serves {model_id!r} (GET /v1/models)",
                         param="model", code="model_not_found")
    for unsupported in ("tools", "functions"):
        if payload.get(unsupported):
            raise BadRequest(f"{unsupported!r}: this server runs its own tools and takes no client-side ones; "
                             "leave the field out", param=unsupported, code="unsupported_parameter")
    if payload.get("n", 1) != 1:
        raise BadRequest("'n': only one choice per request (n=1) is served", param="n", code="unsupported_parameter")
    if payload.get("logprobs"):
        raise BadRequest("'logprobs' is not served", param="logprobs", code="unsupported_parameter")
    stream_options = payload.get("stream_options") or {}
    return ChatRequest(
        model=model_id,
        messages=_messages(payload.get("messages")),
        max_tokens=_max_tokens(payload, limits),
        temperature=_number(payload, "temperature", limits.temperature, low=0.0, high=MAX_TEMPERATURE),
        top_p=_number(payload, "top_p", limits.top_p, low=0.0, high=1.0, low_open=True),
        seed=_seed(payload.get("seed")),
        stream=_flag(payload, "stream"),
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
    )


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise BadRequest(f"{where}.role is {role!r}; allowed roles are {', '.join(ALLOWED_ROLES)} (the server "
                             "runs the tools and writes the tool turns itself)", param=f"{where}.role",
                             code="invalid_role")
        if role == "assistant" and message.get("tool_calls"):
            raise BadRequest(f"{where}: assistant tool_calls are the server's to make; send the assistant's text "
                             "only", param=f"{where}.tool_calls", code="unsupported_parameter")
        checked.append({"role": "system" if role == "developer" else role,
                        "content": _text(message.get("content"), where)})
    if checked[-1]["role"] != "user":
        raise BadRequest(f"the last message must be the user's (it is {messages[-1].get('role')!r})",
                         param=f"messages[{len(messages) - 1}].role", code="invalid_role")
    return checked


def _text(content, where: str) -> str:
    """A message's text: a string, or OpenAI content parts of type "text"."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part_index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(f"{where}.content[{part_index}] is of type {kind!r}; this server reads text parts "
                                 "only", param=f"{where}.content", code="unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _max_tokens(payload: dict, limits: ServerLimits) -> int:
    key = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
    value = payload.get(key)
    if value is None:
        return limits.max_tokens
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{key!r} must be a whole number >= 1 (got {value!r})", param=key)
    return min(value, limits.max_tokens)


def _number(payload: dict, key: str, default: float, *, low: float, high: float, low_open: bool = False) -> float:
    value = payload.get(key)
    if value is None:
        return default
    below = value <= low if low_open else value < low
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or below \
            or value > high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"{key!r} must be a number in {bounds} (got {value!r})", param=key)
    return float(value)


def _seed(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'seed' must be a whole number (got {value!r})", param="seed")
    return value


def _flag(payload: dict, key: str) -> bool:
    value = payload.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{key!r} must be true or false (got {value!r})", param=key)
    return value


# ------------------------------------------------------------------------------ reply text
def visible_text(turn_text: str, *, finished: bool) -> str:
    """What a client sees of one assistant turn: its text before any `<tool_call>` (the call
    itself is in the tool trace). While the turn is still being generated, a tail that could be
    the start of `<tool_call>`, or a character still incomplete, is held back."""
    cut = turn_text.find(TOOL_CALL_OPEN)
    if cut >= 0:
        return turn_text[:cut]
    if finished:
        return turn_text
    text = turn_text.rstrip("\ufffd")
    for length in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-length:]):
            return text[:-length]
    return text


def reply_text(assistant_turns: list[str]) -> str:
    """The reply's content: what the client sees of every finished turn, in order (for a model
    trained by metis, the last turn's `<answer>...</answer>`)."""
    return "".join(visible_text(turn, finished=True) for turn in assistant_turns)


FINISH_REASONS = {"answer": "stop", "eos": "stop", "length": "length", "max_turns": "length"}
"""A rollout's finish reason -> OpenAI's; the rollout's own stays in `metis.finish_reason`."""


# ------------------------------------------------------------------------------ reply bodies
def completion_body(completion_id: str, created: int, model: str, result) -> dict:
    """A non-streamed reply (`chat.completion`); result: a serve_agent.CompletionResult."""
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.content},
                     "finish_reason": FINISH_REASONS.get(result.finish_reason, "stop"), "logprobs": None}],
        "usage": result.usage(),
        "metis": result.metis(),
    }


def chunk(completion_id: str, created: int, model: str, delta: dict, *, finish_reason: str | None = None,
          metis: dict | None = None) -> dict:
    """One streamed event (`chat.completion.chunk`)."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if metis is not None:
        body["metis"] = metis
    return body


def final_chunk(completion_id: str, created: int, model: str, result) -> dict:
    return chunk(completion_id, created, model, {}, finish_reason=FINISH_REASONS.get(result.finish_reason, "stop"),
                 metis=result.metis())


def usage_chunk(completion_id: str, created: int, model: str, result) -> dict:
    """The last event when the client asked for `stream_options.include_usage` (no choices)."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": result.usage()}


def sse(payload: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (`[DONE]` ends the stream)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
