"""The guest's MOV to/from CR8 (``Vcpu.mov_to_cr8`` / ``mov_from_cr8``): its architectural
effect under every accelerator (CR8-1), the exit it takes under trap-and-emulate (CR8-2), and
AVIC's choice while deactivated (AVIC-CHOICE-7).  AVIC's intercept switch is AV-G4
(``test_avic_races.py``)."""

from __future__ import annotations

import pytest

from hypervisor import ExitReason, Host, KvmOptions, Vm, VmConfig
from hypervisor.accelerators import ACCELERATORS
from lapic.faults import GuestFault
from lapic.icr import DeliveryMode, Interrupt

from .builders import REG_ID, REG_SVR, REG_TPR, SVR_ON, mmio_write


def one(accelerator: str, **kw: object) -> Vm:
    vm = Vm(1, accelerator=accelerator, **kw)  # type: ignore[arg-type]
    mmio_write(vm, 0, REG_SVR, SVR_ON)
    return vm


@pytest.mark.parametrize("accelerator", sorted(ACCELERATORS))
def test_mov_cr8_is_the_tpr_class_and_a_reserved_bit_faults_under_every_accelerator__CR8_1(
    accelerator: str,
) -> None:
    vm = one(accelerator)
    v = vm.vcpu(0)
    mmio_write(vm, 0, REG_TPR, 0x2F)
    assert v.mov_from_cr8() == 2
    v.mov_to_cr8(3)
    assert vm.lapic(0).tpr == 0x30 and v.mov_from_cr8() == 3
    exits = vm.stats.exits
    assert v.mov_from_cr8() == 3 and vm.stats.exits == exits  # a read never exits
    for bit in range(4, 64):
        with pytest.raises(GuestFault) as fault:
            v.mov_to_cr8(1 << bit | 0xA)
        assert fault.value.vector == 13
        assert vm.lapic(0).tpr == 0x30
    v.mov_to_cr8(0)
    assert vm.lapic(0).tpr == 0 and vm.lapic(0).ppr == 0


def masked_irq(vm: Vm) -> None:
    """TPR 0x50 with vector 0x45 requested: the TPR masks the highest IRR class (4)."""
    mmio_write(vm, 0, REG_TPR, 0x50)
    vm.deliver(Interrupt(0x45, DeliveryMode.FIXED, dest=0))
    assert 0x45 in vm.lapic(0).irr


def test_vmx_traps_a_cr8_write_below_the_tpr_threshold_only__CR8_2() -> None:
    vm = one("emulated")  # tpr_low_bits_survive_exit=True: VMX with a TPR shadow
    v = vm.vcpu(0)
    v.mov_to_cr8(3)
    assert vm.stats.exits_by_reason[ExitReason.TPR_BELOW_THRESHOLD] == 0  # nothing requested
    masked_irq(vm)
    v.mov_to_cr8(4)  # class 4 = the threshold: not below it
    assert vm.stats.exits_by_reason[ExitReason.TPR_BELOW_THRESHOLD] == 0
    mmio_write(vm, 0, REG_TPR, 0x50)
    v.mov_to_cr8(3)
    assert vm.exits[-1] == (0, ExitReason.TPR_BELOW_THRESHOLD, 0, 0)
    assert vm.lapic(0).tpr == 0x30 and vm.vcpu(0).run() == [0x45]


def test_svm_intercepts_a_cr8_write_while_the_tpr_masks_a_request__CR8_2() -> None:
    vm = Vm(VmConfig.build(1).replace(kvm=KvmOptions(tpr_low_bits_survive_exit=False)))
    mmio_write(vm, 0, REG_SVR, SVR_ON)
    v = vm.vcpu(0)
    v.mov_to_cr8(3)
    assert vm.stats.exits_by_reason[ExitReason.WRITE_CR8] == 0
    masked_irq(vm)
    v.mov_to_cr8(3)
    assert vm.exits[-1] == (0, ExitReason.WRITE_CR8, 0, 3)
    assert vm.lapic(0).tpr == 0x30
    with pytest.raises(GuestFault):  # 0x45 is above TPR 0x30 now: not intercepted, CPU's #GP
        v.mov_to_cr8(0x13)
    assert vm.exits[-1] == (0, ExitReason.WRITE_CR8, 0, 3)


def test_an_inhibited_avic_keeps_cr8_writes_intercepted__AVIC_CHOICE_7() -> None:
    vm = Vm(2, accelerator="avic", host=Host(2))
    for i in range(2):
        mmio_write(vm, i, REG_SVR, SVR_ON)
    mmio_write(vm, 1, REG_ID, 5 << 24)  # APIC_ID_MODIFIED
    vm.vcpu(0).mov_to_cr8(2)
    assert vm.exits[-1] == (0, ExitReason.WRITE_CR8, 0, 2)
    with pytest.raises(GuestFault):
        vm.vcpu(0).mov_to_cr8(1 << 63)
    assert vm.exits[-1] == (0, ExitReason.WRITE_CR8, 0, 1 << 63)  # the exit, then KVM's #GP
    assert vm.lapic(0).tpr == 0x20
