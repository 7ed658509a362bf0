"""``lapic.profile``: building profiles, comparing them, and their reprs.

The KVM-vs-SDM rows themselves (DIFF-D*) are tested where they act; this file covers the API
contracts of ``Profile`` (no spec id): ``replace``/``custom`` check every change and name the
result, ``differences`` lists exactly the differing fields, a repr pastes back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from lapic import ApicTypeError, ApicValueError, LowestPriorityPolicy, Profile
from lapic.profile import PRESETS

NAMESPACE = {"Profile": Profile, "LowestPriorityPolicy": LowestPriorityPolicy}


def test_replace_names_the_result_after_its_base() -> None:
    assert Profile.preset("sdm").replace(esr_latching=False).name == "sdm+custom"
    assert Profile.custom("kvm", esr_latching=True).name == "kvm+custom"
    assert Profile.custom("kvm", esr_latching=True, name="mine").name == "mine"
    assert Profile.custom("kvm", esr_latching=True, name="mine").esr_latching is True


def test_replace_refuses_an_unknown_field_naming_it() -> None:
    with pytest.raises(ApicValueError, match=r"^'no_such_knob' is not a Profile field$"):
        Profile.custom("kvm", no_such_knob=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"esr_latching": 1}, "esr_latching must be bool, not int"),
        ({"min_periodic_ns": True}, "min_periodic_ns must be int, not bool"),
        ({"min_periodic_ns": 1.5}, "min_periodic_ns must be int, not float"),
        ({"name": None}, "name must be str, not NoneType"),
    ],
)
def test_replace_refuses_a_value_of_the_wrong_type_naming_field_and_type(
    change: dict[str, Any], message: str
) -> None:
    kvm = Profile.preset("kvm")
    with pytest.raises(ApicTypeError, match=rf"^{message}$"):
        kvm.replace(**change)
    assert kvm == Profile()


def test_replace_accepts_an_int_for_an_int_field_and_a_bool_for_a_bool_field() -> None:
    p = Profile.custom("kvm", min_periodic_ns=0, esr_latching=True)
    assert (p.min_periodic_ns, p.esr_latching) == (0, True)


def test_differences_lists_each_differing_field_but_not_the_name() -> None:
    kvm = Profile.preset("kvm")
    mine = kvm.replace(esr_latching=True, min_periodic_ns=7, name="mine")
    assert mine.differences(kvm) == {"esr_latching": (True, False), "min_periodic_ns": (7, 200_000)}
    assert kvm.differences(mine) == {"esr_latching": (False, True), "min_periodic_ns": (200_000, 7)}
    assert mine.differences(mine) == {}
    sdm = Profile.preset("sdm")
    assert set(kvm.differences(sdm)) == {
        f.name for f in dataclasses.fields(Profile)
        if f.name != "name" and getattr(kvm, f.name) != getattr(sdm, f.name)
    }
    assert kvm.differences(sdm)["x2apic_lowest_priority_ipi"] == (True, False)


@pytest.mark.parametrize(
    "profile",
    [
        Profile.preset("kvm"),
        Profile.preset("sdm"),
        Profile.custom("kvm"),
        Profile.custom("kvm", esr_latching=True),
        Profile.custom("sdm", esr_latching=False),
        Profile.custom("sdm"),
        Profile(esr_latching=True),
        Profile.custom("kvm", name="sdm"),
        Profile.custom("kvm", unserviced_read_value=0xFF, name="arb"),
    ],
    ids=lambda p: p.name,
)
def test_profile_repr_is_valid_python_that_rebuilds_an_equal_profile(profile: Profile) -> None:
    back = eval(repr(profile), NAMESPACE)
    assert back == profile
    assert back.name == profile.name


def test_profile_reprs_read_as_the_shortest_call() -> None:
    assert repr(Profile.preset("kvm")) == "Profile.preset('kvm')"
    assert repr(Profile.preset("sdm")) == "Profile.preset('sdm')"
    assert repr(Profile.custom("kvm")) == "Profile.custom('kvm')"
    assert repr(Profile.custom("kvm", esr_latching=True)) == (
        "Profile.custom('kvm', esr_latching=True)"
    )
    assert repr(Profile.custom("kvm", min_periodic_ns=5, name="p")) == (
        "Profile.custom('kvm', name='p', min_periodic_ns=5)"
    )
    assert repr(Profile.custom("kvm", name="sdm")) == "Profile.custom('kvm', name='sdm')"
    assert repr(PRESETS["sdm"].replace(esr_latching=False)).startswith(
        "Profile.custom('kvm', name='sdm+custom', accept_illegal_vectors=False, "
    )


def test_preset_refuses_an_unknown_name_listing_the_presets() -> None:
    message = r"^profile='amd' is not a preset; choose one of \['kvm', 'sdm'\]$"
    with pytest.raises(ApicValueError, match=message):
        Profile.preset("amd")
