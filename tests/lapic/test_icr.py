"""The send path (ICR, ICR2, SELF IPI) and the ICR/MSI value types of ``lapic.icr``.

Rules: ICR-1..6 of ``kvm_lapic.md`` §7 (with the ``xapic_state_test`` selftest invariant),
DIFF-D4 (§16), BUG-18 and BUG-20 (§17).  Sends are captured through ``send_hook``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lapic
from lapic import (
    ApicTypeError,
    ApicValueError,
    DeliveryMode,
    DestMode,
    GuestFault,
    Icr,
    Interrupt,
    Level,
    LocalApic,
    Msi,
    Profile,
    Shorthand,
    Trigger,
)

PROFILES = ("kvm", "sdm")

SVR = 0xF0
ESR = 0x280
ICR = 0x300
ICR2 = 0x310
SELF_IPI_OFFSET = 0x3F0
ICR_MSR = 0x830
SELF_IPI_MSR = 0x83F
X2APIC_BASE = 0xFEE00C00
BUSY = 0x1000
X2APIC_ICR_RESERVED = 0xFFF32000
SELFTEST_MASK = (0xFFFFFFFF | 0xFF << 56) & ~BUSY
ICR_FIELDS = 0xFF | 0x700 | 0x800 | 0x4000 | 0x8000 | 0xC0000
U64 = (1 << 64) - 1


def enabled_apic(
    profile: str | Profile = "kvm", vcpu_id: int = 0, *, icr_split: bool = False
) -> LocalApic:
    apic = LocalApic(vcpu_id, profile, icr_split=icr_split)
    apic.mmio_write(SVR, 0x1FF)
    return apic


def x2apic(
    profile: str | Profile = "kvm", vcpu_id: int = 0, *, icr_split: bool = False
) -> LocalApic:
    apic = enabled_apic(profile, vcpu_id, icr_split=icr_split)
    apic.wrmsr(0x1B, X2APIC_BASE)
    assert apic.x2apic_mode
    return apic


def capture(apic: LocalApic) -> list[Interrupt]:
    sent: list[Interrupt] = []
    apic.send_hook = lambda a, irq: sent.append(irq)
    return sent


def sdm_refuses_to_send(profile: str, low: int, x2: bool) -> bool:
    """The sdm preset's send-side refusals: illegal vector (D2), x2APIC lowest priority (D5)."""
    if profile != "sdm":
        return False
    mode = (low >> 8) & 7
    return (mode <= 1 and (low & 0xFF) < 16) or (x2 and mode == 1)


# =====================================================================================
# ICR-1: ICR2
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_icr2_write_keeps_only_bits_31_to_24__ICR_1(profile: str) -> None:
    apic = enabled_apic(profile)
    sent = capture(apic)
    apic.mmio_write(ICR2, 0x12345678)
    assert apic.mmio_read(ICR2) == 0x12000000
    assert sent == []  # ICR2 alone sends nothing


@given(value=st.integers(0, 0xFFFFFFFF), profile=st.sampled_from(PROFILES))
def test_icr2_stores_value_and_0xff000000_for_every_value__ICR_1(value: int, profile: str) -> None:
    apic = enabled_apic(profile)
    apic.mmio_write(ICR2, value)
    assert apic.mmio_read(ICR2) == value & 0xFF000000


# =====================================================================================
# ICR-2: xAPIC ICR write
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_xapic_icr_write_clears_busy_and_sends_to_the_icr2_destination__ICR_2(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    sent = capture(apic)
    apic.mmio_write(ICR2, 0x03000000)
    apic.mmio_write(ICR, 0x000050F1)
    assert sent == [
        Interrupt(0xF1, DeliveryMode.FIXED, DestMode.PHYSICAL, Level.ASSERT, Trigger.EDGE,
                  Shorthand.NONE, 3)
    ]
    assert apic.mmio_read(ICR) == 0x000040F1
    assert apic.mmio_read(ICR2) == 0x03000000
    assert apic.icr == 0x03000000_000040F1


@pytest.mark.parametrize("profile", PROFILES)
def test_xapic_icr_write_stores_reserved_bits_verbatim__ICR_2(profile: str) -> None:
    apic = enabled_apic(profile)
    capture(apic)
    apic.mmio_write(ICR, 0xFFF3F0F1)
    assert apic.mmio_read(ICR) == 0xFFF3E0F1


@pytest.mark.parametrize("profile", PROFILES)
def test_each_xapic_icr_write_uses_the_icr2_destination_current_at_that_time__ICR_2(
    profile: str,
) -> None:
    apic = enabled_apic(profile)
    sent = capture(apic)
    apic.mmio_write(ICR2, 0x03000000)
    apic.mmio_write(ICR, 0x000040F1)
    apic.mmio_write(ICR2, 0x07ABCDEF)
    apic.mmio_write(ICR, 0x000040F2)
    assert [(i.vector, i.dest) for i in sent] == [(0xF1, 3), (0xF2, 7)]


@pytest.mark.parametrize("profile", PROFILES)
def test_a_lone_apic_delivers_an_icr_addressed_to_its_own_id__ICR_2(profile: str) -> None:
    apic = enabled_apic(profile, vcpu_id=3)
    apic.mmio_write(ICR2, 0x03000000)
    apic.mmio_write(ICR, 0x000050F1)
    assert set(apic.irr) == {0xF1}
    apic.mmio_write(ICR2, 0x04000000)
    apic.mmio_write(ICR, 0x000040F2)
    assert set(apic.irr) == {0xF1}  # not addressed to ID 3


@given(value=st.integers(0, U64), profile=st.sampled_from(PROFILES))
def test_selftest_invariant_icr_and_icr2_read_back_the_value_without_busy__ICR_2(
    value: int, profile: str
) -> None:
    """xapic_state_test: ``(ICR | ICR2 << 32) == val & (0xFFFFFFFF | 0xFF << 56) & ~BUSY``."""
    apic = enabled_apic(profile)
    sent = capture(apic)
    apic.mmio_write(ICR2, value >> 32)
    apic.mmio_write(ICR, value & 0xFFFFFFFF)
    assert apic.mmio_read(ICR) | apic.mmio_read(ICR2) << 32 == value & SELFTEST_MASK
    assert apic.icr == value & SELFTEST_MASK
    low = value & 0xFFFFFFFF
    if sdm_refuses_to_send(profile, low, x2=False):
        assert sent == []
    else:
        assert sent == [Icr.decode(value & SELFTEST_MASK, x2apic=False).to_interrupt()]


@given(value=st.integers(0, U64), profile=st.sampled_from(PROFILES))
def test_selftest_invariant_holds_without_a_send_hook__ICR_2(value: int, profile: str) -> None:
    apic = enabled_apic(profile)
    apic.mmio_write(ICR2, value >> 32)
    apic.mmio_write(ICR, value & 0xFFFFFFFF)
    assert apic.mmio_read(ICR) | apic.mmio_read(ICR2) << 32 == value & SELFTEST_MASK


# =====================================================================================
# ICR-3 / BUG-18: x2APIC ICR
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_x2apic_icr_write_sends_to_the_32_bit_destination_and_reads_back__ICR_3(
    profile: str,
) -> None:
    apic = x2apic(profile)
    sent = capture(apic)
    apic.wrmsr(ICR_MSR, 0x00000003_000040F1)
    assert apic.rdmsr(ICR_MSR) == 0x00000003_000040F1
    assert sent == [Interrupt(0xF1, dest=3)]
    apic.wrmsr(ICR_MSR, 0x12345678_000040F2)
    assert sent[-1].dest == 0x12345678
    assert apic.rdmsr(ICR_MSR) == 0x12345678_000040F2


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(
    "value",
    [
        0x00000000_000140F1,
        0x00000000_000240F1,
        0x00000000_000060F1,
        0x00000000_001040F1,
        0x00000000_002040F1,
        0x00000000_800040F1,
    ],
    ids=["bit16", "bit17", "bit13", "bit20", "bit21", "bit31"],
)
def test_x2apic_icr_reserved_bits_raise_gp_and_send_nothing__ICR_3_BUG_18(
    profile: str, value: int
) -> None:
    apic = x2apic(profile)
    sent = capture(apic)
    apic.wrmsr(ICR_MSR, 0x00000005_000040E0)
    before = apic.get_state()
    with pytest.raises(GuestFault) as info:
        apic.wrmsr(ICR_MSR, value)
    assert info.value.vector == 13
    assert sent == [Interrupt(0xE0, dest=5)]
    assert apic.rdmsr(ICR_MSR) == 0x00000005_000040E0
    assert apic.get_state() == before


@pytest.mark.parametrize("profile", PROFILES)
def test_x2apic_icr_bit_12_is_accepted_and_cleared__ICR_3(profile: str) -> None:
    apic = x2apic(profile)
    sent = capture(apic)
    apic.wrmsr(ICR_MSR, 0x00000000_000050F1)
    assert apic.rdmsr(ICR_MSR) == 0x00000000_000040F1
    assert sent == [Interrupt(0xF1, dest=0)]


@pytest.mark.parametrize("split", [False, True])
def test_x2apic_icr_reads_back_the_same_whether_or_not_kvm_splits_it__ICR_3_BUG_19(
    split: bool,
) -> None:
    apic = x2apic("kvm", icr_split=split)
    capture(apic)
    apic.wrmsr(ICR_MSR, 0xFEDCBA98_000C4EF1 & ~X2APIC_ICR_RESERVED)
    assert apic.rdmsr(ICR_MSR) == 0xFEDCBA98_000C4EF1 & ~X2APIC_ICR_RESERVED


_x2_icr_values = st.one_of(
    st.integers(0, U64),
    st.integers(0, U64).map(lambda v: v & ~X2APIC_ICR_RESERVED),
)


@given(value=_x2_icr_values, profile=st.sampled_from(PROFILES))
def test_x2apic_icr_write_either_faults_or_stores_value_without_bit_12__ICR_3_BUG_18(
    value: int, profile: str
) -> None:
    apic = x2apic(profile)
    sent = capture(apic)
    if value & X2APIC_ICR_RESERVED:
        with pytest.raises(GuestFault) as info:
            apic.wrmsr(ICR_MSR, value)
        assert info.value.vector == 13
        assert apic.rdmsr(ICR_MSR) == 0
        assert sent == []
        return
    apic.wrmsr(ICR_MSR, value)
    assert apic.rdmsr(ICR_MSR) == value & ~BUSY
    if sdm_refuses_to_send(profile, value & 0xFFFFFFFF, x2=True):
        assert sent == []
    else:
        assert sent == [Icr.decode(value, x2apic=True).to_interrupt()]


# =====================================================================================
# ICR-4: decode
# =====================================================================================
def test_icr_decode_extracts_every_field__ICR_4() -> None:
    low = 0xF1 | 0x100 | 0x800 | 0x4000 | 0x8000 | 0xC0000
    assert low == 0xCC9F1
    value = 0x12000000 << 32 | low
    assert Icr.decode(value, x2apic=False) == Icr(
        0xF1, DeliveryMode.LOWEST, DestMode.LOGICAL, Level.ASSERT, Trigger.LEVEL,
        Shorthand.ALL_EXCLUDING_SELF, 0x12,
    )
    assert Icr.decode(value, x2apic=True).dest == 0x12000000


@pytest.mark.parametrize("mode", list(DeliveryMode))
def test_icr_decode_reads_delivery_mode_from_bits_10_to_8__ICR_4(mode: DeliveryMode) -> None:
    assert Icr.decode(0x31 | int(mode) << 8, x2apic=False).delivery_mode is mode


@pytest.mark.parametrize("shorthand", list(Shorthand))
def test_icr_decode_reads_shorthand_from_bits_19_to_18__ICR_4(shorthand: Shorthand) -> None:
    assert Icr.decode(0x31 | int(shorthand) << 18, x2apic=True).shorthand is shorthand


@given(value=st.integers(0, U64), x2=st.booleans())
def test_icr_decode_ignores_bits_12_13_16_17_and_20_to_31__ICR_4(value: int, x2: bool) -> None:
    noise = 0x1000 | 0x2000 | 0x30000 | 0xFFF00000
    assert Icr.decode(value, x2apic=x2) == Icr.decode(value & ~noise, x2apic=x2)
    assert Icr.decode(value, x2apic=x2) == Icr.decode(value | noise, x2apic=x2)


@given(value=st.integers(0, U64), x2=st.booleans())
def test_xapic_decode_takes_dest_from_bits_63_to_56_and_x2apic_from_63_to_32__ICR_4(
    value: int, x2: bool
) -> None:
    dest = Icr.decode(value, x2apic=x2).dest
    assert dest == (value >> 32 if x2 else value >> 56)


@pytest.mark.parametrize("profile", PROFILES)
def test_a_sent_interrupt_never_carries_the_msi_redirection_hint__ICR_4(profile: str) -> None:
    apic = enabled_apic(profile)
    sent = capture(apic)
    apic.mmio_write(ICR, 0x0000C9F1)  # lowest priority, logical, level, assert
    assert len(sent) == 1
    assert sent[0].redir_hint is False
    assert sent[0].delivery_mode is DeliveryMode.LOWEST


# =====================================================================================
# ICR-5 / BUG-20: SELF IPI
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_self_ipi_msr_puts_the_vector_in_the_own_irr__ICR_5(profile: str) -> None:
    apic = x2apic(profile)
    apic.wrmsr(SELF_IPI_MSR, 0x31)
    assert set(apic.irr) == {0x31}
    assert apic.ack() == 0x31


@pytest.mark.parametrize("profile", PROFILES)
def test_self_ipi_is_an_icr_self_fixed_edge_message_and_leaves_the_icr_alone__ICR_5(
    profile: str,
) -> None:
    apic = x2apic(profile)
    sent = capture(apic)
    apic.wrmsr(ICR_MSR, 0x00000009_000040E0)
    apic.wrmsr(SELF_IPI_MSR, 0x31)
    assert sent[1:] == [Icr.decode(0x40000 | 0x31, x2apic=True).to_interrupt()]
    assert sent[1].shorthand is Shorthand.SELF
    assert sent[1].delivery_mode is DeliveryMode.FIXED
    assert sent[1].trigger is Trigger.EDGE
    assert apic.rdmsr(ICR_MSR) == 0x00000009_000040E0


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("value", [0x131, 0x100, 0xFFFFFF31, 0x1_00000031])
def test_self_ipi_with_reserved_bits_raises_gp_and_sends_nothing__ICR_5_BUG_20(
    profile: str, value: int
) -> None:
    apic = x2apic(profile)
    sent = capture(apic)
    with pytest.raises(GuestFault) as info:
        apic.wrmsr(SELF_IPI_MSR, value)
    assert info.value.vector == 13
    assert sent == []
    assert not apic.irr


@pytest.mark.parametrize("profile", PROFILES)
def test_self_ipi_msr_is_write_only__ICR_5(profile: str) -> None:
    apic = x2apic(profile)
    with pytest.raises(GuestFault) as info:
        apic.rdmsr(SELF_IPI_MSR)
    assert info.value.vector == 13


@pytest.mark.parametrize("profile", PROFILES)
def test_self_ipi_register_does_nothing_in_xapic_mode__ICR_5(profile: str) -> None:
    apic = enabled_apic(profile)
    sent = capture(apic)
    apic.mmio_write(SELF_IPI_OFFSET, 0x31)
    assert sent == []
    with pytest.raises(GuestFault) as info:
        apic.wrmsr(SELF_IPI_MSR, 0x31)
    assert info.value.vector == 13
    assert sent == []
    assert not apic.irr


@given(vector=st.integers(0, 255), profile=st.sampled_from(PROFILES))
def test_self_ipi_delivers_any_legal_vector_to_the_sender__ICR_5(
    vector: int, profile: str
) -> None:
    apic = x2apic(profile)
    apic.wrmsr(SELF_IPI_MSR, vector)
    refused = profile == "sdm" and vector < 16
    assert set(apic.irr) == (set() if refused else {vector})


# =====================================================================================
# ICR-6: self shorthand without the assert bit
# =====================================================================================
@pytest.mark.parametrize("profile", PROFILES)
def test_icr_self_shorthand_without_assert_delivers_exactly_one_interrupt__ICR_6(
    profile: str,
) -> None:
    apic = enabled_apic(profile, vcpu_id=2)
    apic.mmio_write(ICR2, 0x07000000)  # destination is ignored with a shorthand
    apic.mmio_write(ICR, 0x000400F1)  # APIC_DEST_SELF | PHYSICAL | FIXED | 0xF1, level clear
    assert set(apic.irr) == {0xF1}
    assert apic.ack() == 0xF1
    assert apic.ack() is None
    assert not apic.irr


@pytest.mark.parametrize("profile", PROFILES)
def test_x2apic_icr_self_shorthand_without_assert_delivers_one_interrupt__ICR_6(
    profile: str,
) -> None:
    apic = x2apic(profile, vcpu_id=2)
    apic.wrmsr(ICR_MSR, 0x00000009_000400F1)
    assert set(apic.irr) == {0xF1}


@pytest.mark.parametrize("profile", PROFILES)
def test_icr_self_level_triggered_de_assert_is_dropped__ICR_6(profile: str) -> None:
    apic = enabled_apic(profile)
    apic.mmio_write(ICR, 0x000480F1)  # self, fixed, level-triggered, level clear
    assert not apic.irr


# =====================================================================================
# DIFF-D4: delivery status always reads 0
# =====================================================================================
@given(value=st.integers(0, U64), profile=st.sampled_from(PROFILES), hook=st.booleans())
def test_xapic_icr_delivery_status_always_reads_0__DIFF_D4(
    value: int, profile: str, hook: bool
) -> None:
    apic = enabled_apic(profile)
    if hook:
        capture(apic)
    apic.mmio_write(ICR2, value >> 32)
    apic.mmio_write(ICR, value & 0xFFFFFFFF | BUSY)
    assert apic.mmio_read(ICR) & BUSY == 0
    assert apic.register("ICR") & BUSY == 0
    assert apic.icr & BUSY == 0


@given(
    value=st.integers(0, U64).map(lambda v: (v & ~X2APIC_ICR_RESERVED) | BUSY),
    profile=st.sampled_from(PROFILES),
    split=st.booleans(),
)
def test_x2apic_icr_delivery_status_always_reads_0__DIFF_D4(
    value: int, profile: str, split: bool
) -> None:
    apic = x2apic(profile, icr_split=split)
    apic.wrmsr(ICR_MSR, value)
    assert apic.rdmsr(ICR_MSR) & BUSY == 0
    assert apic.icr & BUSY == 0
    state = apic.get_state()
    assert int.from_bytes(state[ICR : ICR + 4], "little") & BUSY == 0


# =====================================================================================
# lapic.icr value types
# =====================================================================================
_vectors = st.integers(0, 255)


def _icrs(x2: bool) -> st.SearchStrategy[Icr]:
    return st.builds(
        Icr,
        _vectors,
        st.sampled_from(DeliveryMode),
        st.sampled_from(DestMode),
        st.sampled_from(Level),
        st.sampled_from(Trigger),
        st.sampled_from(Shorthand),
        st.integers(0, 0xFFFFFFFF if x2 else 0xFF),
    )


def _interrupts(x2apic_format: bool, level: Level | None = None) -> st.SearchStrategy[Interrupt]:
    return st.builds(
        Interrupt,
        _vectors,
        st.sampled_from(DeliveryMode),
        st.sampled_from(DestMode),
        st.just(level) if level is not None else st.sampled_from(Level),
        st.sampled_from(Trigger),
        st.just(Shorthand.NONE),
        st.integers(0, 0xFFFFFFFF if x2apic_format else 0xFF),
        st.booleans(),
    )


@given(data=st.data(), x2=st.booleans())
def test_icr_decode_of_encode_is_the_identity__ICR_4(data: st.DataObject, x2: bool) -> None:
    icr = data.draw(_icrs(x2))
    assert Icr.decode(icr.encode(x2apic=x2), x2apic=x2) == icr


@given(value=st.integers(0, U64), x2=st.booleans())
def test_icr_encode_of_decode_keeps_exactly_the_fields__ICR_4(value: int, x2: bool) -> None:
    dest_mask = 0xFFFFFFFF << 32 if x2 else 0xFF << 56
    assert Icr.decode(value, x2apic=x2).encode(x2apic=x2) == value & (ICR_FIELDS | dest_mask)


def test_icr_encode_places_the_xapic_destination_in_bits_63_to_56__ICR_4() -> None:
    icr = Icr(0xF1, dest=3)
    assert icr.encode(x2apic=False) == 0x03000000_000040F1
    assert icr.encode(x2apic=True) == 0x00000003_000040F1
    assert icr.to_interrupt() == Interrupt(0xF1, dest=3)


@given(data=st.data(), fmt=st.booleans())
def test_msi_decode_of_compose_is_the_identity_for_asserted_messages(
    data: st.DataObject, fmt: bool
) -> None:
    """MSI layout of ``lapic.icr`` (KVM ``kvm_msi_to_lapic_irq``; no spec id): compose then
    decode gives the message back, with and without 32-bit IDs (STATE-5 deferred)."""
    irq = data.draw(_interrupts(fmt, Level.ASSERT))
    msi = Msi.compose(irq, x2apic_format=fmt)
    assert msi.decode(x2apic_format=fmt) == irq
    assert msi.address_lo & 0xFFF00000 == 0xFEE00000


@given(data=st.data(), fmt=st.booleans())
def test_msi_decode_always_reports_the_level_asserted(data: st.DataObject, fmt: bool) -> None:
    """KVM ``kvm_msi_to_lapic_irq`` sets ``level = 1`` for every MSI (no spec id)."""
    irq = data.draw(_interrupts(fmt))
    assert Msi.compose(irq, x2apic_format=fmt).decode(x2apic_format=fmt) == irq._replace(
        level=Level.ASSERT
    )


def test_msi_compose_lays_out_address_and_data() -> None:
    """Address bits 19:12 dest, 3 redirection hint (LP-1), 2 dest mode; data 7:0, 10:8, 14, 15."""
    irq = Interrupt(0x31, DeliveryMode.LOWEST, DestMode.LOGICAL, Level.ASSERT, Trigger.LEVEL,
                    Shorthand.NONE, 0x12, True)
    assert Msi.compose(irq) == Msi(0xFEE12000 | 0x4 | 0x8, 0, 0x31 | 0x100 | 0x4000 | 0x8000)


def test_msi_with_32_bit_ids_puts_destination_bits_31_to_8_in_address_hi() -> None:
    """KVM ``x86_msi_msg_get_destid`` with ``x2apic_format`` (no spec id; STATE-5 deferred)."""
    irq = Interrupt(0x31, dest=0x12345678)
    msi = Msi.compose(irq, x2apic_format=True)
    assert msi == Msi(0xFEE78000, 0x12345600, 0x4031)
    assert msi.decode(x2apic_format=True).dest == 0x12345678
    assert msi.decode(x2apic_format=False).dest == 0x78  # address_hi ignored without the API


def _enums() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(DeliveryMode),
        st.sampled_from(DestMode),
        st.sampled_from(Level),
        st.sampled_from(Trigger),
        st.sampled_from(Shorthand),
    )


_namespace: dict[str, Any] = dict(vars(lapic))


@given(data=st.data(), x2=st.booleans())
def test_icr_and_interrupt_reprs_are_valid_python(data: st.DataObject, x2: bool) -> None:
    """``lapic.icr`` contract: a repr pastes back into a test (no spec id)."""
    icr = data.draw(_icrs(x2))
    assert eval(repr(icr), _namespace) == icr
    irq = data.draw(_interrupts(x2))
    assert eval(repr(irq), _namespace) == irq
    assert eval(repr(icr.to_interrupt()), _namespace) == icr.to_interrupt()


@given(data=st.data(), fmt=st.booleans())
def test_msi_reprs_are_valid_python(data: st.DataObject, fmt: bool) -> None:
    """``lapic.icr`` contract: a repr pastes back into a test (no spec id)."""
    msi = Msi.compose(data.draw(_interrupts(fmt)), x2apic_format=fmt)
    assert eval(repr(msi), _namespace) == msi


@given(member=_enums())
def test_enum_reprs_are_valid_python_and_keep_their_type(member: Any) -> None:
    """``lapic.icr`` contract: enum reprs are ``Type.NAME`` (no spec id)."""
    back = eval(repr(member), _namespace)
    assert back is member


@pytest.mark.parametrize(
    ("icr", "x2", "error", "name"),
    [
        (Icr(256), False, ApicValueError, "vector"),
        (Icr(-1), True, ApicValueError, "vector"),
        (Icr(0x31, dest=0x100), False, ApicValueError, "dest"),
        (Icr(0x31, dest=1 << 32), True, ApicValueError, "dest"),
        (Icr("0x31"), False, ApicTypeError, "vector"),  # type: ignore[arg-type]
        (Icr(0x31, 1), False, ApicTypeError, "delivery_mode"),  # type: ignore[arg-type]
        (Icr(0x31, dest_mode=1), False, ApicTypeError, "dest_mode"),  # type: ignore[arg-type]
        (Icr(0x31, level=True), False, ApicTypeError, "level"),  # type: ignore[arg-type]
        (Icr(0x31, trigger=0), False, ApicTypeError, "trigger"),  # type: ignore[arg-type]
        (Icr(0x31, shorthand=3), False, ApicTypeError, "shorthand"),  # type: ignore[arg-type]
    ],
)
def test_icr_encode_rejects_bad_fields_naming_them(
    icr: Icr, x2: bool, error: type[Exception], name: str
) -> None:
    """``lapic.faults`` contract: caller errors name the argument (no spec id)."""
    with pytest.raises(error, match=name):
        icr.encode(x2apic=x2)


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, ApicValueError), (1 << 64, ApicValueError), ("1", ApicTypeError),
     (1.0, ApicTypeError), (True, ApicTypeError)],
)
def test_icr_decode_rejects_a_bad_value_naming_it(value: object, error: type[Exception]) -> None:
    """``lapic.faults`` contract: caller errors name the argument (no spec id)."""
    with pytest.raises(error, match="value"):
        Icr.decode(value, x2apic=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("irq", "fmt", "error", "name"),
    [
        (Interrupt(0x31, shorthand=Shorthand.SELF), False, ApicValueError, "shorthand"),
        (Interrupt(0x31, dest=0x100), False, ApicValueError, "dest"),
        (Interrupt(0x31, dest=1 << 32), True, ApicValueError, "dest"),
        (Interrupt(300), False, ApicValueError, "vector"),
        (Interrupt(0x31, delivery_mode=0), True, ApicTypeError, "delivery_mode"),  # type: ignore[arg-type]
    ],
)
def test_msi_compose_rejects_bad_interrupts_naming_the_field(
    irq: Interrupt, fmt: bool, error: type[Exception], name: str
) -> None:
    """``lapic.faults`` contract: caller errors name the argument (no spec id)."""
    with pytest.raises(error, match=name):
        Msi.compose(irq, x2apic_format=fmt)


def test_msi_compose_rejects_something_that_is_not_an_interrupt_naming_it() -> None:
    """``lapic.faults`` contract: caller errors name the argument (no spec id)."""
    with pytest.raises(ApicTypeError, match="interrupt"):
        Msi.compose(Icr(0x31))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("msi", "error", "name"),
    [
        (Msi(-1), ApicValueError, "address_lo"),
        (Msi(0xFEE00000, 1 << 32), ApicValueError, "address_hi"),
        (Msi(0xFEE00000, 0, 1 << 32), ApicValueError, "data"),
        (Msi("0xFEE00000"), ApicTypeError, "address_lo"),  # type: ignore[arg-type]
    ],
)
def test_msi_decode_rejects_fields_outside_32_bits_naming_them(
    msi: Msi, error: type[Exception], name: str
) -> None:
    """``lapic.faults`` contract: an MSI field outside 32 bits is not a machine value (no spec
    id)."""
    with pytest.raises(error, match=name):
        msi.decode(x2apic_format=True)
