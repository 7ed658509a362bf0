"""The route cache (``hypervisor.routes``): a VM that keeps the routes its optimized map
decided answers exactly as one that routes every message anew, whatever state change comes
between two deliveries (FAST-10; FAST-1..9 keep holding with the cache on)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hypervisor import ExitReason, Vm
from hypervisor.apic_map import build
from hypervisor.config import VmConfig
from hypervisor.delivery import deliver
from lapic.apic import LocalApic
from lapic.faults import ApicValueError, GuestFault
from lapic.icr import DELIVERY_STATUS, X2APIC_ICR_RESERVED, Interrupt, Msi, interrupt_of_icr
from lapic.profile import LowestPriorityPolicy, Profile

XAPIC_BASE = 0xFEE00000
ENABLE_XAPIC = XAPIC_BASE | 0x800
ENABLE_X2APIC = XAPIC_BASE | 0xC00
BASES = (0, ENABLE_XAPIC, ENABLE_X2APIC, 0xFED00800)
"""APIC_BASE values: disabled, xAPIC, x2APIC, xAPIC at a moved base."""

DFRS = (0xFFFFFFFF, 0x0FFFFFFF)
"""DFR values: flat, cluster."""

Op = Callable[[Vm], object]


def _config(vcpus: int, x2apic_format: bool, excludes_new: bool) -> VmConfig:
    """KVM's defaults, with or without KVMB-8 (the map built without the newest vCPU)."""
    config = VmConfig.build(vcpus, x2apic_format=x2apic_format)
    return config.replace(kvm=config.kvm.replace(map_excludes_new_vcpu=excludes_new))


def _outcome(vm: Vm, op: Op) -> object:
    try:
        return op(vm)
    except (GuestFault, ApicValueError) as e:
        return type(e).__name__


def _mmio(i: int, offset: int, value: int) -> Op:
    """A register write by vCPU ``i``'s APIC itself (xAPIC mode), as its guest would."""

    def op(vm: Vm) -> object:
        if i >= len(vm):
            return None
        vm.lapic(i).mmio_write(offset, value)
        return None

    return op


def _icr(i: int, dest: int, low: int) -> Op:
    """vCPU ``i``'s guest sends an IPI through whichever ICR its APIC mode has."""

    def op(vm: Vm) -> object:
        if i >= len(vm):
            return None
        vcpu = vm.vcpu(i)
        apic = vm.lapic(i)
        if apic.x2apic_mode:
            vcpu.wrmsr(0x830, dest << 32 | low)
        else:
            vcpu.mmio_write(apic.base_address + 0x310, (dest & 0xFF) << 24)
            vcpu.mmio_write(apic.base_address + 0x300, low)
        return None

    return op


def _set_lapic_from(i: int, j: int, id_byte: int | None) -> Op:
    """KVM_SET_LAPIC of vCPU ``i`` with vCPU ``j``'s image, its xAPIC ID byte replaced."""

    def op(vm: Vm) -> object:
        if i >= len(vm) or j >= len(vm):
            return None
        image = bytearray(vm.get_lapic(j))
        if id_byte is not None:
            image[0x23] = id_byte
        vm.set_lapic(i, bytes(image))
        return None

    return op


def _hotplug(vcpu_id: int) -> Op:
    def op(vm: Vm) -> object:
        if any(v.vcpu_id == vcpu_id for v in vm.vcpus):
            return None
        vm.add_vcpu(vcpu_id)
        return None

    return op


def _run(i: int) -> Op:
    def op(vm: Vm) -> object:
        return None if i >= len(vm) else vm.vcpu(i).run()

    return op


vcpu_index = st.integers(0, 6)
vector = st.sampled_from([0x20, 0x31, 0x42, 0xF0, 0x0E])
dest8 = st.sampled_from([0, 1, 2, 3, 5, 7, 0x0F, 0x11, 0x21, 0xFF])
delivery = st.one_of(
    st.builds(  # KVM_SIGNAL_MSI: fixed or lowest priority, physical or logical
        lambda d, logical, lowest, v: lambda vm: vm.signal_msi(
            XAPIC_BASE | d << 12 | logical << 2, 0, lowest << 8 | v
        ),
        dest8, st.integers(0, 1), st.integers(0, 1), vector,
    ),
    st.builds(
        lambda i, d, logical, v, sh: _icr(i, d, sh << 18 | 0x4000 | logical << 11 | v),
        vcpu_index, st.one_of(dest8, st.sampled_from([0x10001, 0xFFFFFFFF])),
        st.integers(0, 1), vector, st.sampled_from([0, 0, 0, 1, 3]),
    ),
)  # fmt: skip
state_change = st.one_of(
    st.builds(lambda i, v: _mmio(i, 0x20, v << 24), vcpu_index, dest8),  # xAPIC ID
    st.builds(lambda i, v: _mmio(i, 0xD0, v << 24), vcpu_index, dest8),  # LDR
    st.builds(lambda i, v: _mmio(i, 0xE0, v), vcpu_index, st.sampled_from(DFRS)),  # DFR
    st.builds(lambda i, v: _mmio(i, 0xF0, v), vcpu_index, st.sampled_from([0xFF, 0x1FF])),  # SVR
    st.builds(
        lambda i, v: lambda vm: None if i >= len(vm) else vm.set_msr(i, 0x1B, v),
        vcpu_index, st.sampled_from(BASES),
    ),
    st.builds(_set_lapic_from, vcpu_index, vcpu_index, st.one_of(st.none(), dest8)),
    st.builds(_hotplug, st.integers(4, 9)),
    st.builds(_run, vcpu_index),
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    vcpus=st.integers(1, 5),
    x2apic_format=st.booleans(),
    excludes_new=st.booleans(),
    ops=st.lists(st.one_of(delivery, delivery, state_change), min_size=1, max_size=40),
)
def test_the_route_cache_is_forgotten_by_every_state_change_a_route_depends_on__FAST_10(
    vcpus: int, x2apic_format: bool, excludes_new: bool, ops: list[Op]
) -> None:
    cached = Vm(_config(vcpus, x2apic_format, excludes_new))
    fresh = Vm(_config(vcpus, x2apic_format, excludes_new))
    fresh.route_cache = False
    for vm in (cached, fresh):  # every APIC software-enabled to start with
        for i in range(vcpus):
            vm.lapic(i).mmio_write(0xF0, 0x1FF)
    for step, op in enumerate(ops):
        got, want = _outcome(cached, op), _outcome(fresh, op)
        assert got == want, f"step {step}: {got!r} != {want!r}"
        a, b = cached.snapshot(), fresh.snapshot()
        assert a == b, f"step {step}: " + "; ".join(b.diff(a))
    assert len(fresh._routes) == 0


def test_a_repeated_msi_and_a_repeated_ipi_are_delivered_from_the_route_cache__FAST_10() -> None:
    vm = Vm(4)
    for i in range(4):
        vm.vcpu(i).wrmsr(0x1B, ENABLE_X2APIC)
        vm.vcpu(i).wrmsr(0x80F, 0x1FF)
    assert vm.signal_msi(XAPIC_BASE | 2 << 12, 0, 0xF0) == 1
    vm.vcpu(0).wrmsr(0x830, 1 << 32 | 0x40F0)
    assert len(vm._routes) == 2
    fast = vm.stats.fast_path
    assert vm.signal_msi(XAPIC_BASE | 2 << 12, 0, 0xF0) == 1
    vm.vcpu(0).wrmsr(0x830, 1 << 32 | 0x40F0)
    assert vm.stats.fast_path == fast + 2 and vm.stats.ipis == 2 and vm.stats.msis == 2
    assert len(vm._routes) == 2
    vm.vcpu(3).wrmsr(0x80F, 0xFF)  # a software-enable change dirties the map: forget
    assert len(vm._routes) == 0


def test_a_lowest_priority_message_is_never_kept_in_the_route_cache__LP_1() -> None:
    vm = Vm(4)
    for i in range(4):
        vm.lapic(i).mmio_write(0xF0, 0x1FF)
        vm.lapic(i).mmio_write(0xD0, 1 << (24 + i))
    assert vm.signal_msi(XAPIC_BASE | 0x0F << 12 | 1 << 2, 0, 1 << 8 | 0x40) == 1
    assert len(vm._routes) == 0


@pytest.mark.parametrize("excludes_new", [True, False])
def test_a_hotplugged_vcpu_that_aliases_a_cached_destination_is_not_missed__MAP_2(
    excludes_new: bool,
) -> None:
    results = []
    for route_cache in (True, False):
        vm = Vm(_config(2, False, excludes_new))
        vm.route_cache = route_cache
        for i in range(2):
            vm.lapic(i).mmio_write(0xF0, 0x1FF)
        vm.lapic(1).mmio_write(0x20, 5 << 24)  # vCPU 1 takes xAPIC ID 5
        first = vm.signal_msi(XAPIC_BASE | 5 << 12, 0, 0x40)
        vm.add_vcpu(5)  # vCPU id 5: xAPIC ID 5 too, an alias (MAP-2: no map, slow path)
        results.append((first, vm.signal_msi(XAPIC_BASE | 5 << 12, 0, 0x40), vm.snapshot()))
    assert results[0] == results[1]
    assert results[0][:2] == (1, 1)  # the new vCPU's APIC is software-disabled


# ---------------------------------------------------------------------------------------------
# Every kept route against an uncached decode (FAST-10): the ICR values of the fastpath, the
# raw MSIs and the messages per source, after random state changes under random KvmOptions.
# ---------------------------------------------------------------------------------------------
ICR_STORED = 0xFFFFFFFF & ~0x1000  # the low dword an ICR write keeps (delivery status dropped)


def _decided_now(vm: Vm, source: LocalApic | None, irq: Interrupt) -> tuple[LocalApic, ...] | None:
    """The targets KVM's delivery would choose for ``irq`` from ``source`` now, decided anew
    from the current APIC states (a map built from them if the VM's map is dirty), with an
    accept that only records; None if the map path would not decide it."""
    seen: list[LocalApic] = []

    def record(apic: LocalApic, message: Interrupt) -> bool:
        seen.append(apic)
        return False

    the_map = None
    if vm._use_map:
        the_map = vm._map
        if vm._map_dirty:
            the_map = build(vm._apics, x2apic_format=vm.x2apic_format)[0]
    _, fast = deliver(
        irq, source, the_map, vm._apics, vm.profile, vm.broadcast_quirk, vm.lowest_priority,
        record, vm._use_map,
    )  # fmt: skip
    return tuple(seen) if fast else None


def _check_every_kept_route(vm: Vm) -> int:
    """Each kept route equals an uncached decode of its key; returns how many were checked."""
    routes = vm._routes
    checked = 0
    for source, by_key in routes.by_source.items():
        for key, (irq, accepts, targets, *fields) in by_key.items():
            assert key == irq.dest << 8 | irq.vector
            assert _decided_now(vm, source, irq) == targets, f"source route {irq!r}"
            assert fields == [irq.vector, irq.delivery_mode, irq.trigger, irq.level]
            assert len(accepts) == len(targets)
            checked += 1
    for data, by_address in routes.msi.items():
        for address_lo, (irq, accepts, targets, *fields) in by_address.items():
            assert irq == Msi(address_lo, 0, data).decode(x2apic_format=vm.x2apic_format)
            assert _decided_now(vm, None, irq) == targets, f"MSI route {irq!r}"
            assert fields == [irq.vector, irq.delivery_mode, irq.trigger, irq.level]
            assert len(accepts) == len(targets)
            checked += 1
    for source, by_value in routes.icr.items():
        vcpu = next(v for v in vm.vcpus if v.apic is source)
        for value, (accepts, hook, image, targets, *fields, record) in by_value.items():
            assert record == (vcpu.index, ExitReason.MSR_WRITE, 0x830, value)  # its exit's
            assert source.x2apic_mode and not value & X2APIC_ICR_RESERVED
            assert hook == source.send_hook == vm._deliver
            assert not source.icr_split and image == value & ~DELIVERY_STATUS
            irq = interrupt_of_icr(value & ICR_STORED, value >> 32)
            assert _decided_now(vm, source, irq) == targets, f"ICR route {value:#x}"
            assert fields == [irq.vector, irq.delivery_mode, irq.trigger, irq.level]
            assert len(accepts) == len(targets)
            checked += 1
    return checked


def _x2apic_icr(i: int, value: int) -> Op:
    """vCPU ``i``'s guest writes ``value`` to the x2APIC ICR (WRMSR 0x830) twice: the second
    write takes KVM's exit fastpath when the first kept the value's route."""

    def op(vm: Vm) -> object:
        if i >= len(vm):
            return None
        out = []
        for _ in range(2):
            out.append(_outcome(vm, lambda vm: vm.vcpu(i).wrmsr(0x830, value)))
            out.append(vm.lapic(i).icr)
        return out

    return op


def _guest_msr(i: int, msr: int, value: int) -> Op:
    def op(vm: Vm) -> object:
        if i >= len(vm):
            return None
        vm.vcpu(i).wrmsr(msr, value)
        return None

    return op


def _restore_first(vm: Vm) -> object:
    """Restore the snapshot the VM was given at the start (``vm._first``)."""
    vm.restore(vm._first)  # type: ignore[attr-defined]
    return None


x2apic_dest = st.one_of(dest8, st.sampled_from([0x10001, 0x20003, 0xFFFFFFFF]), st.integers(0, 9))
icr_low = st.builds(
    lambda v, mode, logical, level, trigger, shorthand, junk: (
        v | mode << 8 | logical << 11 | level << 14 | trigger << 15 | shorthand << 18 | junk
    ),
    st.sampled_from([0x20, 0x31, 0xF0, 0x0E]),
    st.sampled_from([0, 0, 0, 1, 4, 2]),  # fixed (mostly), lowest priority, NMI, SMI
    st.integers(0, 1), st.integers(0, 1), st.integers(0, 1),
    st.sampled_from([0, 0, 0, 1, 2, 3]),
    st.sampled_from([0, 0, 0, 0x1000, 0x2000, 1 << 20]),  # delivery status; reserved bits
)  # fmt: skip
route_change = st.one_of(
    state_change,
    st.builds(  # guest APIC_BASE writes: enable, disable, x2APIC mode (a #GP where illegal)
        lambda i, v: _guest_msr(i, 0x1B, v), vcpu_index, st.sampled_from(BASES)
    ),
    st.builds(  # x2APIC SVR software enable / disable
        lambda i, v: _guest_msr(i, 0x80F, v), vcpu_index, st.sampled_from([0xFF, 0x1FF])
    ),
    st.builds(lambda i: _x2apic_icr(i, 5 << 8), vcpu_index),  # INIT to APIC ID 0 (a RESET)
    st.just(_restore_first),
)
route_use = st.one_of(
    delivery,
    st.builds(lambda i, d, low: _x2apic_icr(i, d << 32 | low), vcpu_index, x2apic_dest, icr_low),
)


@settings(max_examples=150, deadline=None)
@given(
    vcpus=st.integers(1, 5),
    x2apic_format=st.booleans(),
    broadcast_quirk=st.booleans(),
    lowest_priority=st.sampled_from(list(LowestPriorityPolicy)),
    optimized_apic_map=st.booleans(),
    excludes_new=st.booleans(),
    x2apic=st.lists(st.sampled_from([True, True, False]), min_size=5, max_size=5),
    ops=st.lists(st.one_of(route_use, route_use, route_change), min_size=1, max_size=40),
)
def test_every_kept_route_equals_an_uncached_decode_after_any_state_change__FAST_10(
    vcpus: int,
    x2apic_format: bool,
    broadcast_quirk: bool,
    lowest_priority: LowestPriorityPolicy,
    optimized_apic_map: bool,
    excludes_new: bool,
    x2apic: list[bool],
    ops: list[Op],
) -> None:
    config = VmConfig.build(vcpus)
    kvm = config.kvm.replace(
        x2apic_format=x2apic_format,
        broadcast_quirk=broadcast_quirk,
        lowest_priority=lowest_priority,
        optimized_apic_map=optimized_apic_map,
        map_excludes_new_vcpu=excludes_new,
    )
    config = config.replace(kvm=kvm)
    cached, fresh = Vm(config), Vm(config)
    fresh.route_cache = False
    for vm in (cached, fresh):  # every APIC software-enabled, some in x2APIC mode
        for i in range(vcpus):
            if x2apic[i]:
                vm.vcpu(i).wrmsr(0x1B, ENABLE_X2APIC)
                vm.vcpu(i).wrmsr(0x80F, 0x1FF)
            else:
                vm.lapic(i).mmio_write(0xF0, 0x1FF)
        vm._first = vm.snapshot()  # type: ignore[attr-defined]
    checked = 0
    for step, op in enumerate(ops):
        got, want = _outcome(cached, op), _outcome(fresh, op)
        assert got == want, f"step {step}: {got!r} != {want!r}"
        checked += _check_every_kept_route(cached)
        a, b = cached.snapshot(), fresh.snapshot()
        assert a == b, f"step {step}: " + "; ".join(b.diff(a))
    assert len(fresh._routes) == 0 and not any(fresh._routes.icr.values())


any_icr = st.builds(lambda d, low: d << 32 | low, x2apic_dest, icr_low)
keepable_icr = st.builds(  # fixed, no shorthand, no reserved bit: a value whose route is kept
    lambda d, v, logical, level, trigger, status: (
        d << 32 | v | logical << 11 | level << 14 | trigger << 15 | status << 12
    ),
    st.sampled_from([0, 1, 2, 3, 4, 0x0F, 0xFFFFFFFF, 0x10001]),
    st.sampled_from([0x20, 0x31, 0xF0]),
    st.integers(0, 1), st.integers(0, 1), st.integers(0, 1), st.integers(0, 1),
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    vcpus=st.integers(1, 5),
    x2apic_format=st.booleans(),
    broadcast_quirk=st.booleans(),
    pool=st.lists(st.one_of(keepable_icr, keepable_icr, any_icr), min_size=1, max_size=4),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("icr"), vcpu_index, st.integers(0, 3)),
            st.tuples(st.just("icr"), vcpu_index, st.integers(0, 3)),
            st.tuples(st.just("change"), route_change, st.just(0)),
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_the_icr_fastpath_equals_the_slow_path_for_repeated_values_and_any_change__FAST_10(
    vcpus: int,
    x2apic_format: bool,
    broadcast_quirk: bool,
    pool: list[int],
    ops: list[tuple[str, object, int]],
) -> None:
    """Every vCPU in x2APIC mode with the optimized map on; its guest writes ICR values drawn
    from a small pool (so they repeat: a kept route is hit), between changes of anything a
    route depends on.  The VM that keeps routes and the one that does not agree on every
    outcome, the sender's ICR register included, and on everything a snapshot holds."""
    config = VmConfig.build(vcpus, x2apic_format=x2apic_format, broadcast_quirk=broadcast_quirk)
    cached, fresh = Vm(config), Vm(config)
    fresh.route_cache = False
    for vm in (cached, fresh):
        for i in range(vcpus):
            vm.vcpu(i).wrmsr(0x1B, ENABLE_X2APIC)
            vm.vcpu(i).wrmsr(0x80F, 0x1FF)
        vm._first = vm.snapshot()  # type: ignore[attr-defined]
    hits = 0
    for step, (kind, what, k) in enumerate(ops):
        i = what if isinstance(what, int) else 0
        value = pool[k % len(pool)]
        op = _x2apic_icr(i, value) if kind == "icr" else what
        got, want = _outcome(cached, op), _outcome(fresh, op)  # type: ignore[arg-type]
        assert got == want, f"step {step}: {got!r} != {want!r}"
        if kind == "icr" and i < vcpus:  # kept after the first write: the second one hit it
            hits += value in cached.vcpu(i).icr_routes
        _check_every_kept_route(cached)
        a, b = cached.snapshot(), fresh.snapshot()
        assert a == b, f"step {step}: " + "; ".join(b.diff(a))
    event(f"ICR writes that took the fastpath: {min(hits, 3)}{'+' if hits >= 3 else ''}")


def test_an_icr_value_is_kept_only_for_its_sender_and_forgotten_with_the_map__FAST_10() -> None:
    vm = Vm(3)
    for i in range(3):
        vm.vcpu(i).wrmsr(0x1B, ENABLE_X2APIC)
        vm.vcpu(i).wrmsr(0x80F, 0x1FF)
    value = 2 << 32 | 0x40F0
    vm.vcpu(0).wrmsr(0x830, value)  # the slow path, which keeps the route and the value
    assert vm.vcpu(0).icr_routes[value][3] == (vm.lapic(2),)
    assert value not in vm.vcpu(1).icr_routes
    fast = vm.stats.fast_path
    vm.vcpu(0).wrmsr(0x830, value)
    assert vm.stats.fast_path == fast + 1 and 0xF0 in vm.lapic(2).irr
    assert vm.lapic(0).icr == value & ~0x1000
    vm.vcpu(2).wrmsr(0x80F, 0xFF)  # the target software-disables itself: the map changes
    assert not vm.vcpu(0).icr_routes and len(vm._routes) == 0
    vm.vcpu(0).wrmsr(0x830, value | 0x1000)  # delivery status is dropped, not kept
    vm.vcpu(0).wrmsr(0x830, value | 0x1000)
    assert vm.lapic(0).icr == value


def test_an_icr_value_sent_through_another_send_hook_skips_the_fastpath__FAST_10() -> None:
    vm = Vm(2)
    for i in range(2):
        vm.vcpu(i).wrmsr(0x1B, ENABLE_X2APIC)
        vm.vcpu(i).wrmsr(0x80F, 0x1FF)
    value = 1 << 32 | 0x40F0
    vm.vcpu(0).wrmsr(0x830, value)
    vm.vcpu(0).wrmsr(0x830, value)
    assert value in vm.vcpu(0).icr_routes
    sent: list[Interrupt] = []
    vm.lapic(0).send_hook = lambda apic, irq: sent.append(irq)
    vm.vcpu(0).wrmsr(0x830, value)
    assert [irq.vector for irq in sent] == [0xF0]


def test_an_icr_value_the_sender_refuses_is_never_kept_though_its_route_is__FAST_10() -> None:
    vm = Vm(2, Profile.custom("kvm", accept_illegal_vectors=False))
    for i in range(2):
        vm.vcpu(i).wrmsr(0x1B, ENABLE_X2APIC)
        vm.vcpu(i).wrmsr(0x80F, 0x1FF)
    value = 1 << 32 | 0x400E  # vector 14: the sender logs a send illegal vector error
    assert vm.deliver(interrupt_of_icr(value & 0xFFFFFFFF, 1), vm.lapic(0)) == 0  # kept route
    for _ in range(2):
        vm.vcpu(0).wrmsr(0x830, value)
        assert value not in vm.vcpu(0).icr_routes
        assert vm.stats.ipis == 1 and vm.lapic(0)._esr_pending == 0x20
