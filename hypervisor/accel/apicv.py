"""Intel APICv as KVM drives it: virtual-interrupt delivery, posted interrupts and IPI
virtualization.  ``Vm(accelerator="apicv")``, ``Vm(accelerator="ipiv")`` or
``Vm(accelerator=Apicv(ipiv=True, ...))``.

Sources (``../shared/reference/avic_ipiv.md`` Parts H-L and O-P, rules in ``specs/apicv.md``):
KVM's ``arch/x86/kvm/vmx/vmx.c`` (``vmx_deliver_interrupt``, ``vmx_deliver_posted_interrupt``,
``kvm_vcpu_trigger_posted_interrupt``, ``vmx_sync_pir_to_irr``, ``handle_apic_write``,
``handle_apic_eoi_induced``, ``vmx_update_msr_bitmap_x2apic``, ``vmx_tertiary_exec_control``,
``vmx_vcpu_precreate``/``vmx_vcpu_create``, ``__vmx_vcpu_reset``,
``vmx_apicv_post_state_restore``), ``posted_intr.c`` (``vmx_vcpu_pi_load``,
``vmx_vcpu_pi_put``, ``pi_enable_wakeup_handler``, ``pi_wakeup_handler``,
``pi_has_pending_interrupt``, ``vmx_needs_pi_wakeup``) and ``lapic.c``
(``kvm_apic_write_nodecode``, ``kvm_x2apic_icr_write``).  The CPU's side (descriptor, table,
VID, IPIv) is ``hypervisor.hw.vmx``.

* :class:`Apicv` is the configuration (frozen data, shareable): ``ipiv``, ``host_x2apic``
  (the NDST encoding), the three host vectors, ``device_posting`` (an assigned device with
  VT-d posting: ``vmx_needs_pi_wakeup`` holds without IPIv), the documented addresses (vCPU
  index ``i``'s descriptor at ``pid_base + 64 * i``), and the UNVERIFIED hardware behaviours
  as parameters (``ipiv_past_last``, ``ipiv_invalid_entry``, ``ipiv_notify_always``,
  ``ipiv_min_vector``, ``icr_busy_on_apic_write``).
* :class:`ApicvState` is one VM's APICv (``vm.accel``): the descriptors, the PID-pointer table,
  the EOI-exit bitmaps, the notification log, KVM's sender (installed as each APIC's
  ``ApicOps.set_intr_ready``) and receiver (``pending_intr`` and every entry), the guest's
  accesses (virtualized, APIC-write exit 56, APIC-access exit 44, EOI-induced exit 45, MSR
  exits), load/put/block as KVM's PI hooks, and the inhibits (xAPIC ID change, APIC base
  change, aliased physical IDs: then every access traps as under ``emulated`` and KVM sets IRR
  itself; the PIR is still synced at every entry, BR-V11).

Multi-step protocols (a post: PIR, ON, mode check, notification; an IPIv post; arming the
wake-up vector) are atomic steps (``hypervisor.host.steps``), run at once when the host's
steps are eager and parked as threads when they are queued.  Under eager steps a notification
to a vCPU in guest mode is processed when it arrives (PI-J1).

Model choices (``specs/apicv.md`` APICV-CHOICE-*): RVI/SVI are read from VIRR/VISR (the
register page, ``hypervisor.hw.vmx``); every exit KVM handles ends with a VM entry, so the PIR is
synced right after (``vcpu_enter_guest``); a vCPU woken from its wake-up list is taken off
it at once by the scheduler, so its descriptor goes back to NV = POSTED_INTR_VECTOR with SN = 1
there (KVM does it at the next ``vmx_vcpu_pi_load``); KVM_GET_LAPIC syncs the PIR first
(``kvm_vcpu_ioctl_get_lapic``), KVM_SET_LAPIC clears it (``vmx_apicv_post_state_restore``).

Not modelled: nested posted interrupts (``nested_vector`` is only recorded), the IOMMU's
interrupt remapping (``device_post`` is the post itself), SENDUIPI, TPR thresholds other than
the one a MOV to CR8 checks while APICv is inhibited (CR8-2).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypervisor.apic_map import Inhibits
from hypervisor.config import AccelConfig
from hypervisor.exits import ExitReason
from hypervisor.host.steps import Protocol, Step, Steps
from hypervisor.hw.vmx import (
    CPU_BASED_ACTIVATE_TERTIARY_CONTROLS,
    PID_SIZE,
    PIN_BASED_POSTED_INTR,
    SECONDARY_EXEC_APIC_REGISTER_VIRT,
    SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY,
    SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES,
    SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE,
    TERTIARY_EXEC_IPI_VIRT,
    IpivMiss,
    Pid,
    PiDesc,
    PidTable,
    VmcsApicv,
    eoi_exit_words,
    eoi_virtualization,
    guest_interrupt_status,
    host_apic_id_of_ndst,
    ipiv_lookup,
    ipiv_qualifies,
    last_pid_pointer_index,
    ndst_of,
    pi_process,
    pid_table_entry,
    self_ipi_qualifies,
    virr_merge,
    virr_set,
)
from hypervisor.trace import AccelEvent, KvmApicvAcceptIrq
from hypervisor.vcpu import RunState
from lapic.apic import LocalApic
from lapic.faults import ApicTypeError, ApicValueError, check_bool, check_int
from lapic.icr import DELIVERY_STATUS, X2APIC_ICR_RESERVED
from lapic.ops import DefaultApicOps
from lapic.vectors import FrozenVectorSet

if TYPE_CHECKING:
    from hypervisor.host.pcpu import Pcpu
    from hypervisor.vcpu import Vcpu
    from hypervisor.vm import Vm

ICR = 0x300
ICR2 = 0x310
TPR = 0x80
EOI = 0xB0
SELF_IPI = 0x3F0
TMCCT = 0x390
MSR_ICR = 0x830
MSR_TPR = 0x808
MSR_EOI = 0x80B
MSR_SELF_IPI = 0x83F
MSR_TMCCT = 0x839
NOTIFICATION_LOG = 4096
"""How many notifications ``notification_log`` keeps (oldest dropped first)."""

READ_VIRTUALIZED = frozenset(
    {0x20, 0x30, 0x80, 0xB0, 0xD0, 0xE0, 0xF0, 0x280, 0x2F0, 0x300, 0x310, 0x380, 0x3E0}
    | set(range(0x100, 0x280, 0x10))
    | set(range(0x320, 0x380, 0x10))
)
"""VID-1 with APIC-register virtualization: the xAPIC offsets read from the virtual-APIC page
(ID, version, TPR, EOI, LDR, DFR, SVR, ISR, TMR, IRR, ESR, LVT CMCI, ICR, LVTs, TMICT, TDCR);
any other read (PPR, APR, RRD, TMCCT...) is an APIC-access exit (44)."""
WRITE_TRAPS = frozenset(
    {0x20, 0xD0, 0xE0, 0xF0, 0x280, 0x2F0, 0x380, 0x3E0} | set(range(0x320, 0x380, 0x10))
)
"""Writes the CPU stores in the page and then reports with an APIC-write exit (56, VID-7);
TPR, EOI, ICR2 and (some) ICR writes are virtualized; any other is an APIC-access exit."""
VMX_INHIBITS = (
    Inhibits.PHYSICAL_ID_ALIASED | Inhibits.APIC_ID_MODIFIED | Inhibits.APIC_BASE_MODIFIED
)
"""The inhibit reasons VMX honours (``VMX_REQUIRED_APICV_INHIBITS`` among the modelled ones;
the logical-aliasing and ID-too-big reasons are AVIC's)."""


@dataclass(frozen=True, slots=True)
class Apicv(AccelConfig):
    """APICv's settings (frozen, shareable between VMs); ``name`` follows ``ipiv``."""

    name: str = "apicv"
    ipiv: bool = False
    """KVM's ``enable_ipiv`` on a CPU with IPI virtualization (tertiary control bit 4)."""
    host_x2apic: bool = True
    """The host's APIC mode: NDST holds the full APIC ID (x2APIC) or ``ID << 8`` (xAPIC)."""
    posted_intr_vector: int = 0xF2
    wakeup_vector: int = 0xF1
    nested_vector: int = 0xF0
    """POSTED_INTR_NESTED_VECTOR: recorded only (nested VMX is not modelled)."""
    device_posting: bool = False
    """An assigned device posts through VT-d: ``vmx_needs_pi_wakeup`` holds without IPIv."""
    pid_base: int = 0x3_0000_0000
    """vCPU index ``i``'s descriptor is at ``pid_base + 64 * i``."""
    pid_table_pa: int = 0x2347_0000
    ipiv_past_last: IpivMiss = IpivMiss.APIC_WRITE_EXIT
    """UNVERIFIED: an IPIv write to an APIC ID past LAST_PID_POINTER_INDEX."""
    ipiv_invalid_entry: IpivMiss = IpivMiss.APIC_WRITE_EXIT
    """UNVERIFIED: an IPIv write whose PID-pointer entry has valid bit 0."""
    ipiv_notify_always: bool = False
    """UNVERIFIED: False, an IPIv post notifies iff ON was 0 and SN is 0 (the VT-d/SENDUIPI
    rule); True, it sets ON and notifies on every post."""
    ipiv_min_vector: int = 16
    """UNVERIFIED: the lowest vector an IPIv write posts (below it: an APIC-write exit)."""
    icr_busy_on_apic_write: bool = True
    """UNVERIFIED (implied by 629d3698f695): the CPU leaves ICR.BUSY set in the page when an
    x2APIC ICR write takes the APIC-write exit; KVM clears it."""

    def __post_init__(self) -> None:
        AccelConfig.__post_init__(self)
        for name in ("ipiv", "host_x2apic", "device_posting", "ipiv_notify_always",
                     "icr_busy_on_apic_write"):
            check_bool(name, getattr(self, name))
        for name, lo, hi in (
            ("posted_intr_vector", 32, 255), ("wakeup_vector", 32, 255),
            ("nested_vector", 32, 255), ("pid_base", 0, (1 << 52) - 1),
            ("pid_table_pa", 0, (1 << 52) - 1), ("ipiv_min_vector", 0, 256),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ApicTypeError(f"{name} must be an int, not {type(value).__name__}")
            check_int(name, value, lo, hi)
        for name in ("ipiv_past_last", "ipiv_invalid_entry"):
            if not isinstance(getattr(self, name), IpivMiss):
                raise ApicTypeError(f"{name} must be an IpivMiss")
        if len({self.posted_intr_vector, self.wakeup_vector, self.nested_vector}) != 3:
            raise ApicValueError("posted_intr_vector, wakeup_vector, nested_vector must differ")
        if self.pid_base & (PID_SIZE - 1):
            raise ApicValueError(f"pid_base={self.pid_base:#x} is not 64-byte aligned")
        if self.pid_table_pa & 0xFFF:
            raise ApicValueError(f"pid_table_pa={self.pid_table_pa:#x} is not page-aligned")
        if self.name not in ("apicv", "ipiv"):
            raise ApicValueError(f"name={self.name!r}: an Apicv config is 'apicv' or 'ipiv'")
        object.__setattr__(self, "name", "ipiv" if self.ipiv else "apicv")


def ipiv_config() -> Apicv:
    """The default config of ``Vm(accelerator="ipiv")``."""
    return Apicv(ipiv=True)


class ApicvOps(DefaultApicOps):
    """Each APIC's delivery vtable under APICv: an accepted interrupt goes through
    ``vmx_deliver_interrupt`` (post, or IRR + kick while inhibited); the highest pending vector
    is read after ``vmx_sync_pir_to_irr``; a map change may inhibit."""

    def __init__(self, state: ApicvState) -> None:
        self.state = state

    def set_intr_ready(self, apic: LocalApic, vector: int, level_triggered: bool) -> bool:
        bit = ((vector >> 5) << 7) | (vector & 31)
        apic._tmr_bits[bit] = 1 if level_triggered else 0
        return self.state.deliver_interrupt(apic, vector, level_triggered)

    def pending_intr(self, apic: LocalApic) -> int:
        self.state.sync_pir_of(apic)
        return int(apic._irr.highest())


class ApicvState:
    """One VM's APICv (``vm.accel``).  See the module docstring."""

    def __init__(self, name: str = "apicv") -> None:
        self.name = name
        self.vm: Vm | None = None
        self.config = Apicv(ipiv=name == "ipiv")
        self.pid_table = PidTable(1)
        """The PID-pointer table (``Sequence`` of raw u64 entries)."""
        self.notification_log: deque[tuple[int, int]] = deque(maxlen=NOTIFICATION_LOG)
        """``(host APIC ID, vector)`` of every notification IPI sent, in order."""
        self.physical_eois = 0
        """EOIs the CPU wrote to the physical APIC while processing a notification (PI-J1)."""
        self.warnings: list[str] = []
        """KVM WARNs hit (SN set while arming the wake-up vector...): must stay empty."""
        self._descs: list[PiDesc] = []
        self._vcpus: list[Vcpu] = []
        self._index: dict[LocalApic, int] = {}
        self._eoi_exit: list[int] = []
        self._pi_cpu: list[int | None] = []
        """The pCPU each descriptor was last loaded for (KVM ``vcpu->cpu`` at pi_load)."""
        self._blocks: list[int] = []
        """How many times each vCPU blocked: an arming thread acts only for its own block."""
        self._ops = ApicvOps(self)

    # ===================================================================================
    # Set-up (vmx_vcpu_precreate, vmx_vcpu_create, __vmx_vcpu_reset)
    # ===================================================================================
    def _vm(self) -> Vm:
        vm = self.vm
        if vm is None:
            raise ApicValueError("this APICv state is not attached to a VM")
        return vm

    def attach(self, vm: Vm) -> None:
        if self.vm is None:
            self.vm = vm
            cfg = vm.config.accelerator
            self.config = cfg if isinstance(cfg, Apicv) else Apicv(ipiv=self.name == "ipiv")
            # vmx_vcpu_precreate -> vmx_alloc_ipiv_pid_table: sized when the first vCPU is
            # created, from max_vcpu_ids as it is then (BR-V9).
            self.pid_table = PidTable(vm.max_vcpu_ids)
        for vcpu in vm.vcpus[len(self._vcpus):]:
            self._init_vcpu(vcpu)

    def _init_vcpu(self, vcpu: Vcpu) -> None:
        apic = vcpu.apic
        i = vcpu.index
        self._vcpus.append(vcpu)
        self._index[apic] = i
        self._descs.append(PiDesc())
        self._eoi_exit.append(0)
        self._pi_cpu.append(None)
        self._blocks.append(0)
        apic.bind_ops(self._ops)
        self.vcpu_reset(vcpu, False)
        if vcpu.vcpu_id < len(self.pid_table):  # WRITE_ONCE in vmx_vcpu_create
            self.pid_table[vcpu.vcpu_id] = pid_table_entry(self.pid_pa(i))

    def vcpu_reset(self, vcpu: Vcpu, init_event: bool) -> None:
        """``__vmx_vcpu_reset`` on RESET only (vCPU creation): NV = POSTED_INTR_VECTOR and SN
        set until the first load; an INIT leaves the descriptor alone (IPIV-6, BR-V6)."""
        if init_event:
            return
        desc = self._descs[vcpu.index]
        desc.nv = self.config.posted_intr_vector
        desc.set_sn()

    def pid_pa(self, i: int) -> int:
        """Physical address of vCPU index ``i``'s descriptor."""
        return self.config.pid_base + i * PID_SIZE

    def _index_of_pid(self, pa: int) -> int | None:
        i, off = divmod(pa - self.config.pid_base, PID_SIZE)
        return i if not off and 0 <= i < len(self._descs) else None

    # ===================================================================================
    # The public view
    # ===================================================================================
    def pid(self, i: int) -> Pid:
        """vCPU index ``i``'s descriptor now, as a value."""
        check_int("i", i, 0, len(self._descs) - 1)
        return self._descs[i].value()

    @property
    def last_pid_pointer_index(self) -> int:
        return last_pid_pointer_index(self._vm().max_vcpu_ids)

    def host_apic_id(self, pcpu: int) -> int:
        """The host APIC ID of pCPU ``pcpu`` (what NDST encodes, ``cpu_physical_id``)."""
        return self._vm().host.pcpu(pcpu).apic_id

    def guest_interrupt_status(self, i: int) -> tuple[int, int]:
        """``(RVI, SVI)`` of vCPU index ``i`` (GUEST_INTR_STATUS)."""
        return guest_interrupt_status(self._vm().lapic(i))

    def eoi_exit_bitmap(self, i: int) -> FrozenVectorSet:
        check_int("i", i, 0, len(self._eoi_exit) - 1)
        bits = self._eoi_exit[i]
        return FrozenVectorSet(v for v in range(256) if bits >> v & 1)

    def set_eoi_exit_bitmap(self, i: int, vectors: Iterable[int]) -> None:
        """``vmx_load_eoi_exitmap``: the vectors whose EOI exits (KVM derives them from the
        level-triggered IOAPIC routes, which are not modelled)."""
        check_int("i", i, 0, len(self._eoi_exit) - 1)
        if isinstance(vectors, (str, bytes, int)):
            raise ApicTypeError("vectors must be an iterable of vectors")
        bits = 0
        for v in vectors:
            bits |= 1 << check_int("vector", v, 0, 255)
        self._eoi_exit[i] = bits

    def vmcs(self, i: int) -> VmcsApicv:
        """vCPU index ``i``'s VMCS fields and controls (PI-H3, IPIV-1)."""
        vm = self._vm()
        apic = vm.lapic(i)
        active = self.active
        secondary = 0
        if active:
            secondary = SECONDARY_EXEC_APIC_REGISTER_VIRT | SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY
            secondary |= (
                SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE if apic.x2apic_mode
                else SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES
            )
        rvi, svi = guest_interrupt_status(apic)
        can_ipiv = self.config.ipiv
        return VmcsApicv(
            pin_based_controls=PIN_BASED_POSTED_INTR if active else 0,
            primary_controls=CPU_BASED_ACTIVATE_TERTIARY_CONTROLS if can_ipiv else 0,
            secondary_controls=secondary,
            tertiary_controls=TERTIARY_EXEC_IPI_VIRT if can_ipiv and active else 0,
            posted_intr_nv=self.config.posted_intr_vector,
            posted_intr_desc_addr=self.pid_pa(i),
            guest_intr_status=rvi | svi << 8,
            eoi_exit_bitmap=eoi_exit_words(self._eoi_exit[i]),
            pid_pointer_table=self.config.pid_table_pa if can_ipiv else 0,
            last_pid_pointer_index=self.last_pid_pointer_index if can_ipiv else 0,
        )

    def x2apic_msr_intercepted(self, msr: int, write: bool) -> bool:
        """``vmx_update_msr_bitmap_x2apic``: whether an x2APIC MSR access exits.  Active:
        reads pass through except TMCCT and, without IPIv, the ICR; writes exit except TPR,
        EOI, SELF IPI and, with IPIv, the ICR.  Inhibited: every access exits."""
        check_int("msr", msr, 0x800, 0x8FF)
        if not self.active:
            return True
        if msr == MSR_ICR:
            return not self.ipiv_active
        if not write:
            return msr == MSR_TMCCT
        return msr not in (MSR_TPR, MSR_EOI, MSR_SELF_IPI)

    # ===================================================================================
    # Activation
    # ===================================================================================
    @property
    def active(self) -> bool:
        """``kvm_apicv_activated``: none of VMX's inhibit reasons in force."""
        return not self._vm().inhibits & VMX_INHIBITS

    def vcpu_active(self, vcpu: Vcpu) -> bool:
        """``kvm_vcpu_apicv_active`` (every vCPU follows the VM's state at once)."""
        return self.active

    @property
    def ipiv_active(self) -> bool:
        """IPIV-1: the tertiary IPIv bit follows ``apicv_active``."""
        return self.config.ipiv and self.active

    def needs_pi_wakeup(self) -> bool:
        """``vmx_needs_pi_wakeup``: IPIv or VT-d posting is usable (SN on put and the wake-up
        vector exist only then; plain APICv leaves them to KVM's own sender)."""
        return self.config.ipiv or self.config.device_posting

    # ===================================================================================
    # KVM's sender: vmx_deliver_interrupt -> vmx_deliver_posted_interrupt (PI-J2)
    # ===================================================================================
    def deliver_interrupt(self, apic: LocalApic, vector: int, level: bool) -> bool:
        """``vmx_deliver_interrupt``: post when APICv is active, else IRR + KVM_REQ_EVENT +
        kick (returns True: the APIC raises the event, whose hook kicks)."""
        i = self._index[apic]
        vcpu = self._vcpus[i]
        if not self.vcpu_active(vcpu):
            apic._irr_bits[((vector >> 5) << 7) | (vector & 31)] = 1
            return True
        vm = self._vm()
        if vm.tracer.on:
            vm.tracer.emit(KvmApicvAcceptIrq(vcpu.vcpu_id, 0, int(level), vector))
        protocol = self.post_steps(vcpu, vector)
        steps = vm.host.steps
        if steps.queued:
            steps.start(f"pi.post.vcpu{i}", protocol)
        else:
            Steps.run_now(protocol)
        return False

    def post_steps(self, vcpu: Vcpu, vector: int) -> Protocol:
        """``vmx_deliver_posted_interrupt``: PIR test-and-set, ON test-and-set, then
        ``kvm_vcpu_trigger_posted_interrupt``."""
        i = vcpu.index
        desc = self._descs[i]
        pid = frozenset({f"pid[{i}]"})
        already = yield Step(f"pi.set_pir[{i}]", pid, pid, lambda: self._kvm_set_pir(i, vector))
        if already:
            return False
        on = yield Step(f"pi.set_on[{i}]", pid, pid, desc.test_and_set_on)
        if on:
            return True
        dest = yield Step(
            f"pi.trigger[{i}]", frozenset({f"run_state[{i}]", "running"}),
            frozenset({f"run_state[{i}]"}), lambda: self.trigger_posted_interrupt(vcpu),
        )
        if dest is not None:
            assert isinstance(dest, int)
            yield self._notification_step(dest, self.config.posted_intr_vector, vcpu.vcpu_id)
        return True

    def _kvm_set_pir(self, i: int, vector: int) -> bool:
        already = self._descs[i].test_and_set_pir(vector)
        if not already:
            self._vm().stats.posted += 1
        return already

    def trigger_posted_interrupt(self, vcpu: Vcpu) -> int | None:
        """``kvm_vcpu_trigger_posted_interrupt``: a vCPU in guest mode gets the notification
        IPI (returns its pCPU's host APIC ID) unless it is the running vCPU (an exit handler
        of its own: the PIR is synced before it re-enters); any other is woken, in case it
        blocks (fdba608f15e2: even when it is the running vCPU, BR-V1)."""
        if vcpu.run_state is RunState.IN_GUEST:
            p = vcpu.last_pcpu
            if self._vm().host.running is not vcpu and p is not None:
                return p.apic_id
            return None
        vcpu.sched.wake_up(vcpu)
        return None

    def _notification_step(self, host_apic_id: int, vector: int, vcpu_id: int) -> Step:
        return Step(
            f"pi.notification[{host_apic_id:#x}]", frozenset({"pcpu.loaded"}),
            frozenset({"irr", "run_state"}),
            lambda: self.send_notification(host_apic_id, vector, vcpu_id),
        )

    # ===================================================================================
    # Hardware posts: IPIv and VT-d (the CPU/IOMMU side of PI-J1's notification)
    # ===================================================================================
    def hw_post_steps(self, i: int, vector: int, source: str) -> Protocol:
        """A post by hardware (IPIv, VT-d): PIR bit, then ON and the notification to NDST with
        NV, by the ON/SN rule (or always, ``Apicv.ipiv_notify_always``, UNVERIFIED)."""
        pid = frozenset({f"pid[{i}]"})
        notify = yield Step(
            f"{source}.post[{i}]", pid, pid, lambda: self._hw_post(i, vector)
        )
        if notify is not None:
            assert isinstance(notify, tuple)
            host_id, nv = notify
            yield self._notification_step(host_id, nv, self._vcpus[i].vcpu_id)
        return notify is not None

    def _hw_post(self, i: int, vector: int) -> tuple[int, int] | None:
        desc = self._descs[i]
        if not desc.test_and_set_pir(vector):
            self._vm().stats.posted += 1
        if self.config.ipiv_notify_always:
            desc.set_on()
        elif desc.sn or desc.test_and_set_on():
            return None
        return host_apic_id_of_ndst(desc.ndst, self.config.host_x2apic), desc.nv

    def device_post(self, i: int, vector: int) -> None:
        """A VT-d posted interrupt for vCPU index ``i`` (the IOMMU writes the descriptor; it
        does so whether or not APICv is inhibited, BR-V11)."""
        check_int("i", i, 0, len(self._descs) - 1)
        check_int("vector", vector, 16, 255)
        protocol = self.hw_post_steps(i, vector, "vtd")
        steps = self._vm().host.steps
        if steps.queued:
            steps.start(f"vtd.post.vcpu{i}", protocol)
        else:
            Steps.run_now(protocol)

    def send_notification(self, host_apic_id: int, vector: int, vcpu_id: int = -1) -> None:
        """A notification IPI (``vector``) reaches the pCPU with host APIC ID
        ``host_apic_id``."""
        vm = self._vm()
        self.notification_log.append((host_apic_id, vector))
        vm.stats.notifications[vector] += 1
        vm.host.stats.doorbells += 1  # HostStats: doorbells and notifications rung
        if vm.tracer.on:
            vm.tracer.emit(AccelEvent(vcpu_id, "pi_notification", vector))
        p = vm.host.pcpu_by_apic_id(host_apic_id)
        if p is not None:
            self.host_interrupt(p, vector)

    def host_interrupt(self, pcpu: Pcpu, vector: int) -> None:
        """A host IPI with ``vector`` arrives at ``pcpu``.  A vCPU of this VM in guest mode there
        processes POSTED_INTR_VECTOR itself (PI-J1: ON := 0, VIRR |= PIR, physical EOI, no
        exit); any other vector is an external-interrupt exit (reason 1) and the host's handler
        (the wake-up vector runs ``pi_wakeup_handler``)."""
        v = pcpu.loaded
        vcpu = v if v is not None and v in self._vcpus else None
        if vcpu is not None and vcpu.run_state is RunState.IN_GUEST:
            if vector == self.config.posted_intr_vector and self.vcpu_active(vcpu):
                self.physical_eois += 1
                pi_process(vcpu.apic, self._descs[vcpu.index])
                return
            vcpu.record_exit(ExitReason.EXTERNAL_INTERRUPT, vector, 0)
        if vector == self.config.wakeup_vector:
            self.pi_wakeup_handler(pcpu)
        if vcpu is not None:
            self._reenter(vcpu)

    def pi_wakeup_handler(self, pcpu: Pcpu) -> None:
        """``pi_wakeup_handler``: wake each vCPU on this pCPU's wake-up list whose ON is set."""
        vm = self._vm()
        for v in list(pcpu.wakeup_list):
            if v in self._vcpus and self._descs[v.index].on:
                vcpu = self._vcpus[v.index]
                if vm.tracer.on:
                    vm.tracer.emit(AccelEvent(vcpu.vcpu_id, "pi_wakeup", 1))
                vcpu.sched.wake_up(vcpu)

    # ===================================================================================
    # KVM's receiver: vmx_sync_pir_to_irr (PI-J3) and the read-only check (PI-J4)
    # ===================================================================================
    def sync_pir_of(self, apic: LocalApic) -> None:
        i = self._index.get(apic)
        if i is not None:
            self.sync_pir_to_irr(self._vcpus[i])

    def sync_pir_to_irr(self, vcpu: Vcpu) -> int:
        """``vmx_sync_pir_to_irr``: if ON, clear it and move PIR into IRR; RVI follows (it is
        read from IRR).  Returns the highest IRR vector (-1: none).  Done even while APICv is
        inhibited (BR-V11: devices may still post)."""
        desc = self._descs[vcpu.index]
        if desc.on and self.pir_checked(vcpu):
            desc.clear_on()
            virr_merge(vcpu.apic, desc.take_pir())
        return int(vcpu.apic._irr.highest())

    def pir_checked(self, vcpu: Vcpu) -> bool:
        """Whether the PIR is synced for this vCPU: always ("KVM: x86: check PIR even for vCPUs
        with disabled APICv", BR-V11)."""
        return True

    def pi_has_pending_interrupt(self, i: int) -> bool:
        """``pi_has_pending_interrupt`` (PI-J4): ``ON || (SN && PIR != 0)``, read-only (it
        never syncs: 17e433b54393, BR-V5)."""
        check_int("i", i, 0, len(self._descs) - 1)
        desc = self._descs[i]
        return desc.on or (desc.sn and not desc.pir_empty())

    def apicv_post_state_restore(self, vcpu: Vcpu) -> None:
        """``vmx_apicv_post_state_restore`` after KVM_SET_LAPIC: ON cleared, PIR emptied (the
        restored IRR is the whole truth)."""
        desc = self._descs[vcpu.index]
        desc.clear_on()
        desc.take_pir()

    def _reenter(self, vcpu: Vcpu) -> None:
        """The VM entry that ends every exit KVM handles (``vcpu_enter_guest`` syncs PIR)."""
        if vcpu.run_state is RunState.IN_GUEST:
            self.sync_pir_to_irr(vcpu)

    # ===================================================================================
    # Load / put / block (posted_intr.c, IPIV-5/IPIV-6)
    # ===================================================================================
    def vcpu_load(self, vcpu: Vcpu, pcpu: Pcpu) -> None:
        """``vmx_vcpu_pi_load``, then the entry's sync (``vcpu_enter_guest``)."""
        self.pi_load(vcpu, pcpu)
        self.sync_pir_to_irr(vcpu)

    def pi_load(self, vcpu: Vcpu, pcpu: Pcpu) -> None:
        """``vmx_vcpu_pi_load``: same pCPU and not armed -> just clear SN; else NDST := this
        pCPU, SN := 0, NV := POSTED_INTR_VECTOR (the wake-up list was left by the scheduler);
        then ON := 1 if the PIR holds anything (posted while SN was set)."""
        i = vcpu.index
        desc = self._descs[i]
        cfg = self.config
        if desc.nv != cfg.wakeup_vector and self._pi_cpu[i] == pcpu.id:
            if not desc.test_and_clear_sn():
                return
        else:
            desc.ndst = ndst_of(pcpu.apic_id, cfg.host_x2apic)
            desc.test_and_clear_sn()
            desc.nv = cfg.posted_intr_vector
            self._pi_cpu[i] = pcpu.id
        if not desc.pir_empty():
            desc.set_on()

    def vcpu_put(self, vcpu: Vcpu) -> None:
        """``vmx_vcpu_pi_put`` for a vCPU scheduled out while runnable."""
        self.pi_put(vcpu, blocking=False)

    def pi_put(self, vcpu: Vcpu, *, blocking: bool) -> None:
        """``vmx_vcpu_pi_put`` (only when ``vmx_needs_pi_wakeup``): arm the wake-up vector for
        a vCPU blocking with interrupts enabled, else SN := 1 ("Suppress PI notifications
        whenever the vCPU is put", BR-V12)."""
        if not self.needs_pi_wakeup():
            return
        if blocking and self.wakeup_allowed(vcpu):
            self.enable_wakeup_handler(vcpu)
        elif self.sn_on_put(vcpu):
            self._descs[vcpu.index].set_sn()

    @staticmethod
    def wakeup_allowed(vcpu: Vcpu) -> bool:
        """``!vmx_interrupt_blocked``: only a vCPU halted with IF=1 is armed (1831fa4, BR-V2)."""
        return vcpu.guest_if

    @staticmethod
    def sn_on_put(vcpu: Vcpu) -> bool:
        """Every put that does not arm the wake-up sets SN (BR-V12)."""
        return True

    def vcpu_blocking(self, vcpu: Vcpu) -> None:
        """The schedule-out of a blocking vCPU.  The scheduler put it on its pCPU's wake-up
        list; VMX keeps it there only when ``pi_enable_wakeup_handler`` arms it."""
        p = vcpu.last_pcpu
        if p is not None and vcpu in p.wakeup_list:
            p.wakeup_list.remove(vcpu)
        self._blocks[vcpu.index] += 1
        if p is not None and self._descs[vcpu.index].sn:
            # Put between its HLT exit and the block (preempted): the task is scheduled back
            # in (the preempt notifier's vmx_vcpu_pi_load) before it goes on to block.
            self.pi_load(vcpu, p)
        self.pi_put(vcpu, blocking=True)

    def enable_wakeup_handler(self, vcpu: Vcpu) -> None:
        protocol = self.wakeup_steps(vcpu)
        steps = self._vm().host.steps
        if steps.queued:  # at the schedule-out after the halt's re-check: a thread of its own
            steps.spawn(f"pi.block.vcpu{vcpu.index}", protocol)
        else:
            Steps.run_now(protocol)

    def wakeup_steps(self, vcpu: Vcpu) -> Protocol:
        """``pi_enable_wakeup_handler``: join this pCPU's wake-up list, NV := wake-up vector,
        then a self-IPI with the wake-up vector if ON was already set (a post that still
        used POSTED_INTR_VECTOR reached a pCPU no longer in guest mode)."""
        i = vcpu.index
        p = vcpu.last_pcpu
        if p is None:
            return None
        desc = self._descs[i]
        pid = frozenset({f"pid[{i}]"})
        wl = frozenset({f"pcpu[{p.id}].wakeup_list"})
        block = self._blocks[i]

        def add() -> bool:
            if vcpu.run_state is not RunState.BLOCKED or self._blocks[i] != block:
                return False  # woken before its schedule-out: no put, nothing to arm
            p.wakeup_list.append(vcpu)
            return True

        def arm() -> bool:
            if vcpu not in p.wakeup_list or self._blocks[i] != block:
                return False  # woken meanwhile (the scheduler took it off the list)
            if desc.sn:
                self.warnings.append(f"WARN: SN set while arming the wake-up vector of {i}")
            desc.nv = self.config.wakeup_vector
            return True

        added = yield Step(f"pi.wakeup_list_add[{i}]", wl | {f"run_state[{i}]"}, wl, add)
        if not added:
            return None
        armed = yield Step(f"pi.nv_wakeup[{i}]", pid | wl, pid, arm)
        if not armed:
            return None
        on = yield Step(f"pi.check_on[{i}]", pid, frozenset(), lambda: self.on_while_arming(i))
        if on:
            yield self._notification_step(p.apic_id, self.config.wakeup_vector, vcpu.vcpu_id)
        return None

    def on_while_arming(self, i: int) -> bool:
        """``pi_enable_wakeup_handler``'s last test: ON already set (IPIV-5 test 3)."""
        return self._descs[i].on

    def vcpu_unblocking(self, vcpu: Vcpu) -> None:
        """Woken or entered: the scheduler took it off its wake-up list and off its pCPU, so
        the descriptor goes back to NV = POSTED_INTR_VECTOR, with SN set (when KVM needs the PI
        wake-up) until it is loaded (APICV-CHOICE-2); this holds also when it was woken before
        its arming ran."""
        desc = self._descs[vcpu.index]
        if desc.nv == self.config.wakeup_vector:
            desc.nv = self.config.posted_intr_vector
        if self.needs_pi_wakeup():
            desc.set_sn()

    # ===================================================================================
    # Guest accesses
    # ===================================================================================
    def _xapic_active(self, vcpu: Vcpu, gpa: int) -> bool:
        apic = vcpu.apic
        base = apic.base_address
        return (
            apic.hw_enabled and not apic.x2apic_mode and base <= gpa < base + 0x1000
            and self.vcpu_active(vcpu)
        )

    def _exit(self, vcpu: Vcpu, reason: ExitReason, qual: int, value: int) -> None:
        vcpu.record_exit(reason, qual, value)

    def mmio_read(self, vcpu: Vcpu, gpa: int, size: int) -> int:
        if not self._xapic_active(vcpu, gpa):
            self._exit(vcpu, ExitReason.EPT_MISCONFIG, gpa, 0)
            value = vcpu.emulate_mmio_read(gpa, size)
            self._reenter(vcpu)
            return value
        offset = gpa - vcpu.apic.base_address
        if size == 4 and not offset & 0xF and offset in READ_VIRTUALIZED:
            return vcpu.emulate_mmio_read(gpa, size)
        self._exit(vcpu, ExitReason.APIC_ACCESS, offset, 0)
        value = vcpu.emulate_mmio_read(gpa, size)
        self._reenter(vcpu)
        return value

    def mmio_write(self, vcpu: Vcpu, gpa: int, value: int, size: int) -> None:
        if not self._xapic_active(vcpu, gpa):
            self._exit(vcpu, ExitReason.EPT_MISCONFIG, gpa, value)
            vcpu.emulate_mmio_write(gpa, value, size)
            self._reenter(vcpu)
            return
        offset = gpa - vcpu.apic.base_address
        if size == 4 and not offset & 0xF:
            if offset in (TPR, ICR2):
                vcpu.emulate_mmio_write(gpa, value, size)
                return
            if offset == EOI:
                self.virtual_eoi(vcpu)
                return
            if offset == ICR:
                self.icr_write(vcpu, value, vcpu.apic.register("ICR2"), False)
                return
            if offset in WRITE_TRAPS:
                self._exit(vcpu, ExitReason.APIC_WRITE, offset, value)
                vcpu.emulate_mmio_write(gpa, value, size)
                self._reenter(vcpu)
                return
        self._exit(vcpu, ExitReason.APIC_ACCESS, offset | 1 << 12, value)
        vcpu.emulate_mmio_write(gpa, value, size)
        self._reenter(vcpu)

    def _x2apic_active(self, vcpu: Vcpu, msr: int) -> bool:
        return 0x800 <= msr <= 0x8FF and vcpu.apic.x2apic_mode and self.vcpu_active(vcpu)

    def rdmsr(self, vcpu: Vcpu, msr: int) -> int:
        if self._x2apic_active(vcpu, msr) and not self.x2apic_msr_intercepted(msr, False):
            return vcpu.emulate_rdmsr(msr)
        self._exit(vcpu, ExitReason.MSR_READ, msr, 0)
        value = vcpu.emulate_rdmsr(msr)
        self._reenter(vcpu)
        return value

    def wrmsr(self, vcpu: Vcpu, msr: int, value: int) -> None:
        if self._x2apic_active(vcpu, msr) and not self.x2apic_msr_intercepted(msr, True):
            if msr == MSR_TPR:
                vcpu.emulate_wrmsr(msr, value)
                return
            if msr == MSR_EOI and not value:
                self.virtual_eoi(vcpu)
                return
            if msr == MSR_SELF_IPI and not value >> 8:
                if value >= 16:
                    virr_set(vcpu.apic, value)  # VID-6: self-IPI virtualization
                    return
                self._exit(vcpu, ExitReason.APIC_WRITE, SELF_IPI, value)
                vcpu.emulate_wrmsr(msr, value)
                self._reenter(vcpu)
                return
            if msr == MSR_ICR and not value & X2APIC_ICR_RESERVED:
                self.icr_write(vcpu, value & 0xFFFFFFFF, value >> 32, True)
                return
        vcpu.msr_exit(msr, value)
        self._reenter(vcpu)

    def virtual_eoi(self, vcpu: Vcpu) -> None:
        """VID-5: EOI virtualization; an EOI-induced exit (45, qualification = the vector) when
        the EOI-exit bitmap has it, handled by ``kvm_apic_set_eoi_accelerated``."""
        apic = vcpu.apic
        v = eoi_virtualization(apic)
        if v >= 0 and self._eoi_exit[vcpu.index] >> v & 1:
            self._exit(vcpu, ExitReason.EOI_INDUCED, v, 0)
            level = v in apic.tmr
            apic.ops.eoi_reported(apic, v, level, level and apic._eoi_broadcast_suppressed())
            self._reenter(vcpu)

    def mov_to_cr8(self, vcpu: Vcpu, value: int) -> None:
        """CR8-2 under APICv: with virtual-interrupt delivery the CPU virtualizes the TPR and
        evaluates pending interrupts itself, and KVM leaves TPR_THRESHOLD at 0
        (``kvm_x86_ops.update_cr8_intercept`` is skipped while ``apicv_active``): no exit.
        Inhibited, VMX's TPR shadow with KVM's threshold: a write below it traps after it."""
        if self.vcpu_active(vcpu):
            vcpu.emulate_mov_to_cr8(value)  # a reserved bit: the CPU's #GP, no exit
            return
        threshold = vcpu.vmx_tpr_threshold()
        vcpu.emulate_mov_to_cr8(value)
        if value < threshold:
            self._exit(vcpu, ExitReason.TPR_BELOW_THRESHOLD, 0, 0)
            self._reenter(vcpu)

    def notifier(self, vcpu: Vcpu) -> Callable[[LocalApic], None]:
        return vcpu.sched.notifier(vcpu)

    # -- the ICR (VID-6, IPIV-3, IPIV-4, VID-7) --------------------------------------------
    def icr_write(self, vcpu: Vcpu, icrl: int, icrh: int, x2apic: bool) -> None:
        """A guest ICR write the CPU sees (xAPIC 0x300, or x2APIC 0x830 with IPIv): a
        virtualized self-IPI, an IPIv post, or an APIC-write exit."""
        apic = vcpu.apic
        if self_ipi_qualifies(icrl):
            _store_icr(apic, icrl, icrh, x2apic)
            virr_set(apic, icrl & 0xFF)
            return
        dest = icrh if x2apic else icrh >> 24
        if self.ipiv_active and ipiv_qualifies(icrl, dest, x2apic, self.config.ipiv_min_vector):
            _store_icr(apic, icrl, icrh, x2apic)
            protocol = self.ipiv_steps(vcpu, icrl, icrh, x2apic)
            steps = self._vm().host.steps
            if steps.queued:
                steps.start(f"ipiv.vcpu{vcpu.index}", protocol)
            else:
                Steps.run_now(protocol)
            return
        self.apic_write_icr_exit(vcpu, icrl, icrh, x2apic)

    def ipiv_steps(self, vcpu: Vcpu, icrl: int, icrh: int, x2apic: bool) -> Protocol:
        """IPIV-2/3: the CPU looks the destination up in the PID-pointer table and posts; a
        miss (UNVERIFIED) exits or drops as ``Apicv`` says."""
        i = vcpu.index
        dest = icrh if x2apic else icrh >> 24
        last = self.last_pid_pointer_index
        pa = yield Step(
            f"ipiv.lookup[{i}]", frozenset({"pid_table"}), frozenset(),
            lambda: ipiv_lookup(self.pid_table, last, dest),
        )
        t = None if pa is None else self._index_of_pid(int(pa))  # type: ignore[call-overload]
        if t is None:
            miss = self.config.ipiv_past_last if dest > last else self.config.ipiv_invalid_entry
            if miss is IpivMiss.APIC_WRITE_EXIT:
                yield Step(
                    f"ipiv.apic_write[{i}]", frozenset(), frozenset({"irr", "run_state"}),
                    lambda: self.apic_write_icr_exit(vcpu, icrl, icrh, x2apic),
                )
            return False
        return (yield from self.hw_post_steps(t, icrl & 0xFF, "ipiv"))

    def apic_write_icr_exit(self, vcpu: Vcpu, icrl: int, icrh: int, x2apic: bool) -> None:
        """The trap-like APIC-write exit for the ICR (qualification 0x300) and KVM's
        ``kvm_apic_write_nodecode``: xAPIC re-runs the register write of ICR low; x2APIC (an
        exit that exists only with IPIv, 5413bcba7ed5) sends the 64-bit ICR at 0x300 with BUSY
        cleared (629d3698f695)."""
        apic = vcpu.apic
        value = icrh << 32 | icrl
        self._exit(vcpu, ExitReason.APIC_WRITE, ICR, value)
        if x2apic:
            if self.config.icr_busy_on_apic_write:
                _store_icr(apic, icrl | DELIVERY_STATUS, icrh, True)
            self.x2apic_icr_write_nodecode(vcpu)
        else:
            vcpu.emulate_mmio_write(apic.base_address + ICR, icrl, 4)
        self._reenter(vcpu)

    def x2apic_icr_write_nodecode(self, vcpu: Vcpu) -> None:
        """``kvm_x2apic_icr_write(apic, kvm_x2apic_icr_read(apic))``: the u64 at 0x300 with
        BUSY cleared, sent and stored back (BR-V7)."""
        apic = vcpu.apic
        vcpu.emulate_wrmsr(MSR_ICR, apic.icr & ~DELIVERY_STATUS)

    # ===================================================================================
    # Snapshot, dump
    # ===================================================================================
    def vcpu_state(self, vcpu: Vcpu) -> str:
        """The accel column of ``vm.table()``: the vCPU's descriptor."""
        d = self._descs[vcpu.index]
        return (
            f"pid: on={int(d.on)} sn={int(d.sn)} nv={d.nv:#04x} ndst={d.ndst:#x} "
            f"pir={bin(d.pir).count('1')}"
        )

    def state(self) -> Hashable:
        return (
            tuple((d.pir, d.control) for d in self._descs),
            self.pid_table.state(),
            tuple(self._eoi_exit),
            tuple(self._pi_cpu),
            tuple(self._blocks),
            tuple(self.notification_log),
            self.physical_eois,
            tuple(self.warnings),
        )

    def set_state(self, state: Hashable) -> None:
        if not isinstance(state, tuple) or len(state) != 8:
            raise ApicValueError(f"state={state!r} is not an APICv state")
        descs, table, eoi, cpus, blocks, log, eois, warnings = state
        if len(descs) != len(self._descs):
            raise ApicValueError("state has another number of vCPUs")
        for d, (pir, control) in zip(self._descs, descs, strict=True):
            d.pir, d.control = pir, control
        self.pid_table.set_state(table)
        self._eoi_exit = list(eoi)
        self._pi_cpu = list(cpus)
        self._blocks = list(blocks)
        self.notification_log = deque(log, maxlen=NOTIFICATION_LOG)
        self.physical_eois = int(eois)
        self.warnings = list(warnings)

    def dump(self) -> str:
        lines = [
            f"{self.name}: {self.config!r} active={self.active} "
            f"last_pid_pointer_index={self.last_pid_pointer_index:#x} "
            f"notifications={len(self.notification_log)}"
        ]
        for i, d in enumerate(self._descs):
            lines.append(f"  pid[{i}] @{self.pid_pa(i):#x} = {d.value()!r}")
        if self.config.ipiv:
            for i, raw in self.pid_table.items():
                lines.append(f"  pid_table[{i:#x}] = {raw:#018x}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<ApicvState {self.config!r}>"


def _store_icr(apic: LocalApic, icrl: int, icrh: int, x2apic: bool) -> None:
    """The CPU stores a guest ICR write in the virtual-APIC page: VICR_LO, and with x2APIC
    the destination in the high dword at 0x304 (VMX's 64-bit ICR, ``icr_split`` False)."""
    apic._w[ICR >> 2] = icrl
    if x2apic:
        apic._w[(ICR + 4) >> 2] = icrh


def make_apicv() -> ApicvState:
    return ApicvState("apicv")


def make_ipiv() -> ApicvState:
    return ApicvState("ipiv")


# What a bug replay (``apicsim/replays/``, BR-V* of the reference) may swap.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "ApicvState.trigger_posted_interrupt",  # BR-V1 fdba608f15e2: wake even the running vCPU
        "ApicvState.wakeup_allowed",  # BR-V2 1831fa4: no wake-up arming with IF=0
        "ApicvState.on_while_arming",  # BR-V3/IPIV-5 test 3: self-IPI if ON was set
        "ApicvState.pi_has_pending_interrupt",  # BR-V5 17e433b54393: read-only
        "ApicvState.vcpu_reset",  # BR-V6: INIT keeps the descriptor (no memset)
        "ApicvState.x2apic_icr_write_nodecode",  # BR-V7 629d3698f695: BUSY cleared
        "ApicvState.pir_checked",  # BR-V11: PIR synced even while inhibited
        "ApicvState.sn_on_put",  # BR-V12: SN on every put that does not arm
    }
)
