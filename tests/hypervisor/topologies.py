"""Random VM topologies and messages for the hypervisor properties, with small rule oracles.

A :class:`Topology` is plain data (per vCPU: APIC mode, software enable, xAPIC ID, xAPIC
logical ID; VM-wide: DFR model and the KVM options).  It can be built twice, identically:

* :meth:`Topology.build_vm` makes a ``hypervisor.Vm`` the way a VMM and its guest would:
  IA32_APIC_BASE through the host's ``set_msr`` (KVM_SET_MSRS), every APIC register through
  guest MMIO or WRMSR on ``vm.vcpu(i)``;
* :meth:`Topology.build_bus` makes the same APICs on a ``lapic.bus.ApicBus`` (the reference),
  with the same register writes on the bare ``LocalApic`` objects.

The oracles restate reference rules directly from the topology's data, independently of the
model: :meth:`Topology.logical_mode` is MAP-4, :meth:`Topology.is_fast_broadcast` is FAST-4,
:func:`known_divergence` names the places where KVM's fast path and its slow path are known to
answer differently (each one pinned by a deterministic test in ``test_delivery.py``).

The strategies keep every vCPU id below 256, so the FAST-9 hotplug divergence cannot arise, and
give every present APIC a distinct physical ID, so the optimized map always exists (MAP-2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from hypervisor import Vcpu, Vm
from hypervisor.apic_map import LogicalMode
from lapic.apic import LocalApic
from lapic.bus import ApicBus
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

from .builders import MSR_SVR, REG_DFR, REG_ID, REG_LDR, REG_SVR, SVR_ON

_Writer = Callable[[int, int], None]
_BaseWriter = Callable[[int], None]

XAPIC = "xapic"
X2APIC = "x2apic"
DISABLED = "disabled"


@dataclass(frozen=True)
class VcpuSpec:
    """One vCPU: ``mode`` is xapic, x2apic or disabled (IA32_APIC_BASE.EN clear).  ``xapic_id``
    and ``lid`` (LDR bits 31:24) only matter in xAPIC mode."""

    mode: str
    sw_enabled: bool
    xapic_id: int
    lid: int


@dataclass(frozen=True)
class Topology:
    vcpus: tuple[VcpuSpec, ...]
    dfr: int
    x2apic_format: bool
    broadcast_quirk: bool
    vector_hashing: bool

    # -- facts derived from the data (oracles) ------------------------------------------------
    def present(self) -> list[int]:
        return [i for i, v in enumerate(self.vcpus) if v.mode != DISABLED]

    def physical_id(self, i: int) -> int:
        """MAP-2: the key of a present vCPU (vcpu_id = index here)."""
        v = self.vcpus[i]
        return i if v.mode == X2APIC else v.xapic_id

    def physical_ids(self) -> dict[int, int]:
        """Physical ID -> vCPU index, for the present vCPUs (distinct by construction)."""
        return {self.physical_id(i): i for i in self.present()}

    def max_apic_id(self) -> int:
        """MAP-1."""
        return max([255, *self.present()])

    def logical_mode(self) -> LogicalMode:
        """MAP-4, restated: the mode all software-enabled, LDR != 0 APICs agree on."""
        mode = LogicalMode.SW_DISABLED
        slots: set[tuple[int, int]] = set()
        for i in self.present():
            v = self.vcpus[i]
            if not v.sw_enabled:
                continue
            if v.mode == X2APIC:
                this = LogicalMode.X2APIC
            elif v.lid == 0:
                continue
            else:
                flat = self.dfr == DFR_FLAT
                this = LogicalMode.XAPIC_FLAT if flat else LogicalMode.XAPIC_CLUSTER
            if mode == LogicalMode.SW_DISABLED:
                mode = this
            elif mode != this:
                return LogicalMode.MAP_DISABLED
            if this == LogicalMode.X2APIC:
                continue
            cluster, mask = (0, v.lid) if this == LogicalMode.XAPIC_FLAT else (
                v.lid >> 4, v.lid & 0xF)
            if not mask:
                continue
            slot = (cluster, (mask & -mask).bit_length() - 1)
            if mask & (mask - 1) or slot in slots:
                return LogicalMode.MAP_DISABLED
            slots.add(slot)
        return mode

    def is_fast_broadcast(self, dest: int, source: int | None) -> bool:
        """FAST-4 (``kvm_apic_is_broadcast_dest``)."""
        if not self.broadcast_quirk:
            if dest == XAPIC_BROADCAST and self.logical_mode() != LogicalMode.X2APIC:
                return True
            return dest == X2APIC_BROADCAST
        x2apic_source = source is not None and self.vcpus[source].mode == X2APIC
        return dest == (X2APIC_BROADCAST if x2apic_source else XAPIC_BROADCAST)

    # -- building -----------------------------------------------------------------------------
    def build_vm(self) -> Vm:
        vm = Vm(
            len(self.vcpus),
            "kvm",
            x2apic_format=self.x2apic_format,
            broadcast_quirk=self.broadcast_quirk,
            vector_hashing=self.vector_hashing,
        )
        for i, v in enumerate(self.vcpus):
            vcpu = vm.vcpu(i)

            def mmio(offset: int, value: int, vcpu: Vcpu = vcpu) -> None:
                vcpu.mmio_write(APIC_DEFAULT_BASE + offset, value)

            def set_base(value: int, i: int = i) -> None:
                _check(vm.set_msr(i, APIC_BASE_MSR, value))

            _configure(v, self.dfr, bsp=i == 0, mmio=mmio, wrmsr=vcpu.wrmsr, set_base=set_base)
        return vm

    def build_bus(self) -> ApicBus:
        bus = ApicBus(
            len(self.vcpus),
            "kvm",
            broadcast_quirk=self.broadcast_quirk,
            vector_hashing=self.vector_hashing,
        )
        for i, v in enumerate(self.vcpus):
            apic: LocalApic = bus[i]

            def set_base(value: int, apic: LocalApic = apic) -> None:
                apic.wrmsr(APIC_BASE_MSR, value, True)

            _configure(
                v, self.dfr, bsp=i == 0, mmio=apic.mmio_write, wrmsr=apic.wrmsr, set_base=set_base
            )
        return bus


def _check(ok: bool) -> None:
    assert ok, "KVM_SET_MSRS refused a legal IA32_APIC_BASE value"


def _configure(
    v: VcpuSpec,
    dfr: int,
    *,
    bsp: bool,
    mmio: _Writer,
    wrmsr: _Writer,
    set_base: _BaseWriter,
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


# =============================================================================================
# Strategies
# =============================================================================================
MODES = st.sampled_from([XAPIC, XAPIC, X2APIC, X2APIC, DISABLED])


@st.composite
def topologies(draw: st.DrawFn, *, min_vcpus: int = 2, max_vcpus: int = 8) -> Topology:
    """2-8 vCPUs, a random mix of xAPIC / x2APIC / disabled APICs (vCPU 0 always present),
    random software-enable flags, distinct physical IDs, and xAPIC logical IDs that keep the
    logical map usable: single-bit (or zero) IDs in distinct slots for the software-enabled
    xAPIC vCPUs, zero while a software-enabled x2APIC vCPU exists; anything for the
    software-disabled ones, which never enter the map."""
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
        specs.append(VcpuSpec(mode, sw[i], xapic_id.get(i, 0), lid))
    return Topology(
        tuple(specs),
        dfr,
        x2apic_format=draw(st.booleans()),
        broadcast_quirk=draw(st.booleans()),
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
    wide = top.x2apic_format if source is None else top.vcpus[source].mode == X2APIC
    used = sorted({*top.physical_ids(), *top.present(), XAPIC_BROADCAST})
    lids = sorted({v.lid for v in top.vcpus if v.mode == XAPIC} | {0x01})
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


# =============================================================================================
# Known fast/slow divergences
# =============================================================================================
def known_divergence(top: Topology, irq: Interrupt, source: int | None) -> str | None:
    """Which documented divergence between KVM's fast path and its slow path (if any) can make
    them offer ``irq`` to different accepting APICs in ``top``.  ``None`` = they must agree.

    Accepting: a FIXED/LOWEST message is taken only by a software-enabled APIC; every other
    delivery mode ignores software enable (ACCEPT-*).
    """
    if irq.shorthand is not Shorthand.NONE:
        return None
    needs_sw = irq.delivery_mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST)
    takers = [i for i in top.present() if top.vcpus[i].sw_enabled or not needs_sw]
    mode = top.logical_mode()
    if not top.is_fast_broadcast(irq.dest, source):
        if irq.dest == XAPIC_BROADCAST and any(top.vcpus[i].mode == XAPIC for i in takers):
            return "FAST-4: 0xFF is the broadcast of xAPIC-mode targets but not for the map"
        if irq.dest == X2APIC_BROADCAST and any(top.vcpus[i].mode == X2APIC for i in takers):
            return "FAST-4: a device's 0xFFFFFFFF with the quirk on is not a map broadcast"
    if irq.dest_mode is not DestMode.LOGICAL or top.is_fast_broadcast(irq.dest, source):
        return None
    if mode == LogicalMode.XAPIC_CLUSTER and irq.dest > 0xFF:
        return "FAST-6: the cluster table ignores destination bits above 7"
    if mode == LogicalMode.X2APIC:
        offset = (irq.dest >> 16) * 16
        for i in takers:
            v = top.vcpus[i]
            bit = v.xapic_id - offset
            if v.mode == XAPIC and 0 <= bit < 16 and irq.dest >> bit & 1:
                return "FAST-6: an x2APIC cluster lookup lands on an xAPIC-mode vCPU"
    if not needs_sw and any(
        not top.vcpus[i].sw_enabled and (mode != LogicalMode.X2APIC or top.vcpus[i].mode == XAPIC)
        for i in top.present()
    ):
        # The flat/cluster tables hold software-enabled APICs only; the X2APIC mode's phys_map
        # holds every present APIC, but an xAPIC-mode one is matched there by its xAPIC ID,
        # not by its LDR.
        return "DIFF-D6: logical NMI/INIT/SMI/SIPI miss software-disabled APICs"
    return None
