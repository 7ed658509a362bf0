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

A guest MOV to CR8 exits or not as the CPU virtualizes CR8, which ``KvmOptions.
tpr_low_bits_survive_exit`` already names (CR8-2, KVMB-11): True is VMX with a TPR shadow (the
CPU writes the virtual TPR, then exits with TPR_BELOW_THRESHOLD when the new class is below
KVM's threshold: ``vmx_update_cr8_intercept``), False is SVM without AVIC (the write exits with
``SVM_EXIT_WRITE_CR8`` while KVM intercepts CR8 writes: ``svm_update_cr8_intercept``, else the
CPU writes V_TPR).  Not modelled: VMX without a TPR shadow (every MOV CR8 a CR-access exit).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import partial
from typing import TYPE_CHECKING

from hypervisor.exits import ExitReason

if TYPE_CHECKING:
    from hypervisor.host.pcpu import Pcpu
    from hypervisor.vcpu import Vcpu
    from hypervisor.vm import Vm
    from lapic.apic import LocalApic

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
        vcpu.msr_exit(msr, value)

    def wrmsr_of(self, vcpu: Vcpu) -> Callable[[int, int], None]:
        if type(self).wrmsr is not Emulated.wrmsr:  # a subclass that handles WRMSR itself
            return partial(self.wrmsr, vcpu)
        return vcpu.msr_exit  # every WRMSR exits: the exit itself, without this call

    def mov_to_cr8(self, vcpu: Vcpu, value: int) -> None:
        """CR8-2: SVM intercepts the write (exit, then KVM's ``kvm_set_cr8``) while a requested
        vector is masked by the TPR; VMX's TPR shadow takes it and traps after it when the new
        class drops below TPR_THRESHOLD (the highest requested class, if the TPR masked it)."""
        if vcpu.vm.sync_cr8_at_exit:  # SVM without AVIC
            if vcpu.svm_cr8_write_intercepted():
                vcpu.record_exit(ExitReason.WRITE_CR8, 0, value)
            vcpu.emulate_mov_to_cr8(value)
            return
        threshold = vcpu.vmx_tpr_threshold()
        vcpu.emulate_mov_to_cr8(value)  # a reserved bit: the CPU's #GP, no exit
        if value < threshold:
            vcpu.record_exit(ExitReason.TPR_BELOW_THRESHOLD, 0, 0)

    def notifier(self, vcpu: Vcpu) -> Callable[[LocalApic], None]:
        return vcpu.sched.notifier(vcpu)  # kvm_vcpu_kick (hypervisor.sched)

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
