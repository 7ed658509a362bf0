"""Decoded views of one local APIC: ``LocalApic.dump()`` as QEMU's ``info lapic`` prints it.

Implements the text of QEMU's ``hmp_info_local_apic`` (``target/i386/cpu-dump.c``
``dump_apic_lvt``/``dump_apic_icr``): each LVT entry decoded (polarity, trigger, remote IRR,
masked, timer mode, delivery mode, vector), the timer (TDCR with its divider, TMICT, TMCCT),
SVR (enabled, focus checking, spurious vector), ICR and its destination decoded, ESR, ISR, IRR
(vectors in hex, level-triggered ones marked ``(level)`` from the TMR), then APR, TPR, DFR,
LDR and PPR.  Only what the mode has is shown: x2APIC has no DFR, no APR and a 64-bit ICR;
a hardware-disabled APIC shows its base only.  Values are hex, counts decimal.  The pending
events (NMI, SMI, INIT, SIPI) follow on one line.  ``html`` gives the same rows as a table.

Not modelled: QEMU's per-CPU header (``dumping local APIC state for CPU n``) is replaced by
one naming the vCPU, mode, profile and IA32_APIC_BASE.
"""

from __future__ import annotations

import html as _html
from typing import TYPE_CHECKING

from lapic.core import ApicMode
from lapic.vectors import VectorSet
from lapic.writers import LVT_ORDER, LVT_WORDS

if TYPE_CHECKING:
    from lapic.apic import LocalApic

DELIVERY = ("Fixed", "LowPrio", "SMI", "Res3", "NMI", "INIT", "SIPI", "ExtINT")
"""Delivery mode names by bits 10:8 (QEMU's ``dm2str``)."""
_TIMER_MODES = ("one-shot", "periodic", "tsc-deadline", "reserved")
_SHORTHAND = ("no-shorthand", "self", "all-self", "all")


def decode_lvt(name: str, value: int) -> str:
    """One LVT entry as QEMU prints it: ``0x00010700 active-hi edge masked ExtINT (vec 0)``."""
    dm = (value >> 8) & 7
    parts = [
        f"{value:#010x}",
        "active-lo" if value & (1 << 13) else "active-hi",
        "level" if value & (1 << 15) else "edge",
    ]
    if value & (1 << 14):
        parts.append("rIRR")
    if value & (1 << 12):
        parts.append("pending")
    if value & (1 << 16):
        parts.append("masked")
    if name == "LVTT":
        parts.append(_TIMER_MODES[(value >> 17) & 3])
        dm = 0
    parts.append(DELIVERY[dm])
    if dm != 4:  # NMI has no vector
        parts.append(f"(vec {value & 0xFF:#04x})")
    return " ".join(parts)


def decode_icr(low: int, dest: int, *, x2apic: bool) -> str:
    """The ICR's fields: destination mode, trigger, level, shorthand, delivery mode, vector,
    destination (QEMU ``dump_apic_icr``)."""
    dm = (low >> 8) & 7
    logical = bool(low & (1 << 11))
    return (
        f"{'logical' if logical else 'physical'} "
        f"{'level' if low & (1 << 15) else 'edge'} "
        f"{'assert' if low & (1 << 14) else 'de-assert'} "
        f"{_SHORTHAND[(low >> 18) & 3]} {DELIVERY[dm]} vec {low & 0xFF:#04x} "
        f"dest {dest:#x}{' (x2APIC)' if x2apic else ''}"
    )


def _vectors(vs: VectorSet, tmr: VectorSet | None = None) -> str:
    if not vs:
        return "(none)"
    return " ".join(
        f"{v:#04x}{'(level)' if tmr is not None and v in tmr else ''}" for v in vs
    )


def rows(apic: LocalApic) -> list[tuple[str, str]]:
    """The dump as (register, decoded value) rows."""
    mode = apic.mode
    out: list[tuple[str, str]] = [
        ("vCPU", f"{apic.vcpu_id} [{apic.profile.name}] {mode.name}"),
        ("APIC_BASE", f"{apic.apic_base:#x}{' BSP' if apic.apic_base & 0x100 else ''}"),
    ]
    if mode is ApicMode.DISABLED:
        return out
    x2 = mode is ApicMode.X2APIC
    out.append(("ID", f"{apic.id_register:#010x}"))
    for name in LVT_ORDER[: apic.lvt_count]:
        out.append((name, decode_lvt(name, int(apic._w[LVT_WORDS[name]]))))
    tdcr = apic.register("TDCR")
    div_code = ((tdcr >> 1) & 4) | (tdcr & 3)
    divide = 1 if div_code == 7 else 2 << div_code
    out.append(
        (
            "Timer",
            f"DCR={tdcr:#x} (divide by {divide}) initial_count={apic.register('TMICT'):#x} "
            f"current_count={apic.register('TMCCT'):#x}",
        )
    )
    svr = apic.svr
    out.append(
        (
            "SPIV",
            f"{svr:#010x} APIC {'enabled' if svr & 0x100 else 'disabled'}, "
            f"focus={'off' if svr & 0x200 else 'on'}, spurious vec {svr & 0xFF:#04x}",
        )
    )
    icr = apic.icr
    low = icr & 0xFFFFFFFF
    dest = icr >> 32 if x2 else (icr >> 56) & 0xFF
    out.append(("ICR", f"{icr:#018x} " + decode_icr(low, dest, x2apic=x2)))
    out.append(("ESR", f"{apic.esr:#010x}"))
    tmr = apic._tmr
    out.append(("ISR", _vectors(apic._isr, tmr)))
    out.append(("IRR", _vectors(apic._irr, tmr)))
    prio = f"TPR {apic.tpr:#04x} PPR {apic.ppr:#04x} LDR {apic.ldr:#010x}"
    if not x2:
        prio = f"APR {apic.register('APR'):#04x} " + prio + f" DFR {apic.dfr:#010x}"
    out.append(("Priorities", prio))
    pend = apic.events.frozen().describe()
    if pend:
        out.append(("Pending", ", ".join(pend)))
    return out


def text(apic: LocalApic) -> str:
    """``info lapic`` text: one register per line."""
    r = rows(apic)
    head = f"LocalApic vcpu {r[0][1]} base={r[1][1]}"
    return "\n".join([head, *(f"  {k:<10} {v}" for k, v in r[2:])])


def html(apic: LocalApic) -> str:
    """The same rows as an HTML table (``_repr_html_`` for notebooks)."""
    body = "".join(
        f"<tr><th style='text-align:left'>{_html.escape(k)}</th>"
        f"<td style='text-align:left'><code>{_html.escape(v)}</code></td></tr>"
        for k, v in rows(apic)
    )
    return f"<table>{body}</table>"
