"""The operation vocabulary's foundation: constants, the backend Protocols, field
declarations and the :class:`Op` base class (``apicsim.ops`` re-exports all of it)."""

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
    """One field of an action: its kind (``int``, ``bool``, ``choice``, ``cpus``, ``vectors``,
    ``writes``, ``restore``), whether it is required, its default and its range or choices.  For a
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
            elif spec.kind in ("cpus", "vectors"):
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
            elif spec.kind in ("cpus", "vectors"):
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


