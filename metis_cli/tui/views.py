"""The panels of each stage, laid out to be read at 80x24 and to grow with the terminal.

HDPO: the headline "tool use" chart across the top (tool-call ratio and calls per rollout, eval
dots per subset), the two HDPO channels side by side (accuracy; efficiency, which switches on as
groups reach |Q| >= 2 correct rollouts), then progress numbers and the rollout browser.
SFT: the loss chart on top, learning rate and progress below. Before any metrics exist, a
waiting view says which file it waits for.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Center, Horizontal, Middle, Vertical, VerticalScroll
from textual.markup import escape
from textual.widgets import Static

from metis_cli.tui.charts import ChartPanel, Line
from metis_cli.telemetry import metrics as m
from metis_cli.telemetry.history import MetricsHistory
from metis_cli.tui.metrics_tail import RolloutBatch
from metis_cli.tui.rollout_view import RolloutPanel
from metis_cli.tui.summary import progress_text

ORANGE = (255, 166, 43)
SKY = (97, 175, 239)
GREEN = (126, 217, 87)
TEAL = (86, 206, 196)
GREY = (150, 156, 170)
VIOLET = (198, 120, 221)
GOLD = (229, 192, 123)

TOOL_USE_LINES = [
    Line(m.TOOL_CALL_RATIO, "tool-call ratio", ORANGE),
    Line(m.TOOL_CALLS_MEAN, "calls/rollout", SKY, right_axis=True),
]
ACCURACY_LINES = [
    Line(m.ACCURACY, "acc", GREEN),
    Line(m.R_ACC_MEAN, "r_acc", TEAL),
    Line(m.ADV_ACC_NONZERO, "A≠0", GREY),
]
EFFICIENCY_LINES = [
    Line(m.EFFICIENCY_GROUP_SHARE, "|Q|≥2", VIOLET),
    Line(m.R_TOOL_MEAN, "r_tool", GOLD),
    Line(m.ADV_TOOL_NONZERO, "A≠0", GREY),
]
LOSS_LINES = [Line(m.LOSS, "loss", ORANGE, decimals=4), Line(m.EVAL_LOSS, "eval loss", SKY, decimals=4)]
LR_LINES = [Line(m.LR, "lr", GOLD)]


class ProgressPanel(VerticalScroll, can_focus=True, inherit_bindings=False):
    """Pace, ETA, losses, this step's warnings, latest eval table."""

    ALLOW_MAXIMIZE = True
    DEFAULT_CSS = """
    ProgressPanel { padding: 0 1; scrollbar-size-vertical: 1;
        scrollbar-background: $surface; scrollbar-color: $primary 50%; border-subtitle-color: $text-muted; }
    """

    def __init__(self, stage: str, *, id: str | None = None):  # noqa: A002 - Textual's name for it
        super().__init__(id=id, classes="panel")
        self.stage = stage
        self.border_title = "progress"

    def compose(self) -> ComposeResult:
        yield Static("", id="progress-text")

    def show(self, history: MetricsHistory) -> None:
        self.query_one("#progress-text", Static).update(progress_text(self.stage, history))


class HdpoView(Vertical):
    DEFAULT_CSS = """
    HdpoView #tool-use { height: 3fr; min-height: 8; }
    HdpoView #channels { height: 3fr; min-height: 7; }
    HdpoView #lower { height: 4fr; min-height: 7; }
    HdpoView #progress { width: 30; }
    """

    def compose(self) -> ComposeResult:
        yield ChartPanel("tool use", TOOL_USE_LINES, eval_metric=m.TOOL_CALL_RATIO, id="tool-use")
        with Horizontal(id="channels"):
            yield ChartPanel("accuracy channel", ACCURACY_LINES, eval_metric=m.ACCURACY, id="accuracy")
            yield ChartPanel("efficiency channel", EFFICIENCY_LINES, id="efficiency")
        with Horizontal(id="lower"):
            yield ProgressPanel("hdpo", id="progress")
            yield RolloutPanel(id="rollouts")

    def show(self, history: MetricsHistory) -> None:
        for chart in self.query(ChartPanel):
            chart.show(history)
        self.query_one(ProgressPanel).show(history)

    def show_rollouts(self, batch: RolloutBatch) -> None:
        self.query_one(RolloutPanel).show_batch(batch)


class SftView(Vertical):
    DEFAULT_CSS = """
    SftView #loss { height: 3fr; min-height: 9; }
    SftView #lower { height: 2fr; min-height: 8; }
    SftView #progress { width: 30; }
    """

    def compose(self) -> ComposeResult:
        yield ChartPanel("loss", LOSS_LINES, left_range=None, id="loss")
        with Horizontal(id="lower"):
            yield ProgressPanel("sft", id="progress")
            yield ChartPanel("learning rate", LR_LINES, left_range=None, id="lr")

    def show(self, history: MetricsHistory) -> None:
        for chart in self.query(ChartPanel):
            chart.show(history)
        self.query_one(ProgressPanel).show(history)

    def show_rollouts(self, batch: RolloutBatch) -> None:
        """SFT samples no rollouts; nothing to show."""


class WaitingView(Middle):
    DEFAULT_CSS = """
    WaitingView #waiting { width: auto; max-width: 76; padding: 1 2; border: round $primary 40%; }
    """

    def __init__(self, waiting_for: str, hint: str):
        super().__init__()
        self.waiting_for = waiting_for
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Center():
            yield Static(self._message(), id="waiting")

    def set_waiting_for(self, waiting_for: str) -> None:
        if waiting_for != self.waiting_for:
            self.waiting_for = waiting_for
            self.query_one("#waiting", Static).update(self._message())

    def _message(self) -> str:
        return f"waiting for [b]{escape(self.waiting_for)}[/b]\n\n[dim]{escape(self.hint)}[/dim]"
