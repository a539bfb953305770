"""The dashboard's view of a sweep folder (`metis watch SWEEP_DIR`): its runs and how they stand.

One row per run (variant x seed): status, the variant, the seed, and the final held-out
accuracy / tool-call ratio per subset once the run has them; re-read from sweep.json
(`telemetry.sweep_folder`) on every poll, so a running sweep's progress shows as it happens.
One run's live charts: `metis watch` on its folder, which the view names. Reads only.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from metis_cli.errors import RunFolderError
from metis_cli.telemetry import metrics as m
from metis_cli.telemetry.sweep_folder import read_sweep

STATUS_STYLES = {"done": "green", "running": "bold yellow", "failed": "bold red", "stopped": "yellow", "pending": "dim"}


class SweepView(VerticalScroll, can_focus=True):
    DEFAULT_CSS = """
    SweepView { padding: 0 1; }
    """

    def __init__(self, folder: Path):
        super().__init__(classes="panel")
        self.folder = Path(folder)
        self.border_title = f"sweep {self.folder}"
        self.sweep: dict | None = None
        self.problem: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="sweep-runs")
        yield Static("", id="sweep-hint")

    def reload(self) -> None:
        """Re-read sweep.json and redraw."""
        try:
            self.sweep, self.problem = read_sweep(self.folder), None
        except RunFolderError as error:  # e.g. caught mid-replace on a file system without atomic rename
            self.problem = str(error)
        self.query_one("#sweep-runs", Static).update(self._table() if self.sweep else Text(self.problem or ""))
        running = [r for r in (self.sweep or {}).get("runs", []) if r["status"] == "running"]
        target = running[0]["run_dir"] if running else "runs/VARIANT/seed-N"
        self.query_one("#sweep-hint", Static).update(
            Text(f"one run's live charts: metis watch {self.folder / target}   report: {self.folder / 'report.md'}",
                 style="dim"))

    def status_text(self) -> Text:
        line = Text()
        line.append(" sweep ", "bold reverse")
        if self.sweep is None:
            line.append(f"  {self.problem or 'reading sweep.json'}", "bold red" if self.problem else "")
            return line
        runs = self.sweep["runs"]
        counts = Counter(r["status"] for r in runs)
        line.append(f" {counts['done']}/{len(runs)} runs done")
        for status in ("running", "failed", "stopped"):
            if counts[status]:
                line.append(f"  {counts[status]} {status}", STATUS_STYLES[status])
        return line

    def _table(self) -> Table:
        runs = self.sweep["runs"]
        subsets = sorted({s for r in runs for s in (r.get("final") or {})})
        table = Table(expand=True, box=None, header_style="bold")
        for name in ("status", "variant", "seed", *(f"{s} acc / tools" for s in subsets)):
            table.add_column(name, overflow="fold")
        for run in runs:
            figures = run.get("final") or {}
            cells = []
            for subset in subsets:
                values = figures.get(subset, {})
                accuracy, tools = values.get(m.ACCURACY), values.get(m.TOOL_CALL_RATIO)
                cells.append("-" if accuracy is None or tools is None else f"{accuracy:.0%} / {tools:.0%}")
            status = Text(run["status"], STATUS_STYLES.get(run["status"], ""))
            table.add_row(status, run["name"], str(run["seed"]), *cells)
            if run["status"] == "failed" and run.get("error"):
                table.add_row("", Text(str(run["error"]).splitlines()[0], "red"), "", *[""] * len(subsets))
        return table
