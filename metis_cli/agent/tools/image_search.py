"""The `image_search` tool: BM25 (bm25s) over the captions of a local image corpus; returns the
top-k images with their captions.

The corpus (recipe `tools.image_search.corpus`) is either
- a JSONL file, one `{"image": PATH, "caption": TEXT[, "id": ...]}` per line, paths relative to
  the file's folder; or
- a folder of images (png, jpg, jpeg, webp, gif, bmp; subfolders included), each captioned by
  the text file beside it with the same stem (`cat.png` + `cat.txt`), else by its file name.

The index covers captions only and is built once when the tool is created; images are read when
a query returns them, sized to at most `max_pixels`. They become the next images of the
conversation, and the observation lists each hit as `<rank>. [<id>] <caption> (image <n>)`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from metis_cli.agent.tools.base import ToolContext, ToolErrorKind, ToolResult, error_result
from metis_cli.agent.tools.search import Document, SearchTool
from metis_cli.data.images import load_image
from metis_cli.errors import DataError, ToolConfigError

log = logging.getLogger("metis.tools.image_search")

CORPUS_FIELD = "tools.image_search.corpus"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


@dataclass(frozen=True)
class CaptionedImage:
    id: str
    caption: str
    path: Path


def load_image_corpus(path: str | Path | None) -> list[CaptionedImage]:
    """The corpus at `path` (module docstring); errors name `tools.image_search.corpus`."""
    if path is None:
        raise ToolConfigError(f"{CORPUS_FIELD} is not set but the image_search tool is enabled; point it at a "
                              'JSONL file of {"image", "caption"} rows or a folder of images with .txt captions')
    corpus = Path(path)
    if corpus.is_dir():
        entries = _folder_entries(corpus)
    elif corpus.is_file():
        entries = _jsonl_entries(corpus)
    else:
        raise ToolConfigError(f"{CORPUS_FIELD}: not found: {corpus} (check the path in the recipe)")
    if not entries:
        raise ToolConfigError(f"{CORPUS_FIELD}: {corpus} has no images")
    return entries


class ImageSearchTool:
    """Keyword search over captioned local images."""

    name = "image_search"
    needs_context = True
    description = "Search a local image collection by keywords; returns the best matching images with their captions."
    parameters = SearchTool.parameters

    def __init__(self, entries: list[CaptionedImage], *, top_k: int = 3, max_pixels: int | None = None):
        self.entries = entries
        self.max_pixels = max_pixels
        self._captions = SearchTool([Document(id=entry.id, text=entry.caption) for entry in entries], top_k=top_k)
        self._by_id = {entry.id: entry for entry in entries}

    @classmethod
    def from_corpus(cls, path: str | Path | None, *, top_k: int = 3, max_pixels: int | None = None) -> ImageSearchTool:
        return cls(load_image_corpus(path), top_k=top_k, max_pixels=max_pixels)

    async def call(self, arguments: dict, context: ToolContext) -> ToolResult:
        started = time.perf_counter()
        query = arguments["query"].strip()
        if not query:
            return error_result(ToolErrorKind.TOOL_ERROR, "the query is empty; give a few keywords")
        hits = [self._by_id[document.id] for document, _ in self._captions.search(query)]
        images, lines = [], []
        for rank, entry in enumerate(hits, start=1):
            try:
                image = load_image(entry.path, where=f"{CORPUS_FIELD} image {entry.id!r}", max_pixels=self.max_pixels)
            except DataError as problem:
                log.warning("image_search: %s", problem)
                lines.append(f"{rank}. [{entry.id}] {entry.caption} (image unreadable)")
                continue
            lines.append(f"{rank}. [{entry.id}] {entry.caption} (image {len(context.images) + len(images)})")
            images.append(image)
        text = "\n".join(lines) if lines else f"No images match {query!r}."
        return ToolResult(text=text, images=images, runtime_s=time.perf_counter() - started)


def _folder_entries(folder: Path) -> list[CaptionedImage]:
    entries = []
    for image_path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption_path = image_path.with_suffix(".txt")
        if caption_path.is_file():
            caption = " ".join(caption_path.read_text(encoding="utf-8").split())
        else:
            caption = image_path.stem.replace("_", " ").replace("-", " ")
        entries.append(CaptionedImage(id=str(image_path.relative_to(folder)), caption=caption, path=image_path))
    return entries


def _jsonl_entries(corpus: Path) -> list[CaptionedImage]:
    entries, seen = [], set()
    with corpus.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{CORPUS_FIELD}: {corpus} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ToolConfigError(f"{where}: invalid JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) \
                    or not isinstance(row.get("caption"), str):
                raise ToolConfigError(f'{where}: expected {{"image": PATH, "caption": TEXT[, "id": ...]}}')
            image_path = Path(row["image"]).expanduser()
            image_path = image_path if image_path.is_absolute() else corpus.parent / image_path
            if not image_path.is_file():
                raise ToolConfigError(f"{where}: image file not found: {image_path} "
                                      "(paths are relative to the corpus file's folder)")
            entry_id = str(row.get("id", number))
            if entry_id in seen:
                raise ToolConfigError(f"{where}: id {entry_id!r} is used twice")
            seen.add(entry_id)
            entries.append(CaptionedImage(id=entry_id, caption=row["caption"], path=image_path))
    return entries
