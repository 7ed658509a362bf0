"""Destination matching as pure functions: does this message address this APIC?

Implements (reference ``kvm_lapic.md`` §9; KVM ``kvm_apic_match_dest``, ``kvm_apic_mda``,
``kvm_apic_match_physical_addr``, ``kvm_apic_match_logical_addr``; SDM 10.6.2, 10.12.9-10):

* the MDA rewrite of KVM's broadcast quirk for non-IPI messages (MATCH-1);
* shorthands (MATCH-2); broadcast (MATCH-3);
* physical destinations, including KVM's hotplug hack for IDs above 0xFF (MATCH-4);
* logical flat, logical cluster and x2APIC logical destinations (MATCH-5..7);
* the derived x2APIC LDR (MATCH-7).

The functions look at a target through :class:`Target` (a ``LocalApic`` satisfies it) and never
change anything.  Which APICs are *present* (hardware-enabled) is the caller's business: KVM
never offers a message to an APIC whose IA32_APIC_BASE.EN is clear.

Choice settled here (``sdm`` profile, ``xapic_matches_x2apic_id=False``): an xAPIC-mode target
compares only ``MDA & 0xFF`` (physical and logical), the behaviour KVM's comment reports for
real hardware (Knights Landing) and the reading that keeps 8-bit APICs 8-bit.
"""

from __future__ import annotations

from typing import Protocol

from lapic.icr import X2APIC_BROADCAST, XAPIC_BROADCAST, DestMode, Interrupt, Shorthand
from lapic.profile import Profile, reference_defaults
from lapic.registers import DFR_CLUSTER, DFR_FLAT


class Target(Protocol):
    """What matching needs to know about a candidate APIC."""

    @property
    def x2apic_mode(self) -> bool: ...

    @property
    def physical_id(self) -> int: ...

    @property
    def x2apic_id(self) -> int: ...

    @property
    def ldr(self) -> int: ...

    @property
    def dfr(self) -> int: ...


def x2apic_ldr(x2apic_id: int) -> int:
    """x2APIC logical ID from the x2APIC ID (MATCH-7): cluster in 31:16, one bit in 15:0.

    KVM ``kvm_apic_calc_x2apic_ldr`` computes in ``u32``: for an ID of 2**20 and above the
    cluster no longer fits in 16 bits and its high bits are lost, as they are here (the SDM's
    x2APIC IDs are 32 bits wide, but its LDR has only 16 cluster bits, SDM 10.12.10.2)."""
    return (((x2apic_id >> 4) << 16) | (1 << (x2apic_id & 0xF))) & 0xFFFFFFFF


def mda(dest: int, target_x2apic: bool, *, is_ipi: bool, broadcast_quirk: bool) -> int:
    """The message destination address a target compares (MATCH-1)."""
    if broadcast_quirk and not is_ipi and dest == XAPIC_BROADCAST and target_x2apic:
        return X2APIC_BROADCAST
    return dest


def is_broadcast(mda_value: int, target_x2apic: bool) -> bool:
    """MATCH-3: all ones in the target's own ID width."""
    return mda_value == (X2APIC_BROADCAST if target_x2apic else XAPIC_BROADCAST)


def match_physical(mda_value: int, target: Target, profile: Profile) -> bool:
    """MATCH-4."""
    x2 = target.x2apic_mode
    if not x2 and not profile.xapic_matches_x2apic_id:
        mda_value &= 0xFF
    if is_broadcast(mda_value, x2):
        return True
    if x2:
        return mda_value == target.x2apic_id
    if mda_value > 0xFF:
        return _hotplug_hack_matches(mda_value, target)
    return mda_value == target.physical_id


def _hotplug_hack_matches(mda_value: int, target: Target) -> bool:
    """MATCH-4, KVM's hotplug hack (5bd5db385b3e): an xAPIC-mode target answers an MDA above
    0xFF by its x2APIC ID (reached only under ``xapic_matches_x2apic_id``)."""
    return mda_value == target.x2apic_id


def match_logical(mda_value: int, target: Target, profile: Profile) -> bool:
    """MATCH-5/6."""
    x2 = target.x2apic_mode
    if not x2 and not profile.xapic_matches_x2apic_id:
        mda_value &= 0xFF
    if is_broadcast(mda_value, x2):
        return True
    ldr = target.ldr
    if x2:
        return (ldr >> 16) == (mda_value >> 16) and (ldr & mda_value & 0xFFFF) != 0
    lid = ldr >> 24
    dfr = target.dfr
    if dfr == DFR_FLAT:
        return (lid & mda_value) != 0
    if dfr == DFR_CLUSTER:
        if not profile.cluster15_addressable and (mda_value >> 4) == 0xF:
            return False
        return (lid >> 4) == (mda_value >> 4) and (lid & mda_value & 0xF) != 0
    return False


def match_dest(
    target: Target,
    source: object | None,
    shorthand: Shorthand,
    dest: int,
    dest_mode: DestMode,
    *,
    broadcast_quirk: bool,
    profile: Profile,
) -> bool:
    """KVM ``kvm_apic_match_dest`` (MATCH-1..7).  ``source`` is the sending APIC (None for an
    IOAPIC/MSI message); identity (``is``) decides SELF and ALL_EXCLUDING_SELF.  Shorthands
    ignore ``dest`` and ``dest_mode`` (MATCH-2); a shorthand value outside 0-3 matches nothing
    (the ``default:`` of KVM's switch).  Enum members and their plain int values are equal."""
    if shorthand == Shorthand.NONE:
        m = mda(dest, target.x2apic_mode, is_ipi=source is not None,
                broadcast_quirk=broadcast_quirk)
        if dest_mode == DestMode.PHYSICAL:
            return match_physical(m, target, profile)
        return match_logical(m, target, profile)
    if shorthand == Shorthand.SELF:
        return target is source
    if shorthand == Shorthand.ALL_INCLUDING_SELF:
        return True
    if shorthand == Shorthand.ALL_EXCLUDING_SELF:
        return target is not source
    return False


def matches(
    irq: Interrupt,
    target: Target,
    source: object | None,
    *,
    is_ipi: bool,
    profile: Profile,
    broadcast_quirk: bool | None = None,
) -> bool:
    """``match_dest`` for a decoded message; ``broadcast_quirk`` is MATCH-1 in force, None
    for the default of the profile's preset (``lapic.profile.REFERENCE_DEFAULTS``)."""
    quirk = reference_defaults(profile)[0] if broadcast_quirk is None else broadcast_quirk
    return match_dest(
        target,
        source if is_ipi else None,
        irq.shorthand,
        irq.dest,
        irq.dest_mode,
        broadcast_quirk=quirk,
        profile=profile,
    )


# What a bug replay (``apicsim/replays/``, specs/replays.md) may swap, and the fix behind each.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "mda",  # BUG-12 03d2249ea608/9ea369b032d8: the MDA rewrite of an IOAPIC/MSI 0xFF
        "_hotplug_hack_matches",  # BUG-11 5bd5db385b3e: match a wide MDA by the x2APIC ID
    }
)
