"""The route cache (``hypervisor.routes``): a VM that keeps the routes its optimized map
decided answers exactly as one that routes every message anew, whatever state change comes
between two deliveries (FAST-10; FAST-1..9 keep holding with the cache on)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor import Vm
from hypervisor.config import VmConfig
from lapic.faults import ApicValueError, GuestFault

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
