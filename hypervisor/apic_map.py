"""KVM's optimized APIC map (``struct kvm_apic_map``), rebuilt when an ID, LDR, DFR or enable
bit changes.

Implements ``kvm_recalculate_apic_map``, ``kvm_recalculate_phys_map``,
``kvm_recalculate_logical_map`` and ``kvm_apic_map_get_logical_dest`` (reference
``kvm_lapic.md`` §10.1, MAP-1..4; commits 5b84b0291702, 2bf934aadcac, 2970052481b9,
6ea567ca003a, 35366901017c, 4364b287982b):

* MAP-1: ``max_apic_id`` = max(255, every present vCPU's x2APIC ID); ``phys_map`` has
  ``max_apic_id + 1`` slots.  Present = IA32_APIC_BASE.EN.
* MAP-2 (``x2apic_format`` off): a physical ID already taken makes the whole map ``None``.
* MAP-3 (``x2apic_format`` on): x2APIC-mode vCPUs and vCPUs with an x2APIC ID > 0xFF are
  mapped by x2APIC ID (overwriting); xAPIC-mode vCPUs also at their xAPIC ID if still free.
* MAP-4: the logical mode (SW_DISABLED, XAPIC_CLUSTER, XAPIC_FLAT, X2APIC, MAP_DISABLED) and
  the flat[8] / cluster[16][4] tables; x2APIC logical lookups reuse ``phys_map``.

The map is derived data: it owns no state of its own and is rebuilt from the vCPUs' APICs,
never edited in place.  Also computed: the APICv inhibit reasons KVM derives from it (§10.4),
which the APICv/AVIC accelerators consult.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

from lapic.apic import LocalApic
from lapic.destination import x2apic_ldr
from lapic.registers import DFR_FLAT


class LogicalMode(IntEnum):
    """KVM ``enum kvm_apic_logical_mode``."""

    SW_DISABLED = 0
    XAPIC_CLUSTER = 1
    XAPIC_FLAT = 2
    X2APIC = 3
    MAP_DISABLED = 4

    def __repr__(self) -> str:
        return f"LogicalMode.{self.name}"


Slots = list[LocalApic | None]


class ApicMap:
    """One built map.  ``phys_map[id]`` is the APIC with physical ID ``id`` or None."""

    __slots__ = ("cluster", "flat", "logical_mode", "max_apic_id", "phys_map")

    def __init__(self, max_apic_id: int) -> None:
        self.max_apic_id = max_apic_id
        self.phys_map: Slots = [None] * (max_apic_id + 1)
        self.logical_mode = LogicalMode.SW_DISABLED
        self.flat: Slots = [None] * 8
        self.cluster: list[Slots] = [[None] * 4 for _ in range(16)]

    def logical_dest(self, dest: int) -> tuple[Slots, int, int] | None:
        """KVM ``kvm_apic_map_get_logical_dest``: ``(slots, first, mask)`` where bit ``i`` of
        ``mask`` stands for ``slots[first + i]``; None when the map cannot answer."""
        mode = self.logical_mode
        if mode == LogicalMode.XAPIC_FLAT:
            return self.flat, 0, dest & 0xFF
        if mode == LogicalMode.XAPIC_CLUSTER:
            return self.cluster[(dest >> 4) & 0xF], 0, dest & 0xF
        if mode == LogicalMode.X2APIC:
            offset = (dest >> 16) * 16
            if offset + 15 > self.max_apic_id:
                return self._x2apic_cluster_past_map(dest, offset)
            return self.phys_map, offset, dest & 0xFFFF
        if mode == LogicalMode.SW_DISABLED:
            return self.flat, 0, 0
        return None

    def _x2apic_cluster_past_map(self, dest: int, offset: int) -> tuple[Slots, int, int]:
        """FAST-6, the CVE-2013-6376 fix: an x2APIC cluster (``dest`` bits 31:16, first ID
        ``offset``) that does not fit in ``phys_map`` is bounded by ``max_apic_id``: a cluster
        past the end matches nothing, one that straddles it keeps only the IDs inside."""
        if offset > self.max_apic_id:
            return self.phys_map, 0, 0
        size = min(self.max_apic_id - offset + 1, 16)
        return self.phys_map, offset, dest & (0xFFFF >> (16 - size))

    def __repr__(self) -> str:
        used = {i: a.vcpu_id for i, a in enumerate(self.phys_map) if a is not None}
        return (
            f"<ApicMap max_apic_id={self.max_apic_id} logical={self.logical_mode!r} "
            f"phys={used}>"
        )


class Inhibits(IntEnum):
    """APICv inhibit reasons (``APICV_INHIBIT_REASON_*``).  The first three are recomputed with
    every map; APIC_BASE_MODIFIED is set by an APIC_BASE write and never cleared (``Vm``)."""

    PHYSICAL_ID_ALIASED = 1
    LOGICAL_ID_ALIASED = 2
    APIC_ID_MODIFIED = 4
    APIC_BASE_MODIFIED = 8


def build(apics: Sequence[LocalApic], *, x2apic_format: bool) -> tuple[ApicMap | None, int]:
    """Build the map for ``apics`` in vCPU-index order; returns ``(map or None, inhibits)``
    with the inhibits KVM derives while building it."""
    present = [a for a in apics if a.hw_enabled]
    max_id = 255
    for a in present:
        if a.vcpu_id > max_id:
            max_id = a.vcpu_id
    new: ApicMap | None = ApicMap(max_id)
    inhibits = 0
    for a in present:
        assert new is not None
        # kvm_recalculate_phys_map checks for a modified xAPIC ID before the alias check and
        # the loop stops at the first alias: later vCPUs are never looked at.
        if not a.x2apic_mode and a.physical_id != (a.vcpu_id & 0xFF):
            inhibits |= Inhibits.APIC_ID_MODIFIED
        if not _add_physical(new, a, x2apic_format):
            new = None
            break
        _add_logical(new, a)
    if new is None:
        inhibits |= Inhibits.PHYSICAL_ID_ALIASED | Inhibits.LOGICAL_ID_ALIASED
    elif new.logical_mode == LogicalMode.MAP_DISABLED:
        inhibits |= Inhibits.LOGICAL_ID_ALIASED
    return new, inhibits


def _add_physical(new: ApicMap, apic: LocalApic, x2apic_format: bool) -> bool:
    x2apic_id = apic.vcpu_id
    x2 = apic.x2apic_mode
    phys = new.phys_map
    if x2apic_format:
        if x2 or _hotplug_hack_maps(x2apic_id):
            phys[x2apic_id] = apic
        if not x2:
            xapic_id = apic.physical_id
            if phys[xapic_id] is None:
                phys[xapic_id] = apic
        return True
    physical_id = x2apic_id if x2 else apic.physical_id
    if _physical_id_aliased(phys, physical_id):
        return False
    phys[physical_id] = apic
    return True


def _add_logical(new: ApicMap, apic: LocalApic) -> None:
    if new.logical_mode == LogicalMode.MAP_DISABLED or not apic.sw_enabled:
        return
    ldr = apic.ldr
    if not ldr:
        return
    if apic.x2apic_mode:
        mode = LogicalMode.X2APIC
    else:
        ldr >>= 24
        mode = LogicalMode.XAPIC_FLAT if apic.dfr == DFR_FLAT else LogicalMode.XAPIC_CLUSTER
    if new.logical_mode == LogicalMode.SW_DISABLED:
        new.logical_mode = mode
    elif new.logical_mode != mode:
        new.logical_mode = LogicalMode.MAP_DISABLED
        return
    if mode == LogicalMode.X2APIC:
        return
    found = new.logical_dest(ldr)
    assert found is not None
    slots, _, mask = found
    if not mask:
        return
    index = (mask & -mask).bit_length() - 1
    if _logical_id_covers_several_mdas(mask) or _logical_id_aliased(slots, index):
        new.logical_mode = LogicalMode.MAP_DISABLED
    else:
        slots[index] = apic  # cluster[ffs(mask) - 1] = apic


# The checks KVM's map fixes added, one predicate each (the replays of specs/replays.md swap
# exactly these, see REPLAY_SEAMS below).
def _hotplug_hack_maps(x2apic_id: int) -> bool:
    """MAP-3, KVM's hotplug hack (5bd5db385b3e): with 32-bit IDs an xAPIC-mode vCPU whose
    x2APIC ID is above 0xFF is also mapped at that ID."""
    return x2apic_id > 0xFF


def _physical_id_aliased(phys: Slots, physical_id: int) -> bool:
    """MAP-2 (5b84b0291702): the physical ID is already mapped, so the map is dropped."""
    return phys[physical_id] is not None


def _logical_id_covers_several_mdas(mask: int) -> bool:
    """MAP-4 (2bf934aadcac): a logical ID with more than one bit set covers several MDAs, so
    the logical map is disabled."""
    return bool(mask & (mask - 1))


def _logical_id_aliased(slots: Slots, index: int) -> bool:
    """MAP-4 (2970052481b9): the logical slot is already taken by another vCPU, so the
    logical map is disabled."""
    return slots[index] is not None


__all__ = ["ApicMap", "Inhibits", "LogicalMode", "build", "x2apic_ldr"]


# What a bug replay (``apicsim/replays/``, specs/replays.md) may swap, and the fix behind each.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "build",  # BUG-16 4364b287982b: the map sized and filled in one consistent pass
        "ApicMap._x2apic_cluster_past_map",  # BUG-8 CVE-2013-6376: the x2APIC cluster bound
        "_hotplug_hack_maps",  # BUG-11 5bd5db385b3e: map a wide xAPIC-mode vCPU by x2APIC ID
        "_physical_id_aliased",  # BUG-15 5b84b0291702: an aliased physical ID drops the map
        "_logical_id_aliased",  # BUG-13 2970052481b9: an aliased logical ID disables it
        "_logical_id_covers_several_mdas",  # BUG-14 2bf934aadcac: so does a multi-bit ID
    }
)
