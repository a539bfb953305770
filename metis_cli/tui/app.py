"""`Dashboard`: the Textual app behind `metis watch RUN_DIR` and `metis hdpo|sft RECIPE --tui`.

Every POLL_INTERVAL_S it reads what is new in the stage folder (`StageSource`), merges it into
the history, and redraws only when something changed. In watch mode leaving never touches
training; in train mode (`training` given) `q` asks whether to stop training gracefully (the
trainer saves a checkpoint, then exits) and the app returns the trainer's exit code.

Must not import torch or transformers (tests/test_tui.py checks): training runs in another
process, and the UI talks to it only through files.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Literal

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Container
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Footer, Static

from metis_cli.errors import RunFolderError
from metis_cli.telemetry import control
from metis_cli.telemetry.history import MetricsHistory
from metis_cli.telemetry.sweep_folder import is_sweep_dir
from metis_cli.tui.metrics_tail import RolloutBatch
from metis_cli.tui.rollout_view import RolloutPanel
from metis_cli.tui.screens import ChoiceScreen, HelpScreen, TrainingExitedScreen
from metis_cli.tui.source import StageSource
from metis_cli.tui.summary import StatusFacts, format_duration, status_line
from metis_cli.tui.sweep_view import SweepView
from metis_cli.tui.training_process import TrainingProcess
from metis_cli.tui.views import HdpoView, SftView, WaitingView

Mode = Literal["watch", "train"]

POLL_INTERVAL_S = 0.5
# In watch mode, say "no update for ..." once metrics.jsonl is quiet for this many step times
# (and at least QUIET_MIN_S): the trainer may have died without a word.
QUIET_STEPS = 5
QUIET_MIN_S = 120.0

# Keys of the dashboard itself; paused while a modal screen owns the keyboard.
DASHBOARD_ACTIONS = {"leave", "request_checkpoint", "toggle_zoom", "help", "move_focus", "unzoom"}


class Dashboard(App[int]):
    """Live charts of one training stage; returns an exit code (the trainer's, in train mode)."""

    TITLE = "metis"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #status { dock: top; height: 1; background: $panel; text-wrap: nowrap; text-overflow: ellipsis; }
    #body { height: 1fr; }
    .panel { border: round $primary 40%; border-title-color: $text; border-title-style: bold; background: $surface; }
    .panel:focus { border: round $accent; }
    """
    BINDINGS = [
        Binding("q", "leave", "Quit"),
        Binding("ctrl+q", "leave", "Quit", show=False, priority=True),
        Binding("c", "request_checkpoint", "Checkpoint"),
        Binding("z,enter", "toggle_zoom", "Zoom", key_display="z"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("escape", "unzoom", "Unzoom", show=False),
        Binding("left", "move_focus('left')", "Left", show=False),
        Binding("right", "move_focus('right')", "Right", show=False),
        Binding("up", "move_focus('up')", "Up", show=False),
        Binding("down", "move_focus('down')", "Down", show=False),
    ]

    def __init__(
        self,
        stage_dir: Path | None = None,
        *,
        mode: Mode = "watch",
        stage: Literal["hdpo", "sft"] | None = None,
        training: TrainingProcess | None = None,
        run_dir: Path | None = None,
    ):
        """Show `stage_dir` (e.g. runs/demo/hdpo; `stage` "hdpo"/"sft", None: from the records),
        or with `run_dir` instead, whichever stage of that run folder is newest (watch only)."""
        super().__init__()
        if (stage_dir is None) == (run_dir is None):
            raise ValueError("give exactly one of stage_dir or run_dir")
        if (mode == "train") != (training is not None):
            raise ValueError("train mode needs the training process, watch mode must not have one")
        self.mode = mode
        self.training = training
        # A sweep folder (`metis sweep`) holds many runs: the dashboard lists them instead.
        self.sweep_dir = Path(run_dir) if run_dir is not None and is_sweep_dir(run_dir) else None
        if self.sweep_dir is not None:
            self.source = StageSource(None)
        else:
            self.source = StageSource.following(run_dir) if run_dir is not None else StageSource.for_stage(stage_dir, stage)
        self.history = MetricsHistory()
        self.training_exit_code: int | None = None
        self._view_kind: str | None = None
        self._latest_rollouts: RolloutBatch | None = None
        self._refresh_lock = asyncio.Lock()

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield Container(id="body")
        yield Footer()

    async def on_mount(self) -> None:
        await self.refresh_from_disk()
        # The footer may subscribe to binding changes only after this first poll.
        self.call_after_refresh(self.refresh_bindings)
        self.set_interval(POLL_INTERVAL_S, self.refresh_from_disk)

    # -- reading -------------------------------------------------------------------------------

    async def refresh_from_disk(self) -> None:
        """Read what is new, redraw what changed, check on the trainer."""
        async with self._refresh_lock:  # a slow redraw must not overlap the next poll
            await self._refresh_from_disk()

    async def _refresh_from_disk(self) -> None:
        polled = self.source.poll()
        if polled.reset:
            self.history = MetricsHistory()
            self._latest_rollouts = None
        self.history.add(polled.records)
        if polled.rollouts is not None:
            self._latest_rollouts = polled.rollouts
        view_changed = await self._show_view_for_current_state()
        view = self._stage_view()
        if view is not None:
            if polled.records or polled.reset or view_changed:
                view.show(self.history)
            if self._latest_rollouts is not None and (polled.rollouts is not None or view_changed):
                view.show_rollouts(self._latest_rollouts)
        self._check_training()
        self._update_status()
        if view_changed or polled.records:
            self.refresh_bindings()  # the footer greys out keys that do nothing now

    def _stage_view(self) -> HdpoView | SftView | None:
        views = self.query("#body > HdpoView, #body > SftView")
        return views.first() if views else None  # type: ignore[return-value]

    async def _show_view_for_current_state(self) -> bool:
        """Mount the view the data calls for; True if it changed."""
        wanted = (self.source.stage or "hdpo") if len(self.history) else "waiting"
        body = self.query_one("#body", Container)
        if self.sweep_dir is not None:
            changed = self._view_kind != "sweep"
            if changed:
                await body.mount(SweepView(self.sweep_dir))
                self._view_kind = "sweep"
                body.query_one(SweepView).focus()
            body.query_one(SweepView).reload()
            return changed
        if wanted == self._view_kind:
            if wanted == "waiting":
                body.query_one(WaitingView).set_waiting_for(self.source.waiting_for())
            return False
        await body.remove_children()
        if wanted == "waiting":
            await body.mount(WaitingView(self.source.waiting_for(), self._waiting_hint()))
        else:
            await body.mount(SftView() if wanted == "sft" else HdpoView())
        self._view_kind = wanted
        panels = list(self.query(".panel"))
        if panels:
            panels[0].focus()
        return True

    def _waiting_hint(self) -> str:
        if self.training is not None:
            return (
                "Training is starting (loading data and model); the view fills in at its first step.\n"
                f"Its output goes to {self.training.log_path}."
            )
        return "The view fills in by itself once training writes its first step.\nq leaves; training is not affected."

    def _finished(self) -> bool:
        stage_dir = self.source.stage_dir
        return self.history.reached_total or bool(stage_dir and (stage_dir / "final").is_dir())

    def _quiet_for_s(self) -> float | None:
        metrics_path = self.source.metrics_path
        if self.mode != "watch" or metrics_path is None or not len(self.history) or self._finished():
            return None
        try:
            quiet_s = time.time() - metrics_path.stat().st_mtime
        except FileNotFoundError:
            return None
        pace_s = self.history.seconds_per_step() or 0.0
        return quiet_s if quiet_s > max(QUIET_MIN_S, QUIET_STEPS * pace_s) else None

    # -- the trainer (train mode) ----------------------------------------------------------------

    def _check_training(self) -> None:
        if self.training is None or self.training_exit_code is not None:
            return
        exit_code = self.training.poll()
        if exit_code is None:
            return
        self.training_exit_code = exit_code
        if self.training.stop_requested_at is not None or self.training.terminated_at is not None:
            self.exit(exit_code)
        elif exit_code == 0:
            self.notify("training finished", title="metis")
        else:
            self.push_screen(
                TrainingExitedScreen(exit_code, self.training.log_path, self.training.log_tail()),
                lambda leave: self.exit(exit_code) if leave else None,
            )

    def _trainer_note(self) -> tuple[str | None, bool]:
        if self.training is None:
            return None, False
        if self.training_exit_code not in (None, 0):
            return f"training exited with code {self.training_exit_code} · see {self.training.log_path.name}", True
        if self.training_exit_code is not None:
            return None, False
        if self.training.terminated_at is not None:
            return "killing the trainer…", True
        waited_s = self.training.seconds_since_stop_request()
        if waited_s is not None:
            return f"stopping (saves first) {format_duration(waited_s)} · q kills", False
        return None, False

    def _update_status(self) -> None:
        if self.sweep_dir is not None:
            self.query_one("#status", Static).update(self.query_one(SweepView).status_text())
            return
        note, note_is_error = self._trainer_note()
        stage_dir = self.source.stage_dir
        facts = StatusFacts(
            stage=self.source.stage,
            history=self.history,
            finished=self._finished() or self.training_exit_code == 0,
            # A stop request in train mode already shows as the trainer note.
            pending_requests=(control.pending(stage_dir) - ({"stop"} if note else set())) if stage_dir else set(),
            corrupt_lines=self.source.corrupt_lines,
            quiet_for_s=self._quiet_for_s(),
            trainer_note=note,
            trainer_note_is_error=note_is_error,
        )
        self.query_one("#status", Static).update(status_line(facts))

    # -- keys ------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """False: the key goes elsewhere (a modal is open); None: shown greyed out in the footer."""
        if action in DASHBOARD_ACTIONS and isinstance(self.screen, ModalScreen):
            return False
        if action == "toggle_zoom" and self._view_kind in (None, "waiting"):
            return None
        if action == "request_checkpoint" and (self._view_kind in (None, "waiting", "sweep") or self._not_running()):
            return None
        return True

    def _not_running(self) -> bool:
        return self._finished() or self.training_exit_code is not None

    def action_leave(self) -> None:
        training = self.training
        if training is None:
            self.exit(0)
        elif self.training_exit_code is not None:
            self.exit(self.training_exit_code)
        elif training.terminated_at is not None:
            self.notify("waiting for the trainer to die…")
        elif training.stop_requested_at is not None:
            self.push_screen(
                ChoiceScreen(
                    "Kill training now?",
                    "The trainer has not stopped yet: it finishes its step and saves first. "
                    "Killing it loses the steps since the last checkpoint.",
                    [("k", "Kill now", "kill")],
                ),
                self._on_kill_choice,
            )
        else:
            self.push_screen(
                ChoiceScreen(
                    "Stop training?",
                    "[b]Stop[/b]: the trainer finishes this step, saves a checkpoint (resume from "
                    "it later), then exits.\n[b]Detach[/b]: leave this view; training goes on "
                    "and `metis watch RUN_DIR` shows it again.",
                    [("s", "Stop and save", "stop"), ("d", "Detach", "detach")],
                ),
                self._on_stop_choice,
            )

    def _on_stop_choice(self, choice: str | None) -> None:
        assert self.training is not None
        if choice == "stop":
            self.training.request_stop()
            self.notify("stop requested: the trainer saves a checkpoint after this step, then exits")
            self._update_status()
        elif choice == "detach":
            self.exit(0)

    def _on_kill_choice(self, choice: str | None) -> None:
        if choice == "kill" and self.training is not None:
            self.training.terminate()
            self._update_status()

    def action_request_checkpoint(self) -> None:
        stage_dir = self.source.stage_dir
        if stage_dir is None:  # check_action keeps the key off until a stage shows; belt and braces
            return
        try:
            control.request(stage_dir, "checkpoint")
        except RunFolderError as error:
            self.notify(str(error), severity="warning")
            return
        self.notify("checkpoint requested: the trainer saves after its current step")
        self._update_status()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_toggle_zoom(self) -> None:
        if self.screen.maximized is not None:
            self.screen.minimize()
        elif self.focused is not None:
            self.screen.maximize(self.focused)

    def action_unzoom(self) -> None:
        self.screen.minimize()

    def action_move_focus(self, direction: str) -> None:
        zoomed = self.screen.maximized
        if isinstance(zoomed, RolloutPanel):
            # Zoomed in on the rollouts: arrows read them instead of moving away.
            {"up": zoomed.scroll_up, "down": zoomed.scroll_down}.get(direction, lambda: None)()
            {"left": zoomed.action_previous_rollout, "right": zoomed.action_next_rollout}.get(direction, lambda: None)()
            return
        if zoomed is not None:
            return
        panels = list(self.query(".panel"))
        if not panels:
            return
        if self.focused not in panels:
            panels[0].focus()
            return
        target = nearest_panel(self.focused, panels, direction)
        if target is None and direction in ("left", "right"):
            step = 1 if direction == "right" else -1
            target = panels[(panels.index(self.focused) + step) % len(panels)]
        if target is not None:
            target.focus()


def nearest_panel(current: Widget, panels: list[Widget], direction: str) -> Widget | None:
    """The panel next to `current` in `direction` on screen (closest first, then best aligned)."""
    here = current.region
    here_x, here_y = here.x + here.width / 2, here.y + here.height / 2
    best: tuple[float, Widget] | None = None
    for panel in panels:
        there = panel.region
        beside = {
            "right": there.x >= here.right,
            "left": there.right <= here.x,
            "down": there.y >= here.bottom,
            "up": there.bottom <= here.y,
        }[direction]
        if panel is current or not beside:
            continue
        there_x, there_y = there.x + there.width / 2, there.y + there.height / 2
        along, across = (
            (abs(there_x - here_x), abs(there_y - here_y))
            if direction in ("left", "right")
            else (abs(there_y - here_y), abs(there_x - here_x))
        )
        score = along + 2 * across
        if best is None or score < best[0]:
            best = (score, panel)
    return best[1] if best else None
