"""Bug replays of Intel APICv, posted interrupts and IPIv: KVM's historical bugs of reference
``avic_ipiv.md`` Part M (``BR-V*``), put back through the seams ``hypervisor/accel/apicv.py``
and ``hypervisor/hw/vmx.py`` declare in ``REPLAY_SEAMS``.

Each ``install`` function takes the catalogue's :class:`~apicsim.replays.patcher.Patcher` and
swaps one seam for a re-creation of KVM's behaviour before the fix.  ``ROWS`` are the catalogue
entries as plain data (id, commit, title, what, rules, install, reason), which
``apicsim.replays`` turns into ``Replay`` records (``APICV_REPLAYS``), so
``APICSIM_REPLAY=BR-V1`` and ``apicsim mutants`` treat them like the others.  Rows with
``install=None`` say why the model cannot express the bug.  :func:`active` is the same switch
for this layer alone.  ``tests/hypervisor/test_apicv_replays.py`` names the test that kills
each replay.

Not here: the patcher and the registry (``apicsim.replays``).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

import hypervisor.hw.vmx as hw_vmx
from hypervisor.accel.apicv import MSR_ICR, ApicvState, _store_icr
from hypervisor.vcpu import RunState, Vcpu
from lapic.icr import DELIVERY_STATUS

from .patcher import Patcher, Row, active_rows


def br_v1(p: Patcher) -> None:
    """``vmx_deliver_posted_interrupt`` before fdba608f15e2: ``if (vcpu !=
    kvm_get_running_vcpu() && !kvm_vcpu_trigger_posted_interrupt(vcpu))
    kvm_vcpu_wake_up(vcpu)``: a post to the pCPU's own running vCPU neither notifies nor wakes
    it, even when that vCPU is blocking (a timer IRQ on the pCPU where it halted)."""

    def trigger_posted_interrupt(self: ApicvState, vcpu: Vcpu) -> int | None:
        if self._vm().host.running is vcpu:
            return None
        if vcpu.run_state is RunState.IN_GUEST:
            p = vcpu.last_pcpu
            return None if p is None else p.apic_id
        vcpu.sched.wake_up(vcpu)
        return None

    p.set(ApicvState, "trigger_posted_interrupt", trigger_posted_interrupt)


def br_v2(p: Patcher) -> None:
    """``vmx_vcpu_pi_put`` before 1831fa4: the wake-up vector is armed for any blocking vCPU,
    so a post wakes a vCPU halted with IF=0 (``cli; hlt``)."""
    p.set(ApicvState, "wakeup_allowed", staticmethod(lambda vcpu: True))


def br_v3(p: Patcher) -> None:
    """The block path without its ON re-check: ``pi_enable_wakeup_handler`` (and, before
    "Handle PI wakeup shenanigans during vcpu_put/load", ``pi_pre_block``) must catch a post
    that landed while the wake-up vector was being armed; without it the post's notification
    went to a pCPU no longer in guest mode and the vCPU sleeps with ON set."""
    p.set(ApicvState, "on_while_arming", lambda self, i: False)


def br_v5(p: Patcher) -> None:
    """Before 17e433b54393: the directed-yield check asks ``kvm_vcpu_has_events``, which syncs
    the other vCPU's PIR (``vmx_sync_pir_to_irr``) from a pCPU where another VMCS is loaded."""

    def pi_has_pending_interrupt(self: ApicvState, i: int) -> bool:
        return self._vcpus[i].has_events()

    p.set(ApicvState, "pi_has_pending_interrupt", pi_has_pending_interrupt)


def br_v6(p: Patcher) -> None:
    """Before "KVM: VMX: Do not fully reset PI descriptor on vCPU reset": the descriptor is
    memset on reset, so NV = 0 and NDST = 0 with SN clear until the first load."""

    def vcpu_reset(self: ApicvState, vcpu: Vcpu, init_event: bool) -> None:
        desc = self._descs[vcpu.index]
        desc.pir = 0
        desc.control = 0

    p.set(ApicvState, "vcpu_reset", vcpu_reset)


def br_v7(p: Patcher) -> None:
    """5413bcba7ed5 before 629d3698f695: the x2APIC ICR APIC-write exit sends the IPI and
    stores the u64 at 0x300 back as the CPU left it (``kvm_lapic_set_reg64(apic, APIC_ICR,
    data)``), BUSY (bit 12) included."""

    def x2apic_icr_write_nodecode(self: ApicvState, vcpu: Vcpu) -> None:
        apic = vcpu.apic
        data = apic.icr
        vcpu.emulate_wrmsr(MSR_ICR, data & ~DELIVERY_STATUS)
        _store_icr(apic, data & 0xFFFFFFFF, data >> 32, True)

    p.set(ApicvState, "x2apic_icr_write_nodecode", x2apic_icr_write_nodecode)


def br_v8(p: Patcher) -> None:
    """IPIv v4: ``LAST_PID_POINTER_INDEX = KVM_MAX_VCPU_ID``, a count used as the last index."""
    p.set(hw_vmx, "last_pid_pointer_index", lambda max_vcpu_ids: max_vcpu_ids)


def br_v11(p: Patcher) -> None:
    """Before "KVM: x86: check PIR even for vCPUs with disabled APICv": ``vmx_sync_pir_to_irr``
    returns early while APICv is inhibited, so a device's post stays in the PIR."""
    p.set(ApicvState, "pir_checked", lambda self, vcpu: self.vcpu_active(vcpu))


def br_v12(p: Patcher) -> None:
    """``vmx_vcpu_pi_put`` before "KVM: VMX: Suppress PI notifications whenever the vCPU is
    put": SN only when the vCPU is preempted, so a vCPU blocking with IF=0 (not armed) keeps
    receiving notifications at a pCPU where it does not run."""
    p.set(
        ApicvState,
        "sn_on_put",
        staticmethod(lambda vcpu: vcpu.run_state is not RunState.BLOCKED),
    )



ROWS: tuple[Row, ...] = (
    ("BR-V1", "fdba608f15e2",
     "KVM: VMX: Wake vCPU when delivering posted IRQ even if vCPU == this vCPU",
     "a post to the pCPU's running vCPU skips the wake-up: a vCPU blocking there sleeps on",
     ("PI-J2",), br_v1, ""),
    ("BR-V2", "1831fa4",
     "KVM: VMX: Don't unblock vCPU w/ Posted IRQ if IRQs are disabled in guest",
     "the wake-up vector armed with IF=0: a post wakes a cli; hlt vCPU", ("IPIV-5",), br_v2, ""),
    ("BR-V3", "", "KVM: VMX: Handle PI wakeup shenanigans during vcpu_put/load",
     "the block path without its ON re-check (the model's block path is already put-shaped; "
     "the old pre/post-block hooks are not re-created): a post racing the arming is lost",
     ("IPIV-5",), br_v3, ""),
    ("BR-V4", "83c98007d9fb",
     "KVM: nVMX: Ensure vCPU honors event request if posting nested IRQ fails",
     "missing barrier between pi_pending/KVM_REQ_EVENT and reading vcpu->mode", ("PI-J2",),
     None, "nested VMX (L2, vmcs12's posted-interrupt vector) is not modelled"),
    ("BR-V5", "17e433b54393", "KVM: Fix leak vCPU's VMCS value into other pCPU",
     "the directed-yield check syncs another vCPU's PIR", ("PI-J4",), br_v5, ""),
    ("BR-V6", "", "KVM: VMX: Do not fully reset PI descriptor on vCPU reset",
     "the descriptor memset at reset: NV 0, NDST 0, SN clear until the first load (the model's "
     "INIT never reaches the descriptor, so only the RESET half is put back)",
     ("IPIV-6",), br_v6, ""),
    ("BR-V7", "629d3698f695", "KVM: x86: Clear bit12 of ICR after APIC-write VM-exit",
     "the x2APIC ICR stored back with BUSY after its APIC-write exit", ("VID-7", "IPIV-4"),
     br_v7, ""),
    ("BR-V8", "", "PID-table sizing and count-vs-max confusion (IPIv v4, KVM_MAX_VCPU_ID)",
     "LAST_PID_POINTER_INDEX = max_vcpu_ids, a count used as the last index", ("IPIV-2",),
     br_v8, ""),
    ("BR-V9", "", "PID-table allocation moved to vCPU pre-create under kvm->lock",
     "the table sized at VM creation, before KVM_CAP_MAX_VCPU_ID", ("IPIV-2",), None,
     "the model's max_vcpu_ids is fixed when the Vm is built, before its first vCPU, and vCPUs "
     "are created one at a time: allocation at VM init and at first pre-create cannot differ"),
    ("BR-V10", "5f02ef741a78", "raw spinlock for the per-CPU blocked-vCPU (wakeup) list lock",
     "a sleeping lock taken in hard-IRQ context (PREEMPT_RT)", ("IPIV-5",), None,
     "locks and the host's IRQ-disabled state are not modelled (each step is atomic)"),
    ("BR-V11", "", "KVM: x86: check PIR even for vCPUs with disabled APICv",
     "vmx_sync_pir_to_irr skips the PIR while APICv is inhibited: a device's post is lost",
     ("PI-J3", "IPIV-1"), br_v11, ""),
    ("BR-V12", "", "KVM: VMX: Suppress PI notifications whenever the vCPU is put",
     "SN only on preemption: a vCPU blocking with IF=0 still gets notifications",
     ("IPIV-5",), br_v12, ""),
)
"""Every BR-V* of Part M, replayable or with the reason it is not."""


BY_ID: dict[str, Row] = {row[0]: row for row in ROWS}


def active(ids: Iterable[str]) -> AbstractContextManager[None]:
    """Put the named BR-V* bugs back for the ``with`` block (``apicsim.replays.active`` does
    the same for every catalogued bug)."""
    return active_rows(BY_ID, ids, "an APICv replay")
