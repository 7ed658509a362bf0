"""x2APIC MSR access rules MSR-1..6 (reference ``kvm_lapic.md`` §4) and DIFF-D3 (§16).

Every #GP is checked with :func:`assert_gp`: vector 13 and an unchanged state image.
"""

from __future__ import annotations

from functools import partial

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lapic import ApicMode, Features, Profile, Trigger
from lapic.registers import REGISTER_BY_MSR, REGISTER_BY_NAME, Access, Register
from tests.lapic.strategies import (
    PROFILE_NAMES,
    ApicConfig,
    apic_configs,
    assert_gp,
    hex_id,
    make_apic,
    register_values,
    snapshot,
    writable_registers,
    x2apic_msrs,
)

NON_READABLE = [
    0x800,
    0x801,
    *range(0x804, 0x808),
    0x809,
    0x80B,
    0x80C,
    0x80E,
    *range(0x829, 0x82F),
    0x831,
    *range(0x83A, 0x83E),
    0x83F,
]
"""MSR-4 below 0x840, without CMCI (0x82F is added where the LVT is absent)."""

RESERVED_TAIL = range(0x840, 0x900)
"""MSR-4/MSR-5: 0x840-0x8FF name no register at all."""

NON_WRITABLE = [
    0x800,
    0x801,
    0x802,  # ID
    0x803,  # LVR
    *range(0x804, 0x808),
    0x809,  # APR
    0x80A,  # PPR
    0x80C,  # RRD
    0x80D,  # LDR
    0x80E,  # DFR
    *range(0x810, 0x828),  # ISR, TMR, IRR
    *range(0x829, 0x82F),
    0x831,  # ICR2
    0x839,  # TMCCT
    *range(0x83A, 0x83E),
]
"""MSR-5 below 0x840, without CMCI."""

WRITABLE = [0x808, 0x80B, 0x80F, 0x828, 0x830, *range(0x832, 0x839), 0x83E, 0x83F]
"""MSR-5: TPR, EOI, SVR, ESR, ICR, the six LVTs, TMICT, TDCR, SELF IPI (+0x82F with CMCI)."""


# --- MSR-1 -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("mode", [ApicMode.XAPIC, ApicMode.DISABLED], ids=hex_id)
def test_every_x2apic_msr_faults_outside_x2apic_mode__MSR_1(profile: str, mode: ApicMode) -> None:
    apic = make_apic(profile, mode=mode, features=Features(cmci=True))
    for msr in range(0x800, 0x900):
        assert_gp(apic, partial(apic.rdmsr, msr))
        assert_gp(apic, partial(apic.wrmsr, msr, 0))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_rdmsr_tpr_in_xapic_mode_faults__MSR_1(profile: str) -> None:
    """Reference example: xAPIC mode, RDMSR 0x808 -> #GP."""
    apic = make_apic(profile)
    apic.mmio_write(0x080, 0x20)
    assert_gp(apic, lambda: apic.rdmsr(0x808))
    assert_gp(apic, lambda: apic.wrmsr(0x808, 0x30))
    assert apic.mmio_read(0x080) == 0x20


# --- MSR-2 -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_msr_index_maps_to_register_offset_for_reads__MSR_2(profile: str) -> None:
    """MSR 0x800 + n reads the register at offset n << 4."""
    apic = make_apic(profile, vcpu_id=0x35, mode=ApicMode.X2APIC)
    apic.accept(0x61, trigger=Trigger.LEVEL)  # IRR word 3 bit 1, TMR word 3 bit 1
    apic.accept(0x41)
    assert apic.ack() == 0x61  # ISR word 3 bit 1
    assert apic.rdmsr(0x802) == 0x35
    assert apic.rdmsr(0x803) == 0x00050014
    assert apic.rdmsr(0x80A) == 0x60
    assert apic.rdmsr(0x80D) == (3 << 16) | (1 << 5)
    assert apic.rdmsr(0x80F) == 0x1FF
    assert [apic.rdmsr(0x810 + n) for n in range(8)] == [0, 0, 0, 2, 0, 0, 0, 0]
    assert [apic.rdmsr(0x818 + n) for n in range(8)] == [0, 0, 0, 2, 0, 0, 0, 0]
    assert [apic.rdmsr(0x820 + n) for n in range(8)] == [0, 0, 2, 0, 0, 0, 0, 0]
    assert apic.rdmsr(0x832) == 0x10000
    assert apic.rdmsr(0x83E) == 0


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("msr", "name", "value"),
    [
        (0x808, "TPR", 0x3C),
        (0x80F, "SVR", 0x1EF),
        (0x832, "LVTT", 0x000200EF),
        (0x833, "LVTTHMR", 0x000000E1),
        (0x834, "LVTPC", 0x000000E2),
        (0x835, "LVT0", 0x00008700),
        (0x836, "LVT1", 0x00000400),
        (0x837, "LVTERR", 0x000000E3),
        (0x838, "TMICT", 0x12345678),
        (0x83E, "TDCR", 0x0000000B),
    ],
    ids=hex_id,
)
def test_msr_index_maps_to_register_offset_for_writes__MSR_2(
    profile: str, msr: int, name: str, value: int
) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    assert msr == 0x800 + (REGISTER_BY_NAME[name].offset >> 4)
    apic.wrmsr(msr, value)
    assert apic.register(name) == value
    assert apic.rdmsr(msr) == value


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_icr_msr_is_64_bits_wide__MSR_2(profile: str) -> None:
    """Reference (ICR-3) example: 0x00000003_000040F1 -> ok, readback equal."""
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    apic.wrmsr(0x830, 0x00000003_000040F1)
    assert apic.rdmsr(0x830) == 0x00000003_000040F1


# --- MSR-3 -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_tpr_write_with_bit_32_faults_and_leaves_tpr__MSR_3(profile: str) -> None:
    """Reference example: WRMSR 0x808, 0x1_00000010 -> #GP; TPR unchanged."""
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    apic.wrmsr(0x808, 0x20)
    assert_gp(apic, lambda: apic.wrmsr(0x808, 0x1_00000010))
    assert apic.rdmsr(0x808) == 0x20


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("msr", [m for m in [*WRITABLE, 0x82F] if m != 0x830], ids=hex_id)
@pytest.mark.parametrize("high", [1 << 32, 1 << 63, 0xFFFFFFFF << 32], ids=hex_id)
def test_x2apic_write_with_high_bits_faults__MSR_3(profile: str, msr: int, high: int) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC, features=Features(cmci=True))
    assert_gp(apic, lambda: apic.wrmsr(msr, high))
    apic.wrmsr(msr, 0)  # the same write without the high bits is accepted


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_icr_is_the_one_register_whose_high_bits_are_accepted__MSR_3(profile: str) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    apic.wrmsr(0x830, 0xFFFFFFFF_000000F1)
    assert apic.rdmsr(0x830) == 0xFFFFFFFF_000000F1


# --- MSR-4 -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("msr", [*NON_READABLE, 0x82F], ids=hex_id)
def test_rdmsr_of_a_non_readable_register_faults__MSR_4(profile: str, msr: int) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    assert_gp(apic, lambda: apic.rdmsr(msr))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("msr", NON_READABLE, ids=hex_id)
def test_rdmsr_of_a_non_readable_register_faults_with_cmci__MSR_4(profile: str, msr: int) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC, features=Features(cmci=True))
    assert_gp(apic, lambda: apic.rdmsr(msr))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("cmci", [False, True])
def test_every_msr_from_0x840_to_0x8ff_faults_on_read_and_write__MSR_4__MSR_5(
    profile: str, cmci: bool
) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC, features=Features(cmci=cmci))
    for msr in RESERVED_TAIL:
        assert_gp(apic, partial(apic.rdmsr, msr))
        assert_gp(apic, partial(apic.wrmsr, msr, 0))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_rdmsr_of_lvt_cmci_succeeds_when_present__MSR_4(profile: str) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC, features=Features(cmci=True))
    assert apic.rdmsr(0x82F) == 0x10000


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_every_other_x2apic_msr_is_readable__MSR_4(profile: str) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC, features=Features(cmci=True))
    readable = sorted(set(range(0x800, 0x900)) - set(NON_READABLE) - set(RESERVED_TAIL))
    assert readable == [
        0x802, 0x803, 0x808, 0x80A, 0x80D, 0x80F, *range(0x810, 0x829), 0x82F, 0x830,
        *range(0x832, 0x83A), 0x83E,
    ]  # fmt: skip
    for msr in readable:
        apic.rdmsr(msr)


# --- MSR-5 -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("msr", [*NON_WRITABLE, 0x82F], ids=hex_id)
def test_wrmsr_of_a_non_writable_register_faults__MSR_5(profile: str, msr: int) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    assert_gp(apic, lambda: apic.wrmsr(msr, 0))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("msr", NON_WRITABLE, ids=hex_id)
def test_wrmsr_of_a_non_writable_register_faults_with_cmci__MSR_5(profile: str, msr: int) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC, features=Features(cmci=True))
    assert_gp(apic, lambda: apic.wrmsr(msr, 0))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_x2apic_id_is_not_writable__MSR_5(profile: str) -> None:
    """Reference example: WRMSR 0x802, 0 -> #GP (kvm-unit-tests "non-writeable x2apic id")."""
    apic = make_apic(profile, vcpu_id=4, mode=ApicMode.X2APIC)
    assert_gp(apic, lambda: apic.wrmsr(0x802, 0))
    assert_gp(apic, lambda: apic.wrmsr(0x802, 5))
    assert apic.rdmsr(0x802) == 4


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("cmci", [False, True])
def test_exactly_the_writable_msrs_accept_a_zero_write__MSR_5(profile: str, cmci: bool) -> None:
    writable = [*WRITABLE, 0x82F] if cmci else WRITABLE
    for msr in range(0x800, 0x900):
        apic = make_apic(profile, mode=ApicMode.X2APIC, features=Features(cmci=cmci))
        if msr in writable:
            apic.wrmsr(msr, 0)
        else:
            assert_gp(apic, partial(apic.wrmsr, msr, 0))


# --- MSR-6 / DIFF-D3 --------------------------------------------------------------------


def test_kvm_masks_reserved_tpr_bits_silently__MSR_6() -> None:
    """Reference example [KVM]: WRMSR 0x808, 0x110 -> ok, RDMSR 0x808 = 0x10."""
    apic = make_apic("kvm", mode=ApicMode.X2APIC)
    apic.wrmsr(0x808, 0x110)
    assert apic.rdmsr(0x808) == 0x10


def test_kvm_accepts_a_non_zero_eoi_and_performs_it__MSR_6() -> None:
    """Reference example [KVM]: WRMSR 0x80B, 0x1 -> ok (EOI performed)."""
    apic = make_apic("kvm", mode=ApicMode.X2APIC)
    apic.accept(0x31)
    assert apic.ack() == 0x31
    apic.wrmsr(0x80B, 0x1)
    assert len(apic.isr) == 0
    assert apic.rdmsr(0x80A) == 0


@pytest.mark.parametrize(
    ("msr", "value", "stored"),
    [
        (0x80F, 0xFFFFFFFF, 0x3FF),  # SVR & 0x3FF
        (0x83E, 0xF, 0xB),  # TDCR & 0xB
        (0x835, 0xFFFFFFFF, 0x1F7FF),  # LINT0 & LINT_MASK
        (0x837, 0xFFFFFFFF, 0x110FF),  # LVT Error & LVT_MASK
    ],
    ids=hex_id,
)
def test_kvm_masks_other_reserved_bits_silently__MSR_6(msr: int, value: int, stored: int) -> None:
    apic = make_apic("kvm", mode=ApicMode.X2APIC)
    apic.wrmsr(msr, value)
    assert apic.rdmsr(msr) == stored


@pytest.mark.parametrize(
    ("msr", "value"),
    [
        (0x808, 0x110),  # TPR bits 31:8
        (0x80B, 0x1),  # non-zero EOI
        (0x80F, 0xFFFFFFFF),  # SVR reserved bits
        (0x80F, 0x400),
        (0x83E, 0x4),  # TDCR bit 2
        (0x835, 0x00100000),  # LINT0 bit 20
        (0x837, 0x00000700),  # LVT Error has no delivery mode field
        (0x832, 0x00080000),  # LVT Timer bit 19
    ],
    ids=hex_id,
)
def test_sdm_faults_on_reserved_bits__MSR_6__DIFF_D3(msr: int, value: int) -> None:
    apic = make_apic("sdm", mode=ApicMode.X2APIC)
    apic.accept(0x31)
    assert apic.ack() == 0x31  # an EOI, if performed, would be visible in ISR
    assert_gp(apic, lambda: apic.wrmsr(msr, value))
    assert apic.isr == {0x31}


@pytest.mark.parametrize(
    ("msr", "value"), [(0x808, 0x10), (0x80B, 0), (0x80F, 0x3FF), (0x83E, 0xB)], ids=hex_id
)
def test_sdm_accepts_writes_without_reserved_bits__MSR_6__DIFF_D3(msr: int, value: int) -> None:
    apic = make_apic("sdm", mode=ApicMode.X2APIC)
    apic.wrmsr(msr, value)
    if msr != 0x80B:
        assert apic.rdmsr(msr) == value


@pytest.mark.parametrize(("base", "strict"), [("kvm", True), ("sdm", False)])
def test_reserved_bit_checks_follow_the_profile_knob__MSR_6__DIFF_D3(
    base: str, strict: bool
) -> None:
    apic = make_apic(Profile.custom(base, x2apic_strict_reserved_bits=strict), mode=ApicMode.X2APIC)
    if strict:
        assert_gp(apic, lambda: apic.wrmsr(0x808, 0x110))
    else:
        apic.wrmsr(0x808, 0x110)
        assert apic.rdmsr(0x808) == 0x10


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("msr", "value"),
    [
        (0x828, 0x1),  # ESR non-zero
        (0x828, 0x80),
        (0x83F, 0x131),  # SELF IPI bits 31:8 (ICR-5 example)
        (0x830, 0x00000000_000140F1),  # ICR bit 16 (ICR-3 examples)
        (0x830, 0x00000000_002040F1),  # bit 13
        (0x830, 0x00000000_001040F1),  # bit 20
    ],
    ids=hex_id,
)
def test_checked_reserved_bits_fault_under_both_profiles__MSR_6(
    profile: str, msr: int, value: int
) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    assert_gp(apic, lambda: apic.wrmsr(msr, value))
    assert len(apic.irr) == 0


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_a_refused_wrmsr_leaves_pending_state_unchanged__MSR_6(profile: str) -> None:
    apic = make_apic(profile, mode=ApicMode.X2APIC)
    apic.accept(0x31)
    apic.accept(0x41)
    assert apic.ack() == 0x41
    before = snapshot(apic)
    assert_gp(apic, lambda: apic.wrmsr(0x830, 0x00000000_000140F1))
    assert snapshot(apic) == before
    assert apic.irr == {0x31}
    assert apic.isr == {0x41}


@settings(max_examples=300, deadline=None)
@given(config=apic_configs(x2apic=True), msr=x2apic_msrs(include_unmapped=True))
def test_any_x2apic_rdmsr_reads_the_table_register_or_faults__MSR_2__MSR_4(
    config: ApicConfig, msr: int
) -> None:
    apic = config.build(ApicMode.X2APIC, sw_enabled=True)
    reg = REGISTER_BY_MSR.get(msr)
    if reg is not None and Access.R in reg.x2apic and (reg.feature is None or config.features.cmci):
        assert msr == 0x800 + (reg.offset >> 4)
        assert apic.rdmsr(msr) == apic.register(reg.name)
    else:
        assert_gp(apic, partial(apic.rdmsr, msr))


@settings(max_examples=300, deadline=None)
@given(
    config=apic_configs(x2apic=True),
    reg=writable_registers(ApicMode.X2APIC),
    value=register_values(),
    high=st.integers(1, 0xFFFFFFFF),
)
def test_any_x2apic_write_with_high_bits_faults_except_icr__MSR_3(
    config: ApicConfig, reg: Register, value: int, high: int
) -> None:
    assume(reg.name != "ICR")
    assert reg.msr is not None
    apic = config.build(ApicMode.X2APIC, sw_enabled=True)
    assert_gp(apic, partial(apic.wrmsr, reg.msr, (high << 32) | value))
