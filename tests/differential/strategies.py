"""Hypothesis strategies: random topologies and random operation sequences.

``programs(kinds=...)`` draws a :class:`Program`: a :class:`Topology` (1-8 vCPUs, now and then
32; contiguous or sparse vCPU ids, some above 0xFF; the VM's ``x2apic_format`` and broadcast
quirk), a set-up that gives each vCPU an xAPIC ID, LDR, DFR, a mode (xAPIC, x2APIC by the
guest or by the host, disabled), SVR and TPR, then random operations of the given kinds.
Every operation passes through :func:`tests.differential.exclusions.permitted`.  Values are
drawn from a few interesting ones, at random, or as uniform bits over the field's writable
range (:func:`uniform_bits`); hypothesis shrinks toward the first of each list, so the
interesting values come first and the simplest operations first.  A write (register, MSR,
state image, CR8) is followed some of the time by guest execution on its vCPU and a host
read-back (:func:`followups`), so a value that does not survive an exit or a KVM_GET/SET_SREGS
round trip (KVMB-10/11) is seen.  The :class:`Topology` type is
``apicsim.testing.topologies.Topology`` (one type for the suites and for users' own property
tests).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import strategies as st

from apicsim.ops import (
    APIC_BASE_MSR,
    DEFAULT_BASE,
    ICR_MSR,
    SELF_IPI_MSR,
    TSC_DEADLINE_MSR,
    GetMsr,
    InitSipi,
    Ipi,
    MmioRead,
    MmioWrite,
    MovFromCr8,
    MovToCr8,
    Msi,
    Op,
    Rdmsr,
    RegRead,
    RegWrite,
    Restore,
    SetBase,
    SetCr8,
    SetMsr,
    Wrmsr,
)
from apicsim.testing.topologies import Topology as Topology  # the one topology type
from tests.differential.exclusions import FAR_DEADLINE, permitted
from tests.kvm.support import FEATURES

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Program:
    """A topology, its set-up operations and the random operations, run in that order."""

    topology: Topology
    setup: tuple[Op, ...]
    ops: tuple[Op, ...]

    @property
    def steps(self) -> tuple[Op, ...]:
        return self.setup + self.ops


# =============================================================================================
# Values
# =============================================================================================
REGISTER_OFFSETS = (
    0x080, 0x0F0, 0x020, 0x0D0, 0x0E0, 0x0B0, 0x300, 0x310, 0x030, 0x090, 0x0A0, 0x0C0,
    0x280, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x2F0, 0x380, 0x390, 0x3E0, 0x3F0,
    0x100, 0x170, 0x180, 0x1F0, 0x200, 0x270, 0x000, 0x010, 0x040, 0x0140, 0x3A0, 0x3D0,
)  # fmt: skip
"""Register offsets, the usual ones first; then vector words and offsets with no register."""

IMAGE_DWORDS = (
    0x080, 0x0F0, 0x020, 0x0D0, 0x0E0, 0x100, 0x110, 0x170, 0x180, 0x1F0, 0x200, 0x270,
    0x280, 0x300, 0x304, 0x310, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x380, 0x390,
    0x3E0, 0x030, 0x090, 0x0A0, 0x0B0, 0x3F0, 0x024, 0x104, 0x2F0, 0x000,
    *range(0x120, 0x170, 0x10), *range(0x190, 0x200, 0x10), *range(0x210, 0x270, 0x10),
)  # fmt: skip
"""Dwords of the KVM_GET_LAPIC image a restore may change (registers, their upper halves,
the bytes between the vector words, and every word of ISR, TMR and IRR)."""

VALUES32 = (
    0, 0x1FF, 0xFF, 0x20, 0xF0, 0x10, 0x0FFFFFFF, 0xFFFFFFFF, 0x01000000, 0x000100F1,
    0x000400F3, 0x00008031, 0x00000700, 0x00000400, 0x12345678, 0x100, 0x1000, 0x3FF,
)  # fmt: skip

VECTORS = (0x31, 0xF1, 0x20, 0x10, 0x0F, 0x00, 0xFF, 0x80, 0x41)
DELIVERY_MODES = (0, 4, 1, 5, 6, 2, 3, 7)
"""Fixed, NMI, lowest priority, INIT, STARTUP, SMI, remote read, ExtINT."""
ICR_RESERVED = (0, 1 << 12, 1 << 13, 1 << 16, 1 << 17, 1 << 20, 0xFFF00000, 0xFFF32000)
MSRS = (
    APIC_BASE_MSR, 0x802, 0x803, 0x808, 0x80A, 0x80B, 0x80D, 0x80E, 0x80F, 0x810, 0x818,
    0x820, 0x828, 0x830, 0x831, 0x832, 0x835, 0x837, 0x838, 0x839, 0x83E, 0x83F,
    TSC_DEADLINE_MSR, 0x800, 0x801, 0x809, 0x80C, 0x82F, 0x840, 0x8FF, 0x900, 0xBFF,
)  # fmt: skip
WRITE_VALUES = (
    0, 0x1FF, 0xFF, 0x20, 0x31, 0xFFFFFFFF, 0x100, 0x10000, 0x000100F1, 0x000400F3,
    1 << 32, 0x1_000000F1, U64, FAR_DEADLINE,
)  # fmt: skip
BASE_ADDRESSES = (DEFAULT_BASE, 0xFED00000, 0xFEE01000, 0x1_0000_0000, 0x8000_0000_0000)
BASE_RESERVED = (0, 0x200, 0x80, 0x1, 0x2FF)


def _pick(values: Sequence[int], lo: int, hi: int) -> st.SearchStrategy[int]:
    """One of ``values`` (shrinks to the first), or any integer in ``[lo, hi]``."""
    return _pick_cached(tuple(values), lo, hi)


@functools.cache
def _pick_cached(values: tuple[int, ...], lo: int, hi: int) -> st.SearchStrategy[int]:
    if lo == 0 and hi & (hi + 1) == 0:  # a whole range of bits: uniform bits too
        return st.one_of(st.sampled_from(values), st.integers(lo, hi), uniform_bits(hi))
    return st.one_of(st.sampled_from(values), st.integers(lo, hi))


@functools.cache
def uniform_bits(mask: int) -> st.SearchStrategy[int]:
    """Every bit of ``mask`` independently 0 or 1 with probability 1/2.  (Hypothesis's own
    ``integers`` favour small and boundary values, so the high bits of a wide register would
    be seen 1 too rarely; the coverage report showed it.)"""
    return st.randoms(use_true_random=True).map(lambda r: r.getrandbits(mask.bit_length()) & mask)


# =============================================================================================
# Topology and set-up
# =============================================================================================
@st.composite
def topologies(draw: st.DrawFn, *, large: bool = True, vcpus: int | None = None) -> Topology:
    """1-8 vCPUs (now and then 32, when ``large``), ids 0..n-1 or sparse (up to 0x1FF); or
    exactly ``vcpus`` vCPUs with ids 0..n-1."""
    if vcpus is not None:
        count = vcpus
    else:
        roll = draw(st.integers(0, 99))  # shrinks to 0: the small VMs
        count = 32 if large and roll >= 97 else draw(st.integers(1, 8))
    if count <= 8 and vcpus is None and draw(st.integers(0, 4)) == 4:
        ids = sorted(draw(st.sets(st.integers(0, 0x1FF), min_size=count, max_size=count)))
    else:
        ids = list(range(count))
    return Topology(
        tuple(ids), x2apic_format=draw(st.booleans()), broadcast_quirk=draw(st.booleans())
    )


MODES = ("xapic", "x2apic", "x2apic-host", "disabled", "x2apic-then-disabled")


@st.composite
def vcpu_setup(draw: st.DrawFn, i: int, ids: Sequence[int]) -> list[Op]:
    """xAPIC ID, LDR and DFR (while in xAPIC mode), a mode, then SVR and TPR (through the
    interface of that mode)."""
    ops: list[Op] = []
    if draw(st.booleans()):
        xapic_id = draw(_pick([ids[i] & 0xFF, *(v & 0xFF for v in ids), 0xFF], 0, 0xFF))
        ops.append(RegWrite(i, 0x20, xapic_id << 24))
    if draw(st.booleans()):
        ldr = draw(_pick([1 << (i % 8), 1, 2, 4, 8, 3, 0x11, 0x21, 0xF1, 0xFF, 0], 0, 0xFF))
        ops.append(RegWrite(i, 0xD0, ldr << 24))
    if draw(st.booleans()):
        ops.append(RegWrite(i, 0xE0, draw(_pick([0x0FFFFFFF, 0xFFFFFFFF], 0, U32))))
    mode = draw(st.sampled_from(MODES))
    if mode in ("x2apic", "x2apic-then-disabled"):
        ops.append(SetBase(i, False, "x2apic"))
    elif mode == "x2apic-host":
        ops.append(SetBase(i, True, "x2apic"))
    if mode in ("disabled", "x2apic-then-disabled"):
        ops.append(SetBase(i, False, "disabled"))
    if draw(st.integers(0, 4)) != 0:
        ops.append(RegWrite(i, 0xF0, draw(_pick([0x1FF, 0xFF, 0x10F, 0x3FF, 0x11FF], 0, 0x3FF))))
    if draw(st.booleans()):
        tpr = draw(_pick([0x20, 0x2F, 0xF0, 0xFF, 0x0F, 0x51, 0x00], 0, 0xFF))
        ops.append(RegWrite(i, 0x80, tpr))
        ops += draw(followups(i))
    return ops


CR8_VALUES = (0, 0xF, 2, 0x10, 0x12, U64)
"""Values a host KVM_SET_SREGS writes to CR8; above 0xF KVM leaves the TPR unchanged."""
GUEST_CR8_VALUES = (0, 0xF, 2, 7, 0x10, 0x13, 1 << 63, U64)
"""Edge values of the guest's MOV to CR8: 0..0xF set the TPR class, any of bits 63:4 is #GP.
With them ``_pick`` draws any integer and uniform bits over all 64 (CR8-1)."""


@st.composite
def followups(draw: st.DrawFn, i: int) -> list[Op]:
    """What may follow a register, MSR or state-image write of vCPU ``i``: some of the time
    guest execution on that vCPU (a register read, an EOI, a self IPI: one exit each), some of
    the time a host read-back that goes through KVM_GET/SET_SREGS (the CR8 round trip a VMM's
    save/restore does) or KVM_GET_MSRS.  Every step is also followed by a KVM_GET_LAPIC of
    every vCPU (the engine's snapshot)."""
    out: list[Op] = []
    roll = draw(st.integers(0, 7))  # shrinks to 0: nothing follows (5 times in 8)
    if roll & 1:
        out.append(
            draw(
                st.one_of(
                    st.builds(RegRead, st.just(i), st.sampled_from(REGISTER_OFFSETS)),
                    st.builds(RegWrite, st.just(i), st.just(0xB0), st.just(0)),
                    st.builds(Ipi, st.just(i), st.just(0), st.sampled_from((0x40031, 0x400F1))),
                )
            )
        )
    if roll & 2:
        out.append(
            draw(
                st.one_of(
                    st.just(SetCr8(i)),
                    st.builds(GetMsr, st.just(i), st.sampled_from((APIC_BASE_MSR, 0x808))),
                )
            )
        )
    return out


# =============================================================================================
# Operations
# =============================================================================================
def _destinations(ids: Sequence[int]) -> st.SearchStrategy[int]:
    """A vCPU's x2APIC or xAPIC ID, a broadcast, a logical mask (flat or cluster) three times
    in four; any 32-bit value otherwise."""
    known = st.sampled_from(
        [*ids, *(v & 0xFF for v in ids), 0xFF, U32, 1, 3, 0xF, 0x10001, 0x10003, 0x2000F]
    )
    return st.one_of(known, known, known, st.integers(0, U32))


def icr_low() -> st.SearchStrategy[int]:
    return st.builds(
        lambda v, mode, dm, level, trig, sh, res: (
            v | mode << 8 | dm << 11 | level << 14 | trig << 15 | sh << 18 | res
        ),
        _pick(VECTORS, 0, 0xFF),
        st.sampled_from(DELIVERY_MODES),
        st.integers(0, 1),
        st.sampled_from((1, 0)),
        st.integers(0, 1),
        st.sampled_from((0, 1, 2, 3)),
        st.one_of(*[st.just(0)] * 4, st.sampled_from(ICR_RESERVED)),
    )


@st.composite
def msis(draw: st.DrawFn, ids: Sequence[int]) -> Msi:
    dest = draw(_destinations(ids))
    lo = 0xFEE00000 | (dest & 0xFF) << 12
    lo |= draw(st.sampled_from((0, 4, 8, 0xC)))  # dest mode logical, redirection hint
    if draw(st.integers(0, 9)) == 9:
        lo |= draw(st.sampled_from((0x3, 0xFF0, 0x0010_0000, 0x1000_0000)))  # junk
    hi = draw(st.sampled_from((0, 0, dest & ~0xFF, dest & ~0xFF, 0x100, 0x12300, 0xFF, dest)))
    data = (
        draw(_pick(VECTORS, 0, 0xFF))
        | draw(st.sampled_from(DELIVERY_MODES)) << 8
        | draw(st.sampled_from((1, 0))) << 14
        | draw(st.integers(0, 1)) << 15
    )
    if draw(st.integers(0, 9)) == 9:
        data |= draw(st.sampled_from((0x800, 0x1000, 0x2000, 0xFFFF0000)))
    flags = draw(st.sampled_from((0, 0, 0, 0, 0, 0, 1, 2)))
    return Msi(lo & U32, hi & U32, data, flags)


@st.composite
def mmio_reads(draw: st.DrawFn, vcpu: st.SearchStrategy[int]) -> MmioRead:
    size = draw(st.sampled_from((4, 1, 2, 8)))
    offset = draw(_pick(REGISTER_OFFSETS, 0, 0x1000 - size))
    if draw(st.integers(0, 5)) == 5:
        offset += draw(st.integers(1, 3))
    return MmioRead(draw(vcpu), min(offset, 0x1000 - size), size)


@st.composite
def mmio_writes(draw: st.DrawFn, vcpu: st.SearchStrategy[int]) -> MmioWrite:
    size = draw(st.sampled_from((4, 1, 2, 8)))
    offset = min(draw(_pick(REGISTER_OFFSETS, 0, 0x1000 - size)), 0x1000 - size)
    value = draw(_pick(VALUES32, 0, U32)) & ((1 << (8 * size)) - 1)
    return MmioWrite(draw(vcpu), offset, value, size)


def restores(vcpu: st.SearchStrategy[int]) -> st.SearchStrategy[Restore]:
    value = st.one_of(st.none(), _pick(VALUES32, 0, U32), uniform_bits(U32))
    some = st.lists(st.tuples(st.sampled_from(IMAGE_DWORDS), value), min_size=1, max_size=4)
    every = st.sampled_from((VECTOR_WORDS, REGISTER_WORDS)).flatmap(
        lambda words: st.lists(uniform_bits(U32), min_size=len(words), max_size=len(words)).map(
            lambda vs: list(zip(words, vs, strict=True))
        )
    )
    writes = st.one_of(some, some, some, some, some, every)
    return st.builds(lambda i, w: Restore(i, tuple(w)), vcpu, writes)


VECTOR_WORDS = tuple(range(0x100, 0x280, 0x10))
"""The 24 words of ISR, TMR and IRR."""
REGISTER_WORDS = (
    0x020, 0x080, 0x0D0, 0x0E0, 0x0F0, 0x300, 0x310, 0x320, 0x330, 0x340, 0x350, 0x360,
    0x370, 0x3E0,
)  # fmt: skip
"""The registers with writable bits (ID, TPR, LDR, DFR, SVR, ICR, ICR2, the LVTs, TDCR)."""


_ADDRESSES = uniform_bits((1 << FEATURES.maxphyaddr) - 1).map(lambda a: a & ~0xFFF)
"""Window addresses with uniform bits up to the KVM guest's MAXPHYADDR."""


def set_bases(vcpu: st.SearchStrategy[int]) -> st.SearchStrategy[SetBase]:
    """APIC_BASE writes: two times in three a uniform window address, about half of them
    without reserved bits, so every address bit up to MAXPHYADDR is seen 1 in a write that
    succeeds (the coverage test's APIC_BASE row)."""
    return st.builds(
        SetBase,
        vcpu,
        st.booleans(),
        st.sampled_from(("x2apic", "xapic", "disabled", "extd")),
        st.one_of(st.sampled_from(BASE_ADDRESSES), _ADDRESSES, _ADDRESSES),
        st.sampled_from(("keep", "clear", "set")),
        st.one_of(st.just(0), st.sampled_from(BASE_RESERVED)),
    )


KINDS = (
    "ipi", "init_sipi", "msi", "eoi", "self_ipi", "reg_write", "reg_read", "mmio_read",
    "mmio_write", "rdmsr", "wrmsr", "set_msr", "get_msr", "apic_base", "apic_base", "restore",
    "cr8", "guest_cr8",
)  # fmt: skip
"""Every kind, ``apic_base`` twice: its window address bits up to MAXPHYADDR are seen 1 only
in the writes that succeed with uniform bits, and the coverage test needs each of them."""

WRITES = frozenset({"reg_write", "mmio_write", "wrmsr", "set_msr", "restore", "cr8", "guest_cr8"})
"""The kinds that write a register, an MSR or the state image: :func:`followups` may follow
each of them."""


def operations(
    topology: Topology, kinds: Sequence[str] = KINDS
) -> st.SearchStrategy[list[Op]]:
    """One operation of one of ``kinds`` (repeat a kind to weight it), a write followed by
    its :func:`followups` (guest execution on its vCPU, a host read-back) some of the time."""
    return _operations(topology.vcpu_ids, tuple(kinds))



@functools.cache
def _operations(ids: tuple[int, ...], kinds: tuple[str, ...]) -> st.SearchStrategy[list[Op]]:
    vcpu = st.integers(0, len(ids) - 1)
    by_kind: dict[str, st.SearchStrategy[Op]] = {
        "ipi": st.builds(Ipi, vcpu, _destinations(ids), icr_low()),
        "init_sipi": st.builds(
            InitSipi, vcpu, _destinations(ids), st.sampled_from((0x12, 0x9F, 0)), st.booleans()
        ),
        "msi": msis(ids),
        "eoi": st.builds(RegWrite, vcpu, st.just(0xB0), st.sampled_from((0, 0, 0, 1, 0x31))),
        "self_ipi": st.builds(Wrmsr, vcpu, st.just(SELF_IPI_MSR), _pick(VECTORS, 0, 0x1FF)),
        "reg_write": st.builds(
            RegWrite, vcpu, st.sampled_from(REGISTER_OFFSETS), _pick(WRITE_VALUES, 0, U64)
        ),
        "reg_read": st.builds(RegRead, vcpu, st.sampled_from(REGISTER_OFFSETS)),
        "mmio_read": mmio_reads(vcpu),
        "mmio_write": mmio_writes(vcpu),
        "rdmsr": st.builds(Rdmsr, vcpu, st.sampled_from(MSRS)),
        "wrmsr": st.builds(Wrmsr, vcpu, st.sampled_from(MSRS), _pick(WRITE_VALUES, 0, U64)),
        "set_msr": st.builds(
            SetMsr,
            vcpu,
            st.sampled_from([m for m in MSRS if m != APIC_BASE_MSR]),
            _pick(WRITE_VALUES, 0, U64),
        ),
        "get_msr": st.builds(GetMsr, vcpu, st.sampled_from(MSRS)),
        "apic_base": set_bases(vcpu),
        "restore": restores(vcpu),
        "cr8": st.builds(SetCr8, vcpu, st.one_of(st.none(), st.sampled_from(CR8_VALUES))),
        "guest_cr8": st.one_of(
            st.builds(MovToCr8, vcpu, _pick(GUEST_CR8_VALUES, 0, U64)),
            st.builds(MovFromCr8, vcpu),
        ),
        "icr_raw": st.builds(
            Wrmsr,
            vcpu,
            st.just(ICR_MSR),
            st.builds(lambda d, lo: d << 32 | lo, _destinations(ids), icr_low()),
        ),
    }
    plain = [by_kind[k] for k in kinds if k not in WRITES]
    writes = [by_kind[k] for k in kinds if k in WRITES]
    one = st.one_of(
        *(p.filter(permitted).map(lambda op: [op]) for p in plain),
        *(w.filter(permitted).flatmap(_then_followups) for w in writes),
    )
    return one


def _then_followups(op: Op) -> st.SearchStrategy[list[Op]]:
    vcpu = getattr(op, "vcpu", None)
    if not isinstance(vcpu, int):
        return st.just([op])
    return followups(vcpu).map(lambda fs: [op, *(f for f in fs if permitted(f))])


@st.composite
def programs(
    draw: st.DrawFn,
    kinds: Sequence[str] = KINDS,
    *,
    max_ops: int = 16,
    chunks_max: int = 6,
    large: bool = True,
    vcpus: int | None = None,
) -> Program:
    """A random topology (``vcpus``: that many), its set-up, and up to ``chunks_max`` chunks
    of up to ``max_ops`` operations (about 20 in all on average)."""
    topo = draw(topologies(large=large, vcpus=vcpus))
    setup: list[Op] = []
    for i in range(len(topo.vcpu_ids)):
        setup += draw(vcpu_setup(i, topo.vcpu_ids))
    # Lists of lists: hypothesis draws about 6 elements for a list of any length, so a few
    # chunks give longer programs, and the shrinker still deletes single operations.
    one = operations(topo, kinds)
    chunks = draw(
        st.lists(st.lists(one, min_size=1, max_size=max_ops), min_size=1, max_size=chunks_max)
    )
    ops = [op for chunk in chunks for group in chunk for op in group]
    return Program(topo, tuple(op for op in setup if permitted(op)), tuple(ops))
