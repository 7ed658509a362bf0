"""Per-register write semantics (reference ``kvm_lapic.md`` §5) and the register table.

Rules: REG-ID-1, REG-TPR-1, REG-EOI-1, REG-LDR-1, REG-DFR-1, REG-SVR-1, REG-SVR-2,
REG-LVT-1, REG-LVT-2, REG-ESR-1, REG-LVR-1; differences DIFF-D1, D12, D13, D18, D19 (§16).
The table test ties ``lapic.registers.REGISTERS`` (Access per mode) to MMIO and RDMSR
behaviour; the hypothesis property ties ``write_mask`` to what an xAPIC write stores.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lapic import ApicMode, Features, GuestFault, LocalApic, Profile
from lapic.registers import (
    LVT_DELIVERY_STATUS,
    LVT_MASKED,
    LVT_REGISTERS,
    LVT_REMOTE_IRR,
    LVT_TIMER_MODE,
    REGISTER_BY_MSR,
    REGISTER_BY_NAME,
    REGISTER_BY_OFFSET,
    REGISTERS,
    TIMER_PERIODIC,
    Access,
    Register,
    markdown_table,
)
from tests.lapic.strategies import (
    PROFILE_NAMES,
    ApicConfig,
    apic_configs,
    assert_gp,
    hex_id,
    make_apic,
    register_values,
    snapshot,
)

SENTINEL = 0xA5A5A5A5
"""``unserviced_read_value`` for tests that must tell a not-serviced read from a 0 read."""


def sentinel_profile(name: str) -> Profile:
    """Preset ``name`` whose not-serviced reads return :data:`SENTINEL`."""
    return Profile.custom(name, unserviced_read_value=SENTINEL, unserviced_read_repeats_last=False)

LVT_OFFSETS = {
    "LVTT": 0x320,
    "LVTTHMR": 0x330,
    "LVTPC": 0x340,
    "LVT0": 0x350,
    "LVT1": 0x360,
    "LVTERR": 0x370,
    "LVTCMCI": 0x2F0,
}


def isr_with(apic: LocalApic, *vectors: int) -> None:
    """Put ``vectors`` (ascending priority) in service: accept then acknowledge each."""
    for v in vectors:
        assert apic.accept(v)
        assert apic.ack() == v


# --- REG-ID-1 / DIFF-D18 ----------------------------------------------------------------


def test_kvm_xapic_id_write_keeps_bits_31_24__REG_ID_1() -> None:
    """Reference example: write 0x07ABCDEF -> read 0x07000000."""
    apic = make_apic("kvm", vcpu_id=2)
    apic.mmio_write(0x020, 0x07ABCDEF)
    assert apic.mmio_read(0x020) == 0x07000000
    assert apic.physical_id == 7


def test_sdm_xapic_id_is_read_only__REG_ID_1__DIFF_D18() -> None:
    apic = make_apic("sdm", vcpu_id=2)
    before = snapshot(apic)
    apic.mmio_write(0x020, 0x07ABCDEF)
    assert apic.mmio_read(0x020) == 0x02000000
    assert snapshot(apic) == before


@pytest.mark.parametrize(("base", "writable"), [("kvm", False), ("sdm", True)])
def test_xapic_id_writability_follows_the_profile_knob__DIFF_D18(base: str, writable: bool) -> None:
    apic = make_apic(Profile.custom(base, xapic_id_writable=writable), vcpu_id=2)
    apic.mmio_write(0x020, 0x07ABCDEF)
    assert apic.mmio_read(0x020) == (0x07000000 if writable else 0x02000000)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_x2apic_id_write_faults__REG_ID_1(profile: str) -> None:
    apic = make_apic(profile, vcpu_id=9, mode=ApicMode.X2APIC)
    assert_gp(apic, lambda: apic.wrmsr(0x802, 0x07000000))
    assert apic.rdmsr(0x802) == 9


# --- REG-TPR-1 --------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_tpr_write_stores_the_low_byte__REG_TPR_1(profile: str) -> None:
    apic = make_apic(profile)
    apic.mmio_write(0x080, 0xABCD1234)
    assert apic.mmio_read(0x080) == 0x34


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_tpr_write_recomputes_ppr__REG_TPR_1(profile: str) -> None:
    """PRIO-2 examples: TPR=0x25, ISR empty -> 0x25; ISR top 0x41 -> 0x40; TPR=0x45 -> 0x45."""
    apic = make_apic(profile)
    apic.mmio_write(0x080, 0x25)
    assert apic.mmio_read(0x0A0) == 0x25
    apic.mmio_write(0x080, 0)
    isr_with(apic, 0x41)
    apic.mmio_write(0x080, 0x25)
    assert apic.mmio_read(0x0A0) == 0x40
    apic.mmio_write(0x080, 0x45)
    assert apic.mmio_read(0x0A0) == 0x45


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("cr8", "tpr"), [(0xF, 0xF0), (0x3, 0x30), (0x0, 0x00), (0x1F, 0xF0)], ids=hex_id
)
def test_cr8_write_sets_tpr_class__REG_TPR_1(profile: str, cr8: int, tpr: int) -> None:
    """Reference example: write CR8=0xF -> TPR=0xF0."""
    apic = make_apic(profile)
    apic.mmio_write(0x080, 0x0C)
    apic.set_cr8(cr8)
    assert apic.mmio_read(0x080) == tpr
    assert apic.mmio_read(0x0A0) == tpr


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(("tpr", "cr8"), [(0x3C, 3), (0xF0, 0xF), (0x0F, 0)], ids=hex_id)
def test_cr8_read_is_the_tpr_class__REG_TPR_1(profile: str, tpr: int, cr8: int) -> None:
    """Reference example: TPR=0x3C -> CR8 reads 3."""
    apic = make_apic(profile)
    apic.mmio_write(0x080, tpr)
    assert apic.get_cr8() == cr8


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_x2apic_tpr_msr_is_the_same_register__REG_TPR_1(profile: str) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    apic.wrmsr(0x808, 0x3C)
    assert apic.get_cr8() == 3
    apic.set_cr8(5)
    assert apic.rdmsr(0x808) == 0x50


# --- REG-EOI-1 --------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("value", [0, 1, 0x31, 0xFFFFFFFF], ids=hex_id)
def test_xapic_eoi_write_of_any_value_clears_the_highest_isr_bit__REG_EOI_1(
    profile: str, value: int
) -> None:
    """PRIO-5 example: ISR={0x31,0x41}, EOI -> ISR={0x31}, PPR=0x30 (TPR 0)."""
    apic = make_apic(profile)
    isr_with(apic, 0x31, 0x41)
    apic.mmio_write(0x0B0, value)
    assert apic.isr == {0x31}
    assert apic.mmio_read(0x0A0) == 0x30
    apic.mmio_write(0x0B0, value)
    assert len(apic.isr) == 0
    assert apic.mmio_read(0x0A0) == 0


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_x2apic_eoi_write_clears_the_highest_isr_bit__REG_EOI_1(profile: str) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    isr_with(apic, 0x31, 0x41)
    apic.wrmsr(0x80B, 0)
    assert apic.isr == {0x31}


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_eoi_with_nothing_in_service_changes_nothing__REG_EOI_1(profile: str) -> None:
    apic = make_apic(profile)
    assert apic.accept(0x51)
    before = snapshot(apic)
    apic.mmio_write(0x0B0, 0)
    assert snapshot(apic) == before


# --- REG-LDR-1 --------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("value", "stored"),
    [(0x12345678, 0x12000000), (0xFFFFFFFF, 0xFF000000), (0x00FFFFFF, 0)],
    ids=hex_id,
)
def test_xapic_ldr_write_keeps_bits_31_24__REG_LDR_1(profile: str, value: int, stored: int) -> None:
    """Reference example: write 0x12345678 -> 0x12000000."""
    apic = make_apic(profile)
    apic.mmio_write(0x0D0, value)
    assert apic.mmio_read(0x0D0) == stored


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_x2apic_ldr_write_faults__REG_LDR_1(profile: str) -> None:
    apic = make_apic(profile, vcpu_id=17, mode=ApicMode.X2APIC)
    assert_gp(apic, lambda: apic.wrmsr(0x80D, 0x12000000))
    assert apic.rdmsr(0x80D) == 0x00010002


# --- REG-DFR-1 --------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (0x00000000, 0x0FFFFFFF),  # cluster
        (0xF0000000, 0xFFFFFFFF),  # flat
        (0x50000000, 0x5FFFFFFF),  # neither
        (0x00001234, 0x0FFFFFFF),
    ],
    ids=hex_id,
)
def test_dfr_write_sets_the_model_and_reads_reserved_bits_as_ones__REG_DFR_1(
    profile: str, value: int, stored: int
) -> None:
    apic = make_apic(profile)
    apic.mmio_write(0x0E0, value)
    assert apic.mmio_read(0x0E0) == stored


# --- REG-SVR-1 / DIFF-D19 ---------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("directed_eoi", "value", "stored"),
    [
        (False, 0x11FF, 0x1FF),
        (False, 0xFFFFFFFF, 0x3FF),
        (False, 0x3F0, 0x3F0),  # focus bit 9 is stored
        (True, 0x11FF, 0x11FF),
        (True, 0xFFFFFFFF, 0x13FF),
    ],
    ids=hex_id,
)
def test_svr_write_mask_depends_on_lvr_directed_eoi__REG_SVR_1(
    profile: str, directed_eoi: bool, value: int, stored: int
) -> None:
    apic = make_apic(profile, features=Features(directed_eoi=directed_eoi))
    apic.mmio_write(0x0F0, value)
    assert apic.mmio_read(0x0F0) == stored


def test_kvm_x2apic_svr_write_is_masked_the_same_way__REG_SVR_1() -> None:
    apic = make_apic("kvm", mode=ApicMode.X2APIC, features=Features(directed_eoi=True))
    apic.wrmsr(0x80F, 0xFFFFFFFF)
    assert apic.rdmsr(0x80F) == 0x13FF


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_svr_low_nibble_is_programmable_in_both_presets__DIFF_D19(profile: str) -> None:
    apic = make_apic(profile)
    apic.mmio_write(0x0F0, 0x1F0)
    assert apic.mmio_read(0x0F0) == 0x1F0


@pytest.mark.parametrize("base", PROFILE_NAMES)
def test_p6_svr_low_nibble_reads_as_ones__DIFF_D19(base: str) -> None:
    apic = make_apic(Profile.custom(base, svr_low_nibble_hardwired=True))
    apic.mmio_write(0x0F0, 0x1F0)
    assert apic.mmio_read(0x0F0) == 0x1FF
    apic.mmio_write(0x0F0, 0x1F5)
    assert apic.mmio_read(0x0F0) == 0x1FF


# --- REG-SVR-2 --------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("cmci", [False, True])
def test_software_disable_masks_every_lvt__REG_SVR_2(profile: str, cmci: bool) -> None:
    apic = make_apic(profile, features=Features(cmci=cmci))
    names = [n for n in LVT_OFFSETS if cmci or n != "LVTCMCI"]
    for n in names:
        apic.mmio_write(LVT_OFFSETS[n], 0x000000E0)
        assert apic.mmio_read(LVT_OFFSETS[n]) == 0x000000E0
    apic.mmio_write(0x0F0, 0x0FF)
    for n in names:
        assert apic.mmio_read(LVT_OFFSETS[n]) == 0x000100E0, n


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_software_disable_masks_lint0__REG_SVR_2(profile: str) -> None:
    """Reference example: LVT0 = 0x700, write SVR=0xFF -> LVT0 = 0x10700."""
    apic = make_apic(profile)
    apic.mmio_write(0x350, 0x700)
    apic.mmio_write(0x0F0, 0xFF)
    assert apic.mmio_read(0x350) == 0x10700


# --- REG-LVT-1 / DIFF-D12 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("LVTT", 0x710FF),
        ("LVTTHMR", 0x117FF),
        ("LVTPC", 0x117FF),
        ("LVT0", 0x1F7FF),
        ("LVT1", 0x1F7FF),
        ("LVTERR", 0x110FF),
        ("LVTCMCI", 0x117FF),
    ],
    ids=hex_id,
)
def test_kvm_lvt_write_masks_per_entry__REG_LVT_1(name: str, stored: int) -> None:
    """Reference examples: write 0xFFFFFFFF (sw-enabled, TSC-deadline in CPUID)."""
    xapic = make_apic("kvm", features=Features(cmci=True))
    xapic.mmio_write(LVT_OFFSETS[name], 0xFFFFFFFF)
    assert xapic.mmio_read(LVT_OFFSETS[name]) == stored
    x2apic = make_apic("kvm", mode=ApicMode.X2APIC, features=Features(cmci=True))
    msr = 0x800 + (LVT_OFFSETS[name] >> 4)
    x2apic.wrmsr(msr, 0xFFFFFFFF)
    assert x2apic.rdmsr(msr) == stored


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("LVTT", 0x700FF),
        ("LVTTHMR", 0x107FF),
        ("LVTPC", 0x107FF),
        ("LVT0", 0x1A7FF),
        ("LVT1", 0x1A7FF),
        ("LVTERR", 0x100FF),
        ("LVTCMCI", 0x107FF),
    ],
    ids=hex_id,
)
def test_sdm_lvt_delivery_status_and_remote_irr_are_read_only__REG_LVT_1__DIFF_D12(
    name: str, stored: int
) -> None:
    apic = make_apic("sdm", features=Features(cmci=True))
    apic.mmio_write(LVT_OFFSETS[name], 0xFFFFFFFF)
    assert apic.mmio_read(LVT_OFFSETS[name]) == stored


@pytest.mark.parametrize(
    ("base", "writable", "stored"), [("kvm", False, 0x1A7FF), ("sdm", True, 0x1F7FF)], ids=hex_id
)
def test_lvt_status_bits_follow_the_profile_knob__DIFF_D12(
    base: str, writable: bool, stored: int
) -> None:
    apic = make_apic(Profile.custom(base, lvt_status_writable=writable))
    apic.mmio_write(0x360, 0xFFFFFFFF)
    assert apic.mmio_read(0x360) == stored


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (0x000400EF, 0x000000EF),  # reference example: TSC-deadline bit dropped -> one-shot
        (0x000200EF, 0x000200EF),  # periodic stays
        (0xFFFFFFFF, 0x000310FF),
    ],
    ids=hex_id,
)
def test_lvt_timer_mode_mask_without_tsc_deadline__REG_LVT_1(
    profile: str, value: int, stored: int
) -> None:
    if profile == "sdm":
        stored &= ~LVT_DELIVERY_STATUS
    apic = make_apic(profile, features=Features(tsc_deadline=False))
    apic.mmio_write(0x320, value)
    assert apic.mmio_read(0x320) == stored


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_lvt_timer_keeps_tsc_deadline_mode_with_tsc_deadline__REG_LVT_1(profile: str) -> None:
    apic = make_apic(profile, features=Features(tsc_deadline=True))
    apic.mmio_write(0x320, 0x000400EF)
    assert apic.mmio_read(0x320) == 0x000400EF


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("name", list(LVT_OFFSETS))
def test_lvt_write_while_software_disabled_is_masked__REG_LVT_1(profile: str, name: str) -> None:
    """Reference example: sw-disabled, write 0x000000EF to LVTT -> 0x000100EF."""
    apic = make_apic(profile, sw_enabled=False, features=Features(cmci=True))
    apic.mmio_write(LVT_OFFSETS[name], 0x000000EF)
    assert apic.mmio_read(LVT_OFFSETS[name]) == 0x000100EF


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_lvt_cmci_write_is_ignored_in_xapic_mode_without_cmci__REG_LVT_1(profile: str) -> None:
    apic = make_apic(sentinel_profile(profile))
    before = snapshot(apic)
    apic.mmio_write(0x2F0, 0x000000E0)
    assert snapshot(apic) == before
    assert apic.mmio_read(0x2F0) == apic.profile.unserviced_read_value


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_lvt_cmci_write_faults_in_x2apic_mode_without_cmci__REG_LVT_1(profile: str) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    assert_gp(apic, lambda: apic.wrmsr(0x82F, 0x000000E0))


# --- REG-LVT-2 --------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_pmi_masks_lvtpc_on_an_intel_compatible_guest__REG_LVT_2(profile: str) -> None:
    """Reference example: LVTPC = 0xF0, PMI delivered -> LVTPC = 0x100F0, 0xF0 in IRR."""
    apic = make_apic(profile, features=Features(intel_compatible=True))
    apic.mmio_write(0x340, 0x000000F0)
    assert apic.local_deliver("LVTPC")
    assert apic.mmio_read(0x340) == 0x000100F0
    assert 0xF0 in apic.irr
    assert not apic.local_deliver("LVTPC")  # now masked
    assert apic.irr == {0xF0}


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_pmi_leaves_lvtpc_unmasked_on_other_guests__REG_LVT_2(profile: str) -> None:
    apic = make_apic(profile, features=Features(intel_compatible=False))
    apic.mmio_write(0x340, 0x000000F0)
    assert apic.local_deliver("LVTPC")
    assert apic.mmio_read(0x340) == 0x000000F0
    assert 0xF0 in apic.irr


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("name", ["LVT0", "LVT1", "LVTTHMR", "LVTERR"])
def test_only_lvtpc_masks_itself_on_delivery__REG_LVT_2(profile: str, name: str) -> None:
    apic = make_apic(profile)
    apic.mmio_write(LVT_OFFSETS[name], 0x000000F0)
    assert apic.local_deliver(name)
    assert apic.mmio_read(LVT_OFFSETS[name]) == 0x000000F0


# --- REG-ESR-1 / DIFF-D1 ----------------------------------------------------------------


def test_kvm_never_latches_a_send_illegal_vector__REG_ESR_1__DIFF_D1() -> None:
    """Reference example [KVM]: send ICR with vector 0x05 -> ESR reads 0 before and after
    writing ESR."""
    apic = make_apic("kvm")
    apic.mmio_write(0x300, 0x00044005)  # self, fixed, assert, vector 5
    assert apic.mmio_read(0x280) == 0
    apic.mmio_write(0x280, 0)
    assert apic.mmio_read(0x280) == 0
    assert 0x05 in apic.irr  # PRIO-7: KVM delivers it


def test_kvm_never_latches_a_receive_illegal_vector__REG_ESR_1__DIFF_D1() -> None:
    apic = make_apic("kvm")
    assert apic.accept(0x05)
    apic.mmio_write(0x280, 0)
    assert apic.mmio_read(0x280) == 0


def test_sdm_latches_send_illegal_vector_after_an_esr_write__REG_ESR_1__DIFF_D1() -> None:
    """Reference example [SDM]: after writing ESR, ESR reads 0x20 on the sender."""
    apic = make_apic("sdm")
    apic.mmio_write(0x300, 0x00044005)
    assert apic.mmio_read(0x280) == 0  # write-then-read: not visible yet
    apic.mmio_write(0x280, 0)
    assert apic.mmio_read(0x280) == 0x20
    apic.mmio_write(0x280, 0)  # back-to-back writes clear it
    assert apic.mmio_read(0x280) == 0


def test_sdm_latches_receive_illegal_vector_after_an_esr_write__REG_ESR_1__DIFF_D1() -> None:
    """Reference example [SDM]: ... 0x40 on the receiver."""
    apic = make_apic("sdm")
    assert not apic.accept(0x05)
    assert 0x05 not in apic.irr
    assert apic.mmio_read(0x280) == 0
    apic.mmio_write(0x280, 0xFFFFFFFF)  # any value
    assert apic.mmio_read(0x280) == 0x40


def _esr_from_state(apic: LocalApic, esr: int) -> None:
    """KVM_SET_LAPIC is the one way KVM's ESR gets a non-zero value."""
    state = bytearray(apic.get_state())
    state[0x280:0x284] = esr.to_bytes(4, "little")
    apic.set_state(bytes(state))


@pytest.mark.parametrize("mode", [ApicMode.XAPIC, ApicMode.X2APIC], ids=hex_id)
def test_kvm_esr_write_keeps_the_stored_value__REG_ESR_1__DIFF_D1(mode: ApicMode) -> None:
    """Reads return what KVM_SET_LAPIC stored; an ESR write (0 in x2APIC) changes nothing."""
    apic = make_apic("kvm", mode=mode)
    _esr_from_state(apic, 0xEF)
    if mode is ApicMode.XAPIC:
        apic.mmio_write(0x280, 0)
        assert apic.mmio_read(0x280) == 0xEF
    else:
        apic.wrmsr(0x828, 0)
        assert apic.rdmsr(0x828) == 0xEF


@pytest.mark.parametrize("mode", [ApicMode.XAPIC, ApicMode.X2APIC], ids=hex_id)
def test_sdm_esr_write_replaces_the_stored_value_with_new_errors__DIFF_D1(mode: ApicMode) -> None:
    apic = make_apic("sdm", mode=mode)
    _esr_from_state(apic, 0xEF)
    if mode is ApicMode.XAPIC:
        apic.mmio_write(0x280, 0)
        assert apic.mmio_read(0x280) == 0
    else:
        apic.wrmsr(0x828, 0)
        assert apic.rdmsr(0x828) == 0


@pytest.mark.parametrize(("base", "latching"), [("kvm", True), ("sdm", False)])
def test_esr_latching_follows_the_profile_knob__DIFF_D1(base: str, latching: bool) -> None:
    apic = make_apic(Profile.custom(base, esr_latching=latching, accept_illegal_vectors=False))
    apic.accept(0x05)
    apic.mmio_write(0x280, 0)
    assert apic.mmio_read(0x280) == (0x40 if latching else 0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_x2apic_esr_write_of_zero_is_accepted__REG_ESR_1(profile: str) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    apic.wrmsr(0x828, 0)
    assert apic.rdmsr(0x828) == 0


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("value", [1, 0x20, 0x40, 0xFFFFFFFF], ids=hex_id)
def test_x2apic_esr_write_of_non_zero_faults__REG_ESR_1__DIFF_D1(profile: str, value: int) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    assert_gp(apic, lambda: apic.wrmsr(0x828, value))


def test_sdm_x2apic_esr_shows_latched_errors_after_a_zero_write__DIFF_D1() -> None:
    apic = make_apic("sdm", mode=ApicMode.X2APIC)
    assert not apic.accept(0x05)
    assert apic.rdmsr(0x828) == 0
    apic.wrmsr(0x828, 0)
    assert apic.rdmsr(0x828) == 0x40


# --- REG-LVR-1 --------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("features", "lvr"),
    [
        (Features(), 0x00050014),
        (Features(cmci=True), 0x00060014),
        (Features(directed_eoi=True), 0x01050014),
        (Features(cmci=True, directed_eoi=True), 0x01060014),
    ],
    ids=hex_id,
)
def test_lvr_reports_version_max_lvt_and_directed_eoi__REG_LVR_1(
    profile: str, features: Features, lvr: int
) -> None:
    apic = make_apic(profile, features=features)
    assert apic.mmio_read(0x030) == lvr
    x2 = make_apic(profile, mode=ApicMode.X2APIC, features=features)
    assert x2.rdmsr(0x803) == lvr


# --- DIFF-D13: APR ----------------------------------------------------------------------


def _apr_case(profile: str, tpr: int, irr: tuple[int, ...], isr: tuple[int, ...]) -> LocalApic:
    apic = make_apic(profile)
    isr_with(apic, *isr)
    for v in irr:
        assert apic.accept(v)
    apic.mmio_write(0x080, tpr)
    return apic


APR_CASES = [
    # (TPR, IRR, ISR, SDM APR)  SDM 10.6.2.4 (P6): TPR if TPR[7:4] >= IRRV[7:4] and
    # TPR[7:4] > ISRV[7:4], else the class of the highest of them, APR[3:0] = 0.
    (0x00, (), (), 0x00),
    (0x25, (), (), 0x25),
    (0x25, (0x41,), (), 0x40),
    (0x45, (0x41,), (), 0x45),
    (0x45, (), (0x41,), 0x40),
    (0x00, (0x61,), (0x51,), 0x60),
]


@pytest.mark.parametrize(("tpr", "irr", "isr", "apr"), APR_CASES, ids=hex_id)
def test_kvm_apr_always_reads_zero__DIFF_D13(
    tpr: int, irr: tuple[int, ...], isr: tuple[int, ...], apr: int
) -> None:
    apic = _apr_case("kvm", tpr, irr, isr)
    assert apic.mmio_read(0x090) == 0


@pytest.mark.parametrize(("tpr", "irr", "isr", "apr"), APR_CASES, ids=hex_id)
def test_sdm_apr_is_computed__DIFF_D13(
    tpr: int, irr: tuple[int, ...], isr: tuple[int, ...], apr: int
) -> None:
    apic = _apr_case("sdm", tpr, irr, isr)
    assert apic.mmio_read(0x090) == apr


@pytest.mark.parametrize(("base", "computed"), [("kvm", True), ("sdm", False)])
def test_apr_follows_the_profile_knob__DIFF_D13(base: str, computed: bool) -> None:
    apic = make_apic(Profile.custom(base, apr_computed=computed))
    apic.mmio_write(0x080, 0x25)
    assert apic.mmio_read(0x090) == (0x25 if computed else 0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_apr_does_not_exist_in_x2apic_mode__DIFF_D13(profile: str) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    apic.wrmsr(0x808, 0x25)
    assert_gp(apic, lambda: apic.rdmsr(0x809))


# --- The register table drives access -------------------------------------------------


def _msr_index(reg: Register) -> int:
    return 0x800 + (reg.offset >> 4)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("reg", REGISTERS, ids=lambda r: r.name)
def test_mmio_readability_matches_the_table_in_xapic_mode(profile: str, reg: Register) -> None:
    """MMIO-4 and table 1.1: a register whose xAPIC Access has R is serviced over MMIO,
    others return the profile's not-serviced value."""
    apic = make_apic(
        sentinel_profile(profile), features=Features(cmci=True)
    )
    value = apic.mmio_read(reg.offset)
    if Access.R in reg.xapic:
        assert value == apic.register(reg.name) & 0xFFFFFFFF
        assert value != SENTINEL
    else:
        assert value == apic.profile.unserviced_read_value


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("reg", REGISTERS, ids=lambda r: r.name)
def test_rdmsr_readability_matches_the_table_in_x2apic_mode(profile: str, reg: Register) -> None:
    """MSR-4 and table 1.1: RDMSR of a register whose x2APIC Access has R returns it; any
    other (and the MSR slot of a register with no MSR) #GPs."""
    apic = make_apic(profile, mode=ApicMode.X2APIC, features=Features(cmci=True))
    msr = _msr_index(reg)
    assert reg.msr in (msr, None)
    if Access.R in reg.x2apic:
        assert reg.msr == msr
        assert apic.rdmsr(msr) == apic.register(reg.name)
    else:
        assert_gp(apic, lambda: apic.rdmsr(msr))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("reg", REGISTERS, ids=lambda r: r.name)
def test_wrmsr_writability_matches_the_table_in_x2apic_mode(profile: str, reg: Register) -> None:
    """MSR-5: WRMSR of 0 succeeds exactly where the table's x2APIC Access has W."""
    apic = make_apic(profile, mode=ApicMode.X2APIC, features=Features(cmci=True))
    msr = _msr_index(reg)
    if Access.W in reg.x2apic:
        apic.wrmsr(msr, 0)
    else:
        assert_gp(apic, lambda: apic.wrmsr(msr, 0))


def test_the_table_names_the_lvts_at_their_offsets() -> None:
    assert {r.name: r.offset for r in LVT_REGISTERS} == LVT_OFFSETS
    assert all(REGISTER_BY_NAME[n].is_lvt for n in LVT_OFFSETS)


# --- Property: an xAPIC write stores what the table predicts ---------------------------


def predicted_after_xapic_write(
    apic: LocalApic, reg: Register, value: int, sw_enabled: bool
) -> int | None:
    """What ``reg`` reads after an aligned 4-byte MMIO write of ``value`` to a fresh APIC, or
    None where the write has no observable effect at all (not writable in xAPIC mode, absent
    feature register, SDM read-only ID, EOI with nothing in service).  The value is the row's
    ``write_mask`` plus the adjustments §5 documents: DFR reserved bits read as ones, ICR
    delivery status cleared, LVT masked while software-disabled, the timer-mode mask, the SDM's
    read-only LVT status bits, the SVR directed-EOI bit and the P6 SVR nibble."""
    profile, features = apic.profile, apic.features
    name = reg.name
    if (
        Access.W not in reg.xapic
        or (reg.feature == "cmci" and not features.cmci)
        or (name == "ID" and not profile.xapic_id_writable)
        or name == "EOI"
    ):
        return None
    if name == "DFR":
        return value | 0x0FFFFFFF
    if name == "ICR":
        return value & ~LVT_DELIVERY_STATUS
    mask = reg.write_mask
    if name == "SVR":
        stored = value & (mask | (0x1000 if features.directed_eoi else 0))
        return stored | (0xF if profile.svr_low_nibble_hardwired else 0)
    if reg.is_lvt:
        if name == "LVTT" and not features.tsc_deadline:
            mask = (mask & ~LVT_TIMER_MODE) | TIMER_PERIODIC
        if not profile.lvt_status_writable:
            mask &= ~LVT_DELIVERY_STATUS
            if name in ("LVT0", "LVT1"):
                mask &= ~LVT_REMOTE_IRR
        if not sw_enabled:
            value |= LVT_MASKED
    return value & mask


@settings(max_examples=500, deadline=None)
@given(
    config=apic_configs(),
    sw_enabled=st.booleans(),
    reg=st.sampled_from(REGISTERS),
    value=register_values(),
)
def test_xapic_write_stores_what_the_table_predicts(
    config: ApicConfig, sw_enabled: bool, reg: Register, value: int
) -> None:
    """Table write masks, §5 (REG-*-1), MMIO-5: write a register, read it back."""
    apic = config.build(ApicMode.XAPIC, sw_enabled=sw_enabled)
    before = snapshot(apic)
    apic.mmio_write(reg.offset, value)
    expected = predicted_after_xapic_write(apic, reg, value, sw_enabled)
    if expected is None:
        assert snapshot(apic) == before
    else:
        assert apic.mmio_read(reg.offset) == expected


def test_a_faulting_access_raises_guest_fault_13() -> None:
    apic = make_apic("kvm", mode=ApicMode.X2APIC)
    with pytest.raises(GuestFault) as info:
        apic.rdmsr(0x800)
    assert info.value.vector == 13


# --- The table itself, row by row -------------------------------------------------------
# The rows are built at import time, where no mutant of the builder helpers can be observed;
# these literal rows are what pins the data (the helpers carry ``# pragma: no mutate block``).

NO, R, W, RW = Access.NONE, Access.R, Access.W, Access.RW

TABLE_ROWS = [
    # name, offset, MSR, RESET, INIT, xAPIC, x2APIC, write mask, is_lvt, feature
    ('ID', 0x020, 0x802, None, None, RW, R, 0xFF000000, False, None),
    ('LVR', 0x030, 0x803, None, None, R, R, 0, False, None),
    ('TPR', 0x080, 0x808, 0, 0, RW, RW, 0xFF, False, None),
    ('APR', 0x090, None, 0, 0, R, NO, 0, False, None),
    ('PPR', 0x0a0, 0x80A, 0, 0, R, R, 0, False, None),
    ('EOI', 0x0b0, 0x80B, 0, 0, W, W, 0, False, None),
    ('RRD', 0x0c0, None, 0, 0, NO, NO, 0, False, None),
    ('LDR', 0x0d0, 0x80D, 0, 0, RW, R, 0xFF000000, False, None),
    ('DFR', 0x0e0, None, 0xFFFFFFFF, 0xFFFFFFFF, RW, NO, 0xF0000000, False, None),
    ('SVR', 0x0f0, 0x80F, 0xFF, 0xFF, RW, RW, 0x3FF, False, None),
    ('ISR0', 0x100, 0x810, 0, 0, R, R, 0, False, None),
    ('ISR1', 0x110, 0x811, 0, 0, R, R, 0, False, None),
    ('ISR2', 0x120, 0x812, 0, 0, R, R, 0, False, None),
    ('ISR3', 0x130, 0x813, 0, 0, R, R, 0, False, None),
    ('ISR4', 0x140, 0x814, 0, 0, R, R, 0, False, None),
    ('ISR5', 0x150, 0x815, 0, 0, R, R, 0, False, None),
    ('ISR6', 0x160, 0x816, 0, 0, R, R, 0, False, None),
    ('ISR7', 0x170, 0x817, 0, 0, R, R, 0, False, None),
    ('TMR0', 0x180, 0x818, 0, 0, R, R, 0, False, None),
    ('TMR1', 0x190, 0x819, 0, 0, R, R, 0, False, None),
    ('TMR2', 0x1a0, 0x81A, 0, 0, R, R, 0, False, None),
    ('TMR3', 0x1b0, 0x81B, 0, 0, R, R, 0, False, None),
    ('TMR4', 0x1c0, 0x81C, 0, 0, R, R, 0, False, None),
    ('TMR5', 0x1d0, 0x81D, 0, 0, R, R, 0, False, None),
    ('TMR6', 0x1e0, 0x81E, 0, 0, R, R, 0, False, None),
    ('TMR7', 0x1f0, 0x81F, 0, 0, R, R, 0, False, None),
    ('IRR0', 0x200, 0x820, 0, 0, R, R, 0, False, None),
    ('IRR1', 0x210, 0x821, 0, 0, R, R, 0, False, None),
    ('IRR2', 0x220, 0x822, 0, 0, R, R, 0, False, None),
    ('IRR3', 0x230, 0x823, 0, 0, R, R, 0, False, None),
    ('IRR4', 0x240, 0x824, 0, 0, R, R, 0, False, None),
    ('IRR5', 0x250, 0x825, 0, 0, R, R, 0, False, None),
    ('IRR6', 0x260, 0x826, 0, 0, R, R, 0, False, None),
    ('IRR7', 0x270, 0x827, 0, 0, R, R, 0, False, None),
    ('ESR', 0x280, 0x828, 0, 0, RW, RW, 0, False, None),
    ('LVTCMCI', 0x2f0, 0x82F, 0x10000, 0x10000, RW, RW, 0x117FF, True, 'cmci'),
    ('ICR', 0x300, 0x830, 0, 0, RW, RW, 0xFFFFFFFF, False, None),
    ('ICR2', 0x310, None, 0, 0, RW, NO, 0xFF000000, False, None),
    ('LVTT', 0x320, 0x832, 0x10000, 0x10000, RW, RW, 0x710FF, True, None),
    ('LVTTHMR', 0x330, 0x833, 0x10000, 0x10000, RW, RW, 0x117FF, True, None),
    ('LVTPC', 0x340, 0x834, 0x10000, 0x10000, RW, RW, 0x117FF, True, None),
    ('LVT0', 0x350, 0x835, 0x10000, 0x10000, RW, RW, 0x1F7FF, True, None),
    ('LVT1', 0x360, 0x836, 0x10000, 0x10000, RW, RW, 0x1F7FF, True, None),
    ('LVTERR', 0x370, 0x837, 0x10000, 0x10000, RW, RW, 0x110FF, True, None),
    ('TMICT', 0x380, 0x838, 0, 0, RW, RW, 0xFFFFFFFF, False, None),
    ('TMCCT', 0x390, 0x839, 0, 0, R, R, 0, False, None),
    ('TDCR', 0x3e0, 0x83E, 0, 0, RW, RW, 0xB, False, None),
    ('SELF_IPI', 0x3f0, 0x83F, 0, 0, NO, W, 0xFF, False, None),
]

TITLES = {
    'ID': 'Local APIC ID',
    'LVR': 'Local APIC Version',
    'TPR': 'Task Priority',
    'APR': 'Arbitration Priority',
    'PPR': 'Processor Priority',
    'EOI': 'End Of Interrupt',
    'RRD': 'Remote Read',
    'LDR': 'Logical Destination (x2APIC: derived, kept)',
    'DFR': 'Destination Format',
    'SVR': 'Spurious Interrupt Vector',
    'ESR': 'Error Status',
    'LVTCMCI': 'LVT Corrected Machine Check Interrupt',
    'ICR': 'Interrupt Command (low; 64-bit in x2APIC)',
    'ICR2': 'Interrupt Command (high)',
    'LVTT': 'LVT Timer',
    'LVTTHMR': 'LVT Thermal Sensor',
    'LVTPC': 'LVT Performance Monitoring Counters',
    'LVT0': 'LVT LINT0',
    'LVT1': 'LVT LINT1',
    'LVTERR': 'LVT Error',
    'TMICT': 'Timer Initial Count',
    'TMCCT': 'Timer Current Count',
    'TDCR': 'Timer Divide Configuration',
    'SELF_IPI': 'SELF IPI (x2APIC only)',
}


def test_every_row_of_the_table_is_pinned__MSR_2__RESET_1__INIT_1() -> None:
    """Table 1.1 as data: offset, MSR (MSR-2: 0x800 + offset >> 4, none for APR/RRD/DFR/ICR2),
    RESET/INIT values (RESET-1, INIT-1), access per mode (MMIO-4/5, MSR-4/5), write mask
    (REG-*), LVT flag and feature, in table order."""
    rows = [
        (r.name, r.offset, r.msr, r.reset, r.init, r.xapic, r.x2apic, r.write_mask, r.is_lvt,
         r.feature)
        for r in REGISTERS
    ]
    assert rows == TABLE_ROWS
    assert {r.name: r.title for r in REGISTERS if r.name in TITLES} == TITLES


@pytest.mark.parametrize(
    ("stem", "title"),
    [("ISR", "In-Service Register"), ("TMR", "Trigger Mode Register"),
     ("IRR", "Interrupt Request Register")],
)
def test_vector_word_rows_name_their_bit_ranges__PRIO_1(stem: str, title: str) -> None:
    titles = [REGISTER_BY_NAME[f"{stem}{n}"].title for n in range(8)]
    assert titles[0] == f"{title} bits 31:0"
    assert titles[1] == f"{title} bits 63:32"
    assert titles[7] == f"{title} bits 255:224"
    assert titles == [f"{title} bits {32 * n + 31}:{32 * n}" for n in range(8)]


def test_the_lookup_tables_index_every_row() -> None:
    assert [REGISTER_BY_NAME[r.name] for r in REGISTERS] == list(REGISTERS)
    assert [REGISTER_BY_OFFSET[r.offset] for r in REGISTERS] == list(REGISTERS)
    assert {m: r.name for m, r in REGISTER_BY_MSR.items()} == {
        r.msr: r.name for r in REGISTERS if r.msr is not None
    }
    assert len(REGISTER_BY_MSR) == len(REGISTERS) - 4


def test_register_repr_names_the_row_and_evaluates_back() -> None:
    """``lapic.registers`` contract: a row's repr pastes back (no spec id)."""
    icr2, tpr = REGISTER_BY_NAME["ICR2"], REGISTER_BY_NAME["TPR"]
    assert repr(tpr) == "REGISTER_BY_NAME['TPR']  # offset 0x080, msr 0x808"
    assert repr(icr2) == "REGISTER_BY_NAME['ICR2']  # offset 0x310, msr None"
    for r in REGISTERS:
        assert eval(repr(r), {"REGISTER_BY_NAME": REGISTER_BY_NAME}) is r


def test_markdown_table_renders_every_row() -> None:
    """``python -m lapic.registers`` prints the table for the docs (no spec id)."""
    lines = markdown_table().split("\n")
    assert lines[:2] == [
        "| Register | Offset | MSR | RESET | INIT | xAPIC | x2APIC | write mask | Title |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    assert len(lines) == 2 + len(REGISTERS)
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert list(rows) == [r.name for r in REGISTERS]
    assert rows["ID"] == (
        "| ID | 0x020 | 0x802 | computed | unchanged | RW | R | 0xff000000 | Local APIC ID |"
    )
    assert rows["APR"] == "| APR | 0x090 | - | 0x0 | 0x0 | R | - | 0x0 | Arbitration Priority |"
    assert rows["EOI"] == "| EOI | 0x0b0 | 0x80b | 0x0 | 0x0 | W | W | 0x0 | End Of Interrupt |"
    assert rows["LVTCMCI"] == (
        "| LVTCMCI | 0x2f0 | 0x82f | 0x10000 | 0x10000 | RW | RW | 0x117ff "
        "| LVT Corrected Machine Check Interrupt (with cmci) |"
    )
    assert rows["SELF_IPI"] == (
        "| SELF_IPI | 0x3f0 | 0x83f | 0x0 | 0x0 | - | W | 0xff | SELF IPI (x2APIC only) |"
    )
