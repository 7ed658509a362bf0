"""The guest image the KVM backend runs: page tables, GDT, TSS, IDT, handlers and access stubs.

Guest physical memory starts at 0 and is identity-mapped by the guest's page tables for the
low 4 GiB with 2 MiB pages, so the APIC page at 0xFEE00000 (outside the RAM slot) is mapped
and claimed by the in-kernel APIC.  An APIC window moved above 4 GiB (IA32_APIC_BASE bits
MAXPHYADDR-1:32, which KVM decodes, KVMB-7) is reached through the high aliases: linear
``HIGH_ALIASES + 2 MiB * slot`` maps the 2 MiB-aligned physical region of such a window, one
slot per region for the VM's whole life (an entry is written before its first use and never
changed, so no stale translation can exist).  Layout (guest physical = guest linear below
4 GiB):

=====================  =============================================================
``0x1000``             PML4 (one entry)
``0x2000``             PDPT (four entries, and the fifth for the high aliases)
``0x3000-0x6FFF``      four page directories, 2 MiB pages, 0..4 GiB
``0x7000``             GDT: null, 64-bit code 0x08, data 0x10, TSS 0x18 (16 bytes)
``0x7800``             the TSS (104 bytes, all zero)
``0x8000``             IDT: 256 interrupt gates
``0x9000``             one 8-byte handler per vector: ``mov al, v; out FAULT_PORT, al``
``0x9800``             the NMI handler: ``inc qword gs:[0]; iretq``
``0xA000``             access stubs, each ending in ``out DONE_PORT, al`` (the WRMSR loop
                       then jumps back to its WRMSR: each KVM_RUN executes one WRMSR)
``0x80000``            page directory of the high aliases (PDPT entry 4)
``0x100000 + 0x1000*k``  vCPU k's page: NMI counter at +0 (GS base), stack top at +0x1000
=====================  =============================================================
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from apicsim.kvm.asm import Asm

PML4 = 0x1000
PDPT = 0x2000
PD = 0x3000
GDT = 0x7000
TSS = 0x7800
IDT = 0x8000
HANDLERS = 0x9000
HANDLER_STRIDE = 8
NMI_HANDLER = 0x9800
STUBS = 0xA000
VCPU_PAGES = 0x100000
PAGE = 0x1000
PD_HIGH = 0x80000
HIGH_ALIASES = 4 << 30
"""Linear address of high-alias slot 0 (PDPT entry 4)."""
HIGH_ALIAS_SLOTS = 512
LOW_LIMIT = 4 << 30
"""Physical addresses below this are identity-mapped."""

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18
GDT_LIMIT = 5 * 8 - 1
IDT_LIMIT = 256 * 16 - 1
TSS_LIMIT = 0x67

DONE_PORT = 0xE0
"""The stub finished: registers hold its results."""
FAULT_PORT = 0xE1
"""An exception handler ran: the data byte is its vector."""

NMI_VECTOR = 2
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
"""Exceptions that push an error code (SDM Vol. 3 Table 6-1; 21 #CP, 29 #VC, 30 #SX)."""

# Page-table entry bits
_P = 1 << 0
_RW = 1 << 1
_PWT = 1 << 3
_PCD = 1 << 4
_PS = 1 << 7

# Control-register / EFER bits
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_FIXED = 0x2
"""RFLAGS with only the always-one bit: IF=0, so accepted interrupts stay in IRR."""

_GDT_CODE64 = 0x00AF9B000000FFFF  # base 0, limit 0xFFFFF, G, L, P, DPL 0, code exec/read accessed
_GDT_DATA = 0x00CF93000000FFFF  # base 0, limit 0xFFFFF, G, D/B, P, DPL 0, data read/write accessed


def vcpu_page(slot: int) -> int:
    """Guest physical address of the page of the vCPU in memory slot ``slot``."""
    return VCPU_PAGES + slot * PAGE


def memory_size(capacity: int) -> int:
    """Bytes of guest RAM for ``capacity`` vCPU pages, rounded up to 2 MiB."""
    need = VCPU_PAGES + capacity * PAGE
    return (need + (2 << 20) - 1) & ~((2 << 20) - 1)


@dataclass(frozen=True, slots=True)
class Stubs:
    """Entry points (guest addresses) of the access stubs."""

    load: dict[int, int] = field(default_factory=dict)
    """``size -> entry``: RAX := zero-extended ``size``-byte read at [RDI]."""
    store: dict[int, int] = field(default_factory=dict)
    """``size -> entry``: the low ``size`` bytes of RAX written to [RDI]."""
    rdmsr: int = 0
    """EDX:EAX := MSR[ECX]."""
    wrmsr: int = 0
    """MSR[ECX] := EDX:EAX."""
    vmcall: int = 0
    """VMCALL with the registers as given (RAX = nr)."""
    wrmsr_loop: int = 0
    """``wrmsr; out DONE_PORT, al; jmp`` back to the WRMSR: once the registers are set, every
    further KVM_RUN executes one more WRMSR (the fewest ioctls per guest MSR write)."""
    mov_to_cr8: int = 0
    """CR8 := RAX (``mov %rax, %cr8``)."""
    mov_from_cr8: int = 0
    """RAX := CR8 (``mov %cr8, %rax``)."""


def _tss_descriptor(base: int, limit: int) -> bytes:
    low = (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | 0x8B << 40  # P, DPL 0, type 0xB (busy 64-bit TSS)
        | ((limit >> 16) & 0xF) << 48
        | ((base >> 24) & 0xFF) << 56
    )
    return struct.pack("<QQ", low, base >> 32)


def _gate(offset: int) -> bytes:
    """A 64-bit interrupt gate to ``offset`` in the code segment (IST 0, DPL 0)."""
    return struct.pack(
        "<HHBBHII",
        offset & 0xFFFF,
        CODE_SELECTOR,
        0,
        0x8E,
        (offset >> 16) & 0xFFFF,
        offset >> 32,
        0,
    )


def map_high_alias(mem: memoryview, slot: int, region: int) -> int:
    """Point high-alias ``slot`` at the 2 MiB physical ``region`` (uncached, like every MMIO
    mapping of the image); return the slot's linear address."""
    struct.pack_into("<Q", mem, PD_HIGH + 8 * slot, region | _P | _RW | _PS | _PCD | _PWT)
    return HIGH_ALIASES + (slot << 21)


def build(mem: memoryview) -> Stubs:
    """Write the image into guest RAM ``mem`` (which starts at GPA 0); return the stubs."""
    # Page tables: identity map 0..4 GiB with 2 MiB pages.
    struct.pack_into("<Q", mem, PML4, PDPT | _P | _RW)
    for i in range(4):
        struct.pack_into("<Q", mem, PDPT + 8 * i, (PD + PAGE * i) | _P | _RW)
    for i in range(4 * 512):
        phys = i << 21
        flags = _P | _RW | _PS | (_PCD | _PWT if phys >= 0xC0000000 else 0)
        struct.pack_into("<Q", mem, PD + 8 * i, phys | flags)
    struct.pack_into("<Q", mem, PDPT + 8 * 4, PD_HIGH | _P | _RW)
    # GDT and TSS.
    struct.pack_into("<QQQ", mem, GDT, 0, _GDT_CODE64, _GDT_DATA)
    mem[GDT + TSS_SELECTOR : GDT + TSS_SELECTOR + 16] = _tss_descriptor(TSS, TSS_LIMIT)
    # Handlers and IDT.
    for v in range(256):
        handler = Asm().mov_al_imm8(v).out_al(FAULT_PORT).jmp_self().align(HANDLER_STRIDE)
        at = HANDLERS + v * HANDLER_STRIDE
        mem[at : at + HANDLER_STRIDE] = handler.bytes()
    nmi = Asm().inc_gs_qword(0).iretq().bytes()
    mem[NMI_HANDLER : NMI_HANDLER + len(nmi)] = nmi
    for v in range(256):
        target = NMI_HANDLER if v == NMI_VECTOR else HANDLERS + v * HANDLER_STRIDE
        mem[IDT + 16 * v : IDT + 16 * v + 16] = _gate(target)
    # Access stubs.
    asm = Asm()
    load: dict[int, int] = {}
    store: dict[int, int] = {}

    def stub(emit: Callable[[], object]) -> int:
        """Emit one access (``emit``), then report to the host and stop; its entry address."""
        entry = STUBS + len(asm)
        emit()
        asm.out_al(DONE_PORT).jmp_self().align(16)
        return entry

    for size in (1, 2, 4, 8):
        load[size] = stub(partial(asm.load_rdi, size))
        store[size] = stub(partial(asm.store_rdi, size))
    rdmsr = stub(asm.rdmsr)
    wrmsr = stub(asm.wrmsr)
    vmcall = stub(asm.vmcall)
    wrmsr_loop = STUBS + len(asm)
    asm.wrmsr().out_al(DONE_PORT).jmp_to(wrmsr_loop - STUBS).align(16)
    mov_to_cr8 = stub(asm.mov_cr8_rax)
    mov_from_cr8 = stub(asm.mov_rax_cr8)
    stubs = asm.bytes()
    mem[STUBS : STUBS + len(stubs)] = stubs
    return Stubs(load, store, rdmsr, wrmsr, vmcall, wrmsr_loop, mov_to_cr8, mov_from_cr8)
