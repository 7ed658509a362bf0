"""Gaps found by mutation testing: the guest and host API's argument checks, defaults, counters,
trace event fields and dumps of the hypervisor layer.

Rules: EXIT-1 (exits, counters, trace events), WAKE-1 (kicks and wake-ups), MSI-1, STATE-5,
HC-1, PVH-1, INHIBIT-1 (``specs/hypervisor.md``) and KVMB-8/KVMB-9 (``specs/kvm_backend.md``).
A bad argument raises ``ApicValueError``/``ApicTypeError`` whose message names the argument
(and its bounds), and changes nothing: no exit, no counter, no state.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from hypervisor import Exit, ExitReason, MpState, MsrError, RunState, Vcpu, Vm
from hypervisor.accel import ACCELERATORS
from hypervisor.accel.emulated import Emulated
from hypervisor.apic_map import Inhibits
from hypervisor.host import Pcpu
from hypervisor.pv_ipi import KVM_HC_KICK_CPU, KVM_HC_SEND_IPI
from hypervisor.trace import (
    KvmApicAcceptIrq,
    KvmApicIpi,
    KvmEoi,
    KvmExit,
    KvmHypercall,
    KvmMsiSetIrq,
    KvmPvSendIpi,
    Stats,
    Tracer,
)
from lapic import GuestFault
from lapic.apic import Features
from lapic.faults import ApicTypeError, ApicValueError
from lapic.icr import DeliveryMode, Interrupt
from lapic.registers import APIC_BASE_MSR

from .builders import (
    APIC_PAGE,
    ICR_ASSERT,
    ICR_INIT,
    ICR_LEVEL,
    ICR_NMI,
    MSR_EOI,
    MSR_ICR,
    MSR_SELF_IPI,
    MSR_TPR,
    REG_EOI,
    REG_TPR,
    guest_x2apic,
    irr,
    mmio_write,
    send_ipi,
    send_xapic_ipi,
    sw_enable,
    x2apic_vm,
    xapic_vm,
)

MSR = ExitReason.MSR_WRITE
U64 = (1 << 64) - 1
U32 = 0xFFFFFFFF
GPA_MAX = (1 << 52) - 1


def range_msg(name: str, value: int, lo: int, hi: int) -> str:
    """The exact message of an out-of-range argument (lapic.faults.check_int)."""
    return re.escape(f"{name}={value:#x} is outside [{lo:#x}, {hi:#x}]") + "$"


def type_msg(name: str, value: object) -> str:
    return re.escape(f"{name} must be an int, not {type(value).__name__}") + "$"


def run_state(v: Vcpu) -> RunState:
    return v.run_state


def mp_state(v: Vcpu) -> MpState:
    return v.mp_state


def refused(vm: Vm, fn: Callable[[], object], exc: type[Exception], match: str) -> None:
    """``fn`` raises ``exc`` matching ``match`` and the VM saw nothing: no exit, no counter."""
    before = vm.stats.as_dict()
    exits = vm.exits
    with pytest.raises(exc, match=match) as info:
        fn()
    assert type(info.value) is exc
    assert vm.stats.as_dict() == before
    assert vm.exits == exits


# =============================================================================================
# Guest accesses: argument checks (EXIT-1: a refused access is no exit)
# =============================================================================================
@pytest.mark.parametrize(
    ("msr", "value", "exc", "match"),
    [
        (1 << 32, 0, ApicValueError, range_msg("msr", 1 << 32, 0, U32)),
        (-1, 0, ApicValueError, range_msg("msr", -1, 0, U32)),
        (MSR_TPR, 1 << 64, ApicValueError, range_msg("value", 1 << 64, 0, U64)),
        (MSR_TPR, -1, ApicValueError, range_msg("value", -1, 0, U64)),
        ("0x808", 0, ApicTypeError, type_msg("msr", "")),
        (True, 0, ApicTypeError, type_msg("msr", True)),
        (MSR_TPR, "0", ApicTypeError, type_msg("value", "")),
        (MSR_TPR, 1.0, ApicTypeError, type_msg("value", 1.0)),
    ],
)
def test_wrmsr_refuses_a_bad_msr_or_value_naming_it_without_an_exit__EXIT_1(
    msr: Any, value: Any, exc: type[Exception], match: str
) -> None:
    vm = x2apic_vm([0, 1])
    refused(vm, lambda: vm.vcpu(0).wrmsr(msr, value), exc, match)


def test_wrmsr_accepts_the_largest_msr_and_value_as_a_guest_fault__EXIT_1() -> None:
    """The bounds are inclusive: MSR 0xFFFFFFFF with a 64-bit value is a real WRMSR (one exit),
    answered with #GP because no such MSR is modelled."""
    vm = x2apic_vm([0])
    with pytest.raises(GuestFault, match="not modelled"):
        vm.vcpu(0).wrmsr(U32, U64)
    assert vm.exits[-1] == Exit(0, MSR, U32, U64)


@pytest.mark.parametrize(
    ("msr", "exc", "match"),
    [
        (1 << 32, ApicValueError, range_msg("msr", 1 << 32, 0, U32)),
        (-1, ApicValueError, range_msg("msr", -1, 0, U32)),
        ("x", ApicTypeError, type_msg("msr", "x")),
    ],
)
def test_rdmsr_refuses_a_bad_msr_naming_it_without_an_exit__EXIT_1(
    msr: Any, exc: type[Exception], match: str
) -> None:
    vm = x2apic_vm([0])
    refused(vm, lambda: vm.vcpu(0).rdmsr(msr), exc, match)


def test_rdmsr_0_and_0xffffffff_are_real_accesses__EXIT_1() -> None:
    vm = x2apic_vm([0])
    for msr in (0, U32):
        with pytest.raises(GuestFault, match="not modelled"):
            vm.vcpu(0).rdmsr(msr)
        assert vm.exits[-1] == Exit(0, ExitReason.MSR_READ, msr, 0)


@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize(
    ("gpa", "exc", "match"),
    [
        (1 << 52, ApicValueError, range_msg("gpa", 1 << 52, 0, GPA_MAX)),
        (-1, ApicValueError, range_msg("gpa", -1, 0, GPA_MAX)),
        ("x", ApicTypeError, type_msg("gpa", "x")),
    ],
)
def test_mmio_refuses_a_gpa_beyond_52_bits_naming_it_without_an_exit__EXIT_1(
    op: str, gpa: Any, exc: type[Exception], match: str
) -> None:
    vm = xapic_vm(1)
    v = vm.vcpu(0)
    fn: Callable[[], object] = (lambda: v.mmio_read(gpa)) if op == "read" else (
        lambda: v.mmio_write(gpa, 0)
    )
    refused(vm, fn, exc, match)


@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("gpa", [0, APIC_PAGE - 1, APIC_PAGE + 0x1000, GPA_MAX])
def test_mmio_outside_the_apic_page_exits_then_is_refused_as_no_device__EXIT_1(
    op: str, gpa: int
) -> None:
    """Any 52-bit gpa is a valid address: the access exits (EPT misconfig), and KVM finds no
    device there (only the APIC page is modelled)."""
    vm = xapic_vm(1)
    v = vm.vcpu(0)
    with pytest.raises(ApicValueError, match=re.escape(f"gpa={gpa:#x} is outside the APIC page")):
        if op == "read":
            v.mmio_read(gpa)
        else:
            v.mmio_write(gpa, 0)
    assert vm.exits[-1].reason is ExitReason.EPT_MISCONFIG
    assert vm.exits[-1].qualification == gpa


def test_the_first_and_last_byte_of_the_apic_page_are_apic_registers__EXIT_1() -> None:
    vm = xapic_vm(1)
    v = vm.vcpu(0)
    assert v.mmio_read(APIC_PAGE, 1) == 0
    assert v.mmio_read(APIC_PAGE + 0xFFF, 1) == 0


def test_a_narrow_mmio_access_keeps_its_size__EXIT_1() -> None:
    """The access size reaches the APIC: a 1-byte read of the version register is its low byte,
    a 1-byte write is dropped (MMIO-1/2)."""
    vm = xapic_vm(1)
    v = vm.vcpu(0)
    version = v.mmio_read(APIC_PAGE + 0x30)
    assert version > 0xFF
    assert v.mmio_read(APIC_PAGE + 0x30, 1) == version & 0xFF
    assert v.mmio_read(APIC_PAGE + 0x30, 2) == version & 0xFFFF
    v.mmio_write(APIC_PAGE + REG_TPR, 0x20, 1)
    assert v.mmio_read(APIC_PAGE + REG_TPR) == 0


@pytest.mark.parametrize("msr", [0x800, 0xBFF])
def test_the_x2apic_msr_range_is_inclusive_at_both_ends__EXIT_1(msr: int) -> None:
    """0x800 and 0xBFF are x2APIC MSRs: in xAPIC mode the APIC itself refuses them."""
    vm = xapic_vm(1)
    v = vm.vcpu(0)
    with pytest.raises(GuestFault, match="outside x2APIC mode"):
        v.rdmsr(msr)
    with pytest.raises(GuestFault, match="outside x2APIC mode"):
        v.wrmsr(msr, 0)


@pytest.mark.parametrize("msr", [0x7FF, 0xC00])
def test_msrs_next_to_the_x2apic_range_are_unknown_msrs__EXIT_1(msr: int) -> None:
    vm = xapic_vm(1)
    v = vm.vcpu(0)
    with pytest.raises(GuestFault, match=re.escape(f"RDMSR {msr:#x}: MSR not modelled")):
        v.rdmsr(msr)
    with pytest.raises(GuestFault, match=re.escape(f"WRMSR {msr:#x}: MSR not modelled")):
        v.wrmsr(msr, 0)


# =============================================================================================
# Hypercall arguments (PVH-0, HC-1)
# =============================================================================================
@pytest.mark.parametrize("name", ["nr", "a0", "a1", "a2", "a3"])
@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_hypercall_registers_are_u64_and_a_bad_one_is_named__PVH_0(name: str, bad: int) -> None:
    vm = xapic_vm(2)
    kwargs: dict[str, Any] = {"nr": 0, "a0": 0, "a1": 0, "a2": 0, "a3": 0, name: bad}
    refused(
        vm,
        lambda: vm.vcpu(0).hypercall(**kwargs),
        ApicValueError,
        range_msg(name, bad, 0, U64),
    )


def test_hypercall_registers_take_u64_max__PVH_0() -> None:
    vm = xapic_vm(2)
    assert vm.vcpu(0).hypercall(U64, U64, U64, U64, U64) == (-1000) & U64


@pytest.mark.parametrize("cpl", [-1, 4])
def test_hypercall_cpl_is_0_to_3__HC_1(cpl: int) -> None:
    vm = xapic_vm(1)
    msg = range_msg("cpl", cpl, 0, 3)
    refused(vm, lambda: vm.vcpu(0).hypercall(0, cpl=cpl), ApicValueError, msg)
    assert vm.vcpu(0).hypercall(0, cpl=3) == U64  # -KVM_EPERM


def test_hypercall_arguments_default_to_zero__PVH_1() -> None:
    """a0..a3 default to 0: a SEND_IPI with only nr names no destination."""
    vm = xapic_vm(2, trace=True)
    vm.tracer.clear()
    assert vm.vcpu(0).hypercall(KVM_HC_SEND_IPI) == 0
    assert vm.tracer.of(KvmHypercall) == [KvmHypercall(0, KVM_HC_SEND_IPI, 0, 0, 0, 0)]
    assert vm.tracer.of(KvmPvSendIpi) == [KvmPvSendIpi(0, 0, 0, 0, 0, 0)]


def test_a_hypercall_is_traced_with_its_vcpu_and_registers__EXIT_1() -> None:
    vm = Vm(vcpu_ids=[4, 7], trace=True)
    sw_enable(vm, 0)
    sw_enable(vm, 1)
    vm.tracer.clear()
    # KVM_HC_SEND_IPI, bitmap bit 3 from min 4 -> APIC 7, vector 0x41
    assert vm.vcpu(0).hypercall(KVM_HC_SEND_IPI, 0b1000, 0x20, 4, 0x41) == 1
    assert vm.tracer.events[:2] == [
        KvmExit(4, ExitReason.VMCALL, KVM_HC_SEND_IPI),
        KvmHypercall(4, KVM_HC_SEND_IPI, 0b1000, 0x20, 4, 0x41),
    ]
    assert vm.tracer.of(KvmPvSendIpi) == [KvmPvSendIpi(4, 0b1000, 0x20, 4, 0x41, 1)]
    assert vm.stats.hypercalls == 1 and vm.stats.pv_ipi_calls == 1
    vm.vcpu(0).hypercall(KVM_HC_SEND_IPI, 0b1000, 0, 4, 0x42)
    assert vm.stats.hypercalls == 2 and vm.stats.pv_ipi_calls == 2


def test_kick_cpu_sends_a_remote_read_message_with_vector_0__HC_1() -> None:
    vm = xapic_vm(2, trace=True)
    vm.tracer.clear()
    assert vm.vcpu(0).hypercall(KVM_HC_KICK_CPU, 0, 1) == 0
    assert vm.tracer.of(KvmApicAcceptIrq) == [KvmApicAcceptIrq(1, 0x300, 0, 0, True)]
    assert vm.lapic(1).pv_unhalted is True
    assert vm.stats.ipis == 0  # the host sends it, not a vCPU


# =============================================================================================
# Host API argument checks (STATE-5, MSI-1)
# =============================================================================================
@pytest.mark.parametrize("name", ["x2apic_format", "enforce_pv_cpuid", "aps_started", "trace"])
def test_vm_bool_options_refuse_other_types_naming_them__STATE_5(name: str) -> None:
    with pytest.raises(ApicTypeError, match=re.escape(f"{name} must be a bool, not int") + "$"):
        kwargs: dict[str, Any] = {name: 1}
        Vm(1, **kwargs)


def test_vm_counts_are_checked_with_their_names__STATE_5() -> None:
    with pytest.raises(ApicValueError, match=range_msg("vcpus", 0, 1, 4096)):
        Vm(0)
    with pytest.raises(ApicValueError, match=range_msg("max_vcpu_ids", 0, 1, 1 << 32)):
        Vm(1, max_vcpu_ids=0)
    big = (1 << 32) + 1
    with pytest.raises(ApicValueError, match=range_msg("max_vcpu_ids", big, 1, 1 << 32)):
        Vm(1, max_vcpu_ids=big)
    with pytest.raises(ApicValueError, match=range_msg("exit_log", -1, 0, 1 << 32)):
        Vm(1, exit_log=-1)
    with pytest.raises(ApicValueError, match=range_msg("exit_log", big, 0, 1 << 32)):
        Vm(1, exit_log=big)
    with pytest.raises(ApicValueError, match=r"^vcpu_ids must name at least one vCPU$"):
        Vm(vcpu_ids=[])


def test_the_smallest_vm_has_one_vcpu_id__STATE_5() -> None:
    vm = Vm(1, max_vcpu_ids=1)
    assert len(vm) == 1 and vm.max_vcpu_ids == 1
    with pytest.raises(ApicValueError, match=range_msg("vcpu_id", 1, 0, 0)):
        vm.add_vcpu(1)


def test_vm_defaults_are_kvms__STATE_5() -> None:
    vm = Vm()
    assert len(vm) == 1
    assert vm.enforce_pv_cpuid is False
    assert vm.tracer.on is False and Tracer().on is False
    assert vm.exit_log is not None and vm.exit_log.maxlen == 4096
    assert vm.features == Features()
    assert vm.current is None
    assert vm.stats.as_dict() == Stats().as_dict()
    assert all(v == 0 or v == {} for v in Stats().as_dict().values())


def test_exit_log_0_keeps_no_log_but_counts__EXIT_1() -> None:
    vm = Vm(1, exit_log=0)
    assert vm.exit_log is None
    vm.vcpu(0).rdmsr(APIC_BASE_MSR)
    assert vm.exits == [] and vm.stats.exits == 1


def test_explicit_vm_options_override_the_profile__STATE_5() -> None:
    assert Vm(1, "sdm", broadcast_quirk=True).broadcast_quirk is True
    assert Vm(1, "kvm", broadcast_quirk=False).broadcast_quirk is False
    assert Vm(1, vector_hashing=True).vector_hashing is True
    assert Vm(1, vector_hashing=False).vector_hashing is False


def test_add_vcpu_checks_the_id_and_names_a_duplicate__STATE_5() -> None:
    vm = Vm(2, max_vcpu_ids=8)
    with pytest.raises(ApicValueError, match=range_msg("vcpu_id", -1, 0, 7)):
        vm.add_vcpu(-1)
    with pytest.raises(ApicValueError, match=range_msg("vcpu_id", 8, 0, 7)):
        vm.add_vcpu(8)
    with pytest.raises(ApicValueError, match=r"^vcpu_id=1 already exists$"):
        vm.add_vcpu(1)
    assert len(vm) == 2
    assert vm.add_vcpu(7).vcpu_id == 7


def test_vcpu_and_lapic_take_an_index_in_range__STATE_5() -> None:
    vm = Vm(2)
    for fn in (vm.vcpu, vm.lapic):
        with pytest.raises(ApicValueError, match=range_msg("i", 2, 0, 1)):
            fn(2)
        with pytest.raises(ApicValueError, match=range_msg("i", -1, 0, 1)):
            fn(-1)
    assert vm.vcpu(1).apic is vm.lapic(1)


def test_index_of_maps_a_vcpu_id_to_its_creation_index__STATE_5() -> None:
    vm = Vm(vcpu_ids=[4, 9])
    assert vm.index_of(9) == 1 and vm.index_of(4) == 0
    with pytest.raises(ApicValueError, match=r"^vcpu_id=5 does not exist$"):
        vm.index_of(5)


def test_a_vcpu_starts_not_in_guest_with_its_id_and_no_handlers__STATE_5() -> None:
    vm = Vm(vcpu_ids=[3, 6])
    v = vm.vcpu(1)
    assert (v.index, v.vcpu_id) == (1, 6)
    assert run_state(v) is RunState.NOT_STARTED and v.pcpu is None
    assert v.interrupt_handler is None and v.nmi_handler is None
    assert repr(v) == "<Vcpu index=1 id=6 not started mp=RUNNABLE pcpu=None exits=0>"


def test_deliver_refuses_what_is_not_an_interrupt_or_an_apic__STATE_5() -> None:
    vm = Vm(1)
    irq = Interrupt(0x41, DeliveryMode.FIXED, dest=0)
    with pytest.raises(ApicTypeError, match=r"^irq must be an Interrupt, not str$"):
        vm.deliver("irq")  # type: ignore[arg-type]
    with pytest.raises(ApicTypeError, match=r"^source must be a LocalApic, not int$"):
        vm.deliver(irq, 0)  # type: ignore[arg-type]


def test_set_msr_checks_the_value_and_names_unmodelled_msrs__STATE_5() -> None:
    vm = Vm(1)
    with pytest.raises(ApicValueError, match=range_msg("value", -1, 0, U64)):
        vm.set_msr(0, MSR_TPR, -1)
    with pytest.raises(ApicValueError, match=range_msg("value", 1 << 64, 0, U64)):
        vm.set_msr(0, MSR_TPR, 1 << 64)
    with pytest.raises(MsrError, match=r"^msr=0x7ff is not modelled: "):
        vm.set_msr(0, 0x7FF, 0)
    with pytest.raises(MsrError, match=r"^msr=0x7ff cannot be read on vCPU 0: "):
        vm.get_msr(0, 0x7FF)
    guest_x2apic(vm, 0)
    assert vm.set_msr(0, MSR_TPR, U64) is False  # reserved bits: #GP, reported as not set


@pytest.mark.parametrize("name", ["address_lo", "address_hi", "data", "flags"])
@pytest.mark.parametrize("bad", [-1, 1 << 32])
def test_signal_msi_checks_each_dword_by_name__MSI_1(name: str, bad: int) -> None:
    vm = xapic_vm(2)
    kwargs: dict[str, Any] = {"address_lo": 0xFEE00000, "address_hi": 0, "data": 0x41}
    kwargs |= {"flags": 0, name: bad}
    refused(vm, lambda: vm.signal_msi(**kwargs), ApicValueError, range_msg(name, bad, 0, U32))


def test_signal_msi_takes_zero_and_u32_max_in_every_dword__MSI_1() -> None:
    vm = xapic_vm(2)
    # argument checks pass at both ends (what the message does is the APICs' business)
    assert isinstance(vm.signal_msi(0, 0, 0, 0), int)
    assert isinstance(vm.signal_msi(U32, U32, U32, 0), int)
    assert vm.signal_msi(0xFEE00000, 0, 0x41, 0) == 1


def test_signal_msi_defaults_and_trace__MSI_1() -> None:
    """address_hi, data and flags default to 0; the traced address is the low dword, plus the
    high dword only under x2apic_format; each MSI is counted."""
    vm = xapic_vm(2, trace=True)
    vm.tracer.clear()
    lo = 0xFEE01000
    vm.signal_msi(lo)
    vm.signal_msi(lo, 0x100, 0x41)
    assert vm.tracer.of(KvmMsiSetIrq) == [KvmMsiSetIrq(lo, 0), KvmMsiSetIrq(lo, 0x41)]
    assert vm.stats.msis == 2
    x2 = Vm(2, x2apic_format=True, trace=True)
    sw_enable(x2, 0)
    sw_enable(x2, 1)
    x2.tracer.clear()
    assert x2.signal_msi(lo, data=0x42) == 1
    assert x2.signal_msi(lo, 0x100, 0x43) == 0  # dest 0x101: nobody, fast path
    assert x2.tracer.of(KvmMsiSetIrq) == [
        KvmMsiSetIrq(lo, 0x42),
        KvmMsiSetIrq((0x100 << 32) | lo, 0x43),
    ]


# =============================================================================================
# Counters and trace event fields (EXIT-1)
# =============================================================================================
def test_ipi_counters_are_exact__EXIT_1() -> None:
    vm = x2apic_vm([0, 1, 2])
    before = vm.stats.as_dict()
    send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
    send_ipi(vm, 0, ICR_ASSERT | 0x42, 2)
    after = vm.stats.as_dict()
    assert after["ipis"] == before["ipis"] + 2  # type: ignore[operator]
    assert after["fast_path"] == before["fast_path"] + 2  # type: ignore[operator]
    assert after["irqs_accepted"] == before["irqs_accepted"] + 2  # type: ignore[operator]
    assert after["slow_path"] == before["slow_path"]


def test_ipi_and_accept_events_carry_every_icr_field__EXIT_1() -> None:
    """kvm_apic_ipi: the source vCPU id, the ICR low dword (mode, dest mode, level, trigger,
    shorthand in place) and the destination; kvm_apic_accept_irq: the target, delivery mode in
    bits 10:8, trigger 1 for level."""
    vm = Vm(vcpu_ids=[2, 5], trace=True)
    for i in range(2):
        guest_x2apic(vm, i)
        sw_enable(vm, i)
    vm.tracer.clear()
    low = ICR_LEVEL | ICR_ASSERT | 0x100 | 0x41  # level, asserted, lowest priority
    send_ipi(vm, 0, low, 5)
    nmi_all = 0xC0000 | ICR_ASSERT | ICR_NMI | 0x800  # NMI, logical, all-excluding-self
    send_ipi(vm, 0, nmi_all, 0)
    assert vm.tracer.of(KvmApicIpi) == [KvmApicIpi(2, low, 5), KvmApicIpi(2, nmi_all, 0)]
    assert vm.tracer.of(KvmApicAcceptIrq) == [
        KvmApicAcceptIrq(5, 0x100, 1, 0x41, True),
        KvmApicAcceptIrq(5, 0x400, 0, 0, True),
    ]


def test_exit_and_eoi_events_name_the_vcpu_id__EXIT_1() -> None:
    vm = Vm(vcpu_ids=[3, 8], trace=True)
    sw_enable(vm, 1)
    send_xapic_ipi(vm, 0, ICR_ASSERT | 0x41, 8)
    vm.tracer.clear()
    assert vm.vcpu(1).run() == [0x41]
    assert vm.tracer.events == [
        KvmExit(8, ExitReason.EPT_MISCONFIG, APIC_PAGE + REG_EOI),
        KvmEoi(8, 0x41),
    ]


def test_stats_render_every_counter_and_exits_by_reason_name__EXIT_1() -> None:
    vm = x2apic_vm([0])
    vm.stats.clear()
    vm.vcpu(0).wrmsr(MSR_TPR, 0x10)
    d = vm.stats.as_dict()
    assert d["exits_by_reason"] == {"MSR_WRITE": 1}
    assert repr(vm.stats) == (
        "Stats(exits=1, exits_by_reason={'MSR_WRITE': 1}, fast_path=0, hypercalls=0, ipis=0, "
        "irqs_accepted=0, kicks=0, msis=0, pv_ipi_calls=0, slow_path=0, wakeups=0)"
    )


def test_dump_shows_the_vm_map_stats_and_each_vcpu_with_its_apic__EXIT_1() -> None:
    vm = Vm(vcpu_ids=[0, 3])
    text = vm.dump()
    lines = text.split("\n")
    assert lines[0] == (
        "Vm 2 vCPUs [kvm] accel=emulated x2apic_format=False broadcast_quirk=True "
        "vector_hashing=True"
    )
    assert lines[1] == f"  map: {vm.apic_map!r}"
    assert lines[1].startswith("  map: <ApicMap max_apic_id=255 ")
    assert lines[1].endswith("phys={0: 0}>")  # KVMB-8: vCPU 3 not in it yet
    assert lines[2] == f"  {vm.stats!r}"
    apic0 = vm.lapic(0).dump().splitlines()
    assert lines[3] == f"  {vm.vcpu(0)!r}"
    assert lines[4 : 4 + len(apic0)] == ["    " + line for line in apic0]
    assert lines[4 + len(apic0)] == f"  {vm.vcpu(1)!r}"
    assert len(lines) == 5 + 2 * len(apic0)


# =============================================================================================
# Time
# =============================================================================================
def _arm_one_shot(vm: Vm, i: int, vector: int, count: int) -> None:
    mmio_write(vm, i, 0x320, vector)  # LVT timer, one-shot
    mmio_write(vm, i, 0x3E0, 0xB)  # divide by 1
    mmio_write(vm, i, 0x380, count)


def test_advance_fires_due_timers_of_every_vcpu_including_hotplugged__EXIT_1() -> None:
    vm = xapic_vm(1)
    _arm_one_shot(vm, 0, 0x40, 100)
    assert vm.advance(0) == 0
    v = vm.add_vcpu(5)
    sw_enable(vm, 1)
    assert v.apic.clock is vm.clock
    _arm_one_shot(vm, 1, 0x41, 100)
    assert vm.advance(10**6) == 2
    assert irr(vm, 0) == {0x40} and irr(vm, 1) == {0x41}


# =============================================================================================
# The map (KVMB-8, MAP-3, INHIBIT-1)
# =============================================================================================
def test_the_map_misses_the_vcpu_created_last_until_dirtied__KVMB_8() -> None:
    """A fresh 2-vCPU VM: vCPU 0's physical NMI to APIC ID 1 is dropped (0 pending)."""
    vm = Vm(2)
    send_xapic_ipi(vm, 0, ICR_ASSERT | ICR_NMI, 1)
    assert vm.lapic(1).nmi_pending == 0
    sw_enable(vm, 0)  # any map-relevant write rebuilds it
    send_xapic_ipi(vm, 0, ICR_ASSERT | ICR_NMI, 1)
    assert vm.lapic(1).nmi_pending == 1


def test_without_the_kvmb_8_quirk_a_new_vcpu_is_in_the_map_at_once__KVMB_8() -> None:
    vm = Vm(2, "sdm")
    apic_map = vm.apic_map
    assert apic_map is not None and apic_map.phys_map[1] is vm.lapic(1)
    # the PV IPI hypercall reads the map under every profile (PVH-1)
    sw_enable(vm, 1)
    assert vm.vcpu(0).hypercall(KVM_HC_SEND_IPI, 0b10, 0, 0, 0x41) == 1


def test_the_map_built_at_vcpu_creation_follows_x2apic_format__MAP_3__KVMB_8() -> None:
    """vCPU 256's xAPIC ID aliases vCPU 0's; with x2apic_format the map built while creating
    vCPU 1 resolves the alias (MAP-3) and still lacks vCPU 1 (KVMB-8)."""
    vm = Vm(vcpu_ids=[0, 256, 1], x2apic_format=True)
    apic_map = vm.apic_map
    assert apic_map is not None
    assert apic_map.phys_map[0] is vm.lapic(0) and apic_map.phys_map[256] is vm.lapic(1)
    assert apic_map.phys_map[1] is None


def test_the_apic_base_inhibit_is_sticky_and_alone__INHIBIT_1() -> None:
    vm = xapic_vm(1)
    assert vm.inhibits == 0
    base = vm.vcpu(0).rdmsr(APIC_BASE_MSR)
    vm.vcpu(0).wrmsr(APIC_BASE_MSR, (base & 0xFFF) | 0xFEF00000)
    assert vm.inhibits == Inhibits.APIC_BASE_MODIFIED
    vm.vcpu(0).wrmsr(APIC_BASE_MSR, base)
    assert vm.inhibits == Inhibits.APIC_BASE_MODIFIED


# =============================================================================================
# Scheduling: the accelerator's hooks (EXIT-1), kicks and wake-ups (WAKE-1), KVMB-9
# =============================================================================================
class Spy(Emulated):
    """Trap-and-emulate that records every scheduling hook with its arguments."""

    name = "spy"

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def last(self) -> tuple[object, ...]:
        return self.calls[-1]

    def attach(self, vm: Vm) -> None:
        self.calls.append(("attach", vm, len(vm.vcpus)))

    def vcpu_load(self, vcpu: Vcpu, pcpu: Pcpu) -> None:
        self.calls.append(("load", vcpu, pcpu.id))

    def vcpu_put(self, vcpu: Vcpu) -> None:
        self.calls.append(("put", vcpu))

    def vcpu_blocking(self, vcpu: Vcpu) -> None:
        self.calls.append(("blocking", vcpu))

    def vcpu_unblocking(self, vcpu: Vcpu) -> None:
        self.calls.append(("unblocking", vcpu))


@pytest.fixture
def spy_vm(monkeypatch: pytest.MonkeyPatch) -> tuple[Vm, Spy]:
    monkeypatch.setitem(ACCELERATORS, "spy", Spy)
    vm = Vm(2, accelerator="spy")
    assert isinstance(vm.accel, Spy)
    return vm, vm.accel


def test_the_accelerator_is_attached_after_each_vcpu_is_created__EXIT_1(
    spy_vm: tuple[Vm, Spy],
) -> None:
    vm, spy = spy_vm
    assert spy.calls == [("attach", vm, 1), ("attach", vm, 2)]
    vm.add_vcpu(9)
    assert spy.last() == ("attach", vm, 3)


def test_the_accelerator_sees_load_put_block_and_unblock__EXIT_1(
    spy_vm: tuple[Vm, Spy],
) -> None:
    vm, spy = spy_vm
    v0, v1 = vm.vcpu(0), vm.vcpu(1)
    sw_enable(vm, 0)
    sw_enable(vm, 1)
    spy.calls.clear()
    v1.halt()
    assert spy.calls == [("blocking", v1)]
    send_xapic_ipi(vm, 0, ICR_ASSERT | 0x41, 1)  # wakes vCPU 1
    assert spy.last() == ("unblocking", v1)
    v0.preempt()
    assert spy.last() == ("put", v0)
    v0.preempt()  # not in guest: nothing
    v0.enter(3)
    assert spy.last() == ("load", v0, 3)
    spy.calls.clear()
    v0.enter(4)  # already in guest: no unblocking
    assert spy.calls == [("load", v0, 4)]
    assert v1.run() == [0x41]
    assert v1.halt() is True
    spy.calls.clear()
    v1.enter()  # the host forces a blocked vCPU in
    assert spy.calls == [("unblocking", v1), ("load", v1, 1)]


def test_init_to_a_vcpu_in_guest_puts_it__KVMB_9(spy_vm: tuple[Vm, Spy]) -> None:
    vm, spy = spy_vm
    v1 = vm.vcpu(1)
    sw_enable(vm, 1)
    sw_enable(vm, 0)
    spy.calls.clear()
    kicks = vm.stats.kicks
    send_xapic_ipi(vm, 0, ICR_ASSERT | ICR_INIT, 1)
    assert run_state(v1) is RunState.PREEMPTED
    assert spy.calls == [("put", v1)]
    assert vm.stats.kicks == kicks + 1


def test_enter_reuses_the_last_pcpu_and_checks_it_by_name__EXIT_1() -> None:
    vm = Vm(2)
    v = vm.vcpu(1)
    v.enter(7)
    assert v.pcpu == 7 and run_state(v) is RunState.IN_GUEST
    v.preempt()
    assert run_state(v) is RunState.PREEMPTED
    v.mmio_read(APIC_PAGE + 0x30)
    assert v.pcpu == 7
    v.enter(1 << 20)
    assert v.pcpu == 1 << 20
    with pytest.raises(ApicValueError, match=range_msg("pcpu", (1 << 20) + 1, 0, 1 << 20)):
        v.enter((1 << 20) + 1)
    with pytest.raises(ApicValueError, match=range_msg("pcpu", -1, 0, 1 << 20)):
        v.enter(-1)
    assert v.pcpu == 1 << 20


def test_the_first_guest_access_enters_the_vcpu__KVMB_9() -> None:
    for access in ("wrmsr", "mmio"):
        vm = Vm(2)
        v = vm.vcpu(1)
        assert run_state(v) is RunState.NOT_STARTED
        if access == "wrmsr":
            base = vm.get_msr(1, APIC_BASE_MSR)
            v.wrmsr(APIC_BASE_MSR, base | 0x400)
        else:
            v.mmio_write(APIC_PAGE + REG_TPR, 0x10)
        assert run_state(v) is RunState.IN_GUEST and v.pcpu == 1
        assert vm.current is v


def test_a_halted_vcpu_executes_nothing_until_run__WAKE_1() -> None:
    vm = x2apic_vm([0, 1])
    v = vm.vcpu(1)
    assert v.halt() is True
    halted = re.escape("vcpu 1 is halted: run() it before it executes") + "$"
    refused(vm, lambda: v.wrmsr(MSR_TPR, 0), ApicValueError, halted)
    refused(vm, lambda: v.rdmsr(MSR_TPR), ApicValueError, halted)
    refused(vm, lambda: v.hypercall(0), ApicValueError, halted)


def test_an_ap_waiting_for_sipi_executes_nothing__KVMB_9() -> None:
    vm = Vm(2, aps_started=False)
    v = vm.vcpu(1)
    msg = re.escape(
        "vcpu 1 is UNINITIALIZED: it executes nothing until INIT/SIPI start it "
        "(or Vm(aps_started=True))"
    ) + "$"
    refused(vm, lambda: v.mmio_read(APIC_PAGE + 0x30), ApicValueError, msg)


def test_a_sipi_alone_is_processed_before_the_vcpu_executes__KVMB_9() -> None:
    """A pending SIPI (no INIT) is consumed, and dropped, at the next entry."""
    vm = xapic_vm(2)
    vm.vcpu(1).preempt()
    send_xapic_ipi(vm, 0, ICR_ASSERT | 0x600 | 0x9A, 1)
    assert vm.lapic(1).sipi_pending is True
    vm.vcpu(1).mmio_read(APIC_PAGE + 0x30)
    assert vm.lapic(1).sipi_pending is False
    assert vm.vcpu(1).sipi_entry is None


def test_has_events_counts_a_sipi_only_while_waiting_for_it__WAKE_1() -> None:
    vm = xapic_vm(2)
    v = vm.vcpu(1)
    send_xapic_ipi(vm, 0, ICR_ASSERT | ICR_INIT, 1)
    assert v.run() == []
    assert mp_state(v) is MpState.INIT_RECEIVED
    assert v.has_events() is False
    send_xapic_ipi(vm, 0, ICR_ASSERT | 0x600 | 0x9A, 1)
    assert v.has_events() is True
    v.run()
    assert mp_state(v) is MpState.RUNNABLE and v.sipi_entry == 0x9A000
    assert vm.lapic(1).sipi_pending is False
    # a SIPI to a running vCPU is no event
    send_xapic_ipi(vm, 0, ICR_ASSERT | 0x600 | 0x9B, 1)
    assert v.has_events() is False


def test_kicks_count_only_other_vcpus_running_in_guest__WAKE_1() -> None:
    """A kick is a host IPI to a target in guest mode on another pCPU: never for the sender
    itself, a preempted or a not-started target; a halted one is woken instead."""
    vm = x2apic_vm([0, 1, 2])
    v0, v1, v2 = vm.vcpu(0), vm.vcpu(1), vm.vcpu(2)
    assert run_state(v1) is RunState.IN_GUEST
    kicks, wakeups = vm.stats.kicks, vm.stats.wakeups
    v0.wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | 0x41)
    v0.wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | 0x42)
    assert vm.stats.kicks == kicks + 2
    assert run_state(v1) is RunState.IN_GUEST  # a fixed IPI does not force it out
    v2.rdmsr(MSR_TPR)  # vCPU 2 executes last
    v0.wrmsr(MSR_SELF_IPI, 0x43)  # vCPU 0 again: its own IPI is no kick
    assert vm.stats.kicks == kicks + 2
    v2.preempt()
    v0.wrmsr(MSR_ICR, (2 << 32) | ICR_ASSERT | 0x44)
    assert vm.stats.kicks == kicks + 2
    assert vm.stats.wakeups == wakeups


def test_a_self_init_is_no_kick__KVMB_9() -> None:
    vm = xapic_vm(2)
    v0 = vm.vcpu(0)
    vm.vcpu(1).mmio_read(APIC_PAGE + 0x30)
    kicks = vm.stats.kicks
    mmio_write(vm, 0, 0x300, 0x40000 | ICR_ASSERT | ICR_INIT)  # INIT to self
    assert run_state(v0) is RunState.PREEMPTED
    assert vm.stats.kicks == kicks


def test_each_wakeup_is_counted_and_leaves_the_vcpu_preempted__WAKE_1() -> None:
    vm = xapic_vm(2)
    v1 = vm.vcpu(1)
    wakeups = vm.stats.wakeups
    for n, vector in enumerate((0x41, 0x42), 1):
        assert v1.halt() is True
        send_xapic_ipi(vm, 0, ICR_ASSERT | vector, 1)
        assert run_state(v1) is RunState.PREEMPTED and mp_state(v1) is MpState.RUNNABLE
        assert vm.stats.wakeups == wakeups + n
        assert v1.run() == [vector]
    assert v1.handled == [0x41, 0x42]


def test_init_wakes_a_halted_vcpu_and_counts_a_wakeup__WAKE_1() -> None:
    vm = xapic_vm(2)
    v1 = vm.vcpu(1)
    v1.halt()
    wakeups, kicks = vm.stats.wakeups, vm.stats.kicks
    send_xapic_ipi(vm, 0, ICR_ASSERT | ICR_INIT, 1)
    assert vm.stats.wakeups == wakeups + 1 and vm.stats.kicks == kicks
    assert run_state(v1) is RunState.PREEMPTED


def test_run_enters_a_vcpu_with_nothing_pending_and_makes_it_current__WAKE_1() -> None:
    vm = xapic_vm(2)
    v1 = vm.vcpu(1)
    v1.preempt()
    vm.vcpu(0).mmio_read(APIC_PAGE + 0x30)
    assert v1.run() == []
    assert run_state(v1) is RunState.IN_GUEST and vm.current is v1
    assert vm.lapic(1).pv_unhalted is False


def test_the_default_handler_records_and_eois_with_zero__EXIT_1() -> None:
    for x2 in (False, True):
        vm = x2apic_vm([0, 1]) if x2 else xapic_vm(2)
        send_ipi(vm, 0, ICR_ASSERT | 0x41, 1)
        assert vm.vcpu(1).run() == [0x41]
        assert vm.vcpu(1).handled == [0x41]
        eoi = vm.exits[-1]
        if x2:
            assert eoi == Exit(1, MSR, MSR_EOI, 0)
        else:
            assert eoi == Exit(1, ExitReason.EPT_MISCONFIG, APIC_PAGE + REG_EOI, 0)
