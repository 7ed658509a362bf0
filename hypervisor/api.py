"""The host API of a VM, declared once: KVM's per-VM and per-vCPU ioctls as Python calls.

``hypervisor.Vm`` (the model) and ``apicsim.kvm.KvmVm`` (the host's real KVM) both satisfy
:class:`HostApi`, so one test body runs on either.  The calls and the ioctls they stand for:

===========================  ===============================================================
``get_lapic(i)``             KVM_GET_LAPIC: the 1 KiB ``kvm_lapic_state``
``set_lapic(i, data)``       KVM_SET_LAPIC; -EINVAL raises ``lapic.StateError`` (errno 22)
``get_msr(i, msr)``          KVM_GET_MSRS for one MSR, host-initiated; failure raises
                             :class:`MsrError` (KVM reports 0 MSRs processed)
``set_msr(i, msr, value)``   KVM_SET_MSRS for one MSR, host-initiated: True if set
``signal_msi(lo, hi, data)`` KVM_SIGNAL_MSI: the kernel's return value (n >= 0 accepted,
                             -1 when no APIC matched, -errno otherwise)
``add_vcpu(vcpu_id)``        KVM_CREATE_VCPU (hotplug)
===========================  ===============================================================

The argument checks of these calls are written here once (``check_*``) and called by both
implementations before any side effect: types exactly (no bool or float for an int, no other
object for bytes), then ranges, each error a ``lapic.faults.ApicTypeError`` /
``ApicValueError`` whose message names the argument.  What only one backend can know (the
number of vCPUs, KVM_CAP_MAX_VCPU_ID of the host) is passed in as a bound.

Not here: the VM's configuration (``hypervisor.config``), guest-executed accesses beyond the
six :class:`VcpuApi` declares, and anything a backend offers on top (the model's ``deliver``,
``advance``, the real KVM's ``lapic_view``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lapic.faults import ApicTypeError, ApicValueError, check_int

KVM_APIC_REG_SIZE = 0x400
"""Size of ``struct kvm_lapic_state`` (KVM_GET_LAPIC/KVM_SET_LAPIC)."""
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


class MsrError(ApicValueError):
    """KVM_GET_MSRS/KVM_SET_MSRS could not access the MSR (the ioctl reports 0 processed)."""


# ===========================================================================================
# Shared argument checks
# ===========================================================================================
def check_index(i: object, count: int) -> int:
    """``i`` names an existing vCPU by index (creation order): an int in ``[0, count)``."""
    return check_int("i", i, 0, count - 1)


def check_state_data(data: object) -> bytes:
    """``data`` of KVM_SET_LAPIC: bytes-like, exactly ``KVM_APIC_REG_SIZE`` long."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ApicTypeError(f"data must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) != KVM_APIC_REG_SIZE:
        raise ApicValueError(f"data must be {KVM_APIC_REG_SIZE} bytes, got {len(raw)}")
    return raw


def check_msr(msr: object) -> int:
    """An MSR index (ECX of RDMSR/WRMSR): a 32-bit int."""
    return check_int("msr", msr, 0, U32)


def check_msr_value(value: object) -> int:
    """An MSR value (EDX:EAX): a 64-bit int."""
    return check_int("value", value, 0, U64)


def check_msi(address_lo: object, address_hi: object, data: object, flags: object) -> None:
    """The four 32-bit words of ``struct kvm_msi`` (the route's validity is KVM's answer)."""
    if (
        type(address_lo) is int
        and type(address_hi) is int
        and type(data) is int
        and type(flags) is int
        and 0 <= address_lo <= U32
        and 0 <= address_hi <= U32
        and 0 <= data <= U32
        and 0 <= flags <= U32
    ):
        return  # the common case, on the MSI hot path: one test, no calls
    check_int("address_lo", address_lo, 0, U32)
    check_int("address_hi", address_hi, 0, U32)
    check_int("data", data, 0, U32)
    check_int("flags", flags, 0, U32)


def check_vcpu_id(vcpu_id: object, limit: int, existing: Sequence[int]) -> int:
    """A new vCPU id (KVM_CREATE_VCPU): an int below ``limit`` (KVM_CAP_MAX_VCPU_ID) that no
    vCPU of the VM has yet."""
    check_int("vcpu_id", vcpu_id, 0, limit - 1)
    assert isinstance(vcpu_id, int)
    if vcpu_id in existing:
        raise ApicValueError(f"vcpu_id={vcpu_id} already exists")
    return vcpu_id


# ===========================================================================================
# The Protocols
# ===========================================================================================
class StateReader(Protocol):
    """Enough to look at one APIC from the host: its state image and its MSRs."""

    def get_lapic(self, i: int) -> bytes: ...

    def get_msr(self, i: int, msr: int) -> int: ...


class VcpuApi(Protocol):
    """What a test body may have a vCPU execute (``hypervisor.Vcpu`` and ``KvmVcpu``)."""

    def mmio_read(self, gpa: int, size: int = 4) -> int: ...

    def mmio_write(self, gpa: int, value: int, size: int = 4) -> None: ...

    def rdmsr(self, msr: int) -> int: ...

    def wrmsr(self, msr: int, value: int) -> None: ...

    def mov_to_cr8(self, value: int) -> None:
        """``mov %rax, %cr8`` (CR8-1)."""
        ...

    def mov_from_cr8(self) -> int:
        """``mov %cr8, %rax`` (CR8-1)."""
        ...

    @property
    def nmi_pending(self) -> int:
        """NMIs accepted and not yet injected."""
        ...


class HostApi(StateReader, Protocol):
    """The host API shared by ``hypervisor.Vm`` and ``apicsim.kvm.KvmVm``."""

    def __len__(self) -> int: ...

    def vcpu(self, i: int) -> VcpuApi: ...

    def add_vcpu(self, vcpu_id: int) -> object:
        """KVM_CREATE_VCPU (hotplug)."""
        ...

    def set_lapic(self, i: int, data: bytes) -> None: ...

    def set_msr(self, i: int, msr: int, value: int) -> bool: ...

    def get_cr8(self, i: int) -> int:
        """The CR8 of KVM_GET_SREGS (TPR bits 7:4)."""
        ...

    def set_cr8(self, i: int, cr8: int) -> None:
        """KVM_SET_SREGS of the vCPU's own state with CR8 replaced (KVMB-10)."""
        ...

    def signal_msi(
        self, address_lo: int, address_hi: int = 0, data: int = 0, flags: int = 0
    ) -> int: ...
