"""The non-vectored events pending at one local APIC, as one record.

Implements the APIC side of KVM's ``vcpu->arch.nmi_pending``/``nmi_queued``, ``smi_pending``,
``apic->pending_events`` (``KVM_APIC_INIT``, ``KVM_APIC_SIPI``), ``apic->sipi_vector`` and
``pv_unhalted`` (reference ``kvm_lapic.md`` §8): what an accepted NMI, SMI, INIT, STARTUP or
KVM PV-unhalt leaves for the vCPU to consume.  :class:`PendingEvents` is the mutable record a
``LocalApic`` owns (``apic.events``); :meth:`PendingEvents.frozen` gives an immutable, hashable
:class:`PendingEventsState` for snapshots.

Not modelled: how the vCPU consumes them (injection, SMM entry, the INIT/SIPI state machine):
that is the hypervisor's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PendingEventsState:
    """An immutable copy of :class:`PendingEvents` (field for field)."""

    nmi: int = 0
    smi: bool = False
    init: bool = False
    sipi: bool = False
    sipi_vector: int = 0
    pv_unhalted: bool = False

    def describe(self) -> list[str]:
        """The pending events as short words (``["NMI x2", "SIPI 0x9a"]``); [] when none."""
        return [
            word
            for word, on in (
                (f"NMI x{self.nmi}", self.nmi),
                ("SMI", self.smi),
                ("INIT", self.init),
                (f"SIPI {self.sipi_vector:#04x}", self.sipi),
                ("PV-unhalt", self.pv_unhalted),
            )
            if on
        ]


@dataclass(slots=True)
class PendingEvents:
    """NMIs pending (at most two, KVM ``process_nmi``), SMI, INIT, SIPI with its vector, and
    the KVM PV-unhalt flag of one APIC.  Mutable: the APIC sets, the vCPU consumes."""

    nmi: int = 0
    smi: bool = False
    init: bool = False
    sipi: bool = False
    sipi_vector: int = 0
    """The vector of the last STARTUP accepted (kept after the SIPI is consumed)."""
    pv_unhalted: bool = False

    def frozen(self) -> PendingEventsState:
        return PendingEventsState(
            self.nmi, self.smi, self.init, self.sipi, self.sipi_vector, self.pv_unhalted
        )

    def load(self, state: PendingEventsState) -> None:
        """Make this record equal to ``state``."""
        self.nmi = state.nmi
        self.smi = state.smi
        self.init = state.init
        self.sipi = state.sipi
        self.sipi_vector = state.sipi_vector
        self.pv_unhalted = state.pv_unhalted

    def __bool__(self) -> bool:
        """Whether any event is pending (``sipi_vector`` alone is not an event)."""
        return bool(self.nmi or self.smi or self.init or self.sipi or self.pv_unhalted)


__all__ = ["PendingEvents", "PendingEventsState"]
