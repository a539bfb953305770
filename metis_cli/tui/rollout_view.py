"""The rollout browser: one sampled trajectory at a time, tool calls, tool results and the answer
highlighted, so a person can see *how* the policy used (or skipped) its tools.

`format_rollout` is a pure function of one rollout record (see the rollout sample format in the
run-folder conventions); `RolloutPanel` is the focusable, scrollable panel that pages through
the newest batch with `n` / `p`. Image content parts (vision-language rollouts) show as
`[image WxH]`, their sizes taken in order of appearance from the record's `images` (`[image]`
when a record does not give them; telemetry/message_text.py renders them, as the trackers do);
pixels never reach the browser.
"""

from __future__ import annotations

import json
import re

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from metis_cli.telemetry.message_text import IMAGE_MARK as _IMAGE_MARK
from metis_cli.telemetry.message_text import image_mark, image_sizes, message_text  # noqa: F401 (re-exported)
from metis_cli.tui.metrics_tail import RolloutBatch

TOOL_CALL_STYLE = "bold #1e1e1e on #ffa62b"
TOOL_RESULT_STYLE = "#61afef"
ANSWER_STYLES = {True: "bold #1e1e1e on #7ed957", False: "bold white on #d9534f", None: "bold reverse"}
THINK_STYLE = "dim italic"
ROLE_STYLE = "bold"
VERDICTS = {True: ("✓ correct", "bold green"), False: ("✗ wrong", "bold red"), None: ("? unscored", "bold yellow")}
# (field, label, format): rewards, then advantages with their sign.
REWARD_FIELDS = (
    ("r_acc", "r_acc", "{:.2f}"),
    ("r_tool", "r_tool", "{:.2f}"),
    ("adv_acc", "A_acc", "{:+.2f}"),
    ("adv_tool", "A_tool", "{:+.2f}"),
)

# A tool result longer than this is cut: the browser is for seeing the shape of a trajectory.
MAX_TOOL_RESULT_CHARS = 600

# An unclosed tag runs to the end of the text (a rollout cut off by the token limit).
_MARKUP = re.compile(
    r"<tool_call>(.*?)(?:</tool_call>|$)|<answer>(.*?)(?:</answer>|$)|<think>(.*?)(?:</think>|$)", re.S
)


IMAGE_STYLE = "bold magenta"


def _append_with_images(text: Text, body: str, style: str = "") -> None:
    """`body` in `style`, its image marks highlighted."""
    cursor = 0
    for match in _IMAGE_MARK.finditer(body):
        text.append(body[cursor : match.start()], style)
        text.append(match.group(), IMAGE_STYLE)
        cursor = match.end()
    text.append(body[cursor:], style)


def describe_tool_call(payload: str) -> tuple[str, bool]:
    """`calculator(expression="12*3")` for a well-formed Hermes tool call; (raw text, False) if not."""
    try:
        call = json.loads(payload)
        name = call["name"]
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        shown = ", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in arguments.items())
        return f"{name}({shown})", True
    except (ValueError, KeyError, TypeError, AttributeError):
        return payload.strip(), False


def _assistant_text(text: str, correct: bool | None) -> Text:
    rendered = Text()
    cursor = 0
    for match in _MARKUP.finditer(text):
        rendered.append(text[cursor : match.start()])
        tool_call, answer, thought = match.groups()
        if tool_call is not None:
            described, well_formed = describe_tool_call(tool_call)
            style = TOOL_CALL_STYLE if well_formed else "bold white on #d9534f"
            if rendered.plain.strip():
                rendered.append("\n")  # a call on its own line is easy to spot, and never wraps mid-call
            rendered.append(f" ⚙ {described} " if well_formed else f" malformed tool call: {described} ", style)
        elif answer is not None:
            rendered.append(f" answer: {answer.strip()} ", ANSWER_STYLES[correct])
        else:
            rendered.append(thought.strip(), THINK_STYLE)
        cursor = match.end()
    rendered.append(text[cursor:])
    return rendered


def _header(rollout: dict) -> Text:
    verdict = VERDICTS.get(rollout.get("correct"), VERDICTS[None])
    calls = rollout.get("tool_calls") or 0
    header = Text.assemble(verdict, f" · {calls} tool call{'s' if calls != 1 else ''}")
    if rollout.get("tool_errors"):
        header.append(f" · {rollout['tool_errors']} tool errors", "bold red")
    numbers = [
        f"{label} {number_format.format(rollout[key])}"
        for key, label, number_format in REWARD_FIELDS
        if isinstance(rollout.get(key), (int, float))
    ]
    if numbers:
        header.append(" · " + " ".join(numbers), "dim")
    origin = [str(rollout["subset"])] if rollout.get("subset") else []
    if rollout.get("prompt_id") is not None:
        origin.append(f"prompt {rollout['prompt_id']} #{rollout.get('sample', 0)}")
    if rollout.get("gold") is not None:
        origin.append(f"gold {rollout['gold']}")
    if origin:
        header.append("\n" + " · ".join(origin), "dim")
    return header


def format_rollout(rollout: dict) -> Text:
    """One rollout as highlighted text: verdict and rewards, the question, then every turn."""
    correct = rollout.get("correct") if rollout.get("correct") in (True, False) else None
    text = _header(rollout)
    messages = [m for m in rollout.get("messages") or [] if isinstance(m, dict)]
    sizes = image_sizes(rollout)
    bodies = [message_text(message, sizes).strip() for message in messages]  # sizes go in order of appearance
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    question = bodies[first_user] if first_user is not None else ""
    if rollout.get("question") and not (first_user is not None and _IMAGE_MARK.search(question)):
        question = str(rollout["question"])
    if question:
        text.append("\nQ ", ROLE_STYLE)
        _append_with_images(text, question.strip())
    for index, (message, body) in enumerate(zip(messages, bodies)):
        role = message.get("role")
        if role == "system" or index == first_user:
            continue
        if role == "tool":
            if len(body) > MAX_TOOL_RESULT_CHARS:
                body = body[:MAX_TOOL_RESULT_CHARS] + " …"
            text.append("\ntool ↳ ", f"{ROLE_STYLE} {TOOL_RESULT_STYLE}")
            _append_with_images(text, body, TOOL_RESULT_STYLE)
        elif role == "assistant":
            text.append("\nassistant ", ROLE_STYLE)
            text.append_text(_assistant_text(body, correct))
        else:
            text.append(f"\n{role} ", ROLE_STYLE)
            _append_with_images(text, body)
    return text


class RolloutPanel(VerticalScroll, can_focus=True, inherit_bindings=False):
    """The newest rollouts, one at a time (`n` / `p`); arrows stay free for moving between panels."""

    ALLOW_MAXIMIZE = True
    BINDINGS = [
        Binding("n", "next_rollout", "Next", key_display="n"),
        Binding("p", "previous_rollout", "Prev", key_display="p"),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown,space", "page_down", "Page down", show=False),
        Binding("home", "scroll_home", "Top", show=False),
        Binding("end", "scroll_end", "Bottom", show=False),
    ]
    DEFAULT_CSS = """
    RolloutPanel { padding: 0 1; scrollbar-size-vertical: 1;
        scrollbar-background: $surface; scrollbar-color: $primary 50%; border-subtitle-color: $text-muted; }
    """

    def __init__(self, *, id: str | None = None):  # noqa: A002 - Textual's name for it
        super().__init__(id=id, classes="panel")
        self.batch: RolloutBatch | None = None
        self.index = 0
        self.border_title = "rollouts"
        self.border_subtitle = "waiting for samples"

    def compose(self) -> ComposeResult:
        yield Static("no rollout samples yet", id="rollout-text")

    def show_batch(self, batch: RolloutBatch) -> None:
        """Show a newer batch; stays on the same position so paging is not undone by a refresh."""
        same_step = self.batch is not None and self.batch.step == batch.step
        self.batch = batch
        self.index = min(self.index, len(batch.rollouts) - 1) if same_step else 0
        self._render_current()

    def action_next_rollout(self) -> None:
        self._move(+1)

    def action_previous_rollout(self) -> None:
        self._move(-1)

    def _move(self, delta: int) -> None:
        if self.batch is None:
            return
        self.index = (self.index + delta) % len(self.batch.rollouts)
        self._render_current()
        self.scroll_home(animate=False)

    def _render_current(self) -> None:
        assert self.batch is not None
        rollouts = self.batch.rollouts
        correct = sum(1 for r in rollouts if r.get("correct") is True)
        with_tools = sum(1 for r in rollouts if (r.get("tool_calls") or 0) > 0)
        self.border_title = f"rollouts · step {self.batch.step} · {self.index + 1}/{len(rollouts)}"
        self.border_subtitle = f"✓ {correct}/{len(rollouts)} · tools {with_tools}/{len(rollouts)} · n/p"
        self.query_one("#rollout-text", Static).update(format_rollout(rollouts[self.index]))
