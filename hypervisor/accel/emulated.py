"""Trap-and-emulate: no APIC virtualization hardware; every APIC access is a VM exit.

What KVM does with ``enable_apicv=0`` (or on hardware without it):

* an xAPIC register access touches a page with no backing, so it exits (EPT misconfiguration,
  KVM's MMIO path) and KVM emulates it in ``apic_mmio_read``/``apic_mmio_write``;
* an x2APIC register access is RDMSR/WRMSR, intercepted (MSR exits) and emulated by
  ``kvm_x2apic_msr_read``/``kvm_x2apic_msr_write``;
* a target vCPU learns about a new interrupt through ``kvm_vcpu_kick``: a halted vCPU is woken,
  one running in guest mode on another pCPU gets a host IPI that forces an exit, and the
  interrupt is injected on the next VM entry.

So one guest ICR write costs exactly one exit in x2APIC mode; an xAPIC IPI as Linux sends it
costs three (ICR read for the idle wait, ICR2 write, ICR write).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from hypervisor.exits import ExitReason

if TYPE_CHECKING:
    from hypervisor.host.pcpu import Pcpu
    from hypervisor.vcpu import Vcpu
    from hypervisor.vm import Vm
    from lapic.apic import LocalApic

_MSR_WRITE = ExitReason.MSR_WRITE  # a global: an enum member lookup costs ~100 ns per exit


class Emulated:
    name = "emulated"

    def attach(self, vm: Vm) -> None:
        return None

    def vcpu_state(self, vcpu: Vcpu) -> str:
        """The accel column of ``vm.table()``: every APIC access of every vCPU traps."""
        return "trap"

    def mmio_read(self, vcpu: Vcpu, gpa: int, size: int) -> int:
        vcpu.record_exit(ExitReason.EPT_MISCONFIG, gpa, 0)
        return vcpu.emulate_mmio_read(gpa, size)

    def mmio_write(self, vcpu: Vcpu, gpa: int, value: int, size: int) -> None:
        vcpu.record_exit(ExitReason.EPT_MISCONFIG, gpa, value)
        vcpu.emulate_mmio_write(gpa, value, size)

    def rdmsr(self, vcpu: Vcpu, msr: int) -> int:
        vcpu.record_exit(ExitReason.MSR_READ, msr, 0)
        return vcpu.emulate_rdmsr(msr)

    def wrmsr(self, vcpu: Vcpu, msr: int, value: int) -> None:
        vcpu.record_exit(_MSR_WRITE, msr, value)
        vcpu.emulate_wrmsr(msr, value)

    def notifier(self, vcpu: Vcpu) -> Callable[[LocalApic], None]:
        return vcpu.sched.notify  # kvm_vcpu_kick (hypervisor.sched), one call from the APIC

    def vcpu_load(self, vcpu: Vcpu, pcpu: Pcpu) -> None:
        return None

    def vcpu_put(self, vcpu: Vcpu) -> None:
        return None

    def vcpu_blocking(self, vcpu: Vcpu) -> None:
        return None

    def vcpu_unblocking(self, vcpu: Vcpu) -> None:
        return None

    def state(self) -> Hashable:
        """Trap-and-emulate keeps no state of its own."""
        return ()

    def set_state(self, state: Hashable) -> None:
        if state != ():
            from lapic.faults import ApicValueError

            raise ApicValueError(f"state={state!r} is not the emulated accelerator's ()")
