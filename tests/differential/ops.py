"""The operations of a differential program.

A program is a topology (how many vCPUs, which ids, the VM's X2APIC_API flags) and a list of
operations.  *Primitive* operations are one guest instruction or one host ioctl each, and map
one-to-one onto a scenario action (``specs/scenarios/README.md``).  *Macro* operations say what
to do, not how: ``Icr`` is one WRMSR 0x830 in x2APIC mode but ICR2 then ICR through MMIO in
xAPIC mode, ``SetBase`` keeps the vCPU's current BSP bit, ``Restore`` rewrites words of the
image it reads.  The engine expands a macro against the model's state at the time it runs, so
a mode change earlier in the program changes how later operations are carried out; both
backends then perform the same primitives.
"""

from __future__ import annotations

from dataclasses import dataclass

APIC_BASE_MSR = 0x1B
TSC_DEADLINE_MSR = 0x6E0
X2APIC_MSR = 0x800
ICR_MSR = 0x830
SELF_IPI_MSR = 0x83F
EN = 0x800
EXTD = 0x400
BSP = 0x100
DEFAULT_BASE = 0xFEE00000


# =============================================================================================
# Primitive operations: one scenario step each
# =============================================================================================
@dataclass(frozen=True, slots=True)
class MmioRead:
    """The guest of ``vcpu`` reads ``size`` bytes at ``offset`` of its current APIC window."""

    vcpu: int
    offset: int
    size: int = 4


@dataclass(frozen=True, slots=True)
class MmioWrite:
    """The guest of ``vcpu`` writes ``value`` (``size`` bytes) at ``offset`` of its window."""

    vcpu: int
    offset: int
    value: int
    size: int = 4


@dataclass(frozen=True, slots=True)
class Rdmsr:
    """The guest of ``vcpu`` executes RDMSR ``msr``."""

    vcpu: int
    msr: int


@dataclass(frozen=True, slots=True)
class Wrmsr:
    """The guest of ``vcpu`` executes WRMSR ``msr`` <- ``value``."""

    vcpu: int
    msr: int
    value: int


@dataclass(frozen=True, slots=True)
class SetMsr:
    """The host writes ``msr`` of ``vcpu`` with KVM_SET_MSRS (host-initiated)."""

    vcpu: int
    msr: int
    value: int


@dataclass(frozen=True, slots=True)
class GetMsr:
    """The host reads ``msr`` of ``vcpu`` with KVM_GET_MSRS.  The scenario format has no action
    for it, so a scenario records it as a comment."""

    vcpu: int
    msr: int


@dataclass(frozen=True, slots=True)
class Msi:
    """The host injects an MSI with KVM_SIGNAL_MSI."""

    address_lo: int
    address_hi: int
    data: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class SetLapic:
    """The host reads ``vcpu``'s KVM_GET_LAPIC image, replaces the given dwords and writes it
    back with KVM_SET_LAPIC (what the scenario action ``set_lapic`` does)."""

    vcpu: int
    writes: tuple[tuple[int, int], ...]


Primitive = MmioRead | MmioWrite | Rdmsr | Wrmsr | SetMsr | GetMsr | Msi | SetLapic
GUEST_PRIMITIVES = (MmioRead, MmioWrite, Rdmsr, Wrmsr)


# =============================================================================================
# Macro operations: expanded against the model's state when they run
# =============================================================================================
@dataclass(frozen=True, slots=True)
class RegWrite:
    """The guest writes register ``offset`` through the interface of its current mode: an
    MMIO write of the low 32 bits (xAPIC mode, or disabled), or WRMSR ``0x800 + offset >> 4``
    (x2APIC mode)."""

    vcpu: int
    offset: int
    value: int


@dataclass(frozen=True, slots=True)
class RegRead:
    """The guest reads register ``offset`` through the interface of its current mode."""

    vcpu: int
    offset: int


@dataclass(frozen=True, slots=True)
class Icr:
    """The guest of ``vcpu`` sends an IPI: WRMSR 0x830 ``dest << 32 | low`` in x2APIC mode,
    otherwise MMIO ICR2 ``(dest & 0xFF) << 24`` then ICR ``low``."""

    vcpu: int
    dest: int
    low: int


@dataclass(frozen=True, slots=True)
class InitSipi:
    """The INIT-SIPI sequence from ``vcpu`` to ``dest``: an INIT IPI (level assert), then a
    STARTUP IPI with ``vector``, each as :class:`Icr` would send it."""

    vcpu: int
    dest: int
    vector: int
    logical: bool = False


@dataclass(frozen=True, slots=True)
class SetBase:
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


MODE_BITS = {"disabled": 0, "xapic": EN, "x2apic": EN | EXTD, "extd": EXTD}


@dataclass(frozen=True, slots=True)
class Restore:
    """KVM_SET_LAPIC of the vCPU's own KVM_GET_LAPIC image with some dwords replaced: a value,
    or ``None`` for the dword as read (so ``((0x80, None),)`` restores the image unchanged)."""

    vcpu: int
    writes: tuple[tuple[int, int | None], ...]


Macro = RegWrite | RegRead | Icr | InitSipi | SetBase | Restore
Op = Primitive | Macro


def vcpu_of(op: Op) -> int | None:
    """The vCPU an operation acts on (None for an MSI, which the host sends to the VM)."""
    return None if isinstance(op, Msi) else op.vcpu


def describe(op: Op) -> str:
    """A one-line rendering, as in messages and scenario comments."""
    if isinstance(op, MmioRead):
        size = "" if op.size == 4 else f" /{op.size}"
        return f"cpu{op.vcpu} mmio_read +{op.offset:#05x}{size}"
    if isinstance(op, MmioWrite):
        size = "" if op.size == 4 else f" /{op.size}"
        return f"cpu{op.vcpu} mmio_write +{op.offset:#05x} = {op.value:#x}{size}"
    if isinstance(op, Rdmsr):
        return f"cpu{op.vcpu} rdmsr {op.msr:#x}"
    if isinstance(op, Wrmsr):
        return f"cpu{op.vcpu} wrmsr {op.msr:#x} = {op.value:#x}"
    if isinstance(op, SetMsr):
        return f"host set_msr cpu{op.vcpu} {op.msr:#x} = {op.value:#x}"
    if isinstance(op, GetMsr):
        return f"host get_msr cpu{op.vcpu} {op.msr:#x}"
    if isinstance(op, Msi):
        flags = f" flags={op.flags}" if op.flags else ""
        return f"host msi lo={op.address_lo:#x} hi={op.address_hi:#x} data={op.data:#x}{flags}"
    if isinstance(op, SetLapic):
        writes = ", ".join(f"{o:#x}={v:#x}" for o, v in op.writes)
        return f"host set_lapic cpu{op.vcpu} {{{writes}}}"
    if isinstance(op, RegWrite):
        return f"cpu{op.vcpu} write reg {op.offset:#05x} = {op.value:#x}"
    if isinstance(op, RegRead):
        return f"cpu{op.vcpu} read reg {op.offset:#05x}"
    if isinstance(op, Icr):
        return f"cpu{op.vcpu} IPI dest={op.dest:#x} icr={op.low:#x}"
    if isinstance(op, InitSipi):
        mode = "logical" if op.logical else "physical"
        return f"cpu{op.vcpu} INIT + STARTUP {op.vector:#x} to {op.dest:#x} ({mode})"
    if isinstance(op, SetBase):
        who = "host set_msr" if op.host else "wrmsr"
        extra = f" reserved={op.reserved:#x}" if op.reserved else ""
        return f"cpu{op.vcpu} {who} APIC_BASE {op.mode} at {op.address:#x} bsp={op.bsp}{extra}"
    writes = ", ".join(f"{o:#x}={'as read' if v is None else hex(v)}" for o, v in op.writes)
    return f"host restore cpu{op.vcpu} {{{writes}}}"
