"""``Guest``/``GuestCpu``: API surface, register access per mode, TPR, EOI, halt, checks."""

from __future__ import annotations

import pytest

from guest import DRIVERS, Guest, GuestCpu
from hypervisor import Exit, ExitReason, RunState, Vm
from lapic import ApicTypeError, ApicValueError

from .support import APIC_PAGE, boot, exits_of, run_all

V = 0x41
EPT = ExitReason.EPT_MISCONFIG


def test_the_public_api_has_the_agreed_names() -> None:
    assert DRIVERS == ("flat", "physflat", "x2apic_phys", "x2apic_cluster", "kvm_pv")
    vm, g = boot("x2apic_cluster", 3)
    assert len(g) == 3
    assert [c.index for c in g.cpus] == [0, 1, 2]
    assert g.cpu(2) is g.cpus[2] and isinstance(g.cpu(2), GuestCpu)
    assert g.cpu(1).vcpu is vm.vcpu(1)
    assert g.driver.name == "x2apic_cluster"
    assert g.cpu(1).apicid == 1


def test_cpu_numbers_are_vcpu_indexes_not_apic_ids() -> None:
    _, g = boot("x2apic_phys", vcpu_ids=[7, 3, 5])
    assert g.cpu_to_apicid == [7, 3, 5]
    g.cpu(0).send_IPI_mask([1], V)
    assert run_all(g) == [[], [V], []]


def test_x2apic_register_access_is_rdmsr_wrmsr_at_0x800_plus_offset_over_16() -> None:
    vm, g = boot("x2apic_phys")
    cpu = g.cpu(1)
    assert exits_of(vm, lambda: cpu.write_apic(0x80, 0x20)) == [
        Exit(1, ExitReason.MSR_WRITE, 0x808, 0x20)
    ]
    assert exits_of(vm, lambda: cpu.read_apic(0x80)) == [Exit(1, ExitReason.MSR_READ, 0x808, 0)]
    assert cpu.read_apic(0x80) == 0x20
    assert cpu.read_apic(0x20) == 1


def test_xapic_register_access_is_mmio_at_the_apic_base() -> None:
    vm, g = boot("physflat")
    cpu = g.cpu(2)
    assert exits_of(vm, lambda: cpu.write_apic(0x80, 0x30)) == [
        Exit(2, EPT, APIC_PAGE + 0x80, 0x30)
    ]
    assert exits_of(vm, lambda: cpu.read_apic(0x80)) == [Exit(2, EPT, APIC_PAGE + 0x80, 0)]
    assert cpu.read_apic(0x80) == 0x30
    assert cpu.read_apic(0x20) == 2 << 24


def test_xapic_access_uses_a_relocated_apic_base() -> None:
    vm = Vm(2)
    vm.set_msr(1, 0x1B, 0xFED00000 | 0x800)
    g = Guest(vm, "physflat")
    assert exits_of(vm, lambda: g.cpu(1).read_apic(0x30))[0].qualification == 0xFED00030
    assert g.cpu_to_apicid == [0, 1]


def test_set_tpr_holds_back_lower_priority_classes_until_lowered() -> None:
    for driver in ("physflat", "x2apic_phys"):
        vm, g = boot(driver)
        cpu = g.cpu(0)
        cpu.set_tpr(0x50)
        assert vm.lapic(0).tpr == 0x50
        cpu.send_IPI_self(0x45)
        assert cpu.run() == []
        cpu.set_tpr(0)
        assert cpu.run() == [0x45]


def test_the_handler_eoi_goes_through_the_modes_interface() -> None:
    vm, g = boot("x2apic_phys")
    g.cpu(0).send_IPI(1, V)
    assert exits_of(vm, lambda: g.cpu(1).run()) == [Exit(1, ExitReason.MSR_WRITE, 0x80B, 0)]
    vm, g = boot("flat")
    g.cpu(0).send_IPI(1, V)
    assert exits_of(vm, lambda: g.cpu(1).run()) == [Exit(1, EPT, APIC_PAGE + 0xB0, 0)]
    assert not vm.lapic(1).isr


def test_higher_vectors_are_handled_first_and_each_is_eoied() -> None:
    vm, g = boot("x2apic_phys")
    g.cpu(0).send_IPI(1, 0x40)
    g.cpu(0).send_IPI(1, 0x80)
    assert g.cpu(1).run() == [0x80, 0x40]
    assert g.cpu(1).handled == [0x80, 0x40]
    assert not vm.lapic(1).isr and not vm.lapic(1).irr


def test_eoi_clears_the_highest_in_service_vector() -> None:
    vm, g = boot("x2apic_phys")
    g.cpu(0).send_IPI_self(V)
    assert vm.lapic(0).ack() == V  # in service, as if the handler had not finished
    g.cpu(0).eoi()
    assert not vm.lapic(0).isr


def test_halt_blocks_until_an_ipi_wakes_the_cpu() -> None:
    vm, g = boot("x2apic_cluster")
    assert g.cpu(3).halt() is True
    assert vm.vcpu(3).run_state is RunState.BLOCKED
    assert g.cpu(3).run() == []
    g.cpu(0).send_IPI_mask([3], V)
    assert vm.stats.wakeups == 1
    assert g.cpu(3).run() == [V]


def test_halt_does_not_block_with_an_interrupt_pending() -> None:
    _, g = boot("x2apic_phys")
    g.cpu(0).send_IPI_self(V)
    assert g.cpu(0).halt() is False


@pytest.mark.parametrize("driver", ["flat", "x2apic_phys"])
def test_a_guest_rejects_bad_arguments(driver: str) -> None:
    vm, g = boot(driver)
    cpu = g.cpu(0)
    with pytest.raises(ApicValueError, match="vector"):
        cpu.send_IPI_mask([1], 0x100)
    with pytest.raises(ApicValueError, match="cpu"):
        cpu.send_IPI_mask([4], V)
    with pytest.raises(ApicTypeError, match="cpus"):
        cpu.send_IPI_mask(1, V)  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match="target"):
        cpu.send_IPI(4, V)
    with pytest.raises(ApicValueError, match="i="):
        g.cpu(4)
    with pytest.raises(ApicValueError, match="value"):
        cpu.set_tpr(0x100)
    with pytest.raises(ApicValueError, match="reg_offset"):
        cpu.read_apic(0x4000)
    assert vm.stats.ipis == 0


def test_x2apic_register_offsets_must_be_16_byte_aligned() -> None:
    _, g = boot("x2apic_phys")
    with pytest.raises(ApicValueError, match="16-aligned"):
        g.cpu(0).read_apic(0x84)


def test_a_mask_is_a_set_visited_in_cpu_order() -> None:
    vm, g = boot("x2apic_phys")
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask([3, 1, 3, 1], V))
    assert [e.value >> 32 for e in exits] == [1, 3]


def test_guest_constructor_checks_its_options() -> None:
    with pytest.raises(ApicValueError, match="driver="):
        Guest(Vm(2), "bigsmp")
    with pytest.raises(ApicTypeError, match="driver"):
        Guest(Vm(2), 3)  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match="only applies"):
        Guest(Vm(2), "x2apic_phys", base="flat")
    with pytest.raises(ApicValueError, match="base="):
        Guest(Vm(2), "kvm_pv", base="kvm_pv")
    with pytest.raises(ApicValueError, match="bits_per_long"):
        Guest(Vm(2), "kvm_pv", bits_per_long=16)
