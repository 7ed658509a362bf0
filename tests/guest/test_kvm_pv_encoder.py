"""The pure PV IPI encoder ``guest.pv_send_ipi_hypercalls`` (reference ``kvm_lapic.md`` §13).

Worked examples of PVG-2/PVG-3, then a property: the encoder's hypercalls, replayed through the
host side (``hypervisor.pv_ipi.pv_send_ipi``) on a VM whose vCPUs have exactly the requested
APIC IDs, deliver the vector to exactly that set.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest import Guest, pv_icr, pv_send_ipi_hypercalls
from hypervisor import Vm
from hypervisor.pv_ipi import pv_send_ipi
from lapic import ApicTypeError, ApicValueError, Interrupt, LocalApic

FIXED_F1 = 0xF1


# ---------------------------------------------------------------------------------------
# PVG-3 worked examples (x86-64: 128-ID windows)
# ---------------------------------------------------------------------------------------
def test_ids_0_1_2_130_take_two_hypercalls__PVG_3() -> None:
    assert pv_send_ipi_hypercalls([0, 1, 2, 130], FIXED_F1) == [
        (0x7, 0, 0, FIXED_F1),
        (0x1, 0, 130, FIXED_F1),
    ]


def test_a_lower_id_visited_later_shifts_the_bitmap_left__PVG_3() -> None:
    """CPU order gives APIC IDs 5 then 3: one hypercall, a0 = 0b101, a2 = 3."""
    assert pv_send_ipi_hypercalls([5, 3], FIXED_F1) == [(0b101, 0, 3, FIXED_F1)]


def test_ids_0_and_100_share_one_window_with_100_in_the_high_word__PVG_3() -> None:
    assert pv_send_ipi_hypercalls([0, 100], FIXED_F1) == [(1, 1 << 36, 0, FIXED_F1)]


def test_ids_0_and_127_fit_one_window__PVG_3() -> None:
    assert pv_send_ipi_hypercalls([0, 127], FIXED_F1) == [(1, 1 << 63, 0, FIXED_F1)]


def test_ids_0_and_128_need_two_windows__PVG_3() -> None:
    assert pv_send_ipi_hypercalls([0, 128], FIXED_F1) == [
        (1, 0, 0, FIXED_F1),
        (1, 0, 128, FIXED_F1),
    ]


def test_the_window_grows_down_only_while_the_highest_id_still_fits__PVG_3() -> None:
    """130 then 5: 130 - 5 = 125 < 128, so the bitmap shifts; 200 then 5 (195) flushes."""
    assert pv_send_ipi_hypercalls([130, 5], FIXED_F1) == [(1, 1 << 61, 5, FIXED_F1)]
    assert pv_send_ipi_hypercalls([130, 5, 132], FIXED_F1) == [
        (1, (1 << 61) | (1 << 63), 5, FIXED_F1)
    ]
    assert pv_send_ipi_hypercalls([200, 5], FIXED_F1) == [
        (1, 0, 200, FIXED_F1),
        (1, 0, 5, FIXED_F1),
    ]


def test_the_shift_left_case_measures_from_max_not_from_min__PVG_3() -> None:
    """min 100, max 200; 80 is within 128 of min but 120 below max: shifts (200-80 = 120)."""
    assert pv_send_ipi_hypercalls([100, 200, 80], FIXED_F1) == [
        (1 | (1 << 20), 1 << (120 - 64), 80, FIXED_F1)
    ]
    # 70: 200 - 70 = 130 >= 128, so it flushes although 100 - 70 = 30.
    assert pv_send_ipi_hypercalls([100, 200, 70], FIXED_F1) == [
        (1, 1 << 36, 100, FIXED_F1),
        (1, 0, 70, FIXED_F1),
    ]


def test_the_shift_left_case_uses_the_highest_id_seen_not_the_last__PVG_3() -> None:
    """100, 227, 150, 95: max stays 227, and 227 - 95 = 132 >= 128 forces a flush."""
    assert pv_send_ipi_hypercalls([100, 227, 150, 95], FIXED_F1) == [
        (1 | 1 << 50, 1 << 63, 100, FIXED_F1),
        (1, 0, 95, FIXED_F1),
    ]


def test_an_id_equal_to_min_flushes_as_the_c_conditions_do__PVG_3() -> None:
    """Neither ``apic_id < min`` nor ``apic_id > min`` holds for a repeat of ``min``."""
    assert pv_send_ipi_hypercalls([3, 3], FIXED_F1) == [(1, 0, 3, FIXED_F1), (1, 0, 3, FIXED_F1)]


def test_an_empty_id_list_makes_no_hypercall__PVG_3() -> None:
    assert pv_send_ipi_hypercalls([], FIXED_F1) == []


def test_a_window_never_wraps_past_the_top_of_the_u32_id_space__PVG_3() -> None:
    """``min + KVM_IPI_CLUSTER_SIZE`` wraps in C, so IDs just below 2**32 are not merged."""
    top = 0xFFFFFFF0
    assert pv_send_ipi_hypercalls([top, top + 5], FIXED_F1, 32) == [
        (1, 0, top, FIXED_F1),
        (1, 0, top + 5, FIXED_F1),
    ]
    assert pv_send_ipi_hypercalls([0xFFFFFF00, 0xFFFFFF05], FIXED_F1, 32) == [
        (0b100001, 0, 0xFFFFFF00, FIXED_F1)
    ]


def test_min_is_passed_sign_extended_as_a_c_int_on_x86_64__PVG_3() -> None:
    assert pv_send_ipi_hypercalls([0x80000000], FIXED_F1) == [(1, 0, 0xFFFFFFFF80000000, FIXED_F1)]
    assert pv_send_ipi_hypercalls([0x80000000], FIXED_F1, 32) == [(1, 0, 0x80000000, FIXED_F1)]


# ---------------------------------------------------------------------------------------
# i386: BITS_PER_LONG = 32, 64-ID windows
# ---------------------------------------------------------------------------------------
def test_i386_windows_are_64_ids_wide__PVG_3() -> None:
    assert pv_send_ipi_hypercalls([0, 63], FIXED_F1, 32) == [(1, 1 << 31, 0, FIXED_F1)]
    assert pv_send_ipi_hypercalls([0, 64], FIXED_F1, 32) == [
        (1, 0, 0, FIXED_F1),
        (1, 0, 64, FIXED_F1),
    ]
    assert pv_send_ipi_hypercalls([0, 1, 2, 130], FIXED_F1, 32) == [
        (0x7, 0, 0, FIXED_F1),
        (0x1, 0, 130, FIXED_F1),
    ]
    assert pv_send_ipi_hypercalls([40, 0], FIXED_F1, 32) == [(1, 1 << 8, 0, FIXED_F1)]


# ---------------------------------------------------------------------------------------
# PVG-2: the ICR
# ---------------------------------------------------------------------------------------
def test_nmi_vector_is_sent_as_delivery_mode_nmi_with_vector_field_0__PVG_2() -> None:
    assert pv_send_ipi_hypercalls([1], 2) == [(1, 0, 1, 0x400)]
    assert pv_icr(2) == 0x400


@pytest.mark.parametrize("vector", [0, 1, 3, 0x20, 0xF1, 0xFF])
def test_every_other_vector_is_fixed_with_no_level_trigger_or_dest_bits__PVG_2(
    vector: int,
) -> None:
    assert pv_icr(vector) == vector
    assert [call[3] for call in pv_send_ipi_hypercalls([0, 200], vector)] == [vector, vector]


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------
def test_the_encoder_rejects_what_is_not_a_value_of_the_machine() -> None:
    with pytest.raises(ApicValueError, match="bits_per_long"):
        pv_send_ipi_hypercalls([0], FIXED_F1, 16)
    with pytest.raises(ApicValueError, match="vector"):
        pv_send_ipi_hypercalls([0], 0x100)
    with pytest.raises(ApicValueError, match="apic_id"):
        pv_send_ipi_hypercalls([0, 1 << 32], FIXED_F1)
    with pytest.raises(ApicTypeError, match="apic_id"):
        pv_send_ipi_hypercalls([True], FIXED_F1)


# ---------------------------------------------------------------------------------------
# Property: encoder + host = exactly the requested set
# ---------------------------------------------------------------------------------------
id_lists = st.lists(st.integers(0, 4095), unique=True, min_size=1, max_size=24)


@settings(max_examples=60)
@given(ids=id_lists, vector=st.integers(0x20, 0xFF), bits_per_long=st.sampled_from([64, 32]))
def test_replayed_hypercalls_deliver_exactly_the_requested_ids_once__PVG_3(
    ids: list[int], vector: int, bits_per_long: int
) -> None:
    """Any IDs in any order: every ID once, nothing else; each call returns its bit count."""
    vm = Vm(vcpu_ids=ids)
    Guest(vm, "x2apic_phys")  # x2APIC mode, software-enabled, as Linux leaves them
    delivered: list[int] = []

    def accept(apic: LocalApic, irq: Interrupt) -> bool:
        delivered.append(apic.vcpu_id)
        return apic.accept_interrupt(irq)

    apic_map = vm.apic_map
    assert apic_map is not None
    calls = pv_send_ipi_hypercalls(ids, vector, bits_per_long)
    window = 2 * bits_per_long
    for a0, a1, a2, a3 in calls:
        assert a0 < 1 << bits_per_long and a1 < 1 << bits_per_long
        bitmap = a0 | a1 << bits_per_long
        assert bitmap & 1, "bit 0 is always min itself"
        assert bitmap.bit_length() <= window
        r = pv_send_ipi(apic_map, a0, a1, a2, a3, op_64_bit=bits_per_long == 64, accept=accept)
        assert r == bitmap.bit_count()
    assert sorted(delivered) == sorted(ids)
    for i in range(len(vm)):
        assert vector in vm.lapic(i).irr


@settings(max_examples=25)
@given(ids=id_lists, vector=st.integers(0x20, 0xFF), bits_per_long=st.sampled_from([64, 32]))
def test_a_kvm_pv_guest_makes_one_vmcall_per_encoder_window__PVG_3(
    ids: list[int], vector: int, bits_per_long: int
) -> None:
    """End to end: CPU 0 sends to every CPU; each CPU handles the vector exactly once.

    CPU numbers are vCPU indexes, so ``for_each_cpu`` visits the APIC IDs in the order given.
    A one-CPU guest keeps its base driver (PVG-1) and makes no hypercall.
    """
    vm = Vm(vcpu_ids=ids)
    g = Guest(vm, "kvm_pv", bits_per_long=bits_per_long)
    assert g.cpu_to_apicid == ids
    before = vm.stats.hypercalls
    g.cpu(0).send_IPI_mask(range(len(g)), vector)
    calls = pv_send_ipi_hypercalls(ids, vector, bits_per_long) if len(ids) > 1 else []
    assert vm.stats.hypercalls - before == len(calls)
    assert [cpu.run() for cpu in g.cpus] == [[vector]] * len(ids)
    assert all(cpu.pv_errors == [] for cpu in g.cpus)
