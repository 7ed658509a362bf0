"""KVM's paravirtual IPIs, guest side: the ``KVM_HC_SEND_IPI`` encoder of Linux's ``kvm.c``.

Implements (Linux ``arch/x86/kernel/kvm.c``; reference ``kvm_lapic.md`` §13, PVG-1..5):

* :func:`pv_send_ipi_hypercalls`, the pure encoder of ``__send_ipi_mask`` (PVG-2, PVG-3): the
  APIC IDs are visited in the order given (Linux: ascending CPU number, ``for_each_cpu``), with
  the 128-bit (x86-64; 64-bit on i386) window ``[min, min + 2*BITS_PER_LONG)`` that may also
  grow downwards (the bitmap is shifted left when a lower ID still fits), flushed as one
  hypercall whenever an ID does not fit, and once more at the end.  ``a2`` is
  ``(unsigned long)(int)min`` exactly as C passes it (sign-extended on x86-64 for IDs >= 2**31;
  KVM reads it as a u32, so this never changes what is delivered), and ``min + 128`` wraps
  at 2**32 as the C comparison does (so no window ever spans the top of the ID space);
* :class:`KvmPv`, the driver ``kvm_setup_pv_ipi`` leaves behind: ``send_IPI_mask`` =
  ``kvm_send_ipi_mask`` and ``send_IPI_mask_allbutself`` = ``kvm_send_ipi_mask_allbutself``
  (PVG-5: copy, clear self, encode; an empty mask makes no hypercall), one VMCALL per window;
  each result is only checked (PVG-4: a negative one is appended to ``GuestCpu.pv_errors``,
  Linux's ``WARN_ONCE``), with no retry and no fallback, and later windows are still sent.
  Everything else (``send_IPI``, the shorthands, ``send_IPI_self``, boot) is the base
  driver's, as in Linux where only those two callbacks are replaced;
* :func:`pv_ipi_supported` (PVG-1): ``KVM_FEATURE_PV_SEND_IPI`` in CPUID 0x40000001 (the VM's
  ``pv_features``) and more than one possible CPU.

Not modelled: ``kvm_smp_send_call_func_ipi``'s ``KVM_HC_SCHED_YIELD`` to a preempted target,
PV EOI, PV TLB flush, PV spinlock kicks (``KVM_HC_KICK_CPU``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from guest.drivers import APIC_DM_FIXED, APIC_DM_NMI, NMI_VECTOR, Driver
from hypervisor.pv_ipi import KVM_FEATURE_PV_SEND_IPI, KVM_HC_SEND_IPI
from lapic.faults import ApicTypeError, ApicValueError, check_int

if TYPE_CHECKING:
    from guest.cpu import GuestCpu
    from hypervisor.vm import Vm

Hypercall = tuple[int, int, int, int]
"""``(a0, a1, a2, a3)`` of one ``KVM_HC_SEND_IPI``: bitmap low, bitmap high, min, ICR."""

_U32 = 0xFFFFFFFF


def pv_icr(vector: int) -> int:
    """PVG-2: ``APIC_DM_FIXED | vector``, or ``APIC_DM_NMI`` for ``NMI_VECTOR``."""
    check_int("vector", vector, 0, 0xFF)
    return APIC_DM_NMI if vector == NMI_VECTOR else APIC_DM_FIXED | vector


def pv_send_ipi_hypercalls(
    apic_ids: Iterable[int], vector: int, bits_per_long: int = 64
) -> list[Hypercall]:
    """PVG-3: the hypercalls ``__send_ipi_mask`` makes for ``apic_ids`` (in visiting order)."""
    if bits_per_long not in (32, 64):
        raise ApicValueError(f"bits_per_long={bits_per_long!r} must be 32 or 64")
    icr = pv_icr(vector)
    cluster = 2 * bits_per_long  # KVM_IPI_CLUSTER_SIZE
    word = (1 << bits_per_long) - 1
    out: list[Hypercall] = []

    def hypercall(bitmap: int, low_id: int) -> None:
        out.append((bitmap & word, bitmap >> bits_per_long, _as_ulong(low_id, word), icr))

    bitmap = 0
    min_id = max_id = 0
    for apic_id in apic_ids:
        check_int("apic_id", apic_id, 0, _U32)
        if not bitmap:
            min_id = max_id = apic_id
        elif apic_id < min_id and max_id - apic_id < cluster:
            bitmap <<= min_id - apic_id
            min_id = apic_id
        elif min_id < apic_id < (min_id + cluster) & _U32:  # C: unsigned, wraps at 2**32
            max_id = max(max_id, apic_id)
        else:
            hypercall(bitmap, min_id)
            min_id = max_id = apic_id
            bitmap = 0
        bitmap |= 1 << (apic_id - min_id)
    if bitmap:
        hypercall(bitmap, min_id)
    return out


def _as_ulong(min_id: int, word: int) -> int:
    """``(unsigned long)min`` where ``min`` is a C ``int`` holding a u32 APIC ID."""
    signed = min_id - (1 << 32) if min_id >= 1 << 31 else min_id
    return signed & word


def pv_ipi_supported(vm: Vm) -> bool:
    """PVG-1 ``pv_ipi_supported``: the CPUID feature bit and ``num_possible_cpus() != 1``."""
    return KVM_FEATURE_PV_SEND_IPI in vm.pv_features and len(vm.vcpus) != 1


class KvmPv(Driver):
    """The base driver with ``send_IPI_mask``/``send_IPI_mask_allbutself`` replaced."""

    name = "kvm_pv"
    linux_name = "kvm pv ipi"

    def __init__(self, base: Driver, bits_per_long: int = 64) -> None:
        if not isinstance(base, Driver) or isinstance(base, KvmPv):
            raise ApicTypeError(f"base must be a non-PV Driver, not {base!r}")
        if bits_per_long not in (32, 64):
            raise ApicValueError(f"bits_per_long={bits_per_long!r} must be 32 or 64")
        self.base = base
        self.bits_per_long = bits_per_long
        self.x2apic = base.x2apic
        self.dest_mode_logical = base.dest_mode_logical
        self.max_cpus = base.max_cpus

    def enable(self, cpu: GuestCpu) -> None:
        self.base.enable(cpu)

    def init_apic_ldr(self, cpu: GuestCpu) -> None:
        self.base.init_apic_ldr(cpu)

    def send_IPI(self, cpu: GuestCpu, target: int, vector: int) -> None:
        self.base.send_IPI(cpu, target, vector)

    def send_shorthand(self, cpu: GuestCpu, shortcut: int, vector: int) -> None:
        self.base.send_shorthand(cpu, shortcut, vector)

    def send_IPI_mask(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        """``kvm_send_ipi_mask`` -> ``__send_ipi_mask``."""
        self._send_ipi_mask(cpu, cpus, vector)

    def send_IPI_mask_allbutself(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        """PVG-5 ``kvm_send_ipi_mask_allbutself``: copy the mask, clear this CPU, encode."""
        self._send_ipi_mask(cpu, [c for c in cpus if c != cpu.index], vector)

    def _send_ipi_mask(self, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        apicids = cpu.guest.cpu_to_apicid
        long_mode = self.bits_per_long == 64
        sign = 1 << (self.bits_per_long - 1)
        calls = pv_send_ipi_hypercalls((apicids[c] for c in cpus), vector, self.bits_per_long)
        for a0, a1, a2, a3 in calls:
            ret = cpu.vcpu.hypercall(KVM_HC_SEND_IPI, a0, a1, a2, a3, long_mode=long_mode)
            if ret & sign:
                self._warn_once(cpu, ret - (sign << 1))

    def _warn_once(self, cpu: GuestCpu, ret: int) -> None:
        """PVG-4: ``WARN_ONCE(ret < 0, "kvm-guest: failed to send PV IPI: %ld")`` records the
        negative result ``ret`` in ``cpu.pv_errors``."""
        cpu.pv_errors.append(ret)

    def __repr__(self) -> str:
        return f"<KvmPv on {self.base!r}>"


# What a bug replay (``apicsim/replays/``, specs/replays.md) may swap, and the fix behind each.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "KvmPv._warn_once",  # BUG-5: the WARN_ONCE on a failed PV IPI hypercall
    }
)
