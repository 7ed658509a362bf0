"""IA32_APIC_BASE (MSR 0x1B): BASE-1..8, DIFF-D10, DIFF-D11 (reference ``kvm_lapic.md`` §2)."""

from __future__ import annotations

import pytest

from lapic import ApicMode, Features, LocalApic, Profile
from lapic.registers import APIC_BASE_MSR
from tests.lapic.strategies import PROFILE_NAMES, assert_gp, hex_id, make_apic, snapshot

EN = 0x800
EXTD = 0x400
BSP = 0x100
DEFAULT = 0xFEE00000

MODE_BITS = {ApicMode.DISABLED: 0, ApicMode.XAPIC: EN, ApicMode.X2APIC: EN | EXTD}


def base_msr(apic: LocalApic) -> int:
    return apic.rdmsr(APIC_BASE_MSR)


def assert_mode(apic: LocalApic, mode: ApicMode) -> None:
    assert apic.mode is mode


# --- BASE-1 -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("mode", list(ApicMode), ids=hex_id)
@pytest.mark.parametrize("host", [False, True])
def test_writing_the_current_value_always_succeeds_and_changes_nothing__BASE_1(
    profile: str, mode: ApicMode, host: bool
) -> None:
    """Reference example: current 0xFEE00900, write 0xFEE00900 -> ok, no side effects."""
    apic = make_apic(profile, vcpu_id=3, mode=mode, bsp=True)
    if mode is ApicMode.XAPIC:
        apic.mmio_write(0x020, 0x07000000)  # an ID a real EN 0->1 would reset (BASE-6)
    before = snapshot(apic)
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | BSP | MODE_BITS[mode], host_initiated=host)
    assert snapshot(apic) == before


# --- BASE-2 -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("host", [False, True])
@pytest.mark.parametrize("bit", [*range(0, 8), 9], ids=lambda b: f"bit{b}")
def test_reserved_low_bits_fault__BASE_2(profile: str, host: bool, bit: int) -> None:
    """kvm-unit-tests test_apicbase: orig | 1 -> #GP; 0xFEE00A00 (bit 9) -> #GP."""
    apic = make_apic(profile, bsp=True)
    orig = base_msr(apic)
    assert orig == 0xFEE00900
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, orig | (1 << bit), host_initiated=host))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("maxphyaddr", [36, 39, 46, 52], ids=hex_id)
def test_bits_at_and_above_maxphyaddr_fault__BASE_2(profile: str, maxphyaddr: int) -> None:
    """kvm-unit-tests test_apicbase: orig | (1 << maxphyaddr) -> #GP."""
    apic = make_apic(profile, features=Features(maxphyaddr=maxphyaddr))
    orig = base_msr(apic)
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, orig | (1 << maxphyaddr)))
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, orig | (1 << 63)))
    apic.wrmsr(APIC_BASE_MSR, orig | (1 << (maxphyaddr - 1)))  # the top address bit is fine
    assert base_msr(apic) == orig | (1 << (maxphyaddr - 1))


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("host", [False, True])
def test_extd_is_reserved_without_x2apic_in_cpuid__BASE_2(profile: str, host: bool) -> None:
    """kvm-unit-tests test_enable_x2apic: "enable unsupported x2apic" -> #GP."""
    apic = make_apic(profile, bsp=True, features=Features(x2apic=False))
    assert_gp(
        apic, lambda: apic.wrmsr(APIC_BASE_MSR, DEFAULT | BSP | EN | EXTD, host_initiated=host)
    )
    assert_mode(apic, ApicMode.XAPIC)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(("bsp", "new"), [(False, 0xFEE00900), (True, 0xFEE00800)])
def test_the_bsp_bit_is_writable__BASE_2(profile: str, bsp: bool, new: int) -> None:
    apic = make_apic(profile, bsp=bsp)
    apic.mmio_write(0x080, 0x20)
    apic.wrmsr(APIC_BASE_MSR, new)
    assert base_msr(apic) == new
    assert_mode(apic, ApicMode.XAPIC)
    assert apic.mmio_read(0x080) == 0x20


# --- BASE-3 -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("mode", list(ApicMode), ids=hex_id)
@pytest.mark.parametrize("host", [False, True])
def test_extd_without_en_is_invalid_even_for_the_host__BASE_3(
    profile: str, mode: ApicMode, host: bool
) -> None:
    """Reference example: any state, write 0xFEE00400 -> #GP."""
    apic = make_apic(profile, mode=mode)
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, 0xFEE00400, host_initiated=host))
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, DEFAULT | BSP | EXTD, host_initiated=host))


# --- BASE-4 -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_enable_x2apic_sequence_of_kvm_unit_tests__BASE_4(profile: str) -> None:
    """kvm-unit-tests x86/apic.c test_enable_x2apic, step by step."""
    apic = make_apic(profile, bsp=True)
    base = base_msr(apic) & ~(EN | EXTD)
    assert base == DEFAULT | BSP
    apic.wrmsr(APIC_BASE_MSR, base | EN | EXTD)  # enable_x2apic()
    assert_mode(apic, ApicMode.X2APIC)
    # "x2apic enabled to invalid state", "x2apic enabled to apic enabled"
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, base | EXTD))
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, base | EN))
    # "x2apic enabled to disabled state"
    apic.wrmsr(APIC_BASE_MSR, base)
    assert_mode(apic, ApicMode.DISABLED)
    # "disabled to invalid state", "disabled to x2apic enabled"
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, base | EXTD))
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, base | EN | EXTD))
    # "apic disabled to apic enabled"
    apic.wrmsr(APIC_BASE_MSR, base | EN)
    assert_mode(apic, ApicMode.XAPIC)
    # "apic enabled to invalid state"
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, base | EXTD))
    assert base_msr(apic) == base | EN


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("old", "new"),
    [
        (ApicMode.DISABLED, ApicMode.XAPIC),
        (ApicMode.XAPIC, ApicMode.X2APIC),
        (ApicMode.XAPIC, ApicMode.DISABLED),
        (ApicMode.X2APIC, ApicMode.DISABLED),
    ],
    ids=hex_id,
)
def test_every_other_guest_mode_transition_is_legal__BASE_4(
    profile: str, old: ApicMode, new: ApicMode
) -> None:
    apic = make_apic(profile, mode=old)
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | MODE_BITS[new])
    assert_mode(apic, new)
    assert base_msr(apic) == DEFAULT | MODE_BITS[new]


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("old", "new"),
    [(ApicMode.X2APIC, ApicMode.XAPIC), (ApicMode.DISABLED, ApicMode.X2APIC)],
    ids=hex_id,
)
def test_guest_initiated_illegal_transitions_fault__BASE_4(
    profile: str, old: ApicMode, new: ApicMode
) -> None:
    apic = make_apic(profile, mode=old)
    assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, DEFAULT | MODE_BITS[new]))


# --- BASE-5 / DIFF-D11 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [(ApicMode.X2APIC, ApicMode.XAPIC), (ApicMode.DISABLED, ApicMode.X2APIC)],
    ids=hex_id,
)
def test_kvm_lets_the_host_make_the_guest_illegal_transitions__BASE_5__DIFF_D11(
    old: ApicMode, new: ApicMode
) -> None:
    apic = make_apic("kvm", mode=old)
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | MODE_BITS[new], host_initiated=True)
    assert_mode(apic, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [(ApicMode.X2APIC, ApicMode.XAPIC), (ApicMode.DISABLED, ApicMode.X2APIC)],
    ids=hex_id,
)
def test_sdm_refuses_them_to_the_host_too__BASE_5__DIFF_D11(old: ApicMode, new: ApicMode) -> None:
    apic = make_apic("sdm", mode=old)
    assert_gp(
        apic, lambda: apic.wrmsr(APIC_BASE_MSR, DEFAULT | MODE_BITS[new], host_initiated=True)
    )


@pytest.mark.parametrize(("base", "allowed"), [("kvm", False), ("sdm", True)])
def test_host_x2apic_exit_follows_the_profile_knob__DIFF_D11(base: str, allowed: bool) -> None:
    apic = make_apic(Profile.custom(base, host_may_leave_x2apic=allowed), mode=ApicMode.X2APIC)
    if allowed:
        apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN, host_initiated=True)
        assert_mode(apic, ApicMode.XAPIC)
    else:
        assert_gp(apic, lambda: apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN, host_initiated=True))


def test_kvm_host_round_trip_of_xapic_state_test__BASE_5() -> None:
    """selftest xapic_state_test test_apic_id: host writes xAPIC -> x2APIC -> xAPIC succeed."""
    apic = make_apic("kvm", vcpu_id=5)
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN | EXTD, host_initiated=True)
    assert apic.rdmsr(0x802) == 5
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN, host_initiated=True)
    assert apic.mmio_read(0x020) == 0x05000000


# --- BASE-6 -----------------------------------------------------------------------------


def test_kvm_reenabling_resets_only_the_xapic_id__BASE_6() -> None:
    """Reference example: vcpu 3, xAPIC, TPR=0x20; EN=0 then EN=1 -> ID 0x03000000, TPR 0x20."""
    apic = make_apic("kvm", vcpu_id=3)
    apic.mmio_write(0x080, 0x20)
    apic.mmio_write(0x020, 0x07000000)
    apic.mmio_write(0x0D0, 0x04000000)
    apic.mmio_write(0x350, 0x000000F3)
    apic.wrmsr(APIC_BASE_MSR, DEFAULT)
    assert_mode(apic, ApicMode.DISABLED)
    assert apic.tpr == 0x20  # EN 1->0 keeps the registers
    assert apic.id_register == 0x07000000
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN)
    assert apic.mmio_read(0x020) == 0x03000000
    assert apic.mmio_read(0x080) == 0x20
    assert apic.mmio_read(0x0D0) == 0x04000000
    assert apic.mmio_read(0x350) == 0x000000F3
    assert apic.mmio_read(0x0F0) == 0x1FF


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(
    ("vcpu_id", "ldr"), [(17, 0x00010002), (0, 0x1), (0x123, 0x00120008)], ids=hex_id
)
def test_entering_x2apic_sets_the_x2apic_id_and_derived_ldr__BASE_6(
    profile: str, vcpu_id: int, ldr: int
) -> None:
    """Reference example: vcpu_id 17, xAPIC -> x2APIC: 0x802 = 0x11, 0x80D = 0x00010002."""
    apic = make_apic(profile, vcpu_id=vcpu_id)
    apic.mmio_write(0x0D0, 0xAB000000)
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN | EXTD)
    assert apic.rdmsr(0x802) == vcpu_id
    assert apic.rdmsr(0x80D) == ldr


@pytest.mark.parametrize(
    ("vcpu_id", "xapic_id"), [(17, 0x11000000), (0x123, 0x23000000)], ids=hex_id
)
def test_kvm_host_leaving_x2apic_gives_the_8_bit_xapic_id__BASE_6(
    vcpu_id: int, xapic_id: int
) -> None:
    apic = make_apic("kvm", vcpu_id=vcpu_id, mode=ApicMode.X2APIC)
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN, host_initiated=True)
    assert apic.mmio_read(0x020) == xapic_id


def test_kvm_x2apic_to_disabled_keeps_id_and_ldr__BASE_6() -> None:
    """Code-derived: EXTD 1->0 with EN 0 touches neither ID nor LDR; re-enabling xAPIC resets
    only the ID, so LDR keeps the x2APIC-derived value."""
    apic = make_apic("kvm", vcpu_id=17, mode=ApicMode.X2APIC)
    apic.wrmsr(APIC_BASE_MSR, DEFAULT)
    assert apic.id_register == 0x11
    assert apic.ldr == 0x00010002
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN)
    assert apic.mmio_read(0x020) == 0x11000000
    assert apic.mmio_read(0x0D0) == 0x00010002


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_base_address_change_keeps_mode_and_registers__BASE_6(profile: str) -> None:
    apic = make_apic(profile, vcpu_id=3)
    apic.mmio_write(0x080, 0x20)
    apic.wrmsr(APIC_BASE_MSR, 0xFEF00800)
    assert apic.base_address == 0xFEF00000
    assert base_msr(apic) == 0xFEF00800
    assert_mode(apic, ApicMode.XAPIC)
    assert apic.mmio_read(0x080) == 0x20


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_cpuid_apic_bit_tracks_en__BASE_6(profile: str) -> None:
    apic = make_apic(profile)
    assert apic.cpuid_apic
    apic.wrmsr(APIC_BASE_MSR, DEFAULT)
    assert not apic.cpuid_apic
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN)
    assert apic.cpuid_apic
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN | EXTD)
    assert apic.cpuid_apic
    apic.wrmsr(APIC_BASE_MSR, DEFAULT)
    assert not apic.cpuid_apic


# --- BASE-7 / DIFF-D10 ------------------------------------------------------------------


def _disable_and_reenable(profile: str | Profile) -> LocalApic:
    apic = make_apic(profile, vcpu_id=3)
    apic.mmio_write(0x080, 0x20)
    apic.mmio_write(0x350, 0x000000F3)
    apic.wrmsr(APIC_BASE_MSR, DEFAULT)
    apic.wrmsr(APIC_BASE_MSR, DEFAULT | EN)
    return apic


def test_kvm_keeps_registers_across_disable__BASE_7__DIFF_D10() -> None:
    """kvm-unit-tests test_apic_disable expects TPR preserved."""
    apic = _disable_and_reenable("kvm")
    assert apic.mmio_read(0x080) == 0x20
    assert apic.mmio_read(0x350) == 0x000000F3
    assert apic.mmio_read(0x0F0) == 0x1FF


def test_sdm_returns_to_the_power_up_state_after_disable__BASE_7__DIFF_D10() -> None:
    apic = _disable_and_reenable("sdm")
    assert apic.mmio_read(0x080) == 0
    assert apic.mmio_read(0x350) == 0x00010000
    assert apic.mmio_read(0x0F0) == 0xFF
    assert apic.mmio_read(0x020) == 0x03000000


@pytest.mark.parametrize(("base", "resets"), [("kvm", True), ("sdm", False)])
def test_disable_reset_follows_the_profile_knob__DIFF_D10(base: str, resets: bool) -> None:
    apic = _disable_and_reenable(Profile.custom(base, disable_resets_state=resets))
    assert apic.mmio_read(0x080) == (0 if resets else 0x20)


# --- BASE-8 -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize(("bsp", "value"), [(True, 0xFEE00900), (False, 0xFEE00800)])
def test_reset_value_of_apic_base__BASE_8(profile: str, bsp: bool, value: int) -> None:
    apic = LocalApic(4, profile, bsp)
    assert base_msr(apic) == value
    apic.wrmsr(APIC_BASE_MSR, 0xFEF00000 | EN | EXTD)
    apic.reset()
    assert base_msr(apic) == value
    assert_mode(apic, ApicMode.XAPIC)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
@pytest.mark.parametrize("value", [0xFEE00C00, 0xFEF00800, 0xFEE00000, 0xFEE00900], ids=hex_id)
def test_init_leaves_apic_base__BASE_8(profile: str, value: int) -> None:
    apic = make_apic(profile)
    apic.wrmsr(APIC_BASE_MSR, value)
    apic.init()
    assert base_msr(apic) == value


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_x2apic_mode_survives_init__BASE_8(profile: str) -> None:
    apic = make_apic(profile, vcpu_id=17, mode=ApicMode.X2APIC)
    apic.init()
    assert_mode(apic, ApicMode.X2APIC)
    assert apic.rdmsr(0x802) == 17
