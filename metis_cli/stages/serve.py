"""`metis serve`: a trained agent behind an OpenAI-compatible HTTP API, its tools run on the server.

Routes (FastAPI, served by uvicorn): `POST /v1/chat/completions` (streamed as server-sent events
or not), `GET /v1/models`, `GET /health` (no API key needed, for liveness probes). Every error
is an OpenAI error object (`{"error": {"message", "type", "param", "code"}}`): 400 for a
request the server refuses (stages/serve_openai.py checks it), 401 for a missing or wrong key,
404/405 for other paths and methods, 500 only for a bug; the server stays up after each. A tool
that fails is an observation the model reads, never an HTTP error.

Requests run in a pool of `max_concurrent` worker threads (more wait their turn); the model is
shared turn by turn through stages/serve_agent.py's `TurnBatcher`. docs/serve.md describes the
API for users.

Must not touch: the agent loop (agent/rollout.py), the wire format's details (serve_openai.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from metis_cli.stages.serve_openai import (
    BadRequest, ServerLimits, chunk, completion_body, error_body, final_chunk, parse_chat_request, sse, usage_chunk,
)

log = logging.getLogger("metis.serve")

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Request bodies above this are refused before they are read (a conversation is far smaller)."""


@dataclass(frozen=True)
class ServerSettings:
    model_id: str
    api_key: str | None = None
    max_concurrent: int = 16


def create_app(service, settings: ServerSettings):
    """The FastAPI app serving `service` (a serve_agent.AgentService)."""
    app = FastAPI(title="metis serve", docs_url=None, redoc_url=None, openapi_url=None)
    pool = ThreadPoolExecutor(max_workers=settings.max_concurrent, thread_name_prefix="metis-serve-request")
    started = int(time.time())
    limits: ServerLimits = service.limits

    def refuse(error: BadRequest) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise BadRequest("no API key: send the header 'Authorization: Bearer <key>' (the openai client's "
                             "api_key)", code="invalid_api_key", status=401)
        if not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise BadRequest("the API key is wrong", code="invalid_api_key", status=401)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(error_body(str(error.detail), code=str(error.status_code)), status_code=error.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "requests_in_flight": service.in_flight,
                "model_batches": service.batcher.batches}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except BadRequest as error:
            return refuse(error)
        return {"object": "list",
                "data": [{"id": settings.model_id, "object": "model", "created": started, "owned_by": "metis"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_key(request)
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                raise BadRequest(f"the request body is over {MAX_BODY_BYTES // 2**20} MiB", code="request_too_large")
            parsed = parse_chat_request(await request.body(), model_id=settings.model_id, limits=limits)
            await asyncio.get_running_loop().run_in_executor(pool, service.check_length, parsed)
        except BadRequest as error:
            return refuse(error)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not parsed.stream:
            try:
                result = await asyncio.get_running_loop().run_in_executor(pool, service.complete, parsed)
            except Exception as error:  # noqa: BLE001 - a bug fails this request; the server stays up
                log.exception("request %s failed", completion_id)
                return JSONResponse(internal_error(error), status_code=500)
            return completion_body(completion_id, created, settings.model_id, result)
        return StreamingResponse(_stream(service, pool, parsed, completion_id, created, settings.model_id),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.state.pool = pool
    return app


def internal_error(error: Exception) -> dict:
    return error_body(f"internal error: {type(error).__name__}: {error}", kind="server_error")


async def _stream(service, pool, request, completion_id: str, created: int, model: str):
    """The server-sent events of one streamed completion; the request stops if the client leaves."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def on_event(kind: str, payload) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

    def work():
        try:
            result = service.complete(request, on_event, cancelled)
            loop.call_soon_threadsafe(events.put_nowait, ("done", result))
        except Exception as error:  # noqa: BLE001 - reported to the client as an error event
            loop.call_soon_threadsafe(events.put_nowait, ("error", error))

    future = loop.run_in_executor(pool, work)
    try:
        yield sse(chunk(completion_id, created, model, {"role": "assistant", "content": ""}))
        while True:
            kind, payload = await events.get()
            if kind == "text":
                yield sse(chunk(completion_id, created, model, {"content": payload}))
            elif kind == "tool":
                yield sse(chunk(completion_id, created, model, {}, metis={"tool_call": payload}))
            elif kind == "error":
                log.error("request %s failed", completion_id, exc_info=payload)
                yield sse(internal_error(payload))
                break
            else:
                yield sse(final_chunk(completion_id, created, model, payload))
                if request.include_usage:
                    yield sse(usage_chunk(completion_id, created, model, payload))
                break
        yield sse("[DONE]")
    finally:
        cancelled.set()  # a no-op once done; otherwise the client left and the request stops at its next turn
        await asyncio.shield(future)


def open_service(model_path: str, recipe, *, quiet: bool = False):
    """Load the model and tools a recipe describes; the AgentService that serves them."""
    from metis_cli.agent.factory import build_agent, build_registry
    from metis_cli.data.synthetic import SYSTEM_PROMPT
    from metis_cli.model.runtime import seed_everything, setup_threads
    from metis_cli.stages.serve_agent import AgentService, BatchStream
    from metis_cli.telemetry.progress import spinner

    setup_threads(recipe.run.threads)
    seed_everything(recipe.run.seed)
    stream = BatchStream()
    kind = recipe.rollout.backend
    with spinner(f"serve: loading {model_path}", quiet=quiet):
        agent = build_agent(recipe, model_path, registry=build_registry(recipe), field="--model",
                            token_stream=stream if kind == "hf" else None)
    context = recipe.rollout.max_total_tokens
    if agent.model is not None:
        context = getattr(agent.model.config, "max_position_embeddings", None) or context
    chat = recipe.chat
    limits = ServerLimits(max_tokens=chat.max_new_tokens, max_turns=chat.max_turns, context_tokens=context,
                          temperature=chat.temperature, top_p=recipe.rollout.top_p)
    system_prompt = chat.system_prompt if chat.system_prompt is not None else SYSTEM_PROMPT
    return AgentService(agent, stream, limits=limits, system_prompt=system_prompt)


def serve(model_path: str, recipe, *, host: str, port: int, settings: ServerSettings, quiet: bool = False) -> None:
    """Load the model and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    service = open_service(model_path, recipe, quiet=quiet)
    app = create_app(service, settings)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info")
    finally:
        app.state.pool.shutdown(wait=False, cancel_futures=True)
        service.close()
