"""What a user holds is a value: IRR/ISR/TMR read as frozen, hashable sets printed in hex; and
``LocalApic.dump()`` decodes every register as QEMU's ``info lapic`` does, per mode."""

from __future__ import annotations

import pytest

from lapic import FrozenVectorSet, LocalApic, VectorSet
from lapic.dump import decode_icr, decode_lvt
from lapic.icr import DeliveryMode, Trigger


def enabled(vcpu_id: int = 3) -> LocalApic:
    apic = LocalApic(vcpu_id=vcpu_id, profile="kvm", bsp=False)
    apic.mmio_write(0xF0, 0x1FF)
    return apic


def test_irr_isr_and_tmr_are_frozen_values_that_do_not_change_under_their_holder() -> None:
    apic = enabled()
    apic.accept(0x41, DeliveryMode.FIXED, Trigger.LEVEL)
    irr, isr, tmr = apic.irr, apic.isr, apic.tmr
    assert apic.ack() == 0x41
    assert irr == {0x41} and isr == set() and tmr == {0x41}
    assert apic.irr == set() and apic.isr == {0x41}
    assert isinstance(irr, FrozenVectorSet) and isinstance(irr, VectorSet)
    assert not hasattr(irr, "add") and not hasattr(irr, "remove")
    assert {irr: "seen"}[FrozenVectorSet([0x41])] == "seen"
    assert hash(irr) == hash(frozenset({0x41}))
    assert repr(irr) == "{0x41}" and repr(apic.irr) == "{}"


def test_frozen_vector_sets_support_set_algebra_with_sets_and_each_other() -> None:
    a, b = FrozenVectorSet([0x20, 0x41]), FrozenVectorSet([0x41, 0xF0])
    assert a | b == {0x20, 0x41, 0xF0} and a & b == {0x41}
    assert a - b == {0x20} and a ^ b == {0x20, 0xF0}
    assert a | {0x30} == {0x20, 0x30, 0x41}
    assert isinstance(a | b, FrozenVectorSet)
    assert a.frozen() is a
    assert a.__or__(3) is NotImplemented


def test_dump_decodes_each_lvt_entry_as_qemu_info_lapic_does() -> None:
    assert decode_lvt("LVT0", 0x700) == "0x00000700 active-hi edge ExtINT (vec 0x00)"
    assert decode_lvt("LVT1", 0x400) == "0x00000400 active-hi edge NMI"
    assert decode_lvt("LVTT", 0x400EC) == (
        "0x000400ec active-hi edge tsc-deadline Fixed (vec 0xec)"
    )
    assert decode_lvt("LVTERR", 0x1F0FE) == (
        "0x0001f0fe active-lo level rIRR pending masked Fixed (vec 0xfe)"
    )
    assert decode_icr(0x848F1, 0xF, x2apic=False) == (
        "logical edge assert all-self Fixed vec 0xf1 dest 0xf"
    )


def test_dump_shows_only_what_the_mode_has() -> None:
    apic = enabled()
    apic.accept(0x41, DeliveryMode.FIXED, Trigger.LEVEL)
    xapic = apic.dump()
    assert "DFR 0xffffffff" in xapic and "APR 0x00" in xapic
    assert "  IRR        0x41(level)" in xapic
    assert "  SPIV       0x000001ff APIC enabled, focus=on, spurious vec 0xff" in xapic
    assert "  Timer      DCR=0x0 (divide by 2) initial_count=0x0 current_count=0x0" in xapic
    apic.wrmsr(0x1B, 0xFEE00C00)
    x2 = apic.dump()
    assert "DFR" not in x2 and "APR" not in x2 and "(x2APIC)" in x2
    assert x2.splitlines()[0] == "LocalApic vcpu 3 [kvm] X2APIC base=0xfee00c00"
    apic.wrmsr(0x1B, 0)
    assert apic.dump().splitlines() == ["LocalApic vcpu 3 [kvm] DISABLED base=0x0"]


def test_dump_lists_pending_events_and_the_notebook_views_render() -> None:
    apic = enabled()
    apic.accept(0, DeliveryMode.NMI, Trigger.EDGE)
    assert "  Pending    NMI x1" in apic.dump()
    html = apic._repr_html_()
    assert html.startswith("<table>") and "<th style='text-align:left'>LVT0</th>" in html

    class Printer:
        def __init__(self) -> None:
            self.out = ""

        def text(self, s: str) -> None:
            self.out += s

    p = Printer()
    apic._repr_pretty_(p, False)
    assert p.out == apic.dump()


@pytest.mark.parametrize("tdcr,divide", [(0x0, 2), (0x3, 16), (0x8, 32), (0xB, 1)])
def test_dump_names_the_timer_divider_of_tdcr(tdcr: int, divide: int) -> None:
    apic = enabled()
    apic.mmio_write(0x3E0, tdcr)
    assert f"(divide by {divide})" in apic.dump()
