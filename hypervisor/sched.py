"""Scheduling in one place: load, put, kick, block (halt) and wake of a VM's vCPUs.

Implements KVM's ``vcpu_load``/``vcpu_put`` (a vCPU is loaded on a host :class:`Pcpu`, one
vCPU per pCPU), ``kvm_vcpu_kick`` (``kvm_vcpu_wake_up`` first, then a reschedule IPI if the
target is in guest mode on another pCPU), ``kvm_vcpu_halt``/``kvm_vcpu_block`` (a quick check,
then mark the vCPU blocked, then re-check its pending events before sleeping) and
``kvm_vcpu_wake_up``.  The accelerator's hooks ``vcpu_load(vcpu, pcpu)``, ``vcpu_put``,
``vcpu_blocking`` and ``vcpu_unblocking`` are called from here only, with the ``Pcpu`` object.

A blocked vCPU leaves its pCPU (``loaded`` is cleared; KVM's schedule-out ``vcpu_put`` is
folded into ``vcpu_blocking``) and waits on that pCPU's wake-up list
(``wakeup_vcpus_on_cpu``) until it is woken or entered.

The kick, the halt and a message's delivery are multi-step protocols (``hypervisor.host.steps``):
eager by default (the step functions are called directly, nothing is allocated per step) or
queued when ``host.steps.queued`` is set, so a test can interleave a sender with a halting
target (``specs/steps.md``, STEP-1..5).  ``halt_recheck = False`` is the deliberately broken
variant (check, then block, no re-check: the lost wake-up), kept replayable for the tests.

Not modelled: halt polling, the scheduler's choice of pCPU (the caller chooses), preemption
notifiers other than load/put, RFLAGS.IF.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from hypervisor.host.machine import Host
from hypervisor.host.steps import Protocol, Step
from hypervisor.vcpu import MpState, RunState
from lapic.apic import LocalApic
from lapic.faults import ApicValueError
from lapic.icr import Interrupt

if TYPE_CHECKING:
    from hypervisor.vcpu import Vcpu
    from hypervisor.vm import Vm

_FIXED_MODES = (0, 1)
_IN_GUEST = RunState.IN_GUEST  # notify runs once per interrupt: globals, not enum lookups
_BLOCKED = RunState.BLOCKED


def _names(*names: str) -> frozenset[str]:
    return frozenset(names)


class Scheduler:
    """The scheduling and wake-up logic of one VM on its host."""

    def __init__(self, vm: Vm, host: Host) -> None:
        self.vm = vm
        self.host = host
        self.steps = host.steps
        self.halt_recheck = True
        """KVM's order (block, then re-check).  False: the broken check-then-block variant."""
        self._kick_of: dict[LocalApic, Callable[[LocalApic], None]] = {}

    def attach(self, vcpu: Vcpu) -> None:
        """Register a new vCPU (so :meth:`notify` finds it from its APIC)."""
        self.notifier(vcpu)

    # ===================================================================================
    # Load / put (KVM vcpu_load / vcpu_put)
    # ===================================================================================
    def default_pcpu(self, vcpu: Vcpu) -> int:
        """Where a vCPU first runs: its last pCPU, else its index (modulo the host size)."""
        last = vcpu.last_pcpu
        if last is not None:
            return last.id
        return vcpu.index % self.host.size

    def load(self, vcpu: Vcpu, pcpu: int | None = None) -> None:
        """Load ``vcpu`` on pCPU ``pcpu`` and enter guest mode.  A vCPU loaded there before is
        put first (one vCPU per pCPU); a blocked vCPU is unblocked first."""
        p = self.host.pcpu(self.default_pcpu(vcpu) if pcpu is None else pcpu)
        if vcpu.run_state is RunState.IN_HOST and p is vcpu.last_pcpu:
            vcpu.run_state = RunState.IN_GUEST  # VMRUN again: still loaded, no vcpu_load
            return
        accel = self.vm.accel
        if vcpu.run_state is RunState.BLOCKED:
            self._leave_wakeup_list(vcpu)
            accel.vcpu_unblocking(vcpu)
        other = p.loaded
        if other is not None and other is not vcpu:
            other.preempt()  # through its own VM's scheduler
        old = vcpu.last_pcpu
        if old is not None and old is not p and old.loaded is vcpu:
            old.loaded = None
        vcpu.last_pcpu = p
        vcpu.run_state = RunState.IN_GUEST
        p.loaded = vcpu
        accel.vcpu_load(vcpu, p)

    def leave_guest(self, vcpu: Vcpu) -> None:
        """A VM exit handled with ``vcpu`` still loaded: IN_GUEST -> IN_HOST (KVM's
        ``vcpu->mode`` = OUTSIDE_GUEST_MODE; no put, so the accelerator's state stays loaded).
        A kick then sends no host IPI (``kvm_vcpu_kick`` IPIs only IN_GUEST_MODE)."""
        if vcpu.run_state is not RunState.IN_GUEST:
            raise ApicValueError(
                f"vcpu {vcpu.index} is {vcpu.run_state.value}: only a vCPU in guest mode exits"
            )
        vcpu.run_state = RunState.IN_HOST

    def put(self, vcpu: Vcpu) -> None:
        """The host scheduled ``vcpu`` out (KVM vcpu_put); it stays runnable."""
        if vcpu.run_state is RunState.IN_GUEST or vcpu.run_state is RunState.IN_HOST:
            vcpu.run_state = RunState.PREEMPTED
            p = vcpu.last_pcpu
            if p is not None and p.loaded is vcpu:
                p.loaded = None
            self.vm.accel.vcpu_put(vcpu)

    def executing(self, vcpu: Vcpu) -> None:
        """``vcpu``'s guest code executes now, on its pCPU (``host.running``)."""
        self.host.running = vcpu

    # ===================================================================================
    # Kick (kvm_vcpu_kick = kvm_vcpu_wake_up, then an IPI to a vCPU in guest mode)
    # ===================================================================================
    def kick(self, vcpu: Vcpu) -> None:
        """Something became pending for ``vcpu``: wake it, or force it out of guest mode."""
        self.notify(vcpu.apic)

    def notify(self, apic: LocalApic) -> None:
        """:meth:`kick` by APIC (what :meth:`notifier` made for its vCPU)."""
        self._kick_of[apic](apic)

    def notifier(self, vcpu: Vcpu) -> Callable[[LocalApic], None]:
        """``kvm_vcpu_kick`` for ``vcpu``, as the ``notify_hook`` of its APIC (one function
        per vCPU, made on first use)."""
        kick = self._kick_of.get(vcpu.apic)
        if kick is None:
            kick = self._kick_of[vcpu.apic] = Kick(self, vcpu).kick
        return kick

    def kick_steps(self, vcpu: Vcpu) -> Protocol:
        i = vcpu.index
        woken = yield Step(
            f"kick.wake_up[{i}]",
            _names(f"run_state[{i}]", f"irr[{i}]", f"events[{i}]"),
            _names(f"run_state[{i}]"),
            lambda: self.wake_up(vcpu),
        )
        if not woken:
            yield Step(
                f"kick.ipi[{i}]",
                _names(f"run_state[{i}]", f"events[{i}]", "running"),
                _names(f"run_state[{i}]"),
                lambda: self.kick_ipi(vcpu),
            )
        return woken

    def wake_up(self, vcpu: Vcpu) -> bool:
        """KVM ``kvm_vcpu_wake_up``: a blocked vCPU with an event pending becomes runnable."""
        if vcpu.run_state is RunState.BLOCKED and vcpu.has_events():
            self.wake(vcpu)
            return True
        return False

    def kick_ipi(self, vcpu: Vcpu) -> None:
        """The second half of ``kvm_vcpu_kick``: a target in guest mode on another pCPU gets a
        reschedule IPI; a pending INIT forces it out (KVM_REQ_EVENT, KVMB-9), even from
        itself."""
        if vcpu.run_state is not RunState.IN_GUEST:
            return
        if vcpu.apic.init_pending:
            self.put(vcpu)
        if self.host.running is not vcpu:
            self.vm.stats.kicks += 1
            self.host.stats.kicks += 1  # and its host IPI (HostStats.host_ipis)

    def wake(self, vcpu: Vcpu) -> None:
        """A blocked vCPU becomes runnable (preempted, ready for its next entry)."""
        self.vm.stats.wakeups += 1
        self.host.stats.wakeups += 1
        self._unblock(vcpu)

    def _unblock(self, vcpu: Vcpu) -> None:
        vcpu.mp_state = MpState.RUNNABLE
        vcpu.run_state = RunState.PREEMPTED
        self._leave_wakeup_list(vcpu)
        self.vm.accel.vcpu_unblocking(vcpu)

    def _leave_wakeup_list(self, vcpu: Vcpu) -> None:
        p = vcpu.last_pcpu
        if p is not None and vcpu in p.wakeup_list:
            p.wakeup_list.remove(vcpu)

    # ===================================================================================
    # Halt / block (kvm_vcpu_halt -> kvm_vcpu_block)
    # ===================================================================================
    def halt(self, vcpu: Vcpu) -> bool:
        """HLT after its exit: block unless an event is pending.  True if it blocked.  Queued:
        the protocol waits in ``host.steps`` and this returns False."""
        if self.steps.queued:
            self.steps.start(f"halt.vcpu{vcpu.index}", self.halt_steps(vcpu))
            return False
        if vcpu.has_events():
            return False
        self.block(vcpu)
        if self.halt_recheck and vcpu.has_events():
            self._unblock(vcpu)
            return False
        return True

    def halt_steps(self, vcpu: Vcpu) -> Protocol:
        i = vcpu.index
        events = _names(f"irr[{i}]", f"events[{i}]")
        pending = yield Step(f"halt.check[{i}]", events, frozenset(), vcpu.has_events)
        if pending:
            return False
        yield Step(
            f"halt.block[{i}]",
            frozenset(),
            _names(f"run_state[{i}]", f"mp_state[{i}]"),
            lambda: self.block(vcpu),
        )
        if not self.halt_recheck:
            return True
        return not (
            yield Step(
                f"halt.recheck[{i}]",
                events | {f"run_state[{i}]"},
                _names(f"run_state[{i}]", f"mp_state[{i}]"),
                lambda: self._recheck(vcpu),
            )
        )

    def _recheck(self, vcpu: Vcpu) -> bool:
        """``kvm_vcpu_check_block`` after marking the vCPU blocked: an event that arrived in
        between un-blocks it (unless a kicker already woke it)."""
        if vcpu.run_state is RunState.BLOCKED and vcpu.has_events():
            self._unblock(vcpu)
            return True
        return False

    def block(self, vcpu: Vcpu) -> None:
        """Mark ``vcpu`` halted and blocked: it leaves its pCPU for that pCPU's wake-up list."""
        vcpu.mp_state = MpState.HALTED
        vcpu.run_state = RunState.BLOCKED
        p = vcpu.last_pcpu
        if p is not None:
            if p.loaded is vcpu:
                p.loaded = None
            p.wakeup_list.append(vcpu)
        self.vm.accel.vcpu_blocking(vcpu)

    # ===================================================================================
    # Delivery, queued (resolve -> for each target: set IRR -> kick)
    # ===================================================================================
    def start_delivery(self, source: LocalApic | None, irq: Interrupt) -> int:
        """Queue one message's delivery (queued mode only).  Returns 0: the count KVM would
        return is the thread's result once its steps ran."""
        name = "deliver" if source is None else f"ipi.vcpu{self.vm.index_of(source.vcpu_id)}"
        self.steps.start(name, self.delivery_steps(source, irq))
        return 0

    def delivery_steps(self, source: LocalApic | None, irq: Interrupt) -> Protocol:
        vm = self.vm
        targets: list[LocalApic] = []

        def resolve() -> int:
            def record(apic: LocalApic, _irq: Interrupt) -> bool:
                targets.append(apic)
                return True

            return vm._deliver(source, irq, record)

        resolved = yield Step(
            "deliver.resolve", _names("apic_map", "apic_regs"), frozenset(), resolve
        )
        accepted = 0
        for apic in _unique(targets):
            i = vm._apics.index(apic)
            state = f"irr[{i}]" if int(irq.delivery_mode) in _FIXED_MODES else f"events[{i}]"
            ok = yield Step(
                f"deliver.set_irr[{i}]",
                _names(f"apic_regs[{i}]"),
                _names(state),
                lambda apic=apic: vm._accept(apic, irq),  # type: ignore[misc]
            )
            accepted += bool(ok)
        assert isinstance(resolved, int)
        return -1 if resolved < 0 else accepted


def _unique(apics: Sequence[LocalApic]) -> list[LocalApic]:
    out: list[LocalApic] = []
    for a in apics:
        if all(a is not b for b in out):
            out.append(a)
    return out


class Kick:
    """``kvm_vcpu_kick`` of one vCPU (``Scheduler.notifier``): its ``kick`` is the APIC's
    ``notify_hook``.  It runs once per accepted interrupt, so what it reads is bound once,
    here (the VM's and the host's counters and the step scheduler are never replaced); a
    bound method, so the VM still copies and pickles."""

    __slots__ = ("host", "host_stats", "name", "sched", "steps", "vcpu", "vm_stats")

    def __init__(self, sched: Scheduler, vcpu: Vcpu) -> None:
        self.sched = sched
        self.vcpu = vcpu
        self.steps = sched.steps
        self.host = sched.host
        self.host_stats = sched.host.stats
        self.vm_stats = sched.vm.stats
        self.name = f"kick.vcpu{vcpu.index}"

    def kick(self, apic: LocalApic) -> None:
        vcpu = self.vcpu
        if self.steps.queued:
            self.steps.start(self.name, self.sched.kick_steps(vcpu))
            return
        # The two steps of kick_steps, called directly (each is a no-op in the other's state);
        # kick_ipi's common case (no INIT pending) inlined.
        state = vcpu.run_state
        if state is _IN_GUEST:
            if apic.events.init:  # init_pending, without the property
                self.sched.kick_ipi(vcpu)
            elif self.host.running is not vcpu:
                self.vm_stats.kicks += 1
                self.host_stats.kicks += 1  # and its host IPI (HostStats.host_ipis)
        elif state is _BLOCKED:
            self.sched.wake_up(vcpu)
