"""The architectural local APIC (xAPIC and x2APIC), register for register.

Knows nothing of VMs: ``hypervisor`` builds KVM's delivery on top of it.  Start with
:class:`LocalApic`; :mod:`lapic.registers` is the register table, :mod:`lapic.profile` the
KVM-vs-SDM choices, :mod:`lapic.destination` the pure matching rules, :mod:`lapic.bus` the
architectural slow-path bus of several APICs.  The seams the accelerators build on:
:mod:`lapic.ops` (the delivery vtable), :mod:`lapic.events` (pending NMI/SMI/INIT/SIPI),
:mod:`lapic.fields` (declared bit layouts) and ``LocalApic.snapshot``/``restore``.
"""

from lapic.apic import ApicMode, ApicSnapshot, Features, LocalApic, StateError
from lapic.events import PendingEvents, PendingEventsState
from lapic.faults import ApicTypeError, ApicValueError, GuestFault
from lapic.fields import Field, Layout
from lapic.icr import DeliveryMode, DestMode, Icr, Interrupt, Level, Msi, Shorthand, Trigger
from lapic.ops import ApicEvent, ApicOps, DefaultApicOps
from lapic.profile import LowestPriorityPolicy, Profile
from lapic.timer import Clock
from lapic.vectors import FrozenVectorSet, VectorSet

__all__ = [
    "ApicEvent",
    "ApicMode",
    "ApicOps",
    "ApicSnapshot",
    "ApicTypeError",
    "ApicValueError",
    "Clock",
    "DefaultApicOps",
    "DeliveryMode",
    "DestMode",
    "Features",
    "Field",
    "FrozenVectorSet",
    "GuestFault",
    "Icr",
    "Interrupt",
    "Layout",
    "Level",
    "LocalApic",
    "LowestPriorityPolicy",
    "Msi",
    "PendingEvents",
    "PendingEventsState",
    "Profile",
    "Shorthand",
    "StateError",
    "Trigger",
    "VectorSet",
]
