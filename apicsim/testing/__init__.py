"""Test helpers for users of apicsim: Hypothesis strategies and a pytest plugin.

* :mod:`apicsim.testing.strategies`: topologies (vCPU ids, APIC modes) that build a
  ``hypervisor.Vm``, ICR and MSI values, register writes, and programs of
  :mod:`apicsim.ops` operations;
* :mod:`apicsim.testing.plugin`: registered through the ``pytest11`` entry point, so any
  project with apicsim installed gets the fixtures ``platform`` (one test run per profile x
  accelerator, ``Platform.vm(n)`` builds a VM there) and ``apicsim_vm`` (a factory of VMs).

Not modelled: Hypothesis settings profiles and example databases (the project's own
``tests/conftest.py`` chooses those; a user's project chooses its own).
"""

from apicsim.testing.plugin import MATRIX, Platform
from apicsim.testing.strategies import (
    Topology,
    icr_values,
    msi_values,
    programs,
    register_writes,
    topologies,
)

__all__ = [
    "MATRIX",
    "Platform",
    "Topology",
    "icr_values",
    "msi_values",
    "programs",
    "register_writes",
    "topologies",
]
