"""`metis curate`: the paper's data curation, streamed in batches, resumable, with a per-filter report.

  sft mode (cold-start trajectories): validity -> execution consistency -> tool necessity
      -> LLM judge (optional) -> dedup by normalized prompt;
  rl mode (RL prompts): validity -> dedup -> pass-rate filter (keep 0 < pass rate < 1).
Each filter is switched in `curate.filters`; what they check is in `metis_cli/curate/*`.

Input rows are read lazily (`iter_examples`) and decided `curate.batch_size` at a time; each
decided batch is appended to `<curate.output>/decisions.jsonl` before the next one starts, so a
crash or Ctrl-C loses at most one batch and `--resume` skips every row already decided.
Malformed input rows stop the run (`data.malformed_rows: error`, message naming file and line)
or are recorded and dropped (`skip`). At the end the curated rows, pass rates and report.json
are derived from the decisions file (curate/report.py).

Shape: `CurateStage` with `setup()` (`_setup_folder`, `_setup_filters`), `curate()`,
`finish()`; `run()` wires them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from metis_cli.curate.rows import Candidate
from metis_cli.errors import DataError


@dataclass
class CurateResult:
    output_dir: Path
    report: dict


class CurateStage:
    def __init__(self, recipe, *, resume: bool = False, overwrite: bool = False, quiet: bool = False):
        self.recipe, self.cfg = recipe, recipe.curate
        self.resume, self.overwrite, self.quiet = resume, overwrite, quiet
        self.output_dir = Path(self.cfg.output)
        self.kept = self.decided = 0

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        if not self.cfg.input:
            raise DataError(
                "curate.input is empty: name the trajectories (mode sft) or prompts (mode rl) to curate, "
                "e.g. curate.input: [{path: data/trajectories.jsonl}] or [{path: 'synthetic:cold_start'}]"
            )
        from metis_cli.rewards.preflight import preflight

        preflight(self.recipe, "curate")  # a dead judge or search API fails here, before any model loads
        self._setup_folder()
        self._setup_filters()

    def _setup_folder(self) -> None:
        from metis_cli.curate.decisions import DecisionLog, decision_settings

        self.log = DecisionLog(self.output_dir)
        self.state = self.log.prepare(decision_settings(self.recipe), resume=self.resume, overwrite=self.overwrite)
        self.kept, self.decided = self.state.kept, self.state.rows
        if self.state.rows and not self.quiet:
            print(f"curate: resuming, {self.state.rows} rows already decided in {self.log.path}", file=sys.stderr)

    def _setup_filters(self) -> None:
        from metis_cli.curate.filters import build_filters
        from metis_cli.telemetry.progress import spinner

        with spinner("curate: setting up filters", quiet=self.quiet):
            self.plan = build_filters(self.recipe, dedup_first_ids=self.state.dedup_first_ids)

    # ------------------------------------------------------------------------------ curate
    def curate(self) -> None:
        """Decide every input row not decided yet, batch by batch."""
        from metis_cli.telemetry.progress import StageProgress

        total = _estimated_rows([self._resolved(s) for s in self.cfg.input])
        try:
            with StageProgress("curate", total, quiet=self.quiet, completed=self.decided) as bar:
                for rows, malformed in self._batches():
                    self._decide(rows)
                    self.log.append(malformed + [row.record() for row in rows])
                    self.decided += len(rows) + len(malformed)
                    self.kept += sum(row.kept for row in rows)
                    bar.update(self.decided, kept=self.kept, dropped=self.decided - self.kept)
        except KeyboardInterrupt:
            print(f"curate: {self.decided} decided rows are saved in {self.log.path}; "
                  "rerun with --resume to continue", file=sys.stderr)
            raise

    def _decide(self, rows: list[Candidate]) -> None:
        for row_filter in self.plan.active:
            alive = [row for row in rows if row.kept]
            if not alive:
                return
            for row in alive:
                row.filters_ran.append(row_filter.name)
            row_filter.apply(alive)

    def _batches(self) -> Iterator[tuple[list[Candidate], list[dict]]]:
        """(rows to decide, malformed-row records) in input order, skipping what is already decided."""
        rows: list[Candidate] = []
        malformed: list[dict] = []
        for item in self._stream():
            if isinstance(item, Candidate):
                if (item.source, item.ordinal) not in self.state.done:
                    rows.append(item)
            elif (item["source"], item["malformed"]) not in self.state.malformed:
                malformed.append(item)
            if len(rows) >= self.cfg.batch_size:
                yield rows, malformed
                rows, malformed = [], []
        if rows or malformed:
            yield rows, malformed

    def _stream(self) -> Iterator[Candidate | dict]:
        from metis_cli.data.datasets import iter_examples

        for index, source in enumerate(self.cfg.input):
            skipped: list[str] = []  # iter_examples appends a message per malformed row it drops
            reported = 0
            examples = iter_examples(self._resolved(source), need_answer=False,
                                     malformed_rows=self.recipe.data.malformed_rows, skipped=skipped)
            for ordinal, example in enumerate(examples):
                for message in skipped[reported:]:
                    yield {"source": index, "malformed": message}
                reported = len(skipped)
                yield Candidate(example, index, ordinal, source.path)
            for message in skipped[reported:]:
                yield {"source": index, "malformed": message}

    def _resolved(self, source):
        """The source with `synthetic:<name>` materialised as a JSONL file in the run folder."""
        from metis_cli.data.sources import SYNTHETIC_PREFIX, materialize_synthetic

        if not source.path.startswith(SYNTHETIC_PREFIX):
            return source
        path = materialize_synthetic(source.path[len(SYNTHETIC_PREFIX):], self.recipe)
        return source.model_copy(update={"path": str(path)})

    # ------------------------------------------------------------------------------ finish
    def finish(self) -> dict:
        from metis_cli.curate.filters import planned_filters
        from metis_cli.curate.report import finalize
        from metis_cli.telemetry.run import mark_done

        running, skipped = planned_filters(self.cfg)
        report = finalize(self.log.records(), self.output_dir, mode=self.cfg.mode,
                          inputs=[s.path for s in self.cfg.input], output_format=self.cfg.format,
                          running=running, skipped=skipped)
        mark_done(self.output_dir, {"kept": report["kept"], "rows_read": report["rows_read"]})
        return report


def run(recipe, *, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> CurateResult:
    stage = CurateStage(recipe, resume=resume, overwrite=overwrite, quiet=quiet)
    stage.setup()
    stage.curate()
    return CurateResult(stage.output_dir, stage.finish())


def _estimated_rows(sources) -> int | None:
    """Rows the progress bar expects (JSONL lines, parquet row counts); None when unknown."""
    total = 0
    for source in sources:
        path = Path(source.path)
        if path.suffix == ".jsonl" and path.is_file():
            with path.open("rb") as lines:
                count = sum(1 for line in lines if line.strip())
        elif path.suffix == ".parquet" and path.is_file():
            import pyarrow.parquet as pq

            try:
                count = pq.ParquetFile(path).metadata.num_rows
            except Exception:  # noqa: BLE001 - an unreadable file is reported when it is read
                return None
        else:
            return None
        total += min(count, source.limit) if source.limit else count
    return total
