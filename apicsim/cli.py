"""The ``apicsim`` command line.

``apicsim demo [--vcpus N] [--vector V]``
    The PV-IPI seed workload: one broadcast from vCPU 0 under x2apic_phys, x2apic_cluster and
    kvm_pv, with its cost (VM exits, hypercalls, MSR writes) side by side.  See
    :mod:`apicsim.demo`.

``apicsim run FILE.toml [FILE|DIR ...] [--quiet]``
    Run declarative scenarios (format: :mod:`apicsim.scenario`, ``specs/scenarios/README.md``).
    A directory stands for the ``*.toml`` files in it.

``apicsim check [--backend model|kvm] [--quiet] PATH...``
    Run scenarios on the model or on the host's KVM, one PASS/FAIL/SKIP line per expectation.
    See :mod:`apicsim.check`.

``apicsim shell [SCENARIO] [--plain]``
    An interactive session (IPython if installed, else the standard console) with the scenario
    loaded: ``step()``, ``back()``, ``until(...)``, ``table()``, ``trace()``, ``diff()``.  See
    :mod:`apicsim.shell`.

``apicsim mutants [--ids BUG-n,...] [--jobs N]``
    Put historical KVM bugs back into the model one at a time and check that the tests kill
    each one.  See :mod:`apicsim.mutants`.

Exit status: 0 when everything passed, 1 when an expectation (or a demo check) failed, 2 when
a file is malformed or cannot be read, or the command line is wrong.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from apicsim import check, demo, mutants, scenario


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apicsim",
        description="Executable model of the x86 local APIC and KVM's interrupt core.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="PV IPI vs x2APIC drivers: the cost of one broadcast")
    d.add_argument("--vcpus", type=_int, default=80, help="number of vCPUs (default 80)")
    d.add_argument("--vector", type=_int, default=0xF0, help="IPI vector (default 0xF0)")
    r = sub.add_parser("run", help="run TOML scenarios (specs/scenarios/)")
    r.add_argument("files", nargs="+", type=Path, metavar="FILE", help="scenario files or dirs")
    r.add_argument("--quiet", "-q", action="store_true", help="print only the verdicts")
    r.add_argument(
        "--backend",
        default="model",
        choices=scenario.BACKENDS,
        help="run the scenarios that list this backend (only 'model' is implemented)",
    )
    sh = sub.add_parser("shell", help="step through a scenario interactively")
    sh.add_argument("scenario", nargs="?", type=Path, default=None, help="a scenario file")
    sh.add_argument("--plain", action="store_true", help="the standard console, not IPython")
    mutants.add_parser(sub)
    check.add_parser(sub)
    return p


def _expand(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(p.glob("*.toml")))
        else:
            out.append(p)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code) if isinstance(e.code, int) else 2
    if args.command == "demo":
        if not 2 <= args.vcpus <= 4096:
            print("apicsim demo: --vcpus must be in 2..4096", file=sys.stderr)
            return 2
        if not 16 <= args.vector <= 255 or args.vector == 2:
            print("apicsim demo: --vector must be in 16..255", file=sys.stderr)
            return 2
        return demo.run(vcpus=args.vcpus, vector=args.vector, out=sys.stdout)
    if args.command == "shell":
        from apicsim import shell

        try:
            return shell.run(args.scenario, plain=args.plain)
        except scenario.ScenarioError as e:
            print(f"apicsim shell: {e}", file=sys.stderr)
            return 2
    if args.command == "mutants":
        return mutants.main(args, sys.stdout, sys.stderr)
    if args.command == "check":
        return check.main(args, sys.stdout, sys.stderr)
    if args.backend != "model":
        print(f"apicsim run: backend {args.backend!r} is not implemented", file=sys.stderr)
        return 2
    files = _expand(args.files)
    if not files:
        print("apicsim run: no scenario files found", file=sys.stderr)
        return 2
    status = 0
    for path in files:
        rc = scenario.run_file(
            path, sys.stdout, sys.stderr, backend=args.backend, verbose=not args.quiet
        )
        status = max(status, rc)
    if len(files) > 1:
        print(f"{len(files)} scenario files: {'all passed' if status == 0 else 'FAILED'}")
    return status
