"""The physical machine under the hypervisor: pCPUs, the shared clock, the step scheduler.

``Pcpu`` (``pcpu.py``): one physical CPU with its host APIC id, the vCPU loaded on it and its
wake-up list.  ``Host`` (``machine.py``): N pCPUs, one virtual clock, always-on counters of
host IPIs, kicks, doorbells and wake-ups.  ``Steps`` (``steps.py``): multi-step protocols as
sequences of named atomic steps, run eagerly (the default) or queued for a test to interleave.

This layer never names a VM: it sees vCPUs through the :class:`Runnable` Protocol it declares.
Not modelled: host scheduling policy (which vCPU a pCPU picks), the physical local APICs.
"""

from hypervisor.host.machine import Host, HostStats
from hypervisor.host.pcpu import Pcpu, Runnable
from hypervisor.host.steps import Step, Steps, Thread

__all__ = ["Host", "HostStats", "Pcpu", "Runnable", "Step", "Steps", "Thread"]
