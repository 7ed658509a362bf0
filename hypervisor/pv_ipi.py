"""KVM hypercalls: the dispatcher and ``KVM_HC_SEND_IPI``.

Implements (reference ``kvm_lapic.md`` §12, PVH-0..14; ``____kvm_emulate_hypercall`` in
``arch/x86/kvm/x86.c``, ``kvm_pv_send_ipi``/``__pv_send_ipi`` in ``lapic.c``;
``Documentation/virt/kvm/x86/hypercalls.rst``):

* :func:`emulate_hypercall`: nr in RAX, a0..a3 in RBX, RCX, RDX, RSI; outside 64-bit mode all
  five are truncated to 32 bits and so is the result; CPL != 0 gives -KVM_EPERM; an unknown or
  feature-gated-off number gives -KVM_ENOSYS (the gate only applies when userspace enabled
  KVM_CAP_ENFORCE_PV_FEATURE_CPUID, as ``guest_pv_has`` does);
* :func:`pv_send_ipi`: the bitmap walk with its bounds (``min > max_apic_id`` -> 0; at most
  ``min(64, max_apic_id - min + 1)`` bits of each half), the u32 wrap of ``min`` between the
  halves, -KVM_EINVAL for logical mode or any shorthand, -EOPNOTSUPP without a map.

Hypercalls modelled: KVM_HC_VAPIC_POLL_IRQ (returns 0), KVM_HC_KICK_CPU (a remote-read-mode
message to the given APIC ID: KVM's PV unhalt kick; reference §18.6 marks the exact
``kvm_pv_kick_cpu_op`` code as not read, so the model follows the inferred behaviour),
KVM_HC_SEND_IPI, KVM_HC_SCHED_YIELD (returns 0; yielding has no model).  Not modelled:
KVM_HC_CLOCK_PAIRING and KVM_HC_MAP_GPA_RANGE, which answer -KVM_ENOSYS here (KVM answers
-KVM_ENOSYS for MAP_GPA_RANGE unless userspace enabled KVM_CAP_EXIT_HYPERCALL; CLOCK_PAIRING
depends on the host clocksource).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from hypervisor.apic_map import ApicMap
from lapic.apic import LocalApic
from lapic.icr import DEST_LOGICAL, SHORTHAND_MASK, DeliveryMode, Interrupt, Level, Trigger

KVM_ENOSYS = 1000
KVM_EFAULT = 14
KVM_EINVAL = 22
KVM_E2BIG = 7
KVM_EPERM = 1
KVM_EOPNOTSUPP = 95
EOPNOTSUPP = 95

KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_MMU_OP = 2
KVM_HC_FEATURES = 3
KVM_HC_PPC_MAP_MAGIC_PAGE = 4
KVM_HC_KICK_CPU = 5
KVM_HC_MIPS_GET_CLOCK_FREQ = 6
KVM_HC_MIPS_EXIT_VM = 7
KVM_HC_MIPS_CONSOLE_OUTPUT = 8
KVM_HC_CLOCK_PAIRING = 9
KVM_HC_SEND_IPI = 10
KVM_HC_SCHED_YIELD = 11
KVM_HC_MAP_GPA_RANGE = 12

KVM_FEATURE_PV_UNHALT = 7
KVM_FEATURE_PV_SEND_IPI = 11
KVM_FEATURE_PV_SCHED_YIELD = 13

_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1

AcceptFn = Callable[[LocalApic, Interrupt], bool]


def pv_send_ipi(
    apic_map: ApicMap | None,
    bitmap_low: int,
    bitmap_high: int,
    min_id: int,
    icr: int,
    *,
    op_64_bit: bool,
    accept: AcceptFn,
) -> int:
    """KVM ``kvm_pv_send_ipi``; ``min_id`` is taken as the u32 parameter KVM declares."""
    if icr & (DEST_LOGICAL | SHORTHAND_MASK):
        return -KVM_EINVAL
    irq = Interrupt(
        icr & 0xFF,
        DeliveryMode((icr >> 8) & 7),
        level=Level((icr >> 14) & 1),
        trigger=Trigger((icr >> 15) & 1),
    )
    if apic_map is None:
        return _send_without_map(bitmap_low, bitmap_high, min_id, irq, op_64_bit, accept)
    cluster = 64 if op_64_bit else 32
    min_id &= _U32
    count = _send_half(apic_map, bitmap_low, min_id, irq, accept)
    min_id = (min_id + cluster) & _U32
    count += _send_half(apic_map, bitmap_high, min_id, irq, accept)
    return count


def _send_without_map(
    bitmap_low: int, bitmap_high: int, min_id: int, irq: Interrupt, op_64_bit: bool,
    accept: AcceptFn,
) -> int:
    """PVH-12, the CVE-2018-19406 fix: without a map (no vCPU has created its APIC yet)
    SEND_IPI answers -EOPNOTSUPP and delivers nothing."""
    return -EOPNOTSUPP


def _send_half(
    apic_map: ApicMap, bitmap: int, min_id: int, irq: Interrupt, accept: AcceptFn
) -> int:
    """KVM ``__pv_send_ipi``: one unsigned long of the bitmap (64 bits on a 64-bit host)."""
    max_id = apic_map.max_apic_id
    if min_id > max_id:
        return 0
    bitmap &= (1 << min(64, max_id - min_id + 1)) - 1
    phys = apic_map.phys_map
    count = 0
    while bitmap:
        low = bitmap & -bitmap
        target = phys[min_id + low.bit_length() - 1]
        if target is not None:
            count += accept(target, irq)
        bitmap ^= low
    return count


def truncate_result(ret: int, op_64_bit: bool) -> int:
    """RAX as the guest reads it: the u64 (or, outside 64-bit mode, u32) image of ``ret``."""
    return ret & (_U64 if op_64_bit else _U32)


class HypercallHost(Protocol):
    """What the dispatcher needs from the VM (kept abstract to avoid an import cycle)."""

    def pv_feature(self, feature: int) -> bool:
        """``guest_pv_has``: always True unless PV CPUID enforcement is on."""
        ...

    def send_ipi_hypercall(
        self, source: int, low: int, high: int, min_id: int, icr: int, op_64_bit: bool
    ) -> int: ...

    def kick_cpu(self, apic_id: int) -> None: ...


def emulate_hypercall(
    host: HypercallHost,
    source: int,
    nr: int,
    a0: int,
    a1: int,
    a2: int,
    a3: int,
    *,
    op_64_bit: bool,
    cpl: int,
) -> int:
    """KVM ``____kvm_emulate_hypercall``: returns RAX as the guest sees it (PVH-0)."""
    if not op_64_bit:
        nr &= _U32
        a0 &= _U32
        a1 &= _U32
        a2 &= _U32
        a3 &= _U32
    if cpl:
        ret = -KVM_EPERM
    elif nr == KVM_HC_SEND_IPI and host.pv_feature(KVM_FEATURE_PV_SEND_IPI):
        ret = host.send_ipi_hypercall(source, a0, a1, a2, a3, op_64_bit)
    elif nr == KVM_HC_VAPIC_POLL_IRQ:
        ret = 0
    elif nr == KVM_HC_KICK_CPU and host.pv_feature(KVM_FEATURE_PV_UNHALT):
        host.kick_cpu(a1 & _U32)
        ret = 0
    elif nr == KVM_HC_SCHED_YIELD and host.pv_feature(KVM_FEATURE_PV_SCHED_YIELD):
        ret = 0
    else:
        ret = -KVM_ENOSYS
    return truncate_result(ret, op_64_bit)


# What a bug replay (``apicsim/replays/``, specs/replays.md) may swap, and the fix behind each.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "_send_half",  # BUG-2 bdf7ffc89922: u32 min, bail when min > max_apic_id, bound the walk
        "_send_without_map",  # BUG-3 CVE-2018-19406: -EOPNOTSUPP instead of a NULL map
        "emulate_hypercall",  # BUG-4: KVM_HC_SEND_IPI compiled for 32-bit hosts too
    }
)
