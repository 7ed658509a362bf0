"""What the differential tests deliberately do not generate or do not compare, in one place.

Each :class:`Exclusion` says what is left out and why.  The generators (``strategies.py``) pass
every operation they draw through :func:`permitted`, which consults the ``generated``
exclusions' predicates; the engine (``engine.py``) consults :func:`skipped_at_run_time` before
it performs a step and applies the ``compared`` entries where it observes.  ``specs/
differential.md`` carries the table :func:`markdown_table` renders; a test keeps the two equal
(``python -m tests.differential.exclusions`` prints the table).

An exclusion may never hide a disagreement between the model and KVM.  A disagreement that is
found and not yet resolved gets a narrowly scoped entry whose ``why`` starts with
``open disagreement:``, so it shows in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from apicsim.ops import (
    APIC_BASE_MSR,
    TSC_DEADLINE_MSR,
    GetMsr,
    MmioRead,
    MmioWrite,
    Op,
    Rdmsr,
    RegWrite,
    Restore,
    SetLapic,
    SetMsr,
    Wrmsr,
)
from hypervisor import Vm
from lapic.destination import match_dest
from lapic.icr import X2APIC_ICR_RESERVED, DestMode, Shorthand
from lapic.registers import REGISTER_BY_OFFSET, Access

Stage = Literal["generated", "executed", "compared"]

TMICT = 0x380
TMICT_MSR = 0x838
FAR_DEADLINE = 1 << 62
"""A TSC deadline about 146 years away at 1 GHz: it arms the timer but never fires in a test."""
APIC_PAGE = 0x1000
NMI_PENDING_LIMIT = 2
"""KVM ``process_nmi()``'s limit; see the ``nmi-pending-limit`` exclusion."""


@dataclass(frozen=True, slots=True)
class Exclusion:
    """One thing the differential tests leave out.

    ``stage``: ``generated`` (no program contains it: ``excludes(op)`` is the predicate),
    ``executed`` (when it comes up, the engine skips the step, which the scenario it writes
    records as a comment, or adjusts the model's side around it), or ``compared`` (performed
    on both backends, but this observable is not read, or only in part).
    """

    key: str
    stage: Stage
    what: str
    why: str
    excludes: Callable[[Op], bool] | None = None


def _arms_the_timer(op: Op) -> bool:
    """A write that would start the APIC timer: TMICT != 0 (MMIO, MSR, host, state image), or
    an IA32_TSC_DEADLINE write other than 0 and a deadline decades away."""
    if isinstance(op, MmioWrite):
        return op.offset & ~0xF == TMICT and op.value != 0
    if isinstance(op, RegWrite):
        return op.offset & ~0xF == TMICT and op.value != 0
    if isinstance(op, Wrmsr | SetMsr):
        if op.msr == TMICT_MSR:
            return op.value != 0
        if op.msr == TSC_DEADLINE_MSR:
            return op.value not in (0, FAR_DEADLINE)
        return False
    if isinstance(op, SetLapic | Restore):
        return any(off == TMICT and value not in (0, None) for off, value in op.writes)
    return False


def _not_an_apic_msr(op: Op) -> bool:
    if isinstance(op, Rdmsr | Wrmsr | SetMsr | GetMsr):
        return not (op.msr in (APIC_BASE_MSR, TSC_DEADLINE_MSR) or 0x800 <= op.msr <= 0xBFF)
    return False


def _leaves_the_page(op: Op) -> bool:
    if isinstance(op, MmioRead | MmioWrite):
        return op.offset + op.size > APIC_PAGE
    return False


def _never(op: Op) -> bool:
    """No operation of the program language expresses it."""
    return False


EXCLUSIONS: tuple[Exclusion, ...] = (
    Exclusion(
        "hypercalls",
        "generated",
        "Hypercalls (VMCALL: KVM_HC_SEND_IPI, KVM_HC_KICK_CPU)",
        "The guest's VMCALL never completes on this host (KVMB-6): KVM_RUN re-enters the guest "
        "at the instruction, so no hypercall reaches KVM. There is no hypercall operation; "
        "tests/hypervisor and specs/scenarios/pv_ipi_hypercall.toml check the model's "
        "hypercalls against the reference instead.",
        _never,
    ),
    Exclusion(
        "timer",
        "generated",
        "Arming the APIC timer: TMICT != 0 (MMIO 0x380, MSR 0x838, host MSR write, word 0x380 "
        "of a KVM_SET_LAPIC image) and IA32_TSC_DEADLINE values other than 0 and 2^62",
        "A running timer fires on KVM at wall-clock time and its TMCCT is a live count; the "
        "model's timer runs on a virtual clock these tests never advance. Everything else about "
        "the timer is generated and compared: LVTT (all modes), TDCR, TMICT = 0, the far "
        "deadline, and TMCCT, which reads 0 on both because no count ever runs.",
        _arms_the_timer,
    ),
    Exclusion(
        "non-apic-msrs",
        "generated",
        "MSRs other than IA32_APIC_BASE, IA32_TSC_DEADLINE and 0x800-0xBFF",
        "They are not part of the local APIC; the model refuses them as not modelled.",
        _not_an_apic_msr,
    ),
    Exclusion(
        "page-crossing",
        "generated",
        "MMIO accesses that run past the end of the APIC page",
        "The instruction emulator splits them into two accesses, one of them outside the APIC "
        "page; neither backend models what lies there.",
        _leaves_the_page,
    ),
    Exclusion(
        "hotplug",
        "generated",
        "vCPU hotplug (KVM_CREATE_VCPU after the first operation)",
        "The scenario format has no action for it, so a finding could not be replayed; "
        "KVMB-8 (the map misses the vCPU created last) is generated, since every VM starts "
        "fresh from KVM_CREATE_VCPU, and tests/kvm/test_disagreements.py covers hotplug.",
        _never,
    ),
    Exclusion(
        "interrupt-acknowledge",
        "generated",
        "The guest taking interrupts (IF=1, HLT, INTA): IRR -> ISR by acknowledgement",
        "The KVM backend runs every access with IF=0, so accepted interrupts stay in IRR, "
        "where they are compared. ISR bits come from KVM_SET_LAPIC images, and EOIs of them are "
        "generated.",
        _never,
    ),
    Exclusion(
        "window-in-ram",
        "executed",
        "MMIO to an APIC window inside the KVM backend's RAM (APIC_BASE address below its "
        "ram_size, e.g. 0x1_0000_0800, whose window is at 0)",
        "A memory slot shadows the APIC there, so the KVM backend refuses the access (KVMB-7); "
        "the model would perform it. The APIC_BASE writes that move the window are generated "
        "and compared; only the MMIO steps while it is there are skipped.",
    ),
    Exclusion(
        "self-init",
        "executed",
        "An INIT IPI whose destination includes the sending vCPU (kvm_apic_match_dest() of "
        "the sender: shorthand self or all, its own ID, a broadcast, a logical mask with its "
        "bit)",
        "The KVM backend cannot finish the access: KVM processes the INIT before the guest "
        "reaches the instruction that reports completion, so a BSP restarts at the reset "
        "vector, where the backend has no memory (KVM_RUN fails with an emulation error), and "
        "an AP blocks in KVM_RUN waiting for SIPI. The step is skipped on both backends; INIT "
        "to other vCPUs and by MSI is generated and compared.",
    ),
    Exclusion(
        "ppr-after-set-lapic",
        "compared",
        "The PPR a KVM_SET_LAPIC leaves stale (Profile.set_state_stale_ppr), until the model "
        "recomputes it: KVM's PPR may be the model's stale value or the one recomputed from "
        "TPR and ISR",
        "resolved (kept as a tolerance for the instant of the KVM_SET_LAPIC): "
        "KVM recomputes PPR whenever it processes KVM_REQ_EVENT with the "
        "APIC hardware-enabled (kvm_check_and_inject_events() -> kvm_apic_has_interrupt() -> "
        "apic_update_ppr()); kvm_apic_set_state() requests one for the vCPU's next entry, and "
        "an accepted interrupt or an exception for the guest requests another. The model keeps "
        "the stale PPR until a PPR read or another PPR update: 2 vCPUs, KVM_SET_LAPIC of vCPU "
        "0 with word 0x110 = 0x100 (vector 0x28 in service), then vCPU 0 reads its ID -> "
        "KVM_GET_LAPIC PPR 0x20 on KVM, 0 in the model. The stale PPR right after the "
        "KVM_SET_LAPIC is compared exactly.",
    ),
    Exclusion(
        "nmi-pending-limit",
        "executed",
        "NMIs pending beyond two: the engine drops the model's excess after each step, as "
        "KVM's process_nmi() does when its state is read",
        "resolved, now modelled (the model keeps at most two too): "
        "KVM keeps at most two NMIs pending (process_nmi(): limit 2, or 1 "
        "while an NMI is being injected or NMIs are blocked) and drops the rest; the model "
        "counts every accepted NMI: 2 vCPUs, three NMI IPIs to vCPU 1 -> NMIs pending 3 in the "
        "model, 2 in KVM_GET_VCPU_EVENTS. Each NMI is still counted as accepted by both "
        "(KVM_SIGNAL_MSI returns 1).",
    ),
    Exclusion(
        "read-buffer-bytes",
        "compared",
        "The value of an MMIO read the APIC does not service (KVMB-4) where the model's "
        "whole-read buffer and KVM's byte-wise one differ: the engine keeps the byte-wise "
        "buffer, compares KVM's value with it, and not with the model's",
        "resolved, now modelled (the model's buffer is byte-wise too): "
        "KVM's emulator buffer is byte-wise: a serviced read of n bytes "
        "replaces only its first n bytes, and an unserviced read returns the first `size` "
        "bytes, older ones included; the model's buffer is the whole value of the last read: "
        "read +0x30 (LVR 0x50014), read +0x80 /1 (0), read +0x24 -> 0x50000 on KVM, 0 in the "
        "model.",
    ),
    Exclusion(
        "nmi-handler-reads",
        "compared",
        "The value of an MMIO read the APIC does not service (KVMB-4) that returns bytes of "
        "KVM's emulator buffer last written while the guest took an NMI",
        "On this host the guest's code runs through KVM's instruction emulator, so the KVM "
        "backend's NMI handler (inc qword gs:[0]; iretq) leaves its own memory reads in the "
        "buffer KVMB-4 shows; the model knows only the APIC's reads (measured: x2APIC mode, "
        "read +0x520 -> 0xff, NMI to all, host back to xAPIC, read +0xc0 /2 -> 0 on KVM, 0xff "
        "in the model). The engine forgets the buffer when the guest takes an NMI; serviced "
        "reads fill it again, byte by byte. The read's outcome and every state are compared.",
    ),
    Exclusion(
        "smi-pending",
        "compared",
        "Whether an SMI is left pending",
        "The host has no SMM (KVM_CAP_X86_SMM = 0) and the backend does not read the SMI state "
        "of KVM_GET_VCPU_EVENTS. SMI messages (ICR and MSI delivery mode 2) are generated; "
        "their acceptance is compared through the KVM_SIGNAL_MSI count.",
    ),
    Exclusion(
        "mp-state",
        "compared",
        "The vCPU's run state after INIT/SIPI, and the CPU state INIT resets outside the APIC",
        "INIT and SIPI are generated and their APIC effects compared (KVMB-9: processed when "
        "the vCPU next enters, on both backends). The mp_state shows only as whether a guest "
        "access runs (both refuse a vCPU waiting for SIPI); registers and real mode are not "
        "the APIC's, and the backend puts a restarted vCPU back in 64-bit mode.",
    ),
    Exclusion(
        "nmi-injection",
        "compared",
        "When a pending NMI is injected: NMIs pending and NMIs the guest has taken are compared "
        "as their sum",
        "The model's guest accesses leave NMIs pending (its Vcpu takes them in run()); the KVM "
        "backend's guest takes one at the entry of an access (KVMB-3), and another only if KVM "
        "re-enters the guest during the access, which depends on host timing (measured: 2 "
        "pending -> 1 taken; a self-NMI is usually taken at the next access, now and then "
        "during its own). The engine takes one NMI at each access on the model's side too, "
        "which matters only for nmi-pending-limit.",
    ),
)

BY_KEY: dict[str, Exclusion] = {e.key: e for e in EXCLUSIONS}


def excluded_by(op: Op) -> Exclusion | None:
    """The ``generated`` exclusion that rules ``op`` out, if any."""
    for e in EXCLUSIONS:
        if e.stage == "generated" and e.excludes is not None and e.excludes(op):
            return e
    return None


def permitted(op: Op) -> bool:
    """Whether a generator may emit ``op``."""
    return excluded_by(op) is None


def skipped_at_run_time(
    op: Op, window: int, ram_size: int
) -> Exclusion | None:
    """The ``executed`` exclusion that skips ``op`` now: an MMIO step while the vCPU's window
    (``window``, its APIC_BASE address) lies in the KVM backend's RAM (``ram_size`` bytes)."""
    if isinstance(op, MmioRead | MmioWrite) and window < ram_size:
        return BY_KEY["window-in-ram"]
    return None


INIT = 5
ICR_OFFSET = 0x300
ICR_MSR = 0x830


def sends_init_to_itself(op: Op, model: Vm) -> Exclusion | None:
    """The ``self-init`` exclusion, if ``op`` is an ICR write of an INIT (level assert) that
    ``kvm_apic_match_dest`` would deliver to the sender itself (the slow path's rule; the fast
    path reaches no more APICs, so this may skip an INIT KVM would have dropped)."""
    if isinstance(op, MmioWrite) and op.offset == ICR_OFFSET and op.size == 4:
        sender = model.lapic(op.vcpu)
        if not sender.hw_enabled or sender.x2apic_mode:
            return None
        low, dest = op.value, sender.register("ICR2") >> 24
    elif isinstance(op, Wrmsr) and op.msr == ICR_MSR:
        sender = model.lapic(op.vcpu)
        if not sender.x2apic_mode or op.value & X2APIC_ICR_RESERVED:
            return None
        low, dest = op.value & 0xFFFFFFFF, op.value >> 32
    else:
        return None
    if (low >> 8) & 7 != INIT or (low & 0xC000) == 0x8000:  # not INIT, or a level de-assert
        return None
    if match_dest(
        sender,
        sender,
        Shorthand((low >> 18) & 3),
        dest,
        DestMode((low >> 11) & 1),
        broadcast_quirk=model.broadcast_quirk,
        profile=model.profile,
    ):
        return BY_KEY["self-init"]
    return None


def read_kind(op: MmioRead, model: Vm) -> str:
    """How KVM answers an MMIO read, from the model's state before it: ``hole`` (APIC
    disabled or in x2APIC mode: all ones, KVMB-5), ``serviced`` (an aligned read of a
    readable register, within its 4 bytes) or ``unserviced`` (KVMB-4: the emulator buffer)."""
    apic = model.lapic(op.vcpu)
    if not apic.hw_enabled or apic.x2apic_mode:
        return "hole"
    reg = REGISTER_BY_OFFSET.get(op.offset & 0xFF0)
    serviced = (
        (op.offset & 0xF) + op.size <= 4
        and reg is not None
        and Access.R in reg.xapic
        and (reg.feature is None or bool(getattr(apic.features, reg.feature)))
    )
    return "serviced" if serviced else "unserviced"


def markdown_table() -> str:
    """The exclusion table of ``specs/differential.md``."""
    lines = ["| key | stage | what | why |", "|---|---|---|---|"]
    for e in EXCLUSIONS:
        lines.append(f"| `{e.key}` | {e.stage} | {e.what} | {e.why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
