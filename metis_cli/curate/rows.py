"""One row under curation (`Candidate`) and the decision record it becomes.

A candidate starts kept; the first filter that rejects it calls `drop(filter, reason, detail)`
and later filters never see it. `reason` is a short fixed phrase (the report counts rows per
reason); `detail` says what exactly was wrong with this row. Filters that let a row through
without checking it (e.g. necessity on a trajectory that calls no tool) leave a `note`.
Provenance (`filters` that ran, pass rates) travels with a kept row into the curated output
under the `curation` key, which the dataset loader keeps in `Example.meta`.

Rows with images: contents keep their `{"type": "text"}` / `{"type": "image"}` parts and the row
its `images` in order of appearance, stored JSON-safe (curate/row_images.py; report.py turns them
into the output file's form). Dedup compares text parts like string contents and the prompt's
images by a hash of their bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

from metis_cli.curate.row_images import image_identity, stored_image
from metis_cli.data.content import IMAGE_PLACEHOLDER, image_count
from metis_cli.data.datasets import Example


@dataclass
class Candidate:
    """An example read from input `source` (index into curate.input) as its `ordinal`-th row."""

    example: Example
    source: int
    ordinal: int
    source_path: str
    filters_ran: list[str] = field(default_factory=list)
    dropped_by: str | None = None
    reason: str | None = None
    detail: str | None = None
    notes: dict[str, str] = field(default_factory=dict)  # filter -> why it let the row through unchecked
    pass_rates: dict[str, float] = field(default_factory=dict)  # filter -> share of k samples correct

    @property
    def kept(self) -> bool:
        return self.dropped_by is None

    def drop(self, filter_name: str, reason: str, detail: str = "") -> None:
        self.dropped_by, self.reason, self.detail = filter_name, reason, detail or None

    def note(self, filter_name: str, text: str) -> None:
        self.notes[filter_name] = text

    @cached_property
    def prompt_key(self) -> str:
        """`prompt_key(self.example)`, computed once (it hashes the prompt's image files)."""
        return prompt_key(self.example)

    def record(self) -> dict:
        """The JSON line written to decisions.jsonl (kept rows carry their output row)."""
        record = {
            "source": self.source,
            "ordinal": self.ordinal,
            "id": self.example.id,
            "subset": self.example.subset,
            "kept": self.kept,
            "filters": self.filters_ran,
            "dropped_by": self.dropped_by,
            "reason": self.reason,
            "detail": self.detail,
            "notes": self.notes,
            "pass_rates": self.pass_rates,
            "prompt_key": self.prompt_key,
        }
        if self.kept:
            record["row"] = self.output_row()
        return record

    def output_row(self) -> dict:
        """The curated row: messages layout, the input's extra columns, and `curation` provenance."""
        example = self.example
        row = {
            "id": example.id,
            "messages": example.trajectory or example.messages,
            "answer": example.answer,
            "subset": example.subset,
        }
        if example.images:
            row["images"] = [stored_image(image) for image in example.images]
        row.update({key: value for key, value in example.meta.items() if key not in row})
        row["curation"] = {"source": self.source_path, "filters": list(self.filters_ran)}
        if self.pass_rates:  # left out when empty: parquet cannot store an empty struct
            row["curation"]["pass_rates"] = dict(self.pass_rates)
        return row


def normalized_prompt(example: Example) -> str:
    """The prompt as dedup compares it: non-system turns, casefolded, whitespace collapsed, each
    image part as `<image>`; then the prompt's images by identity (a hash of their bytes)."""
    turns = [f"{message['role']}: {_normalized_content(message['content'])}"
             for message in example.messages if message["role"] != "system"]
    images = [image_identity(image) for image in prompt_images(example)]
    return json.dumps([turns, images], ensure_ascii=False)


def prompt_images(example: Example) -> list:
    """The sources of the prompt's images (a trajectory's `images` go on with its tool turns')."""
    return example.images[: sum(image_count(message["content"]) for message in example.messages)]


def _normalized_content(content: str | list[dict]) -> str:
    if not isinstance(content, str):
        content = " ".join(IMAGE_PLACEHOLDER if part["type"] == "image" else part["text"] for part in content)
    return " ".join(content.casefold().split())


def prompt_key(example: Example) -> str:
    """A short stable hash of `normalized_prompt` (stored per row so a resumed run can rebuild it)."""
    return hashlib.blake2b(normalized_prompt(example).encode("utf-8"), digest_size=12).hexdigest()
