"""The bug-replay catalogue: each historical KVM bug of reference ``kvm_lapic.md`` §17, put back.

A :class:`Replay` names one bug (``BUG-n``), the KVM commit that fixed it, the spec rules it
breaks, and ``apply``: a context manager that swaps one model function, method or attribute for
a faithful re-creation of KVM's behaviour *before* the fix, and restores the original object on
exit.  The model itself carries no bug code: every buggy variant lives in this package, by the
layer it patches (``lapic.py``, ``hypervisor.py``, ``guest.py``); :mod:`.patcher` holds the
machinery.  A replay may swap only a *declared seam*: a name the model module that defines it
lists in its ``REPLAY_SEAMS`` (the places where KVM's fixes landed; where a fix added one
check, the model has that check as a small predicate and the replay swaps the predicate).

With a replay active the test suite must fail (the replay is "killed").  Switches:

* ``APICSIM_REPLAY=BUG-13`` (comma-separated for several) activates replays for a whole pytest
  run (``tests/conftest.py``); an unknown id is an error;
* ``apicsim mutants`` (:mod:`apicsim.mutants`) runs every replay against the tests that name it
  or one of its rules and reports which test killed it.

Bugs that cannot be replayed meaningfully carry ``apply=None`` and a ``reason``.

Python renders KVM's memory-safety bugs as exceptions: an out-of-bounds read or write of
``phys_map`` raises ``IndexError`` (what KASAN would report), a NULL dereference raises
``AttributeError`` on ``None``, a division by zero raises ``ZeroDivisionError``.

See ``specs/replays.md`` for the table.  Not here: running the tests under each replay
(:mod:`apicsim.mutants`) and turning the switch on for pytest (``tests/conftest.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

from . import accel as accel_replays
from . import guest as guest_replays
from . import hypervisor as hypervisor_replays
from . import lapic as lapic_replays
from .patcher import ApplyFn, Patcher, Replay, ReplayError, Swap, applier, declared_seams

ENV_VAR = "APICSIM_REPLAY"
"""Environment variable naming the replays to activate for a pytest run."""


# =============================================================================================
# The registry
# =============================================================================================
def _r(
    bug: str,
    commit: str,
    title: str,
    what: str,
    rules: tuple[str, ...],
    install: Callable[[Patcher], None] | None,
    reason: str = "",
) -> Replay:
    apply = applier(install) if install else None
    return Replay(bug, commit, title, what, rules, apply, reason, install)


REPLAYS: tuple[Replay, ...] = (
    _r(
        "BUG-1",
        "4180bf1b655a",
        'KVM: X86: Implement "send IPI" hypercall',
        "origin of KVM_HC_SEND_IPI",
        ("PVH-0", "PVH-1"),
        None,
        reason="introduces the feature: before it there was no hypercall, not a wrong one",
    ),
    _r(
        "BUG-2",
        "bdf7ffc89922",
        "KVM: LAPIC: Fix pv ipis out-of-bounds access",
        "guest-controlled min (a signed int) indexes phys_map with no bound: every set bit "
        "reads phys_map[min + i]",
        ("PVH-5", "PVH-6", "PVH-7", "PVH-2"),
        hypervisor_replays.bug2,
    ),
    _r(
        "BUG-3",
        "",
        "KVM: LAPIC: Fix pv ipis use-before-initialization (CVE-2018-19406)",
        "SEND_IPI dereferences a NULL map instead of returning -EOPNOTSUPP",
        ("PVH-12", "MAP-2"),
        hypervisor_replays.bug3,
    ),
    _r(
        "BUG-4",
        "",
        "KVM: x86: Fix PV IPIs for 32-bit KVM host",
        "KVM_HC_SEND_IPI answers -KVM_ENOSYS to a hypercall made outside 64-bit mode",
        ("PVH-8", "PVH-0"),
        hypervisor_replays.bug4,
    ),
    _r(
        "BUG-5",
        "",
        "KVM: x86: WARN_ONCE if sending a PV IPI returns a fatal error",
        "the guest encoder drops the hypercall's result: errors are never reported",
        ("PVG-4",),
        guest_replays.bug5,
    ),
    _r(
        "BUG-6",
        "c87bd4dd43a6",
        "KVM: x86: use array_index_nospec with indices that come from guest",
        "Spectre-v1 hardening",
        ("PVH-6", "PVH-7"),
        None,
        reason="Spectre-v1 hardening only: no architectural change to put back",
    ),
    _r(
        "BUG-7",
        "",
        "kvm: x86: only provide PV features if enabled in guest's CPUID",
        "PV hypercalls are served even with enforcement on and the CPUID bit off",
        ("HC-1",),
        hypervisor_replays.bug7,
    ),
    _r(
        "BUG-8",
        "",
        "KVM: x86: fix guest-initiated crash with x2apic (CVE-2013-6376)",
        "the x2APIC logical cluster (dest bits 31:16) is not bounded by max_apic_id: the "
        "lookup runs past phys_map",
        ("FAST-6",),
        hypervisor_replays.bug8,
    ),
    _r(
        "BUG-9",
        "",
        "KVM: x86: Fix potential divide by 0 in lapic (CVE-2013-6367)",
        "TMCCT computes remaining % period with period 0 when TMICT != 0",
        ("REG-TMR-1",),
        lapic_replays.bug9,
    ),
    _r(
        "BUG-10",
        "",
        "KVM: x86: Fix APIC map calculation after re-enabling",
        "APIC_BASE EN 0->1 recalculates the map before storing the new value: the re-enabled "
        "APIC stays out of the map",
        ("MAP-1", "BASE-6"),
        lapic_replays.bug10,
    ),
    _r(
        "BUG-11",
        "5bd5db385b3e",
        "KVM: x86: allow hotplug of VCPU with APIC ID over 0xff",
        "no hotplug hack: an xAPIC-mode vCPU is matched and mapped only by its 8-bit ID",
        ("MATCH-4", "MAP-3", "FAST-9", "DIFF-D7"),
        hypervisor_replays.bug11,
    ),
    _r(
        "BUG-12",
        "03d2249ea608",
        "KVM: x86: use MDA for interrupt matching / fix mixed APIC mode broadcast (9ea369b032d8)",
        "no MDA rewrite: an IOAPIC/MSI message to 0xFF is not a broadcast to x2APIC targets",
        ("MATCH-1", "MATCH-3", "DIFF-D9", "FAST-4"),
        lapic_replays.bug12,
    ),
    _r(
        "BUG-13",
        "2970052481b9",
        "KVM: x86: Disable APIC logical map if vCPUs are aliased in logical mode",
        "a second vCPU with the same logical ID overwrites the first one's map slot",
        ("MAP-4",),
        hypervisor_replays.bug13,
    ),
    _r(
        "BUG-14",
        "2bf934aadcac",
        "KVM: x86: Disable APIC logical map if logical ID covers multiple MDAs",
        "an LDR with several bits is mapped at its lowest bit only",
        ("MAP-4",),
        hypervisor_replays.bug14,
    ),
    _r(
        "BUG-15",
        "5b84b0291702",
        "KVM: x86: Honor architectural behavior for aliased 8-bit APIC IDs",
        "aliased physical xAPIC IDs keep the map; the last vCPU takes the slot",
        ("MAP-2", "DIFF-D8"),
        hypervisor_replays.bug15,
    ),
    _r(
        "BUG-16",
        "4364b287982b",
        "KVM: x86: Bail from kvm_recalculate_phys_map() if x2APIC ID is out-of-bounds",
        "the map is sized from the vCPUs of the previous recalculation and filled without a "
        "bound: a vCPU added later is written past phys_map (or skipped with 32-bit IDs)",
        ("MAP-1",),
        hypervisor_replays.bug16,
    ),
    _r(
        "BUG-17",
        "4b7c3f6d04bd",
        "KVM: x86: Make x2APIC ID 100% readonly",
        "KVM_SET_LAPIC on an x2APIC vCPU takes the ID (>> 24) and LDR from the image",
        ("STATE-3",),
        lapic_replays.bug17,
    ),
    _r(
        "BUG-18",
        "71bf395a276f",
        "KVM: x86: Enforce x2APIC's must-be-zero reserved ICR bits",
        "WRMSR 0x830 accepts the reserved ICR bits 0xFFF32000",
        ("ICR-3",),
        lapic_replays.bug18,
    ),
    _r(
        "BUG-19",
        "73b42dc69be8",
        "KVM: x86: Re-split x2APIC ICR into ICR+ICR2 for AMD (x2AVIC)",
        "the state image keeps the x2APIC ICR as one 64-bit value: 0x310 does not carry the "
        "destination and SET does not read it",
        ("STATE-3", "STATE-1"),
        lapic_replays.bug19,
    ),
    _r(
        "BUG-20",
        "",
        "KVM: x86: Inject #GP if WRMSR sets reserved bits in APIC Self-IPI",
        "WRMSR 0x83F with bits 31:8 set sends vector val & 0xFF instead of #GP",
        ("ICR-5",),
        lapic_replays.bug20,
    ),
    _r(
        "BUG-21",
        "",
        "KVM: x86: Inject #GP on x2APIC WRMSR that sets reserved bits 63:32",
        "x2APIC WRMSR (except ICR) truncates the value to 32 bits instead of #GP",
        ("MSR-3",),
        lapic_replays.bug21,
    ),
    _r(
        "BUG-22",
        "",
        "KVM: x86: Mark x2APIC DFR reg as non-existent for x2APIC",
        "RDMSR 0x80E in x2APIC mode returns the DFR instead of #GP",
        ("MSR-4",),
        lapic_replays.bug22,
    ),
    _r(
        "BUG-23",
        "",
        "KVM: x86: Reinitialize xAPIC ID when userspace forces x2APIC => xAPIC",
        "a host x2APIC -> xAPIC write leaves the ID register in x2APIC format",
        ("BASE-6", "BASE-5"),
        lapic_replays.bug23,
    ),
    _r(
        "BUG-24",
        "a16eb25b09c0",
        "KVM: x86: Mask LVTPC when handling a PMI",
        "a PMI delivered through LVTPC leaves it unmasked",
        ("REG-LVT-2",),
        lapic_replays.bug24,
    ),
    _r(
        "BUG-25",
        "0bcc3fb95b97",
        "KVM: lapic: stop advertising DIRECTED_EOI when in-kernel IOAPIC is in use",
        "LVR bit 24 is set whenever CPUID has x2APIC, whatever the irqchip",
        ("REG-LVR-1",),
        lapic_replays.bug25,
    ),
    _r(
        "BUG-26",
        "",
        "KVM: x86: Suppress EOI broadcasts when SVR bit 12 is set (Fixes: 7543a635aa09)",
        "a level EOI with SVR bit 12 set is broadcast even with honor_suppress_eoi_broadcast=True",
        ("DEOI-2", "DIFF-D17"),
        lapic_replays.bug26,
    ),
    _r(
        "BUG-27",
        "520040146a0a",
        "KVM: x86: Use vector-hashing to deliver lowest-priority interrupts",
        "introduces vector hashing",
        ("LP-2", "LP-3"),
        None,
        reason="introduces vector hashing; the behaviour before it is the arbitration "
        "counter, which the model keeps as vector_hashing=False (LP-3)",
    ),
    _r(
        "BUG-28",
        "",
        "kvm/x86 : set meaningful return value",
        "the fast path reports -1 when the map handled a message but found no vCPU",
        ("FAST-8", "LP-2"),
        hypervisor_replays.bug28,
    ),
    _r(
        "BUG-29",
        "",
        'KVM: x86: Purge "highest ISR" cache when updating APICv state',
        "EOI trusts a highest-ISR cache that a state restore leaves stale",
        ("PRIO-5",),
        lapic_replays.bug29,
    ),
    _r(
        "BUG-30",
        "58d269d8cccc",
        "KVM: x86: BSP in MSR_IA32_APICBASE is writable",
        "APIC_BASE bit 8 (BSP) is reserved: a changing write with it set #GPs",
        ("BASE-2",),
        lapic_replays.bug30,
    ),
)

MODEL_REPLAYS: tuple[Replay, ...] = (
    _r(
        "FID-1",
        "",
        "the model's own old behaviour, not a KVM bug: TPR bits 3:0 kept by KVM_SET_SREGS",
        "a host CR8 write keeps TPR bits 3:0 (KVM's kvm_set_cr8 clears them: TPR 0x2F -> "
        "KVM_GET_SREGS/KVM_SET_SREGS -> 0x20); the default differential run finds it",
        ("REG-TPR-1", "KVMB-10"),
        lapic_replays.fid1,
    ),
    _r(
        "FID-2",
        "",
        "the model's own old behaviour, not a KVM bug: the APIC window from APIC_BASE bits 31:12",
        "the window drops the address bits above 31 (KVM and the SDM take MAXPHYADDR-1:12: "
        "APIC_BASE 0x1_FEE00900 puts the window at 0x1_FEE00000, not 0xFEE00000); the default "
        "differential run finds it",
        ("KVMB-7", "BASE-6"),
        lapic_replays.fid2,
    ),
)
"""Switches that put back an old behaviour of the model itself (a disagreement with KVM the
differential suite must find), by the same mechanism as the bug replays."""

BY_ID: Mapping[str, Replay] = {r.id: r for r in (*REPLAYS, *MODEL_REPLAYS)}

ACCEL_REPLAYS: tuple[Replay, ...] = tuple(_r(*row) for row in accel_replays.ROWS)
"""The accelerator layer's bugs (AMD AVIC, reference ``avic_ipiv.md`` Part M: ``BR-A*``)."""
ACCEL_BY_ID: Mapping[str, Replay] = {r.id: r for r in ACCEL_REPLAYS}


# =============================================================================================
# Lookup and activation
# =============================================================================================
def normalize(bug: str) -> str:
    """``bug_13`` / ``bug-13`` / `` BUG-13 `` -> ``BUG-13``."""
    return bug.strip().upper().replace("_", "-")


def get(bug: str) -> Replay:
    replay = BY_ID.get(normalize(bug)) or ACCEL_BY_ID.get(normalize(bug))
    if replay is None:
        raise ReplayError(f"unknown bug replay {bug!r}; known: {', '.join(BY_ID)}")
    return replay


def parse_ids(text: str) -> list[str]:
    """``"BUG-13, BUG-14"`` -> ``["BUG-13", "BUG-14"]`` (validated, duplicates dropped)."""
    ids: list[str] = []
    for part in text.split(","):
        if part.strip():
            bug = get(part).id
            if bug not in ids:
                ids.append(bug)
    return ids


@contextmanager
def active(ids: Iterable[str]) -> Iterator[list[Replay]]:
    """Activate the named replays (in order) for the duration of the ``with`` block."""
    replays = [get(bug) for bug in ids]
    for replay in replays:
        if replay.apply is None:
            raise ReplayError(f"{replay.id} is not replayable: {replay.reason}")
    with ExitStack() as stack:
        for replay in replays:
            assert replay.apply is not None
            stack.enter_context(replay.apply())
        yield replays


def from_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """The replay ids named by ``APICSIM_REPLAY`` (validated; empty when unset)."""
    env = os.environ if environ is None else environ
    return parse_ids(env.get(ENV_VAR, ""))


__all__ = [
    "ACCEL_BY_ID",
    "ACCEL_REPLAYS",
    "BY_ID",
    "ENV_VAR",
    "MODEL_REPLAYS",
    "REPLAYS",
    "ApplyFn",
    "Patcher",
    "Replay",
    "ReplayError",
    "Swap",
    "active",
    "declared_seams",
    "from_environment",
    "get",
    "normalize",
    "parse_ids",
]
