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
``KvmApicWrite``       ``kvm_apic``: register write (offset, value)
``KvmPvSendIpi``       no tracepoint in KVM: one per ``kvm_pv_send_ipi`` call with its result
``KvmAvicIncompleteIpi``  ``kvm_avic_incomplete_ipi``: ICRH, ICRL, cause, index (``idx``)
``KvmAvicUnacceleratedAccess``  ``kvm_avic_unaccelerated_access``: offset, trap, write, vector
``KvmAvicDoorbell``    ``kvm_avic_doorbell``: the vCPU (-1: rung by the CPU) and host APIC ID
``KvmAvicKickVcpuSlowpath``  ``kvm_avic_kick_vcpu_slowpath``: ICRH, ICRL, index (``idx``)
``KvmAvicGaLog``       ``kvm_avic_ga_log``: VM id, vCPU index
=====================  ===============================================================

Counters (``Stats``) are plain integer attributes, always updated.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from hypervisor.exits import ExitReason


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
    | KvmPvSendIpi
    | KvmAvicIncompleteIpi
    | KvmAvicUnacceleratedAccess
    | KvmAvicDoorbell
    | KvmAvicKickVcpuSlowpath
    | KvmAvicGaLog
)


class Tracer:
    """Collects events while ``on``; ``events`` is a plain list a test can compare."""

    __slots__ = ("events", "on")

    def __init__(self, on: bool = False) -> None:
        self.on = on
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def clear(self) -> None:
        self.events.clear()

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if type(e) is kind]


class Stats:
    """Always-on counters of one VM."""

    __slots__ = (
        "doorbells",
        "exits",
        "exits_by_reason",
        "fast_path",
        "hypercalls",
        "ipis",
        "irqs_accepted",
        "kicks",
        "msis",
        "pv_ipi_calls",
        "slow_path",
        "wakeups",
    )

    def __init__(self) -> None:
        self.doorbells = 0
        """AVIC doorbells rung for this VM's vCPUs (by the CPU or by KVM)."""
        self.exits = 0
        self.exits_by_reason: Counter[ExitReason] = Counter()
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

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in self.__slots__}
        out["exits_by_reason"] = {r.name: n for r, n in sorted(self.exits_by_reason.items())}
        return out

    def __repr__(self) -> str:
        """Every counter, except ``doorbells`` while it is 0 (only an accelerator with
        doorbells, AVIC, ever counts one; trap-and-emulate VMs print as they always did)."""
        inner = ", ".join(
            f"{k}={v!r}" for k, v in self.as_dict().items() if k != "doorbells" or v
        )
        return f"Stats({inner})"
