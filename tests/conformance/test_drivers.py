"""Linux's APIC drivers on the VM: an all-but-self IPI reaches every other CPU exactly once.

Rules: DRV-1 (x2apic_phys), DRV-2 (x2apic_cluster), DRV-3 (flat, physflat), PVG-3 (kvm_pv
windows), PVG-5 (all-but-self clears the sender), PVG-4 (no hypercall fails).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from guest import DRIVERS, Guest
from guest.drivers import BASE_DRIVERS

from .conftest import MAX_VCPU_ID, MAX_XAPIC_ID, Platform

X2APIC_DRIVERS = ("x2apic_phys", "x2apic_cluster")
FLAT_MAX_CPUS = 8
"""``flat`` addresses CPUs by one LDR bit each (DRV-3)."""

CASES: tuple[tuple[str, str | None], ...] = (
    *((d, None) for d in DRIVERS if d != "kvm_pv"),
    *(("kvm_pv", base) for base in BASE_DRIVERS),
)
"""Every driver ``guest.Guest`` accepts; ``kvm_pv`` over every base driver it sits on."""

NMI_VECTOR = 2
"""Linux sends vector 2 as an NMI (``__prepare_ICR``); it is handled without EOI."""


@st.composite
def guests(draw: st.DrawFn) -> tuple[str, str | None, list[int]]:
    driver, base = draw(st.sampled_from(CASES), label="driver, base")
    underlying = base or driver
    if underlying in X2APIC_DRIVERS:
        # Dense ids share clusters of 16; spread ones need several PV windows of 128.
        spread = draw(st.sampled_from((47, 300, MAX_VCPU_ID)), label="highest id")
        one = st.integers(0, spread)
        max_size = 12
    else:
        one = st.integers(0, MAX_XAPIC_ID)
        max_size = FLAT_MAX_CPUS if underlying == "flat" else 12
    ids = draw(st.lists(one, min_size=1, max_size=max_size, unique=True), label="vcpu_ids")
    return driver, base, ids


@given(case=guests(), data=st.data())
def test_send_ipi_mask_allbutself_reaches_every_other_cpu_once__DRV_1_DRV_2_DRV_3_PVG_3(
    platform: Platform, case: tuple[str, str | None, list[int]], data: st.DataObject
) -> None:
    """DRV-1, DRV-2, DRV-3, PVG-3, PVG-5: a guest booted with each Linux driver (flat only up
    to 8 CPUs) calls ``send_IPI_mask_allbutself(mask, vector)`` on a random CPU with a random
    cpumask (the sender may be in it); after one VM entry of every CPU, exactly the CPUs of the
    mask other than the sender have handled the vector, each once, and nobody else has.  A
    vector of 2 is sent as an NMI.  No PV IPI hypercall reports an error (PVG-4)."""
    driver, base, ids = case
    vm = platform.vm(vcpu_ids=ids)
    guest = Guest(vm, driver, base=base)
    n = len(ids)
    sender = data.draw(st.integers(0, n - 1), label="sender")
    mask = data.draw(st.sets(st.integers(0, n - 1)), label="cpumask")
    vector = data.draw(st.one_of(st.just(NMI_VECTOR), st.integers(0x20, 0xFF)), label="vector")

    guest.cpu(sender).send_IPI_mask_allbutself(mask, vector)

    expected = [[vector] if i in mask - {sender} else [] for i in range(n)]
    assert [guest.cpu(i).run() for i in range(n)] == expected
    assert [guest.cpu(i).handled for i in range(n)] == expected
    assert [guest.cpu(i).run() for i in range(n)] == [[] for _ in range(n)], "handled twice"
    assert [guest.cpu(i).pv_errors for i in range(n)] == [[] for _ in range(n)]
