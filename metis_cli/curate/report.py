"""Turning decisions.jsonl into the results: curated rows, pass rates, report.json, the rich table.

Everything here is derived from the decisions file alone (one streaming pass), so a resumed run
writes the same files as an uninterrupted one. Files in curate.output:
  curated.jsonl | curated.parquet  kept rows, in input order, with `curation` provenance; images as
                                   paths relative to this folder (JSONL; data URLs where the input
                                   embedded them) or embedded {bytes, path} structs (parquet);
  pass_rates.jsonl                 {id, subset, filter, pass_rate, kept} per row a sampling filter scored;
  report.json                      counts per filter (in, kept, dropped, reasons, notes).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from metis_cli.curate.decisions import DECISIONS_FILE
from metis_cli.curate.row_images import output_image
from metis_cli.files import storage_errors, write_atomic

MALFORMED_LISTED = 50  # malformed-row messages listed in report.json (all are in decisions.jsonl)


def finalize(records: Iterable[dict], folder: Path, *, mode: str, inputs: list[str], output_format: str,
             running: list[str], skipped: dict[str, str]) -> dict:
    """Write curated rows, pass rates and report.json from the decisions; return the report."""
    folder = Path(folder)
    curated_path = folder / f"curated.{output_format}"
    pass_rates_path = folder / "pass_rates.jsonl"
    counts = {name: {"in": 0, "dropped": 0, "reasons": Counter(), "notes": Counter(), "rates": []} for name in running}
    malformed: list[str] = []
    rows = kept = 0
    parquet_rows: list[dict] = []
    with _AtomicText(curated_path if output_format == "jsonl" else None) as curated, \
            _AtomicText(pass_rates_path) as pass_rates:
        for record in records:
            if "malformed" in record:
                malformed.append(record["malformed"])
                continue
            rows += 1
            for name in record["filters"]:
                if name in counts:
                    counts[name]["in"] += 1
            for name, note in record["notes"].items():
                if name in counts:
                    counts[name]["notes"][note] += 1
            for name, rate in record["pass_rates"].items():
                if name in counts:
                    counts[name]["rates"].append(rate)
                pass_rates.write({"id": record["id"], "subset": record["subset"], "filter": name,
                                  "pass_rate": rate, "kept": record["kept"]})
            if record["kept"]:
                kept += 1
                row = _output_row(record["row"], folder, output_format)
                if output_format == "jsonl":
                    curated.write(row)
                else:
                    parquet_rows.append(row)
            elif record["dropped_by"] in counts:
                counts[record["dropped_by"]]["dropped"] += 1
                counts[record["dropped_by"]]["reasons"][record["reason"]] += 1
    if output_format == "parquet":
        _write_parquet(parquet_rows, curated_path)
    stale = "parquet" if output_format == "jsonl" else "jsonl"
    (folder / f"curated.{stale}").unlink(missing_ok=True)  # from an earlier run with the other format
    filters = [_filter_report(name, counts[name]) for name in running]
    filters += [{"name": name, "ran": False, "why": why} for name, why in skipped.items()]
    report = {
        "mode": mode,
        "inputs": inputs,
        "rows_read": rows + len(malformed),
        "malformed_rows": len(malformed),
        "kept": kept,
        "dropped": rows - kept,
        "filters": filters,
        "malformed": malformed[:MALFORMED_LISTED],
        "files": {"curated": str(curated_path), "pass_rates": str(pass_rates_path),
                  "decisions": str(folder / DECISIONS_FILE), "report": str(folder / "report.json")},
    }
    write_atomic(folder / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    return report


def _output_row(row: dict, folder: Path, output_format: str) -> dict:
    """A decided row as the curated file keeps it: its images in the file's form (row_images.py)."""
    if not row.get("images"):
        return row
    return {**row, "images": [output_image(image, folder, output_format) for image in row["images"]]}


def _parts_everywhere(rows: list[dict]) -> list[dict]:
    """Rows whose message contents are all lists of parts once any is: a parquet column holds one
    type, and the loader reads a list of text parts back as the string it was."""
    if not any(isinstance(m.get("content"), list) for row in rows for m in row.get("messages") or []):
        return rows
    return [{**row, "messages": [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
        for m in row.get("messages") or []]} for row in rows]


def _filter_report(name: str, count: dict) -> dict:
    entry = {
        "name": name,
        "ran": True,
        "in": count["in"],
        "kept": count["in"] - count["dropped"],
        "dropped": count["dropped"],
        "reasons": dict(count["reasons"].most_common()),
        "notes": dict(count["notes"].most_common()),
    }
    if count["rates"]:
        entry["pass_rate_mean"] = sum(count["rates"]) / len(count["rates"])
    return entry


def print_report(report: dict) -> None:
    """The per-filter table on stdout."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"metis curate ({report['mode']}): {report['rows_read']} rows read, {report['kept']} kept")
    for column, justify in (("filter", "left"), ("in", "right"), ("kept", "right"), ("dropped", "right"),
                            ("why dropped / notes", "left")):
        table.add_column(column, justify=justify)
    if report["malformed_rows"]:
        table.add_row("malformed rows", str(report["rows_read"]), "-", str(report["malformed_rows"]),
                      "skipped per data.malformed_rows (listed in report.json)")
    for entry in report["filters"]:
        if not entry["ran"]:
            table.add_row(f"[dim]{entry['name']}[/]", "-", "-", "-", f"[dim]not run: {entry['why']}[/]")
            continue
        why = [f"{count} {escape(reason)}" for reason, count in entry["reasons"].items()]
        why += [f"[dim]{count} passed unchecked: {escape(note)}[/]" for note, count in entry["notes"].items()]
        if "pass_rate_mean" in entry:
            why.append(f"mean pass rate {entry['pass_rate_mean']:.2f}")
        table.add_row(entry["name"], str(entry["in"]), str(entry["kept"]), str(entry["dropped"]), "\n".join(why))
    console = Console(file=sys.stdout)
    console.print(table)
    console.print(f"curated rows: {escape(report['files']['curated'])}", highlight=False)


class _AtomicText:
    """JSON lines written to a temp file, moved into place on success (`path=None` writes nothing)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.handle = None

    def __enter__(self) -> _AtomicText:
        if self.path is not None:
            self.partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
            with storage_errors(self.path):
                self.handle = self.partial.open("w", encoding="utf-8")
        return self

    def write(self, row: dict) -> None:
        with storage_errors(self.path):
            self.handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

    def __exit__(self, error_type, *exc) -> None:
        if self.handle is None:
            return
        with storage_errors(self.path):
            try:
                self.handle.close()
                if error_type is None:
                    os.replace(self.partial, self.path)
            finally:
                with suppress(OSError):
                    self.partial.unlink(missing_ok=True)


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with storage_errors(path):
        try:
            pq.write_table(pa.Table.from_pylist(_parts_everywhere(rows)), partial)
            os.replace(partial, path)
        finally:
            with suppress(OSError):
                partial.unlink(missing_ok=True)

