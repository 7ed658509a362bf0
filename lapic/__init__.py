"""The architectural local APIC (xAPIC and x2APIC), register for register.

Knows nothing of VMs: ``hypervisor`` builds KVM's delivery on top of it.  Start with
:class:`LocalApic`; :mod:`lapic.registers` is the register table, :mod:`lapic.profile` the
KVM-vs-SDM choices, :mod:`lapic.destination` the pure matching rules, :mod:`lapic.bus` the
architectural slow-path bus of several APICs.
"""

from lapic.apic import ApicMode, Features, LocalApic, StateError
from lapic.faults import ApicTypeError, ApicValueError, GuestFault
from lapic.icr import DeliveryMode, DestMode, Icr, Interrupt, Level, Msi, Shorthand, Trigger
from lapic.profile import LowestPriorityPolicy, Profile
from lapic.timer import Clock
from lapic.vectors import VectorSet

__all__ = [
    "ApicMode",
    "ApicTypeError",
    "ApicValueError",
    "Clock",
    "DeliveryMode",
    "DestMode",
    "Features",
    "GuestFault",
    "Icr",
    "Interrupt",
    "Level",
    "LocalApic",
    "LowestPriorityPolicy",
    "Msi",
    "Profile",
    "Shorthand",
    "StateError",
    "Trigger",
    "VectorSet",
]
