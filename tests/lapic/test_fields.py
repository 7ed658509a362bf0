"""Declared bit layouts (FIELDS-1, FIELDS-2): ``lapic.fields`` and the layouts declared with
it for the ICR, MSI, LVT, SVR, LVR, TPR/PPR and IA32_APIC_BASE."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lapic import DeliveryMode, DestMode, Icr, Interrupt, Level, Msi, Shorthand, Trigger
from lapic.faults import ApicTypeError, ApicValueError
from lapic.fields import Field, Layout
from lapic.icr import (
    ICR_LOW,
    ICR_X2APIC,
    ICR_XAPIC,
    MSI_ADDRESS,
    MSI_DATA,
    X2APIC_ICR_RESERVED,
    interrupt_of_icr,
)
from lapic.registers import (
    APIC_BASE,
    APIC_BASE_BSP,
    APIC_BASE_EN,
    APIC_BASE_EXTD,
    LINT_MASK,
    LVR,
    LVT,
    LVT_MASK,
    PRIORITY,
    SVR,
)

U64 = (1 << 64) - 1

interrupts = st.builds(
    Interrupt,
    st.integers(0, 255),
    st.sampled_from(list(DeliveryMode)),
    st.sampled_from(list(DestMode)),
    st.sampled_from(list(Level)),
    st.sampled_from(list(Trigger)),
    st.sampled_from(list(Shorthand)),
    st.integers(0, 0xFF),
    redir_hint=st.just(False),
)


def test_a_field_extracts_deposits_and_refuses_a_value_that_does_not_fit__FIELDS_1() -> None:
    f = Field("mode", 8, 3)
    assert (f.mask, f.max) == (0x700, 7)
    assert f.get(0x0000_0C41) == 4
    assert f.set(0xFFFF_FFFF, 0) == 0xFFFF_F8FF
    assert f.place(5) == 0x500
    with pytest.raises(ApicValueError, match="mode=0x8"):
        f.place(8)
    with pytest.raises(ApicValueError, match="width"):
        Field("wide", 60, 5)
    with pytest.raises(ApicValueError, match="name"):
        Field("not a name", 0, 1)


def test_a_layout_refuses_overlapping_duplicate_and_outside_fields__FIELDS_1() -> None:
    with pytest.raises(ApicValueError, match="overlaps"):
        Layout("X", 32, Field("a", 0, 4), Field("b", 3, 2))
    with pytest.raises(ApicValueError, match="twice"):
        Layout("X", 32, Field("a", 0, 4), Field("a", 8, 2))
    with pytest.raises(ApicValueError, match="outside"):
        Layout("X", 8, Field("a", 4, 8))
    with pytest.raises(ApicValueError, match="not a field"):
        ICR_LOW.pack(dest=1)
    with pytest.raises(ApicTypeError, match="values"):
        ICR_LOW.pack(3)  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match="not a field"):
        _ = ICR_LOW["nope"]


def test_the_icr_layout_leaves_exactly_the_x2apic_must_be_zero_bits_reserved__FIELDS_2(
) -> None:
    assert ICR_LOW.reserved == X2APIC_ICR_RESERVED == 0xFFF32000
    assert ICR_X2APIC.reserved == X2APIC_ICR_RESERVED
    assert ICR_XAPIC.reserved == 0x00FFFFFF_00000000 | X2APIC_ICR_RESERVED
    assert "delivery_mode" in ICR_LOW and next(iter(ICR_LOW)).name == "vector"
    assert ICR_LOW.describe(0x000C_40F1 | 1 << 13) == (
        "ICR{vector=0xf1, level=0x1, shorthand=0x3, reserved=0x2000}"
    )
    assert repr(ICR_LOW).startswith("Layout('ICR', 32: vector[7:0], delivery_mode[10:8]")


@given(interrupts, st.booleans())
def test_the_icr_packs_and_unpacks_in_one_place_both_ways__FIELDS_2(
    irq: Interrupt, x2apic: bool
) -> None:
    icr = Icr(*irq[:7])
    value = icr.encode(x2apic=x2apic)
    layout = ICR_X2APIC if x2apic else ICR_XAPIC
    assert value == layout.pack(icr)
    assert layout.unpack(value)["dest"] == irq.dest
    low = value & 0xFFFFFFFF
    assert low == Icr.low_of(irq) == Icr.low_of(icr)
    assert interrupt_of_icr(low, irq.dest) == irq
    assert Icr.decode(value, x2apic=x2apic) == icr


@given(interrupts.filter(lambda i: i.shorthand is Shorthand.NONE), st.booleans())
def test_msi_messages_are_packed_through_the_declared_layouts__FIELDS_2(
    irq: Interrupt, hint: bool
) -> None:
    irq = irq._replace(level=Level.ASSERT, redir_hint=hint)
    msi = Msi.compose(irq)
    assert MSI_ADDRESS.unpack(msi.address_lo) == {
        "dest_mode": int(irq.dest_mode),
        "redir_hint": int(hint),
        "dest": irq.dest,
        "base": 0xFEE,
    }
    assert MSI_DATA.unpack(msi.data)["vector"] == irq.vector
    assert msi.decode() == irq


def test_the_register_constants_are_the_declared_fields__FIELDS_2() -> None:
    assert (LVT["masked"].mask, LVT["timer_mode"].mask) == (0x10000, 0x60000)
    assert (LVT_MASK, LINT_MASK) == (0x110FF, 0x1F7FF)
    assert SVR.pack(vector=0xFF, enable=1) == 0x1FF
    assert LVR.pack(version=0x14, max_lvt=5, directed_eoi=1) == 0x01050014
    assert PRIORITY.unpack(0x5A) == {"subclass": 0xA, "klass": 5}
    assert (APIC_BASE_BSP, APIC_BASE_EXTD, APIC_BASE_EN) == (0x100, 0x400, 0x800)
    assert APIC_BASE.pack(base=0xFEE00, en=1, bsp=1) == 0xFEE00900


@given(st.integers(0, U64))
def test_a_64_bit_layout_round_trips_like_an_avic_physical_id_table_entry__FIELDS_1(
    word: int,
) -> None:
    """The shape the AVIC physical APIC ID table entry will take (AMD APM Vol. 2, 15.29.4.3):
    host APIC ID 11:0 (x2AVIC), backing page 51:12, IsRunning 62, Valid 63."""
    entry = Layout(
        "AVIC_PHYSICAL_ID_ENTRY",
        64,
        Field("host_apic_id", 0, 12),
        Field("backing_page", 12, 40),
        Field("is_running", 62, 1),
        Field("valid", 63, 1),
    )
    fields = entry.unpack(word)
    assert entry.pack(fields) == word & ~entry.reserved
    assert entry.reserved == 0x3FF0_0000_0000_0000
    with pytest.raises(ApicValueError, match="word"):
        entry.unpack(1 << 64)


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_the_send_paths_inlined_icr_decode_is_interrupt_of_icr__FIELDS_2(
    low: int, dest: int
) -> None:
    from lapic import LocalApic

    apic = LocalApic(0)
    sent: list[Interrupt] = []
    apic.send_hook = lambda a, irq: sent.append(irq)
    apic.mmio_write(0xF0, 0x1FF)
    apic.wrmsr(0x1B, 0xFEE00C00)
    low &= ~X2APIC_ICR_RESERVED
    apic.wrmsr(0x830, dest << 32 | low)
    assert sent == [interrupt_of_icr(low, dest)]
