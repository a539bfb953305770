"""The comparison of a sweep's variants: the summary, its tables, the Pareto and curve plots.

`summarize(sweep)` turns the runs of sweep.json (telemetry/sweep_folder.py) into one entry per
variant: for each eval subset the final held-out accuracy, tool-call ratio and calls per answer
as mean, min and max over the variant's finished seeds (a failed or unfinished run is counted,
never averaged in), plus "start" rows, the model RL started from (step 0's eval: the SFT
model), once per group of variants sharing an SFT configuration. `markdown` and `rich_table`
render it; `write_report` writes report.md, pareto.png (accuracy against tool-call ratio per
subset, one point per variant, bars spanning the seeds' range) and efficiency_group_share.png
(the share of groups with |Q| >= 2 over RL steps, mean and range per variant). Reads files only.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from metis_cli.files import write_atomic
from metis_cli.telemetry import metrics as m
from metis_cli.telemetry.sweep_folder import FINAL_FIGURES, run_history

REPORT_FILES = ("report.md", "pareto.png", "efficiency_group_share.png")
_SHOWN = ((m.ACCURACY, "accuracy"), (m.TOOL_CALL_RATIO, "tool-call ratio"))


def _stats(values: list) -> dict | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers:
        return None
    return {"mean": statistics.fmean(numbers), "min": min(numbers), "max": max(numbers), "n": len(numbers)}


def _figures(entries: list[dict], key: str) -> dict[str, dict]:
    """{subset: {figure: stats}} of the `key` ("final" or "start") figures of `entries`."""
    subsets = sorted({s for e in entries for s in (e.get(key) or {})})
    return {s: {f: _stats([(e.get(key) or {}).get(s, {}).get(f) for e in entries]) for f in FINAL_FIGURES}
            for s in subsets}


def summarize(sweep: dict) -> dict:
    """{"subsets", "variants": [per variant], "start": [per SFT group]} of a sweep's runs."""
    runs = sweep["runs"]
    variants = []
    for slug in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == slug]
        done = [r for r in mine if r["status"] == "done"]
        variants.append({"variant": slug, "name": mine[0]["name"], "runs": len(mine), "done": len(done),
                         "failed": sum(r["status"] == "failed" for r in mine), "seeds": [r["seed"] for r in done],
                         "subsets": _figures(done, "final")})
    start = []
    groups = dict.fromkeys(r.get("sft_group") for r in runs)
    for group in groups:
        members = [r for r in runs if r.get("sft_group") == group]
        one_per_seed = list({r["seed"]: r for r in members if r["status"] == "done" and r.get("start")}.values())
        names = list(dict.fromkeys(r["name"] for r in members))
        label = "start (SFT model)" if group is not None else "start (hdpo.init_from)"
        if len(groups) > 1:
            label += " of " + ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
        start.append({"name": label, "sft_group": group, "done": len(one_per_seed),
                      "seeds": [r["seed"] for r in one_per_seed], "subsets": _figures(one_per_seed, "start")})
    subsets = sorted({s for row in variants + start for s in row["subsets"]})
    return {"subsets": subsets, "variants": variants, "start": start}


# ------------------------------------------------------------------------------------ tables
def cell(stats: dict | None) -> str:
    """'97% (93-100%)': the mean and, over more than one seed, the range."""
    if stats is None:
        return "-"
    if stats["n"] == 1 or stats["min"] == stats["max"]:
        return f"{stats['mean']:.0%}"
    return f"{stats['mean']:.0%} ({stats['min']:.0%}-{stats['max']:.0%})"


def _row_groups(summary: dict) -> tuple[list[str], list[list[list[str]]]]:
    """(header, one group of rows per start row and variant: one row per subset)."""
    header = ["variant", "runs", "subset"] + [label for _, label in _SHOWN]
    groups = []
    for row in summary["start"] + summary["variants"]:
        if "runs" in row:
            runs = f"{row['done']}/{row['runs']}" + (f", {row['failed']} failed" if row["failed"] else "")
        else:
            runs = str(row["done"])
        group = []
        for index, subset in enumerate(summary["subsets"] or ["-"]):
            figures = row["subsets"].get(subset, {})
            group.append([row["name"] if index == 0 else "", runs if index == 0 else "", subset]
                         + [cell(figures.get(f)) for f, _ in _SHOWN])
        groups.append(group)
    return header, groups


def _grid_line(plan: dict) -> str:
    """What the variants are: the `--set` axes, else the `--variant` list, else the one base point."""
    axes = ", ".join(f"{k} in {v}" for k, v in plan["axes"].items())
    if axes:
        return f"Grid: {axes}"
    variants = plan.get("variants") or []
    if len(variants) > 1:
        return f"Variants ({len(variants)}): " + "; ".join(v["name"] for v in variants)
    return "Grid: none (one variant)"


def markdown(sweep: dict) -> str:
    summary = sweep["summary"]
    plan = sweep["plan"]
    header, groups = _row_groups(summary)
    lines = [f"# Sweep of {plan['recipe']}", "", f"{_grid_line(plan)}; seeds {plan['seeds']}; "
             f"fixed: {', '.join(plan['fixed']) or 'none'}.", "",
             "Final held-out figures (greedy) per variant: mean over its finished seeds, (min-max) when they "
             "differ. The start rows are the model RL started from (step 0's eval).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for group in groups for row in group]
    failed = [r for r in sweep["runs"] if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {r['name']}, seed {r['seed']} ({r['run_dir']}): {str(r['error']).splitlines()[0]}" for r in failed]
    waiting = [r for r in sweep["runs"] if r["status"] not in ("done", "failed")]
    if waiting:
        lines += ["", f"{len(waiting)} run(s) not finished yet: `metis sweep ... --resume` continues them."]
    lines += ["", "Plots: [pareto.png](pareto.png), [efficiency_group_share.png](efficiency_group_share.png)", ""]
    return "\n".join(lines)


def rich_table(sweep: dict):
    from rich.table import Table

    header, groups = _row_groups(sweep["summary"])
    table = Table(title=f"sweep of {sweep['plan']['recipe']}: final held-out figures, mean (range) over seeds")
    longest = max((len(row[0]) for group in groups for row in group), default=8)
    for index, name in enumerate(header):
        # Variant names fold onto more lines rather than lose their ends.
        table.add_column(name, justify="left" if index < 3 else "right", overflow="fold",
                         min_width=min(longest, 18) if index == 0 else None)
    for group in groups:
        for index, row in enumerate(group):
            table.add_row(*row, end_section=index == len(group) - 1)
    return table


# ------------------------------------------------------------------------------------- plots
def write_report(folder: Path, sweep: dict) -> dict[str, Path]:
    """report.md, pareto.png and efficiency_group_share.png in the sweep folder; their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = Path(folder)
    files = {name: folder / name for name in REPORT_FILES}
    write_atomic(files["report.md"], markdown(sweep))
    summary = sweep["summary"]
    subsets = summary["subsets"] or ["(none yet)"]
    figure = Figure(figsize=(5.2 * len(subsets) + 2.5, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(subsets), squeeze=False)[0]
    for ax, subset in zip(axes, subsets):
        _pareto(ax, summary, subset)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside right upper", fontsize=8)
    figure.suptitle(f"sweep of {sweep['plan']['recipe']}: final held-out accuracy vs tool use", fontsize=10)
    _save(figure, files["pareto.png"])
    figure = Figure(figsize=(8, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    _share_curves(figure.subplots(1, 1), folder, sweep)
    _save(figure, files["efficiency_group_share.png"])
    return files


def _save(figure, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    temporary.replace(path)  # a reader never sees half a picture


def _pareto(ax, summary: dict, subset: str) -> None:
    rows = [(row, "black", "x") for row in summary["start"]]
    rows += [(row, f"C{i % 10}", "osD^vP*X"[(i // 10) % 8]) for i, row in enumerate(summary["variants"])]
    for row, color, marker in rows:
        figures = row["subsets"].get(subset, {})
        x, y = figures.get(m.TOOL_CALL_RATIO), figures.get(m.ACCURACY)
        if x is None or y is None:
            continue
        ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["min"]], [x["max"] - x["mean"]]],
                    yerr=[[y["mean"] - y["min"]], [y["max"] - y["mean"]]], fmt=marker, color=color, capsize=3,
                    markersize=7, label=row["name"])
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("tool-call ratio (answers with >= 1 call)")
    ax.set_ylabel("accuracy")
    ax.set_title(subset)
    ax.grid(alpha=0.3)


def _share_curves(ax, folder: Path, sweep: dict) -> None:
    drawn = 0
    for index, row in enumerate(sweep["summary"]["variants"]):
        by_step: dict[float, list[float]] = {}
        for run in sweep["runs"]:
            if run["variant"] != row["variant"] or run["status"] != "done":
                continue
            history = run_history(folder, run)
            for step, value in zip(*(history.series(m.EFFICIENCY_GROUP_SHARE) if history else ([], []))):
                by_step.setdefault(step, []).append(value)
        if not by_step:
            continue
        steps = sorted(by_step)
        color = f"C{index % 10}"
        ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], color=color, label=row["name"])
        if any(len(by_step[s]) > 1 for s in steps):
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                            color=color, alpha=0.15, linewidth=0)
        drawn += 1
    ax.set_title("efficiency_group_share: groups with |Q| >= 2 correct (mean, range over seeds)")
    ax.set_xlabel("RL step")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished run yet", ha="center", va="center", transform=ax.transAxes, color="grey")
