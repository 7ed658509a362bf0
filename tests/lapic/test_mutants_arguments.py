"""Caller errors across ``lapic``: every refused argument raises ApicValueError/ApicTypeError
whose message names that argument, and the refused call changes nothing (the contract of
``lapic.faults``; no spec id).  Also the ICR/MSI encodings at their bounds (ICR-4, MATCH-4).
"""

from __future__ import annotations

from typing import Any

import pytest

from lapic import (
    ApicTypeError,
    ApicValueError,
    DeliveryMode,
    DestMode,
    Icr,
    Interrupt,
    Level,
    LocalApic,
    Msi,
    Profile,
    Shorthand,
    Trigger,
)
from lapic.bus import ApicBus
from lapic.timer import Clock
from tests.lapic.strategies import snapshot

U32 = 0xFFFFFFFF


# --- ApicBus construction --------------------------------------------------------------


@pytest.mark.parametrize(
    ("apics", "error", "message"),
    [
        (True, ApicTypeError, r"apics must be an int or an iterable of LocalApic, not bool"),
        (0, ApicValueError, r"apics=0x0 is outside \[0x1, 0x1000\]"),
        (4097, ApicValueError, r"apics=0x1001 is outside \[0x1, 0x1000\]"),
        ("ab", ApicTypeError, r"apics must be an int or an iterable of LocalApic, not str"),
        (b"ab", ApicTypeError, r"apics must be an int or an iterable of LocalApic, not bytes"),
        (2.0, ApicTypeError, r"apics must be an int or an iterable of LocalApic, not float"),
        ([], ApicValueError, r"apics must not be empty"),
        ([1], ApicTypeError, r"apics must hold LocalApic, not int"),
    ],
)
def test_a_bus_refuses_bad_apics_naming_the_argument(
    apics: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=rf"^{message}$"):
        ApicBus(apics)


def test_a_bus_refuses_apics_on_different_clocks_or_profiles() -> None:
    with pytest.raises(ApicValueError, match=r"^apics must share one Clock \(LocalApic\("):
        ApicBus([LocalApic(0), LocalApic(1)])
    clock = Clock()
    with pytest.raises(ApicValueError, match=r"^apics must share one Profile$"):
        ApicBus([LocalApic(0, "kvm", clock=clock), LocalApic(1, "sdm", clock=clock)])


def test_a_bus_of_one_given_apic_uses_its_clock_and_profile() -> None:
    apic = LocalApic(3, "sdm", clock=Clock(now=7))
    bus = ApicBus([apic])
    assert bus.clock is apic.clock
    assert bus.profile == Profile.preset("sdm")
    assert bus[0] is apic


def test_a_bus_refuses_a_broadcast_quirk_that_is_not_a_bool() -> None:
    message = r"^broadcast_quirk must be a bool or None, not int$"
    with pytest.raises(ApicTypeError, match=message):
        ApicBus(2, broadcast_quirk=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("profile", "hashing", "error", "message"),
    [
        ("kvm", 1, ApicTypeError, r"^vector_hashing must be a bool or None, not int$"),
        (
            "sdm",
            True,
            ApicValueError,
            r"^vector_hashing=True has no meaning under profile 'sdm' "
            r"\(lowest_priority=LOWEST_TPR\); set lowest_priority instead$",
        ),
    ],
)
def test_a_bus_refuses_a_meaningless_vector_hashing__LP_1(
    profile: str, hashing: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ApicBus(2, profile, vector_hashing=hashing)


# --- ApicBus.deliver / signal_msi ----------------------------------------------------


def _enabled_bus(n: int = 2) -> ApicBus:
    bus = ApicBus(n)
    for apic in bus:
        apic.mmio_write(0xF0, 0x1FF)
    return bus


@pytest.mark.parametrize(
    ("irq", "error", "message"),
    [
        ((0x31,), ApicTypeError, r"^irq must be an Interrupt, not tuple$"),
        (Interrupt(0x31, dest=1 << 32), ApicValueError, r"^dest=0x100000000 is outside "),
        (
            Interrupt(0x31, redir_hint=1),  # type: ignore[arg-type]
            ApicTypeError,
            r"^redir_hint must be a bool, not int$",
        ),
    ],
)
def test_deliver_refuses_a_bad_message_naming_it(
    irq: Any, error: type[Exception], message: str
) -> None:
    bus = _enabled_bus()
    before = [snapshot(a) for a in bus]
    with pytest.raises(error, match=message):
        bus.deliver(irq)
    assert [snapshot(a) for a in bus] == before


def test_deliver_takes_a_32_bit_destination__MATCH_4() -> None:
    bus = _enabled_bus()
    assert bus.deliver(Interrupt(0x31, dest=U32)) == -1


def test_a_match_that_does_not_accept_counts_zero__SLOW_2() -> None:
    """SLOW-2: -1 without a match, 0 at the first match, plus each acceptance."""
    bus = _enabled_bus()
    init = Interrupt(0, DeliveryMode.INIT, level=Level.DEASSERT, trigger=Trigger.LEVEL, dest=0)
    assert bus.deliver(init) == 0
    assert bus.deliver(Interrupt(0x31, dest=1)) == 1
    assert bus.deliver(Interrupt(0x31, dest=9)) == -1


def test_signal_msi_defaults_to_data_0_and_address_hi_0() -> None:
    """KVM_SIGNAL_MSI with only an address: vector 0, fixed, to APIC 1 (PRIO-7 under kvm)."""
    bus = _enabled_bus()
    assert bus.signal_msi(0xFEE01000) == 1
    assert set(bus[1].irr) == {0}
    assert not bus[0].irr


@pytest.mark.parametrize("arg", ["address_lo", "address_hi", "data"])
@pytest.mark.parametrize(("value", "error", "message"), [
    (U32 + 1, ApicValueError, "=0x100000000 is outside \\[0x0, 0xffffffff\\]$"),
    (-1, ApicValueError, "=-0x1 is outside"),
    (1.0, ApicTypeError, " must be an int, not float$"),
])
def test_signal_msi_refuses_a_field_outside_32_bits_naming_it(
    arg: str, value: Any, error: type[Exception], message: str
) -> None:
    bus = _enabled_bus()
    fields: dict[str, Any] = {"address_lo": 0xFEE01000, "address_hi": 0, "data": 0x31}
    fields[arg] = value
    with pytest.raises(error, match=f"^{arg}{message}"):
        bus.signal_msi(fields["address_lo"], fields["address_hi"], fields["data"])
    assert not bus[1].irr
    fields[arg] = U32 if arg != "address_lo" else 0xFEE01000
    bus.signal_msi(fields["address_lo"], fields["address_hi"], fields["data"])


def test_signal_msi_refuses_an_x2apic_format_that_is_not_a_bool() -> None:
    with pytest.raises(ApicTypeError, match=r"^x2apic_format must be a bool, not int$"):
        _enabled_bus().signal_msi(0xFEE01000, 0, 0x31, x2apic_format=1)  # type: ignore[arg-type]


# --- Icr / Msi -----------------------------------------------------------------------


def test_icr_decode_names_value() -> None:
    with pytest.raises(ApicValueError, match=r"^value=0x10000000000000000 is outside "):
        Icr.decode(1 << 64, x2apic=True)
    with pytest.raises(ApicTypeError, match=r"^value must be an int, not str$"):
        Icr.decode("1", x2apic=True)  # type: ignore[arg-type]


def test_icr_encode_names_vector_and_dest__ICR_4() -> None:
    with pytest.raises(ApicValueError, match=r"^vector=0x100 is outside "):
        Icr(0x100).encode(x2apic=True)
    with pytest.raises(ApicValueError, match=r"^dest=0x100 is outside \[0x0, 0xff\]$"):
        Icr(0x31, dest=0x100).encode(x2apic=False)


def test_msi_compose_refuses_a_non_interrupt_or_a_shorthand() -> None:
    with pytest.raises(ApicTypeError, match=r"^interrupt must be an Interrupt, not int$"):
        Msi.compose(0x31)  # type: ignore[arg-type]
    with pytest.raises(
        ApicValueError, match=r"^interrupt\.shorthand must be Shorthand\.NONE for an MSI$"
    ):
        Msi.compose(Interrupt(0x31, shorthand=Shorthand.SELF))


def test_msi_compose_defaults_to_8_bit_destinations() -> None:
    with pytest.raises(ApicValueError, match=r"^dest=0x100 is outside \[0x0, 0xff\]$"):
        Msi.compose(Interrupt(0x31, dest=0x100))
    assert Msi.compose(Interrupt(0x31, dest=0xFF)) == Msi(0xFEEFF000, 0, 0x4031)


def test_msi_with_32_bit_ids_carries_dest_bits_31_8_in_address_hi() -> None:
    irq = Interrupt(0x31, DeliveryMode.FIXED, DestMode.LOGICAL, dest=0x12345)
    msi = Msi.compose(irq, x2apic_format=True)
    assert msi == Msi(0xFEE45004, 0x12300, 0x4031)
    assert msi.decode(x2apic_format=True) == irq
    assert Msi(0xFEE00000, 0x101, 0x31).decode(x2apic_format=True).dest == 0x100


def test_msi_decode_defaults_to_ignoring_address_hi() -> None:
    assert Msi(0xFEE45000, 0x12300, 0x31).decode().dest == 0x45


@pytest.mark.parametrize("field", [0, 1, 2])
def test_msi_decode_takes_32_bit_fields_and_names_the_bad_one(field: int) -> None:
    name = ("address_lo", "address_hi", "data")[field]
    ok = [0, 0, 0]
    assert Msi(*ok).decode() == Interrupt(0)
    ok[field] = U32
    Msi(*ok).decode(x2apic_format=True)
    bad = [0, 0, 0]
    bad[field] = U32 + 1
    with pytest.raises(ApicValueError, match=rf"^{name}=0x100000000 is outside "):
        Msi(*bad).decode()


# --- LocalApic -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"vector": 256}, ApicValueError, r"^vector=0x100 is outside \[0x0, 0xff\]$"),
        ({"vector": -1}, ApicValueError, r"^vector=-0x1 is outside "),
        ({"vector": True}, ApicTypeError, r"^vector must be an int, not bool$"),
        ({"mode": 0}, ApicTypeError, r"^mode must be a DeliveryMode, not int$"),
        ({"trigger": 0}, ApicTypeError, r"^trigger must be a Trigger, not int$"),
        ({"level": 1}, ApicTypeError, r"^level must be a bool or Level, not int$"),
    ],
)
def test_accept_refuses_bad_arguments_naming_them_and_changes_nothing(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    apic = LocalApic(0)
    apic.mmio_write(0xF0, 0x1FF)
    before = snapshot(apic)
    args: dict[str, Any] = {"vector": 0x31, **kwargs}
    with pytest.raises(error, match=message):
        apic.accept(**args)
    assert snapshot(apic) == before


def test_accept_takes_vector_255() -> None:
    apic = LocalApic(0)
    apic.mmio_write(0xF0, 0x1FF)
    assert apic.accept(255)
    assert set(apic.irr) == {255}


def test_set_cr8_names_cr8_and_changes_nothing__REG_TPR_1() -> None:
    apic = LocalApic(0)
    apic.set_cr8(3)
    with pytest.raises(ApicValueError, match=r"^cr8=-0x1 is outside "):
        apic.set_cr8(-1)
    with pytest.raises(ApicTypeError, match=r"^cr8 must be an int, not float$"):
        apic.set_cr8(1.0)  # type: ignore[arg-type]
    assert apic.get_cr8() == 3


def test_register_refuses_an_unknown_name_naming_it() -> None:
    message = r"^name='XYZ' is not a register; see lapic\.registers$"
    with pytest.raises(ApicValueError, match=message):
        LocalApic(0).register("XYZ")
