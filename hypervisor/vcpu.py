"""``Vcpu``: one virtual CPU as the guest and the host scheduler see it.

Guest side (what code running on the vCPU executes): ``mmio_read``/``mmio_write`` at guest
physical addresses (the APIC page sits at the APIC base), ``rdmsr``/``wrmsr``, ``hypercall``
(VMCALL), ``halt`` (HLT).  Each access goes to the VM's accelerator first, which decides whether
it exits (every one does under trap-and-emulate) and then lets KVM's emulation run
(``emulate_*``).

Host side: a run state (not started, in guest, preempted, blocked) and the host pCPU it was
last loaded on (``last_pcpu``, a ``hypervisor.host.Pcpu``; ``pcpu`` is its id); KVM's
``mp_state`` (runnable, uninitialized, INIT received, halted);
``run()`` = one VM entry: pending INIT/SIPI are processed (``kvm_apic_accept_events``), NMIs and
interrupts are injected one at a time, each acknowledged (IRR -> ISR) and handed to the guest's
handler, which ends it with an EOI write.  Load, put, kick, block and wake-up live in
``hypervisor.sched`` (one place); the methods here (``enter``, ``preempt``, ``kick``, ``halt``)
delegate to it.

Not modelled: the instruction stream itself (the guest stub in ``guest/`` calls these methods
in the order Linux would execute the instructions), interrupt shadows, SMM entry.  RFLAGS.IF is
``guest_if`` (default True): with IF=0 no maskable interrupt is injected and none ends a halt
(``cli; hlt``: KVM's ``kvm_arch_interrupt_allowed``), NMIs and INIT still do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING

from hypervisor.exits import EXIT_SLOTS, ExitReason, exits_by_reason
from hypervisor.pv_ipi import emulate_hypercall
from hypervisor.trace import (
    KvmApicWrite,
    KvmExit,
    KvmHypercall,
    KvmInjNmi,
    KvmInjVirq,
    KvmMsr,
)
from lapic.apic import LocalApic
from lapic.faults import (
    ApicValueError,
    GuestFault,
    check_callable,
    check_int,
    check_size,
    gp,
)
from lapic.registers import APIC_BASE_BSP, APIC_BASE_MSR, TSC_DEADLINE_MSR
from lapic.writers import ICR_QWORD

if TYPE_CHECKING:
    from hypervisor.host.pcpu import Pcpu
    from hypervisor.vm import Vm

NMI_VECTOR = 2

Handler = Callable[["Vcpu", int], None]
NmiHandler = Callable[["Vcpu"], None]


class RunState(Enum):
    NOT_STARTED = "not started"
    IN_GUEST = "in guest"
    IN_HOST = "in host"
    """Loaded on its pCPU but outside guest mode (KVM ``vcpu->mode == OUTSIDE_GUEST_MODE``
    between ``vcpu_load`` and VMRUN, or while KVM handles an exit): ``Vcpu.leave_guest``."""
    PREEMPTED = "preempted"
    BLOCKED = "blocked"

    def __repr__(self) -> str:
        return f"RunState.{self.name}"


_IN_GUEST = RunState.IN_GUEST  # an enum member lookup costs ~100 ns; a global does not
_MSR_WRITE = ExitReason.MSR_WRITE
_MSR_WRITE_SLOT = EXIT_SLOTS[_MSR_WRITE]


class MpState(Enum):
    """KVM ``KVM_MP_STATE_*`` (the ones the in-kernel APIC uses)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3

    def __repr__(self) -> str:
        return f"MpState.{self.name}"


class Vcpu:
    def __init__(self, vm: Vm, index: int, apic: LocalApic, *, started: bool) -> None:
        self.vm = vm
        self.index = index
        self.vcpu_id = apic.vcpu_id
        self.apic = apic
        self.run_state = RunState.NOT_STARTED
        self.mp_state = MpState.RUNNABLE if started or apic.bsp else MpState.UNINITIALIZED
        self.last_pcpu: Pcpu | None = None
        """The host pCPU this vCPU was last loaded on (KVM ``vcpu->cpu``)."""
        self.sched = vm.sched
        self.host = vm.host
        self.interrupt_handler: Handler | None = None
        """Installed by the guest; called with each acknowledged interrupt vector."""
        self.nmi_handler: NmiHandler | None = None
        """Installed by the guest; called once per NMI injected (an NMI is not acknowledged
        through the APIC and takes no EOI, so it never reaches ``interrupt_handler``)."""
        self.handled: list[int] = []
        """Vectors handled by the default handler (no guest handler installed)."""
        self.sipi_entry: int | None = None
        """Physical start address from the last SIPI (vector << 12), if any."""
        self.exit_counts = [0] * len(EXIT_SLOTS)
        """This vCPU's exits by reason, at each reason's index in ``hypervisor.exits.EXIT_SLOTS``
        (KVM counts exits per vCPU, ``kvm_vcpu_stat``, and sums them for the VM: so does
        ``vm.stats``).  Read them as :attr:`exits_by_reason`, their sum as :attr:`exits`."""
        self.guest_if = True
        """RFLAGS.IF of the guest: False is ``cli`` (``halt()`` is then ``cli; hlt``)."""
        accel = vm.accel
        wrmsr_of = getattr(accel, "wrmsr_of", None)  # an accelerator without it: its wrmsr
        self._wrmsr = partial(accel.wrmsr, self) if wrmsr_of is None else wrmsr_of(self)
        """The guest's WRMSR on this vCPU as its accelerator handles it (``vm.accel`` is fixed
        for the VM's life), bound once: every x2APIC register write goes through it."""
        self.icr_routes = vm._routes.icr_of(apic)
        """The x2APIC ICR values this vCPU's guest sent whose route is kept
        (``hypervisor.routes``; read by the fastpath of :meth:`msr_exit`)."""

    # ===================================================================================
    # Guest-executed accesses
    # ===================================================================================
    def mmio_read(self, gpa: int, size: int = 4) -> int:
        check_int("gpa", gpa, 0, (1 << 52) - 1)
        check_size("size", size)
        self._executing()
        return self.vm.accel.mmio_read(self, gpa, size)

    def mmio_write(self, gpa: int, value: int, size: int = 4) -> None:
        check_int("gpa", gpa, 0, (1 << 52) - 1)
        check_int("value", value, 0, (1 << (8 * check_size("size", size))) - 1)
        self._executing()
        self.vm.accel.mmio_write(self, gpa, value, size)

    def rdmsr(self, msr: int) -> int:
        check_int("msr", msr, 0, 0xFFFFFFFF)
        self._executing()
        return self.vm.accel.rdmsr(self, msr)

    def wrmsr(self, msr: int, value: int) -> None:
        # Fast check (a negative int shifts to -1, so ">>" also catches it); anything else
        # (a bad argument, or an int subclass such as an IntEnum) gets the full check.
        if type(msr) is not int or type(value) is not int or msr >> 32 or value >> 64:
            msr = int(check_int("msr", msr, 0, 0xFFFFFFFF))
            value = int(check_int("value", value, 0, (1 << 64) - 1))
        if self.run_state is not _IN_GUEST:
            self._executing()
        self.host.running = self
        self._wrmsr(msr, value)

    def hypercall(
        self,
        nr: int,
        a0: int = 0,
        a1: int = 0,
        a2: int = 0,
        a3: int = 0,
        *,
        long_mode: bool = True,
        cpl: int = 0,
    ) -> int:
        """VMCALL with RAX=nr, RBX=a0, RCX=a1, RDX=a2, RSI=a3; returns RAX afterwards."""
        for name, v in (("nr", nr), ("a0", a0), ("a1", a1), ("a2", a2), ("a3", a3)):
            check_int(name, v, 0, (1 << 64) - 1)
        check_int("cpl", cpl, 0, 3)
        self._executing()
        vm = self.vm
        self.record_exit(ExitReason.VMCALL, nr, 0)
        vm.stats.hypercalls += 1
        if vm.tracer.on:
            vm.tracer.emit(KvmHypercall(self.vcpu_id, nr, a0, a1, a2, a3))
        return emulate_hypercall(
            vm, self.index, nr, a0, a1, a2, a3, op_64_bit=long_mode, cpl=cpl
        )

    def mov_to_cr8(self, value: int) -> None:
        """MOV to CR8 (``mov %rax, %cr8``), SDM Vol. 3A 10.8.6.1 / Vol. 2B MOV-CR: TPR[7:4] :=
        ``value[3:0]``, TPR[3:0] := 0; bits 63:4 are reserved: #GP(0) (``GuestFault`` 13).
        The accelerator decides whether it exits (``specs/hypervisor.md`` CR8-1..3)."""
        check_int("value", value, 0, (1 << 64) - 1)
        self._executing()
        self.vm.accel.mov_to_cr8(self, value)

    def mov_from_cr8(self) -> int:
        """MOV from CR8 (``mov %cr8, %rax``): TPR[7:4], never an exit (CR8-1)."""
        self._executing()
        return self.apic.get_cr8()

    def halt(self) -> bool:
        """HLT: exits; blocks unless an event is already pending.  True if it blocked."""
        self._executing()
        self.record_exit(ExitReason.HLT, 0, 0)
        return self.sched.halt(self)

    def _executing(self) -> None:
        """The vCPU is about to execute a guest instruction: (re-)enter the guest first.  As
        KVM does at every entry (KVMB-9), a pending INIT/SIPI is processed before anything
        executes; a vCPU left waiting for SIPI executes nothing."""
        state = self.run_state
        if state is not RunState.IN_GUEST:
            if state is RunState.BLOCKED:
                raise ApicValueError(f"vcpu {self.index} is halted: run() it before it executes")
            if self.apic.init_pending or self.apic.sipi_pending:
                self.accept_events()
            if self.mp_state in (MpState.UNINITIALIZED, MpState.INIT_RECEIVED):
                # No entry, so no KVM_REQ_EVENT either: a PPR KVM_SET_LAPIC left stale stays.
                raise ApicValueError(
                    f"vcpu {self.index} is {self.mp_state.name}: it executes nothing until "
                    "INIT/SIPI start it (or Vm(aps_started=True))"
                )
            if self.apic.hw_enabled:
                # Every entry processes KVM_REQ_EVENT, which recomputes PPR
                # (kvm_check_and_inject_events -> kvm_apic_has_interrupt -> apic_update_ppr).
                _ = self.apic.ppr
            self.enter()
        self.host.running = self  # Scheduler.executing, inlined: every guest access runs this

    # ===================================================================================
    # KVM's side of an exit
    # ===================================================================================
    def record_exit(self, reason: ExitReason, qualification: int, value: int) -> None:
        """KVM's side of one exit, before its handler runs: the CR8 sync of SVM without AVIC
        (KVMB-11), the counters, the exit log, the ``kvm_exit`` tracepoint."""
        vm = self.vm
        if vm.sync_cr8_at_exit:
            self.sync_cr8_to_lapic()
        self.exit_counts[EXIT_SLOTS[reason]] += 1
        log = vm.exit_log
        if log is not None:  # a plain tuple; Vm.exits reads it as an Exit
            log.append((self.index, reason, qualification, value))
        if vm.tracer.on:
            vm.tracer.emit(KvmExit(self.vcpu_id, reason, qualification))

    def sync_cr8_to_lapic(self) -> None:
        """KVMB-11, SVM without AVIC (``KvmOptions.tpr_low_bits_survive_exit`` False): right
        after an exit, before KVM handles it, ``svm.c`` ``sync_cr8_to_lapic`` copies the
        VMCB's 4-bit V_TPR into the APIC (``kvm_set_cr8``), so TPR bits 3:0 are lost, unless
        CR8 writes are intercepted: ``svm_update_cr8_intercept`` intercepts them while the
        APIC is enabled and its highest IRR vector's class is not above the TPR's.  Modelled
        at each exit from the state at that exit (the intercept is really set at the entry
        before it; nothing else runs between the two here)."""
        apic = self.apic
        tpr = apic.tpr
        if not tpr & 0xF:
            return
        if self.svm_cr8_write_intercepted():
            return
        apic.set_cr8(tpr >> 4)  # kvm_set_cr8(vcpu, V_TPR)

    def svm_cr8_write_intercepted(self) -> bool:
        """``svm_update_cr8_intercept`` (via ``x86.c`` ``update_cr8_intercept``): CR8 writes
        are intercepted while the APIC is enabled and its highest IRR vector's class is not
        above the TPR's (taken from the state now: the model has no entry in between)."""
        apic = self.apic
        irr = apic.irr.highest()
        return apic.enabled and irr >= 0 and apic.tpr >> 4 >= irr >> 4

    def vmx_tpr_threshold(self) -> int:
        """``vmx_update_cr8_intercept``: TPR_THRESHOLD = the highest IRR class when the TPR's
        class masks it, else 0 (a MOV to CR8 below it exits with TPR_BELOW_THRESHOLD)."""
        apic = self.apic
        irr = apic.irr.highest() if apic.enabled else -1
        if irr < 0 or apic.tpr >> 4 < irr >> 4:
            return 0
        return irr >> 4

    def _apic_offset(self, gpa: int) -> int:
        base = self.apic.base_address
        if not base <= gpa < base + 0x1000:
            raise ApicValueError(
                f"gpa={gpa:#x} is outside the APIC page at {base:#x}; no other device is modelled"
            )
        return gpa - base

    def emulate_mov_to_cr8(self, value: int) -> None:
        """The write's effect, by the CPU (no exit) or by KVM after one (``kvm_set_cr8``):
        #GP(0) if a bit of 63:4 is set, else TPR := ``(value & 0xF) << 4`` (CR8-1)."""
        if value >> 4:
            raise gp(f"MOV to CR8 of {value:#x}: bits 63:4 are reserved")
        self.apic.set_cr8(value)

    def emulate_mmio_read(self, gpa: int, size: int) -> int:
        return self.apic.mmio_read(self._apic_offset(gpa), size)

    def emulate_mmio_write(self, gpa: int, value: int, size: int) -> None:
        offset = self._apic_offset(gpa)
        if self.vm.tracer.on and self.vm.tracer.detail:
            self.vm.tracer.emit(KvmApicWrite(self.vcpu_id, offset, value))
        self.apic.mmio_write(offset, value, size)

    def emulate_rdmsr(self, msr: int) -> int:
        if _apic_msr(msr):
            return self.apic.rdmsr(msr)
        raise gp(f"RDMSR {msr:#x}: MSR not modelled (KVM injects #GP for unknown MSRs)")

    def msr_exit(self, msr: int, value: int) -> None:
        """A WRMSR that exits (EXIT_REASON_MSR_WRITE; trap-and-emulate, and every accelerator
        for the MSR writes it intercepts).  KVM counts and records the exit (what
        :meth:`record_exit` does, written out here: this runs once per x2APIC register
        write), then handles it.  An x2APIC ICR value whose route is kept
        (``hypervisor.routes``) takes KVM's exit fastpath,
        ``handle_fastpath_set_x2apic_icr_irqoff``: the register is stored and the targets
        accept through their acceptors, as the slow path would do it (``Vm._deliver`` on a
        kept route), with no decode and no lookup, while nothing a hit cannot see changed
        (the route cache switch, tracing, queued steps, the sender's send seam).  Anything
        else is :meth:`emulate_wrmsr`, after which an ICR value that sent its message has its
        route kept (``Vm.learn_icr``).  A kept value's route is looked up first: it also
        holds this exit's record for the exit log, made when the route was kept (the same
        tuple a fresh record would be, so a hit allocates nothing)."""
        vm = self.vm
        route = self.icr_routes.get(value) if msr == 0x830 else None
        if vm.sync_cr8_at_exit:
            self.sync_cr8_to_lapic()
        self.exit_counts[_MSR_WRITE_SLOT] += 1
        log = vm.exit_log
        if log is not None:  # a plain tuple; Vm.exits reads it as an Exit
            log.append((self.index, _MSR_WRITE, msr, value) if route is None else route[8])
        tracer = vm.tracer
        if tracer.on:
            tracer.emit(KvmExit(self.vcpu_id, _MSR_WRITE, msr))
        elif msr == 0x830 and vm.route_cache and not vm._steps.queued:
            stats = vm.stats
            if route is None:
                sent = stats.ipis
                self.emulate_wrmsr(msr, value)
                if stats.ipis != sent:  # the write sent its message (no #GP, no ESR refusal)
                    vm.learn_icr(self, value)
                return
            apic = self.apic
            if apic._op_send is None and apic.send_hook is route[1]:
                apic._q[ICR_QWORD] = route[2]  # LocalApic.store_x2apic_icr(value)
                stats.ipis += 1
                stats.fast_path += 1
                r = 0
                for acceptor in route[0]:
                    if acceptor():
                        r += 1
                stats.irqs_accepted += r
                return
        self.emulate_wrmsr(msr, value)

    def emulate_wrmsr(self, msr: int, value: int) -> None:
        """KVM's emulation of a WRMSR (``kvm_set_msr_common``: the x2APIC registers,
        IA32_APIC_BASE, TSC deadline; #GP for any other MSR)."""
        if 0x800 <= msr <= 0xBFF or msr in (APIC_BASE_MSR, TSC_DEADLINE_MSR):
            tracer = self.vm.tracer
            if tracer.on and tracer.detail:
                self._traced_wrmsr(msr, value)
                return
            self.apic.wrmsr(msr, value)
            return
        raise gp(f"WRMSR {msr:#x}: MSR not modelled (KVM injects #GP for unknown MSRs)")

    def _traced_wrmsr(self, msr: int, value: int) -> None:
        """The WRMSR with KVM's tracepoints in its order: ``kvm_apic`` as the register write
        starts (x2APIC mode only: ``kvm_lapic_reg_write``), ``kvm_msr`` when it is done, or
        marked as faulted when the MSR write injects #GP (``trace_kvm_msr_write_ex``)."""
        tracer = self.vm.tracer
        if 0x800 <= msr <= 0xBFF and self.apic.x2apic_mode:
            tracer.emit(KvmApicWrite(self.vcpu_id, (msr - 0x800) << 4, value))
        try:
            self.apic.wrmsr(msr, value)
        except GuestFault:
            tracer.emit(KvmMsr(self.vcpu_id, msr, value, True))
            raise
        tracer.emit(KvmMsr(self.vcpu_id, msr, value))

    # ===================================================================================
    # Scheduling and events
    # ===================================================================================
    @property
    def exits(self) -> int:
        """This vCPU's exits (KVM's per-vCPU ``exits`` stat): the sum of :attr:`exit_counts`."""
        return sum(self.exit_counts)

    @property
    def exits_by_reason(self) -> Counter[ExitReason]:
        """This vCPU's exits by reason: a new Counter of the non-zero counts at each read."""
        return exits_by_reason(self.exit_counts)

    @property
    def pcpu(self) -> int | None:
        """Id of the pCPU this vCPU was last loaded on (None before its first entry)."""
        p = self.last_pcpu
        return None if p is None else p.id

    def enter(self, pcpu: int | None = None) -> None:
        """Load on a pCPU and enter guest mode (KVM vcpu_load + VM entry); ``pcpu`` defaults
        to the last one, else the vCPU's index (``hypervisor.sched.Scheduler.load``)."""
        self.sched.load(self, pcpu)

    def preempt(self) -> None:
        """The host scheduled the vCPU out (KVM vcpu_put); it stays runnable."""
        self.sched.put(self)

    def leave_guest(self) -> None:
        """A VM exit KVM handles with the vCPU still loaded (``RunState.IN_HOST``: IsRunning
        stays as the load left it, ``vcpu->mode`` is OUTSIDE_GUEST_MODE); its next guest
        access, ``run()`` or ``enter()`` re-enters on the same pCPU (``Scheduler.leave_guest``)."""
        self.sched.leave_guest(self)

    @property
    def nmi_pending(self) -> int:
        """NMIs accepted and not yet injected (KVM ``nmi_queued`` + ``nmi_pending``)."""
        return self.apic.nmi_pending

    def has_events(self) -> bool:
        """KVM ``kvm_vcpu_has_events`` for the sources modelled here."""
        apic = self.apic
        if apic.init_pending or apic.nmi_pending or apic.smi_pending or apic.pv_unhalted:
            return True
        if apic.sipi_pending and self.mp_state is MpState.INIT_RECEIVED:
            return True
        return self.guest_if and apic.pending_interrupt() is not None

    def kick(self, apic: LocalApic | None = None) -> None:
        """KVM ``kvm_vcpu_kick`` after an event became pending for this vCPU (``apic`` is the
        notifying APIC when called as its ``notify_hook``; it is always this vCPU's).  A
        pending INIT forces a vCPU in guest mode out, even when it sent the INIT to itself
        (KVMB-9); see ``hypervisor.sched.Scheduler.kick``."""
        self.sched.kick(self)

    def accept_events(self) -> None:
        """KVM ``kvm_apic_accept_events``: INIT resets the vCPU, SIPI starts an AP."""
        apic = self.apic
        if apic.init_pending:
            apic.init()
            reset = getattr(self.vm.accel, "vcpu_reset", None)
            if reset is not None:  # the vendor's vcpu_reset(init_event=True)
                reset(self, True)
            self.mp_state = (
                MpState.RUNNABLE if apic.apic_base & APIC_BASE_BSP else MpState.INIT_RECEIVED
            )
        if apic.sipi_pending:
            apic.sipi_pending = False
            if self.mp_state is MpState.INIT_RECEIVED:
                self.sipi_entry = apic.sipi_vector << 12
                self.mp_state = MpState.RUNNABLE

    def run(
        self, handler: Handler | None = None, nmi_handler: NmiHandler | None = None
    ) -> list[int]:
        """One VM entry: handle everything pending; returns what was handled, in order: 2 for
        each NMI, then the interrupt vectors.  A fixed-mode vector 2 is an interrupt like any
        other (acknowledged, handled, EOI'd); only the return list cannot tell them apart.

        A blocked vCPU with nothing pending stays blocked (returns ``[]``).
        """
        check_callable("handler", handler, optional=True)
        check_callable("nmi_handler", nmi_handler, optional=True)
        if self.run_state is RunState.BLOCKED and not self.has_events():
            return []
        self.accept_events()
        if self.mp_state is not MpState.RUNNABLE and self.mp_state is not MpState.HALTED:
            return []
        self.mp_state = MpState.RUNNABLE
        self.enter()
        self.sched.executing(self)
        apic = self.apic
        apic.pv_unhalted = False
        handle = handler or self.interrupt_handler or Vcpu.default_handler
        handle_nmi = nmi_handler or self.nmi_handler or Vcpu.default_nmi_handler
        done: list[int] = []
        tracer = self.vm.tracer
        while apic.nmi_pending:
            apic.nmi_pending -= 1
            done.append(NMI_VECTOR)
            if tracer.on and tracer.detail:
                tracer.emit(KvmInjNmi(self.vcpu_id))
            handle_nmi(self)
        while self.guest_if:
            vector = apic.ack()
            if vector is None:
                break
            done.append(vector)
            if tracer.on and tracer.detail:
                tracer.emit(KvmInjVirq(self.vcpu_id, vector))
            handle(self, vector)
        return done

    def default_handler(self, vector: int) -> None:
        """What a Linux handler does at the end: record, then EOI."""
        self.handled.append(vector)
        self.guest_eoi()

    def default_nmi_handler(self) -> None:
        """Record the NMI (as vector 2); an NMI takes no EOI."""
        self.handled.append(NMI_VECTOR)

    def guest_eoi(self) -> None:
        """The guest's EOI write, through whichever interface its APIC mode uses."""
        if self.apic.x2apic_mode:
            self.wrmsr(0x80B, 0)
        else:
            self.mmio_write(self.apic.base_address + 0xB0, 0)

    def __repr__(self) -> str:
        apic = self.apic
        pending = ""
        if apic.init_pending:
            pending += " INIT-pending"
        if apic.sipi_pending:
            pending += f" SIPI-pending={apic.sipi_vector:#04x}"
        if apic.nmi_pending:
            pending += f" NMI-pending={apic.nmi_pending}"
        return (
            f"<Vcpu index={self.index} id={self.vcpu_id} {self.run_state.value} "
            f"mp={self.mp_state.name} pcpu={self.pcpu} exits={self.exits}{pending}>"
        )


def _apic_msr(msr: int) -> bool:
    return msr in (APIC_BASE_MSR, TSC_DEADLINE_MSR) or 0x800 <= msr <= 0xBFF
