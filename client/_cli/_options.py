"""Options and output helpers that every command shares, light enough for ``fingerprint``.

They import nothing of the SDK: a scripted ``modelhash fingerprint`` must not pay for
httpx or pydantic.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

__all__ = ["echo", "json_option", "path_argument", "print_json", "progress_option"]

F = TypeVar("F", bound=Callable[..., Any])

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")

progress_option = click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Progress bar on a terminal (MODELHASH_NO_PROGRESS=1 turns it off too).",
)


def path_argument(name: str, *, nargs: int = 1, metavar: str = "PATH") -> Callable[[F], F]:
    """A path argument; whether it exists is for the reader to say, per path."""
    return click.argument(name, nargs=nargs, required=True, metavar=metavar,
                          type=click.Path(path_type=Path))


def echo(line: str) -> None:
    """One line of human output on stdout."""
    click.echo(line)


def print_json(value: Any) -> None:
    """JSON on stdout, indented, newline-terminated."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")
