"""Acceptance of an interrupt by one APIC, per delivery mode, and delivery through an LVT.

Rules: the §8 table of ``kvm_lapic.md`` (ACCEPT-FIXED, ACCEPT-LOWEST, ACCEPT-REMRD, ACCEPT-SMI,
ACCEPT-NMI, ACCEPT-INIT, ACCEPT-STARTUP, ACCEPT-EXTINT), LVT local delivery (ACCEPT-LVT,
``kvm_apic_local_deliver``), LP-3 (``apic_arb_prio``), DIFF-D14 and DIFF-D15 (§16).
"""

from __future__ import annotations

import pytest

from lapic import (
    ApicValueError,
    DeliveryMode,
    Features,
    Interrupt,
    Level,
    LocalApic,
    Profile,
    Trigger,
)

PROFILES = ("kvm", "sdm")

SVR = 0xF0
LVT0 = 0x350
LVT1 = 0x360
LVTERR = 0x370
LVTTHMR = 0x330
DISABLED_BASE = 0xFEE00000

EVENT_MODES = [
    DeliveryMode.SMI,
    DeliveryMode.NMI,
    DeliveryMode.INIT,
    DeliveryMode.STARTUP,
]


class Notified:
    """A ``notify_hook`` that counts its calls."""

    def __init__(self, apic: LocalApic) -> None:
        self.apic = apic
        self.count = 0
        apic.notify_hook = self

    def __call__(self, apic: LocalApic) -> None:
        assert apic is self.apic
        self.count += 1


def enabled_apic(
    profile: str | Profile = "kvm", features: Features | None = None, bsp: bool = False
) -> LocalApic:
    apic = LocalApic(0, profile, bsp, features=features)
    apic.mmio_write(SVR, 0x1FF)
    assert apic.sw_enabled
    return apic


def sw_disabled_apic(profile: str | Profile = "kvm") -> LocalApic:
    apic = LocalApic(0, profile)
    assert not apic.sw_enabled  # RESET: SVR = 0xFF
    return apic


def pending_events(apic: LocalApic) -> tuple[object, ...]:
    return (
        apic.nmi_pending,
        apic.smi_pending,
        apic.init_pending,
        apic.sipi_pending,
        apic.sipi_vector,
        apic.pv_unhalted,
    )


# =====================================================================================
# ACCEPT-FIXED
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_fixed_edge_interrupt_is_accepted_into_irr_and_notifies__ACCEPT_FIXED(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    note = Notified(apic)
    assert apic.accept(0x41, DeliveryMode.FIXED, Trigger.EDGE, True) is True
    assert set(apic.irr) == {0x41}
    assert 0x41 not in apic.tmr
    assert note.count == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_fixed_edge_interrupt_with_level_clear_is_accepted__ACCEPT_FIXED(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x41, DeliveryMode.FIXED, Trigger.EDGE, False) is True
    assert set(apic.irr) == {0x41}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("level", [False, Level.DEASSERT])
def test_fixed_level_triggered_de_assert_is_discarded__ACCEPT_FIXED(
    profile: str, level: bool | Level
) -> None:
    apic = enabled_apic(profile)
    note = Notified(apic)
    assert apic.accept(0x41, DeliveryMode.FIXED, Trigger.LEVEL, level) is False
    assert not apic.irr
    assert not apic.tmr
    assert note.count == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_fixed_level_triggered_assert_is_accepted_and_sets_tmr__ACCEPT_FIXED(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x41, DeliveryMode.FIXED, Trigger.LEVEL, Level.ASSERT) is True
    assert set(apic.irr) == {0x41}
    assert set(apic.tmr) == {0x41}


@pytest.mark.parametrize("profile", PROFILES)
def test_fixed_interrupt_to_a_software_disabled_apic_is_discarded__ACCEPT_FIXED(
    profile: str,
) -> None:
    apic = sw_disabled_apic(profile)
    note = Notified(apic)
    assert apic.accept(0x41) is False
    assert not apic.irr
    assert note.count == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_fixed_interrupt_already_in_irr_is_accepted_again__ACCEPT_FIXED(profile: str) -> None:
    apic = enabled_apic(profile)
    note = Notified(apic)
    assert apic.accept(0x41) is True
    assert apic.accept(0x41) is True
    assert set(apic.irr) == {0x41}
    assert note.count == 2


@pytest.mark.parametrize("profile", PROFILES)
def test_accept_interrupt_takes_the_fields_of_a_decoded_message__ACCEPT_FIXED(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    irq = Interrupt(0x61, DeliveryMode.FIXED, trigger=Trigger.LEVEL, level=Level.ASSERT, dest=9)
    assert apic.accept_interrupt(irq) is True
    assert set(apic.irr) == {0x61}
    assert set(apic.tmr) == {0x61}
    assert apic.accept_interrupt(irq._replace(vector=0x62, level=Level.DEASSERT)) is False
    assert 0x62 not in apic.irr


# =====================================================================================
# ACCEPT-LOWEST / LP-3: arbitration counter
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_lowest_priority_is_accepted_like_fixed_and_bumps_arb_prio__ACCEPT_LOWEST(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    assert apic.arb_prio == 0
    assert apic.accept(0x41, DeliveryMode.LOWEST) is True
    assert set(apic.irr) == {0x41}
    assert apic.arb_prio == 1
    assert apic.accept(0x42, DeliveryMode.LOWEST) is True
    assert apic.arb_prio == 2


@pytest.mark.parametrize("profile", PROFILES)
def test_lowest_priority_bumps_arb_prio_even_when_software_disabled__ACCEPT_LOWEST(
    profile: str,
) -> None:
    apic = sw_disabled_apic(profile)
    assert apic.accept(0x41, DeliveryMode.LOWEST) is False
    assert not apic.irr
    assert apic.arb_prio == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_lowest_priority_bumps_arb_prio_even_for_a_discarded_de_assert__ACCEPT_LOWEST(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x41, DeliveryMode.LOWEST, Trigger.LEVEL, False) is False
    assert not apic.irr
    assert apic.arb_prio == 1


def test_sdm_bumps_arb_prio_for_a_refused_illegal_lowest_priority_vector__ACCEPT_LOWEST_DIFF_D2(
) -> None:
    apic = enabled_apic("sdm")
    assert apic.accept(0x05, DeliveryMode.LOWEST) is False
    assert apic.arb_prio == 1


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("mode", [DeliveryMode.FIXED, *EVENT_MODES])
def test_other_delivery_modes_leave_arb_prio_alone__ACCEPT_LOWEST(
    profile: str, mode: DeliveryMode
) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x41, mode) is True
    assert apic.arb_prio == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_reset_and_init_zero_arb_prio__LP_3(profile: str) -> None:
    apic = enabled_apic(profile)
    apic.accept(0x41, DeliveryMode.LOWEST)
    apic.accept(0x42, DeliveryMode.LOWEST)
    assert apic.arb_prio == 2
    apic.init()
    assert apic.arb_prio == 0
    apic.mmio_write(SVR, 0x1FF)
    apic.accept(0x41, DeliveryMode.LOWEST)
    assert apic.arb_prio == 1
    apic.reset()
    assert apic.arb_prio == 0


# =====================================================================================
# ACCEPT-REMRD / DIFF-D14
# =====================================================================================
@pytest.mark.parametrize("sw_enabled", [True, False])
def test_kvm_accepts_remote_read_as_the_pv_unhalt_kick__ACCEPT_REMRD_DIFF_D14(
    sw_enabled: bool,
) -> None:
    apic = enabled_apic("kvm") if sw_enabled else sw_disabled_apic("kvm")
    note = Notified(apic)
    assert apic.accept(0x00, DeliveryMode.REMOTE_READ) is True
    assert apic.pv_unhalted is True
    assert not apic.irr
    assert note.count == 1


def test_sdm_does_not_accept_remote_read__ACCEPT_REMRD_DIFF_D14() -> None:
    apic = enabled_apic("sdm")
    note = Notified(apic)
    before = apic.get_state()
    assert apic.accept(0x00, DeliveryMode.REMOTE_READ) is False
    assert apic.pv_unhalted is False
    assert note.count == 0
    assert apic.get_state() == before


# =====================================================================================
# ACCEPT-SMI
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("sw_enabled", [True, False])
def test_smi_is_queued_when_smm_is_available__ACCEPT_SMI(profile: str, sw_enabled: bool) -> None:
    apic = enabled_apic(profile) if sw_enabled else sw_disabled_apic(profile)
    note = Notified(apic)
    assert apic.accept(0x00, DeliveryMode.SMI) is True
    assert apic.smi_pending is True
    assert not apic.irr
    assert note.count == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_smi_is_refused_without_smm__ACCEPT_SMI(profile: str) -> None:
    apic = enabled_apic(profile, features=Features(smm=False))
    note = Notified(apic)
    assert apic.accept(0x00, DeliveryMode.SMI) is False
    assert apic.smi_pending is False
    assert note.count == 0


# =====================================================================================
# ACCEPT-NMI
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_nmi_to_a_software_disabled_apic_is_accepted__ACCEPT_NMI(profile: str) -> None:
    apic = sw_disabled_apic(profile)
    note = Notified(apic)
    assert apic.accept(0x00, DeliveryMode.NMI) is True
    assert apic.nmi_pending == 1
    assert not apic.irr
    assert note.count == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_each_nmi_is_accepted_and_at_most_two_stay_pending__ACCEPT_NMI(profile: str) -> None:
    """ACCEPT-NMI: every NMI is accepted (result 1); like KVM's process_nmi() (measured by the
    differential tests) and the CPU's one-latched-NMI rule, at most two stay pending."""
    apic = enabled_apic(profile)
    assert apic.accept(0x02, DeliveryMode.NMI) is True
    assert apic.nmi_pending == 1
    for _ in range(2):
        assert apic.accept(0x02, DeliveryMode.NMI) is True
    assert apic.nmi_pending == 2


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("vector", [0x00, 0x05, 0xFF])
def test_nmi_ignores_vector_trigger_and_level__ACCEPT_NMI(profile: str, vector: int) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(vector, DeliveryMode.NMI, Trigger.LEVEL, False) is True
    assert apic.nmi_pending == 1
    assert not apic.irr
    assert not apic.tmr


# =====================================================================================
# ACCEPT-INIT / DIFF-D15
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(
    ("trigger", "level"),
    [(Trigger.EDGE, True), (Trigger.EDGE, False), (Trigger.LEVEL, True)],
)
def test_init_is_latched_unless_it_is_a_level_de_assert__ACCEPT_INIT(
    profile: str, trigger: Trigger, level: bool
) -> None:
    apic = sw_disabled_apic(profile)
    note = Notified(apic)
    assert apic.accept(0x00, DeliveryMode.INIT, trigger, level) is True
    assert apic.init_pending is True
    assert note.count == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_init_level_de_assert_is_not_accepted_and_changes_nothing__ACCEPT_INIT_DIFF_D15(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x9A, DeliveryMode.STARTUP) is True
    note = Notified(apic)
    events = pending_events(apic)
    state = apic.get_state()
    assert apic.accept(0x00, DeliveryMode.INIT, Trigger.LEVEL, False) is False
    assert pending_events(apic) == events
    assert apic.init_pending is False
    assert apic.sipi_pending is True
    assert apic.get_state() == state
    assert note.count == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_init_discards_a_pending_sipi__ACCEPT_INIT(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x9A, DeliveryMode.STARTUP) is True
    assert apic.sipi_pending is True
    assert apic.accept(0x00, DeliveryMode.INIT) is True
    assert apic.init_pending is True
    assert apic.sipi_pending is False


@pytest.mark.parametrize("profile", PROFILES)
def test_init_does_not_touch_irr_or_registers__ACCEPT_INIT(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x41)
    state = apic.get_state()
    assert apic.accept(0x00, DeliveryMode.INIT) is True
    assert apic.get_state() == state


# =====================================================================================
# ACCEPT-STARTUP
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("sw_enabled", [True, False])
def test_startup_records_the_vector_and_sets_sipi_pending__ACCEPT_STARTUP(
    profile: str, sw_enabled: bool
) -> None:
    apic = enabled_apic(profile) if sw_enabled else sw_disabled_apic(profile)
    note = Notified(apic)
    assert apic.accept(0x9A, DeliveryMode.STARTUP) is True
    assert apic.sipi_pending is True
    assert apic.sipi_vector == 0x9A
    assert not apic.irr
    assert note.count == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_a_second_startup_replaces_the_vector__ACCEPT_STARTUP(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x9A, DeliveryMode.STARTUP)
    assert apic.accept(0x10, DeliveryMode.STARTUP)
    assert apic.sipi_vector == 0x10
    assert apic.sipi_pending is True


# =====================================================================================
# ACCEPT-EXTINT
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_extint_is_not_accepted_through_the_apic__ACCEPT_EXTINT(profile: str) -> None:
    apic = enabled_apic(profile)
    note = Notified(apic)
    events = pending_events(apic)
    state = apic.get_state()
    assert apic.accept(0x30, DeliveryMode.EXTINT) is False
    assert pending_events(apic) == events
    assert apic.get_state() == state
    assert note.count == 0


# =====================================================================================
# Hardware-disabled APIC (model choice documented in lapic.apic)
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("mode", list(DeliveryMode))
def test_a_hardware_disabled_apic_accepts_nothing__ACCEPT_FIXED_MATCH_2(
    profile: str, mode: DeliveryMode
) -> None:
    apic = enabled_apic(profile)
    apic.wrmsr(0x1B, DISABLED_BASE)
    note = Notified(apic)
    events = pending_events(apic)
    assert apic.accept(0x41, mode) is False
    assert pending_events(apic) == events
    assert not apic.irr
    assert apic.arb_prio == 0
    assert note.count == 0


# =====================================================================================
# ACCEPT-LVT: kvm_apic_local_deliver
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_a_masked_lvt_delivers_nothing__ACCEPT_LVT(profile: str) -> None:
    apic = enabled_apic(profile)
    note = Notified(apic)
    apic.mmio_write(LVT1, 0x10041)
    assert apic.lvt("LVT1") == 0x10041
    assert apic.local_deliver("LVT1") is False
    assert not apic.irr
    assert note.count == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_an_lvt_of_a_hardware_disabled_apic_delivers_nothing__ACCEPT_LVT(profile: str) -> None:
    apic = enabled_apic(profile)
    apic.mmio_write(LVT0, 0x400)
    apic.mmio_write(LVT1, 0x41)
    apic.wrmsr(0x1B, DISABLED_BASE)
    assert apic.local_deliver("LVT0") is False
    assert apic.local_deliver("LVT1") is False
    assert apic.nmi_pending == 0
    assert not apic.irr


@pytest.mark.parametrize("profile", PROFILES)
def test_lint0_in_nmi_mode_queues_an_nmi__ACCEPT_LVT_ACCEPT_NMI(profile: str) -> None:
    apic = enabled_apic(profile)
    note = Notified(apic)
    apic.mmio_write(LVT0, 0x400)
    assert apic.local_deliver("LVT0") is True
    assert apic.nmi_pending == 1
    assert not apic.irr
    assert note.count == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_a_fixed_lvt_delivers_its_vector_with_its_trigger_mode__ACCEPT_LVT(profile: str) -> None:
    apic = enabled_apic(profile)
    apic.mmio_write(LVT1, 0x8041)  # fixed, level-triggered, vector 0x41
    assert apic.local_deliver("LVT1") is True
    assert set(apic.irr) == {0x41}
    assert set(apic.tmr) == {0x41}  # level = 1 always, trig = LVT bit 15
    apic.mmio_write(LVTERR, 0x42)
    assert apic.local_deliver("LVTERR") is True
    assert set(apic.irr) == {0x41, 0x42}
    assert 0x42 not in apic.tmr


@pytest.mark.parametrize("profile", PROFILES)
def test_an_lvt_of_a_software_disabled_apic_is_masked_and_delivers_nothing__ACCEPT_LVT(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    apic.mmio_write(LVTTHMR, 0x41)
    apic.mmio_write(SVR, 0xFF)
    assert apic.lvt("LVTTHMR") == 0x10041
    assert apic.local_deliver("LVTTHMR") is False
    assert not apic.irr


@pytest.mark.parametrize("profile", PROFILES)
def test_lint0_in_extint_mode_is_not_accepted__ACCEPT_LVT_ACCEPT_EXTINT(profile: str) -> None:
    apic = enabled_apic(profile)
    apic.mmio_write(LVT0, 0x700)
    assert apic.local_deliver("LVT0") is False
    assert not apic.irr


@pytest.mark.parametrize("profile", PROFILES)
def test_an_absent_cmci_lvt_delivers_nothing_and_an_unknown_name_is_refused__ACCEPT_LVT(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    assert apic.local_deliver("LVTCMCI") is False
    with pytest.raises(ApicValueError, match="lvt"):
        apic.local_deliver("ICR")
    with_cmci = enabled_apic(profile, features=Features(cmci=True))
    with_cmci.mmio_write(0x2F0, 0x43)
    assert with_cmci.local_deliver("LVTCMCI") is True
    assert set(with_cmci.irr) == {0x43}


# =====================================================================================
# notify_hook
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_notify_hook_is_called_once_per_accepted_interrupt_and_never_for_a_refused_one__ACCEPT_FIXED(  # noqa: E501
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    note = Notified(apic)
    outcomes = [
        apic.accept(0x41),
        apic.accept(0x42, DeliveryMode.LOWEST),
        apic.accept(0x00, DeliveryMode.NMI),
        apic.accept(0x00, DeliveryMode.SMI),
        apic.accept(0x00, DeliveryMode.INIT),
        apic.accept(0x9A, DeliveryMode.STARTUP),
        apic.accept(0x30, DeliveryMode.EXTINT),
        apic.accept(0x43, DeliveryMode.FIXED, Trigger.LEVEL, False),
    ]
    assert outcomes == [True, True, True, True, True, True, False, False]
    assert note.count == 6
