"""``Host``: the physical machine one or more VMs run on.

A host has ``pcpus`` physical CPUs (created on first use, so a large host costs nothing until
its pCPUs are touched), one virtual clock shared by every APIC timer of every VM on it
(``lapic.timer.Clock``), the vCPU whose guest code is executing (``running``: what KVM's
``kvm_get_running_vcpu()`` returns on the CPU the simulation is "on"; ``executing`` is its
pCPU), the step scheduler (``steps``) and counters that are always on (:class:`HostStats`).

Host APIC ids (KVM ``kvm_cpu_get_apicid``, the target of AVIC doorbells and of the PID's NDST)
come from a documented, overridable mapping: by default host APIC id = pCPU id; pass
``apic_ids=`` a sequence (``apic_ids[i]`` for pCPU ``i``) or a callable ``f(i)``.

Not modelled: host scheduling policy (the simulation's caller chooses which vCPU runs where),
NUMA, CPU hotplug, the host's own interrupts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hypervisor.host.pcpu import Pcpu, Runnable
from hypervisor.host.steps import Steps
from lapic.faults import ApicTypeError, ApicValueError, check_int
from lapic.timer import Clock

MAX_PCPUS = (1 << 20) + 1
"""Largest host: pCPU ids 0..2**20 (what ``Vcpu.enter(pcpu)`` has always accepted)."""


class HostStats:
    """Always-on counters of one host (every VM on it)."""

    __slots__ = ("doorbells", "kicks", "wakeups")

    def __init__(self) -> None:
        self.kicks = 0
        """``kvm_vcpu_kick`` calls that found their target running in guest mode elsewhere."""
        self.doorbells = 0
        """AVIC doorbells / posted-interrupt notifications rung (none under trap-and-emulate)."""
        self.wakeups = 0
        """Blocked vCPUs made runnable (``kvm_vcpu_wake_up`` that found a waiter)."""

    @property
    def host_ipis(self) -> int:
        """Host IPIs sent between pCPUs by the scheduler: the reschedule IPI of each kick
        (kept as one count, as nothing else sends one; doorbells and posted-interrupt
        notifications are counted as ``doorbells``)."""
        return self.kicks

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.doorbells, self.host_ipis, self.kicks, self.wakeups)

    def set_tuple(self, values: tuple[int, int, int, int]) -> None:
        self.doorbells, _, self.kicks, self.wakeups = values

    def __repr__(self) -> str:
        return (
            f"HostStats(doorbells={self.doorbells}, host_ipis={self.host_ipis}, "
            f"kicks={self.kicks}, wakeups={self.wakeups})"
        )


ApicIdMap = Sequence[int] | Callable[[int], int] | None


class Host:
    """``Host(pcpus=4)``: a machine with pCPUs 0..3, host APIC id = pCPU id."""

    def __init__(
        self, pcpus: int = 1, *, apic_ids: ApicIdMap = None, clock: Clock | None = None
    ) -> None:
        self.size = check_int("pcpus", pcpus, 1, MAX_PCPUS)
        if apic_ids is not None and not callable(apic_ids):
            if isinstance(apic_ids, (str, bytes)) or not isinstance(apic_ids, Sequence):
                raise ApicTypeError(
                    f"apic_ids must be a sequence or a callable, not {type(apic_ids).__name__}"
                )
            if len(apic_ids) != pcpus:
                raise ApicValueError(
                    f"apic_ids must give one id per pCPU: {len(apic_ids)} for {pcpus} pCPUs"
                )
            for i, a in enumerate(apic_ids):
                check_int(f"apic_ids[{i}]", a, 0, 0xFFFFFFFF)
            self._apic_ids: tuple[int, ...] | None = tuple(apic_ids)
            self._apic_id_fn: Callable[[int], int] | None = None
        else:
            self._apic_ids = None
            self._apic_id_fn = apic_ids
        if clock is not None and not isinstance(clock, Clock):
            raise ApicTypeError(f"clock must be a Clock, not {type(clock).__name__}")
        self.clock = clock if clock is not None else Clock()
        self.stats = HostStats()
        self.steps = Steps()
        self.running: Runnable | None = None
        """The vCPU whose guest code is executing (set by each guest access)."""
        self._pcpus: dict[int, Pcpu] = {}

    def apic_id_of(self, pcpu_id: int) -> int:
        """Host APIC id of pCPU ``pcpu_id`` under this host's mapping."""
        if self._apic_ids is not None:
            return self._apic_ids[pcpu_id]
        if self._apic_id_fn is not None:
            return int(check_int("apic_ids(pcpu)", self._apic_id_fn(pcpu_id), 0, 0xFFFFFFFF))
        return pcpu_id

    def pcpu(self, pcpu_id: int) -> Pcpu:
        """pCPU ``pcpu_id`` (0 <= id < ``size``), created on first use."""
        p = self._pcpus.get(pcpu_id)
        if p is None:
            check_int("pcpu", pcpu_id, 0, self.size - 1)
            p = self._pcpus[pcpu_id] = Pcpu(pcpu_id, self.apic_id_of(pcpu_id))
        return p

    @property
    def pcpus(self) -> tuple[Pcpu, ...]:
        """The pCPUs used so far, by id."""
        return tuple(self._pcpus[i] for i in sorted(self._pcpus))

    def pcpu_by_apic_id(self, apic_id: int) -> Pcpu | None:
        """The pCPU with host APIC id ``apic_id`` among those used so far (doorbell target)."""
        for p in self._pcpus.values():
            if p.apic_id == apic_id:
                return p
        return None

    @property
    def executing(self) -> Pcpu | None:
        """The pCPU whose guest code is executing (the ``running`` vCPU's)."""
        v = self.running
        return None if v is None else v.last_pcpu

    def advance(self, ns: int) -> None:
        """Advance the shared clock (every VM then polls its own timers)."""
        self.clock.advance(ns)

    def __repr__(self) -> str:
        return f"<Host pcpus={self.size} used={len(self._pcpus)} {self.clock!r} {self.stats!r}>"
