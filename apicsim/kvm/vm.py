"""``KvmVm`` / ``KvmVcpu``: the host's real KVM behind the interface of ``hypervisor.Vm``.

Host side (ioctls on the VM and vCPU file descriptors):

===========================  ===============================================================
``get_lapic(i)``             KVM_GET_LAPIC: the 1 KiB ``kvm_lapic_state``
``set_lapic(i, data)``       KVM_SET_LAPIC; a failure raises ``lapic.StateError(errno)``
``get_msr(i, msr)``          KVM_GET_MSRS for one MSR; 0 processed raises ``MsrError``
``set_msr(i, msr, value)``   KVM_SET_MSRS for one MSR: True if the kernel processed it
``signal_msi(lo, hi, data)`` KVM_SIGNAL_MSI: the kernel's value (n >= 0, or -errno)
``lapic_view(i)``            IRR/ISR/TMR, APIC_BASE and registers from the state image
===========================  ===============================================================

Guest side (``vm.vcpu(i)``): ``mmio_read``/``mmio_write``/``rdmsr``/``wrmsr``/``mov_to_cr8``/
``mov_from_cr8`` are executed by
the guest, one instruction in a stub of ``apicsim.kvm.guest``, in 64-bit mode with RFLAGS.IF=0.
An exception in the guest raises ``lapic.GuestFault(vector, reason)``; an NMI is counted by
the guest's NMI handler (``nmi_count``).  Every KVM_RUN is bounded by ``timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from types import FrameType, TracebackType
from typing import Any

from apicsim.kvm import guest
from apicsim.kvm import ioctl as k
from apicsim.kvm.view import LapicView
from hypervisor.api import (
    MsrError,
    check_index,
    check_msi,
    check_msr,
    check_msr_value,
    check_state_data,
    check_vcpu_id,
)
from lapic.apic import Features, StateError
from lapic.faults import ApicValueError, GuestFault, check_bool, check_int
from lapic.registers import APIC_BASE_ADDR_MASK, APIC_BASE_MSR

KVM_DEVICE = "/dev/kvm"
DEFAULT_TIMEOUT = 2.0
"""Seconds one guest access may take before it is abandoned (``TimeoutError``)."""
HYPERCALL_PROBE_TIMEOUT = 0.25
"""Seconds the first VMCALL of a VM may take before hypercalls are declared unavailable."""
DEFAULT_CAPACITY = 1024
"""vCPU pages reserved in guest RAM (4 KiB each): how many vCPUs a VM can ever have."""
EINTR = 4
KVM_MP_STATE_RUNNABLE = 0
MP_STATE_NAMES = {
    0: "RUNNABLE",
    1: "UNINITIALIZED",
    2: "INIT_RECEIVED",
    3: "HALTED",
    4: "SIPI_RECEIVED",
}

_CPUID_X2APIC = 1 << 21  # CPUID.01H:ECX
_CPUID_TSC_DEADLINE = 1 << 24  # CPUID.01H:ECX


class KvmError(RuntimeError):
    """KVM did something the backend cannot map to the model (an unexpected exit or errno)."""


@dataclass(frozen=True, slots=True)
class HostLimits:
    """What this host's KVM allows (KVM_CHECK_EXTENSION)."""

    max_vcpus: int
    """KVM_CAP_MAX_VCPUS (or KVM_CAP_NR_VCPUS when absent)."""
    max_vcpu_id: int
    """KVM_CAP_MAX_VCPU_ID: vCPU ids are below this."""
    x2apic_api: bool
    """KVM_CAP_X2APIC_API is offered."""
    signal_msi: bool
    """KVM_CAP_SIGNAL_MSI is offered."""


def _open_kvm() -> int:
    return os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)


def host_limits(kvm_fd: int) -> HostLimits:
    def cap(n: int) -> int:
        r, _ = k.raw_ioctl(kvm_fd, k.KVM_CHECK_EXTENSION, n)
        return max(r, 0)

    max_vcpus = cap(k.KVM_CAP_MAX_VCPUS) or cap(k.KVM_CAP_NR_VCPUS) or 4
    return HostLimits(
        max_vcpus=max_vcpus,
        max_vcpu_id=cap(k.KVM_CAP_MAX_VCPU_ID) or max_vcpus,
        x2apic_api=cap(k.KVM_CAP_X2APIC_API) != 0,
        signal_msi=cap(k.KVM_CAP_SIGNAL_MSI) != 0,
    )


@cache
def kvm_available() -> tuple[bool, str]:
    """``(True, description)`` if a KvmVm can be made here, else ``(False, why not)``."""
    if not os.path.exists(KVM_DEVICE):
        return False, f"{KVM_DEVICE} does not exist"
    try:
        fd = _open_kvm()
    except OSError as e:
        return False, f"cannot open {KVM_DEVICE}: {e.strerror}"
    try:
        version, err = k.raw_ioctl(fd, k.KVM_GET_API_VERSION)
        if version != k.KVM_API_VERSION:
            return False, f"KVM_GET_API_VERSION is {version} (errno {err}), not 12"
        limits = host_limits(fd)
        missing = [
            name
            for name, cap in (
                ("KVM_CAP_IRQCHIP", k.KVM_CAP_IRQCHIP),
                ("KVM_CAP_USER_MEMORY", k.KVM_CAP_USER_MEMORY),
                ("KVM_CAP_SIGNAL_MSI", k.KVM_CAP_SIGNAL_MSI),
                ("KVM_CAP_X2APIC_API", k.KVM_CAP_X2APIC_API),
            )
            if k.raw_ioctl(fd, k.KVM_CHECK_EXTENSION, cap)[0] <= 0
        ]
        if missing:
            return False, "KVM lacks " + ", ".join(missing)
        vm_fd, err = k.raw_ioctl(fd, k.KVM_CREATE_VM, 0)
        if vm_fd < 0:
            return False, f"KVM_CREATE_VM failed: {os.strerror(err)}"
        try:
            r, err = k.raw_ioctl(vm_fd, k.KVM_CREATE_IRQCHIP)
            if r < 0:
                return False, f"KVM_CREATE_IRQCHIP failed: {os.strerror(err)}"
        finally:
            os.close(vm_fd)
        return True, f"KVM API 12, max {limits.max_vcpus} vCPUs, vCPU ids < {limits.max_vcpu_id}"
    finally:
        os.close(fd)


# ===========================================================================================
# Bounded KVM_RUN
# ===========================================================================================
class _Alarm:
    """A SIGALRM interval timer around one KVM_RUN: the ioctl returns EINTR when it fires.

    Python's handler is installed without SA_RESTART, and the ioctl is called through ctypes
    (no retry on EINTR).  Signals can only be handled in the main thread: elsewhere no timer
    is armed and a run is unbounded."""

    fired = False

    @staticmethod
    def _handler(signum: int, frame: FrameType | None) -> None:
        _Alarm.fired = True

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread() and seconds > 0
        self._old_handler: Callable[[int, FrameType | None], Any] | int | None = None
        self._old_timer = (0.0, 0.0)

    def __enter__(self) -> _Alarm:
        _Alarm.fired = False
        if self.armed:
            self._old_handler = signal.signal(signal.SIGALRM, _Alarm._handler)
            self._old_timer = signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, *self._old_timer)
            old = self._old_handler
            signal.signal(signal.SIGALRM, signal.SIG_DFL if old is None else old)


# ===========================================================================================
# vCPU
# ===========================================================================================
class KvmVcpu:
    """One KVM vCPU: what the guest executes on it (``mmio_*``, ``rdmsr``, ``wrmsr``)."""

    def __init__(self, vm: KvmVm, index: int, vcpu_id: int, fd: int, run: mmap.mmap) -> None:
        self.vm = vm
        self.index = index
        self.vcpu_id = vcpu_id
        self.fd = fd
        self._run = run
        self.page = guest.vcpu_page(index)
        self.exits = 0
        """KVM_RUN returns seen by this vCPU (each guest access needs at least one)."""
        self.user_mmio_exits = 0
        """MMIO accesses KVM handed to userspace (nobody claimed them); reads got all-ones."""

    # -- guest-executed accesses ---------------------------------------------------------------
    def mmio_read(self, gpa: int, size: int = 4) -> int:
        check_int("gpa", gpa, 0, (1 << 52) - 1)
        stub = self.vm.stubs.load.get(size)
        if stub is None:
            raise ApicValueError(f"size={size!r} must be 1, 2, 4 or 8")
        self._check_apic_page(gpa)
        regs = self.execute(stub, f"read{size * 8} [{gpa:#x}]", rdi=self.vm.linear(gpa))
        return int(regs.rax) & ((1 << (8 * size)) - 1)

    def mmio_write(self, gpa: int, value: int, size: int = 4) -> None:
        check_int("gpa", gpa, 0, (1 << 52) - 1)
        stub = self.vm.stubs.store.get(size)
        if stub is None:
            raise ApicValueError(f"size={size!r} must be 1, 2, 4 or 8")
        check_int("value", value, 0, (1 << (8 * size)) - 1)
        self._check_apic_page(gpa)
        self.execute(
            stub, f"write{size * 8} [{gpa:#x}] <- {value:#x}", rdi=self.vm.linear(gpa), rax=value
        )

    def rdmsr(self, msr: int) -> int:
        check_int("msr", msr, 0, 0xFFFFFFFF)
        regs = self.execute(self.vm.stubs.rdmsr, f"RDMSR {msr:#x}", rcx=msr)
        return (int(regs.rdx) & 0xFFFFFFFF) << 32 | (int(regs.rax) & 0xFFFFFFFF)

    def wrmsr(self, msr: int, value: int) -> None:
        check_int("msr", msr, 0, 0xFFFFFFFF)
        check_int("value", value, 0, (1 << 64) - 1)
        self.execute(
            self.vm.stubs.wrmsr,
            f"WRMSR {msr:#x} <- {value:#x}",
            rcx=msr,
            rax=value & 0xFFFFFFFF,
            rdx=value >> 32,
        )

    def mov_to_cr8(self, value: int) -> None:
        """The guest's ``mov %rax, %cr8`` (a reserved bit: ``GuestFault`` 13)."""
        check_int("value", value, 0, (1 << 64) - 1)
        self.execute(self.vm.stubs.mov_to_cr8, f"MOV CR8 <- {value:#x}", rax=value)

    def mov_from_cr8(self) -> int:
        """The guest's ``mov %cr8, %rax``."""
        return int(self.execute(self.vm.stubs.mov_from_cr8, "MOV <- CR8").rax)

    def hypercall(
        self,
        nr: int,
        a0: int = 0,
        a1: int = 0,
        a2: int = 0,
        a3: int = 0,
        *,
        long_mode: bool = True,
        cpl: int = 0,
    ) -> int:
        """VMCALL with RAX=nr, RBX=a0, RCX=a1, RDX=a2, RSI=a3; returns RAX afterwards.

        Raises ``NotImplementedError`` where the guest's VMCALL cannot reach KVM: it faults
        with #UD, or it never completes (this host's PVM backend re-enters the guest at the
        VMCALL until a signal).  The first VMCALL of a VM is given ``HYPERCALL_PROBE_TIMEOUT``
        seconds; after a failure every call raises at once (``vm.hypercall_unavailable``).
        """
        for name, v in (("nr", nr), ("a0", a0), ("a1", a1), ("a2", a2), ("a3", a3)):
            check_int(name, v, 0, (1 << 64) - 1)
        if not long_mode or cpl != 0:
            raise NotImplementedError("the KVM backend's guest runs in 64-bit mode at CPL 0 only")
        vm = self.vm
        if vm.hypercall_unavailable is not None:
            raise NotImplementedError(vm.hypercall_unavailable)
        what = f"VMCALL {nr}"
        try:
            regs = self.execute(
                vm.stubs.vmcall, what, rax=nr, rbx=a0, rcx=a1, rdx=a2, rsi=a3,
                timeout=min(vm.timeout, HYPERCALL_PROBE_TIMEOUT),
            )  # fmt: skip
        except GuestFault as fault:
            if fault.vector != 6:
                raise
            vm.hypercall_unavailable = (
                f"the guest's VMCALL raises #UD on this host, so no hypercall reaches KVM "
                f"({fault.reason})"
            )
            raise NotImplementedError(vm.hypercall_unavailable) from None
        except TimeoutError:
            vm.hypercall_unavailable = (
                "the guest's VMCALL never completes on this host: KVM_RUN keeps re-entering the "
                "guest at the VMCALL (RIP does not move) until a signal interrupts it, so no "
                "hypercall reaches KVM"
            )
            raise NotImplementedError(vm.hypercall_unavailable) from None
        return int(regs.rax)

    @property
    def nmi_pending(self) -> int:
        """NMIs KVM holds for this vCPU, not yet handled by the guest (KVM_GET_VCPU_EVENTS:
        ``nmi.pending`` plus ``nmi.injected``)."""
        ev = k.KvmVcpuEvents()
        k.ioctl(self.fd, k.KVM_GET_VCPU_EVENTS, ev, "KVM_GET_VCPU_EVENTS")
        return int(ev.nmi_pending) + int(ev.nmi_injected)

    @property
    def nmi_count(self) -> int:
        """NMIs the guest has handled on this vCPU (its NMI handler counts them)."""
        return int(struct.unpack_from("<Q", self.vm.memory, self.page)[0])

    # -- running the guest --------------------------------------------------------------------
    @property
    def run_page(self) -> mmap.mmap:
        """The vCPU's shared ``struct kvm_run`` (``exit_reason`` at ``ioctl.RUN_EXIT_REASON``),
        for a caller that issues KVM_RUN itself (``bench/bench_kernel.py``)."""
        return self._run

    def _check_apic_page(self, gpa: int) -> None:
        # KVM's MMIO window is APIC_BASE & MSR_IA32_APICBASE_BASE: the whole address (KVMB-7).
        base = self.vm.get_msr(self.index, APIC_BASE_MSR) & APIC_BASE_ADDR_MASK
        if not base <= gpa < base + 0x1000:
            raise ApicValueError(
                f"gpa={gpa:#x} is outside the APIC page at {base:#x}; no other device is modelled"
            )
        if gpa < self.vm.ram_size:
            raise ApicValueError(
                f"gpa={gpa:#x} is in the KVM backend's guest RAM (below {self.vm.ram_size:#x}): "
                "a memory slot there shadows the APIC window, so the access would not reach it"
            )

    def execute(
        self, entry: int, what: str, *, timeout: float | None = None, **operands: int
    ) -> k.KvmRegs:
        """Run guest code at ``entry`` with ``operands`` (``rax=``, ``rcx=``, ...) in registers,
        RSP at the top of this vCPU's page and RFLAGS = 0x2, until it reports on
        ``guest.DONE_PORT`` (returns the registers then) or an exception handler reports on
        ``guest.FAULT_PORT`` (raises ``GuestFault``).  ``what`` names the access in messages;
        ``timeout`` (default ``vm.timeout``) bounds each KVM_RUN (``TimeoutError``)."""
        self._ready()
        regs = k.KvmRegs()
        for name, value in operands.items():
            setattr(regs, name, value)
        regs.rip = entry
        regs.rsp = self.page + guest.PAGE
        regs.rflags = guest.RFLAGS_FIXED
        k.ioctl(self.fd, k.KVM_SET_REGS, regs, "KVM_SET_REGS")
        while True:
            reason = self._enter(what, self.vm.timeout if timeout is None else timeout)
            if reason == k.KVM_EXIT_IO:
                port = self._u16(k.RUN_IO_PORT)
                data_at = self._u64(k.RUN_IO_DATA_OFFSET)
                if port == guest.DONE_PORT:
                    out = k.KvmRegs()
                    k.ioctl(self.fd, k.KVM_GET_REGS, out, "KVM_GET_REGS")
                    return out
                if port == guest.FAULT_PORT:
                    raise self._fault(self._run[data_at], what)
                raise KvmError(f"{what}: unexpected port I/O to {port:#x}")
            if reason == k.KVM_EXIT_MMIO:
                self._user_mmio()
                continue
            if reason == k.KVM_EXIT_INTR:
                continue
            raise KvmError(f"{what}: {self._describe_exit(reason)}")

    def _ready(self) -> None:
        """Refuse to run a vCPU that would not execute, and return one that INIT (+SIPI) put
        back in real mode to the backend's 64-bit set-up.

        KVM_GET_MP_STATE first runs ``kvm_apic_accept_events``: a pending INIT resets the vCPU
        (an AP then waits for SIPI), a pending SIPI makes it runnable again.
        """
        mp = k.KvmMpState()
        k.ioctl(self.fd, k.KVM_GET_MP_STATE, mp, "KVM_GET_MP_STATE")
        state = int(mp.mp_state)
        if state != KVM_MP_STATE_RUNNABLE:
            name = MP_STATE_NAMES.get(state, str(state))
            raise ApicValueError(
                f"vcpu {self.index} is {name}: it executes nothing until INIT/SIPI start it"
            )
        sregs = k.KvmSregs()
        k.ioctl(self.fd, k.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        if not sregs.cr0 & guest.CR0_PE:
            self.vm.set_long_mode(self, sregs)

    def _enter(self, what: str, timeout: float) -> int:
        with _Alarm(timeout) as alarm:
            r, err = k.raw_ioctl(self.fd, k.KVM_RUN)
        self.exits += 1
        if r < 0:
            if err != EINTR:
                raise KvmError(f"{what}: KVM_RUN failed: {os.strerror(err)}")
            if alarm.fired:
                raise TimeoutError(f"{what}: the guest did not finish within {timeout} s")
            return k.KVM_EXIT_INTR  # another signal: the caller runs the vCPU again
        return self._u32(k.RUN_EXIT_REASON)

    def _user_mmio(self) -> None:
        """Complete an MMIO access nobody in the kernel claimed: reads see all-ones."""
        self.user_mmio_exits += 1
        if not self._run[k.RUN_MMIO_IS_WRITE]:
            length = self._u32(k.RUN_MMIO_LEN)
            start = k.RUN_MMIO_PHYS_ADDR + 8
            self._run[start : start + length] = b"\xff" * length

    def _fault(self, vector: int, what: str) -> GuestFault:
        regs = k.KvmRegs()
        k.ioctl(self.fd, k.KVM_GET_REGS, regs, "KVM_GET_REGS")
        rsp = int(regs.rsp)
        mem = self.vm.memory
        frame = rsp
        detail = ""
        if vector in guest.ERROR_CODE_VECTORS:
            (code,) = struct.unpack_from("<Q", mem, frame)
            detail = f" error code {code:#x}"
            frame += 8
        (rip,) = struct.unpack_from("<Q", mem, frame)
        return GuestFault(vector, f"{what}: exception {vector}{detail} at RIP {rip:#x} (KVM)")

    def _describe_exit(self, reason: int) -> str:
        name = k.EXIT_NAMES.get(reason, str(reason))
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            sub = self._u32(k.RUN_INTERNAL_SUBERROR)
            n = min(self._u32(k.RUN_INTERNAL_NDATA), 16)
            data = [self._u64(k.RUN_INTERNAL_DATA + 8 * j) for j in range(n)]
            return f"exit INTERNAL_ERROR suberror {sub} data {[hex(d) for d in data]}"
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            return f"exit FAIL_ENTRY reason {self._u64(k.RUN_FAIL_ENTRY_REASON):#x}"
        return f"unexpected exit {name}"

    def _u16(self, offset: int) -> int:
        return int(struct.unpack_from("<H", self._run, offset)[0])

    def _u32(self, offset: int) -> int:
        return int(struct.unpack_from("<I", self._run, offset)[0])

    def _u64(self, offset: int) -> int:
        return int(struct.unpack_from("<Q", self._run, offset)[0])

    def close(self) -> None:
        if self.fd >= 0:
            self._run.close()
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<KvmVcpu index={self.index} id={self.vcpu_id} exits={self.exits}>"


# ===========================================================================================
# VM
# ===========================================================================================
class KvmVm:
    """A real KVM VM with an in-kernel irqchip; the same host API as ``hypervisor.Vm``."""

    def __init__(
        self,
        vcpus: int = 1,
        *,
        x2apic_format: bool = False,
        broadcast_quirk: bool = True,
        vcpu_ids: Sequence[int] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        check_bool("x2apic_format", x2apic_format)
        check_bool("broadcast_quirk", broadcast_quirk)
        self.x2apic_format = x2apic_format
        self.broadcast_quirk = broadcast_quirk
        self.timeout = float(timeout)
        self.ram_size = 0
        self.vector_hashing = host_vector_hashing()
        """KVM's ``vector_hashing`` module parameter on this host (None if unreadable)."""
        self.hypercall_unavailable: str | None = None
        """Why ``KvmVcpu.hypercall`` cannot work here, once the first VMCALL has shown it."""
        self._vcpus: list[KvmVcpu] = []
        self._high_aliases: dict[int, int] = {}
        """2 MiB physical region above 4 GiB -> the linear address of its alias (guest.py)."""
        self._kvm = -1
        self.fd = -1
        self._memory: mmap.mmap | None = None
        try:
            self._kvm = _open_kvm()
            version = k.ioctl(self._kvm, k.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if version != k.KVM_API_VERSION:
                raise KvmError(f"KVM API version {version}, expected {k.KVM_API_VERSION}")
            self.limits = host_limits(self._kvm)
            if vcpu_ids is None:
                check_int("vcpus", vcpus, 1, 1 << 32)
                vcpu_ids = range(vcpus)
            ids = list(vcpu_ids)
            if len(ids) > self.limits.max_vcpus:
                raise ApicValueError(
                    f"{len(ids)} vCPUs requested; KVM on this host allows at most "
                    f"{self.limits.max_vcpus} per VM (KVM_CAP_MAX_VCPUS)"
                )
            self.capacity = check_int("capacity", capacity, 1, 1 << 16)
            self.capacity = max(self.capacity, len(ids))
            self._mmap_size = k.ioctl(
                self._kvm, k.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"
            )
            self._cpuid = self._supported_cpuid()
            self.features = _features_of(
                self._cpuid, k.raw_ioctl(self._kvm, k.KVM_CHECK_EXTENSION, KVM_CAP_X86_SMM)[0] > 0
            )
            self.fd = k.ioctl(self._kvm, k.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            k.ioctl(self.fd, k.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
            flags = k.KVM_X2APIC_API_USE_32BIT_IDS if x2apic_format else 0
            if not broadcast_quirk:
                flags |= k.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK
            self.x2apic_api_flags = flags
            if self.limits.x2apic_api:
                cap = k.KvmEnableCap(cap=k.KVM_CAP_X2APIC_API)
                cap.args[0] = self.x2apic_api_flags
                k.ioctl(self.fd, k.KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)")
            elif self.x2apic_api_flags:
                raise KvmError("KVM_CAP_X2APIC_API is not offered by this host")
            size = guest.memory_size(self.capacity)
            self.ram_size = size
            self._memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.stubs = guest.build(memoryview(self.memory))
            addr = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
            region = k.KvmUserspaceMemoryRegion(
                slot=0, flags=0, guest_phys_addr=0, memory_size=size, userspace_addr=addr
            )
            k.ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
            for vid in ids:
                self.add_vcpu(vid)
            if not self._vcpus:
                raise ApicValueError("vcpu_ids must name at least one vCPU")
        except BaseException:
            self.close()
            raise

    @property
    def memory(self) -> mmap.mmap:
        """Guest RAM (GPA 0 up to ``ram_size``), shared with KVM."""
        if self._memory is None:
            raise KvmError("this KvmVm is closed")
        return self._memory

    def linear(self, gpa: int) -> int:
        """The guest linear address a stub uses for physical ``gpa``: itself below 4 GiB, else a
        high alias of its 2 MiB region, mapped on first use (``guest.map_high_alias``)."""
        if gpa < guest.LOW_LIMIT:
            return gpa
        region = gpa & ~((2 << 20) - 1)
        base = self._high_aliases.get(region)
        if base is None:
            slot = len(self._high_aliases)
            if slot >= guest.HIGH_ALIAS_SLOTS:
                raise KvmError(
                    f"gpa={gpa:#x}: the guest image has {guest.HIGH_ALIAS_SLOTS} high aliases "
                    "and this VM has used them all (create a new KvmVm)"
                )
            base = guest.map_high_alias(memoryview(self.memory), slot, region)
            self._high_aliases[region] = base
        return base + (gpa - region)

    # -- vCPUs ---------------------------------------------------------------------------------
    def add_vcpu(self, vcpu_id: int) -> KvmVcpu:
        """KVM_CREATE_VCPU, then CPUID, 64-bit segment state and mp_state RUNNABLE."""
        check_vcpu_id(vcpu_id, 1 << 32, [v.vcpu_id for v in self._vcpus])
        if vcpu_id >= self.limits.max_vcpu_id:
            raise ApicValueError(
                f"vcpu_id={vcpu_id} is not below KVM_CAP_MAX_VCPU_ID={self.limits.max_vcpu_id}"
            )
        index = len(self._vcpus)
        if index >= self.capacity:
            raise ApicValueError(f"this KvmVm was made with room for {self.capacity} vCPUs")
        if index >= self.limits.max_vcpus:
            raise ApicValueError(
                f"KVM on this host allows at most {self.limits.max_vcpus} vCPUs per VM "
                "(KVM_CAP_MAX_VCPUS)"
            )
        fd = k.ioctl(self.fd, k.KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU({vcpu_id})")
        try:
            run = mmap.mmap(fd, self._mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        vcpu = KvmVcpu(self, index, vcpu_id, fd, run)
        self._vcpus.append(vcpu)
        self._set_cpuid(vcpu)
        sregs = k.KvmSregs()
        k.ioctl(vcpu.fd, k.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")  # keeps apic_base, cr8, ...
        self.set_long_mode(vcpu, sregs)
        mp = k.KvmMpState(mp_state=KVM_MP_STATE_RUNNABLE)
        k.ioctl(fd, k.KVM_SET_MP_STATE, mp, "KVM_SET_MP_STATE")
        return vcpu

    def _supported_cpuid(self) -> k.KvmCpuid2Buffer:
        buf = k.KvmCpuid2Buffer(nent=k.CPUID_MAX_ENTRIES)
        k.ioctl(self._kvm, k.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        return buf

    def _set_cpuid(self, vcpu: KvmVcpu) -> None:
        buf = k.KvmCpuid2Buffer()
        ctypes.memmove(ctypes.addressof(buf), ctypes.addressof(self._cpuid), ctypes.sizeof(buf))
        for j in range(buf.nent):
            e = buf.entries[j]
            if e.function == 1:
                e.ebx = (e.ebx & 0x00FFFFFF) | (vcpu.vcpu_id & 0xFF) << 24
            elif e.function in (0xB, 0x1F):
                e.edx = vcpu.vcpu_id
        k.ioctl(vcpu.fd, k.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def set_long_mode(self, vcpu: KvmVcpu, s: k.KvmSregs) -> None:
        """KVM_SET_SREGS: ``s`` (as KVM_GET_SREGS returned it, so APIC_BASE and CR8 = TPR >> 4
        are written back unchanged) with the backend's flat 64-bit mode."""
        code = k.KvmSegment(
            base=0, limit=0xFFFFFFFF, selector=guest.CODE_SELECTOR, type=11, present=1,
            dpl=0, db=0, s=1, l=1, g=1,
        )  # fmt: skip
        for name in ("ds", "es", "fs", "gs", "ss"):
            seg = k.KvmSegment(
                base=0, limit=0xFFFFFFFF, selector=guest.DATA_SELECTOR, type=3, present=1,
                dpl=0, db=1, s=1, l=0, g=1,
            )  # fmt: skip
            setattr(s, name, seg)
        s.gs.base = vcpu.page
        s.cs = code
        s.tr = k.KvmSegment(
            base=guest.TSS, limit=guest.TSS_LIMIT, selector=guest.TSS_SELECTOR, type=11,
            present=1, s=0,
        )  # fmt: skip
        s.ldt = k.KvmSegment(type=2, present=0, unusable=1)
        s.gdt.base, s.gdt.limit = guest.GDT, guest.GDT_LIMIT
        s.idt.base, s.idt.limit = guest.IDT, guest.IDT_LIMIT
        s.cr0 = guest.CR0_PE | guest.CR0_ET | guest.CR0_NE | guest.CR0_WP | guest.CR0_PG
        s.cr3 = guest.PML4
        s.cr4 = guest.CR4_PAE
        s.efer = guest.EFER_LME | guest.EFER_LMA
        k.ioctl(vcpu.fd, k.KVM_SET_SREGS, s, "KVM_SET_SREGS")

    @property
    def vcpus(self) -> Sequence[KvmVcpu]:
        return self._vcpus

    def vcpu(self, i: int) -> KvmVcpu:
        """vCPU by index (creation order)."""
        check_int("i", i, 0, len(self._vcpus) - 1)
        return self._vcpus[i]

    def index_of(self, vcpu_id: int) -> int:
        for v in self._vcpus:
            if v.vcpu_id == vcpu_id:
                return v.index
        raise ApicValueError(f"vcpu_id={vcpu_id} does not exist")

    def __len__(self) -> int:
        return len(self._vcpus)

    def __iter__(self) -> Iterator[KvmVcpu]:
        return iter(self._vcpus)

    # -- host API (ioctls) ---------------------------------------------------------------------
    def get_lapic(self, i: int) -> bytes:
        check_index(i, len(self._vcpus))
        state = k.KvmLapicState()
        k.ioctl(self._vcpus[i].fd, k.KVM_GET_LAPIC, state, "KVM_GET_LAPIC")
        return bytes(ctypes.string_at(ctypes.addressof(state), k.KVM_APIC_REG_SIZE))

    def set_lapic(self, i: int, data: bytes) -> None:
        check_index(i, len(self._vcpus))
        raw = check_state_data(data)
        state = k.KvmLapicState()
        ctypes.memmove(ctypes.addressof(state), raw, len(raw))
        r, err = k.raw_ioctl(self._vcpus[i].fd, k.KVM_SET_LAPIC, state)
        if r < 0:
            raise StateError(err, f"KVM_SET_LAPIC failed: {os.strerror(err)}")

    def get_cr8(self, i: int) -> int:
        """KVM_GET_SREGS' CR8 (KVM ``kvm_get_cr8``: TPR bits 7:4)."""
        check_index(i, len(self._vcpus))
        sregs = k.KvmSregs()
        k.ioctl(self._vcpus[i].fd, k.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return int(sregs.cr8)

    def set_cr8(self, i: int, cr8: int) -> None:
        """KVM_GET_SREGS, then KVM_SET_SREGS of that state with CR8 = ``cr8``, as a VMM's
        save/restore does: KVM's ``kvm_set_cr8`` sets TPR = (cr8 & 0xF) << 4 (KVMB-10)."""
        check_index(i, len(self._vcpus))
        check_int("cr8", cr8, 0, (1 << 64) - 1)
        fd = self._vcpus[i].fd
        sregs = k.KvmSregs()
        k.ioctl(fd, k.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        sregs.cr8 = cr8
        k.ioctl(fd, k.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_msr(self, i: int, msr: int) -> int:
        check_index(i, len(self._vcpus))
        check_msr(msr)
        msrs = k.KvmMsrs1(nmsrs=1)
        msrs.entries[0].index = msr
        n = k.ioctl(self._vcpus[i].fd, k.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        if n != 1:
            raise MsrError(f"msr={msr:#x} cannot be read on vCPU {i}: KVM_GET_MSRS processed {n}")
        return int(msrs.entries[0].data)

    def set_msr(self, i: int, msr: int, value: int) -> bool:
        check_index(i, len(self._vcpus))
        check_msr(msr)
        check_msr_value(value)
        msrs = k.KvmMsrs1(nmsrs=1)
        msrs.entries[0].index = msr
        msrs.entries[0].data = value
        return k.ioctl(self._vcpus[i].fd, k.KVM_SET_MSRS, msrs, "KVM_SET_MSRS") == 1

    def signal_msi(
        self, address_lo: int, address_hi: int = 0, data: int = 0, flags: int = 0
    ) -> int:
        """KVM_SIGNAL_MSI: ``n >= 0`` as the kernel returned it, else ``-errno``.

        The kernel's own -1 ("no APIC matched") arrives as the ioctl's -1 with errno 1
        (EPERM), so it comes back as -1, the value ``hypervisor.Vm.signal_msi`` returns.
        """
        check_msi(address_lo, address_hi, data, flags)
        msi = k.KvmMsi(address_lo=address_lo, address_hi=address_hi, data=data, flags=flags)
        r, err = k.raw_ioctl(self.fd, k.KVM_SIGNAL_MSI, msi)
        return r if r >= 0 else -err

    def lapic_view(self, i: int) -> LapicView:
        """IRR/ISR/TMR, APIC_BASE and registers of vCPU ``i`` (KVM_GET_LAPIC + APIC_BASE)."""
        return LapicView(self.get_lapic(i), self.get_msr(i, APIC_BASE_MSR))

    # -- life cycle ------------------------------------------------------------------------------
    def close(self) -> None:
        for v in self._vcpus:
            v.close()
        self._vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        if self._kvm >= 0:
            os.close(self._kvm)
            self._kvm = -1

    def __enter__(self) -> KvmVm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return (
            f"KvmVm(vcpus={len(self._vcpus)}, x2apic_format={self.x2apic_format}, "
            f"broadcast_quirk={self.broadcast_quirk})"
        )


_INTEL_COMPATIBLE_VENDORS = (b"GenuineIntel", b"CentaurHauls", b"  Shanghai  ")
KVM_CAP_X86_SMM = 117


def _features_of(cpuid: k.KvmCpuid2Buffer, smm: bool) -> Features:
    """The ``lapic.Features`` that the guest CPUID set by this backend advertises."""
    leaf1_ecx = 0
    vendor = b""
    maxphyaddr = 36  # SDM: without CPUID.80000008H the physical-address width is 36
    for j in range(cpuid.nent):
        e = cpuid.entries[j]
        if e.function == 0:
            vendor = struct.pack("<III", e.ebx, e.edx, e.ecx)
        elif e.function == 1:
            leaf1_ecx = int(e.ecx)
        elif e.function == 0x80000008:
            maxphyaddr = int(e.eax) & 0xFF
    return Features(
        x2apic=bool(leaf1_ecx & _CPUID_X2APIC),
        tsc_deadline=bool(leaf1_ecx & _CPUID_TSC_DEADLINE),
        smm=smm,
        maxphyaddr=maxphyaddr,
        intel_compatible=vendor in _INTEL_COMPATIBLE_VENDORS,
    )


VECTOR_HASHING_PARAMETER = "/sys/module/kvm/parameters/vector_hashing"


def host_vector_hashing() -> bool | None:
    """KVM's ``vector_hashing`` module parameter (lowest-priority arbitration, LP-2), or None
    when it cannot be read: pass it to ``hypervisor.Vm(vector_hashing=...)``."""
    try:
        with open(VECTOR_HASHING_PARAMETER, encoding="ascii") as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return None


def host_tpr_low_bits_survive_exit() -> bool:
    """KVMB-11, measured: whether TPR bits 3:0 survive the guest's exits on this host (pass it
    to ``hypervisor.KvmOptions(tpr_low_bits_survive_exit=...)``).  A 1-vCPU VM's guest writes
    TPR 0x2F by MMIO, then makes two more accesses (two more exits: MMIO and RDMSR); True if
    KVM_GET_LAPIC still shows 0x2F, False if it shows 0x20 (SVM without AVIC copies its 4-bit
    V_TPR back at each exit)."""
    with KvmVm(1) as vm:
        cpu = vm.vcpu(0)
        base = vm.get_msr(0, APIC_BASE_MSR) & APIC_BASE_ADDR_MASK
        cpu.mmio_write(base + 0x80, 0x2F)
        cpu.mmio_read(base + 0x20)
        cpu.rdmsr(APIC_BASE_MSR)
        return vm.get_lapic(0)[0x80] == 0x2F


def guest_features() -> Features:
    """What a KvmVm's guest CPUID advertises on this host, as ``lapic.Features``: pass it to
    ``hypervisor.Vm(features=...)`` so the model runs the same virtual CPU."""
    fd = _open_kvm()
    try:
        buf = k.KvmCpuid2Buffer(nent=k.CPUID_MAX_ENTRIES)
        k.ioctl(fd, k.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        smm = k.raw_ioctl(fd, k.KVM_CHECK_EXTENSION, KVM_CAP_X86_SMM)[0] > 0
        return _features_of(buf, smm)
    finally:
        os.close(fd)
