"""ICR.BUSY under AVIC (AV-B5, AV-B7; reference Part B AV-B5 and Part C AV-C1): what KVM's
``avic_incomplete_ipi_interception`` does with a BUSY bit the CPU left in the backing page, for
each cause, with ``Avic.icr_busy_causes`` (UNVERIFIED) choosing where the CPU leaves it set."""

from __future__ import annotations

import pytest

from hypervisor.accel.avic import Avic
from hypervisor.hw.avic import IpiFailure
from lapic.faults import ApicTypeError

from .builders import ICR_LOGICAL, ICR_NMI, REG_ICR, REG_LDR, mmio_read, mmio_write
from .test_avic import avic_exits, avic_of, avic_vm, send

BUSY = 0x1000
ALL_CAUSES = frozenset(IpiFailure)


def test_busy_left_on_an_invalid_int_type_exit_makes_kvm_rewrite_the_icr_once__AV_B7() -> None:
    vm = avic_vm(2, Avic(icr_busy_causes=frozenset({IpiFailure.INVALID_INT_TYPE})))
    send(vm, 0, ICR_NMI | BUSY | 0xF0, dest=1)
    assert len(avic_exits(vm)) == 1
    assert mmio_read(vm, 0, REG_ICR) == ICR_NMI | 0xF0  # kvm_apic_write_nodecode cleared BUSY
    assert avic_of(vm).icr_rewrites == 1
    assert vm.vcpu(1).run() == [2]  # the NMI, once
    assert vm.vcpu(1).run() == []


def test_busy_clear_on_an_invalid_int_type_exit_leaves_the_icr_unwritten__AV_B7() -> None:
    vm = avic_vm(2)
    send(vm, 0, ICR_NMI | BUSY | 0xF0, dest=1)
    assert mmio_read(vm, 0, REG_ICR) == ICR_NMI | 0xF0
    assert avic_of(vm).icr_rewrites == 0  # kvm_apic_send_ipi only
    assert vm.vcpu(1).run() == [2]
    assert vm.vcpu(1).run() == []


def test_busy_left_on_an_invalid_target_exit_is_cleared_ipi_sent_once__AV_B7_AV_B4() -> None:
    vm = avic_vm(2, Avic(icr_busy_causes=frozenset({IpiFailure.INVALID_TARGET})))
    mmio_write(vm, 0, REG_LDR, 0x01000000)  # bit 1 has no vCPU
    send(vm, 1, ICR_LOGICAL | 0x55, dest=0x03)
    assert len(avic_exits(vm)) == 1
    assert mmio_read(vm, 1, REG_ICR) & BUSY == 0
    assert avic_of(vm).icr_rewrites == 1
    assert vm.vcpu(0).run() == [0x55]
    assert vm.vcpu(0).run() == []


def test_busy_left_on_a_target_not_running_exit_stays_set_kvm_only_kicks__AV_B7_AV_C1() -> None:
    vm = avic_vm(2, Avic(icr_busy_causes=frozenset({IpiFailure.TARGET_NOT_RUNNING})))
    vm.vcpu(1).halt()
    send(vm, 0, 0x61, dest=1)
    assert len(avic_exits(vm)) == 1
    assert mmio_read(vm, 0, REG_ICR) == BUSY | 0x61  # nothing in KVM's cause-1 path clears it
    assert avic_of(vm).icr_rewrites == 0
    assert vm.vcpu(1).run() == [0x61]  # the CPU's IRR write, once; KVM only woke vCPU 1
    assert vm.vcpu(1).run() == []


def test_an_accelerated_write_never_sets_busy_whatever_the_exit_causes__AV_B7() -> None:
    vm = avic_vm(2, Avic(icr_busy_causes=ALL_CAUSES))
    send(vm, 0, 0x61, dest=1)
    assert avic_exits(vm) == []
    assert mmio_read(vm, 0, REG_ICR) == 0x61


def test_the_trap_lands_with_busy_before_kvm_runs_when_steps_are_queued__AV_B7() -> None:
    vm = avic_vm(2, Avic(icr_busy_causes=ALL_CAUSES))
    steps = vm.host.steps
    steps.queued = True
    send(vm, 0, ICR_NMI | 0xF0, dest=1)
    assert mmio_read(vm, 0, REG_ICR) == ICR_NMI | 0xF0  # the write, stored; no exit yet
    steps.run_all()
    steps.queued = False
    assert len(avic_exits(vm)) == 1
    assert mmio_read(vm, 0, REG_ICR) == ICR_NMI | 0xF0  # BUSY set by the trap, then cleared
    assert avic_of(vm).icr_rewrites == 1
    assert vm.vcpu(1).run() == [2]


def test_icr_busy_causes_must_be_a_frozenset_of_causes() -> None:
    with pytest.raises(ApicTypeError, match="icr_busy_causes"):
        Avic(icr_busy_causes={1})  # type: ignore[arg-type]
    with pytest.raises(ApicTypeError, match="icr_busy_causes"):
        Avic(icr_busy_causes=frozenset({1}))  # type: ignore[arg-type]

