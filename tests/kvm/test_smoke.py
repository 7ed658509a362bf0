"""Smoke tests: one body, two backends (the model and the host's KVM), equal observables.

Tests taking ``backends`` run once per backend and assert the rule's figures, so a KVM
disagreement shows up as the ``[kvm]`` case failing with KVM's value.  Tests taking ``both``
compare the two backends directly (byte-for-byte state images).
"""

from __future__ import annotations

import pytest

from apicsim.kvm import AnyVm, KvmVm, lapic_view
from lapic import GuestFault, StateError
from tests.kvm.support import (
    APIC,
    X2APIC_ENABLE,
    Both,
    Factory,
    guest_x2apic,
    outcome,
    state_diff,
    states,
    sw_enable,
    word,
)


# =============================================================================================
# Create, close, scale
# =============================================================================================
def test_a_vm_is_created_with_its_vcpus_and_closed(backends: Factory) -> None:
    vm = backends(vcpus=4)
    assert len(vm) == 4
    assert [vm.get_msr(i, 0x1B) for i in range(4)] == [0xFEE00900] + [0xFEE00800] * 3
    if isinstance(vm, KvmVm):
        with vm:
            assert vm.vcpu(3).mmio_read(APIC + 0x20) == 0x03000000
        assert vm.fd == -1 and len(vm) == 0
        vm.close()  # closing twice is harmless


def test_256_vcpus_start_in_the_model_s_reset_state_byte_for_byte__RESET_1(both: Both) -> None:
    """256 vCPUs: every KVM_GET_LAPIC image equals the model's; vCPU 255 reads its xAPIC ID
    0xFF000000 and, after enabling x2APIC, x2APIC ID 0xFF and LDR 0x000F8000 (MATCH-7)."""

    def body(vm: AnyVm) -> tuple[list[bytes], int, int, int]:
        images = states(vm)
        cpu = vm.vcpu(255)
        xapic_id = cpu.mmio_read(APIC + 0x20)
        cpu.wrmsr(0x1B, X2APIC_ENABLE)
        return images, xapic_id, cpu.rdmsr(0x802), cpu.rdmsr(0x80D)

    images, xapic_id, x2apic_id, ldr = both.run(body, vcpus=256)
    assert len(images) == 256
    assert (xapic_id, x2apic_id, ldr) == (0xFF000000, 0xFF, 0x000F8000)


def test_a_fresh_vcpu_s_kvm_get_lapic_equals_the_model_s_byte_for_byte__RESET_1(
    both: Both,
) -> None:
    """KVM makes vCPU 0 the reset BSP (LINT0 = ExtINT under KVM_X86_QUIRK_LINT0_REENABLED);
    the model's ``Vm`` does the same with its default ``bsp_vcpu_id=0``.  Compared as raw
    bytes, TMCCT included."""

    def body(vm: AnyVm) -> list[bytes]:
        return [vm.get_lapic(i) for i in range(len(vm))]

    images = both.run(body, vcpus=4)
    assert word(images[0], 0x350) == 0x700 and word(images[1], 0x350) == 0x10000


def test_the_state_images_differ_in_no_word(both: Both) -> None:
    """The same comparison as above, reported word by word (a readable diff if it fails)."""
    model = both.model(vcpus=3)
    kvm = both.kvm(vcpus=3)
    assert [state_diff(a, b) for a, b in zip(states(kvm), states(model), strict=True)] == [
        [],
        [],
        [],
    ]


def test_reset_values_read_by_the_guest__RESET_1(backends: Factory) -> None:
    """RESET-1: vCPU 2 after RESET -> 0xFEE00020 = 0x02000000, 0xFEE000F0 = 0xFF,
    0xFEE000E0 = 0xFFFFFFFF, 0xFEE00350 = 0x00010000 (not the BSP); the BSP's LVT LINT0 is
    0x700; LVR is 0x00050014 (no CMCI, no directed EOI with the in-kernel IOAPIC)."""
    vm = backends(vcpus=3)
    cpu = vm.vcpu(2)
    reads = {off: cpu.mmio_read(APIC + off) for off in (0x20, 0x30, 0x80, 0xD0, 0xE0, 0xF0, 0x350)}
    assert reads == {
        0x20: 0x02000000,
        0x30: 0x00050014,
        0x80: 0,
        0xD0: 0,
        0xE0: 0xFFFFFFFF,
        0xF0: 0xFF,
        0x350: 0x00010000,
    }
    assert vm.vcpu(0).mmio_read(APIC + 0x350) == 0x700
    assert vm.get_msr(2, 0x1B) == 0xFEE00800


# =============================================================================================
# Guest accesses
# =============================================================================================
def test_an_xapic_icr_write_by_the_guest_delivers_to_the_target_s_irr__ICR_2(
    backends: Factory,
) -> None:
    """ICR-2: ICR2=0x03000000, write ICR=0x000050F1 -> fixed IPI 0xF1 to xAPIC ID 3; ICR then
    reads 0x000040F1, ICR2 reads 0x03000000.  The guest runs with IF=0, so 0xF1 stays in
    vCPU 3's IRR."""
    vm = backends(vcpus=4)
    sw_enable(vm, 3)
    cpu = vm.vcpu(0)
    cpu.mmio_write(APIC + 0x310, 0x03000000)
    cpu.mmio_write(APIC + 0x300, 0x000050F1)
    assert (cpu.mmio_read(APIC + 0x300), cpu.mmio_read(APIC + 0x310)) == (0x40F1, 0x03000000)
    view = lapic_view(vm, 3)
    assert view.irr == {0xF1} and not view.isr and not view.tmr
    assert [lapic_view(vm, i).irr for i in (0, 1, 2)] == [set(), set(), set()]


def test_the_guest_enables_x2apic_and_reads_its_id_and_ldr__BASE_6(backends: Factory) -> None:
    """BASE-6: vcpu_id 17, xAPIC -> x2APIC (guest WRMSR 0x1B) -> RDMSR 0x802 = 0x11,
    RDMSR 0x80D = 0x00010002."""
    vm = backends(vcpus=18)
    cpu = vm.vcpu(17)
    cpu.wrmsr(0x1B, X2APIC_ENABLE)
    assert (cpu.rdmsr(0x1B), cpu.rdmsr(0x802), cpu.rdmsr(0x80D)) == (0xFEE00C00, 0x11, 0x10002)


@pytest.mark.parametrize("value", [0x000140F1, 0x001040F1, 0x002040F1, 0x000060F1])
def test_an_x2apic_icr_write_with_a_reserved_bit_raises_gp__ICR_3(
    backends: Factory, value: int
) -> None:
    """ICR-3: bits 16, 20, 21, 13 of the x2APIC ICR are reserved -> #GP, nothing sent, the
    ICR unchanged."""
    vm = backends(vcpus=2)
    for i in (0, 1):
        guest_x2apic(vm, i)
        sw_enable(vm, i)
    cpu = vm.vcpu(0)
    with pytest.raises(GuestFault) as fault:
        cpu.wrmsr(0x830, 1 << 32 | value)
    assert fault.value.vector == 13
    assert lapic_view(vm, 1).irr == set()
    assert cpu.rdmsr(0x830) == 0


def test_an_x2apic_icr_write_without_reserved_bits_is_sent__ICR_3(backends: Factory) -> None:
    """ICR-3: 0x00000001_000050F1 -> IPI 0xF1 to x2APIC ID 1; reads back with bit 12 clear."""
    vm = backends(vcpus=2)
    for i in (0, 1):
        guest_x2apic(vm, i)
        sw_enable(vm, i)
    vm.vcpu(0).wrmsr(0x830, 0x00000001_000050F1)
    assert vm.vcpu(0).rdmsr(0x830) == 0x00000001_000040F1
    assert lapic_view(vm, 1).irr == {0xF1}


def test_guest_faults_are_the_same_exception_on_both_backends(backends: Factory) -> None:
    """A guest RDMSR of an x2APIC register in xAPIC mode, and an x2APIC write to the
    read-only LVR, fault with #GP (MSR-1); the TPR read after them still works."""
    vm = backends(vcpus=1)
    cpu = vm.vcpu(0)
    assert outcome(lambda: cpu.rdmsr(0x808)) == ("fault", 13)
    guest_x2apic(vm, 0)
    assert outcome(lambda: cpu.wrmsr(0x803, 0)) == ("fault", 13)
    assert outcome(lambda: cpu.rdmsr(0x808)) == ("ok", 0)


def test_an_access_outside_the_apic_page_is_refused_on_both_backends(backends: Factory) -> None:
    """MMIO-1: only the 4 KiB window at the APIC base is a device; neither backend models
    anything else."""
    vm = backends(vcpus=1)
    assert outcome(lambda: vm.vcpu(0).mmio_read(APIC + 0x1000)) == ("refused", 0)


# =============================================================================================
# Host ioctls
# =============================================================================================
def test_kvm_signal_msi_returns_1_0_and_minus_1__FAST_8(backends: Factory) -> None:
    """FAST-8 through KVM_SIGNAL_MSI: to software-enabled APIC ID 1 -> 1; to unused ID 0x10
    with the map present -> 0; after vCPU 3 moves onto xAPIC ID 0 (no map: the slow path)
    -> -1; an unknown flag -> -EINVAL."""
    vm = backends(vcpus=4)
    for i in range(4):
        sw_enable(vm, i)
    assert vm.signal_msi(0xFEE01000, 0, 0x31) == 1
    assert lapic_view(vm, 1).irr == {0x31}
    assert vm.signal_msi(0xFEE10000, 0, 0x32) == 0
    vm.vcpu(3).mmio_write(APIC + 0x20, 0)
    assert vm.signal_msi(0xFEE10000, 0, 0x33) == -1
    assert vm.signal_msi(0xFEE01000, 0, 0x34, flags=2) == -22
    assert [lapic_view(vm, i).irr for i in range(4)] == [set(), {0x31}, set(), set()]


def test_kvm_set_lapic_with_a_wrong_x2apic_id_under_x2apic_format_fails__STATE_3(
    backends: Factory,
) -> None:
    """STATE-3: x2apic_format, x2APIC vCPU 1: SET with ID != 1 -> -EINVAL (StateError 22);
    STATE-4: the SVR of the refused image (0x1FF) has been applied all the same."""
    vm = backends(vcpus=2, x2apic_format=True)
    guest_x2apic(vm, 1)
    image = bytearray(vm.get_lapic(1))
    assert word(image, 0x20) == 1
    image[0x20:0x24] = (5).to_bytes(4, "little")
    image[0xF0:0xF4] = (0x1FF).to_bytes(4, "little")
    with pytest.raises(StateError) as error:
        vm.set_lapic(1, bytes(image))
    assert error.value.errno == 22
    assert word(vm.get_lapic(1), 0xF0) == 0x1FF
    assert word(vm.get_lapic(1), 0x20) == 1


def test_kvm_set_lapic_ignores_the_id_without_x2apic_format__STATE_3(backends: Factory) -> None:
    """STATE-3: no x2apic_format: SET with ID = i << 24 -> GET returns vcpu_id << 24."""
    vm = backends(vcpus=2)
    guest_x2apic(vm, 1)
    image = bytearray(vm.get_lapic(1))
    for i in (0, 7, 255):
        image[0x20:0x24] = (i << 24).to_bytes(4, "little")
        vm.set_lapic(1, bytes(image))
        assert word(vm.get_lapic(1), 0x20) == 1 << 24


def test_host_msr_accesses_report_what_kvm_processed(backends: Factory) -> None:
    """KVM_GET_MSRS / KVM_SET_MSRS of one MSR: an x2APIC register in xAPIC mode cannot be
    read (MsrError), a reserved APIC_BASE bit is refused (False), a legal value is set."""
    vm = backends(vcpus=1)
    assert outcome(lambda: vm.get_msr(0, 0x808)) == ("refused", 0)
    assert vm.set_msr(0, 0x1B, 0xFEE00A00) is False
    assert vm.set_msr(0, 0x1B, 0xFEE00D00) is True
    assert vm.get_msr(0, 0x802) == 0
