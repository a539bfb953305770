"""`metis curate`: filter trajectories (sft) or prompts (rl) with the recipe's `curate` filters."""

from __future__ import annotations

from typing import Annotated

import typer

from metis_cli.cli.common import JsonOpt, QuietOpt, RecipeArg, SetOpt, cli_command, print_json

ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run; rows already decided are not redone.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Delete this curate output's previous results and start over.")]


@cli_command
def curate(recipe: RecipeArg, overrides: SetOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
           json_output: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Curate data: validity, execution consistency, tool necessity, LLM judge, dedup (sft) or pass-rate filter (rl)."""
    from metis_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    from metis_cli.curate.report import print_report
    from metis_cli.stages import curate as stage

    result = stage.run(loaded, resume=resume, overwrite=overwrite, quiet=quiet or json_output)
    if json_output:
        print_json(result.report)
    elif quiet:
        typer.echo(f"curate: {result.report['kept']} of {result.report['rows_read']} rows kept in "
                   f"{result.report['files']['curated']}")
    else:
        print_report(result.report)
