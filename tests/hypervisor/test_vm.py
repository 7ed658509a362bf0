"""The VM as a whole: exits, wake-ups, the host ioctls, VM options, tracing, INIT/SIPI.

Rules: EXIT-1, WAKE-1, MSI-1, STATE-5 (``specs/hypervisor.md``), with STATE-2..4, BASE-5/6 and
BUG-17/23 seen through the host API, and PVH-14 for the SIPI path.
"""

from __future__ import annotations

import re

import pytest

from hypervisor import Exit, ExitReason, MpState, RunState, Vcpu, Vm
from hypervisor.pv_ipi import KVM_HC_SEND_IPI
from hypervisor.trace import KvmApicAcceptIrq, KvmApicIpi, KvmExit, KvmHypercall, KvmMsiSetIrq
from lapic import GuestFault, StateError
from lapic.faults import GP_VECTOR
from lapic.registers import APIC_BASE_MSR

from .builders import (
    APIC_PAGE,
    ICR_ASSERT,
    ICR_INIT,
    ICR_LEVEL,
    ICR_NMI,
    ICR_STARTUP,
    MSR_ICR,
    MSR_SVR,
    MSR_TPR,
    REG_ICR,
    REG_ICR2,
    REG_ID,
    REG_LDR,
    REG_SVR,
    REG_TPR,
    guest_x2apic,
    holders,
    host_apic_base,
    mmio_read,
    mmio_write,
    send_ipi,
    sw_enable,
    x2apic_vm,
    xapic_vm,
)

EPT = ExitReason.EPT_MISCONFIG


def u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")


def with_u32(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    out[offset : offset + 4] = value.to_bytes(4, "little")
    return bytes(out)


# =============================================================================================
# EXIT-1
# =============================================================================================
def test_each_xapic_mmio_access_is_one_ept_misconfig_exit__EXIT_1() -> None:
    """EXIT-1: qualification = guest-physical address, value = data written (0 for reads)."""
    vm = Vm(2)
    vm.vcpu(1).mmio_read(APIC_PAGE + 0x30)
    vm.vcpu(1).mmio_write(APIC_PAGE + REG_TPR, 0x20)
    assert vm.exits == [
        Exit(1, EPT, APIC_PAGE + 0x30, 0),
        Exit(1, EPT, APIC_PAGE + REG_TPR, 0x20),
    ]
    assert vm.stats.exits == 2
    assert vm.stats.exits_by_reason[EPT] == 2
    assert (vm.vcpu(0).exits, vm.vcpu(1).exits) == (0, 2)


def test_each_apic_msr_access_is_one_msr_exit__EXIT_1() -> None:
    """EXIT-1: RDMSR -> reason 31 with the MSR index; WRMSR -> reason 32 with index and data."""
    vm = Vm(1)
    base = vm.vcpu(0).rdmsr(APIC_BASE_MSR)
    vm.vcpu(0).wrmsr(APIC_BASE_MSR, base | 0x400)
    vm.vcpu(0).wrmsr(MSR_TPR, 0x10)
    assert vm.vcpu(0).rdmsr(MSR_TPR) == 0x10
    assert vm.exits == [
        Exit(0, ExitReason.MSR_READ, APIC_BASE_MSR, 0),
        Exit(0, ExitReason.MSR_WRITE, APIC_BASE_MSR, base | 0x400),
        Exit(0, ExitReason.MSR_WRITE, MSR_TPR, 0x10),
        Exit(0, ExitReason.MSR_READ, MSR_TPR, 0),
    ]
    assert int(ExitReason.MSR_READ) == 31 and int(ExitReason.MSR_WRITE) == 32


def test_a_faulting_access_still_exits_once__EXIT_1() -> None:
    """EXIT-1: RDMSR 0x808 in xAPIC mode exits, then KVM injects #GP (MSR-1)."""
    vm = Vm(1)
    with pytest.raises(GuestFault) as fault:
        vm.vcpu(0).rdmsr(MSR_TPR)
    assert fault.value.vector == GP_VECTOR
    assert vm.exits == [Exit(0, ExitReason.MSR_READ, MSR_TPR, 0)]


def test_a_hypercall_is_one_vmcall_exit_and_hlt_one_hlt_exit__EXIT_1() -> None:
    vm = Vm(2)
    vm.vcpu(0).hypercall(KVM_HC_SEND_IPI, 0b10, 0, 0, 0xF1)
    vm.vcpu(1).halt()
    assert vm.exits == [
        Exit(0, ExitReason.VMCALL, KVM_HC_SEND_IPI, 0),
        Exit(1, ExitReason.HLT, 0, 0),
    ]
    assert int(ExitReason.VMCALL) == 18 and int(ExitReason.HLT) == 12


def test_an_x2apic_ipi_costs_one_exit_and_an_xapic_ipi_two__EXIT_1() -> None:
    """EXIT-1: one ICR WRMSR in x2APIC mode; ICR2 + ICR MMIO writes in xAPIC mode (the
    receiving vCPU takes no exit)."""
    vm = x2apic_vm([0, 1])
    before = vm.stats.exits
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    assert vm.stats.exits == before + 1
    assert vm.exits[-1] == Exit(0, ExitReason.MSR_WRITE, MSR_ICR, (1 << 32) | ICR_ASSERT | 0x41)

    vm = xapic_vm(2)
    before = vm.stats.exits
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    assert vm.stats.exits == before + 2
    assert vm.exits[-2:] == [
        Exit(0, EPT, APIC_PAGE + REG_ICR2, 1 << 24),
        Exit(0, EPT, APIC_PAGE + REG_ICR, ICR_ASSERT | 0x41),
    ]
    assert holders(vm, 0x41) == [1]


def test_the_exit_log_keeps_only_the_latest_exits_but_the_counters_see_all__EXIT_1() -> None:
    vm = Vm(1, exit_log=3)
    for value in range(5):
        vm.vcpu(0).mmio_write(APIC_PAGE + REG_TPR, value)
    assert [e.value for e in vm.exits] == [2, 3, 4]
    assert vm.stats.exits == 5

    vm = Vm(1, exit_log=0)
    vm.vcpu(0).mmio_read(APIC_PAGE + REG_ID)
    assert vm.exits == []
    assert vm.stats.exits == 1 and vm.vcpu(0).exits == 1


# =============================================================================================
# WAKE-1
# =============================================================================================
def _halted(vm: Vm, i: int) -> bool:
    return vm.vcpu(i).mp_state is MpState.HALTED and vm.vcpu(i).run_state is RunState.BLOCKED


def test_a_deliverable_interrupt_wakes_a_halted_vcpu__WAKE_1() -> None:
    vm = xapic_vm(2)
    assert vm.vcpu(1).halt() is True
    assert _halted(vm, 1)
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    assert not _halted(vm, 1)
    assert vm.vcpu(1).mp_state is MpState.RUNNABLE
    assert vm.stats.wakeups == 1
    assert vm.vcpu(1).run() == [0x41]


def test_an_interrupt_below_ppr_does_not_wake_a_halted_vcpu__WAKE_1() -> None:
    """WAKE-1: TPR 0x50, vector 0x41 is accepted into IRR but not deliverable (class 4 <= 5):
    the vCPU stays halted; vector 0x61 then wakes it and only 0x61 is handled."""
    vm = xapic_vm(2)
    mmio_write(vm, 1, REG_TPR, 0x50)
    assert vm.vcpu(1).halt()
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    assert 0x41 in vm.lapic(1).irr
    assert _halted(vm, 1)
    assert vm.stats.wakeups == 0
    assert vm.vcpu(1).run() == []
    send_ipi(vm, 0, ICR_ASSERT | 0x61, 1)
    assert not _halted(vm, 1)
    assert vm.vcpu(1).run() == [0x61]
    assert 0x41 in vm.lapic(1).irr


def test_a_software_disabled_vcpu_is_not_woken_by_a_fixed_ipi_but_is_by_nmi__WAKE_1() -> None:
    vm = xapic_vm(2)
    sw_enable(vm, 1, on=False)
    assert vm.vcpu(1).halt()
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    assert _halted(vm, 1)
    send_ipi(vm, 0, ICR_ASSERT | ICR_NMI, 1)
    assert not _halted(vm, 1)
    assert vm.vcpu(1).run() == [2]


def test_hlt_with_a_deliverable_interrupt_pending_does_not_block__WAKE_1() -> None:
    vm = xapic_vm(2)
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    assert vm.vcpu(1).halt() is False
    assert not _halted(vm, 1)


def test_init_wakes_a_halted_application_processor__WAKE_1() -> None:
    vm = xapic_vm(2)
    assert vm.vcpu(1).halt()
    send_ipi(vm, 0, ICR_ASSERT | ICR_INIT, 1)
    assert not _halted(vm, 1)
    vm.vcpu(1).run()
    assert vm.vcpu(1).mp_state is MpState.INIT_RECEIVED


# =============================================================================================
# INIT / SIPI
# =============================================================================================
def test_init_then_sipi_starts_an_application_processor__PVH_14() -> None:
    """INIT via ICR to an AP, then SIPI vector 0x9A -> after run(): RUNNABLE, entry 0x9A000."""
    vm = xapic_vm(2)
    send_ipi(vm, 0, ICR_ASSERT | ICR_INIT, 1)
    send_ipi(vm, 0, ICR_ASSERT | ICR_STARTUP | 0x9A, 1)
    vm.vcpu(1).run()
    assert vm.vcpu(1).mp_state is MpState.RUNNABLE
    assert vm.vcpu(1).sipi_entry == 0x9A000


def test_the_linux_wakeup_sequence_starts_an_application_processor__PVH_14() -> None:
    """INIT assert (level), INIT de-assert (ignored by KVM), SIPI twice, as Linux sends them;
    the AP is run between the steps."""
    vm = xapic_vm(2)
    send_ipi(vm, 0, ICR_LEVEL | ICR_ASSERT | ICR_INIT, 1)
    vm.vcpu(1).run()
    assert vm.vcpu(1).mp_state is MpState.INIT_RECEIVED
    send_ipi(vm, 0, ICR_LEVEL | ICR_INIT, 1)
    assert not vm.lapic(1).init_pending
    for _ in range(2):
        send_ipi(vm, 0, ICR_STARTUP | 0x9A, 1)
        vm.vcpu(1).run()
    assert vm.vcpu(1).mp_state is MpState.RUNNABLE
    assert vm.vcpu(1).sipi_entry == 0x9A000


def test_a_sipi_without_init_is_ignored__PVH_14() -> None:
    vm = xapic_vm(2)
    send_ipi(vm, 0, ICR_STARTUP | 0x9A, 1)
    vm.vcpu(1).run()
    assert vm.vcpu(1).mp_state is MpState.RUNNABLE
    assert vm.vcpu(1).sipi_entry is None


def test_init_and_sipi_through_the_pv_ipi_hypercall__PVH_14() -> None:
    """PVH-14: icr=0x69A to APIC 1 leaves SIPI 0x9A pending (returns 1); after an INIT the AP
    starts at 0x9A000."""
    vm = Vm(2, aps_started=False)
    vm.set_lapic(1, vm.get_lapic(1))  # KVMB-8: as a VMM does after creating its vCPUs
    assert vm.vcpu(1).mp_state is MpState.UNINITIALIZED
    assert vm.vcpu(0).hypercall(KVM_HC_SEND_IPI, 0b10, 0, 0, 0x500) == 1
    assert vm.vcpu(0).hypercall(KVM_HC_SEND_IPI, 0b10, 0, 0, 0x69A) == 1
    assert vm.lapic(1).sipi_vector == 0x9A
    vm.vcpu(1).run()
    assert vm.vcpu(1).mp_state is MpState.RUNNABLE
    assert vm.vcpu(1).sipi_entry == 0x9A000


def test_init_to_the_bsp_leaves_it_runnable__PVH_14() -> None:
    vm = xapic_vm(2)
    send_ipi(vm, 1, ICR_ASSERT | ICR_INIT, 0)
    vm.vcpu(0).run()
    assert vm.vcpu(0).mp_state is MpState.RUNNABLE
    assert vm.lapic(0).svr == 0xFF


# =============================================================================================
# MSI-1
# =============================================================================================
def _msi_lo(dest: int) -> int:
    return APIC_PAGE | dest << 12


def test_signal_msi_returns_the_number_of_accepting_apics__MSI_1() -> None:
    vm = xapic_vm(3)
    assert vm.signal_msi(_msi_lo(1), 0, 0x41) == 1
    assert vm.signal_msi(_msi_lo(0xFF), 0, 0x42) == 3
    assert vm.signal_msi(_msi_lo(0x30), 0, 0x43) == 0
    assert holders(vm, 0x41) == [1] and holders(vm, 0x42) == [0, 1, 2]


@pytest.mark.parametrize("flags", [2, 3, 0x80000000, 0xFFFFFFFF])
def test_flags_other_than_valid_devid_are_einval__MSI_1(flags: int) -> None:
    vm = xapic_vm(2)
    assert vm.signal_msi(_msi_lo(1), 0, 0x41, flags) == -22
    assert holders(vm, 0x41) == []


def test_the_valid_devid_flag_is_accepted__MSI_1() -> None:
    vm = xapic_vm(2)
    assert vm.signal_msi(_msi_lo(1), 0, 0x41, 1) == 1


def test_x2apic_format_rejects_address_hi_bits_7_0__MSI_1() -> None:
    """MSI-1 (``kvm_msi_route_invalid``): with x2apic_format, address_hi & 0xFF -> -EINVAL;
    without it address_hi is not part of the destination and anything goes."""
    vm = xapic_vm(2, x2apic_format=True)
    assert vm.signal_msi(_msi_lo(1), 0x01, 0x41) == -22
    assert vm.signal_msi(_msi_lo(1), 0x80, 0x41) == -22
    assert holders(vm, 0x41) == []
    vm = xapic_vm(2)
    assert vm.signal_msi(_msi_lo(1), 0xFF, 0x41) == 1


# =============================================================================================
# STATE-5: x2apic_format and the broadcast quirk
# =============================================================================================
def test_x2apic_format_msis_carry_a_32_bit_destination__STATE_5() -> None:
    """STATE-5: with USE_32BIT_IDS, address_hi bits 31:8 are destination bits 31:8: an MSI with
    address_hi 0x100 and dest 0x23 reaches x2APIC vCPU 0x123; without it the same MSI is for
    ID 0x23 (empty slot, result 0)."""
    vm = x2apic_vm([0, 0x123], x2apic_format=True)
    assert vm.signal_msi(_msi_lo(0x23), 0x100, 0x41) == 1
    assert holders(vm, 0x41) == [1]
    vm = x2apic_vm([0, 0x123])
    assert vm.signal_msi(_msi_lo(0x23), 0x100, 0x41) == 0


def test_vm_options_default_to_kvm_and_follow_the_profile__STATE_5() -> None:
    """STATE-5: x2apic_format defaults off; broadcast_quirk defaults to the profile's (kvm on,
    sdm off); an explicit option wins."""
    assert Vm(1).x2apic_format is False
    assert Vm(1).broadcast_quirk is True
    assert Vm(1, "sdm").broadcast_quirk is False
    assert Vm(1, broadcast_quirk=False).broadcast_quirk is False


def test_disabling_the_broadcast_quirk_stops_0xff_reaching_x2apic_targets__STATE_5() -> None:
    """STATE-5 / MATCH-1: physical MSI to 0xFF, x2APIC vCPUs 0..2: quirk on -> 3; off -> 0."""
    assert x2apic_vm([0, 1, 2]).signal_msi(_msi_lo(0xFF), 0, 0x41) == 3
    vm = x2apic_vm([0, 1, 2], broadcast_quirk=False)
    assert vm.signal_msi(_msi_lo(0xFF), 0, 0x41) == 0
    assert holders(vm, 0x41) == []


def test_get_lapic_reports_the_x2apic_id_in_the_chosen_format__STATE_5() -> None:
    """STATE-5 / STATE-3: x2APIC vCPU 0x123: default image ID = 0x123 << 24 (u32) =
    0x23000000; x2apic_format image ID = 0x123.  xAPIC vCPU 3: byte 0x23 = 3 (STATE-1)."""
    assert u32(x2apic_vm([0, 0x123]).get_lapic(1), REG_ID) == 0x23000000
    assert u32(x2apic_vm([0, 0x123], x2apic_format=True).get_lapic(1), REG_ID) == 0x123
    assert xapic_vm(4).get_lapic(3)[0x23] == 3


def test_set_lapic_refuses_a_foreign_x2apic_id_under_x2apic_format__STATE_5() -> None:
    """STATE-5 / STATE-3 / STATE-4: KVM_SET_LAPIC with ID != vcpu_id -> EINVAL (StateError
    errno 22), after SVR was already applied; the matching ID is accepted."""
    vm = x2apic_vm([0, 5], x2apic_format=True)
    image = vm.get_lapic(1)
    bad = with_u32(with_u32(image, REG_ID, 6), REG_SVR, 0xFF)
    with pytest.raises(StateError) as err:
        vm.set_lapic(1, bad)
    assert err.value.errno == 22
    assert vm.lapic(1).svr == 0xFF
    vm.set_lapic(1, with_u32(image, REG_TPR, 0x30))
    assert vm.vcpu(1).rdmsr(MSR_TPR) == 0x30
    assert vm.vcpu(1).rdmsr(MSR_SVR) == 0x1FF


def test_set_lapic_ignores_the_x2apic_id_and_ldr_by_default__STATE_5() -> None:
    """STATE-3 / BUG-17 (selftest test_x2apic_id): SET ID = i<<24 -> GET always vcpu_id<<24;
    the LDR is re-derived from the vCPU id."""
    vm = x2apic_vm([0, 5])
    for i in (0, 5, 6, 0x7F, 0xFF):
        image = with_u32(with_u32(vm.get_lapic(1), REG_ID, i << 24), REG_LDR, 0x12345678)
        vm.set_lapic(1, image)
        assert u32(vm.get_lapic(1), REG_ID) == 5 << 24
        assert vm.vcpu(1).rdmsr(0x80D) == 0x00000020


def test_set_lapic_takes_an_xapic_image_verbatim__STATE_5() -> None:
    """STATE-2 (also under x2apic_format): an xAPIC-mode image's ID is used as is, and the
    map follows it."""
    vm = xapic_vm(2, x2apic_format=True)
    vm.set_lapic(1, with_u32(vm.get_lapic(1), REG_ID, 0x40 << 24))
    assert mmio_read(vm, 1, REG_ID) == 0x40000000
    assert vm.signal_msi(_msi_lo(0x40), 0, 0x41) == 1
    assert holders(vm, 0x41) == [1]


def test_pending_state_restored_by_set_lapic_is_delivered__STATE_5() -> None:
    vm = xapic_vm(2)
    image = bytearray(vm.get_lapic(1))
    image[0x200 + 0x10 * (0x51 // 32) + (0x51 % 32) // 8] |= 1 << (0x51 % 8)
    vm.set_lapic(1, bytes(image))
    assert vm.vcpu(1).run() == [0x51]


# =============================================================================================
# Host MSR writes
# =============================================================================================
def test_host_set_msr_allows_x2apic_to_xapic_and_reinitialises_the_id__STATE_5() -> None:
    """BASE-5 / BUG-23: KVM_SET_MSRS x2APIC -> xAPIC succeeds (True); xAPIC ID := vcpu_id<<24;
    the guest itself gets #GP for the same transition (BASE-4)."""
    vm = x2apic_vm([0, 7])
    base = vm.get_msr(1, APIC_BASE_MSR)
    with pytest.raises(GuestFault):
        vm.vcpu(1).wrmsr(APIC_BASE_MSR, base & ~0x400)
    assert vm.set_msr(1, APIC_BASE_MSR, base & ~0x400) is True
    assert mmio_read(vm, 1, REG_ID) == 7 << 24


def test_host_set_msr_refuses_illegal_values__STATE_5() -> None:
    """BASE-2/3: EXTD without EN and a reserved bit (bit 9) -> False, nothing changes."""
    vm = Vm(1)
    base = vm.get_msr(0, APIC_BASE_MSR)
    assert vm.set_msr(0, APIC_BASE_MSR, 0xFEE00400) is False
    assert vm.set_msr(0, APIC_BASE_MSR, 0xFEE00A00) is False
    assert vm.get_msr(0, APIC_BASE_MSR) == base


def test_host_set_msr_may_enter_x2apic_from_disabled__STATE_5() -> None:
    vm = Vm(1)
    host_apic_base(vm, 0, "disabled")
    assert vm.set_msr(0, APIC_BASE_MSR, 0xFEE00C00) is True
    assert vm.vcpu(0).rdmsr(0x802) == 0


# =============================================================================================
# Tracing and counters
# =============================================================================================
TRACEPOINTS = {
    "kvm_exit",
    "kvm_apic_ipi",
    "kvm_apic_accept_irq",
    "kvm_eoi",
    "kvm_hypercall",
    "kvm_msi_set_irq",
    "kvm_apic",
    "kvm_pv_send_ipi",
}


def tracepoint(event: object) -> str:
    """``KvmApicAcceptIrq`` -> ``kvm_apic_accept_irq``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()


def test_tracing_is_off_by_default_and_records_nothing__EXIT_1() -> None:
    vm = x2apic_vm([0, 1])
    assert vm.tracer.on is False
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    vm.signal_msi(_msi_lo(1), 0, 0x42)
    vm.vcpu(1).run()
    assert vm.tracer.events == []
    assert vm.stats.ipis == 1 and vm.stats.msis == 1 and vm.stats.exits > 0


def test_an_ipi_traces_exit_then_ipi_then_accept__EXIT_1() -> None:
    """Events are typed, named after KVM tracepoints, and in order: kvm_exit (the ICR WRMSR)
    before kvm_apic_ipi before kvm_apic_accept_irq on the target."""
    vm = x2apic_vm([0, 1], trace=True)
    vm.tracer.clear()
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    events = vm.tracer.events
    assert [tracepoint(e) for e in events] == ["kvm_exit", "kvm_apic_ipi", "kvm_apic_accept_irq"]
    exit_, ipi, accept = events
    assert isinstance(exit_, KvmExit) and exit_.reason is ExitReason.MSR_WRITE
    assert exit_.qualification == MSR_ICR
    assert isinstance(ipi, KvmApicIpi) and ipi.dest_id == 1 and ipi.icr_low & 0xFF == 0x41
    assert isinstance(accept, KvmApicAcceptIrq)
    assert (accept.vcpu, accept.vector, accept.accepted) == (1, 0x41, True)


def test_every_traced_event_is_named_after_a_tracepoint__EXIT_1() -> None:
    vm = xapic_vm(2, trace=True)
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    vm.signal_msi(_msi_lo(1), 0, 0x42)
    vm.vcpu(0).hypercall(KVM_HC_SEND_IPI, 0b10, 0, 0, 0x43)
    vm.vcpu(1).run()
    names = [tracepoint(e) for e in vm.tracer.events]
    assert set(names) <= TRACEPOINTS
    assert {"kvm_exit", "kvm_apic_ipi", "kvm_apic_accept_irq", "kvm_msi_set_irq",
            "kvm_hypercall", "kvm_eoi"} <= set(names)
    msi_at = next(i for i, e in enumerate(vm.tracer.events) if isinstance(e, KvmMsiSetIrq))
    assert isinstance(vm.tracer.events[msi_at + 1], KvmApicAcceptIrq)
    hc_at = next(i for i, e in enumerate(vm.tracer.events) if isinstance(e, KvmHypercall))
    assert isinstance(vm.tracer.events[hc_at - 1], KvmExit)


def test_the_stats_count_paths_ipis_and_acceptances__EXIT_1() -> None:
    vm = xapic_vm(3)
    assert vm.stats.ipis == vm.stats.irqs_accepted == vm.stats.msis == 0
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    vm.signal_msi(_msi_lo(0xFF), 0, 0x42)
    after = vm.stats.as_dict()
    assert after["ipis"] == 1
    assert after["irqs_accepted"] == 4
    assert after["fast_path"] == 1 and after["slow_path"] == 1
    assert after["msis"] == 1


def test_guest_made_and_host_made_x2apic_vcpus_are_the_same__STATE_5() -> None:
    guest = Vm(2)
    guest_x2apic(guest, 1)
    host = Vm(2)
    host_apic_base(host, 1, "x2apic")
    assert guest.get_lapic(1) == host.get_lapic(1)
    assert guest.get_msr(1, APIC_BASE_MSR) == host.get_msr(1, APIC_BASE_MSR)


def test_eoi_after_kvm_set_lapic_clears_the_restored_highest_isr__PRIO_5_BUG_29() -> None:
    """PRIO-5 / BUG-29 ("KVM: x86: Purge "highest ISR" cache when updating APICv state"): EOI
    clears the highest ISR bit of the state in force, even when the vector the vCPU last
    acknowledged belongs to a state KVM_SET_LAPIC has since replaced."""
    vm = xapic_vm(2)

    def no_eoi_yet(vcpu: object, vector: int) -> None:
        """A handler still running: the vector stays in service."""

    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    assert vm.vcpu(1).run(handler=no_eoi_yet) == [0x41]
    saved = vm.get_lapic(1)  # ISR = {0x41}
    vm.vcpu(1).guest_eoi()
    send_ipi(vm, 0, ICR_ASSERT | 0x31, 1)
    assert vm.vcpu(1).run(handler=no_eoi_yet) == [0x31]
    assert set(vm.lapic(1).isr) == {0x31}
    vm.set_lapic(1, saved)
    assert set(vm.lapic(1).isr) == {0x41}
    vm.vcpu(1).guest_eoi()
    assert set(vm.lapic(1).isr) == set(), "EOI cleared the restored vector 0x41"
    assert vm.lapic(1).ppr == 0


def test_nmis_go_to_the_nmi_handler_and_never_touch_a_fixed_vector_2__ACCEPT_NMI__PRIO_7() -> None:
    """ACCEPT-NMI / PRIO-7: under kvm a fixed-mode vector 2 is accepted into IRR but, being in
    priority class 0, is never deliverable; an NMI goes to the NMI handler (no EOI) and leaves
    that IRR bit alone.  Interrupts go to the interrupt handler and are EOI'd."""
    vm = Vm(2)
    target = vm.vcpu(1)
    target.mmio_write(0xFEE000F0, 0x1FF)
    interrupts: list[int] = []
    nmis: list[int] = []

    def handler(vcpu: Vcpu, vector: int) -> None:
        interrupts.append(vector)
        vcpu.guest_eoi()

    target.interrupt_handler = handler
    target.nmi_handler = lambda v: nmis.append(2)
    assert vm.lapic(1).accept(2)
    vm.lapic(1).accept(0x41)
    assert target.run() == [0x41]
    assert 2 in vm.lapic(1).irr and not vm.lapic(1).isr
    assert interrupts == [0x41] and nmis == []
    assert vm.signal_msi(0xFEE01000, 0, 0x400) == 1  # NMI to APIC ID 1
    assert target.run() == [2]
    assert nmis == [2] and interrupts == [0x41]
    assert 2 in vm.lapic(1).irr and not vm.lapic(1).isr
