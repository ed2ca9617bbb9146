"""Progress reporting the API can call without knowing about terminals.

The API takes a :class:`Progress`; the CLI hands it one that draws rich progress bars on
stderr, library users get :class:`NullProgress` (silent) unless they pass their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBar, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> AbstractContextManager[Callable[[int], None]]:
        """A counted stage; the yielded function ``advance(n=1, info=None)`` advances it by n units
        and, given ``info``, shows that text beside the bar (e.g. the current loss)."""

    def status(self, description: str) -> AbstractContextManager[None]:
        """An uncounted stage (loading, writing)."""


class NullProgress:
    """Reports nothing."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1, info=None: None

    @contextmanager
    def status(self, description: str) -> Iterator[None]:
        yield


class ConsoleProgress:
    """Rich progress bars and spinners on one console (stderr, so --json stdout stays clean)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        bar = RichBar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        with bar:
            task_id = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, info: str | None = None) -> None:
                if info is None:
                    bar.advance(task_id, n)
                else:
                    bar.update(task_id, advance=n, info=info)

            yield advance

    @contextmanager
    def status(self, description: str) -> Iterator[None]:
        with self.console.status(description):
            yield
