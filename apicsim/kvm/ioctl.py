"""KVM ioctl numbers, capability numbers and the ctypes image of every struct used.

Every number below was written from the kernel's uapi headers (``include/uapi/linux/kvm.h``
and ``arch/x86/include/uapi/asm/kvm.h``, torvalds/linux) and is checked against the literal
value in ``tests/kvm/test_ioctl.py``; the struct sizes are checked there too.  The encoding is
``asm-generic/ioctl.h``: ``dir << 30 | size << 16 | type << 8 | nr`` with ``type`` = KVMIO.

Calls go through libc's ``ioctl`` (via ctypes) rather than ``fcntl.ioctl`` so that the raw
return value reaches the caller (KVM_SIGNAL_MSI returns a count) and an EINTR is never retried
(a guest run that overstays its budget comes back with EINTR).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# -- asm-generic/ioctl.h ----------------------------------------------------------------------
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def io(nr: int) -> int:
    """``_IO(KVMIO, nr)``."""
    return _ioc(_IOC_NONE, nr, 0)


def ior(nr: int, size: int) -> int:
    """``_IOR(KVMIO, nr, type)`` for a type of ``size`` bytes."""
    return _ioc(_IOC_READ, nr, size)


def iow(nr: int, size: int) -> int:
    """``_IOW(KVMIO, nr, type)``."""
    return _ioc(_IOC_WRITE, nr, size)


def iowr(nr: int, size: int) -> int:
    """``_IOWR(KVMIO, nr, type)``."""
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# -- structs (arch/x86/include/uapi/asm/kvm.h, include/uapi/linux/kvm.h) ------------------------
u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = (
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    )


class KvmRegs(ctypes.Structure):
    _fields_ = tuple(
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    )  # fmt: skip


class KvmSegment(ctypes.Structure):
    _fields_ = (
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    )


class KvmDtable(ctypes.Structure):
    _fields_ = (("base", u64), ("limit", u16), ("padding", u16 * 3))


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    _fields_ = (
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class KvmMsrEntry(ctypes.Structure):
    _fields_ = (("index", u32), ("reserved", u32), ("data", u64))


class KvmMsrs(ctypes.Structure):
    """``struct kvm_msrs`` header (8 bytes); the entries follow it (see :class:`KvmMsrs1`)."""

    _fields_ = (("nmsrs", u32), ("pad", u32))


class KvmMsrs1(ctypes.Structure):
    """``struct kvm_msrs`` with exactly one entry."""

    _fields_ = (("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * 1))


class KvmMsi(ctypes.Structure):
    _fields_ = (
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    )


class KvmEnableCap(ctypes.Structure):
    _fields_ = (("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64))


KVM_APIC_REG_SIZE = 0x400


class KvmLapicState(ctypes.Structure):
    _fields_ = (("regs", ctypes.c_char * KVM_APIC_REG_SIZE),)


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = (
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    )


class KvmCpuid2(ctypes.Structure):
    """``struct kvm_cpuid2`` header (8 bytes); the ioctl number encodes this size only."""

    _fields_ = (("nent", u32), ("padding", u32))


CPUID_MAX_ENTRIES = 256


class KvmCpuid2Buffer(ctypes.Structure):
    """``struct kvm_cpuid2`` followed by room for :data:`CPUID_MAX_ENTRIES` entries."""

    _fields_ = (
        ("nent", u32),
        ("padding", u32),
        ("entries", KvmCpuidEntry2 * CPUID_MAX_ENTRIES),
    )


class KvmMpState(ctypes.Structure):
    _fields_ = (("mp_state", u32),)


class KvmVcpuEvents(ctypes.Structure):
    """``struct kvm_vcpu_events`` (64 bytes); only the NMI fields are named."""

    _fields_ = (
        ("exception", u8 * 8),
        ("interrupt", u8 * 4),
        ("nmi_injected", u8),
        ("nmi_pending", u8),
        ("nmi_masked", u8),
        ("nmi_pad", u8),
        ("sipi_vector", u32),
        ("flags", u32),
        ("rest", u8 * 40),
    )


# -- struct kvm_run: the fields read here, by offset -----------------------------------------
RUN_EXIT_REASON = 8  # __u32, after request_interrupt_window, immediate_exit, padding1[6]
RUN_UNION = 32  # after exit_reason, ready_for_interrupt_injection, if_flag, flags, cr8, apic_base
RUN_IO_DIRECTION = RUN_UNION + 0  # __u8
RUN_IO_SIZE = RUN_UNION + 1  # __u8
RUN_IO_PORT = RUN_UNION + 2  # __u16
RUN_IO_COUNT = RUN_UNION + 4  # __u32
RUN_IO_DATA_OFFSET = RUN_UNION + 8  # __u64, from the start of kvm_run
RUN_MMIO_PHYS_ADDR = RUN_UNION + 0  # __u64
RUN_MMIO_LEN = RUN_UNION + 16  # __u32, after data[8]
RUN_MMIO_IS_WRITE = RUN_UNION + 20  # __u8
RUN_INTERNAL_SUBERROR = RUN_UNION + 0  # __u32
RUN_INTERNAL_NDATA = RUN_UNION + 4  # __u32
RUN_INTERNAL_DATA = RUN_UNION + 8  # __u64[16]
RUN_FAIL_ENTRY_REASON = RUN_UNION + 0  # __u64

# -- exit reasons (include/uapi/linux/kvm.h) ---------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
EXIT_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL",
    KVM_EXIT_DEBUG: "DEBUG",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
}

# -- capabilities (include/uapi/linux/kvm.h) ---------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129

# KVM_CAP_X2APIC_API flags (arch/x86/include/uapi/asm/kvm.h)
KVM_X2APIC_API_USE_32BIT_IDS = 1 << 0
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK = 1 << 1

KVM_API_VERSION = 12

# -- ioctls on /dev/kvm ------------------------------------------------------------------------
KVM_GET_API_VERSION = io(0x00)
KVM_CREATE_VM = io(0x01)
KVM_CHECK_EXTENSION = io(0x03)
KVM_GET_VCPU_MMAP_SIZE = io(0x04)
KVM_GET_SUPPORTED_CPUID = iowr(0x05, ctypes.sizeof(KvmCpuid2))
# -- ioctls on a VM fd -------------------------------------------------------------------------
KVM_CREATE_VCPU = io(0x41)
KVM_SET_USER_MEMORY_REGION = iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_CREATE_IRQCHIP = io(0x60)
KVM_ENABLE_CAP = iow(0xA3, ctypes.sizeof(KvmEnableCap))
KVM_SIGNAL_MSI = iow(0xA5, ctypes.sizeof(KvmMsi))
# -- ioctls on a vCPU fd -----------------------------------------------------------------------
KVM_RUN = io(0x80)
KVM_GET_REGS = ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = iow(0x84, ctypes.sizeof(KvmSregs))
KVM_GET_MSRS = iowr(0x88, ctypes.sizeof(KvmMsrs))
KVM_SET_MSRS = iow(0x89, ctypes.sizeof(KvmMsrs))
KVM_GET_LAPIC = ior(0x8E, ctypes.sizeof(KvmLapicState))
KVM_SET_LAPIC = iow(0x8F, ctypes.sizeof(KvmLapicState))
KVM_SET_CPUID2 = iow(0x90, ctypes.sizeof(KvmCpuid2))
KVM_GET_MP_STATE = ior(0x98, ctypes.sizeof(KvmMpState))
KVM_SET_MP_STATE = iow(0x99, ctypes.sizeof(KvmMpState))
KVM_NMI = io(0x9A)
KVM_GET_VCPU_EVENTS = ior(0x9F, ctypes.sizeof(KvmVcpuEvents))


# -- the call ------------------------------------------------------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int


def raw_ioctl(fd: int, request: int, arg: ctypes.Structure | int = 0) -> tuple[int, int]:
    """``ioctl(fd, request, arg)``: ``(return value, errno)``; errno is 0 on success.

    ``arg`` is a ctypes structure (passed by address) or an integer (passed by value).
    """
    ptr = ctypes.addressof(arg) if isinstance(arg, ctypes.Structure) else arg
    ctypes.set_errno(0)
    r = int(_ioctl(fd, request, ptr))
    return r, (ctypes.get_errno() if r == -1 else 0)


def ioctl(fd: int, request: int, arg: ctypes.Structure | int = 0, what: str = "") -> int:
    """``ioctl`` that raises :class:`OSError` (with errno) when the call fails."""
    r, err = raw_ioctl(fd, request, arg)
    if r == -1:
        raise OSError(err, f"{what or hex(request)}: {os.strerror(err)}")
    return r
