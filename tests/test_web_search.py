"""The search tool's http backend against a small Serper-style server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading

import pytest
from local_http import LocalJSONServer, scripted

from metis_cli.agent.parser import ParsedToolCall
from metis_cli.agent.tools import ToolErrorKind, ToolRegistry
from metis_cli.agent.tools.search import WebSearchTool
from metis_cli.errors import ToolConfigError
from metis_cli.recipe.schema import ToolsConfig

KEY_ENV = "METIS_TEST_SEARCH_KEY"


def organic(n: int) -> list[dict]:
    return [{"title": f"Result {i}", "link": f"https://example.org/{i}", "snippet": f"snippet {i}",
             "position": i} for i in range(1, n + 1)]


class SerperLike(LocalJSONServer):
    """A Serper-style /search endpoint answering from a script of (status, body) pairs (the last
    repeats); a float status means: wait that many seconds, then answer 200."""

    def __init__(self, script: list[tuple]):
        next_reply = scripted(script)

        def respond(request):
            status, payload = next_reply(request)
            if isinstance(status, float):
                threading.Event().wait(status)
                status = 200
            return status, payload

        super().__init__(respond)

    @property
    def url(self) -> str:
        return f"{self.address}/search"


def search(tool: WebSearchTool, query: str):
    return asyncio.run(tool.call({"query": query}))


def tool_for(server: SerperLike, tmp_path, **options) -> WebSearchTool:
    settings = dict(api_key_env=KEY_ENV, top_k=10, timeout_s=2.0, retries=2, backoff_s=0.001,
                    cache_dir=tmp_path / "cache")
    return WebSearchTool(server.url, **(settings | options))


def test_top_results_with_the_key_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sekret")
    with SerperLike([(200, {"organic": organic(12)})]) as server:
        result = search(tool_for(server, tmp_path), "  capital of France ")
        [request] = server.requests
    assert request["body"] == {"q": "capital of France"}
    assert request["headers"]["X-API-KEY"] == "sekret"
    lines = result.text.splitlines()
    assert result.error is None and len(lines) == 10  # top 10 of 12
    assert lines[0] == "1. Result 1 (https://example.org/1) -- snippet 1"
    assert lines[9].startswith("10. Result 10")


def test_results_are_cached_on_disk(tmp_path):
    with SerperLike([(200, {"organic": organic(2)})]) as server:
        first = search(tool_for(server, tmp_path), "q")
        again = search(tool_for(server, tmp_path), "q")  # a new tool (a new run) reads the same cache
        other = search(tool_for(server, tmp_path), "another query")
        assert len(server.requests) == 2
    assert again.text == first.text and other.error is None
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2


def test_server_errors_are_retried_then_reported_as_a_tool_error(tmp_path):
    with SerperLike([(503, "busy"), (429, "slow down"), (200, {"organic": organic(1)})]) as server:
        assert search(tool_for(server, tmp_path), "q").text.startswith("1. Result 1")
        assert len(server.requests) == 3
    with SerperLike([(500, "down")]) as server:
        result = search(tool_for(server, tmp_path, retries=1), "q2")
        assert len(server.requests) == 2
    assert result.error == ToolErrorKind.TOOL_ERROR and "HTTP 500" in result.text
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # the success is cached, the failure is not


def test_a_rejected_key_is_not_retried(tmp_path, caplog):
    with SerperLike([(403, {"message": "Unauthorized"})]) as server:
        result = search(tool_for(server, tmp_path), "q")
        assert len(server.requests) == 1
    assert result.error == ToolErrorKind.TOOL_ERROR and "refused the request (403)" in result.text
    assert KEY_ENV in caplog.text  # the user is told which variable to set; the model is not


@pytest.mark.parametrize("payload", ["not json", ["a", "list"]])
def test_a_malformed_reply_is_a_tool_error(tmp_path, payload):
    with SerperLike([(200, payload)]) as server:
        result = search(tool_for(server, tmp_path), "q")
    assert result.error == ToolErrorKind.TOOL_ERROR and "organic" in result.text


def test_timeout_and_unreachable_service_are_tool_errors(tmp_path):
    with SerperLike([(1.0, {"organic": organic(1)})]) as server:
        result = search(tool_for(server, tmp_path, timeout_s=0.2, retries=1), "slow")
        assert len(server.requests) == 2
    assert result.error == ToolErrorKind.TOOL_ERROR and "within 0.2 s" in result.text
    result = search(tool_for(server, tmp_path, retries=0), "nobody listens")
    assert result.error == ToolErrorKind.TOOL_ERROR and "unreachable" in result.text


def test_recipe_builds_the_http_backend(tmp_path):
    with SerperLike([(200, {"organic": []})]) as server:
        cfg = ToolsConfig(enabled=["search"], search={"backend": "http", "top_k": 10,
                                                      "http": {"url": server.url, "cache_dir": None}})
        registry = ToolRegistry.from_config(cfg)
        call = ParsedToolCall(name="search", arguments={"query": "nothing"}, raw="", error=None)
        [result] = registry.execute_many([(call, 0)])
    assert isinstance(registry.get("search"), WebSearchTool)
    assert result.text == "No results for 'nothing'."
    with pytest.raises(ToolConfigError, match="tools.search.http.url"):
        ToolRegistry.from_config(ToolsConfig(enabled=["search"], search={"backend": "http"}))
