"""Ways of delivering interrupts to a guest, one module each, one interface for all.

An accelerator sees every guest access to the local APIC first, as the CPU would, and decides
whether it exits to KVM (trap-and-emulate), is completed by hardware (AVIC, APICv), or both.
It also decides how a target vCPU learns that something is pending for it (a kick, a doorbell,
a posted-interrupt notification, a wake-up).

:class:`Accelerator` is the interface and ``ACCELERATORS`` the registry mapping the names
accepted by ``Vm(accelerator=...)`` to constructors; both live in ``hypervisor.accelerators``
(the core's layer, which calls them) and are re-exported here.  Accelerators never import
each other.
"""

from hypervisor.accelerators import ACCELERATORS, Accelerator, make

__all__ = ["ACCELERATORS", "Accelerator", "make"]
