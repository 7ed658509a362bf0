"""``Pcpu``: one physical CPU as KVM sees it.

Follows KVM's per-CPU state: ``vcpu->cpu`` (the pCPU a vCPU was last loaded on),
``kvm_running_vcpu`` (the vCPU loaded here between ``vcpu_load`` and ``vcpu_put``),
``kvm_cpu_get_apicid(cpu)`` (the host APIC id, the target of AVIC doorbells and of the
posted-interrupt descriptor's NDST) and VMX's ``per_cpu(wakeup_vcpus_on_cpu, cpu)`` (the
blocked vCPUs whose wake-up notification arrives on this pCPU, ``pi_enable_wakeup_handler``).

A pCPU knows vCPUs only through the :class:`Runnable` Protocol: this layer never names a VM.
Not modelled: the pCPU's own physical local APIC registers, host tasks other than vCPUs.
"""

from __future__ import annotations

from typing import Protocol


class Runnable(Protocol):
    """What the host needs of a vCPU: a stable name for traces and snapshots, the pCPU it was
    last loaded on, and a way to put it (KVM ``vcpu_put``) when another vCPU is loaded there."""

    @property
    def index(self) -> int: ...

    @property
    def vcpu_id(self) -> int: ...

    @property
    def last_pcpu(self) -> Pcpu | None: ...

    def preempt(self) -> None: ...


class Pcpu:
    """One physical CPU.  ``loaded`` is the vCPU loaded here (KVM ``kvm_running_vcpu``, set by
    ``vcpu_load``, cleared by ``vcpu_put`` or when the vCPU blocks); ``wakeup_list`` holds the
    blocked vCPUs last loaded here (``wakeup_vcpus_on_cpu``)."""

    __slots__ = ("apic_id", "id", "loaded", "wakeup_list")

    def __init__(self, pcpu_id: int, apic_id: int) -> None:
        self.id = pcpu_id
        self.apic_id = apic_id
        """Host APIC id (KVM ``kvm_cpu_get_apicid``): doorbell and NDST target."""
        self.loaded: Runnable | None = None
        self.wakeup_list: list[Runnable] = []

    def __repr__(self) -> str:
        loaded = "-" if self.loaded is None else f"vcpu{self.loaded.index}"
        waiting = ",".join(f"vcpu{v.index}" for v in self.wakeup_list)
        return f"<Pcpu {self.id} apic_id={self.apic_id} loaded={loaded} wakeup=[{waiting}]>"
