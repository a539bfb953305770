"""`metis sft`, `metis hdpo` and `metis run` (the whole pipeline: sft -> hdpo -> before/after table)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from metis_cli.cli.common import JsonOpt, QuietOpt, RecipeArg, SetOpt, cli_command, print_json
from metis_cli.cli.launch import (Launch, MasterAddrOpt, MasterPortOpt, NnodesOpt, NodeRankOpt, NprocOpt,
                                  exit_if_not_main, start)

ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Delete this stage's previous results and start over.")]
TuiOpt = Annotated[bool, typer.Option("--tui", help="Train with the live dashboard open (training runs in a child process).")]


def _load(recipe: Path, overrides: list[str] | None):
    from metis_cli.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


def _child_argv(stage: str, recipe_path: Path, overrides, resume: bool, overwrite: bool, *flags: str) -> list[str]:
    """The same command for a child `metis` process (dashboard trainer, torchrun workers)."""
    argv = [stage, str(recipe_path), *flags]
    argv += [a for o in overrides or [] for a in ("--set", o)]
    return argv + ["--resume"] * resume + ["--overwrite"] * overwrite


def _with_dashboard(stage: str, recipe_path: Path, loaded, overrides, resume: bool, overwrite: bool,
                    launch: Launch) -> None:
    from metis_cli.tui.launch import run_with_dashboard

    argv = _child_argv(stage, recipe_path, overrides, resume, overwrite, "--quiet", *launch.argv())
    stage_dir = Path(loaded.sft.output if stage == "sft" else loaded.hdpo.output)
    code = run_with_dashboard(argv, stage_dir, stage)
    raise typer.Exit(code)


def _train(name: str, recipe: Path, overrides, resume: bool, overwrite: bool, tui: bool, json_output: bool,
           quiet: bool, launch: Launch):
    """Run one training stage: here; in the dashboard's child process with --tui; in torchrun's
    workers with --nproc-per-node/--nnodes (this process then only waits for them and exits with
    the job's code). (recipe, result) on the process that prints it; other ranks exit quietly."""
    import importlib

    loaded = _load(recipe, overrides)
    launch.check()
    if tui:
        _with_dashboard(name, recipe, loaded, overrides, resume, overwrite, launch)
    if launch.wanted:
        output_flags = ("--json",) * json_output + ("--quiet",) * quiet
        raise typer.Exit(start(launch, _child_argv(name, recipe, overrides, resume, overwrite, *output_flags)))
    stage = importlib.import_module(f"metis_cli.stages.{name}")
    result = stage.run(loaded, resume=resume, overwrite=overwrite, quiet=quiet or json_output)
    exit_if_not_main()
    return loaded, result


@cli_command
def sft(recipe: RecipeArg, overrides: SetOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
        tui: TuiOpt = False, json_output: JsonOpt = False, quiet: QuietOpt = False,
        nproc_per_node: NprocOpt = 1, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0,
        master_addr: MasterAddrOpt = None, master_port: MasterPortOpt = 29500) -> None:
    """Cold-start supervised fine-tuning (loss on assistant tokens only)."""
    _, result = _train("sft", recipe, overrides, resume, overwrite, tui, json_output, quiet,
                       Launch(nproc_per_node, nnodes, node_rank, master_addr, master_port))
    if json_output:
        print_json({"stage_dir": str(result.stage_dir), "final": str(result.final_dir), "steps": result.steps,
                    "loss": result.final_loss, "eval_loss": result.eval_loss})
    elif not quiet:
        if result.stopped:
            typer.echo(f"sft: stopped at step {result.steps}; continue with --resume")
        else:
            loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
            typer.echo(f"sft: {result.steps} steps, loss {loss}, model in {result.final_dir}")


@cli_command
def hdpo(recipe: RecipeArg, overrides: SetOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
         tui: TuiOpt = False, json_output: JsonOpt = False, quiet: QuietOpt = False,
         nproc_per_node: NprocOpt = 1, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = 0,
         master_addr: MasterAddrOpt = None, master_port: MasterPortOpt = 29500) -> None:
    """RL with HDPO (or --set hdpo.estimator=grpo|coupled|gdpo for the baselines)."""
    loaded, result = _train("hdpo", recipe, overrides, resume, overwrite, tui, json_output, quiet,
                            Launch(nproc_per_node, nnodes, node_rank, master_addr, master_port))
    if json_output:
        print_json({"stage_dir": str(result.stage_dir), "final": str(result.final_dir), "steps": result.steps,
                    "stopped": result.stopped, "eval_before": result.eval_first, "eval_after": result.eval_last})
    elif not quiet:
        print_before_after(result.eval_first, result.eval_last, title=f"hdpo ({loaded.hdpo.estimator}) held-out, greedy")
        typer.echo(f"hdpo: {result.steps} steps, policy in {result.final_dir}")


@cli_command
def run(recipe: RecipeArg, overrides: SetOpt = None, overwrite: OverwriteOpt = False,
        json_output: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """The whole pipeline: sft, then hdpo, then the before/after table.

    A finished stage is reused, an interrupted one is resumed; --overwrite redoes both."""
    import json

    from metis_cli.stages import hdpo as hdpo_stage
    from metis_cli.stages import sft as sft_stage
    from metis_cli.errors import RunFolderError
    from metis_cli.telemetry.run import DONE_FILE, changed_inputs, describe_changes, is_done

    loaded = _load(recipe, overrides)
    quiet_stages = quiet or json_output
    if overwrite or not is_done(loaded.hdpo.output):
        from metis_cli.rewards.preflight import preflight

        preflight(loaded, "hdpo")  # before sft: a dead judge must not surface only after the sft stage

    def say(message: str) -> None:
        if not quiet_stages:
            typer.echo(message)

    for name, module, stage_dir in (("sft", sft_stage, loaded.sft.output), ("hdpo", hdpo_stage, loaded.hdpo.output)):
        if name == "sft" and not loaded.sft.phases:
            continue
        if is_done(stage_dir) and not overwrite:
            changed = changed_inputs(stage_dir, loaded, name)
            if changed:
                raise RunFolderError(
                    f"{name}: {stage_dir} holds a finished run made with a different recipe "
                    f"({describe_changes(changed)} changed); "
                    f"pass --overwrite to redo it, or --set run.name=NEW for a new run folder"
                )
            say(f"{name}: already finished in {stage_dir}; reusing it (--overwrite to redo)")
            continue
        resume = Path(stage_dir).exists() and not overwrite
        if resume:
            say(f"{name}: resuming the unfinished run in {stage_dir}")
        result = module.run(loaded, resume=resume, overwrite=overwrite, quiet=quiet_stages)
        if getattr(result, "stopped", False):
            say(f"{name}: stopped on request; rerun `metis run` to continue")
            raise typer.Exit(0)
    summary = json.loads((Path(loaded.hdpo.output) / DONE_FILE).read_text())
    before, after = summary.get("eval_first", {}), summary.get("eval_last", {})
    if json_output:
        print_json({"eval_before": before, "eval_after": after, "final": summary.get("final")})
    elif not quiet:
        print_before_after(before, after, title=f"{loaded.run.name}: SFT -> {loaded.hdpo.estimator}, held-out, greedy")


def print_before_after(before: dict, after: dict, *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    if not before and not after:
        return
    table = Table(title=title)
    table.add_column("subset")
    for name in ("accuracy", "tool-call ratio", "tool calls / answer"):
        table.add_column(name, justify="right")
    for subset in sorted(set(before) | set(after)):
        b, a = before.get(subset, {}), after.get(subset, {})

        def cell(key: str, pct: bool) -> str:
            fmt = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.2f}")
            if b.get(key) is None or a.get(key) is None:  # not measured, or accuracy with nothing scored
                return "-"
            return f"{fmt(b[key])} -> {fmt(a[key])}"

        table.add_row(subset, cell("accuracy", True), cell("tool_call_ratio", True), cell("tool_calls_mean", False))
    Console(file=sys.stdout).print(table)
