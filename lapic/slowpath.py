"""The architectural delivery stage: offer one message to every APIC it addresses.

This is KVM's slow path ``__kvm_irq_delivery_to_apic`` (reference ``kvm_lapic.md`` §10.3,
SLOW-1..2; §11, LP-1..3), which is also what the SDM describes: every present APIC compares the
message's destination with its own IDs, and a lowest-priority message goes to exactly one of
the APICs that matched.  ``lapic.bus.ApicBus`` and the hypervisor's fallback both run this one
function; the hypervisor's optimized map is checked against it.

* SLOW-1: a physical message to 0xFF that is lowest priority (mode LOWEST or the MSI
  redirection hint) has its delivery mode rewritten to FIXED.  The hint is not cleared, so a
  hinted message is still arbitrated to one target (now accepted as FIXED, which leaves
  ``arb_prio`` alone) and a hinted message of any mode becomes FIXED; only an unhinted LOWEST
  message becomes a broadcast.  This is what KVM's code does.
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
from lapic.faults import ApicTypeError, ApicValueError
from lapic.icr import XAPIC_BROADCAST, DeliveryMode, DestMode, Interrupt
from lapic.profile import REFERENCE_DEFAULTS, LowestPriorityPolicy, Profile, reference_defaults
from lapic.registers import SVR_FOCUS_DISABLE

__all__ = [
    "REFERENCE_DEFAULTS",
    "apply_vector_hashing",
    "choose_lowest_priority",
    "deliver_slow",
    "reference_defaults",
]

AcceptFn = Callable[[LocalApic, Interrupt], bool]


def _accept(apic: LocalApic, irq: Interrupt) -> bool:
    return apic.accept_interrupt(irq)


def apply_vector_hashing(
    policy: LowestPriorityPolicy, vector_hashing: bool | None, profile_name: str
) -> LowestPriorityPolicy:
    """The lowest-priority policy in force: KVM's ``vector_hashing`` module parameter picks
    between VECTOR_HASHING and ARB_COUNTER; it has no meaning under LOWEST_TPR (SDM), where
    passing a bool is refused rather than ignored."""
    if vector_hashing is None:
        return policy
    if not isinstance(vector_hashing, bool):
        raise ApicTypeError(
            f"vector_hashing must be a bool or None, not {type(vector_hashing).__name__}"
        )
    if policy is LowestPriorityPolicy.LOWEST_TPR:
        raise ApicValueError(
            f"vector_hashing={vector_hashing} has no meaning under profile {profile_name!r} "
            "(lowest_priority=LOWEST_TPR); set lowest_priority instead"
        )
    if vector_hashing:
        return LowestPriorityPolicy.VECTOR_HASHING
    return LowestPriorityPolicy.ARB_COUNTER


def choose_lowest_priority(
    candidates: Sequence[LocalApic], vector: int, policy: LowestPriorityPolicy
) -> LocalApic:
    """Pick the one target of a lowest-priority message among ``candidates`` (non-empty, in
    index order)."""
    if policy is LowestPriorityPolicy.VECTOR_HASHING:
        # KVM kvm_vector_to_index: the (vector % n)-th candidate in index order (LP-2).
        return candidates[vector % len(candidates)]
    if policy is LowestPriorityPolicy.ARB_COUNTER:
        # KVM kvm_apic_compare_prio: smallest apic_arb_prio; min() keeps the first of ties.
        return min(candidates, key=lambda a: a.arb_prio)
    # SDM 10.6.2.4: the focus processor (vector already in IRR or ISR, focus checking on),
    # else the lowest TPR[7:4]; ties to the lowest index (the model's choice).
    for apic in candidates:
        focus_checking = not apic.svr & SVR_FOCUS_DISABLE
        if focus_checking and (vector in apic.irr or vector in apic.isr):
            return apic
    return min(candidates, key=lambda a: a.tpr & 0xF0)


def deliver_slow(
    apics: Sequence[LocalApic],
    irq: Interrupt,
    source: LocalApic | None,
    *,
    profile: Profile,
    broadcast_quirk: bool,
    policy: LowestPriorityPolicy,
    accept: AcceptFn = _accept,
) -> int:
    """Deliver ``irq`` (from ``source``, None for an MSI/IOAPIC message) to ``apics``."""
    # SLOW-1: only the delivery mode changes; a redirection hint keeps it lowest priority.
    if irq.dest_mode is DestMode.PHYSICAL and irq.dest == XAPIC_BROADCAST and irq.lowest_priority:
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
            r = max(r, 0) + accept(apic, irq)
        elif apic.sw_enabled:
            candidates.append(apic)
    if candidates:
        r = int(accept(choose_lowest_priority(candidates, irq.vector, policy), irq))
    return r
