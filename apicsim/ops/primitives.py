"""The primitive operations: one guest instruction, one ioctl, or one model-only action
(run, halt, schedule, advance, guest driver calls) each."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apicsim.ops.core import (
    APIC_BASE_MSR,
    ARG,
    DEST_MODES,
    GPA,
    ICR_MSR,
    IPI_KINDS,
    LEVELS,
    MODES,
    MSR,
    OFFSET,
    SHORTHANDS,
    SIZE,
    TRIGGERS,
    U32,
    U64,
    VALUE,
    VCPU,
    Field,
    Op,
    OpBackend,
    Unsupported,
    _h,
    window,
    x2apic_mode,
)
from lapic.faults import ApicValueError
from lapic.icr import DeliveryMode, DestMode, Level, Shorthand, Trigger
from lapic.registers import APIC_BASE_ADDR_MASK


# -- guest accesses ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Wrmsr(Op):
    """The guest of ``vcpu`` executes WRMSR ``msr`` <- ``value``."""

    vcpu: int
    msr: int
    value: int

    ACTION = "wrmsr"
    FIELDS = {"vcpu": VCPU, "msr": MSR, "value": VALUE}  # noqa: RUF012

    def perform(self, backend: OpBackend) -> None:
        backend.vm.vcpu(self.vcpu).wrmsr(self.msr, self.value)

    def describe(self) -> str:
        return f"wrmsr cpu{self.vcpu} {self.msr:#x} = {self.value:#x}"


@dataclass(frozen=True, slots=True)
class Rdmsr(Op):
    """The guest of ``vcpu`` executes RDMSR ``msr``."""

    vcpu: int
    msr: int

    ACTION = "rdmsr"
    FIELDS = {"vcpu": VCPU, "msr": MSR}  # noqa: RUF012
    RESULT = int
    READS = True

    def perform(self, backend: OpBackend) -> int:
        return backend.vm.vcpu(self.vcpu).rdmsr(self.msr)

    def describe(self) -> str:
        return f"rdmsr cpu{self.vcpu} {self.msr:#x}"


@dataclass(frozen=True, slots=True)
class MovToCr8(Op):
    """The guest of ``vcpu`` executes ``mov %rax, %cr8`` with RAX = ``value``: TPR := (value &
    0xF) << 4; #GP if any of bits 63:4 is set (CR8-1)."""

    vcpu: int
    value: int

    ACTION = "mov_to_cr8"
    FIELDS = {"vcpu": VCPU, "value": VALUE}  # noqa: RUF012

    def perform(self, backend: OpBackend) -> None:
        backend.vm.vcpu(self.vcpu).mov_to_cr8(self.value)

    def describe(self) -> str:
        return f"mov_to_cr8 cpu{self.vcpu} {_h(self.value)}"


@dataclass(frozen=True, slots=True)
class MovFromCr8(Op):
    """The guest of ``vcpu`` executes ``mov %cr8, %rax``: the value read, TPR[7:4] (CR8-1)."""

    vcpu: int

    ACTION = "mov_from_cr8"
    FIELDS = {"vcpu": VCPU}  # noqa: RUF012
    RESULT = int
    READS = True

    def perform(self, backend: OpBackend) -> int:
        return backend.vm.vcpu(self.vcpu).mov_from_cr8()

    def describe(self) -> str:
        return f"mov_from_cr8 cpu{self.vcpu}"


def _mmio_where(offset: int, gpa: int | None, size: int) -> tuple[str, str]:
    where = f"+{offset:#05x}" if gpa is None else f"{gpa:#x}"
    return where, "" if size == 4 else f" /{size}"


def _gpa(backend: OpBackend, vcpu: int, offset: int, gpa: int | None) -> int:
    if gpa is not None:
        return gpa
    return window(backend.vm, vcpu) + offset


def _check_gpa(op: MmioRead | MmioWrite) -> None:
    if op.gpa is not None and op.offset:
        raise ApicValueError(f"offset={op.offset:#x}: give an offset or a gpa, not both")


def _mmio_toml(table: dict[str, Any], gpa: int | None) -> dict[str, Any]:
    if gpa is not None:
        table.pop("offset", None)
    return table


@dataclass(frozen=True, slots=True)
class MmioWrite(Op):
    """The guest of ``vcpu`` writes ``value`` (``size`` bytes) at ``offset`` of its current
    APIC window, or at guest-physical address ``gpa``."""

    vcpu: int
    offset: int
    value: int
    size: int = 4
    gpa: int | None = None
    """A guest-physical address instead of ``offset`` (then 0)."""

    ACTION = "mmio_write"
    FIELDS = {"vcpu": VCPU, "offset": OFFSET, "gpa": GPA, "value": VALUE, "size": SIZE}  # noqa: RUF012

    def perform(self, backend: OpBackend) -> None:
        gpa = _gpa(backend, self.vcpu, self.offset, self.gpa)
        backend.vm.vcpu(self.vcpu).mmio_write(gpa, self.value, self.size)

    def describe(self) -> str:
        where, size = _mmio_where(self.offset, self.gpa, self.size)
        return f"mmio_write cpu{self.vcpu} {where} = {self.value:#x}{size}"

    def __post_init__(self) -> None:
        _check_gpa(self)

    def to_toml(self) -> dict[str, Any]:
        return _mmio_toml(Op.to_toml(self), self.gpa)

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> Op:
        return cls(
            table["vcpu"], table.get("offset", 0), table["value"], table.get("size", 4),
            table.get("gpa"),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class MmioRead(Op):
    """The guest of ``vcpu`` reads ``size`` bytes at ``offset`` of its current APIC window,
    or at guest-physical address ``gpa``."""

    vcpu: int
    offset: int
    size: int = 4
    gpa: int | None = None
    """A guest-physical address instead of ``offset`` (then 0)."""

    ACTION = "mmio_read"
    FIELDS = {"vcpu": VCPU, "offset": OFFSET, "gpa": GPA, "size": SIZE}  # noqa: RUF012
    RESULT = int
    READS = True

    def perform(self, backend: OpBackend) -> int:
        gpa = _gpa(backend, self.vcpu, self.offset, self.gpa)
        return backend.vm.vcpu(self.vcpu).mmio_read(gpa, self.size)

    def describe(self) -> str:
        where, size = _mmio_where(self.offset, self.gpa, self.size)
        return f"mmio_read cpu{self.vcpu} {where}{size}"

    def __post_init__(self) -> None:
        _check_gpa(self)

    def to_toml(self) -> dict[str, Any]:
        return _mmio_toml(Op.to_toml(self), self.gpa)

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> Op:
        return cls(table["vcpu"], table.get("offset", 0), table.get("size", 4), table.get("gpa"))


@dataclass(frozen=True, slots=True)
class Icr(Op):
    """The guest of ``vcpu`` sends an IPI through its current interface: in x2APIC mode one
    WRMSR 0x830 (``dest`` in bits 63:32); in xAPIC mode ICR2 (``dest << 24``), then ICR.  The
    fields are raw ICR field values (``lapic.icr`` enums)."""

    vcpu: int
    dest: int = 0
    vector: int = 0
    mode: int = int(DeliveryMode.FIXED)
    dest_mode: int = int(DestMode.PHYSICAL)
    shorthand: int = int(Shorthand.NONE)
    level: int = int(Level.ASSERT)
    trigger: int = int(Trigger.EDGE)

    ACTION = "icr"
    FIELDS = {  # noqa: RUF012
        "vcpu": VCPU,
        "dest": Field("int", False, 0, hi=U32),
        "vector": Field("int", False, 0, hi=0xFF),
        "mode": Field("choice", False, 0, hi=len(MODES) - 1, choices=MODES),
        "dest_mode": Field("choice", False, 0, hi=len(DEST_MODES) - 1, choices=DEST_MODES),
        "shorthand": Field("choice", False, 0, hi=len(SHORTHANDS) - 1, choices=SHORTHANDS),
        "level": Field("choice", False, 1, hi=len(LEVELS) - 1, choices=LEVELS),
        "trigger": Field("choice", False, 0, hi=len(TRIGGERS) - 1, choices=TRIGGERS),
    }

    @property
    def low(self) -> int:
        """The ICR's low dword."""
        return (
            self.vector
            | self.mode << 8
            | self.dest_mode << 11
            | self.level << 14
            | self.trigger << 15
            | self.shorthand << 18
        )

    def perform(self, backend: OpBackend) -> None:
        vm = backend.vm
        apic_base = vm.get_msr(self.vcpu, APIC_BASE_MSR)
        cpu = vm.vcpu(self.vcpu)
        if x2apic_mode(apic_base):
            cpu.wrmsr(ICR_MSR, self.dest << 32 | self.low)
            return
        if self.dest > 0xFF:
            raise ApicValueError(f"dest={self.dest:#x} does not fit the 8-bit xAPIC destination")
        base = apic_base & APIC_BASE_ADDR_MASK
        cpu.mmio_write(base + 0x310, self.dest << 24)
        cpu.mmio_write(base + 0x300, self.low)

    def describe(self) -> str:
        sh = "" if not self.shorthand else f" {SHORTHANDS[self.shorthand]}"
        dm = "log" if self.dest_mode else "phys"
        return (
            f"icr cpu{self.vcpu} -> {self.dest:#x} {dm} {MODES[self.mode]} {self.vector:#04x}{sh}"
        )


@dataclass(frozen=True, slots=True)
class Hypercall(Op):
    """The guest of ``vcpu`` executes VMCALL with RAX = ``nr`` and ``a0``..``a3``; the result
    is RAX."""

    vcpu: int
    nr: int
    a0: int = 0
    a1: int = 0
    a2: int = 0
    a3: int = 0
    long_mode: bool = True
    cpl: int = 0

    ACTION = "hypercall"
    FIELDS = {  # noqa: RUF012
        "vcpu": VCPU,
        "nr": Field("int", True, hi=U64),
        "a0": ARG,
        "a1": ARG,
        "a2": ARG,
        "a3": ARG,
        "long_mode": Field("bool", False, True),
        "cpl": Field("int", False, 0, hi=3),
    }
    RESULT = int

    def perform(self, backend: OpBackend) -> int:
        call = getattr(backend.vm.vcpu(self.vcpu), "hypercall", None)
        if call is None:
            raise Unsupported("this backend's vCPUs execute no VMCALL")
        args = (self.nr, self.a0, self.a1, self.a2, self.a3)
        return int(call(*args, long_mode=self.long_mode, cpl=self.cpl))

    def describe(self) -> str:
        args = ",".join(f"{a:#x}" for a in (self.a0, self.a1, self.a2, self.a3))
        mode = "" if self.long_mode else " 32-bit"
        cpl = "" if not self.cpl else f" cpl{self.cpl}"
        return f"hypercall cpu{self.vcpu} nr={self.nr} ({args}){mode}{cpl}"


# -- host ioctls -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Msi(Op):
    """The host injects an MSI with KVM_SIGNAL_MSI; the result is KVM's return value."""

    address_lo: int
    address_hi: int
    data: int
    flags: int = 0

    ACTION = "msi"
    FIELDS = {  # noqa: RUF012
        "address_lo": Field("int", True, hi=U32),
        "address_hi": Field("int", False, 0, hi=U32),
        "data": Field("int", True, hi=U32),
        "flags": Field("int", False, 0, hi=U32),
    }
    RESULT = int

    def perform(self, backend: OpBackend) -> int:
        return backend.vm.signal_msi(self.address_lo, self.address_hi, self.data, self.flags)

    def describe(self) -> str:
        hi = f" hi={self.address_hi:#x}" if self.address_hi else ""
        return f"msi addr={self.address_lo:#x}{hi} data={self.data:#x}"


@dataclass(frozen=True, slots=True)
class SetMsr(Op):
    """The host writes ``msr`` of ``vcpu`` with KVM_SET_MSRS (host-initiated); true if set."""

    vcpu: int
    msr: int
    value: int

    ACTION = "set_msr"
    FIELDS = {"vcpu": VCPU, "msr": MSR, "value": VALUE}  # noqa: RUF012
    RESULT = bool

    def perform(self, backend: OpBackend) -> bool:
        return backend.vm.set_msr(self.vcpu, self.msr, self.value)

    def describe(self) -> str:
        return f"set_msr cpu{self.vcpu} {self.msr:#x} = {self.value:#x}"


@dataclass(frozen=True, slots=True)
class GetMsr(Op):
    """The host reads ``msr`` of ``vcpu`` with KVM_GET_MSRS."""

    vcpu: int
    msr: int

    ACTION = "get_msr"
    FIELDS = {"vcpu": VCPU, "msr": MSR}  # noqa: RUF012
    RESULT = int
    READS = True

    def perform(self, backend: OpBackend) -> int:
        return backend.vm.get_msr(self.vcpu, self.msr)

    def describe(self) -> str:
        return f"get_msr cpu{self.vcpu} {self.msr:#x}"


@dataclass(frozen=True, slots=True)
class GetLapic(Op):
    """The host reads the dword at ``offset`` of ``vcpu``'s 1 KiB KVM_GET_LAPIC image."""

    vcpu: int
    offset: int

    ACTION = "get_lapic"
    FIELDS = {"vcpu": VCPU, "offset": Field("int", True, hi=0x3FC)}  # noqa: RUF012
    RESULT = int
    READS = True

    def perform(self, backend: OpBackend) -> int:
        image = backend.vm.get_lapic(self.vcpu)
        return int.from_bytes(image[self.offset : self.offset + 4], "little")

    def describe(self) -> str:
        return f"get_lapic cpu{self.vcpu} [{self.offset:#05x}]"


@dataclass(frozen=True, slots=True)
class SetCr8(Op):
    """The host's KVM_GET_SREGS then KVM_SET_SREGS of ``vcpu`` with CR8 = ``cr8`` (None: the
    CR8 as read, a VMM's save/restore round trip); the CR8 read.  KVM sets TPR = (cr8 & 0xF)
    << 4, so even the round trip clears TPR bits 3:0 (KVMB-10)."""

    vcpu: int
    cr8: int | None = None

    ACTION = "set_cr8"
    FIELDS = {"vcpu": VCPU, "cr8": Field("int", hi=U64)}  # noqa: RUF012
    RESULT = int
    READS = True

    def perform(self, backend: OpBackend) -> int:
        vm = backend.vm
        old = vm.get_cr8(self.vcpu)
        vm.set_cr8(self.vcpu, old if self.cr8 is None else self.cr8)
        return old

    def describe(self) -> str:
        cr8 = "as read" if self.cr8 is None else _h(self.cr8)
        return f"set_cr8 cpu{self.vcpu} {cr8}"


def _patched(image: bytes, writes: Sequence[tuple[int, int]]) -> bytes:
    out = bytearray(image)
    for off, value in writes:
        out[off : off + 4] = value.to_bytes(4, "little")
    return bytes(out)


@dataclass(frozen=True, slots=True)
class SetLapic(Op):
    """The host reads ``vcpu``'s KVM_GET_LAPIC image, replaces the given dwords and writes it
    back with KVM_SET_LAPIC, as a VMM does.  A refused image raises ``StateError`` (the
    scenario runner shows it as the result ``-errno``)."""

    vcpu: int
    writes: tuple[tuple[int, int], ...]

    ACTION = "set_lapic"
    FIELDS = {"vcpu": VCPU, "writes": Field("writes", True)}  # noqa: RUF012
    RESULT = int

    def perform(self, backend: OpBackend) -> int:
        vm = backend.vm
        vm.set_lapic(self.vcpu, _patched(vm.get_lapic(self.vcpu), self.writes))
        return 0

    def describe(self) -> str:
        w = ",".join(f"{k:#x}={v:#x}" for k, v in self.writes)
        return f"set_lapic cpu{self.vcpu} {{{w}}}"


# -- the model's run, halt, clock and guest driver ---------------------------------------------
@dataclass(frozen=True, slots=True)
class Run(Op):
    """One VM entry of ``vcpu`` (the guest's handler if a guest is booted): the vectors
    handled."""

    vcpu: int

    ACTION = "run"
    FIELDS = {"vcpu": VCPU}  # noqa: RUF012
    RESULT = list

    def perform(self, backend: OpBackend) -> list[int]:
        return backend.run_vcpu(self.vcpu)

    def describe(self) -> str:
        return f"run cpu{self.vcpu}"


@dataclass(frozen=True, slots=True)
class Halt(Op):
    """The guest of ``vcpu`` executes HLT: true if the vCPU blocked (nothing deliverable was
    pending, WAKE-1).  The model's vCPUs only: a KVM backend without HLT is unsupported."""

    vcpu: int

    ACTION = "halt"
    FIELDS = {"vcpu": VCPU}  # noqa: RUF012
    RESULT = bool

    def perform(self, backend: OpBackend) -> bool:
        halt = getattr(backend.vm.vcpu(self.vcpu), "halt", None)
        if halt is None:
            raise Unsupported("this backend's vCPUs execute no HLT")
        return bool(halt())

    def describe(self) -> str:
        return f"halt cpu{self.vcpu}"


def _scheduling(backend: OpBackend, vcpu: int, name: str) -> Any:
    found = getattr(backend.vm.vcpu(vcpu), name, None)
    if found is None:
        raise Unsupported("this backend's vCPUs have no host scheduling")
    return found


@dataclass(frozen=True, slots=True)
class Preempt(Op):
    """The host schedules ``vcpu`` out (KVM ``vcpu_put``); the model's vCPUs only."""

    vcpu: int

    ACTION = "preempt"
    FIELDS = {"vcpu": VCPU}  # noqa: RUF012

    def perform(self, backend: OpBackend) -> None:
        _scheduling(backend, self.vcpu, "preempt")()

    def describe(self) -> str:
        return f"preempt cpu{self.vcpu}"


@dataclass(frozen=True, slots=True)
class Enter(Op):
    """The host loads ``vcpu`` on pCPU ``pcpu`` (KVM ``vcpu_load``); the model's only."""

    vcpu: int
    pcpu: int

    ACTION = "enter"
    FIELDS = {"vcpu": VCPU, "pcpu": Field("int", True, hi=1 << 20)}  # noqa: RUF012

    def perform(self, backend: OpBackend) -> None:
        _scheduling(backend, self.vcpu, "enter")(pcpu=self.pcpu)

    def describe(self) -> str:
        return f"enter cpu{self.vcpu} on pcpu{self.pcpu}"


@dataclass(frozen=True, slots=True)
class Advance(Op):
    """The VM's virtual clock moves by ``ns``: the timers fired."""

    ns: int

    ACTION = "advance"
    FIELDS = {"ns": Field("int", True, hi=1 << 62)}  # noqa: RUF012
    RESULT = int

    def perform(self, backend: OpBackend) -> int:
        return backend.advance(self.ns)

    def describe(self) -> str:
        return f"advance {self.ns} ns"


def _short_list(xs: Sequence[int]) -> str:
    if len(xs) > 6 and list(xs) == list(range(xs[0], xs[0] + len(xs))):
        return f"{xs[0]}..{xs[-1]}"
    return "[" + ",".join(str(x) for x in xs) + "]"


@dataclass(frozen=True, slots=True)
class SendIpi(Op):
    """The guest's ``send_IPI_<kind>`` on CPU ``cpu`` (``cpus`` for the mask kinds)."""

    cpu: int
    kind: str
    vector: int
    cpus: tuple[int, ...] | None = None

    ACTION = "send_ipi"
    FIELDS = {  # noqa: RUF012
        "cpu": VCPU,
        "kind": Field("choice", True, choices=IPI_KINDS, hi=-1),
        "cpus": Field("cpus"),
        "vector": Field("int", True, hi=0xFF),
    }

    def perform(self, backend: OpBackend) -> None:
        cpu = backend.guest_cpu(self.cpu)
        if self.kind == "mask":
            cpu.send_IPI_mask(list(self.cpus or ()), self.vector)
        elif self.kind == "mask_allbutself":
            cpu.send_IPI_mask_allbutself(list(self.cpus or ()), self.vector)
        elif self.kind == "allbutself":
            cpu.send_IPI_allbutself(self.vector)
        elif self.kind == "all":
            cpu.send_IPI_all(self.vector)
        else:
            cpu.send_IPI_self(self.vector)

    def describe(self) -> str:
        target = "" if self.cpus is None else f" cpus={_short_list(self.cpus)}"
        return f"send_ipi cpu{self.cpu} {self.kind}{target} {self.vector:#04x}"


@dataclass(frozen=True, slots=True)
class SetTpr(Op):
    """The guest of CPU ``cpu`` sets its task priority."""

    cpu: int
    value: int

    ACTION = "set_tpr"
    FIELDS = {"cpu": VCPU, "value": Field("int", True, hi=0xFF)}  # noqa: RUF012

    def perform(self, backend: OpBackend) -> None:
        backend.guest_cpu(self.cpu).set_tpr(self.value)

    def describe(self) -> str:
        return f"set_tpr cpu{self.cpu} {self.value:#x}"


@dataclass(frozen=True, slots=True)
class Eoi(Op):
    """The guest of CPU ``cpu`` signals end of interrupt."""

    cpu: int

    ACTION = "eoi"
    FIELDS = {"cpu": VCPU}  # noqa: RUF012

    def perform(self, backend: OpBackend) -> None:
        backend.guest_cpu(self.cpu).eoi()

    def describe(self) -> str:
        return f"eoi cpu{self.cpu}"


