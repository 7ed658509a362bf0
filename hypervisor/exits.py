"""VM exits: reasons, records and the counters kept for every exit.

KVM leaves the guest (a VM exit) whenever the hardware cannot finish an access itself.  In the
trap-and-emulate configuration every local-APIC access does: an x2APIC register is an MSR
access (VMX basic exit reasons 31 RDMSR / 32 WRMSR), an xAPIC register is an MMIO access to an
unbacked page (49 EPT misconfiguration, KVM's fast MMIO path), a hypercall is VMCALL (18).
Accelerated configurations (AVIC, APICv) add their own exits; their reasons are listed here too
so that every accelerator reports into one vocabulary.

Names follow KVM's ``kvm_exit`` tracepoint (VMX exit reason names; the SVM counterparts are
noted).  The ``qualification`` field is the MSR index, the guest-physical address, or the
hypercall number; ``value`` is the data written (0 for reads).  A guest MOV to CR8 that exits
is ``TPR_BELOW_THRESHOLD`` (VMX with a TPR shadow: a trap after the write) or ``WRITE_CR8``
(SVM's ``SVM_EXIT_WRITE_CR8``, 0x18, intercepted before the write); its value is the source
operand.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple


class ExitReason(IntEnum):
    """VMX basic exit reasons (SDM Vol. 3 Appendix C); SVM ones (AVIC, WRITE_CR8) are SVM exit
    codes + 0x1000."""

    EXTERNAL_INTERRUPT = 1
    HLT = 12
    VMCALL = 18
    MSR_READ = 31
    MSR_WRITE = 32
    TPR_BELOW_THRESHOLD = 43
    APIC_ACCESS = 44
    EOI_INDUCED = 45
    EPT_MISCONFIG = 49
    APIC_WRITE = 56
    WRITE_CR8 = 0x1000 + 0x018
    AVIC_INCOMPLETE_IPI = 0x1000 + 0x401
    AVIC_UNACCELERATED_ACCESS = 0x1000 + 0x402

    def __repr__(self) -> str:
        return f"ExitReason.{self.name}"

    __str__ = __repr__
    __hash__ = int.__hash__  # Enum hashes by name in Python code; exits are counted per reason


EXIT_SLOTS: dict[ExitReason, int] = {reason: i for i, reason in enumerate(ExitReason)}
"""Each reason's index in a list of exit counts (``Vcpu.exit_counts``, ``Stats.exit_counts``)."""


def exits_by_reason(counts: Sequence[int]) -> Counter[ExitReason]:
    """The non-zero counts of a list of exit counts (indexed by ``EXIT_SLOTS``), by reason."""
    return Counter({r: counts[i] for r, i in EXIT_SLOTS.items() if counts[i]})


ExitRecord = tuple[int, ExitReason, int, int]
"""One exit as ``Vm.exit_log`` keeps it: ``(vcpu index, reason, qualification, value)``, a
plain tuple (the cheapest record to make per exit); ``Vm.exits`` reads them as :class:`Exit`."""


class Exit(NamedTuple):
    """One VM exit as recorded in ``Vm.exits``."""

    vcpu: int
    reason: ExitReason
    qualification: int = 0
    value: int = 0
