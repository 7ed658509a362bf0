"""Differential tests: random topologies and random operation sequences run on the model and
on the host's KVM, every observable compared after every step (``engine.py``).  A disagreement
is shrunk by hypothesis and written as a scenario for ``apicsim run`` (``replay.py``); the
failure message names the file.  What is not generated or not compared is listed in
``exclusions.py``.  Skipped, with the reason from ``kvm_available()``, where KVM is
unavailable.  ``specs/differential.md`` describes the suite and its measured cost.

The default hypothesis profile runs 470 examples in all (``examples(share)`` of its 100
per test); ``HYPOTHESIS_PROFILE=thorough`` runs twenty times as many.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.differential.coverage import COVERAGE, NOT_COVERED
from tests.differential.harness import check
from tests.differential.strategies import Program, programs
from tests.kvm.support import needs_kvm

pytestmark = needs_kvm


def examples(share: float) -> settings:
    """``share`` of the profile's ``max_examples`` (default 100, thorough 2000)."""
    return settings(
        max_examples=max(3, round(settings().max_examples * share)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
        report_multiple_bugs=False,
    )


DELIVERY = (
    "ipi", "ipi", "ipi", "icr_raw", "init_sipi", "msi", "msi", "msi", "eoi", "eoi",
    "self_ipi", "restore", "apic_base", "reg_write", "reg_read", "cr8", "guest_cr8",
)  # fmt: skip
REGISTERS = (
    "reg_write", "reg_write", "reg_read", "reg_read", "mmio_read", "mmio_read", "mmio_write",
    "mmio_write", "rdmsr", "wrmsr", "set_msr", "get_msr", "apic_base", "apic_base", "apic_base",
    "self_ipi", "cr8", "guest_cr8",
)  # fmt: skip
STATE = (
    "restore", "restore", "restore", "eoi", "eoi", "reg_read", "reg_write", "msi", "ipi",
    "apic_base", "apic_base", "mmio_read", "cr8", "guest_cr8",
)  # fmt: skip


@examples(1.5)
@given(program=programs())
def test_random_programs_on_random_topologies_show_the_same_observables_on_both__KVMB_4__KVMB_8(
    program: Program,
) -> None:
    """Every kind of operation, mixed, on 1-8 vCPUs (now and then 32): IPIs and INIT-SIPI,
    MSIs, EOIs, SELF IPIs, register reads and writes (through the mode's interface, raw MMIO at
    any offset and size, RDMSR/WRMSR, host KVM_GET/SET_MSRS), APIC_BASE changes by guest and
    host, KVM_SET_LAPIC of modified images.  Unserviced MMIO reads repeat the previous read
    (KVMB-4); the vCPU created last is missing from KVM's map until it is rebuilt (KVMB-8)."""
    check(program, test="random_programs", rules=["KVMB-4", "KVMB-8", "KVMB-9", "MMIO-4"])


@examples(1.2)
@given(program=programs(DELIVERY))
def test_ipis_and_msis_reach_the_same_vcpus_with_the_same_effects__ICR_4__FAST_5__MSI_1__LP_2(
    program: Program,
) -> None:
    """ICR-2..6, FAST-*, MSI-1, LP-1/2, MATCH-*, ACCEPT-*, KVMB-9: guest IPIs of every delivery
    mode, physical and logical (flat, cluster, x2APIC), with shorthands and reserved bits,
    INIT-SIPI sequences, KVM_SIGNAL_MSI with every delivery and destination mode, extended
    destination IDs, the redirection hint and bad flags; EOIs and TPR changes in between.  The
    IRR/TMR of every vCPU, the NMIs and each MSI's count compared after each step."""
    check(program, test="delivery", rules=["ICR-4", "FAST-5", "MSI-1", "LP-2", "KVMB-9"])


@examples(1.0)
@given(program=programs(REGISTERS))
def test_register_accesses_in_every_mode_read_fault_and_write_alike__MMIO_4__MSR_1__MSR_6__BASE_2(
    program: Program,
) -> None:
    """MMIO-1..5, MSR-1..6, BASE-1..8, REG-*: reads and writes of every register offset (and
    of offsets with none) by MMIO at sizes 1, 2, 4, 8 and unaligned, by RDMSR/WRMSR with and
    without reserved bits, by the host's KVM_GET/SET_MSRS, in xAPIC, x2APIC and disabled mode,
    across legal and illegal IA32_APIC_BASE writes by guest and host (other window addresses,
    reserved bits, the BSP bit); the guest's MOV to/from CR8 with any 64-bit value (CR8-1)."""
    check(
        program, test="registers",
        rules=["MMIO-4", "MSR-1", "MSR-6", "BASE-2", "BASE-5", "CR8-1"],
    )  # fmt: skip


@examples(0.8)
@given(program=programs(STATE))
def test_kvm_set_lapic_of_modified_images_then_eois_leave_the_same_state__STATE_1__STATE_4(
    program: Program,
) -> None:
    """STATE-1..5, REG-EOI-1, PRIO-2/5: KVM_SET_LAPIC of the vCPU's own image with words
    replaced (ID, LDR, DFR, SVR, TPR, ISR/TMR/IRR, LVTs, ICR, the bytes between registers),
    in xAPIC and x2APIC mode under either X2APIC_API format, then EOIs, reads and messages."""
    check(program, test="state", rules=["STATE-1", "STATE-4", "REG-EOI-1", "PRIO-5"])


@examples(0.2)
@given(program=programs(vcpus=32, max_ops=8))
def test_a_32_vcpu_vm_delivers_and_restores_like_the_model__MAP_1__FAST_7(
    program: Program,
) -> None:
    """MAP-1..4, FAST-6/7: 32 vCPUs, every one set up (IDs, LDRs in flat and cluster format,
    x2APIC or not), then a short program of every kind: logical destinations spanning
    clusters, broadcasts, lowest priority among many."""
    check(program, test="vcpus32", rules=["MAP-1", "FAST-7", "LP-2"])


TESTS = ("random_programs", "delivery", "registers", "state", "vcpus32")


def test_the_run_saw_every_writable_bit_of_every_compared_register_both_0_and_1() -> None:
    """The bit coverage of this run's comparisons (``coverage.py``): every writable bit of
    every compared register (the state image's registers, ISR/TMR/IRR, IA32_APIC_BASE) was
    seen both 0 and 1 in a state the engine compared, so no bit of them is a blind spot.  Runs
    after the five tests above (it needs them in the same process)."""
    if not COVERAGE.tests >= set(TESTS):
        pytest.skip(f"needs the five differential tests in the same run, ran {COVERAGE.tests}")
    missing = {name: f"{bits:#x}" for name, bits in COVERAGE.missing().items()}
    assert not missing, (
        f"writable bits never seen both 0 and 1 (register: bits): {missing}; "
        f"not covered by design: {sorted(NOT_COVERED)}"
    )
