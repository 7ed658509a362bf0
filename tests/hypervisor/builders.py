"""Builders for the hypervisor tests: topologies made the way a guest or a VMM makes them.

Every register a test sets up goes through a guest-visible access on ``vm.vcpu(i)`` (xAPIC MMIO
at the APIC page, WRMSR) or through the host's ``vm.set_msr``, never by poking the model's
internals, so the exits, the map invalidation and the side effects are the ones KVM would see.
"""

from __future__ import annotations

from hypervisor import Vm
from lapic.registers import (
    APIC_BASE_EN,
    APIC_BASE_EXTD,
    APIC_BASE_MSR,
    DFR_CLUSTER,
    DFR_FLAT,
)

APIC_PAGE = 0xFEE00000
"""Default APIC base: every vCPU's MMIO window starts here until it moves its base."""

REG_ID = 0x20
REG_TPR = 0x80
REG_EOI = 0xB0
REG_LDR = 0xD0
REG_DFR = 0xE0
REG_SVR = 0xF0
REG_ICR = 0x300
REG_ICR2 = 0x310

MSR_TPR = 0x808
MSR_EOI = 0x80B
MSR_LDR = 0x80D
MSR_SVR = 0x80F
MSR_ICR = 0x830
MSR_SELF_IPI = 0x83F

SVR_ON = 0x1FF
"""SVR with the software-enable bit and spurious vector 0xFF."""
SVR_OFF = 0xFF

ICR_FIXED = 0x000
ICR_LOWEST = 0x100
ICR_NMI = 0x400
ICR_INIT = 0x500
ICR_STARTUP = 0x600
ICR_LOGICAL = 0x800
ICR_ASSERT = 0x4000
ICR_LEVEL = 0x8000
ICR_SELF = 0x40000
ICR_ALL_INCLUDING_SELF = 0x80000
ICR_ALL_EXCLUDING_SELF = 0xC0000

__all__ = ["APIC_PAGE", "DFR_CLUSTER", "DFR_FLAT"]


def mmio_write(vm: Vm, i: int, offset: int, value: int) -> None:
    """The guest on vCPU ``i`` stores ``value`` at ``offset`` of its APIC page."""
    vm.vcpu(i).mmio_write(vm.lapic(i).base_address + offset, value)


def mmio_read(vm: Vm, i: int, offset: int) -> int:
    """The guest on vCPU ``i`` loads 4 bytes at ``offset`` of its APIC page."""
    return vm.vcpu(i).mmio_read(vm.lapic(i).base_address + offset)


def is_x2apic(vm: Vm, i: int) -> bool:
    """Asked by the host (KVM_GET_MSRS), so it costs the guest no exit."""
    return bool(vm.get_msr(i, APIC_BASE_MSR) & APIC_BASE_EXTD)


def sw_enable(vm: Vm, i: int, on: bool = True) -> None:
    """Write SVR from the guest, through whichever interface the APIC's mode uses."""
    svr = SVR_ON if on else SVR_OFF
    if is_x2apic(vm, i):
        vm.vcpu(i).wrmsr(MSR_SVR, svr)
    else:
        mmio_write(vm, i, REG_SVR, svr)


def set_xapic_id(vm: Vm, i: int, xapic_id: int) -> None:
    mmio_write(vm, i, REG_ID, xapic_id << 24)


def set_logical(vm: Vm, i: int, lid: int, dfr: int = DFR_FLAT) -> None:
    """xAPIC DFR then LDR (logical ID ``lid`` in bits 31:24)."""
    mmio_write(vm, i, REG_DFR, dfr)
    mmio_write(vm, i, REG_LDR, lid << 24)


def guest_x2apic(vm: Vm, i: int) -> None:
    """The guest on vCPU ``i`` sets IA32_APIC_BASE.EXTD (xAPIC -> x2APIC, keeping the rest)."""
    v = vm.vcpu(i)
    v.wrmsr(APIC_BASE_MSR, v.rdmsr(APIC_BASE_MSR) | APIC_BASE_EXTD)


def host_apic_base(vm: Vm, i: int, mode: str) -> None:
    """KVM_SET_MSRS of IA32_APIC_BASE to ``"xapic"``, ``"x2apic"`` or ``"disabled"``."""
    base = vm.get_msr(i, APIC_BASE_MSR) & ~(APIC_BASE_EN | APIC_BASE_EXTD)
    bits = {"xapic": APIC_BASE_EN, "x2apic": APIC_BASE_EN | APIC_BASE_EXTD, "disabled": 0}
    assert vm.set_msr(i, APIC_BASE_MSR, base | bits[mode]), f"host could not set {mode}"


def send_xapic_ipi(vm: Vm, i: int, low: int, dest: int) -> None:
    """xAPIC IPI as a guest sends it: ICR2 (destination), then ICR."""
    mmio_write(vm, i, REG_ICR2, dest << 24)
    mmio_write(vm, i, REG_ICR, low)


def send_x2apic_ipi(vm: Vm, i: int, low: int, dest: int) -> None:
    vm.vcpu(i).wrmsr(MSR_ICR, (dest << 32) | low)


def send_ipi(vm: Vm, i: int, low: int, dest: int) -> None:
    """An ICR write from vCPU ``i`` in whatever mode its APIC is in."""
    if is_x2apic(vm, i):
        send_x2apic_ipi(vm, i, low, dest)
    else:
        send_xapic_ipi(vm, i, low, dest)


def xapic_vm(
    n: int = 4,
    *,
    profile: str = "kvm",
    x2apic_format: bool = False,
    broadcast_quirk: bool | None = None,
    vector_hashing: bool | None = None,
    trace: bool = False,
) -> Vm:
    """``n`` xAPIC vCPUs with xAPIC IDs 0..n-1, all software-enabled by their guests."""
    vm = Vm(
        n,
        profile,
        x2apic_format=x2apic_format,
        broadcast_quirk=broadcast_quirk,
        vector_hashing=vector_hashing,
        trace=trace,
    )
    for i in range(n):
        sw_enable(vm, i)
    return vm


def logical_vm(
    lids: list[int],
    dfr: int = DFR_FLAT,
    *,
    profile: str = "kvm",
    vector_hashing: bool | None = None,
) -> Vm:
    """One software-enabled xAPIC vCPU per logical ID, all with the same DFR."""
    vm = xapic_vm(len(lids), profile=profile, vector_hashing=vector_hashing)
    for i, lid in enumerate(lids):
        set_logical(vm, i, lid, dfr)
    return vm


def x2apic_vm(
    vcpu_ids: list[int],
    *,
    x2apic_format: bool = False,
    broadcast_quirk: bool | None = None,
    vector_hashing: bool | None = None,
    trace: bool = False,
) -> Vm:
    """vCPUs with the given ids, each switched to x2APIC by its guest and software-enabled."""
    vm = Vm(
        vcpu_ids=vcpu_ids,
        x2apic_format=x2apic_format,
        broadcast_quirk=broadcast_quirk,
        vector_hashing=vector_hashing,
        trace=trace,
    )
    for i in range(len(vcpu_ids)):
        guest_x2apic(vm, i)
        sw_enable(vm, i)
    return vm


def irr(vm: Vm, i: int) -> set[int]:
    return set(vm.lapic(i).irr)


def holders(vm: Vm, vector: int) -> list[int]:
    """vCPU indexes whose IRR holds ``vector``."""
    return [i for i in range(len(vm)) if vector in vm.lapic(i).irr]
