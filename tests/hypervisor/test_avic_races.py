"""AVIC rules added with BR-A4, A5, A11, A15, A16, A22 (reference Part M): host-side delivery
against an inhibit and a VM entry in every order (AV-E7), a vCPU loaded but in the host
(AV-E8), the fast path's logical loop (AV-C3), a virtual APIC mode switch (AV-F3), an APIC ID
change (AV-G2), and CR8 write interception across (de)activation (AV-G4).  Each test is the
named killer of its replay (``test_avic_replays.KILLERS``).
"""

from __future__ import annotations

from hypervisor import ExitReason, Host, Inhibits, RunState, Vm
from hypervisor.accel.avic import Avic, AvicState
from hypervisor.host.steps import Steps, explore
from hypervisor.hw.avic import IcrWrite, IpiFailure, backing_page_set_irr
from hypervisor.trace import KvmAvicKickVcpuSlowpath
from hypervisor.vcpu import Vcpu
from lapic.icr import DeliveryMode, Interrupt, interrupt_of_icr

from .builders import ICR_LOGICAL, REG_ICR, REG_ICR2, REG_ID, REG_LDR, REG_SVR, SVR_ON, mmio_write

VECTOR = 0x41


def avic_of(vm: Vm) -> AvicState:
    accel = vm.accel
    assert isinstance(accel, AvicState)
    return accel


def started(n: int, config: Avic | None = None, **kw: object) -> Vm:
    vm = Vm(n, accelerator=config or Avic(), host=Host(n), **kw)  # type: ignore[arg-type]
    for i in range(n):
        mmio_write(vm, i, REG_SVR, SVR_ON)
    vm.host.running = None
    return vm


# =============================================================================================
# AV-E7 / BR-A4: svm_complete_interrupt_delivery against an inhibit and a VM entry
# =============================================================================================
def inhibit_entry_race() -> tuple[Vm, Steps, int]:
    """vCPU 1 is preempted with an inhibit pending for it (vCPU 2's APIC ID write); queued: its
    VM entry (:meth:`AvicState.entry_steps`: apicv update, IRR look, IN_GUEST_MODE), its own
    apicv update, and a host-side delivery of VECTOR to it (``svm_deliver_interrupt``)."""
    vm = started(3)
    vm.vcpu(1).preempt()
    steps = vm.host.steps
    steps.queued = True
    mmio_write(vm, 2, REG_ID, 7 << 24)  # APIC_ID_MODIFIED: AVIC off for the whole VM
    vm.host.running = None
    for t in steps.pending():
        if not t.name.startswith("avic.apicv_update.1#"):
            while not t.done:
                steps.step(t)
    steps.start("enter.vcpu1", avic_of(vm).entry_steps(vm.vcpu(1), 1))
    vm.deliver(Interrupt(VECTOR, DeliveryMode.FIXED, dest=1))
    return vm, steps, vm.stats.kicks


def lost_in_guest(vm: Vm, steps: Steps, kicks: int) -> bool:
    """The target runs in the guest with AVIC off, VECTOR in its IRR, and neither its entry
    saw it nor a KVM_REQ_EVENT kick forces it out: it waits for an unrelated exit."""
    v1 = vm.vcpu(1)
    entry = next(t for t in steps.threads if t.name.startswith("enter.vcpu1#"))
    return (
        v1.run_state is RunState.IN_GUEST
        and not avic_of(vm).vcpu_active(v1)
        and VECTOR in v1.apic.irr
        and entry.result is False
        and vm.stats.kicks == kicks
    )


def test_no_delivery_entry_inhibit_order_strands_the_irq__AV_E7_BR_A4() -> None:
    orders = 0
    for order in explore(lambda: inhibit_entry_race()[1]):
        vm, steps, kicks = inhibit_entry_race()
        steps.replay(order)
        assert not steps.pending()
        assert not lost_in_guest(vm, steps, kicks), order
        steps.queued = False
        assert vm.vcpu(1).run() == [VECTOR], order
        orders += 1
    assert orders > 20


def named_order() -> tuple[Vm, Steps, int]:
    """The delivery's first three steps (``deliver.resolve``, ``deliver.set_irr[1]``, then the
    first step of ``svm_deliver_interrupt``), the target's entry, then the rest in program
    order."""
    vm, steps, kicks = inhibit_entry_race()
    deliver = next(t for t in steps.pending() if t.name.startswith("deliver#"))
    enter = next(t for t in steps.pending() if t.name.startswith("enter.vcpu1#"))
    for _ in range(3):
        steps.step(deliver)
    steps.step(enter)
    steps.run_all()
    return vm, steps, kicks


def test_the_target_entering_between_irr_write_and_mode_read_gets_a_kick__AV_E7() -> None:
    """In the named order the target enters (AVIC off) right after the IRR write: it sees the
    vector at its entry, and KVM, reading IN_GUEST_MODE then apicv_active false, makes
    KVM_REQ_EVENT and kicks it; no doorbell.  (BR-A4's old order reads apicv_active first:
    there the entry comes before the IRR write and the doorbell is ignored.)"""
    vm, steps, kicks = named_order()
    assert not lost_in_guest(vm, steps, kicks)
    assert vm.stats.kicks == kicks + 1 and not avic_of(vm).doorbells


def run_state(v: Vcpu) -> RunState:
    return v.run_state


# =============================================================================================
# AV-E8 / BR-A5: loaded, IsRunning 1, but in the host
# =============================================================================================
def test_loaded_vcpu_in_host_gets_no_doorbell_irq_at_entry__AV_E8_BR_A5() -> None:
    vm = started(2)
    v1 = vm.vcpu(1)
    v1.leave_guest()  # a VM exit KVM handles with vCPU 1 still loaded
    avic = avic_of(vm)
    assert v1.run_state is RunState.IN_HOST and avic.physical_table[1].is_running
    doorbells, kicks = vm.stats.doorbells, vm.stats.kicks
    assert vm.deliver(Interrupt(0x51, DeliveryMode.FIXED, dest=1)) == 1
    assert vm.stats.doorbells == doorbells and vm.stats.kicks == kicks  # picked up at VMRUN
    assert v1.run() == [0x51] and run_state(v1) is RunState.IN_GUEST
    assert avic.physical_table[1].is_running  # re-entered without a put/load
    v1.halt()  # blocked: IsRunning 0, woken exactly once
    wakeups = vm.stats.wakeups
    vm.deliver(Interrupt(0x52, DeliveryMode.FIXED, dest=1))
    assert vm.stats.wakeups == wakeups + 1 and vm.stats.doorbells == doorbells
    assert v1.run() == [0x52]


# =============================================================================================
# AV-C3 / BR-A11: the fast path's logical loop
# =============================================================================================
def logical_five() -> Vm:
    """vCPUs 1..4 with flat logical IDs 0x01, 0x02, 0x04, 0x08 (logical entries 0..3), halted;
    vCPU 0 has 0x10."""
    vm = started(5, trace=True)
    for i in range(5):
        mmio_write(vm, i, REG_LDR, (1 << (i - 1) if i else 0x10) << 24)
    for i in range(1, 5):
        vm.vcpu(i).halt()
    return vm


def slow_paths(vm: Vm) -> int:
    return sum(isinstance(e, KvmAvicKickVcpuSlowpath) for e in vm.tracer.events)


def test_flat_logical_ipi_kicks_four_halted_on_the_fast_path__AV_C3_BR_A11() -> None:
    vm = logical_five()
    mmio_write(vm, 0, REG_ICR2, 0x0F << 24)
    mmio_write(vm, 0, REG_ICR, ICR_LOGICAL | 0x70)
    assert [e.value >> 32 for e in vm.exits if e.reason is ExitReason.AVIC_INCOMPLETE_IPI] == [
        IpiFailure.TARGET_NOT_RUNNING
    ]
    assert [vm.vcpu(i).run_state for i in range(1, 5)] == [RunState.PREEMPTED] * 4
    assert slow_paths(vm) == 0
    assert [vm.vcpu(i).run() for i in range(1, 5)] == [[0x70]] * 4


def test_an_invalid_logical_entry_is_skipped_and_the_others_kicked__AV_C3_BR_A11() -> None:
    """KVM's handler finds logical entry 2 invalid (vCPU 3's LDR changed after the CPU read
    it): the fast path skips that bit and kicks the three others."""
    vm = logical_five()
    avic = avic_of(vm)
    for i in range(1, 5):  # what the CPU did before its TARGET_NOT_RUNNING exit
        backing_page_set_irr(vm.lapic(i), 0x70)
    avic.logical_table[2] = 0
    w = IcrWrite(vm.lapic(0), 0, 0, ICR_LOGICAL | 0x70, 0x0F << 24, False, True, 0xFE)
    irq = interrupt_of_icr(ICR_LOGICAL | 0x70, 0x0F)
    avic.handle_not_running(vm.vcpu(0), w, irq, 0)
    states = [vm.vcpu(i).run_state for i in range(1, 5)]
    assert states == [RunState.PREEMPTED, RunState.PREEMPTED, RunState.BLOCKED, RunState.PREEMPTED]
    assert slow_paths(vm) == 0


# =============================================================================================
# AV-F3 / BR-A15: a virtual APIC mode switch updates the VMCB only
# =============================================================================================
def test_x2apic_switch_updates_vmcb_without_put_or_load__AV_F3_BR_A15() -> None:
    vm = started(2)
    avic = avic_of(vm)
    before = avic.vmcb(0)
    assert not before.x2apic_mode and before.max_index == 0xFE and before.intercept_x2apic_msrs
    writes = avic.entry_writes
    vm.vcpu(0).wrmsr(0x1B, 0xFEE00000 | 0xC00 | 0x100)  # xAPIC -> x2APIC while running
    after = avic.vmcb(0)
    assert after.x2apic_mode and after.avic_enabled and not after.intercept_x2apic_msrs
    assert after.max_index == 0x1FF
    assert avic.entry_writes == writes  # no IsRunning 1 -> 0 -> 1 blip
    assert avic.physical_table[0].is_running
    exits = vm.stats.exits
    vm.vcpu(0).wrmsr(0x830, 1 << 32 | 0x61)  # accelerated: x2APIC MSRs not intercepted
    assert vm.stats.exits == exits and vm.vcpu(1).run() == [0x61]
    writes = avic.entry_writes
    vm.vcpu(0).wrmsr(0x1B, 0)  # disabled: back to intercepted MSRs, still no entry write
    assert avic.vmcb(0).intercept_x2apic_msrs and avic.entry_writes == writes


# =============================================================================================
# AV-G2 / BR-A16: an APIC ID change moves no entry
# =============================================================================================
def test_vcpu1_taking_id_2_leaves_table_2_and_inhibits__AV_G2_BR_A16() -> None:
    vm = started(4)
    avic = avic_of(vm)
    mmio_write(vm, 1, REG_ID, 2 << 24)
    assert vm.inhibits & Inhibits.APIC_ID_MODIFIED and not avic.active
    assert avic.physical_table[2].backing_page == avic.backing_page_of(2)
    assert avic.physical_table[1].valid
    assert avic.physical_table[1].backing_page == avic.backing_page_of(1)


# =============================================================================================
# AV-G4 / BR-A22: CR8 write interception follows (de)activation
# =============================================================================================
def test_cr8_writes_exit_only_while_avic_is_deactivated__AV_G4_BR_A22() -> None:
    vm = started(3)
    avic = avic_of(vm)
    v0 = vm.vcpu(0)
    assert not avic.vmcb(0).intercept_cr8_write
    v0.mov_to_cr8(3)  # V_TPR = the backing page's TPR, no exit
    assert vm.lapic(0).tpr == 0x30 and vm.stats.exits_by_reason[ExitReason.WRITE_CR8] == 0
    mmio_write(vm, 2, REG_ID, 7 << 24)  # inhibit
    assert avic.vmcb(0).intercept_cr8_write and not avic.vmcb(0).avic_enabled
    v0.mov_to_cr8(5)
    assert vm.exits[-1] == (0, ExitReason.WRITE_CR8, 0, 5)
    assert vm.lapic(0).tpr == 0x50 and v0.mov_from_cr8() == 5
    mmio_write(vm, 2, REG_ID, 2 << 24)  # the inhibit lifted
    assert avic.active and not avic.vmcb(0).intercept_cr8_write
    exits = vm.stats.exits
    v0.mov_to_cr8(0)
    assert vm.stats.exits == exits and vm.lapic(0).tpr == 0
