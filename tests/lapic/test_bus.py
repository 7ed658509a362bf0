"""The architectural bus (reference ``kvm_lapic.md`` §9, §10.3 SLOW-1/2, §11 LP-1..3, §8).

Messages go in as the guest sends them (ICR writes over MMIO or WRMSR, SELF IPI, MSIs through
``signal_msi``) or as decoded ``Interrupt`` values through ``deliver`` when the return value
is the point.  The hypothesis test at the end checks the bus against an oracle written from
the MATCH rules alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lapic.apic import LocalApic
from lapic.bus import ApicBus
from lapic.faults import ApicTypeError, ApicValueError
from lapic.icr import DeliveryMode, DestMode, Icr, Interrupt, Level, Shorthand, Trigger
from lapic.profile import LowestPriorityPolicy, Profile, reference_defaults
from lapic.timer import Clock

# ICR low-dword bits (reference §1.2)
LOWEST = 0x100
SMI = 0x200
NMI = 0x400
INIT = 0x500
STARTUP = 0x600
LOGICAL = 0x800
ASSERT = 0x4000
LEVEL = 0x8000
SELF = 0x40000
ALL = 0x80000
ALL_BUT_SELF = 0xC0000

APIC_BASE = 0x1B
XAPIC_ON = 0xFEE00800
X2APIC_ON = 0xFEE00C00
APIC_OFF = 0xFEE00000

MSI_BASE = 0xFEE00000
MSI_REDIR_HINT = 0x8
MSI_LOGICAL = 0x4


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def sw_enable(apic: LocalApic, svr: int = 0x1FF) -> None:
    if apic.x2apic_mode:
        apic.wrmsr(0x80F, svr)
    else:
        apic.mmio_write(0xF0, svr)


def enabled_bus(
    n: int,
    profile: str = "kvm",
    *,
    broadcast_quirk: bool | None = None,
    vector_hashing: bool | None = None,
) -> ApicBus:
    bus = ApicBus(n, profile, broadcast_quirk=broadcast_quirk, vector_hashing=vector_hashing)
    for apic in bus:
        sw_enable(apic)
    return bus


def to_x2apic(apic: LocalApic) -> None:
    apic.wrmsr(APIC_BASE, X2APIC_ON | (apic.apic_base & 0x100))


def xapic_icr(apic: LocalApic, dest: int, low: int) -> None:
    """ICR2 then ICR over MMIO (xAPIC mode)."""
    apic.mmio_write(0x310, dest << 24)
    apic.mmio_write(0x300, low)


def x2apic_icr(apic: LocalApic, dest: int, low: int) -> None:
    """WRMSR 0x830 (x2APIC mode): destination in bits 63:32."""
    apic.wrmsr(0x830, (dest << 32) | low)


def holders(bus: ApicBus, vector: int) -> list[int]:
    """Indexes of the APICs whose IRR holds ``vector``."""
    return [i for i, apic in enumerate(bus) if vector in apic.irr]


def msi_lo(dest: int, *, logical: bool = False, redir_hint: bool = False) -> int:
    return (
        MSI_BASE
        | ((dest & 0xFF) << 12)
        | (MSI_LOGICAL if logical else 0)
        | (MSI_REDIR_HINT if redir_hint else 0)
    )


def set_ldr(bus: ApicBus, ldrs: list[int], *, cluster: bool = False) -> None:
    for apic, lid in zip(bus, ldrs, strict=True):
        apic.mmio_write(0xD0, lid << 24)
        apic.mmio_write(0xE0, 0x0FFFFFFF if cluster else 0xFFFFFFFF)


# ---------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------
def test_bus_of_n_builds_vcpus_0_to_n_minus_1_with_bsp_first_and_one_clock() -> None:
    bus = ApicBus(3)
    assert len(bus) == 3
    assert [a.vcpu_id for a in bus] == [0, 1, 2]
    assert [a.bsp for a in bus] == [True, False, False]
    assert [a.apic_base for a in bus] == [0xFEE00900, 0xFEE00800, 0xFEE00800]
    assert all(a.clock is bus.clock for a in bus)
    assert list(bus) == [bus[0], bus[1], bus[2]]
    assert bus[-1] is bus[2]
    assert bus.profile == Profile.preset("kvm")
    assert all(a.profile == bus.profile for a in bus)


def test_bus_takes_profile_and_resolves_kvm_options() -> None:
    kvm = ApicBus(2)
    assert kvm.broadcast_quirk is True
    assert kvm.lowest_priority is LowestPriorityPolicy.VECTOR_HASHING
    opts = ApicBus(2, broadcast_quirk=False, vector_hashing=False)
    assert opts.broadcast_quirk is False
    assert opts.lowest_priority is LowestPriorityPolicy.ARB_COUNTER
    sdm = ApicBus(2, "sdm")
    assert sdm[0].profile.name == "sdm"
    assert sdm.broadcast_quirk is False
    assert sdm.lowest_priority is LowestPriorityPolicy.LOWEST_TPR
    assert ApicBus(2, "sdm", broadcast_quirk=True).broadcast_quirk is True


def test_vector_hashing_option_is_refused_under_lowest_tpr_policy() -> None:
    with pytest.raises(ApicValueError, match="vector_hashing"):
        ApicBus(2, "sdm", vector_hashing=True)
    arb = LowestPriorityPolicy.ARB_COUNTER
    assert ApicBus(2, "sdm", lowest_priority=arb, vector_hashing=True).lowest_priority is (
        LowestPriorityPolicy.VECTOR_HASHING
    )


@pytest.mark.parametrize("bad", [0, -1, 4097])
def test_bus_size_must_be_1_to_kvm_max_vcpus(bad: int) -> None:
    with pytest.raises(ApicValueError):
        ApicBus(bad)


def test_bus_refuses_non_int_non_list_arguments() -> None:
    with pytest.raises(ApicTypeError):
        ApicBus(True)
    with pytest.raises(ApicTypeError):
        ApicBus([object()])  # type: ignore[list-item]
    with pytest.raises(ApicTypeError):
        ApicBus(2, broadcast_quirk=1)  # type: ignore[arg-type]
    with pytest.raises(ApicTypeError):
        ApicBus(2, vector_hashing="yes")  # type: ignore[arg-type]


def test_bus_from_list_keeps_the_apics_and_their_clock() -> None:
    clock = Clock()
    apics = [LocalApic(vcpu_id=v, clock=clock) for v in (7, 0x123)]
    bus = ApicBus(apics)
    assert bus[0] is apics[0] and bus[1] is apics[1]
    assert bus.clock is clock
    sw_enable(apics[0])
    sw_enable(apics[1])
    xapic_icr(apics[1], 7, ASSERT | 0x44)  # through the send hook the bus installed
    assert holders(bus, 0x44) == [0]


def test_bus_from_list_needs_one_shared_clock() -> None:
    with pytest.raises(ApicValueError, match="Clock"):
        ApicBus([LocalApic(vcpu_id=0), LocalApic(vcpu_id=1)])


def test_bus_from_list_needs_distinct_vcpu_ids() -> None:
    clock = Clock()
    with pytest.raises(ApicValueError, match="distinct"):
        ApicBus([LocalApic(vcpu_id=1, clock=clock), LocalApic(vcpu_id=1, clock=clock)])
    a = LocalApic(vcpu_id=0, clock=clock)
    with pytest.raises(ApicValueError, match="distinct"):
        ApicBus([a, a])


def test_bus_from_list_needs_one_profile_matching_the_argument() -> None:
    clock = Clock()
    mixed = [LocalApic(0, "kvm", clock=clock), LocalApic(1, "sdm", clock=clock)]
    with pytest.raises(ApicValueError, match="Profile"):
        ApicBus(mixed)
    sdm = [LocalApic(0, "sdm", clock=clock), LocalApic(1, "sdm", clock=clock)]
    with pytest.raises(ApicValueError, match="profile"):
        ApicBus(sdm, "kvm")
    assert ApicBus(sdm).profile.name == "sdm"


def test_bus_from_list_refuses_empty_and_already_hooked_apics() -> None:
    with pytest.raises(ApicValueError, match="empty"):
        ApicBus([])
    first = ApicBus(2)
    with pytest.raises(ApicValueError, match="send_hook"):
        ApicBus(list(first))


def test_deliver_refuses_a_source_from_another_bus_and_malformed_messages() -> None:
    bus, other = ApicBus(2), ApicBus(2)
    with pytest.raises(ApicValueError, match="source"):
        bus.deliver(Interrupt(0x31, shorthand=Shorthand.ALL_EXCLUDING_SELF), other[0])
    with pytest.raises(ApicTypeError):
        bus.deliver(Interrupt(0x31, cast(DeliveryMode, 1)))  # plain int, not a DeliveryMode
    with pytest.raises(ApicTypeError):
        bus.deliver((0x31, DeliveryMode.FIXED))  # type: ignore[arg-type]
    with pytest.raises(ApicValueError):
        bus.deliver(Interrupt(0x131))


# ---------------------------------------------------------------------------------------
# SLOW-2: who is offered the message, and what deliver returns
# ---------------------------------------------------------------------------------------
def test_deliver_returns_minus_one_when_no_apic_matched__SLOW_2() -> None:
    bus = enabled_bus(4)
    assert bus.deliver(Interrupt(0x31, dest=0x10), bus[0]) == -1
    assert bus.deliver(Interrupt(0x31, dest=7), bus[0]) == -1
    assert bus.signal_msi(msi_lo(9), data=0x31) == -1
    assert holders(bus, 0x31) == []


def test_deliver_returns_zero_when_the_match_discards_it__SLOW_2_ACCEPT() -> None:
    bus = ApicBus(2)  # after RESET every APIC is software-disabled
    assert not bus[1].sw_enabled
    assert bus.deliver(Interrupt(0x31, dest=1), bus[0]) == 0
    assert holders(bus, 0x31) == []
    sw_enable(bus[1])
    # level-triggered de-assert of a FIXED interrupt is discarded too (§8)
    deassert = Interrupt(0x31, dest=1, level=Level.DEASSERT, trigger=Trigger.LEVEL)
    assert bus.deliver(deassert, bus[0]) == 0


def test_deliver_returns_the_number_that_accepted__SLOW_2() -> None:
    bus = ApicBus(4)
    sw_enable(bus[1])
    sw_enable(bus[3])
    assert bus.deliver(Interrupt(0x31, dest=0xFF), bus[0]) == 2
    assert holders(bus, 0x31) == [1, 3]
    assert bus.deliver(Interrupt(0x32, dest=3), bus[0]) == 1
    assert holders(bus, 0x32) == [3]


def test_hardware_disabled_apics_are_never_considered__SLOW_2_MATCH_2() -> None:
    bus = enabled_bus(3)
    bus[1].wrmsr(APIC_BASE, APIC_OFF)
    assert not bus[1].hw_enabled
    assert bus[1].sw_enabled  # kvm keeps SVR across EN=0: still not a candidate
    assert bus.deliver(Interrupt(2, DeliveryMode.NMI, dest=0xFF), bus[0]) == 2
    assert [a.nmi_pending for a in bus] == [1, 0, 1]
    assert bus.deliver(Interrupt(0, DeliveryMode.INIT, shorthand=Shorthand.ALL_INCLUDING_SELF),
                       bus[0]) == 2
    assert [a.init_pending for a in bus] == [True, False, True]
    assert bus.deliver(Interrupt(0x31, dest=1), bus[0]) == -1
    # lowest priority: 2 candidates (0 and 2), so 0x31 (49 % 2 = 1) goes to index 2
    assert bus.deliver(Interrupt(0x31, DeliveryMode.LOWEST, dest=0xFF,
                                 dest_mode=DestMode.LOGICAL), bus[0]) == 1
    assert holders(bus, 0x31) == [2]


@pytest.mark.parametrize("profile", ["kvm", "sdm"])
def test_software_disabled_apic_still_accepts_nmi_init_and_sipi__ACCEPT_NMI(
    profile: str,
) -> None:
    bus = ApicBus(2, profile)
    assert not bus[1].sw_enabled
    xapic_icr(bus[0], 1, ASSERT | NMI)
    assert bus[1].nmi_pending == 1
    xapic_icr(bus[0], 1, ASSERT | INIT)
    assert bus[1].init_pending
    xapic_icr(bus[0], 1, ASSERT | STARTUP | 0x9A)
    assert bus[1].sipi_pending and bus[1].sipi_vector == 0x9A
    assert bus.deliver(Interrupt(2, DeliveryMode.NMI, dest=1), bus[0]) == 1
    assert bus.deliver(Interrupt(0x31, dest=1), bus[0]) == 0
    assert bus[0].nmi_pending == 0 and not bus[0].init_pending


# ---------------------------------------------------------------------------------------
# SLOW-1: physical broadcast + lowest priority
# ---------------------------------------------------------------------------------------
def test_physical_broadcast_lowest_priority_becomes_fixed_to_all__SLOW_1() -> None:
    bus = enabled_bus(3)
    irq = Interrupt(0x41, DeliveryMode.LOWEST, DestMode.PHYSICAL, dest=0xFF)
    assert bus.deliver(irq, bus[0]) == 3
    assert holders(bus, 0x41) == [0, 1, 2]
    assert [a.arb_prio for a in bus] == [0, 0, 0]  # accepted as FIXED: no arbitration count
    xapic_icr(bus[1], 0xFF, ASSERT | LOWEST | 0x51)
    assert holders(bus, 0x51) == [0, 1, 2]


def test_physical_broadcast_with_redirection_hint_stays_one_target__SLOW_1_LP_1() -> None:
    # KVM rewrites only the delivery mode; msi_redir_hint keeps kvm_lowest_prio_delivery()
    # true, so the rewritten FIXED message still goes to one arbitrated APIC.
    bus = enabled_bus(3)
    r = bus.signal_msi(msi_lo(0xFF, redir_hint=True), data=LOWEST | 0x31)
    assert r == 1
    assert holders(bus, 0x31) == [1]  # 49 % 3 == 1
    assert [a.arb_prio for a in bus] == [0, 0, 0]  # delivered as FIXED


def test_redirection_hint_rewrites_any_delivery_mode_to_fixed_at_0xff__SLOW_1() -> None:
    # kvm_lowest_prio_delivery() is true for the hint alone, so even an NMI-mode MSI with the
    # hint, sent to physical 0xFF, becomes FIXED (vector 0x31) at one arbitrated APIC.
    bus = enabled_bus(3)
    assert bus.signal_msi(msi_lo(0xFF, redir_hint=True), data=NMI | 0x31) == 1
    assert [a.nmi_pending for a in bus] == [0, 0, 0]
    assert holders(bus, 0x31) == [1]
    # ExtINT, never accepted through this path, is accepted once rewritten
    assert bus.signal_msi(msi_lo(0xFF, redir_hint=True), data=0x700 | 0x32) == 1
    assert holders(bus, 0x32) == [2]  # 50 % 3 == 2
    # without the hint (or to another destination) the mode is kept
    assert bus.signal_msi(msi_lo(0xFF), data=NMI | 0x33) == 3
    assert [a.nmi_pending for a in bus] == [1, 1, 1]
    assert bus.signal_msi(msi_lo(0x01, redir_hint=True), data=NMI | 0x34) == 1
    assert [a.nmi_pending for a in bus] == [1, 2, 1]
    assert holders(bus, 0x33) == holders(bus, 0x34) == []


def test_logical_broadcast_lowest_priority_is_not_rewritten__SLOW_1() -> None:
    bus = enabled_bus(3)
    irq = Interrupt(0x31, DeliveryMode.LOWEST, DestMode.LOGICAL, dest=0xFF)
    assert bus.deliver(irq, bus[0]) == 1
    assert holders(bus, 0x31) == [1]
    assert [a.arb_prio for a in bus] == [0, 1, 0]
    unicast = Interrupt(0x32, DeliveryMode.LOWEST, DestMode.PHYSICAL, dest=2)
    assert bus.deliver(unicast, bus[0]) == 1
    assert holders(bus, 0x32) == [2]


# ---------------------------------------------------------------------------------------
# LP-1..3: lowest priority
# ---------------------------------------------------------------------------------------
def test_lowest_priority_considers_only_software_enabled_matches__LP_1() -> None:
    bus = ApicBus(4)
    for apic in list(bus)[1:]:
        sw_enable(apic)
    irq = Interrupt(0x31, DeliveryMode.LOWEST, shorthand=Shorthand.ALL_INCLUDING_SELF)
    assert bus.deliver(irq, bus[0]) == 1
    assert holders(bus, 0x31) == [2]  # candidates 1, 2, 3: 49 % 3 = 1 -> the second, index 2


def test_lowest_priority_with_no_software_enabled_match_returns_minus_one__LP_1() -> None:
    bus = ApicBus(3)  # all software-disabled
    irq = Interrupt(0x31, DeliveryMode.LOWEST, shorthand=Shorthand.ALL_INCLUDING_SELF)
    assert bus.deliver(irq, bus[0]) == -1
    assert [a.arb_prio for a in bus] == [0, 0, 0]


def test_lowest_priority_returns_the_chosen_apics_answer__LP_1() -> None:
    bus = enabled_bus(2)
    deassert = Interrupt(0x31, DeliveryMode.LOWEST, level=Level.DEASSERT,
                         trigger=Trigger.LEVEL, shorthand=Shorthand.ALL_INCLUDING_SELF)
    assert bus.deliver(deassert, bus[0]) == 0  # offered to one, which discarded it
    assert holders(bus, 0x31) == []
    assert [a.arb_prio for a in bus] == [0, 1]  # the attempt still counted (§8)


def test_msi_redirection_hint_makes_a_fixed_message_lowest_priority__LP_1() -> None:
    bus = enabled_bus(3)
    set_ldr(bus, [0x01, 0x02, 0x04])
    assert bus.signal_msi(msi_lo(0x07, logical=True), data=0x30) == 3
    assert holders(bus, 0x30) == [0, 1, 2]
    assert bus.signal_msi(msi_lo(0x07, logical=True, redir_hint=True), data=0x31) == 1
    assert holders(bus, 0x31) == [1]


@pytest.mark.parametrize("hashing", [True, False])
def test_kvm_lowest_priority_never_looks_at_tpr__LP_1_DIFF_D5(hashing: bool) -> None:
    bus = enabled_bus(2, vector_hashing=hashing)
    bus[0].mmio_write(0x80, 0xF0)  # v0 at the highest task priority
    irq = Interrupt(0x30, DeliveryMode.LOWEST, shorthand=Shorthand.ALL_INCLUDING_SELF)
    assert bus.deliver(irq, bus[1]) == 1
    assert holders(bus, 0x30) == [0]  # hashing: 48 % 2 = 0; counter: tie -> first


@pytest.mark.parametrize(("profile", "winner"), [("kvm", 0), ("sdm", 1)])
def test_lowest_priority_flat_example_per_profile__DIFF_D5(profile: str, winner: int) -> None:
    bus = enabled_bus(2, profile)
    set_ldr(bus, [0x01, 0x02])
    bus[0].mmio_write(0x80, 0x20)
    bus[1].mmio_write(0x80, 0x10)
    assert bus.signal_msi(msi_lo(0x03, logical=True), data=LOWEST | 0x30) == 1
    # kvm: 48 % 2 = 0 -> v0; sdm: no focus processor, v1 has the lower TPR class
    assert holders(bus, 0x30) == [winner]


def test_slow_path_example_allinc_lowest_vector_0x31_goes_to_index_1__LP_2() -> None:
    bus = enabled_bus(3)
    xapic_icr(bus[0], 0, ASSERT | ALL | LOWEST | 0x31)
    assert holders(bus, 0x31) == [1]
    assert [a.arb_prio for a in bus] == [0, 1, 0]


def test_vector_hashing_flat_examples__LP_2() -> None:
    bus = enabled_bus(2)
    set_ldr(bus, [0x01, 0x02])
    src = bus[0]
    xapic_icr(src, 0x03, ASSERT | LOGICAL | LOWEST | 0x30)
    xapic_icr(src, 0x03, ASSERT | LOGICAL | LOWEST | 0x31)
    assert holders(bus, 0x30) == [0]
    assert holders(bus, 0x31) == [1]
    # dest 0x07: the slow path counts only matching APICs (n = 2, not 3 as in the fast path),
    # so 0x32 (50 % 2 = 0) reaches v0 instead of being dropped.
    irq = Interrupt(0x32, DeliveryMode.LOWEST, DestMode.LOGICAL, dest=0x07)
    assert bus.deliver(irq, src) == 1
    assert holders(bus, 0x32) == [0]


def test_vector_hashing_cluster_example__LP_2() -> None:
    bus = enabled_bus(2)
    set_ldr(bus, [0x11, 0x12], cluster=True)
    xapic_icr(bus[0], 0x13, ASSERT | LOGICAL | LOWEST | 0x41)
    assert holders(bus, 0x41) == [1]


def test_vector_hashing_x2apic_example__LP_2() -> None:
    bus = enabled_bus(4)
    for apic in bus:
        to_x2apic(apic)
    x2apic_icr(bus[0], 0x0000000F, ASSERT | LOGICAL | LOWEST | 0x22)
    assert holders(bus, 0x22) == [2]


def test_arbitration_counter_alternates_v0_v1_v0__LP_3() -> None:
    bus = enabled_bus(2, vector_hashing=False)
    seen = []
    for vector in (0x40, 0x41, 0x42):
        xapic_icr(bus[0], 0, ASSERT | ALL | LOWEST | vector)
        seen.append(holders(bus, vector))
    assert seen == [[0], [1], [0]]
    assert [a.arb_prio for a in bus] == [2, 1]


def test_arbitration_counter_picks_the_smallest_count__LP_3() -> None:
    bus = enabled_bus(3, vector_hashing=False)
    # physical lowest priority has one target, which still counts the attempt (LP-4)
    xapic_icr(bus[2], 0, ASSERT | LOWEST | 0x50)
    xapic_icr(bus[2], 1, ASSERT | LOWEST | 0x51)
    assert [a.arb_prio for a in bus] == [1, 1, 0]
    xapic_icr(bus[0], 0, ASSERT | ALL | LOWEST | 0x52)
    assert holders(bus, 0x52) == [2]


# ---------------------------------------------------------------------------------------
# SDM lowest priority (LOWEST_TPR)
# ---------------------------------------------------------------------------------------
def sdm_lowest_to_all(bus: ApicBus, vector: int) -> int:
    return bus.signal_msi(msi_lo(0xFF, logical=True), data=LOWEST | vector)


def test_sdm_lowest_priority_goes_to_the_lowest_tpr_class_first_index() -> None:
    bus = enabled_bus(3, "sdm")
    for apic, tpr in zip(bus, (0x25, 0x1F, 0x10), strict=True):
        apic.mmio_write(0x80, tpr)
    assert sdm_lowest_to_all(bus, 0x61) == 1
    # classes 2, 1, 1: index 1 wins the tie with index 2 despite its larger TPR byte
    assert holders(bus, 0x61) == [1]
    bus[1].mmio_write(0x80, 0x30)
    assert sdm_lowest_to_all(bus, 0x62) == 1
    assert holders(bus, 0x62) == [2]


def test_sdm_focus_processor_wins_over_lower_tpr() -> None:
    bus = enabled_bus(3, "sdm")
    for apic, tpr in zip(bus, (0xE0, 0x10, 0x00), strict=True):
        apic.mmio_write(0x80, tpr)
    xapic_icr(bus[2], 0, ASSERT | 0x71)  # 0x71 now pending in v0's IRR
    assert sdm_lowest_to_all(bus, 0x71) == 1
    assert holders(bus, 0x71) == [0]
    bus[0].mmio_write(0x80, 0)
    assert bus[0].ack() == 0x71  # IRR -> ISR: still the focus processor
    bus[0].mmio_write(0x80, 0xE0)
    assert sdm_lowest_to_all(bus, 0x71) == 1
    assert holders(bus, 0x71) == [0]
    assert 0x71 in bus[0].isr


def test_sdm_focus_check_disabled_falls_back_to_tpr() -> None:
    bus = enabled_bus(3, "sdm")
    for apic, tpr in zip(bus, (0xE0, 0x10, 0x00), strict=True):
        apic.mmio_write(0x80, tpr)
    sw_enable(bus[0], 0x3FF)  # SVR bit 9: focus processor checking disabled
    xapic_icr(bus[2], 0, ASSERT | 0x71)
    assert sdm_lowest_to_all(bus, 0x71) == 1
    assert holders(bus, 0x71) == [0, 2]  # v0 from the fixed IPI, v2 from arbitration


# ---------------------------------------------------------------------------------------
# ICR writes, end to end (MATCH-2..5 through real registers)
# ---------------------------------------------------------------------------------------
def test_xapic_physical_unicast_over_mmio__MATCH_4() -> None:
    bus = enabled_bus(4)
    xapic_icr(bus[0], 2, ASSERT | 0x31)
    assert holders(bus, 0x31) == [2]
    bus[3].mmio_write(0x20, 0x20000000)  # kvm: the xAPIC ID is writable (REG-ID-1)
    xapic_icr(bus[0], 0x20, ASSERT | 0x32)
    xapic_icr(bus[0], 3, ASSERT | 0x33)
    assert holders(bus, 0x32) == [3]
    assert holders(bus, 0x33) == []


def test_xapic_logical_flat_multicast_over_mmio__MATCH_5() -> None:
    bus = enabled_bus(4)
    set_ldr(bus, [0x01, 0x02, 0x04, 0x08])
    xapic_icr(bus[1], 0x05, ASSERT | LOGICAL | 0x31)
    assert holders(bus, 0x31) == [0, 2]
    xapic_icr(bus[1], 0x0A, ASSERT | LOGICAL | 0x32)
    assert holders(bus, 0x32) == [1, 3]


def test_xapic_logical_cluster_over_mmio__MATCH_5() -> None:
    bus = enabled_bus(3)
    set_ldr(bus, [0x11, 0x12, 0x21], cluster=True)
    xapic_icr(bus[2], 0x13, ASSERT | LOGICAL | 0x31)
    assert holders(bus, 0x31) == [0, 1]
    xapic_icr(bus[0], 0x23, ASSERT | LOGICAL | 0x32)
    assert holders(bus, 0x32) == [2]


def test_shorthands_self_all_and_all_but_self_over_mmio__MATCH_2() -> None:
    bus = enabled_bus(4)
    xapic_icr(bus[1], 3, SELF | 0x31)  # no ASSERT bit needed, dest ignored (ICR-6)
    xapic_icr(bus[1], 3, ASSERT | ALL | 0x32)
    xapic_icr(bus[1], 3, ASSERT | ALL_BUT_SELF | 0x33)
    assert holders(bus, 0x31) == [1]
    assert holders(bus, 0x32) == [0, 1, 2, 3]
    assert holders(bus, 0x33) == [0, 2, 3]


def test_xapic_physical_broadcast_0xff__MATCH_3() -> None:
    bus = enabled_bus(3)
    xapic_icr(bus[2], 0xFF, ASSERT | 0x31)
    assert holders(bus, 0x31) == [0, 1, 2]


def test_x2apic_icr_over_msr_unicast_logical_and_broadcast__MATCH_3_MATCH_5() -> None:
    bus = enabled_bus(4)
    for apic in bus:
        to_x2apic(apic)
    x2apic_icr(bus[0], 2, ASSERT | 0x31)
    assert holders(bus, 0x31) == [2]
    x2apic_icr(bus[0], 0x00000006, ASSERT | LOGICAL | 0x32)
    assert holders(bus, 0x32) == [1, 2]
    x2apic_icr(bus[0], 0xFFFFFFFF, ASSERT | 0x33)
    assert holders(bus, 0x33) == [0, 1, 2, 3]
    x2apic_icr(bus[3], 0xFF, ASSERT | 0x34)  # 0xFF is x2APIC ID 255, not a broadcast
    assert holders(bus, 0x34) == []
    bus[3].wrmsr(0x83F, 0x35)  # SELF IPI register
    assert holders(bus, 0x35) == [3]


def test_mixed_mode_xapic_source_0xff_reaches_x2apic_only_at_id_255__MATCH_3() -> None:
    clock = Clock()
    bus = ApicBus([LocalApic(vcpu_id=v, clock=clock) for v in (0, 1, 255)])
    for apic in bus:
        sw_enable(apic)
    to_x2apic(bus[1])
    to_x2apic(bus[2])
    xapic_icr(bus[0], 0xFF, ASSERT | 0x31)
    assert holders(bus, 0x31) == [0, 2]  # xAPIC broadcast; x2APIC ID 255; not x2APIC ID 1
    xapic_icr(bus[0], 0xFF, ASSERT | LOGICAL | 0x32)
    # logical: v0 (flat, LDR 0) by broadcast; x2APIC id 1 is cluster 0 bit 1; id 255 is
    # cluster 15
    assert holders(bus, 0x32) == [0, 1]


@pytest.mark.parametrize(("profile", "xapic_gets_it"), [("kvm", False), ("sdm", True)])
def test_x2apic_broadcast_reaches_xapic_target_per_profile__MATCH_3_DIFF_D7(
    profile: str, xapic_gets_it: bool
) -> None:
    bus = enabled_bus(2, profile)
    to_x2apic(bus[0])
    x2apic_icr(bus[0], 0xFFFFFFFF, ASSERT | 0x31)
    # kvm: 0xFFFFFFFF is not 0xFF, and > 0xFF compares the x2APIC ID (hotplug hack);
    # sdm: the xAPIC target compares 0xFFFFFFFF & 0xFF = 0xFF, its broadcast
    assert holders(bus, 0x31) == ([0, 1] if xapic_gets_it else [0])


@pytest.mark.parametrize(("profile", "reached_by_0x223"), [("kvm", []), ("sdm", [1])])
def test_xapic_vcpu_0x123_is_reached_by_its_x2apic_id__MATCH_4_DIFF_D7(
    profile: str, reached_by_0x223: list[int]
) -> None:
    clock = Clock()
    bus = ApicBus([LocalApic(vcpu_id=v, profile=profile, clock=clock) for v in (0, 0x123)])
    for apic in bus:
        sw_enable(apic)
    to_x2apic(bus[0])
    assert not bus[1].x2apic_mode and bus[1].physical_id == 0x23
    # kvm: the hotplug hack compares 0x123 with the x2APIC ID; sdm: 0x23 with the xAPIC ID
    x2apic_icr(bus[0], 0x123, ASSERT | 0x32)
    assert holders(bus, 0x32) == [1]
    # they part on 0x223: kvm compares it with 0x123 (no), sdm compares 0x23 (yes)
    x2apic_icr(bus[0], 0x223, ASSERT | 0x31)
    assert holders(bus, 0x31) == reached_by_0x223


# ---------------------------------------------------------------------------------------
# MSIs
# ---------------------------------------------------------------------------------------
def test_msi_physical_and_logical_delivery() -> None:
    bus = enabled_bus(3)
    set_ldr(bus, [0x01, 0x02, 0x04])
    assert bus.signal_msi(msi_lo(2), data=0x31) == 1
    assert holders(bus, 0x31) == [2]
    assert bus.signal_msi(msi_lo(0x03, logical=True), data=0x32) == 2
    assert holders(bus, 0x32) == [0, 1]
    assert bus.signal_msi(msi_lo(0x03, logical=True), data=NMI) == 2
    assert [a.nmi_pending for a in bus] == [1, 1, 0]
    assert bus.signal_msi(msi_lo(1), data=LEVEL | 0x33) == 1  # level is always asserted
    assert 0x33 in bus[1].tmr


@pytest.mark.parametrize(
    ("profile", "quirk", "expected"),
    [
        ("kvm", None, [0, 1, 2, 3]),
        ("kvm", False, [0, 1]),
        ("sdm", None, [0, 1]),
        ("sdm", True, [0, 1, 2, 3]),
    ],
)
def test_msi_to_0xff_reaches_x2apic_targets_with_the_broadcast_quirk__MATCH_1_DIFF_D9(
    profile: str, quirk: bool | None, expected: list[int]
) -> None:
    bus = enabled_bus(4, profile, broadcast_quirk=quirk)
    to_x2apic(bus[2])
    to_x2apic(bus[3])
    assert bus.signal_msi(msi_lo(0xFF), data=0x31) == len(expected)
    assert holders(bus, 0x31) == expected


def test_ipi_to_0xff_never_uses_the_broadcast_quirk__MATCH_1() -> None:
    bus = enabled_bus(3)
    to_x2apic(bus[2])
    xapic_icr(bus[0], 0xFF, ASSERT | 0x31)
    assert holders(bus, 0x31) == [0, 1]


def test_msi_32_bit_destination_needs_x2apic_format() -> None:
    clock = Clock()
    bus = ApicBus([LocalApic(vcpu_id=v, clock=clock) for v in (0, 0x123)])
    for apic in bus:
        sw_enable(apic)
        to_x2apic(apic)
    assert bus.signal_msi(msi_lo(0x23), 0x100, 0x31, x2apic_format=True) == 1
    assert holders(bus, 0x31) == [1]
    assert bus.signal_msi(msi_lo(0x23), 0x100, 0x32) == -1  # address_hi ignored: dest 0x23


def test_signal_msi_checks_its_arguments() -> None:
    bus = ApicBus(1)
    with pytest.raises(ApicValueError):
        bus.signal_msi(1 << 32)
    with pytest.raises(ApicTypeError):
        bus.signal_msi(MSI_BASE, x2apic_format=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# time
# ---------------------------------------------------------------------------------------
def test_advance_moves_the_shared_clock_and_fires_every_timer() -> None:
    bus = enabled_bus(3)
    for apic, count in zip(bus, (100, 150, 0), strict=True):
        apic.mmio_write(0x320, 0xEF)  # LVT timer: one-shot, vector 0xEF
        apic.mmio_write(0x380, count)  # divide by 2 at 1 ns per bus cycle: 2 ns per count
    assert bus.advance(199) == 0
    assert bus.advance(1) == 1
    assert holders(bus, 0xEF) == [0]
    assert bus.advance(100) == 1
    assert holders(bus, 0xEF) == [0, 1]
    assert bus.clock.now == 300 and all(a.clock.now == 300 for a in bus)
    for apic in bus:
        apic.mmio_write(0x380, 50)
    assert bus.advance(1000) == 3


# ---------------------------------------------------------------------------------------
# hypothesis: the bus against an oracle built from the MATCH rules
# ---------------------------------------------------------------------------------------
ID_POOL = [0, 1, 2, 3, 5, 7, 8, 15, 16, 17, 0x23, 0x7F, 0xFF, 0x100, 0x123, 0x1FF]
LDR_POOL = [0x00, 0x01, 0x02, 0x03, 0x04, 0x08, 0x10, 0x11, 0x12, 0x21, 0x80, 0xF1, 0xFF]


@dataclass(frozen=True)
class ApicSetup:
    vcpu_id: int
    mode: str  # "xapic", "x2apic" or "off"
    xapic_id: int | None  # value written to the ID register, if any
    ldr: int  # logical ID byte written to LDR[31:24]
    dfr_model: int  # DFR[31:28]: 0xF flat, 0x0 cluster, 0x5 neither
    sw_enabled: bool


@dataclass(frozen=True)
class Scenario:
    profile: str
    quirk: bool | None
    apics: tuple[ApicSetup, ...]
    sender: int | None  # None: an MSI
    via_deliver: bool  # IPI handed to bus.deliver instead of written to the ICR
    shorthand: Shorthand
    dest_mode: DestMode
    dest: int
    vector: int
    x2apic_format: bool


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    ids = draw(st.lists(st.sampled_from(ID_POOL), min_size=2, max_size=6, unique=True))
    apics = tuple(
        ApicSetup(
            vcpu_id=v,
            mode=draw(st.sampled_from(["xapic", "xapic", "x2apic", "off"])),
            xapic_id=draw(st.none() | st.sampled_from(ID_POOL).map(lambda i: i & 0xFF)),
            ldr=draw(st.sampled_from(LDR_POOL) | st.integers(0, 0xFF)),
            dfr_model=draw(st.sampled_from([0xF, 0xF, 0x0, 0x5])),
            sw_enabled=draw(st.booleans() | st.just(True)),
        )
        for v in ids
    )
    live = [i for i, a in enumerate(apics) if a.mode != "off"]
    msi = not live or draw(st.integers(0, 3)) == 0  # one message in four is an MSI
    sender = None if msi else draw(st.sampled_from(live))
    wide = (
        apics[sender].mode == "x2apic" if sender is not None else draw(st.booleans())
    )
    interesting = {0xFF, 0xFFFFFFFF}
    for a in apics:
        interesting |= {a.vcpu_id, a.ldr, a.xapic_id or 0, (a.vcpu_id >> 4) << 16 |
                        (1 << (a.vcpu_id & 0xF))}
    for a, b in itertools.pairwise(apics):
        interesting.add(a.ldr | b.ldr)
    limit = 0xFFFFFFFF if wide else 0xFF
    dest = draw(st.sampled_from(sorted(interesting)) | st.integers(0, limit)) & limit
    shorthand = (
        Shorthand.NONE
        if sender is None
        else draw(st.sampled_from([Shorthand.NONE, Shorthand.NONE, *Shorthand]))
    )
    return Scenario(
        profile=draw(st.sampled_from(["kvm", "sdm"])),
        quirk=draw(st.sampled_from([None, True, False])),
        apics=apics,
        sender=sender,
        via_deliver=draw(st.booleans()),
        shorthand=shorthand,
        dest_mode=draw(st.sampled_from(DestMode)),
        dest=dest,
        vector=draw(st.integers(16, 255)),
        x2apic_format=sender is None and wide,
    )


def build(s: Scenario) -> ApicBus:
    clock = Clock()
    apics = [LocalApic(vcpu_id=a.vcpu_id, profile=s.profile, clock=clock) for a in s.apics]
    for apic, a in zip(apics, s.apics, strict=True):
        if a.xapic_id is not None:
            apic.mmio_write(0x20, a.xapic_id << 24)
        apic.mmio_write(0xD0, a.ldr << 24)
        apic.mmio_write(0xE0, a.dfr_model << 28)
        if a.sw_enabled:
            apic.mmio_write(0xF0, 0x1FF)
        if a.mode == "x2apic":
            apic.wrmsr(APIC_BASE, X2APIC_ON)
        elif a.mode == "off":
            apic.wrmsr(APIC_BASE, APIC_OFF)
    return ApicBus(apics, broadcast_quirk=s.quirk)


def addressed(s: Scenario, i: int) -> bool:
    """Reference §9 MATCH-1..7 for a present APIC, stated afresh (no lapic.destination)."""
    p = Profile.preset(s.profile)
    a = s.apics[i]
    x2 = a.mode == "x2apic"
    if s.shorthand is Shorthand.SELF:
        return i == s.sender
    if s.shorthand is Shorthand.ALL_INCLUDING_SELF:
        return True
    if s.shorthand is Shorthand.ALL_EXCLUDING_SELF:
        return i != s.sender
    quirk = reference_defaults(p)[0] if s.quirk is None else s.quirk
    m = s.dest
    if quirk and s.sender is None and m == 0xFF and x2:  # MATCH-1
        m = 0xFFFFFFFF
    if not x2 and not p.xapic_matches_x2apic_id:  # DIFF-D7, sdm: an 8-bit APIC sees 8 bits
        m &= 0xFF
    if m == (0xFFFFFFFF if x2 else 0xFF):  # MATCH-3
        return True
    if s.dest_mode is DestMode.PHYSICAL:  # MATCH-4
        if x2 or m > 0xFF:
            return m == a.vcpu_id
        xid = a.xapic_id if a.xapic_id is not None and p.xapic_id_writable else a.vcpu_id & 0xFF
        return m == xid
    if x2:  # MATCH-5 / MATCH-7: cluster = id[31:4], member bit = id[3:0]
        return m >> 16 == a.vcpu_id >> 4 and (m >> (a.vcpu_id & 0xF)) & 1 == 1
    if a.dfr_model == 0xF:  # flat
        return a.ldr & m != 0
    if a.dfr_model == 0x0:  # cluster (MATCH-6: sdm has no cluster 15)
        if m >> 4 == 0xF and not p.cluster15_addressable:
            return False
        return a.ldr >> 4 == m >> 4 and a.ldr & m & 0xF != 0
    return False


@given(scenarios())
def test_fixed_message_reaches_exactly_the_oracle_set__MATCH_1_to_7_SLOW_2(
    s: Scenario,
) -> None:
    bus = build(s)
    matched = [i for i, a in enumerate(s.apics) if a.mode != "off" and addressed(s, i)]
    expected = [i for i in matched if s.apics[i].sw_enabled]
    low = Icr.low_of(Icr(s.vector, DeliveryMode.FIXED, s.dest_mode, Level.ASSERT, Trigger.EDGE,
                         s.shorthand))
    if s.sender is None:
        lo = msi_lo(s.dest, logical=s.dest_mode is DestMode.LOGICAL)
        r = bus.signal_msi(lo, s.dest & 0xFFFFFF00, s.vector, x2apic_format=s.x2apic_format)
        assert r == (len(expected) if matched else -1)
    elif s.via_deliver:
        irq = Interrupt(s.vector, DeliveryMode.FIXED, s.dest_mode, Level.ASSERT, Trigger.EDGE,
                        s.shorthand, s.dest)
        r = bus.deliver(irq, bus[s.sender])
        assert r == (len(expected) if matched else -1)
    elif s.apics[s.sender].mode == "x2apic":
        x2apic_icr(bus[s.sender], s.dest, low)
    else:
        xapic_icr(bus[s.sender], s.dest, low)
    assert holders(bus, s.vector) == expected
