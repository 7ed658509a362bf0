"""KVM_HC_SEND_IPI and the hypercall dispatcher (reference ``kvm_lapic.md`` §12, PVH-0..14;
BUG-2, BUG-3) and KVM_HC_KICK_CPU.

Every hypercall is made by the guest: ``vm.vcpu(i).hypercall(nr, a0, a1, a2, a3)`` returns RAX
as the guest reads it afterwards (the u64 image in 64-bit mode, the u32 image otherwise).  The
default topology is the reference's: 4 vCPUs, xAPIC IDs 0..3, all software-enabled, map present,
max_apic_id 255, 64-bit guest.
"""

from __future__ import annotations

import pytest

from hypervisor import MpState, RunState, Vm
from hypervisor.pv_ipi import (
    KVM_FEATURE_PV_SEND_IPI,
    KVM_FEATURE_PV_UNHALT,
    KVM_HC_KICK_CPU,
    KVM_HC_SEND_IPI,
    KVM_HC_VAPIC_POLL_IRQ,
)

from .builders import holders, set_xapic_id, sw_enable, xapic_vm

U64 = (1 << 64) - 1
U32 = 0xFFFFFFFF
HC = KVM_HC_SEND_IPI


def rax64(ret: int) -> int:
    return ret & U64


def rax32(ret: int) -> int:
    return ret & U32


def send(vm: Vm, a0: int, a1: int, a2: int, a3: int, *, long_mode: bool = True) -> int:
    return vm.vcpu(0).hypercall(HC, a0, a1, a2, a3, long_mode=long_mode)


@pytest.fixture
def vm() -> Vm:
    return xapic_vm(4)


# ---------------------------------------------------------------------------------------------
# PVH-0 / HC-1: dispatch
# ---------------------------------------------------------------------------------------------
def test_errors_are_sign_extended_in_64_bit_mode_and_truncated_otherwise__PVH_0(vm: Vm) -> None:
    """PVH-0: -22 reads 0xFFFFFFFFFFFFFFEA in a 64-bit guest and 0xFFFFFFEA in a 32-bit one."""
    assert send(vm, 1, 0, 0, 0x8F1) == 0xFFFFFFFFFFFFFFEA
    assert send(vm, 1, 0, 0, 0x8F1, long_mode=False) == 0xFFFFFFEA


def test_arguments_are_truncated_to_32_bits_outside_64_bit_mode__PVH_0(vm: Vm) -> None:
    """PVH-0 / HC-1: outside 64-bit mode nr and a0..a3 lose bits 63:32: nr 0x1_0000000A is
    SEND_IPI, a0's high half is ignored, a3 = 0x1_000000F1 is icr 0xF1."""
    high = 1 << 32
    assert send(vm, 0b1 | high, 0, high, 0xF1 | high, long_mode=False) == 1
    assert holders(vm, 0xF1) == [0]
    r = vm.vcpu(0).hypercall(HC | high, 0b10, 0, 0, 0xF2, long_mode=False)
    assert r == 1 and holders(vm, 0xF2) == [1]
    assert vm.vcpu(0).hypercall(HC | high, 0b10, 0, 0, 0xF3) == rax64(-1000)


def test_a_hypercall_from_user_mode_is_refused__HC_1(vm: Vm) -> None:
    """HC-1: CPL != 0 -> -KVM_EPERM (-1), before the number is even looked at."""
    assert vm.vcpu(0).hypercall(HC, 1, 0, 0, 0xF1, cpl=3) == 0xFFFFFFFFFFFFFFFF
    assert vm.vcpu(0).hypercall(HC, 1, 0, 0, 0xF1, cpl=3, long_mode=False) == 0xFFFFFFFF
    assert vm.vcpu(0).hypercall(0x7777, cpl=1) == rax64(-1)
    assert holders(vm, 0xF1) == []


def test_an_unknown_hypercall_is_enosys__HC_1(vm: Vm) -> None:
    """HC-1: default -KVM_ENOSYS (-1000): 0xFFFFFFFFFFFFFC18 (64-bit), 0xFFFFFC18 (32-bit)."""
    assert vm.vcpu(0).hypercall(0x7777) == 0xFFFFFFFFFFFFFC18
    assert vm.vcpu(0).hypercall(0x7777, long_mode=False) == 0xFFFFFC18


def test_vapic_poll_irq_returns_0__HC_1(vm: Vm) -> None:
    assert vm.vcpu(0).hypercall(KVM_HC_VAPIC_POLL_IRQ) == 0


def test_send_ipi_is_gated_by_its_cpuid_bit_only_when_enforced__HC_1() -> None:
    """HC-1 / BUG-7: KVM_CAP_ENFORCE_PV_FEATURE_CPUID off -> allowed whatever pv_features say;
    on -> allowed iff KVM_FEATURE_PV_SEND_IPI is set, else -KVM_ENOSYS."""
    cases = (
        (False, (), 1),
        (True, (KVM_FEATURE_PV_SEND_IPI,), 1),
        (True, (KVM_FEATURE_PV_UNHALT,), -1000),
    )
    for enforce, features, expected in cases:
        vm = Vm(2, enforce_pv_cpuid=enforce, pv_features=features)
        sw_enable(vm, 1)
        assert vm.vcpu(0).hypercall(HC, 0b10, 0, 0, 0xF4) == rax64(expected), (enforce, features)
        assert holders(vm, 0xF4) == ([1] if expected == 1 else [])


def test_kick_cpu_is_gated_by_pv_unhalt_when_enforced__HC_1() -> None:
    vm = Vm(2, enforce_pv_cpuid=True, pv_features=(KVM_FEATURE_PV_SEND_IPI,))
    assert vm.vcpu(0).hypercall(KVM_HC_KICK_CPU, 0, 1) == rax64(-1000)
    assert not vm.lapic(1).pv_unhalted


# ---------------------------------------------------------------------------------------------
# PVH-1 .. PVH-14
# ---------------------------------------------------------------------------------------------
def test_bitmap_bits_name_apic_ids_from_min__PVH_1(vm: Vm) -> None:
    """PVH-1: icr=0xF1, a0=0b1011, a1=0, a2=0 -> APICs 0,1,3 get 0xF1; returns 3."""
    assert send(vm, 0b1011, 0, 0, 0xF1) == 3
    assert holders(vm, 0xF1) == [0, 1, 3]


def test_absent_apic_ids_are_skipped__PVH_2(vm: Vm) -> None:
    """PVH-2 / BUG-2: a0=1, a1=1, a2=0 -> APIC 0 (APIC 64 absent); returns 1."""
    assert send(vm, 1, 1, 0, 0xF1) == 1
    assert holders(vm, 0xF1) == [0]


def test_the_high_half_starts_64_ids_after_min__PVH_2(vm: Vm) -> None:
    """PVH-2 made decisive: with an APIC at ID 64, a1 bit 0 reaches it."""
    set_xapic_id(vm, 3, 64)
    assert send(vm, 1, 1, 0, 0xF1) == 2
    assert holders(vm, 0xF1) == [0, 3]


def test_min_shifts_the_window__PVH_3(vm: Vm) -> None:
    """PVH-3: a0=0b11, a2=2 -> APICs 2,3; returns 2."""
    assert send(vm, 0b11, 0, 2, 0xF1) == 2
    assert holders(vm, 0xF1) == [2, 3]


@pytest.mark.parametrize("icr", [0x8F1, 0x400F1, 0xC00F1, 0x800F1])
def test_logical_mode_and_shorthands_are_invalid__PVH_4(vm: Vm, icr: int) -> None:
    """PVH-4: icr with logical mode or any shorthand -> -22 (nothing delivered)."""
    assert send(vm, 0b1111, 0, 0, icr) == rax64(-22)
    assert holders(vm, 0xF1) == []


def test_a_window_above_max_apic_id_delivers_nothing__PVH_5(vm: Vm) -> None:
    """PVH-5: a2=256 -> 0 (both halves out of range)."""
    assert send(vm, U64, U64, 256, 0xF1) == 0


def test_a_guest_controlled_min_cannot_index_out_of_bounds__PVH_6(vm: Vm) -> None:
    """PVH-6 / BUG-2 (bdf7ffc89922, kvm-unit-tests test_pv_ipi): a0=0xFFFFFFFF, a1=0,
    a2=0xFFFFFFFF, a3=0 -> returns 0, no fault."""
    assert send(vm, 0xFFFFFFFF, 0, 0xFFFFFFFF, 0) == 0
    assert all(not vm.lapic(i).irr for i in range(4))


def test_the_loop_stops_at_max_apic_id__PVH_7(vm: Vm) -> None:
    """PVH-7: a2=250, a0 = 1<<10 -> loop bound min(64, 6) = 6 -> bit 10 ignored -> 0; an APIC
    inside the bound (ID 250, bit 0) is still reached."""
    assert send(vm, 1 << 10, 0, 250, 0xF1) == 0
    set_xapic_id(vm, 3, 250)
    assert send(vm, 1 | 1 << 10, 0, 250, 0xF2) == 1
    assert holders(vm, 0xF2) == [3]


def test_a_32_bit_guest_has_32_bit_halves__PVH_8(vm: Vm) -> None:
    """PVH-8: 32-bit mode: a0=1, a1=1, a2=0 -> APIC 0 and APIC 32 (absent) -> 1; with an APIC
    at ID 32 it is reached (BUG-4: the 32-bit layout is honoured)."""
    assert send(vm, 1, 1, 0, 0xF1, long_mode=False) == 1
    set_xapic_id(vm, 3, 32)
    assert send(vm, 1, 1, 0, 0xF2, long_mode=False) == 2
    assert holders(vm, 0xF2) == [0, 3]
    assert send(vm, 1, 1, 0, 0xF3) == 1


def test_nmi_ignores_software_disable_but_fixed_does_not__PVH_9(vm: Vm) -> None:
    """PVH-9: icr=0x400 (NMI) to a software-disabled target -> counted (1); icr=0xF1 -> 0."""
    sw_enable(vm, 2, on=False)
    assert send(vm, 0b100, 0, 0, 0x400) == 1
    assert vm.lapic(2).nmi_pending == 1
    assert send(vm, 0b100, 0, 0, 0xF1) == 0


def test_level_triggered_without_assert_is_dropped__PVH_10(vm: Vm) -> None:
    """PVH-10: icr=0x80F1 (level trigger, no assert) -> FIXED dropped -> 0."""
    assert send(vm, 0b1, 0, 0, 0x80F1) == 0
    assert holders(vm, 0xF1) == []


def test_reserved_icr_bits_are_ignored__PVH_11(vm: Vm) -> None:
    """PVH-11: icr=0x1000F1 (bit 20 set) -> accepted as fixed 0xF1."""
    assert send(vm, 0b1, 0, 0, 0x1000F1) == 1
    assert holders(vm, 0xF1) == [0]


def test_without_a_map_the_hypercall_is_not_supported__PVH_12() -> None:
    """PVH-12 / BUG-3 (CVE-2018-19406): map NULL (two xAPIC vCPUs aliased to ID 0, MAP-2)
    -> -EOPNOTSUPP (-95)."""
    vm = xapic_vm(2)
    set_xapic_id(vm, 1, 0)
    assert vm.apic_map is None
    assert send(vm, 1, 0, 0, 0xF1) == rax64(-95)
    assert send(vm, 1, 0, 0, 0xF1, long_mode=False) == rax32(-95)
    assert holders(vm, 0xF1) == []


def test_invalid_icr_is_reported_before_a_missing_map__PVH_12() -> None:
    """``kvm_pv_send_ipi`` checks the ICR before it reads the map: -22 wins over -95."""
    vm = xapic_vm(2)
    set_xapic_id(vm, 1, 0)
    assert send(vm, 1, 0, 0, 0x8F1) == rax64(-22)


def test_min_wraps_around_in_u32_between_the_halves__PVH_13() -> None:
    """PVH-13 (code-derived): 64-bit, a2=0xFFFFFFFF, a1=1, vCPU with APIC ID 63 present ->
    low part 0; min wraps to 63; high bit 0 -> APIC 63 -> returns 1."""
    vm = Vm(vcpu_ids=[0, 63])
    sw_enable(vm, 1)
    assert send(vm, 0, 1, 0xFFFFFFFF, 0xF1) == 1
    assert holders(vm, 0xF1) == [1]


def test_min_is_a_u32_parameter_even_in_64_bit_mode__PVH_13(vm: Vm) -> None:
    """``kvm_pv_send_ipi(..., u32 min, ...)``: a2 = 2**32 + 2 is min 2 (code-derived)."""
    assert send(vm, 0b1, 0, (1 << 32) + 2, 0xF1) == 1
    assert holders(vm, 0xF1) == [2]


def test_a_startup_ipi_leaves_its_vector_pending__PVH_14(vm: Vm) -> None:
    """PVH-14: icr=0x69A (STARTUP vector 0x9A) to APIC 1 -> SIPI pending with vector 0x9A,
    returns 1."""
    assert send(vm, 0b10, 0, 0, 0x69A) == 1
    assert vm.lapic(1).sipi_pending
    assert vm.lapic(1).sipi_vector == 0x9A


def test_pv_lowest_priority_reaches_every_named_target__LP_4(vm: Vm) -> None:
    """LP-4: icr=0x1F1 (LOWEST) to APICs 0 and 1 -> both accept (2), each bumps arb_prio."""
    assert send(vm, 0b11, 0, 0, 0x1F1) == 2
    assert holders(vm, 0xF1) == [0, 1]
    assert [vm.lapic(i).arb_prio for i in range(4)] == [1, 1, 0, 0]


def test_pv_ipi_to_the_sender_itself_is_delivered__PVH_1(vm: Vm) -> None:
    assert vm.vcpu(2).hypercall(HC, 0b100, 0, 0, 0xF5) == 1
    assert holders(vm, 0xF5) == [2]


def test_the_hypercall_counts_as_one_vmcall_exit__PVH_0(vm: Vm) -> None:
    before = vm.stats.exits
    send(vm, 0b1111, 0, 0, 0xF1)
    assert vm.stats.exits == before + 1
    assert vm.stats.hypercalls >= 1 and vm.stats.pv_ipi_calls >= 1


# ---------------------------------------------------------------------------------------------
# KVM_HC_KICK_CPU
# ---------------------------------------------------------------------------------------------
def test_kick_cpu_unhalts_a_halted_vcpu__HC_1() -> None:
    """KVM_HC_KICK_CPU (a1 = APIC ID): a remote-read-mode message that sets pv_unhalted on the
    target; a halted target becomes runnable again.  Returns 0."""
    vm = xapic_vm(2)
    assert vm.vcpu(1).halt()
    assert vm.vcpu(1).mp_state is MpState.HALTED
    assert vm.vcpu(0).hypercall(KVM_HC_KICK_CPU, 0, 1) == 0
    assert vm.lapic(1).pv_unhalted
    assert vm.vcpu(1).mp_state is MpState.RUNNABLE
    assert vm.vcpu(1).run_state is not RunState.BLOCKED
    assert vm.stats.wakeups == 1
    vm.vcpu(1).run()
    assert not vm.lapic(1).pv_unhalted


def test_kick_cpu_sets_pv_unhalted_on_a_running_target__HC_1() -> None:
    vm = xapic_vm(3)
    assert vm.vcpu(0).hypercall(KVM_HC_KICK_CPU, 0, 2) == 0
    assert [vm.lapic(i).pv_unhalted for i in range(3)] == [False, False, True]


def test_a_kick_that_arrives_before_hlt_is_not_lost__WAKE_1() -> None:
    """WAKE-1 / HC-1: the PV spinlock race: vCPU0 kicks vCPU1 just before vCPU1 executes HLT.
    The pending PV unhalt makes the HLT return at once (KVM ``kvm_arch_vcpu_runnable``)."""
    vm = xapic_vm(2)
    assert vm.vcpu(0).hypercall(KVM_HC_KICK_CPU, 0, 1) == 0
    assert vm.vcpu(1).halt() is False
    assert vm.vcpu(1).mp_state is MpState.RUNNABLE
