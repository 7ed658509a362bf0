"""Priorities, interrupt acknowledge and EOI of one local APIC (a ``LocalApic`` mixin).

Implements (reference ``kvm_lapic.md`` §6; SDM Vol. 3 10.8.3.1 "Task and Processor Priorities",
10.8.4 "Interrupt Acceptance for Fixed Interrupts", 10.8.5 "Signaling Interrupt Servicing
Completion"; KVM ``__apic_update_ppr``, ``apic_has_interrupt_for_ppr``, ``kvm_get_apic_interrupt``,
``apic_set_eoi``): PPR from TPR and the highest in-service vector (PRIO-2), the deliverable
vector (PRIO-3), acknowledge IRR -> ISR (PRIO-4), EOI (PRIO-5) and its report, CR8, and the
P6-family APR.  IRR/ISR changes go through the APIC's ops (``pending_intr``,
``intr_accepted``, ``eoi``, ``eoi_reported`` of :mod:`lapic.ops`), inline when they are the
defaults.

Not modelled: KVM's ``highest_isr_cache`` beyond its one observable effect (STATE-4, in
``lapic.state``); PV EOI and Hyper-V auto-EOI.
"""

from __future__ import annotations

from lapic.core import ApicCore
from lapic.faults import check_int
from lapic.ops import ApicEvent
from lapic.registers import (
    APIC_BASE_EN,
    PRIORITY,
    REGISTER_BY_NAME,
    SVR_SUPPRESS_EOI_BROADCAST,
)

_U64_MAX = (1 << 64) - 1
_EV_INTERRUPT = ApicEvent.INTERRUPT
_TPR = REGISTER_BY_NAME["TPR"].offset >> 2
_PPR = REGISTER_BY_NAME["PPR"].offset >> 2
_SVR = REGISTER_BY_NAME["SVR"].offset >> 2
_CLASS = PRIORITY["klass"]
_CLASS_MASK = _CLASS.mask
"""Priority class bits 7:4 of TPR/PPR/ISRV (0xF0)."""
# PPR, acknowledge and EOI run on every interrupt: they use these values as literals.
assert (_TPR, _PPR, _CLASS_MASK) == (0x80 >> 2, 0xA0 >> 2, 0xF0)


class PriorityMixin(ApicCore):
    """PPR, acknowledge, EOI, CR8 and APR (see the module documentation)."""

    def _ppr_for(self, isrv: int) -> int:
        """PRIO-2: PPR from TPR and the highest in-service vector ``isrv`` (-1: none)."""
        tpr = int(self._w[0x80 >> 2])  # TPR; literals on this hot path, pinned below
        if isrv < 0:
            isrv = 0
        return tpr & 0xFF if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0

    def _update_ppr(self) -> int:
        """KVM ``__apic_update_ppr``; returns the new PPR."""
        ppr = self._ppr_for(self._isr.highest())
        self._w[0xA0 >> 2] = ppr  # PPR
        return ppr

    def _update_ppr_and_notify(self) -> None:
        old = int(self._w[_PPR])
        ppr = self._update_ppr()
        if ppr < old and self._deliverable(ppr) >= 0:
            self._raise_event(_EV_INTERRUPT)

    def _deliverable(self, ppr: int) -> int:
        """The highest requested vector if its class is above ``ppr`` (PRIO-3), else -1."""
        op = self._op_pending_intr
        v = self._irr.highest() if op is None else op(self)  # type: ignore[arg-type]
        if v < 0 or (v & 0xF0) <= ppr:  # priority class (_CLASS_MASK)
            return -1
        return v

    def pending_interrupt(self) -> int | None:
        """Highest IRR vector whose class is above PPR (PRIO-3), else None.  Only needs the
        APIC hardware-enabled: a software-disabled APIC still delivers what is pending."""
        if not self.apic_base & APIC_BASE_EN:
            return None
        v = self._deliverable(self._update_ppr())
        return None if v < 0 else v

    def ack(self) -> int | None:
        """Interrupt acknowledge (PRIO-4): the deliverable vector moves IRR -> ISR."""
        v = self.pending_interrupt()
        if v is None:
            return None
        op = self._op_intr_accepted
        if op is None:
            self._irr.discard(v)
            self._isr.add(v)
        else:
            op(self, v)  # type: ignore[arg-type]
        self._isr_cache = v
        self._update_ppr()
        return v

    def eoi(self) -> int | None:
        """EOI (PRIO-5): clear the highest ISR bit; report it (``ApicOps.eoi_reported``)."""
        op = self._op_eoi
        if op is None:
            v = self._isr.highest()
            if v < 0:
                return None
            self._isr.discard(v)
        else:
            v = op(self)  # type: ignore[arg-type]
            if v < 0:
                return None
        self._isr_cache = -1
        self._update_ppr_and_notify()
        report = self._op_eoi_reported
        if report is not None or self.eoi_hook is not None:
            level = v in self._tmr
            suppressed = level and self._eoi_broadcast_suppressed()
            if report is None:
                self.eoi_hook(self, v, level, suppressed)  # type: ignore[arg-type,misc]
            else:
                report(self, v, level, suppressed)  # type: ignore[arg-type]
        return v

    def _eoi_broadcast_suppressed(self) -> bool:
        """Whether a level-triggered EOI stays off the IOAPIC: SVR bit 12 (Suppress EOI
        Broadcast), honoured only where the profile says so (DEOI-1, DEOI-2; the fix of BUG-26)."""
        return self.profile.honor_suppress_eoi_broadcast and bool(
            self._w[_SVR] & SVR_SUPPRESS_EOI_BROADCAST
        )

    def set_cr8(self, cr8: int) -> None:
        """MOV to CR8 (REG-TPR-1), and KVM's ``kvm_lapic_set_tpr``: TPR = (cr8 & 0xF) << 4,
        so TPR bits 3:0 become 0 (KVMB-10)."""
        check_int("cr8", cr8, 0, _U64_MAX)
        self._w[_TPR] = _CLASS.place(cr8 & 0xF)
        self._update_ppr_and_notify()

    def get_cr8(self) -> int:
        return _CLASS.get(int(self._w[_TPR]))

    def _apr(self) -> int:
        """SDM 10.6.2.4 (P6 family) arbitration priority.  The SDM's figure writes the else
        branch as ``max(TPR[7:4] AND ISRV[7:4], IRRV[7:4])``; the model reads it as the
        highest of the three priority classes (a bitwise AND of two classes has no meaning
        as a priority), the reading the surrounding text describes."""
        tpr = int(self._w[_TPR])
        irrv = max(self._irr.highest(), 0)
        isrv = max(self._isr.highest(), 0)
        if tpr >> 4 >= irrv >> 4 and tpr >> 4 > isrv >> 4:
            return tpr
        return max(tpr >> 4, isrv >> 4, irrv >> 4) << 4


REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        # BUG-26: before the Suppress-EOI-Broadcast fix every level EOI was broadcast.
        "PriorityMixin._eoi_broadcast_suppressed",
        # FID-1: the model's old behaviour, a CR8 write that kept TPR bits 3:0 (KVMB-10).
        "PriorityMixin.set_cr8",
    }
)
"""What ``apicsim.replays`` may swap in this module (``specs/replays.md``)."""
