"""The accelerator interface and registry: how the core (``Vm``) reaches the accelerators.

:class:`Accelerator` is the Protocol every mechanism of ``hypervisor/accel/`` implements (one
module each: trap-and-emulate, later AVIC, APICv...).  It is declared here, in the core's layer,
because the core calls it; the accelerators sit a layer above and never import each other.
``ACCELERATORS`` maps each name ``Vm(accelerator=...)`` accepts to a constructor, given either
as a callable or as ``"module:attribute"``, imported when first used (as a plugin entry point
is), so the core never imports the layer above.  ``hypervisor.accel`` re-exports all three.

Not modelled here: any mechanism itself (see ``hypervisor/accel/``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Protocol

from lapic.faults import ApicValueError

if TYPE_CHECKING:
    from hypervisor.host.pcpu import Pcpu
    from hypervisor.vcpu import Vcpu
    from hypervisor.vm import Vm
    from lapic.apic import LocalApic


class Accelerator(Protocol):
    name: str

    def attach(self, vm: Vm) -> None:
        """Called after each vCPU is created (KVM_CREATE_VCPU, also while ``Vm()`` creates
        its vCPUs), so the last call has seen every vCPU."""
        ...

    def mmio_read(self, vcpu: Vcpu, gpa: int, size: int) -> int: ...

    def mmio_write(self, vcpu: Vcpu, gpa: int, value: int, size: int) -> None: ...

    def rdmsr(self, vcpu: Vcpu, msr: int) -> int: ...

    def wrmsr(self, vcpu: Vcpu, msr: int, value: int) -> None:
        """The guest's WRMSR.  ``Vcpu`` binds it to each vCPU once; an accelerator may give
        that binding itself with an optional ``wrmsr_of(vcpu)`` (trap-and-emulate, which
        intercepts every WRMSR, gives ``vcpu.msr_exit``: one call less per write)."""
        ...

    def mov_to_cr8(self, vcpu: Vcpu, value: int) -> None:
        """The guest's MOV to CR8 (``Vcpu.mov_to_cr8``): record the exit it takes, if any, and
        let it take effect (``vcpu.emulate_mov_to_cr8``, which raises the #GP of a reserved
        bit).  CR8-2 (trap-and-emulate), AV-G4 (AVIC)."""
        ...

    def notifier(self, vcpu: Vcpu) -> Callable[[LocalApic], None]:
        """The hook the VM installs as ``vcpu.apic.notify_hook``: called whenever something
        became pending in that APIC (an accepted interrupt, NMI, INIT, SIPI...)."""
        ...

    def vcpu_load(self, vcpu: Vcpu, pcpu: Pcpu) -> None:
        """``vcpu`` was loaded on host pCPU ``pcpu`` (KVM ``kvm_arch_vcpu_load``)."""
        ...

    def vcpu_put(self, vcpu: Vcpu) -> None:
        """``vcpu`` left its pCPU, still runnable (KVM ``kvm_arch_vcpu_put``)."""
        ...

    def vcpu_blocking(self, vcpu: Vcpu) -> None:
        """``vcpu`` is about to block (halt); it leaves its pCPU (``vcpu.last_pcpu``) for that
        pCPU's wake-up list (KVM ``kvm_arch_vcpu_blocking``)."""
        ...

    def vcpu_unblocking(self, vcpu: Vcpu) -> None:
        """``vcpu`` stopped blocking: woken or entered (KVM ``kvm_arch_vcpu_unblocking``)."""
        ...

    def state(self) -> Hashable:
        """The accelerator's own simulated state as a hashable value (for ``vm.snapshot()``)."""
        ...

    def set_state(self, state: Hashable) -> None:
        """Reinstate what :meth:`state` returned (``vm.restore``)."""
        ...


ACCELERATORS: dict[str, Callable[[], Accelerator] | str] = {
    "emulated": "hypervisor.accel.emulated:Emulated",
    "avic": "hypervisor.accel.avic:AvicState",
    "apicv": "hypervisor.accel.apicv:make_apicv",
    "ipiv": "hypervisor.accel.apicv:make_ipiv",
}
"""Every accelerator by the name ``Vm(accelerator=...)`` takes (the conformance suite runs
against each): a constructor, or ``"module:attribute"`` naming one."""


ACCEL_CONFIGS: dict[str, str] = {
    "avic": "hypervisor.accel.avic:Avic",
    "apicv": "hypervisor.accel.apicv:Apicv",
    "ipiv": "hypervisor.accel.apicv:ipiv_config",
}
"""The config record (an ``AccelConfig`` subclass) of each accelerator that has settings, as
``"module:attribute"``: ``Vm(accelerator="avic")`` takes that record's defaults."""


def config_for(name: str) -> object:
    """The default config record of accelerator ``name`` (None: plain ``AccelConfig``)."""
    target = ACCEL_CONFIGS.get(name)
    if target is None:
        return None
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)()


def make(name: str) -> Accelerator:
    """An accelerator by name (a key of :data:`ACCELERATORS`)."""
    try:
        factory = ACCELERATORS[name]
    except KeyError:
        raise ApicValueError(
            f"accelerator={name!r} is not known; choose one of {sorted(ACCELERATORS)}"
        ) from None
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
        assert callable(factory)
    accel: Accelerator = factory()
    return accel
