"""A VM's configuration as data (``hypervisor.config``) and the one host-API (``hypervisor.api``).

Rules: STATE-5 (the KVM_CAP_X2APIC_API options are VM options), MSI-1 (KVM_SIGNAL_MSI's
arguments), KVMB-8 and DIFF-D5/D9 (knobs that moved from ``lapic.Profile`` to ``KvmOptions``).
The same argument checks on the real KVM are in ``tests/kvm/test_host.py``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import apicsim.kvm.view as view
from hypervisor import AccelConfig, HostApi, KvmOptions, MsrError, Vm, VmConfig
from hypervisor.config import KVM_OPTIONS, SDM_OPTIONS
from lapic.apic import Features
from lapic.faults import ApicTypeError, ApicValueError
from lapic.profile import (
    PRESETS,
    REFERENCE_DEFAULTS,
    LowestPriorityPolicy,
    Profile,
    reference_defaults,
)

NAMESPACE = {
    "VmConfig": VmConfig,
    "KvmOptions": KvmOptions,
    "AccelConfig": AccelConfig,
    "Profile": Profile,
    "Features": Features,
    "LowestPriorityPolicy": LowestPriorityPolicy,
}


# =============================================================================================
# Strategies over every field
# =============================================================================================
@st.composite
def profiles(draw: st.DrawFn) -> Profile:
    base = draw(st.sampled_from(sorted(PRESETS)))
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(Profile):
        if f.name == "name" or not draw(st.booleans()):
            continue
        current = getattr(PRESETS[base], f.name)
        if isinstance(current, bool):
            changes[f.name] = draw(st.booleans())
        else:
            changes[f.name] = draw(st.integers(0, 1 << 20))
    if draw(st.booleans()):
        changes["name"] = draw(st.text(min_size=1, max_size=8))
    return Profile.custom(base, **changes)


kvm_options = st.builds(
    KvmOptions,
    x2apic_format=st.booleans(),
    broadcast_quirk=st.booleans(),
    lowest_priority=st.sampled_from(LowestPriorityPolicy),
    optimized_apic_map=st.booleans(),
    map_excludes_new_vcpu=st.booleans(),
    enforce_pv_cpuid=st.booleans(),
    pv_features=st.frozensets(st.integers(0, 31)),
)

features = st.builds(
    Features,
    x2apic=st.booleans(),
    tsc_deadline=st.booleans(),
    cmci=st.booleans(),
    directed_eoi=st.booleans(),
    smm=st.booleans(),
    maxphyaddr=st.integers(36, 52),
    intel_compatible=st.booleans(),
)


@st.composite
def configs(draw: st.DrawFn) -> VmConfig:
    max_ids = draw(st.integers(1, 1 << 32))
    ids = draw(st.lists(st.integers(0, min(max_ids - 1, 1 << 16)), min_size=1, max_size=5,
                        unique=True))  # fmt: skip
    return VmConfig(
        vcpu_ids=tuple(ids),
        profile=draw(profiles()),
        kvm=draw(kvm_options),
        features=draw(features),
        accelerator=AccelConfig(draw(st.sampled_from(["emulated", "avic", "apicv"]))),
        bsp_vcpu_id=draw(st.integers(0, (1 << 32) - 1)),
        max_vcpu_ids=max_ids,
        aps_started=draw(st.booleans()),
        exit_log=draw(st.integers(0, 1 << 32)),
        trace=draw(st.booleans()),
    )


# =============================================================================================
# Round trip, replace, Vm(config)
# =============================================================================================
@given(configs())
def test_a_config_repr_is_valid_python_that_rebuilds_an_equal_config(config: VmConfig) -> None:
    back = eval(repr(config), NAMESPACE)
    assert back == config
    assert hash(back) == hash(config)
    assert back.profile.name == config.profile.name


@given(kvm_options)
def test_kvm_options_repr_names_only_the_fields_that_differ_and_round_trips(
    options: KvmOptions,
) -> None:
    assert eval(repr(options), NAMESPACE) == options
    shown = set(re.findall(r"(\w+)=", repr(options)))
    assert shown == {
        f.name for f in dataclasses.fields(options)
        if getattr(options, f.name) != getattr(KVM_OPTIONS, f.name)
    }  # fmt: skip


def test_the_default_options_print_as_an_empty_call() -> None:
    assert repr(KvmOptions()) == "KvmOptions()"
    assert repr(KvmOptions(broadcast_quirk=False)) == "KvmOptions(broadcast_quirk=False)"


def test_vm_keywords_and_vm_config_are_one_code_path_and_vm_config_gives_it_back() -> None:
    kw: dict[str, Any] = {"x2apic_format": True, "broadcast_quirk": False, "trace": True}
    by_keywords = Vm(3, "sdm", **kw)
    config = VmConfig.build(3, "sdm", **kw)
    assert by_keywords.config == config
    assert Vm(config).config is config
    assert Vm(config=config).config is config
    assert config.vcpu_ids == (0, 1, 2)
    assert config.profile is PRESETS["sdm"]
    assert config.kvm == SDM_OPTIONS.replace(x2apic_format=True)
    vm = Vm(config)
    assert (vm.x2apic_format, vm.broadcast_quirk, vm.tracer.on) == (True, False, True)
    assert [v.vcpu_id for v in vm.vcpus] == [0, 1, 2]


def test_a_config_cannot_be_combined_with_keywords_that_would_be_ignored() -> None:
    config = VmConfig.build(2)
    mixed = r"^config cannot be combined with keywords \(trace\)$"
    with pytest.raises(ApicValueError, match=mixed):
        Vm(config, trace=True)
    with pytest.raises(ApicValueError, match=r"\(vcpus\)$"):
        Vm(3, config=config)
    with pytest.raises(ApicValueError, match="config is given twice"):
        Vm(config, config=config)
    with pytest.raises(ApicTypeError, match=r"^config must be a VmConfig, not dict$"):
        Vm(config={})  # type: ignore[arg-type]
    assert Vm(config, trace=False).config is config  # a keyword at its default is harmless


def test_replace_makes_a_checked_copy_and_refuses_unknown_fields() -> None:
    config = VmConfig.build(2)
    wider = config.replace(vcpu_ids=[0, 5, 9])
    assert wider.vcpu_ids == (0, 5, 9) and config.vcpu_ids == (0, 1)
    with pytest.raises(ApicValueError, match=r"^'vcpus' is not a VmConfig field$"):
        config.replace(vcpus=3)
    with pytest.raises(ApicTypeError, match=r"^trace must be a bool, not str$"):
        config.replace(trace="yes")
    options = KvmOptions().replace(broadcast_quirk=False)
    assert options.broadcast_quirk is False
    with pytest.raises(ApicValueError, match=r"^'vector_hashing' is not a KvmOptions field$"):
        KvmOptions().replace(vector_hashing=False)


# =============================================================================================
# Exact types, before any VM exists
# =============================================================================================
@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"vcpu_ids": 3}, ApicTypeError, r"vcpu_ids must be a sequence of ints, not int"),
        ({"vcpu_ids": "01"}, ApicTypeError, r"vcpu_ids must be a sequence of ints, not str"),
        ({"vcpu_ids": (0, True)}, ApicTypeError, r"vcpu_id must be an int, not bool"),
        ({"vcpu_ids": (0.0,)}, ApicTypeError, r"vcpu_id must be an int, not float"),
        ({"vcpu_ids": ()}, ApicValueError, r"vcpu_ids must name at least one vCPU"),
        ({"vcpu_ids": (1, 1)}, ApicValueError, r"vcpu_id=1 already exists"),
        ({"vcpu_ids": (8,), "max_vcpu_ids": 8}, ApicValueError, r"vcpu_id=0x8 is outside"),
        ({"profile": "kvm"}, ApicTypeError, r"profile must be a Profile, not str"),
        ({"kvm": None}, ApicTypeError, r"kvm must be a KvmOptions, not NoneType"),
        ({"features": {}}, ApicTypeError, r"features must be a Features, not dict"),
        ({"accelerator": "emulated"}, ApicTypeError, r"accelerator must be a AccelConfig"),
        ({"bsp_vcpu_id": True}, ApicTypeError, r"bsp_vcpu_id must be an int, not bool"),
        ({"bsp_vcpu_id": 1.0}, ApicTypeError, r"bsp_vcpu_id must be an int, not float"),
        ({"max_vcpu_ids": 0}, ApicValueError, r"max_vcpu_ids=0x0 is outside"),
        ({"aps_started": 1}, ApicTypeError, r"aps_started must be a bool, not int"),
        ({"exit_log": -1}, ApicValueError, r"exit_log=-0x1 is outside"),
        ({"trace": "no"}, ApicTypeError, r"trace must be a bool, not str"),
    ],
)
def test_every_config_field_is_checked_with_exact_types_naming_it(
    changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match="^" + message):
        VmConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"x2apic_format": 1}, r"x2apic_format must be a bool, not int"),
        ({"broadcast_quirk": "no"}, r"broadcast_quirk must be a bool, not str"),
        ({"lowest_priority": "lowest_tpr"}, r"lowest_priority must be a LowestPriorityPolicy"),
        ({"optimized_apic_map": None}, r"optimized_apic_map must be a bool, not NoneType"),
        ({"map_excludes_new_vcpu": 0}, r"map_excludes_new_vcpu must be a bool, not int"),
        ({"enforce_pv_cpuid": 1.0}, r"enforce_pv_cpuid must be a bool, not float"),
        ({"pv_features": None}, r"pv_features must be an iterable of ints, not NoneType"),
        ({"pv_features": {1.0}}, r"pv_features must be an int, not float"),
        ({"pv_features": {True}}, r"pv_features must be an int, not bool"),
    ],
)
def test_every_kvm_option_is_checked_with_exact_types_naming_it(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApicTypeError, match="^" + message):
        KvmOptions(**changes)


def test_vm_keywords_refuse_a_truthy_string_for_a_bool__STATE_5() -> None:
    """Issue 12: ``Vm(broadcast_quirk='no')`` was taken as True."""
    with pytest.raises(ApicTypeError, match=r"^broadcast_quirk must be a bool or None, not str$"):
        Vm(1, broadcast_quirk="no")  # type: ignore[arg-type]
    with pytest.raises(ApicTypeError, match=r"^pv_features must be an iterable of ints"):
        Vm(1, pv_features=None)  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match=r"^accelerator='x' is not known"):
        Vm(1, accelerator="x")


# =============================================================================================
# The knobs that left lapic.Profile
# =============================================================================================
def test_the_kvm_level_knobs_are_options_of_the_vm_not_of_the_profile__DIFF_D5_DIFF_D9() -> None:
    profile_fields = {f.name for f in dataclasses.fields(Profile)}
    option_fields = {f.name for f in dataclasses.fields(KvmOptions)}
    assert profile_fields.isdisjoint(option_fields)
    assert {"optimized_apic_map", "broadcast_quirk", "lowest_priority",
            "map_excludes_new_vcpu"} <= option_fields  # fmt: skip


def test_a_vm_takes_the_options_preset_of_its_profile__STATE_5_KVMB_8() -> None:
    """``Vm(profile="sdm")`` behaves as before the knobs moved: no quirk, the SDM's policy, no
    optimized map, and no KVMB-8 lag; ``kvm`` keeps KVM's defaults."""
    assert Vm(1).options == KVM_OPTIONS
    sdm = Vm(2, "sdm")
    assert sdm.options == SDM_OPTIONS
    assert (sdm.broadcast_quirk, sdm.lowest_priority) == (False, LowestPriorityPolicy.LOWEST_TPR)
    assert sdm.vector_hashing is False
    assert not sdm._use_map
    custom = Vm(1, Profile.custom("sdm", esr_latching=False))
    assert custom.options == SDM_OPTIONS
    assert Vm(1, Profile.custom("kvm", esr_latching=True)).options == KVM_OPTIONS


def test_options_for_a_profile_read_the_one_reference_table__LP_1_MATCH_1() -> None:
    for name, (quirk, policy) in REFERENCE_DEFAULTS.items():
        options = KvmOptions.for_profile(PRESETS[name])
        assert (options.broadcast_quirk, options.lowest_priority) == (quirk, policy)
        assert reference_defaults(PRESETS[name]) == (quirk, policy)
    assert reference_defaults(Profile.custom("kvm", name="mine")) == REFERENCE_DEFAULTS["kvm"]


def test_vector_hashing_picks_kvms_policy_and_is_refused_under_lowest_tpr__LP_1() -> None:
    assert Vm(1, vector_hashing=False).lowest_priority is LowestPriorityPolicy.ARB_COUNTER
    assert Vm(1, vector_hashing=True).options.vector_hashing is True
    with pytest.raises(ApicValueError, match=r"set lowest_priority instead$"):
        Vm(1, "sdm", vector_hashing=True)
    arb = KvmOptions(lowest_priority=LowestPriorityPolicy.ARB_COUNTER)
    assert Vm(VmConfig(kvm=arb)).vector_hashing is False


def test_the_map_excludes_the_new_vcpu_only_when_the_option_says_so__KVMB_8() -> None:
    """KVMB-8's example: a fresh 2-vCPU VM, an NMI MSI to APIC ID 1 -> 0 (the map lacks vCPU 1);
    with ``map_excludes_new_vcpu=False`` the same message reaches it."""
    nmi_to_1 = (0xFEE00000 | 1 << 12, 0, 0x400)
    assert Vm(2).signal_msi(*nmi_to_1) == 0
    current = Vm(VmConfig.build(2).replace(kvm=KvmOptions(map_excludes_new_vcpu=False)))
    assert current.signal_msi(*nmi_to_1) == 1


# =============================================================================================
# The host API: one Protocol, one MsrError, one set of checks
# =============================================================================================
def test_the_host_api_is_declared_once_and_the_kvm_view_uses_it() -> None:
    assert view.AnyVm is HostApi
    vm: HostApi = Vm(1)  # mypy checks that Vm satisfies the Protocol
    assert len(vm) == 1
    import apicsim.kvm.vm as kvm_vm
    import hypervisor.vm

    assert not hasattr(hypervisor.vm, "HostApi")
    assert vars(kvm_vm)["MsrError"] is MsrError
    assert issubclass(MsrError, ApicValueError)


BAD_CALLS: list[tuple[str, tuple[Any, ...], type[Exception], str]] = [
    ("get_lapic", (True,), ApicTypeError, r"^i must be an int, not bool$"),
    ("get_lapic", (1,), ApicValueError, r"^i=0x1 is outside \[0x0, 0x0\]$"),
    ("set_lapic", (0, "x" * 0x400), ApicTypeError, r"^data must be bytes, not str$"),
    ("set_lapic", (0, bytes(4)), ApicValueError, r"^data must be 1024 bytes, got 4$"),
    ("set_lapic", (1.0, bytes(0x400)), ApicTypeError, r"^i must be an int, not float$"),
    ("get_msr", (0, 0x1B * 1.0), ApicTypeError, r"^msr must be an int, not float$"),
    ("get_msr", (0, 1 << 32), ApicValueError, r"^msr=0x100000000 is outside"),
    ("set_msr", (0, 0x1B, True), ApicTypeError, r"^value must be an int, not bool$"),
    ("set_msr", (0, 0x1B, 1 << 64), ApicValueError, r"^value=0x10000000000000000 is outside"),
    ("set_msr", (0, "0x1b", 0), ApicTypeError, r"^msr must be an int, not str$"),
    ("signal_msi", (0xFEE00000 * 1.0,), ApicTypeError, r"^address_lo must be an int, not float$"),
    ("signal_msi", (0xFEE00000, True), ApicTypeError, r"^address_hi must be an int, not bool$"),
    ("signal_msi", (0xFEE00000, 0, -1), ApicValueError, r"^data=-0x1 is outside"),
    ("signal_msi", (0xFEE00000, 0, 0, 1 << 32), ApicValueError, r"^flags=0x100000000 is outside"),
    ("add_vcpu", (True,), ApicTypeError, r"^vcpu_id must be an int, not bool$"),
    ("add_vcpu", (0,), ApicValueError, r"^vcpu_id=0 already exists$"),
]


@pytest.mark.parametrize(("method", "args", "error", "message"), BAD_CALLS)
def test_host_api_arguments_are_checked_before_anything_changes__MSI_1_STATE_5(
    method: str, args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    vm = Vm(1)
    before = (vm.get_lapic(0), repr(vm.stats), len(vm), vm.exits)
    with pytest.raises(error, match=message):
        getattr(vm, method)(*args)
    assert (vm.get_lapic(0), repr(vm.stats), len(vm), vm.exits) == before
