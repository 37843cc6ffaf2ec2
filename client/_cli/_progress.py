"""A rich progress bar on stderr for long reads, shown only on a terminal."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import TaskID

__all__ = ["BarProgress", "make_progress", "progress_disabled_by_env"]

MIN_BYTES = 100 * 1000 * 1000


class BarProgress:
    """Draws one bar per file larger than ``MIN_BYTES``."""

    def __init__(self) -> None:
        # Imported here: rich costs every short, scripted run ~25 ms of start-up.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task: TaskID | None = None

    def start(self, description: str, total: int) -> None:
        if total < MIN_BYTES:
            return
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, n)

    def finish(self) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None
            self._bar.stop()


def progress_disabled_by_env() -> bool:
    """True when ``MODELHASH_NO_PROGRESS`` is set to anything but empty, 0, false or no."""
    value = os.environ.get("MODELHASH_NO_PROGRESS", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def make_progress(enabled: bool = True) -> BarProgress | None:
    """A progress bar when stderr is a terminal and nobody turned it off, else nothing."""
    if enabled and not progress_disabled_by_env() and sys.stderr.isatty():
        return BarProgress()
    return None
