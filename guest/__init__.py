"""A Linux-like guest stub running on the vCPUs of a ``hypervisor.Vm``.

``Guest(vm, driver)`` boots every vCPU the way Linux sets up its local APIC and then sends IPIs
the way Linux's APIC drivers do, one guest access (and so one VM exit under trap-and-emulate)
per register access Linux makes:

* :mod:`guest.cpu`: :class:`Guest`, :class:`GuestCpu` (boot, register access, the interrupt
  handler, the ``send_IPI*`` entry points);
* :mod:`guest.drivers`: ``flat``, ``physflat``, ``x2apic_phys``, ``x2apic_cluster``
  (``arch/x86/kernel/apic/``);
* :mod:`guest.kvm_pv`: ``kvm_pv``, the PV IPI driver of ``arch/x86/kernel/kvm.c``, and
  :func:`pv_send_ipi_hypercalls`, its pure encoder (reference ``kvm_lapic.md`` §13, PVG-1..5).

Layering: imports ``hypervisor`` and ``lapic``, never ``apicsim``.
"""

from guest.cpu import DRIVERS, Guest, GuestCpu
from guest.drivers import Driver
from guest.kvm_pv import KvmPv, pv_icr, pv_send_ipi_hypercalls

__all__ = [
    "DRIVERS",
    "Driver",
    "Guest",
    "GuestCpu",
    "KvmPv",
    "pv_icr",
    "pv_send_ipi_hypercalls",
]
