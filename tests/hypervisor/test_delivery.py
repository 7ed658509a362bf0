"""KVM interrupt delivery: fast path, slow path, lowest priority, and the bug replays.

Reference ``kvm_lapic.md`` §10.2 (FAST-1..9), §10.3 (SLOW-1..2), §11 (LP-1..4), §16 (DIFF-D6,
DIFF-D8) and §17 (BUG-8, 11, 13, 14, 15, 16, 28).  Topologies are built by guest accesses;
results are read from ``Vm.deliver`` / ``Vm.signal_msi`` return values, from the targets' IRR
and pending events, and from the fast/slow counters (``vm.stats``).

Where KVM's fast path gives a different answer than the architectural matching of the slow path
would, the test says so and pins KVM's answer; ``slow_path_targets`` shows what the slow path
would have done on the same APICs.
"""

from __future__ import annotations

from hypervisor import Vm
from hypervisor.apic_map import LogicalMode
from lapic.apic import LocalApic
from lapic.icr import DeliveryMode, DestMode, Interrupt, Level, Shorthand, Trigger
from lapic.profile import Profile
from lapic.slowpath import deliver_slow

from .builders import (
    APIC_PAGE,
    DFR_CLUSTER,
    ICR_ALL_EXCLUDING_SELF,
    ICR_ALL_INCLUDING_SELF,
    ICR_ASSERT,
    ICR_INIT,
    ICR_LOGICAL,
    ICR_SELF,
    guest_x2apic,
    holders,
    host_apic_base,
    logical_vm,
    send_ipi,
    set_logical,
    set_xapic_id,
    sw_enable,
    x2apic_vm,
    xapic_vm,
)

LOGICAL = DestMode.LOGICAL
LOWEST = DeliveryMode.LOWEST
KVM = Profile.preset("kvm")


def fixed(vector: int, dest: int, mode: DestMode = DestMode.PHYSICAL) -> Interrupt:
    return Interrupt(vector, DeliveryMode.FIXED, mode, dest=dest)


def lowest(vector: int, dest: int, mode: DestMode = LOGICAL) -> Interrupt:
    return Interrupt(vector, LOWEST, mode, dest=dest)


def msi(dest: int, *, logical: bool = False, redir_hint: bool = False) -> int:
    """MSI address_lo for an 8-bit destination."""
    return APIC_PAGE | (dest & 0xFF) << 12 | int(redir_hint) << 3 | int(logical) << 2


def paths(vm: Vm) -> tuple[int, int]:
    return vm.stats.fast_path, vm.stats.slow_path


def slow_path_targets(vm: Vm, irq: Interrupt, source: LocalApic | None) -> list[int]:
    """Indexes of the vCPUs KVM's slow path would offer ``irq`` to (nothing is changed)."""
    offered: list[int] = []
    apics = [vm.lapic(i) for i in range(len(vm))]

    def record(apic: LocalApic, _irq: Interrupt) -> bool:
        offered.append(apics.index(apic))
        return False

    deliver_slow(
        apics,
        irq,
        source,
        profile=vm.profile,
        broadcast_quirk=vm.broadcast_quirk,
        policy=vm.lowest_priority,
        accept=record,
    )
    return offered


def aliased_vm(n: int = 4) -> Vm:
    """``n`` software-enabled xAPIC vCPUs, vCPU ``n-1`` moved onto xAPIC ID 0: no map."""
    vm = xapic_vm(n)
    set_xapic_id(vm, n - 1, 0)
    assert vm.apic_map is None
    return vm


# =============================================================================================
# FAST-1 .. FAST-3: when the fast path is tried at all
# =============================================================================================
def test_a_self_ipi_reaches_only_the_sender_without_consulting_the_map__FAST_1() -> None:
    """FAST-1: shorthand SELF with a source is delivered to the source only, on the fast
    path, even when there is no map (aliased IDs)."""
    vm = aliased_vm()
    before = paths(vm)
    send_ipi(vm, 1, ICR_SELF | ICR_ASSERT | 0x51, 0)
    assert holders(vm, 0x51) == [1]
    assert paths(vm) == (before[0] + 1, before[1])
    assert vm.deliver(Interrupt(0x52, shorthand=Shorthand.SELF), vm.lapic(2)) == 1
    assert holders(vm, 0x52) == [2]


def test_a_self_ipi_from_a_software_disabled_apic_is_not_accepted__FAST_1() -> None:
    vm = xapic_vm(2)
    sw_enable(vm, 1, on=False)
    assert vm.deliver(Interrupt(0x53, shorthand=Shorthand.SELF), vm.lapic(1)) == 0
    assert holders(vm, 0x53) == []


def test_all_including_and_all_excluding_self_take_the_slow_path__FAST_2() -> None:
    """FAST-2: ALLINC / ALLBUT never use the map."""
    vm = xapic_vm(4)
    before = paths(vm)
    send_ipi(vm, 0, ICR_ALL_EXCLUDING_SELF | ICR_ASSERT | 0x54, 0)
    assert holders(vm, 0x54) == [1, 2, 3]
    send_ipi(vm, 0, ICR_ALL_INCLUDING_SELF | ICR_ASSERT | 0x55, 0)
    assert holders(vm, 0x55) == [0, 1, 2, 3]
    assert paths(vm) == (before[0], before[1] + 2)
    irq = Interrupt(0x56, shorthand=Shorthand.ALL_EXCLUDING_SELF)
    assert vm.deliver(irq, vm.lapic(3)) == 3


def test_without_a_map_every_message_takes_the_slow_path__FAST_3() -> None:
    """FAST-3: map NULL -> slow path (and its -1 / count results)."""
    vm = aliased_vm()
    before = paths(vm)
    assert vm.deliver(fixed(0x57, 2)) == 1
    assert holders(vm, 0x57) == [2]
    assert paths(vm) == (before[0], before[1] + 1)


# =============================================================================================
# FAST-4: broadcasts go to the slow path
# =============================================================================================
def test_an_xapic_broadcast_takes_the_slow_path__FAST_4() -> None:
    """FAST-4 (quirk on): an xAPIC source's dest 0xFF is a broadcast -> slow path, all 4."""
    vm = xapic_vm(4)
    before = paths(vm)
    assert vm.deliver(fixed(0x58, 0xFF), vm.lapic(0)) == 4
    assert paths(vm) == (before[0], before[1] + 1)


def test_an_x2apic_broadcast_takes_the_slow_path__FAST_4() -> None:
    """FAST-4 (quirk on): an x2APIC source's dest 0xFFFFFFFF -> slow path, every vCPU."""
    vm = x2apic_vm([0, 1, 2, 3])
    before = paths(vm)
    send_ipi(vm, 0, ICR_ASSERT | 0x59, 0xFFFFFFFF)
    assert holders(vm, 0x59) == [0, 1, 2, 3]
    assert paths(vm) == (before[0], before[1] + 1)


def test_0xff_from_an_x2apic_source_is_x2apic_id_255__FAST_4() -> None:
    """FAST-4 (quirk on) + MATCH-3: for an x2APIC sender 0xFF is not a broadcast; the fast
    path delivers to phys_map[255] only."""
    vm = x2apic_vm([0, 1, 255])
    before = paths(vm)
    assert vm.deliver(fixed(0x5A, 0xFF), vm.lapic(0)) == 1
    assert holders(vm, 0x5A) == [2]
    assert paths(vm) == (before[0] + 1, before[1])


def test_a_device_0xff_is_a_broadcast_to_x2apic_targets_with_the_quirk__FAST_4() -> None:
    """FAST-4 + MATCH-1: an MSI to 0xFF (no source) goes to the slow path, where the quirk
    rewrites the MDA to 0xFFFFFFFF for x2APIC targets -> all 3 receive."""
    vm = x2apic_vm([0, 1, 2])
    assert vm.signal_msi(msi(0xFF), 0, 0x5B) == 3
    assert holders(vm, 0x5B) == [0, 1, 2]


def test_without_the_quirk_0xff_is_cluster_0_in_an_x2apic_logical_map__FAST_4() -> None:
    """FAST-4 (quirk disabled): dest 0xFF with map mode X2APIC is not a broadcast: physical ->
    phys_map[255] (empty, result 0); logical -> cluster 0, CPUs 0-7 (api.rst)."""
    vm = x2apic_vm([0, 1, 2], broadcast_quirk=False)
    assert vm.signal_msi(msi(0xFF), 0, 0x5C) == 0
    assert holders(vm, 0x5C) == []
    assert vm.signal_msi(msi(0xFF, logical=True), 0, 0x5D) == 3
    assert holders(vm, 0x5D) == [0, 1, 2]


def test_without_the_quirk_0xff_is_still_a_broadcast_for_an_xapic_map__FAST_4() -> None:
    """FAST-4 (quirk disabled): dest 0xFF and map mode != X2APIC -> slow path broadcast."""
    vm = xapic_vm(3, broadcast_quirk=False)
    before = paths(vm)
    assert vm.signal_msi(msi(0xFF), 0, 0x5E) == 3
    assert paths(vm) == (before[0], before[1] + 1)


def test_without_the_quirk_0xffffffff_is_a_broadcast__FAST_4() -> None:
    vm = x2apic_vm([0, 1, 2], x2apic_format=True, broadcast_quirk=False)
    assert vm.signal_msi(msi(0xFF), 0xFFFFFF00, 0x5F) == 3


def test_0xff_from_an_x2apic_sender_misses_xapic_mode_vcpus__FAST_4() -> None:
    """FAST-4 corner (code-derived): an x2APIC sender's physical 0xFF is not a broadcast for
    ``kvm_apic_is_broadcast_dest``, so the fast path looks up phys_map[255] (empty -> 0), yet
    0xFF is the broadcast MDA of every xAPIC-mode target (MATCH-3), which the slow path would
    have reached.  KVM answers from the map."""
    vm = xapic_vm(3)
    guest_x2apic(vm, 0)
    irq = fixed(0x60, 0xFF)
    assert slow_path_targets(vm, irq, vm.lapic(0)) == [1, 2]
    assert vm.deliver(irq, vm.lapic(0)) == 0
    assert holders(vm, 0x60) == []


def test_a_32_bit_msi_to_0xffffffff_is_dropped_while_the_quirk_is_on__FAST_4() -> None:
    """FAST-4 corner (code-derived): with the quirk on and no source, only 0xFF is a
    broadcast, so an x2apic_format MSI to 0xFFFFFFFF is looked up as a physical ID above
    max_apic_id and dropped (result 0), although every x2APIC target's broadcast MDA is
    0xFFFFFFFF.  The quirk off makes it a broadcast (3)."""
    vm = x2apic_vm([0, 1, 2], x2apic_format=True)
    assert slow_path_targets(vm, fixed(0x61, 0xFFFFFFFF), None) == [0, 1, 2]
    assert vm.signal_msi(msi(0xFF), 0xFFFFFF00, 0x61) == 0
    assert holders(vm, 0x61) == []


# =============================================================================================
# FAST-5: physical destinations
# =============================================================================================
def test_a_physical_id_above_max_apic_id_is_dropped_without_fallback__FAST_5() -> None:
    """FAST-5: dest > max_apic_id -> nothing delivered, result 0, no slow path."""
    vm = x2apic_vm([0, 1, 2, 3])
    before = paths(vm)
    assert vm.deliver(fixed(0x62, 0x1000), vm.lapic(0)) == 0
    assert paths(vm) == (before[0] + 1, before[1])


def test_an_empty_physical_slot_gives_0__FAST_5() -> None:
    vm = xapic_vm(4)
    assert vm.deliver(fixed(0x63, 0x10)) == 0


def test_a_physical_lowest_priority_message_goes_to_its_one_target__FAST_5() -> None:
    """FAST-5 / LP-4: physical + lowest priority is delivered to phys_map[dest], no
    arbitration (vector 0x30 would hash to another vCPU)."""
    vm = xapic_vm(4)
    assert vm.deliver(lowest(0x30, 3, DestMode.PHYSICAL)) == 1
    assert holders(vm, 0x30) == [3]
    assert vm.lapic(3).arb_prio == 1


# =============================================================================================
# FAST-6 / FAST-7: logical destinations through the map
# =============================================================================================
def test_a_disabled_logical_map_falls_back_to_the_slow_path__FAST_6() -> None:
    vm = logical_vm([0x01, 0x01])
    before = paths(vm)
    assert vm.deliver(fixed(0x64, 0x01, LOGICAL)) == 2
    assert paths(vm) == (before[0], before[1] + 1)


def test_a_logical_message_with_no_logical_contributor_is_dropped__FAST_6() -> None:
    """FAST-6: map mode SW_DISABLED -> nothing delivered, result 0 (the slow path would have
    said -1)."""
    vm = Vm(2)
    set_logical(vm, 0, 0x01)
    assert vm.deliver(fixed(0x65, 0x01, LOGICAL)) == 0


def test_flat_logical_delivery_follows_the_mask__FAST_7() -> None:
    """FAST-7: FLAT v0=0x01, v1=0x02: fixed dest 0x03 -> both, result 2; dest 0x04 -> 0."""
    vm = logical_vm([0x01, 0x02])
    assert vm.deliver(fixed(0x66, 0x03, LOGICAL)) == 2
    assert holders(vm, 0x66) == [0, 1]
    assert vm.deliver(fixed(0x67, 0x04, LOGICAL)) == 0
    assert holders(vm, 0x67) == []


def test_every_bit_of_the_flat_mask_has_its_slot__FAST_7() -> None:
    """FAST-6/7 FLAT: eight vCPUs with logical IDs 1 << i; dest 0x81 -> v0 and v7; each
    single bit reaches exactly its vCPU."""
    vm = logical_vm([1 << i for i in range(8)])
    assert vm.deliver(fixed(0x7B, 0x81, LOGICAL)) == 2
    assert holders(vm, 0x7B) == [0, 7]
    for i in range(8):
        assert vm.deliver(fixed(0x80 + i, 1 << i, LOGICAL)) == 1
        assert holders(vm, 0x80 + i) == [i]


def test_cluster_logical_delivery_uses_one_cluster__FAST_6() -> None:
    """FAST-6 CLUSTER: cluster[(dest >> 4) & 0xF], members dest & 0xF."""
    vm = logical_vm([0x11, 0x12, 0x21], DFR_CLUSTER)
    assert vm.deliver(fixed(0x68, 0x13, LOGICAL)) == 2
    assert holders(vm, 0x68) == [0, 1]
    assert vm.deliver(fixed(0x69, 0x21, LOGICAL)) == 1
    assert holders(vm, 0x69) == [2]
    assert vm.deliver(fixed(0x6A, 0x31, LOGICAL)) == 0


def test_x2apic_logical_delivery_reuses_the_physical_map__FAST_7() -> None:
    """FAST-6/7: x2APIC vCPUs 0..3, max 255: dest 0x00000006 -> vCPU1 and vCPU2;
    dest 0x00100001 -> offset 256 > 255 -> 0."""
    vm = x2apic_vm([0, 1, 2, 3])
    assert vm.deliver(fixed(0x6B, 0x00000006, LOGICAL), vm.lapic(0)) == 2
    assert holders(vm, 0x6B) == [1, 2]
    assert vm.deliver(fixed(0x6C, 0x00100001, LOGICAL), vm.lapic(0)) == 0


def test_the_last_x2apic_cluster_is_cut_at_max_apic_id__FAST_6() -> None:
    """FAST-6: vCPUs incl. 260 (max 260): dest 0x00100010 -> size 5, mask 0x10 -> vCPU 260;
    dest 0x00100020 -> mask 0 -> 0."""
    vm = x2apic_vm([0, 1, 2, 3, 260])
    apic_map = vm.apic_map
    assert apic_map is not None and apic_map.max_apic_id == 260
    assert vm.deliver(fixed(0x6D, 0x00100010, LOGICAL), vm.lapic(0)) == 1
    assert holders(vm, 0x6D) == [4]
    assert vm.deliver(fixed(0x6E, 0x00100020, LOGICAL), vm.lapic(0)) == 0


def test_a_huge_x2apic_cluster_is_dropped_without_error__BUG_8() -> None:
    """BUG-8 (CVE-2013-6376 replay): x2APIC logical dest 0xFFFF0001 -> dropped, result 0."""
    vm = x2apic_vm([0, 1, 2, 3])
    assert vm.deliver(fixed(0x6F, 0xFFFF0001, LOGICAL), vm.lapic(0)) == 0
    send_ipi(vm, 0, ICR_LOGICAL | ICR_ASSERT | 0x6F, 0xFFFF0001)
    assert holders(vm, 0x6F) == []


def test_a_dfr_that_is_neither_flat_nor_cluster_still_delivers_on_the_fast_path__FAST_6() -> None:
    """MAP-4 + FAST-6 (code-derived): DFR 0x5FFFFFFF counts as cluster in the map, so logical
    dest 0x01 reaches the vCPU (result 1), while MATCH-5 ("any other DFR: false") would match
    nothing on the slow path; the sdm profile (no map) answers -1."""
    vm = logical_vm([0x01], 0x50000000)
    irq = fixed(0x70, 0x01, LOGICAL)
    assert slow_path_targets(vm, irq, None) == []
    assert vm.deliver(irq) == 1
    assert holders(vm, 0x70) == [0]
    sdm = logical_vm([0x01], 0x50000000, profile="sdm")
    assert sdm.deliver(irq) == -1


def test_a_cluster_map_ignores_destination_bits_above_7__FAST_6() -> None:
    """FAST-6 corner (code-derived): the cluster table is indexed by ``(dest >> 4) & 0xF``, so
    a 32-bit logical dest 0x113 from a (software-disabled) x2APIC sender reaches cluster 1,
    members 0x3, while MATCH-5 compares ``lid >> 4`` with ``0x113 >> 4 = 0x11`` (no match)."""
    vm = logical_vm([0x11, 0x12, 0x00], DFR_CLUSTER)
    guest_x2apic(vm, 2)
    sw_enable(vm, 2, on=False)
    assert vm.apic_map is not None
    assert vm.apic_map.logical_mode == LogicalMode.XAPIC_CLUSTER
    irq = fixed(0x71, 0x113, LOGICAL)
    assert slow_path_targets(vm, irq, vm.lapic(2)) == []
    assert vm.deliver(irq, vm.lapic(2)) == 2
    assert holders(vm, 0x71) == [0, 1]


def test_an_x2apic_logical_lookup_can_land_on_an_xapic_mode_vcpu__FAST_6() -> None:
    """FAST-6 corner (code-derived): the X2APIC logical mode reuses phys_map, which also holds
    xAPIC-mode vCPUs at their xAPIC ID.  vCPU1 stays in xAPIC mode (software-enabled, LDR 0,
    so the logical mode is X2APIC); x2APIC logical dest 0x00000002 (cluster 0, bit 1) is
    phys_map[1] = vCPU1 -> delivered, though its LDR matches nothing on the slow path."""
    vm = Vm(3)
    for i in (0, 2):
        guest_x2apic(vm, i)
    for i in range(3):
        sw_enable(vm, i)
    assert vm.apic_map is not None and vm.apic_map.logical_mode == LogicalMode.X2APIC
    irq = fixed(0x72, 0x00000002, LOGICAL)
    assert slow_path_targets(vm, irq, vm.lapic(0)) == []
    assert vm.deliver(irq, vm.lapic(0)) == 1
    assert holders(vm, 0x72) == [1]


# =============================================================================================
# FAST-8 / BUG-28: return values
# =============================================================================================
def test_no_target_is_0_on_the_fast_path_and_minus_1_on_the_slow_path__FAST_8() -> None:
    """FAST-8: map present, physical fixed IPI to unused ID 0x10 -> 0; same with map NULL ->
    -1 (also through KVM_SIGNAL_MSI)."""
    vm = xapic_vm(4)
    assert vm.deliver(fixed(0x73, 0x10)) == 0
    assert vm.signal_msi(msi(0x10), 0, 0x73) == 0
    vm = aliased_vm()
    assert vm.deliver(fixed(0x73, 0x10)) == -1
    assert vm.signal_msi(msi(0x10), 0, 0x73) == -1


def test_a_lowest_priority_msi_dropped_by_the_fast_path_reports_0__BUG_28() -> None:
    """BUG-28 ("kvm/x86 : set meaningful return value"): the fast path's vector-hashing drop
    (LP-2, dest 0x07, vector 0x32 picks the empty bit 2) returns 0, not -1 ("MSI lost")."""
    vm = logical_vm([0x01, 0x02])
    assert vm.signal_msi(msi(0x07, logical=True), 0, 0x132) == 0
    assert holders(vm, 0x32) == []


# =============================================================================================
# FAST-9 / BUG-11: the hotplug hack
# =============================================================================================
def test_an_xapic_vcpu_above_0xff_is_missed_by_its_x2apic_id_on_the_fast_path__FAST_9() -> None:
    """FAST-9: no x2apic_format, vCPU 0x123 in xAPIC mode (xAPIC ID 0x23): fixed physical
    IPI to 0x123 -> not delivered (0), though MATCH-4's hotplug hack would match it on the
    slow path; to 0x23 -> delivered."""
    vm = Vm(vcpu_ids=[0, 0x123])
    guest_x2apic(vm, 0)
    sw_enable(vm, 0)
    sw_enable(vm, 1)
    irq = fixed(0x74, 0x123)
    assert slow_path_targets(vm, irq, vm.lapic(0)) == [1]
    assert vm.deliver(irq, vm.lapic(0)) == 0
    assert holders(vm, 0x74) == []
    assert vm.deliver(fixed(0x75, 0x23), vm.lapic(0)) == 1
    assert holders(vm, 0x75) == [1]


def test_x2apic_format_makes_the_hotplugged_vcpu_reachable_by_both_ids__FAST_9() -> None:
    """FAST-9: with USE_32BIT_IDS both 0x123 and 0x23 are delivered."""
    vm = Vm(vcpu_ids=[0, 0x123], x2apic_format=True)
    guest_x2apic(vm, 0)
    sw_enable(vm, 0)
    sw_enable(vm, 1)
    assert vm.deliver(fixed(0x76, 0x123), vm.lapic(0)) == 1
    assert vm.deliver(fixed(0x77, 0x23), vm.lapic(0)) == 1
    assert holders(vm, 0x76) == [1] and holders(vm, 0x77) == [1]


def test_a_hotplugged_xapic_vcpu_receives_init_by_its_x2apic_id__BUG_11() -> None:
    """BUG-11 (5bd5db385b3e): with USE_32BIT_IDS an xAPIC-mode vCPU 0x123 receives a
    physical INIT to 0x123 (MATCH-4, MAP-3); without it the INIT is lost (FAST-9)."""
    for x2apic_format, expected in ((True, True), (False, False)):
        vm = Vm(vcpu_ids=[0, 0x123], x2apic_format=x2apic_format)
        guest_x2apic(vm, 0)
        send_ipi(vm, 0, ICR_INIT | ICR_ASSERT, 0x123)
        assert vm.lapic(1).init_pending is expected


# =============================================================================================
# SLOW-1 / SLOW-2
# =============================================================================================
def test_a_physical_lowest_priority_broadcast_becomes_fixed__SLOW_1() -> None:
    """SLOW-1: 3 software-enabled xAPIC vCPUs, physical dest 0xFF, LOWEST, vector 0x41 ->
    all 3 get 0x41, result 3."""
    vm = xapic_vm(3)
    assert vm.deliver(lowest(0x41, 0xFF, DestMode.PHYSICAL)) == 3
    assert holders(vm, 0x41) == [0, 1, 2]


def test_a_redirection_hint_keeps_a_physical_broadcast_lowest_priority__SLOW_1() -> None:
    """SLOW-1 with the MSI redirection hint: KVM rewrites the mode to FIXED but the hint still
    makes it lowest priority (``kvm_lowest_prio_delivery``), so one vCPU gets it: vector 0x41
    (65 % 3 = 2) -> vCPU index 2, result 1."""
    vm = xapic_vm(3)
    assert vm.signal_msi(msi(0xFF, redir_hint=True), 0, 0x41) == 1
    assert holders(vm, 0x41) == [2]


def test_the_slow_path_counts_acceptances_and_says_minus_1_for_no_match__SLOW_2() -> None:
    """SLOW-2: no map: the result is -1 without a match, else the number that accepted
    (a software-disabled match counts as matched but not accepted)."""
    vm = aliased_vm()
    assert vm.deliver(fixed(0x78, 0x10)) == -1
    sw_enable(vm, 3, on=False)
    assert vm.deliver(fixed(0x79, 0)) == 1
    assert holders(vm, 0x79) == [0]
    sw_enable(vm, 0, on=False)
    assert vm.deliver(fixed(0x7A, 0)) == 0


def test_slow_path_lowest_priority_candidates_are_software_enabled_matches__SLOW_2() -> None:
    """SLOW-2 / LP-2: ALLINC LOWEST over vCPUs 0, 2 (vCPU1 software-disabled): vector 0x31
    (49 % 2 = 1) -> vCPU index 2."""
    vm = xapic_vm(3)
    sw_enable(vm, 1, on=False)
    irq = Interrupt(0x31, LOWEST, shorthand=Shorthand.ALL_INCLUDING_SELF)
    assert vm.deliver(irq, vm.lapic(0)) == 1
    assert holders(vm, 0x31) == [2]


# =============================================================================================
# LP-1 .. LP-4
# =============================================================================================
def test_an_msi_redirection_hint_is_arbitrated_like_lowest_priority__LP_1() -> None:
    """LP-1: MSI with delivery mode FIXED and the redirection hint -> one target by vector
    hashing: flat dest 0x03, vector 0x31 (49 % 2 = 1) -> v1 only."""
    vm = logical_vm([0x01, 0x02])
    assert vm.signal_msi(msi(0x03, logical=True, redir_hint=True), 0, 0x31) == 1
    assert holders(vm, 0x31) == [1]


def test_vector_hashing_over_a_flat_mask__LP_2() -> None:
    """LP-2: FLAT v0=0x01, v1=0x02, LOWEST dest 0x03: vector 0x30 (48%2=0) -> v0; 0x31 -> v1."""
    vm = logical_vm([0x01, 0x02])
    assert vm.deliver(lowest(0x30, 0x03)) == 1
    assert vm.deliver(lowest(0x31, 0x03)) == 1
    assert holders(vm, 0x30) == [0]
    assert holders(vm, 0x31) == [1]


def test_vector_hashing_counts_empty_slots_and_drops_on_them__LP_2() -> None:
    """LP-2: dest 0x07 (bit 2 empty): 0x30 (48%3=0) -> v0; 0x31 (49%3=1) -> v1; 0x32
    (50%3=2) -> bit 2 empty -> dropped, result 0."""
    vm = logical_vm([0x01, 0x02])
    assert vm.deliver(lowest(0x30, 0x07)) == 1
    assert vm.deliver(lowest(0x31, 0x07)) == 1
    assert vm.deliver(lowest(0x32, 0x07)) == 0
    assert (holders(vm, 0x30), holders(vm, 0x31), holders(vm, 0x32)) == ([0], [1], [])


def test_vector_hashing_in_a_cluster__LP_2() -> None:
    """LP-2: cluster v0=0x11, v1=0x12, dest 0x13, vector 0x41 (65%2=1) -> v1."""
    vm = logical_vm([0x11, 0x12], DFR_CLUSTER)
    assert vm.deliver(lowest(0x41, 0x13)) == 1
    assert holders(vm, 0x41) == [1]


def test_vector_hashing_in_an_x2apic_cluster__LP_2() -> None:
    """LP-2: x2APIC vCPUs 0..3, dest 0x0000000F, vector 0x22 (34%4=2) -> vCPU2."""
    vm = x2apic_vm([0, 1, 2, 3])
    assert vm.deliver(lowest(0x22, 0x0000000F), vm.lapic(0)) == 1
    assert holders(vm, 0x22) == [2]


def test_vector_hashing_on_the_slow_path__LP_2() -> None:
    """LP-2: ALLINC shorthand, LOWEST, 3 software-enabled vCPUs, vector 0x31 (49%3=1) ->
    vCPU index 1."""
    vm = xapic_vm(3)
    irq = Interrupt(0x31, LOWEST, shorthand=Shorthand.ALL_INCLUDING_SELF)
    assert vm.deliver(irq, vm.lapic(0)) == 1
    assert holders(vm, 0x31) == [1]


def test_the_arbitration_counter_alternates_between_equal_candidates__LP_3() -> None:
    """LP-3 (vector_hashing off): v0, v1 both 0 -> 1st IPI v0 (v0=1), 2nd v1 (v1=1), 3rd v0."""
    vm = logical_vm([0x01, 0x02], vector_hashing=False)
    chosen = []
    for vector in (0x40, 0x41, 0x42):
        assert vm.deliver(lowest(vector, 0x03)) == 1
        chosen.append(holders(vm, vector))
    assert chosen == [[0], [1], [0]]
    assert (vm.lapic(0).arb_prio, vm.lapic(1).arb_prio) == (2, 1)


def test_the_arbitration_counter_on_the_slow_path__LP_3() -> None:
    """LP-3 on the slow path: smallest apic_arb_prio, ties to the lowest vCPU index."""
    vm = xapic_vm(3, vector_hashing=False)
    irq = Interrupt(0x43, LOWEST, shorthand=Shorthand.ALL_INCLUDING_SELF)
    order = []
    for _ in range(4):
        before = [vm.lapic(i).arb_prio for i in range(3)]
        assert vm.deliver(irq, vm.lapic(0)) == 1
        after = [vm.lapic(i).arb_prio for i in range(3)]
        order.append([i for i in range(3) if after[i] != before[i]])
    assert order == [[0], [1], [2], [0]]


def test_physical_lowest_priority_skips_arbitration_and_bumps_its_target__LP_4() -> None:
    """LP-4: a physical LOWEST message is delivered to the addressed target only, which
    increments its own apic_arb_prio; a software-disabled target still counts the attempt."""
    vm = xapic_vm(2)
    sw_enable(vm, 1, on=False)
    assert vm.deliver(lowest(0x44, 1, DestMode.PHYSICAL)) == 0
    assert vm.lapic(1).arb_prio == 1
    assert vm.deliver(lowest(0x44, 0, DestMode.PHYSICAL)) == 1
    assert (vm.lapic(0).arb_prio, holders(vm, 0x44)) == (1, [0])


# =============================================================================================
# Bug replays
# =============================================================================================
def test_two_vcpus_with_one_logical_id_both_receive__BUG_13() -> None:
    """BUG-13 (2970052481b9): v0, v1 both flat LDR 0x01, fixed logical dest 0x01 -> both
    receive (r=2)."""
    vm = logical_vm([0x01, 0x01])
    assert vm.deliver(fixed(0x45, 0x01, LOGICAL)) == 2
    assert holders(vm, 0x45) == [0, 1]


def test_a_multi_bit_logical_id_matches_on_every_bit__BUG_14() -> None:
    """BUG-14 (2bf934aadcac): v0 flat LDR 0x03, v1 0x04; logical dest 0x02 -> v0 receives."""
    vm = logical_vm([0x03, 0x04])
    assert vm.deliver(fixed(0x46, 0x02, LOGICAL)) == 1
    assert holders(vm, 0x46) == [0]


def test_aliased_8_bit_apic_ids_all_receive__BUG_15() -> None:
    """BUG-15 (5b84b0291702): vCPU0 and vCPU1 both xAPIC ID 0, physical IPI to 0 -> both."""
    vm = xapic_vm(2)
    set_xapic_id(vm, 1, 0)
    send_ipi(vm, 0, ICR_ASSERT | 0x47, 0)
    assert holders(vm, 0x47) == [0, 1]


def test_a_vcpu_added_after_the_map_was_built_is_addressable__BUG_16() -> None:
    """BUG-16 (4364b287982b): the map is sized for 255, then vCPU 300 is hot-added (and its
    guest enables x2APIC); an IPI to 300 must reach it, the map growing to 300."""
    vm = x2apic_vm([0, 1])
    apic_map = vm.apic_map
    assert apic_map is not None and apic_map.max_apic_id == 255
    vm.add_vcpu(300)
    guest_x2apic(vm, 2)
    sw_enable(vm, 2)
    send_ipi(vm, 0, ICR_ASSERT | 0x48, 300)
    assert holders(vm, 0x48) == [2]
    apic_map = vm.apic_map
    assert apic_map is not None and apic_map.max_apic_id == 300


def test_a_hot_added_xapic_vcpu_is_reached_by_id_300_under_x2apic_format__BUG_16() -> None:
    """BUG-16 with USE_32BIT_IDS: vCPU 300 fresh from RESET (xAPIC mode) is mapped at 300."""
    vm = x2apic_vm([0, 1], x2apic_format=True)
    vm.add_vcpu(300)
    sw_enable(vm, 2)
    assert vm.deliver(fixed(0x49, 300), vm.lapic(0)) == 1
    assert holders(vm, 0x49) == [2]


# =============================================================================================
# DIFF-D6 / DIFF-D8
# =============================================================================================
def test_logical_nmi_and_init_to_software_disabled_apics__DIFF_D6() -> None:
    """DIFF-D6: both APICs software-disabled (RESET state) with flat LDRs 0x01/0x02; logical
    NMI and INIT to 0x03: kvm -> map mode SW_DISABLED, dropped (0); sdm (no map) -> both
    accept (2), as SDM 10.4.7.2 says a software-disabled APIC still takes NMI and INIT."""
    for profile, expected in (("kvm", 0), ("sdm", 2)):
        vm = Vm(2, profile)
        set_logical(vm, 0, 0x01)
        set_logical(vm, 1, 0x02)
        nmi = Interrupt(0, DeliveryMode.NMI, LOGICAL, dest=0x03)
        init = Interrupt(0, DeliveryMode.INIT, LOGICAL, dest=0x03)
        assert vm.deliver(nmi) == expected, profile
        assert vm.deliver(init) == expected, profile
        assert [vm.lapic(i).nmi_pending for i in (0, 1)] == [expected // 2] * 2
        assert [vm.lapic(i).init_pending for i in (0, 1)] == [expected == 2] * 2


def test_a_software_disabled_apic_misses_logical_nmi_beside_an_enabled_one__DIFF_D6() -> None:
    """DIFF-D6 in a FLAT map: v0 software-enabled 0x01, v1 software-disabled 0x02; logical NMI
    to 0x03 -> kvm: only v0 (the flat table holds only software-enabled APICs); sdm: both."""
    for profile, expected in (("kvm", [1, 0]), ("sdm", [1, 1])):
        vm = logical_vm([0x01, 0x02], profile=profile)
        sw_enable(vm, 1, on=False)
        nmi = Interrupt(0, DeliveryMode.NMI, LOGICAL, dest=0x03)
        assert vm.deliver(nmi) == sum(expected), profile
        assert [vm.lapic(i).nmi_pending for i in (0, 1)] == expected, profile


def test_aliased_physical_ids_all_receive_unless_x2apic_format__DIFF_D8() -> None:
    """DIFF-D8: vCPU 0 and vCPU 256 (xAPIC ID (u8)256 = 0, the x2APIC wrap) share physical
    ID 0: kvm default -> both (2); kvm with x2apic_format -> lowest vCPU only (1); sdm (no
    map) -> both (2)."""
    for profile, x2apic_format, expected in (
        ("kvm", False, [0, 1]),
        ("kvm", True, [0]),
        ("sdm", False, [0, 1]),
    ):
        vm = Vm(profile=profile, vcpu_ids=[0, 256], x2apic_format=x2apic_format)
        sw_enable(vm, 0)
        sw_enable(vm, 1)
        assert vm.lapic(1).physical_id == 0
        assert vm.deliver(fixed(0x4A, 0)) == len(expected)
        assert holders(vm, 0x4A) == expected, (profile, x2apic_format)


def test_host_made_x2apic_vcpus_behave_like_guest_made_ones__FAST_7() -> None:
    """The same x2APIC topology built by KVM_SET_MSRS delivers like the guest-built one."""
    vm = Vm(4)
    for i in range(4):
        host_apic_base(vm, i, "x2apic")
        sw_enable(vm, i)
    assert vm.deliver(fixed(0x4B, 0x00000006, LOGICAL), vm.lapic(0)) == 2
    assert holders(vm, 0x4B) == [1, 2]


def test_level_triggered_deassert_fixed_messages_are_not_accepted__FAST_7() -> None:
    """ACCEPT-FIXED through the fast path: level trigger with level 0 is dropped by each
    target, so the count is 0 although both were addressed."""
    vm = logical_vm([0x01, 0x02])
    irq = Interrupt(0x4C, DeliveryMode.FIXED, LOGICAL, Level.DEASSERT, Trigger.LEVEL, dest=0x03)
    assert vm.deliver(irq) == 0
    assert holders(vm, 0x4C) == []


def test_the_kvm_profile_is_the_default__FAST_7() -> None:
    assert Vm(1).profile == KVM
