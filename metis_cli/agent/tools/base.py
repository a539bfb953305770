"""What every tool is: the `Tool` protocol, the `ToolResult` it returns, and the error kinds.

A tool is described to the model in OpenAI function format (`tool_spec`), which is what the Qwen
chat templates render into the system prompt. `call` is async so calls from many rollouts can
share one event loop; it returns the observation text the model sees and never raises for the
model's mistakes (those become a `ToolResult` with `error` set, counted in the metrics).

Image tools (zoom_in, image_search) see the conversation: a tool whose class sets
`needs_context = True` is called as `call(arguments, context)` with a `ToolContext`, and may return
images in `ToolResult.images` for the rollout to show the model inside the observation turn.

Must not touch: parsing model text (agent/parser.py) or limits across calls (registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class ToolErrorKind:
    """Why a tool call produced an error observation; the strings land in metrics and rollouts."""

    MALFORMED = "malformed"  # the <tool_call> text is not {"name": str, "arguments": {...}}
    UNKNOWN_TOOL = "unknown_tool"  # no enabled tool has that name
    BAD_ARGUMENTS = "bad_arguments"  # arguments do not match the tool's JSON schema
    TIMEOUT = "timeout"  # wall-clock or CPU-time limit hit
    CRASHED = "crashed"  # the tool itself failed (a bug, or the sandbox died)
    LIMIT_EXCEEDED = "limit_exceeded"  # too many calls in this rollout, or output too large
    TOOL_ERROR = "tool_error"  # the tool ran and reported a failure (bad expression, exception)

    ALL = (MALFORMED, UNKNOWN_TOOL, BAD_ARGUMENTS, TIMEOUT, CRASHED, LIMIT_EXCEEDED, TOOL_ERROR)


@dataclass
class ToolResult:
    """One observation. `text` is what the model sees (the error message when `error` is set)."""

    text: str
    error: str | None = None  # a ToolErrorKind string, or None on success
    runtime_s: float = 0.0
    images: list = field(default_factory=list)  # PIL images shown to the model after `text`

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ToolContext:
    """What a call may see of its conversation (tools with `needs_context = True`).

    `images`: the conversation's PIL images in order of appearance, the prompt's first, then the
    ones earlier tool calls returned; an `image_index` argument counts in this list.
    """

    images: tuple = ()


@runtime_checkable
class Tool(Protocol):
    """A callable tool. `parameters` is a JSON schema of the `arguments` object."""

    name: str
    description: str
    parameters: dict

    async def call(self, arguments: dict) -> ToolResult: ...


def tool_spec(tool: Tool) -> dict:
    """The OpenAI function description of `tool` (what chat templates render for the model)."""
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
    }


def error_result(kind: str, message: str, runtime_s: float = 0.0) -> ToolResult:
    """An error observation; the model sees `Error: <message>`."""
    return ToolResult(text=f"Error: {message}", error=kind, runtime_s=runtime_s)


@dataclass
class ServiceCalls:
    """Requests a tool sent to an outside service (a web API) and how many of them got an answer
    (after the tool's own retries). A tool with such a service exposes it as `tool.service`; hdpo
    stops a run on a step in which every request failed (stages/hdpo_guard.py, docs/faults.md)."""

    field: str  # the service's recipe section, e.g. "tools.search.http"
    url: str
    requests: int = 0
    answered: int = 0
