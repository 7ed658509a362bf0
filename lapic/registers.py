"""The local APIC register table: the one source of truth for every register.

Each row names a register of the 4 KiB APIC page (SDM Vol. 3 Table 10-1 "Local APIC Register
Address Map") and of the x2APIC MSR range (SDM Table 10-6 "Local APIC Register Address Map
Supported by x2APIC"), with KVM's view of it (``kvm_lapic_readable_reg_mask``,
``kvm_lapic_reg_write``, ``kvm_x2apic_msr_read/write``; reference ``kvm_lapic.md`` §1.1, §15):

* ``offset``: xAPIC MMIO offset; ``msr``: x2APIC MSR (``0x800 + offset >> 4``) or ``None`` where
  x2APIC mode has no such register (APR, RRD, DFR, ICR2: any access #GPs);
* ``reset``/``init``: value after RESET and after INIT (``None`` = computed by the APIC, or for
  ``init``: unchanged);
* ``xapic``/``x2apic``: ``Access`` in that mode.  A read of a non-readable register is not
  serviced over MMIO and #GPs over RDMSR; a write to a non-writable register is ignored over
  MMIO and #GPs over WRMSR;
* ``write_mask``: the bits a write stores (the register's handler in ``lapic.apic`` applies it,
  plus any profile adjustments, e.g. SDM read-only LVT status bits);
* ``feature``: a register that exists only with an optional feature (``"cmci"``).

MMIO and MSR dispatch, the state image, the docs table (``python -m lapic.registers``) and the
hypothesis strategies all come from :data:`REGISTERS`.

Not modelled: the 0x900-0xBFF MSR range (reserved by the SDM; KVM does not route it to the
APIC, so the generic unknown-MSR #GP applies and the model raises #GP too).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Flag

from lapic.fields import Field, Layout


class Access(Flag):
    NONE = 0
    R = 1
    W = 2
    RW = 3

    def __repr__(self) -> str:
        return f"Access.{self.name}"


R, W, RW, NO = Access.R, Access.W, Access.RW, Access.NONE

# Declared bit layouts (SDM Vol. 3 Figures 10-8 LVT, 10-23 SVR, 10-7 LVR, 10-18 TPR/PPR,
# 10-5 IA32_APIC_BASE, 10-6/10-13/10-14 ID/LDR/DFR, 10-10 TDCR).  The constants below are
# derived from them; ``lapic.apic`` uses the constants on its hot paths.
LVT = Layout(
    "LVT",
    32,
    Field("vector", 0, 8),
    Field("delivery_mode", 8, 3),
    Field("delivery_status", 12, 1),
    Field("polarity", 13, 1),
    Field("remote_irr", 14, 1),
    Field("trigger", 15, 1),
    Field("masked", 16, 1),
    Field("timer_mode", 17, 2),
)
"""Every LVT entry (the timer-mode field exists in LVTT only; the register's write mask says
which fields an entry has)."""
SVR = Layout(
    "SVR",
    32,
    Field("vector", 0, 8),
    Field("enable", 8, 1),
    Field("focus_disable", 9, 1),
    Field("suppress_eoi_broadcast", 12, 1),
)
LVR = Layout(
    "LVR", 32, Field("version", 0, 8), Field("max_lvt", 16, 8), Field("directed_eoi", 24, 1)
)
PRIORITY = Layout("PRIORITY", 32, Field("subclass", 0, 4), Field("klass", 4, 4))
"""TPR, PPR and APR: priority class 7:4 (``klass``) and sub-class 3:0."""
XAPIC_ID = Layout("ID", 32, Field("id", 24, 8))
"""The xAPIC ID register (in x2APIC mode the whole dword is the 32-bit ID)."""
XAPIC_LDR = Layout("LDR", 32, Field("logical_id", 24, 8))
DFR = Layout("DFR", 32, Field("model", 28, 4))
TDCR = Layout("TDCR", 32, Field("divide_low", 0, 2), Field("divide_high", 3, 1))
APIC_BASE = Layout(
    "IA32_APIC_BASE",
    64,
    Field("bsp", 8, 1),
    Field("extd", 10, 1),
    Field("en", 11, 1),
    Field("base", 12, 52),
)
"""MSR 0x1B; which ``base`` bits exist depends on MAXPHYADDR (checked by the APIC)."""

LVT_MASKED = LVT["masked"].mask
LVT_DELIVERY_STATUS = LVT["delivery_status"].mask
LVT_REMOTE_IRR = LVT["remote_irr"].mask
LVT_LEVEL = LVT["trigger"].mask
LVT_TIMER_MODE = LVT["timer_mode"].mask
TIMER_ONESHOT = LVT["timer_mode"].place(0)
TIMER_PERIODIC = LVT["timer_mode"].place(1)
TIMER_TSC_DEADLINE = LVT["timer_mode"].place(2)
LVT_MASK = LVT_MASKED | LVT_DELIVERY_STATUS | LVT["vector"].mask
"""KVM ``LVT_MASK``: masked | delivery status | vector."""
LINT_MASK = (
    LVT_MASK | LVT["delivery_mode"].mask | LVT["polarity"].mask | LVT_REMOTE_IRR | LVT_LEVEL
)
"""KVM ``LINT_MASK``: LVT_MASK | delivery mode | polarity | remote IRR | trigger."""

SVR_ENABLE = SVR["enable"].mask
SVR_FOCUS_DISABLE = SVR["focus_disable"].mask
SVR_SUPPRESS_EOI_BROADCAST = SVR["suppress_eoi_broadcast"].mask
LVR_DIRECTED_EOI = LVR["directed_eoi"].mask
KVM_APIC_VERSION = 0x14

ESR_SEND_CS = 0x01
ESR_RECV_CS = 0x02
ESR_SEND_ACCEPT = 0x04
ESR_RECV_ACCEPT = 0x08
ESR_REDIRECTABLE_IPI = 0x10
ESR_SEND_ILLEGAL_VECTOR = 0x20
ESR_RECV_ILLEGAL_VECTOR = 0x40
ESR_ILLEGAL_REGISTER = 0x80

DFR_FLAT = 0xFFFFFFFF
DFR_CLUSTER = 0x0FFFFFFF


@dataclass(frozen=True, slots=True)
class Register:
    name: str
    offset: int
    msr: int | None
    reset: int | None
    init: int | None
    xapic: Access
    x2apic: Access
    write_mask: int
    title: str
    feature: str | None = None
    is_lvt: bool = False

    def __repr__(self) -> str:
        msr = "None" if self.msr is None else f"{self.msr:#x}"
        return f"REGISTER_BY_NAME[{self.name!r}]  # offset {self.offset:#05x}, msr {msr}"


# The helpers below run only at import time, to build REGISTERS.  mutmut switches a mutant on
# after the table is built, so a mutant of them can never be observed (killed or not); the
# rows themselves are pinned by tests/lapic/test_registers.py::test_every_row_of_the_table_*.
def _msr(offset: int) -> int:  # pragma: no mutate block
    return 0x800 + (offset >> 4)


def _reg(
    name: str,
    offset: int,
    reset: int | None,
    init: int | None,
    xapic: Access,
    x2apic: Access,
    write_mask: int,
    title: str,
    *,
    has_msr: bool = True,
    feature: str | None = None,
    is_lvt: bool = False,
) -> Register:  # pragma: no mutate block
    return Register(
        name,
        offset,
        _msr(offset) if has_msr else None,
        reset,
        init,
        xapic,
        x2apic,
        write_mask,
        title,
        feature,
        is_lvt,
    )


def _vector_words(
    stem: str, base: int, title: str
) -> list[Register]:  # pragma: no mutate block
    return [
        _reg(f"{stem}{n}", base + 0x10 * n, 0, 0, R, R, 0, f"{title} bits {32 * n + 31}:{32 * n}")
        for n in range(8)
    ]


def _lvt(
    name: str, offset: int, mask: int, title: str, feature: str | None = None
) -> Register:  # pragma: no mutate block
    return _reg(
        name, offset, LVT_MASKED, LVT_MASKED, RW, RW, mask, title, feature=feature, is_lvt=True
    )


REGISTERS: tuple[Register, ...] = (
    # name, offset, RESET, INIT, xAPIC, x2APIC, write mask, title
    _reg("ID", 0x020, None, None, RW, R, 0xFF000000, "Local APIC ID"),
    _reg("LVR", 0x030, None, None, R, R, 0, "Local APIC Version"),
    _reg("TPR", 0x080, 0, 0, RW, RW, 0xFF, "Task Priority"),
    _reg("APR", 0x090, 0, 0, R, NO, 0, "Arbitration Priority", has_msr=False),
    _reg("PPR", 0x0A0, 0, 0, R, R, 0, "Processor Priority"),
    _reg("EOI", 0x0B0, 0, 0, W, W, 0, "End Of Interrupt"),
    _reg("RRD", 0x0C0, 0, 0, NO, NO, 0, "Remote Read", has_msr=False),
    _reg("LDR", 0x0D0, 0, 0, RW, R, 0xFF000000, "Logical Destination (x2APIC: derived, kept)"),
    _reg("DFR", 0x0E0, DFR_FLAT, DFR_FLAT, RW, NO, 0xF0000000, "Destination Format",
         has_msr=False),
    _reg("SVR", 0x0F0, 0xFF, 0xFF, RW, RW, 0x3FF, "Spurious Interrupt Vector"),
    *_vector_words("ISR", 0x100, "In-Service Register"),
    *_vector_words("TMR", 0x180, "Trigger Mode Register"),
    *_vector_words("IRR", 0x200, "Interrupt Request Register"),
    _reg("ESR", 0x280, 0, 0, RW, RW, 0, "Error Status"),
    _lvt("LVTCMCI", 0x2F0, 0x117FF, "LVT Corrected Machine Check Interrupt", "cmci"),
    _reg("ICR", 0x300, 0, 0, RW, RW, 0xFFFFFFFF, "Interrupt Command (low; 64-bit in x2APIC)"),
    _reg("ICR2", 0x310, 0, 0, RW, NO, 0xFF000000, "Interrupt Command (high)", has_msr=False),
    _lvt("LVTT", 0x320, LVT_MASK | LVT_TIMER_MODE, "LVT Timer"),
    _lvt("LVTTHMR", 0x330, 0x117FF, "LVT Thermal Sensor"),
    _lvt("LVTPC", 0x340, 0x117FF, "LVT Performance Monitoring Counters"),
    _lvt("LVT0", 0x350, LINT_MASK, "LVT LINT0"),
    _lvt("LVT1", 0x360, LINT_MASK, "LVT LINT1"),
    _lvt("LVTERR", 0x370, LVT_MASK, "LVT Error"),
    _reg("TMICT", 0x380, 0, 0, RW, RW, 0xFFFFFFFF, "Timer Initial Count"),
    _reg("TMCCT", 0x390, 0, 0, R, R, 0, "Timer Current Count"),
    _reg("TDCR", 0x3E0, 0, 0, RW, RW, 0xB, "Timer Divide Configuration"),
    _reg("SELF_IPI", 0x3F0, 0, 0, NO, W, 0xFF, "SELF IPI (x2APIC only)"),
)

REGISTER_BY_NAME: dict[str, Register] = {r.name: r for r in REGISTERS}
REGISTER_BY_OFFSET: dict[int, Register] = {r.offset: r for r in REGISTERS}
REGISTER_BY_MSR: dict[int, Register] = {r.msr: r for r in REGISTERS if r.msr is not None}

LVT_REGISTERS: tuple[Register, ...] = tuple(r for r in REGISTERS if r.is_lvt)

APIC_BASE_MSR = 0x1B
X2APIC_MSR_FIRST = 0x800
X2APIC_MSR_LAST = 0x8FF
TSC_DEADLINE_MSR = 0x6E0

ISR_BASE = 0x100
TMR_BASE = 0x180
IRR_BASE = 0x200

APIC_PAGE_SIZE = 0x1000
STATE_SIZE = 0x400
"""``KVM_APIC_REG_SIZE``: ``struct kvm_lapic_state`` is the first 1 KiB of the page."""

APIC_BASE_BSP = APIC_BASE["bsp"].mask
APIC_BASE_EXTD = APIC_BASE["extd"].mask
APIC_BASE_EN = APIC_BASE["en"].mask
APIC_BASE_ADDR_MASK = 0xFFFF_FFFF_FFFF_F000
"""The APIC window address in IA32_APIC_BASE: bits 63:12, of which only MAXPHYADDR-1:12 can be
set (the rest are reserved, #GP on WRMSR).  SDM Vol. 3A 10.4.4 (Figure 10-5): "APIC Base" is
bits MAXPHYADDR-1:12.  KVM agrees: ``apic->base_address = apic_base & MSR_IA32_APICBASE_BASE``
where the constant ``(0xfffff<<12)`` is a negative ``int`` that sign-extends to bits 63:12 in
that u64 expression.  Measured on this host by tests/kvm (a window at 0x1_FEE00000 is the APIC
and 0xFEE00000 is not), which corrects the reference's KVMB-7 "bits 31:12"."""
APIC_DEFAULT_BASE = 0xFEE00000


def markdown_table() -> str:
    """The register table as Markdown (used by ``specs/registers.md``)."""

    def acc(a: Access) -> str:
        return {R: "R", W: "W", RW: "RW", NO: "-"}[a]

    lines = [
        "| Register | Offset | MSR | RESET | INIT | xAPIC | x2APIC | write mask | Title |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in REGISTERS:
        lines.append(
            "| {} | {:#05x} | {} | {} | {} | {} | {} | {:#x} | {}{} |".format(
                r.name,
                r.offset,
                "-" if r.msr is None else f"{r.msr:#x}",
                "computed" if r.reset is None else f"{r.reset:#x}",
                "unchanged" if r.init is None else f"{r.init:#x}",
                acc(r.xapic),
                acc(r.x2apic),
                r.write_mask,
                r.title,
                f" (with {r.feature})" if r.feature else "",
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
