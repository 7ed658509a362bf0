"""``Session``: step through a VM's interrupt state, forward and back, seeing what changed.

A session holds a ``hypervisor.Vm`` (and the ``guest.Guest`` booted on it, if any), a list of
steps (operations of :mod:`apicsim.ops`, e.g. a scenario's actions) and one snapshot per step
taken (``vm.snapshot()`` plus the guest's handled-vector lists), so time travel is exact:

* :meth:`Session.step` performs the next step(s), :meth:`Session.do` performs any operation
  now (dropping the steps that were undone), :meth:`Session.until` steps until a condition
  holds (:func:`irr_has` builds the common one);
* :meth:`Session.back` restores the state before the last step(s), :meth:`Session.forward`
  restores a state stepped back from (or steps on);
* every move prints what changed (:meth:`Session.changes`: register names, decoded fields,
  vectors in hex) and the trace events it emitted, trace-cmd style;
* :meth:`Session.table`, :meth:`Session.trace` and :meth:`Session.diff` print the per-vCPU
  table, the (filtered) trace and the difference between any two positions.

``Session(vm)`` works at any Python prompt; ``Session.from_scenario(path)`` loads a scenario
file (``specs/scenarios/README.md``) with its steps; ``apicsim shell`` (:mod:`apicsim.shell`)
opens one interactively.  Tracing is switched on for the session's VM.

Not modelled: the scenario's expectations are not checked here (``apicsim run`` does that);
guest state beyond the handled-vector lists (the guest's driver choice and APIC-ID tables do
not change after boot); queued host steps (a snapshot refuses while a protocol is half run).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from apicsim.ops import Hypercall, Op, Restore, SetLapic
from apicsim.scenario import load
from apicsim.scenario.backends import ModelBackend, open_backend
from guest import Guest
from hypervisor import Vm
from hypervisor.snapshot import VmSnapshot
from hypervisor.views import errno_text
from lapic.faults import ApicTypeError, ApicValueError, GuestFault
from lapic.state import StateError
from lapic.vectors import SPAN_BYTES, FrozenVectorSet, VectorSet

Condition = Callable[[Vm], bool]

_QUIET_DIFF = ("vm trace:", "vm exit_log:", "vm stats.", "host stats:", "vm map_dirty:")
"""Snapshot-diff lines the session shows another way (the trace events, the stats delta)."""


def irr_has(vcpu: int, vector: int) -> Condition:
    """A condition for :meth:`Session.until`: vCPU ``vcpu`` (index) has ``vector`` in IRR."""
    def holds(vm: Vm) -> bool:
        return vector in vm.lapic(vcpu).irr

    holds.__qualname__ = f"irr_has({vcpu}, {vector:#x})"
    return holds


class State:
    """One point in time: the VM snapshot and the guest's per-CPU handled/PV-error lists."""

    __slots__ = ("guest", "vm")

    def __init__(self, vm: VmSnapshot, guest: tuple[tuple[tuple[int, ...], ...], ...]) -> None:
        self.vm = vm
        self.guest = guest


class Session:
    """A VM, its steps and a snapshot per step taken (see the module docstring)."""

    def __init__(
        self,
        vm: Vm,
        guest: Guest | None = None,
        steps: Sequence[Op] = (),
        *,
        out: TextIO | None = None,
        name: str = "",
    ) -> None:
        if not isinstance(vm, Vm):
            raise ApicTypeError(f"vm must be a hypervisor.Vm, not {type(vm).__name__}")
        if guest is not None and not isinstance(guest, Guest):
            raise ApicTypeError(f"guest must be a guest.Guest, not {type(guest).__name__}")
        for op in steps:
            if not isinstance(op, Op):
                raise ApicTypeError(f"steps must be apicsim.ops operations, not {op!r}")
        self.vm = vm
        self.guest = guest
        self.steps: list[Op] = list(steps)
        self.name = name
        self._out = out
        self.backend = ModelBackend(vm, guest)
        vm.tracer.on = True
        vm.tracer.detail = True
        self.history: list[State] = [self._capture()]
        """``history[i]``: the state after ``i`` steps (``history[0]``: the start)."""
        self.results: list[Any] = []
        self.position = 0
        """Steps taken (the index into :attr:`history` of the current state)."""

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_scenario(cls, path: str | Path, *, out: TextIO | None = None) -> Session:
        """The scenario's VM (and guest), set up as its ``[vm]``/``[guest]`` say, with its
        steps to take."""
        sc = load(path)
        backend = open_backend(sc, "model")
        assert isinstance(backend, ModelBackend)
        return cls(
            backend.model, backend.guest, [s.op for s in sc.steps], out=out, name=sc.name
        )

    @classmethod
    def default(cls, *, out: TextIO | None = None) -> Session:
        """An empty session: 4 vCPUs, KVM defaults, a Linux guest on ``x2apic_phys``."""
        vm = Vm(vcpus=4)
        return cls(vm, Guest(vm, driver="x2apic_phys"), out=out, name="default")

    # -- state -------------------------------------------------------------------------------
    @property
    def out(self) -> TextIO:
        return self._out if self._out is not None else sys.stdout

    def _capture(self) -> State:
        g = self.guest
        guest = () if g is None else tuple((tuple(c.handled), tuple(c.pv_errors)) for c in g.cpus)
        return State(self.vm.snapshot(), guest)

    def _load(self, state: State) -> None:
        self.vm.restore(state.vm)
        if self.guest is not None:
            for c, (handled, errors) in zip(self.guest.cpus, state.guest, strict=True):
                c.handled[:] = handled
                c.pv_errors[:] = errors

    def changes(self, a: int | None = None, b: int | None = None) -> list[str]:
        """What changed from position ``a`` to ``b`` (default: the last move), readable."""
        b = self.position if b is None else self._index("b", b)
        a = max(b - 1, 0) if a is None else self._index("a", a)
        old, new = self.history[a], self.history[b]
        lines = []
        for ln in old.vm.diff(new.vm):
            if ln.startswith(_QUIET_DIFF) or _VECTOR_WORD.match(ln):
                continue
            if ln.startswith("vm map:"):
                ln = "vm map: rebuilt"
            elif _COUNT_LINE.match(ln):  # counts and indexes in decimal
                ln = _HEX.sub(lambda m: str(int(m.group(0), 16)), ln)
            lines.append(ln)
        for x, y in zip(old.vm.vcpus, new.vm.vcpus, strict=False):
            for name, base in (("IRR", 0x200), ("ISR", 0x100), ("TMR", 0x180)):
                was, now = _vector_set(x.apic.page, base), _vector_set(y.apic.page, base)
                if was != now:
                    lines.append(f"vcpu {x.index} {name}: {was!r} -> {now!r}")
        for i, (gx, gy) in enumerate(zip(old.guest, new.guest, strict=True)):
            if gx[0] != gy[0]:
                lines.append(f"guest cpu{i} handled: {_vecs(gx[0])} -> {_vecs(gy[0])}")
        return lines

    def _index(self, what: str, n: object) -> int:
        if type(n) is not int:
            raise ApicTypeError(f"{what} must be an int, not {type(n).__name__}")
        if not 0 <= n < len(self.history):
            raise ApicValueError(f"{what}={n} is not a position in 0..{len(self.history) - 1}")
        return n

    # -- moving ------------------------------------------------------------------------------
    def do(self, op: Op) -> Any:
        """Perform ``op`` now as the next step (the steps undone by :meth:`back` are
        replaced by it); prints what changed; returns its result."""
        if not isinstance(op, Op):
            raise ApicTypeError(f"op must be an apicsim.ops operation, not {type(op).__name__}")
        del self.history[self.position + 1 :]
        del self.results[self.position :]
        self.steps[self.position : self.position + 1] = [op]
        return self._perform(op)

    def _perform(self, op: Op) -> Any:
        seq = self.vm.tracer.next_seq
        stats = self.vm.stats.snapshot()
        try:
            result: Any = op.perform(self.backend)
        except GuestFault as e:
            result = e
        except StateError as e:  # KVM_SET_LAPIC refused the image (as ``apicsim run``)
            result = -e.errno
        except BaseException:
            self._load(self.history[self.position])  # a refused step leaves no trace
            raise
        self.results.append(result)
        self.history.append(self._capture())
        self.position += 1
        print(f"step {self.position}/{len(self.steps)}: {op.describe()}"
              + _result_text(op, result), file=self.out)
        delta = self.vm.stats - stats
        if any(v for _, v in delta.counts):
            print(f"  {delta!r}", file=self.out)
        for line in self.changes():
            print("  " + line, file=self.out)
        for rec in self.vm.tracer.records(since=seq):
            print("  " + rec.line(), file=self.out)
        return result

    def step(self, n: int = 1) -> None:
        """Take the next ``n`` steps (those undone by :meth:`back` are taken again from the
        saved states); each one's result is in :attr:`results`."""
        _check_count(n)
        for _ in range(n):
            if self.position + 1 < len(self.history):
                self.forward()
                continue
            if self.position >= len(self.steps):
                print(f"end of the steps ({len(self.steps)})", file=self.out)
                break
            self._perform(self.steps[self.position])

    def forward(self, n: int = 1) -> None:
        """Move ``n`` steps forward through states already taken (after :meth:`back`), or
        take new steps where there are none."""
        _check_count(n)
        target = min(self.position + n, len(self.history) - 1)
        if target == self.position:
            if self.position < len(self.steps):
                self.step(n)
            return
        old = self.position
        self._load(self.history[target])
        self.position = target
        self._report_move(old)

    def back(self, n: int = 1) -> None:
        """Restore the state before the last ``n`` steps (exact: ``vm.restore``)."""
        _check_count(n)
        target = max(self.position - n, 0)
        old = self.position
        self._load(self.history[target])
        self.position = target
        self._report_move(old)

    def _report_move(self, old: int) -> None:
        print(f"at step {self.position}/{len(self.steps)} (was {old})", file=self.out)
        for line in self.changes(old, self.position):
            print("  " + line, file=self.out)

    def until(self, condition: Condition, limit: int = 10_000) -> bool:
        """Step until ``condition(vm)`` holds (checked before each step too); False if the
        steps ran out (or ``limit`` steps were taken) first."""
        if not callable(condition):
            raise ApicTypeError(f"condition must be callable, not {type(condition).__name__}")
        for _ in range(limit):
            if condition(self.vm):
                return True
            if self.position >= len(self.steps) and self.position + 1 >= len(self.history):
                print("end of the steps: the condition never held", file=self.out)
                return False
            self.step()
        return bool(condition(self.vm))

    # -- views -------------------------------------------------------------------------------
    def table(self) -> None:
        """Print the per-vCPU state table."""
        print(self.vm.table(), file=self.out)

    def trace(self, **filters: Any) -> None:
        """Print the trace (``vcpu=``, ``name=``, ``vector=``, ``since=`` filter it)."""
        print(self.vm.tracer.report(**filters), file=self.out)

    def diff(self, a: int | None = None, b: int | None = None) -> None:
        """Print what changed between positions ``a`` and ``b`` (default: the last step)."""
        for line in self.changes(a, b):
            print(line, file=self.out)

    def __repr__(self) -> str:
        return (
            f"<Session {self.name or 'vm'}: step {self.position}/{len(self.steps)}, "
            f"{len(self.vm)} vCPUs>"
        )


_COUNT_LINE = re.compile(r"(vcpu \d+ (exits|pcpu)|host (running|now)): ")
_HEX = re.compile(r"\b0x[0-9a-f]+\b")
_VECTOR_WORD = re.compile(r"vcpu \d+ (IRR|ISR|TMR)\d: ")


def _vector_set(page: bytes, base: int) -> FrozenVectorSet:
    return VectorSet.over(memoryview(page)[base : base + SPAN_BYTES]).frozen()


def _vecs(vs: Sequence[int]) -> str:
    return "[" + ", ".join(f"{v:#x}" for v in vs) + "]"


def _result_text(op: Op, result: Any) -> str:
    if result is None:
        return ""
    if isinstance(result, GuestFault):
        return f" -> fault #{result.vector} ({result})"
    if isinstance(op, Hypercall | SetLapic | Restore) and type(result) is int:
        return f" -> {errno_text(result)}"
    if isinstance(result, bool):
        return f" -> {result}"
    if isinstance(result, int):
        return f" -> {result:#x}"
    if isinstance(result, list):
        return " -> " + _vecs(result)
    return f" -> {result!r}"


def _check_count(n: object) -> None:
    if type(n) is not int:
        raise ApicTypeError(f"n must be an int, not {type(n).__name__}")
    if n < 1:
        raise ApicValueError(f"n={n} must be at least 1")
