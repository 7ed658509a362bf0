"""One typed vocabulary of operations on a VM: scenario steps and differential programs.

Every operation is a frozen dataclass that

* performs itself on a backend (:meth:`Op.perform`): the model ``hypervisor.Vm`` or the real
  KVM's ``apicsim.kvm.KvmVm``, through the small :class:`OpBackend` Protocol (the shared host
  and guest API, plus ``run``/``advance``/the Python guest where the backend has them);
* describes itself in one line (:meth:`Op.describe`: the text of the ``apicsim run`` step table
  and of the differential reports);
* round-trips to a ``[[step]]`` table of a scenario file (:meth:`Op.to_toml`,
  :meth:`Op.from_toml`; the format is ``specs/scenarios/README.md``).

*Primitive* operations are one guest instruction or one host ioctl each (``wrmsr``,
``mmio_read``, ``set_lapic``, ...).  *Macro* operations say what to do, not how (``reg_write``
is one WRMSR in x2APIC mode but an MMIO write in xAPIC mode; ``set_base`` keeps the vCPU's BSP
bit; ``restore`` rewrites dwords of the image it reads): :meth:`Op.expand` turns one into
primitives against a VM's state at the time it runs, so the differential engine expands against
the model and performs the same primitives on both backends.  Guest-driver operations
(``send_ipi``, ``set_tpr``, ``eoi``) call the Python guest stub (``guest.Guest``).

The choice lists of the ICR fields derive from the ``lapic.icr`` enums.  Sources: the ICR
layout (SDM Vol. 3A 11.6.1; ``specs/lapic.md`` ICR-*), KVM's KVM_GET/SET_LAPIC, KVM_SET_MSRS and
KVM_SIGNAL_MSI ioctls (``/work/shared/reference/kvm_lapic.md``).  Not modelled here: argument
range checks with file positions (the scenario parser, ``apicsim.scenario.format``, does them
before building an operation), and anything about comparing results (the runner and the
differential engine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

from hypervisor.api import HostApi, VcpuApi
from lapic.faults import ApicValueError
from lapic.icr import DeliveryMode, DestMode, Level, Shorthand, Trigger
from lapic.registers import APIC_BASE_ADDR_MASK, APIC_BASE_EN, APIC_BASE_EXTD

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

APIC_BASE_MSR = 0x1B
TSC_DEADLINE_MSR = 0x6E0
X2APIC_MSR = 0x800
ICR_MSR = 0x830
SELF_IPI_MSR = 0x83F
EN = APIC_BASE_EN
EXTD = APIC_BASE_EXTD
BSP = 0x100
DEFAULT_BASE = 0xFEE00000

MODES = tuple(m.name.lower() for m in DeliveryMode)
DEST_MODES = tuple(m.name.lower() for m in DestMode)
_SHORTHAND_NAMES = {Shorthand.ALL_INCLUDING_SELF: "all", Shorthand.ALL_EXCLUDING_SELF: "allbutself"}
SHORTHANDS = tuple(_SHORTHAND_NAMES.get(s, s.name.lower()) for s in Shorthand)
LEVELS = tuple(m.name.lower() for m in Level)
TRIGGERS = tuple(m.name.lower() for m in Trigger)
IPI_KINDS = ("mask", "mask_allbutself", "allbutself", "all", "self")
BASE_MODES = {"disabled": 0, "xapic": EN, "x2apic": EN | EXTD, "extd": EXTD}
BSP_CHOICES = ("keep", "set", "clear")
AS_READ = "as read"


class Unsupported(Exception):
    """The backend cannot do what an operation asks (``run`` on KVM, ...): a scenario is
    skipped from that point, with this reason."""


# -- The backend an operation performs itself on -----------------------------------------------
OpCpu = VcpuApi
"""What a guest access needs of a vCPU (``hypervisor.api.VcpuApi``: ``hypervisor.Vcpu`` and
``apicsim.kvm.KvmVcpu``)."""
OpVm = HostApi
"""The host API an operation uses (``hypervisor.api.HostApi``: ``hypervisor.Vm`` and
``apicsim.kvm.KvmVm``)."""


class HypercallCpu(VcpuApi, Protocol):
    """A vCPU whose guest can also execute VMCALL (both backends' vCPUs; ``hypercall`` looks
    for it at run time, so a host API without it still runs every other operation)."""

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
    ) -> int: ...


class GuestDriver(Protocol):
    """The guest's IPI entry points (``guest.GuestCpu``)."""

    def send_IPI_mask(self, cpus: Sequence[int], vector: int) -> None: ...
    def send_IPI_mask_allbutself(self, cpus: Sequence[int], vector: int) -> None: ...
    def send_IPI_allbutself(self, vector: int) -> None: ...
    def send_IPI_all(self, vector: int) -> None: ...
    def send_IPI_self(self, vector: int) -> None: ...
    def set_tpr(self, value: int) -> None: ...
    def eoi(self) -> None: ...


class OpBackend(Protocol):
    """What :meth:`Op.perform` runs on: the host API, and the steps only some backends have
    (each raises :class:`Unsupported` where the backend lacks it)."""

    @property
    def vm(self) -> OpVm: ...
    def run_vcpu(self, i: int) -> list[int]: ...
    def advance(self, ns: int) -> int: ...
    def guest_cpu(self, i: int) -> GuestDriver: ...


class HostOnly:
    """An :class:`OpBackend` of the host API alone: no ``run``, clock or Python guest."""

    name = "host"

    def __init__(self, vm: OpVm) -> None:
        self.vm = vm

    def run_vcpu(self, i: int) -> list[int]:
        raise Unsupported(f"{self.name}: no 'run'")

    def advance(self, ns: int) -> int:
        raise Unsupported(f"{self.name}: no virtual clock")

    def guest_cpu(self, i: int) -> GuestDriver:
        raise Unsupported(f"{self.name}: no Python guest")


def window(vm: OpVm, i: int) -> int:
    """vCPU ``i``'s APIC window: IA32_APIC_BASE & 0xFFFFF000."""
    return vm.get_msr(i, APIC_BASE_MSR) & APIC_BASE_ADDR_MASK


def x2apic_mode(apic_base: int) -> bool:
    """IA32_APIC_BASE has both EN and EXTD set."""
    return apic_base & (EN | EXTD) == EN | EXTD


# -- Field declarations: what a [[step]] table may hold for each action ------------------------
@dataclass(frozen=True, slots=True)
class Field:
    """One field of an action: its kind (``int``, ``bool``, ``choice``, ``cpus``, ``writes``,
    ``restore``), whether it is required, its default and its range or choices.  For a
    ``choice`` field ``hi`` is the largest raw value accepted, or -1 when only names are."""

    kind: str
    required: bool = False
    default: Any = None
    lo: int = 0
    hi: int = U64
    choices: tuple[str, ...] = ()


VCPU = Field("int", True, hi=U32)
MSR = Field("int", True, hi=U32)
VALUE = Field("int", True, hi=U64)
ARG = Field("int", False, 0, hi=U64)
OFFSET = Field("int", hi=0xFFF)
GPA = Field("int", hi=(1 << 52) - 1)
SIZE = Field("int", False, 4, lo=1, hi=8)


def _h(value: int) -> str:
    return f"{value:#x}" if value > 9 else str(value)


def _hex_keys(pairs: Sequence[tuple[int, Any]]) -> dict[str, Any]:
    return {f"{off:#x}": v for off, v in pairs}


# -- The operations ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Op:
    """The base of every operation (not itself an operation)."""

    ACTION: ClassVar[str] = ""
    FIELDS: ClassVar[dict[str, Field]] = {}
    RESULT: ClassVar[type | None] = None
    """The type of the result a scenario's ``expect.result`` compares (None: no result)."""
    READS: ClassVar[bool] = False
    """The result is a value read (``expect.value``)."""

    def perform(self, backend: OpBackend) -> Any:
        """Carry the operation out on ``backend``; its result (None: it has none)."""
        raise NotImplementedError

    def expand(self, vm: OpVm) -> list[Op]:
        """The primitives this operation stands for, given ``vm``'s current state."""
        return [self]

    def describe(self) -> str:
        raise NotImplementedError

    def to_toml(self) -> dict[str, Any]:
        """The ``[[step]]`` table (without ``expect``): ``action`` and the fields."""
        out: dict[str, Any] = {"action": self.ACTION}
        for f in fields(self):
            value = getattr(self, f.name)
            spec = self.FIELDS[f.name]
            if value is None or (spec.default is not None and value == spec.default):
                continue
            if spec.kind == "writes":
                out[f.name] = _hex_keys(value)
            elif spec.kind == "restore":
                out[f.name] = {k: AS_READ if v is None else v for k, v in _hex_keys(value).items()}
            elif spec.kind == "cpus":
                out[f.name] = list(value)
            elif spec.kind == "choice" and spec.hi >= 0 and isinstance(value, int):
                out[f.name] = spec.choices[value] if value < len(spec.choices) else value
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> Op:
        """The operation of a ``[[step]]`` table (``action`` and ``expect`` are ignored): names
        of choices become their raw values, missing optional fields their defaults."""
        kw: dict[str, Any] = {}
        for name, spec in cls.FIELDS.items():
            if name not in table:
                if spec.default is not None:
                    kw[name] = spec.default
                continue
            value = table[name]
            if spec.kind == "choice" and isinstance(value, str) and spec.hi >= 0:
                value = spec.choices.index(value)
            elif spec.kind == "writes":
                value = tuple((int(k, 0) if isinstance(k, str) else k, v) for k, v in value.items())
            elif spec.kind == "restore":
                value = tuple(
                    (int(k, 0) if isinstance(k, str) else k, None if v == AS_READ else v)
                    for k, v in value.items()
                )
            elif spec.kind == "cpus":
                value = tuple(value)
            kw[name] = value
        return cls(**kw)


def render_toml(table: Mapping[str, Any]) -> list[str]:
    """``key = value`` lines of a ``[[step]]`` table as :meth:`Op.to_toml` gives it (offsets as
    ``0x020``, other integers above 9 in hex)."""
    out = []
    for key, value in table.items():
        out.append(f"{key} = {_toml_value(key, value)}")
    return out


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:#05x}" if key == "offset" else _h(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value("", v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f'"{k}" = {_toml_value("", v)}' for k, v in value.items()) + " }"
    raise ApicValueError(f"value={value!r} of {key!r} has no TOML form here")


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


# -- macros: expanded against a VM's state when they run ---------------------------------------
class Macro(Op):
    """An operation carried out as the primitives :meth:`expand` gives."""

    __slots__ = ()

    def perform(self, backend: OpBackend) -> Any:
        result = None
        for prim in self.expand(backend.vm):
            result = prim.perform(backend)
        return result


def _x2apic_of(vm: OpVm, vcpu: int) -> bool:
    return x2apic_mode(vm.get_msr(vcpu, APIC_BASE_MSR))


@dataclass(frozen=True, slots=True)
class RegWrite(Macro):
    """The guest writes register ``offset`` through the interface of its current mode: an
    MMIO write of the low 32 bits (xAPIC mode, or disabled), or WRMSR ``0x800 + offset >> 4``
    (x2APIC mode)."""

    vcpu: int
    offset: int
    value: int

    ACTION = "reg_write"
    FIELDS = {"vcpu": VCPU, "offset": Field("int", True, hi=0xFF0), "value": VALUE}  # noqa: RUF012

    def expand(self, vm: OpVm) -> list[Op]:
        if _x2apic_of(vm, self.vcpu):
            return [Wrmsr(self.vcpu, X2APIC_MSR + (self.offset >> 4), self.value)]
        return [MmioWrite(self.vcpu, self.offset, self.value & U32)]

    def describe(self) -> str:
        return f"cpu{self.vcpu} write reg {self.offset:#05x} = {self.value:#x}"


@dataclass(frozen=True, slots=True)
class RegRead(Macro):
    """The guest reads register ``offset`` through the interface of its current mode."""

    vcpu: int
    offset: int

    ACTION = "reg_read"
    FIELDS = {"vcpu": VCPU, "offset": Field("int", True, hi=0xFF0)}  # noqa: RUF012
    RESULT = int
    READS = True

    def expand(self, vm: OpVm) -> list[Op]:
        if _x2apic_of(vm, self.vcpu):
            return [Rdmsr(self.vcpu, X2APIC_MSR + (self.offset >> 4))]
        return [MmioRead(self.vcpu, self.offset)]

    def describe(self) -> str:
        return f"cpu{self.vcpu} read reg {self.offset:#05x}"


@dataclass(frozen=True, slots=True)
class Ipi(Macro):
    """The guest of ``vcpu`` writes the raw ICR ``low`` dword with destination ``dest``:
    WRMSR 0x830 ``dest << 32 | low`` in x2APIC mode, otherwise MMIO ICR2 ``(dest & 0xFF) <<
    24`` then ICR ``low`` (reserved bits included: the differential programs' IPI)."""

    vcpu: int
    dest: int
    low: int

    ACTION = "ipi"
    FIELDS = {  # noqa: RUF012
        "vcpu": VCPU,
        "dest": Field("int", True, hi=U32),
        "low": Field("int", True, hi=U32),
    }

    def expand(self, vm: OpVm) -> list[Op]:
        if _x2apic_of(vm, self.vcpu):
            return [Wrmsr(self.vcpu, ICR_MSR, self.dest << 32 | self.low)]
        return [
            MmioWrite(self.vcpu, 0x310, (self.dest & 0xFF) << 24),
            MmioWrite(self.vcpu, 0x300, self.low & U32),
        ]

    def describe(self) -> str:
        return f"cpu{self.vcpu} IPI dest={self.dest:#x} icr={self.low:#x}"


@dataclass(frozen=True, slots=True)
class InitSipi(Macro):
    """The INIT-SIPI sequence from ``vcpu`` to ``dest``: an INIT IPI (level assert), then a
    STARTUP IPI with ``vector``, each as :class:`Ipi` would send it."""

    vcpu: int
    dest: int
    vector: int
    logical: bool = False

    ACTION = "init_sipi"
    FIELDS = {  # noqa: RUF012
        "vcpu": VCPU,
        "dest": Field("int", True, hi=U32),
        "vector": Field("int", True, hi=0xFF),
        "logical": Field("bool", False, False),
    }

    def expand(self, vm: OpVm) -> list[Op]:
        dm = DestMode.LOGICAL << 11 if self.logical else 0
        init = Level.ASSERT << 14 | DeliveryMode.INIT << 8 | dm
        startup = Level.ASSERT << 14 | DeliveryMode.STARTUP << 8 | dm | self.vector
        return [
            *Ipi(self.vcpu, self.dest, init).expand(vm),
            *Ipi(self.vcpu, self.dest, startup).expand(vm),
        ]

    def describe(self) -> str:
        mode = "logical" if self.logical else "physical"
        return f"cpu{self.vcpu} INIT + STARTUP {self.vector:#x} to {self.dest:#x} ({mode})"


@dataclass(frozen=True, slots=True)
class SetBase(Macro):
    """An IA32_APIC_BASE write by the guest (WRMSR) or the host (KVM_SET_MSRS, ``host``):
    ``address | mode bits | BSP bit | reserved``.  ``mode`` is ``disabled`` (EN=0, EXTD=0),
    ``xapic`` (EN), ``x2apic`` (EN|EXTD) or ``extd`` (EXTD alone: invalid); ``bsp`` keeps the
    vCPU's current BSP bit, sets it or clears it."""

    vcpu: int
    host: bool
    mode: str
    address: int = DEFAULT_BASE
    bsp: str = "keep"
    reserved: int = 0

    ACTION = "set_base"
    FIELDS = {  # noqa: RUF012
        "vcpu": VCPU,
        "host": Field("bool", True),
        "mode": Field("choice", True, choices=tuple(BASE_MODES), hi=-1),
        "address": Field("int", False, DEFAULT_BASE, hi=(1 << 52) - 1),
        "bsp": Field("choice", False, "keep", choices=BSP_CHOICES, hi=-1),
        "reserved": Field("int", False, 0, hi=U64),
    }

    def expand(self, vm: OpVm) -> list[Op]:
        current = vm.get_msr(self.vcpu, APIC_BASE_MSR)
        bsp = {"keep": current & BSP, "set": BSP, "clear": 0}[self.bsp]
        value = self.address | BASE_MODES[self.mode] | bsp | self.reserved
        if self.host:
            return [SetMsr(self.vcpu, APIC_BASE_MSR, value)]
        return [Wrmsr(self.vcpu, APIC_BASE_MSR, value)]

    def describe(self) -> str:
        who = "host set_msr" if self.host else "wrmsr"
        extra = f" reserved={self.reserved:#x}" if self.reserved else ""
        return (
            f"cpu{self.vcpu} {who} APIC_BASE {self.mode} at {self.address:#x} bsp={self.bsp}"
            f"{extra}"
        )


@dataclass(frozen=True, slots=True)
class Restore(Macro):
    """KVM_SET_LAPIC of the vCPU's own KVM_GET_LAPIC image with some dwords replaced: a value,
    or ``None`` for the dword as read (``"as read"`` in a scenario), so ``((0x80, None),)``
    restores the image unchanged."""

    vcpu: int
    writes: tuple[tuple[int, int | None], ...]

    ACTION = "restore"
    FIELDS = {"vcpu": VCPU, "writes": Field("restore", True)}  # noqa: RUF012
    RESULT = int

    def expand(self, vm: OpVm) -> list[Op]:
        image = vm.get_lapic(self.vcpu)
        writes: dict[int, int] = {}
        for off, v in self.writes:
            writes[off] = int.from_bytes(image[off : off + 4], "little") if v is None else v
        return [SetLapic(self.vcpu, tuple(writes.items()))]

    def describe(self) -> str:
        w = ", ".join(f"{o:#x}={'as read' if v is None else hex(v)}" for o, v in self.writes)
        return f"host restore cpu{self.vcpu} {{{w}}}"


PRIMITIVES: tuple[type[Op], ...] = (
    Wrmsr, Rdmsr, MmioWrite, MmioRead, Icr, Hypercall, Msi, SetMsr, GetMsr, GetLapic, SetLapic,
    SetCr8, Run, Halt, Advance, SendIpi, SetTpr, Eoi,
)  # fmt: skip
MACROS: tuple[type[Op], ...] = (RegWrite, RegRead, Ipi, InitSipi, SetBase, Restore)
OPS: dict[str, type[Op]] = {cls.ACTION: cls for cls in (*PRIMITIVES, *MACROS)}
"""Every operation by its scenario action name."""
GUEST_ACTIONS = frozenset({"send_ipi", "set_tpr", "eoi"})

Primitive = MmioRead | MmioWrite | Rdmsr | Wrmsr | SetMsr | GetMsr | Msi | SetLapic | SetCr8
"""The primitives of a differential program: one guest access or one host ioctl each, which
both backends perform alike (``tests/differential``)."""
PRIMITIVE_TYPES = (MmioRead, MmioWrite, Rdmsr, Wrmsr, SetMsr, GetMsr, Msi, SetLapic, SetCr8)
GUEST_PRIMITIVES = (MmioRead, MmioWrite, Rdmsr, Wrmsr)
"""The primitives that are one access by the guest of their ``vcpu``."""
"""Actions that call the Python guest (a scenario needs ``[guest]``)."""


def op_from_toml(table: Mapping[str, Any]) -> Op:
    """The operation of a ``[[step]]`` table, by its ``action``."""
    action = table.get("action")
    if not isinstance(action, str) or action not in OPS:
        raise ApicValueError(f"action={action!r} is not one of {', '.join(OPS)}")
    return OPS[action].from_toml(table)
