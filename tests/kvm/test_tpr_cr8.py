"""The TPR behaviours the widened differential generators (issue 8) were built to find, on both
backends: KVM_GET/SET_SREGS' CR8 clears TPR bits 3:0 (KVMB-10); whether TPR bits 3:0 survive
the guest's exits is a host property, measured here and modelled by
``KvmOptions.tpr_low_bits_survive_exit`` (KVMB-11, with SVM's behaviour checked on the model);
and a vCPU that does not enter (waiting for SIPI) keeps the PPR a KVM_SET_LAPIC left stale
(KVMB-9).  ``specs/kvm_backend.md`` describes them.  The bodies run on the model and on KVM
(``Both``); the expected values are KVM's on this host."""

from __future__ import annotations

import pytest

from apicsim import replays
from apicsim.kvm import AnyVm, host_tpr_low_bits_survive_exit
from hypervisor import KvmOptions, Vm, VmConfig
from tests.kvm.support import APIC, Both, Outcome, needs_kvm, outcome, sw_enable, word


@needs_kvm
def test_a_kvm_set_sregs_round_trip_of_cr8_clears_tpr_bits_3_0__KVMB_10__REG_TPR_1(
    both: Both,
) -> None:
    """KVMB-10 / REG-TPR-1: TPR 0x2F; KVM_GET_SREGS reports CR8 2; writing that state back
    (KVM_SET_SREGS, as a VMM's save/restore does) leaves TPR 0x20, PPR with it; CR8 7 gives
    0x70; a CR8 above 0xF is refused by kvm_set_cr8 and leaves the TPR as it was."""

    def body(vm: AnyVm) -> list[int]:
        sw_enable(vm, 0)
        vm.vcpu(0).mmio_write(APIC + 0x80, 0x2F)
        out = [vm.get_cr8(0), word(vm.get_lapic(0), 0x80)]
        vm.set_cr8(0, vm.get_cr8(0))
        state = vm.get_lapic(0)
        out += [word(state, 0x80), word(state, 0xA0)]
        vm.set_cr8(0, 7)
        out.append(word(vm.get_lapic(0), 0x80))
        vm.set_cr8(0, 0x13)
        out.append(word(vm.get_lapic(0), 0x80))
        return out

    assert both.run(body) == [2, 0x2F, 0x20, 0x20, 0x70, 0x70]


@needs_kvm
def test_tpr_bits_3_0_survive_the_guests_exits_on_this_host__KVMB_11(both: Both) -> None:
    """KVMB-11, measured: on this host (VMX-like: TPR kept whole) TPR 0x2F written by the
    guest (MMIO, and in x2APIC mode by WRMSR) stays 0x2F across more exits (reads, an EOI, a
    self IPI), and the model with the measured knob agrees."""
    assert host_tpr_low_bits_survive_exit() is True

    def body(vm: AnyVm) -> list[int]:
        sw_enable(vm, 0)
        cpu = vm.vcpu(0)
        cpu.mmio_write(APIC + 0x80, 0x2F)
        cpu.mmio_read(APIC + 0x20)
        cpu.mmio_write(APIC + 0xB0, 0)
        out = [word(vm.get_lapic(0), 0x80)]
        cpu.wrmsr(0x1B, 0xFEE00C00)
        cpu.wrmsr(0x808, 0x3B)
        cpu.wrmsr(0x83F, 0x31)
        cpu.rdmsr(0x802)
        out.append(word(vm.get_lapic(0), 0x80))
        return out

    assert both.run(body) == [0x2F, 0x3B]


def _svm_vm() -> Vm:
    config = VmConfig.build(1)
    return Vm(config.replace(kvm=KvmOptions(tpr_low_bits_survive_exit=False)))


@pytest.mark.parametrize("kept", [True, False])
def test_with_svm_without_avic_the_next_exit_clears_tpr_bits_3_0__KVMB_11(kept: bool) -> None:
    """KVMB-11 on the model (no SVM host to measure): with ``tpr_low_bits_survive_exit`` False
    (svm.c sync_cr8_to_lapic after each exit) the guest's TPR write of 0x2F stands until its
    next exit, which leaves 0x20; with True (VMX TPR shadow, this host) it stays 0x2F."""
    vm = Vm(VmConfig.build(1).replace(kvm=KvmOptions(tpr_low_bits_survive_exit=kept)))
    cpu = vm.vcpu(0)
    cpu.mmio_write(APIC + 0xF0, 0x1FF)
    cpu.mmio_write(APIC + 0x80, 0x2F)
    assert vm.lapic(0).tpr == 0x2F
    cpu.mmio_read(APIC + 0x20)
    assert vm.lapic(0).tpr == (0x2F if kept else 0x20)
    assert vm.lapic(0).ppr == (0x2F if kept else 0x20)


def test_with_svm_the_tpr_is_kept_while_cr8_writes_are_intercepted__KVMB_11() -> None:
    """KVMB-11: svm_update_cr8_intercept intercepts CR8 writes while the highest requested
    vector's class is not above the TPR's, and then sync_cr8_to_lapic copies nothing: IRR
    {0x25} under TPR 0x2F keeps 0x2F across an exit; once the IRR is empty the next exit
    leaves 0x20."""
    vm = _svm_vm()
    cpu = vm.vcpu(0)
    cpu.mmio_write(APIC + 0xF0, 0x1FF)
    cpu.mmio_write(APIC + 0x80, 0x2F)
    vm.signal_msi(0xFEE00000, 0, 0x25)
    assert 0x25 in vm.lapic(0).irr
    cpu.mmio_read(APIC + 0x20)
    assert vm.lapic(0).tpr == 0x2F
    image = bytearray(vm.get_lapic(0))
    image[0x210:0x214] = bytes(4)  # IRR word 1 (vectors 0x20-0x3F) cleared
    vm.set_lapic(0, bytes(image))
    cpu.mmio_read(APIC + 0x20)
    assert vm.lapic(0).tpr == 0x20


@needs_kvm
def test_a_vcpu_waiting_for_sipi_keeps_the_ppr_kvm_set_lapic_left_stale__KVMB_9__STATE_4(
    both: Both,
) -> None:
    """KVMB-9 / STATE-4 (found by the widened generators): vCPU 1 takes INIT and waits for
    SIPI; KVM_SET_LAPIC puts 0xA0 in service (PPR left stale at 0); its guest's next access is
    refused, and since the vCPU never enters, KVM processes no KVM_REQ_EVENT: PPR stays 0."""

    def body(vm: AnyVm) -> tuple[Outcome, Outcome, int]:
        src = vm.vcpu(0)
        sw_enable(vm, 1)
        src.mmio_write(APIC + 0x310, 0x01000000)
        src.mmio_write(APIC + 0x300, 0x00004500)
        first = outcome(lambda: vm.vcpu(1).mmio_read(APIC + 0x20))
        image = bytearray(vm.get_lapic(1))
        image[0x150:0x154] = (1).to_bytes(4, "little")  # ISR: vector 0xA0
        vm.set_lapic(1, bytes(image))
        second = outcome(lambda: vm.vcpu(1).mmio_read(APIC + 0x20))
        return first, second, word(vm.get_lapic(1), 0xA0)

    assert both.run(body, vcpus=3) == (("refused", 0), ("refused", 0), 0)


def test_the_fid_1_switch_puts_back_the_old_tpr_kept_by_set_sregs__KVMB_10() -> None:
    """KVMB-10: ``APICSIM_REPLAY=FID-1`` (``apicsim.replays.MODEL_REPLAYS``) is the model's old
    behaviour, a CR8 write that keeps TPR bits 3:0, which the default differential run finds
    (its five tests all fail under it); off again, the model clears them."""
    with replays.active(["FID-1"]):
        vm = Vm(1)
        vm.vcpu(0).mmio_write(APIC + 0x80, 0x2F)
        vm.set_cr8(0, vm.get_cr8(0))
        assert vm.lapic(0).tpr == 0x2F
    vm = Vm(1)
    vm.vcpu(0).mmio_write(APIC + 0x80, 0x2F)
    vm.set_cr8(0, vm.get_cr8(0))
    assert vm.lapic(0).tpr == 0x20
