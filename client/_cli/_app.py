"""The root command: lazy sub-commands, ``--version``, and the one place errors become exits.

Every sub-command lives in its own module and is imported only when it runs (or when
help or shell completion lists it), so a scripted ``modelhash fingerprint`` pays for
neither httpx nor the wire schema. A new command is one entry in :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import click

from modelhash import __version__
from modelhash._cli._exit import Exit
from modelhash.errors import InputError, ModelhashError, RegistryError, printable

T = TypeVar("T")

__all__ = [
    "COMMANDS",
    "CommandError",
    "ModelhashGroup",
    "cli",
    "error_json",
    "exit_code_for",
    "fail",
    "guarded",
    "main",
    "safe_text",
    "single_threaded_blas",
]

# name -> "module:attribute" under modelhash._cli.
COMMANDS: dict[str, str] = {
    "fingerprint": "_fingerprint:fingerprint",
    "check": "_check:check",
    "lookup": "_flags:lookup",
    "flag": "_flags:flag",
    "revoke": "_flags:revoke",
    "dispute": "_flags:dispute",
    "confirm": "_analyst:confirm",
    "reinstate": "_analyst:reinstate",
    "report": "_analyst:report",
    "flags": "_analyst:flags",
    "audit": "_analyst:audit",
    "import": "_analyst:import_",
    "export": "_analyst:export",
    "bases": "_admin:bases",
    "keys": "_admin:keys",
    "sync": "_sync:sync",
    "hf": "_hf:hf",
    "serve": "_server:serve",
    "db": "_server:db",
    "completion": "_completion:completion",
}


class CommandError(Exception):
    """A command's one-line failure with its exit code and JSON error kind."""

    def __init__(self, message: str, code: Exit, kind: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.kind = kind
        self.extra = extra


def safe_text(text: str) -> str:
    """``text`` with control characters escaped, so a hostile name prints as one line."""
    return printable(text)


def exit_code_for(exc: ModelhashError) -> Exit:
    """Map an error class to its documented exit code."""
    if isinstance(exc, RegistryError):
        return Exit.REGISTRY
    if isinstance(exc, InputError):
        return Exit.BAD_INPUT
    return Exit.BAD_INPUT


def error_json(exc: BaseException) -> dict[str, Any]:
    """The one JSON shape of an error: ``message``, ``kind``, and fields of its own."""
    if isinstance(exc, CommandError):
        return {"message": safe_text(exc.message), "kind": exc.kind, **exc.extra}
    if isinstance(exc, ModelhashError):
        out = exc.to_json()
        out["message"] = safe_text(out["message"])
        return out
    return {"message": safe_text(f"internal error: {type(exc).__name__}: {exc}"),
            "kind": "internal"}


def fail(message: str, code: Exit = Exit.BAD_INPUT, kind: str = "input") -> NoReturn:
    """End the command: one line on stderr (and a JSON error with ``--json``), exit ``code``."""
    raise CommandError(message, code, kind)


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; a ModelhashError ends the command with its documented exit code."""
    try:
        return fn()
    except ModelhashError as exc:
        raise _as_command_error(exc) from None


def _as_command_error(exc: ModelhashError) -> CommandError:
    data = exc.to_json()
    message, kind = data.pop("message"), data.pop("kind")
    return CommandError(message, exit_code_for(exc), kind, **data)


def _report(exc: CommandError, as_json: bool) -> int:
    sys.stderr.write(f"modelhash: {safe_text(exc.message)}\n")
    if as_json:
        sys.stdout.write(json.dumps({"error": error_json(exc)}, indent=2) + "\n")
    return int(exc.code)


class ModelhashGroup(click.Group):
    """A group whose sub-commands are imported on first use, and whose errors are one line.

    Exit codes are the documented ones whatever goes wrong: a usage error is 2 and
    says so, a registry failure 3, and anything unexpected 4 with ``internal error``,
    never 0 or 1, which pipelines act on.
    """

    def __init__(self, *args: Any, lazy: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy)
        self._package = "modelhash._cli"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self._lazy, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        target = self._lazy.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        command = getattr(importlib.import_module(f"{self._package}.{module}"), attribute)
        if not isinstance(command, click.Command):  # pragma: no cover - a wrong table entry
            raise TypeError(f"{target} is not a click command")
        self.commands[cmd_name] = command
        return command

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in argv
        try:
            code = super().main(argv, prog_name or "modelhash", complete_var,
                                standalone_mode=False, **extra)
            code = code if isinstance(code, int) else 0
        except CommandError as exc:
            code = _report(exc, as_json)
        except ModelhashError as exc:
            code = _report(_as_command_error(exc), as_json)
        except click.exceptions.NoArgsIsHelpError as exc:
            # A group given no sub-command: its help, on stderr, as a usage error.
            sys.stderr.write(exc.format_message() + "\n")
            code = int(Exit.BAD_INPUT)
        except click.UsageError as exc:
            hint = ""
            if exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            code = _report(CommandError(f"usage error: {exc.format_message()}{hint}",
                                        Exit.BAD_INPUT, "usage"), as_json)
        except click.ClickException as exc:
            code = _report(CommandError(exc.format_message(), Exit.BAD_INPUT, "input"),
                           as_json)
        except click.Abort:
            sys.stderr.write("modelhash: interrupted\n")
            code = 130
        except BrokenPipeError:
            # The reader went away (``| head``): nothing left to say, and nowhere to say it.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            code = int(Exit.OK)
        except SystemExit:
            raise
        except Exception as exc:  # the documented exit for modelhash's own bugs
            code = _report(CommandError(f"internal error: {type(exc).__name__}: {exc}",
                                        Exit.INTERNAL, "internal"), as_json)
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(
    "modelhash",
    cls=ModelhashGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", "-V", prog_name="modelhash",
                      message="%(prog)s %(version)s")
def cli() -> None:
    """Fingerprint AI model weights and check them against a registry of flagged models.

    \b
    Exit codes: 0 done (for check and lookup: nothing flagged), 1 a match, 2 bad
    input or usage, 3 the registry (or Hub, or offline cache) failed, 4 an
    internal error of modelhash.
    """


SERVER_COMMANDS = frozenset({"serve", "db"})
"""Commands that run the registry server, whose BLAS threading is left as it is."""


def single_threaded_blas(argv: Sequence[str]) -> None:
    """Have OpenBLAS start with one thread when numpy loads, unless the command is
    the server's or the user chose a number.

    Every BLAS call a client command makes runs on one thread anyway (the read pass's
    lanes already use every core; see ``run_pass`` and the invariant layer), so the
    pool of worker threads OpenBLAS starts when it loads is never used. Starting it
    costs about 0.03 CPU s and 0.05 s of wall time per command on 2 cores, which
    shows in the start-up of ``fingerprint --layers all``.
    """
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SERVER_COMMANDS and "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main() -> None:
    """Console-script entry point."""
    single_threaded_blas(sys.argv[1:])
    cli.main(prog_name="modelhash")
