"""The architectural delivery stage: offer one message to every APIC it addresses.

This is KVM's slow path ``__kvm_irq_delivery_to_apic`` (reference ``kvm_lapic.md`` §10.3,
SLOW-1..2; §11, LP-1..3), which is also what the SDM describes: every present APIC compares the
message's destination with its own IDs, and a lowest-priority message goes to exactly one of
the APICs that matched.  ``lapic.bus.ApicBus`` and the hypervisor's fallback both run this one
function; the hypervisor's optimized map is checked against it.

* SLOW-1: a physical message to 0xFF whose delivery mode is LOWEST is rewritten to FIXED (the
  MSI redirection hint, if set, keeps it lowest-priority, as in KVM).
* SLOW-2: APICs are visited in index order; only hardware-enabled ones are considered.  For a
  non-lowest-priority message the result starts at -1 and becomes the number of APICs that
  accepted once any APIC matched.
* Lowest priority: candidates are the matching *software-enabled* APICs; one is chosen by
  :func:`choose_lowest_priority` and only it is offered the message (result: its answer).

``accept`` is the acceptance stage (default ``LocalApic.accept_interrupt``); the hypervisor
passes its own to count and trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lapic.apic import LocalApic
from lapic.destination import match_dest
from lapic.icr import DeliveryMode, DestMode, Interrupt
from lapic.profile import LowestPriorityPolicy, Profile
from lapic.registers import SVR_FOCUS_DISABLE

AcceptFn = Callable[[LocalApic, Interrupt], bool]


def _accept(apic: LocalApic, irq: Interrupt) -> bool:
    return apic.accept_interrupt(irq)


def choose_lowest_priority(
    candidates: Sequence[LocalApic],
    irq: Interrupt,
    *,
    profile: Profile,
    vector_hashing: bool,
) -> LocalApic:
    """Pick the one target of a lowest-priority message among ``candidates`` (non-empty)."""
    if profile.lowest_priority is LowestPriorityPolicy.LOWEST_TPR:
        # SDM 10.6.2.4: the focus processor (already has the vector pending or in service),
        # else the lowest priority class; the tie-break (lowest index) is the model's choice.
        for apic in candidates:
            focus_checking = not apic.svr & SVR_FOCUS_DISABLE
            if focus_checking and (irq.vector in apic.irr or irq.vector in apic.isr):
                return apic
        return min(candidates, key=lambda a: a.tpr & 0xF0)
    if vector_hashing:
        # KVM kvm_vector_to_index: the (vector % n)-th candidate in index order (LP-2).
        return candidates[irq.vector % len(candidates)]
    # KVM without vector hashing: smallest apic_arb_prio, ties to the first (LP-3).
    lowest = candidates[0]
    for apic in candidates[1:]:
        if apic.arb_prio < lowest.arb_prio:
            lowest = apic
    return lowest


def deliver_slow(
    apics: Sequence[LocalApic],
    irq: Interrupt,
    source: LocalApic | None,
    *,
    profile: Profile,
    broadcast_quirk: bool,
    vector_hashing: bool,
    accept: AcceptFn = _accept,
) -> int:
    """Deliver ``irq`` (from ``source``, None for an MSI/IOAPIC message) to ``apics``."""
    if (
        irq.dest_mode is DestMode.PHYSICAL
        and irq.dest == 0xFF
        and irq.delivery_mode is DeliveryMode.LOWEST
    ):
        irq = irq._replace(delivery_mode=DeliveryMode.FIXED)
    lowest_priority = irq.lowest_priority
    shorthand, dest, dest_mode = irq.shorthand, irq.dest, irq.dest_mode
    r = -1
    candidates: list[LocalApic] = []
    for apic in apics:
        if not apic.hw_enabled:
            continue
        if not match_dest(
            apic, source, shorthand, dest, dest_mode,
            broadcast_quirk=broadcast_quirk, profile=profile,
        ):
            continue
        if not lowest_priority:
            if r < 0:
                r = 0
            r += accept(apic, irq)
        elif apic.sw_enabled:
            candidates.append(apic)
    if candidates:
        chosen = choose_lowest_priority(
            candidates, irq, profile=profile, vector_hashing=vector_hashing
        )
        r = int(accept(chosen, irq))
    return r
