"""Modal screens over the dashboard: help, a keyed choice (stop / kill training), trainer exited.

Each modal owns its keys while it is open; the dashboard's own keys (q, c, ...) are paused.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.events import Key
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Button, Static

MODAL_CSS = """
{name} {{ align: center middle; background: $background 60%; }}
{name} > Vertical {{
    width: 72; max-width: 100%; height: auto; max-height: 100%;
    border: thick $accent; background: $surface; padding: 0 1;
}}
{name} .title {{ text-style: bold; padding-bottom: 1; }}
{name} Horizontal {{ height: auto; width: auto; padding-top: 1; }}
{name} Button {{ margin-right: 1; min-width: 10; }}
"""

HELP_TEXT = """\
[b]keys[/b]
  [b]q[/b]         leave (watch: training goes on; --tui: asks first)
  [b]c[/b]         ask the trainer to save a checkpoint after this step
  [b]tab ←→↑↓[/b]  move between panels
  [b]z[/b] [b]enter[/b]   zoom the focused panel to the whole screen (esc: back)
  [b]n[/b] [b]p[/b]       next / previous rollout (rollout panel)
[b]charts[/b]
  [b]tool use[/b]  share of rollouts calling a tool (left axis), tool
    calls per rollout (right axis); dots: held-out eval per subset.
    HDPO should make both fall while accuracy holds or rises.
  [b]accuracy channel[/b]  accuracy, mean r_acc, and A≠0: share of
    rollouts with a nonzero accuracy advantage (groups that teach).
  [b]efficiency channel[/b]  |Q|≥2: share of groups with two or more
    correct rollouts (only those get A_tool); mean r_tool = 1/(T+1)
    if correct; A≠0 for A_tool. Switches on as accuracy rises.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]
    DEFAULT_CSS = MODAL_CSS.format(name="HelpScreen")

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("metis dashboard [dim](esc closes)[/dim]", classes="title")
            with VerticalScroll():
                yield Static(HELP_TEXT)


class ChoiceScreen(ModalScreen[str | None]):
    """A question with keyed answers; dismisses with the chosen value (None: cancelled)."""

    BINDINGS = [Binding("escape", "choose(None)", "Cancel")]
    DEFAULT_CSS = MODAL_CSS.format(name="ChoiceScreen")

    def __init__(self, title: str, body: str, choices: list[tuple[str, str, str]]):
        """`choices`: (key, button label, value) in display order."""
        super().__init__()
        self.title_text = title
        self.body = body
        self.choices = choices

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.title_text, classes="title")
            yield Static(self.body)
            with Horizontal():
                for key, label, value in self.choices:
                    first = value == self.choices[0][2]
                    yield Button(f"{label} ({key})", id=f"choice-{value}", variant="primary" if first else "default")
                yield Button("Cancel (esc)", id="choice-cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        value = (event.button.id or "").removeprefix("choice-")
        self.dismiss(None if value == "cancel" else value)

    def on_key(self, event: Key) -> None:
        for key, _label, value in self.choices:
            if event.key == key:
                event.stop()
                self.dismiss(value)
                return

    def action_choose(self, value: str | None) -> None:
        self.dismiss(value)


class TrainingExitedScreen(ModalScreen[bool]):
    """The trainer died on its own: exit code, the end of its log, where the log is."""

    BINDINGS = [Binding("q", "dismiss(True)", "Leave"), Binding("escape", "dismiss(False)", "Keep viewing")]
    DEFAULT_CSS = MODAL_CSS.format(name="TrainingExitedScreen") + """
    TrainingExitedScreen #log-tail { height: auto; max-height: 12; color: $text-muted; }
    TrainingExitedScreen > Vertical { border: thick $error; }
    """

    def __init__(self, exit_code: int, log_path: Path, log_tail: str):
        super().__init__()
        self.exit_code = exit_code
        self.log_path = log_path
        self.log_tail = log_tail

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"training exited with code {self.exit_code}", classes="title")
            with VerticalScroll(id="log-tail"):
                yield Static(escape(self.log_tail) or "(the log is empty)")
            yield Static(f"full log: [b]{escape(str(self.log_path))}[/b]")
            with Horizontal():
                yield Button("Leave (q)", id="leave", variant="error")
                yield Button("Keep viewing (esc)", id="stay")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "leave")
