"""The apicsim pytest plugin (entry point ``pytest11``: ``apicsim = apicsim.testing.plugin``).

Fixtures:

* ``platform``: parametrized over every preset profile (``lapic.profile.PRESETS``) x every
  accelerator (``hypervisor.accel.ACCELERATORS``); ``platform.vm(n)`` builds a VM of ``n``
  vCPUs there with the profile's KVM options.  Session-scoped and immutable, so Hypothesis'
  ``@given`` tests may take it.  A project's own ``conftest.py`` fixture of the same name
  overrides it (apicsim's conformance suite adds a mixed custom profile that way).
* ``apicsim_vm``: a factory, ``apicsim_vm(vcpus=2, **Vm keywords)``.

Not modelled: command-line options (the plugin adds none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from hypervisor import KvmOptions, Vm, VmConfig, accel
from lapic.profile import PRESETS, Profile


class Platform:
    """One cell of the matrix: how VMs are built for a test (immutable, printed by name)."""

    __slots__ = ("accelerator", "kvm", "profile")

    def __init__(self, profile: Profile, accelerator: str, kvm: KvmOptions) -> None:
        self.profile = profile
        self.accelerator = accelerator
        self.kvm = kvm

    def vm(self, vcpus: int = 1, *, vcpu_ids: Sequence[int] | None = None) -> Vm:
        """A VM on this platform (KVM's defaults for everything the profile does not set)."""
        config = VmConfig.build(
            vcpus, self.profile, vcpu_ids=vcpu_ids, accelerator=self.accelerator
        )
        return Vm(config.replace(kvm=self.kvm))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Platform):
            return NotImplemented
        mine = (self.profile, self.accelerator, self.kvm)
        return mine == (other.profile, other.accelerator, other.kvm)

    def __hash__(self) -> int:
        return hash((self.profile, self.accelerator, self.kvm))

    def __str__(self) -> str:
        return f"{self.profile.name}/{self.accelerator}"

    def __repr__(self) -> str:
        return f"<Platform {self}>"


MATRIX: tuple[Platform, ...] = tuple(
    Platform(profile, name, KvmOptions.for_profile(profile))
    for profile in PRESETS.values()
    for name in sorted(accel.ACCELERATORS)
)
"""Every preset profile x every accelerator."""


@pytest.fixture(scope="session", params=MATRIX, ids=str)
def platform(request: pytest.FixtureRequest) -> Platform:
    param: Platform = request.param
    return param


@pytest.fixture
def apicsim_vm() -> Callable[..., Vm]:
    def make(vcpus: int = 2, **keywords: Any) -> Vm:
        return Vm(vcpus=vcpus, **keywords)

    return make
