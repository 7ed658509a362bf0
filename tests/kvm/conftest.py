"""Fixtures that run one test body on the model (``hypervisor.Vm``) and on the host's KVM.

* ``backends`` is parametrized over ``"model"`` and ``"kvm"`` and yields a factory
  ``make(vcpus, *, x2apic_format, broadcast_quirk, vcpu_ids) -> AnyVm``; the ``kvm`` case is
  skipped, with the reason from ``kvm_available()``, when ``/dev/kvm`` is missing or unusable.
* ``both`` runs a body on a fresh VM of each backend and asserts that the observables are equal
  (``both.run(body, vcpus=4)``), returning them.

The model is given the virtual CPU that KvmVm's guest CPUID advertises (``guest_features()``:
x2APIC, TSC deadline, MAXPHYADDR, SMM, vendor) and KVM's ``vector_hashing`` module parameter,
so both backends model the same machine.  The factories and helpers are in ``support.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kvm.support import Both, Factory, skip_without_kvm


@pytest.fixture(params=["model", "kvm"])
def backends(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """A VM factory for the model, then for KVM (skipped where KVM is unavailable)."""
    if request.param == "kvm":
        skip_without_kvm()
    factory = Factory(request.param)
    yield factory
    factory.close()


@pytest.fixture
def both() -> Iterator[Both]:
    """Compare model and KVM on one body (skipped where KVM is unavailable)."""
    skip_without_kvm()
    b = Both()
    yield b
    b.close()
