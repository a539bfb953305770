"""`metis eval`: answer the recipe's eval sets with one or more models, then write the report.

For each model (HF folder, checkpoint or LoRA adapter) and each eval subset, the rollout engine
answers every question with the recipe's tools (greedy; or `eval.samples` samples at
`eval.temperature` for pass@k), the recipe's checker scores the answers, and with `redundancy`
the same model answers again with tools off (`engine.run(..., use_tools=False)`). The figures
themselves (accuracy, tool use, tool economy, redundancy) are computed by the torch-free
`metis_cli.evaluation.report`; this module only does the model work and writes the files:
`<eval.output>/report.json`, `report.md`, `plot.png` and `answers/<model>.jsonl`.

Shape: `EvalStage` with `setup()` (`_setup_models`, `_setup_data`, `_setup_tools`,
`_setup_training_run`), `run()` (`evaluate_model` per model), `save()`, `cleanup()`;
`run()` at module level wires them.
"""

from __future__ import annotations

import json
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from metis_cli.errors import DataError, EndpointError, ModelError, RunFolderError
from metis_cli.evaluation.report import Answer, ModelAnswers, build_report, calls_by_tool, unscored_subsets
from metis_cli.files import storage_errors, write_atomic

RERUN = "then rerun metis eval"
"""How to go on after a full disk or an unwritable eval.output (eval has no --resume)."""
# Folder names that say little on their own: a label keeps their parent ("hdpo/final").
_GENERIC_FOLDERS = {"final", "merged"}


@dataclass
class EvalResult:
    report: dict
    output_dir: Path
    files: dict[str, Path]
    unscored: list[tuple[str, str]]  # (model, subset) with no scored answer (`unscored_error`)


@dataclass
class ModelSpec:
    label: str
    path: str
    field: str  # where the path came from, for error messages


class EvalStage:
    def __init__(self, recipe, *, models: list[str] | None = None, samples: int | None = None,
                 subsets: list[str] | None = None, redundancy: bool = False, run_dir: str | None = None,
                 quiet: bool = False):
        self.recipe, self.cfg = recipe, recipe.eval
        self.model_args = models
        self.samples = samples or self.cfg.samples
        self.subset_filter = subsets
        self.redundancy = redundancy
        self.run_dir = run_dir
        self.quiet = quiet
        self.output_dir = Path(self.cfg.output)
        self.results: list[ModelAnswers] = []

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        if self.samples < 1:
            raise DataError(f"--samples must be at least 1, got {self.samples}")
        from metis_cli.rewards.preflight import preflight

        self._setup_models()
        preflight(self.recipe, "eval")  # a dead judge or search API fails here, before any data or model loads
        self._setup_data()
        self._setup_training_run()
        from metis_cli.model.runtime import pick_device, seed_everything, setup_threads

        setup_threads(self.recipe.run.threads)
        pick_device(self.recipe.run.device)  # run.device: cuda without a GPU fails before any model loads
        seed_everything(self.recipe.run.seed)
        self._setup_tools()

    def _setup_models(self) -> None:
        """Every model is checked before the first one is loaded: a typo fails in a second."""
        if self.model_args:
            entries = [(arg, "--model") for arg in self.model_args]
        else:
            entries = [(path, f"eval.models[{i}]") for i, path in enumerate(self.cfg.models)]
        if not entries:
            raise ModelError("no model to evaluate: pass --model PATH or set eval.models in the recipe")
        parsed = []
        for arg, field in entries:
            name, path = _split_named(arg)
            _check_model_folder(path, field)
            parsed.append((name, path, field))
        labels = model_labels([path for _, path, _ in parsed])
        self.models = [ModelSpec(name or label, path, field) for (name, path, field), label in zip(parsed, labels)]
        seen = set()
        for spec in self.models:
            if spec.label in seen:
                raise ModelError(f"two models are both called {spec.label!r}; name them with --model NAME=PATH")
            seen.add(spec.label)

    def _setup_data(self) -> None:
        from metis_cli.data.sources import load_sources

        if not self.recipe.data.eval:
            raise DataError("data.eval is empty: metis eval needs eval sets, e.g. data.eval: [{path: data/eval.jsonl}]")
        examples = load_sources(self.recipe.data.eval, self.recipe)
        known = sorted({e.subset for e in examples})
        wanted = self.subset_filter or known
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise DataError(f"unknown subset {', '.join(map(repr, unknown))}: the eval sets (data.eval) have "
                            f"{', '.join(known)}; pass --subset with one of those")
        self.subsets = [s for s in known if s in wanted]
        self.examples = {s: [e for e in examples if e.subset == s][: self.cfg.max_questions] for s in self.subsets}
        # Row ids may repeat across eval files; the position in the eval set is unique.
        position = {id(e): i for i, e in enumerate(examples)}
        self.question_ids = {id(e): f"{position[id(e)]}:{e.id}" for e in examples}

    def _setup_tools(self) -> None:
        from metis_cli.agent.factory import build_registry
        from metis_cli.rewards.batch import build_checker

        self.registry = build_registry(self.recipe)
        self.checker = build_checker(self.recipe.reward)

    def _setup_training_run(self) -> None:
        """metrics.jsonl of the training run whose curves go into the plot (None: no curves)."""
        self.metrics_path: Path | None = None
        if self.run_dir is not None:
            folder = Path(self.run_dir)
            from metis_cli.telemetry.sweep_folder import is_sweep_dir

            if is_sweep_dir(folder):
                raise RunFolderError(f"--run {folder} is a sweep folder, which holds many runs: `metis eval {folder}` "
                                     "shows their comparison; for one run's curves pass its folder "
                                     f"({folder}/runs/VARIANT/seed-N)")
            candidates = [folder / "metrics.jsonl", folder / "hdpo" / "metrics.jsonl"]
            self.metrics_path = next((c for c in candidates if c.is_file()), None)
            if self.metrics_path is None:
                raise RunFolderError(f"--run {folder}: no metrics.jsonl there or in {folder / 'hdpo'}; "
                                     "pass a run folder (runs/NAME) or a stage folder (runs/NAME/hdpo)")
            return
        automatic = Path(self.recipe.hdpo.output) / "metrics.jsonl"
        if automatic.is_file():
            self.metrics_path = automatic

    # -------------------------------------------------------------------------------- run
    def run(self) -> None:
        from metis_cli.telemetry.progress import StageProgress

        passes = 2 if self.redundancy else 1
        per_model = sum(len(e) for e in self.examples.values()) * self.samples * passes
        self._done = 0
        with StageProgress("eval", per_model * len(self.models), quiet=self.quiet) as bar:
            for spec in self.models:
                self.results.append(self.evaluate_model(spec, bar))
                figures = build_report(self.results[-1:], self.recipe.tools.costs, samples=self.samples)
                overall = figures["models"][0]["subsets"]["all"]
                bar.log(f"eval {spec.label}: accuracy {_pct(overall['accuracy'])}, "
                        f"tool-call ratio {_pct(overall['tool_call_ratio'])}")

    def evaluate_model(self, spec: ModelSpec, bar) -> ModelAnswers:
        agent = self._load(spec)
        try:
            result = ModelAnswers(spec.label, spec.path, [], [] if self.redundancy else None)
            self._answer_log = []
            for subset in self.subsets:
                examples = self.examples[subset]
                started = time.perf_counter()
                result.answers += self._answer(agent.engine, examples, spec, bar, subset, use_tools=True)
                result.wall_s_by_subset[subset] = time.perf_counter() - started
                if self.redundancy:
                    result.no_tool_answers += self._answer(agent.engine, examples, spec, bar, subset, use_tools=False)
            self._write_answer_log(spec.label)
            return result
        finally:
            agent.close()
            del agent
            import gc

            gc.collect()

    def _load(self, spec: ModelSpec):
        """The agent answering as `spec` (the weights are loaded only for the HF backend)."""
        from metis_cli.agent.factory import build_agent
        from metis_cli.telemetry.progress import spinner

        temperature = self.cfg.temperature if self.samples > 1 else None
        with spinner(f"eval: loading {spec.path}", quiet=self.quiet):
            return build_agent(self.recipe, spec.path, registry=self.registry, field=spec.field,
                               temperature=temperature)

    def _answer(self, engine, examples, spec: ModelSpec, bar, subset: str, *, use_tools: bool) -> list[Answer]:
        from metis_cli.rewards.batch import score_rollouts

        done_before = self._done
        mode = "tools" if use_tools else "tools off"

        def progress(finished: int, total: int) -> None:
            bar.update(done_before + finished, model=spec.label, subset=f"{subset} ({mode})")

        images = [e.load_images() for e in examples] if engine.vision is not None else None
        rollouts = engine.run([e.messages for e in examples], self.samples, greedy=self.samples == 1,
                              use_tools=use_tools, seed=self.recipe.run.seed, on_progress=progress, images=images)
        self._done = done_before + len(rollouts)
        bar.update(self._done)
        scores = score_rollouts(rollouts, examples, self.checker, self.recipe.reward,
                                retries=self.recipe.hdpo.unscored_retries)
        answers = []
        for rollout, score in zip(rollouts, scores):
            example = examples[rollout.prompt_index]
            generated = rollout.messages[len(example.messages):]
            answer = Answer(
                question_id=self.question_ids[id(example)], subset=subset, correct=score.correct,
                tool_calls=rollout.tool_calls, tool_errors=dict(rollout.tool_errors),
                calls_by_tool=calls_by_tool(generated), generated_tokens=rollout.generated_tokens,
                tool_s=rollout.tool_s, sample=rollout.sample_index,
                prompt_images=len(example.images), tool_images=len(rollout.images) - len(example.images) if rollout.images else 0,
            )
            answers.append(answer)
            self._answer_log.append({
                "model": spec.label, "tools": use_tools, "question_id": example.id, "subset": subset,
                "sample": rollout.sample_index, "question": example.question, "gold": example.answer,
                "final_answer": score.answer, "correct": score.correct, "tool_calls": rollout.tool_calls,
                "tool_errors": dict(rollout.tool_errors), "finish_reason": rollout.finish_reason,
                "generated_tokens": rollout.generated_tokens, "messages": generated,
                **({"tool_images": [list(image.size) for image in rollout.images[len(example.images):]]}
                   if rollout.images else {}),
            })
        return answers

    def _write_answer_log(self, label: str) -> None:
        folder = self.output_dir / "answers"
        with storage_errors(folder, then=RERUN):
            folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{_file_safe(label)}.jsonl",
                     "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in self._answer_log), then=RERUN)

    # ------------------------------------------------------------------------------- save
    def report(self) -> dict:
        return build_report(self.results, self.recipe.tools.costs, samples=self.samples,
                            temperature=self.cfg.temperature, recipe_name=self.recipe.run.name,
                            training_run=str(self.metrics_path) if self.metrics_path else None)

    def save(self) -> EvalResult:
        from metis_cli.evaluation.plot import write_plot
        from metis_cli.evaluation.tables import markdown

        report = self.report()
        files = {name: self.output_dir / name for name in ("report.json", "report.md", "plot.png")}
        report["files"] = {name: str(path) for name, path in files.items()}
        with storage_errors(self.output_dir, then=RERUN):
            self.output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(files["report.json"], json.dumps(report, indent=2) + "\n", then=RERUN)
        write_atomic(files["report.md"], markdown(report), then=RERUN)
        with storage_errors(files["plot.png"], then=RERUN):
            try:
                write_plot(report, files["plot.png"], self.metrics_path)
            except BaseException:
                with suppress(OSError):
                    files["plot.png"].unlink(missing_ok=True)  # no half-written picture
                raise
        return EvalResult(report, self.output_dir, files, unscored_subsets(report))

    def cleanup(self) -> None:
        self.__dict__.pop("registry", None)


# ------------------------------------------------------------------------------ helpers
def model_labels(paths: list[str]) -> list[str]:
    """Short unique names for model folders: the fewest trailing path parts that tell them apart.

    runs/a/sft/final, runs/a/hdpo/final -> sft/final, hdpo/final; a `checkpoints` folder is skipped
    (hdpo/step_000010), and when two runs share stage names the run folder is kept (a/hdpo/final).
    """
    parts = [[p for p in Path(path).parts if p not in ("checkpoints", "/")] or [path] for path in paths]

    def label(index: int, depth: int) -> str:
        tail = parts[index]
        minimum = 2 if tail[-1] in _GENERIC_FOLDERS or tail[-1].startswith("step_") else 1
        return "/".join(tail[-max(depth, minimum):])

    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = [label(i, depth) for i in range(len(paths))]
        if len(set(labels)) == len(labels):
            return labels
    return [str(path) for path in paths]


def _split_named(arg: str) -> tuple[str | None, str]:
    """`NAME=PATH` names a model in the report; a plain PATH is labelled from its folders."""
    name, sep, path = arg.partition("=")
    if sep and name and "/" not in name and not Path(arg).exists():
        return name, path
    return None, arg


def _check_model_folder(path: str, field: str) -> None:
    folder = Path(path).expanduser()
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path.split("/")[0]).exists()
    if looks_like_hub_id and not folder.exists():
        return  # e.g. Qwen/Qwen3-8B: transformers resolves it (needs the hub or its cache)
    if not folder.is_dir():
        raise ModelError(f"{field}: model folder not found: {path} (train the stage that writes it first, "
                         "or fix the path)")
    if not ((folder / "config.json").exists() or (folder / "adapter_config.json").exists()):
        raise ModelError(f"{field}: {path} is not a model folder (no config.json or adapter_config.json); "
                         "point at a stage's final/ folder or a checkpoints/step_* folder")


def _file_safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def unscored_error(recipe, result: EvalResult) -> EndpointError:
    """The error `metis eval` exits with (2) when a subset has no scored answer and
    --allow-unscored is not given: its accuracy is unknown, and a report must not pass for one."""
    judge = recipe.reward.judge
    where = f"the judge at {judge.base_url} (reward.judge)" if judge is not None else "the checker"
    subsets = ", ".join(f"{model} / {subset}" for model, subset in result.unscored)
    return EndpointError(
        f"no answer of {subsets} could be scored: {where} gave no verdict (down, failing, or not replying with a "
        f"verdict), so accuracy there is unknown; {result.files['report.md']} says so. Bring the judge back and "
        "rerun, or pass --allow-unscored to accept the report as it is"
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def run(recipe, *, models: list[str] | None = None, samples: int | None = None, subsets: list[str] | None = None,
        redundancy: bool = False, run_dir: str | None = None, quiet: bool = False) -> EvalResult:
    stage = EvalStage(recipe, models=models, samples=samples, subsets=subsets, redundancy=redundancy,
                      run_dir=run_dir, quiet=quiet)
    stage.setup()
    try:
        stage.run()
        return stage.save()
    finally:
        stage.cleanup()
