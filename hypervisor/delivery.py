"""KVM's interrupt delivery: the optimized-map fast path, then the slow path.

Implements ``kvm_irq_delivery_to_apic`` = ``__kvm_irq_delivery_to_apic_fast`` +
``kvm_apic_map_get_dest_lapic`` (reference ``kvm_lapic.md`` §10.2, FAST-1..9) falling back to
the slow path ``__kvm_irq_delivery_to_apic`` (§10.3, SLOW-1..2), with lowest-priority
arbitration (§11, LP-1..4).  The slow path itself is the architectural bus's
(``lapic.slowpath.deliver_slow``): one implementation serves both, so the property "fast path ==
slow path wherever KVM guarantees it" compares two different code paths, not one with itself.

Each stage is a small function:

* :func:`map_destinations` decides from the map alone (``kvm_apic_map_get_dest_lapic``):
  ``None`` = "the map cannot answer, use the slow path"; else the chosen APICs (possibly none);
* :func:`deliver` runs the stages and returns KVM's result: -1 when the slow path matched no
  APIC, else the number of APICs that accepted.

Divergences KVM accepts and this module reproduces (each pinned by a test): FAST-8 (fast path
returns 0 where the slow path would return -1), FAST-9 (without ``x2apic_format`` an xAPIC-mode
vCPU is unreachable by its x2APIC ID > 0xFF on the fast path), FAST-6/DIFF-D6 (logical
messages dropped while every APIC is software-disabled), MAP-3 (aliased xAPIC IDs reach the
lowest vCPU only under ``x2apic_format``).

Not modelled: ``rtc_status`` (the in-kernel RTC's EOI tracking) and posted-interrupt routing of
device MSIs (``kvm_intr_is_single_vcpu``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hypervisor.apic_map import ApicMap, LogicalMode
from lapic.apic import LocalApic
from lapic.icr import X2APIC_BROADCAST, XAPIC_BROADCAST, DestMode, Interrupt, Shorthand
from lapic.profile import LowestPriorityPolicy, Profile
from lapic.slowpath import deliver_slow

AcceptFn = Callable[[LocalApic, Interrupt], bool]


def map_destinations(
    irq: Interrupt,
    source: LocalApic | None,
    apic_map: ApicMap | None,
    broadcast_quirk: bool,
    vector_hashing: bool,
) -> list[LocalApic] | None:
    """KVM ``kvm_apic_map_get_dest_lapic``: the targets from the map, or None (slow path)."""
    shorthand = irq.shorthand
    if shorthand is Shorthand.SELF and source is not None:
        return [source]
    if shorthand is not Shorthand.NONE:
        return None
    if apic_map is None:
        return None
    dest = irq.dest
    # KVM kvm_apic_is_broadcast_dest (FAST-4): broadcasts go to the slow path.
    if broadcast_quirk:
        x2apic_ipi = source is not None and source.x2apic_mode
        if dest == (X2APIC_BROADCAST if x2apic_ipi else XAPIC_BROADCAST):
            return None
    elif dest == X2APIC_BROADCAST or (
        dest == XAPIC_BROADCAST and apic_map.logical_mode != LogicalMode.X2APIC
    ):
        return None
    if irq.dest_mode is DestMode.PHYSICAL:
        if dest > apic_map.max_apic_id:
            return []
        target = apic_map.phys_map[dest]
        return [] if target is None else [target]
    found = apic_map.logical_dest(dest)
    if found is None:
        return None
    slots, first, mask = found
    if not irq.lowest_priority:
        out = []
        while mask:
            low = mask & -mask
            apic = slots[first + low.bit_length() - 1]
            if apic is not None:
                out.append(apic)
            mask ^= low
        return out
    if not vector_hashing:
        lowest: LocalApic | None = None
        i = 0
        while mask >> i:
            if mask >> i & 1:
                apic = slots[first + i]
                if apic is not None and (lowest is None or apic.arb_prio < lowest.arb_prio):
                    lowest = apic
            i += 1
        return [] if lowest is None else [lowest]
    if not mask:
        return []
    index = nth_set_bit(mask, irq.vector % mask.bit_count())
    chosen = slots[first + index]
    return [] if chosen is None else [chosen]


def nth_set_bit(mask: int, n: int) -> int:
    """Position of the ``n``-th (0-based) set bit of ``mask`` (KVM ``find_nth_bit``)."""
    for _ in range(n):
        mask &= mask - 1
    return (mask & -mask).bit_length() - 1


def deliver(
    irq: Interrupt,
    source: LocalApic | None,
    apic_map: ApicMap | None,
    apics: Sequence[LocalApic],
    profile: Profile,
    broadcast_quirk: bool,
    policy: LowestPriorityPolicy,
    accept: AcceptFn,
    use_map: bool = True,
) -> tuple[int, bool]:
    """KVM ``kvm_irq_delivery_to_apic``: returns ``(result, fast_path_used)``.

    Arguments are positional on purpose: this runs once per interrupt."""
    if irq.shorthand is Shorthand.SELF:
        # __kvm_irq_delivery_to_apic_fast handles SELF before looking at the map.
        if source is None:
            return 0, True
        return int(accept(source, irq)), True
    if use_map:
        targets = map_destinations(
            irq, source, apic_map, broadcast_quirk, policy is LowestPriorityPolicy.VECTOR_HASHING
        )
        if targets is not None:
            r = 0
            for apic in targets:
                r += accept(apic, irq)
            return r, True
    r = deliver_slow(
        apics,
        irq,
        source,
        profile=profile,
        broadcast_quirk=broadcast_quirk,
        policy=policy,
        accept=accept,
    )
    return r, False


# What a bug replay (``apicsim/replays/``, specs/replays.md) may swap, and the fix behind each.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "deliver",  # BUG-28 "set meaningful return value": the fast path's result
    }
)
