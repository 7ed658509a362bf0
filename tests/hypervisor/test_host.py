"""The host under the VMs: pCPUs, host APIC ids, loading, wake-up lists, counters (HOST-1..5)."""

from __future__ import annotations

import pytest

from hypervisor import Host, Pcpu, RunState, Vcpu, Vm
from hypervisor.accel import ACCELERATORS
from hypervisor.accel.emulated import Emulated
from lapic.faults import ApicTypeError, ApicValueError

from .builders import ICR_ASSERT, MSR_ICR, MSR_TPR, x2apic_vm


def test_host_apic_ids_default_to_the_pcpu_id_and_can_be_overridden__HOST_1() -> None:
    assert Host(4).pcpu(3).apic_id == 3
    assert Host(3, apic_ids=[8, 2, 4]).pcpu(0).apic_id == 8
    h = Host(4, apic_ids=lambda i: 2 * i + 1)
    assert [h.pcpu(i).apic_id for i in range(4)] == [1, 3, 5, 7]
    assert h.pcpu_by_apic_id(5) is h.pcpu(2) and h.pcpu_by_apic_id(2) is None
    assert h.apic_id_of(3) == 7
    assert repr(h.pcpu(1)) == "<Pcpu 1 apic_id=3 loaded=- wakeup=[]>"


def test_host_arguments_are_checked_by_name__HOST_1() -> None:
    with pytest.raises(ApicValueError, match=r"^pcpus="):
        Host(0)
    with pytest.raises(ApicValueError, match=r"^apic_ids must give one id per pCPU: 1 for 2"):
        Host(2, apic_ids=[0])
    with pytest.raises(ApicTypeError, match=r"^apic_ids must be a sequence or a callable, not"):
        Host(2, apic_ids="01")  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match=r"^apic_ids\[1\]="):
        Host(2, apic_ids=[0, -1])
    with pytest.raises(ApicTypeError, match=r"^clock must be a Clock, not int$"):
        Host(2, clock=5)  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match=r"^pcpu=0x2 is outside"):
        Host(2).pcpu(2)
    with pytest.raises(ApicTypeError, match=r"^host must be a Host, not int$"):
        Vm(1, host=3)  # type: ignore[arg-type]


def test_a_vm_alone_gets_a_private_host_and_vcpu_i_first_runs_on_pcpu_i__HOST_4() -> None:
    vm = x2apic_vm([0, 1, 2])
    assert vm.host.size == (1 << 20) + 1 and vm.clock is vm.host.clock
    assert [v.pcpu for v in vm.vcpus] == [0, 1, 2]
    assert [p.loaded for p in vm.host.pcpus] == list(vm.vcpus)
    assert vm.lapic(0).clock is vm.host.clock
    vm.vcpu(1).rdmsr(MSR_TPR)
    assert vm.host.executing is vm.host.pcpu(1) and vm.current is vm.vcpu(1)


def test_two_vms_share_a_host_its_clock_and_its_pcpus__HOST_2() -> None:
    host = Host(2)
    a, b = Vm(2, host=host), Vm(3, host=host)
    assert a.clock is b.clock is host.clock
    a.vcpu(0).rdmsr(0x1B)
    assert a.current is a.vcpu(0) and b.current is None
    b.vcpu(2).rdmsr(0x1B)  # vCPU 2 of b first runs on pCPU 2 % 2 = 0: a's vCPU 0 is put
    assert b.vcpu(2).pcpu == 0 and host.pcpu(0).loaded is b.vcpu(2)
    assert a.vcpu(0).run_state is RunState.PREEMPTED
    assert a.current is None and b.current is b.vcpu(2)
    host.advance(1000)
    assert a.clock.now == b.clock.now == 1000 and a.poll_timers() == 0


def test_one_vcpu_is_loaded_per_pcpu_and_a_moved_vcpu_frees_its_old_pcpu__HOST_2() -> None:
    vm = Vm(2)
    v0, v1 = vm.vcpu(0), vm.vcpu(1)
    v0.enter(5)
    v1.enter(5)
    assert v0.run_state is RunState.PREEMPTED and vm.host.pcpu(5).loaded is v1
    v1.enter(6)
    assert vm.host.pcpu(5).loaded is None and vm.host.pcpu(6).loaded is v1
    v1.preempt()
    assert vm.host.pcpu(6).loaded is None and v1.pcpu == 6


class PcpuSpy(Emulated):
    name = "pcpu-spy"

    def __init__(self) -> None:
        self.loads: list[tuple[int, Pcpu]] = []

    def vcpu_load(self, vcpu: Vcpu, pcpu: Pcpu) -> None:
        self.loads.append((vcpu.index, pcpu))


def test_the_accelerator_is_loaded_with_the_pcpu_object__HOST_2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(ACCELERATORS, "pcpu-spy", PcpuSpy)
    host = Host(4, apic_ids=[10, 11, 12, 13])
    vm = Vm(2, accelerator="pcpu-spy", host=host)
    assert isinstance(vm.accel, PcpuSpy)
    vm.vcpu(1).enter(3)
    index, pcpu = vm.accel.loads[-1]
    assert index == 1 and pcpu is host.pcpu(3) and pcpu.apic_id == 13


def test_a_blocked_vcpu_waits_on_its_pcpus_wakeup_list_until_woken__HOST_3() -> None:
    vm = x2apic_vm([0, 1])
    v1 = vm.vcpu(1)
    p1 = vm.host.pcpu(1)
    assert v1.halt() is True
    assert p1.loaded is None and p1.wakeup_list == [v1]
    assert repr(p1) == "<Pcpu 1 apic_id=1 loaded=- wakeup=[vcpu1]>"
    vm.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | 0x41)
    assert p1.wakeup_list == [] and v1.run_state is RunState.PREEMPTED
    assert vm.host.stats.wakeups == 1 and vm.host.stats.kicks == 0
    assert v1.halt() is False  # the interrupt is still pending
    v1.run()
    assert v1.halt() is True
    v1.enter()  # the host forces it in: off the list, loaded again
    assert p1.wakeup_list == [] and p1.loaded is v1


def test_kicks_are_host_ipis_counted_on_the_host_too__HOST_5() -> None:
    host = Host(4)
    vm = x2apic_vm([0, 1])
    other = Vm(2, host=host)
    assert other.host is host and vm.host is not host
    before = vm.host.stats.as_tuple()
    vm.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | 0x41)
    assert vm.stats.kicks == 1
    assert vm.host.stats.kicks == vm.host.stats.host_ipis == before[2] + 1
    assert vm.host.stats.doorbells == 0
    assert repr(vm.host.stats).startswith("HostStats(doorbells=0, host_ipis=")
    assert host.stats.as_tuple() == (0, 0, 0, 0)
