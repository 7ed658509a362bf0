"""The real-KVM backend: the host's ``/dev/kvm`` behind the interface of ``hypervisor.Vm``.

``KvmVm`` creates a VM with KVM's in-kernel irqchip (IOAPIC, PIC and one local APIC per vCPU)
and runs the guest accesses of ``KvmVcpu`` as real instructions in a tiny 64-bit guest, so one
test body can run on the model and on the kernel and compare what each shows.  Standard library
only.  See ``specs/kvm_backend.md``.
"""

from apicsim.kvm.view import AnyVm, GuestCpu, LapicView, lapic_view
from apicsim.kvm.vm import (
    HostLimits,
    KvmError,
    KvmVcpu,
    KvmVm,
    guest_features,
    host_tpr_low_bits_survive_exit,
    host_vector_hashing,
    kvm_available,
)

__all__ = [
    "AnyVm",
    "GuestCpu",
    "HostLimits",
    "KvmError",
    "KvmVcpu",
    "KvmVm",
    "LapicView",
    "guest_features",
    "host_tpr_low_bits_survive_exit",
    "host_vector_hashing",
    "kvm_available",
    "lapic_view",
]
