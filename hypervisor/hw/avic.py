"""AMD AVIC hardware: APIC ID tables, exit information, doorbells, the guest ICR-write algorithm.

Sources (``../shared/reference/avic_ipiv.md`` Parts A, B, D, F; rule ids in ``specs/avic.md``):
``arch/x86/include/asm/svm.h`` (entry layouts, masks, exit codes), ``arch/x86/kvm/svm/avic.c``
(``avic_get_logical_id_entry``, ``__AVIC_GATAG``, the hardware behaviour stated in the comments
of ``avic_incomplete_ipi_interception`` and ``avic_vcpu_blocking``), commits 5aede752a839
(INVALID_TARGET sends nothing), 8de4a1c8164e (self-IPIs skip the physical table), ca11d9d35e95
(12-bit index), 73b42dc69be8 (split x2APIC ICR).

* :data:`PHYSICAL_ENTRY` / :data:`LOGICAL_ENTRY` are the table entries as ``lapic.fields``
  layouts; :class:`PhysicalEntry` / :class:`LogicalEntry` read one entry; :class:`PhysicalTable`
  and :class:`LogicalTable` are the hardware-visible tables (bit 61, KVM's software-only
  GA_LOG_INTR, is refused by the physical table: it lives in KVM's shadow copy only);
* :func:`max_physical_index`, :func:`physical_table_pages`, :func:`logical_index`,
  :func:`ga_tag` compute what AV-A4/A5/A8 define; :class:`VmcbAvic` is the VMCB's AVIC fields;
* :func:`icr_write_steps` is what the CPU does on a guest ICR write (AV-B1..B6), as atomic
  steps (``hypervisor.host.steps``): per target, write IRR in the backing page, then read
  IsRunning and ring the doorbell or remember the failure.  ``stale_isrunning=True`` models
  erratum #1235 (the missing barrier: IsRunning is read before the IRR write, so a target that
  clears IsRunning and re-checks IRR in between is missed: BR-A18).

The backing page of a vCPU *is* its ``LocalApic`` register page (AV-A2): the hardware writes IRR
through :func:`backing_page_set_irr`, straight into ``apic.regs``.

Model choices where the APM is not available (``[UNVERIFIED]`` in the reference, settled in
``specs/avic.md``): the IRR write obeys the APIC's acceptance stage (no IRR bit in a hardware- or
software-disabled APIC, TMR cleared for the edge vector); EXITINFO2's index is the physical
destination for a physical message, the logical-table index for a failing xAPIC logical
bit, else the guest physical ID of the first failing target (0 for INVALID_INT_TYPE and
INVALID_IPI_VECTOR); the hardware leaves ICR.BUSY clear unless ``Avic.icr_busy_causes`` names
the cause (AV-B7, applied where the exit is taken, in ``hypervisor.accel.avic``); a logical or
physical destination of all ones is a broadcast.

Not modelled: the IOMMU's guest-virtual APIC (device posted interrupts write IRR only through
KVM here), INVALID_BACKING_PAGE (every entry KVM writes has a page), nested AVIC.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol as TypingProtocol

from hypervisor.host.steps import Protocol, Step
from lapic.apic import LocalApic
from lapic.faults import ApicValueError, check_int
from lapic.fields import Field, Layout
from lapic.registers import ESR_RECV_ILLEGAL_VECTOR

SVM_EXIT_WRITE_CR8 = 0x018
SVM_EXIT_AVIC_INCOMPLETE_IPI = 0x401
SVM_EXIT_AVIC_UNACCELERATED_ACCESS = 0x402
MSR_AMD64_SVM_AVIC_DOORBELL = 0xC001011B
AVIC_ENABLE_MASK = 1 << 31
X2APIC_MODE_MASK = 1 << 30
APIC_DEFAULT_PHYS_BASE = 0xFEE00000
VMCB_AVIC_CLEAN_BIT = 11

AVIC_MAX_PHYSICAL_ID = 0xFE
X2AVIC_MAX_PHYSICAL_ID = 0x1FF
X2AVIC_4K_MAX_PHYSICAL_ID = 0xFFF
AVIC_PHYSICAL_MAX_INDEX_MASK = 0xFFF
ENTRIES_PER_PAGE = 512

PHYSICAL_ENTRY = Layout(
    "avic_physical_id_entry",
    64,
    Field("host_id", 0, 12),
    Field("backing_page", 12, 40),
    Field("ga_log_intr", 61, 1),
    Field("is_running", 62, 1),
    Field("valid", 63, 1),
)
"""AV-A3: host physical APIC ID 11:0, backing page PA 51:12, GA_LOG_INTR 61 (software only),
IsRunning 62, valid 63."""

LOGICAL_ENTRY = Layout(
    "avic_logical_id_entry", 32, Field("guest_physical_id", 0, 8), Field("valid", 31, 1)
)
"""AV-A4: guest physical APIC ID 7:0, valid 31."""

INCOMPLETE_IPI_INFO2 = Layout(
    "avic_incomplete_ipi_exitinfo2", 64, Field("index", 0, 12), Field("cause", 32, 32)
)
"""AV-B6: EXITINFO2 = cause << 32 | index (12 bits since ca11d9d35e95)."""

UNACCEL_INFO1 = Layout(
    "avic_unaccelerated_access_exitinfo1", 64, Field("offset", 4, 8), Field("write", 32, 1)
)
"""AV-D1: EXITINFO1[11:4] register offset >> 4, EXITINFO1[32] write."""

_GA_LOG = PHYSICAL_ENTRY["ga_log_intr"].mask
_RUNNING = PHYSICAL_ENTRY["is_running"].mask
_VALID = PHYSICAL_ENTRY["valid"].mask
_HOST = PHYSICAL_ENTRY["host_id"].mask
_LVALID = LOGICAL_ENTRY["valid"].mask


class IpiFailure(IntEnum):
    """``enum avic_ipi_failure_cause`` (AV-B6)."""

    INVALID_INT_TYPE = 0
    TARGET_NOT_RUNNING = 1
    INVALID_TARGET = 2
    INVALID_BACKING_PAGE = 3
    INVALID_IPI_VECTOR = 4

    def __repr__(self) -> str:
        return f"IpiFailure.{self.name}"


# ===========================================================================================
# Entries and tables
# ===========================================================================================
@dataclass(frozen=True, slots=True)
class PhysicalEntry:
    """One physical APIC ID table entry; ``int(e)`` is the raw u64."""

    raw: int = 0

    @staticmethod
    def make(
        *, host_id: int = 0, backing_page: int = 0, is_running: bool = False,
        valid: bool = True, ga_log_intr: bool = False,
    ) -> PhysicalEntry:
        """An entry from its fields; ``backing_page`` is the page's physical address."""
        if backing_page & 0xFFF:
            raise ApicValueError(f"backing_page={backing_page:#x} is not page-aligned")
        return PhysicalEntry(
            PHYSICAL_ENTRY.pack(
                host_id=host_id, backing_page=backing_page >> 12, is_running=int(is_running),
                valid=int(valid), ga_log_intr=int(ga_log_intr),
            )
        )

    @property
    def host_id(self) -> int:
        return self.raw & _HOST

    @property
    def backing_page(self) -> int:
        """The backing page's physical address (bits 51:12 in place)."""
        return PHYSICAL_ENTRY["backing_page"].get(self.raw) << 12

    @property
    def is_running(self) -> bool:
        return bool(self.raw & _RUNNING)

    @property
    def valid(self) -> bool:
        return bool(self.raw & _VALID)

    @property
    def ga_log_intr(self) -> bool:
        return bool(self.raw & _GA_LOG)

    def replace(self, **fields: int | bool) -> PhysicalEntry:
        values = PHYSICAL_ENTRY.unpack(self.raw)
        for k, v in fields.items():
            values[k] = int(v)
        return PhysicalEntry(PHYSICAL_ENTRY.pack(values))

    def __int__(self) -> int:
        return self.raw

    def __repr__(self) -> str:
        return f"PhysicalEntry({self.raw:#018x})"


@dataclass(frozen=True, slots=True)
class LogicalEntry:
    """One logical APIC ID table entry; ``int(l)`` is the raw u32."""

    raw: int = 0

    @staticmethod
    def make(guest_physical_id: int, valid: bool = True) -> LogicalEntry:
        return LogicalEntry(
            LOGICAL_ENTRY.pack(guest_physical_id=guest_physical_id, valid=int(valid))
        )

    @property
    def guest_physical_id(self) -> int:
        return self.raw & 0xFF

    @property
    def valid(self) -> bool:
        return bool(self.raw & _LVALID)

    def __int__(self) -> int:
        return self.raw

    def __repr__(self) -> str:
        return f"LogicalEntry({self.raw:#010x})"


class _SparseTable:
    """What both AVIC tables share: the non-zero entries by index (a slot not stored reads as
    0, an invalid entry), their raw reads, and their state as sorted (index, raw) pairs."""

    __slots__ = ("_raw",)

    def __init__(self) -> None:
        self._raw: dict[int, int] = {}

    def _store(self, i: int, raw: int) -> None:
        if raw:
            self._raw[i] = raw
        else:
            self._raw.pop(i, None)

    def raw(self, index: int) -> int:
        """The raw entry without building an entry object (the hardware's read)."""
        return self._raw.get(index, 0)

    def _sorted(self) -> Iterator[tuple[int, int]]:
        """The non-zero entries by index, raw."""
        for i in sorted(self._raw):
            yield i, self._raw[i]

    def state(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted(self._raw.items()))

    def set_state(self, state: tuple[tuple[int, int], ...]) -> None:
        self._raw = dict(state)


class PhysicalTable(_SparseTable):
    """The hardware-visible physical APIC ID table: ``pages`` 4 KiB pages of u64 entries,
    indexed by guest physical APIC ID; an unused slot is an invalid entry (0)."""

    __slots__ = ("pages",)

    def __init__(self, pages: int = 1) -> None:
        super().__init__()
        self.pages = check_int("pages", pages, 1, 8)

    def __len__(self) -> int:
        return self.pages * ENTRIES_PER_PAGE

    def _check(self, index: int) -> int:
        return int(check_int("apic_id", index, 0, len(self) - 1))

    def __getitem__(self, index: int) -> PhysicalEntry:
        return PhysicalEntry(self._raw.get(self._check(index), 0))

    def __setitem__(self, index: int, entry: PhysicalEntry | int) -> None:
        raw = int(entry)
        if raw & _GA_LOG:
            raise ApicValueError(
                f"entry={raw:#x} has bit 61 (GA_LOG_INTR) set: it is KVM's software-only bit "
                "and never reaches the hardware table (AV-A3)"
            )
        check_int("entry", raw, 0, (1 << 64) - 1)
        self._store(self._check(index), raw)

    def items(self) -> Iterator[tuple[int, PhysicalEntry]]:
        """The non-zero entries by index."""
        for i, raw in self._sorted():
            yield i, PhysicalEntry(raw)


class LogicalTable(_SparseTable):
    """The hardware-visible logical APIC ID table: one 4 KiB page of u32 entries."""

    __slots__ = ()
    SIZE = 1024

    def __len__(self) -> int:
        return self.SIZE

    def __getitem__(self, index: int) -> LogicalEntry:
        return LogicalEntry(self._raw.get(int(check_int("index", index, 0, self.SIZE - 1)), 0))

    def __setitem__(self, index: int, entry: LogicalEntry | int) -> None:
        raw = int(check_int("entry", int(entry), 0, 0xFFFFFFFF))
        self._store(int(check_int("index", index, 0, self.SIZE - 1)), raw)

    def items(self) -> Iterator[tuple[int, LogicalEntry]]:
        """The non-zero entries by index."""
        for i, raw in self._sorted():
            yield i, LogicalEntry(raw)


# ===========================================================================================
# Sizes, indices, tags, the VMCB
# ===========================================================================================
def arch_max_physical_id(x2avic: bool, x2avic_4k: bool) -> int:
    """AV-A5/F1: 0xFE (xAPIC AVIC; 0xFF is broadcast), 0x1FF (x2AVIC), 0xFFF (x2AVIC-4K)."""
    if not x2avic:
        return AVIC_MAX_PHYSICAL_ID
    return X2AVIC_4K_MAX_PHYSICAL_ID if x2avic_4k else X2AVIC_MAX_PHYSICAL_ID


def max_physical_index(max_vcpu_ids: int, x2avic: bool, x2avic_4k: bool) -> int:
    """KVM ``avic_get_max_physical_id``: ``min(max_vcpu_ids - 1, arch max)`` (574ef752d4ae;
    KVM_CAP_MAX_VCPU_ID is the largest APIC ID plus one)."""
    return min(max_vcpu_ids - 1, arch_max_physical_id(x2avic, x2avic_4k))


def physical_table_pages(max_vcpu_ids: int, x2avic: bool, x2avic_4k: bool) -> int:
    """Pages KVM allocates for the physical table: one at least, with x2AVIC-4K enough for the
    largest index it will program (``get_order((max_id + 1) * 8)``, a power of two)."""
    top = max_physical_index(max_vcpu_ids, x2avic, x2avic_4k) if x2avic else 0
    pages = 1
    while pages * ENTRIES_PER_PAGE < top + 1:
        pages *= 2
    return pages


def logical_index(logical_id: int, flat: bool) -> int | None:
    """KVM ``avic_get_logical_id_entry``: the logical table index of an xAPIC logical ID
    (``LDR >> 24``), or None when AVIC cannot express it (zero, not a power of two, flat index
    above 7, cluster 0xF)."""
    if flat:
        if not logical_id or logical_id & (logical_id - 1):
            return None
        index = logical_id.bit_length() - 1
        return index if index <= 7 else None
    cluster = logical_id >> 4
    bits = logical_id & 0xF
    if cluster >= 0xF or not bits or bits & (bits - 1):
        return None
    return (cluster << 2) + bits.bit_length() - 1


AVIC_VM_ID_SHIFT = 12
AVIC_VM_ID_MASK = (1 << 20) - 1
AVIC_VCPU_IDX_MASK = AVIC_PHYSICAL_MAX_INDEX_MASK


def ga_tag(vm_id: int, vcpu_idx: int) -> int:
    """``__AVIC_GATAG(vm_id, vcpu_idx)`` (AV-A8)."""
    return ((vm_id & AVIC_VM_ID_MASK) << AVIC_VM_ID_SHIFT) | (vcpu_idx & AVIC_VCPU_IDX_MASK)


def ga_tag_fields(tag: int) -> tuple[int, int]:
    """``(vm_id, vcpu_idx)`` of a GA tag (``avic_ga_log_notifier``)."""
    return (tag >> AVIC_VM_ID_SHIFT) & AVIC_VM_ID_MASK, tag & AVIC_VCPU_IDX_MASK


@dataclass(frozen=True, slots=True)
class VmcbAvic:
    """The VMCB's AVIC fields of one vCPU (AV-A1, AV-A5): ``int_ctl`` bits 31 (AVIC) and 30
    (x2AVIC), the three table pointers, ``avic_physical_id`` = table PA | max index, and the
    two intercepts KVM flips with them (CR8 writes, the x2APIC MSRs)."""

    int_ctl: int
    avic_backing_page: int
    avic_logical_id: int
    avic_physical_id: int
    avic_vapic_bar: int = APIC_DEFAULT_PHYS_BASE
    intercept_cr8_write: bool = False
    """INTERCEPT_CR8_WRITE: a guest MOV to CR8 exits (``SVM_EXIT_WRITE_CR8``); set while AVIC
    is deactivated, clear while it is active (87d0f901a9bd, AV-G4)."""
    intercept_x2apic_msrs: bool = True
    """The x2APIC MSRs (0x800-0x8FF) are intercepted: clear only for an x2APIC vCPU on an
    active x2AVIC (``svm_set_x2apic_msr_interception``)."""

    @property
    def avic_enabled(self) -> bool:
        return bool(self.int_ctl & AVIC_ENABLE_MASK)

    @property
    def x2apic_mode(self) -> bool:
        return bool(self.int_ctl & X2APIC_MODE_MASK)

    @property
    def max_index(self) -> int:
        return self.avic_physical_id & AVIC_PHYSICAL_MAX_INDEX_MASK


def incomplete_ipi_info(icrl: int, icrh: int, cause: IpiFailure, index: int) -> tuple[int, int]:
    """``(EXITINFO1, EXITINFO2)`` of ``#VMEXIT(AVIC_INCOMPLETE_IPI)`` (AV-B6)."""
    return (icrh << 32) | icrl, INCOMPLETE_IPI_INFO2.pack(
        cause=int(cause), index=index & AVIC_PHYSICAL_MAX_INDEX_MASK
    )


def unaccelerated_access_info(offset: int, write: bool) -> int:
    """EXITINFO1 of ``#VMEXIT(AVIC_UNACCELERATED_ACCESS)`` (AV-D1)."""
    return UNACCEL_INFO1.pack(offset=(offset >> 4) & 0xFF, write=int(write))


# ===========================================================================================
# The guest ICR write (Part B)
# ===========================================================================================
def backing_page_set_irr(apic: LocalApic, vector: int) -> bool:
    """The CPU sets ``vector`` in the target's backing page IRR (the page is ``apic.regs``).
    Model choice: it obeys the APIC's acceptance stage (an enabled APIC, SVR.APIC enabled),
    clears TMR for the edge vector; True if the bit is now set."""
    if not apic.hw_enabled or not apic.svr & 0x100:
        return False
    if vector < 16 and not apic.profile.accept_illegal_vectors:
        apic._log_error(ESR_RECV_ILLEGAL_VECTOR)
        return False
    bit = ((vector >> 5) << 7) | (vector & 31)
    apic._tmr_bits[bit] = 0
    apic._irr_bits[bit] = 1
    return True


class AvicView(TypingProtocol):
    """What the CPU reaches while it runs a guest ICR write: the VM's tables, the backing pages
    by physical address, a vCPU index for step names, the doorbell."""

    physical_table: PhysicalTable
    logical_table: LogicalTable

    def page(self, pa: int) -> LocalApic | None: ...

    def index_of_page(self, pa: int) -> int: ...

    def hw_doorbell(self, host_id: int) -> None: ...


@dataclass(frozen=True, slots=True)
class IcrWrite:
    """One guest ICR write as the CPU sees it."""

    sender: LocalApic
    sender_id: int
    """The sender's guest physical APIC ID (its physical table slot)."""
    sender_index: int
    icrl: int
    icrh: int
    x2apic: bool
    flat: bool
    """The sender's DFR model (xAPIC logical addressing)."""
    max_index: int


IcrResult = tuple[IpiFailure, int] | None


def _targets(view: AvicView, w: IcrWrite) -> tuple[list[int], IcrResult]:
    """The guest physical IDs the write reaches, or the failure raised before any IRR write."""
    icrl = w.icrl
    shorthand = (icrl >> 18) & 3
    table = view.physical_table
    top = w.max_index
    if shorthand >= 2:
        ids = [i for i in range(top + 1) if table.raw(i) & _VALID]
        if shorthand == 3:
            ids = [i for i in ids if i != w.sender_id]
        return ids, None
    dest = w.icrh if w.x2apic else w.icrh >> 24
    broadcast = 0xFFFFFFFF if w.x2apic else 0xFF
    if dest == broadcast:
        return [i for i in range(top + 1) if table.raw(i) & _VALID], None
    if not (icrl >> 11) & 1:  # physical
        if dest > top or not table.raw(dest) & _VALID:
            return [], (IpiFailure.INVALID_TARGET, dest)
        return [dest], None
    ids = []
    if w.x2apic:
        cluster = (dest >> 16) << 4
        bits = dest & 0xFFFF
        for i in range(16):
            if bits >> i & 1:
                pid = cluster + i
                if pid > top or not table.raw(pid) & _VALID:
                    return [], (IpiFailure.INVALID_TARGET, pid)
                ids.append(pid)
        return ids, None
    if w.flat:
        first, bits, width = 0, dest, 8
    else:
        first, bits, width = (dest >> 4) << 2, dest & 0xF, 4
    for i in range(width):
        if bits >> i & 1:
            index = first + i
            raw = view.logical_table.raw(index)
            if not raw & _LVALID:
                return [], (IpiFailure.INVALID_TARGET, index)
            pid = raw & 0xFF
            if pid > top or not table.raw(pid) & _VALID:
                return [], (IpiFailure.INVALID_TARGET, pid)
            if pid not in ids:
                ids.append(pid)
    return ids, None


def icr_write_steps(
    view: AvicView, w: IcrWrite, *, stale_isrunning: bool = False, vector_check: bool = False
) -> Protocol:
    """AV-B1..B5: what the CPU does with a guest ICR write under AVIC, as atomic steps.
    Returns None (accelerated, no exit) or ``(cause, index)`` for ``#VMEXIT(INCOMPLETE_IPI)``.
    ``vector_check`` (UNVERIFIED which vectors the CPU refuses): vectors 0-15 fail with
    INVALID_IPI_VECTOR; off, they are sent like any other (as KVM's emulation does)."""
    icrl = w.icrl
    vector = icrl & 0xFF
    if (icrl >> 8) & 7 or (icrl >> 15) & 1:
        return (IpiFailure.INVALID_INT_TYPE, 0)
    if vector < 16 and vector_check:
        return (IpiFailure.INVALID_IPI_VECTOR, 0)
    if (icrl >> 18) & 3 == 1:
        # AV-B3: Self never reads the physical table.
        sender = w.sender
        yield Step(
            f"avic.hw.set_irr[{w.sender_index}]",
            frozenset({f"apic_regs[{w.sender_index}]"}),
            frozenset({f"irr[{w.sender_index}]"}),
            lambda: backing_page_set_irr(sender, vector),
        )
        return None
    resolved: list[object] = []

    def resolve() -> None:
        resolved.extend(_targets(view, w))

    yield Step(
        "avic.hw.resolve", frozenset({"avic.physical_table", "avic.logical_table"}),
        frozenset(), resolve,
    )
    ids, failure = resolved
    assert isinstance(ids, list)
    if failure is not None:
        return failure  # AV-B4: nothing was sent
    table = view.physical_table
    not_running: list[int] = []
    for pid in ids:
        raw = table.raw(pid)
        pa = PhysicalEntry(raw).backing_page
        target = view.page(pa)
        if target is None:
            return (IpiFailure.INVALID_BACKING_PAGE, pid)
        i = view.index_of_page(pa)
        entry_name = f"avic.physical_table[{pid}]"
        seen: list[int] = []

        def read_running(pid: int = pid, seen: list[int] = seen) -> bool:
            seen.append(table.raw(pid))
            return bool(seen[-1] & _RUNNING)

        def write_irr(target: LocalApic = target) -> bool:
            return backing_page_set_irr(target, vector)

        set_irr = Step(
            f"avic.hw.set_irr[{i}]", frozenset({f"apic_regs[{i}]"}), frozenset({f"irr[{i}]"}),
            write_irr,
        )
        read = Step(
            f"avic.hw.read_is_running[{i}]", frozenset({entry_name}), frozenset(), read_running
        )
        if stale_isrunning:
            running = yield read  # erratum #1235: no barrier between the two
            yield set_irr
        else:
            yield set_irr
            running = yield read
        if running:
            if pid != w.sender_id:
                host = seen[-1] & _HOST
                yield Step(
                    f"avic.hw.doorbell[{i}]", frozenset(), frozenset({"avic.doorbells"}),
                    lambda host=host: view.hw_doorbell(host),  # type: ignore[misc]
                )
        else:
            not_running.append(pid)
    if not_running:
        physical = not (icrl >> 11) & 1 and not (icrl >> 18) & 3
        index = (w.icrh if w.x2apic else w.icrh >> 24) if physical else not_running[0]
        return (IpiFailure.TARGET_NOT_RUNNING, index)
    return None



# What a bug replay (``apicsim/replays/accel.py``) may swap.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "max_physical_index",  # BR-A20 574ef752d4ae: max_vcpu_ids - 1, not the count
    }
)
