"""The eval report as a table: one row per (model, subset), as rich (terminal) and Markdown (report.md).

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


BASE_COLUMNS = [
    Column("questions", "questions", _count),
    Column("accuracy", "accuracy", _percent),
    Column("tool_call_ratio", "tool-call ratio", _percent),
    Column("tool_calls_mean", "calls/answer", _number),
    Column("tool_errors", "tool errors", _count),
    Column("generated_tokens_mean", "tokens/answer", _number),
    Column("wall_s_per_question", "s/question", _seconds),
    Column("cost_usd_per_1k_answers", "tool $/1k answers", _usd),
    Column("tool_latency_s_per_answer", "tool s/answer", _seconds),
]
REDUNDANCY_COLUMNS = [
    Column("no_tool_accuracy", "acc. tools off", _percent),
    Column("redundant_tool_share", "redundant calls", _percent),
    Column("needed_tool_share", "needed & used", _percent),
    Column("redundant_cost_usd_per_1k_answers", "wasted $/1k", _usd),
]


def columns(report: dict) -> list[Column]:
    chosen = list(BASE_COLUMNS)
    if report.get("samples", 1) > 1:
        k = report["samples"]
        chosen.insert(2, Column(f"pass@{k}", f"pass@{k}", _percent))
    if report.get("redundancy"):
        chosen += REDUNDANCY_COLUMNS
    return chosen


def rows(report: dict) -> list[tuple[str, str, list[str]]]:
    """(model, subset, formatted cells) per row; the "all" row only when there are several subsets."""
    chosen = columns(report)
    subsets = list(report.get("subsets", []))
    if len(subsets) > 1:
        subsets.append(ALL_SUBSETS)
    result = []
    for model in report["models"]:
        for subset in subsets:
            figures = model["subsets"].get(subset)
            if figures is None:
                continue
            result.append((model["name"], subset, [_cell(figures.get(c.key), c.fmt) for c in chosen]))
    return result


def _cell(value: Any, fmt: Callable[[float], str]) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return fmt(value)


def title(report: dict) -> str:
    parts = [f"metis eval: {report['recipe']}" if report.get("recipe") else "metis eval", report["decoding"]]
    return ", ".join(parts)


def rich_table(report: dict):
    from rich.table import Table

    table = Table(title=title(report))
    table.add_column("model", style="bold")
    table.add_column("subset")
    for column in columns(report):
        table.add_column(column.header, justify="right")
    previous_model = None
    for model, subset, cells in rows(report):
        if previous_model is not None and model != previous_model:
            table.add_section()
        table.add_row(model if model != previous_model else "", subset, *cells)
        previous_model = model
    return table


def markdown(report: dict) -> str:
    """report.md: the table, the tool prices it used, and notes on unpriced tools."""
    headers = ["model", "subset"] + [c.header for c in columns(report)]
    lines = [f"# {title(report)}", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(headers) - 2)) + "|"]
    for model, subset, cells in rows(report):
        lines.append("| " + " | ".join([model, subset, *cells]) + " |")
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
    if report.get("redundancy"):
        lines += ["", "Redundant calls: share of tool-using answers to questions the model solves with tools off. "
                  "Needed & used: share of answers to questions it cannot solve alone that called a tool."]
    lines += ["", "Models:"] + [f"- {m['name']}: `{m['path']}`" for m in report["models"]]
    if report.get("training_run"):
        lines.append(f"\nTraining curves from `{report['training_run']}` are in plot.png.")
    return "\n".join(lines) + "\n"
