"""Where the host's KVM disagrees with the model: each test asserts equality, as every other
comparison does, and is a strict xfail whose reason states the disagreement (model vs KVM).
If KVM or the model changes so that they agree, the test passes and ``xfail_strict`` fails it,
so the marker cannot outlive the disagreement.  ``specs/kvm_backend.md`` lists them."""

from __future__ import annotations

import pytest

from apicsim.kvm import AnyVm, KvmVm
from hypervisor import Vm
from tests.kvm.support import APIC, Both, Outcome, outcome, sw_enable, word

LAST_VCPU_NOT_IN_MAP = (
    "KVMB-8: KVM (this host) builds the APIC map while creating a vCPU without that vCPU, so "
    "the vCPU created last is missing from the map until something marks it dirty; the "
    "model's map has every vCPU"
)


@pytest.mark.xfail(strict=True, reason=LAST_VCPU_NOT_IN_MAP)
def test_an_nmi_ipi_reaches_the_vcpu_created_last__ACCEPT_NMI__FAST_5(both: Both) -> None:
    """ACCEPT-NMI / FAST-5: 2 vCPUs fresh from RESET, vCPU 0 sends a physical NMI to APIC
    ID 1 -> vCPU 1 has one NMI pending.  Model: 1 pending; KVM: 0 (dropped by the fast path,
    which finds no APIC at ID 1)."""

    def body(vm: AnyVm) -> int:
        src = vm.vcpu(0)
        src.mmio_write(APIC + 0x310, 0x01000000)
        src.mmio_write(APIC + 0x300, 0x00004400)
        return _nmi_pending(vm, 1)

    assert both.run(body, vcpus=2) == 1


@pytest.mark.xfail(strict=True, reason=LAST_VCPU_NOT_IN_MAP)
def test_kvm_signal_msi_nmi_to_the_vcpu_created_last_is_accepted__MSI_1__BUG_16(
    both: Both,
) -> None:
    """MSI-1 / BUG-16: vCPU ids [0, 5], NMI MSI to APIC ID 5 -> 1.  Model 1; KVM 0."""

    def body(vm: AnyVm) -> int:
        return vm.signal_msi(0xFEE05000, 0, 0x400)

    assert both.run(body, vcpu_ids=[0, 5]) == 1


@pytest.mark.xfail(strict=True, reason=LAST_VCPU_NOT_IN_MAP)
def test_an_init_ipi_reaches_the_vcpu_created_last__ACCEPT_INIT(both: Both) -> None:
    """ACCEPT-INIT: 2 vCPUs fresh from RESET, vCPU 0 sends INIT to APIC ID 1, then vCPU 1 is
    asked to read its ID.  Model: the INIT is pending (``init_pending``), the read executes
    (0x01000000); KVM: the INIT never arrives and the read executes too, so the observable
    that differs is whether an INIT is pending."""

    def body(vm: AnyVm) -> bool:
        src = vm.vcpu(0)
        src.mmio_write(APIC + 0x310, 0x01000000)
        src.mmio_write(APIC + 0x300, 0x00004500)
        return _init_pending(vm, 1)

    assert both.run(body, vcpus=2) is True


@pytest.mark.xfail(
    strict=True,
    reason=(
        "KVMB-9: KVM processes a pending INIT (and SIPI) when the vCPU next enters the guest "
        "(kvm_apic_accept_events at KVM_RUN): an AP then waits for SIPI and executes nothing; "
        "the model's guest accesses execute on the un-INITed APIC until Vcpu.run() accepts "
        "the events"
    ),
)
def test_a_guest_access_after_an_init_ipi_sees_the_init__ACCEPT_INIT__INIT_1(both: Both) -> None:
    """ACCEPT-INIT / INIT-1: vCPU 1 (TPR 0x20, SVR 0x1FF) receives INIT; its guest then reads
    TPR.  Model: the read executes and returns 0x20, TPR/SVR stay 0x20/0x1FF; KVM: the vCPU
    is INIT_RECEIVED and executes nothing (the backend refuses, like the model's own
    ``Vcpu`` for an INIT_RECEIVED vCPU), TPR/SVR read 0/0xFF afterwards (INIT-1)."""

    def body(vm: AnyVm) -> tuple[Outcome, int, int]:
        sw_enable(vm, 1)
        target = vm.vcpu(1)
        target.mmio_write(APIC + 0x80, 0x20)
        src = vm.vcpu(0)
        src.mmio_write(APIC + 0x310, 0x01000000)
        src.mmio_write(APIC + 0x300, 0x00004500)
        read = outcome(lambda: target.mmio_read(APIC + 0x80))
        state = vm.get_lapic(1)
        return read, word(state, 0x80), word(state, 0xF0)

    assert both.run(body, vcpus=3) == (("refused", 0), 0, 0xFF)


def _nmi_pending(vm: AnyVm, i: int) -> int:
    if isinstance(vm, KvmVm):
        return vm.vcpu(i).nmi_pending
    assert isinstance(vm, Vm)
    return vm.lapic(i).nmi_pending


def _init_pending(vm: AnyVm, i: int) -> bool:
    """Whether vCPU ``i`` has an INIT it has not yet processed (KVM: KVM_GET_MP_STATE, which
    processes it, reports INIT_RECEIVED for an AP)."""
    if isinstance(vm, KvmVm):
        try:
            vm.vcpu(i).mmio_read(APIC + 0x20)
        except ValueError:
            return True
        return False
    assert isinstance(vm, Vm)
    return vm.lapic(i).init_pending
