"""Tracing as data: typed events named after KVM's tracepoints, and always-on counters.

Events are off by default.  Every emitting site is written ``if tracer.on: tracer.emit(...)``,
so a disabled tracer costs one attribute test and no allocation.  Events are NamedTuples whose
names and fields follow ``arch/x86/kvm/trace.h``:

=====================  ===============================================================
``KvmExit``            ``kvm_exit``: vCPU, exit reason, qualification
``KvmApicIpi``         ``kvm_apic_ipi``: ICR low dword, destination id
``KvmApicAcceptIrq``   ``kvm_apic_accept_irq``: target vCPU, delivery mode (register bits
                       10:8 in place, 0x000..0x700, as KVM records it), trigger (1 = level),
                       vector, and whether it was accepted (KVM traces before deciding; the
                       model records the outcome too)
``KvmEoi``             ``kvm_eoi``: vCPU, vector
``KvmHypercall``       ``kvm_hypercall``: nr, a0..a3
``KvmMsiSetIrq``       ``kvm_msi_set_irq``: address, data
``KvmApicWrite``       ``kvm_apic``: an emulated APIC register write (offset, value): xAPIC
                       MMIO and x2APIC WRMSR alike (``kvm_lapic_reg_write``)
``KvmMsr``             ``kvm_msr``: an emulated WRMSR of an APIC MSR, after it (``faulted``:
                       it injected #GP)
``KvmInjVirq``         ``kvm_inj_virq``: an interrupt injected at VM entry (after its ack)
``KvmInjNmi``          ``kvm_inj_nmi``: an NMI injected at VM entry
``KvmPvSendIpi``       no tracepoint in KVM: one per ``kvm_pv_send_ipi`` call with its result
``KvmAvicIncompleteIpi``  ``kvm_avic_incomplete_ipi``: ICRH, ICRL, cause, index (``idx``)
``KvmAvicUnacceleratedAccess``  ``kvm_avic_unaccelerated_access``: offset, trap, write, vector
``KvmAvicDoorbell``    ``kvm_avic_doorbell``: the vCPU (-1: rung by the CPU) and host APIC ID
``KvmAvicKickVcpuSlowpath``  ``kvm_avic_kick_vcpu_slowpath``: ICRH, ICRL, index (``idx``)
``KvmAvicGaLog``       ``kvm_avic_ga_log``: VM id, vCPU index
``AccelEvent``         an accelerator's own event (``kvm_avic_*``, ``kvm_pi_*`` style): name
                       and value, emitted by accelerators that complete accesses in hardware
=====================  ===============================================================

The register-level events (``kvm_apic``, ``kvm_msr``, ``kvm_inj_virq``, ``kvm_inj_nmi``) are
emitted only while ``tracer.detail`` is also true (``apicsim.Session`` sets it), so a trace of
the delivery events alone stays as it was. Each emitted event gets a sequence number (counting
from 0 for the VM, never reused, not reset by :meth:`Tracer.clear`) and the virtual time of the
host clock in nanoseconds (:class:`TraceRecord`, from :meth:`Tracer.records`).
:func:`format_event` prints an event as ``trace-cmd report`` does, with the fields decoded and
numbers in hex (``kvm_apic_ipi: dst 0x2 vec 0x41 (Fixed|physical|assert|edge|dst)``);
:meth:`Tracer.report` filters by vCPU, event name and vector; :meth:`Tracer.write` writes a text
file close to ``trace-cmd report`` (one line per event: task, CPU, timestamp, event, fields).

Not modelled: the host task names and pids of a real trace (the task column is ``CPU n/KVM``,
the CPU column the vCPU index), KVM's RIP fields (no instruction stream), tracepoints for
events the model does not simulate (page faults, ``kvm_entry``).

Counters (``Stats``) are plain integer attributes, always updated, except the exits: each vCPU
counts its own by reason (``Vcpu.exit_counts``, as KVM's ``kvm_vcpu_stat``), and the VM's
``exit_counts``, ``exits_by_reason`` and ``exits`` are their sums, made when read;
``Stats.snapshot()`` is a frozen copy and ``stats - earlier`` the counts since then
(:class:`StatsSnapshot`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from hypervisor.exits import EXIT_SLOTS, ExitReason, exits_by_reason
from lapic.faults import ApicTypeError, ApicValueError
from lapic.registers import REGISTER_BY_OFFSET


class KvmExit(NamedTuple):
    vcpu: int
    reason: ExitReason
    qualification: int


class KvmApicIpi(NamedTuple):
    vcpu: int
    icr_low: int
    dest_id: int


class KvmApicAcceptIrq(NamedTuple):
    vcpu: int
    delivery_mode: int
    trigger: int
    vector: int
    accepted: bool


class KvmEoi(NamedTuple):
    vcpu: int
    vector: int


class KvmHypercall(NamedTuple):
    vcpu: int
    nr: int
    a0: int
    a1: int
    a2: int
    a3: int


class KvmMsiSetIrq(NamedTuple):
    address: int
    data: int


class KvmApicWrite(NamedTuple):
    vcpu: int
    offset: int
    value: int


class KvmAvicIncompleteIpi(NamedTuple):
    vcpu: int
    icrh: int
    icrl: int
    cause: int
    idx: int


class KvmAvicUnacceleratedAccess(NamedTuple):
    vcpu: int
    offset: int
    trap: bool
    write: bool
    vector: int


class KvmApicvAcceptIrq(NamedTuple):
    """``kvm_apicv_accept_irq``: an interrupt KVM posts (APICv active)."""

    vcpu: int
    dm: int
    tm: int
    vec: int


class KvmAvicDoorbell(NamedTuple):
    vcpu: int
    apicid: int


class KvmAvicKickVcpuSlowpath(NamedTuple):
    icrh: int
    icrl: int
    idx: int


class KvmAvicGaLog(NamedTuple):
    vmid: int
    vcpuid: int
class KvmMsr(NamedTuple):
    vcpu: int
    msr: int
    data: int
    faulted: bool = False


class KvmInjVirq(NamedTuple):
    vcpu: int
    vector: int


class KvmInjNmi(NamedTuple):
    vcpu: int


class AccelEvent(NamedTuple):
    vcpu: int
    name: str
    value: int


class KvmPvSendIpi(NamedTuple):
    vcpu: int
    bitmap_low: int
    bitmap_high: int
    min_id: int
    icr: int
    result: int


Event = (
    KvmExit
    | KvmApicIpi
    | KvmApicAcceptIrq
    | KvmEoi
    | KvmHypercall
    | KvmMsiSetIrq
    | KvmApicWrite
    | KvmMsr
    | KvmInjVirq
    | KvmInjNmi
    | KvmPvSendIpi
    | KvmAvicIncompleteIpi
    | KvmAvicUnacceleratedAccess
    | KvmAvicDoorbell
    | KvmAvicKickVcpuSlowpath
    | KvmAvicGaLog
    | KvmApicvAcceptIrq
    | AccelEvent
)

EVENT_NAMES: dict[type, str] = {
    KvmExit: "kvm_exit",
    KvmApicIpi: "kvm_apic_ipi",
    KvmApicAcceptIrq: "kvm_apic_accept_irq",
    KvmEoi: "kvm_eoi",
    KvmHypercall: "kvm_hypercall",
    KvmMsiSetIrq: "kvm_msi_set_irq",
    KvmApicWrite: "kvm_apic",
    KvmMsr: "kvm_msr",
    KvmInjVirq: "kvm_inj_virq",
    KvmInjNmi: "kvm_inj_nmi",
    KvmPvSendIpi: "kvm_pv_send_ipi",
    AccelEvent: "kvm_accel",
    KvmAvicIncompleteIpi: "kvm_avic_incomplete_ipi",
    KvmAvicUnacceleratedAccess: "kvm_avic_unaccelerated_access",
    KvmAvicDoorbell: "kvm_avic_doorbell",
    KvmAvicKickVcpuSlowpath: "kvm_avic_kick_vcpu_slowpath",
    KvmAvicGaLog: "kvm_avic_ga_log",
    KvmApicvAcceptIrq: "kvm_apicv_accept_irq",
}
"""The tracepoint name of each event type (what ``trace-cmd report`` prints)."""

DELIVERY_MODES = ("Fixed", "LowPrio", "SMI", "Res3", "NMI", "INIT", "SIPI", "ExtINT")
"""KVM's ``kvm_deliver_mode`` names, by ICR bits 10:8."""
_SHORTHANDS = ("dst", "self", "all", "all-but-self")


def decode_icr_low(icr_low: int) -> str:
    """``Fixed|physical|assert|edge|dst``: the ICR fields as ``kvm_apic_ipi`` prints them."""
    return "|".join(
        (
            DELIVERY_MODES[(icr_low >> 8) & 7],
            "logical" if icr_low & (1 << 11) else "physical",
            "assert" if icr_low & (1 << 14) else "de-assert",
            "level" if icr_low & (1 << 15) else "edge",
            _SHORTHANDS[(icr_low >> 18) & 3],
        )
    )


def _reg_name(offset: int) -> str:
    reg = REGISTER_BY_OFFSET.get(offset & ~0xF)
    return f"APIC_{reg.name}" if reg is not None else f"{offset:#x}"


def format_event(event: Event) -> str:
    """The event as ``trace-cmd report`` prints its tracepoint (``name: fields``), in hex."""
    name = EVENT_NAMES[type(event)]
    match event:
        case KvmExit(_, reason, qual):
            text = f"reason {reason.name} info {qual:#x}"
        case KvmApicIpi(_, low, dest):
            text = f"dst {dest:#x} vec {low & 0xFF:#04x} ({decode_icr_low(low)})"
        case KvmApicAcceptIrq(vcpu, dm, trig, vec, ok):
            text = (
                f"apicid {vcpu:#x} vec {vec:#04x} ({DELIVERY_MODES[(dm >> 8) & 7]}|"
                f"{'level' if trig else 'edge'}){'' if ok else ' (coalesced)'}"
            )
        case KvmEoi(vcpu, vec):
            text = f"apicid {vcpu:#x} vector {vec:#04x}"
        case KvmHypercall(_, nr, a0, a1, a2, a3):
            text = f"nr {nr:#x} a0 {a0:#x} a1 {a1:#x} a2 {a2:#x} a3 {a3:#x}"
        case KvmMsiSetIrq(addr, data):
            dest_mode = "logical" if addr & (1 << 2) else "physical"
            text = (
                f"dst {(addr >> 12) & 0xFF | (addr >> 32) << 8:#x} vec {data & 0xFF:#04x} "
                f"({DELIVERY_MODES[(data >> 8) & 7]}|{dest_mode}|"
                f"{'level' if data & (1 << 15) else 'edge'}"
                f"{'|rh' if addr & (1 << 3) else ''})"
            )
        case KvmApicWrite(_, offset, value):
            text = f"apic_write {_reg_name(offset)} = {value:#x}"
        case KvmMsr(_, msr, data, faulted):
            text = f"msr_write {msr:x} = {data:#x}{' (#GP)' if faulted else ''}"
        case KvmInjVirq(_, vec):
            text = f"irq {vec:#04x}"
        case KvmInjNmi(_):
            text = ""
        case KvmPvSendIpi(_, low, high, min_id, icr, result):
            text = (
                f"bitmap {high:#x}:{low:#x} min {min_id:#x} icr {icr:#x} "
                f"({decode_icr_low(icr)}) ret {result}"
            )
        case AccelEvent(_, what, value):
            text = f"{what} {value:#x}"
        case KvmAvicIncompleteIpi(_, icrh, icrl, cause, idx):
            text = f"icrh:icrl={icrh:#010x}:{icrl:08x}, id={cause}, index={idx}"
        case KvmAvicUnacceleratedAccess(_, offset, trap, write, vec):
            kind = f"{'trap' if trap else 'fault'} {'write' if write else 'read'}"
            text = f"offset {offset:#x} {kind} vec {vec:#x}"
        case KvmAvicDoorbell(vcpu, apicid):
            text = f"vcpu {vcpu} apicid {apicid:#x}"
        case KvmAvicKickVcpuSlowpath(icrh, icrl, idx):
            text = f"icrh:icrl={icrh:#010x}:{icrl:08x}, index={idx}"
        case KvmAvicGaLog(vmid, vcpuid):
            text = f"vmid={vmid}, vcpuid={vcpuid}"
        case KvmApicvAcceptIrq(vcpu, dm, tm, vec):
            text = (
                f"apicid {vcpu:#x} vec {vec:#04x} ({DELIVERY_MODES[dm & 7]}|"
                f"{'level' if tm else 'edge'})"
            )
        case _:  # pragma: no cover - every Event type is matched above
            raise ApicTypeError(f"event must be a trace event, not {type(event).__name__}")
    return f"{name}: {text}" if text else f"{name}:"


def event_vcpu(event: Event) -> int | None:
    """The vCPU (index for host events: None) an event belongs to."""
    if isinstance(event, KvmMsiSetIrq | KvmAvicKickVcpuSlowpath | KvmAvicGaLog):
        return None
    return int(event[0])


def event_vector(event: Event) -> int | None:
    """The interrupt vector an event is about, where it has one."""
    match event:
        case KvmApicIpi(_, low, _) | KvmPvSendIpi(_, _, _, _, low, _):
            return low & 0xFF
        case KvmApicAcceptIrq(_, _, _, vec, _) | KvmEoi(_, vec) | KvmInjVirq(_, vec):
            return vec
        case KvmApicvAcceptIrq(_, _, _, vec):
            return vec
        case KvmMsiSetIrq(_, data):
            return data & 0xFF
        case KvmInjNmi(_):
            return 2
    return None


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One emitted event with its sequence number and virtual time (ns)."""

    seq: int
    ns: int
    event: Event

    @property
    def name(self) -> str:
        return EVENT_NAMES[type(self.event)]

    def line(self, *, seq: bool = True) -> str:
        """One line in ``trace-cmd report`` layout (``seq``: the sequence number first)."""
        vcpu = event_vcpu(self.event)
        task = "qemu-system-x86" if vcpu is None else f"CPU {vcpu}/KVM"
        cpu = 0 if vcpu is None else vcpu
        stamp = f"{self.ns // 1_000_000_000}.{self.ns % 1_000_000_000:09d}"
        body = f"{task:>16} [{cpu:03d}] {stamp}: {format_event(self.event)}"
        return f"#{self.seq:<5d} {body}" if seq else body

    def __str__(self) -> str:
        return self.line()


class _Clock(Protocol):
    now: int


class Tracer:
    """Collects events while ``on``; ``events`` is a plain list a test can compare.

    ``stamps`` holds ``(sequence number, virtual ns)`` of each event, in step with
    ``events``; :meth:`records` pairs them."""

    __slots__ = ("clock", "detail", "events", "next_seq", "on", "stamps")

    def __init__(
        self, on: bool = False, clock: _Clock | None = None, *, detail: bool = False
    ) -> None:
        self.on = on
        self.detail = detail
        """Also emit the register-level events (``kvm_apic``, ``kvm_msr``, ``kvm_inj_*``)."""
        self.events: list[Event] = []
        self.stamps: list[tuple[int, int]] = []
        self.next_seq = 0
        self.clock = clock

    def emit(self, event: Event) -> None:
        self.events.append(event)
        clock = self.clock
        self.stamps.append((self.next_seq, 0 if clock is None else clock.now))
        self.next_seq += 1

    def clear(self) -> None:
        """Forget the events (sequence numbers keep counting)."""
        self.events.clear()
        self.stamps.clear()

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if type(e) is kind]

    def saved(self) -> tuple[int, tuple[tuple[int, int], ...]]:
        """The sequence counter and stamps (the events are saved separately)."""
        return self.next_seq, tuple(self.stamps)

    def load(self, events: Iterable[Event], saved: tuple[int, tuple[tuple[int, int], ...]]) -> None:
        """Make the trace equal to ``events`` with what :meth:`saved` returned."""
        self.events[:] = events
        self.next_seq, stamps = saved
        self.stamps[:] = stamps

    def records(
        self,
        *,
        vcpu: int | Iterable[int] | None = None,
        name: str | Iterable[str] | None = None,
        vector: int | Iterable[int] | None = None,
        since: int = 0,
    ) -> list[TraceRecord]:
        """The events with their stamps, oldest first, filtered: by vCPU index, by event name
        (``"kvm_apic_ipi"``; the prefix ``kvm_`` may be left out), by vector, and from the
        sequence number ``since`` on.  Each filter takes one value or several."""
        vcpus = _one_or_many("vcpu", vcpu, int)
        names = _one_or_many("name", name, str)
        if names is not None:
            names = {n if n.startswith("kvm_") else "kvm_" + n for n in names}
            unknown = names - set(EVENT_NAMES.values())
            if unknown:
                raise ApicValueError(
                    f"name={sorted(unknown)[0]!r} is not a trace event; "
                    f"known: {', '.join(sorted(EVENT_NAMES.values()))}"
                )
        vectors = _one_or_many("vector", vector, int)
        out = []
        for rec in self._all():
            ev = rec.event
            if rec.seq < since:
                continue
            if vcpus is not None and event_vcpu(ev) not in vcpus:
                continue
            if names is not None and EVENT_NAMES[type(ev)] not in names:
                continue
            if vectors is not None and event_vector(ev) not in vectors:
                continue
            out.append(rec)
        return out

    def _all(self) -> Iterator[TraceRecord]:
        stamps = self.stamps
        if len(stamps) != len(self.events):  # the list was changed by hand: number afresh
            stamps = [(i, 0) for i in range(len(self.events))]
        for (seq, ns), ev in zip(stamps, self.events, strict=True):
            yield TraceRecord(seq, ns, ev)

    def report(self, *, seq: bool = True, **filters: Any) -> str:
        """The (filtered, see :meth:`records`) trace as ``trace-cmd report`` text."""
        return "\n".join(r.line(seq=seq) for r in self.records(**filters))

    def write(self, path: str | Path, **filters: Any) -> int:
        """Write the trace as ``trace-cmd report`` text (no sequence numbers, so it diffs
        against a real report); returns the number of events written."""
        recs = self.records(**filters)
        lines = [r.line(seq=False) for r in recs]
        Path(path).write_text("".join(line + "\n" for line in lines))
        return len(recs)


def _one_or_many(what: str, value: object, kind: type) -> set[Any] | None:
    if value is None:
        return None
    if isinstance(value, kind):
        return {value}
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ApicTypeError(f"{what} must be a {kind.__name__} or several, not {value!r}")
    out = set(value)
    for v in out:
        if not isinstance(v, kind):
            raise ApicTypeError(f"{what} must be a {kind.__name__} or several, not {v!r}")
    return out


class HasExitCounts(Protocol):
    """What :class:`Stats` reads of a vCPU: its exits by reason (``Vcpu.exit_counts``)."""

    exit_counts: list[int]


_NOT_COUNTS = frozenset({"exits_by_reason", "notifications"})
"""The :class:`Stats` counters read as Counters, not plain counts."""
_ACCEL_COUNTS = frozenset({"doorbells", "posted", "notifications"})


class Stats:
    """Always-on counters of one VM."""

    NAMES = (
        "doorbells",
        "exits",
        "exits_by_reason",
        "fast_path",
        "hypercalls",
        "ipis",
        "irqs_accepted",
        "kicks",
        "msis",
        "notifications",
        "posted",
        "pv_ipi_calls",
        "slow_path",
        "wakeups",
    )
    """The counters, in the order ``as_dict``, ``snapshot`` and ``repr`` list them."""

    __slots__ = ("_vcpus", *(n for n in NAMES if n not in ("exits", "exits_by_reason")))
    """The counters kept per event (``exits`` and ``exits_by_reason`` are read from the
    vCPUs' counts)."""

    def __init__(self, vcpus: Sequence[HasExitCounts] = ()) -> None:
        self._vcpus = vcpus
        """The VM's vCPUs (its own list, so hotplugged vCPUs count too): KVM counts exits
        per vCPU and sums them for the VM (``kvm_vcpu_stat``), and so does this."""
        self.doorbells = 0
        """AVIC doorbells rung for this VM's vCPUs (by the CPU or by KVM)."""
        self.hypercalls = 0
        self.ipis = 0
        """Interrupt messages sent by vCPUs (ICR/SELF IPI writes and PV IPI hypercalls)."""
        self.msis = 0
        self.irqs_accepted = 0
        self.kicks = 0
        """Targets notified while running in guest mode on their pCPU (a host IPI)."""
        self.wakeups = 0
        """Halted targets made runnable by an accepted event."""
        self.fast_path = 0
        self.slow_path = 0
        self.pv_ipi_calls = 0
        self.posted = 0
        """APICv: PIR bits newly set (by KVM's sender, IPIv or a device)."""
        self.notifications: Counter[int] = Counter()
        """APICv: notification IPIs sent, by vector (posted-interrupt, wake-up)."""

    def clear(self) -> None:
        """Every counter back to 0, the vCPUs' exit counts included (what writing 0 to a KVM
        debugfs stat does: ``kvm_stat_data_clear`` clears the VM's and every vCPU's)."""
        vcpus = self._vcpus
        self.__init__(vcpus)  # type: ignore[misc]
        for v in vcpus:
            v.exit_counts[:] = [0] * len(EXIT_SLOTS)

    @property
    def exit_counts(self) -> list[int]:
        """The VM's exits by reason, at each reason's index in
        ``hypervisor.exits.EXIT_SLOTS``: the sums of its vCPUs' ``exit_counts`` (a new
        list at each read)."""
        counts = [0] * len(EXIT_SLOTS)
        for vcpu in self._vcpus:
            for i, n in enumerate(vcpu.exit_counts):
                counts[i] += n
        return counts

    @property
    def exits(self) -> int:
        """Every exit of every vCPU (read-only: the vCPUs count them)."""
        return sum(sum(v.exit_counts) for v in self._vcpus)

    @property
    def exits_by_reason(self) -> Counter[ExitReason]:
        """The exits by reason: a new Counter of the non-zero counts at each read (a copy:
        later exits do not change it, and changing it changes nothing)."""
        return exits_by_reason(self.exit_counts)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in self.NAMES}
        out["exits_by_reason"] = {r.name: n for r, n in sorted(self.exits_by_reason.items())}
        out["notifications"] = dict(sorted(self.notifications.items()))
        return out

    def snapshot(self) -> StatsSnapshot:
        """A frozen copy of the counters now (``stats - snap`` is what happened since)."""
        return StatsSnapshot(
            tuple(
                (n, int(getattr(self, n))) for n in self.NAMES if n not in _NOT_COUNTS
            ),
            tuple(sorted((r.name, n) for r, n in self.exits_by_reason.items() if n)),
        )

    def __sub__(self, other: object) -> StatsSnapshot:
        if not isinstance(other, Stats | StatsSnapshot):
            return NotImplemented
        return self.snapshot() - other

    def __repr__(self) -> str:
        """Every counter, except the accelerators' own (``doorbells``, ``posted``,
        ``notifications``) while they are 0: trap-and-emulate VMs print as they always did."""
        inner = ", ".join(
            f"{k}={v!r}" for k, v in self.as_dict().items() if k not in _ACCEL_COUNTS or v
        )
        return f"Stats({inner})"


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """The counters of a :class:`Stats` at one moment, or the difference of two moments
    (``later - earlier``).  Counters read as attributes (``delta.exits``,
    ``delta.exits_by_reason["MSR_WRITE"]``); printed with the non-zero counts only."""

    counts: tuple[tuple[str, int], ...]
    by_reason: tuple[tuple[str, int], ...]

    def __getattr__(self, name: str) -> Any:
        if name == "exits_by_reason":
            return dict(self.by_reason)
        for k, v in self.counts:
            if k == name:
                return v
        raise AttributeError(name)

    def __sub__(self, other: object) -> StatsSnapshot:
        if isinstance(other, Stats):
            other = other.snapshot()
        if not isinstance(other, StatsSnapshot):
            return NotImplemented
        theirs = dict(other.counts)
        reasons = dict(other.by_reason)
        mine = dict(self.by_reason)
        return StatsSnapshot(
            tuple((k, v - theirs.get(k, 0)) for k, v in self.counts),
            tuple(
                (r, mine.get(r, 0) - reasons.get(r, 0))
                for r in sorted(set(mine) | set(reasons))
                if mine.get(r, 0) != reasons.get(r, 0)
            ),
        )

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.counts)
        out["exits_by_reason"] = dict(self.by_reason)
        return out

    def __repr__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.counts if v]
        if self.by_reason:
            parts.append(
                "exits_by_reason={" + ", ".join(f"{r}: {n}" for r, n in self.by_reason) + "}"
            )
        return f"Stats({', '.join(parts)})"
