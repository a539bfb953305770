"""The tool set of a run: which tools exist, their specs, and executing parsed calls under limits.

`execute` turns every model mistake into an error observation with a kind (see
`ToolErrorKind`) and never raises for one: malformed call, unknown tool, arguments that fail the
tool's JSON schema, too many calls in the rollout, a call past `timeout_s`, a tool that crashed.
Calls from many rollouts run concurrently on one event loop; a semaphore (one per event loop)
keeps at most `max_concurrency` in flight.

Sessions: a call may carry a `session` key (the rollout engine passes one per rollout). Tools
with per-rollout state (`uses_sessions = True`: the persistent python tool) get it as
`call(arguments, session=key)`; others never see it. `end_session(key)` releases that state
when the rollout ends or its run stops; a key never ended keeps its state (and processes) alive.

Images: tools that need the conversation (`needs_context = True`: zoom_in, image_search) get its
`ToolContext` as `call(arguments, context=...)`. Images a tool returns are converted to RGB and sized
for a vision processor here; one a processor could not take becomes a tool error.

Must not touch: text parsing (agent/parser.py) or how observations enter the conversation
(agent/rollout.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Hashable

from metis_cli.agent.parser import ParsedToolCall
from metis_cli.agent.tools.base import Tool, ToolContext, ToolErrorKind, ToolResult, error_result, tool_spec
from metis_cli.errors import ToolConfigError

log = logging.getLogger("metis.tools")

BUILTIN_TOOLS = ("calculator", "python", "search", "zoom_in", "image_search")
_MAX_MESSAGE_CHARS = 300


def _build_tool(name: str, tools_cfg: Any) -> Tool:
    if name == "calculator":
        from metis_cli.agent.tools.calculator import CalculatorTool

        return CalculatorTool()
    if name == "python":
        from metis_cli.agent.tools.python_sandbox import PythonLimits, PythonTool

        python_cfg = tools_cfg.python
        limits = PythonLimits(
            wall_timeout_s=python_cfg.wall_timeout_s,
            cpu_time_s=python_cfg.cpu_time_s,
            memory_mb=python_cfg.memory_mb,
            output_bytes=python_cfg.output_bytes,
            max_processes=python_cfg.max_processes,
        )
        return PythonTool(limits, sandbox=python_cfg.sandbox, persistent=python_cfg.persistent,
                          packages=python_cfg.packages, images=python_cfg.images, max_images=python_cfg.max_images,
                          max_image_pixels=python_cfg.max_image_pixels)
    if name == "search":
        from metis_cli.agent.tools.search import SearchTool, WebSearchTool

        if tools_cfg.search.backend == "http":
            return WebSearchTool.from_config(tools_cfg.search)
        return SearchTool.from_file(tools_cfg.search.corpus, top_k=tools_cfg.search.top_k)
    if name == "zoom_in":
        from metis_cli.agent.tools.zoom import ZoomInTool

        zoom_cfg = tools_cfg.zoom_in
        return ZoomInTool(coordinates=zoom_cfg.coordinates, min_pixels=zoom_cfg.min_pixels,
                          max_pixels=zoom_cfg.max_pixels)
    if name == "image_search":
        from metis_cli.agent.tools.image_search import ImageSearchTool

        search_cfg = tools_cfg.image_search
        return ImageSearchTool.from_corpus(search_cfg.corpus, top_k=search_cfg.top_k,
                                           max_pixels=search_cfg.max_pixels)
    raise ToolConfigError(f"tools.enabled: unknown tool {name!r}; built-in tools are {', '.join(BUILTIN_TOOLS)}")


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


class ToolRegistry:
    """The enabled tools plus the per-call limits of a run."""

    def __init__(self, tools: list[Tool], *, timeout_s: float, max_calls_per_rollout: int, max_concurrency: int):
        import jsonschema  # only needed once tools exist; keeps `metis --help` light

        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, Any] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ToolConfigError(f"tools.enabled: {tool.name!r} is listed twice")
            jsonschema.Draft202012Validator.check_schema(tool.parameters)
            self._tools[tool.name] = tool
            self._validators[tool.name] = jsonschema.Draft202012Validator(tool.parameters)
        self.timeout_s = timeout_s
        self.max_calls_per_rollout = max_calls_per_rollout
        self.max_concurrency = max_concurrency
        # A semaphore belongs to one event loop; execute_many starts a fresh loop per batch.
        self._semaphores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def from_config(cls, tools_cfg: Any) -> ToolRegistry:
        """Build the enabled tools of a recipe's `tools` section (attribute access only)."""
        names = list(dict.fromkeys(tools_cfg.enabled))  # keep order, drop repeats
        return cls(
            [_build_tool(name, tools_cfg) for name in names],
            timeout_s=tools_cfg.timeout_s,
            max_calls_per_rollout=tools_cfg.max_calls_per_rollout,
            max_concurrency=tools_cfg.max_concurrency,
        )

    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[dict]:
        """OpenAI function specs of the enabled tools (pass as `tools=` to a chat template)."""
        return [tool_spec(tool) for tool in self._tools.values()]

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return self._semaphores[loop]

    def _argument_problem(self, name: str, arguments: dict) -> str | None:
        import jsonschema

        error = jsonschema.exceptions.best_match(self._validators[name].iter_errors(arguments))
        if error is None:
            return None
        where = "".join(f"[{part!r}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
        return f"arguments{where}: {_shorten(error.message)}"

    def _precheck(self, call: ParsedToolCall, calls_so_far: int) -> ToolResult | None:
        """The error observation for a call that must not run, or None if it may."""
        if call.error is not None or call.name is None or call.arguments is None:
            return error_result(ToolErrorKind.MALFORMED, f"malformed tool call: {call.error or 'no name or arguments'}")
        if call.name not in self._tools:
            available = ", ".join(self._tools) or "none"
            return error_result(
                ToolErrorKind.UNKNOWN_TOOL, f"unknown tool {_shorten(repr(call.name))}; available tools: {available}"
            )
        if calls_so_far >= self.max_calls_per_rollout:
            return error_result(
                ToolErrorKind.LIMIT_EXCEEDED,
                f"tool call limit of {self.max_calls_per_rollout} per answer reached; answer with what you have",
            )
        problem = self._argument_problem(call.name, call.arguments)
        if problem is not None:
            properties = self._tools[call.name].parameters.get("properties", {})
            expected = ", ".join(f'"{key}": {spec.get("type", "any")}' for key, spec in properties.items())
            return error_result(
                ToolErrorKind.BAD_ARGUMENTS, f"invalid arguments for {call.name}: {problem} (expected {{{expected}}})"
            )
        return None

    async def execute(self, call: ParsedToolCall, calls_so_far: int = 0, session: Hashable | None = None,
                      context: ToolContext | None = None) -> ToolResult:
        """Run one parsed call; `calls_so_far` counts the rollout's earlier calls, `session` names
        the rollout, `context` is its conversation (module docstring). Never raises for model mistakes."""
        refused = self._precheck(call, calls_so_far)
        if refused is not None:
            return refused
        tool = self._tools[call.name]
        stateful = session is not None and getattr(tool, "uses_sessions", False)
        async with self._semaphore():
            started = time.perf_counter()
            try:
                extra: dict[str, Any] = {"session": session} if stateful else {}
                if getattr(tool, "needs_context", False):
                    extra["context"] = context or ToolContext()
                running = tool.call(call.arguments, **extra)
                result = _checked_images(await asyncio.wait_for(running, self.timeout_s), call.name)
            except asyncio.TimeoutError:
                result = error_result(ToolErrorKind.TIMEOUT, f"tool {call.name} timed out after {self.timeout_s:g} s")
            except Exception as error:  # noqa: BLE001 - a broken tool must not stop the batch
                log.warning("tool %s crashed on %s", call.name, _shorten(repr(call.arguments)), exc_info=True)
                message = f"tool {call.name} crashed: {type(error).__name__}: {_shorten(str(error))}"
                result = error_result(ToolErrorKind.CRASHED, message)
            result.runtime_s = time.perf_counter() - started
        return result

    def execute_many(self, calls: list[tuple[ParsedToolCall, int]],
                     sessions: list[Hashable | None] | None = None,
                     contexts: list[ToolContext | None] | None = None) -> list[ToolResult]:
        """Run (call, calls_so_far) pairs concurrently in one event loop; results in input order.
        `sessions` and `contexts`, when given, hold each call's session key and conversation."""
        keys = sessions if sessions is not None else [None] * len(calls)
        seen = contexts if contexts is not None else [None] * len(calls)
        if not len(keys) == len(seen) == len(calls):
            raise ValueError(f"{len(calls)} calls, {len(keys)} sessions and {len(seen)} contexts")

        async def run_all() -> list[ToolResult]:
            return list(await asyncio.gather(*(self.execute(call, so_far, key, context)
                                               for (call, so_far), key, context in zip(calls, keys, seen))))

        return _run_coroutine(run_all)

    def end_session(self, session: Hashable) -> None:
        """Release every tool's state for `session` (a rollout that ended); safe to repeat."""
        for tool in self._tools.values():
            if getattr(tool, "uses_sessions", False):
                tool.end_session(session)


def _checked_images(result: ToolResult, name: str) -> ToolResult:
    """`result` with its images as RGB at a size a vision processor takes, or a tool error."""
    if not result.images:
        return result
    from metis_cli.data.images import fit_image, to_rgb
    from metis_cli.errors import DataError

    try:
        result.images = [fit_image(to_rgb(image), where=f"image {index} returned by {name}")
                         for index, image in enumerate(result.images)]
    except DataError as problem:
        return error_result(ToolErrorKind.TOOL_ERROR, f"the tool returned an unusable image: {problem}")
    return result


def _run_coroutine(make: Callable) -> Any:
    """asyncio.run, also from code that already runs inside an event loop (e.g. a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
