"""The ioctl numbers, struct layouts and machine code of the KVM backend (no /dev/kvm needed).

The literal values below were worked out by hand from ``include/uapi/linux/kvm.h``,
``arch/x86/include/uapi/asm/kvm.h`` and ``include/uapi/asm-generic/ioctl.h`` (torvalds/linux):
``_IOC(dir, 0xAE, nr, size) = dir << 30 | size << 16 | 0xAE << 8 | nr`` with dir 1 = write,
2 = read.  ``apicsim.kvm.ioctl`` computes them from its ctypes structs, so a wrong field makes
a wrong size and a wrong number.
"""

from __future__ import annotations

import ctypes

import pytest

from apicsim.kvm import ioctl as k
from apicsim.kvm.asm import Asm
from lapic import ApicValueError

IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_SIGNAL_MSI": 0x4020AEA5,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_NMI": 0xAE9A,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
}

SIZES = {
    "KvmUserspaceMemoryRegion": 32,
    "KvmRegs": 144,
    "KvmSegment": 24,
    "KvmDtable": 16,
    "KvmSregs": 312,
    "KvmMsrEntry": 16,
    "KvmMsrs": 8,
    "KvmMsrs1": 24,
    "KvmMsi": 32,
    "KvmEnableCap": 104,
    "KvmLapicState": 1024,
    "KvmCpuidEntry2": 40,
    "KvmCpuid2": 8,
    "KvmMpState": 4,
    "KvmVcpuEvents": 64,
}


@pytest.mark.parametrize(("name", "number"), IOCTLS.items())
def test_each_ioctl_number_is_the_uapi_value(name: str, number: int) -> None:
    assert getattr(k, name) == number


@pytest.mark.parametrize(("name", "size"), SIZES.items())
def test_each_struct_has_the_uapi_size(name: str, size: int) -> None:
    assert ctypes.sizeof(getattr(k, name)) == size


def test_struct_fields_sit_at_the_uapi_offsets() -> None:
    assert k.KvmRegs.rip.offset == 128 and k.KvmRegs.rflags.offset == 136
    assert k.KvmSegment.type.offset == 14 and k.KvmSegment.padding.offset == 23
    assert k.KvmSregs.gdt.offset == 192 and k.KvmSregs.idt.offset == 208
    assert k.KvmSregs.cr0.offset == 224 and k.KvmSregs.efer.offset == 264
    assert k.KvmSregs.apic_base.offset == 272 and k.KvmSregs.interrupt_bitmap.offset == 280
    assert k.KvmMsrs1.entries.offset == 8
    assert k.KvmEnableCap.args.offset == 8 and k.KvmEnableCap.pad.offset == 40
    assert k.KvmVcpuEvents.nmi_pending.offset == 13 and k.KvmVcpuEvents.sipi_vector.offset == 16


def test_kvm_run_offsets_follow_the_uapi_layout() -> None:
    # request_interrupt_window, immediate_exit, padding1[6] | exit_reason | 4 bytes | cr8 |
    # apic_base | the exit union.
    assert (k.RUN_EXIT_REASON, k.RUN_UNION) == (8, 32)
    assert (k.RUN_IO_PORT, k.RUN_IO_DATA_OFFSET) == (34, 40)
    assert (k.RUN_MMIO_LEN, k.RUN_MMIO_IS_WRITE) == (48, 52)


def test_capability_and_flag_numbers() -> None:
    assert (k.KVM_CAP_IRQCHIP, k.KVM_CAP_MAX_VCPUS, k.KVM_CAP_SIGNAL_MSI) == (0, 66, 77)
    assert (k.KVM_CAP_MAX_VCPU_ID, k.KVM_CAP_X2APIC_API) == (128, 129)
    assert (k.KVM_X2APIC_API_USE_32BIT_IDS, k.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK) == (1, 2)
    assert (k.KVM_EXIT_IO, k.KVM_EXIT_MMIO, k.KVM_EXIT_INTERNAL_ERROR) == (2, 6, 17)


# -- machine code (Intel SDM Vol. 2 opcode tables) ------------------------------------------------
@pytest.mark.parametrize(
    ("size", "load", "store"),
    [
        (1, "0fb607", "8807"),  # movzx eax, byte [rdi] / mov [rdi], al
        (2, "0fb707", "668907"),  # movzx eax, word [rdi] / mov [rdi], ax
        (4, "8b07", "8907"),  # mov eax, [rdi] / mov [rdi], eax
        (8, "488b07", "488907"),  # mov rax, [rdi] / mov [rdi], rax
    ],
)
def test_memory_accesses_have_the_operand_size_asked_for(size: int, load: str, store: str) -> None:
    assert Asm().load_rdi(size).bytes().hex() == load
    assert Asm().store_rdi(size).bytes().hex() == store


def test_the_other_instructions_encode_as_the_sdm_says() -> None:
    assert Asm().rdmsr().wrmsr().vmcall().bytes().hex() == "0f320f300f01c1"
    assert Asm().mov_al_imm8(0x0D).out_al(0xE1).jmp_self().bytes().hex() == "b00de6e1ebfe"
    assert Asm().inc_gs_qword(0).iretq().bytes().hex() == "6548ff04250000000048cf"


def test_asm_rejects_sizes_and_ports_it_cannot_encode() -> None:
    with pytest.raises(ApicValueError):
        Asm().load_rdi(3)
    with pytest.raises(ApicValueError):
        Asm().out_al(0x100)


def test_kvm_available_says_why_not_when_the_device_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from apicsim.kvm import vm as kvm_vm

    monkeypatch.setattr(kvm_vm, "KVM_DEVICE", "/dev/no-such-kvm")
    ok, why = kvm_vm.kvm_available.__wrapped__()
    assert not ok and why == "/dev/no-such-kvm does not exist"
