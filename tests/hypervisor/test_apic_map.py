"""KVM's optimized APIC map (reference ``kvm_lapic.md`` §10.1 MAP-1..4 and §10.4 inhibits).

Each topology is made by guest accesses (xAPIC MMIO, WRMSR) or host ``set_msr``; the map is
read back through ``Vm.apic_map`` and, where the rule is about delivery, checked by delivering.
"""

from __future__ import annotations

from hypervisor import Vm
from hypervisor.apic_map import Inhibits, LogicalMode
from lapic.icr import DestMode, Interrupt
from lapic.registers import APIC_BASE_MSR

from .builders import (
    DFR_CLUSTER,
    DFR_FLAT,
    guest_x2apic,
    holders,
    host_apic_base,
    logical_vm,
    set_logical,
    set_xapic_id,
    sw_enable,
    x2apic_vm,
    xapic_vm,
)


def _mode(vm: Vm) -> LogicalMode:
    apic_map = vm.apic_map
    assert apic_map is not None
    return apic_map.logical_mode


# ---------------------------------------------------------------------------------------------
# MAP-1: sizing
# ---------------------------------------------------------------------------------------------
def test_a_small_vm_gets_room_for_every_xapic_id__MAP_1() -> None:
    """MAP-1: vCPUs 0..3 -> max_apic_id 255, 256 physical slots."""
    vm = Vm(4)
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.max_apic_id == 255
    assert len(apic_map.phys_map) == 256


def test_the_map_grows_to_the_largest_x2apic_id__MAP_1() -> None:
    """MAP-1: vCPUs 0..299 -> max_apic_id 299 (300 slots).  The vCPUs are put in x2APIC mode
    by the host first: in xAPIC mode vCPUs 256..299 would alias xAPIC IDs 0..43 (MAP-2)."""
    vm = Vm(300)
    for i in range(300):
        host_apic_base(vm, i, "x2apic")
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.max_apic_id == 299
    assert len(apic_map.phys_map) == 300
    assert apic_map.phys_map[299] is vm.lapic(299)


def test_only_hardware_enabled_apics_size_the_map__MAP_1() -> None:
    """MAP-1: the maximum is over vCPUs whose APIC is present (IA32_APIC_BASE.EN)."""
    vm = Vm(vcpu_ids=[0, 299])
    vm.set_lapic(1, vm.get_lapic(1))  # KVMB-8: as a VMM does after creating its vCPUs
    apic_map = vm.apic_map
    assert apic_map is not None and apic_map.max_apic_id == 299
    host_apic_base(vm, 1, "disabled")
    apic_map = vm.apic_map
    assert apic_map is not None and apic_map.max_apic_id == 255


# ---------------------------------------------------------------------------------------------
# MAP-2 / MAP-3: physical map and aliasing
# ---------------------------------------------------------------------------------------------
def test_each_present_apic_sits_at_its_physical_id__MAP_2() -> None:
    """MAP-2: key = xAPIC ID in xAPIC mode, x2APIC ID (vcpu_id) in x2APIC mode."""
    vm = xapic_vm(3)
    set_xapic_id(vm, 2, 0x40)
    guest_x2apic(vm, 1)
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.phys_map[0] is vm.lapic(0)
    assert apic_map.phys_map[1] is vm.lapic(1)
    assert apic_map.phys_map[0x40] is vm.lapic(2)
    assert apic_map.phys_map[2] is None


def test_aliased_xapic_ids_leave_kvm_without_a_map__MAP_2() -> None:
    """MAP-2: vCPU0 and vCPU1 both xAPIC ID 0 (default, no x2apic_format) -> map NULL; a
    physical IPI to 0 reaches both (kvm-unit-tests test_aliased_xapic_physical_ipi)."""
    vm = xapic_vm(2)
    set_xapic_id(vm, 1, 0)
    assert vm.apic_map is None
    assert vm.deliver(Interrupt(0x41, dest=0)) == 2
    assert holders(vm, 0x41) == [0, 1]


def test_aliased_xapic_ids_reach_only_the_lowest_vcpu_under_x2apic_format__MAP_3() -> None:
    """MAP-3 (errata.rst): x2apic_format, vCPU0 & vCPU1 xAPIC ID 0 -> IPI to 0 reaches vCPU0."""
    vm = xapic_vm(2, x2apic_format=True)
    set_xapic_id(vm, 1, 0)
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.phys_map[0] is vm.lapic(0)
    assert vm.deliver(Interrupt(0x41, dest=0)) == 1
    assert holders(vm, 0x41) == [0]


def test_an_x2apic_vcpu_overwrites_an_xapic_alias_under_x2apic_format__MAP_3() -> None:
    """MAP-3: the x2APIC-mode vCPU takes its slot even from an earlier xAPIC vCPU; an xAPIC
    vCPU only fills a free slot.  Without x2apic_format the same aliasing drops the map."""
    for x2apic_first in (False, True):
        vm = xapic_vm(2, x2apic_format=True)
        xapic_index, x2apic_index = (1, 0) if x2apic_first else (0, 1)
        guest_x2apic(vm, x2apic_index)
        set_xapic_id(vm, xapic_index, vm.lapic(x2apic_index).vcpu_id)
        apic_map = vm.apic_map
        assert apic_map is not None
        assert apic_map.phys_map[vm.lapic(x2apic_index).vcpu_id] is vm.lapic(x2apic_index)

        vm = xapic_vm(2)
        guest_x2apic(vm, x2apic_index)
        set_xapic_id(vm, xapic_index, vm.lapic(x2apic_index).vcpu_id)
        assert vm.apic_map is None


def test_an_xapic_vcpu_above_0xff_is_mapped_by_both_ids_only_under_x2apic_format__MAP_3() -> None:
    """MAP-3: x2apic_format maps an xAPIC-mode vCPU 0x123 at 0x123 and at its xAPIC ID 0x23;
    the default (MAP-2) maps it at 0x23 only."""
    vm = Vm(vcpu_ids=[0, 0x123], x2apic_format=True)
    vm.set_lapic(1, vm.get_lapic(1))  # KVMB-8: as a VMM does after creating its vCPUs
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.phys_map[0x123] is vm.lapic(1)
    assert apic_map.phys_map[0x23] is vm.lapic(1)

    vm = Vm(vcpu_ids=[0, 0x123])
    vm.set_lapic(1, vm.get_lapic(1))
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.phys_map[0x123] is None
    assert apic_map.phys_map[0x23] is vm.lapic(1)


# ---------------------------------------------------------------------------------------------
# MAP-4: logical map
# ---------------------------------------------------------------------------------------------
def test_flat_logical_ids_fill_the_flat_table__MAP_4() -> None:
    """MAP-4: vCPU0 flat 0x01, vCPU1 flat 0x02 -> FLAT, flat[0]=v0, flat[1]=v1."""
    vm = logical_vm([0x01, 0x02])
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.logical_mode == LogicalMode.XAPIC_FLAT
    assert apic_map.flat[0] is vm.lapic(0)
    assert apic_map.flat[1] is vm.lapic(1)
    assert apic_map.flat[2:] == [None] * 6


def test_cluster_logical_ids_fill_their_cluster__MAP_4() -> None:
    """MAP-4: cluster LDR 0x11 / 0x12 -> XAPIC_CLUSTER, cluster[1][0] and cluster[1][1]."""
    vm = logical_vm([0x11, 0x12], DFR_CLUSTER)
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.logical_mode == LogicalMode.XAPIC_CLUSTER
    assert apic_map.cluster[1][:2] == [vm.lapic(0), vm.lapic(1)]
    assert all(slot is None for c, slots in enumerate(apic_map.cluster) for slot in slots
               if c != 1)


def test_all_x2apic_vcpus_give_the_x2apic_logical_mode__MAP_4() -> None:
    """MAP-4: x2APIC contributors set mode X2APIC and add nothing but phys_map."""
    vm = x2apic_vm([0, 1, 2, 3])
    assert _mode(vm) == LogicalMode.X2APIC


def test_a_logical_id_with_several_bits_disables_the_logical_map__MAP_4() -> None:
    """MAP-4 / BUG-14: vCPU0 flat 0x03 -> MAP_DISABLED."""
    vm = logical_vm([0x03, 0x04])
    assert _mode(vm) == LogicalMode.MAP_DISABLED
    assert vm.inhibits & Inhibits.LOGICAL_ID_ALIASED
    assert not vm.inhibits & Inhibits.PHYSICAL_ID_ALIASED


def test_two_vcpus_with_one_logical_id_disable_the_logical_map__MAP_4() -> None:
    """MAP-4 / BUG-13: vCPU0 & vCPU1 flat 0x01 -> MAP_DISABLED."""
    vm = logical_vm([0x01, 0x01])
    assert _mode(vm) == LogicalMode.MAP_DISABLED


def test_mixed_flat_and_cluster_disable_the_logical_map__MAP_4() -> None:
    """MAP-4: vCPU0 flat 0x01, vCPU1 cluster 0x12 -> MAP_DISABLED."""
    vm = logical_vm([0x01, 0x12])
    set_logical(vm, 1, 0x12, DFR_CLUSTER)
    assert _mode(vm) == LogicalMode.MAP_DISABLED


def test_mixed_xapic_and_x2apic_contributors_disable_the_logical_map__MAP_4() -> None:
    vm = logical_vm([0x01, 0x02])
    guest_x2apic(vm, 1)
    assert _mode(vm) == LogicalMode.MAP_DISABLED


def test_a_zero_ldr_is_skipped__MAP_4() -> None:
    """MAP-4: LDR 0 contributes nothing: a cluster-DFR vCPU with LDR 0 next to a flat one
    does not make the modes differ."""
    vm = logical_vm([0x00, 0x01])
    set_logical(vm, 0, 0x00, DFR_CLUSTER)
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.logical_mode == LogicalMode.XAPIC_FLAT
    assert apic_map.flat[0] is vm.lapic(1)


def test_a_cluster_id_with_an_empty_member_mask_is_skipped__MAP_4() -> None:
    """MAP-4: cluster 0x10 (mask 0) -> skipped; two of them do not alias each other."""
    vm = logical_vm([0x10, 0x10, 0x11], DFR_CLUSTER)
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.logical_mode == LogicalMode.XAPIC_CLUSTER
    assert apic_map.cluster[1] == [vm.lapic(2), None, None, None]


def test_software_disabled_apics_are_skipped__MAP_4() -> None:
    """MAP-4: a software-disabled APIC never contributes, whatever its LDR."""
    vm = logical_vm([0x01, 0x01])
    sw_enable(vm, 0, on=False)
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.logical_mode == LogicalMode.XAPIC_FLAT
    assert apic_map.flat[0] is vm.lapic(1)


def test_no_contributor_leaves_the_sw_disabled_mode__MAP_4() -> None:
    """MAP-4: after RESET every APIC is software-disabled -> logical mode SW_DISABLED."""
    vm = Vm(2)
    set_logical(vm, 0, 0x01)
    assert _mode(vm) == LogicalMode.SW_DISABLED


def test_any_dfr_other_than_flat_counts_as_cluster__MAP_4() -> None:
    """MAP-4: DFR 0x5FFFFFFF (model 0101b) is "not flat", so the map treats it as cluster."""
    vm = logical_vm([0x01], 0x50000000)
    assert vm.lapic(0).dfr == 0x5FFFFFFF
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.logical_mode == LogicalMode.XAPIC_CLUSTER
    assert apic_map.cluster[0][0] is vm.lapic(0)


def test_the_map_follows_a_logical_id_change__MAP_4() -> None:
    """MAP-4: an LDR write from the guest invalidates the map; the next lookup sees it."""
    vm = logical_vm([0x01, 0x02])
    assert vm.deliver(Interrupt(0x41, dest_mode=DestMode.LOGICAL, dest=0x04)) == 0
    set_logical(vm, 1, 0x04)
    assert vm.deliver(Interrupt(0x42, dest_mode=DestMode.LOGICAL, dest=0x04)) == 1
    assert holders(vm, 0x42) == [1]


# ---------------------------------------------------------------------------------------------
# APICv inhibits derived from the map (§10.4, INHIBIT-1)
# ---------------------------------------------------------------------------------------------
def _inhibits(vm: Vm) -> int:
    vm.apic_map  # noqa: B018 - the map (and its inhibits) is rebuilt on access
    return vm.inhibits


def test_a_clean_topology_has_no_inhibits__INHIBIT_1() -> None:
    assert _inhibits(xapic_vm(4)) == 0
    assert _inhibits(x2apic_vm([0, 1, 300])) == 0


def test_physical_aliasing_inhibits_both_physical_and_logical__INHIBIT_1() -> None:
    """INHIBIT-1 (§10.4): map NULL -> PHYSICAL_ID_ALIASED and LOGICAL_ID_ALIASED."""
    vm = xapic_vm(2)
    set_xapic_id(vm, 1, 0)
    assert _inhibits(vm) & Inhibits.PHYSICAL_ID_ALIASED
    assert _inhibits(vm) & Inhibits.LOGICAL_ID_ALIASED


def test_a_modified_xapic_id_inhibits_apicv_until_restored__INHIBIT_1() -> None:
    """INHIBIT-1 (§10.4): an xAPIC-mode vCPU whose xAPIC ID != (u8)vcpu_id -> APIC_ID_MODIFIED.  KVM
    recomputes this one on every map rebuild, so restoring the ID clears it."""
    vm = xapic_vm(2)
    set_xapic_id(vm, 1, 0x20)
    assert _inhibits(vm) & Inhibits.APIC_ID_MODIFIED
    set_xapic_id(vm, 1, 1)
    assert not _inhibits(vm) & Inhibits.APIC_ID_MODIFIED


def test_an_x2apic_vcpu_above_0xff_is_not_an_id_modification__INHIBIT_1() -> None:
    """KVM compares the xAPIC ID with ``(u8)vcpu_id`` only in xAPIC mode: vCPU 0x123 in xAPIC
    mode has xAPIC ID 0x23 = (u8)0x123, not modified."""
    vm = Vm(vcpu_ids=[0, 0x123])
    assert not _inhibits(vm) & Inhibits.APIC_ID_MODIFIED


def test_kvm_stops_looking_for_id_changes_at_the_first_physical_alias__INHIBIT_1() -> None:
    """``kvm_recalculate_apic_map`` bails out of its vCPU loop at the first aliased physical
    ID, before later vCPUs are checked for a modified xAPIC ID; the mismatch flag it then
    applies covers only the vCPUs already visited.  vCPU 256 (xAPIC ID (u8)256 = 0) aliases
    vCPU 0 without an ID change; vCPU 2 (index 2) has a modified ID -> KVM: PHYSICAL and
    LOGICAL aliased, APIC_ID_MODIFIED clear (code-derived, lapic.c at 000d75b0)."""
    vm = Vm(vcpu_ids=[0, 256, 2])
    set_xapic_id(vm, 2, 5)
    inhibits = _inhibits(vm)
    assert inhibits & Inhibits.PHYSICAL_ID_ALIASED
    assert inhibits & Inhibits.LOGICAL_ID_ALIASED
    assert not inhibits & Inhibits.APIC_ID_MODIFIED


def test_moving_the_apic_base_inhibits_apicv_for_good__INHIBIT_1() -> None:
    """KVM ``__kvm_apic_set_base`` sets APIC_BASE_MODIFIED when an enabled APIC's base is not
    0xFEE00000 and nothing ever clears it ("inhibited the first time either APIC ID or APIC
    base are changed by the guest", commit introducing the inhibit): moving the base back
    keeps the inhibit (code-derived)."""
    vm = xapic_vm(2)
    assert _inhibits(vm) == 0
    v = vm.vcpu(1)
    base = v.rdmsr(APIC_BASE_MSR)
    v.wrmsr(APIC_BASE_MSR, (base & 0xFFF) | 0xFED00000)
    assert _inhibits(vm) & Inhibits.APIC_BASE_MODIFIED, "set by the base write itself"
    v.wrmsr(APIC_BASE_MSR, base)
    set_logical(vm, 0, 0x01)  # any later map rebuild
    assert _inhibits(vm) & Inhibits.APIC_BASE_MODIFIED, "sticky"


def test_flat_dfr_is_written_as_all_ones__MAP_4() -> None:
    """The builders' flat DFR really is KVM's APIC_DFR_FLAT (guards the other MAP-4 tests)."""
    vm = logical_vm([0x01])
    assert vm.lapic(0).dfr == DFR_FLAT


def test_an_apic_disabled_and_re_enabled_by_its_guest_is_back_in_the_map__MAP_1_BUG_10() -> None:
    """BUG-10 ("KVM: x86: Fix APIC map calculation after re-enabling"): the guest on vCPU 1
    clears IA32_APIC_BASE.EN, then sets it again.  The map follows the stored APIC_BASE
    (MAP-1: present = EN), so a physical IPI to its ID reaches it again."""
    vm = xapic_vm(2)
    v = vm.vcpu(1)
    base = v.rdmsr(APIC_BASE_MSR)
    v.wrmsr(APIC_BASE_MSR, base & ~0x800)
    assert vm.deliver(Interrupt(0x4A, dest=1), vm.lapic(0)) == 0, "a disabled APIC is absent"
    v.wrmsr(APIC_BASE_MSR, base)
    apic_map = vm.apic_map
    assert apic_map is not None and apic_map.phys_map[1] is vm.lapic(1)
    assert vm.deliver(Interrupt(0x4B, dest=1), vm.lapic(0)) == 1
    assert holders(vm, 0x4B) == [1]
