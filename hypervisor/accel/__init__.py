"""Ways of delivering interrupts to a guest, one module each, one interface for all.

An accelerator sees every guest access to the local APIC first, as the CPU would, and decides
whether it exits to KVM (trap-and-emulate), is completed by hardware (AVIC, APICv), or both.
It also decides how a target vCPU learns that something is pending for it (a kick, a doorbell,
a posted-interrupt notification, a wake-up).

:class:`Accelerator` is the interface; ``ACCELERATORS`` maps the names accepted by
``Vm(accelerator=...)`` to constructors.  Accelerators never import each other.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Protocol

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

    def wrmsr(self, vcpu: Vcpu, msr: int, value: int) -> None: ...

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


def _emulated() -> Accelerator:
    from hypervisor.accel.emulated import Emulated

    return Emulated()


ACCELERATORS: dict[str, Callable[[], Accelerator]] = {"emulated": _emulated}
"""Every accelerator by the name ``Vm(accelerator=...)`` takes (the conformance suite runs
against each)."""


def make(name: str) -> Accelerator:
    """An accelerator by name (a key of :data:`ACCELERATORS`)."""
    try:
        factory = ACCELERATORS[name]
    except KeyError:
        from lapic.faults import ApicValueError

        raise ApicValueError(
            f"accelerator={name!r} is not known; choose one of {sorted(ACCELERATORS)}"
        ) from None
    return factory()
