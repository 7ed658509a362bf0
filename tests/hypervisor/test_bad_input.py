"""Issue 12, the API cases found by hand and by fuzzing: each misuse raises
``ApicValueError``/``ApicTypeError`` naming the argument, before any side effect
(``vm.snapshot()`` unchanged); KVM's bounds on vCPU ids and its fallback when the map cannot be
allocated (MAP-5).

Not here: the CLI (``tests/apicsim/test_cli_bad_input.py``) and the random campaign
(``tests/test_fuzz_api.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from guest import Guest
from hypervisor import Vm, apic_map
from hypervisor.config import KVM_MAX_VCPU_IDS, VmConfig
from hypervisor.vcpu import MpState
from lapic.apic import LocalApic
from lapic.faults import ApicTypeError, ApicValueError, GuestFault
from lapic.icr import DeliveryMode, DestMode, Interrupt
from tests.hypervisor.builders import x2apic_vm, xapic_vm

APIC = 0xFEE00000


def wrong(value: object) -> Any:
    """A value of the wrong type, passed on purpose."""
    return value


def unchanged(vm: Vm, error: type[Exception], pattern: str, call: Callable[[], object]) -> None:
    """``call`` raises ``error`` matching ``pattern`` and leaves the VM exactly as it was."""
    before = vm.snapshot()
    with pytest.raises(error, match=pattern):
        call()
    after = vm.snapshot()
    assert after == before, before.diff(after)


# ---------------------------------------------------------------------------------------------
# Vm.deliver: every field of the Interrupt
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "error", "pattern"),
    [
        ({"vector": 0x141}, ApicValueError, r"^vector=0x141 is outside"),
        ({"vector": -1}, ApicValueError, r"^vector=-0x1 is outside"),
        ({"vector": 65.0}, ApicTypeError, r"^vector must be an int, not float"),
        ({"vector": True}, ApicTypeError, r"^vector must be an int, not bool"),
        ({"delivery_mode": "fixed"}, ApicTypeError, r"^delivery_mode must be a DeliveryMode"),
        ({"dest_mode": 1}, ApicTypeError, r"^dest_mode must be a DestMode"),
        ({"dest": -1}, ApicValueError, r"^dest=-0x1 is outside"),
        ({"dest": 2**32}, ApicValueError, r"^dest=0x100000000 is outside"),
        ({"dest": "0"}, ApicTypeError, r"^dest must be an int, not str"),
        ({"redir_hint": 1}, ApicTypeError, r"^redir_hint must be a bool, not int"),
        (
            {"vector": 2.0, "delivery_mode": DeliveryMode.STARTUP},
            ApicTypeError,
            r"^vector must be an int, not float",
        ),
    ],
)
def test_vm_deliver_checks_every_interrupt_field_before_counting_or_delivering(
    fields: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    vm = xapic_vm(2)
    irq = Interrupt(**{"vector": 0x41, "dest": 1, **fields})
    unchanged(vm, error, pattern, lambda: vm.deliver(irq))
    assert vm.stats.ipis == 0 and vm.stats.fast_path == 0 and vm.stats.slow_path == 0


def test_vm_deliver_refuses_what_is_not_an_interrupt() -> None:
    vm = xapic_vm(1)
    unchanged(vm, ApicTypeError, r"^irq must be an Interrupt, not tuple",
              lambda: vm.deliver((0x41, 0)))  # type: ignore[arg-type]  # fmt: skip


def test_a_rejected_float_startup_vector_leaves_later_valid_accesses_working() -> None:
    vm = xapic_vm(2)
    with pytest.raises(ApicTypeError, match="vector"):
        vm.deliver(Interrupt(2.0, DeliveryMode.STARTUP, dest=1))  # type: ignore[arg-type]
    assert vm.lapic(1).sipi_pending is False
    assert vm.vcpu(1).mmio_read(APIC + 0x30) & 0xFF  # the version register still reads


@pytest.mark.parametrize(
    ("apic_id", "error", "pattern"),
    [
        (-(2**64), ApicValueError, r"^apic_id=-0x10000000000000000 is outside"),
        (2**32, ApicValueError, r"^apic_id=0x100000000 is outside"),
        ([], ApicTypeError, r"^apic_id must be an int, not list"),
        ("1", ApicTypeError, r"^apic_id must be an int, not str"),
        (True, ApicTypeError, r"^apic_id must be an int, not bool"),
    ],
)
def test_kick_cpu_checks_its_apic_id(apic_id: object, error: type[Exception], pattern: str) -> None:
    vm = xapic_vm(2)
    unchanged(vm, error, pattern, lambda: vm.kick_cpu(apic_id))  # type: ignore[arg-type]


def test_kick_cpu_with_a_valid_apic_id_still_unhalts_the_target() -> None:
    vm = xapic_vm(2)
    vm.kick_cpu(1)
    assert vm.lapic(1).pv_unhalted


# ---------------------------------------------------------------------------------------------
# Guest-executed MMIO: size and value before the exit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "error", "pattern"),
    [
        (4.0, ApicTypeError, r"^size must be an int, not float"),
        (True, ApicTypeError, r"^size must be an int, not bool"),
        ("4", ApicTypeError, r"^size must be an int, not str"),
        (3, ApicValueError, r"^size=3 must be 1, 2, 4 or 8"),
    ],
)
@pytest.mark.parametrize("op", ["read", "write"])
def test_vcpu_mmio_checks_size_before_the_exit_and_before_entering_the_guest(
    op: str, size: object, error: type[Exception], pattern: str
) -> None:
    """A rejected access records no exit, does not re-enter, and leaves a pending SIPI."""
    vm = xapic_vm(2)
    v = vm.vcpu(1)
    vm.lapic(1).sipi_pending = True
    vm.lapic(1).sipi_vector = 0x9A
    v.preempt()
    exits, own = vm.stats.exits, v.exits

    def call() -> object:
        if op == "read":
            return v.mmio_read(APIC + 0x80, size)  # type: ignore[arg-type]
        v.mmio_write(APIC + 0x80, 0x10, size)  # type: ignore[arg-type]
        return None

    unchanged(vm, error, pattern, call)
    assert vm.stats.exits == exits and v.exits == own
    assert vm.lapic(1).sipi_pending


def test_vcpu_mmio_write_checks_the_value_against_the_size_before_the_exit() -> None:
    vm = xapic_vm(1)
    v = vm.vcpu(0)
    unchanged(vm, ApicValueError, r"^value=0x100 is outside \[0x0, 0xff\]",
              lambda: v.mmio_write(APIC + 0x80, 0x100, 1))  # fmt: skip
    unchanged(vm, ApicTypeError, r"^value must be an int, not float",
              lambda: v.mmio_write(APIC + 0x80, 1.0))  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize("size", [4.0, True])
def test_local_apic_mmio_takes_only_an_exact_int_size(size: object) -> None:
    apic = LocalApic(0)
    before = apic.snapshot()
    with pytest.raises(ApicTypeError, match=r"^size must be an int"):
        apic.mmio_read(0x30, size)  # type: ignore[arg-type]
    with pytest.raises(ApicTypeError, match=r"^size must be an int"):
        apic.mmio_write(0x80, 0, size)  # type: ignore[arg-type]
    assert apic.snapshot() == before


def test_a_vcpu_left_waiting_for_sipi_refuses_the_access_after_the_entry_took_the_init__KVMB_9(
) -> None:
    """Not a half-done call: as on KVM (tests/kvm/test_disagreements.py), the entry takes the
    pending INIT before anything executes; the access itself is refused with no exit."""
    vm = Vm(2)
    ap = vm.vcpu(1)
    vm.lapic(1).init_pending = True
    exits = vm.stats.exits
    with pytest.raises(ApicValueError, match=r"^vcpu 1 is INIT_RECEIVED"):
        ap.rdmsr(0x1B)
    assert not vm.lapic(1).init_pending and ap.mp_state is MpState.INIT_RECEIVED
    assert vm.stats.exits == exits


def test_vcpu_run_checks_its_handlers_before_acknowledging_anything() -> None:
    vm = xapic_vm(2)
    vm.deliver(Interrupt(0x41, dest=1))
    v = vm.vcpu(1)
    unchanged(vm, ApicTypeError, r"^handler must be callable or None, not int",
              lambda: v.run(5))  # type: ignore[arg-type]  # fmt: skip
    unchanged(vm, ApicTypeError, r"^nmi_handler must be callable or None, not str",
              lambda: v.run(None, "h"))  # type: ignore[arg-type]  # fmt: skip
    assert 0x41 in vm.lapic(1).irr and 0x41 not in vm.lapic(1).isr
    assert v.run() == [0x41]


# ---------------------------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (lambda: Vm(broadcast_quirk=wrong("no")), ApicTypeError, r"^broadcast_quirk must be a bool"),  # noqa: E501
        (lambda: Vm(2, bsp_vcpu_id=7), ApicValueError, r"^bsp_vcpu_id=7 is not one of"),
        (lambda: Vm(2, bsp_vcpu_id=wrong("0")), ApicTypeError, r"^bsp_vcpu_id must be an int"),
        (lambda: Vm(2, pv_features=wrong(None)), ApicTypeError, r"^pv_features must be an iterable"),  # noqa: E501
        (lambda: Vm(2, pv_features=wrong([[1]])), ApicTypeError, r"^pv_features must be an int"),
        (lambda: Vm(1, vcpu_ids=wrong(5)), ApicTypeError, r"^vcpu_ids must be a sequence of ints"),
        (lambda: Vm(1, vcpu_ids=wrong("01")), ApicTypeError, r"^vcpu_ids must be a sequence"),
        (lambda: LocalApic(0, clock=wrong(5)), ApicTypeError, r"^clock must be a Clock, not int"),
    ],
)
def test_constructor_arguments_are_checked_when_given_not_when_first_used(
    make: Callable[[], object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        make()


def test_guest_checks_its_vm_and_bits_per_long() -> None:
    vm = x2apic_vm([0, 1])
    with pytest.raises(ApicTypeError, match=r"^bits_per_long must be an int, not float"):
        Guest(vm, "kvm_pv", bits_per_long=64.0)  # type: ignore[arg-type]
    with pytest.raises(ApicTypeError, match=r"^vm must be a Vm, not Vcpu"):
        Guest(vm.vcpu(0), "kvm_pv")  # type: ignore[arg-type]


def test_send_ipi_mask_names_its_cpus_argument() -> None:
    vm = x2apic_vm([0, 1])
    cpu = Guest(vm, "kvm_pv").cpu(0)
    unchanged(vm, ApicTypeError, r"^cpus must be an iterable of CPU numbers, not NoneType",
              lambda: cpu.send_IPI_mask(None, 0x41))  # type: ignore[arg-type]  # fmt: skip


def test_the_x2apic_icr_gp_names_the_reserved_bits_that_were_set() -> None:
    vm = x2apic_vm([0, 1])
    v = vm.vcpu(0)
    with pytest.raises(GuestFault, match=re.escape("reserved bits 0x2000 set")):
        v.wrmsr(0x830, (1 << 32) | 0x2000 | 0x41)


# ---------------------------------------------------------------------------------------------
# MAP-5: KVM's bounds, and its fallback when the map cannot be allocated
# ---------------------------------------------------------------------------------------------
def test_max_vcpu_ids_above_kvm_max_vcpu_ids_is_refused_as_kvm_does__MAP_5() -> None:
    with pytest.raises(ApicValueError, match=r"^max_vcpu_ids=0x100000000 is above KVM_MAX"):
        Vm(vcpu_ids=[0, 2**31], max_vcpu_ids=1 << 32)
    with pytest.raises(ApicValueError, match=r"^max_vcpu_ids=0x1001 is above KVM_MAX"):
        Vm(1, max_vcpu_ids=KVM_MAX_VCPU_IDS + 1)
    config = VmConfig(vcpu_ids=(0, 2**31), max_vcpu_ids=1 << 32)  # another host's limits
    with pytest.raises(ApicValueError, match=r"^max_vcpu_ids=0x100000000 is above KVM_MAX"):
        Vm(config)
    vm = x2apic_vm([0, KVM_MAX_VCPU_IDS - 1])  # the largest id KVM allows, mapped and reached
    assert vm.max_vcpu_ids == KVM_MAX_VCPU_IDS
    assert vm.deliver(Interrupt(0x41, dest=KVM_MAX_VCPU_IDS - 1)) == 1
    assert vm.stats.fast_path == 1


def test_a_map_kvm_cannot_allocate_is_no_map_and_delivery_takes_the_slow_path__MAP_5(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vm = x2apic_vm([0, 1, 0x300])
    assert vm.apic_map is not None
    monkeypatch.setattr(apic_map, "MAP_ALLOC_LIMIT", apic_map.map_bytes(0x2FF))
    vm.vcpu(0).wrmsr(0x80F, 0xFF)  # software-disable, then enable: the map is rebuilt
    vm.vcpu(0).wrmsr(0x80F, 0x1FF)
    assert vm.apic_map is None
    slow = vm.stats.slow_path
    assert vm.deliver(Interrupt(0x41, DeliveryMode.FIXED, DestMode.PHYSICAL, dest=0x300)) == 1
    assert vm.stats.slow_path == slow + 1
    assert 0x41 in vm.lapic(2).irr
    monkeypatch.setattr(apic_map, "MAP_ALLOC_LIMIT", apic_map.map_bytes(0x300))
    vm.vcpu(0).wrmsr(0x80F, 0xFF)
    vm.vcpu(0).wrmsr(0x80F, 0x1FF)
    assert vm.apic_map is not None
