"""``apicsim shell [SCENARIO]``: an interactive session over a VM, one step at a time.

Opens IPython when it is installed (``pip install apicsim[shell]``), the standard library's ``code``
console otherwise (or with ``--plain``), with an :class:`apicsim.Session` loaded: the
scenario's VM and steps, or an empty session on a small default VM (4 vCPUs, a Linux guest on
``x2apic_phys``).  The namespace holds ``session``, ``vm``, ``guest``, the session's methods as
shortcuts (``step``, ``back``, ``forward``, ``until``, ``table``, ``trace``, ``diff``, ``do``),
``irr_has`` (a condition for ``until``), ``ops`` (:mod:`apicsim.ops`) and ``Session``.
Integers a line evaluates to print in hex with their decimal value (``0x3000000 (50331648)``).

Not modelled: command history files and completion beyond what the console itself offers.
"""

from __future__ import annotations

import builtins
import code
import importlib
import sys
from pathlib import Path
from typing import Any

from apicsim import ops
from apicsim.session import Session, irr_has

BANNER = """apicsim shell: {what}
  step() / step(n)   take the next step(s)        back() / back(n)   undo them (exact)
  forward()          redo after back()            until(irr_has(3, 0xF0))
  table()  trace(vcpu=1, name="apic_ipi", vector=0xF0)  diff()   session, vm, guest, ops
"""


def namespace(session: Session) -> dict[str, Any]:
    """What the shell's prompt sees."""
    return {
        "session": session,
        "vm": session.vm,
        "guest": session.guest,
        "step": session.step,
        "back": session.back,
        "forward": session.forward,
        "until": session.until,
        "table": session.table,
        "trace": session.trace,
        "diff": session.diff,
        "do": session.do,
        "irr_has": irr_has,
        "ops": ops,
        "Session": Session,
    }


def displayhook(value: object) -> None:
    """``sys.displayhook`` showing ints in hex (and decimal), the rest as usual."""
    if value is None:
        return
    builtins._ = value  # type: ignore[attr-defined]
    if type(value) is int:
        print(f"{value:#x} ({value})" if value > 9 else str(value))
    else:
        print(repr(value))


def pretty_int(value: int, p: Any, cycle: bool) -> None:
    """IPython's ``text/plain`` printer for ints: hex with the decimal value (bools as is)."""
    if type(value) is bool:
        p.text(repr(value))
    elif value > 9:
        p.text(f"{value:#x} ({value})")
    else:
        p.text(str(value))


def hex_ints(ipython: Any) -> None:
    """Make an IPython shell print the ints a line evaluates to as :func:`pretty_int` does."""
    ipython.display_formatter.formatters["text/plain"].for_type(int, pretty_int)


IPYTHON_HEX_INTS = "__import__('apicsim.shell').shell.hex_ints(get_ipython())"
"""Run at IPython's start (``InteractiveShellApp.exec_lines``)."""


def open_session(scenario: Path | None) -> Session:
    return Session.default() if scenario is None else Session.from_scenario(scenario)


def run(scenario: Path | None, *, plain: bool = False) -> int:
    """Start the interactive shell; returns the exit status."""
    session = open_session(scenario)
    what = f"{scenario} ({len(session.steps)} steps)" if scenario else "empty session"
    banner = BANNER.format(what=what)
    ns = namespace(session)
    if not plain:
        try:
            ipython = importlib.import_module("IPython")
        except ImportError:
            pass
        else:
            config = importlib.import_module("traitlets.config").Config()
            config.TerminalInteractiveShell.banner2 = banner
            config.InteractiveShellApp.exec_lines = [IPYTHON_HEX_INTS]
            ipython.start_ipython(argv=[], user_ns=ns, config=config)
            return 0
    old = sys.displayhook
    sys.displayhook = displayhook
    try:
        code.interact(banner=banner, local=ns, exitmsg="")
    finally:
        sys.displayhook = old
    return 0
