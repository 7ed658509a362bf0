"""The APICv bug replays (BR-V* of reference Part M): each replayable one is killed by a named
check here, which passes on the model and fails with the replay active; the others say why
they cannot be expressed (``apicsim.replays.apicv.ROWS``).

Each check is also a test of its own (``test_..._BR_Vn``), so ``APICSIM_REPLAY=BR-Vn`` and
``apicsim mutants`` find the test that kills the replay by its id.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from apicsim import replays
from apicsim.replays import apicv as replays_apicv
from hypervisor import ExitReason, Host, RunState, Vm
from hypervisor.accel.apicv import ApicvState
from hypervisor.host.steps import Steps, explore
from lapic.faults import ApicValueError

from .accel_props import msi_address, scripted_vm, send_ipi
from .builders import MSR_ICR, REG_ID, mmio_write


def apicv_of(vm: Vm) -> ApicvState:
    accel = vm.accel
    assert isinstance(accel, ApicvState)
    return accel


# =============================================================================================
# The checks, one per replayable bug
# =============================================================================================
def check_br_v1() -> None:
    """BR-V1 (PI-J2): vCPU 1 blocked on pCPU 1, which is where the host runs it
    (``kvm_get_running_vcpu()``): a host-side post (an MSI from IRQ context there) wakes it."""
    vm = scripted_vm("apicv", 2)
    v1 = vm.vcpu(1)
    assert v1.halt()
    vm.host.running = v1
    vm.signal_msi(msi_address(1), 0, 0x61)
    assert vm.stats.wakeups == 1
    assert v1.run_state is not RunState.BLOCKED
    assert v1.run() == [0x61]


def check_br_v2() -> None:
    """BR-V2 (IPIV-5 test 4): ``cli; hlt`` on vCPU 1: SN set, not on the wake-up list; an IPIv
    post leaves it blocked, with no notification."""
    vm = scripted_vm("ipiv", 2)
    acc = apicv_of(vm)
    v1 = vm.vcpu(1)
    v1.guest_if = False
    assert v1.halt()
    p = v1.last_pcpu
    assert p is not None and v1 not in p.wakeup_list
    assert acc.pid(1).sn and acc.pid(1).nv == 0xF2
    send_ipi(vm, 0, 1, 0x42)
    assert v1.run_state is RunState.BLOCKED
    assert not acc.notification_log and vm.stats.wakeups == 0
    assert acc.pid(1).pir == {0x42}


def block_race() -> tuple[Vm, Steps]:
    """vCPU 1 halts (IF=1) while vCPU 0's IPIv write posts 0x41 to it: every step queued."""
    vm = scripted_vm("ipiv", 2)
    steps = vm.host.steps
    steps.queued = True
    vm.vcpu(1).halt()
    send_ipi(vm, 0, 1, 0x41)
    return vm, steps


def check_br_v3() -> None:
    """BR-V3 (IPIV-5 tests 2 and 3): every interleaving of vCPU 1's block path (halt, its
    re-check, joining the wake-up list, NV := 0xF1, the ON test) with an IPIv post to it ends
    with vCPU 1 not asleep on a pending vector, and the vector handled once."""
    orders = 0
    for order in explore(lambda: block_race()[1]):
        vm, steps = block_race()
        steps.replay(order)
        assert not steps.pending()
        steps.queued = False
        v1 = vm.vcpu(1)
        assert not (v1.run_state is RunState.BLOCKED and v1.has_events()), order
        assert v1.run() == [0x41], order
        orders += 1
    assert orders > 5


def check_br_v5() -> None:
    """BR-V5 (PI-J4): vCPU 0 runs with 0x20 requested (RVI 0x20).  Asked from its pCPU whether
    scheduled-out vCPU 1 has an interrupt, KVM answers from the descriptor alone and changes
    nothing (neither vCPU 1's descriptor and IRR nor vCPU 0's RVI): with ON set (plain APICv:
    a post to a vCPU not in guest mode) and with SN set and a PIR bit (IPIv: a post while
    preempted)."""
    for accelerator in ("apicv", "ipiv"):
        vm = scripted_vm(accelerator, 2)
        acc = apicv_of(vm)
        vm.vcpu(1).preempt()
        send_ipi(vm, 0, 1, 0x70)
        mmio_write(vm, 0, 0x80, 0x30)  # TPR 0x30: the self-IPI 0x20 stays requested
        send_ipi(vm, 0, 0, 0x20)
        pid = acc.pid(1)
        assert pid.pir == {0x70} and (pid.on if accelerator == "apicv" else pid.sn)
        before = (pid, vm.lapic(1).irr, acc.guest_interrupt_status(0))
        assert before[2][0] == 0x20
        assert acc.pi_has_pending_interrupt(1)
        assert (acc.pid(1), vm.lapic(1).irr, acc.guest_interrupt_status(0)) == before


def check_br_v6() -> None:
    """BR-V6 (IPIV-6): a new vCPU's descriptor has NV = 0xF2 and SN until its first load, so
    an IPIv post to it before it ever ran notifies nobody; loaded, NDST is its pCPU's."""
    vm = Vm(2, accelerator="ipiv", host=Host(2, apic_ids=[4, 9]))
    acc = apicv_of(vm)
    assert vm.vcpu(1).run_state is RunState.NOT_STARTED
    pid = acc.pid(1)
    assert (pid.nv, pid.sn) == (0xF2, True)
    mmio_write(vm, 0, 0xF0, 0x1FF)
    send_ipi(vm, 0, 1, 0x45)
    assert not acc.notification_log
    assert acc.pid(1).pir == {0x45}
    mmio_write(vm, 1, 0xF0, 0x1FF)  # vCPU 1 starts on pCPU 1 (host APIC ID 9)
    pid = acc.pid(1)
    assert (pid.nv, pid.ndst, pid.sn) == (0xF2, 9, False)
    vm.host.running = vm.vcpu(0)
    send_ipi(vm, 0, 1, 0x46)
    assert acc.notification_log[-1] == (9, 0xF2)
    assert vm.vcpu(1).run() == [0x46, 0x45]


def check_br_v7() -> None:
    """BR-V7 (VID-7): an x2APIC guest under IPIv writes ICR = NMI to vCPU 2 with bit 12 set
    (ignored by x2APIC): an APIC-write exit (qualification 0x300); after KVM's handling vCPU 2
    has the NMI and the u64 at 0x300 has BUSY clear."""
    vm = scripted_vm("ipiv", 3, x2apic=True)
    exits = vm.stats.exits_by_reason[ExitReason.APIC_WRITE]
    vm.vcpu(0).wrmsr(MSR_ICR, 2 << 32 | 0x14F0)
    assert vm.stats.exits_by_reason[ExitReason.APIC_WRITE] == exits + 1
    assert vm.exits[-1].qualification == 0x300
    assert vm.vcpu(2).nmi_pending == 1
    assert vm.lapic(0).icr == 2 << 32 | 0x4F0


MAX_VCPU_IDS = (1, 4, 511, 512, 513, 4096)


def check_br_v8() -> None:
    """BR-V8 (IPIV-2): LAST_PID_POINTER_INDEX = max_vcpu_ids - 1 and the table has room for
    it, for every size around the page boundary."""
    for m in MAX_VCPU_IDS:
        vm = Vm(1, accelerator="ipiv", max_vcpu_ids=m)
        acc = apicv_of(vm)
        assert acc.last_pid_pointer_index == m - 1, m
        assert acc.last_pid_pointer_index < len(acc.pid_table), m
        assert acc.vmcs(0).last_pid_pointer_index == m - 1, m


def check_br_v11() -> None:
    """BR-V11 (PI-J3, IPIV-1): with APICv inhibited (an xAPIC ID change), a device still posts
    0x60 (PIR and ON); KVM's sync at the next entry puts it in the IRR and the guest gets it."""
    vm = scripted_vm("ipiv", 3)
    acc = apicv_of(vm)
    mmio_write(vm, 2, REG_ID, 7 << 24)
    assert not acc.active
    acc.device_post(1, 0x60)
    assert 0x60 in vm.lapic(1).irr
    assert vm.vcpu(1).run() == [0x60]
    vm.vcpu(1).preempt()  # and a bit posted while it was scheduled out
    acc.device_post(1, 0x61)
    vm.vcpu(1).enter()
    assert vm.vcpu(1).run() == [0x61]


def check_br_v12() -> None:
    """BR-V12 (IPIV-5): any put that does not arm the wake-up sets SN: a vCPU halted with
    IF=0 gets no notification for a post; a preempted one neither; the load sets ON."""
    vm = scripted_vm("ipiv", 3)
    acc = apicv_of(vm)
    vm.vcpu(1).guest_if = False
    assert vm.vcpu(1).halt()
    assert acc.pid(1).sn
    send_ipi(vm, 0, 1, 0x42)
    vm.vcpu(2).preempt()
    assert acc.pid(2).sn
    send_ipi(vm, 0, 2, 0x43)
    assert not acc.notification_log
    vm.vcpu(2).enter()
    assert not acc.pid(2).sn
    assert vm.vcpu(2).run() == [0x43]


KILLERS: dict[str, Callable[[], None]] = {
    "BR-V1": check_br_v1,
    "BR-V2": check_br_v2,
    "BR-V3": check_br_v3,
    "BR-V5": check_br_v5,
    "BR-V6": check_br_v6,
    "BR-V7": check_br_v7,
    "BR-V8": check_br_v8,
    "BR-V11": check_br_v11,
    "BR-V12": check_br_v12,
}


# =============================================================================================
# Each check is a test (its name carries the bug id)
# =============================================================================================
def test_a_post_to_the_pcpus_own_blocked_vcpu_wakes_it__BR_V1() -> None:
    check_br_v1()


def test_cli_hlt_is_not_armed_and_not_woken_by_a_post__BR_V2() -> None:
    check_br_v2()


def test_no_interleaving_of_the_block_path_and_a_post_loses_the_wakeup__BR_V3() -> None:
    check_br_v3()


def test_the_pending_check_for_another_vcpu_changes_nothing__BR_V5() -> None:
    check_br_v5()


def test_a_new_vcpus_descriptor_is_not_memset__BR_V6() -> None:
    check_br_v6()


def test_the_x2apic_icr_apic_write_exit_leaves_busy_clear__BR_V7() -> None:
    check_br_v7()


def test_the_last_pid_pointer_index_is_the_highest_id_not_the_count__BR_V8() -> None:
    check_br_v8()


def test_a_device_post_while_inhibited_is_synced_at_entry__BR_V11() -> None:
    check_br_v11()


def test_every_put_that_does_not_arm_the_wakeup_sets_sn__BR_V12() -> None:
    check_br_v12()


# =============================================================================================
# The catalogue
# =============================================================================================
def test_every_br_v_of_part_m_is_catalogued_once_with_a_replay_or_a_reason() -> None:
    ids = [row[0] for row in replays_apicv.ROWS]
    assert ids == [f"BR-V{n}" for n in range(1, 13)]
    for bug, commit, title, what, rules, install, reason in replays_apicv.ROWS:
        assert title and what and rules, bug
        assert (install is None) == bool(reason), bug
        assert commit == "" or re.fullmatch(r"[0-9a-f]{7,12}", commit), bug
    assert sorted(KILLERS) == sorted(r[0] for r in replays_apicv.ROWS if r[5] is not None)
    not_replayable = [r[0] for r in replays_apicv.ROWS if r[5] is None]
    assert not_replayable == ["BR-V4", "BR-V9", "BR-V10"]


def _number(bug: str) -> int:
    return int(bug.removeprefix("BR-V"))


REPLAYABLE: list[str] = sorted(KILLERS.keys(), key=_number)


@pytest.mark.parametrize("bug", REPLAYABLE)
def test_each_replayable_br_v_passes_fixed_and_is_killed_by_its_named_check(bug: str) -> None:
    """The check passes on the model, fails with the replay active, and passes again once the
    replay has restored every object it swapped."""
    check = KILLERS[bug]
    check()
    with pytest.raises((AssertionError, ApicValueError)), replays_apicv.active([bug]):
        check()
    check()


def test_the_catalogue_switch_reaches_the_apicv_replays() -> None:
    """``APICSIM_REPLAY=BR-V1`` and ``apicsim mutants`` find them through the catalogue."""
    assert [r.id for r in replays.APICV_REPLAYS] == [row[0] for row in replays_apicv.ROWS]
    assert replays.parse_ids("br_v2, BR-V12") == ["BR-V2", "BR-V12"]
    check = KILLERS["BR-V2"]
    with pytest.raises(AssertionError), replays.active(["BR-V2"]):
        check()
    check()


def test_unknown_and_unreplayable_ids_are_refused() -> None:
    with pytest.raises(ApicValueError, match="not an APICv replay"), replays_apicv.active(
        ["BR-V99"]
    ):
        pass
    with pytest.raises(ApicValueError, match="BR-V4 is not replayable"), replays_apicv.active(
        ["br_v4"]
    ):
        pass
