"""plot.png of `metis eval`: accuracy vs tool-call ratio per model, plus a training run's curves.

The first panel is the paper's picture: a model that knows when not to call a tool sits high and
to the left. Given a training run's metrics.jsonl (hdpo stage), three more panels show its
accuracy and tool use, the reward channels and the held-out `eval/<subset>/*` figures over steps.

Uses matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so it works
headless and inside other programs. metrics.jsonl is read with `telemetry.history` (the reader the
dashboard uses too), its field names taken from `telemetry.metrics`.
"""

from __future__ import annotations

from pathlib import Path

from metis_cli.evaluation.report import ALL_SUBSETS
from metis_cli.telemetry import metrics as m
from metis_cli.telemetry.history import load_history

SUBSET_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
TRAINING_PANELS = [
    ("training: accuracy and tool use", [(m.ACCURACY, "accuracy"), (m.TOOL_CALL_RATIO, "tool-call ratio"),
                                         (m.FORMAT_OK, "format ok")]),
    ("training: reward channels", [(m.R_ACC_MEAN, "r_acc"), (m.R_TOOL_MEAN, "r_tool"),
                                   (m.EFFICIENCY_GROUP_SHARE, "groups with |Q|>=2")]),
]
EVAL_CURVES = [(m.ACCURACY, "accuracy"), (m.TOOL_CALL_RATIO, "tool-call ratio")]


def write_plot(report: dict, path: Path, metrics_path: Path | None = None) -> Path:
    """Write the PNG to `path` and return it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = load_history(metrics_path) if metrics_path is not None else None
    panels = 1 if history is None else 4
    figure = Figure(figsize=(6.5 * min(panels, 2), 5 * (1 if panels == 1 else 2)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 1) if panels == 1 else figure.subplots(2, 2).flatten()
    _accuracy_vs_tools(axes if panels == 1 else axes[0], report)
    if history is not None:
        for ax, (title, keys) in zip(axes[1:3], TRAINING_PANELS):
            _curves(ax, history, title, keys)
        subsets = history.eval_subsets()
        eval_keys = [(m.eval_key(s, name), f"{s} {label}") for s in subsets for name, label in EVAL_CURVES]
        _curves(axes[3], history, "training: held-out eval (greedy)", eval_keys, dashed_suffix="tool-call ratio")
        figure.suptitle(f"training run: {metrics_path}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _accuracy_vs_tools(ax, report: dict) -> None:
    subsets = list(report.get("subsets", [])) + [ALL_SUBSETS]
    colors = [f"C{i % 10}" for i in range(len(report["models"]))]
    for model, color in zip(report["models"], colors):
        for index, subset in enumerate(subsets):
            figures = model["subsets"].get(subset)
            if not figures or figures.get("accuracy") is None or figures.get("tool_call_ratio") is None:
                continue
            overall = subset == ALL_SUBSETS
            ax.scatter(figures["tool_call_ratio"], figures["accuracy"], color=color,
                       marker="*" if overall else SUBSET_MARKERS[index % len(SUBSET_MARKERS)],
                       s=220 if overall else 70, edgecolors="black" if overall else "none", zorder=3)
            if overall:
                ax.annotate(model["name"], (figures["tool_call_ratio"], figures["accuracy"]),
                            textcoords="offset points", xytext=(8, 6), fontsize=9, color=color)
    # Legend entries for the encodings (colour = model, marker = subset).
    for model, color in zip(report["models"], colors):
        ax.scatter([], [], color=color, marker="o", label=model["name"])
    for index, subset in enumerate(subsets):
        marker = "*" if subset == ALL_SUBSETS else SUBSET_MARKERS[index % len(SUBSET_MARKERS)]
        ax.scatter([], [], color="grey", marker=marker, label=f"subset: {subset}")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("tool-call ratio (answers with >= 1 call)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"accuracy vs tool use ({report.get('decoding', '')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _curves(ax, history, title: str, keys: list[tuple[str, str]], dashed_suffix: str | None = None) -> None:
    drawn = 0
    for index, (key, label) in enumerate(keys):
        steps, values = history.series(key, max_points=400)
        if not steps:
            continue
        style = "--" if dashed_suffix and label.endswith(dashed_suffix) else "-"
        color = f"C{index // 2 if dashed_suffix else index}"
        ax.plot(steps, values, style, color=color, label=label, marker="." if len(steps) < 30 else None)
        drawn += 1
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, color="grey")
