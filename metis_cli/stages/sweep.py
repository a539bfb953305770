"""`metis sweep`: run a grid of recipe variants x seeds one after another, then compare them.

The plan (`plan_sweep`): the `--set` lists expand into variants (`recipe.grid`), each variant's
recipe is validated, and the seeds become `run.seed`. Nothing runs until every variant
validates. The runs (`SweepRunner`): for each seed, for each variant, in this process and never
two at once (CPU-heavy stages must not share cores), the pipeline `metis run` runs: sft, then
hdpo. Variants whose SFT inputs agree (`telemetry.run.stage_inputs(recipe, "sft")`: only hdpo.*
or RL-data fields differ, same seed) share one SFT stage in `<sweep>/sft/seed-<s>-<digest>/`;
each run's own folder `<sweep>/runs/<variant>/seed-<s>/` holds its hdpo stage.

Resumable: sweep.json records each run's status after every change. With --resume a finished
run is skipped, a killed or failed one runs again (its stages resume from their checkpoints, as
`metis run` resumes them). A run that fails is recorded with its error and the sweep goes on.
After every run the report is rewritten (`evaluation.sweep_report`): report.md, pareto.png,
efficiency_group_share.png, and the per-variant summary in sweep.json. docs/sweep.md.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from metis_cli.errors import MetisError, RunFolderError
from metis_cli.files import storage_errors, write_atomic
from metis_cli.recipe.grid import (Axis, Variant, check_variants, expand, parse_grid, parse_variant_sets,
                                   resolve_seeds)
from metis_cli.telemetry.sweep_folder import SWEEP_FILE, SWEEP_FORMAT, final_figures, first_figures, run_history

LOCK_FILE = ".lock"
_PROBE_DIR = "<sweep-sft>"  # stands for a shared SFT folder while its inputs are hashed


@dataclass
class SweepPlan:
    recipe: str
    fixed: list[str]
    axes: list[Axis]
    variants: list[Variant]
    seeds: list[int]
    default_out: Path

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "fixed": self.fixed, "axes": {a.field: list(a.values) for a in self.axes},
                "seeds": self.seeds, "variants": [{"name": v.name, "slug": v.slug, "overrides": list(v.overrides)}
                                                  for v in self.variants]}


@dataclass
class SweepResult:
    folder: Path
    sweep: dict
    files: dict[str, Path]
    failed: list[dict] = field(default_factory=list)
    stopped: bool = False


class SweepStopped(Exception):
    """A stage stopped on request (the dashboard's stop, `control/stop`): the sweep stops too."""


def plan_sweep(recipe: str | Path, sets: list[str], *, variants: list[str] | None = None, seeds: int | None = None,
               seed_list: str | None = None) -> SweepPlan:
    """Expand and validate the grid (`--set` lists, `--variant` points); RecipeError (exit 2)
    naming every bad field and value."""
    fixed, axes = parse_grid(sets)
    variants = expand(axes, parse_variant_sets(variants or [], axes))
    first = check_variants(recipe, fixed, variants)
    seed_values = resolve_seeds(seeds, seed_list, first.run.seed)
    return SweepPlan(str(recipe), fixed, axes, variants, seed_values, Path(f"{first.run.output_dir}-sweep"))


def _quoted(field_name: str, path: Path | str) -> str:
    return f"{field_name}={json.dumps(str(path))}"  # a YAML string whatever the path looks like


class SweepRunner:
    def __init__(self, plan: SweepPlan, folder: Path | None = None, *, resume: bool = False, quiet: bool = False,
                 say: Callable[[str], None] = print):
        self.plan = plan
        self.folder = Path(folder) if folder is not None else plan.default_out
        self.resume, self.quiet, self.say = resume, quiet, say
        self.failed_sft: dict[str, str] = {}  # shared sft folder -> why it failed this session

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Make the sweep folder, or take up the one --resume names; refuse to mix two plans or to
        run beside another sweep in the same folder."""
        from metis_cli.telemetry.sweep_folder import is_sweep_dir, read_sweep

        planned = self.plan.to_json()
        existing = is_sweep_dir(self.folder)
        if existing and not self.resume:
            raise RunFolderError(f"{self.folder} already holds a sweep; pass --resume to continue it (finished "
                                 "runs are skipped) or --out NEW for a new one")
        if not existing and self.folder.exists() and any(self.folder.iterdir()):
            raise RunFolderError(f"{self.folder} exists and is not a sweep folder; pass --out with a new or empty folder")
        if existing:
            self.sweep = read_sweep(self.folder)
            changed = [key for key in planned if self.sweep.get("plan", {}).get(key) != planned[key]]
            if changed:
                raise RunFolderError(f"{self.folder} holds a sweep of another plan ({', '.join(changed)} differ); "
                                     "resume it with the same recipe, --set and seeds, or pass --out NEW")
        with storage_errors(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        self._lock()
        if existing:
            self.sweep = read_sweep(self.folder)  # as the last session left it, now that no other one runs
            return
        runs = []
        for seed in self.plan.seeds:
            for variant in self.plan.variants:
                sft_dir, sft_group = self._sft_place(variant, seed)
                runs.append({"variant": variant.slug, "name": variant.name, "seed": seed,
                             "overrides": list(variant.overrides), "run_dir": f"runs/{variant.slug}/seed-{seed}",
                             "sft_dir": sft_dir, "sft_group": sft_group, "status": "pending", "error": None})
        self.sweep = {"format": SWEEP_FORMAT, "created_at": time.time(), "plan": planned, "runs": runs}
        self.write()

    def _lock(self) -> None:
        """Hold `<sweep>/.lock` for the whole session: two sweeps in one folder would train at once."""
        import fcntl

        self._lock_file = (self.folder / LOCK_FILE).open("w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RunFolderError(f"another metis sweep is running in {self.folder}; wait for it to end "
                                 f"(metis watch {self.folder} lists its runs)") from None

    def cleanup(self) -> None:
        lock = self.__dict__.pop("_lock_file", None)
        if lock is not None:
            lock.close()  # closing releases the lock

    def _sft_place(self, variant: Variant, seed: int) -> tuple[str | None, str | None]:
        """(shared sft folder, relative; digest of its inputs without the seed) for a run; (None,
        None) when the recipe has no sft phases."""
        from metis_cli.recipe import load_recipe
        from metis_cli.telemetry.run import stage_inputs

        probe = load_recipe(self.plan.recipe, [*self.plan.fixed, *variant.overrides, f"run.seed={seed}",
                                               _quoted("run.output_dir", _PROBE_DIR)])
        if not probe.sft.phases:
            return None, None
        inputs = stage_inputs(probe, "sft")
        digest = _digest(inputs)
        group = _digest({k: v for k, v in inputs.items() if k != "run.seed"})
        return f"sft/seed-{seed}-{digest}", group

    # -------------------------------------------------------------------------------- run
    def run(self) -> None:
        runs = self.sweep["runs"]
        for index, run in enumerate(runs, start=1):
            label = f"sweep [{index}/{len(runs)}] {run['name']}, seed {run['seed']}"
            if run["status"] == "done":
                self.say(f"{label}: finished; skipped")
                continue
            if run["status"] in ("running", "stopped"):
                self.say(f"{label}: resuming")
            else:
                self.say(f"{label}: starting")
            self.run_one(run)
            self.write()
            self.save()
            self.say(f"{label}: {run['status']}" + (f": {run['error']}" if run["error"] else ""))
            if run["status"] == "stopped":
                raise SweepStopped(label)

    def run_one(self, run: dict) -> None:
        """Run one variant x seed; its status ends as done, failed or stopped (never raises for
        a failure of its own)."""
        run.update(status="running", error=None, started_at=time.time())
        self.write()
        started = time.perf_counter()
        try:
            self._pipeline(run)
            run["status"] = "done"
        except SweepStopped:
            run["status"] = "stopped"
        except KeyboardInterrupt:
            run["status"] = "stopped"
            self.write()
            raise
        except MetisError as error:
            run.update(status="failed", error=str(error), error_kind="user")
        except Exception as error:  # noqa: BLE001 - one run's bug must not end the others
            run.update(status="failed", error=f"internal error: {type(error).__name__}: {error}", error_kind="internal")
            log = self.folder / run["run_dir"] / "error.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
        finally:  # every session of the run, a killed one excepted
            run["wall_s"] = (run.get("wall_s") or 0.0) + time.perf_counter() - started
        self._collect(run)

    def _pipeline(self, run: dict) -> None:
        from metis_cli.rewards.preflight import preflight
        from metis_cli.stages import hdpo as hdpo_stage
        from metis_cli.stages import sft as sft_stage
        from metis_cli.telemetry.run import is_done

        recipe = self.recipe_for(run)
        if not is_done(recipe.hdpo.output):
            preflight(recipe, "hdpo")  # before sft: a dead judge must not surface only after the sft stage
        if run["sft_dir"] is not None:
            if run["sft_dir"] in self.failed_sft:
                raise RunFolderError(f"the shared sft stage {run['sft_dir']} failed earlier in this sweep: "
                                     f"{self.failed_sft[run['sft_dir']]}")
            try:
                self._stage("sft", sft_stage, self.sft_recipe_for(run))
            except SweepStopped:
                raise
            except Exception as error:
                self.failed_sft[run["sft_dir"]] = str(error)
                raise
        self._stage("hdpo", hdpo_stage, recipe)

    def sft_recipe_for(self, run: dict):
        """The recipe of a run's shared sft stage (its run folder is the sft folder)."""
        from metis_cli.recipe import load_recipe

        sft_dir = self.folder / run["sft_dir"]
        return load_recipe(self.plan.recipe, [*self.plan.fixed, *run["overrides"], f"run.seed={run['seed']}",
                                              _quoted("run.output_dir", sft_dir), _quoted("sft.output", sft_dir / "sft")])

    def recipe_for(self, run: dict):
        """A run's recipe: its variant and seed, its own folder, the shared sft stage (and the tiny
        base model built there) as its starting point."""
        from metis_cli.recipe import load_recipe

        run_dir = self.folder / run["run_dir"]
        placed = [f"run.seed={run['seed']}", _quoted("run.output_dir", run_dir),
                  _quoted("hdpo.output", run_dir / "hdpo"), _quoted("eval.output", run_dir / "eval")]
        if run["sft_dir"] is not None:
            sft = self.sft_recipe_for(run)
            placed.append(_quoted("sft.output", sft.sft.output))
            base = Path(sft.model.name_or_path)
            if base.is_relative_to(self.folder / run["sft_dir"]):  # a tiny base built in the sft folder
                placed.append(_quoted("model.name_or_path", base))
        return load_recipe(self.plan.recipe, [*self.plan.fixed, *run["overrides"], *placed])

    def _stage(self, name: str, module, recipe) -> None:
        """Run one stage as `metis run` does: reuse it finished (with the same inputs), resume it
        unfinished, start it otherwise."""
        from metis_cli.telemetry.run import changed_inputs, describe_changes, is_done

        stage_dir = Path(recipe.sft.output if name == "sft" else recipe.hdpo.output)
        if is_done(stage_dir):
            changed = changed_inputs(stage_dir, recipe, name)
            if changed:
                raise RunFolderError(f"{name}: {stage_dir} holds a finished run made with a different recipe "
                                     f"({describe_changes(changed)} changed); delete that folder to redo it, "
                                     "or pass --out NEW for a new sweep")
            self.say(f"  {name}: already finished in {stage_dir}; reusing it")
            return
        result = module.run(recipe, resume=stage_dir.exists(), overwrite=False, quiet=self.quiet)
        if getattr(result, "stopped", False):
            raise SweepStopped(name)

    def _collect(self, run: dict) -> None:
        """The run's final and first held-out figures, from its hdpo metrics.jsonl."""
        history = run_history(self.folder, run)
        if history is None:
            run.update(final_step=None, final={}, start={})
            return
        run["final_step"], run["final"] = final_figures(history)
        run["start"] = first_figures(history)

    # ------------------------------------------------------------------------------- save
    def write(self) -> None:
        write_atomic(self.folder / SWEEP_FILE, json.dumps(self.sweep, indent=2, default=str) + "\n")

    def save(self) -> dict[str, Path]:
        """Rewrite the summary in sweep.json, report.md and the plots."""
        from metis_cli.evaluation.sweep_report import summarize, write_report

        self.sweep["summary"] = summarize(self.sweep)
        self.write()
        return write_report(self.folder, self.sweep)


def _digest(inputs: dict) -> str:
    return hashlib.blake2b(json.dumps(inputs, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()


def run(plan: SweepPlan, folder: Path | None = None, *, resume: bool = False, quiet: bool = False,
        say: Callable[[str], None] = print) -> SweepResult:
    runner = SweepRunner(plan, folder, resume=resume, quiet=quiet, say=say)
    runner.setup()
    stopped = False
    try:
        try:
            runner.run()
        except SweepStopped:
            stopped = True
        files = runner.save()
    finally:
        runner.cleanup()
    failed = [r for r in runner.sweep["runs"] if r["status"] == "failed"]
    return SweepResult(runner.folder, runner.sweep, files, failed, stopped)


def show(folder: Path) -> SweepResult:
    """A sweep folder's comparison as it stands (`metis eval SWEEP`): the runs' figures re-read from
    their metrics, report.md and the plots rewritten; nothing is trained."""
    from metis_cli.evaluation.sweep_report import summarize, write_report
    from metis_cli.telemetry.sweep_folder import read_sweep

    sweep = read_sweep(folder)
    for entry in sweep["runs"]:
        history = run_history(folder, entry)
        if history is not None:
            entry["final_step"], entry["final"] = final_figures(history)
            entry["start"] = first_figures(history)
    sweep["summary"] = summarize(sweep)  # sweep.json itself is left to the sweep that may still be running
    files = write_report(Path(folder), sweep)
    return SweepResult(Path(folder), sweep, files, [r for r in sweep["runs"] if r["status"] == "failed"])
