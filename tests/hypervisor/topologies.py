"""Rule oracles over the topologies of ``apicsim.testing.topologies`` for the hypervisor
properties (the topologies, their strategies and builders live there).

The oracles restate reference rules directly from the topology's data, independently of the
model: :func:`logical_mode` is MAP-4, :func:`is_fast_broadcast` is FAST-4,
:func:`known_divergence` names the places where KVM's fast path and its slow path are known to
answer differently (each one pinned by a deterministic test in ``test_delivery.py``).

``apicsim.testing.mixed_topologies`` keeps every vCPU id below 256, so the FAST-9 hotplug
divergence cannot arise, and gives every present APIC a distinct physical ID, so the optimized
map always exists (MAP-2).
"""

from __future__ import annotations

from apicsim.testing.topologies import X2APIC, XAPIC, Topology
from hypervisor.apic_map import LogicalMode
from lapic.icr import (
    X2APIC_BROADCAST,
    XAPIC_BROADCAST,
    DeliveryMode,
    DestMode,
    Interrupt,
    Shorthand,
)
from lapic.registers import DFR_FLAT


def logical_mode(top: Topology) -> LogicalMode:
    """MAP-4, restated: the mode all software-enabled, LDR != 0 APICs agree on."""
    mode = LogicalMode.SW_DISABLED
    slots: set[tuple[int, int]] = set()
    specs = top.specs
    for i in top.present():
        v = specs[i]
        if not v.sw_enabled:
            continue
        if v.mode == X2APIC:
            this = LogicalMode.X2APIC
        elif v.lid == 0:
            continue
        else:
            flat = top.dfr == DFR_FLAT
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


def is_fast_broadcast(top: Topology, dest: int, source: int | None) -> bool:
    """FAST-4 (``kvm_apic_is_broadcast_dest``)."""
    if not top.broadcast_quirk:
        if dest == XAPIC_BROADCAST and logical_mode(top) != LogicalMode.X2APIC:
            return True
        return dest == X2APIC_BROADCAST
    x2apic_source = source is not None and top.specs[source].mode == X2APIC
    return dest == (X2APIC_BROADCAST if x2apic_source else XAPIC_BROADCAST)


def known_divergence(top: Topology, irq: Interrupt, source: int | None) -> str | None:
    """Which documented divergence between KVM's fast path and its slow path (if any) can make
    them offer ``irq`` to different accepting APICs in ``top``.  ``None`` = they must agree.

    Accepting: a FIXED/LOWEST message is taken only by a software-enabled APIC; every other
    delivery mode ignores software enable (ACCEPT-*).
    """
    if irq.shorthand is not Shorthand.NONE:
        return None
    specs = top.specs
    needs_sw = irq.delivery_mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST)
    takers = [i for i in top.present() if specs[i].sw_enabled or not needs_sw]
    mode = logical_mode(top)
    if not is_fast_broadcast(top, irq.dest, source):
        if irq.dest == XAPIC_BROADCAST and any(specs[i].mode == XAPIC for i in takers):
            return "FAST-4: 0xFF is the broadcast of xAPIC-mode targets but not for the map"
        if irq.dest == X2APIC_BROADCAST and any(specs[i].mode == X2APIC for i in takers):
            return "FAST-4: a device's 0xFFFFFFFF with the quirk on is not a map broadcast"
    if irq.dest_mode is not DestMode.LOGICAL or is_fast_broadcast(top, irq.dest, source):
        return None
    if mode == LogicalMode.XAPIC_CLUSTER and irq.dest > 0xFF:
        return "FAST-6: the cluster table ignores destination bits above 7"
    if mode == LogicalMode.X2APIC:
        offset = (irq.dest >> 16) * 16
        for i in takers:
            v = specs[i]
            bit = v.xapic_id - offset
            if v.mode == XAPIC and 0 <= bit < 16 and irq.dest >> bit & 1:
                return "FAST-6: an x2APIC cluster lookup lands on an xAPIC-mode vCPU"
    if not needs_sw and any(
        not specs[i].sw_enabled and (mode != LogicalMode.X2APIC or specs[i].mode == XAPIC)
        for i in top.present()
    ):
        # The flat/cluster tables hold software-enabled APICs only; the X2APIC mode's phys_map
        # holds every present APIC, but an xAPIC-mode one is matched there by its xAPIC ID,
        # not by its LDR.
        return "DIFF-D6: logical NMI/INIT/SMI/SIPI miss software-disabled APICs"
    return None
