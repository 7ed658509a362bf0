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

from collections.abc import Mapping
from typing import Any

from apicsim.ops.core import (
    APIC_BASE_MSR,
    ARG,
    AS_READ,
    BASE_MODES,
    BSP,
    BSP_CHOICES,
    DEFAULT_BASE,
    DEST_MODES,
    EN,
    EXTD,
    GPA,
    ICR_MSR,
    IPI_KINDS,
    LEVELS,
    MODES,
    MSR,
    OFFSET,
    SELF_IPI_MSR,
    SHORTHANDS,
    SIZE,
    TRIGGERS,
    TSC_DEADLINE_MSR,
    U32,
    U64,
    VALUE,
    VCPU,
    X2APIC_MSR,
    Field,
    GuestDriver,
    HostOnly,
    HypercallCpu,
    Op,
    OpBackend,
    OpCpu,
    OpVm,
    Unsupported,
    render_toml,
    window,
    x2apic_mode,
)
from apicsim.ops.macros import (
    InitSipi,
    Ipi,
    Macro,
    RegRead,
    RegWrite,
    Restore,
    SetBase,
)
from apicsim.ops.primitives import (
    Advance,
    Enter,
    Eoi,
    GetLapic,
    GetMsr,
    Halt,
    Hypercall,
    Icr,
    MmioRead,
    MmioWrite,
    MovFromCr8,
    MovToCr8,
    Msi,
    Preempt,
    Rdmsr,
    Run,
    SendIpi,
    SetCr8,
    SetLapic,
    SetMsr,
    SetTpr,
    Wrmsr,
)
from lapic.faults import ApicValueError

PRIMITIVES: tuple[type[Op], ...] = (
    Wrmsr, Rdmsr, MmioWrite, MmioRead, MovToCr8, MovFromCr8, Icr, Hypercall, Msi, SetMsr, GetMsr,
    GetLapic, SetLapic, SetCr8, Run, Halt, Preempt, Enter, Advance, SendIpi, SetTpr, Eoi,
)  # fmt: skip
MACROS: tuple[type[Op], ...] = (RegWrite, RegRead, Ipi, InitSipi, SetBase, Restore)
OPS: dict[str, type[Op]] = {cls.ACTION: cls for cls in (*PRIMITIVES, *MACROS)}
"""Every operation by its scenario action name."""
GUEST_ACTIONS = frozenset({"send_ipi", "set_tpr", "eoi"})

Primitive = (
    MmioRead | MmioWrite | Rdmsr | Wrmsr | MovToCr8 | MovFromCr8 | SetMsr | GetMsr | Msi
    | SetLapic | SetCr8
)
"""The primitives of a differential program: one guest access or one host ioctl each, which
both backends perform alike (``tests/differential``)."""
PRIMITIVE_TYPES = (
    MmioRead, MmioWrite, Rdmsr, Wrmsr, MovToCr8, MovFromCr8, SetMsr, GetMsr, Msi, SetLapic, SetCr8,
)  # fmt: skip
GUEST_PRIMITIVES = (MmioRead, MmioWrite, Rdmsr, Wrmsr, MovToCr8, MovFromCr8)
"""The primitives that are one access by the guest of their ``vcpu``."""
"""Actions that call the Python guest (a scenario needs ``[guest]``)."""


def op_from_toml(table: Mapping[str, Any]) -> Op:
    """The operation of a ``[[step]]`` table, by its ``action``."""
    action = table.get("action")
    if not isinstance(action, str) or action not in OPS:
        raise ApicValueError(f"action={action!r} is not one of {', '.join(OPS)}")
    return OPS[action].from_toml(table)


__all__ = [
    "APIC_BASE_MSR",
    "ARG",
    "AS_READ",
    "BASE_MODES",
    "BSP",
    "BSP_CHOICES",
    "DEFAULT_BASE",
    "DEST_MODES",
    "EN",
    "EXTD",
    "GPA",
    "GUEST_ACTIONS",
    "GUEST_PRIMITIVES",
    "ICR_MSR",
    "IPI_KINDS",
    "LEVELS",
    "MACROS",
    "MODES",
    "MSR",
    "OFFSET",
    "OPS",
    "PRIMITIVES",
    "PRIMITIVE_TYPES",
    "SELF_IPI_MSR",
    "SHORTHANDS",
    "SIZE",
    "TRIGGERS",
    "TSC_DEADLINE_MSR",
    "U32",
    "U64",
    "VALUE",
    "VCPU",
    "X2APIC_MSR",
    "Advance",
    "Enter",
    "Eoi",
    "Field",
    "GetLapic",
    "GetMsr",
    "GuestDriver",
    "Halt",
    "HostOnly",
    "Hypercall",
    "HypercallCpu",
    "Icr",
    "InitSipi",
    "Ipi",
    "Macro",
    "MmioRead",
    "MmioWrite",
    "MovFromCr8",
    "MovToCr8",
    "Msi",
    "Op",
    "OpBackend",
    "OpCpu",
    "OpVm",
    "Preempt",
    "Primitive",
    "Rdmsr",
    "RegRead",
    "RegWrite",
    "Restore",
    "Run",
    "SendIpi",
    "SetBase",
    "SetCr8",
    "SetLapic",
    "SetMsr",
    "SetTpr",
    "Unsupported",
    "Wrmsr",
    "op_from_toml",
    "render_toml",
    "window",
    "x2apic_mode",
]
