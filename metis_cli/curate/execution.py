"""Filter 2, execution consistency: re-run every recorded tool call through the tool registry.

A trajectory is dropped when one of its calls fails on re-execution (unknown tool, bad
arguments, a tool error, a timeout) or when the output recorded in its `tool` turn differs from
what re-execution gives: training on it would teach the model "hallucinated environment
dynamics" (a calculator that says 123 * 45 = 5000). Outputs are compared with whitespace
collapsed; tools listed in `ignore_output_of` (non-deterministic ones) must still succeed, but
their outputs are not compared. Each call is re-run on its own (`calls_so_far=0`): the question is
whether the recorded call reproduces, not whether it fits this recipe's per-rollout call limit.
All calls of a batch of rows go to the registry at once, so they run concurrently.

Rows with images: a call is re-run seeing the images the rollout would have shown it (the
prompt's, then earlier tool turns', `ToolContext`), so `zoom_in` crops the row's own picture. The
images a tool turn recorded must be the ones re-execution returns: as many, the same sizes, and
pixels within IMAGE_TOLERANCE on average (lossy re-encoding passes; another crop does not).
Text-only rows are not compared on images (a text-only policy is never shown a tool's images).
"""

from __future__ import annotations

from metis_cli.agent.tools.base import ToolContext
from metis_cli.curate.rows import Candidate
from metis_cli.curate.validity import RecordedCall, recorded_calls
from metis_cli.errors import DataError

IMAGE_TOLERANCE = 8.0
"""The largest mean absolute difference (0-255 per channel) between a recorded tool image and the
re-executed one that still counts as the same image."""


class ExecutionFilter:
    name = "execution"

    def __init__(self, registry, ignore_output_of: list[str]):
        self.registry = registry
        self.ignore_output_of = set(ignore_output_of)

    def apply(self, rows: list[Candidate]) -> None:
        pending: list[tuple[Candidate, RecordedCall]] = []
        row_images: dict[int, list] = {}  # id(row) -> its decoded images (rows with images only)
        for row in rows:
            calls = recorded_calls(row.example.trajectory or [])
            if not calls:
                row.note(self.name, "no tool calls")
            elif row.example.images:
                try:
                    row_images[id(row)] = row.example.load_images()
                except DataError as problem:
                    row.drop(self.name, "image unreadable", str(problem))
                    continue
            pending += [(row, call) for call in calls]
        if not pending:
            return
        contexts = [ToolContext(images=tuple(row_images.get(id(row), [])[: call.images_seen])) for row, call in pending]
        results = self.registry.execute_many([(call.call, 0) for _, call in pending], contexts=contexts)
        for (row, call), result in zip(pending, results):
            if not row.kept:
                continue  # an earlier call of this row already failed; report the first problem
            if not result.ok:
                row.drop(self.name, "tool call fails on re-execution",
                         f"{call.describe()}: {result.error}: {_clip(result.text)}")
            elif call.recorded_output is None:
                row.drop(self.name, "tool call without a recorded output", f"{call.describe()} has no tool turn")
            elif call.call.name not in self.ignore_output_of and not _same(call.recorded_output, result.text):
                row.drop(self.name, "recorded tool output differs from re-execution",
                         f"{call.describe()}: recorded {_clip(call.recorded_output)!r}, "
                         f"re-execution gives {_clip(result.text)!r}")
            elif call.call.name not in self.ignore_output_of and id(row) in row_images:
                # Only rows with images: a text-only policy never sees a tool's images, so its
                # trajectories rightly record none.
                recorded = row_images[id(row)][call.image_offset: call.image_offset + call.recorded_images]
                problem = _image_difference(recorded, list(result.images))
                if problem is not None:
                    row.drop(self.name, "recorded tool output differs from re-execution",
                             f"{call.describe()}: {problem}")


def _same(recorded: str, actual: str) -> bool:
    return recorded.split() == actual.split()


def _image_difference(recorded: list, returned: list) -> str | None:
    """What differs between a tool turn's recorded images and re-execution's, or None."""
    import numpy as np

    if len(recorded) != len(returned):
        return f"the tool turn holds {len(recorded)} image(s), re-execution returns {len(returned)}"
    for index, (old, new) in enumerate(zip(recorded, returned)):
        if old.size != new.size:
            return (f"image {index} is {old.width}x{old.height} pixels, "
                    f"re-execution returns {new.width}x{new.height}")
        gap = float(np.abs(np.asarray(old, dtype=np.int16) - np.asarray(new.convert("RGB"), dtype=np.int16)).mean())
        if gap > IMAGE_TOLERANCE:
            return f"image {index} differs from re-execution's by {gap:.1f} of 255 per pixel on average"
    return None


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
