"""Bug replays that patch the hypervisor layer (``hypervisor/``): the PV IPI hypercall
(BUG-2, 3, 4, 7), the optimized map (BUG-8, 11, 13, 14, 15, 16) and the fast path (BUG-28).

Each function installs one replay on a :class:`~apicsim.replays.patcher.Patcher`, swapping a
seam that ``hypervisor/*.py`` (and, for BUG-11, ``lapic/destination.py``) declares in
``REPLAY_SEAMS`` for a re-creation of KVM's code before the fix (reference ``kvm_lapic.md``
§17).  Where the fix was one added check, the seam is the small predicate the model split out
at that place, and the replay answers as the code did before the check existed.  Not here: the
catalogue (``apicsim.replays``) and the replays of the other layers (``lapic.py``,
``guest.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from weakref import WeakKeyDictionary

import hypervisor.apic_map as apic_map_mod
import hypervisor.delivery as delivery_mod
import hypervisor.pv_ipi as pv_ipi_mod
import lapic.destination as destination_mod
from hypervisor.apic_map import ApicMap, Inhibits, LogicalMode, Slots
from hypervisor.delivery import AcceptFn
from hypervisor.vm import Vm
from lapic.apic import LocalApic
from lapic.destination import Target
from lapic.icr import Interrupt, Shorthand
from lapic.profile import LowestPriorityPolicy, Profile

from .patcher import U32, Patcher, oob


# =============================================================================================
# PV IPI (BUG-2, BUG-3, BUG-4, BUG-7)
# =============================================================================================
def bug2(p: Patcher) -> None:
    """``__pv_send_ipi`` before bdf7ffc89922: ``int min`` and no bounds at all."""

    def _send_half(
        apic_map: ApicMap, bitmap: int, min_id: int, irq: Interrupt, accept: AcceptFn
    ) -> int:
        if min_id >= 1 << 31:  # the pre-fix prototype took a signed ``int min``
            min_id -= 1 << 32
        # No "min > max_apic_id" bail-out and no min(BITS_PER_LONG, max - min + 1) bound:
        # every set bit of the unsigned long indexes phys_map[min + i].
        bitmap &= (1 << 64) - 1
        count = 0
        while bitmap:
            low = bitmap & -bitmap
            target = oob(apic_map.phys_map, min_id + low.bit_length() - 1)
            if target is not None:
                count += accept(target, irq)
            bitmap ^= low
        return count

    p.set(pv_ipi_mod, "_send_half", _send_half)

def bug3(p: Patcher) -> None:
    """``kvm_pv_send_ipi`` before the CVE-2018-19406 fix: no ``if (!map) return -EOPNOTSUPP``,
    so the walk dereferences the NULL map."""

    def _send_without_map(
        bitmap_low: int,
        bitmap_high: int,
        min_id: int,
        irq: Interrupt,
        op_64_bit: bool,
        accept: AcceptFn,
    ) -> int:
        the_map: ApicMap = None  # type: ignore[assignment]
        cluster = 64 if op_64_bit else 32
        min_id &= U32
        count = pv_ipi_mod._send_half(the_map, bitmap_low, min_id, irq, accept)
        min_id = (min_id + cluster) & U32
        count += pv_ipi_mod._send_half(the_map, bitmap_high, min_id, irq, accept)
        return count

    p.set(pv_ipi_mod, "_send_without_map", _send_without_map)


def bug4(p: Patcher) -> None:
    """The dispatcher with KVM_HC_SEND_IPI inside ``#ifdef CONFIG_X86_64``."""
    original = p.current(pv_ipi_mod, "emulate_hypercall")

    def emulate_hypercall(
        host: pv_ipi_mod.HypercallHost,
        source: int,
        nr: int,
        a0: int,
        a1: int,
        a2: int,
        a3: int,
        *,
        op_64_bit: bool,
        cpl: int,
    ) -> int:
        # The case was compiled only into 64-bit hosts; the model's stand-in for a 32-bit host
        # is a hypercall made outside 64-bit mode (op_64_bit == 0), which falls to -KVM_ENOSYS.
        if not op_64_bit and not cpl and nr & U32 == pv_ipi_mod.KVM_HC_SEND_IPI:
            return pv_ipi_mod.truncate_result(-pv_ipi_mod.KVM_ENOSYS, op_64_bit)
        result: int = original(host, source, nr, a0, a1, a2, a3, op_64_bit=op_64_bit, cpl=cpl)
        return result

    p.set(pv_ipi_mod, "emulate_hypercall", emulate_hypercall)

def bug7(p: Patcher) -> None:
    """``guest_pv_has`` did not exist: every PV hypercall is allowed whatever CPUID says."""

    def pv_feature(self: Vm, feature: int) -> bool:
        return True

    p.set(Vm, "pv_feature", pv_feature)

# =============================================================================================
# The optimized map and the fast path (BUG-8, 11, 13, 14, 15, 16, 28)
# =============================================================================================
def bug8(p: Patcher) -> None:
    """x2APIC logical lookup before the CVE-2013-6376 fix: the cluster is not bounded by
    ``max_apic_id`` and the mask is not clamped, so the guest-controlled cluster (dest bits
    31:16) indexes past the end of ``phys_map``."""

    def _x2apic_cluster_past_map(self: ApicMap, dest: int, offset: int) -> tuple[Slots, int, int]:
        return self.phys_map, offset, dest & 0xFFFF

    p.set(ApicMap, "_x2apic_cluster_past_map", _x2apic_cluster_past_map)


def bug11(p: Patcher) -> None:
    """Before 5bd5db385b3e: an xAPIC-mode vCPU is known only by its 8-bit xAPIC ID, both in
    the map (even with 32-bit IDs) and in ``kvm_apic_match_physical_addr``."""

    def _hotplug_hack_maps(x2apic_id: int) -> bool:
        return False  # only an x2APIC-mode vCPU is mapped by its x2APIC ID

    def _hotplug_hack_matches(mda_value: int, target: Target) -> bool:
        return mda_value == target.physical_id  # no "MDA > 0xFF: compare the x2APIC ID"

    p.set(apic_map_mod, "_hotplug_hack_maps", _hotplug_hack_maps)
    p.set(destination_mod, "_hotplug_hack_matches", _hotplug_hack_matches)


def bug13(p: Patcher) -> None:
    """Before 2970052481b9: a second vCPU with the same logical ID overwrites the slot."""

    def _logical_id_aliased(slots: Slots, index: int) -> bool:
        return False  # cluster[ffs(mask) - 1] = apic, whoever was there

    p.set(apic_map_mod, "_logical_id_aliased", _logical_id_aliased)


def bug14(p: Patcher) -> None:
    """Before 2bf934aadcac: an LDR with several bits is mapped at its lowest bit only."""

    def _logical_id_covers_several_mdas(mask: int) -> bool:
        return False  # only ffs(mask) is looked at

    p.set(apic_map_mod, "_logical_id_covers_several_mdas", _logical_id_covers_several_mdas)


def bug15(p: Patcher) -> None:
    """Before 5b84b0291702: aliased physical IDs do not disable the map; the last vCPU with
    the ID takes the slot, so only it receives."""

    def _physical_id_aliased(phys: Slots, physical_id: int) -> bool:
        return False  # new->phys_map[physical_id] = apic, whoever was there

    p.set(apic_map_mod, "_physical_id_aliased", _physical_id_aliased)


def bug16(p: Patcher) -> None:
    """Before 4364b287982b: the map is sized, then filled, and a vCPU that appeared (or enabled
    its APIC) in between is not in the size.  The race is made deterministic: the sizing pass
    sees the vCPUs present at the VM's previous recalculation (the VM is known by its first
    vCPU, ``apics[0]``).  Filling has no bounds check: without 32-bit IDs the write lands past
    ``phys_map`` (IndexError); with them the vCPU is skipped."""
    sized: WeakKeyDictionary[LocalApic, int] = WeakKeyDictionary()

    def build(apics: Sequence[LocalApic], *, x2apic_format: bool) -> tuple[ApicMap | None, int]:
        present = max([255, *(a.vcpu_id for a in apics if a.hw_enabled)])
        max_id = present
        if apics:
            max_id = sized.get(apics[0], present)
            sized[apics[0]] = present
        new: ApicMap | None = ApicMap(max_id)
        inhibits = 0
        for a in apics:
            if not a.hw_enabled:
                continue
            assert new is not None
            if not a.x2apic_mode and a.physical_id != (a.vcpu_id & 0xFF):
                inhibits |= Inhibits.APIC_ID_MODIFIED
            phys = new.phys_map
            x2apic_id = a.vcpu_id
            if x2apic_format:
                if (a.x2apic_mode or x2apic_id > 0xFF) and x2apic_id <= new.max_apic_id:
                    phys[x2apic_id] = a
                if not a.x2apic_mode and phys[a.physical_id] is None:
                    phys[a.physical_id] = a
            else:
                physical_id = x2apic_id if a.x2apic_mode else a.physical_id
                if oob(phys, physical_id) is not None:
                    new = None
                    break
                phys[physical_id] = a
            apic_map_mod._add_logical(new, a)
        if new is None:
            inhibits |= Inhibits.PHYSICAL_ID_ALIASED | Inhibits.LOGICAL_ID_ALIASED
        elif new.logical_mode == LogicalMode.MAP_DISABLED:
            inhibits |= Inhibits.LOGICAL_ID_ALIASED
        return new, inhibits

    p.set(apic_map_mod, "build", build)


def bug28(p: Patcher) -> None:
    """``kvm_irq_delivery_to_apic_fast`` before "set meaningful return value": ``*r`` starts at
    -1 and only a non-NULL destination raises it to 0, so a message the map handled but that
    found no vCPU (e.g. a lowest-priority pick of an empty slot) reports -1."""
    original = p.current(delivery_mod, "deliver")

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
        if irq.shorthand is not Shorthand.SELF and use_map:
            targets = delivery_mod.map_destinations(
                irq,
                source,
                apic_map,
                broadcast_quirk,
                policy is LowestPriorityPolicy.VECTOR_HASHING,
            )
            if targets is not None:
                r = -1
                for apic in targets:
                    r = max(r, 0) + accept(apic, irq)
                return r, True
        result: tuple[int, bool] = original(
            irq, source, apic_map, apics, profile, broadcast_quirk, policy, accept, use_map
        )
        return result

    p.set(delivery_mod, "deliver", deliver)

__all__ = ["bug2", "bug3", "bug4", "bug7", "bug8", "bug11", "bug13", "bug14", "bug15", "bug16",
           "bug28"]
