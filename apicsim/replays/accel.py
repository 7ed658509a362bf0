"""Bug replays of the accelerator layer: AMD AVIC's historical KVM bugs (reference
``avic_ipiv.md`` Part M, ``BR-A*``), put back through the seams ``hypervisor/accel/avic/`` and
``hypervisor/hw/avic.py`` declare in ``REPLAY_SEAMS``.

Each ``install`` function takes the catalogue's :class:`~apicsim.replays.patcher.Patcher` and
swaps one seam for a re-creation of KVM's behaviour before the fix.  ``ROWS`` are the catalogue
entries as plain data (id, commit, title, what, rules, install, reason), which
``apicsim.replays`` turns into ``Replay`` records (``ACCEL_REPLAYS``), so
``APICSIM_REPLAY=BR-A6`` and ``apicsim mutants`` treat them like the KVM lapic ones.  Rows with
``install=None`` say why the model cannot express the bug.  :func:`active` is the same switch
for this layer alone.

Not here: the patcher and the registry (``apicsim.replays``).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

import hypervisor.accel.avic as accel_avic
import hypervisor.hw.avic as hw_avic
from hypervisor.accel.avic import Avic, AvicState, set_irr
from hypervisor.host.steps import Protocol, Step
from hypervisor.hw.avic import IcrWrite, VmcbAvic, arch_max_physical_id
from hypervisor.vcpu import RunState, Vcpu
from lapic import destination
from lapic.apic import LocalApic
from lapic.faults import ApicValueError
from lapic.icr import Interrupt

from .patcher import Patcher, Row, active_rows


def br_a3(p: Patcher) -> None:
    """``avic_vcpu_load`` before 18869f26df1a: a preempt-notifier load inside the blocking
    window sets IsRunning again."""
    p.set(AvicState, "load_allowed", staticmethod(lambda vcpu: True))


def br_a4(p: Patcher) -> None:
    """Before 66fa226c131f (``svm_deliver_avic_intr``): ``apicv_active`` is read first, then
    IRR is set, then the target's mode: a sender that read AVIC active rings a doorbell at a
    target that has since entered the guest with AVIC off."""

    def deliver_steps(
        self: AvicState, apic: LocalApic, vector: int, level_triggered: bool
    ) -> Protocol:
        i = self._index[apic]
        vcpu = self._vm().vcpus[i]
        active = yield Step(
            f"avic.deliver.read_apicv_active[{i}]", frozenset({f"apicv_active[{i}]"}),
            frozenset(), lambda: self.vcpu_active(vcpu),
        )
        yield Step(
            f"avic.deliver.set_irr[{i}]", frozenset({f"apic_regs[{i}]"}),
            frozenset({f"irr[{i}]"}), lambda: set_irr(apic, vector, level_triggered),
        )
        in_guest = yield Step(
            f"avic.deliver.read_mode[{i}]", frozenset({f"run_state[{i}]"}), frozenset(),
            lambda: self.in_guest_mode(vcpu),
        )
        yield self._complete_step(vcpu, bool(in_guest), bool(active))
        return None

    p.set(AvicState, "deliver_steps", deliver_steps)


def br_a5(p: Patcher) -> None:
    """Before 31f251d4ddfa: the doorbell-or-wake choice reads IsRunning (KVM's entry), which
    is also 1 for a vCPU loaded but outside guest mode."""

    def in_guest_mode(vcpu: Vcpu) -> bool:
        accel = vcpu.vm.accel
        assert isinstance(accel, AvicState)
        return bool(accel.shadow.get(vcpu.vcpu_id, 0) & (1 << 62))

    p.set(AvicState, "in_guest_mode", staticmethod(in_guest_mode))


def br_a6(p: Patcher) -> None:
    """bb218fbcfaaa (reverted): re-emulate the ICR on TARGET_NOT_RUNNING."""

    def handle_not_running(
        self: AvicState, vcpu: Vcpu, w: IcrWrite, irq: Interrupt, index: int
    ) -> None:
        self._vm().deliver(irq, w.sender)
        self.kick_targets(vcpu, w, irq, index)

    p.set(AvicState, "handle_not_running", handle_not_running)


def br_a7(p: Patcher) -> None:
    """b51818afdc1d before the BUSY test (bd17f417c07d's WARN): causes 0 and 2 only send the
    IPI, so a BUSY bit the CPU left in the backing page stays set and a guest polling
    ICR.BUSY hangs."""

    def emulate_failed_ipi(self: AvicState, vcpu: Vcpu, w: IcrWrite, irq: Interrupt) -> None:
        self._vm().deliver(irq, w.sender)

    p.set(AvicState, "emulate_failed_ipi", emulate_failed_ipi)


def br_a8(p: Patcher) -> None:
    """Before 5aede752a839: INVALID_TARGET ignored (nothing delivered)."""

    def handle_invalid_target(self: AvicState, vcpu: Vcpu, w: IcrWrite, irq: Interrupt) -> None:
        return None

    p.set(AvicState, "handle_invalid_target", handle_invalid_target)


def br_a9(p: Patcher) -> None:
    """Before da3fb46d226a: the x2APIC logical bitmap taken as ``dest & 0xFFFF0000``."""
    p.set(accel_avic, "x2apic_logical_bitmap", lambda dest: dest & 0xFFFF0000)


def br_a10(p: Patcher) -> None:
    """Before a879a88e05f3: the kick decodes the destination xAPIC-style for every sender."""
    p.set(accel_avic, "kick_dest", lambda w: (False, w.icrh >> 24))


def br_a11(p: Patcher) -> None:
    """Before bbfc7aa62a4a: a logical destination with several bits leaves the fast path
    (``if (!is_power_of_2(bitmap)) return -EINVAL``) for the slow path."""
    fast = AvicState.logical_fast_ids

    def logical_fast_ids(self: AvicState, x2: bool, dest: int, flat: bool) -> list[int] | None:
        mask = 0xFF if flat else 0xF
        bitmap = accel_avic.x2apic_logical_bitmap(dest) if x2 else dest & mask
        if bitmap & (bitmap - 1):
            return None
        return fast(self, x2, dest, flat)

    p.set(AvicState, "logical_fast_ids", logical_fast_ids)


def br_a15(p: Patcher) -> None:
    """Before e0bead97e759: a virtual APIC mode switch runs an AVIC put/load cycle of a loaded
    vCPU (IsRunning 1 -> 0 -> 1, two entry writes) besides the VMCB update."""
    vmcb_only = AvicState.set_virtual_apic_mode

    def set_virtual_apic_mode(self: AvicState, vcpu: Vcpu) -> None:
        vmcb_only(self, vcpu)
        p = vcpu.last_pcpu
        if vcpu.run_state in (RunState.IN_GUEST, RunState.IN_HOST) and p is not None:
            self.vcpu_put(vcpu)
            self.vcpu_load(vcpu, p)

    p.set(AvicState, "set_virtual_apic_mode", set_virtual_apic_mode)


def br_a16(p: Patcher) -> None:
    """Before f5f9089f76dd (``avic_handle_apic_id_update``): on an xAPIC ID write KVM moves the
    vCPU's physical entry to the new ID's slot and clears the old one, clobbering the entry of
    the vCPU that owns that ID."""

    def handle_apic_id_update(self: AvicState, vcpu: Vcpu) -> None:
        new_id = vcpu.apic.register("ID") >> 24
        old = self.shadow.get(vcpu.vcpu_id)
        if new_id == vcpu.vcpu_id or old is None or new_id > self.max_physical_index:
            return
        self.shadow[new_id] = old
        self.physical_table[new_id] = self.hw_entry(old)
        del self.shadow[vcpu.vcpu_id]
        self.physical_table[vcpu.vcpu_id] = 0

    p.set(AvicState, "handle_apic_id_update", handle_apic_id_update)


def br_a17(p: Patcher) -> None:
    """4d1d7942e36a before 73b42dc69be8: one 64-bit x2APIC ICR for every vendor."""
    p.set(Avic, "icr_split", property(lambda self: False))


def br_a18(p: Patcher) -> None:
    """Before d921665e01ba: IsRunning written to the hardware table even without IPIv."""

    def hw_entry(self: AvicState, shadow: int) -> hw_avic.PhysicalEntry:
        return hw_avic.PhysicalEntry(shadow).replace(ga_log_intr=0)

    p.set(AvicState, "hw_entry", hw_entry)


def br_a19(p: Patcher) -> None:
    """Before ca11d9d35e95: EXITINFO2's index masked to 8 bits."""
    p.set(accel_avic, "decode_index", lambda info2: info2 & 0xFF)


def br_a20(p: Patcher) -> None:
    """An off-by-one of 574ef752d4ae: the max index is ``max_vcpu_ids`` (a count)."""

    def max_physical_index(max_vcpu_ids: int, x2avic: bool, x2avic_4k: bool) -> int:
        return min(max_vcpu_ids, arch_max_physical_id(x2avic, x2avic_4k))

    p.set(hw_avic, "max_physical_index", max_physical_index)
    if vars(accel_avic).get("max_physical_index") is not max_physical_index:
        p.set(accel_avic, "max_physical_index", max_physical_index)


def br_a21(p: Patcher) -> None:
    """Before "Inhibit AVIC if ID is too big instead of rejecting vCPU creation"."""

    def id_too_big(self: AvicState, vcpu: Vcpu) -> bool:
        if vcpu.vcpu_id > self.max_physical_index:
            raise ApicValueError(f"vcpu_id={vcpu.vcpu_id} is above AVIC's max index")
        return False

    p.set(AvicState, "id_too_big", id_too_big)


def br_a22(p: Patcher) -> None:
    """Before 87d0f901a9bd: (de)activating AVIC leaves INTERCEPT_CR8_WRITE as it was, so once
    AVIC is inhibited the guest's CR8 writes still reach V_TPR without an exit."""

    def cr8_intercept(old: VmcbAvic, active: bool) -> bool:
        return old.intercept_cr8_write

    p.set(AvicState, "cr8_intercept", staticmethod(cr8_intercept))


def br_a23(p: Patcher) -> None:
    """The Xen AVIC RFC: ``break`` after the first kick of TARGET_NOT_RUNNING."""

    def kick_targets(
        self: AvicState, vcpu: Vcpu, w: IcrWrite, irq: Interrupt, index: int
    ) -> None:
        vm = self._vm()
        targets = self._fast_targets(w, index)
        if targets is None:
            targets = [
                v for v in vm.vcpus
                if destination.matches(irq, v.apic, w.sender, is_ipi=True, profile=vm.profile)
            ]
        for t in targets:
            self.kick_vcpu(t)
            break

    p.set(AvicState, "kick_targets", kick_targets)


def br_a25(p: Patcher) -> None:
    """Before "KVM: SVM: Update svm->ldr_reg cache even if LDR is bad"."""

    def remember_ldr(self: AvicState, i: int, ldr: tuple[int, bool] | None) -> None:
        if ldr is not None and (not ldr[0] or hw_avic.logical_index(*ldr) is None):
            return
        self._ldr_cache[i] = ldr

    p.set(AvicState, "remember_ldr", remember_ldr)



_NO_PREEMPTION = (
    "the model's load/put/refresh is one atomic step: no preemption point exists inside it "
    "for a migrated task to write a stale host id"
)

ROWS: tuple[Row, ...] = (
    ("BR-A1", "7cfc5c653b07", "KVM: fix avic_set_running for preemptable kernels",
     "entry written with a stale vcpu->cpu", ("AV-E1",), None, _NO_PREEMPTION),
    ("BR-A2", "b652de1e3dfb",
     "KVM: SVM: Disable preemption across AVIC load/put during APICv refresh",
     "refresh preempted between load and put", ("AV-G3",), None, _NO_PREEMPTION),
    ("BR-A3", "18869f26df1a",
     "KVM: x86: disable preemption around the call to kvm_arch_vcpu_{un|}blocking",
     "a load inside the blocking window sets IsRunning: the IPI rings a doorbell at nobody",
     ("AV-E1", "AVIC-O-2"), br_a3, ""),
    ("BR-A4", "66fa226c131f",
     "KVM: SVM: fix race between interrupt delivery and AVIC inhibition",
     "apicv_active read before the IRR write and vcpu->mode: a doorbell at a target that "
     "entered the guest with AVIC off, and no KVM_REQ_EVENT", ("AV-E7", "AV-E6"), br_a4, ""),
    ("BR-A5", "31f251d4ddfa", "KVM: SVM: Signal AVIC doorbell iff vCPU is in guest mode",
     "doorbell chosen from IsRunning: a doorbell at a vCPU loaded but in the host",
     ("AV-E6", "AV-E8"), br_a5, ""),
    ("BR-A6", "bb218fbcfaaa", "svm: Fix AVIC incomplete IPI emulation (reverted)",
     "TARGET_NOT_RUNNING re-emulates the ICR: a second delivery", ("AV-C1", "AV-B2"),
     br_a6, ""),
    ("BR-A7", "b51818afdc1d",
     "KVM: SVM: Don't rewrite guest ICR on AVIC IPI virtualization failure",
     "stale ICR.BUSY after a failed acceleration", ("AV-B5", "AV-B7"), br_a7, ""),
    ("BR-A8", "5aede752a839",
     "KVM: SVM: Process ICR on AVIC IPI delivery failure due to invalid target",
     "INVALID_TARGET ignored: the valid targets never get the IPI", ("AV-B4",), br_a8, ""),
    ("BR-A9", "da3fb46d226a",
     "KVM: SVM: Fix x2APIC Logical ID calculation for avic_kick_target_vcpus_fast",
     "x2APIC logical bitmap = dest & 0xFFFF0000", ("AV-C3",), br_a9, ""),
    ("BR-A10", "a879a88e05f3",
     "KVM: SVM: Compute dest based on sender's x2APIC status for AVIC kick",
     "x2APIC sender's destination decoded xAPIC-style", ("AV-C3",), br_a10, ""),
    ("BR-A11", "bbfc7aa62a4a", "KVM: SVM: Handle multiple logical targets in AVIC kick fastpath",
     "several logical targets leave the fast path for the slow path", ("AV-C3",), br_a11, ""),
    ("BR-A12", "1808c950955d", "KVM: SVM: Require logical ID to be power-of-2 for AVIC entry",
     "a multi-bit logical ID gets an entry", ("AV-A4",), None,
     "the inhibit comes from the optimized map, whose replays (BUG-13, BUG-14) cover it"),
    ("BR-A13", "a790e338c7c4", "KVM: SVM: Ignore writes to Remote Read Data",
     "a trap write to 0xC0 reaches the APIC", ("AV-D2",), None,
     "the local APIC model already ignores writes to the read-only RRR"),
    ("BR-A14", "0ccf3e7cb95a", "KVM: SVM: Flush the current TLB when activating AVIC",
     "stale APIC page translation", ("AV-G3",), None, "TLBs are not modelled"),
    ("BR-A15", "e0bead97e759", "KVM: SVM: Don't put/load AVIC when setting virtual APIC mode",
     "IsRunning blip (put, load) on a mode switch", ("AV-F3",), br_a15, ""),
    ("BR-A16", "f5f9089f76dd", "KVM: SVM: remove avic's broken code that updated APIC ID",
     "the entry moved to the new ID's slot on an APIC ID change", ("AV-G2",), br_a16, ""),
    ("BR-A17", "73b42dc69be8", "KVM: x86: Re-split x2APIC ICR into ICR+ICR2 for AMD (x2AVIC)",
     "the x2APIC ICR as one 64-bit value under x2AVIC", ("AV-F2",), br_a17, ""),
    ("BR-A18", "d921665e01ba", "KVM: SVM: Add enable_ipiv param, never set IsRunning if disabled",
     "IsRunning written to the hardware table without IPIv", ("AV-E1", "AV-B3", "AV-E5"),
     br_a18, ""),
    ("BR-A19", "ca11d9d35e95", "KVM: SVM: Expand AVIC_PHYSICAL_MAX_INDEX_MASK to be a 12-bit field",
     "EXITINFO2 index truncated to 8 bits", ("AV-B6",), br_a19, ""),
    ("BR-A20", "574ef752d4ae",
     "KVM: SVM: Limit AVIC physical max index based on configured max_vcpu_ids",
     "max index = max_vcpu_ids (off by one)", ("AV-A5",), br_a20, ""),
    ("BR-A21", "", "KVM: SVM: Inhibit AVIC if ID is too big instead of rejecting vCPU creation",
     "vCPU creation refused", ("AV-F1",), br_a21, ""),
    ("BR-A22", "87d0f901a9bd",
     "KVM: SVM: Set/clear CR8 write interception when AVIC is (de)activated",
     "CR8 write interception not toggled by (de)activation", ("AV-G4",), br_a22, ""),
    ("BR-A23", "", "Xen AVIC RFC (never merged)",
     "break after the first kick: one of several non-running targets woken",
     ("AV-C4",), br_a23, ""),
    ("BR-A24", "", "KVM: SVM: Always update local APIC on writes to logical dest register",
     "a failed AVIC LDR update skips the APIC write", ("AV-A4",), None,
     "the model's trap path always runs the APIC's own LDR write first"),
    ("BR-A25", "", 'KVM: SVM: Update svm->ldr_reg cache even if LDR is "bad"',
     "the LDR cache keeps the old value: a DFR write invalidates another vCPU's entry",
     ("AV-A4",), br_a25, ""),
)
"""Every BR-A* of Part M, replayable or with the reason it is not."""


BY_ID: dict[str, Row] = {row[0]: row for row in ROWS}


def active(ids: Iterable[str]) -> AbstractContextManager[None]:
    """Put the named BR-A* bugs back for the ``with`` block (``apicsim.replays.active`` does
    the same for every catalogued bug)."""
    return active_rows(BY_ID, ids, "an AVIC replay")
