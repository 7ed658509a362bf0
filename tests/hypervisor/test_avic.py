"""AMD AVIC: the worked examples of ``specs/avic.md`` (Parts A-G of the reference), one test each.

Every VM here is set up by guest-visible accesses (``builders``); the AVIC state is read through
``vm.accel`` (the physical/logical tables, doorbells) and the exit log, as the issue's API says.
"""

from __future__ import annotations

import pytest

from hypervisor import ExitReason, Host, Inhibits, RunState, Vm
from hypervisor.accel.avic import Avic, AvicState
from hypervisor.hw.avic import (
    INCOMPLETE_IPI_INFO2,
    IpiFailure,
    LogicalTable,
    PhysicalEntry,
    PhysicalTable,
    ga_tag,
    ga_tag_fields,
    incomplete_ipi_info,
    logical_index,
    max_physical_index,
    physical_table_pages,
)
from hypervisor.trace import KvmAvicKickVcpuSlowpath
from lapic.faults import ApicValueError
from lapic.icr import DeliveryMode, Interrupt

from .builders import (
    ICR_ALL_EXCLUDING_SELF,
    ICR_LEVEL,
    ICR_LOGICAL,
    ICR_NMI,
    ICR_SELF,
    MSR_ICR,
    REG_DFR,
    REG_ICR,
    REG_ICR2,
    REG_ID,
    REG_LDR,
    REG_SVR,
    SVR_ON,
    mmio_read,
    mmio_write,
)


def avic_of(vm: Vm) -> AvicState:
    """``vm.accel`` as the AVIC state it is."""
    accel = vm.accel
    assert isinstance(accel, AvicState)
    return accel


INCOMPLETE = ExitReason.AVIC_INCOMPLETE_IPI
UNACCEL = ExitReason.AVIC_UNACCELERATED_ACCESS


def avic_vm(n: int = 4, config: Avic | None = None, *, run: bool = True, **kw: object) -> Vm:
    """``n`` software-enabled xAPIC vCPUs under AVIC, vCPU ``i`` in guest mode on pCPU ``i``."""
    vm = Vm(n, accelerator=config if config is not None else "avic", **kw)  # type: ignore[arg-type]
    for i in range(n):
        mmio_write(vm, i, REG_SVR, SVR_ON)
    if not run:
        for i in range(n):
            vm.vcpu(i).preempt()
    vm.host.running = None
    assert vm.exit_log is not None
    vm.exit_log.clear()
    return vm


def send(vm: Vm, i: int, icr_low: int, dest: int = 0) -> None:
    """The Linux xAPIC IPI sequence without the idle wait: ICR2, then ICR."""
    mmio_write(vm, i, REG_ICR2, dest << 24)
    mmio_write(vm, i, REG_ICR, icr_low)


def avic_exits(vm: Vm, reason: ExitReason = INCOMPLETE) -> list[tuple[int, int, int]]:
    return [(e.vcpu, e.qualification, e.value) for e in vm.exits if e.reason is reason]


# =============================================================================================
# Part A: data structures
# =============================================================================================
def test_the_backing_page_is_the_apic_page_a_hardware_irr_write_is_in_the_lapic__AV_A2() -> None:
    vm = avic_vm(2)
    avic = avic_of(vm)
    pa = avic.physical_table[1].backing_page
    assert avic.page(pa) is vm.lapic(1)
    send(vm, 0, 0x41, dest=1)
    assert avic_exits(vm) == []
    assert 0x41 in vm.lapic(1).irr  # set by the CPU model, no copy


def test_physical_entry_host_id_page_running_valid_and_bit_61_refused__AV_A3() -> None:
    host = Host(8)
    vm = Vm(4, accelerator=Avic(backing_page_base=0x12342000), host=host)
    vm.vcpu(3).enter(pcpu=5)
    avic = avic_of(vm)
    assert int(avic.physical_table[3]) == 0xC000000012345005
    e = avic.physical_table[3]
    assert (e.host_id, e.backing_page, e.is_running, e.valid) == (5, 0x12345000, True, True)
    vm.vcpu(3).preempt()
    assert int(avic.physical_table[3]) == 0x8000000012345005
    assert int(avic.physical_table[100]) == 0 and not avic.physical_table[100].valid
    with pytest.raises(ApicValueError, match="bit 61"):
        avic.physical_table[3] = 0x8000000012345005 | 1 << 61
    assert all(not int(e) >> 61 & 1 for _, e in avic.physical_table.items())
    assert PhysicalEntry.make(host_id=5, backing_page=0x12345000, is_running=True).raw == (
        0xC000000012345005
    )


def test_logical_entries_flat_cluster_and_bad_ldrs__AV_A4() -> None:
    assert logical_index(0x04, flat=True) == 2
    assert logical_index(0x21, flat=False) == 8
    assert logical_index(0x03, flat=True) is None
    assert logical_index(0x00, flat=True) is None
    assert logical_index(0xF1, flat=False) is None
    vm = avic_vm(3)
    mmio_write(vm, 2, REG_LDR, 0x04000000)
    assert int(avic_of(vm).logical_table[2]) == 0x80000002
    assert avic_of(vm).logical_table[2].guest_physical_id == 2
    mmio_write(vm, 1, REG_DFR, 0x0FFFFFFF)
    mmio_write(vm, 1, REG_LDR, 0x21000000)
    assert int(avic_of(vm).logical_table[8]) == 0x80000001
    mmio_write(vm, 2, REG_LDR, 0x03000000)  # two bits in flat mode: no entry, old one gone
    assert int(avic_of(vm).logical_table[2]) == 0
    assert all(e.guest_physical_id != 2 for _, e in avic_of(vm).logical_table.items())
    assert vm.inhibits & Inhibits.LOGICAL_ID_ALIASED
    mmio_write(vm, 1, REG_DFR, 0xFFFFFFFF)  # DFR write: the old entry is invalidated
    assert int(avic_of(vm).logical_table[8]) == 0
    assert len(LogicalTable()) == 1024


def test_max_index_and_table_size_follow_max_vcpu_ids__AV_A5() -> None:
    vm = Vm(2, accelerator=Avic(x2avic=False, physical_table_pa=0x23456000), max_vcpu_ids=4)
    assert avic_of(vm).max_physical_index == 3
    assert avic_of(vm).vmcb(0).avic_physical_id == 0x23456003
    assert max_physical_index(1024, x2avic=False, x2avic_4k=False) == 0xFE
    assert max_physical_index(1024, x2avic=True, x2avic_4k=False) == 0x1FF
    assert max_physical_index(1024, x2avic=True, x2avic_4k=True) == 0x3FF
    assert physical_table_pages(1024, x2avic=True, x2avic_4k=True) == 2
    assert max_physical_index(8, x2avic=True, x2avic_4k=True) == 7
    assert physical_table_pages(8, x2avic=True, x2avic_4k=True) == 1
    assert physical_table_pages(4096, x2avic=True, x2avic_4k=True) == 8
    assert len(PhysicalTable(8)) == 4096
    assert avic_of(Vm(1, accelerator="avic", max_vcpu_ids=8)).max_physical_index == 7


def test_vmcb_fields_enable_bits_and_pointers__AV_A1() -> None:
    vm = avic_vm(1)
    v = avic_of(vm).vmcb(0)
    assert v.avic_enabled and not v.x2apic_mode
    assert v.avic_vapic_bar == 0xFEE00000
    assert all(p and not p & 0xFFF for p in (v.avic_backing_page, v.avic_logical_id))
    vm.vcpu(0).wrmsr(0x1B, 0xFEE00000 | 0x800 | 0x400 | 0x100)
    assert avic_of(vm).vmcb(0).x2apic_mode
    assert avic_of(vm).max_physical_index_of(0) == 0x1FF


def test_kvm_rings_the_doorbell_of_a_target_in_guest_mode_on_another_pcpu_only__AV_A6() -> None:
    vm = Vm(2, accelerator="avic", host=Host(8, apic_ids=[0, 1, 2, 3, 4, 5, 6, 7]))
    for i in range(2):
        mmio_write(vm, i, REG_SVR, SVR_ON)
    vm.vcpu(1).enter(pcpu=7)
    vm.vcpu(0).enter(pcpu=0)
    vm.host.running = vm.vcpu(0)  # KVM runs on pCPU 0 (vCPU 0's exit, say)
    vm.deliver(Interrupt(0x51, DeliveryMode.FIXED, dest=1))
    assert list(avic_of(vm).doorbells) == [7]
    assert vm.stats.doorbells == 1
    vm.deliver(Interrupt(0x52, DeliveryMode.FIXED, dest=0))  # the target is this pCPU's vCPU
    assert list(avic_of(vm).doorbells) == [7]
    assert avic_of(vm).host_apic_id(7) == 7


def test_ga_tag_packs_vm_id_and_vcpu_index_and_the_notifier_wakes_that_vcpu__AV_A8() -> None:
    assert ga_tag(5, 3) == 0x5003
    assert ga_tag_fields(0x5003) == (5, 3)
    vm = avic_vm(4, Avic(vm_id=5))
    vm.vcpu(3).halt()
    assert vm.vcpu(3).run_state is RunState.BLOCKED
    vm.lapic(3).accept(0x61)  # a device's interrupt written to the page (woken by kick)
    vm.vcpu(3).halt() if vm.vcpu(3).run_state is not RunState.BLOCKED else None
    assert avic_of(vm).ga_log_notify(0x5003)
    assert avic_of(vm).ga_log_notify(0x6003) is False


# =============================================================================================
# Part B: the CPU's side of a guest ICR write
# =============================================================================================
def test_only_fixed_edge_ipis_are_accelerated_others_exit_invalid_int_type__AV_B1() -> None:
    vm = avic_vm(4)
    send(vm, 0, ICR_NMI | 0xF0, dest=3)
    ((vcpu, info1, info2),) = avic_exits(vm)
    assert vcpu == 0 and info1 == 0x03000000_000004F0 and info2 >> 32 == 0
    assert vm.vcpu(3).run() == [2]  # KVM emulated it: one NMI
    send(vm, 0, ICR_LEVEL | 0x4000 | 0xF0, dest=3)
    assert avic_exits(vm)[-1][2] >> 32 == IpiFailure.INVALID_INT_TYPE


def test_irr_then_is_running_exit_target_not_running_and_no_second_irr_write__AV_B2() -> None:
    vm = avic_vm(4, Avic(x2avic=False), host=Host(8, apic_ids=[0, 1, 2, 3, 4, 5, 6, 7]))
    vm.vcpu(3).halt()
    accepted = vm.stats.irqs_accepted
    send(vm, 0, 0xF0, dest=3)
    assert vm.lapic(3).register("IRR7") == 1 << 16  # offset 0x270 bit 16
    assert avic_exits(vm) == [(0, 0x03000000_000000F0, 0x00000001_00000003)]
    assert vm.stats.irqs_accepted == accepted  # KVM did not write IRR again
    assert vm.vcpu(3).run_state is RunState.PREEMPTED  # woken
    assert vm.vcpu(3).run() == [0xF0]
    # Same write with the target in guest mode on host APIC 5: a doorbell, no exit.
    vm.vcpu(3).enter(pcpu=5)
    send(vm, 0, 0xF0, dest=3)
    assert len(avic_exits(vm)) == 1
    assert list(avic_of(vm).doorbells)[-1] == 5


def test_self_ipi_skips_the_physical_table_even_without_ipiv__AV_B3() -> None:
    vm = avic_vm(2, Avic(enable_ipiv=False))
    send(vm, 0, ICR_SELF | 0xF1)
    assert avic_exits(vm) == [] and 0xF1 in vm.lapic(0).irr
    send(vm, 0, 0xF2, dest=0)  # its own ID, no shorthand: own IsRunning is 0
    assert [e[2] >> 32 for e in avic_exits(vm)] == [IpiFailure.TARGET_NOT_RUNNING]


def test_an_invalid_logical_target_sends_nothing_then_kvm_emulates_the_whole_ipi__AV_B4() -> None:
    vm = avic_vm(2)
    mmio_write(vm, 0, REG_LDR, 0x01000000)  # bit 1 has no vCPU
    avic_of(vm).logical_table[0]  # valid -> vCPU 0
    send(vm, 1, ICR_LOGICAL | 0x55, dest=0x03)
    ((_, _, info2),) = avic_exits(vm)
    assert INCOMPLETE_IPI_INFO2.unpack(info2) == {"index": 1, "cause": 2}
    assert vm.vcpu(0).run() == [0x55]  # once, by KVM's emulation
    assert vm.vcpu(0).run() == []


def test_an_emulated_icr_write_ends_with_busy_clear__AV_B5() -> None:
    vm = avic_vm(2)
    send(vm, 0, ICR_NMI | 0x1000, dest=1)
    assert mmio_read(vm, 0, REG_ICR) & 0x1000 == 0
    assert vm.vcpu(1).run() == [2]


def test_exitinfo_decodes_a_12_bit_index__AV_B6() -> None:
    assert INCOMPLETE_IPI_INFO2.unpack(0x0000000100000ABC) == {"index": 0xABC, "cause": 1}
    assert incomplete_ipi_info(0xF0, 0x03000000, IpiFailure.TARGET_NOT_RUNNING, 3) == (
        0x03000000_000000F0, 0x00000001_00000003
    )


# =============================================================================================
# Part C: KVM's INCOMPLETE_IPI handler
# =============================================================================================
def test_cause_1_only_kicks_causes_0_and_2_emulate_once__AV_C1_AV_C2() -> None:
    vm = avic_vm(3, run=False)
    vm.vcpu(0).enter()
    vm.vcpu(1).halt() if vm.vcpu(1).run_state is RunState.IN_GUEST else None
    before = vm.stats.irqs_accepted
    send(vm, 0, 0x60, dest=1)
    assert vm.stats.irqs_accepted == before  # cause 1: no IRR write by KVM
    send(vm, 0, ICR_NMI, dest=2)
    assert vm.stats.irqs_accepted == before + 1  # cause 0: emulated once
    assert vm.vcpu(1).run() == [0x60]


def test_x2apic_logical_fast_path_kicks_each_bit_of_the_cluster__AV_C3() -> None:
    vm = Vm(35, accelerator="avic", trace=True)
    for i in range(35):
        vm.vcpu(i).wrmsr(0x1B, 0xFEE00000 | 0xC00 | (0x100 if i == 0 else 0))
        vm.vcpu(i).wrmsr(0x80F, SVR_ON)
    for i in (32, 34):
        vm.vcpu(i).halt()
    vm.vcpu(0).wrmsr(MSR_ICR, (0x00020005 << 32) | ICR_LOGICAL | 0x70)
    assert vm.vcpu(32).run_state is RunState.PREEMPTED
    assert vm.vcpu(34).run_state is RunState.PREEMPTED
    assert not any(isinstance(e, KvmAvicKickVcpuSlowpath) for e in vm.tracer.events)
    assert vm.vcpu(32).run() == [0x70] and vm.vcpu(34).run() == [0x70]


def test_shorthand_all_excluding_self_takes_the_slow_path_and_kicks_every_match__AV_C4() -> None:
    vm = avic_vm(4, trace=True)
    vm.vcpu(2).halt()
    send(vm, 0, ICR_ALL_EXCLUDING_SELF | 0x66)
    assert [e[2] >> 32 for e in avic_exits(vm)] == [IpiFailure.TARGET_NOT_RUNNING]
    assert any(isinstance(e, KvmAvicKickVcpuSlowpath) for e in vm.tracer.events)
    assert vm.vcpu(2).run_state is RunState.PREEMPTED
    assert [vm.vcpu(i).run() for i in range(4)] == [[], [0x66], [0x66], [0x66]]


# =============================================================================================
# Part D: unaccelerated accesses
# =============================================================================================
def test_unaccelerated_access_exit_info_decodes_offset_and_write__AV_D1() -> None:
    vm = avic_vm(1)
    mmio_write(vm, 0, REG_LDR, 0x01000000)
    assert avic_exits(vm, UNACCEL) == [(0, 0x1_000000D0, 0)]


def test_traps_fault_and_remote_read_writes__AV_D2() -> None:
    vm = avic_vm(2)
    mmio_write(vm, 0, 0x380, 0x1000)  # TMICT: trap, timer armed
    assert vm.lapic(0).register("TMICT") == 0x1000
    assert mmio_read(vm, 0, 0x390) > 0  # TMCCT: fault, emulated
    assert [q for _, q, _ in avic_exits(vm, UNACCEL)] == [0x1_00000380, 0x390]
    mmio_write(vm, 0, 0xC0, 0x1234)  # Remote Read: ignored (a790e338c7c4)
    assert avic_of(vm).warnings == []
    mmio_write(vm, 1, REG_ID, 0x05000000)
    assert vm.inhibits & Inhibits.APIC_ID_MODIFIED


# =============================================================================================
# Part E: IsRunning, load/put/block, doorbell vs. wake-up
# =============================================================================================
def test_load_sets_is_running_only_in_the_hardware_table_with_ipiv__AV_E1() -> None:
    vm = Vm(2, accelerator="avic", host=Host(16))
    vm.vcpu(1).enter(pcpu=9)
    e = avic_of(vm).physical_table[1]
    assert e.host_id == 9 and e.is_running
    vm = Vm(2, accelerator=Avic(enable_ipiv=False), host=Host(16))
    vm.vcpu(1).enter(pcpu=9)
    assert not avic_of(vm).physical_table[1].is_running
    assert PhysicalEntry(avic_of(vm).shadow[1]).is_running


def test_the_vcpu_table_accel_column_shows_is_running_valid_and_host_id_in_hex__AV_E1() -> None:
    vm = Vm(2, accelerator="avic", host=Host(16, apic_ids=[i * 2 for i in range(16)]))
    vm.vcpu(1).enter(pcpu=9)
    assert avic_of(vm).vcpu_state(vm.vcpu(1)) == "avic: run=1 valid=1 host=0x12"
    assert avic_of(vm).vcpu_state(vm.vcpu(0)) == "avic: run=0 valid=1 host=0x0"
    assert vm.table().splitlines()[2].endswith("avic: run=1 valid=1 host=0x12")
    vm.vcpu(1).preempt()
    assert avic_of(vm).vcpu_state(vm.vcpu(1)) == "avic: run=0 valid=1 host=0x12"
    big = Vm(vcpu_ids=[0, 300], accelerator=Avic(x2avic=False))
    assert avic_of(big).vcpu_state(big.vcpu(1)) == "avic: no entry"


def test_put_clears_is_running_blocking_sets_bit_61_in_the_shadow_only__AV_E2_AV_E3() -> None:
    vm = avic_vm(2)
    vm.vcpu(1).preempt()
    assert not avic_of(vm).physical_table[1].is_running
    assert not PhysicalEntry(avic_of(vm).shadow[1]).ga_log_intr
    vm.vcpu(1).enter()
    assert vm.vcpu(1).halt()
    assert not avic_of(vm).physical_table[1].is_running
    assert PhysicalEntry(avic_of(vm).shadow[1]).ga_log_intr
    assert not int(avic_of(vm).physical_table[1]) >> 61 & 1


def test_family_17h_forces_ipiv_off_and_every_cross_vcpu_ipi_exits__AV_E5() -> None:
    assert Avic(cpu_family=0x17).enable_ipiv is False
    assert Avic(cpu_family=0x17, enable_ipiv=True).enable_ipiv is False
    assert Avic(cpu_family=0x17, force_ipiv=True).enable_ipiv is True
    vm = avic_vm(3, Avic(cpu_family=0x17))
    send(vm, 0, 0x40, dest=1)
    send(vm, 2, 0x41, dest=0)
    assert [e[2] >> 32 for e in avic_exits(vm)] == [1, 1]


def test_host_side_delivery_doorbell_in_guest_wake_when_blocked_kick_when_inhibited__AV_E6(
) -> None:
    vm = avic_vm(3, host=Host(4))
    vm.vcpu(2).halt()
    vm.deliver(Interrupt(0x50, DeliveryMode.FIXED, dest=2))
    assert vm.vcpu(2).run_state is RunState.PREEMPTED and list(avic_of(vm).doorbells) == []
    vm.deliver(Interrupt(0x51, DeliveryMode.FIXED, dest=1))
    assert list(avic_of(vm).doorbells) == [1]
    mmio_write(vm, 0, REG_ID, 0x07000000)  # inhibits AVIC
    vm.host.running = None
    kicks = vm.stats.kicks
    vm.deliver(Interrupt(0x52, DeliveryMode.FIXED, dest=1))
    assert vm.stats.kicks == kicks + 1 and list(avic_of(vm).doorbells) == [1]


# =============================================================================================
# Parts F, G
# =============================================================================================
def test_a_too_big_vcpu_id_inhibits_instead_of_failing__AV_F1() -> None:
    vm = Vm(vcpu_ids=[0, 255], accelerator=Avic(x2avic=False))
    assert vm.inhibits & Inhibits.PHYSICAL_ID_TOO_BIG
    assert not Vm(vcpu_ids=[0, 511], accelerator="avic").inhibits
    assert Vm(vcpu_ids=[0, 512], accelerator="avic").inhibits & Inhibits.PHYSICAL_ID_TOO_BIG
    assert not Vm(vcpu_ids=[0, 4095], accelerator=Avic(x2avic_4k=True)).inhibits


def test_the_x2apic_icr_is_split_in_the_backing_page__AV_F2() -> None:
    vm = Vm(6, accelerator="avic")
    vm.vcpu(0).wrmsr(0x1B, 0xFEE00000 | 0xD00)
    vm.vcpu(0).wrmsr(MSR_ICR, 0x00000005_000000F0)
    regs = vm.lapic(0).regs
    assert int.from_bytes(regs[0x300:0x304], "little") == 0xF0
    assert int.from_bytes(regs[0x310:0x314], "little") == 5
    assert vm.lapic(0).icr == 0x00000005_000000F0
    assert Vm(1).lapic(0).icr_split is False


def test_every_vcpu_has_a_valid_entry_and_a_broadcast_reaches_one_that_never_ran__AV_G1(
) -> None:
    vm = avic_vm(4)
    vm.vcpu(2).preempt()
    assert avic_of(vm).physical_table[2].valid
    send(vm, 0, 0x80000 | 0x77, dest=0)  # all including self
    assert 0x77 in vm.lapic(2).irr and 0x77 in vm.lapic(0).irr


def test_an_apic_id_change_inhibits_and_leaves_the_entries_alone__AV_G2() -> None:
    vm = avic_vm(4)
    before = [int(avic_of(vm).physical_table[i]) & ~(1 << 62) for i in range(4)]
    mmio_write(vm, 1, REG_ID, 0x05000000)
    assert vm.inhibits & Inhibits.APIC_ID_MODIFIED
    assert not avic_of(vm).active
    assert [int(avic_of(vm).physical_table[i]) & ~(1 << 62) for i in range(4)] == before
    send(vm, 0, 0x45, dest=5)  # now emulated: the MMIO exits of trap-and-emulate
    assert vm.exits[-1].reason is ExitReason.EPT_MISCONFIG
    assert vm.vcpu(1).run() == [0x45]


def test_an_inhibit_switch_puts_and_reloads_the_loaded_vcpus__AV_G3() -> None:
    vm = avic_vm(2)
    assert avic_of(vm).physical_table[1].is_running
    mmio_write(vm, 1, REG_ID, 0x05000000)
    assert not avic_of(vm).active and not avic_of(vm).physical_table[1].is_running
    mmio_write(vm, 1, REG_ID, 0x01000000)  # emulated write puts the ID back
    assert avic_of(vm).active and avic_of(vm).physical_table[1].is_running


def test_snapshot_dump_and_trace_show_the_avic_state__AV_A3() -> None:
    """The AVIC state (tables, shadow entries, doorbells) is part of ``vm.snapshot()``: a
    restore undoes an accelerated IPI; ``dump()`` lists the entries; the trace names KVM's
    tracepoints."""
    import copy

    from hypervisor.trace import KvmAvicDoorbell, KvmAvicIncompleteIpi

    vm = avic_vm(3, trace=True)
    snap = vm.snapshot()
    send(vm, 0, 0x41, dest=1)
    vm.vcpu(2).preempt()
    send(vm, 0, 0x42, dest=2)
    assert vm.snapshot() != snap
    events = vm.tracer.events
    assert any(isinstance(e, KvmAvicDoorbell) for e in events)
    assert any(isinstance(e, KvmAvicIncompleteIpi) and e.cause == 1 for e in events)
    assert "physical[0x1] = 0xc000000100001001" in vm.dump()
    vm.restore(snap)
    assert vm.snapshot() == snap
    assert list(avic_of(vm).doorbells) == [] and 0x41 not in vm.lapic(1).irr
    twin = copy.deepcopy(vm)
    send(twin, 0, 0x43, dest=1)
    assert 0x43 in twin.lapic(1).irr and 0x43 not in vm.lapic(1).irr
    assert list(avic_of(twin).doorbells) == [1]
