"""The curate output folder's state: the append-only per-row decisions file and resuming from it.

`decisions.jsonl` gets one JSON line per input row once its batch is decided (kept rows carry
their curated row; malformed input rows are recorded as `{"source", "malformed": message}`).
Each batch is written with one write + fsync, so a crash or Ctrl-C loses at most the batch in
flight; a half-written last line (a kill in mid-write) is cut off when the file is read back.
`settings.json` holds the recipe settings that decide rows; `--resume` refuses to mix decisions
made under different settings. The curated files, report.json and DONE.json are derived from
decisions.jsonl at the end (report.py), so a resumed run ends with exactly the output an
uninterrupted one would have written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from metis_cli.errors import RunFolderError
from metis_cli.files import append_whole, write_atomic
from metis_cli.telemetry.run import DONE_FILE

DECISIONS_FILE = "decisions.jsonl"
SETTINGS_FILE = "settings.json"
# Everything `metis curate` writes into curate.output; --overwrite removes these and nothing else.
OWNED_FILES = (DECISIONS_FILE, SETTINGS_FILE, DONE_FILE, "report.json", "curated.jsonl", "curated.parquet",
               "pass_rates.jsonl")


def decision_settings(recipe) -> dict:
    """The parts of a recipe that change which rows are kept (compared on --resume).

    Where and how things run is left out, so a resumed run may fix an unreachable judge's
    base_url or change batch sizes without invalidating the rows already decided.
    """
    judge_transport = {"base_url", "api_key_env", "max_retries", "backoff_s", "timeout_s", "max_concurrency"}
    curate = recipe.curate.model_dump(
        mode="json", exclude={"output": True, "format": True, "batch_size": True,
                              "filters": {"judge": judge_transport}},
    )
    return {
        "curate": curate,
        "tools": recipe.tools.model_dump(mode="json"),
        "rollout": recipe.rollout.model_dump(mode="json", exclude={"batch_size", "vllm"}),
        "reward": recipe.reward.model_dump(mode="json"),
        "seed": recipe.run.seed,
        "malformed_rows": recipe.data.malformed_rows,
        "synthetic": recipe.data.synthetic.model_dump(mode="json"),
    }


@dataclass
class ResumeState:
    """What earlier runs into this folder already decided."""

    done: set[tuple[int, int]] = field(default_factory=set)  # (source, ordinal) of decided rows
    malformed: set[tuple[int, str]] = field(default_factory=set)  # (source, message) already recorded
    dedup_first_ids: dict[str, str] = field(default_factory=dict)  # prompt key -> kept row id
    kept: int = 0

    @property
    def rows(self) -> int:
        return len(self.done) + len(self.malformed)

    def add(self, record: dict) -> None:
        if "malformed" in record:
            self.malformed.add((record["source"], record["malformed"]))
            return
        self.done.add((record["source"], record["ordinal"]))
        if record["kept"]:
            self.kept += 1
            self.dedup_first_ids.setdefault(record["prompt_key"], record["id"])


class DecisionLog:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / DECISIONS_FILE

    def prepare(self, settings: dict, *, resume: bool, overwrite: bool) -> ResumeState:
        """Make the folder ready; returns what is already decided (empty unless resuming)."""
        finished = (self.folder / DONE_FILE).exists()
        started = self.path.exists()
        if overwrite:
            for name in OWNED_FILES:
                (self.folder / name).unlink(missing_ok=True)
        elif finished and not resume:
            raise RunFolderError(
                f"{self.folder} already holds a finished curate run; pass --overwrite to redo it "
                "or set another curate.output"
            )
        elif started and not resume:
            raise RunFolderError(
                f"{self.folder} holds an unfinished curate run; pass --resume to continue it "
                "or --overwrite to start over"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_path = self.folder / SETTINGS_FILE
        state = ResumeState()
        if resume and started and not overwrite:
            self._check_settings(settings_path, settings)
            for record in self.records():
                state.add(record)
        (self.folder / DONE_FILE).unlink(missing_ok=True)
        write_atomic(settings_path, json.dumps(settings, indent=2, sort_keys=True))
        return state

    def _check_settings(self, settings_path: Path, settings: dict) -> None:
        if not settings_path.exists():
            return
        previous = json.loads(settings_path.read_text(encoding="utf-8"))
        changed = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
        if changed:
            raise RunFolderError(
                f"{self.folder}: the recipe's {', '.join(changed)} settings changed since the earlier "
                "run, so its decisions no longer apply; restore them, or pass --overwrite to start over"
            )

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records)
        append_whole(self.path, text, fsync=True)

    def records(self) -> Iterator[dict]:
        """Every complete decision, in the order written (a half-written last line is cut off)."""
        if not self.path.exists():
            return
        self._cut_partial_line()
        with self.path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise RunFolderError(
                        f"{self.path} line {number} is corrupt; pass --overwrite to start the curate run over"
                    ) from None

    def _cut_partial_line(self) -> None:
        with self.path.open("rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            handle.seek(0)
            data = handle.read()
            handle.truncate(data.rfind(b"\n") + 1)


