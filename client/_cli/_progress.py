"""A progress bar on stderr for long reads, shown only on a terminal."""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

__all__ = ["BarProgress", "make_progress", "progress_disabled_by_env"]

MIN_BYTES = 100 * 1000 * 1000


class BarProgress:
    """Draws one bar (click's) per read larger than ``MIN_BYTES``; safe across threads."""

    def __init__(self) -> None:
        self._bar: ProgressBar[int] | None = None
        self._lock = threading.Lock()

    def start(self, description: str, total: int) -> None:
        if total < MIN_BYTES:
            return
        import click

        with self._lock:
            self._bar = click.progressbar(
                length=total, label=description, file=sys.stderr, width=30,
                show_eta=True, show_percent=True,
            )
            self._bar.render_progress()

    def advance(self, n: int) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(n)

    def finish(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.render_finish()
                self._bar = None


def progress_disabled_by_env() -> bool:
    """True when ``MODELHASH_NO_PROGRESS`` is set to anything but empty, 0, false or no."""
    value = os.environ.get("MODELHASH_NO_PROGRESS", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def make_progress(enabled: bool = True) -> BarProgress | None:
    """A progress bar when stderr is a terminal and nobody turned it off, else nothing."""
    if enabled and not progress_disabled_by_env() and sys.stderr.isatty():
        return BarProgress()
    return None
