"""Hypothesis strategies over apicsim's values: topologies, ICR/MSI values, register writes
and operation programs (operations of :mod:`apicsim.ops`).

* :func:`topologies`: a :class:`Topology` (vCPU ids, x2APIC or xAPIC mode, KVM's
  ``x2apic_format`` and broadcast quirk); both live in :mod:`apicsim.testing.topologies`
  (the one home of topologies, with per-vCPU APIC states and ``build_bus``) and are
  re-exported here;
* :func:`icr_values`: 64-bit ICR values (vector, delivery mode, destination mode, level,
  trigger, shorthand, destination) with the reserved bits clear;
* :func:`msi_values`: ``(address_lo, data)`` pairs for ``vm.signal_msi``;
* :func:`register_writes`: ``(offset, value)`` writes to the writable registers of the APIC
  page (TPR, LDR, DFR, SVR, ESR, LVTs, timer, ICR);
* :func:`programs`: lists of operations (ICR writes, MSIs, VM entries) for a topology.

Sources: the ICR layout (SDM Vol. 3A 11.6.1), the MSI address/data layout (SDM Vol. 3A
11.11), the register table of ``lapic.registers``.  Not modelled: values the model refuses
(reserved bits, illegal vectors); the project's own differential strategies
(``tests/differential/strategies.py``) draw those too.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from apicsim.ops import Icr, Msi, Op, Run
from apicsim.testing.topologies import Topology, topologies

__all__ = ["Topology", "icr_values", "msi_values", "programs", "register_writes", "topologies",
           "vectors"]

U32 = 0xFFFFFFFF
WRITABLE = (0x80, 0xD0, 0xE0, 0xF0, 0x280, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x380,
            0x3E0)
"""xAPIC offsets a guest writes (TPR, LDR, DFR, SVR, ESR, the LVTs, TMICT, TDCR)."""


def vectors(*, legal: bool = True) -> st.SearchStrategy[int]:
    """Interrupt vectors (16..255 when ``legal``)."""
    return st.integers(16 if legal else 0, 255)


def icr_values(dests: Sequence[int] = ()) -> st.SearchStrategy[int]:
    """64-bit ICR values (x2APIC layout: destination in bits 63:32), reserved bits clear."""
    dest = st.sampled_from([*dests, 0xFF, U32]) if dests else st.integers(0, U32)
    return st.builds(
        lambda v, mode, dm, level, trig, sh, d: (
            v | mode << 8 | dm << 11 | level << 14 | trig << 15 | sh << 18 | d << 32
        ),
        vectors(),
        st.sampled_from((0, 1, 4)),  # fixed, lowest priority, NMI
        st.integers(0, 1),
        st.just(1),
        st.integers(0, 1),
        st.integers(0, 3),
        dest,
    )


def msi_values(dests: Sequence[int] = ()) -> st.SearchStrategy[tuple[int, int]]:
    """``(address_lo, data)`` of an MSI: xAPIC destination in address bits 19:12."""
    dest = st.sampled_from([*(d & 0xFF for d in dests), 0xFF]) if dests else st.integers(0, 255)
    return st.builds(
        lambda d, logical, v, mode: (0xFEE00000 | d << 12 | logical << 2, v | mode << 8),
        dest,
        st.integers(0, 1),
        vectors(),
        st.sampled_from((0, 1, 4)),
    )


def register_writes() -> st.SearchStrategy[tuple[int, int]]:
    """``(offset, value)``: a 32-bit write to a writable xAPIC register."""
    return st.tuples(st.sampled_from(WRITABLE), st.integers(0, U32))


@st.composite
def _op(draw: st.DrawFn, top: Topology) -> Op:
    n = len(top.vcpu_ids)
    kind = draw(st.sampled_from(("icr", "icr", "msi", "run")))
    if kind == "run":
        return Run(draw(st.integers(0, n - 1)))
    if kind == "msi":
        lo, data = draw(msi_values(top.vcpu_ids))
        return Msi(lo, 0, data, 0)
    value = draw(icr_values(top.vcpu_ids))
    return Icr(
        vcpu=draw(st.integers(0, n - 1)),
        dest=(value >> 32) if top.x2apic else (value >> 32) & 0xFF,
        vector=value & 0xFF,
        mode=(value >> 8) & 7,
        dest_mode=(value >> 11) & 1,
        shorthand=(value >> 18) & 3,
        level=(value >> 14) & 1,
        trigger=(value >> 15) & 1,
    )


def programs(top: Topology, *, max_size: int = 10) -> st.SearchStrategy[list[Op]]:
    """Operation lists for ``top``'s VM: ICR writes, MSIs and VM entries."""
    return st.lists(_op(top), max_size=max_size)
