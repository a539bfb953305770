"""A rich progress bar showing a stage's key figures (quiet mode shows nothing)."""

from __future__ import annotations

from contextlib import contextmanager


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


class StageProgress:
    """`with StageProgress("hdpo", total) as bar: bar.update(step, accuracy=0.9, tools=0.5)`."""

    def __init__(self, description: str, total: int, *, quiet: bool = False, completed: int = 0):
        self.description, self.total, self.quiet, self.completed = description, total, quiet, completed
        self._progress = None
        self._task = None

    def __enter__(self) -> "StageProgress":
        if self.quiet:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[figures]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=self.total, completed=self.completed, figures="")
        return self

    def update(self, completed: int, **figures) -> None:
        if self._progress is None:
            return
        text = "  ".join(f"{name}={_format(value)}" for name, value in figures.items() if value is not None)
        self._progress.update(self._task, completed=completed, figures=text)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, highlight=False, markup=False)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


@contextmanager
def spinner(message: str, *, quiet: bool = False):
    """A one-line status for short phases (loading, tokenizing)."""
    if quiet:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield
