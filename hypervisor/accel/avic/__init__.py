"""AMD AVIC as KVM drives it: ``Vm(accelerator="avic")`` or ``Vm(accelerator=Avic(...))``.

Sources (``../shared/reference/avic_ipiv.md`` Parts A-G, rules in ``specs/avic.md``): KVM's
``arch/x86/kvm/svm/avic.c`` (``avic_init_backing_page``, ``__avic_vcpu_load``/``__avic_vcpu_put``,
``avic_vcpu_blocking``/``unblocking``, ``avic_incomplete_ipi_interception``,
``avic_kick_target_vcpus_fast``/``avic_kick_target_vcpus``, ``avic_unaccelerated_access_
interception``, ``avic_handle_ldr_update``/``avic_handle_dfr_update``, ``avic_ring_doorbell``,
``avic_ga_log_notifier``) and ``svm.c`` (``svm_deliver_interrupt``,
``svm_complete_interrupt_delivery``).  The CPU's side (tables, the ICR-write algorithm) is
``hypervisor.hw.avic``.

* :class:`Avic` (defined in ``hypervisor.accel.avic.config``, re-exported here) is the
  configuration (frozen data, shareable): ``x2avic``, ``x2avic_4k``,
  ``enable_ipiv``, ``cpu_family`` (0x17: erratum #1235, which forces ``enable_ipiv`` off
  unless ``force_ipiv``, the model's knob for the kernels before d921665e01ba), the documented
  address mappings (vCPU index ``i``'s backing page at ``backing_page_base + i * 0x1000``; the
  pCPUs' host APIC ids come from ``hypervisor.host``, overridable with ``Host(apic_ids=)``).
* :class:`AvicState` is one VM's AVIC state (``vm.accel``): the physical and logical APIC ID
  tables, KVM's shadow entries (bit 61 lives only there), the doorbell log, the VMCB fields,
  KVM's exit handlers, IsRunning across load/put/block/unblock, host-side delivery
  (``svm_deliver_interrupt``) installed as each APIC's ``ApicOps``, and the inhibit switch
  (while inhibited the VM is trap-and-emulate; IRR is the same page both ways, so nothing is
  lost or duplicated across a switch).  The VM's flag (``active``) flips at once; with queued
  steps each vCPU's ``apicv_active`` (:meth:`AvicState.vcpu_active`) and physical entry follow
  in its own atomic step (``avic.apicv_update.N``, KVM_REQ_APICV_UPDATE ->
  ``avic_refresh_apicv_exec_ctrl``), so a test can interleave the switch with a delivery.
  With queued steps a host-side delivery is steps too (set IRR, read ``vcpu->mode``, read
  ``apicv_active``, act: AV-E7), and :meth:`AvicState.entry_steps` is a VM entry.
* Each vCPU's VMCB fields are stored as KVM writes them (``avic_activate_vmcb`` /
  ``avic_deactivate_vmcb``, ``avic_refresh_virtual_apic_mode``): AVIC and x2AVIC enable, max
  index, the x2APIC MSR intercepts and INTERCEPT_CR8_WRITE (AV-F3, AV-G4); a guest MOV to CR8
  exits only while that intercept is set.

Choices where the sources are open (``specs/avic.md`` AVIC-CHOICE-*): an xAPIC access while
AVIC is inhibited takes the emulated MMIO exit (``EPT_MISCONFIG``, the model's name for KVM's
MMIO/NPF path); ICR2 and TPR writes and every register read except TMCCT are accelerated (no
exit); an EOI is accelerated when the vector in service is edge-triggered and traps otherwise; a
vCPU woken but not yet re-entered has IsRunning = 0 (the model loads it at its next entry);
an x2APIC guest on ``Avic(x2avic=False)`` has its x2APIC MSRs intercepted and emulated while
delivery still goes through the backing page and doorbells (KVM's hybrid mode).

A vCPU loaded but outside guest mode (``RunState.IN_HOST``) keeps IsRunning 1 and gets no
doorbell (AV-E8).  While AVIC is deactivated the CR8 write intercept stays set (KVM would
re-evaluate it at entries with ``svm_update_cr8_intercept``: AVIC-CHOICE-7).

Not modelled: the IOMMU (device posted interrupts; the GA log notifier is callable directly),
nested AVIC, TLB flushes on activation, SEV-ES (which never intercepts CR8 writes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from hypervisor.accel.avic.config import Avic as Avic
from hypervisor.apic_map import Inhibits
from hypervisor.exits import ExitReason
from hypervisor.host.steps import Protocol, Step, Steps
from hypervisor.hw.avic import (
    AVIC_ENABLE_MASK,
    AVIC_PHYSICAL_MAX_INDEX_MASK,
    X2APIC_MODE_MASK,
    IcrWrite,
    IpiFailure,
    LogicalEntry,
    LogicalTable,
    PhysicalEntry,
    PhysicalTable,
    VmcbAvic,
    ga_tag_fields,
    icr_write_steps,
    incomplete_ipi_info,
    logical_index,
    max_physical_index,
    physical_table_pages,
    unaccelerated_access_info,
)
from hypervisor.trace import (
    KvmAvicDoorbell,
    KvmAvicGaLog,
    KvmAvicIncompleteIpi,
    KvmAvicKickVcpuSlowpath,
    KvmAvicUnacceleratedAccess,
)
from hypervisor.vcpu import RunState
from lapic import destination
from lapic.apic import LocalApic
from lapic.faults import ApicValueError, check_int
from lapic.icr import DELIVERY_STATUS, Icr, Interrupt, interrupt_of_icr
from lapic.ops import DefaultApicOps
from lapic.registers import DFR_FLAT

if TYPE_CHECKING:
    from hypervisor.host.pcpu import Pcpu
    from hypervisor.vcpu import Vcpu
    from hypervisor.vm import Vm

_LOADED = (RunState.IN_GUEST, RunState.IN_HOST)
"""Run states of a vCPU loaded on its pCPU (in guest mode or handling an exit)."""
TRAP_OFFSETS = frozenset(
    {0x20, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0, 0x280, 0x300, 0x320, 0x330, 0x340, 0x350, 0x360,
     0x370, 0x380, 0x3E0}
)
"""KVM ``is_avic_unaccelerated_access_trap`` (AV-D2): any other offset is a fault."""
TMCCT = 0x390
APIC_ID = 0x20
ICR = 0x300
ICR2 = 0x310
TPR = 0x80
EOI = 0xB0
LDR = 0xD0
DFR = 0xE0
RRR = 0xC0
X2APIC_MSR_BASE = 0x800
DOORBELL_LOG = 4096
"""How many doorbells ``avic.doorbells`` keeps (oldest dropped first)."""


def kick_dest(w: IcrWrite) -> tuple[bool, int]:
    """The destination KVM's kick decodes, from the *sender's* mode (a879a88e05f3)."""
    return w.x2apic, (w.icrh if w.x2apic else w.icrh >> 24)


def x2apic_logical_bitmap(dest: int) -> int:
    """The x2APIC logical destination's bitmap: bits 15:0 (da3fb46d226a)."""
    return dest & 0xFFFF


def decode_index(exit_info_2: int) -> int:
    """EXITINFO2's index as KVM decodes it: ``& AVIC_PHYSICAL_MAX_INDEX_MASK``, 12 bits
    (ca11d9d35e95)."""
    return exit_info_2 & AVIC_PHYSICAL_MAX_INDEX_MASK


def set_irr(apic: LocalApic, vector: int, level_triggered: bool) -> None:
    """``kvm_lapic_set_irr`` in the backing page (the APIC's own register page)."""
    bit = ((vector >> 5) << 7) | (vector & 31)
    apic._tmr_bits[bit] = 1 if level_triggered else 0
    apic._irr_bits[bit] = 1


class AvicOps(DefaultApicOps):
    """Each APIC's delivery vtable under AVIC: host-side delivery is ``svm_deliver_interrupt``
    (IRR in the backing page, then doorbell, wake-up or legacy kick); a guest ICR write the CPU
    handles goes to the hardware model; anything destination matching uses keeps the logical
    table up to date."""

    def __init__(self, state: AvicState) -> None:
        self.state = state

    def set_intr_ready(self, apic: LocalApic, vector: int, level_triggered: bool) -> bool:
        state = self.state
        steps = state.steps
        if steps is not None and steps.queued:  # AV-E7: every read its own step
            i = state._index[apic]
            steps.start(f"avic.deliver.vcpu{i}", state.deliver_steps(apic, vector, level_triggered))
            return False
        set_irr(apic, vector, level_triggered)
        return state.complete_delivery(apic)

    def send(self, apic: LocalApic, irq: Interrupt) -> None:
        self.state.send(apic, irq)

    def map_changed(self, apic: LocalApic) -> None:
        hook = apic.map_hook
        if hook is not None:
            hook(apic)
        self.state.ldr_changed(apic)
        self.state.apic_mode_changed(apic)
        self.state.refresh()


class AvicState:
    """One VM's AVIC (``vm.accel``).  See the module docstring."""

    name = "avic"

    def __init__(self) -> None:
        self.vm: Vm | None = None
        self.config = Avic()
        self.physical_table = PhysicalTable()
        self.logical_table = LogicalTable()
        self.shadow: dict[int, int] = {}
        """KVM's copy of each vCPU's physical entry, by guest physical ID (bit 61 lives here)."""
        self.doorbells: deque[int] = deque(maxlen=DOORBELL_LOG)
        """Every doorbell rung (by the CPU or by KVM), as host APIC ids, in order."""
        self.warnings: list[str] = []
        """KVM WARNs hit (INVALID_BACKING_PAGE, a trap exit on a read): must stay empty."""
        self._apics: list[LocalApic] = []
        self._index: dict[LocalApic, int] = {}
        """Each APIC -> its vCPU index."""
        self._ldr_cache: dict[int, tuple[int, bool] | None] = {}
        """vCPU index -> (cached LDR logical id, flat) as ``svm->ldr_reg``/``dfr_reg``."""
        self._ops = AvicOps(self)
        self.steps: Steps | None = None
        """The host's step scheduler (queued: host-side deliveries run as steps, AV-E7)."""
        self._hw_sender: LocalApic | None = None
        self._busy_after: dict[LocalApic, bool] = {}
        """ICR.BUSY as the last INCOMPLETE_IPI exit of the running guest write left it."""
        self.icr_rewrites = 0
        """How many times KVM re-ran a guest ICR write found with BUSY set (AV-B7)."""
        self._active = True
        self._stale: set[int] = set()
        """vCPU indices whose apicv_active has not yet followed the last inhibit change."""
        self._vmcbs: list[VmcbAvic] = []
        """Each vCPU's VMCB AVIC fields as KVM last wrote them (:meth:`vmcb`)."""
        self._x2: list[bool] = []
        """Each vCPU's APIC mode (x2APIC) when its VMCB was last written."""
        self.entry_writes = 0
        """Physical-table entry writes by KVM (load, put, block, refresh): a mode switch
        makes none (AV-F3, BR-A15)."""

    # ===================================================================================
    # Set-up
    # ===================================================================================
    def _vm(self) -> Vm:
        vm = self.vm
        if vm is None:
            raise ApicValueError("this AVIC state is not attached to a VM")
        return vm

    def attach(self, vm: Vm) -> None:
        if self.vm is None:
            self.vm = vm
            self.steps = vm.host.steps
            cfg = vm.config.accelerator
            self.config = cfg if isinstance(cfg, Avic) else Avic()
            self.physical_table = PhysicalTable(
                physical_table_pages(vm.max_vcpu_ids, self.config.x2avic, self.config.x2avic_4k)
            )
        for vcpu in vm.vcpus[len(self._apics):]:
            self._init_vcpu(vcpu)

    def _init_vcpu(self, vcpu: Vcpu) -> None:
        """``avic_init_backing_page``: the vCPU's entry is valid from creation on (AV-G1)."""
        apic = vcpu.apic
        self._apics.append(apic)
        self._index[apic] = vcpu.index
        self._ldr_cache[vcpu.index] = None
        apic.bind_ops(self._ops)
        vm = self._vm()
        # init_vmcb: CR8 writes intercepted unless AVIC is active (avic_init_vmcb).
        self._x2.append(apic.x2apic_mode)
        active = self._active and not self.id_too_big(vcpu)
        self._vmcbs.append(self._vmcb_for(vcpu.index, active, not active))
        if self.id_too_big(vcpu):
            vm.accel_inhibits |= Inhibits.PHYSICAL_ID_TOO_BIG  # AV-F1, BR-A21
            return
        entry = PhysicalEntry.make(backing_page=self.backing_page_of(vcpu.index))
        self.shadow[vcpu.vcpu_id] = int(entry)
        self.physical_table[vcpu.vcpu_id] = entry

    def vcpu_state(self, vcpu: Vcpu) -> str:
        """The accel column of ``vm.table()``: the vCPU's hardware physical-table entry as
        ``IsRunning``, ``valid`` and the host APIC id (hex), or ``no entry`` when its id is
        beyond the table (AV-F1)."""
        if self.id_too_big(vcpu):
            return "avic: no entry"
        e = self.physical_table[vcpu.vcpu_id]
        return (f"avic: run={int(e.is_running)} valid={int(e.valid)} "
                f"host={e.host_id:#x}")

    def id_too_big(self, vcpu: Vcpu) -> bool:
        """A vCPU id above the max index inhibits AVIC instead of failing KVM_CREATE_VCPU."""
        return vcpu.vcpu_id > self.max_physical_index

    def backing_page_of(self, i: int) -> int:
        """Physical address of vCPU ``i``'s backing page (its ``LocalApic.regs``)."""
        return self.config.backing_page_base + i * 0x1000

    @property
    def max_physical_index(self) -> int:
        """KVM's max index for the VM (AV-A5): ``min(max_vcpu_ids - 1, arch max)``."""
        vm = self._vm()
        return max_physical_index(vm.max_vcpu_ids, self.config.x2avic, self.config.x2avic_4k)

    def max_physical_index_of(self, i: int) -> int:
        """What vCPU ``i``'s VMCB holds while AVIC is active: the xAPIC limit 0xFE unless it
        is in x2APIC mode on an x2AVIC CPU."""
        vm = self._vm()
        apic = vm.lapic(i)
        x2 = self.config.x2avic and apic.x2apic_mode
        return max_physical_index(vm.max_vcpu_ids, x2, x2 and self.config.x2avic_4k)

    def host_apic_id(self, pcpu: int) -> int:
        """The doorbell target of pCPU ``pcpu`` (``kvm_cpu_get_apicid``)."""
        return self._vm().host.pcpu(pcpu).apic_id

    def vmcb(self, i: int) -> VmcbAvic:
        """vCPU ``i``'s VMCB AVIC fields as KVM last wrote them (AV-A1, AV-A5, AV-F3, AV-G4):
        at creation, at each activation change of that vCPU, at each APIC mode change."""
        self._vm().vcpu(i)  # checks i
        return self._vmcbs[i]

    def _vmcb_for(self, i: int, active: bool, intercept_cr8: bool) -> VmcbAvic:
        """``avic_activate_vmcb`` / ``avic_deactivate_vmcb``: AVIC enable, x2AVIC mode and the
        max index (cleared when deactivated), the x2APIC MSR intercepts; ``intercept_cr8`` is
        INTERCEPT_CR8_WRITE as the caller decides it (:meth:`cr8_intercept`)."""
        x2 = active and self.config.x2avic and self._apics[i].x2apic_mode
        int_ctl = (AVIC_ENABLE_MASK | (X2APIC_MODE_MASK if x2 else 0)) if active else 0
        index = self.max_physical_index_of(i) if active else 0
        return VmcbAvic(
            int_ctl,
            self.backing_page_of(i),
            self.config.logical_table_pa,
            self.config.physical_table_pa | index,
            intercept_cr8_write=intercept_cr8,
            intercept_x2apic_msrs=not x2,
        )

    def _write_vmcb(self, i: int, active: bool) -> None:
        old = self._vmcbs[i]
        self._x2[i] = self._apics[i].x2apic_mode
        self._vmcbs[i] = self._vmcb_for(i, active, self.cr8_intercept(old, active))

    @staticmethod
    def cr8_intercept(old: VmcbAvic, active: bool) -> bool:
        """INTERCEPT_CR8_WRITE after an activation change (AV-G4, 87d0f901a9bd): cleared by
        ``avic_activate_vmcb`` (the CPU keeps the TPR in the backing page), set by
        ``avic_deactivate_vmcb`` (KVM must see the guest's TPR writes again)."""
        return not active

    # ===================================================================================
    # Activation (inhibits)
    # ===================================================================================
    @property
    def active(self) -> bool:
        """APICv/AVIC active: no inhibit reason in force.  A change is applied to the
        physical table first (``avic_refresh_apicv_exec_ctrl``: load/put of loaded vCPUs)."""
        vm = self._vm()
        active = not vm.inhibits
        if active is not self._active:
            self._active = active
            steps = vm.host.steps
            for v in vm.vcpus:
                if steps.queued:  # each vCPU applies it at its own KVM_REQ_APICV_UPDATE
                    self._stale ^= {v.index}
                    steps.start(f"avic.apicv_update.{v.index}", self._update_steps(v))
                else:
                    self._refresh_entry(v)
        return active

    def _update_steps(self, vcpu: Vcpu) -> Protocol:
        """``kvm_vcpu_update_apicv`` -> ``avic_refresh_apicv_exec_ctrl`` on one vCPU, one
        atomic step: its own apicv_active follows the VM's, then its physical entry."""
        yield Step(
            f"avic.apicv_update[{vcpu.index}]", frozenset({"avic.inhibits", "run_state"}),
            frozenset({"avic.physical_table", f"apicv_active[{vcpu.index}]"}),
            lambda: self._apply_update(vcpu),
        )
        return None

    def _apply_update(self, vcpu: Vcpu) -> None:
        if vcpu.index in self._stale:
            self._stale.discard(vcpu.index)
            self._refresh_entry(vcpu)

    def _refresh_entry(self, v: Vcpu) -> None:
        """``avic_refresh_apicv_exec_ctrl``: the VMCB first, then the physical entry (a put,
        or a load of a vCPU that is loaded)."""
        self._write_vmcb(v.index, self._active)
        if not self._active:
            self._put_entry(v, blocking=False)
        elif v.run_state in _LOADED and v.last_pcpu is not None:
            self._load_entry(v, v.last_pcpu)

    def apic_mode_changed(self, apic: LocalApic) -> None:
        """The vCPU's APIC switched xAPIC <-> x2APIC: ``svm_set_virtual_apic_mode``."""
        i = self._index.get(apic)
        if i is None or i >= len(self._x2) or self._x2[i] == apic.x2apic_mode:
            return
        self.set_virtual_apic_mode(self._vm().vcpus[i])

    def set_virtual_apic_mode(self, vcpu: Vcpu) -> None:
        """``avic_refresh_virtual_apic_mode`` (AV-F3, e0bead97e759): only the VMCB changes
        (x2AVIC mode bit, max index, x2APIC MSR intercepts); no put/load, so the physical
        entry (IsRunning) is never rewritten."""
        self._write_vmcb(vcpu.index, self.vcpu_active(vcpu))

    def vcpu_active(self, vcpu: Vcpu) -> bool:
        """``kvm_vcpu_apicv_active``: the VM's state once this vCPU applied the last inhibit
        change (with queued steps it may lag behind :attr:`active` for a while)."""
        return self.active != (vcpu.index in self._stale)

    def refresh(self) -> None:
        """Apply an inhibit change now (KVM ``kvm_set_or_clear_apicv_inhibit`` refreshes every
        vCPU before it next enters)."""
        if self.vm is not None and len(self._apics) == len(self.vm.vcpus):
            _ = self.active

    # ===================================================================================
    # IsRunning across the life cycle (Part E)
    # ===================================================================================
    def _write_entry(self, vcpu_id: int, shadow: int) -> None:
        self.entry_writes += 1
        self.shadow[vcpu_id] = shadow
        self.physical_table[vcpu_id] = self.hw_entry(shadow)

    def hw_entry(self, shadow: int) -> PhysicalEntry:
        """What KVM writes to the hardware table for a shadow entry: bit 61 stripped, and
        IsRunning too without IPIv (d921665e01ba "never set IsRunning if disabled")."""
        hw = PhysicalEntry(shadow).replace(ga_log_intr=0)
        return hw if self._ipiv else hw.replace(is_running=0)

    @property
    def _ipiv(self) -> bool:
        return self.config.enable_ipiv

    def _load_entry(self, vcpu: Vcpu, pcpu: Pcpu) -> None:
        old = self.shadow.get(vcpu.vcpu_id)
        if old is None:
            return
        new = PhysicalEntry(old).replace(host_id=pcpu.apic_id & 0xFFF, is_running=1,
                                         ga_log_intr=0)
        self._write_entry(vcpu.vcpu_id, int(new))

    def _put_entry(self, vcpu: Vcpu, *, blocking: bool) -> None:
        old = self.shadow.get(vcpu.vcpu_id)
        if old is None:
            return
        new = PhysicalEntry(old).replace(is_running=0, ga_log_intr=int(blocking))
        self._write_entry(vcpu.vcpu_id, int(new))

    def vcpu_load(self, vcpu: Vcpu, pcpu: Pcpu) -> None:
        """``avic_vcpu_load`` (AV-E1): host id := this pCPU's, IsRunning := 1 (hardware table:
        only with IPIv); skipped while blocking or inhibited."""
        if not self.vcpu_active(vcpu):
            return
        if not self.load_allowed(vcpu):
            return
        self._load_entry(vcpu, pcpu)

    @staticmethod
    def load_allowed(vcpu: Vcpu) -> bool:
        """``avic_vcpu_load``'s guard: never set IsRunning for a vCPU in its blocking window
        (``kvm_vcpu_is_blocking``; 18869f26df1a)."""
        return vcpu.run_state is not RunState.BLOCKED

    def vcpu_put(self, vcpu: Vcpu) -> None:
        """``avic_vcpu_put`` (AV-E2): IsRunning := 0, host id kept."""
        if self.vcpu_active(vcpu):
            self._put_entry(vcpu, blocking=False)

    def vcpu_blocking(self, vcpu: Vcpu) -> None:
        """``avic_vcpu_blocking`` (AV-E3/E4): put with GA_LOG_INTR in the shadow entry, even
        with guest interrupts disabled."""
        if self.vcpu_active(vcpu):
            self._put_entry(vcpu, blocking=True)

    def vcpu_unblocking(self, vcpu: Vcpu) -> None:
        """``avic_vcpu_unblocking``: GA_LOG_INTR cleared; IsRunning is set at the next entry
        (model choice: a woken vCPU is runnable, not loaded)."""
        old = self.shadow.get(vcpu.vcpu_id)
        if old is not None and old & (1 << 61):
            self.shadow[vcpu.vcpu_id] = old & ~(1 << 61)

    # ===================================================================================
    # Doorbells and host-side delivery
    # ===================================================================================
    def _record_doorbell(self, vcpu_id: int, host_id: int) -> None:
        vm = self._vm()
        self.doorbells.append(host_id)
        vm.stats.doorbells += 1
        vm.host.stats.doorbells += 1
        if vm.tracer.on:
            vm.tracer.emit(KvmAvicDoorbell(vcpu_id, host_id))

    def hw_doorbell(self, host_id: int) -> None:
        """The CPU rang a doorbell on an accelerated ICR write (``AvicView``)."""
        self._record_doorbell(-1, host_id)

    def ring_doorbell(self, vcpu: Vcpu) -> None:
        """``avic_ring_doorbell``: WRMSR to the target's pCPU, skipped on this very pCPU."""
        p = vcpu.last_pcpu
        vm = self._vm()
        if p is None or vm.host.executing is p:
            return
        self._record_doorbell(vcpu.vcpu_id, p.apic_id)

    def complete_delivery(self, apic: LocalApic) -> bool:
        """``svm_complete_interrupt_delivery`` after IRR was set (AV-E6): mode first, then
        apicv_active; doorbell to a vCPU in guest mode, else wake it up.  Returns True when
        the legacy path (KVM_REQ_EVENT + kick) must run (AVIC inactive)."""
        vcpu = self._vm().vcpus[self._index[apic]]
        in_guest = self.in_guest_mode(vcpu)
        if not self.vcpu_active(vcpu):
            return True
        if in_guest:
            self.ring_doorbell(vcpu)
        else:
            vcpu.sched.wake_up(vcpu)
        return False

    @staticmethod
    def in_guest_mode(vcpu: Vcpu) -> bool:
        """``vcpu->mode == IN_GUEST_MODE``: the doorbell-or-wake choice keys on it, not on
        IsRunning (31f251d4ddfa)."""
        return vcpu.run_state is RunState.IN_GUEST

    def kick_vcpu(self, vcpu: Vcpu) -> None:
        """``avic_kick_vcpu`` (AV-C2): no IRR write, only complete the delivery."""
        if self.complete_delivery(vcpu.apic):
            vcpu.sched.notify(vcpu.apic)

    def deliver_steps(self, apic: LocalApic, vector: int, level_triggered: bool) -> Protocol:
        """``svm_deliver_interrupt`` with queued steps (AV-E7, 66fa226c131f): set IRR, then
        ``svm_complete_interrupt_delivery``: load-acquire ``vcpu->mode``, then read
        ``apicv_active``, each an atomic step, then act on what was read (doorbell, wake-up,
        or KVM_REQ_EVENT + kick).  Reading the mode first pairs with the entry's
        store-release (:meth:`entry_steps`): a sender that sees IN_GUEST_MODE sees the
        apicv_active the entry published."""
        i = self._index[apic]
        vcpu = self._vm().vcpus[i]
        yield Step(
            f"avic.deliver.set_irr[{i}]", frozenset({f"apic_regs[{i}]"}),
            frozenset({f"irr[{i}]"}), lambda: set_irr(apic, vector, level_triggered),
        )
        in_guest = yield Step(
            f"avic.deliver.read_mode[{i}]", frozenset({f"run_state[{i}]"}), frozenset(),
            lambda: self.in_guest_mode(vcpu),
        )
        active = yield Step(
            f"avic.deliver.read_apicv_active[{i}]", frozenset({f"apicv_active[{i}]"}),
            frozenset(), lambda: self.vcpu_active(vcpu),
        )
        yield self._complete_step(vcpu, bool(in_guest), bool(active))
        return None

    def _complete_step(self, vcpu: Vcpu, in_guest: bool, active: bool) -> Step:
        """The end of ``svm_complete_interrupt_delivery``, on the values read before."""
        i = vcpu.index
        return Step(
            f"avic.deliver.complete[{i}]", frozenset({f"run_state[{i}]"}),
            frozenset({f"run_state[{i}]", "avic.doorbells"}),
            lambda: self._complete(vcpu, in_guest, active),
        )

    def _complete(self, vcpu: Vcpu, in_guest: bool, active: bool) -> None:
        if not active:
            vcpu.sched.notify(vcpu.apic)  # KVM_REQ_EVENT + kvm_vcpu_kick
        elif in_guest:
            self.ring_doorbell(vcpu)
        else:
            vcpu.sched.wake_up(vcpu)

    def entry_steps(self, vcpu: Vcpu, pcpu: int | None = None) -> Protocol:
        """The target's ``vcpu_enter_guest`` as one atomic step (AV-E7): KVM_REQ_APICV_UPDATE
        (its apicv_active follows the VM's), KVM_REQ_EVENT's look at IRR (an interrupt
        pending now is injected at this entry, by KVM or by the CPU's VMRUN), then the
        store-release of IN_GUEST_MODE (``Scheduler.load``).  Returns whether an interrupt
        was pending at the entry."""
        i = vcpu.index

        def enter() -> bool:
            self._apply_update(vcpu)
            pending = vcpu.apic.pending_interrupt() is not None
            vcpu.sched.load(vcpu, pcpu)
            return pending

        seen = yield Step(
            f"avic.enter[{i}]", frozenset({f"irr[{i}]", "avic.inhibits"}),
            frozenset({f"run_state[{i}]", f"apicv_active[{i}]", "avic.physical_table"}), enter,
        )
        return seen

    def ga_log_notify(self, tag: int) -> bool:
        """``avic_ga_log_notifier`` (AV-A8): wake vCPU ``vcpu_idx`` of this VM.  True if a
        vCPU with that index exists in this VM."""
        vm = self._vm()
        vm_id, idx = ga_tag_fields(check_int("tag", tag, 0, 0xFFFFFFFF))
        if vm.tracer.on:
            vm.tracer.emit(KvmAvicGaLog(vm_id, idx))
        if vm_id != self.config.vm_id or idx >= len(vm.vcpus):
            return False
        vcpu = vm.vcpus[idx]
        vcpu.sched.wake_up(vcpu)
        return True

    # ===================================================================================
    # AvicView for the hardware model
    # ===================================================================================
    def page(self, pa: int) -> LocalApic | None:
        i, off = divmod(pa - self.config.backing_page_base, 0x1000)
        if off or not 0 <= i < len(self._apics):
            return None
        return self._apics[i]

    def index_of_page(self, pa: int) -> int:
        return (pa - self.config.backing_page_base) // 0x1000

    # ===================================================================================
    # Guest ICR writes: hardware, then KVM's INCOMPLETE_IPI handler (Parts B, C)
    # ===================================================================================
    def send(self, apic: LocalApic, irq: Interrupt) -> None:
        """``ApicOps.send``: an ICR write the CPU handles goes to the hardware model; one KVM
        emulates (an exit, a host ioctl) is KVM's ``kvm_apic_send_ipi``."""
        if self._hw_sender is not apic:
            hook = apic.send_hook
            if hook is not None:
                hook(apic, irq)
            return
        self._hw_sender = None
        vm = self._vm()
        i = self._index[apic]
        vcpu = vm.vcpus[i]
        x2 = apic.x2apic_mode
        icrl = Icr.low_of(irq)
        icrh = irq.dest if x2 else (irq.dest & 0xFF) << 24
        w = IcrWrite(
            apic, vcpu.vcpu_id, i, icrl, icrh, x2, apic.dfr == DFR_FLAT,
            self.max_physical_index_of(i),
        )
        protocol = self.icr_steps(vcpu, w)
        steps = vm.host.steps
        if steps.queued:
            steps.start(f"avic.icr.vcpu{i}", protocol)
        else:
            Steps.run_now(protocol)

    def icr_steps(self, vcpu: Vcpu, w: IcrWrite) -> Protocol:
        """The CPU's steps, then (on a failure) the exit and KVM's handler as one step."""
        result = yield from icr_write_steps(
            self, w, stale_isrunning=self.config.erratum_1235,
            vector_check=self.config.invalid_vector_exit,
        )
        if result is None:
            return None
        assert isinstance(result, tuple)
        cause, index = result
        i = vcpu.index
        yield Step(
            f"avic.incomplete_ipi[{i}]", frozenset({"avic.physical_table", "run_state"}),
            frozenset({"irr", "run_state"}),
            lambda: self.incomplete_ipi(vcpu, w, cause, index),
        )
        return result

    def incomplete_ipi(self, vcpu: Vcpu, w: IcrWrite, cause: IpiFailure, index: int) -> None:
        """``#VMEXIT(AVIC_INCOMPLETE_IPI)`` and ``avic_incomplete_ipi_interception`` (AV-C1)."""
        vm = self._vm()
        info1, info2 = incomplete_ipi_info(w.icrl, w.icrh, cause, index)
        vcpu.record_exit(ExitReason.AVIC_INCOMPLETE_IPI, info1, info2)
        if vm.tracer.on:
            vm.tracer.emit(KvmAvicIncompleteIpi(vcpu.vcpu_id, w.icrh, w.icrl, cause, index))
        irq = interrupt_of_icr(w.icrl, w.icrh if w.x2apic else w.icrh >> 24)
        busy = cause in self.config.icr_busy_causes
        if busy:  # AV-B7: the trap has landed; the CPU left BUSY set in the backing page
            self._set_icr_busy(w.sender, True)
        if cause is IpiFailure.INVALID_INT_TYPE:
            self.emulate_failed_ipi(vcpu, w, irq)
        elif cause is IpiFailure.INVALID_TARGET:
            self.handle_invalid_target(vcpu, w, irq)
        elif cause is IpiFailure.TARGET_NOT_RUNNING:
            self.handle_not_running(vcpu, w, irq, decode_index(info2))
        elif cause is IpiFailure.INVALID_BACKING_PAGE:
            self.warnings.append(f"INVALID_BACKING_PAGE on vCPU {vcpu.index}, index {index}")

    def handle_invalid_target(self, vcpu: Vcpu, w: IcrWrite, irq: Interrupt) -> None:
        """Cause 2: the CPU sent nothing, so KVM emulates the whole IPI (5aede752a839)."""
        self.emulate_failed_ipi(vcpu, w, irq)

    def emulate_failed_ipi(self, vcpu: Vcpu, w: IcrWrite, irq: Interrupt) -> None:
        """Causes 0 and 2 (AV-C1, AV-B7): ``if (icrl & APIC_ICR_BUSY)
        kvm_apic_write_nodecode(vcpu, APIC_ICR); else kvm_apic_send_ipi(apic, icrl, icrh);``.
        The BUSY test reads the backing page, where the trap-like exit left the guest's write:
        with BUSY set KVM re-runs the whole ICR write from the page (``kvm_lapic_reg_write``
        sends the IPI and stores ICR with BUSY clear); else it only sends the IPI and never
        writes ICR (b51818afdc1d)."""
        if self._icr_busy(w.sender):
            self.icr_rewrites += 1
            self._set_icr_busy(w.sender, False)
        self._vm().deliver(irq, w.sender)

    @staticmethod
    def _icr_busy(apic: LocalApic) -> bool:
        return bool(int.from_bytes(apic.regs[ICR : ICR + 4], "little") & DELIVERY_STATUS)

    def _set_icr_busy(self, apic: LocalApic, busy: bool) -> None:
        """Set or clear ICR.BUSY in the backing page (the page *is* ``apic.regs``).  During an
        eager guest write the handler runs before the register store, so the state to keep is
        also remembered for :meth:`_hw_write` to re-apply after the store."""
        low = int.from_bytes(apic.regs[ICR : ICR + 4], "little")
        low = low | DELIVERY_STATUS if busy else low & ~DELIVERY_STATUS
        apic.regs[ICR : ICR + 4] = low.to_bytes(4, "little")
        self._busy_after[apic] = busy

    def handle_not_running(self, vcpu: Vcpu, w: IcrWrite, irq: Interrupt, index: int) -> None:
        """Cause 1: the CPU already wrote every IRR; KVM only kicks (never re-emulates: the
        revert of bb218fbcfaaa)."""
        self.kick_targets(vcpu, w, irq, index)

    def kick_targets(self, vcpu: Vcpu, w: IcrWrite, irq: Interrupt, index: int) -> None:
        """``avic_kick_target_vcpus``: the fast path, else every matching vCPU (AV-C3/C4)."""
        vm = self._vm()
        targets = self._fast_targets(w, index)
        if targets is None:
            if vm.tracer.on:
                vm.tracer.emit(KvmAvicKickVcpuSlowpath(w.icrh, w.icrl, index))
            targets = [
                v for v in vm.vcpus
                if destination.matches(irq, v.apic, w.sender, is_ipi=True, profile=vm.profile)
            ]
        for t in targets:
            self.kick_vcpu(t)

    def _fast_targets(self, w: IcrWrite, index: int) -> list[Vcpu] | None:
        """``avic_kick_target_vcpus_fast``: None means "use the slow path"."""
        if (w.icrl >> 18) & 3:
            return None
        vm = self._vm()
        x2, dest = kick_dest(w)
        by_id = {v.vcpu_id: v for v in vm.vcpus}
        if not (w.icrl >> 11) & 1:
            if dest == (0xFFFFFFFF if x2 else 0xFF):
                return None
            if dest != index:
                self.warnings.append(f"WARN_ON_ONCE(dest {dest:#x} != index {index:#x})")
                return None
            t = by_id.get(dest)
            return [] if t is None else [t]
        ids = self.logical_fast_ids(x2, dest, w.flat)
        if ids is None:
            return None
        return [by_id[i] for i in ids if i in by_id]

    def logical_fast_ids(self, x2: bool, dest: int, flat: bool) -> list[int] | None:
        """The fast path's logical loop (AV-C3, bbfc7aa62a4a): every set bit of the
        destination's bitmap is a target, its guest physical ID taken from the cluster
        (x2APIC) or from the logical table (xAPIC; an invalid entry is skipped, KVM's
        ``WARN_ON_ONCE`` + return for that bit).  None sends KVM to the slow path."""
        if x2:
            bitmap = x2apic_logical_bitmap(dest)
            cluster = (dest >> 16) << 4
            return [cluster + i for i in range(16) if bitmap >> i & 1]
        if flat:
            bitmap, cluster = dest, 0
        else:
            bitmap, cluster = dest & 0xF, (dest >> 4) << 2
        ids: list[int] = []
        for i in range(8):
            if bitmap >> i & 1:
                raw = self.logical_table.raw(cluster + i)
                if raw & (1 << 31):
                    ids.append(raw & 0xFF)
        return ids

    # ===================================================================================
    # The logical table (avic_handle_ldr_update / avic_handle_dfr_update)
    # ===================================================================================
    def ldr_changed(self, apic: LocalApic) -> None:
        """Anything matching depends on changed in ``apic``: bring its logical entry in line
        with its LDR and DFR (xAPIC only; x2APIC logical IDs come from the x2APIC ID)."""
        i = self._index.get(apic)
        if i is None:
            return
        vcpu_id = apic.vcpu_id
        cached = self._ldr_cache[i]
        new: tuple[int, bool] | None = None
        if apic.hw_enabled and not apic.x2apic_mode:
            new = (apic.ldr >> 24, apic.dfr == DFR_FLAT)
        if new == cached:
            return
        if cached is not None:
            old_index = logical_index(cached[0], cached[1])
            if old_index is not None:
                self.logical_table[old_index] = 0  # avic_invalidate_logical_id_entry
        if new is not None and new[0] and vcpu_id <= 0xFF:
            index = logical_index(new[0], new[1])
            if index is not None:
                self.logical_table[index] = LogicalEntry.make(vcpu_id)
        self.remember_ldr(i, new)

    def remember_ldr(self, i: int, ldr: tuple[int, bool] | None) -> None:
        """``svm->ldr_reg``/``dfr_reg`` follow every LDR write, even a "bad" one (zero, several
        bits) that got no table entry ("KVM: SVM: Update svm->ldr_reg cache even if LDR is
        bad"), so a later invalidation never hits another vCPU's entry."""
        self._ldr_cache[i] = ldr

    # ===================================================================================
    # Guest accesses (the CPU decides: accelerated, trap or fault)
    # ===================================================================================
    def _unaccelerated(self, vcpu: Vcpu, offset: int, write: bool, trap: bool) -> None:
        vm = self._vm()
        vcpu.record_exit(
            ExitReason.AVIC_UNACCELERATED_ACCESS, unaccelerated_access_info(offset, write), 0
        )
        if vm.tracer.on:
            vm.tracer.emit(KvmAvicUnacceleratedAccess(vcpu.vcpu_id, offset, trap, write, 0))
        if trap and not write:
            self.warnings.append(f"trap exit on a read of {offset:#x}")

    def _xapic_accelerated(self, vcpu: Vcpu, gpa: int) -> bool:
        apic = vcpu.apic
        base = apic.base_address
        return (
            apic.hw_enabled and not apic.x2apic_mode and base <= gpa < base + 0x1000
            and self.vcpu_active(vcpu)
        )

    def mmio_read(self, vcpu: Vcpu, gpa: int, size: int) -> int:
        if not self._xapic_accelerated(vcpu, gpa):
            vcpu.record_exit(ExitReason.EPT_MISCONFIG, gpa, 0)
            return vcpu.emulate_mmio_read(gpa, size)
        offset = gpa - vcpu.apic.base_address
        if offset == TMCCT or size != 4 or offset & 0xF:
            self._unaccelerated(vcpu, offset & 0xFF0, False, False)
        return vcpu.emulate_mmio_read(gpa, size)

    def mmio_write(self, vcpu: Vcpu, gpa: int, value: int, size: int) -> None:
        if not self._xapic_accelerated(vcpu, gpa):
            vcpu.record_exit(ExitReason.EPT_MISCONFIG, gpa, value)
            vcpu.emulate_mmio_write(gpa, value, size)
            return
        offset = gpa - vcpu.apic.base_address
        if size == 4 and not offset & 0xF:
            if offset == ICR:
                self._hw_write(vcpu, lambda: vcpu.emulate_mmio_write(gpa, value, size))
                return
            if offset in (ICR2, TPR) or (offset == EOI and not self._level_eoi(vcpu.apic)):
                vcpu.emulate_mmio_write(gpa, value, size)
                return
        trap = offset in TRAP_OFFSETS and size == 4 and not offset & 0xF
        self._unaccelerated(vcpu, offset & 0xFF0, True, trap)
        if trap and offset == RRR:
            return  # a790e338c7c4: writes to Remote Read Data are ignored
        vcpu.emulate_mmio_write(gpa, value, size)
        if trap and offset == APIC_ID:
            self.handle_apic_id_update(vcpu)

    @staticmethod
    def _level_eoi(apic: LocalApic) -> bool:
        """Model choice: the CPU completes an EOI itself only for an edge-triggered vector."""
        top = max(apic.isr, default=-1)
        return top >= 0 and top in apic.tmr

    def _hw_write(self, vcpu: Vcpu, write: Callable[[], None]) -> None:
        """Run a register write whose IPI the CPU sends (``send`` sees ``_hw_sender``)."""
        self._hw_sender = vcpu.apic
        self._busy_after.pop(vcpu.apic, None)
        try:
            write()
        finally:
            self._hw_sender = None
        busy = self._busy_after.pop(vcpu.apic, None)
        if busy is not None:  # the ICR store of the write ran after the (eager) exit
            self._set_icr_busy(vcpu.apic, busy)
            del self._busy_after[vcpu.apic]

    def _x2avic(self, vcpu: Vcpu, msr: int) -> bool:
        """The MSR is an x2APIC register the VMCB does not intercept (x2AVIC active)."""
        return (
            X2APIC_MSR_BASE <= msr <= 0x8FF
            and not self._vmcbs[vcpu.index].intercept_x2apic_msrs
        )

    def rdmsr(self, vcpu: Vcpu, msr: int) -> int:
        if not self._x2avic(vcpu, msr):
            vcpu.record_exit(ExitReason.MSR_READ, msr, 0)
            return vcpu.emulate_rdmsr(msr)
        offset = (msr - X2APIC_MSR_BASE) << 4
        if offset == TMCCT:
            self._unaccelerated(vcpu, offset, False, False)
        return vcpu.emulate_rdmsr(msr)

    def wrmsr(self, vcpu: Vcpu, msr: int, value: int) -> None:
        if not self._x2avic(vcpu, msr):
            vcpu.msr_exit(msr, value)
            return
        offset = (msr - X2APIC_MSR_BASE) << 4
        if offset in (ICR, 0x3F0):  # ICR, SELF IPI
            self._hw_write(vcpu, lambda: vcpu.emulate_wrmsr(msr, value))
            return
        if offset == TPR or (offset == EOI and not self._level_eoi(vcpu.apic)):
            vcpu.emulate_wrmsr(msr, value)
            return
        trap = offset in TRAP_OFFSETS
        self._unaccelerated(vcpu, offset, True, trap)
        if trap and offset == RRR:
            return
        vcpu.emulate_wrmsr(msr, value)

    def mov_to_cr8(self, vcpu: Vcpu, value: int) -> None:
        """AV-G4: with INTERCEPT_CR8_WRITE set (AVIC deactivated) the write exits
        (``SVM_EXIT_WRITE_CR8``) and KVM's ``cr8_write_interception`` -> ``kvm_set_cr8`` sets
        the TPR (or injects the #GP of a reserved bit); clear (AVIC active), the CPU writes
        V_TPR, which AVIC keeps as the backing page's TPR: no exit."""
        if self._vmcbs[vcpu.index].intercept_cr8_write:
            vcpu.record_exit(ExitReason.WRITE_CR8, 0, value)
        vcpu.emulate_mov_to_cr8(value)

    def handle_apic_id_update(self, vcpu: Vcpu) -> None:
        """After a trapped xAPIC ID write: nothing in the AVIC tables.  f5f9089f76dd removed
        ``avic_handle_apic_id_update`` (which moved the vCPU's physical entry to the new ID and
        cleared the old one, clobbering the owner of that ID); the change inhibits AVIC through
        the APIC map instead (APIC_ID_MODIFIED, AV-G2)."""
        return None

    def notifier(self, vcpu: Vcpu) -> Callable[[LocalApic], None]:
        return vcpu.sched.notifier(vcpu)

    # ===================================================================================
    # Snapshot, dump
    # ===================================================================================
    def state(self) -> Hashable:
        return (
            self.physical_table.state(),
            self.logical_table.state(),
            tuple(sorted(self.shadow.items())),
            tuple(sorted(self._ldr_cache.items())),
            tuple(self.doorbells),
            self._active,
            tuple(self.warnings),
            tuple(self._vmcbs),
            tuple(self._x2),
        )

    def set_state(self, state: Hashable) -> None:
        if not isinstance(state, tuple) or len(state) != 9:
            raise ApicValueError(f"state={state!r} is not an AVIC state")
        phys, logical, shadow, ldr, doorbells, active, warnings, vmcbs, x2 = state
        self._vmcbs = list(vmcbs)
        self._x2 = list(x2)
        self.physical_table.set_state(phys)
        self.logical_table.set_state(logical)
        self.shadow = dict(shadow)
        self._ldr_cache = dict(ldr)
        self.doorbells = deque(doorbells, maxlen=DOORBELL_LOG)
        self._active = bool(active)
        self._stale = set()
        self.warnings = list(warnings)

    def dump(self) -> str:
        lines = [
            f"avic: {self.config!r} active={self.active} "
            f"max_physical_index={self.max_physical_index:#x} doorbells={len(self.doorbells)}"
        ]
        for i, e in self.physical_table.items():
            lines.append(
                f"  physical[{i:#x}] = {int(e):#018x} host_id={e.host_id} "
                f"page={e.backing_page:#x} running={int(e.is_running)} valid={int(e.valid)}"
            )
        for i, le in self.logical_table.items():
            lines.append(f"  logical[{i}] = {int(le):#010x} -> {le.guest_physical_id}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<AvicState {self.config!r}>"


# What a bug replay (``apicsim/replays/accel.py``, BR-A* of the reference) may swap.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "AvicState.handle_not_running",  # BR-A6: bb218fbcfaaa re-emulated (reverted)
        "AvicState.handle_invalid_target",  # BR-A8 5aede752a839: emulate, not ignore
        "AvicState.emulate_failed_ipi",  # BR-A7 b51818afdc1d: clear a BUSY the CPU left set
        "AvicState.load_allowed",  # BR-A3 18869f26df1a: no load inside the blocking window
        "AvicState.hw_entry",  # BR-A18 d921665e01ba: never set IsRunning without IPIv
        "AvicState.id_too_big",  # BR-A21: inhibit, do not reject the vCPU
        "AvicState.kick_targets",  # BR-A23 (Xen RFC): kick every target
        "AvicState.remember_ldr",  # BR-A25: the LDR cache follows even a bad LDR
        "AvicState.in_guest_mode",  # BR-A5 31f251d4ddfa: doorbell iff in guest mode
        "AvicState.deliver_steps",  # BR-A4 66fa226c131f: apicv_active read after vcpu->mode
        "AvicState.logical_fast_ids",  # BR-A11 bbfc7aa62a4a: every logical bit on the fast path
        "AvicState.set_virtual_apic_mode",  # BR-A15 e0bead97e759: no put/load on a mode switch
        "AvicState.handle_apic_id_update",  # BR-A16 f5f9089f76dd: no entry moved on an ID change
        "AvicState.cr8_intercept",  # BR-A22 87d0f901a9bd: CR8 intercept follows activation
        "kick_dest",  # BR-A10 a879a88e05f3: decode by the sender's mode
        "x2apic_logical_bitmap",  # BR-A9 da3fb46d226a: bits 15:0
        "decode_index",  # BR-A19 ca11d9d35e95: a 12-bit index
    }
)
