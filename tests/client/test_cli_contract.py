"""The command line's promises to pipelines: exits, one-line errors, one JSON error shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import modelhash
from modelhash._cli import cli
from modelhash._cli._app import COMMANDS
from tests.client.conftest import MODELHASH, LiveRegistry, clean_env
from tests.client.test_e2e import MakeModel, one_line_errors


def run(*args: str | Path, input: str | None = None, **env: str):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env)


def test_version_from_the_script_and_python_dash_m(tmp_path: Path) -> None:
    for argv in ([*MODELHASH, "--version"], [sys.executable, "-m", "modelhash", "-V"]):
        out = subprocess.run(argv, cwd=tmp_path, env=clean_env(), capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"modelhash {modelhash.__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        ["check"],
        ["fingerprint", "--layers", "some", "x.safetensors"],
        ["flag", "x.safetensors", "--category", "not-a-category"],
        ["keys", "create", "--role", "overlord"],
        ["check", "--workers", "-3", "x.safetensors"],
    ],
)
def test_a_usage_error_is_exit_two_and_says_so_in_one_line(args: list[str]) -> None:
    out = run(*args)
    assert out.exit_code == 2
    (line,) = one_line_errors(out.stderr)
    assert line.startswith("modelhash: usage error: ") and "--help" in line
    assert out.stdout == ""


def test_no_subcommand_prints_help_and_exits_two() -> None:
    out = run()
    assert out.exit_code == 2 and "Usage: modelhash" in out.stderr and out.stdout == ""
    out = run("--help")
    assert out.exit_code == 0 and "Exit codes" in out.stdout
    for name in COMMANDS:
        assert name in out.stdout


def test_every_command_is_importable_and_has_help() -> None:
    for name in COMMANDS:
        out = run(name, "--help")
        assert out.exit_code == 0, (name, out.stderr)
        assert f"Usage: modelhash {name}" in out.stdout


def test_an_internal_error_is_exit_four_never_zero_or_one(
    monkeypatch: pytest.MonkeyPatch, make_model: MakeModel
) -> None:
    import modelhash._cli._fingerprint as command

    def broken(*args: object, **kwargs: object) -> object:
        raise KeyError("a bug of ours")

    monkeypatch.setattr(command, "fingerprint_path", broken)
    out = run("fingerprint", make_model())
    assert out.exit_code == 4
    (line,) = one_line_errors(out.stderr)
    assert line.startswith("modelhash: internal error: KeyError")
    out = run("fingerprint", "--json", make_model())
    assert out.exit_code == 4
    assert json.loads(out.stdout) == {"error": {"message": line.removeprefix("modelhash: "),
                                                "kind": "internal"}}


def test_fingerprint_and_check_give_an_error_the_same_json_shape(
    live_registry: LiveRegistry, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    fingerprinted = run("fingerprint", "--json", broken)
    assert fingerprinted.exit_code == 2
    checked = live_registry.cli(live_registry.reader)("check", "--json", broken)
    assert checked.exit_code == 2, checked.stderr
    (a,) = json.loads(fingerprinted.stdout)["results"]
    (b,) = json.loads(checked.stdout)["results"]
    assert a["error"] == b["error"]
    assert set(a["error"]) >= {"message", "kind", "path"}
    assert a["error"]["kind"] == "malformed"


def test_a_key_without_the_role_says_which_role_and_exits_three(
    live_registry: LiveRegistry,
) -> None:
    out = live_registry.cli(live_registry.reader)("keys", "list", "--json")
    assert out.exit_code == 3
    (line,) = one_line_errors(out.stderr)
    assert "403" in line and "admin" in line and "role" in line
    error = json.loads(out.stdout)["error"]
    assert error["kind"] == "forbidden" and error["status"] == 403


def test_control_characters_in_a_path_print_as_one_line(tmp_path: Path) -> None:
    odd = tmp_path / "evil\nname\x1b[31m.safetensors"
    odd.write_bytes(b"\x00" * 3)
    out = run("fingerprint", odd)
    assert out.exit_code == 2
    (line,) = one_line_errors(out.stderr)
    assert "\x1b" not in line and "\\n" in line and "\\x1b" in line


def test_progress_can_be_turned_off_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelhash._cli import _progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert _progress.make_progress(True) is not None
    monkeypatch.setenv("MODELHASH_NO_PROGRESS", "1")
    assert _progress.make_progress(True) is None
    monkeypatch.setenv("MODELHASH_NO_PROGRESS", "0")
    assert _progress.make_progress(True) is not None


def test_completion_scripts_name_the_commands() -> None:
    for shell in ("bash", "zsh", "fish"):
        out = run("completion", shell)
        assert out.exit_code == 0 and "_MODELHASH_COMPLETE" in out.stdout
    completed = subprocess.run(
        MODELHASH, env=clean_env(_MODELHASH_COMPLETE="bash_complete", COMP_WORDS="modelhash ch",
                                 COMP_CWORD="1"),
        capture_output=True, text=True, timeout=120,
    )
    assert "plain,check" in completed.stdout.split()


def test_keys_create_refuses_a_missing_database_and_says_where(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "modelhash.db"
    url = f"sqlite:///{db}"
    out = subprocess.run([*MODELHASH, "keys", "create", "--role", "admin", "--db", url],
                         cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    (line,) = one_line_errors(out.stderr)
    assert str(db) in line and "--create" in line
    assert not db.exists()
    out = subprocess.run([*MODELHASH, "keys", "create", "--role", "admin", "--name", "ops",
                          "--db", url, "--create", "--json"],
                         cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["role"] == "admin" and made["name"] == "ops" and made["key"].startswith("mh_")
    assert isinstance(made["id"], int) and made["key"].startswith(made["prefix"])
    assert str(db) in out.stderr and made["key"] not in out.stderr
    # A second key in the same database needs no --create, and says which database.
    out = subprocess.run([*MODELHASH, "keys", "create", "--role", "reader"],
                         cwd=db.parent, env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(db) in out.stderr


BLAS_PROBE = """
import os, sys
from modelhash._cli._app import single_threaded_blas
single_threaded_blas(sys.argv[1:])
import numpy
from threadpoolctl import threadpool_info
blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
print(os.environ.get("OPENBLAS_NUM_THREADS"), blas[0] if blas else None)
"""


@pytest.mark.parametrize(
    ("argv", "preset", "want"),
    [
        (["fingerprint", "--layers", "all", "m.safetensors"], None, "1"),
        (["check", "m.safetensors"], None, "1"),
        (["serve", "--port", "8000"], None, "None"),
        (["db", "upgrade"], None, "None"),
        (["fingerprint", "m.safetensors"], "3", "3"),
    ],
)
def test_client_commands_load_blas_single_threaded_unless_told(
    argv: list[str], preset: str | None, want: str
) -> None:
    env = clean_env()
    env.pop("OPENBLAS_NUM_THREADS", None)
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    out = subprocess.run([sys.executable, "-c", BLAS_PROBE, *argv], env=env,
                         capture_output=True, text=True, check=True)
    value, threads = out.stdout.split()
    assert value == want
    if want == "1" and threads != "None":  # OpenBLAS really started with one thread
        assert threads == "1"
