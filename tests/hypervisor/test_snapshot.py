"""VM snapshots: immutable, hashable, versioned, restorable, diffable (VMSNAP-1..4)."""

from __future__ import annotations

import copy
import pickle
from dataclasses import FrozenInstanceError, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor import ExitReason, Host, RunState, Vm
from hypervisor.snapshot import SNAPSHOT_VERSION
from lapic.faults import ApicTypeError, ApicValueError

from .builders import ICR_ASSERT, ICR_NMI, MSR_ICR, MSR_TPR, x2apic_vm

MSR_LVTT = 0x832
MSR_TMICT = 0x838
IDS = [0, 1, 2]

Op = tuple[Any, ...]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("ipi"), st.sampled_from(range(3)), st.sampled_from(IDS),
                  st.integers(0x20, 0xFF)),
        st.tuples(st.just("nmi"), st.sampled_from(range(3)), st.sampled_from(IDS)),
        st.tuples(st.just("msi"), st.sampled_from(IDS), st.integers(0x20, 0xFF)),
        st.tuples(st.just("run"), st.sampled_from(range(3))),
        st.tuples(st.just("halt"), st.sampled_from(range(3))),
        st.tuples(st.just("preempt"), st.sampled_from(range(3))),
        st.tuples(st.just("tpr"), st.sampled_from(range(3)), st.integers(0, 0xFF)),
        st.tuples(st.just("timer"), st.sampled_from(range(3)), st.integers(1, 5000)),
        st.tuples(st.just("advance"), st.integers(0, 20_000)),
    ),
    max_size=25,
)


def perform(vm: Vm, op: Op) -> object:
    """One guest operation, MSI, run or clock step; returns what it observably returned."""
    kind = op[0]
    if kind in ("ipi", "nmi", "halt", "tpr", "timer"):
        v = vm.vcpu(op[1])
        if v.run_state is RunState.BLOCKED:
            return "blocked"
        if kind == "ipi":
            v.wrmsr(MSR_ICR, (op[2] << 32) | ICR_ASSERT | op[3])
        elif kind == "nmi":
            v.wrmsr(MSR_ICR, (op[2] << 32) | ICR_ASSERT | ICR_NMI)
        elif kind == "halt":
            return v.halt()
        elif kind == "tpr":
            v.wrmsr(MSR_TPR, op[2])
        else:
            v.wrmsr(MSR_LVTT, 0xEF)
            v.wrmsr(MSR_TMICT, op[2])
        return v.run_state
    if kind == "msi":
        return vm.signal_msi(0xFEE00000 | (op[1] << 12), 0, op[2])
    if kind == "run":
        return vm.vcpu(op[1]).run()
    if kind == "preempt":
        vm.vcpu(op[1]).preempt()
        return vm.vcpu(op[1]).run_state
    return vm.advance(op[1])


def play(vm: Vm, sequence: list[Op]) -> list[object]:
    return [perform(vm, op) for op in sequence]


@settings(max_examples=60, deadline=None)
@given(prefix=ops, suffix=ops)
def test_restore_then_the_same_operations_gives_the_same_results__VMSNAP_2(
    prefix: list[Op], suffix: list[Op]
) -> None:
    vm = x2apic_vm(IDS, trace=True)
    play(vm, prefix)
    snap = vm.snapshot()
    first = play(vm, suffix)
    after = vm.snapshot()
    vm.restore(snap)
    assert vm.snapshot() == snap
    assert play(vm, suffix) == first
    assert vm.snapshot() == after
    # A fresh VM of the same configuration restored from the snapshot is the same machine.
    fresh = x2apic_vm(IDS, trace=True)
    fresh.restore(snap)
    assert fresh.snapshot() == snap and hash(fresh.snapshot()) == hash(snap)
    assert play(fresh, suffix) == first
    assert fresh.snapshot() == after


def test_a_snapshot_is_an_immutable_hashable_versioned_value__VMSNAP_1() -> None:
    a, b = x2apic_vm(IDS), x2apic_vm(IDS)
    sa, sb = a.snapshot(), b.snapshot()
    assert sa.version == SNAPSHOT_VERSION == 2
    assert sa == sb and hash(sa) == hash(sb) and len({sa, sb}) == 1
    with pytest.raises(FrozenInstanceError):
        sa.version = 2  # type: ignore[misc]
    a.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | 0x41)
    assert a.snapshot() != sb
    assert sa.vcpus[1].apic == b.lapic(1).snapshot()


def test_diff_names_the_vcpu_the_register_and_old_and_new_values_in_hex__VMSNAP_3() -> None:
    vm = x2apic_vm([0, 1])
    before = vm.snapshot()
    vm.vcpu(1).wrmsr(MSR_TPR, 0x20)
    vm.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | 0x41)
    lines = before.diff(vm.snapshot())
    assert "vcpu 1 IRR2: 0x00000000 -> 0x00000002" in lines
    assert "vcpu 1 TPR: 0x00000000 -> 0x00000020" in lines
    assert "vcpu 0 ICR: 0x00000000 -> 0x00004041" in lines
    assert "vcpu 0 ICR[63:32]: 0x00000000 -> 0x00000001" in lines  # x2APIC: one 64-bit ICR
    assert "vcpu 0 exits: 0x3 -> 0x4" in lines
    assert "host running: 0x1 -> 0x0" in lines
    assert "vm stats.kicks: 0x0 -> 0x1" in lines and "vm stats.ipis: 0x0 -> 0x1" in lines
    assert before.diff(before) == []
    assert before.diff(replace(before, version=9))[0] == f"version: {SNAPSHOT_VERSION} -> 9"
    with pytest.raises(ApicTypeError, match=r"^other must be a VmSnapshot, not int$"):
        before.diff(3)  # type: ignore[arg-type]


def test_a_snapshot_refuses_while_queued_steps_are_pending__VMSNAP_4() -> None:
    vm = x2apic_vm([0, 1])
    vm.host.steps.queued = True
    vm.vcpu(1).halt()
    with pytest.raises(ApicValueError, match=r"^vm has queued steps pending: run them"):
        vm.snapshot()
    vm.host.steps.run_all()
    vm.host.steps.queued = False
    assert vm.vcpu(1).run_state is RunState.BLOCKED
    snap = vm.snapshot()
    assert snap.host.pcpus[1].wakeup_list == (1,)
    vm.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | 0x41)
    vm.restore(snap)
    assert vm.vcpu(1).run_state is RunState.BLOCKED
    assert vm.host.pcpu(1).wakeup_list == [vm.vcpu(1)]


def test_restore_checks_its_argument_and_the_vcpus__VMSNAP_4() -> None:
    vm = x2apic_vm([0, 1])
    snap = vm.snapshot()
    with pytest.raises(ApicTypeError, match=r"^snap must be a VmSnapshot, not str$"):
        vm.restore("snap")  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match=r"^snap.version=1 is not 2$"):
        vm.restore(replace(snap, version=1))  # before exits were counted per vCPU
    with pytest.raises(ApicValueError, match=r"^snap has 2 vCPUs, the vm 3"):
        x2apic_vm([0, 1, 2]).restore(snap)
    with pytest.raises(ApicValueError, match=r"^snap vCPU 1 has id 1, the vm 5$"):
        x2apic_vm([0, 5]).restore(snap)
    one = Vm(1)
    one.restore(snap)  # the hotplugged vCPU is created
    assert len(one) == 2 and one.snapshot() == snap


def test_restore_on_a_shared_host_leaves_other_vms_vcpus_alone__VMSNAP_4() -> None:
    host = Host(2)
    a, b = Vm(2, host=host), Vm(1, host=host)
    a.vcpu(0).rdmsr(MSR_TPR - 0x808 + 0x1B)
    snap = a.snapshot()
    b.vcpu(0).rdmsr(0x1B)  # b's vCPU 0 takes pCPU 0 from a's vCPU 0
    assert host.pcpu(0).loaded is b.vcpu(0)
    a.restore(snap)
    assert host.pcpu(0).loaded is a.vcpu(0)
    c = Vm(1, host=host)
    c.vcpu(0).enter(1)  # a foreign vCPU on pCPU 1
    snap_a = a.snapshot()
    assert [p.loaded for p in snap_a.host.pcpus] == [0, -1]
    a.restore(snap_a)
    assert host.pcpu(1).loaded is c.vcpu(0)


def test_every_vm_attribute_but_the_apics_deepcopies__VMSNAP_1() -> None:
    vm = x2apic_vm([0, 1])
    vm.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | 0x41)
    memo: dict[int, Any] = {id(a): a for a in vm._apics}
    twin = copy.deepcopy(vm, memo)
    assert twin is not vm and twin.vcpu(1) is not vm.vcpu(1) and twin.host is not vm.host
    assert twin.vcpu(1).apic is vm.lapic(1)
    assert twin.host.pcpu(1).loaded is twin.vcpu(1)


def test_deepcopy_of_a_vm_is_an_equal_independent_vm__VMSNAP_1() -> None:
    vm = x2apic_vm([0, 1])
    vm.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | 0x41)
    twin = copy.deepcopy(vm)
    assert twin.snapshot() == vm.snapshot()
    assert twin.vcpu(1).run() == [0x41] and vm.lapic(1).pending_interrupt() == 0x41


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_vm_delivers_its_kept_routes_and_kicks_to_its_own_vcpus__VMSNAP_1(
    how: str,
) -> None:
    vm = x2apic_vm([0, 1, 2])
    icr = (2 << 32) | ICR_ASSERT | 0x52
    for vcpu in vm.vcpus:
        vcpu.enter(vcpu.index)
    vm.vcpu(0).wrmsr(MSR_ICR, icr)  # the route and the ICR value are kept from here on
    vm.signal_msi(0xFEE00000 | (1 << 12), 0, 0x61)
    assert vm.lapic(2).pending_interrupt() == 0x52
    twin = copy.deepcopy(vm) if how == "deepcopy" else pickle.loads(pickle.dumps(vm))
    kicks, host_kicks = vm.stats.kicks, vm.host.stats.kicks
    twin.vcpu(0).wrmsr(MSR_ICR, icr | 0x01)  # vector 0x53, a new route
    twin.vcpu(0).wrmsr(MSR_ICR, icr | 0x01)  # the kept one
    twin.signal_msi(0xFEE00000 | (1 << 12), 0, 0x62)
    twin.signal_msi(0xFEE00000 | (1 << 12), 0, 0x62)
    assert twin.lapic(2).irr == {0x52, 0x53} and twin.lapic(1).irr == {0x61, 0x62}
    assert vm.lapic(2).irr == {0x52} and vm.lapic(1).irr == {0x61}
    assert (vm.stats.kicks, vm.host.stats.kicks) == (kicks, host_kicks)
    assert twin.stats.kicks == kicks + 4 and twin.host.stats.kicks == host_kicks + 4


def test_pickle_round_trip_of_a_vm_gives_an_equal_vm__VMSNAP_1() -> None:
    vm = x2apic_vm([0, 1, 5])
    vm.vcpu(0).wrmsr(MSR_ICR, (5 << 32) | ICR_ASSERT | 0x52)
    vm.signal_msi(0xFEE00000 | (1 << 12), 0, 0x61)
    twin = pickle.loads(pickle.dumps(vm))
    assert twin.snapshot() == vm.snapshot()
    assert twin.vcpu(2).run() == [0x52] and twin.vcpu(1).run() == [0x61]
    assert vm.lapic(2).pending_interrupt() == 0x52


def test_diff_shows_a_vcpus_exits_by_reason_only_where_the_total_hides_the_change__VMSNAP_3() -> (
    None
):
    vm = x2apic_vm([0, 1])
    before = vm.snapshot()
    vm.vcpu(0).wrmsr(MSR_TPR, 0x20)
    after = vm.snapshot()
    assert "vcpu 0 exits: 0x3 -> 0x4" in before.diff(after)
    assert not any(line.startswith("vcpu 0 exits_by_reason") for line in before.diff(after))
    v0 = after.vcpus[0]
    relabelled = replace(v0, exits_by_reason=((int(ExitReason.HLT), 1), *v0.exits_by_reason[1:]))
    same_total = replace(after, vcpus=(relabelled, *after.vcpus[1:]))
    lines = after.diff(same_total)
    assert len(lines) == 1 and lines[0].startswith("vcpu 0 exits_by_reason: ")
