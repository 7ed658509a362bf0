"""Snapshots of a VM: an immutable, hashable, versioned value of everything simulated.

``snapshot_vm(vm)`` (``vm.snapshot()``) captures, per vCPU, its APIC (the register page, the
pending events, timer and private latches: ``LocalApic.snapshot()``), run state, mp_state,
last pCPU, exit count, SIPI entry and handled vectors; the host (clock, pCPUs with their host
APIC ids, what is loaded on each, wake-up lists, the running vCPU, host counters); the VM's
counters, exit log and trace; the accelerator's state; the optimized map as built
(it can differ from a rebuild, KVMB-8), its dirty bit and inhibits.  ``restore_vm(vm, snap)``
(``vm.restore``) makes the VM equal to it, so the same operations then give the same results
(the property in ``tests/hypervisor/test_snapshot.py``).  ``snap.diff(other)`` lists the
differences as readable lines (vCPU, register name, old -> new, hex).  The pCPUs recorded are
the ones holding something (a loaded or a waiting vCPU); the others are empty.

Each APIC's state is its own ``lapic.ApicSnapshot`` (one home: ``LocalApic.snapshot()`` /
``restore()``); a VM snapshot only adds what the VM, its vCPUs and the host hold.

Not captured (not simulated state): the guest's handlers (``interrupt_handler``,
``nmi_handler``: guest code), the VM's options (fixed at creation), the scheduler's
``halt_recheck`` variant.  A snapshot refuses while queued steps are pending (a half-run
protocol is a Python generator, not data).  On a host shared with other VMs, the pCPU slots
that hold another VM's vCPU are recorded as foreign and left alone by ``restore``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from hypervisor.apic_map import ApicMap, LogicalMode
from hypervisor.exits import EXIT_SLOTS, Exit, ExitReason
from hypervisor.host.machine import Host
from hypervisor.vcpu import MpState, RunState, Vcpu
from lapic.apic import LocalApic
from lapic.faults import ApicTypeError, ApicValueError
from lapic.state import ApicSnapshot

if TYPE_CHECKING:
    from collections.abc import Hashable

    from hypervisor.trace import Event
    from hypervisor.vm import Vm

SNAPSHOT_VERSION = 2
FOREIGN = -1
"""A pCPU slot holding a vCPU of another VM on the same host."""


@dataclass(frozen=True, slots=True)
class VcpuState:
    index: int
    vcpu_id: int
    run_state: RunState
    mp_state: MpState
    pcpu: int | None
    exits_by_reason: tuple[tuple[int, int], ...]
    """``(reason, count)`` of each reason this vCPU exited for (``Vcpu.exit_counts``, what a
    restore sets; the VM's counts are their sums)."""
    sipi_entry: int | None
    handled: tuple[int, ...]
    apic: ApicSnapshot
    """``LocalApic.snapshot()``: the page, pending events, timer and latches."""

    @property
    def exits(self) -> int:
        """The vCPU's exits, every reason (``Vcpu.exits``)."""
        return sum(n for _, n in self.exits_by_reason)


@dataclass(frozen=True, slots=True)
class PcpuState:
    id: int
    apic_id: int
    loaded: int | None
    """vCPU index of this VM, FOREIGN for another VM's vCPU, None when nothing is loaded."""
    wakeup_list: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class HostState:
    now: int
    tsc_khz: int
    running: int | None
    """vCPU index of the running vCPU (FOREIGN: another VM's), None when none ran yet."""
    pcpus: tuple[PcpuState, ...]
    stats: tuple[int, int, int, int]
    """``HostStats.as_tuple()``: doorbells, host IPIs, kicks, wake-ups."""


@dataclass(frozen=True, slots=True)
class MapState:
    """The optimized map as built, APICs named by vCPU index."""

    max_apic_id: int
    logical_mode: LogicalMode
    phys: tuple[tuple[int, int], ...]
    """(APIC id, vCPU index) of each used slot."""
    flat: tuple[int | None, ...]
    cluster: tuple[tuple[int | None, ...], ...]


@dataclass(frozen=True, slots=True)
class VmSnapshot:
    """Everything simulated in one VM (see the module docstring).  Equal states give equal
    snapshots and equal hashes."""

    version: int
    vcpus: tuple[VcpuState, ...]
    host: HostState
    stats: tuple[tuple[str, Hashable], ...]
    exit_log: tuple[Exit, ...] | None
    trace: tuple[Event, ...]
    accel: Hashable
    map: MapState | None
    map_dirty: bool
    map_inhibits: int
    apic_base_modified: bool
    trace_stamps: tuple[int, tuple[tuple[int, int], ...]] = (0, ())
    """``Tracer.saved()``: the trace's sequence counter and (sequence number, ns) stamps."""

    def diff(self, other: VmSnapshot) -> list[str]:
        """What changed from ``self`` to ``other``, one readable line per difference."""
        if not isinstance(other, VmSnapshot):
            raise ApicTypeError(f"other must be a VmSnapshot, not {type(other).__name__}")
        out: list[str] = []
        if self.version != other.version:
            out.append(f"version: {self.version} -> {other.version}")
        if len(self.vcpus) != len(other.vcpus):
            out.append(f"vcpus: {len(self.vcpus)} -> {len(other.vcpus)}")
        for a, b in zip(self.vcpus, other.vcpus, strict=False):
            out.extend(_diff_vcpu(a, b))
        old_stats, new_stats = dict(self.stats), dict(other.stats)
        for key in sorted(old_stats.keys() | new_stats.keys()):
            if old_stats.get(key) != new_stats.get(key):
                out.append(
                    f"vm stats.{key}: {_show(old_stats.get(key))} -> {_show(new_stats.get(key))}"
                )
        for name in ("exit_log", "trace", "accel", "map", "map_dirty",
                     "map_inhibits", "apic_base_modified"):
            old, new = getattr(self, name), getattr(other, name)
            if old != new:
                out.append(f"vm {name}: {_show(old)} -> {_show(new)}")
        out.extend(_diff_fields("host", self.host, other.host, skip=("pcpus",)))
        old_p = {p.id: p for p in self.host.pcpus}
        new_p = {p.id: p for p in other.host.pcpus}
        for pid in sorted(old_p.keys() | new_p.keys()):
            pa, pb = old_p.get(pid), new_p.get(pid)
            if pa is None or pb is None:
                out.append(f"pcpu {pid}: {_show(pa)} -> {_show(pb)}")
            else:
                out.extend(_diff_fields(f"pcpu {pid}", pa, pb))
        return out


def _show(v: object) -> str:
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, int):
        return f"{v:#x}"
    return repr(v)


def _diff_fields(
    label: str, a: object, b: object, skip: tuple[str, ...] = ()
) -> list[str]:
    out = []
    for f in fields(a):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        old, new = getattr(a, f.name), getattr(b, f.name)
        if old != new:
            out.append(f"{label} {f.name}: {_show(old)} -> {_show(new)}")
    return out


def _diff_vcpu(a: VcpuState, b: VcpuState) -> list[str]:
    label = f"vcpu {a.index}"
    out = _diff_fields(label, a, b, skip=("apic",))
    if a.exits != b.exits:  # the total, unless it alone would hide the change of reasons
        total = f"{label} exits: {_show(a.exits)} -> {_show(b.exits)}"
        out = [total if line.startswith(f"{label} exits_by_reason:") else line for line in out]
    out.extend(f"{label} {line}" for line in a.apic.diff(b.apic))
    return out


# =============================================================================================
# The VM
# =============================================================================================
def _index(vm: Vm, v: object) -> int | None:
    if v is None:
        return None
    if isinstance(v, Vcpu) and v.vm is vm:
        return v.index
    return FOREIGN


def _host_state(vm: Vm, host: Host) -> HostState:
    pcpus = tuple(
        PcpuState(
            p.id,
            p.apic_id,
            _index(vm, p.loaded),
            tuple(i for i in (_index(vm, w) for w in p.wakeup_list) if i is not None),
        )
        for p in host.pcpus
        if p.loaded is not None or p.wakeup_list
    )
    return HostState(
        host.clock.now,
        host.clock.tsc_khz,
        _index(vm, host.running),
        pcpus,
        host.stats.as_tuple(),
    )


def _map_state(vm: Vm, m: ApicMap | None) -> MapState | None:
    if m is None:
        return None
    index = {id(a): i for i, a in enumerate(vm._apics)}

    def ix(a: LocalApic | None) -> int | None:
        return None if a is None else index[id(a)]

    return MapState(
        m.max_apic_id,
        m.logical_mode,
        tuple((n, index[id(a)]) for n, a in enumerate(m.phys_map) if a is not None),
        tuple(ix(a) for a in m.flat),
        tuple(tuple(ix(a) for a in c) for c in m.cluster),
    )


def _stats_items(vm: Vm) -> tuple[tuple[str, Hashable], ...]:
    st = vm.stats
    out: list[tuple[str, Hashable]] = []
    for name in st.NAMES:
        value = getattr(st, name)
        if name == "exits_by_reason":
            value = tuple(sorted((int(r), n) for r, n in value.items() if n))
        elif name == "notifications":
            value = tuple(sorted((int(v), n) for v, n in value.items() if n))
        out.append((name, value))
    return tuple(out)


def snapshot_vm(vm: Vm) -> VmSnapshot:
    if vm.host.steps.pending():
        raise ApicValueError(
            "vm has queued steps pending: run them (host.steps.run_all()) before a snapshot"
        )
    vcpus = tuple(
        VcpuState(
            v.index,
            v.vcpu_id,
            v.run_state,
            v.mp_state,
            v.pcpu,
            tuple(sorted((int(r), n) for r, n in v.exits_by_reason.items())),
            v.sipi_entry,
            tuple(v.handled),
            v.apic.snapshot(),
        )
        for v in vm.vcpus
    )
    return VmSnapshot(
        version=SNAPSHOT_VERSION,
        vcpus=vcpus,
        host=_host_state(vm, vm.host),
        stats=_stats_items(vm),
        exit_log=None if vm.exit_log is None else tuple(vm.exits),
        trace=tuple(vm.tracer.events),
        accel=vm.accel.state(),
        # A VM whose map was never built (dirty since its first vCPU) has no _map yet.
        map=_map_state(vm, getattr(vm, "_map", None)),
        map_dirty=vm._map_dirty,
        map_inhibits=getattr(vm, "_map_inhibits", 0),
        apic_base_modified=vm._apic_base_modified,
        trace_stamps=vm.tracer.saved(),
    )


def restore_vm(vm: Vm, snap: VmSnapshot) -> None:
    if not isinstance(snap, VmSnapshot):
        raise ApicTypeError(f"snap must be a VmSnapshot, not {type(snap).__name__}")
    if snap.version != SNAPSHOT_VERSION:
        raise ApicValueError(f"snap.version={snap.version} is not {SNAPSHOT_VERSION}")
    if len(snap.vcpus) < len(vm.vcpus):
        raise ApicValueError(
            f"snap has {len(snap.vcpus)} vCPUs, the vm {len(vm.vcpus)}: vCPUs cannot be removed"
        )
    for s in snap.vcpus[len(vm.vcpus) :]:
        vm.add_vcpu(s.vcpu_id)  # vCPUs hotplugged before the snapshot, not yet in this VM
    for v, s in zip(vm.vcpus, snap.vcpus, strict=True):
        if v.vcpu_id != s.vcpu_id:
            raise ApicValueError(f"snap vCPU {s.index} has id {s.vcpu_id}, the vm {v.vcpu_id}")
    host = vm.host
    host.steps.clear()
    vcpus = vm.vcpus
    for v, s in zip(vcpus, snap.vcpus, strict=True):
        v.apic.restore(s.apic)
        v.run_state = s.run_state
        v.mp_state = s.mp_state
        v.last_pcpu = None if s.pcpu is None else host.pcpu(s.pcpu)
        counts = [0] * len(EXIT_SLOTS)
        for r, n in s.exits_by_reason:
            counts[EXIT_SLOTS[ExitReason(r)]] = n
        v.exit_counts = counts
        v.sipi_entry = s.sipi_entry
        v.handled[:] = s.handled
    hs = snap.host
    host.clock.now = hs.now
    host.clock.tsc_khz = hs.tsc_khz
    host.stats.set_tuple(hs.stats)

    def back(i: int | None, old: object) -> object:
        return old if i == FOREIGN else (None if i is None else vcpus[i])

    saved = {p.id: p for p in hs.pcpus}
    for p in host.pcpus:  # drop this VM's vCPUs from pCPUs the snapshot does not name
        if p.id not in saved:
            if _index(vm, p.loaded) not in (None, FOREIGN):
                p.loaded = None
            p.wakeup_list[:] = [w for w in p.wakeup_list if _index(vm, w) == FOREIGN]
    for ps in hs.pcpus:
        p = host.pcpu(ps.id)
        p.loaded = back(ps.loaded, p.loaded)  # type: ignore[assignment]
        foreign = [w for w in p.wakeup_list if _index(vm, w) == FOREIGN]
        p.wakeup_list[:] = [vcpus[i] for i in ps.wakeup_list] + foreign
    host.running = back(hs.running, host.running)  # type: ignore[assignment]
    st = vm.stats
    for name, value in snap.stats:
        if name in ("exits", "exits_by_reason"):
            continue  # the sums of the vCPUs' counts, restored with each vCPU
        if name == "notifications":
            st.notifications.clear()
            for v, n in value:  # type: ignore[attr-defined]
                st.notifications[v] = n
        else:
            setattr(st, name, value)
    if vm.exit_log is not None:
        vm.exit_log.clear()
        vm.exit_log.extend(snap.exit_log or ())
    vm.tracer.load(snap.trace, snap.trace_stamps)
    vm.accel.set_state(snap.accel)
    vm._map = None if snap.map is None else _rebuild_map(vm, snap.map)
    vm._map_dirty = snap.map_dirty
    vm._map_inhibits = snap.map_inhibits
    vm._apic_base_modified = snap.apic_base_modified


def _rebuild_map(vm: Vm, ms: MapState) -> ApicMap:
    apics = vm._apics
    m = ApicMap(ms.max_apic_id)
    m.logical_mode = ms.logical_mode
    for n, i in ms.phys:
        m.phys_map[n] = apics[i]
    m.flat = [None if i is None else apics[i] for i in ms.flat]
    m.cluster = [[None if i is None else apics[i] for i in c] for c in ms.cluster]
    return m
