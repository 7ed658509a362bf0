"""Rendering of a scenario run: the header and the step table ``apicsim run`` prints.

One line per step: its number and TOML line, the operation's :meth:`apicsim.ops.Op.describe`,
the result (or the fault), the VM exits and the IRR/ISR changes.  Not here: the verdict lines
(:class:`apicsim.scenario.expect.Verdict` renders itself) and ``apicsim check``'s summary.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, TextIO

from apicsim.scenario.expect import fault_name, fmt
from apicsim.scenario.format import Scenario, Step

if TYPE_CHECKING:
    from apicsim.scenario.runner import StepOutcome


def describe(step: Step) -> str:
    """A one-line rendering of a step's action."""
    return step.op.describe()

def header(sc: Scenario, vcpus: int, out: TextIO, backend: str = "model") -> None:
    guest = ""
    if sc.guest is not None:
        guest = f", guest {sc.guest.driver}" + (f" on {sc.guest.base}" if sc.guest.base else "")
    out.write(f"== {sc.name}  ({sc.path})\n")
    desc = textwrap.fill(
        " ".join(sc.description.split()), width=100, initial_indent="   ", subsequent_indent="   "
    )
    out.write(desc + "\n")
    out.write(
        f"   rules: {', '.join(sc.rules)}; backends: {', '.join(sc.backends)}; "
        f"vm: {vcpus} vCPUs, profile {sc.vm.profile.name}{guest}; running on {backend}\n"
    )
    out.write(f"   {'step':>4} {'line':>4}  {'action':<46} {'result':<14} {'exits':>5}  changes\n")


def row(o: StepOutcome, out: TextIO) -> None:
    result = f"#{fault_name(o.fault)}" if o.fault is not None else fmt(o.result)
    changes = o.changes
    if len(changes) > 4:
        changes = [*changes[:3], f"... {len(changes) - 3} more vCPUs changed"]
    text = "; ".join(changes)
    mark = "  FAIL" if o.failures else ""
    exits = "-" if o.exits is None else str(o.exits)
    out.write(
        f"   {o.step.number:>4} {o.step.line:>4}  {o.step.op.describe():<46} {result:<14} "
        f"{exits:>5}  {text}{mark}\n"
    )

