"""Decoded views of a VM: the per-vCPU state table and ``Vm.dump()`` (presentation only).

Implements :func:`table` (one row per vCPU: index, APIC ID, mode, TPR/PPR, IRR/ISR/TMR in hex,
pending NMI/SMI/INIT/SIPI, run state, mp_state, pCPU, exits, and the accelerator's view of the
vCPU: ``vm.accel.vcpu_state(vcpu)`` where the accelerator has that method, else its name),
:func:`dump` (the VM's configuration and counters, then each vCPU and its APIC decoded as QEMU's
``info lapic`` prints it, ``lapic.dump``), :func:`html_table` (the table for notebooks) and
:func:`errno_text` (a negative errno result as ``-KVM_ENOSYS``, the names of KVM's
``include/uapi/linux/kvm_para.h`` and the host errnos KVM returns).

Not modelled: anything about state (every function reads the VM and changes nothing).
"""

from __future__ import annotations

import html as _html
from typing import TYPE_CHECKING

from lapic.core import ApicMode

if TYPE_CHECKING:
    from hypervisor.vm import Vm

_MODE = {ApicMode.DISABLED: "off", ApicMode.XAPIC: "xapic", ApicMode.X2APIC: "x2apic"}
COLUMNS = ("vcpu", "id", "mode", "tpr", "ppr", "irr", "isr", "tmr", "pending", "run", "mp",
           "pcpu", "exits", "accel")
"""The table's columns, in order."""

ERRNO_NAMES = {
    1000: "KVM_ENOSYS",
    14: "KVM_EFAULT",
    22: "KVM_EINVAL",
    7: "KVM_E2BIG",
    1: "KVM_EPERM",
    95: "KVM_EOPNOTSUPP",
}
"""Negative return values of hypercalls by name (``include/uapi/linux/kvm_para.h``:
KVM_ENOSYS 1000, KVM_EFAULT = EFAULT, KVM_EINVAL = EINVAL, KVM_E2BIG = E2BIG, KVM_EPERM =
EPERM, KVM_EOPNOTSUPP 95)."""


def errno_text(value: int, bits: int = 64) -> str:
    """A hypercall result: ``-KVM_ENOSYS`` for a negative errno (also as the two's complement
    RAX holds), the number in decimal otherwise."""
    if 0 < value < 1 << bits and value >> (bits - 1):
        value -= 1 << bits
    if value < 0 and -value in ERRNO_NAMES:
        return f"-{ERRNO_NAMES[-value]}"
    return str(value)


def _vectors(vs: object) -> str:
    return "{" + ",".join(f"{v:#x}" for v in vs) + "}"  # type: ignore[attr-defined]


def rows(vm: Vm) -> list[tuple[str, ...]]:
    """One tuple of cell texts per vCPU, in :data:`COLUMNS` order."""
    out: list[tuple[str, ...]] = []
    describe = getattr(vm.accel, "vcpu_state", None)
    for v in vm.vcpus:
        a = v.apic
        pend = ", ".join(a.events.frozen().describe()) or "-"
        out.append(
            (
                str(v.index),
                f"{a.id_register >> 24 if a.mode is ApicMode.XAPIC else a.id_register:#x}",
                _MODE.get(a.mode, a.mode.name),
                f"{a.tpr:#04x}",
                f"{a.ppr:#04x}",
                _vectors(a._irr),
                _vectors(a._isr),
                _vectors(a._tmr),
                pend,
                v.run_state.value,
                v.mp_state.name.lower(),
                "-" if v.pcpu is None else str(v.pcpu),
                str(v.exits),
                str(describe(v)) if callable(describe) else vm.accel.name,
            )
        )
    return out


def table(vm: Vm) -> str:
    """The per-vCPU state table as aligned text."""
    body = [COLUMNS, *rows(vm)]
    widths = [max(len(r[i]) for r in body) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in body
    )


def html_table(vm: Vm) -> str:
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td><code>{_html.escape(c)}</code></td>" for c in r) + "</tr>"
        for r in rows(vm)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def dump(vm: Vm) -> str:
    lines = [
        f"Vm {len(vm)} vCPUs [{vm.profile.name}] accel={vm.accel.name} "
        f"x2apic_format={vm.x2apic_format} broadcast_quirk={vm.broadcast_quirk} "
        f"vector_hashing={vm.vector_hashing}",
        f"  map: {vm.apic_map!r}",
        f"  {vm.stats!r}",
    ]
    for v in vm.vcpus:
        lines.append(f"  {v!r}")
        lines.extend("    " + line for line in v.apic.dump().splitlines())
    return "\n".join(lines)
