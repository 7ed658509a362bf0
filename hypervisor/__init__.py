"""KVM around the local APIC: VMs, vCPUs, exits, delivery, the PV IPI hypercall, accelerators.

``from hypervisor import Vm`` is the entry point; see ``hypervisor.vm``.
"""

from hypervisor.api import HostApi, MsrError, VcpuApi
from hypervisor.apic_map import Inhibits
from hypervisor.config import AccelConfig, KvmOptions, VmConfig
from hypervisor.exits import Exit, ExitReason
from hypervisor.host import Host, Pcpu
from hypervisor.vcpu import MpState, RunState, Vcpu
from hypervisor.vm import Vm

__all__ = [
    "AccelConfig",
    "Exit",
    "ExitReason",
    "Host",
    "HostApi",
    "Inhibits",
    "KvmOptions",
    "MpState",
    "MsrError",
    "Pcpu",
    "RunState",
    "Vcpu",
    "VcpuApi",
    "Vm",
    "VmConfig",
]
