"""KVM around the local APIC: VMs, vCPUs, exits, delivery, the PV IPI hypercall, accelerators.

``from hypervisor import Vm`` is the entry point; see ``hypervisor.vm``.
"""

from hypervisor.exits import Exit, ExitReason
from hypervisor.vcpu import MpState, RunState, Vcpu
from hypervisor.vm import MsrError, Vm

__all__ = ["Exit", "ExitReason", "MpState", "MsrError", "RunState", "Vcpu", "Vm"]
