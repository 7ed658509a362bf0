"""Linux's APIC drivers on a running VM: boot, exits per send, delivery.

Exit sequences are compared as whole ``Exit`` records (vCPU, reason, MSR or guest-physical
address, value written), so a test fails on a wrong register, value, order or count.
"""

from __future__ import annotations

from collections import Counter

import pytest

from guest import DRIVERS, Guest
from hypervisor import Exit, ExitReason, Vm
from lapic import ApicValueError, Features
from lapic.destination import x2apic_ldr

from .support import APIC_PAGE, ICR_MSR, boot, exits_of, reasons, run_all

V = 0x41
EPT = ExitReason.EPT_MISCONFIG
WR = ExitReason.MSR_WRITE
RD = ExitReason.MSR_READ
ICR = APIC_PAGE + 0x300
ICR2 = APIC_PAGE + 0x310


def xapic_ipi(vcpu: int, dest: int, low: int) -> list[Exit]:
    """``__default_send_IPI_dest_field`` as exits: ICR idle read, ICR2, ICR."""
    return [Exit(vcpu, EPT, ICR, 0), Exit(vcpu, EPT, ICR2, dest << 24), Exit(vcpu, EPT, ICR, low)]


# ---------------------------------------------------------------------------------------
# Boot
# ---------------------------------------------------------------------------------------
def test_x2apic_boot_is_rmw_apic_base_then_svr_tpr_then_id_and_ldr_readback() -> None:
    vm = Vm(1)
    exits = exits_of(vm, lambda: Guest(vm, "x2apic_phys"))
    base = 0xFEE00000 | 0x100 | 0x800  # BSP, EN
    assert exits == [
        Exit(0, RD, 0x1B, 0),
        Exit(0, WR, 0x1B, base | 0x400),
        Exit(0, WR, 0x80F, 0x1FF),
        Exit(0, WR, 0x808, 0),
        Exit(0, RD, 0x802, 0),
        Exit(0, RD, 0x80D, 0),
    ]


def test_x2apic_boot_skips_the_apic_base_write_when_already_in_x2apic_mode() -> None:
    vm = Vm(2)
    Guest(vm, "x2apic_cluster")
    exits = exits_of(vm, lambda: Guest(vm, "x2apic_phys"))
    assert Exit(0, RD, 0x1B, 0) in exits
    assert all(not (e.reason == WR and e.qualification == 0x1B) for e in exits)


@pytest.mark.parametrize("driver", ["x2apic_phys", "x2apic_cluster", "kvm_pv"])
def test_x2apic_boot_reads_the_x2apic_id_and_ldr(driver: str) -> None:
    ids = [0, 1, 17, 35, 300]
    vm, g = boot(driver, vcpu_ids=ids)
    assert g.cpu_to_apicid == ids
    assert g.cpu_to_logical_apicid == [x2apic_ldr(i) for i in ids]
    assert g.cpu_to_logical_apicid[3] == (2 << 16) | (1 << 3)
    for i in range(len(ids)):
        apic = vm.lapic(i)
        assert apic.x2apic_mode and apic.svr == 0x1FF and apic.tpr == 0


def test_flat_boot_sets_dfr_flat_and_ldr_one_bit_per_cpu() -> None:
    vm = Vm(3)
    exits = exits_of(vm, lambda: Guest(vm, "flat"))
    p = APIC_PAGE
    assert exits[:7] == [
        Exit(0, EPT, p + 0xE0, 0xFFFFFFFF),
        Exit(0, EPT, p + 0xD0, 0),
        Exit(0, EPT, p + 0xD0, 1 << 24),
        Exit(0, EPT, p + 0xF0, 0x1FF),
        Exit(0, EPT, p + 0x80, 0),
        Exit(0, EPT, p + 0x20, 0),
        Exit(0, EPT, p + 0xD0, 0),
    ]
    assert len(exits) == 21
    g = Guest(vm, "flat")
    assert g.cpu_to_apicid == [0, 1, 2]
    assert g.cpu_to_logical_apicid == [1, 2, 4]
    for i in range(3):
        apic = vm.lapic(i)
        assert apic.ldr == (1 << i) << 24 and apic.dfr == 0xFFFFFFFF and apic.svr == 0x1FF
        assert not apic.x2apic_mode


def test_physflat_boot_leaves_dfr_and_ldr_at_their_reset_values() -> None:
    """Linux's physflat has no ``init_apic_ldr``: no DFR/LDR write at boot."""
    vm = Vm(2)
    exits = exits_of(vm, lambda: Guest(vm, "physflat"))
    per_cpu = [(APIC_PAGE + 0xF0, 0x1FF), (APIC_PAGE + 0x80, 0), (APIC_PAGE + 0x20, 0),
               (APIC_PAGE + 0xD0, 0)]  # SVR, TPR writes; ID, LDR read back
    assert exits == [Exit(c, EPT, q, v) for c in range(2) for q, v in per_cpu]
    assert [vm.lapic(i).ldr for i in range(2)] == [0, 0]
    assert [vm.lapic(i).dfr for i in range(2)] == [0xFFFFFFFF, 0xFFFFFFFF]


def test_flat_supports_8_cpus_and_raises_for_9() -> None:
    Guest(Vm(8), "flat")
    with pytest.raises(ApicValueError, match="at most 8"):
        Guest(Vm(9), "flat")
    with pytest.raises(ApicValueError, match="at most 8"):
        Guest(Vm(9), "kvm_pv", base="flat")
    Guest(Vm(9), "physflat")


def test_boot_installs_the_guest_handler_on_every_vcpu() -> None:
    vm, g = boot("x2apic_phys")
    g.cpu(0).send_IPI_mask([2], V)
    assert vm.vcpu(2).run() == [V]  # the Vcpu's own run() uses the guest's handler
    assert g.cpu(2).handled == [V]
    assert vm.vcpu(2).handled == []


def test_xapic_drivers_refuse_an_apic_already_in_x2apic_mode() -> None:
    vm = Vm(2)
    Guest(vm, "x2apic_phys")
    with pytest.raises(ApicValueError, match="xAPIC mode"):
        Guest(vm, "physflat")


def test_x2apic_drivers_refuse_a_cpu_without_x2apic() -> None:
    with pytest.raises(ApicValueError, match="needs x2APIC"):
        Guest(Vm(2, features=Features(x2apic=False)), "x2apic_cluster")
    Guest(Vm(2, features=Features(x2apic=False)), "physflat")


def test_a_guest_refuses_vcpus_never_started() -> None:
    with pytest.raises(ApicValueError, match="aps_started"):
        Guest(Vm(2, aps_started=False), "x2apic_phys")


def test_a_guest_refuses_a_hardware_disabled_apic() -> None:
    vm = Vm(2)
    vm.set_msr(1, 0x1B, 0)
    with pytest.raises(ApicValueError, match="disabled"):
        Guest(vm, "x2apic_phys")


# ---------------------------------------------------------------------------------------
# Exits per mask send
# ---------------------------------------------------------------------------------------
def test_x2apic_phys_mask_send_is_one_icr_write_per_destination() -> None:
    """DRV-1."""
    vm, g = boot("x2apic_phys", vcpu_ids=[0, 1, 17, 300])
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask([3, 1, 2], V))
    assert exits == [
        Exit(0, WR, ICR_MSR, 1 << 32 | V),
        Exit(0, WR, ICR_MSR, 17 << 32 | V),
        Exit(0, WR, ICR_MSR, 300 << 32 | V),
    ]


def test_x2apic_cluster_mask_send_is_one_logical_icr_write_per_cluster() -> None:
    """DRV-2."""
    ids = [0, 1, 2, 17, 33, 34, 35]
    vm, g = boot("x2apic_cluster", vcpu_ids=ids)
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask([1, 2, 3, 4, 6], V))
    assert exits == [
        Exit(0, WR, ICR_MSR, (0 << 16 | 0b110) << 32 | 0x800 | V),
        Exit(0, WR, ICR_MSR, (1 << 16 | 0b10) << 32 | 0x800 | V),
        Exit(0, WR, ICR_MSR, (2 << 16 | 0b1010) << 32 | 0x800 | V),
    ]
    assert run_all(g) == [[], [V], [V], [V], [V], [], [V]]


def test_x2apic_cluster_allbutself_drops_a_cluster_that_held_only_the_sender() -> None:
    vm, g = boot("x2apic_cluster", vcpu_ids=[0, 16, 17])
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask_allbutself(range(3), V))
    assert exits == [Exit(0, WR, ICR_MSR, (1 << 16 | 0b11) << 32 | 0x800 | V)]
    assert run_all(g) == [[], [V], [V]]


def test_flat_mask_send_is_one_logical_ipi_whatever_the_mask() -> None:
    """DRV-3."""
    vm, g = boot("flat", 8)
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask([1, 2, 5, 7], V))
    assert exits == xapic_ipi(0, 0b10100110, 0x800 | V)
    assert run_all(g) == [[], [V], [V], [], [], [V], [], [V]]


def test_flat_sends_even_an_empty_mask_with_destination_0() -> None:
    """``_flat_send_IPI_mask`` has no empty-mask check: 3 exits, nobody interrupted."""
    vm, g = boot("flat")
    exits = exits_of(vm, lambda: g.cpu(1).send_IPI_mask_allbutself([1], V))
    assert exits == xapic_ipi(1, 0, 0x800 | V)
    assert run_all(g) == [[], [], [], []]


def test_physflat_mask_send_is_three_exits_per_destination() -> None:
    """DRV-3."""
    vm, g = boot("physflat")
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask([3, 1], V))
    assert exits == xapic_ipi(0, 1, V) + xapic_ipi(0, 3, V)
    assert reasons(exits) == {EPT: 6}


@pytest.mark.parametrize(
    ("driver", "expected"),
    [
        ("flat", {EPT: 3}),
        ("physflat", {EPT: 3 * 5}),
        ("x2apic_phys", {WR: 5}),
        ("x2apic_cluster", {WR: 2}),  # clusters 0 and 1
        ("kvm_pv", {ExitReason.VMCALL: 1}),
    ],
)
def test_exit_counts_per_driver_for_one_mask_send(
    driver: str, expected: dict[ExitReason, int]
) -> None:
    vm, g = boot(driver, 6 if driver == "flat" else 20)
    before = Counter(vm.stats.exits_by_reason)
    targets = [1, 2, 3, 4, 5] if driver == "flat" else [1, 2, 3, 16, 19]
    exits = exits_of(vm, lambda: g.cpu(0).send_IPI_mask(targets, V))
    assert reasons(exits) == expected
    assert vm.stats.exits_by_reason - before == Counter(expected)
    handled = run_all(g)
    assert [i for i, h in enumerate(handled) if h] == targets
    assert all(h in ([], [V]) for h in handled)


def test_the_stats_counter_matches_the_exit_log() -> None:
    vm, g = boot("physflat")
    g.cpu(0).send_IPI_mask([1, 2], V)
    g.cpu(3).send_IPI_all(V)
    run_all(g)
    assert Counter(e.reason for e in vm.exits) == vm.stats.exits_by_reason
    assert vm.stats.exits == len(vm.exits)


# ---------------------------------------------------------------------------------------
# Shorthands, self, single
# ---------------------------------------------------------------------------------------
SHORTHANDS = [("allbutself", 0xC0000), ("all", 0x80000), ("self", 0x40000)]


@pytest.mark.parametrize(("kind", "bits"), SHORTHANDS)
@pytest.mark.parametrize("driver", ["flat", "physflat"])
def test_xapic_shorthand_is_an_idle_read_then_icr_only(driver: str, kind: str, bits: int) -> None:
    vm, g = boot(driver)
    exits = exits_of(vm, lambda: getattr(g.cpu(2), f"send_IPI_{kind}")(V))
    assert exits == [Exit(2, EPT, ICR, 0), Exit(2, EPT, ICR, bits | V)]


@pytest.mark.parametrize(("kind", "bits"), [k for k in SHORTHANDS if k[0] != "self"])
@pytest.mark.parametrize("driver", ["x2apic_phys", "x2apic_cluster"])
def test_x2apic_shorthand_is_one_icr_write(driver: str, kind: str, bits: int) -> None:
    vm, g = boot(driver)
    exits = exits_of(vm, lambda: getattr(g.cpu(2), f"send_IPI_{kind}")(V))
    assert exits == [Exit(2, WR, ICR_MSR, bits | V)]


@pytest.mark.parametrize("driver", ["x2apic_phys", "x2apic_cluster"])
def test_x2apic_send_ipi_self_writes_the_self_ipi_msr(driver: str) -> None:
    """DRV-4: Linux ``x2apic_send_IPI_self``: one WRMSR 0x83F with the vector; it arrives."""
    vm, g = boot(driver)
    exits = exits_of(vm, lambda: g.cpu(2).send_IPI_self(V))
    assert exits == [Exit(2, WR, 0x83F, V)]
    assert V in vm.lapic(2).irr


@pytest.mark.parametrize("driver", DRIVERS)
def test_shorthand_targets_handle_the_vector_exactly_once(driver: str) -> None:
    _, g = boot(driver)
    g.cpu(1).send_IPI_allbutself(V)
    assert run_all(g) == [[V], [], [V], [V]]
    g.cpu(1).send_IPI_all(V)
    assert run_all(g) == [[V]] * 4
    g.cpu(1).send_IPI_self(V)
    assert run_all(g) == [[], [V], [], []]


@pytest.mark.parametrize("driver", DRIVERS)
def test_mask_allbutself_reaches_every_target_once_and_never_the_sender(driver: str) -> None:
    _, g = boot(driver)
    g.cpu(2).send_IPI_mask_allbutself([0, 2, 3], V)
    assert run_all(g) == [[V], [], [], [V]]
    g.cpu(2).send_IPI_mask_allbutself(range(4), V)
    assert run_all(g) == [[V], [V], [], [V]]
    assert [c.handled for c in g.cpus] == [[V, V], [V], [], [V, V]]


@pytest.mark.parametrize(
    ("driver", "expected"),
    [
        ("flat", xapic_ipi(0, 0b1000, 0x800 | V)),
        ("physflat", xapic_ipi(0, 3, V)),
        ("x2apic_phys", [Exit(0, WR, ICR_MSR, 3 << 32 | V)]),
        ("x2apic_cluster", [Exit(0, WR, ICR_MSR, 0b1000 << 32 | 0x800 | V)]),
    ],
)
def test_single_cpu_ipi_per_driver(driver: str, expected: list[Exit]) -> None:
    vm, g = boot(driver)
    assert exits_of(vm, lambda: g.cpu(0).send_IPI(3, V)) == expected
    assert run_all(g) == [[], [], [], [V]]


# ---------------------------------------------------------------------------------------
# NMI
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("driver", "expected"),
    [
        ("flat", xapic_ipi(0, 0b10, 0x800 | 0x400)),
        ("physflat", xapic_ipi(0, 1, 0x400)),
        ("x2apic_phys", [Exit(0, WR, ICR_MSR, 1 << 32 | 0x400)]),
        ("x2apic_cluster", [Exit(0, WR, ICR_MSR, 0b10 << 32 | 0x800 | 0x400)]),
    ],
)
def test_vector_2_is_sent_as_delivery_mode_nmi(driver: str, expected: list[Exit]) -> None:
    vm, g = boot(driver)
    assert exits_of(vm, lambda: g.cpu(0).send_IPI_mask([1], 2)) == expected
    assert vm.lapic(1).nmi_pending == 1
    assert exits_of(vm, lambda: g.cpu(1).run()) == [], "the handler writes no EOI for an NMI"
    assert g.cpu(1).handled == [2]
    assert not vm.lapic(1).isr


@pytest.mark.parametrize("driver", DRIVERS)
def test_an_nmi_shorthand_reaches_everyone_else_as_nmi(driver: str) -> None:
    _, g = boot(driver)
    g.cpu(0).send_IPI_allbutself(2)
    assert run_all(g) == [[], [2], [2], [2]]
