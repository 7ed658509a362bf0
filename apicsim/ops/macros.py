"""The macro operations: expanded into primitives against a VM's state when they run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apicsim.ops.core import (
    APIC_BASE_MSR,
    BASE_MODES,
    BSP,
    BSP_CHOICES,
    DEFAULT_BASE,
    ICR_MSR,
    U32,
    U64,
    VALUE,
    VCPU,
    X2APIC_MSR,
    Field,
    Op,
    OpBackend,
    OpVm,
    x2apic_mode,
)
from apicsim.ops.primitives import (
    MmioRead,
    MmioWrite,
    Rdmsr,
    SetLapic,
    SetMsr,
    Wrmsr,
)
from lapic.icr import DeliveryMode, DestMode, Level


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


