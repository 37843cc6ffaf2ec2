"""Run hostile cases through the real CLI, each in its own process, and judge them.

Each case runs as ``modelhash fingerprint --layers all GOOD PATH...`` (a good file
first, whose result must survive the bad ones), or for the deep-tree case as the
recursive walk ``check -r`` does. A case passes when the process ends within the
timeout with the expected exit code, one stderr line per bad path naming it
(escaped), no traceback and no "internal error", the good file still printed,
and peak RSS (from ``wait4``) under the stated bound. A data-size limit
(RLIMIT_DATA) keeps a runaway case from taking the machine down.

``python -m tests.hostile.run_corpus OUT`` builds the corpus in OUT, runs every case
and prints one line per case and the worst RSS and time.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from modelhash.errors import printable
from modelhash.fingerprint._limits import PEAK_RSS_BOUND
from tests.hostile.build_corpus import Case, build, corpus_bytes

__all__ = ["Result", "judge", "run_case"]

TIMEOUT = 60
DATA_LIMIT = 3 * 1024**3
PWNED = Path("/tmp/modelhash-hostile-PWNED")

_WALK = """
import sys
from modelhash._scan import expand, fingerprint_all
outcomes = [o for g in fingerprint_all(expand(sys.argv[1:], recursive=True)) for o in g]
for o in outcomes:
    if o.error is not None:
        sys.stderr.write(f"modelhash: {o.error.diagnostics()}\\n")
    else:
        print(o.path)
sys.exit(2 if any(o.error is not None for o in outcomes) else 0)
"""


@dataclass
class Result:
    """How one case ran."""

    case: Case
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    max_rss: int
    timed_out: bool


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_case(case: Case, good: Path) -> Result:
    """Run ``case`` in a fresh process; measure its time and peak RSS."""
    if case.command == "walk":
        args = [sys.executable, "-c", _WALK, *case.paths]
    else:
        args = [sys.executable, "-m", "modelhash", "fingerprint", "--no-progress",
                "--layers", "all", str(good), *case.paths]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=_limit)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(TIMEOUT, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Result(case, proc.returncode, out.read().decode("utf-8", "replace"),
                      err.read().decode("utf-8", "replace"), seconds,
                      usage.ru_maxrss * 1024, timed_out.is_set())


def judge(r: Result, good: Path) -> list[str]:
    """What is wrong with the result (nothing, when the case passed)."""
    problems: list[str] = []
    c = r.case
    if r.timed_out:
        problems.append(f"no answer within {TIMEOUT} s")
    if r.max_rss > PEAK_RSS_BOUND:
        problems.append(f"peak RSS {r.max_rss:,} over the {PEAK_RSS_BOUND:,} bound")
    if "Traceback" in r.stderr or "Traceback" in r.stdout:
        problems.append("a traceback")
    if PWNED.exists():
        problems.append("a payload ran")
    lines = r.stderr.splitlines()
    want = 0 if c.expect == "ok" else 2
    if r.returncode != want:
        problems.append(f"exit {r.returncode}, expected {want}")
    if len(lines) != c.bad:
        problems.append(f"{len(lines)} stderr lines, expected {c.bad}: {lines[:3]!r}")
    for line in lines:
        if not line.startswith("modelhash: "):
            problems.append(f"stderr line not ours: {line[:120]!r}")
        if "internal error" in line:
            problems.append(f"an internal error: {line[:200]!r}")
        if c.expect == "unsafe" and "unsafe pickle" not in line:
            problems.append(f"not reported unsafe: {line[:200]!r}")
    if c.command != "walk":
        for p in c.paths:
            if c.expect != "ok" and not any(printable(p) in line for line in lines):
                problems.append(f"no error line names {printable(p)!r}")
        if not r.stdout.startswith(str(good)):
            problems.append("the good file's result is missing")
    return problems


def main() -> None:
    out = Path(sys.argv[1])
    cases = build(out)
    good = out / "good.safetensors"
    failed = 0
    worst_rss = worst_time = None
    for c in cases:
        r = run_case(c, good)
        problems = judge(r, good)
        failed += bool(problems)
        if worst_rss is None or r.max_rss > worst_rss.max_rss:
            worst_rss = r
        if worst_time is None or r.seconds > worst_time.seconds:
            worst_time = r
        status = "FAIL" if problems else "ok"
        print(f"{status:4} {r.seconds:6.2f}s {r.max_rss / 2**20:7.1f} MiB  [{c.kind}] {c.name}"
              + (f"  -- {'; '.join(problems)}" if problems else ""), flush=True)
    kinds = {c.kind for c in cases}
    print(f"\n{len(cases)} cases, {len(kinds)} classes, {corpus_bytes(out):,} bytes on disk; "
          f"{failed} failed")
    if worst_rss is not None and worst_time is not None:
        print(f"worst RSS {worst_rss.max_rss / 2**20:.1f} MiB ({worst_rss.case.name}); "
              f"worst time {worst_time.seconds:.2f} s ({worst_time.case.name})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
