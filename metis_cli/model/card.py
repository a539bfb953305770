"""The model card (`README.md`, Hugging Face model-card form) of a trained model folder.

Everything on it is read from the files beside the folder, so any `final/` can get one, at save
time or later: the stage folder's `inputs.json` (the recipe fields the stage depended on),
`metrics.jsonl` (the held-out figures before and after training) and, when `metis eval` ran,
the eval report (`<eval.output>/report.json` of the run's `recipe.yaml`) with the tool economy
of this very folder. The YAML front matter carries what the Hub indexes: base model (when it is a
Hub id), library, tags, datasets (`hf:` sources). docs/run-folder.md describes the folders.

A README.md that metis did not write (no `CARD_MARKER`) is never replaced.

Must not touch: the weights, the run's files (only read here).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from metis_cli import __version__
from metis_cli.files import write_atomic
from metis_cli.telemetry.run import INPUTS_FILE

CARD_FILE = "README.md"
CARD_MARKER = "<!-- model card written by metis; `metis push` refreshes it -->"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
KEY_FIELDS = {
    "sft": ("model.name_or_path", "sft.init_from", "model.lora.enabled", "sft.lr", "sft.batch_size",
            "sft.max_seq_len"),
    "hdpo": ("model.name_or_path", "hdpo.init_from", "hdpo.estimator", "hdpo.steps", "hdpo.prompts_per_step",
             "hdpo.group_size", "hdpo.w_acc", "hdpo.w_tool", "hdpo.lr", "hdpo.kl_coef", "tools.enabled",
             "rollout.max_turns", "rollout.temperature"),
}
HELD_OUT = (("accuracy", "accuracy"), ("tool_call_ratio", "tool-call ratio"), ("tool_calls_mean", "calls per answer"))
ECONOMY = (("accuracy", "accuracy"), ("tool_call_ratio", "tool-call ratio"), ("tool_calls_mean", "calls per answer"),
           ("tool_errors", "tool errors"), ("cost_usd_per_1k_answers", "USD per 1k answers"),
           ("tool_latency_s_per_answer", "tool latency s / answer"))


def write_card(model_dir: Path, *, stage_dir: Path | None = None, replace: bool = False) -> Path | None:
    """Write `model_dir/README.md`; None (and nothing written) when a README.md metis did not
    write is there, unless `replace` (a folder being saved, whose README.md peft just wrote).

    stage_dir: the stage folder the model belongs to (default: `model_dir`'s parent).
    """
    path = Path(model_dir) / CARD_FILE
    if not replace and path.exists() and CARD_MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return None
    write_atomic(path, build_card(Path(model_dir), stage_dir=stage_dir))
    return path


def build_card(model_dir: Path, *, stage_dir: Path | None = None) -> str:
    stage_dir = stage_dir or model_dir.parent
    inputs = _read_json(stage_dir / INPUTS_FILE) or {}
    stage = _stage(inputs)
    run = _read_yaml(stage_dir.parent / "recipe.yaml") or {}
    run_name = (run.get("run") or {}).get("name") or stage_dir.parent.name
    base = inputs.get("model.name_or_path")
    front = {
        "library_name": "peft" if (model_dir / "adapter_config.json").exists() else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["metis", *([stage] if stage else []), "tool-use", "agent",
                 *[f"tool:{name}" for name in inputs.get("tools.enabled") or []]],
    }
    if isinstance(base, str) and HUB_ID.match(base) and not Path(base).exists():
        front["base_model"] = base
    datasets = _hub_datasets(inputs)
    if datasets:
        front["datasets"] = datasets
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", CARD_MARKER, "",
             f"# {run_name}{f' ({stage})' if stage else ''}", "",
             f"A tool-using agent trained with metis {__version__}"
             f"{f' (`metis {stage}`)' if stage else ''}. It calls tools as `<tool_call>{{json}}</tool_call>` and "
             "answers as `<answer>...</answer>`. Talk to it with `metis chat --model PATH`, or serve it as an "
             "OpenAI-compatible API with `metis serve --model PATH`.", ""]
    lines += _recipe_section(inputs, stage)
    lines += _held_out_section(stage_dir)
    lines += _economy_section(model_dir, stage_dir, run)
    return "\n".join(lines).rstrip() + "\n"


def _stage(inputs: dict) -> str | None:
    for stage in ("hdpo", "sft"):
        if any(key.startswith(f"{stage}.") for key in inputs):
            return stage
    return None


def _recipe_section(inputs: dict, stage: str | None) -> list[str]:
    rows = [(key, inputs[key]) for key in KEY_FIELDS.get(stage or "", ()) if key in inputs]
    if not rows:
        return []
    return ["## Training recipe", "", "| field | value |", "| --- | --- |",
            *[f"| `{key}` | {_cell(value)} |" for key, value in rows], ""]


def _held_out_section(stage_dir: Path) -> list[str]:
    """Held-out figures per subset at the first eval (before training) and the last one."""
    from metis_cli.telemetry.metrics import read_metrics, split_eval_key

    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    evals = [r for r in read_metrics(path) if any(split_eval_key(key) for key in r)]
    if not evals:
        return []
    before, after = evals[0], evals[-1]
    subsets = sorted({split_eval_key(key)[0] for key in {*before, *after} if split_eval_key(key)})
    header = " | ".join(label for _, label in HELD_OUT)
    lines = ["## Held-out evaluation", "",
             f"Greedy answers to the recipe's eval set during training: step {before.get('step')} (before) -> "
             f"step {after.get('step')} (after).", "",
             f"| subset | {header} |", "| --- |" + " --- |" * len(HELD_OUT)]
    for subset in subsets:
        cells = [f"{_number(before.get(f'eval/{subset}/{figure}'))} -> {_number(after.get(f'eval/{subset}/{figure}'))}"
                 for figure, _ in HELD_OUT]
        lines.append(f"| {subset} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _economy_section(model_dir: Path, stage_dir: Path, run: dict) -> list[str]:
    """This folder's figures from `metis eval`'s report, when the report lists it."""
    output = (run.get("eval") or {}).get("output")
    candidates = [Path(output), stage_dir.parent / Path(output).name] if output else []
    for report_path in [candidate / "report.json" for candidate in candidates]:
        report = _read_json(report_path)
        if not report:
            continue
        for entry in report.get("models", []):
            if entry.get("path") and Path(entry["path"]).resolve() == model_dir.resolve():
                header = " | ".join(label for _, label in ECONOMY)
                lines = ["## Tool economy (`metis eval`)", "", f"From {report_path} ({report.get('decoding', '')}).",
                         "", f"| subset | {header} |", "| --- |" + " --- |" * len(ECONOMY)]
                for subset, figures in entry.get("subsets", {}).items():
                    lines.append(f"| {subset} | " + " | ".join(_number(figures.get(key)) for key, _ in ECONOMY) + " |")
                return [*lines, ""]
    return []


def _hub_datasets(inputs: dict) -> list[str]:
    found: list[str] = []

    def visit(node) -> None:
        if isinstance(node, dict):
            path = node.get("path")
            if isinstance(path, str) and path.startswith("hf:"):
                found.append(path[3:])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(list(inputs.values()))
    return list(dict.fromkeys(found))


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _cell(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else f"`{value}`"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict | None:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None
