"""``apicsim mutants``: run the bug-replay catalogue (:mod:`apicsim.replays`) against the tests.

For each replayable bug, pytest runs in a subprocess with ``APICSIM_REPLAY=<id>``, restricted
with ``-k`` to the tests whose names carry the bug id or one of its rule ids (``BUG_13``,
``MAP_4``, ...; only the test modules whose text mentions one of them are collected; the whole
``tests/`` folder runs instead when that selects nothing), stopping at the first
failure (``-x``).  The first failing test is the one that *killed* the replay; a replay under
which every selected test passes *survived*.  A test module that fails to import is reported
as an error, not as a kill (it says the suite is broken, not that the bug was caught).
Hypothesis tests run under the default profile, without shrinking (``tests/conftest.py``).
Replays run ``--jobs`` at a time.

Exit status: 0 when every replay was killed, 1 when one survived (or its run broke), 2 for a
usage error (unknown id, no ``tests/`` folder).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from apicsim import replays
from apicsim.replays import Replay, ReplayError

ROOT = Path(__file__).resolve().parent.parent
"""The source tree: ``tests/`` lives next to the ``apicsim`` package."""

TIMEOUT_S = 900
_SUMMARY = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$")
_NO_TESTS_COLLECTED = 5


@dataclass(frozen=True, slots=True)
class Outcome:
    replay: Replay
    killed_by: str | None
    """Node id of the first failing test (None: survived or not run)."""
    detail: str = ""
    """``not replayable: ...``, ``SURVIVED``, or what went wrong with the run."""
    selected: str = ""
    """The ``-k`` expression used, or ``tests/`` for the whole folder."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.killed_by is not None or not self.replay.replayable


def keywords(replay: Replay) -> list[str]:
    """The bug id in both spellings, then its rule ids with ``_`` for ``-``."""
    names = [replay.id.replace("-", "_"), replay.id]
    names += [rule.replace("-", "_") for rule in replay.rules]
    return list(dict.fromkeys(names))


def keyword_expression(replay: Replay) -> str:
    """``-k`` expression selecting tests that name the bug or one of its rules."""
    return " or ".join(keywords(replay))


def modules_naming(replay: Replay, tests: Path | None = None) -> list[str]:
    """The test modules whose text contains one of the keywords (case-insensitive), relative
    to :data:`ROOT`: a superset of the modules ``-k`` can select from, so pytest need not
    import the whole suite (collection dominates the cost of one replay)."""
    folder = tests if tests is not None else ROOT / "tests"
    wanted = [k.lower() for k in keywords(replay)]
    found: list[str] = []
    for path in sorted(folder.rglob("*.py")):
        if not (path.name.startswith("test_") or path.name.endswith("_test.py")):
            continue
        text = path.read_text(encoding="utf-8", errors="replace").lower()
        if any(k in text for k in wanted):
            found.append(path.relative_to(ROOT).as_posix())
    return found


def _pytest(
    replay: Replay, keyword: str | None, timeout: float, paths: Sequence[str] = ("tests",)
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env[replays.ENV_VAR] = replay.id
    env["HYPOTHESIS_PROFILE"] = "default"
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) if not path else os.pathsep.join([str(ROOT), path])
    cmd = [sys.executable, "-m", "pytest", *paths, "-x", "-q", "-p", "no:cacheprovider"]
    cmd += ["-rfE", "--tb=no", "--no-header"]
    if keyword is not None:
        cmd += ["-k", keyword]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def first_failure(output: str) -> str | None:
    """Node id of the first ``FAILED``/``ERROR`` line of pytest's short summary."""
    for line in output.splitlines():
        m = _SUMMARY.match(line.strip())
        if m:
            return m.group(2).strip()
    return None


def run_replay(replay: Replay, timeout: float = TIMEOUT_S) -> Outcome:
    if replay.apply is None:
        return Outcome(replay, None, f"not replayable: {replay.reason}")
    start = time.monotonic()
    keyword: str | None = keyword_expression(replay)
    files = modules_naming(replay)
    try:
        proc = _pytest(replay, keyword, timeout, files) if files else None
        if proc is None or proc.returncode == _NO_TESTS_COLLECTED:
            keyword = None
            proc = _pytest(replay, keyword, timeout)
    except subprocess.TimeoutExpired:
        return Outcome(replay, None, f"ERROR: pytest timed out after {timeout:.0f} s")
    seconds = time.monotonic() - start
    selected = keyword if keyword is not None else "tests/"
    if proc.returncode == 0:
        return Outcome(replay, None, "SURVIVED", selected, seconds)
    killer = first_failure(proc.stdout)
    if proc.returncode in (1, 2) and killer is not None:
        if "::" not in killer:  # a module that does not even import: the suite is broken
            return Outcome(
                replay, None, f"ERROR: collection failed in {killer}", selected, seconds
            )
        return Outcome(replay, killer, "", selected, seconds)
    tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
    return Outcome(
        replay, None, f"ERROR: pytest exit {proc.returncode}: {tail[0]}", selected, seconds
    )


def run(
    ids: Sequence[str] | None, jobs: int, out: TextIO, timeout: float = TIMEOUT_S
) -> list[Outcome]:
    chosen = (
        [replays.get(i) for i in ids]
        if ids
        else [*replays.REPLAYS, *replays.ACCEL_REPLAYS, *replays.APICV_REPLAYS]
    )
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(lambda r: run_replay(r, timeout), chosen))
    print_table(outcomes, out)
    return outcomes


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(outcomes: Sequence[Outcome], out: TextIO) -> None:
    rows = [("bug", "commit", "title", "killed by")]
    for o in outcomes:
        r = o.replay
        rows.append((r.id, r.commit or "id ?", _short(r.title, 60), o.killed_by or o.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for n, row in enumerate(rows):
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
            + "  "
            + row[3],
            file=out,
        )
        if n == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 9, file=out)
    replayable = [o for o in outcomes if o.replay.replayable]
    killed = sum(1 for o in replayable if o.killed_by is not None)
    print(
        f"\n{len(replayable)} replays: {killed} killed, {len(replayable) - killed} not killed; "
        f"{len(outcomes) - len(replayable)} not replayable",
        file=out,
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``apicsim mutants`` on the CLI's sub-command parser."""
    m = sub.add_parser(
        "mutants", help="put historical KVM bugs back one at a time; the tests must fail"
    )
    m.add_argument(
        "--ids",
        action="append",
        default=[],
        metavar="BUG-n[,BUG-m...]",
        help="only these replays (default: all of apicsim.replays)",
    )
    m.add_argument("--jobs", "-j", type=int, default=2, help="parallel pytest runs (default 2)")


def main(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``apicsim mutants`` with parsed arguments; returns the exit status."""
    if args.jobs < 1:
        print("apicsim mutants: --jobs must be at least 1", file=err)
        return 2
    try:
        ids = [bug for text in args.ids for bug in replays.parse_ids(text)]
    except ReplayError as e:
        print(f"apicsim mutants: {e}", file=err)
        return 2
    if args.ids and not ids:
        print(f"apicsim mutants: --ids {args.ids[-1]!r} names no replay", file=err)
        return 2
    if not (ROOT / "tests").is_dir():
        print(f"apicsim mutants: no tests/ folder next to the package ({ROOT})", file=err)
        return 2
    outcomes = run(ids or None, args.jobs, out)
    return 0 if all(o.ok for o in outcomes) else 1
