"""The conformance matrix: every profile x every accelerator, and the guest/host-API helpers.

Every test in ``tests/conformance/`` takes the ``platform`` fixture and runs once per
``(profile, accelerator)`` pair.  A test builds its VM with ``platform.vm(...)`` and then only
does what a guest or a VMM can do:

* guest side: accesses executed on ``vm.vcpu(i)`` (xAPIC MMIO at the APIC page, RDMSR/WRMSR,
  ``run``/``halt``), or a booted ``guest.Guest``;
* host side: ``vm.get_lapic``/``vm.set_lapic`` (KVM_GET/SET_LAPIC), ``vm.get_msr``/
  ``vm.set_msr`` (KVM_GET/SET_MSRS), ``vm.signal_msi`` (KVM_SIGNAL_MSI), ``vm.advance`` (time).

Nothing here reads the model's internals (``LocalApic`` objects, the APIC map, counters), so an
accelerator that completes accesses in "hardware" (AVIC, APICv/IPIv) is checked by the same
assertions as trap-and-emulate.  What the suite observes of an APIC's IRR/ISR/TMR is the
KVM_GET_LAPIC image (``specs/lapic.md`` STATE-1), which KVM also fills for APICv by syncing the
posted-interrupt descriptor first.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import pytest
from hypothesis import strategies as st

from apicsim.testing.plugin import Platform as Platform  # one definition, re-exported
from apicsim.testing.topologies import Topology
from hypervisor import KvmOptions, Vm, accel
from lapic.faults import GuestFault
from lapic.profile import PRESETS, LowestPriorityPolicy, Profile

ACCELERATORS: tuple[str, ...] = tuple(sorted(accel.ACCELERATORS))
"""Every name ``Vm(accelerator=...)`` accepts (``hypervisor.accel.ACCELERATORS``): a new
accelerator runs under every conformance test without touching this suite."""

MIXED = Profile.custom(
    "kvm",
    name="mixed",
    # SDM answers on the lapic side ...
    esr_latching=True,
    accept_illegal_vectors=False,
    x2apic_strict_reserved_bits=True,
    lvt_status_writable=False,
    xapic_id_writable=False,
    disable_resets_state=True,
    x2apic_lowest_priority_ipi=False,
    # ... and non-default clocks.
    bus_cycle_ns=3,
    min_periodic_ns=0,
)
"""A custom profile that mixes knobs from both presets: a combination no preset tests.  It
leaves out the knobs KVM's optimized map does not consult (``cluster15_addressable``,
``xapic_matches_x2apic_id``, and ``lowest_priority=LOWEST_TPR`` of the KVM options): with the
map on, the model answers those differently from the slow path, pinned as strict xfails in
``test_matrix.py``."""

MIXED_OPTIONS = KvmOptions(
    # An SDM answer on the VM side ...
    broadcast_quirk=False,
    # ... KVM's optimized map kept for delivery, with KVM's arbitration counter.
    lowest_priority=LowestPriorityPolicy.ARB_COUNTER,
)
"""The KVM options the mixed profile runs with."""

PROFILES: dict[str, Profile] = {**PRESETS, MIXED.name: MIXED}
"""Every preset (read from ``lapic.profile.PRESETS``) plus the mixed custom profile."""

OPTIONS: dict[str, KvmOptions] = {
    **{name: KvmOptions.for_profile(p) for name, p in PRESETS.items()},
    MIXED.name: MIXED_OPTIONS,
}
"""The KVM options of each profile's VMs (a preset's own, and the mixed ones)."""


MATRIX: tuple[Platform, ...] = tuple(
    Platform(profile, accel, OPTIONS[name])
    for name, profile in PROFILES.items()
    for accel in ACCELERATORS
)


@pytest.fixture(scope="session", params=MATRIX, ids=str)
def platform(request: pytest.FixtureRequest) -> Platform:
    """Session-scoped (immutable), so hypothesis' ``@given`` tests may use it."""
    param: Platform = request.param
    return param


# =============================================================================================
# Register offsets, MSRs and ICR bits (SDM Table 10-1 / 10-6), as a guest programs them
# =============================================================================================
ID = 0x20
TPR = 0x80
PPR = 0xA0
EOI = 0xB0
LDR = 0xD0
DFR = 0xE0
SVR = 0xF0
ISR_BASE = 0x100
TMR_BASE = 0x180
IRR_BASE = 0x200
ICR = 0x300
ICR2 = 0x310
LVTT = 0x320
LVT_OFFSETS = (0x320, 0x330, 0x340, 0x350, 0x360, 0x370)
"""Timer, Thermal, PerfMon, LINT0, LINT1, Error (CMCI is absent by default)."""
TMICT = 0x380
TMCCT = 0x390
TDCR = 0x3E0

MSR_APIC_BASE = 0x1B
MSR_X2APIC_ID = 0x802
MSR_X2APIC_LDR = 0x80D
MSR_ICR = 0x830
MSR_SELF_IPI = 0x83F

BASE_BSP = 0x100
BASE_EXTD = 0x400
BASE_EN = 0x800
DEFAULT_BASE = 0xFEE00000

SVR_ENABLED = 0x1FF

ICR_LOWEST = 0x100
ICR_LOGICAL = 0x800
ICR_BUSY = 0x1000
ICR_ASSERT = 0x4000
ICR_LEVEL = 0x8000
X2APIC_ICR_RESERVED = 0xFFF32000

XAPIC_BROADCAST = 0xFF
X2APIC_BROADCAST = 0xFFFFFFFF

GP = 13


class Mode(Enum):
    XAPIC = "xapic"
    X2APIC = "x2apic"

    def __repr__(self) -> str:
        return f"Mode.{self.name}"


class GuestApic:
    """The guest code of one vCPU programming its own APIC, like Linux's ``apic_read`` /
    ``apic_write``: MMIO at the APIC base in xAPIC mode, RDMSR/WRMSR in x2APIC mode.

    The mode is what the guest itself selected (``enable``); it is not read from the model."""

    def __init__(self, vm: Vm, index: int, mode: Mode = Mode.XAPIC) -> None:
        """``mode``: the mode the guest's APIC is in already (RESET: xAPIC)."""
        self.vm = vm
        self.vcpu = vm.vcpu(index)
        self.index = index
        self.vcpu_id = self.vcpu.vcpu_id
        self.base = self.vcpu.rdmsr(MSR_APIC_BASE) & ~0xFFF
        self.mode = mode

    def enable(self, mode: Mode) -> None:
        """From the RESET state: x2APIC if asked (``__x2apic_enable``), then SVR enable."""
        if mode is Mode.X2APIC:
            self.vcpu.wrmsr(MSR_APIC_BASE, self.vcpu.rdmsr(MSR_APIC_BASE) | BASE_EXTD)
            self.mode = Mode.X2APIC
        self.write(SVR, SVR_ENABLED)

    @property
    def x2apic(self) -> bool:
        return self.mode is Mode.X2APIC

    def read(self, offset: int) -> int:
        if self.x2apic:
            return self.vcpu.rdmsr(0x800 + (offset >> 4))
        return self.vcpu.mmio_read(self.base + offset)

    def write(self, offset: int, value: int) -> None:
        if self.x2apic:
            self.vcpu.wrmsr(0x800 + (offset >> 4), value)
        else:
            self.vcpu.mmio_write(self.base + offset, value)

    def send(self, low: int, dest: int) -> None:
        """One IPI: x2APIC one WRMSR of the 64-bit ICR; xAPIC ICR2 (dest << 24), then ICR."""
        if self.x2apic:
            self.vcpu.wrmsr(MSR_ICR, dest << 32 | low)
        else:
            self.vcpu.mmio_write(self.base + ICR2, (dest & 0xFF) << 24)
            self.vcpu.mmio_write(self.base + ICR, low)

    def read_icr(self) -> int:
        """The 64-bit view: x2APIC RDMSR 0x830; xAPIC ``ICR | ICR2 << 32``."""
        if self.x2apic:
            return self.vcpu.rdmsr(MSR_ICR)
        return self.read(ICR) | self.read(ICR2) << 32

    def eoi(self) -> None:
        self.write(EOI, 0)

    def run(self, *, eoi: bool = True) -> list[int]:
        """One VM entry.  The handler records each vector and, if ``eoi``, ends it with an EOI
        (also for vector 2: no test here sends NMIs, so every 2 is a fixed interrupt)."""

        def handler(_vcpu: object, _vector: int) -> None:
            if eoi:
                self.eoi()

        return self.vcpu.run(handler)


def boot(vm: Vm, mode: Mode) -> list[GuestApic]:
    """Every vCPU enables its APIC in ``mode`` and software-enables it (SVR = 0x1FF)."""
    cpus = [GuestApic(vm, i) for i in range(len(vm))]
    for cpu in cpus:
        cpu.enable(mode)
    return cpus


def expect_gp(action: Callable[[], object]) -> None:
    """Call ``action`` and require a #GP (``GuestFault`` with vector 13)."""
    with pytest.raises(GuestFault) as info:
        action()
    assert info.value.vector == GP, info.value


# =============================================================================================
# Host view: the KVM_GET_LAPIC image (STATE-1)
# =============================================================================================
def word(image: bytes, offset: int) -> int:
    return int.from_bytes(image[offset : offset + 4], "little")


def vector_set(image: bytes, base: int) -> frozenset[int]:
    """IRR/ISR/TMR from the image: vector v is bit v % 32 of the word at base + v // 32 * 0x10."""
    out: set[int] = set()
    for k in range(8):
        w = word(image, base + 0x10 * k)
        while w:
            low = w & -w
            out.add(32 * k + low.bit_length() - 1)
            w ^= low
    return frozenset(out)


def irr(vm: Vm, i: int) -> frozenset[int]:
    return vector_set(vm.get_lapic(i), IRR_BASE)


def isr(vm: Vm, i: int) -> frozenset[int]:
    return vector_set(vm.get_lapic(i), ISR_BASE)


def tmr(vm: Vm, i: int) -> frozenset[int]:
    return vector_set(vm.get_lapic(i), TMR_BASE)


def irrs(vm: Vm) -> list[frozenset[int]]:
    return [irr(vm, i) for i in range(len(vm))]


def accepts_vector(profile: Profile, vector: int) -> bool:
    """DIFF-D2 / PRIO-7: vectors 0-15 are delivered only where the profile accepts them."""
    return vector >= 16 or profile.accept_illegal_vectors


# =============================================================================================
# Hypothesis strategies
# =============================================================================================
MAX_XAPIC_ID = 0xFE
"""xAPIC physical IDs a guest can address one by one: 0xFF is the broadcast (MATCH-3)."""
MAX_VCPU_ID = 4095
"""KVM's default KVM_CAP_MAX_VCPU_ID bound (``Vm(max_vcpu_ids=4096)``)."""

modes = st.sampled_from(Mode)
vectors = st.integers(0, 0xFF)
legal_vectors = st.integers(16, 0xFF)
"""Vectors every profile delivers (0-15 are DIFF-D2)."""
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def vcpu_ids(mode: Mode, *, min_size: int = 1, max_size: int = 6) -> st.SearchStrategy[list[int]]:
    """Distinct vCPU ids, in creation order.  x2APIC guests may use ids above 0xFF (and 0xFF
    itself, a unicast ID in x2APIC mode); xAPIC guests stay at or below 0xFE."""
    if mode is Mode.XAPIC:
        one = st.one_of(st.integers(0, 15), st.integers(0, MAX_XAPIC_ID))
    else:
        one = st.one_of(
            st.integers(0, 15), st.integers(0, MAX_VCPU_ID), st.sampled_from((0xFF, MAX_VCPU_ID))
        )
    return st.lists(one, min_size=min_size, max_size=max_size, unique=True)


@st.composite
def topologies(draw: st.DrawFn, *, min_size: int = 1, max_size: int = 6) -> Topology:
    """An ``apicsim.testing`` :class:`Topology`: an APIC mode (the same for every vCPU) and the
    vCPU ids in creation order (this suite's distribution: :func:`vcpu_ids`)."""
    mode = draw(modes, label="mode")
    ids = draw(vcpu_ids(mode, min_size=min_size, max_size=max_size), label="vcpu_ids")
    return Topology(tuple(ids), x2apic=mode is Mode.X2APIC)


def mode_and_ids(topo: Topology) -> tuple[Mode, list[int]]:
    """The mode :func:`boot` takes and the vCPU ids ``Platform.vm(vcpu_ids=)`` takes."""
    return (Mode.X2APIC if topo.x2apic else Mode.XAPIC), list(topo.vcpu_ids)
