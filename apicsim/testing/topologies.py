"""VM topologies for property tests: one :class:`Topology` type, its strategies, and the
messages a topology can be sent.  The one home of topology generation and building for users'
tests and for the project's own suites (``tests/hypervisor``, ``tests/conformance``,
``tests/differential``).

A :class:`Topology` is plain data: the vCPU ids (creation order; the APIC ids at RESET), the
VM-wide KVM options (``x2apic_format``, the broadcast quirk, vector hashing) and the APIC state
each vCPU is put in.  That state is either uniform (``x2apic``: every vCPU in x2APIC or in xAPIC
mode, software-enabled, as a guest leaves it after boot) or per vCPU (``apics``: one
:class:`ApicSpec` each: xAPIC / x2APIC / disabled, software enable, xAPIC ID, xAPIC logical ID,
with one VM-wide DFR model).  It can be built twice, identically:

* :meth:`Topology.build` / :meth:`Topology.build_vm` make a ``hypervisor.Vm`` the way a VMM and
  its guest would: IA32_APIC_BASE through the host's ``set_msr`` (KVM_SET_MSRS) or a guest
  WRMSR, every APIC register through guest MMIO or WRMSR;
* :meth:`Topology.build_bus` makes the same APICs on a ``lapic.bus.ApicBus`` (the reference),
  with the same register writes on the bare ``LocalApic`` objects.

Strategies: :func:`topologies` (uniform mode, any ids up to ``max_id``), :func:`mixed_topologies`
(per-vCPU modes, distinct physical IDs, logical IDs that keep KVM's logical map usable),
:func:`sources`, :func:`dests` and :func:`messages` (an ``Interrupt`` and its source).

Sources: the APIC base MSR and the xAPIC ID/LDR/DFR/SVR layout (SDM Vol. 3A 11.4.4, 11.4.6,
11.6.2, 11.9); KVM's physical and logical maps (``kvm_recalculate_apic_map``, specs MAP-*).
Not modelled: the facts a test derives from a topology to check the model against (KVM's map
mode, its broadcast rule, the known fast/slow path divergences): those oracles stay with the
tests that use them (``tests/hypervisor/topologies.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from hypervisor import Vm
from lapic.apic import LocalApic
from lapic.bus import ApicBus
from lapic.faults import ApicValueError
from lapic.icr import (
    X2APIC_BROADCAST,
    XAPIC_BROADCAST,
    DeliveryMode,
    DestMode,
    Interrupt,
    Level,
    Shorthand,
    Trigger,
)
from lapic.registers import (
    APIC_BASE_BSP,
    APIC_BASE_EN,
    APIC_BASE_EXTD,
    APIC_BASE_MSR,
    APIC_DEFAULT_BASE,
    DFR_CLUSTER,
    DFR_FLAT,
)

XAPIC = "xapic"
X2APIC = "x2apic"
DISABLED = "disabled"
"""The modes of an :class:`ApicSpec` (``disabled``: IA32_APIC_BASE.EN clear)."""

REG_ID = 0x20
REG_LDR = 0xD0
REG_DFR = 0xE0
REG_SVR = 0xF0
MSR_SVR = 0x80F
SVR_ON = 0x1FF
"""SVR with the software-enable bit and spurious vector 0xFF."""

_Writer = Callable[[int, int], None]
_BaseWriter = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class ApicSpec:
    """One vCPU's APIC: ``mode`` is xapic, x2apic or disabled.  ``xapic_id`` and ``lid`` (LDR
    bits 31:24) only matter outside x2APIC mode."""

    mode: str
    sw_enabled: bool = True
    xapic_id: int = 0
    lid: int = 0

    def __post_init__(self) -> None:
        if self.mode not in (XAPIC, X2APIC, DISABLED):
            raise ApicValueError(f"mode: {self.mode!r} is not xapic, x2apic or disabled")
        if not 0 <= self.xapic_id <= 0xFF or not 0 <= self.lid <= 0xFF:
            raise ApicValueError("xapic_id, lid: 8-bit values")


@dataclass(frozen=True, slots=True)
class Topology:
    """A VM's shape: the vCPU ids, its KVM_CAP_X2APIC_API flags and vector hashing, and the
    APIC state :meth:`build` puts every vCPU in: uniform (``x2apic``, software-enabled) when
    ``apics`` is empty, else one :class:`ApicSpec` per vCPU (with ``dfr`` for the xAPIC ones).
    One type for users' tests and for the project's suites."""

    vcpu_ids: tuple[int, ...]
    x2apic_format: bool = False
    broadcast_quirk: bool = True
    x2apic: bool = False
    apics: tuple[ApicSpec, ...] = ()
    dfr: int = DFR_FLAT
    vector_hashing: bool | None = None

    def __post_init__(self) -> None:
        if self.apics and len(self.apics) != len(self.vcpu_ids):
            raise ApicValueError(
                f"apics: {len(self.apics)} specs for {len(self.vcpu_ids)} vCPU ids"
            )

    @property
    def contiguous(self) -> bool:
        return self.vcpu_ids == tuple(range(len(self.vcpu_ids)))

    @property
    def specs(self) -> tuple[ApicSpec, ...]:
        """Every vCPU's :class:`ApicSpec` (the uniform ones spelled out)."""
        if self.apics:
            return self.apics
        mode = X2APIC if self.x2apic else XAPIC
        return tuple(ApicSpec(mode, True, i & 0xFF, 0) for i in self.vcpu_ids)

    # -- facts of the data ----------------------------------------------------------------
    def present(self) -> list[int]:
        """The indexes of the vCPUs whose APIC is enabled (IA32_APIC_BASE.EN)."""
        return [i for i, v in enumerate(self.specs) if v.mode != DISABLED]

    def physical_id(self, i: int) -> int:
        """MAP-2: the physical-map key of present vCPU ``i``."""
        v = self.specs[i]
        return self.vcpu_ids[i] if v.mode == X2APIC else v.xapic_id

    def physical_ids(self) -> dict[int, int]:
        """Physical ID -> vCPU index, for the present vCPUs."""
        return {self.physical_id(i): i for i in self.present()}

    def max_apic_id(self) -> int:
        """MAP-1: the largest x2APIC id, at least 255."""
        return max([255, *(self.vcpu_ids[i] for i in self.present())])

    # -- building -------------------------------------------------------------------------
    def vm_args(self) -> dict[str, Any]:
        """Keyword arguments of a VM of this shape (``hypervisor.Vm`` and the KVM backend's
        ``KvmVm``): ``vcpus`` when the ids are 0..n-1, else ``vcpu_ids``."""
        args: dict[str, Any] = {
            "x2apic_format": self.x2apic_format,
            "broadcast_quirk": self.broadcast_quirk,
        }
        if self.vector_hashing is not None:
            args["vector_hashing"] = self.vector_hashing
        if self.contiguous:
            args["vcpus"] = len(self.vcpu_ids)
        else:
            args["vcpu_ids"] = list(self.vcpu_ids)
        return args

    def build(self) -> Vm:
        """The model's VM, every vCPU in its APIC state (guest accesses; the host's
        KVM_SET_MSRS for IA32_APIC_BASE of per-vCPU specs)."""
        vm = Vm(**self.vm_args())
        if not self.apics:
            for v in vm.vcpus:
                if self.x2apic:
                    v.wrmsr(APIC_BASE_MSR,
                            APIC_DEFAULT_BASE | APIC_BASE_EN | APIC_BASE_EXTD
                            | (v.apic.apic_base & APIC_BASE_BSP))
                    v.wrmsr(MSR_SVR, SVR_ON)
                else:
                    v.mmio_write(v.apic.base_address + REG_SVR, SVR_ON)
            return vm
        for i, spec in enumerate(self.apics):
            vcpu = vm.vcpu(i)

            def mmio(offset: int, value: int, vcpu: Any = vcpu) -> None:
                vcpu.mmio_write(APIC_DEFAULT_BASE + offset, value)

            def set_base(value: int, i: int = i) -> None:
                if not vm.set_msr(i, APIC_BASE_MSR, value):
                    raise ApicValueError(f"KVM_SET_MSRS refused IA32_APIC_BASE {value:#x}")

            _configure(spec, self.dfr, bsp=i == 0, mmio=mmio, wrmsr=vcpu.wrmsr,
                       set_base=set_base)
        return vm

    build_vm = build

    def build_bus(self) -> ApicBus:
        """The same APICs on a bare ``ApicBus`` (the reference; vCPU index = bus index)."""
        bus = ApicBus(len(self.vcpu_ids), "kvm", broadcast_quirk=self.broadcast_quirk,
                      vector_hashing=self.vector_hashing)
        for i, spec in enumerate(self.specs):
            apic: LocalApic = bus[i]

            def set_base(value: int, apic: LocalApic = apic) -> None:
                apic.wrmsr(APIC_BASE_MSR, value, True)

            _configure(spec, self.dfr, bsp=i == 0, mmio=apic.mmio_write, wrmsr=apic.wrmsr,
                       set_base=set_base)
        return bus


def _configure(
    v: ApicSpec, dfr: int, *, bsp: bool, mmio: _Writer, wrmsr: _Writer, set_base: _BaseWriter
) -> None:
    """The register writes that make one vCPU, starting from RESET (xAPIC, sw-disabled)."""
    base = APIC_DEFAULT_BASE | (APIC_BASE_BSP if bsp else 0)
    if v.mode == X2APIC:
        set_base(base | APIC_BASE_EN | APIC_BASE_EXTD)
        if v.sw_enabled:
            wrmsr(MSR_SVR, SVR_ON)
        return
    mmio(REG_ID, v.xapic_id << 24)
    mmio(REG_DFR, dfr)
    mmio(REG_LDR, v.lid << 24)
    if v.sw_enabled:
        mmio(REG_SVR, SVR_ON)
    if v.mode == DISABLED:
        set_base(base)


# =========================================================================================
# Strategies
# =========================================================================================
@st.composite
def topologies(
    draw: st.DrawFn, *, min_vcpus: int = 1, max_vcpus: int = 8, max_id: int = 254
) -> Topology:
    """Distinct vCPU ids in ``0..max_id`` (sorted), every vCPU x2APIC or every one xAPIC."""
    ids = draw(
        st.lists(
            st.integers(0, max_id), min_size=min_vcpus, max_size=max_vcpus, unique=True
        )
    )
    return Topology(
        tuple(sorted(ids)),
        x2apic_format=draw(st.booleans()),
        broadcast_quirk=draw(st.booleans()),
        x2apic=draw(st.booleans()),
    )


MODES = st.sampled_from([XAPIC, XAPIC, X2APIC, X2APIC, DISABLED])


@st.composite
def mixed_topologies(draw: st.DrawFn, *, min_vcpus: int = 2, max_vcpus: int = 8) -> Topology:
    """vCPU ids 0..n-1, a random mix of xAPIC / x2APIC / disabled APICs (vCPU 0 always
    present), random software-enable flags, distinct physical IDs (so KVM's optimized map
    exists, MAP-2), and xAPIC logical IDs that keep the logical map usable: single-bit (or
    zero) IDs in distinct slots for the software-enabled xAPIC vCPUs, zero while a
    software-enabled x2APIC vCPU exists; anything for the software-disabled ones, which never
    enter the map.  Every id stays below 256 (so KVM's FAST-9 hotplug divergence cannot
    arise)."""
    n = draw(st.integers(min_vcpus, max_vcpus))
    modes = draw(st.lists(MODES, min_size=n, max_size=n))
    if modes[0] == DISABLED:
        modes[0] = draw(st.sampled_from([XAPIC, X2APIC]))
    sw = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    dfr = draw(st.sampled_from([DFR_FLAT, DFR_CLUSTER]))

    x2apic_ids = {i for i, m in enumerate(modes) if m == X2APIC}
    xapic_like = [i for i, m in enumerate(modes) if m != X2APIC]
    free = [v for v in range(256) if v not in x2apic_ids]
    edges = [v for v in (*range(28, 36), *range(60, 68), *range(250, 256)) if v in free]
    ids = draw(
        st.lists(
            # small IDs, any ID, and IDs at the PV IPI window edges (32, 64) and the top
            st.one_of(st.sampled_from(free[:16]), st.sampled_from(free), st.sampled_from(edges)),
            min_size=len(xapic_like),
            max_size=len(xapic_like),
            unique=True,
        )
    )
    xapic_id = dict(zip(xapic_like, ids, strict=True))

    x2apic_contributor = any(m == X2APIC and s for m, s in zip(modes, sw, strict=True))
    taken: set[tuple[int, int]] = set()
    specs = []
    for i, mode in enumerate(modes):
        lid = 0
        if mode != X2APIC:
            if not sw[i]:
                lid = draw(st.integers(0, 255))
            elif not x2apic_contributor:
                lid = _one_slot(draw, dfr, taken)
        specs.append(ApicSpec(mode, sw[i], xapic_id.get(i, 0), lid))
    return Topology(
        tuple(range(n)),
        x2apic_format=draw(st.booleans()),
        broadcast_quirk=draw(st.booleans()),
        apics=tuple(specs),
        dfr=dfr,
        vector_hashing=draw(st.booleans()),
    )


def _one_slot(draw: st.DrawFn, dfr: int, taken: set[tuple[int, int]]) -> int:
    """A logical ID for a software-enabled xAPIC vCPU: 0, a free single-bit slot, or (cluster
    model) a member mask of 0, which the map skips."""
    if dfr == DFR_FLAT:
        bit = draw(st.integers(-1, 7))
        if bit < 0 or (0, bit) in taken:
            return 0
        taken.add((0, bit))
        return 1 << bit
    cluster = draw(st.integers(0, 15))
    bit = draw(st.integers(-1, 3))
    if bit < 0:
        return cluster << 4
    if (cluster, bit) in taken:
        return 0
    taken.add((cluster, bit))
    return cluster << 4 | 1 << bit


def sources(top: Topology) -> st.SearchStrategy[int | None]:
    """None (a device MSI / IOAPIC message) or a present vCPU's index."""
    return st.one_of(st.none(), st.sampled_from(top.present()))


def dests(top: Topology, source: int | None) -> st.SearchStrategy[int]:
    """Destinations as wide as the sender can write: 8 bits from an xAPIC sender or a plain
    MSI, 32 bits from an x2APIC sender or an x2apic_format MSI.  Biased to IDs in use,
    broadcasts, x2APIC clusters 0-1 and values just above 8 bits."""
    specs = top.specs
    wide = top.x2apic_format if source is None else specs[source].mode == X2APIC
    used = sorted({*top.physical_ids(), *top.present(), XAPIC_BROADCAST})
    lids = sorted({v.lid for v in specs if v.mode == XAPIC} | {0x01})
    narrow = st.one_of(
        st.sampled_from(used),
        st.sampled_from(used),
        st.builds(lambda a, b: a | b, st.sampled_from(lids), st.sampled_from(lids)),
        st.integers(0, 0xFF),
    )
    if not wide:
        return narrow
    return st.one_of(
        narrow,
        narrow,
        narrow,
        st.just(X2APIC_BROADCAST),
        st.integers(0, 0x1FF),
        st.builds(lambda c, m: c << 16 | m, st.integers(0, 1), st.integers(0, 0xFFFF)),
        st.integers(0, X2APIC_BROADCAST),
    )


@st.composite
def messages(
    draw: st.DrawFn, top: Topology, *, modes: tuple[DeliveryMode, ...]
) -> tuple[Interrupt, int | None]:
    """A message and its source: no shorthand most of the time; a shorthand only with a
    source (KVM never sees one from a device); LOWEST only with ALLINC/ALLBUT when the
    caller allows it (those always take the slow path)."""
    source = draw(sources(top))
    shorthand = Shorthand.NONE
    if source is not None:
        shorthand = draw(
            st.sampled_from([Shorthand.NONE] * 5 + [
                Shorthand.SELF, Shorthand.ALL_INCLUDING_SELF, Shorthand.ALL_EXCLUDING_SELF,
            ])
        )
    mode = draw(st.sampled_from(modes))
    if mode is DeliveryMode.LOWEST and shorthand not in (
        Shorthand.ALL_INCLUDING_SELF,
        Shorthand.ALL_EXCLUDING_SELF,
    ):
        mode = DeliveryMode.FIXED
    edge_assert = mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST) and draw(
        st.integers(0, 3)
    ) != 0
    level = Level.ASSERT if edge_assert else draw(st.sampled_from(list(Level)))
    trigger = Trigger.EDGE if edge_assert else draw(st.sampled_from(list(Trigger)))
    irq = Interrupt(
        draw(st.integers(0x10, 0xFF)),
        mode,
        draw(st.sampled_from(list(DestMode))),
        level,
        trigger,
        shorthand,
        draw(dests(top, source)),
    )
    return irq, source
