"""The eval report as tables: one row per (model, subset), as rich (terminal) and Markdown (report.md).

Both renderings come from the same column list, so the terminal and report.md always agree.
Figure definitions live in report.py; this module only formats them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from metis_cli.evaluation.report import ALL_SUBSETS


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _number(value: float) -> str:
    return f"{value:.2f}"


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _usd(value: float) -> str:
    return f"${value:,.2f}"


def _seconds(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: Callable[[float], str]
    scored: bool = False  # a figure of scored answers only: "unscored" when none could be scored


ANSWER_COLUMNS = [
    Column("questions", "n", _count),
    Column("accuracy", "accuracy", _percent, scored=True),
    Column("tool_call_ratio", "tool use", _percent),
    Column("tool_calls_mean", "calls", _number),
    Column("tool_errors", "errors", _count),
    Column("generated_tokens_mean", "tokens", _number),
    Column("wall_s_per_question", "s/q", _seconds),
]
ECONOMY_COLUMNS = [
    Column("cost_usd_per_1k_answers", "$/1k", _usd),
    Column("tool_latency_s_per_answer", "tool s", _seconds),
]
REDUNDANCY_COLUMNS = [
    Column("no_tool_accuracy", "acc. alone", _percent),
    Column("redundant_tool_share", "redundant", _percent),
    Column("needed_tool_share", "needed+used", _percent),
    Column("redundant_cost_usd_per_1k_answers", "wasted $/1k", _usd),
]
LEGEND = (
    "n: questions; tool use: share of answers with >= 1 tool call; calls, errors, tokens: per answer (errors: "
    "total); s/q: wall seconds per question. $/1k: tool cost per 1,000 answers; tool s: priced tool latency per "
    "answer (recipe tools.costs)."
)
REDUNDANCY_LEGEND = (
    "acc. alone: accuracy with tools off; redundant: share of tool-using answers to questions the model solves "
    "alone; needed+used: share of answers to questions it cannot solve alone that called a tool; wasted $/1k: "
    "cost of the redundant calls per 1,000 answers."
)


def legend(report: dict) -> str:
    return LEGEND + (" " + REDUNDANCY_LEGEND if report.get("redundancy") else "")


def tables(report: dict) -> list[tuple[str, list[Column]]]:
    """(title, columns) of each table: answers first, then the tool economy (narrow enough for 80 columns)."""
    answers = list(ANSWER_COLUMNS)
    if report.get("samples", 1) > 1:
        k = report["samples"]
        answers.insert(2, Column(f"pass@{k}", f"pass@{k}", _percent, scored=True))
    economy = ECONOMY_COLUMNS + (REDUNDANCY_COLUMNS if report.get("redundancy") else [])
    return [("answers", answers), ("tool economy", economy)]


def rows(report: dict, chosen: list[Column]) -> list[tuple[str, str, list[str]]]:
    """(model, subset, formatted cells) per row; the "all" row only when there are several subsets."""
    subsets = list(report.get("subsets", []))
    if len(subsets) > 1:
        subsets.append(ALL_SUBSETS)
    result = []
    for model in report["models"]:
        for subset in subsets:
            figures = model["subsets"].get(subset)
            if figures is None:
                continue
            result.append((model["name"], subset, [_figure_cell(figures, c) for c in chosen]))
    return result


def _figure_cell(figures: dict, column: Column) -> str:
    none_scored = bool(figures.get("answers")) and figures.get("unscored") == figures.get("answers")
    if column.scored and none_scored:
        return "unscored"
    return _cell(figures.get(column.key), column.fmt)


def unscored_notes(report: dict) -> list[str]:
    """One line per (model, subset) with answers the judge could not score (the "all" row aside)."""
    notes = []
    for model in report["models"]:
        for subset, figures in model["subsets"].items():
            answers, unscored = figures.get("answers", 0), figures.get("unscored", 0)
            if subset == ALL_SUBSETS or not unscored:
                continue
            if unscored == answers:
                notes.append(f"{model['name']} / {subset}: none of its {answers} answers could be scored (the judge "
                             "gave no verdict); its accuracy is unknown, not 0.")
            else:
                notes.append(f"{model['name']} / {subset}: {unscored} of {answers} answers could not be scored (the "
                             "judge gave no verdict) and are left out of its accuracy.")
    return notes


def _cell(value: Any, fmt: Callable[[float], str]) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return fmt(value)


def title(report: dict) -> str:
    parts = [f"metis eval: {report['recipe']}" if report.get("recipe") else "metis eval", report["decoding"]]
    return ", ".join(parts)


def rich_tables(report: dict) -> list:
    from rich.table import Table

    result = []
    for table_title, chosen in tables(report):
        table = Table(title=f"{title(report)}: {table_title}" if not result else table_title)
        table.add_column("model", style="bold", overflow="fold")
        table.add_column("subset", no_wrap=True)
        for column in chosen:
            table.add_column(column.header, justify="right")
        previous_model = None
        for model, subset, cells in rows(report, chosen):
            if previous_model is not None and model != previous_model:
                table.add_section()
            table.add_row(model if model != previous_model else "", subset, *cells)
            previous_model = model
        result.append(table)
    return result


def markdown(report: dict) -> str:
    """report.md: the two tables, the tool prices they used, and notes on unpriced tools."""
    lines = [f"# {title(report)}"]
    for table_title, chosen in tables(report):
        headers = ["model", "subset"] + [c.header for c in chosen]
        lines += ["", f"## {table_title}", "", "| " + " | ".join(headers) + " |",
                  "|" + "|".join(["---", "---"] + ["---:"] * len(chosen)) + "|"]
        lines += ["| " + " | ".join([model, subset, *cells]) + " |" for model, subset, cells in rows(report, chosen)]
    lines.append("")
    prices = report.get("tool_costs") or {}
    if prices:
        priced = ", ".join(f"{name} ${p['usd_per_call']:g}/call, {p['latency_s']:g} s" for name, p in sorted(prices.items()))
        lines.append(f"Tool prices (recipe `tools.costs`): {priced}.")
    else:
        lines.append("No tool prices in the recipe (`tools.costs`): tool costs show as $0.")
    for model in report["models"]:
        if model.get("unpriced_tools"):
            lines.append(f"- {model['name']} called tools without a price: {', '.join(model['unpriced_tools'])}.")
    notes = unscored_notes(report)
    if notes:
        lines += ["", "Unscored answers:"] + [f"- {note}" for note in notes]
    lines += ["", legend(report)]
    lines += ["", "Models:"] + [f"- {m['name']}: `{m['path']}`" for m in report["models"]]
    if report.get("training_run"):
        lines.append(f"\nTraining curves from `{report['training_run']}` are in plot.png.")
    return "\n".join(lines) + "\n"
