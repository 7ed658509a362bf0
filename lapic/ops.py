"""``ApicOps``: the delivery vtable of one local APIC (where an accelerator plugs in).

Implements the seam bhyve calls ``struct vlapic_ops`` (``sys/amd64/vmm/io/vlapic.c``:
``vlapic_set_intr_ready`` sets the IRR bit itself only when no ``set_intr_ready`` hook is
installed; ``vlapic_pending_intr``/``vlapic_intr_accepted`` likewise) and KVM reaches through
``kvm_x86_ops`` (``__apic_accept_irq`` -> ``deliver_interrupt``, ``sync_pir_to_irr``,
``hwapic_isr_update``).  An APIC calls its ops at eight points:

* ``set_intr_ready(apic, vector, level_triggered) -> bool``: a fixed/lowest-priority interrupt
  was accepted.  The default sets TMR (PRIO-6) and IRR in the register page and answers True
  (notify the vCPU); APICv posts to a PIR instead, AVIC writes the backing page.  False: the
  accelerator notified the vCPU itself (no ``raise_event`` follows);
* ``pending_intr(apic) -> int``: the highest vector requested (-1: none).  The default reads
  IRR; an accelerator may first sync its PIR into IRR;
* ``intr_accepted(apic, vector)``: the acknowledge moves ``vector`` IRR -> ISR;
* ``eoi(apic) -> int``: clear the highest ISR bit and return it (-1: ISR was empty);
* ``send(apic, irq)``: an ICR or SELF IPI write sends ``irq`` (today's ``send_hook``; with no
  hook a lone APIC delivers to itself when it is a destination);
* ``raise_event(apic, event)``: something became pending: an interrupt became deliverable, or
  an NMI, SMI, INIT, SIPI or PV unhalt was accepted (today's ``notify_hook``: KVM's
  ``kvm_make_request(KVM_REQ_EVENT)`` + ``kvm_vcpu_kick``);
* ``map_changed(apic)``: anything destination matching depends on changed (``map_hook``);
* ``eoi_reported(apic, vector, level_triggered, suppressed)``: an EOI cleared ISR
  (``eoi_hook``: KVM ``kvm_ioapic_send_eoi``).

:class:`DefaultApicOps` is exactly the behaviour before the seam: it forwards the four last
operations to the APIC's hook attributes, so code that sets ``send_hook``/``notify_hook``/
``map_hook``/``eoi_hook`` keeps working.  ``LocalApic`` binds its ops once (constructor or
``LocalApic.bind_ops``): an operation the ops object does not override from
:class:`DefaultApicOps` runs inline (no call), any other is called through a bound method
cached at bind time, so the default hot path costs what it did before the seam.

Not modelled here: any accelerator (they live in ``hypervisor.accel``).
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, Protocol

from lapic import destination
from lapic.faults import ApicTypeError

if TYPE_CHECKING:
    from lapic.apic import LocalApic
    from lapic.icr import Interrupt


class ApicEvent(IntEnum):
    """What became pending (the argument of ``raise_event``)."""

    INTERRUPT = 0
    """An IRR vector was set or became deliverable (PPR dropped, state restored)."""
    NMI = 1
    SMI = 2
    INIT = 3
    SIPI = 4
    PV_UNHALT = 5

    def __repr__(self) -> str:
        return f"ApicEvent.{self.name}"


class ApicOps(Protocol):
    """The operations an APIC delegates (see the module documentation)."""

    def set_intr_ready(self, apic: LocalApic, vector: int, level_triggered: bool) -> bool: ...

    def pending_intr(self, apic: LocalApic) -> int: ...

    def intr_accepted(self, apic: LocalApic, vector: int) -> None: ...

    def eoi(self, apic: LocalApic) -> int: ...

    def send(self, apic: LocalApic, irq: Interrupt) -> None: ...

    def raise_event(self, apic: LocalApic, event: ApicEvent) -> None: ...

    def map_changed(self, apic: LocalApic) -> None: ...

    def eoi_reported(
        self, apic: LocalApic, vector: int, level_triggered: bool, suppressed: bool
    ) -> None: ...


OP_NAMES: tuple[str, ...] = (
    "set_intr_ready",
    "pending_intr",
    "intr_accepted",
    "eoi",
    "send",
    "raise_event",
    "map_changed",
    "eoi_reported",
)
"""Every operation of :class:`ApicOps`, in the order of the module documentation."""


class DefaultApicOps:
    """Today's behaviour: the register page holds IRR/ISR/TMR; the hooks hear the rest.

    Subclass it and override only what an accelerator changes; ``LocalApic`` runs the
    operations you did not override inline.  Stateless: :data:`DEFAULT_OPS` is shared.
    """

    __slots__ = ()

    def set_intr_ready(self, apic: LocalApic, vector: int, level_triggered: bool) -> bool:
        bit = ((vector >> 5) << 7) | (vector & 31)  # lapic.vectors.bit_index
        apic._tmr_bits[bit] = 1 if level_triggered else 0  # PRIO-6
        apic._irr_bits[bit] = 1
        return True

    def pending_intr(self, apic: LocalApic) -> int:
        return apic._irr.highest()

    def intr_accepted(self, apic: LocalApic, vector: int) -> None:
        apic._irr.discard(vector)
        apic._isr.add(vector)

    def eoi(self, apic: LocalApic) -> int:
        isr = apic._isr
        v = isr.highest()
        if v >= 0:
            isr.discard(v)
        return v

    def send(self, apic: LocalApic, irq: Interrupt) -> None:
        hook = apic.send_hook
        if hook is not None:
            hook(apic, irq)
        elif destination.matches(irq, apic, apic, is_ipi=True, profile=apic.profile):
            apic.accept_interrupt(irq)

    def raise_event(self, apic: LocalApic, event: ApicEvent) -> None:
        hook = apic.notify_hook
        if hook is not None:
            hook(apic)

    def map_changed(self, apic: LocalApic) -> None:
        hook = apic.map_hook
        if hook is not None:
            hook(apic)

    def eoi_reported(
        self, apic: LocalApic, vector: int, level_triggered: bool, suppressed: bool
    ) -> None:
        hook = apic.eoi_hook
        if hook is not None:
            hook(apic, vector, level_triggered, suppressed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


DEFAULT_OPS = DefaultApicOps()
"""The ops every ``LocalApic`` starts with."""


def overridden(ops: object) -> dict[str, object]:
    """``{name: bound method}`` for each operation ``ops`` implements differently from
    :class:`DefaultApicOps` (every operation, for an ops object that does not subclass it).
    Raises :class:`~lapic.faults.ApicTypeError` if an operation is missing."""
    out: dict[str, object] = {}
    for name in OP_NAMES:
        method = getattr(ops, name, None)
        if not callable(method):
            raise ApicTypeError(f"ops must implement ApicOps; {type(ops).__name__}.{name} missing")
        if getattr(type(ops), name, None) is not getattr(DefaultApicOps, name):
            out[name] = method
    return out


__all__ = ["DEFAULT_OPS", "OP_NAMES", "ApicEvent", "ApicOps", "DefaultApicOps", "overridden"]
