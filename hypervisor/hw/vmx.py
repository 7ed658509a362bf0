"""Intel VMX APIC virtualization hardware: the posted-interrupt descriptor, the PID-pointer
table, the VMCS fields, virtual-interrupt delivery and IPI virtualization.

Sources (``../shared/reference/avic_ipiv.md`` Parts H-L, rules in ``specs/apicv.md``):
``arch/x86/include/asm/posted_intr.h`` (``struct pi_desc``, ``pi_test_and_set_pir``,
``pi_test_and_set_on``, ``pi_set_sn``, ``pi_is_pir_empty``), ``arch/x86/include/asm/vmx.h``
and ``vmxfeatures.h`` (VMCS encodings, control bits, exit reasons), ``vmx.c``
(``vmx_alloc_ipiv_pid_table``, ``vmx_get_pid_table_order``), the SDM's chapter "APIC
Virtualization and Virtual Interrupts" (2016 numbering: ch. 29; VID-1..VID-7, PI-J1) and the
IPIv commit texts (IPIV-2, IPIV-3).

* :data:`PID_CONTROL` is the descriptor's control word as a ``lapic.fields`` layout (ON 0,
  SN 1, NV 23:16, NDST 63:32); :class:`Pid` is a descriptor as a frozen value whose
  ``bytes(pid)`` is the exact 64-byte image; :class:`PiDesc` is the live descriptor in memory
  with the atomic operations KVM and the CPU use;
* :class:`PidTable` is the PID-pointer table (u64 entries ``PA | valid bit 0``, sized by
  ``max_vcpu_ids`` rounded up to whole pages, :func:`last_pid_pointer_index`);
  :class:`VmcsApicv` is the VMCS fields and controls involved, as a record (PI-H3);
* the virtual-APIC page *is* the vCPU's ``LocalApic`` register page (one home per fact):
  VIRR/VISR/VTPR/VPPR are its IRR/ISR/TPR/PPR, so RVI and SVI (:func:`guest_interrupt_status`)
  are read from them (the CPU and KVM keep RVI = highest VIRR and SVI = highest VISR at every
  point the model can observe: VID-4, VID-5, PI-J1 step 6, ``vmx_set_rvi`` at entry);
  :func:`vppr`, :func:`recognized` (VID-2/VID-3), :func:`virr_set` (self-IPI virtualization,
  VID-6), :func:`eoi_virtualization` (VID-5), :func:`self_ipi_qualifies` (the 0x300 rule),
  :func:`pi_process` (PI-J1 steps 3-6), :func:`ipiv_qualifies` and :func:`ipiv_lookup`
  (IPIV-2/IPIV-3).

UNVERIFIED (Part P item 3: the SDM's IPIv pseudocode was not available), so parameters of
``hypervisor.accel.apicv.Apicv`` and not facts here: the exact qualifying test of an IPIv ICR
write beyond "fixed, physical, no shorthand" (:func:`ipiv_qualifies` takes ``min_vector``),
what the CPU does past ``LAST_PID_POINTER_INDEX`` or on an entry whose valid bit is 0
(:class:`IpivMiss`), and whether an IPIv post follows the ON/SN notification rule.

Not modelled here: TPR thresholds and TPR-below-threshold exits (KVM's side models the one
a MOV to CR8 meets while APICv is inhibited, ``hypervisor.accel.apicv``), the
interrupt-window control, interrupt shadows (STI/MOV SS), nested posted interrupts (vmcs12),
the APIC-access page's physical address, SENDUIPI, VM-entry consistency checks (UNVERIFIED,
PI-H3).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import overload

from hypervisor.hw.tables import SparseTable
from lapic.apic import LocalApic
from lapic.faults import ApicTypeError, ApicValueError, check_int
from lapic.fields import Field, Layout
from lapic.vectors import FrozenVectorSet

# ===========================================================================================
# Constants (PI-H1..H3)
# ===========================================================================================
POSTED_INTR_ON = 0
POSTED_INTR_SN = 1
PID_SIZE = 64
PID_TABLE_ENTRY_VALID = 1
ENTRIES_PER_PAGE = 512
PAGE_SIZE = 4096

POSTED_INTR_NV = 0x0002
LAST_PID_POINTER_INDEX = 0x0008
GUEST_INTR_STATUS = 0x0810
POSTED_INTR_DESC_ADDR = 0x2016
EOI_EXIT_BITMAP = (0x201C, 0x201E, 0x2020, 0x2022)
TERTIARY_VM_EXEC_CONTROL = 0x2034
PID_POINTER_TABLE = 0x2042

PIN_BASED_POSTED_INTR = 1 << 7
"""UNVERIFIED here (standard ``vmx.h`` value): pin-based "process posted interrupts"."""
CPU_BASED_ACTIVATE_TERTIARY_CONTROLS = 1 << 17
SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES = 1 << 0
SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE = 1 << 4
SECONDARY_EXEC_APIC_REGISTER_VIRT = 1 << 8
SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY = 1 << 9
TERTIARY_EXEC_IPI_VIRT = 1 << 4

EXIT_REASON_EXTERNAL_INTERRUPT = 1
EXIT_REASON_APIC_ACCESS = 44
EXIT_REASON_EOI_INDUCED = 45
EXIT_REASON_APIC_WRITE = 56

PID_CONTROL = Layout(
    "pi_desc_control",
    64,
    Field("on", 0, 1),
    Field("sn", 1, 1),
    Field("nv", 16, 8),
    Field("ndst", 32, 32),
)
"""PI-H1: the u64 at byte 32 of the descriptor (descriptor bits 256, 257, 279:272, 319:288)."""

_ON = PID_CONTROL["on"].mask
_SN = PID_CONTROL["sn"].mask
_NV = PID_CONTROL["nv"]
_NDST = PID_CONTROL["ndst"]
_PIR_ALL = (1 << 256) - 1

APIC_ACCESS_QUAL = Layout(
    "apic_access_exit_qualification", 64, Field("offset", 0, 12), Field("access_type", 12, 4)
)
"""Exit qualification of an APIC-access exit (44): page offset 11:0, access type 15:12
(0 linear read, 1 linear write)."""


def ndst_of(host_apic_id: int, host_x2apic: bool) -> int:
    """NDST for a host APIC ID (``vmx_vcpu_pi_load``): the full 32-bit ID on an x2APIC host,
    ``(id << 8) & 0xFF00`` on an xAPIC host."""
    return host_apic_id & 0xFFFFFFFF if host_x2apic else (host_apic_id << 8) & 0xFF00


def host_apic_id_of_ndst(ndst: int, host_x2apic: bool) -> int:
    """The host APIC ID a notification with this NDST goes to (the inverse of
    :func:`ndst_of`)."""
    return ndst if host_x2apic else (ndst >> 8) & 0xFF


# ===========================================================================================
# The descriptor
# ===========================================================================================
class _ControlWord:
    """ON, SN, NV and NDST read from a descriptor's raw control word (:data:`PID_CONTROL`);
    shared by the value (:class:`Pid`) and the live descriptor (:class:`PiDesc`)."""

    __slots__ = ()
    control: int

    @property
    def on(self) -> bool:
        return bool(self.control & _ON)

    @property
    def sn(self) -> bool:
        return bool(self.control & _SN)

    @property
    def nv(self) -> int:
        return _NV.get(self.control)

    @property
    def ndst(self) -> int:
        return _NDST.get(self.control)


@dataclass(frozen=True, slots=True)
class Pid(_ControlWord):
    """A posted-interrupt descriptor as a value: ``pir`` (the vectors posted), ``control``
    (the raw u64 of :data:`PID_CONTROL`); ``bytes(pid)`` is the 64-byte image (PIR as
    ``u32 pir[8]`` little-endian, control at byte 32, bytes 40-63 reserved, zero)."""

    pir_bits: int = 0
    control: int = 0

    @property
    def pir(self) -> FrozenVectorSet:
        bits = self.pir_bits
        return FrozenVectorSet(v for v in range(256) if bits >> v & 1)

    def __bytes__(self) -> bytes:
        return (
            self.pir_bits.to_bytes(32, "little") + self.control.to_bytes(8, "little")
            + bytes(PID_SIZE - 40)
        )

    @staticmethod
    def from_bytes(image: bytes) -> Pid:
        """The descriptor an exact 64-byte image holds."""
        if not isinstance(image, (bytes, bytearray)):
            raise ApicTypeError(f"image must be bytes, not {type(image).__name__}")
        if len(image) != PID_SIZE:
            raise ApicValueError(f"image has {len(image)} bytes; a descriptor has {PID_SIZE}")
        return Pid(int.from_bytes(image[:32], "little"), int.from_bytes(image[32:40], "little"))

    def __repr__(self) -> str:
        pir = ",".join(f"{v:#04x}" for v in self.pir)
        return (
            f"Pid(pir={{{pir}}}, on={int(self.on)}, sn={int(self.sn)}, nv={self.nv:#04x}, "
            f"ndst={self.ndst:#x})"
        )


class PiDesc(_ControlWord):
    """The live descriptor of one vCPU (``struct pi_desc``): ``pir`` a 256-bit int, ``control``
    the u64.  Each method is one atomic operation of ``posted_intr.h``."""

    __slots__ = ("control", "pir")

    def __init__(self) -> None:
        self.pir = 0
        self.control = 0

    def test_and_set_pir(self, vector: int) -> bool:
        """``pi_test_and_set_pir``: True if the bit was already set."""
        bit = 1 << vector
        old = self.pir & bit
        self.pir |= bit
        return bool(old)

    def test_and_set_on(self) -> bool:
        """``pi_test_and_set_on``: True if ON was already set."""
        old = self.control & _ON
        self.control |= _ON
        return bool(old)

    def set_on(self) -> None:
        self.control |= _ON

    def clear_on(self) -> None:
        self.control &= ~_ON

    def set_sn(self) -> None:
        self.control |= _SN

    def test_and_clear_sn(self) -> bool:
        old = self.control & _SN
        self.control &= ~_SN
        return bool(old)

    @property
    def nv(self) -> int:
        return _NV.get(self.control)

    @nv.setter
    def nv(self, value: int) -> None:
        self.control = _NV.set(self.control, value)

    @property
    def ndst(self) -> int:
        return _NDST.get(self.control)

    @ndst.setter
    def ndst(self, value: int) -> None:
        self.control = _NDST.set(self.control, value)

    def pir_empty(self) -> bool:
        return not self.pir

    def take_pir(self) -> int:
        """``xchg(pir, 0)``: the bits, now cleared (atomic per bit: nothing sets a bit between
        the read and the clear, PI-J1 step 5)."""
        bits = self.pir
        self.pir = 0
        return bits

    def value(self) -> Pid:
        return Pid(self.pir, self.control)

    def load(self, pid: Pid) -> None:
        self.pir = pid.pir_bits & _PIR_ALL
        self.control = pid.control

    def __repr__(self) -> str:
        return f"<PiDesc {self.value()!r}>"


# ===========================================================================================
# The PID-pointer table (IPIV-2)
# ===========================================================================================
def pid_table_order(max_vcpu_ids: int) -> int:
    """``vmx_get_pid_table_order``: ``get_order(max_vcpu_ids * sizeof(u64))``."""
    size = check_int("max_vcpu_ids", max_vcpu_ids, 1, 1 << 32) * 8
    order = 0
    while PAGE_SIZE << order < size:
        order += 1
    return order


def last_pid_pointer_index(max_vcpu_ids: int) -> int:
    """``LAST_PID_POINTER_INDEX`` as ``init_vmcs`` programs it: ``max_vcpu_ids - 1`` (the
    highest vCPU ID, not the count: BR-V8)."""
    return max_vcpu_ids - 1


class PidTable(SparseTable, Sequence[int]):
    """The PID-pointer table: ``len()`` u64 entries (whole pages, ``2**order`` of them), each
    ``PA(pi_desc) | PID_TABLE_ENTRY_VALID``, indexed by APIC ID; an unused slot reads 0."""

    __slots__ = ("order",)

    def __init__(self, max_vcpu_ids: int) -> None:
        super().__init__()
        self.order = pid_table_order(max_vcpu_ids)

    def __len__(self) -> int:
        return ENTRIES_PER_PAGE << self.order

    def _check(self, index: int) -> int:
        return int(check_int("index", index, 0, len(self) - 1))

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[int]: ...

    def __getitem__(self, index: int | slice) -> int | Sequence[int]:
        if isinstance(index, slice):
            return [self._raw.get(i, 0) for i in range(len(self))[index]]
        return self._raw.get(self._check(index), 0)

    def __setitem__(self, index: int, entry: int) -> None:
        """``WRITE_ONCE`` of one entry (``vmx_vcpu_create``): atomic, never torn."""
        raw = int(check_int("entry", entry, 0, (1 << 64) - 1))
        self._store(self._check(index), raw)

    def __iter__(self) -> Iterator[int]:
        for i in range(len(self)):
            yield self._raw.get(i, 0)

    def items(self) -> Iterator[tuple[int, int]]:
        """The non-zero entries by index."""
        yield from self._sorted()

    def __repr__(self) -> str:
        return f"<PidTable {len(self)} entries, {len(self._raw)} valid>"


def pid_table_entry(pid_pa: int) -> int:
    """The entry KVM writes for a descriptor at ``pid_pa`` (64-byte aligned)."""
    if pid_pa & (PID_SIZE - 1):
        raise ApicValueError(f"pid_pa={pid_pa:#x} is not 64-byte aligned")
    return pid_pa | PID_TABLE_ENTRY_VALID


class IpivMiss(Enum):
    """UNVERIFIED (Part P item 3): what the CPU does with an IPIv ICR write whose destination
    is past ``LAST_PID_POINTER_INDEX`` or whose entry is invalid.  KVM never relies on it
    (every possible vCPU ID is in range and valid)."""

    APIC_WRITE_EXIT = "apic-write exit"
    """The write is not virtualized: an APIC-write exit, KVM emulates it."""
    DROP = "drop"
    """The CPU sends nothing and does not exit."""

    def __repr__(self) -> str:
        return f"IpivMiss.{self.name}"


def ipiv_lookup(table: PidTable, last_index: int, dest: int) -> int | None:
    """IPIV-2: the PID's physical address for APIC ID ``dest``, or None when ``dest`` is past
    ``last_index`` or its entry's valid bit is 0 (what follows is :class:`IpivMiss`)."""
    if dest > last_index or dest >= len(table):
        return None
    raw = table.raw(dest)
    if not raw & PID_TABLE_ENTRY_VALID:
        return None
    return raw & ~(PID_SIZE - 1)


# ===========================================================================================
# The VMCS (PI-H3)
# ===========================================================================================
@dataclass(frozen=True, slots=True)
class VmcsApicv:
    """The VMCS fields and controls of one vCPU that APICv, posted interrupts and IPIv use;
    ``fields()`` gives them by VMCS encoding."""

    pin_based_controls: int
    primary_controls: int
    secondary_controls: int
    tertiary_controls: int
    posted_intr_nv: int
    posted_intr_desc_addr: int
    guest_intr_status: int
    eoi_exit_bitmap: tuple[int, int, int, int]
    pid_pointer_table: int
    last_pid_pointer_index: int

    @property
    def rvi(self) -> int:
        return self.guest_intr_status & 0xFF

    @property
    def svi(self) -> int:
        return self.guest_intr_status >> 8

    @property
    def ipi_virtualization(self) -> bool:
        return bool(
            self.primary_controls & CPU_BASED_ACTIVATE_TERTIARY_CONTROLS
            and self.tertiary_controls & TERTIARY_EXEC_IPI_VIRT
        )

    def fields(self) -> dict[int, int]:
        """The 16/64-bit fields by VMCS encoding."""
        out = {
            POSTED_INTR_NV: self.posted_intr_nv,
            GUEST_INTR_STATUS: self.guest_intr_status,
            POSTED_INTR_DESC_ADDR: self.posted_intr_desc_addr,
            TERTIARY_VM_EXEC_CONTROL: self.tertiary_controls,
            PID_POINTER_TABLE: self.pid_pointer_table,
            LAST_PID_POINTER_INDEX: self.last_pid_pointer_index,
        }
        for enc, word in zip(EOI_EXIT_BITMAP, self.eoi_exit_bitmap, strict=True):
            out[enc] = word
        return out


def eoi_exit_words(bitmap: int) -> tuple[int, int, int, int]:
    """EOI_EXIT_BITMAP0..3 of a 256-bit vector bitmap."""
    mask = (1 << 64) - 1
    return (bitmap & mask, bitmap >> 64 & mask, bitmap >> 128 & mask, bitmap >> 192 & mask)


# ===========================================================================================
# Virtual-interrupt delivery (Part I) over the vCPU's own register page
# ===========================================================================================
def vppr(vtpr: int, svi: int) -> int:
    """VID-2: ``VTPR & 0xFF`` if ``VTPR[7:4] >= SVI[7:4]``, else ``SVI & 0xF0``."""
    return vtpr & 0xFF if (vtpr & 0xF0) >= (svi & 0xF0) else svi & 0xF0


def guest_interrupt_status(apic: LocalApic) -> tuple[int, int]:
    """``(RVI, SVI)``: the highest VIRR and VISR vectors (0 when empty)."""
    return max(apic._irr.highest(), 0), max(apic._isr.highest(), 0)


def recognized(apic: LocalApic) -> bool:
    """VID-3: a virtual interrupt is recognized when ``RVI[7:4] > VPPR[7:4]``."""
    rvi, svi = guest_interrupt_status(apic)
    return (rvi & 0xF0) > (vppr(apic.tpr, svi) & 0xF0)


def virr_set(apic: LocalApic, vector: int) -> None:
    """VIRR[vector] = 1 (self-IPI virtualization, VID-6; RVI follows).  The CPU does not touch
    the TMR: the bit keeps what the last accepted interrupt of that vector left, as in
    ``kvm_apic_update_irr``."""
    apic._irr_bits[((vector >> 5) << 7) | (vector & 31)] = 1


def pi_process(apic: LocalApic, desc: PiDesc) -> int:
    """PI-J1 steps 3 and 5-6 (the caller counts step 4, the physical EOI): ON := 0, VIRR |=
    PIR, PIR := 0.  Returns the highest vector moved (-1: PIR was empty)."""
    desc.clear_on()
    return virr_merge(apic, desc.take_pir())


def virr_merge(apic: LocalApic, bits: int) -> int:
    """``kvm_apic_update_irr``: OR ``bits`` into VIRR; the highest one (-1: none)."""
    if not bits:
        return -1
    irr = apic._irr_bits
    top = bits.bit_length() - 1
    while bits:
        low = bits & -bits
        v = low.bit_length() - 1
        irr[((v >> 5) << 7) | (v & 31)] = 1
        bits ^= low
    return top


def eoi_virtualization(apic: LocalApic) -> int:
    """VID-5 up to the EOI-exit bitmap test: ``V = SVI; VISR[V] = 0``; SVI and VPPR follow.
    Returns V (-1: VISR was empty, nothing changes)."""
    v = int(apic._isr.highest())
    if v < 0:
        return -1
    apic._isr.discard(v)
    apic._isr_cache = -1
    apic._update_ppr_and_notify()
    return v


_VICR_MUST_BE_ZERO = 0xFFF3B700
"""Bochs' mask for a virtualizable self-IPI: reserved 31:20, 17:16 and 13, trigger 15, BUSY 12,
delivery mode 10:8 (the level, bit 14, and the destination mode, bit 11, are ignored)."""


def self_ipi_qualifies(icrl: int) -> bool:
    """VID-6: a write to VICR_LO is a virtualized self-IPI iff reserved bits 31:20, 17:16, 13,
    BUSY (12), the trigger (15) and the delivery mode (10:8) are 0, the shorthand is self and
    ``vector[7:4] != 0`` (Bochs: ``(vicr & 0xFFF3B700) == 0 && shorthand == 01 && vector >=
    16``)."""
    return not icrl & _VICR_MUST_BE_ZERO and (icrl >> 18) & 3 == 1 and (icrl & 0xFF) >= 16


_IPIV_MUST_BE_ZERO = 0xFFFFBF00
"""Reserved 31:20 and 13, shorthand 19:18, 17:16, trigger 15, BUSY 12, destination mode 11
(physical), delivery mode 10:8 (fixed)."""


def ipiv_qualifies(icrl: int, dest: int, x2apic: bool, min_vector: int) -> bool:
    """IPIV-3: the CPU virtualizes a physical, fixed, edge, unicast ICR write with no
    shorthand (verified), with BUSY, reserved bits clear and ``vector >= min_vector``
    (UNVERIFIED: a parameter).  A broadcast destination (0xFF / 0xFFFFFFFF) is not unicast."""
    if icrl & _IPIV_MUST_BE_ZERO or (icrl & 0xFF) < min_vector:
        return False
    return dest != (0xFFFFFFFF if x2apic else 0xFF)


# What a bug replay may swap (``apicsim/replays/``, BR-V* of the reference).
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "last_pid_pointer_index",  # BR-V8: max_vcpu_ids - 1, not the count
    }
)
