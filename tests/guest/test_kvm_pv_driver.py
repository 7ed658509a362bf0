"""The ``kvm_pv`` driver on a running VM (reference ``kvm_lapic.md`` §13, PVG-1..5)."""

from __future__ import annotations

import pytest

from guest import Guest, KvmPv
from hypervisor import Exit, ExitReason, Vm
from hypervisor.pv_ipi import KVM_FEATURE_PV_UNHALT, KVM_HC_SEND_IPI
from hypervisor.trace import KvmHypercall

from .support import ICR_MSR, boot, exits_of, reasons, run_all

V = 0x41


def hypercall_args(vm: Vm) -> list[tuple[int, int, int, int]]:
    return [
        (e.a0, e.a1, e.a2, e.a3) for e in vm.tracer.of(KvmHypercall) if isinstance(e, KvmHypercall)
    ]


# ---------------------------------------------------------------------------------------
# PVG-1: when kvm_pv is installed, and what it replaces
# ---------------------------------------------------------------------------------------
def test_kvm_pv_is_installed_over_the_default_base_x2apic_phys__PVG_1() -> None:
    _, g = boot("kvm_pv")
    assert isinstance(g.driver, KvmPv)
    assert g.driver.name == "kvm_pv"
    assert g.driver.base.name == "x2apic_phys"


@pytest.mark.parametrize("base", ["flat", "physflat", "x2apic_phys", "x2apic_cluster"])
def test_kvm_pv_sits_on_any_base_driver__PVG_1(base: str) -> None:
    vm, g = boot("kvm_pv", base=base)
    assert isinstance(g.driver, KvmPv) and g.driver.base.name == base
    assert g.driver.x2apic == base.startswith("x2apic")
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask([1, 2, 3], V))
    assert [e.reason for e in exits] == [ExitReason.VMCALL]
    assert run_all(g) == [[], [V], [V], [V]]


def test_a_one_cpu_guest_keeps_its_base_driver__PVG_1() -> None:
    vm, g = boot("kvm_pv", 1)
    assert g.driver.name == "x2apic_phys"
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask([0], V))
    assert exits == [Exit(0, ExitReason.MSR_WRITE, ICR_MSR, V)]
    assert g.cpu(0).run() == [V]


def test_without_the_pv_send_ipi_cpuid_bit_the_base_driver_stays__PVG_1() -> None:
    vm = Vm(4, pv_features=(KVM_FEATURE_PV_UNHALT,))
    g = Guest(vm, "kvm_pv", base="x2apic_cluster")
    assert g.driver.name == "x2apic_cluster"
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask([1, 2, 3], V))
    assert reasons(exits) == {ExitReason.MSR_WRITE: 1}


def test_shorthands_and_self_ipi_fall_through_to_the_base_driver__PVG_1() -> None:
    vm, g = boot("kvm_pv")
    cpu = g.cpu(1)
    assert exits_of(vm, lambda: cpu.send_IPI_allbutself(V)) == [
        Exit(1, ExitReason.MSR_WRITE, ICR_MSR, 0xC0000 | V)
    ]
    assert exits_of(vm, lambda: cpu.send_IPI_all(V + 1)) == [
        Exit(1, ExitReason.MSR_WRITE, ICR_MSR, 0x80000 | (V + 1))
    ]
    assert exits_of(vm, lambda: cpu.send_IPI_self(V + 2)) == [
        Exit(1, ExitReason.MSR_WRITE, ICR_MSR, 0x40000 | (V + 2))
    ]
    assert run_all(g) == [[V + 1, V], [V + 2, V + 1], [V + 1, V], [V + 1, V]]


def test_a_single_cpu_ipi_uses_the_base_send_ipi__PVG_1() -> None:
    """x2APIC ``send_IPI`` is not replaced by ``kvm_setup_pv_ipi``: one ICR write."""
    vm, g = boot("kvm_pv")
    assert exits_of(vm, lambda: g.cpu(0).send_IPI(3, V)) == [
        Exit(0, ExitReason.MSR_WRITE, ICR_MSR, 3 << 32 | V)
    ]


def test_flat_single_cpu_ipi_goes_through_the_installed_pv_mask_send__PVG_1() -> None:
    """flat's ``default_send_IPI_single`` calls ``apic->send_IPI_mask``, which is kvm_pv's."""
    vm, g = boot("kvm_pv", base="flat", trace=True)
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI(3, V))
    assert [e.reason for e in exits] == [ExitReason.VMCALL]
    assert hypercall_args(vm) == [(1, 0, 3, V)]
    assert run_all(g) == [[], [], [], [V]]


# ---------------------------------------------------------------------------------------
# PVG-2/PVG-3: one VMCALL per window, with the encoder's arguments
# ---------------------------------------------------------------------------------------
def test_ids_0_1_2_130_take_two_vmcalls_with_the_worked_example_arguments__PVG_3() -> None:
    vm, g = boot("kvm_pv", vcpu_ids=[0, 1, 2, 130], trace=True)
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask(range(4), 0xF1))
    assert exits == [Exit(0, ExitReason.VMCALL, KVM_HC_SEND_IPI, 0)] * 2
    assert hypercall_args(vm) == [(0x7, 0, 0, 0xF1), (0x1, 0, 130, 0xF1)]
    assert run_all(g) == [[0xF1]] * 4


def test_cpus_are_visited_in_cpu_order_so_ids_5_then_3_shift_left__PVG_3() -> None:
    vm, g = boot("kvm_pv", vcpu_ids=[9, 5, 3], trace=True)
    g.cpu(0).send_IPI_mask([2, 1], V)
    assert hypercall_args(vm) == [(0b101, 0, 3, V)]
    assert run_all(g) == [[], [V], [V]]


def test_an_nmi_mask_send_arrives_as_an_nmi_without_eoi__PVG_2() -> None:
    vm, g = boot("kvm_pv", trace=True)
    g.cpu(0).send_IPI_mask([1], 2)
    assert hypercall_args(vm) == [(1, 0, 1, 0x400)]
    assert vm.lapic(1).nmi_pending == 1
    exits = exits_of(vm, lambda: g.cpu(1).run())
    assert exits == [], "no EOI for an NMI"
    assert g.cpu(1).handled == [2]


def test_an_empty_mask_makes_no_hypercall__PVG_3() -> None:
    vm, g = boot("kvm_pv")
    assert exits_of(vm, lambda: g.cpu(0).send_IPI_mask([], V)) == []


def test_an_i386_guest_uses_64_id_windows_and_32_bit_hypercalls__PVG_3() -> None:
    vm, g = boot("kvm_pv", vcpu_ids=[0, 63, 64], bits_per_long=32, trace=True)
    g.cpu(0).send_IPI_mask(range(3), V)
    assert hypercall_args(vm) == [(1, 1 << 31, 0, V), (1, 0, 64, V)]
    assert run_all(g) == [[V], [V], [V]]
    vm64, g64 = boot("kvm_pv", vcpu_ids=[0, 63, 64], trace=True)
    g64.cpu(0).send_IPI_mask(range(3), V)
    assert hypercall_args(vm64) == [(1 | 1 << 63, 1, 0, V)]


# ---------------------------------------------------------------------------------------
# PVG-4: results are only checked
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits_per_long", [64, 32])
def test_negative_results_are_recorded_and_later_windows_still_sent__PVG_4(
    bits_per_long: int,
) -> None:
    """xAPIC IDs aliased (vCPU 256 reads ID 0): no map, every call is -EOPNOTSUPP (PVH-12).

    CPU order gives IDs 0, 0, 1: the repeat of ``min`` flushes, so two hypercalls, both
    failing, neither retried, no fallback to the base driver's ICR writes.
    """
    vm, g = boot("kvm_pv", vcpu_ids=[0, 256, 1], base="physflat", bits_per_long=bits_per_long)
    assert g.cpu_to_apicid == [0, 0, 1]
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask(range(3), V))
    assert reasons(exits) == {ExitReason.VMCALL: 2}
    assert g.cpu(0).pv_errors == [-95, -95]
    assert run_all(g) == [[], [], []]


def test_successful_hypercalls_record_no_error__PVG_4() -> None:
    _, g = boot("kvm_pv")
    g.cpu(0).send_IPI_mask(range(4), V)
    assert g.cpu(0).pv_errors == []


# ---------------------------------------------------------------------------------------
# PVG-5: allbutself
# ---------------------------------------------------------------------------------------
def test_allbutself_clears_the_sender_before_encoding__PVG_5() -> None:
    vm, g = boot("kvm_pv", trace=True)
    g.cpu(1).send_IPI_mask_allbutself(range(4), V)
    assert hypercall_args(vm) == [(0b1101, 0, 0, V)]
    assert run_all(g) == [[V], [], [V], [V]]


def test_allbutself_of_only_the_sender_makes_no_hypercall__PVG_5() -> None:
    vm, g = boot("kvm_pv")
    assert exits_of(vm, lambda: g.cpu(2).send_IPI_mask_allbutself([2], V)) == []
    assert run_all(g) == [[], [], [], []]


def test_the_mask_send_includes_the_sender_when_listed__PVG_5() -> None:
    """Only the allbutself variant clears self; ``send_IPI_mask`` keeps it."""
    _, g = boot("kvm_pv")
    g.cpu(1).send_IPI_mask([1, 2], V)
    assert run_all(g) == [[], [V], [V], []]
