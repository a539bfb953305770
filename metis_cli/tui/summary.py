"""The dashboard's words: the one-line status bar and the text of the progress panel.

Pure functions of the metrics history and a few facts the app knows (mode, trainer state), so
they are tested without a terminal. Kept short enough for 80 columns; the status bar puts the
most important facts first because the end of the line is cut on narrow terminals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePath

from rich.text import Text

from metis_cli.tui.charts import format_value
from metis_cli.telemetry import metrics as m
from metis_cli.telemetry.history import WARNING_COUNTERS, MetricsHistory

PROGRESS_BAR_CELLS = 12


def format_duration(seconds: float | None) -> str:
    """12s, 4m05s, 3h07m, 2d04h."""
    if seconds is None:
        return "–"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_count(value: float | None) -> str:
    """1234 -> 1.2k, 2_500_000 -> 2.5M."""
    if value is None:
        return "–"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def counted(count: int, plural_words: str) -> str:
    """3 timeouts, 1 timeout (words given in the plural; adjectives such as 'unscored' stay)."""
    if count == 1 and plural_words.endswith("s"):
        return f"1 {plural_words[:-1]}"
    return f"{count} {plural_words}"


def checkpoint_label(checkpoint: str) -> str:
    """runs/demo/hdpo/checkpoints/step_000100 -> @100 (any other name is shown as it is)."""
    name = PurePath(checkpoint).name
    match = re.fullmatch(r"step_0*(\d+)", name)
    return f"@{match.group(1)}" if match else name


@dataclass
class StatusFacts:
    """What the status bar needs beyond the metrics."""

    stage: str | None
    history: MetricsHistory
    finished: bool = False
    pending_requests: set[str] = field(default_factory=set)
    corrupt_lines: int = 0
    quiet_for_s: float | None = None  # seconds since metrics.jsonl last grew, when suspiciously long
    trainer_note: str | None = None  # train mode: "stopping…", "exited with code 1 …"
    trainer_note_is_error: bool = False


def progress_bar(done: int, total: int) -> Text:
    filled = round(PROGRESS_BAR_CELLS * min(1.0, done / total)) if total > 0 else 0
    return Text.assemble(("━" * filled, "bold #7ed957"), ("─" * (PROGRESS_BAR_CELLS - filled), "dim"))


def status_line(facts: StatusFacts) -> Text:
    """step/total with a bar, trainer state, ETA, last checkpoint, warnings."""
    history = facts.history
    line = Text()
    line.append(f" {facts.stage or 'metis'} ", "bold reverse")
    step, total = history.latest_step, history.total_steps
    if step is not None:
        line.append(f" step {step}/{total}" if total else f" step {step}")
        if total:
            line.append(" ")
            line.append_text(progress_bar(step, total))
            line.append(f" {100 * min(step, total) // total}%")
    if facts.trainer_note:
        line.append(f"  {facts.trainer_note}", "bold red" if facts.trainer_note_is_error else "bold yellow")
    elif facts.finished:
        line.append("  ✓ finished", "bold green")
    elif facts.quiet_for_s is not None:
        line.append(f"  no update for {format_duration(facts.quiet_for_s)}", "bold yellow")
    elif step is not None:
        line.append(f"  ETA {format_duration(history.eta_s())}")
    checkpoint = history.last_checkpoint
    if "checkpoint" in facts.pending_requests:
        line.append("  ckpt requested…", "bold yellow")
    elif checkpoint:
        line.append(f"  ckpt {checkpoint_label(checkpoint)}", "dim")
    if "stop" in facts.pending_requests:
        line.append("  stop requested…", "bold yellow")
    warnings = [counted(count, words) for words, count in history.warning_totals().items()]
    if facts.corrupt_lines:
        warnings.append(counted(facts.corrupt_lines, "bad metrics lines"))
    if warnings:
        line.append("  ⚠ " + ", ".join(warnings), "bold yellow")
    return line


def _seconds(value: float | None) -> str:
    return f"{format_value(value)} s" if value is not None else "–"


def _rows(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{label:<11}{value}" for label, value in pairs if value != "–"]


def progress_text(stage: str, history: MetricsHistory) -> Text:
    """The progress panel: pace, ETA, losses, this step's warnings and the latest eval table."""
    number = history.latest_number
    pairs = [
        ("step time", _seconds(number(m.STEP_S))),
        (" rollout", _seconds(number(m.ROLLOUT_S))),
        (" update", _seconds(number(m.UPDATE_S))),
        ("tokens/s", format_count(number(m.TOKENS_PER_S))),
        ("elapsed", format_duration(number(m.ELAPSED_S))),
        ("ETA", format_duration(history.eta_s())),
    ]
    if stage == "sft":
        pairs += [
            ("epoch", format_value(number(m.EPOCH))),
            ("loss", format_value(number(m.LOSS), 4)),
            ("eval loss", format_value(number(m.EVAL_LOSS), 4)),
            ("lr", f"{number(m.LR):.2e}" if number(m.LR) is not None else "–"),
        ]
    else:
        pairs += [
            ("loss", format_value(number(m.LOSS), 4)),
            ("kl", format_value(number(m.KL), 4)),
            ("entropy", format_value(number(m.ENTROPY))),
            ("resp toks", format_value(number(m.RESPONSE_TOKENS_MEAN), 0)),
        ]
    text = Text("\n".join(_rows(pairs)))
    latest = history.latest_record
    step_warnings = [
        counted(int(latest[key]), words) for key, words in WARNING_COUNTERS.items() if (latest.get(key) or 0) > 0
    ]
    if step_warnings:
        text.append("\nthis step: " + ", ".join(step_warnings), "yellow")
    subsets = history.eval_subsets()
    if subsets:
        text.append(f"\neval @{history.latest_eval_step()}  acc  tools", "bold")
        for subset in subsets:
            accuracy = format_value(number(m.eval_key(subset, m.ACCURACY)))
            ratio = format_value(number(m.eval_key(subset, m.TOOL_CALL_RATIO)))
            text.append(f"\n {subset[:8]:<8} {accuracy:>5} {ratio:>5}")
    return text

