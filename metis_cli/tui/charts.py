"""Line charts of metrics over steps: a bordered, focusable panel holding a plotext plot.

The panel's top border names the chart; its bottom border is the legend, each line's colour
swatch with its current value, so no plot rows are spent on a legend at 80x24. Held-out eval
numbers (`eval/<subset>/<metric>`) are drawn as dots, one per eval step, one colour per subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from textual.markup import escape
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual_plotext import PlotextPlot

from metis_cli.telemetry.history import MetricsHistory
from metis_cli.telemetry.metrics import eval_key

RGB = tuple[int, int, int]

# Subsets get colours in order of their sorted names; distinct from every line colour below.
# Charts shorter than this (in rows) leave out the step labels under the x axis.
MIN_ROWS_FOR_STEP_LABELS = 6

EVAL_COLORS: tuple[RGB, ...] = ((235, 235, 235), (255, 121, 198), (130, 170, 255), (255, 240, 120))


@dataclass(frozen=True)
class Line:
    """One metrics key drawn as a line."""

    key: str
    label: str
    color: RGB
    right_axis: bool = False
    decimals: int = 2


def hex_color(color: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def format_value(value: float | None, decimals: int = 2) -> str:
    if value is None:
        return "–"
    if value != 0 and abs(value) < 10 ** -decimals:
        return f"{value:.1e}"
    return f"{value:.{decimals}f}"


class ChartPanel(Vertical, can_focus=True):
    """A titled chart of `lines` over steps; call `show(history)` when new records arrived."""

    ALLOW_MAXIMIZE = True
    DEFAULT_CSS = """
    ChartPanel > PlotextPlot { height: 1fr; }
    ChartPanel { border-subtitle-color: $text; }
    """

    def __init__(
        self,
        title: str,
        lines: list[Line],
        *,
        left_range: tuple[float, float] | None = (0.0, 1.0),
        eval_metric: str | None = None,
        eval_label: str = "eval",
        id: str | None = None,  # noqa: A002 - Textual's name for it
    ):
        super().__init__(id=id, classes="panel")
        self.border_title = title
        self.lines = lines
        self.left_range = left_range
        self.eval_metric = eval_metric
        self.eval_label = eval_label
        self.legend_text = ""
        self._history: MetricsHistory | None = None

    def compose(self) -> ComposeResult:
        yield PlotextPlot()

    def show(self, history: MetricsHistory) -> None:
        """Redraw from `history` (plot data and legend)."""
        self._history = history
        plot_widget = self.query_one(PlotextPlot)
        plt = plot_widget.plt
        plt.clear_data()
        plt.clear_figure()
        plt.frame(False)
        # Two braille dots per column: more points than that cannot be told apart.
        max_points = max(8, 2 * max(plot_widget.size.width, 40))
        left_values: list[float] = []
        right_values: list[float] = []
        # Drawn in reverse so the first (most important) line ends up on top where lines cross.
        for line in reversed(self.lines):
            steps, values = history.series(line.key, max_points)
            if steps:
                side = "right" if line.right_axis else "left"
                plt.plot(steps, values, marker="braille", color=line.color, yside=side)
                (right_values if line.right_axis else left_values).extend(values)
        for subset, color in self._eval_subsets(history):
            steps, values = history.series(eval_key(subset, self.eval_metric))
            if steps:
                plt.scatter(steps, values, marker="●", color=color, yside="left")
                left_values.extend(values)
        self._set_axes(history, left_values, right_values, plot_widget.size.height)
        self.legend_text = self.border_subtitle = self._legend(history)
        plot_widget.refresh()

    def on_resize(self) -> None:
        if self._history is not None:
            self.show(self._history)

    def _set_axes(
        self, history: MetricsHistory, left_values: list[float], right_values: list[float], height: int
    ) -> None:
        plt = self.query_one(PlotextPlot).plt
        last_step = max(history.total_steps or 0, history.latest_step or 0)
        if last_step > 0:
            plt.xlim(0, last_step)
        if height and height < MIN_ROWS_FOR_STEP_LABELS:
            plt.xticks([])  # a row of data says more than step labels the headline chart shows
        if self.left_range is not None:
            low, high = self.left_range
        elif left_values:
            low, high = min(left_values), max(left_values)
            if high == low:
                low, high = low - abs(low) * 0.1 - 1e-12, high + abs(high) * 0.1 + 1e-12
        else:
            low = high = None
        if low is not None and high is not None:
            ticks = [low, (low + high) / 2, high]
            plt.ylim(low, high, yside="left")
            plt.yticks(ticks, [f"{tick:.1f}" if self.left_range else f"{tick:.3g}" for tick in ticks])
        if right_values:
            top = max(1, math.ceil(max(right_values)))
            ticks = [0, top / 2, top]
            plt.ylim(0, top, yside="right")
            # The trailing space: plotext drops the last character of right-axis labels.
            plt.yticks(ticks, [f"{tick:g} " for tick in ticks], yside="right")

    def _eval_subsets(self, history: MetricsHistory) -> list[tuple[str, RGB]]:
        if self.eval_metric is None:
            return []
        subsets = history.eval_subsets()
        return [(subset, EVAL_COLORS[index % len(EVAL_COLORS)]) for index, subset in enumerate(subsets)]

    def _legend(self, history: MetricsHistory) -> str:
        """Swatch, name and current value of each line, then eval dots; cut to what fits."""
        parts = []
        for line in self.lines:
            value = format_value(history.latest_number(line.key), line.decimals)
            parts.append(f"[{hex_color(line.color)}]━[/]{escape(line.label)} [b]{value}[/b]")
        evals = []
        for subset, color in self._eval_subsets(history):
            value = history.latest_number(eval_key(subset, self.eval_metric))
            if value is not None:
                evals.append(f"[{hex_color(color)}]●[/]{escape(subset)} [b]{format_value(value)}[/b]")
        if evals:
            parts.append(f"{escape(self.eval_label)} " + " ".join(evals))
        # The border keeps two cells at each end; a legend longer than the rest is cut by Textual
        # mid-number, which reads worse than leaving the last entries out.
        room = self.size.width - 6 if self.size.width else None
        shown: list[str] = []
        for part in parts:
            candidate = " ".join([*shown, part])
            if room is not None and shown and Content.from_markup(candidate).cell_length > room:
                break
            shown.append(part)
        return " ".join(shown)
