"""`metis sweep RECIPE --set field=a,b ... --seeds N`: a grid of variants x seeds, one run after
another, compared in one report (docs/sweep.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from metis_cli.cli.common import JsonOpt, QuietOpt, RecipeArg, cli_command, print_json

GridOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="section.field=a,b,c: an axis of the grid (several values, comma-separated; "
                 "quote a value holding a comma) or a fixed override (one value). Repeatable; the variants are "
                 "every combination."),
]
VariantOpt = Annotated[
    list[str] | None,
    typer.Option("--variant", help="One variant named in full, as field=value pairs separated by spaces, e.g. "
                 "'hdpo.estimator=coupled hdpo.coupled.coef=0.5' (repeatable); each is crossed with the --set axes. "
                 "Default: the recipe itself."),
]
SeedsOpt = Annotated[int | None, typer.Option("--seeds", min=1, help="Run every variant with run.seed = 0 .. N-1. "
                                              "Default: the recipe's run.seed.")]
SeedListOpt = Annotated[str | None, typer.Option("--seed-list", help="Seeds to run, e.g. 0,5,7 (instead of --seeds).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Sweep folder. Default: the recipe's run.output_dir "
                                             "followed by -sweep (runs/tiny-sweep).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the sweep in --out: finished runs are skipped, "
                                         "interrupted and failed ones run (and resume) again.")]


@cli_command
def sweep(recipe: RecipeArg, grid: GridOpt = None, variants: VariantOpt = None, seeds: SeedsOpt = None,
          seed_list: SeedListOpt = None, out: OutOpt = None, resume: ResumeOpt = False, json_output: JsonOpt = False,
          quiet: QuietOpt = False) -> None:
    """Run a grid of recipe variants x seeds (sft shared where its inputs agree); compare them.

    Runs go one after another in this process, never two at once. Writes sweep.json, report.md,
    pareto.png and efficiency_group_share.png in the sweep folder; `metis eval SWEEP_DIR` shows the
    table again, `metis watch SWEEP_DIR` lists the runs."""
    from metis_cli.stages import sweep as stage

    # Bad input stops here, before any folder is made.
    plan = stage.plan_sweep(recipe, grid or [], variants=variants, seeds=seeds, seed_list=seed_list)
    quiet_runs = quiet or json_output
    result = stage.run(plan, out, resume=resume, quiet=quiet_runs,
                       say=(lambda line: None) if quiet_runs else typer.echo)
    if json_output:
        print_json({"folder": str(result.folder), "plan": result.sweep["plan"], "runs": result.sweep["runs"],
                    "summary": result.sweep["summary"], "files": {k: str(v) for k, v in result.files.items()}})
    else:
        print_sweep(result, quiet)
    if result.stopped:
        typer.echo(f"sweep stopped on request; continue it: metis sweep {recipe} ... --resume --out {result.folder}",
                   err=True)
        return
    if result.failed:
        from metis_cli.cli.common import error_line

        names = ", ".join(f"{r['name']} seed {r['seed']}" for r in result.failed[:4])
        error_line(f"{len(result.failed)} of {len(result.sweep['runs'])} runs failed ({names}); report.md lists "
                   "their errors; fix the cause and rerun with --resume (finished runs are skipped)")
        internal = any(r.get("error_kind") == "internal" for r in result.failed)
        raise typer.Exit(1 if internal else 2)


def print_sweep(result, quiet: bool = False) -> None:
    """The comparison table (unless quiet) and where the report files are."""
    from rich.console import Console

    from metis_cli.evaluation.sweep_report import rich_table

    console = Console(file=sys.stdout)
    if not quiet:
        console.print(rich_table(result.sweep))
    files = "  ".join(f"{path}" for path in result.files.values())
    console.print(f"sweep: {result.folder}  report: {files}", highlight=False, soft_wrap=True)
