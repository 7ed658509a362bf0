"""APIC identity and IA32_APIC_BASE: the x2APIC ID/LDR and the illegal mode transitions.

Rules: MATCH-7 (derived x2APIC LDR), MSR-5 (read-only x2APIC registers), BASE-3 (EXTD without
EN), BASE-4 (x2APIC -> xAPIC, disabled -> x2APIC).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from .conftest import (
    BASE_BSP,
    BASE_EN,
    BASE_EXTD,
    ICR_ASSERT,
    MSR_APIC_BASE,
    MSR_X2APIC_ID,
    MSR_X2APIC_LDR,
    TPR,
    Mode,
    Platform,
    boot,
    expect_gp,
    legal_vectors,
    u64,
    vcpu_ids,
)

SELF = 0x40000
MAXPHYADDR = 48
"""``lapic.Features()``'s default: IA32_APIC_BASE bits 63:48 are reserved (BASE-2)."""

page_addresses = st.integers(0, (1 << (MAXPHYADDR - 12)) - 1).map(lambda page: page << 12)
"""Legal base addresses (below MAXPHYADDR, 4 KiB aligned)."""


def derived_ldr(x2apic_id: int) -> int:
    """MATCH-7."""
    return ((x2apic_id >> 4) << 16) | (1 << (x2apic_id & 0xF))


@given(ids=vcpu_ids(Mode.X2APIC, max_size=4), value=u64, data=st.data())
def test_x2apic_id_is_the_vcpu_id_and_the_ldr_is_derived_and_read_only__MATCH_7_MSR_5(
    platform: Platform, ids: list[int], value: int, data: st.DataObject
) -> None:
    """MATCH-7, MSR-5, BASE-6: once a guest enables x2APIC, RDMSR 0x802 returns its vCPU id and
    RDMSR 0x80D returns ``((id >> 4) << 16) | (1 << (id & 0xF))``.  A WRMSR of any value to
    either MSR is a #GP that changes nothing: the ID and LDR read the same and the host's
    KVM_GET_LAPIC image is byte-for-byte the same."""
    vm = platform.vm(vcpu_ids=ids)
    cpus = boot(vm, Mode.X2APIC)
    for i, cpu in enumerate(cpus):
        assert cpu.vcpu.rdmsr(MSR_X2APIC_ID) == ids[i]
        assert cpu.vcpu.rdmsr(MSR_X2APIC_LDR) == derived_ldr(ids[i])
    i = data.draw(st.integers(0, len(ids) - 1), label="vCPU")
    msr = data.draw(st.sampled_from((MSR_X2APIC_ID, MSR_X2APIC_LDR)), label="MSR")
    vcpu = cpus[i].vcpu
    image = vm.get_lapic(i)
    expect_gp(lambda: vcpu.wrmsr(msr, value))
    assert vcpu.rdmsr(MSR_X2APIC_ID) == ids[i]
    assert vcpu.rdmsr(MSR_X2APIC_LDR) == derived_ldr(ids[i])
    assert vm.get_lapic(i) == image


STATES = ("disabled", "xAPIC", "x2APIC")


def illegal_modes(state: str) -> list[tuple[str, int]]:
    """The mode bits (EN|EXTD) a guest write may not move to from ``state`` (BASE-3, BASE-4)."""
    out = [("BASE-3: EXTD without EN", BASE_EXTD)]
    if state == "x2APIC":
        out.append(("BASE-4: x2APIC -> xAPIC", BASE_EN))
    if state == "disabled":
        out.append(("BASE-4: disabled -> x2APIC", BASE_EN | BASE_EXTD))
    return out


@given(
    state=st.sampled_from(STATES),
    tpr=st.integers(0, 0xFF),
    pending=st.lists(legal_vectors, max_size=4),
    address=page_addresses,
    bsp=st.booleans(),
    host=st.booleans(),
    data=st.data(),
)
def test_illegal_apic_base_transitions_fault_and_change_nothing__BASE_3_BASE_4(
    platform: Platform,
    state: str,
    tpr: int,
    pending: list[int],
    address: int,
    bsp: bool,
    host: bool,
    data: st.DataObject,
) -> None:
    """BASE-3, BASE-4: from each mode reached legally by the guest (xAPIC at RESET; x2APIC by
    setting EXTD; disabled by clearing EN), with some TPR and pending IRR, a WRMSR of
    IA32_APIC_BASE with EXTD=1/EN=0, or x2APIC -> xAPIC, or disabled -> x2APIC, raises #GP
    whatever the (legal) base address and BSP bit, and changes nothing: the MSR and the
    KVM_GET_LAPIC image read the same.  BASE-3 also holds for a host write (KVM_SET_MSRS
    reports failure); BASE-4 binds the guest only (BASE-5), so host writes are not tried
    for it."""
    vm = platform.vm(2)
    cpu = boot(vm, Mode.XAPIC)[1]
    cpu.write(TPR, tpr)
    for vector in pending:
        cpu.send(SELF | ICR_ASSERT | vector, 0)
    vcpu = cpu.vcpu
    base = vcpu.rdmsr(MSR_APIC_BASE)
    if state == "x2APIC":
        vcpu.wrmsr(MSR_APIC_BASE, base | BASE_EXTD)
    elif state == "disabled":
        vcpu.wrmsr(MSR_APIC_BASE, base & ~BASE_EN)
    before_msr = vcpu.rdmsr(MSR_APIC_BASE)
    before_image = vm.get_lapic(1)

    rule, mode_bits = data.draw(st.sampled_from(illegal_modes(state)), label="transition")
    value = address | (BASE_BSP if bsp else 0) | mode_bits
    if host and rule.startswith("BASE-3"):
        assert vm.set_msr(1, MSR_APIC_BASE, value) is False, rule
    else:
        expect_gp(lambda: vcpu.wrmsr(MSR_APIC_BASE, value))
    assert vcpu.rdmsr(MSR_APIC_BASE) == before_msr, rule
    assert vm.get_lapic(1) == before_image, rule
