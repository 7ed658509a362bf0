"""The AVIC bug replays (BR-A* of reference Part M): each replayable one is killed by a named
test of ``test_avic.py``, or by a check of its own here; the others say why they cannot be
expressed (``apicsim.replays.accel.ROWS``)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from apicsim import replays
from apicsim.replays import accel as replays_accel
from hypervisor import Host, RunState, Vm
from hypervisor.accel.avic import Avic, AvicState
from lapic.faults import ApicValueError

from . import test_avic as ex
from . import test_avic_busy as busy
from . import test_avic_races as races
from .builders import MSR_ICR, REG_DFR, REG_LDR, SVR_ON, mmio_write


def avic_of(vm: Vm) -> AvicState:
    accel = vm.accel
    assert isinstance(accel, AvicState)
    return accel


def x2apic_vm(ids: list[int], config: Avic | None = None) -> Vm:
    vm = Vm(vcpu_ids=ids, accelerator=config or Avic(), host=Host(len(ids)))
    for i in range(len(ids)):
        vm.vcpu(i).wrmsr(0x1B, 0xFEE00000 | 0xC00 | (0x100 if i == 0 else 0))
        vm.vcpu(i).wrmsr(0x80F, SVR_ON)
    return vm


def check_br_a3() -> None:
    """BR-A3: a preempt-notifier load inside the blocking window must not set IsRunning, so
    the next IPI exits with TARGET_NOT_RUNNING and wakes the target."""
    vm = ex.avic_vm(2)
    v1 = vm.vcpu(1)
    p = v1.last_pcpu
    assert p is not None and v1.halt()
    avic_of(vm).vcpu_load(v1, p)  # preempted and rescheduled while blocking
    assert not avic_of(vm).physical_table[1].is_running
    ex.send(vm, 0, 0x61, dest=1)
    assert v1.run_state is RunState.PREEMPTED


def check_br_a10() -> None:
    """BR-A10: an x2APIC sender's physical destination 3 is ICRH itself."""
    vm = x2apic_vm([0, 1, 2, 3])
    vm.vcpu(3).halt()
    vm.vcpu(0).wrmsr(MSR_ICR, 3 << 32 | 0x62)
    assert avic_of(vm).warnings == []
    assert vm.vcpu(3).run_state is RunState.PREEMPTED


def check_br_a19() -> None:
    """BR-A19: a 12-bit index: x2AVIC vCPU 0x1AB is kicked by the fast path, no WARN."""
    vm = x2apic_vm([0, 0x1AB])
    vm.vcpu(1).halt()
    vm.vcpu(0).wrmsr(MSR_ICR, 0x1AB << 32 | 0x63)
    assert avic_of(vm).warnings == []
    assert vm.vcpu(1).run_state is RunState.PREEMPTED


def check_br_a25() -> None:
    """BR-A25: vCPU 0 LDR 0x01 -> bad 0x03; vCPU 1 takes 0x01; vCPU 0's DFR write leaves
    vCPU 1's logical entry valid."""
    vm = ex.avic_vm(2)
    mmio_write(vm, 0, REG_LDR, 0x01000000)
    mmio_write(vm, 0, REG_LDR, 0x03000000)
    mmio_write(vm, 1, REG_LDR, 0x01000000)
    assert int(avic_of(vm).logical_table[0]) == 0x80000001
    mmio_write(vm, 0, REG_DFR, 0x0FFFFFFF)
    assert int(avic_of(vm).logical_table[0]) == 0x80000001


KILLERS: dict[str, Callable[[], None]] = {
    "BR-A3": check_br_a3,
    "BR-A4": races.test_no_delivery_entry_inhibit_order_strands_the_irq__AV_E7_BR_A4,
    "BR-A5": races.test_loaded_vcpu_in_host_gets_no_doorbell_irq_at_entry__AV_E8_BR_A5,
    "BR-A6": ex.test_irr_then_is_running_exit_target_not_running_and_no_second_irr_write__AV_B2,
    "BR-A7": busy.test_busy_left_on_an_invalid_int_type_exit_makes_kvm_rewrite_the_icr_once__AV_B7,
    "BR-A8": ex.test_an_invalid_logical_target_sends_nothing_then_kvm_emulates_the_whole_ipi__AV_B4,
    "BR-A9": ex.test_x2apic_logical_fast_path_kicks_each_bit_of_the_cluster__AV_C3,
    "BR-A10": check_br_a10,
    "BR-A11": races.test_flat_logical_ipi_kicks_four_halted_on_the_fast_path__AV_C3_BR_A11,
    "BR-A15": races.test_x2apic_switch_updates_vmcb_without_put_or_load__AV_F3_BR_A15,
    "BR-A16": races.test_vcpu1_taking_id_2_leaves_table_2_and_inhibits__AV_G2_BR_A16,
    "BR-A17": ex.test_the_x2apic_icr_is_split_in_the_backing_page__AV_F2,
    "BR-A18": ex.test_self_ipi_skips_the_physical_table_even_without_ipiv__AV_B3,
    "BR-A19": check_br_a19,
    "BR-A20": ex.test_max_index_and_table_size_follow_max_vcpu_ids__AV_A5,
    "BR-A21": ex.test_a_too_big_vcpu_id_inhibits_instead_of_failing__AV_F1,
    "BR-A22": races.test_cr8_writes_exit_only_while_avic_is_deactivated__AV_G4_BR_A22,
    "BR-A23": ex.test_shorthand_all_excluding_self_takes_the_slow_path_and_kicks_every_match__AV_C4,
    "BR-A25": check_br_a25,
}


def test_every_br_a_of_part_m_is_catalogued_once_with_a_replay_or_a_reason() -> None:
    ids = [row[0] for row in replays_accel.ROWS]
    assert ids == [f"BR-A{n}" for n in range(1, 26)]
    for bug, commit, title, what, rules, install, reason in replays_accel.ROWS:
        assert title and what and rules, bug
        assert (install is None) == bool(reason), bug
        assert commit == "" or re.fullmatch(r"[0-9a-f]{12}", commit), bug
    assert sorted(KILLERS) == sorted(r[0] for r in replays_accel.ROWS if r[5] is not None)


@pytest.mark.parametrize("bug", sorted(KILLERS))
def test_each_replayable_br_a_passes_fixed_and_is_killed_by_its_named_test(bug: str) -> None:
    """BR-A3, BR-A4, BR-A5, BR-A6, BR-A7, BR-A8, BR-A9, BR-A10, BR-A11, BR-A15, BR-A16, BR-A17,
    BR-A18, BR-A19, BR-A20, BR-A21, BR-A22, BR-A23, BR-A25: the check passes on the model and
    fails with the replay active; the replay restores every object it swapped."""
    check = KILLERS[bug]
    check()
    with pytest.raises((AssertionError, ApicValueError)), replays_accel.active([bug]):
        check()
    check()


def test_the_old_delivery_order_strands_the_interrupt_in_the_named_order__AV_E7_BR_A4() -> None:
    """BR-A4's replay in ``test_avic_races.named_order``: it reads apicv_active (still true)
    before the IRR write, the target enters with AVIC off and nothing pending, then the IRR
    write and the mode read (IN_GUEST_MODE): a doorbell the guest ignores, no KVM_REQ_EVENT."""
    with replays_accel.active(["BR-A4"]):
        vm, steps, kicks = races.named_order()
        assert races.lost_in_guest(vm, steps, kicks)
        assert vm.stats.doorbells == 1 and vm.stats.kicks == kicks
    vm, steps, kicks = races.named_order()
    assert not races.lost_in_guest(vm, steps, kicks)


def test_the_catalogue_switch_reaches_the_avic_replays() -> None:
    """``APICSIM_REPLAY=BR-A6`` and ``apicsim mutants`` find them through the catalogue."""
    assert [r.id for r in replays.ACCEL_REPLAYS] == [row[0] for row in replays_accel.ROWS]
    assert replays.parse_ids("br_a6, BR-A8") == ["BR-A6", "BR-A8"]
    check = KILLERS["BR-A6"]
    with pytest.raises(AssertionError), replays.active(["BR-A6"]):
        check()
    check()


def test_unknown_and_unreplayable_ids_are_refused() -> None:
    with pytest.raises(ApicValueError, match="not an AVIC replay"), replays_accel.active(
        ["BR-A99"]
    ):
        pass
    with pytest.raises(ApicValueError, match="BR-A1 is not replayable"), replays_accel.active(
        ["br_a1"]
    ):
        pass
