"""xAPIC MMIO access rules MMIO-1..5 (reference ``kvm_lapic.md`` §3).

A not-serviced read returns ``profile.unserviced_read_value`` cut to the access size, which
is UNVERIFIED (§18.1): tests only compare against the profile's field, never a literal.  To
make "not serviced" observable even where a register happens to hold that value, most tests
use profiles whose ``unserviced_read_value`` is a sentinel no register of a fresh APIC holds.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lapic import ApicMode, ApicValueError, Features, LocalApic, Profile
from lapic.registers import APIC_BASE_MSR, REGISTER_BY_NAME, REGISTER_BY_OFFSET, Access
from tests.lapic.strategies import (
    PROFILE_NAMES,
    ApicConfig,
    apic_configs,
    hex_id,
    make_apic,
    snapshot,
    xapic_offsets,
)

SENTINEL = 0xA5A5A5A5


def sentinel_profile(name: str, **changes: object) -> Profile:
    """Preset ``name`` whose not-serviced reads return :data:`SENTINEL`."""
    return Profile.custom(
        name, unserviced_read_value=SENTINEL, unserviced_read_repeats_last=False, **changes
    )


def assert_not_serviced(apic: LocalApic, offset: int, size: int = 4) -> None:
    before = snapshot(apic)
    assert apic.mmio_read(offset, size) == unserviced(apic, size)
    assert snapshot(apic) == before


def unserviced(apic: LocalApic, size: int) -> int:
    """The profile's not-serviced value as an access of ``size`` bytes returns it."""
    return apic.profile.unserviced_read_value & ((1 << (8 * size)) - 1)


# --- MMIO-1: the window ---------------------------------------------------------------


@pytest.mark.parametrize("offset", [0x000, 0x030, 0x3F0, 0x400, 0xFF0, 0xFFF], ids=hex_id)
def test_every_offset_of_the_4k_page_is_accepted__MMIO_1(offset: int) -> None:
    apic = make_apic(sentinel_profile("kvm"))
    apic.mmio_read(offset, 1)
    apic.mmio_write(offset & ~3, 0)


@pytest.mark.parametrize("offset", [-1, 0x1000, 0x1030], ids=hex_id)
def test_offsets_outside_the_4k_page_are_refused_as_caller_errors__MMIO_1(offset: int) -> None:
    apic = make_apic()
    with pytest.raises(ApicValueError):
        apic.mmio_read(offset)
    with pytest.raises(ApicValueError):
        apic.mmio_write(offset, 0)


def test_the_window_follows_the_page_not_the_base_address__MMIO_1() -> None:
    """After moving the base (BASE-6) the registers keep their offsets in the page."""
    apic = make_apic(vcpu_id=5)
    apic.wrmsr(APIC_BASE_MSR, 0xFEF00800)
    assert apic.base_address == 0xFEF00000
    assert apic.mmio_read(0x020) == 0x05000000
    assert apic.mmio_read(0x030) == 0x00050014


# --- MMIO-2: x2APIC mode and hardware-disabled APIC ----------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("mode", [ApicMode.X2APIC, ApicMode.DISABLED], ids=hex_id)
@pytest.mark.parametrize(
    ("offset", "size", "ones"),
    [
        (0x030, 4, 0xFFFFFFFF),  # reference example: x2APIC, read 0xFEE00030
        (0x020, 1, 0xFF),
        (0x022, 2, 0xFFFF),
        (0x080, 8, 0xFFFFFFFFFFFFFFFF),
        (0x0B0, 4, 0xFFFFFFFF),  # EOI: not readable even in xAPIC mode
        (0xFFF, 1, 0xFF),  # beyond the registers
    ],
    ids=hex_id,
)
def test_reads_in_the_hole_return_all_ones_with_the_quirk__MMIO_2(
    profile: str, mode: ApicMode, offset: int, size: int, ones: int
) -> None:
    apic = make_apic(sentinel_profile(profile, mmio_hole_quirk=True), mode=mode)
    before = snapshot(apic)
    assert apic.mmio_read(offset, size) == ones
    assert snapshot(apic) == before


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("mode", [ApicMode.X2APIC, ApicMode.DISABLED], ids=hex_id)
@pytest.mark.parametrize(
    ("offset", "size"), [(0x030, 4), (0x020, 1), (0x0F0, 4), (0x080, 8)], ids=hex_id
)
def test_reads_in_the_hole_are_not_serviced_without_the_quirk__MMIO_2(
    profile: str, mode: ApicMode, offset: int, size: int
) -> None:
    apic = make_apic(sentinel_profile(profile, mmio_hole_quirk=False), mode=mode)
    assert_not_serviced(apic, offset, size)


@pytest.mark.parametrize("mode", [ApicMode.X2APIC, ApicMode.DISABLED], ids=hex_id)
def test_presets_differ_on_the_mmio_hole__MMIO_2(mode: ApicMode) -> None:
    """kvm: KVM_X86_QUIRK_LAPIC_MMIO_HOLE is on by default; sdm: the page is not decoded."""
    kvm = make_apic(sentinel_profile("kvm"), mode=mode)
    sdm = make_apic(sentinel_profile("sdm"), mode=mode)
    assert kvm.mmio_read(0x0F0) == 0xFFFFFFFF
    assert_not_serviced(sdm, 0x0F0)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("quirk", [True, False])
@pytest.mark.parametrize(
    ("offset", "value"), [(0x080, 0x30), (0x0F0, 0x0), (0x350, 0x700)], ids=hex_id
)
def test_writes_in_x2apic_mode_are_dropped__MMIO_2(
    profile: str, quirk: bool, offset: int, value: int
) -> None:
    apic = make_apic(Profile.custom(profile, mmio_hole_quirk=quirk), mode=ApicMode.X2APIC)
    before = snapshot(apic)
    apic.mmio_write(offset, value)
    assert snapshot(apic) == before
    msr = 0x800 + (offset >> 4)
    assert apic.rdmsr(msr) == {0x808: 0, 0x80F: 0x1FF, 0x835: 0x10000}[msr]


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("quirk", [True, False])
def test_writes_to_a_disabled_apic_are_dropped__MMIO_2(profile: str, quirk: bool) -> None:
    apic = make_apic(Profile.custom(profile, mmio_hole_quirk=quirk), mode=ApicMode.DISABLED)
    before = snapshot(apic)
    apic.mmio_write(0x080, 0x30)
    apic.mmio_write(0x0D0, 0x01000000)
    assert snapshot(apic) == before


def test_a_tpr_written_while_disabled_is_not_seen_after_reenabling__MMIO_2() -> None:
    apic = make_apic("kvm")
    apic.mmio_write(0x080, 0x20)
    apic.wrmsr(APIC_BASE_MSR, 0xFEE00000)
    apic.mmio_write(0x080, 0x30)
    apic.wrmsr(APIC_BASE_MSR, 0xFEE00800)
    assert apic.mmio_read(0x080) == 0x20


# --- MMIO-3: only aligned 4-byte writes -----------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("offset", "size", "value"),
    [
        (0x080, 1, 0x20),  # reference example: 1-byte write of 0x20 to 0xFEE00080
        (0x080, 2, 0x20),
        (0x080, 8, 0x20),
        (0x084, 4, 0x20),  # 4 bytes, but not on the 16-byte register boundary
        (0x088, 4, 0x20),
        (0x081, 1, 0x20),
        (0x0D0, 2, 0xFFFF),
        (0x0D2, 2, 0xFFFF),  # would reach LDR bits 31:16
        (0x0F0, 1, 0x00),  # a byte write that would software-disable
    ],
    ids=hex_id,
)
def test_writes_that_are_not_4_bytes_at_a_16_byte_boundary_are_ignored__MMIO_3(
    profile: str, offset: int, size: int, value: int
) -> None:
    apic = make_apic(profile)
    before = snapshot(apic)
    apic.mmio_write(offset, value, size)
    assert snapshot(apic) == before


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_the_aligned_4_byte_write_of_the_same_value_is_serviced__MMIO_3(profile: str) -> None:
    apic = make_apic(profile)
    apic.mmio_write(0x080, 0x20, 4)
    assert apic.mmio_read(0x080) == 0x20


# --- MMIO-4: reads ----------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_two_byte_read_inside_the_id_register__MMIO_4(profile: str) -> None:
    """Reference example: 2-byte read at 0xFEE00022 with ID=0x05000000 -> 0x0500."""
    apic = make_apic(sentinel_profile(profile), vcpu_id=5)
    assert apic.mmio_read(0x020) == 0x05000000
    assert apic.mmio_read(0x022, 2) == 0x0500
    assert apic.mmio_read(0x023, 1) == 0x05
    assert apic.mmio_read(0x020, 2) == 0x0000


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_partial_reads_return_the_addressed_bytes__MMIO_4(profile: str) -> None:
    apic = make_apic(sentinel_profile(profile))
    apic.mmio_write(0x0D0, 0x12000000)  # LDR
    apic.mmio_write(0x350, 0x0001A7F3)  # LVT0 (bits 12 and 14 clear: same under both)
    assert apic.mmio_read(0x350, 1) == 0xF3
    assert apic.mmio_read(0x351, 1) == 0xA7
    assert apic.mmio_read(0x352, 1) == 0x01
    assert apic.mmio_read(0x353, 1) == 0x00
    assert apic.mmio_read(0x351, 2) == 0x01A7
    assert apic.mmio_read(0x352, 2) == 0x0001
    assert apic.mmio_read(0x0D3, 1) == 0x12


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0x022, 4),  # a + len = 6
        (0x023, 2),  # 5
        (0x021, 4),  # 5
        (0x020, 8),  # 8
        (0x024, 1),  # 5: bytes 4..15 of a register slot
        (0x028, 4),
        (0x02F, 1),
        (0x350, 8),
    ],
    ids=hex_id,
)
def test_reads_crossing_the_4_byte_register_are_not_serviced__MMIO_4(
    profile: str, offset: int, size: int
) -> None:
    apic = make_apic(sentinel_profile(profile), vcpu_id=5)
    assert_not_serviced(apic, offset, size)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    "offset",
    [
        0x000,
        0x010,  # reserved
        0x040,
        0x070,  # reserved between LVR and TPR
        0x0B0,  # EOI is write-only
        0x0C0,  # RRD
        0x290,
        0x2E0,  # reserved
        0x2F0,  # LVT CMCI without CMCI
        0x3A0,
        0x3D0,  # reserved
        0x3F0,  # SELF IPI: x2APIC only
        0x400,
        0x800,
        0xFF0,  # beyond 0x3F0
    ],
    ids=hex_id,
)
def test_reads_of_non_readable_offsets_are_not_serviced__MMIO_4(profile: str, offset: int) -> None:
    apic = make_apic(sentinel_profile(profile))
    assert_not_serviced(apic, offset)
    assert_not_serviced(apic, offset, 1)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_lvt_cmci_is_readable_when_the_vcpu_has_cmci__MMIO_4(profile: str) -> None:
    apic = make_apic(sentinel_profile(profile), features=Features(cmci=True))
    assert apic.mmio_read(0x2F0) == 0x00010000


def test_unserviced_reads_return_the_profiles_value_under_the_default_profile__MMIO_4() -> None:
    apic = make_apic("kvm")
    assert_not_serviced(apic, 0x0B0)
    assert_not_serviced(apic, 0x022, 4)


# --- MMIO-5: writes to read-only and unknown offsets ---------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    "name", ["LVR", "PPR", "APR", "RRD", "ISR0", "TMR3", "IRR7", "TMCCT", "SELF_IPI"], ids=hex_id
)
def test_writes_to_read_only_registers_are_ignored__MMIO_5(profile: str, name: str) -> None:
    apic = make_apic(profile)
    offset = REGISTER_BY_NAME[name].offset
    before = snapshot(apic)
    apic.mmio_write(offset, 0x12345678)
    apic.mmio_write(offset, 0xFFFFFFFF)
    assert snapshot(apic) == before


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_lvr_write_leaves_the_version__MMIO_5(profile: str) -> None:
    """Reference example: write 0x12345678 to LVR -> LVR unchanged, no fault."""
    apic = make_apic(profile)
    apic.mmio_write(0x030, 0x12345678)
    assert apic.mmio_read(0x030) == 0x00050014


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_self_ipi_write_in_xapic_mode_sends_nothing__MMIO_5(profile: str) -> None:
    """Reference example: write to 0x3F0 in xAPIC mode -> ignored, no IPI."""
    apic = make_apic(profile)
    apic.mmio_write(0x3F0, 0x31)
    assert 0x31 not in apic.irr
    assert len(apic.irr) == 0
    assert apic.pending_interrupt() is None


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    "offset", [0x000, 0x010, 0x040, 0x2E0, 0x2F0, 0x3A0, 0x400, 0xFF0], ids=hex_id
)
def test_writes_to_unknown_offsets_are_ignored__MMIO_5(profile: str, offset: int) -> None:
    apic = make_apic(profile)
    before = snapshot(apic)
    apic.mmio_write(offset, 0xFFFFFFFF)
    assert snapshot(apic) == before


@settings(max_examples=300, deadline=None)
@given(
    config=apic_configs(),
    offset=xapic_offsets(),
    align=st.integers(0, 15),
    size=st.sampled_from([1, 2, 4, 8]),
)
def test_any_read_is_a_slice_of_the_register_or_not_serviced__MMIO_4(
    config: ApicConfig, offset: int, align: int, size: int
) -> None:
    """Bytes ``[a, a+len)`` of a readable register when ``a + len <= 4``; else not serviced."""
    apic = make_apic(
        sentinel_profile(config.profile),
        vcpu_id=config.vcpu_id,
        features=config.features,
        bsp=config.bsp,
    )
    reg = REGISTER_BY_OFFSET[offset]
    readable = Access.R in reg.xapic and (reg.feature is None or config.features.cmci)
    before = snapshot(apic)
    value = apic.mmio_read(offset + align, size)
    if readable and align + size <= 4:
        whole = apic.register(reg.name) & 0xFFFFFFFF
        assert value == (whole >> (8 * align)) & ((1 << (8 * size)) - 1)
    else:
        assert value == unserviced(apic, size)
    assert snapshot(apic) == before
