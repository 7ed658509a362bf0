"""The conformance matrix itself: it covers every profile preset and every accelerator.

Also pins custom-profile combinations whose answers once depended on whether KVM's optimized
map served the message (found by this suite): a profile that changes KVM's matching or
arbitration rules is now delivered by the slow path alone (``hypervisor.vm.uses_optimized_map``).
"""

from __future__ import annotations

import ast
import dataclasses

import pytest

from hypervisor import KvmOptions, Vm, VmConfig
from hypervisor.accel import make
from hypervisor.config import KVM_OPTIONS
from lapic.faults import ApicValueError
from lapic.profile import PRESETS, LowestPriorityPolicy, Profile

from .conftest import (
    ACCELERATORS,
    DFR,
    ICR_ASSERT,
    ICR_LOGICAL,
    ICR_LOWEST,
    LDR,
    MATRIX,
    MIXED,
    MSR_ICR,
    PROFILES,
    TPR,
    GuestApic,
    Mode,
    boot,
    irrs,
)


def test_every_accelerator_is_in_the_matrix_and_accepted() -> None:
    """Each name in ``ACCELERATORS`` builds a VM whose accelerator reports that name, and
    ``hypervisor.accel.make`` refuses any other name, listing exactly these."""
    assert ACCELERATORS
    for name in ACCELERATORS:
        assert Vm(2, accelerator=name).accel.name == name
    with pytest.raises(ApicValueError) as info:
        make("\0 no such accelerator")
    names = ast.literal_eval(str(info.value).rsplit("choose one of ", 1)[1])
    assert sorted(names) == sorted(ACCELERATORS)


def test_every_preset_and_the_mixed_profile_are_in_the_matrix() -> None:
    """The matrix is PRESETS (read from the code) + MIXED, times every accelerator; MIXED
    differs from every preset and takes at least one knob value from each of kvm and sdm."""
    assert {p.profile.name for p in MATRIX} == {*PRESETS, MIXED.name}
    assert len(MATRIX) == len(PROFILES) * len(ACCELERATORS)
    kvm, sdm = PRESETS["kvm"], PRESETS["sdm"]
    disputed = [f.name for f in dataclasses.fields(Profile) if f.name != "name"]
    disputed = [k for k in disputed if getattr(kvm, k) != getattr(sdm, k)]
    assert any(getattr(MIXED, k) == getattr(kvm, k) for k in disputed)
    assert any(getattr(MIXED, k) == getattr(sdm, k) for k in disputed)
    for preset in PRESETS.values():
        assert MIXED.differences(preset)


# =============================================================================================
# Knob combinations the optimized map does not encode: delivered by the slow path
# =============================================================================================
def _flat_or_cluster(
    profile: Profile, dfr: int, lids: list[int], kvm: KvmOptions = KVM_OPTIONS
) -> tuple[Vm, list[GuestApic]]:
    vm = Vm(VmConfig.build(len(lids), profile).replace(kvm=kvm))
    cpus = boot(vm, Mode.XAPIC)
    for cpu, lid in zip(cpus, lids, strict=True):
        cpu.write(DFR, dfr)
        cpu.write(LDR, lid << 24)
    return vm, cpus


def test_cluster_15_is_not_addressable_when_the_profile_says_so__MATCH_6() -> None:
    """MATCH-6 under ``Profile.custom("kvm", cluster15_addressable=False)`` (the optimized map
    asked for): a logical cluster MDA 0xF1 reaches nobody, whichever path serves it."""
    profile = Profile.custom("kvm", cluster15_addressable=False)
    vm, cpus = _flat_or_cluster(profile, 0x0FFFFFFF, [0xF1, 0x12])
    cpus[1].send(ICR_LOGICAL | ICR_ASSERT | 0x40, 0xF1)
    assert irrs(vm) == [frozenset(), frozenset()]


def test_lowest_tpr_policy_picks_the_lower_tpr_class__LP_1() -> None:
    """LP-1 under ``KvmOptions(lowest_priority=LOWEST_TPR)`` with the kvm profile (the optimized map
    asked for; the DIFF-D5 example): flat v0 (TPR 0x20), v1 (TPR 0x10), LOWEST to 0x03, vector
    0x30 in nobody's IRR/ISR -> v1 (the map would arbitrate by the counter and pick v0)."""
    kvm = KvmOptions(lowest_priority=LowestPriorityPolicy.LOWEST_TPR)
    vm, cpus = _flat_or_cluster(Profile.preset("kvm"), 0xFFFFFFFF, [0x01, 0x02], kvm)
    cpus[0].write(TPR, 0x20)
    cpus[1].write(TPR, 0x10)
    cpus[0].send(ICR_LOGICAL | ICR_LOWEST | ICR_ASSERT | 0x30, 0x03)
    assert irrs(vm) == [frozenset(), frozenset({0x30})]


def test_an_xapic_target_compares_the_low_byte_of_a_wide_mda__DIFF_D7() -> None:
    """DIFF-D7 / MATCH-4 under ``Profile.custom("kvm", xapic_matches_x2apic_id=False)`` (the
    optimized map asked for): an x2APIC vCPU 0 sends a physical IPI to 0x101; the xAPIC-mode
    vCPU 1 (ID 1) matches ``0x101 & 0xFF`` (the map would drop it: 0x101 > max_apic_id)."""
    profile = Profile.custom("kvm", xapic_matches_x2apic_id=False)
    vm = Vm(2, profile)
    x2, xapic = GuestApic(vm, 0), GuestApic(vm, 1)
    x2.enable(Mode.X2APIC)
    xapic.enable(Mode.XAPIC)
    x2.vcpu.wrmsr(MSR_ICR, 0x101 << 32 | ICR_ASSERT | 0x41)
    assert irrs(vm) == [frozenset(), frozenset({0x41})]
