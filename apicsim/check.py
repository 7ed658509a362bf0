"""``apicsim check [--backend model|kvm] [--quiet] PATH...``: scenarios, expectation by expectation.

Runs scenario files (``PATH`` is a file, or a directory searched recursively for ``*.toml``)
on one backend through the runner of :mod:`apicsim.scenario` (one code path; the backend is a
small adapter: :class:`apicsim.scenario.ModelBackend` or :class:`~apicsim.scenario.KvmBackend`)
and prints one line per expectation::

    PASS x.toml:38: step 4 (mmio_write): expect.irr vCPU 3: expected {0xf1}, got {0xf1}
    SKIP x.toml:38: step 4 (mmio_write): expect.exits: expected 1; not observable on kvm: ...
    FAIL x.toml:52: step 6 (mmio_read): expect.value: expected 0x3000000, got 0

then one verdict per file and a summary.  A file's verdict is

* ``PASS``: every expectation that the backend can observe held (``exits``/``stats``/``handled``
  are the model's counters: on kvm they are ``SKIP`` lines);
* ``FAIL``: an expectation did not hold, or a step raised (the file stops at that step);
* ``SKIP``: the backend cannot be this VM or perform one of its steps, with the reason (on
  kvm: the ``sdm`` profile or ``profile_changes``, features or module parameters the host does
  not have, ``[guest]``, ``run``, ``advance``; a ``hypercall`` where the guest's VMCALL cannot
  reach KVM, from that step on);
* ``MODEL-ONLY``: the file's header says ``backends = ["model"]``; it is not run on kvm;
* ``ERROR``: the file is malformed, or the set-up failed.

Exit status: 0 when no file failed or had an error, 1 when an expectation failed, 2 for a
malformed file, a failed set-up, no files, or a backend that cannot run here (``--backend kvm``
without a usable ``/dev/kvm``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from apicsim import scenario
from apicsim.scenario import Scenario, ScenarioError, Unsupported, Verdict
from lapic.faults import ApicTypeError, ApicValueError, GuestFault

STATUSES = ("PASS", "FAIL", "SKIP", "MODEL-ONLY", "ERROR")


@dataclass(slots=True)
class FileResult:
    """The verdict on one scenario file."""

    path: Path
    name: str
    status: str
    """One of :data:`STATUSES`."""
    reason: str = ""
    """Why it was skipped, is model-only, or had an error."""
    verdicts: list[Verdict] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for v in self.verdicts if v.status == status)


def merge(verdicts: Sequence[Verdict]) -> list[Verdict]:
    """One verdict for a run of vCPUs that share a step, field, status and detail (an
    ``irr = { "*" = [] }`` over 20 vCPUs is one line, ``vCPUs 0-16``, not 17)."""
    out: list[Verdict] = []
    first: list[int] = []
    for v in verdicts:
        prev = out[-1] if out else None
        if (
            prev is not None
            and v.vcpu is not None
            and prev.vcpu is not None
            and (prev.step, prev.field, prev.status, prev.detail, prev.line)
            == (v.step, v.field, v.status, v.detail, v.line)
            and v.vcpu == prev.vcpu + 1
        ):
            out[-1] = replace(prev, vcpu=v.vcpu)
            continue
        out.append(v)
        first.append(-1 if v.vcpu is None else v.vcpu)
    return [
        v if v.vcpu is None or lo == v.vcpu else replace(v, vcpu_first=lo)
        for v, lo in zip(out, first, strict=True)
    ]


def expand(paths: Sequence[Path]) -> list[Path]:
    """Files as given; directories replaced by their ``*.toml`` files, recursively, sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*.toml") if q.is_file()))
        else:
            out.append(p)
    return out


def model_only_reason(sc: Scenario) -> str:
    """The sentence of the description that says why the scenario is model-only."""
    text = " ".join(sc.description.split())
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        if "model-only" in sentence.lower():
            return sentence
    return f"backends = {list(sc.backends)}"


def check_file(path: Path, backend: str, out: TextIO, *, quiet: bool = False) -> FileResult:
    """Run one scenario file on ``backend``, printing its expectation lines and verdict."""
    try:
        sc = scenario.load(path)
    except ScenarioError as e:
        result = FileResult(path, path.stem, "ERROR", str(e))
        out.write(f"ERROR {e}\n")
        return result
    label = f"{sc.name} ({sc.path})"
    if backend not in sc.backends:
        status = "MODEL-ONLY" if sc.backends == ("model",) else "SKIP"
        reason = (
            model_only_reason(sc)
            if status == "MODEL-ONLY"
            else f"not a {backend!r} scenario (backends = {list(sc.backends)})"
        )
        out.write(f"{status} {label}: not run on {backend}: {reason}\n")
        return FileResult(path, sc.name, status, reason)
    try:
        be = scenario.open_backend(sc, backend)
    except Unsupported as e:
        out.write(f"SKIP {label}: {e}\n")
        return FileResult(path, sc.name, "SKIP", str(e))
    except (ApicValueError, ApicTypeError, GuestFault, OSError, RuntimeError) as e:
        section = "guest" if sc.guest is not None and isinstance(e, GuestFault) else "vm"
        line = sc.locator.section_line(section) or 1
        reason = f"{sc.path}:{line}: [{section}]: the set-up failed on {backend}: {e}"
        out.write(f"ERROR {reason}\n")
        return FileResult(path, sc.name, "ERROR", reason)
    try:
        report = scenario.Runner(sc, backend=be).run()
    finally:
        be.close()
    result = FileResult(path, sc.name, "PASS", verdicts=merge(report.verdicts))
    if not quiet:
        out.write(f"== {label} on {backend}\n")
    for v in result.verdicts:
        if not quiet or v.status == "FAIL":
            out.write(f"  {v}\n")
    counts = (
        f"{result.count('PASS')} expectations passed, {result.count('FAIL')} failed, "
        f"{result.count('SKIP')} skipped"
    )
    if report.failures:
        result.status = "FAIL"
        last = report.outcomes[-1].step
        result.reason = f"stopped after step {last.number} of {len(sc.steps)}"
        out.write(f"FAIL {label}: {counts}; {result.reason}\n")
    elif report.skipped is not None:
        result.status = "SKIP"
        result.reason = report.skipped
        out.write(f"SKIP {label}: {counts} before {report.skipped}\n")
    else:
        out.write(f"PASS {label}: {len(sc.steps)} steps, {counts}\n")
    return result


def _check_file_safely(path: Path, backend: str, out: TextIO, *, quiet: bool) -> FileResult:
    """``check_file``, with anything it did not foresee reported as an ERROR of this file (no
    traceback; the remaining files still run)."""
    try:
        return check_file(path, backend, out, quiet=quiet)
    except Exception as e:
        reason = f"{path}: internal error: {type(e).__name__}: {e}"
        out.write(f"ERROR {reason}\n")
        return FileResult(path, path.stem, "ERROR", reason)


def check(
    paths: Sequence[Path], backend: str, out: TextIO, err: TextIO, *, quiet: bool = False
) -> tuple[int, list[FileResult]]:
    """Check every scenario under ``paths``; ``(exit status, results)``."""
    files = expand(paths)
    if not files:
        err.write("apicsim check: no scenario files found\n")
        return 2, []
    if backend == "kvm":
        from apicsim.kvm import kvm_available

        ok, why = kvm_available()
        if not ok:
            err.write(f"apicsim check: the kvm backend cannot run here: {why}\n")
            return 2, []
    results = [_check_file_safely(p, backend, out, quiet=quiet) for p in files]
    by_status = {s: [r for r in results if r.status == s] for s in STATUSES}
    expectations = {s: sum(r.count(s) for r in results) for s in ("PASS", "FAIL", "SKIP")}
    out.write(
        f"\napicsim check --backend {backend}: {len(results)} scenario files: "
        f"{len(by_status['PASS'])} passed, {len(by_status['FAIL'])} failed, "
        f"{len(by_status['SKIP'])} skipped, {len(by_status['MODEL-ONLY'])} model-only, "
        f"{len(by_status['ERROR'])} errors\n"
        f"expectations: {expectations['PASS']} passed, {expectations['FAIL']} failed, "
        f"{expectations['SKIP']} skipped\n"
    )
    for status in ("FAIL", "ERROR", "SKIP"):
        for r in by_status[status]:
            out.write(f"  {status} {r.name}: {r.reason}\n")
    if by_status["ERROR"]:
        return 2, results
    return (1 if by_status["FAIL"] else 0), results


def add_parser(sub: Any) -> None:
    """The ``check`` subcommand (``sub``: the ``argparse`` subparsers object)."""
    c = sub.add_parser(
        "check",
        help="run scenarios on the model or the real KVM, one line per expectation",
        description="Run scenario files (or directories of them, recursively) on one backend "
        "and report every expectation as PASS, FAIL or SKIP.",
    )
    c.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="scenario files or dirs")
    c.add_argument(
        "--backend",
        default="model",
        choices=scenario.BACKENDS,
        help="model (default) or kvm (the host's /dev/kvm through apicsim.kvm.KvmVm)",
    )
    c.add_argument("--quiet", "-q", action="store_true", help="print failures and verdicts only")


def main(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    status, _ = check(args.paths, args.backend, out, err, quiet=args.quiet)
    return status
