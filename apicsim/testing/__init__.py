"""Test helpers for users of apicsim: Hypothesis strategies and a pytest plugin.

* :mod:`apicsim.testing.topologies`: the one :class:`Topology` type (vCPU ids, KVM options,
  uniform or per-vCPU APIC states) that builds a ``hypervisor.Vm`` or a ``lapic.bus.ApicBus``,
  and its strategies (``topologies``, ``mixed_topologies``, ``messages``);
* :mod:`apicsim.testing.strategies`: ICR and MSI values, register writes, and programs of
  :mod:`apicsim.ops` operations;
* :mod:`apicsim.testing.plugin`: registered through the ``pytest11`` entry point, so any
  project with apicsim installed gets the fixtures ``platform`` (one test run per profile x
  accelerator, ``Platform.vm(n)`` builds a VM there) and ``apicsim_vm`` (a factory of VMs).

Not modelled: Hypothesis settings profiles and example databases (the project's own
``tests/conftest.py`` chooses those; a user's project chooses its own).
"""

from apicsim.testing.plugin import MATRIX, Platform
from apicsim.testing.strategies import icr_values, msi_values, programs, register_writes
from apicsim.testing.topologies import (
    ApicSpec,
    Topology,
    messages,
    mixed_topologies,
    topologies,
)

__all__ = [
    "MATRIX",
    "ApicSpec",
    "Platform",
    "Topology",
    "icr_values",
    "messages",
    "mixed_topologies",
    "msi_values",
    "programs",
    "register_writes",
    "topologies",
]
