"""Hypothesis strategies and small builders for local APIC tests, made from the register table.

Everything register-shaped comes from :data:`lapic.registers.REGISTERS`, so a row added to the
table is drawn by every property that uses these strategies.

* :func:`xapic_offsets`, :func:`x2apic_msrs`: where the registers live;
* :func:`writable_registers`: rows writable in a mode (``ApicMode.XAPIC``/``X2APIC``);
* :func:`register_values`: 32-bit values, biased toward the table's write masks;
* :func:`apic_configs`: a vCPU id, a profile preset and :class:`~lapic.Features`, as an
  :class:`ApicConfig` whose :meth:`~ApicConfig.build` makes the ``LocalApic``.

Builders shared by the register tests: :func:`make_apic` (an APIC in a chosen mode, software
enabled or not), :func:`snapshot` (everything a faulting access must leave unchanged) and
:func:`assert_gp` (the access raises #GP and leaves that snapshot as it was).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import pytest
from hypothesis import strategies as st

from lapic import ApicMode, Features, GuestFault, LocalApic, Profile
from lapic.faults import GP_VECTOR
from lapic.registers import (
    APIC_BASE_EN,
    APIC_BASE_EXTD,
    APIC_BASE_MSR,
    APIC_DEFAULT_BASE,
    REGISTERS,
    X2APIC_MSR_FIRST,
    X2APIC_MSR_LAST,
    Access,
    Register,
)

U32_MAX = 0xFFFFFFFF
PROFILE_NAMES: tuple[str, ...] = ("kvm", "sdm")
SVR_SW_ENABLED = 0x1FF
"""SVR value used to software-enable an APIC: enable bit 8, spurious vector 0xFF."""


def access_in(reg: Register, mode: ApicMode) -> Access:
    """The row's ``Access`` in ``mode`` (``XAPIC`` or ``X2APIC``)."""
    if mode is ApicMode.XAPIC:
        return reg.xapic
    if mode is ApicMode.X2APIC:
        return reg.x2apic
    raise ValueError(f"mode={mode!r}: registers are only accessible in XAPIC or X2APIC mode")


def xapic_offsets() -> st.SearchStrategy[int]:
    """The MMIO offset of every register in the table."""
    return st.sampled_from([r.offset for r in REGISTERS])


def x2apic_msrs(*, include_unmapped: bool = False) -> st.SearchStrategy[int]:
    """The MSR of every table register that has one; with ``include_unmapped``, any MSR of
    0x800-0x8FF (reserved indexes included)."""
    if include_unmapped:
        return st.integers(X2APIC_MSR_FIRST, X2APIC_MSR_LAST)
    return st.sampled_from([r.msr for r in REGISTERS if r.msr is not None])


def writable_registers(mode: ApicMode) -> st.SearchStrategy[Register]:
    """Rows whose ``Access`` in ``mode`` includes W (feature registers included)."""
    return st.sampled_from([r for r in REGISTERS if Access.W in access_in(r, mode)])


def register_values() -> st.SearchStrategy[int]:
    """32-bit values: uniform, plus every write mask of the table, its complement, 0 and
    all-ones (the edges a mask bug shows on)."""
    masks = {r.write_mask for r in REGISTERS} | {0, U32_MAX}
    edges = sorted(masks | {~m & U32_MAX for m in masks})
    return st.one_of(st.sampled_from(edges), st.integers(0, U32_MAX))


def features() -> st.SearchStrategy[Features]:
    """Any :class:`Features` the model accepts."""
    return st.builds(
        Features,
        x2apic=st.booleans(),
        tsc_deadline=st.booleans(),
        cmci=st.booleans(),
        directed_eoi=st.booleans(),
        smm=st.booleans(),
        maxphyaddr=st.integers(36, 52),
        intel_compatible=st.booleans(),
    )


@dataclass(frozen=True)
class ApicConfig:
    """How to build one ``LocalApic``."""

    vcpu_id: int = 0
    profile: str = "kvm"
    features: Features = field(default_factory=Features)
    bsp: bool = False

    def build(self, mode: ApicMode = ApicMode.XAPIC, *, sw_enabled: bool = False) -> LocalApic:
        return make_apic(
            self.profile,
            vcpu_id=self.vcpu_id,
            mode=mode,
            sw_enabled=sw_enabled,
            features=self.features,
            bsp=self.bsp,
        )


def apic_configs(
    *, profiles: Sequence[str] = PROFILE_NAMES, x2apic: bool = False
) -> st.SearchStrategy[ApicConfig]:
    """vCPU id (8-bit ids favoured), profile preset and features.  ``x2apic=True`` keeps
    ``Features.x2apic`` on, for configs that will be built in x2APIC mode."""
    feats = features()
    if x2apic:
        feats = feats.filter(lambda f: f.x2apic)
    return st.builds(
        ApicConfig,
        vcpu_id=st.one_of(st.integers(0, 0xFF), st.integers(0, 0xFFFFFFFE)),
        profile=st.sampled_from(list(profiles)),
        features=feats,
        bsp=st.booleans(),
    )


def make_apic(
    profile: str | Profile = "kvm",
    *,
    vcpu_id: int = 0,
    mode: ApicMode = ApicMode.XAPIC,
    sw_enabled: bool = True,
    features: Features | None = None,
    bsp: bool = False,
) -> LocalApic:
    """A fresh APIC (RESET state) moved to ``mode`` by guest writes of IA32_APIC_BASE; with
    ``sw_enabled`` SVR is 0x1FF (written in xAPIC mode first, then the mode is entered)."""
    apic = LocalApic(vcpu_id, profile, bsp, features=features)
    if sw_enabled:
        apic.mmio_write(0xF0, SVR_SW_ENABLED)
    base = apic.rdmsr(APIC_BASE_MSR) & ~(APIC_BASE_EN | APIC_BASE_EXTD)
    assert base & ~0x100 == APIC_DEFAULT_BASE
    if mode is ApicMode.X2APIC:
        apic.wrmsr(APIC_BASE_MSR, base | APIC_BASE_EN | APIC_BASE_EXTD)
    elif mode is ApicMode.DISABLED:
        apic.wrmsr(APIC_BASE_MSR, base)
    assert apic.mode is mode
    return apic


Snapshot = tuple[bytes, int, int, bool, bool, bool, int, bool, int]


def snapshot(apic: LocalApic) -> Snapshot:
    """Everything guest-visible a refused access must not change: the 1 KiB state image,
    IA32_APIC_BASE, the pending events and the arbitration counter."""
    return (
        apic.get_state(),
        apic.apic_base,
        apic.nmi_pending,
        apic.smi_pending,
        apic.init_pending,
        apic.sipi_pending,
        apic.sipi_vector,
        apic.pv_unhalted,
        apic.arb_prio,
    )


def hex_id(value: object) -> str | None:
    """pytest ``ids=``: enums by name, ints (offsets, MSRs, values) in hex, others by default."""
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value)
    return None


def assert_gp(apic: LocalApic, access: Callable[[], object]) -> GuestFault:
    """``access`` raises #GP (vector 13) and changes nothing in :func:`snapshot`."""
    before = snapshot(apic)
    with pytest.raises(GuestFault) as info:
        access()
    assert info.value.vector == GP_VECTOR
    assert snapshot(apic) == before
    return info.value


Access_ = tuple[str, int, int]
"""One step of :func:`accesses`: ``(kind, a, b)``, applied by :func:`apply_access`."""

_ACCESS_MSRS = [r.msr for r in REGISTERS if r.msr is not None] + [APIC_BASE_MSR, 0x6E0]


def accesses(max_size: int = 25) -> st.SearchStrategy[list[Access_]]:
    """Sequences of guest and host operations on one APIC: MMIO reads/writes of table
    registers, RDMSR/WRMSR (x2APIC registers, IA32_APIC_BASE, TSC deadline), interrupts offered
    in every delivery mode, acknowledge, EOI, CR8 and time passing."""
    step = st.one_of(
        st.tuples(st.just("mmio_write"), xapic_offsets(), register_values()),
        st.tuples(st.just("mmio_read"), xapic_offsets(), st.just(0)),
        st.tuples(st.just("wrmsr"), st.sampled_from(_ACCESS_MSRS), register_values()),
        st.tuples(
            st.just("wrmsr"),
            st.just(APIC_BASE_MSR),
            st.sampled_from([0xFEE00800, 0xFEE00C00, 0xFEE00000, 0xFEE00900]),
        ),
        st.tuples(st.just("rdmsr"), st.sampled_from(_ACCESS_MSRS), st.just(0)),
        st.tuples(st.just("accept"), st.integers(0, 255), st.integers(0, 15)),
        st.tuples(st.just("ack"), st.just(0), st.just(0)),
        st.tuples(st.just("eoi"), st.just(0), st.just(0)),
        st.tuples(st.just("cr8"), st.integers(0, 15), st.just(0)),
        st.tuples(st.just("advance"), st.integers(0, 3_000_000), st.just(0)),
    )
    return st.lists(step, max_size=max_size)


def apply_access(apic: LocalApic, access: Access_) -> object:
    """Run one :func:`accesses` step; returns its result (``"#GP"`` for a guest fault)."""
    from lapic import DeliveryMode, Trigger

    kind, a, b = access
    try:
        if kind == "mmio_write":
            apic.mmio_write(a, b)
            return None
        if kind == "mmio_read":
            return apic.mmio_read(a)
        if kind == "wrmsr":
            apic.wrmsr(a, b)
            return None
        if kind == "rdmsr":
            return apic.rdmsr(a)
        if kind == "accept":
            return apic.accept(a, DeliveryMode(b & 7), Trigger(b >> 3))
        if kind == "ack":
            return apic.ack()
        if kind == "eoi":
            return apic.eoi()
        if kind == "cr8":
            apic.set_cr8(a)
            return apic.get_cr8()
        if kind == "advance":
            return apic.advance(a)
    except GuestFault as fault:
        return f"#GP {fault.vector}"
    raise ValueError(f"access kind {kind!r} is unknown")
