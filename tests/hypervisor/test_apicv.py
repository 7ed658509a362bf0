"""Intel APICv / posted interrupts / IPIv: the worked examples of ``specs/apicv.md`` (Parts H-L
of the reference), one test each, named after the rule it checks.

VMs are set up by guest-visible accesses (``builders``); the APICv state is read through
``vm.accel`` (``pid(i)``, ``pid_table``, ``notification_log``, ``vmcs(i)``) and the exit log,
as the issue's Public API says.
"""

from __future__ import annotations

import pytest

from hypervisor import ExitReason, Host, RunState, Vm
from hypervisor.accel.apicv import Apicv, ApicvState
from hypervisor.hw.vmx import (
    EOI_EXIT_BITMAP,
    GUEST_INTR_STATUS,
    LAST_PID_POINTER_INDEX,
    PID_CONTROL,
    PID_POINTER_TABLE,
    POSTED_INTR_DESC_ADDR,
    POSTED_INTR_NV,
    SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY,
    TERTIARY_EXEC_IPI_VIRT,
    TERTIARY_VM_EXEC_CONTROL,
    IpivMiss,
    Pid,
    PiDesc,
    ndst_of,
    pid_table_order,
    recognized,
    vppr,
)
from lapic.apic import LocalApic
from lapic.faults import ApicTypeError, ApicValueError
from lapic.icr import DeliveryMode, Interrupt

from .builders import (
    APIC_PAGE,
    ICR_INIT,
    ICR_LOGICAL,
    ICR_SELF,
    MSR_ICR,
    MSR_SELF_IPI,
    REG_EOI,
    REG_ICR,
    REG_ICR2,
    REG_ID,
    REG_SVR,
    REG_TPR,
    SVR_ON,
    guest_x2apic,
    mmio_write,
    sw_enable,
)

APIC_WRITE = ExitReason.APIC_WRITE


def apicv_of(vm: Vm) -> ApicvState:
    accel = vm.accel
    assert isinstance(accel, ApicvState)
    return accel


def apicv_vm(
    n: int = 4, accelerator: str | Apicv = "apicv", *, x2apic: bool = False, **kw: object
) -> Vm:
    """``n`` software-enabled vCPUs (xAPIC, or x2APIC), each in guest mode on pCPU ``i``;
    nothing is executing (``host.running`` None) and the exit log is empty."""
    vm = Vm(n, accelerator=accelerator, **kw)  # type: ignore[arg-type]
    for i in range(n):
        if x2apic:
            guest_x2apic(vm, i)
        sw_enable(vm, i)
    vm.host.running = None
    assert vm.exit_log is not None
    vm.exit_log.clear()
    return vm


def exits(vm: Vm, reason: ExitReason) -> list[tuple[int, int, int]]:
    return [(e.vcpu, e.qualification, e.value) for e in vm.exits if e.reason is reason]


def post(vm: Vm, i: int, vector: int) -> int:
    """A host-side fixed interrupt to vCPU index ``i`` (what an MSI or a timer does)."""
    return vm.deliver(Interrupt(vector, DeliveryMode.FIXED, dest=vm.vcpu(i).vcpu_id))


def no_eoi(seen: list[int]) -> object:
    return lambda vcpu, vector: seen.append(vector)


# =============================================================================================
# Part H: the descriptor, the host vectors, the VMCS
# =============================================================================================
def test_the_descriptor_control_word_and_its_64_byte_image__PI_H1() -> None:
    d = PiDesc()
    d.nv = 0xF2
    d.ndst = ndst_of(3, host_x2apic=False)
    assert d.control == 0x0000030000F20000
    d.set_sn()
    assert d.control == 0x0000030000F20002
    assert ndst_of(0x103, host_x2apic=True) == 0x00000103
    d.test_and_set_pir(0x41)
    image = bytes(d.value())
    assert len(image) == 64
    assert image[8:12] == (1 << 1).to_bytes(4, "little")  # u32 pir[2], bit 1
    assert int.from_bytes(image[32:40], "little") == d.control and image[40:] == bytes(24)
    assert Pid.from_bytes(image) == d.value() and d.value().pir == {0x41}
    assert PID_CONTROL.unpack(d.control) == {"on": 0, "sn": 1, "nv": 0xF2, "ndst": 0x300}
    with pytest.raises(ApicValueError, match="64"):
        Pid.from_bytes(bytes(63))


def test_a_vcpu_loaded_on_an_xapic_host_has_ndst_id_shifted_left_8__PI_H1() -> None:
    host = Host(4, apic_ids=[0, 1, 2, 3])
    vm = Vm(4, accelerator=Apicv(host_x2apic=False), host=host)
    vm.vcpu(1).enter(3)
    pid = apicv_of(vm).pid(1)
    assert pid.control == 0x0000030000F20000
    assert (pid.on, pid.sn, pid.nv, pid.ndst) == (False, False, 0xF2, 0x300)
    assert apicv_of(vm).host_apic_id(3) == 3


def test_the_host_vectors_are_parameters_with_kvm_defaults__PI_H2() -> None:
    cfg = Apicv()
    assert (cfg.posted_intr_vector, cfg.wakeup_vector, cfg.nested_vector) == (0xF2, 0xF1, 0xF0)
    vm = apicv_vm(2, Apicv(posted_intr_vector=0xE2, wakeup_vector=0xE1, nested_vector=0xE0))
    post(vm, 1, 0x41)
    assert apicv_of(vm).pid(1).nv == 0xE2
    assert list(apicv_of(vm).notification_log) == [(1, 0xE2)]
    assert vm.stats.notifications == {0xE2: 1}
    with pytest.raises(ApicValueError):
        Apicv(posted_intr_vector=0xF1)
    with pytest.raises(ApicTypeError):
        Apicv(ipiv=1)  # type: ignore[arg-type]


def test_the_vmcs_fields_controls_and_exit_reasons__PI_H3() -> None:
    assert (ExitReason.APIC_ACCESS, ExitReason.EOI_INDUCED, ExitReason.APIC_WRITE) == (44, 45, 56)
    vm = apicv_vm(4, "ipiv", max_vcpu_ids=8)
    acc = apicv_of(vm)
    acc.set_eoi_exit_bitmap(1, [0x41, 0x80])
    vmcs = acc.vmcs(1)
    f = vmcs.fields()
    assert f[POSTED_INTR_NV] == 0xF2
    assert f[POSTED_INTR_DESC_ADDR] == acc.pid_pa(1) and not acc.pid_pa(1) & 63
    assert f[PID_POINTER_TABLE] == acc.config.pid_table_pa
    assert f[LAST_PID_POINTER_INDEX] == 7
    assert f[TERTIARY_VM_EXEC_CONTROL] == TERTIARY_EXEC_IPI_VIRT and vmcs.ipi_virtualization
    assert f[EOI_EXIT_BITMAP[1]] == 1 << 1 and f[EOI_EXIT_BITMAP[2]] == 1
    assert f[GUEST_INTR_STATUS] == 0
    assert vmcs.secondary_controls & SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY
    assert vmcs.pin_based_controls == 1 << 7
    plain = apicv_of(apicv_vm(2)).vmcs(0)
    assert not plain.ipi_virtualization and plain.pid_pointer_table == 0


# =============================================================================================
# Part I: virtual-interrupt delivery
# =============================================================================================
def test_the_virtual_apic_page_is_the_vcpus_register_page__VID_1() -> None:
    vm = apicv_vm(2)
    mmio_write(vm, 0, REG_ICR, ICR_SELF | 0xF0)  # virtualized self-IPI
    apic = vm.lapic(0)
    assert int.from_bytes(apic.regs[0x270:0x274], "little") == 1 << 16  # VIRR[0xF0]
    assert apicv_of(vm).guest_interrupt_status(0) == (0xF0, 0)
    assert exits(vm, APIC_WRITE) == []


def test_vppr_is_vtpr_or_the_svi_class__VID_2() -> None:
    assert vppr(0x30, 0x51) == 0x50
    assert vppr(0x60, 0x51) == 0x60
    vm = apicv_vm(1)
    post(vm, 0, 0x51)
    mmio_write(vm, 0, REG_TPR, 0x30)
    vm.vcpu(0).run(no_eoi([]))  # type: ignore[arg-type]
    svi = apicv_of(vm).guest_interrupt_status(0)[1]
    assert vm.lapic(0).ppr == 0x50 == vppr(vm.lapic(0).tpr, svi)


def test_a_virtual_interrupt_is_recognized_only_above_the_vppr_class__VID_3() -> None:
    apic = LocalApic(0)
    apic.mmio_write(REG_SVR, SVR_ON)
    apic.mmio_write(REG_TPR, 0x50)
    apic.accept(0x55)
    assert not recognized(apic)  # RVI 0x55, VPPR 0x50: same class
    apic.accept(0x61)
    assert recognized(apic)


def test_delivery_moves_rvi_to_visr_and_the_next_rvi_waits_for_its_class__VID_4() -> None:
    vm = apicv_vm(2)
    post(vm, 1, 0x41)
    post(vm, 1, 0x61)
    assert apicv_of(vm).guest_interrupt_status(1) == (0x61, 0)
    seen: list[int] = []
    vm.vcpu(1).run(no_eoi(seen))  # type: ignore[arg-type]
    apic = vm.lapic(1)
    assert seen == [0x61]
    assert apic.isr == {0x61} and apic.irr == {0x41} and apic.ppr == 0x60
    assert apicv_of(vm).guest_interrupt_status(1) == (0x41, 0x61)


def _visr_51_31(vm: Vm) -> None:
    """vCPU 1 with VISR {0x51, 0x31} (handlers that do not EOI yet)."""
    post(vm, 1, 0x31)
    vm.vcpu(1).run(no_eoi([]))  # type: ignore[arg-type]
    post(vm, 1, 0x51)
    vm.vcpu(1).run(no_eoi([]))  # type: ignore[arg-type]
    assert vm.lapic(1).isr == {0x31, 0x51}


def test_eoi_virtualization_without_and_with_the_eoi_exit_bitmap__VID_5() -> None:
    vm = apicv_vm(2)
    _visr_51_31(vm)
    mmio_write(vm, 1, REG_EOI, 0)
    apic = vm.lapic(1)
    assert apic.isr == {0x31} and apic.ppr == 0x30
    assert apicv_of(vm).guest_interrupt_status(1) == (0, 0x31)
    assert exits(vm, ExitReason.EOI_INDUCED) == []
    vm = apicv_vm(2)
    apicv_of(vm).set_eoi_exit_bitmap(1, {0x51})
    assert apicv_of(vm).eoi_exit_bitmap(1) == {0x51}
    _visr_51_31(vm)
    mmio_write(vm, 1, REG_EOI, 0)
    assert exits(vm, ExitReason.EOI_INDUCED) == [(1, 0x51, 0)]
    assert vm.lapic(1).isr == {0x31} and vm.lapic(1).ppr == 0x30


def test_only_a_qualifying_self_ipi_is_virtualized_else_an_apic_write_exit__VID_6() -> None:
    vm = apicv_vm(2)
    mmio_write(vm, 0, REG_ICR, 0x000400F1)
    assert vm.lapic(0).irr == {0xF1} and exits(vm, APIC_WRITE) == []
    mmio_write(vm, 0, REG_ICR2, 0x01000000)
    mmio_write(vm, 0, REG_ICR, 0x000000F1)  # a destination in VICR_HI, no IPIv
    assert exits(vm, APIC_WRITE) == [(0, REG_ICR, 0x01000000 << 32 | 0xF1)]
    assert 0xF1 in vm.lapic(1).irr  # KVM emulated it
    mmio_write(vm, 0, REG_ICR, 0x000410F1)  # BUSY set: not virtualized
    assert len(exits(vm, APIC_WRITE)) == 2
    x2 = apicv_vm(1, x2apic=True)
    x2.vcpu(0).wrmsr(MSR_SELF_IPI, 0x45)
    assert x2.lapic(0).irr == {0x45} and x2.exits == []
    x2.vcpu(0).wrmsr(MSR_SELF_IPI, 0x05)  # vector < 16
    assert exits(x2, APIC_WRITE) == [(0, 0x3F0, 0x05)]


def test_the_x2apic_icr_apic_write_exit_sends_the_64_bit_icr_and_clears_busy__VID_7() -> None:
    vm = apicv_vm(3, "ipiv", x2apic=True)
    vm.vcpu(0).wrmsr(MSR_ICR, 0x00000002_000004F0)  # NMI to 2: not virtualized
    assert exits(vm, APIC_WRITE) == [(0, REG_ICR, 0x00000002_000004F0)]
    assert vm.vcpu(2).nmi_pending == 1
    assert int.from_bytes(vm.lapic(0).regs[0x300:0x308], "little") == 0x00000002_000004F0
    assert not vm.lapic(0).icr & (1 << 12)
    plain = apicv_vm(3, x2apic=True)
    plain.vcpu(0).wrmsr(MSR_ICR, 0x00000002_000004F0)  # without IPIv: an intercepted WRMSR
    assert exits(plain, APIC_WRITE) == [] and exits(plain, ExitReason.MSR_WRITE)
    assert plain.vcpu(2).nmi_pending == 1


# =============================================================================================
# Part J: posted-interrupt processing, KVM's sender and receiver
# =============================================================================================
def test_a_notification_in_guest_mode_moves_pir_to_virr_without_an_exit__PI_J1() -> None:
    vm = apicv_vm(2)
    acc = apicv_of(vm)
    post(vm, 1, 0x30)
    assert acc.guest_interrupt_status(1) == (0x30, 0)
    steps = vm.host.steps
    steps.queued = True
    post(vm, 1, 0x45)
    post(vm, 1, 0x61)
    first, second = steps.pending()
    while not first.next_step.name.startswith("pi.notification"):  # type: ignore[union-attr]
        steps.step(first)
    steps.step(second)  # 0x61: PIR set
    while not second.done:
        steps.step(second)  # ON was set: no second notification
    assert acc.pid(1).pir == {0x45, 0x61} and acc.pid(1).on
    eois = acc.physical_eois
    steps.step(first)  # the notification arrives
    steps.queued = False
    pid = acc.pid(1)
    assert not pid.on and not pid.pir
    assert {0x30, 0x45, 0x61} <= set(vm.lapic(1).irr) and acc.guest_interrupt_status(1) == (0x61, 0)
    assert acc.physical_eois == eois + 1 and vm.exits == []
    assert vm.stats.notifications == {0xF2: 2}
    p = vm.vcpu(1).last_pcpu
    assert p is not None
    vm.vcpu(0).enter()  # so the PIR test below is not about vCPU 1 only
    steps.queued = True
    post(vm, 1, 0x70)
    (t,) = steps.pending()
    while not t.next_step.name.startswith("pi.notification"):  # type: ignore[union-attr]
        steps.step(t)
    steps.queued = False
    acc.host_interrupt(p, 0xEC)  # a timer vector, not the notification vector
    assert exits(vm, ExitReason.EXTERNAL_INTERRUPT) == [(1, 0xEC, 0)]


def test_two_posts_one_notification_a_blocked_target_is_woken_a_set_bit_is_a_no_op__PI_J2() -> None:
    vm = apicv_vm(3)
    acc = apicv_of(vm)
    vm.vcpu(1).preempt()
    vm.vcpu(1).enter()  # running in guest mode on pCPU 1, not the executing vCPU
    steps = vm.host.steps
    steps.queued = True
    post(vm, 1, 0x41)
    post(vm, 1, 0x42)
    first, second = steps.pending()
    while not first.next_step.name.startswith("pi.notification"):  # type: ignore[union-attr]
        steps.step(first)
    while not second.done:
        steps.step(second)  # the second post sees ON set: no notification of its own
    steps.run_all()
    steps.queued = False
    assert list(acc.notification_log) == [(1, 0xF2)]
    assert {0x41, 0x42} <= set(vm.lapic(1).irr)
    assert vm.vcpu(2).halt()
    log = len(acc.notification_log)
    wakeups = vm.stats.wakeups
    post(vm, 2, 0x43)
    assert len(acc.notification_log) == log and vm.stats.wakeups == wakeups + 1
    assert vm.vcpu(2).run_state is RunState.PREEMPTED
    posted = vm.stats.posted
    vm.vcpu(0).preempt()
    post(vm, 0, 0x44)
    before = acc.pid(0)
    post(vm, 0, 0x44)  # already in the PIR: no side effect
    assert acc.pid(0) == before and vm.stats.posted == posted + 1


def test_sync_pir_to_irr_moves_the_pir_when_on_is_set__PI_J3() -> None:
    vm = apicv_vm(2)
    acc = apicv_of(vm)
    post(vm, 1, 0x20)
    vm.vcpu(1).preempt()
    post(vm, 1, 0x33)
    assert acc.pid(1).on and acc.pid(1).pir == {0x33} and vm.lapic(1).irr == {0x20}
    assert acc.sync_pir_to_irr(vm.vcpu(1)) == 0x33
    assert not acc.pid(1).on and not acc.pid(1).pir
    assert vm.lapic(1).irr == {0x20, 0x33} and acc.guest_interrupt_status(1)[0] == 0x33


def test_pi_has_pending_interrupt_reads_and_never_syncs__PI_J4() -> None:
    vm = apicv_vm(2)
    acc = apicv_of(vm)
    post(vm, 0, 0x20)
    vm.vcpu(1).preempt()
    post(vm, 1, 0x70)
    vm.host.running = vm.vcpu(0)
    before = acc.pid(1)
    assert acc.pi_has_pending_interrupt(1)
    assert acc.pid(1) == before and 0x70 not in vm.lapic(1).irr
    assert acc.guest_interrupt_status(0) == (0x20, 0)
    assert not acc.pi_has_pending_interrupt(0)


# =============================================================================================
# Part K: IPI virtualization
# =============================================================================================
def test_ipiv_follows_apicv_active_and_the_icr_msr_intercept_follows_it__IPIV_1() -> None:
    vm = apicv_vm(2, "ipiv")
    acc = apicv_of(vm)
    assert acc.vmcs(0).ipi_virtualization and not acc.x2apic_msr_intercepted(MSR_ICR, True)
    mmio_write(vm, 1, REG_ID, 5 << 24)  # an xAPIC ID change inhibits APICv
    assert not acc.active
    assert not acc.vmcs(0).ipi_virtualization and acc.x2apic_msr_intercepted(MSR_ICR, True)
    vm.set_msr(1, 0x1B, 0)  # the host disables vCPU 1's APIC ...
    vm.set_msr(1, 0x1B, APIC_PAGE | 0x800)  # ... and re-enables it: ID back to 1
    assert acc.active and acc.vmcs(0).ipi_virtualization
    assert not acc.x2apic_msr_intercepted(MSR_ICR, False)
    assert acc.x2apic_msr_intercepted(0x839, False)  # TMCCT


def test_the_pid_pointer_table_is_sized_by_max_vcpu_ids__IPIV_2() -> None:
    vm = Vm(4, accelerator="ipiv", max_vcpu_ids=4)
    acc = apicv_of(vm)
    assert len(acc.pid_table) == 512 and acc.last_pid_pointer_index == 3
    assert [e & 1 for e in acc.pid_table[:4]] == [1, 1, 1, 1]
    assert [e & ~63 for e in acc.pid_table[:4]] == [acc.pid_pa(i) for i in range(4)]
    assert not any(acc.pid_table[4:])
    with pytest.raises(ApicValueError):
        vm.add_vcpu(4)
    assert pid_table_order(1024) == 1 and len(apicv_of(Vm(1, accelerator="ipiv",
                                                          max_vcpu_ids=1024)).pid_table) == 1024
    # An IPI to APIC ID 4 with max_vcpu_ids = 4 is never looked up in the table (BR-V8).
    for i in range(4):
        sw_enable(vm, i)
    vm.exit_log.clear()  # type: ignore[union-attr]
    mmio_write(vm, 0, REG_ICR2, 4 << 24)
    mmio_write(vm, 0, REG_ICR, 0x45)
    assert exits(vm, APIC_WRITE) == [(0, REG_ICR, 4 << 56 | 0x45)]


def test_which_icr_writes_ipiv_virtualizes__IPIV_3() -> None:
    host = Host(4, apic_ids=[4, 5, 7, 9])
    vm = Vm(4, accelerator="ipiv", host=host)
    for i in range(4):
        sw_enable(vm, i)
    vm.host.running = None
    vm.exit_log.clear()  # type: ignore[union-attr]
    acc = apicv_of(vm)
    assert acc.pid(2).ndst == 7 and not acc.pid(2).sn and acc.pid(2).nv == 0xF2
    mmio_write(vm, 0, REG_ICR2, 0x02000000)
    mmio_write(vm, 0, REG_ICR, 0x00000045)
    assert exits(vm, APIC_WRITE) == [] and vm.exits == []
    assert list(acc.notification_log) == [(7, 0xF2)] and 0x45 in vm.lapic(2).irr
    assert vm.stats.posted == 1
    mmio_write(vm, 0, REG_ICR, 0x000004F0)  # NMI
    assert exits(vm, APIC_WRITE) == [(0, REG_ICR, 0x02000000 << 32 | 0x4F0)]
    assert vm.vcpu(2).nmi_pending == 1
    mmio_write(vm, 0, REG_ICR, ICR_LOGICAL | 0x45)
    assert len(exits(vm, APIC_WRITE)) == 2


def test_the_unverified_ipiv_behaviours_are_parameters_kvm_never_relies_on__IPIV_3() -> None:
    """UNVERIFIED (Part P item 3): the miss behaviour and the notification rule change how,
    never whether, a guest's unicast IPI between existing vCPUs arrives."""
    handled = []
    for cfg in (
        Apicv(ipiv=True),
        Apicv(ipiv=True, ipiv_notify_always=True),
        Apicv(ipiv=True, ipiv_past_last=IpivMiss.DROP, ipiv_invalid_entry=IpivMiss.DROP),
        Apicv(ipiv=True, ipiv_min_vector=0),
    ):
        vm = apicv_vm(4, cfg)
        vm.vcpu(2).preempt()
        for dest, vec in ((1, 0x41), (2, 0x42), (3, 0x43), (1, 0x44)):
            mmio_write(vm, 0, REG_ICR2, dest << 24)
            mmio_write(vm, 0, REG_ICR, vec)
        handled.append([vm.vcpu(i).run() for i in range(4)])
        assert all(e & 1 for e in apicv_of(vm).pid_table[:4])
    assert all(h == handled[0] for h in handled)
    assert handled[0] == [[], [0x44, 0x41], [0x42], [0x43]]


def test_a_non_virtualized_icr_write_is_emulated_from_the_page__IPIV_4() -> None:
    vm = apicv_vm(3, "ipiv")
    mmio_write(vm, 0, REG_ICR2, 0x02000000)
    mmio_write(vm, 0, REG_ICR, ICR_INIT)
    assert exits(vm, APIC_WRITE) == [(0, REG_ICR, 0x02000000 << 32 | ICR_INIT)]
    assert vm.lapic(2).init_pending or vm.vcpu(2).mp_state.name == "INIT_RECEIVED"
    assert not vm.lapic(0).icr & (1 << 12)


def test_sn_while_preempted_no_notification_on_set_at_load__IPIV_5() -> None:
    """IPIV-5 test 1 (BR-V12)."""
    vm = apicv_vm(2, "ipiv")
    acc = apicv_of(vm)
    vm.vcpu(1).preempt()
    assert acc.pid(1).sn
    mmio_write(vm, 0, REG_ICR2, 0x01000000)
    mmio_write(vm, 0, REG_ICR, 0x40)
    assert acc.pid(1).pir == {0x40} and not acc.pid(1).on and not acc.notification_log
    assert acc.pi_has_pending_interrupt(1)
    vm.vcpu(1).enter()
    assert not acc.pid(1).sn and 0x40 in vm.lapic(1).irr
    assert acc.guest_interrupt_status(1)[0] == 0x40
    plain = apicv_vm(2)  # plain APICv: KVM does not need the wake-up, SN stays clear
    plain.vcpu(1).preempt()
    assert not apicv_of(plain).pid(1).sn
    assert plain.vcpu(1).halt() and apicv_of(plain).pid(1).nv == 0xF2
    vtd = apicv_vm(2, Apicv(device_posting=True))  # an assigned device: vmx_needs_pi_wakeup
    vtd.vcpu(1).preempt()
    assert apicv_of(vtd).pid(1).sn
    apicv_of(vtd).device_post(1, 0x47)
    assert not apicv_of(vtd).notification_log and apicv_of(vtd).pid(1).pir == {0x47}
    assert vtd.vcpu(1).run() == [0x47]


def test_a_blocked_vcpu_is_armed_with_the_wakeup_vector_and_woken_by_it__IPIV_5() -> None:
    """IPIV-5 test 2."""
    vm = apicv_vm(2, "ipiv")
    acc = apicv_of(vm)
    p = vm.vcpu(1).last_pcpu
    assert p is not None and vm.vcpu(1).halt()
    assert acc.pid(1).nv == 0xF1 and p.wakeup_list == [vm.vcpu(1)]
    mmio_write(vm, 0, REG_ICR2, 0x01000000)
    mmio_write(vm, 0, REG_ICR, 0x41)
    assert list(acc.notification_log) == [(p.apic_id, 0xF1)]
    assert vm.vcpu(1).run_state is RunState.PREEMPTED and vm.stats.wakeups == 1
    assert vm.stats.notifications == {0xF1: 1}
    vm.vcpu(1).enter(3)
    pid = acc.pid(1)
    assert p.wakeup_list == [] and pid.nv == 0xF2 and pid.ndst == 3 and not pid.sn
    assert vm.vcpu(1).run() == [0x41]


def test_a_post_while_arming_is_caught_by_the_wakeup_self_ipi__IPIV_5() -> None:
    """IPIV-5 test 3: the post lands after the halt's re-check, between joining the wake-up
    list and NV := 0xF1; it notifies 0xF2 to a pCPU no longer in guest mode (lost there); the
    ON test after arming sends the wake-up self-IPI."""
    vm = apicv_vm(2, "ipiv")
    acc = apicv_of(vm)
    steps = vm.host.steps
    steps.queued = True
    vm.vcpu(1).halt()
    halt, = steps.pending()
    while not halt.done:
        steps.step(halt)
    arm, = steps.pending()
    steps.step(arm)  # pi.wakeup_list_add
    mmio_write(vm, 0, REG_ICR2, 0x01000000)
    mmio_write(vm, 0, REG_ICR, 0x41)
    sender = next(t for t in steps.pending() if t is not arm)
    while not sender.done:
        steps.step(sender)
    assert vm.vcpu(1).run_state is RunState.BLOCKED and list(acc.notification_log) == [(1, 0xF2)]
    while not arm.done:
        steps.step(arm)
    steps.queued = False
    assert acc.notification_log[-1] == (1, 0xF1)
    assert vm.vcpu(1).run_state is RunState.PREEMPTED
    assert vm.vcpu(1).run() == [0x41]


def test_a_vcpu_halted_with_if_0_is_not_armed_and_not_woken__IPIV_5() -> None:
    """IPIV-5 test 4 (BR-V2, 1831fa4)."""
    vm = apicv_vm(2, "ipiv")
    acc = apicv_of(vm)
    vm.vcpu(1).guest_if = False
    p = vm.vcpu(1).last_pcpu
    assert p is not None and vm.vcpu(1).halt()
    assert acc.pid(1).sn and acc.pid(1).nv == 0xF2 and p.wakeup_list == []
    mmio_write(vm, 0, REG_ICR2, 0x01000000)
    mmio_write(vm, 0, REG_ICR, 0x42)
    assert vm.vcpu(1).run_state is RunState.BLOCKED and not acc.notification_log
    post(vm, 1, 0x43)  # KVM's own sender: kvm_vcpu_wake_up finds no event either
    assert vm.vcpu(1).run_state is RunState.BLOCKED
    vm.vcpu(1).guest_if = True
    assert vm.vcpu(1).has_events()


def test_reset_sets_nv_and_sn_and_init_keeps_the_descriptor__IPIV_6() -> None:
    vm = Vm(2, accelerator="ipiv", host=Host(4, apic_ids=[0, 6, 2, 3]))
    acc = apicv_of(vm)
    assert acc.pid(1).nv == 0xF2 and acc.pid(1).sn
    sw_enable(vm, 0)
    sw_enable(vm, 1)
    assert not acc.pid(1).sn and acc.pid(1).ndst == 6
    vm.vcpu(1).preempt()
    post(vm, 1, 0x50)
    mmio_write(vm, 0, REG_ICR2, 0x01000000)
    mmio_write(vm, 0, REG_ICR, ICR_INIT)
    vm.vcpu(1).accept_events()
    pid = acc.pid(1)
    assert (pid.nv, pid.ndst, pid.sn) == (0xF2, 6, True) and pid.pir == {0x50}
    vm.vcpu(1).enter()
    mmio_write(vm, 1, REG_SVR, SVR_ON)
    vm.host.running = None
    mmio_write(vm, 0, REG_ICR, 0x51)
    assert acc.notification_log[-1] == (6, 0xF2) and 0x51 in vm.lapic(1).irr


# =============================================================================================
# Inhibits, host API, snapshot, views
# =============================================================================================
def test_an_inhibit_falls_back_to_emulation_and_loses_no_posted_bit__IPIV_1() -> None:
    vm = apicv_vm(3, "ipiv")
    acc = apicv_of(vm)
    vm.vcpu(1).preempt()
    post(vm, 1, 0x60)
    mmio_write(vm, 2, REG_ID, 7 << 24)
    assert not acc.active
    acc.device_post(1, 0x61)  # the IOMMU still posts (BR-V11)
    post(vm, 1, 0x62)  # KVM's sender: IRR + kick
    assert acc.pid(1).pir == {0x60, 0x61} and vm.lapic(1).irr == {0x62}
    assert vm.vcpu(1).run() == [0x62, 0x61, 0x60]
    mmio_write(vm, 0, REG_ICR2, 0x01000000)
    mmio_write(vm, 0, REG_ICR, 0x63)
    assert exits(vm, ExitReason.EPT_MISCONFIG)  # every access traps while inhibited
    assert vm.vcpu(1).run() == [0x63]


def test_get_lapic_syncs_the_pir_and_set_lapic_drops_it__PI_J3() -> None:
    vm = apicv_vm(2)
    acc = apicv_of(vm)
    vm.vcpu(1).preempt()
    post(vm, 1, 0x33)
    image = vm.get_lapic(1)
    assert int.from_bytes(image[0x210:0x214], "little") == 1 << (0x33 - 32)
    assert not acc.pid(1).pir
    post(vm, 1, 0x34)
    vm.set_lapic(1, image)
    assert not acc.pid(1).pir and not acc.pid(1).on and 0x33 in vm.lapic(1).irr


def test_the_snapshot_holds_the_descriptors_and_the_table_and_restores_them__PI_H1() -> None:
    vm = apicv_vm(2, "ipiv", trace=True)
    vm.vcpu(1).preempt()
    post(vm, 1, 0x44)
    snap = vm.snapshot()
    before = apicv_of(vm).pid(1)
    vm.vcpu(1).enter()
    assert apicv_of(vm).pid(1) != before
    vm.restore(snap)
    assert apicv_of(vm).pid(1) == before and vm.snapshot() == snap
    assert "pid[1]" in vm.dump() and "pid_table[0x1]" in vm.dump()
    assert "pid: on=1 sn=1" in vm.table()
    assert any(e.name == "kvm_apicv_accept_irq" for e in vm.tracer.records())


# =============================================================================================
# Model choices
# =============================================================================================
def test_rvi_and_svi_are_the_highest_virr_and_visr__APICV_CHOICE_1() -> None:
    vm = apicv_vm(2)
    acc = apicv_of(vm)
    for v in (0x30, 0x45, 0x61):
        post(vm, 1, v)
    assert acc.guest_interrupt_status(1) == (0x61, 0) == (max(vm.lapic(1).irr), 0)
    vm.vcpu(1).run(no_eoi([]))  # type: ignore[arg-type]
    assert acc.guest_interrupt_status(1) == (0x45, 0x61)


def test_a_vcpus_own_emulated_ipi_is_synced_when_it_re_enters__APICV_CHOICE_2() -> None:
    vm = apicv_vm(2, x2apic=True)
    acc = apicv_of(vm)
    vm.vcpu(0).wrmsr(MSR_ICR, 0x00000000_00000041)  # to itself: an MSR exit, KVM posts
    assert exits(vm, ExitReason.MSR_WRITE) == [(0, MSR_ICR, 0x41)]
    assert not acc.notification_log  # the running vCPU: no notification
    assert 0x41 in vm.lapic(0).irr and not acc.pid(0).pir
    assert vm.vcpu(0).run() == [0x41]


def test_which_accesses_exit_and_how__APICV_CHOICE_3() -> None:
    vm = apicv_vm(1)
    for offset in (REG_ID, REG_TPR, 0x100, 0x200, REG_ICR):
        vm.vcpu(0).mmio_read(APIC_PAGE + offset)
    assert vm.exits == []
    vm.vcpu(0).mmio_read(APIC_PAGE + 0xA0)  # PPR
    vm.vcpu(0).mmio_read(APIC_PAGE + 0x390)  # TMCCT
    assert exits(vm, ExitReason.APIC_ACCESS) == [(0, 0xA0, 0), (0, 0x390, 0)]
    mmio_write(vm, 0, REG_TPR, 0x10)
    mmio_write(vm, 0, REG_ICR2, 0)
    mmio_write(vm, 0, REG_EOI, 0)
    assert len(vm.exits) == 2
    mmio_write(vm, 0, REG_SVR, SVR_ON)
    mmio_write(vm, 0, 0x380, 0)  # TMICT
    assert exits(vm, APIC_WRITE) == [(0, REG_SVR, SVR_ON), (0, 0x380, 0)]
    mmio_write(vm, 0, 0x30, 0)  # the read-only version register
    assert exits(vm, ExitReason.APIC_ACCESS)[-1] == (0, 0x30 | 1 << 12, 0)
    x2 = apicv_vm(1, x2apic=True)
    x2.vcpu(0).rdmsr(0x808)
    x2.vcpu(0).wrmsr(0x808, 0)
    assert x2.exits == []
    x2.vcpu(0).rdmsr(0x839)
    x2.vcpu(0).rdmsr(MSR_ICR)
    x2.vcpu(0).wrmsr(0x80F, SVR_ON)
    assert [e.reason for e in x2.exits] == [ExitReason.MSR_READ] * 2 + [ExitReason.MSR_WRITE]


def test_misuse_raises_errors_that_name_the_argument__PI_H1() -> None:
    vm = apicv_vm(2, "ipiv")
    acc = apicv_of(vm)
    with pytest.raises(ApicValueError, match="i="):
        acc.pid(2)
    with pytest.raises(ApicTypeError, match="vectors"):
        acc.set_eoi_exit_bitmap(0, 0x41)  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match="vector"):
        acc.device_post(0, 5)
    with pytest.raises(ApicValueError, match="index"):
        acc.pid_table[len(acc.pid_table)]
    with pytest.raises(ApicValueError, match="pid_base"):
        Apicv(pid_base=0x1000_0010)
    with pytest.raises(ApicTypeError, match="ipiv_past_last"):
        Apicv(ipiv_past_last="drop")  # type: ignore[arg-type]
    assert Apicv(ipiv=True).name == "ipiv" and Apicv().name == "apicv"
    assert Vm(1, accelerator=Apicv(ipiv=True)).accel.name == "ipiv"


def test_the_trace_names_kvms_events_and_the_notifications__PI_J2() -> None:
    vm = apicv_vm(2, trace=True)
    post(vm, 1, 0x41)
    lines = vm.tracer.report()
    assert "kvm_apicv_accept_irq: apicid 0x1 vec 0x41 (Fixed|edge)" in lines
    assert "pi_notification 0xf2" in lines


def test_a_vcpu_put_between_its_hlt_exit_and_the_block_is_still_armed__IPIV_5() -> None:
    """IPIV-5 with preemption inside the block path (BR-V3): the task is scheduled back in
    (SN cleared) before it blocks, so the arming finds SN clear and a post wakes it."""
    vm = apicv_vm(2, "ipiv")
    acc = apicv_of(vm)
    steps = vm.host.steps
    steps.queued = True
    vm.vcpu(1).halt()  # the HLT exit; its block protocol waits
    vm.vcpu(1).preempt()  # preempted right there: SN := 1
    assert acc.pid(1).sn
    steps.run_all()  # block, re-check, then the arming thread
    steps.queued = False
    assert vm.vcpu(1).run_state is RunState.BLOCKED and acc.warnings == []
    assert acc.pid(1).nv == 0xF1 and not acc.pid(1).sn
    mmio_write(vm, 0, REG_ICR2, 0x01000000)
    mmio_write(vm, 0, REG_ICR, 0x41)
    assert vm.vcpu(1).run_state is RunState.PREEMPTED and vm.vcpu(1).run() == [0x41]


def test_a_mov_to_cr8_never_exits_while_apicv_is_active__APICV_CHOICE_3() -> None:
    vm = apicv_vm(2)
    post(vm, 1, 0x51)
    vm.vcpu(1).mov_to_cr8(0x6)  # masks the pending 0x51 ...
    vm.vcpu(1).mov_to_cr8(0x2)  # ... and unmasks it: under emulated VMX a threshold exit
    assert vm.exits == [] and vm.vcpu(1).run() == [0x51]
    mmio_write(vm, 0, REG_ID, 9 << 24)  # inhibited: KVM's TPR threshold is back
    post(vm, 1, 0x52)
    vm.vcpu(1).mov_to_cr8(0x6)
    vm.vcpu(1).mov_to_cr8(0x2)
    assert exits(vm, ExitReason.TPR_BELOW_THRESHOLD) == [(1, 0, 0)]
