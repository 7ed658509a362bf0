"""Bit coverage of the differential run: which writable bits of each compared register were
seen both 0 and 1 in the state the engine compared.

After every step the engine compares each vCPU's whole KVM_GET_LAPIC image and its
IA32_APIC_BASE (``engine.py``).  :class:`Coverage` folds every compared snapshot of the model
(equal to KVM's wherever the step agreed) into two bit sets, the bits seen 1 and the bits seen
0, and :meth:`Coverage.rows` reports per register how many of its *writable* bits were seen
both ways: a writable bit never seen 1 (or never 0) is a blind spot of the generators, since no
comparison could have caught a model that gets it wrong.

A register's writable bits (:data:`WRITABLE`) are its ``write_mask`` in ``lapic.registers``
(what a guest write stores), every bit of the ISR, TMR and IRR words (KVM_SET_LAPIC stores
them), and the bits of IA32_APIC_BASE a write may change on this host (BSP, EXTD, EN and the
window address up to the guest's MAXPHYADDR).  :data:`NOT_COVERED` lists what is left out, each
with its reason.  The report is printed by ``pytest -v`` and written to the file named by
``APICSIM_DIFF_COVERAGE``; ``test_differential.py`` fails when the run leaves a bit out.

The guest's MOV to CR8 (CR8-1) is counted the same way: the bits of every operand compared
(all 64 must be seen both 0 and 1, bits 63:4 being the reserved ones that #GP), and whether a
write that took effect, a #GP and a MOV from CR8 were each compared (``MOV_CR8`` and
``MOV_CR8_OUTCOMES`` rows).

Not here: coverage of the operations themselves (which kinds ran: ``harness.COUNTS``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from apicsim.ops import MovFromCr8, MovToCr8
from lapic.registers import (
    APIC_BASE_ADDR_MASK,
    APIC_BASE_BSP,
    APIC_BASE_EN,
    APIC_BASE_EXTD,
    REGISTERS,
    Register,
)
from tests.differential.engine import Snapshot, Trace
from tests.kvm.support import FEATURES

ENV_VAR = "APICSIM_DIFF_COVERAGE"
"""A file the coverage report is written to at the end of the run."""

NOT_COVERED: dict[str, str] = {
    "EOI": "write-only: the image holds no EOI value (an EOI's effect is the ISR, covered)",
    "SELF_IPI": "write-only (x2APIC): the image holds no value (its effect is the IRR, covered)",
    "TMICT": "the `timer` exclusion: an armed timer counts in wall-clock time on KVM, so only "
    "TMICT = 0 is generated",
}
if not FEATURES.cmci:
    NOT_COVERED["LVTCMCI"] = (
        "present only with the CMCI feature, which the KVM guest's CPUID does not advertise "
        "on this host (the register then reads 0 on both backends)"
    )
"""Registers with a write mask whose bits the run cannot show both ways, and why."""

U64 = (1 << 64) - 1
ICR_DELIVERY_STATUS = 1 << 12
"""KVM never stores ICR bit 12 (delivery status): ``kvm_lapic_reg_write`` clears it."""


def _writable() -> dict[str, tuple[int, int]]:
    """``name -> (offset, mask)`` of the image registers with writable bits."""
    out: dict[str, tuple[int, int]] = {}
    for reg in REGISTERS:
        mask = _mask(reg)
        if mask and reg.name not in NOT_COVERED:
            out[reg.name] = (reg.offset, mask)
    return out


def _mask(reg: Register) -> int:
    if reg.name[:3] in ("ISR", "TMR", "IRR") and reg.name[3:].isdigit():
        return 0xFFFFFFFF
    if reg.name == "ICR":
        return reg.write_mask & ~ICR_DELIVERY_STATUS
    if reg.name == "ICR2":
        return 0xFFFFFFFF  # the x2APIC ICR's destination: a 32-bit WRMSR of 0x830 stores it
    return reg.write_mask


WRITABLE = _writable()
"""Every compared register with writable bits (``name -> (offset, mask)``)."""

APIC_BASE_WRITABLE = (
    APIC_BASE_BSP
    | APIC_BASE_EXTD
    | APIC_BASE_EN
    | (APIC_BASE_ADDR_MASK & ((1 << FEATURES.maxphyaddr) - 1))
)
"""The window address bits up to the KVM guest's MAXPHYADDR (the bits above are reserved)."""


@dataclass(slots=True)
class Coverage:
    """The bits seen 1 and seen 0 in every compared snapshot (the image as one integer)."""

    ones: int = 0
    zeros: int = 0
    base_ones: int = 0
    base_zeros: int = 0
    snapshots: int = 0
    tests: set[str] = field(default_factory=set)
    cr8_ones: int = 0
    """Bits seen 1 in the operand of a compared guest MOV to CR8."""
    cr8_zeros: int = 0
    cr8_outcomes: int = 0
    """Bit 0: a MOV to CR8 took effect; bit 1: one raised #GP; bit 2: a MOV from CR8 read."""

    def add(self, snapshot: Snapshot) -> None:
        for vcpu in snapshot:
            image = int.from_bytes(vcpu.image, "little")
            self.ones |= image
            self.zeros |= ~image
            self.base_ones |= vcpu.apic_base
            self.base_zeros |= ~vcpu.apic_base
            self.snapshots += 1

    def add_trace(self, trace: Trace, test: str) -> None:
        """Every snapshot the engine compared in ``trace`` (skipped steps have none)."""
        self.tests.add(test)
        for step in trace.steps:
            if step.skipped is None:
                self.add(step.reference_state)
                prim = step.prim
                if isinstance(prim, MovToCr8):
                    self.cr8_ones |= prim.value
                    self.cr8_zeros |= ~prim.value & U64
                    self.cr8_outcomes |= 2 if step.reference[0] == "fault" else 1
                elif isinstance(prim, MovFromCr8):
                    self.cr8_outcomes |= 4

    def register(self, offset: int, mask: int) -> tuple[int, int]:
        """``(seen 1, seen 0)`` of the writable bits ``mask`` of the dword at ``offset``."""
        word_ones = (self.ones >> (8 * offset)) & 0xFFFFFFFF
        word_zeros = (self.zeros >> (8 * offset)) & 0xFFFFFFFF
        return word_ones & mask, word_zeros & mask

    def rows(self) -> list[tuple[str, int, int, int]]:
        """``(register, writable bits, seen both ways, the writable bits not seen both ways)``
        for every register of :data:`WRITABLE` and IA32_APIC_BASE."""
        out = []
        for name, (offset, mask) in WRITABLE.items():
            ones, zeros = self.register(offset, mask)
            both = ones & zeros
            out.append((name, mask.bit_count(), both.bit_count(), mask & ~both))
        both = self.base_ones & self.base_zeros & APIC_BASE_WRITABLE
        out.append(
            ("APIC_BASE", APIC_BASE_WRITABLE.bit_count(), both.bit_count(),
             APIC_BASE_WRITABLE & ~both)
        )  # fmt: skip
        both = self.cr8_ones & self.cr8_zeros
        out.append(("MOV_CR8", 64, both.bit_count(), U64 & ~both))
        out.append(
            ("MOV_CR8_OUTCOMES", 3, self.cr8_outcomes.bit_count(), 7 & ~self.cr8_outcomes)
        )
        return out

    def missing(self) -> dict[str, int]:
        """``register -> writable bits not seen both 0 and 1`` (empty: full coverage)."""
        return {name: bits for name, _, _, bits in self.rows() if bits}

    def report(self) -> list[str]:
        lines = [
            f"differential bit coverage: {self.snapshots} vCPU states compared; writable bits "
            "seen both 0 and 1, per register:"
        ]
        cells = []
        for name, writable, both, bits in self.rows():
            cell = f"{name} {both}/{writable}"
            if bits:
                cell += f" (missing {bits:#x})"
            cells.append(cell)
        lines += _wrap(cells)
        for name, reason in NOT_COVERED.items():
            lines.append(f"  not covered: {name}: {reason}")
        return lines


def _wrap(cells: Iterable[str], width: int = 96) -> list[str]:
    lines: list[str] = []
    line = " "
    for cell in cells:
        if len(line) + len(cell) + 2 > width:
            lines.append(line)
            line = " "
        line += " " + cell + ","
    lines.append(line.rstrip(","))
    return lines


COVERAGE = Coverage()
"""What the differential tests of this process have compared."""
