"""`metis eval`: compare models on the recipe's eval sets (accuracy, tool use, tool economy)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from metis_cli.cli.common import JsonOpt, QuietOpt, RecipeArg, SetOpt, cli_command, print_json

ModelOpt = Annotated[
    list[str] | None,
    typer.Option("--model", "-m", help="Model folder, checkpoint or LoRA adapter; NAME=PATH names it in the "
                 "report (repeatable). Default: the recipe's eval.models (sft and hdpo final folders)."),
]
SamplesOpt = Annotated[
    int | None,
    typer.Option("--samples", "-k", min=1, help="Samples per question; > 1 samples at eval.temperature and "
                 "reports pass@K. Default: eval.samples (1 = greedy)."),
]
SubsetOpt = Annotated[
    list[str] | None, typer.Option("--subset", help="Evaluate only this subset (repeatable), e.g. --subset hard."),
]
RedundancyOpt = Annotated[
    bool, typer.Option("--redundancy", help="Also answer with tools off and report tool calls the model did "
                       "not need (doubles the eval time)."),
]
AllowUnscoredOpt = Annotated[
    bool, typer.Option("--allow-unscored", help="Exit 0 even when the judge scored no answer of some subset "
                       "(its accuracy is unknown; the report says so). Without it that exits 2."),
]
RunOpt = Annotated[
    Path | None, typer.Option("--run", help="Training run (runs/NAME or its hdpo folder) whose curves go into "
                              "plot.png. Default: the recipe's hdpo folder, if it has metrics.jsonl."),
]


@cli_command
def eval_command(recipe: RecipeArg, models: ModelOpt = None, samples: SamplesOpt = None, subsets: SubsetOpt = None,
                 redundancy: RedundancyOpt = False, run_dir: RunOpt = None, overrides: SetOpt = None,
                 allow_unscored: AllowUnscoredOpt = False, json_output: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Evaluate models on the recipe's eval sets; writes report.json, report.md and plot.png to eval.output.

    Given a sweep folder (`metis sweep`) instead of a recipe, shows its comparison table."""
    from metis_cli.recipe import load_recipe
    from metis_cli.telemetry.sweep_folder import is_sweep_dir

    if is_sweep_dir(recipe):
        _show_sweep(recipe, json_output, quiet, given=[models, samples, subsets, redundancy, run_dir, overrides])
        return
    loaded = load_recipe(recipe, overrides or [])
    from metis_cli.stages import eval as stage

    result = stage.run(loaded, models=models, samples=samples, subsets=subsets, redundancy=redundancy,
                       run_dir=str(run_dir) if run_dir is not None else None, quiet=quiet or json_output)
    if json_output:
        print_json(result.report)
    else:
        _print_report(result, quiet)
    if result.unscored and not allow_unscored:
        raise stage.unscored_error(loaded, result)


def _show_sweep(folder: Path, json_output: bool, quiet: bool, given: list) -> None:
    from metis_cli.errors import MetisError
    from metis_cli.stages import sweep

    if any(given):
        raise MetisError(f"{folder} is a sweep folder: metis eval shows its comparison and takes no --model, "
                         "--samples, --subset, --redundancy, --run or --set; evaluate one of its runs with its "
                         "recipe instead (metis eval RUN_DIR/recipe.yaml)")
    result = sweep.show(folder)
    if json_output:
        print_json({"folder": str(result.folder), "summary": result.sweep["summary"], "runs": result.sweep["runs"]})
        return
    from metis_cli.cli.sweep import print_sweep

    print_sweep(result, quiet)


def _print_report(result, quiet: bool) -> None:
    from rich.console import Console

    from metis_cli.evaluation.tables import legend, rich_tables, unscored_notes

    console = Console(file=sys.stdout)
    if not quiet:
        for table in rich_tables(result.report):
            console.print(table)
        console.print(legend(result.report), style="dim", highlight=False)
        for note in unscored_notes(result.report):
            console.print(note, style="yellow", highlight=False)
    console.print(f"report: {result.files['report.md']}  plot: {result.files['plot.png']}", highlight=False,
                  soft_wrap=True)
