"""The expectations of a scenario step, one class each, and the verdicts they give.

A step's ``expect`` table (``specs/scenarios/README.md``, "Expectations") becomes a tuple of
:class:`Expectation` objects in a fixed checking order: ``fault``, ``result``, ``value``,
``exits``, ``stats``, ``irr``/``isr``/``tmr``, ``handled``, ``regs``, and the APICv ones
``pid``, ``notifications``, ``intr_status`` (the model's ``vm.accel``).  After the step each one
looks at what was :class:`Observed` (the operation's result, the fault, the counters' deltas,
the APIC state as the host sees it) and emits one :class:`Verdict` per value compared: ``PASS``,
``FAIL`` (also a :class:`Failure`), or ``SKIP`` when the backend cannot observe it (the model's
counters on kvm) or it is meaningless after a fault.  Not here: parsing and validating the
table (:mod:`apicsim.scenario.format`), and reading the state from a backend
(:mod:`apicsim.scenario.backends`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from apicsim.ops import U32, U64, Hypercall, Op
from hypervisor.trace import Stats

STAT_NAMES = tuple(n for n in Stats.NAMES if n != "exits_by_reason")
EXPECT_KEYS = (
    "result",
    "fault",
    "value",
    "exits",
    "stats",
    "irr",
    "isr",
    "tmr",
    "handled",
    "regs",
    "pid",
    "notifications",
    "intr_status",
    "vcpu",
)
PID_FIELDS = ("pir", "on", "sn", "nv", "ndst")
"""The fields of a posted-interrupt descriptor an ``expect.pid`` table may name (PI-H1)."""

NO_RESULT: Any = object()
"""The result of an operation that has none (shown as ``-``)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One expectation that did not hold (or a step that raised)."""

    path: Path
    line: int
    step: int
    action: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: step {self.step} ({self.action}): {self.field}: " + (
            self.message
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """One expectation after a step: ``PASS``, ``FAIL`` or ``SKIP`` (not observable on the
    backend, or not meaningful after a fault), with what was expected and what was seen."""

    path: Path
    line: int
    step: int
    action: str
    field: str
    """``expect.irr``, ``expect.regs.PPR``, ``expect.stats.ipis``, ... or ``action``."""
    status: str
    detail: str
    vcpu: int | None = None
    vcpu_first: int | None = None
    """Set when the verdict stands for vCPUs ``vcpu_first`` to ``vcpu`` (same detail)."""

    def __str__(self) -> str:
        who = "" if self.vcpu is None else f" vCPU {self.vcpu}"
        if self.vcpu_first is not None:
            who = f" vCPUs {self.vcpu_first}-{self.vcpu}"
        return (
            f"{self.status} {self.path}:{self.line}: step {self.step} ({self.action}): "
            f"{self.field}{who}: {self.detail}"
        )


@dataclass(frozen=True, slots=True)
class ApicState:
    """One vCPU's APIC as the host sees it after a step."""

    irr: frozenset[int]
    isr: frozenset[int]
    tmr: frozenset[int]
    register: Callable[[str], int]
    """A register by mnemonic (``lapic.registers``, or ``APIC_BASE``)."""


@dataclass(frozen=True, slots=True)
class Observed:
    """What a step did, as the expectations compare it."""

    op: Op
    result: Any
    value: int | None
    fault: int | None
    fault_text: str
    exits: int | None
    """VM exits during the step; None where the backend does not count them."""
    delta: Mapping[str, int] | None
    """Changes of the counters during the step; None where not observable."""
    state: Callable[[int], ApicState]
    handled: Callable[[int], list[int] | None]
    unobservable: Mapping[str, str]
    """Why ``exits``, ``stats``, ``handled``, ``accel`` cannot be observed on this backend."""
    accel: Any = None
    """The model's ``vm.accel`` (None where the backend has none): PIDs, RVI/SVI."""
    notified: Sequence[tuple[int, int]] | None = None
    """The notification IPIs (host APIC ID, vector) sent during the step, in order (None where
    not observable: no ``notification_log``)."""


class Emit(Protocol):
    """Records one verdict: ``ok`` None = SKIP; ``message`` is the failure's text."""

    def __call__(
        self, key: str, ok: bool | None, detail: str, message: str = "", vcpu: int | None = None
    ) -> None: ...


class Expectation(Protocol):
    """One ``expect`` key of a step."""

    def check(self, seen: Observed, emit: Emit) -> None: ...


def compared(want: str, got: str) -> str:
    return f"expected {want}, got {got}"


def fault_name(vector: int) -> str:
    return {13: "GP", 6: "UD"}.get(vector, str(vector))


def fmt(value: Any) -> str:
    """A result or value as the step table and the verdicts show it."""
    if value is NO_RESULT or value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return vlist(value)
    if isinstance(value, int):
        if value >= 1 << 63:
            return str(value - (1 << 64))
        if -10 < value < 10 or value < 0:
            return str(value)
        if value > U32:
            return f"{value:#018x}"
        return f"{value:#010x}" if value > 0xFFFF else f"{value:#x}"
    return repr(value)


def vlist(vectors: Iterable[int]) -> str:
    return "[" + ",".join(f"{v:#x}" for v in vectors) + "]"


def vset(vectors: Iterable[int]) -> str:
    return "{" + ",".join(f"{v:#x}" for v in sorted(vectors)) + "}"


# =============================================================================================
# One class per expectation
# =============================================================================================
@dataclass(frozen=True, slots=True)
class FaultExpected:
    """``fault``: the exception vector the guest access raised."""

    vector: int

    def check(self, seen: Observed, emit: Emit) -> None:
        want = f"#{fault_name(self.vector)}"
        if seen.fault is None:
            emit(
                "expect.fault",
                False,
                compared(want, "no fault"),
                f"no fault was raised, expected #{fault_name(self.vector)}",
            )
        elif seen.fault != self.vector:
            emit(
                "expect.fault",
                False,
                compared(want, f"#{fault_name(seen.fault)}"),
                f"raised {seen.fault_text}, expected vector {self.vector}",
            )
        else:
            emit("expect.fault", True, compared(want, want))


def _result_matches(op: Op, want: Any, got: Any) -> bool:
    if isinstance(want, bool | list):
        return bool(want == got)
    if not isinstance(got, int) or isinstance(got, bool):
        return False
    if want == got:
        return True
    if isinstance(op, Hypercall) and want < 0:
        mask = U64 if op.long_mode else U32
        return bool((want & mask) == got)
    return False


@dataclass(frozen=True, slots=True)
class ResultExpected:
    """``result``: the operation's result; a negative number also matches a hypercall's RAX
    holding its two's complement."""

    want: Any

    def check(self, seen: Observed, emit: Emit) -> None:
        if seen.fault is not None:
            emit("expect.result", None, f"expected {fmt(self.want)}; the access faulted")
            return
        got = seen.result
        emit(
            "expect.result",
            _result_matches(seen.op, self.want, got),
            compared(fmt(self.want), fmt(got)),
            f"got {fmt(got)}, expected {fmt(self.want)}",
        )


@dataclass(frozen=True, slots=True)
class ValueExpected:
    """``value``: the value read."""

    want: int

    def check(self, seen: Observed, emit: Emit) -> None:
        if seen.fault is not None:
            emit("expect.value", None, f"expected {fmt(self.want)}; the access faulted")
            return
        got = seen.value
        emit(
            "expect.value",
            got == self.want,
            compared(fmt(self.want), fmt(got)),
            f"read {fmt(got)}, expected {fmt(self.want)}",
        )


@dataclass(frozen=True, slots=True)
class ExitsExpected:
    """``exits``: VM exits during the step."""

    want: int

    def check(self, seen: Observed, emit: Emit) -> None:
        if seen.exits is None:
            emit("expect.exits", None, f"expected {self.want}; {seen.unobservable['exits']}")
            return
        emit(
            "expect.exits",
            seen.exits == self.want,
            compared(str(self.want), str(seen.exits)),
            f"{seen.exits} VM exits during the step, expected {self.want}",
        )


@dataclass(frozen=True, slots=True)
class StatsExpected:
    """``stats``: changes of ``vm.stats`` counters (and exit reasons) during the step."""

    want: Mapping[str, int]

    def check(self, seen: Observed, emit: Emit) -> None:
        for name, want in self.want.items():
            key = f"expect.stats.{name}"
            if seen.delta is None:
                emit(key, None, f"expected +{want}; {seen.unobservable['stats']}")
                continue
            got = seen.delta[name]
            emit(
                key,
                got == want,
                compared(f"+{want}", f"+{got}"),
                f"changed by {got}, expected {want}",
            )


@dataclass(frozen=True, slots=True)
class VectorsExpected:
    """``irr``, ``isr`` or ``tmr``: the vectors in the register of each vCPU, as sets."""

    key: str
    want: Mapping[int, list[int]]

    def check(self, seen: Observed, emit: Emit) -> None:
        for i, want in sorted(self.want.items()):
            got_set = getattr(seen.state(i), self.key)
            got_text, want_text = vset(got_set), vset(want)
            emit(
                f"expect.{self.key}",
                set(got_set) == set(want),
                compared(want_text, got_text),
                f"vCPU {i} {self.key.upper()} is {got_text}, expected {want_text}",
                i,
            )


@dataclass(frozen=True, slots=True)
class HandledExpected:
    """``handled``: the vCPU's whole list of handled vectors so far, in order."""

    want: Mapping[int, list[int]]

    def check(self, seen: Observed, emit: Emit) -> None:
        for i, want in sorted(self.want.items()):
            got = seen.handled(i)
            if got is None:
                detail = f"expected {vlist(want)}; {seen.unobservable['handled']}"
                emit("expect.handled", None, detail, vcpu=i)
                continue
            emit(
                "expect.handled",
                got == list(want),
                compared(vlist(want), vlist(got)),
                f"vCPU {i} handled {vlist(got)}, expected {vlist(want)}",
                i,
            )


@dataclass(frozen=True, slots=True)
class RegsExpected:
    """``regs``: register values by mnemonic, as the host reads them."""

    want: Mapping[int, Mapping[str, int]]

    def check(self, seen: Observed, emit: Emit) -> None:
        for i, regs in sorted(self.want.items()):
            for name, want in regs.items():
                got = seen.state(i).register(name)
                emit(
                    f"expect.regs.{name}",
                    got == want,
                    compared(f"{want:#x}", f"{got:#x}"),
                    f"vCPU {i} {name} is {got:#x}, expected {want:#x}",
                    i,
                )


def _accel_missing(seen: Observed, what: str) -> str | None:
    """Why ``what`` of the accelerator cannot be read (None: it can)."""
    if seen.accel is None:
        return seen.unobservable.get("accel", "the backend has no accelerator state")
    if not hasattr(seen.accel, what):
        return f"accelerator {getattr(seen.accel, 'name', '?')!r} has no {what}"
    return None


def _pid_value(pid: Any, name: str) -> Any:
    value = getattr(pid, name)
    return frozenset(value) if name == "pir" else value


def _pid_text(name: str, value: Any) -> str:
    if name == "pir":
        return vset(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return f"{value:#x}"


@dataclass(frozen=True, slots=True)
class PidExpected:
    """``pid``: fields of each vCPU's posted-interrupt descriptor (``vm.accel.pid(i)``, PI-H1):
    ``pir`` (as a set), ``on``, ``sn``, ``nv``, ``ndst``."""

    want: Mapping[int, Mapping[str, Any]]

    def check(self, seen: Observed, emit: Emit) -> None:
        why = _accel_missing(seen, "pid")
        for i, fields_ in sorted(self.want.items()):
            for name, want in fields_.items():
                key = f"expect.pid.{name}"
                if why is not None:
                    emit(key, None, f"expected {want!r}; {why}", vcpu=i)
                    continue
                got = _pid_value(seen.accel.pid(i), name)
                wanted = frozenset(want) if name == "pir" else want
                emit(
                    key,
                    got == wanted,
                    compared(_pid_text(name, wanted), _pid_text(name, got)),
                    f"vCPU {i} PID.{name.upper()} is {_pid_text(name, got)}, expected "
                    f"{_pid_text(name, wanted)}",
                    i,
                )


def _pairs(pairs: Iterable[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"({a:#x}, {v:#x})" for a, v in pairs) + "]"


@dataclass(frozen=True, slots=True)
class NotificationsExpected:
    """``notifications``: the notification IPIs sent during the step, in order, each as
    ``[host APIC ID, vector]`` (``vm.accel.notification_log``)."""

    want: tuple[tuple[int, int], ...]

    def check(self, seen: Observed, emit: Emit) -> None:
        if seen.notified is None:
            why = _accel_missing(seen, "notification_log") or "no notification log"
            emit("expect.notifications", None, f"expected {_pairs(self.want)}; {why}")
            return
        got = tuple(seen.notified)
        emit(
            "expect.notifications",
            got == self.want,
            compared(_pairs(self.want), _pairs(got)),
            f"notifications sent {_pairs(got)}, expected {_pairs(self.want)}",
        )


@dataclass(frozen=True, slots=True)
class IntrStatusExpected:
    """``intr_status``: each vCPU's guest interrupt status ``[RVI, SVI]`` (VMCS
    GUEST_INTR_STATUS, ``vm.accel.guest_interrupt_status(i)``, VID-1)."""

    want: Mapping[int, list[int]]

    def check(self, seen: Observed, emit: Emit) -> None:
        why = _accel_missing(seen, "guest_interrupt_status")
        for i, want in sorted(self.want.items()):
            want_text = f"RVI={want[0]:#x} SVI={want[1]:#x}"
            if why is not None:
                emit("expect.intr_status", None, f"expected {want_text}; {why}", vcpu=i)
                continue
            rvi, svi = seen.accel.guest_interrupt_status(i)
            got_text = f"RVI={rvi:#x} SVI={svi:#x}"
            emit(
                "expect.intr_status",
                (rvi, svi) == tuple(want),
                compared(want_text, got_text),
                f"vCPU {i} {got_text}, expected {want_text}",
                i,
            )


def expectations(op: Op, expect: Mapping[str, Any]) -> tuple[Expectation, ...]:
    """The checks of a validated ``expect`` table, in checking order."""
    out: list[Expectation] = []
    if "fault" in expect:
        out.append(FaultExpected(expect["fault"]))
    if "result" in expect:
        out.append(ResultExpected(expect["result"]))
    if "value" in expect:
        out.append(ValueExpected(expect["value"]))
    if "exits" in expect:
        out.append(ExitsExpected(expect["exits"]))
    if "stats" in expect:
        out.append(StatsExpected(expect["stats"]))
    for key in ("irr", "isr", "tmr"):
        if key in expect:
            out.append(VectorsExpected(key, expect[key]))
    if "handled" in expect:
        out.append(HandledExpected(expect["handled"]))
    if "regs" in expect:
        out.append(RegsExpected(expect["regs"]))
    if "pid" in expect:
        out.append(PidExpected(expect["pid"]))
    if "notifications" in expect:
        pairs = tuple((int(a), int(v)) for a, v in expect["notifications"])
        out.append(NotificationsExpected(pairs))
    if "intr_status" in expect:
        out.append(IntrStatusExpected(expect["intr_status"]))
    return tuple(out)
