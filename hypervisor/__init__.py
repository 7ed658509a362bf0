"""KVM around the local APIC: VMs, vCPUs, exits, delivery, the PV IPI hypercall, accelerators.

``from hypervisor import Vm`` is the entry point; see ``hypervisor.vm``.
"""

from hypervisor.exits import Exit, ExitReason
from hypervisor.host import Host, Pcpu
from hypervisor.vcpu import MpState, RunState, Vcpu
from hypervisor.vm import MsrError, Vm

__all__ = ["Exit", "ExitReason", "Host", "MpState", "MsrError", "Pcpu", "RunState", "Vcpu", "Vm"]
