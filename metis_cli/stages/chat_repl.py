"""The terminal front end of `metis chat`: the REPL, its commands, and the one-shot modes.

Renders a `ChatSession` (stages/chat.py) with rich: the model's text as it streams, a panel per
tool call with its result (red for errors and malformed calls, which never end the session), the
final answer and a footer with tool calls, seconds and tokens. Ctrl-C during an answer stops the
generation at the next token (a second Ctrl-C abandons it at once); at the prompt it only reminds
how to leave. Commands: /image /tools /reset /system /save /help /quit. Images attached with
`--image` or `/image PATH` go with the next question (`[image WxH attached]`); a tool's returned
images show in its panel as `[image WxH]`.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import TextIO

from metis_cli.errors import MetisError
from metis_cli.stages.chat import ChatAnswer, ChatSession, ToolCallRecord

HELP = {
    "/image PATH": "attach an image to the next question (vision-language models)",
    "/tools": "list the tools the model may call",
    "/reset": "forget the conversation and its images (system prompt stays)",
    "/system TEXT": "replace the system prompt (no TEXT: show it)",
    "/save FILE": "write the conversation as a messages JSONL row",
    "/help": "this list",
    "/quit": "leave (also /exit or Ctrl-D)",
}


class RichListener:
    """Streams an answer to a rich console as it is produced."""

    def __init__(self, console):
        self.console = console
        self.at_line_start = True

    def on_turn_start(self, turn: int) -> None:
        if turn == 1:
            self.console.print("[bold cyan]model>[/] ", end="")
            self.at_line_start = False

    def on_text(self, text: str) -> None:
        self.console.print(text, end="", style="cyan", markup=False, highlight=False, soft_wrap=True)
        self.at_line_start = text.endswith("\n")

    def on_tool_start(self, call) -> None:
        self._newline()
        if call.error is None:
            self.console.print(f"[dim]running {call.name} ...[/]", highlight=False)

    def on_tool_result(self, record: ToolCallRecord) -> None:
        from rich.panel import Panel
        from rich.text import Text

        self._newline()
        failed = record.parse_error is not None or record.tool_error is not None
        if record.parse_error is not None:
            title = "malformed tool call"
            body = Text(f"{record.raw}\n", style="dim") + Text(f"-> {record.parse_error}")
        else:
            title = f"{record.name} ({record.runtime_s:.2f} s)" + (f" - {record.tool_error}" if record.tool_error else "")
            arguments = json.dumps(record.arguments, ensure_ascii=False)
            body = Text(f"{record.name}({arguments})\n", style="bold") + Text(f"-> {record.result}")
            if record.images:
                body += Text("\n" + " ".join(f"[image {w}x{h}]" for w, h in record.images), style="magenta")
        self.console.print(Panel(body, title=title, title_align="left", border_style="red" if failed else "green",
                                 expand=False))
        self.console.print("[bold cyan]model>[/] ", end="")
        self.at_line_start = False

    def _newline(self) -> None:
        if not self.at_line_start:
            self.console.print()
            self.at_line_start = True


def print_answer(console, answer: ChatAnswer) -> None:
    """The final answer and the footer figures of one question."""
    console.print()
    if answer.interrupted:
        console.print("[yellow](interrupted: this exchange is not kept in the conversation)[/]")
        return
    if answer.finish_reason == "context_full":
        console.print("[yellow]the conversation no longer fits the model's context; /reset to start over[/]")
        return
    if answer.answer is not None:
        console.print(f"[bold green]answer:[/] {_escape(answer.answer)}", highlight=False)
    else:
        console.print(f"[yellow]no <answer> given (finish: {answer.finish_reason})[/]")
    calls = f"{answer.T} tool call{'s' if answer.T != 1 else ''}"
    console.print(f"[dim]{calls} - {answer.total_s:.2f} s (tools {answer.tool_s:.2f} s) - "
                  f"{answer.generated_tokens} tokens - finish: {answer.finish_reason}[/]", highlight=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class Repl:
    """The interactive loop; `images` (e.g. from `--image`) go with the first question."""

    def __init__(self, session: ChatSession, console, images: list | None = None):
        self.session, self.console = session, console
        self.pending_images: list = list(images or [])

    def loop(self) -> None:
        self.console.print(f"[bold]metis chat[/] with {_escape(self.session.model_path)} - "
                           f"tools: {', '.join(self.session.tools.names()) or 'none'} - /help for commands")
        self.show_attached(self.pending_images)
        while True:
            try:
                line = self.console.input("[bold]you>[/] ")
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print("\n[dim](/quit or Ctrl-D to leave)[/]")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            answer = self.ask(line)
            print_answer(self.console, answer)

    def ask(self, question: str) -> ChatAnswer:
        """Answer with Ctrl-C bound to `session.interrupt` (main thread only: signals live there).
        The attached images go with this question, whatever becomes of it."""
        listener = RichListener(self.console)
        images, self.pending_images = self.pending_images, []
        if threading.current_thread() is not threading.main_thread():
            return self.session.ask(question, listener, images=images)

        def on_interrupt(signum, frame):
            if self.session.interrupt.is_set():
                raise KeyboardInterrupt  # second Ctrl-C: do not wait for the running tool
            self.session.interrupt.set()

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            return self.session.ask(question, listener, images=images)
        except KeyboardInterrupt:
            return ChatAnswer(question=question, answer=None, finish_reason="interrupted", tool_calls=[], T=0, turns=0,
                              generated_tokens=0, total_s=0.0, generation_s=0.0, tool_s=0.0,
                              messages=list(self.session.messages))
        finally:
            signal.signal(signal.SIGINT, previous)

    def command(self, line: str) -> bool:
        """Run one /command; False means leave."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            for usage, text in HELP.items():
                self.console.print(f"  [bold]{usage:<14}[/] {text}")
        elif name == "/image":
            self.attach(argument)
        elif name == "/tools":
            self.show_tools()
        elif name == "/reset":
            self.session.reset()
            self.console.print("[dim]conversation cleared[/]")
        elif name == "/system":
            if argument:
                self.session.set_system_prompt(argument)
                self.console.print("[dim]system prompt replaced[/]")
            else:
                self.console.print(f"system prompt: {_escape(self.session.system_prompt or '(none)')}")
        elif name == "/save":
            if not argument:
                self.console.print("[red]/save needs a file name, e.g. /save chat.jsonl[/]")
                return True
            try:
                path = self.session.save(argument)
            except MetisError as error:
                self.console.print(f"[red]{_escape(str(error))}[/]")
                return True
            self.console.print(f"[dim]saved {len(self.session.messages)} messages to {_escape(str(path))}[/]")
        else:
            self.console.print(f"[red]unknown command {_escape(name)}[/]; /help lists them")
        return True

    def attach(self, path: str) -> None:
        """`/image PATH`: load the image for the next question; problems are shown, not raised."""
        if not path:
            self.console.print("[red]/image needs a file name, e.g. /image photo.png[/]")
            return
        try:
            image = self.session.load_image(path, option="/image")
        except MetisError as error:
            self.console.print(f"[red]{_escape(str(error))}[/]")
            return
        self.pending_images.append(image)
        self.show_attached([image])

    def show_attached(self, images: list) -> None:
        for image in images:
            self.console.print(f"[dim]{_escape(f'[image {image.width}x{image.height} attached]')}[/]", highlight=False)

    def show_tools(self) -> None:
        from rich.table import Table

        specs = self.session.tool_specs()
        if not specs:
            self.console.print("no tools enabled")
            return
        table = Table(title="tools")
        for column in ("name", "description", "arguments"):
            table.add_column(column)
        for spec in specs:
            function = spec.get("function", spec)
            arguments = ", ".join(function.get("parameters", {}).get("properties", {}))
            table.add_row(function["name"], function.get("description", ""), arguments)
        self.console.print(table)


def answer_once(session: ChatSession, question: str, *, json_output: bool, console, stdin: TextIO | None = None,
                stdout: TextIO | None = None, images: list | None = None) -> int:
    """`--once QUESTION` (or `--once -`: one question per stdin line, each in a fresh conversation).

    `images` go with every question (each is the first of its conversation). With json_output,
    one JSON object per question: indented for a single question, one per line for `-`. Returns
    how many questions were answered.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    questions = [line.strip() for line in stdin] if question == "-" else [question]
    answered = 0
    for text in questions:
        if not text:
            continue
        session.reset()
        if json_output:
            answer = session.ask(text, images=images)
            payload = {"model": session.model_path, **answer.to_json()}
            stdout.write(json.dumps(payload, ensure_ascii=False, indent=None if question == "-" else 2) + "\n")
            stdout.flush()
        else:
            console.print(f"[bold]you>[/] {_escape(text)}")
            repl = Repl(session, console, images)
            repl.show_attached(repl.pending_images)
            print_answer(console, repl.ask(text))
        answered += 1
    return answered
