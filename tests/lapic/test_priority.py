"""Interrupt state: highest vector, PPR, deliverability, acknowledge, EOI, TMR, illegal vectors,
EOI-broadcast suppression.

Rules: PRIO-1..7 and DEOI-1/DEOI-2 of ``kvm_lapic.md`` (§6, §9.7), differences DIFF-D2 and
DIFF-D17 (§16).  Every example of those sections appears here with the reference's outcome.
"""

from __future__ import annotations

import pytest

from lapic import DeliveryMode, Features, GuestFault, LocalApic, Profile, Trigger

PROFILES = ("kvm", "sdm")

SVR = 0xF0
TPR = 0x80
PPR = 0xA0
EOI = 0xB0
ESR = 0x280
ICR = 0x300
ICR2 = 0x310
IRR_BASE = 0x200
ISR_BASE = 0x100
TMR_BASE = 0x180
X2APIC_BASE = 0xFEE00C00
DISABLED_BASE = 0xFEE00000


def enabled_apic(profile: str | Profile = "kvm", features: Features | None = None) -> LocalApic:
    """A RESET xAPIC that the guest has software-enabled (SVR = 0x1FF)."""
    apic = LocalApic(0, profile, features=features)
    apic.mmio_write(SVR, 0x1FF)
    assert apic.sw_enabled
    return apic


def word(apic: LocalApic, offset: int) -> int:
    """The raw 32-bit word of the register page at ``offset``."""
    return int.from_bytes(apic.regs[offset : offset + 4], "little")


def load_isr(apic: LocalApic, vectors: list[int]) -> None:
    """Accept and acknowledge ``vectors`` in ascending order so each lands in ISR."""
    for v in sorted(vectors):
        assert apic.accept(v)
        assert apic.ack() == v


class EoiRecorder:
    """An ``eoi_hook`` that records ``(vector, level_triggered, suppressed)``."""

    def __init__(self, apic: LocalApic) -> None:
        self.apic = apic
        self.calls: list[tuple[int, bool, bool]] = []
        apic.eoi_hook = self

    def __call__(self, apic: LocalApic, vector: int, level: bool, suppressed: bool) -> None:
        assert apic is self.apic
        self.calls.append((vector, level, suppressed))


# =====================================================================================
# PRIO-1: highest vector
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_highest_irr_vector_is_0xE1_when_irr_holds_0x21_and_0xE1__PRIO_1(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x21)
    assert apic.accept(0xE1)
    assert apic.irr.highest() == 0xE1
    assert apic.pending_interrupt() == 0xE1
    # §1.4 layout: 0xE1 -> word 0x270 bit 1; 0x21 -> word 0x210 bit 1.
    assert apic.mmio_read(IRR_BASE + 0x70) == 0x2
    assert apic.mmio_read(IRR_BASE + 0x10) == 0x2
    assert word(apic, IRR_BASE + 0x70) == 0x2
    assert word(apic, IRR_BASE + 0x10) == 0x2


@pytest.mark.parametrize("profile", PROFILES)
def test_highest_vector_of_an_empty_set_is_minus_one__PRIO_1(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.irr.highest() == -1
    assert apic.isr.highest() == -1
    assert apic.pending_interrupt() is None


@pytest.mark.parametrize("profile", PROFILES)
def test_highest_in_service_vector_is_the_highest_bit_across_words__PRIO_1(profile: str) -> None:
    apic = enabled_apic(profile)
    load_isr(apic, [0x21, 0x5F, 0xE1])
    assert apic.isr.highest() == 0xE1
    assert set(apic.isr) == {0x21, 0x5F, 0xE1}


# =====================================================================================
# PRIO-2: PPR
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(
    ("tpr", "isr", "ppr"),
    [
        (0x00, [], 0x00),
        (0x25, [], 0x25),
        (0x25, [0x41], 0x40),
        (0x45, [0x41], 0x45),
    ],
)
def test_ppr_follows_the_reference_table__PRIO_2(
    profile: str, tpr: int, isr: list[int], ppr: int
) -> None:
    apic = enabled_apic(profile)
    load_isr(apic, isr)
    apic.mmio_write(TPR, tpr)
    assert apic.mmio_read(PPR) == ppr
    assert apic.ppr == ppr
    assert word(apic, PPR) == ppr  # recomputed on the TPR write, not only on the read


@pytest.mark.parametrize("profile", PROFILES)
def test_ppr_is_recomputed_on_a_tpr_write_in_x2apic_mode__PRIO_2(profile: str) -> None:
    apic = enabled_apic(profile)
    load_isr(apic, [0x41])
    apic.wrmsr(0x1B, X2APIC_BASE)
    apic.wrmsr(0x808, 0x25)
    assert apic.rdmsr(0x80A) == 0x40
    apic.wrmsr(0x808, 0x45)
    assert apic.rdmsr(0x80A) == 0x45
    assert word(apic, PPR) == 0x45


@pytest.mark.parametrize("profile", PROFILES)
def test_ppr_is_recomputed_on_a_cr8_write__PRIO_2(profile: str) -> None:
    apic = enabled_apic(profile)
    load_isr(apic, [0x41])
    apic.set_cr8(0x5)
    assert apic.tpr == 0x50
    assert word(apic, PPR) == 0x50
    apic.set_cr8(0x2)
    assert word(apic, PPR) == 0x40


# =====================================================================================
# PRIO-3: deliverability
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_irr_0x4F_is_not_deliverable_at_ppr_0x45__PRIO_3(profile: str) -> None:
    apic = enabled_apic(profile)
    apic.mmio_write(TPR, 0x45)
    assert apic.accept(0x4F)
    assert apic.pending_interrupt() is None
    assert apic.ack() is None
    assert set(apic.irr) == {0x4F}
    assert not apic.isr


@pytest.mark.parametrize("profile", PROFILES)
def test_irr_0x50_is_deliverable_at_ppr_0x45__PRIO_3(profile: str) -> None:
    apic = enabled_apic(profile)
    apic.mmio_write(TPR, 0x45)
    assert apic.accept(0x4F)
    assert apic.accept(0x50)
    assert apic.pending_interrupt() == 0x50


@pytest.mark.parametrize("profile", PROFILES)
def test_an_irr_vector_of_the_same_class_as_the_in_service_one_is_not_deliverable__PRIO_3(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    load_isr(apic, [0x31])
    assert apic.accept(0x3A)
    assert apic.ppr == 0x30
    assert apic.pending_interrupt() is None
    assert apic.ack() is None
    assert apic.accept(0x40)
    assert apic.pending_interrupt() == 0x40


@pytest.mark.parametrize("profile", PROFILES)
def test_a_vector_whose_class_equals_the_tpr_class_is_not_deliverable__PRIO_3(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    apic.mmio_write(TPR, 0x50)
    assert apic.accept(0x5F)
    assert apic.pending_interrupt() is None
    apic.mmio_write(TPR, 0x4F)
    assert apic.pending_interrupt() == 0x5F


@pytest.mark.parametrize("profile", PROFILES)
def test_a_software_disabled_apic_still_delivers_pending_irr__PRIO_3(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x31)
    apic.mmio_write(SVR, 0xFF)
    assert not apic.sw_enabled
    assert apic.pending_interrupt() == 0x31
    assert apic.ack() == 0x31
    assert set(apic.isr) == {0x31}
    assert not apic.irr


@pytest.mark.parametrize("profile", PROFILES)
def test_a_hardware_disabled_apic_delivers_nothing__PRIO_3(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x31)
    apic.wrmsr(0x1B, DISABLED_BASE)
    assert not apic.hw_enabled
    assert apic.pending_interrupt() is None
    assert apic.ack() is None
    assert 0x31 not in apic.isr


# =====================================================================================
# PRIO-4: acknowledge
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_ack_moves_the_vector_from_irr_to_isr_and_raises_ppr__PRIO_4(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x31)
    assert apic.ppr == 0x00
    assert apic.ack() == 0x31
    assert not apic.irr
    assert set(apic.isr) == {0x31}
    assert apic.ppr == 0x30
    assert word(apic, PPR) == 0x30
    assert apic.mmio_read(ISR_BASE + 0x10) == 1 << (0x31 - 0x20)
    assert apic.mmio_read(IRR_BASE + 0x10) == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_ack_takes_the_highest_deliverable_vector_and_leaves_the_others__PRIO_4(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    for v in (0x31, 0x82, 0x45):
        assert apic.accept(v)
    assert apic.ack() == 0x82
    assert set(apic.irr) == {0x31, 0x45}
    assert set(apic.isr) == {0x82}
    assert apic.ack() is None  # 0x45 is below the new PPR 0x80


@pytest.mark.parametrize("profile", PROFILES)
def test_ack_with_nothing_pending_changes_nothing__PRIO_4(profile: str) -> None:
    apic = enabled_apic(profile)
    before = apic.get_state()
    assert apic.ack() is None
    assert apic.get_state() == before


# =====================================================================================
# PRIO-5: EOI
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_eoi_clears_only_the_highest_in_service_vector__PRIO_5(profile: str) -> None:
    apic = enabled_apic(profile)
    load_isr(apic, [0x31, 0x41])
    assert set(apic.isr) == {0x31, 0x41}
    apic.mmio_write(EOI, 0)
    assert set(apic.isr) == {0x31}
    assert apic.ppr == 0x30
    assert word(apic, PPR) == 0x30


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("value", [0x31, 0x41, 0xFFFFFFFF, 0x12345678])
def test_the_eoi_value_is_irrelevant_over_mmio__PRIO_5(profile: str, value: int) -> None:
    apic = enabled_apic(profile)
    load_isr(apic, [0x31, 0x41])
    apic.mmio_write(EOI, value)
    assert set(apic.isr) == {0x31}


def test_a_non_zero_x2apic_eoi_still_clears_the_highest_vector_under_kvm__PRIO_5() -> None:
    apic = enabled_apic("kvm")
    load_isr(apic, [0x31, 0x41])
    apic.wrmsr(0x1B, X2APIC_BASE)
    apic.wrmsr(0x80B, 0x31)
    assert set(apic.isr) == {0x31}
    assert apic.rdmsr(0x80A) == 0x30


@pytest.mark.parametrize("profile", PROFILES)
def test_eoi_returns_the_cleared_vector_and_is_a_no_op_on_an_empty_isr__PRIO_5(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    rec = EoiRecorder(apic)
    assert apic.eoi() is None
    assert rec.calls == []
    load_isr(apic, [0x31])
    assert apic.eoi() == 0x31
    assert rec.calls == [(0x31, False, False)]
    assert not apic.isr
    assert apic.ppr == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_eoi_lowers_ppr_so_a_held_vector_becomes_deliverable__PRIO_5(profile: str) -> None:
    apic = enabled_apic(profile)
    load_isr(apic, [0x41])
    assert apic.accept(0x35)
    assert apic.pending_interrupt() is None
    apic.mmio_write(EOI, 0)
    assert apic.pending_interrupt() == 0x35


# =====================================================================================
# PRIO-6: TMR on acceptance
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_level_acceptance_sets_tmr_and_a_later_edge_acceptance_clears_it__PRIO_6(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x61, DeliveryMode.FIXED, Trigger.LEVEL, True)
    assert 0x61 in apic.tmr
    assert apic.mmio_read(TMR_BASE + 0x30) == 1 << 1
    assert apic.accept(0x61, DeliveryMode.FIXED, Trigger.EDGE, True)
    assert 0x61 not in apic.tmr
    assert apic.mmio_read(TMR_BASE + 0x30) == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_lowest_priority_acceptance_updates_tmr_like_fixed__PRIO_6(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x62, DeliveryMode.LOWEST, Trigger.LEVEL, True)
    assert 0x62 in apic.tmr
    assert apic.accept(0x62, DeliveryMode.LOWEST, Trigger.EDGE, True)
    assert 0x62 not in apic.tmr


@pytest.mark.parametrize("profile", PROFILES)
def test_a_refused_interrupt_does_not_touch_tmr__PRIO_6(profile: str) -> None:
    apic = enabled_apic(profile)
    assert apic.accept(0x61, DeliveryMode.FIXED, Trigger.LEVEL, True)
    assert not apic.accept(0x61, DeliveryMode.FIXED, Trigger.LEVEL, False)  # de-assert
    assert 0x61 in apic.tmr
    apic.mmio_write(SVR, 0xFF)
    assert not apic.accept(0x61, DeliveryMode.FIXED, Trigger.EDGE, True)
    assert 0x61 in apic.tmr


# =====================================================================================
# PRIO-7 / DIFF-D2: vectors 0-15
# =====================================================================================
@pytest.mark.parametrize("vector", [0, 1, 5, 15])
@pytest.mark.parametrize("mode", [DeliveryMode.FIXED, DeliveryMode.LOWEST])
def test_kvm_accepts_vectors_0_to_15_into_irr__PRIO_7_DIFF_D2(
    vector: int, mode: DeliveryMode
) -> None:
    apic = enabled_apic("kvm")
    assert apic.accept(vector, mode)
    assert vector in apic.irr
    # In IRR, but class 0 is never above PPR >= 0 (PRIO-3 formula), so never acknowledged.
    assert apic.pending_interrupt() is None
    apic.mmio_write(ESR, 0)
    assert apic.mmio_read(ESR) == 0


@pytest.mark.parametrize("vector", [0, 1, 5, 15])
@pytest.mark.parametrize("mode", [DeliveryMode.FIXED, DeliveryMode.LOWEST])
def test_sdm_refuses_vectors_0_to_15_and_logs_receive_illegal_vector__PRIO_7_DIFF_D2(
    vector: int, mode: DeliveryMode
) -> None:
    apic = enabled_apic("sdm")
    assert not apic.accept(vector, mode)
    assert vector not in apic.irr
    assert not apic.irr
    assert apic.mmio_read(ESR) == 0  # write-then-read: nothing visible yet
    apic.mmio_write(ESR, 0)
    assert apic.mmio_read(ESR) == 0x40
    apic.mmio_write(ESR, 0)  # back-to-back writes clear it
    assert apic.mmio_read(ESR) == 0


def test_sdm_accepts_vector_16_the_first_legal_one__PRIO_7_DIFF_D2() -> None:
    apic = enabled_apic("sdm")
    assert apic.accept(16)
    assert 16 in apic.irr
    apic.mmio_write(ESR, 0)
    assert apic.mmio_read(ESR) == 0


def test_kvm_sends_an_ipi_with_vector_5_and_never_sets_esr__PRIO_7_DIFF_D2() -> None:
    apic = enabled_apic("kvm")
    sent: list[int] = []
    apic.send_hook = lambda a, irq: sent.append(irq.vector)
    apic.mmio_write(ICR2, 0x01000000)
    apic.mmio_write(ICR, 0x00004005)
    assert sent == [5]
    assert apic.mmio_read(ESR) == 0
    apic.mmio_write(ESR, 0)
    assert apic.mmio_read(ESR) == 0


def test_sdm_does_not_send_an_ipi_with_vector_5_and_logs_send_illegal_vector__PRIO_7_DIFF_D2(
) -> None:
    apic = enabled_apic("sdm")
    sent: list[int] = []
    apic.send_hook = lambda a, irq: sent.append(irq.vector)
    apic.mmio_write(ICR2, 0x01000000)
    apic.mmio_write(ICR, 0x00004005)
    assert sent == []
    apic.mmio_write(ESR, 0)
    assert apic.mmio_read(ESR) == 0x20


# =====================================================================================
# DEOI-1 / DEOI-2 / DIFF-D17: EOI-broadcast suppression
# =====================================================================================
def directed_eoi_apic(profile: str | Profile) -> tuple[LocalApic, EoiRecorder]:
    apic = enabled_apic(profile, features=Features(directed_eoi=True))
    assert apic.lvr & 0x01000000
    apic.mmio_write(SVR, 0x11FF)
    assert apic.svr == 0x11FF  # bit 12 writable because LVR bit 24 is advertised
    return apic, EoiRecorder(apic)


def test_legacy_kvm_reports_a_level_eoi_as_not_suppressed_even_with_svr_bit_12__DEOI_1_DIFF_D17(
) -> None:
    apic, rec = directed_eoi_apic("kvm")
    assert apic.accept(0x61, DeliveryMode.FIXED, Trigger.LEVEL, True)
    assert apic.ack() == 0x61
    apic.mmio_write(EOI, 0)
    assert rec.calls == [(0x61, True, False)]
    assert not apic.isr


def test_sdm_suppresses_the_eoi_broadcast_of_a_level_vector_with_svr_bit_12__DEOI_2_DIFF_D17(
) -> None:
    apic, rec = directed_eoi_apic("sdm")
    assert apic.accept(0x61, DeliveryMode.FIXED, Trigger.LEVEL, True)
    assert apic.ack() == 0x61
    apic.mmio_write(EOI, 0)
    assert rec.calls == [(0x61, True, True)]
    assert not apic.isr  # the EOI itself still happens


def test_kvm_with_the_opt_in_knob_suppresses_like_the_sdm__DEOI_2() -> None:
    profile = Profile.custom("kvm", honor_suppress_eoi_broadcast=True)
    apic, rec = directed_eoi_apic(profile)
    assert apic.accept(0x61, DeliveryMode.FIXED, Trigger.LEVEL, True)
    assert apic.ack() == 0x61
    apic.mmio_write(EOI, 0)
    assert rec.calls == [(0x61, True, True)]


@pytest.mark.parametrize("profile", PROFILES)
def test_an_edge_eoi_is_never_suppressed__DEOI_2(profile: str) -> None:
    apic, rec = directed_eoi_apic(profile)
    assert apic.accept(0x62, DeliveryMode.FIXED, Trigger.EDGE, True)
    assert apic.ack() == 0x62
    apic.mmio_write(EOI, 0)
    assert rec.calls == [(0x62, False, False)]


@pytest.mark.parametrize("profile", PROFILES)
def test_a_level_eoi_without_svr_bit_12_is_not_suppressed__DEOI_2(profile: str) -> None:
    apic, rec = directed_eoi_apic(profile)
    apic.mmio_write(SVR, 0x1FF)
    assert apic.accept(0x61, DeliveryMode.FIXED, Trigger.LEVEL, True)
    assert apic.ack() == 0x61
    apic.mmio_write(EOI, 0)
    assert rec.calls == [(0x61, True, False)]


@pytest.mark.parametrize("profile", PROFILES)
def test_svr_bit_12_is_not_writable_without_directed_eoi_so_nothing_is_suppressed__DEOI_1(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    rec = EoiRecorder(apic)
    assert not apic.lvr & 0x01000000
    apic.mmio_write(SVR, 0x11FF)
    assert apic.svr == 0x1FF
    assert apic.accept(0x61, DeliveryMode.FIXED, Trigger.LEVEL, True)
    assert apic.ack() == 0x61
    apic.mmio_write(EOI, 0)
    assert rec.calls == [(0x61, True, False)]


@pytest.mark.parametrize(("profile", "suppressed"), [("kvm", False), ("sdm", True)])
def test_an_x2apic_eoi_reports_suppression_per_profile__DEOI_1_DEOI_2_DIFF_D17(
    profile: str, suppressed: bool
) -> None:
    apic = enabled_apic(profile, features=Features(directed_eoi=True))
    rec = EoiRecorder(apic)
    apic.wrmsr(0x1B, X2APIC_BASE)
    apic.wrmsr(0x80F, 0x11FF)
    assert apic.rdmsr(0x80F) == 0x11FF
    assert apic.accept(0x71, DeliveryMode.FIXED, Trigger.LEVEL, True)
    assert apic.ack() == 0x71
    apic.wrmsr(0x80B, 0)
    assert rec.calls == [(0x71, True, suppressed)]


@pytest.mark.parametrize("profile", PROFILES)
def test_eoi_reports_the_highest_vector_not_the_one_the_guest_meant__DEOI_1_PRIO_5(
    profile: str,
) -> None:
    apic, rec = directed_eoi_apic(profile)
    assert apic.accept(0x31, DeliveryMode.FIXED, Trigger.EDGE, True)
    assert apic.ack() == 0x31
    assert apic.accept(0x61, DeliveryMode.FIXED, Trigger.LEVEL, True)
    assert apic.ack() == 0x61
    apic.mmio_write(EOI, 0x31)
    apic.mmio_write(EOI, 0x61)
    suppressed = profile == "sdm"
    assert rec.calls == [(0x61, True, suppressed), (0x31, False, False)]


def test_a_faulting_x2apic_eoi_under_sdm_performs_no_eoi__DEOI_1_DIFF_D3() -> None:
    apic, rec = directed_eoi_apic("sdm")
    apic.wrmsr(0x1B, X2APIC_BASE)
    assert apic.accept(0x61, DeliveryMode.FIXED, Trigger.LEVEL, True)
    assert apic.ack() == 0x61
    with pytest.raises(GuestFault) as info:
        apic.wrmsr(0x80B, 1)
    assert info.value.vector == 13
    assert rec.calls == []
    assert set(apic.isr) == {0x61}
