"""AVIC under interleavings and random workloads: AV-E4, BR-A18, AVIC-O-1/2, the choices.

* every order of a sender's hardware steps against a halting target (``explore``) keeps the
  interrupt (AV-E4), and the erratum's stale IsRunning read loses it in some order (BR-A18);
* for random IPI and run-state sequences the guest sees under AVIC exactly what it sees under
  trap-and-emulate, and fixed IPIs between running vCPUs cost no exit;
* a ``RuleBasedStateMachine`` interleaves ICR writes' and host-side deliveries' steps with
  load/put/halt, exits handled in the host (IN_HOST) and inhibit
  toggles and checks Part O's invariants (AVIC-O-1, AVIC-O-2).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from hypervisor import ExitReason, Host, Inhibits, RunState, Vm
from hypervisor.accel.avic import Avic, AvicState
from hypervisor.host.steps import Steps, explore
from hypervisor.hw.avic import PhysicalEntry
from lapic.icr import DeliveryMode, Interrupt

from .builders import ICR_LEVEL, MSR_ICR, REG_ICR, REG_ICR2, REG_ID, REG_SVR, SVR_ON, mmio_write


def avic_of(vm: Vm) -> AvicState:
    """``vm.accel`` as the AVIC state it is."""
    accel = vm.accel
    assert isinstance(accel, AvicState)
    return accel


VECTOR = 0x41


def avic_pair(config: Avic) -> Vm:
    vm = Vm(2, accelerator=config, host=Host(2))
    for i in range(2):
        mmio_write(vm, i, REG_SVR, SVR_ON)
    return vm


def race(config: Avic) -> tuple[Vm, Steps]:
    """vCPU 1 halts while vCPU 0 sends it VECTOR through the CPU: both queued."""
    vm = avic_pair(config)
    steps = vm.host.steps
    steps.queued = True
    vm.vcpu(1).halt()
    mmio_write(vm, 0, REG_ICR2, 1 << 24)
    mmio_write(vm, 0, REG_ICR, VECTOR)
    return vm, steps


def lost(vm: Vm) -> bool:
    v1 = vm.vcpu(1)
    return v1.run_state is RunState.BLOCKED and v1.has_events()


def outcomes(config: Avic) -> list[bool]:
    found = []
    for order in explore(lambda: race(config)[1]):
        vm, steps = race(config)
        steps.replay(order)
        found.append(lost(vm))
    return found


def test_no_order_of_irr_write_is_running_read_and_blocking_loses_the_ipi__AV_E4() -> None:
    results = outcomes(Avic())
    assert len(results) > 5 and not any(results)
    assert not any(outcomes(Avic(cpu_family=0x17)))  # IPIv off: every such IPI exits


def test_the_erratum_stale_is_running_read_loses_a_wake_up_with_ipiv_forced_on__BR_A18() -> None:
    """AV-E4 mutant: the CPU reads IsRunning before it writes IRR (erratum #1235)."""
    assert any(outcomes(Avic(cpu_family=0x17, force_ipiv=True)))


# =============================================================================================
# AVIC == trap-and-emulate, as the guest sees it
# =============================================================================================
N = 4
ops = st.lists(
    st.one_of(
        st.tuples(st.just("ipi"), st.integers(0, N - 1), st.integers(0, N), st.integers(32, 255)),
        st.tuples(st.just("halt"), st.integers(0, N - 1)),
        st.tuples(st.just("preempt"), st.integers(0, N - 1)),
        st.tuples(st.just("run"), st.integers(0, N - 1)),
    ),
    max_size=25,
)


def play(accelerator: str, script: list[tuple[int | str, ...]]) -> tuple[Vm, list[list[int]]]:
    vm = Vm(N, accelerator=accelerator, host=Host(N))
    for i in range(N):
        mmio_write(vm, i, REG_SVR, SVR_ON)
    seen: list[list[int]] = [[] for _ in range(N)]
    for op in script:
        kind = op[0]
        i = int(op[1])
        v = vm.vcpu(i)
        if kind == "ipi":
            if v.run_state is RunState.BLOCKED:
                continue
            dest, vector = int(op[2]), int(op[3])
            low = vector | (0x80000 if dest == N else 0)  # N: broadcast including self
            mmio_write(vm, i, REG_ICR2, (dest % N) << 24)
            mmio_write(vm, i, REG_ICR, low)
        elif kind == "halt":
            if v.run_state is not RunState.BLOCKED:
                v.halt()
        elif kind == "preempt":
            v.preempt()
        else:
            seen[i].extend(v.run())
    for i in range(N):
        seen[i].extend(vm.vcpu(i).run())
    return vm, seen


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_avic_guest_visible_results_equal_emulated__AVIC_O_1(
    script: list[tuple[int | str, ...]],
) -> None:
    emu, seen_emu = play("emulated", script)
    avic, seen_avic = play("avic", script)
    assert seen_avic == seen_emu
    for i in range(N):
        assert avic.lapic(i).irr == emu.lapic(i).irr
        assert avic.lapic(i).isr == emu.lapic(i).isr
        assert avic.vcpu(i).run_state is emu.vcpu(i).run_state


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, N - 1), st.integers(0, N - 1), st.integers(32, 255)),
                min_size=1, max_size=12))
def test_fixed_ipis_between_running_vcpus_take_no_exit__AVIC_O_1(
    ipis: list[tuple[int, int, int]],
) -> None:
    vm = Vm(N, accelerator="avic", host=Host(N), trace=False)
    for i in range(N):
        mmio_write(vm, i, REG_SVR, SVR_ON)
    exits = vm.stats.exits
    for src, dst, vector in ipis:
        mmio_write(vm, src, REG_ICR2, dst << 24)
        mmio_write(vm, src, REG_ICR, vector)
    assert vm.stats.exits == exits
    assert vm.stats.exits_by_reason[ExitReason.AVIC_INCOMPLETE_IPI] == 0
    assert vm.stats.doorbells == sum(1 for s, d, _ in ipis if s != d)


def inhibit_race(inhibit: bool, halted: bool) -> tuple[Vm, Steps]:
    """vCPU 0 sends VECTOR to vCPU 1 through the CPU while vCPU 2's APIC ID write switches
    AVIC off (``inhibit``) or back on: the sender's steps and every vCPU's apicv update are
    queued, so ``explore`` runs them in every order."""
    vm = Vm(3, accelerator=Avic(), host=Host(3))
    for i in range(3):
        mmio_write(vm, i, REG_SVR, SVR_ON)
    if not inhibit:
        mmio_write(vm, 2, REG_ID, 7 << 24)
    if halted:
        vm.vcpu(1).halt()
    steps = vm.host.steps
    steps.queued = True
    mmio_write(vm, 0, REG_ICR2, 1 << 24)
    mmio_write(vm, 0, REG_ICR, VECTOR)
    mmio_write(vm, 2, REG_ID, (7 if inhibit else 2) << 24)
    return vm, steps


@pytest.mark.parametrize("inhibit", [True, False])
@pytest.mark.parametrize("halted", [False, True])
def test_an_inhibit_toggle_racing_a_delivery_loses_and_duplicates_nothing__AV_G3(
    inhibit: bool, halted: bool
) -> None:
    orders = 0
    for order in explore(lambda: inhibit_race(inhibit, halted)[1]):
        vm, steps = inhibit_race(inhibit, halted)
        assert any(t.name.startswith("avic.apicv_update") for t in steps.pending())
        steps.replay(order)
        assert not steps.pending()
        avic = avic_of(vm)
        assert avic.active is not inhibit
        assert all(avic.vcpu_active(v) is not inhibit for v in vm.vcpus)
        for v in vm.vcpus:  # the switch is complete: the table says what AVIC-on/off means
            e = avic.physical_table[v.vcpu_id]
            assert e.is_running == (not inhibit and v.run_state is RunState.IN_GUEST), order
        steps.queued = False
        v1 = vm.vcpu(1)
        assert v1.run_state is not RunState.BLOCKED or not v1.has_events(), order  # no lost wake
        assert v1.run() == [VECTOR], order  # once
        assert v1.run() == []
        orders += 1
    assert orders > 3


# =============================================================================================
# The state machine (Part O)
# =============================================================================================
class AvicMachine(RuleBasedStateMachine):
    """Senders' hardware steps interleaved with load/put/halt and inhibit toggles."""

    config = Avic()
    n = 3

    def __init__(self) -> None:
        super().__init__()
        self.vm = Vm(self.n, accelerator=self.config, host=Host(self.n))
        for i in range(self.n):
            mmio_write(self.vm, i, REG_SVR, SVR_ON)
        self.steps = self.vm.host.steps
        self.steps.queued = True
        self.next_vector = 0x30
        self.handled: list[int] = []

    def _free(self, i: int) -> bool:
        names = [t.name for t in self.steps.pending()]
        return not any(n.startswith(f"halt.vcpu{i}") or f"vcpu{i}#" in n for n in names)

    @rule(src=st.integers(0, 2), dst=st.integers(0, 2))
    def send(self, src: int, dst: int) -> None:
        src, dst = src % self.n, dst % self.n
        v = self.vm.vcpu(src)
        if v.run_state is RunState.BLOCKED or not self._free(src) or self.next_vector > 0xEF:
            return
        vector = self.next_vector
        self.next_vector += 1
        if self.vm.lapic(src).x2apic_mode:
            v.wrmsr(MSR_ICR, dst << 32 | vector)
        else:
            mmio_write(self.vm, src, REG_ICR2, dst << 24)
            mmio_write(self.vm, src, REG_ICR, vector)

    @rule(i=st.integers(0, 2))
    def halt(self, i: int) -> None:
        i %= self.n
        v = self.vm.vcpu(i)
        if v.run_state is RunState.IN_GUEST and self._free(i):
            v.halt()

    @rule(i=st.integers(0, 2))
    def preempt(self, i: int) -> None:
        i %= self.n
        if self.vm.vcpu(i).run_state in (RunState.IN_GUEST, RunState.IN_HOST):
            self.vm.vcpu(i).preempt()

    @rule(i=st.integers(0, 2))
    def leave_guest(self, i: int) -> None:
        """A VM exit handled with the vCPU still loaded (IN_HOST, AV-E8)."""
        i %= self.n
        if self.vm.vcpu(i).run_state is RunState.IN_GUEST:
            self.vm.vcpu(i).leave_guest()

    @rule(dst=st.integers(0, 2))
    def host_deliver(self, dst: int) -> None:
        """A device's interrupt (``svm_deliver_interrupt``): its steps are queued (AV-E7)."""
        if self.next_vector > 0xEF:
            return
        vector = self.next_vector
        self.next_vector += 1
        self.vm.deliver(Interrupt(vector, DeliveryMode.FIXED, dest=dst % self.n))

    @rule(i=st.integers(0, 2), pcpu=st.integers(0, 2))
    def enter(self, i: int, pcpu: int) -> None:
        i, pcpu = i % self.n, pcpu % self.n
        v = self.vm.vcpu(i)
        if v.run_state is RunState.PREEMPTED:
            v.enter(pcpu=pcpu)

    @rule(i=st.integers(0, 2))
    def run(self, i: int) -> None:
        i %= self.n
        v = self.vm.vcpu(i)
        if v.run_state is not RunState.BLOCKED and self._free(i) and not self.steps.pending():
            self.steps.queued = False
            self.handled.extend(v.run())
            self.steps.queued = True

    @rule(on=st.booleans())
    def toggle_inhibit(self, on: bool) -> None:
        """APIC_ID_MODIFIED on or off: the VM's flag flips at once, each vCPU's apicv_active
        and physical entry follow in its own queued step (AV-G3), which the ``step`` rule
        interleaves with senders' hardware steps and run-state changes."""
        last = self.n - 1
        v = self.vm.vcpu(last)
        if v.run_state is RunState.BLOCKED or not self._free(last):
            return
        mmio_write(self.vm, last, REG_ID, (7 if on else last) << 24)

    @precondition(lambda self: bool(self.steps.pending()))
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        pending = self.steps.pending()
        self.steps.step(data.draw(st.sampled_from(pending)))

    @invariant()
    def hardware_table_consistent_with_the_truth(self) -> None:
        vm = self.vm
        avic = avic_of(vm)
        for v in vm.vcpus:
            e = avic.physical_table[v.vcpu_id]
            assert e.valid and not int(e) >> 61 & 1
            if e.is_running:
                assert v.run_state in (RunState.IN_GUEST, RunState.IN_HOST)
                assert v.last_pcpu is not None and v.last_pcpu.apic_id == e.host_id
                assert v.last_pcpu.loaded is v
                assert avic.config.enable_ipiv and avic.vcpu_active(v)
            assert not vm.lapic(v.index).icr & 0x1000
        assert avic.warnings == []

    @invariant()
    def no_lost_and_no_duplicate_interrupt(self) -> None:
        assert len(self.handled) == len(set(self.handled))
        if not self.steps.pending():
            for v in self.vm.vcpus:
                assert not (v.run_state is RunState.BLOCKED and v.has_events()), v


MACHINE_SETTINGS = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_the_state_machine_keeps_part_o_invariants__AVIC_O_1_AVIC_O_2() -> None:
    run_state_machine_as_test(AvicMachine, settings=MACHINE_SETTINGS)


def test_the_state_machine_keeps_them_on_family_17h_with_ipiv_off__AV_E5() -> None:
    class Family17(AvicMachine):
        config = Avic(cpu_family=0x17)

    run_state_machine_as_test(Family17, settings=MACHINE_SETTINGS)


def random_walks(machine: type[AvicMachine], seed: int, walks: int, length: int = 30) -> int:
    """Drive ``machine``'s own rules in random order (weighted towards steps, sends and
    halts) for ``walks`` runs; the number of the first run whose invariants fail, else -1."""
    rnd = random.Random(seed)
    rules = ["send", "send", "halt", "halt", "preempt", "enter", "run", "toggle"] + ["step"] * 6
    for walk in range(walks):
        m = machine()
        try:
            for _ in range(length):
                r = rnd.choice(rules)
                if r == "send":
                    m.send(rnd.randrange(3), rnd.randrange(3))
                elif r == "halt":
                    m.halt(rnd.randrange(3))
                elif r == "preempt":
                    m.preempt(rnd.randrange(3))
                elif r == "enter":
                    m.enter(rnd.randrange(3), rnd.randrange(3))
                elif r == "run":
                    m.run(rnd.randrange(3))
                elif r == "toggle":
                    m.toggle_inhibit(rnd.random() < 0.5)
                elif m.steps.pending():
                    m.steps.step(rnd.choice(m.steps.pending()))
                m.hardware_table_consistent_with_the_truth()
                m.no_lost_and_no_duplicate_interrupt()
        except AssertionError:
            return walk
    return -1


class Forced(AvicMachine):
    """Family 0x17 with IPIv forced on: the erratum's stale IsRunning read is live."""

    config = Avic(cpu_family=0x17, force_ipiv=True)
    n = 2


class Family17Pair(AvicMachine):
    config = Avic(cpu_family=0x17)
    n = 2


def test_the_state_machine_finds_the_erratum_hang_with_ipiv_forced_on__BR_A18() -> None:
    assert random_walks(Forced, seed=1235, walks=3000) >= 0
    assert random_walks(Family17Pair, seed=1235, walks=300) == -1


# =============================================================================================
# The documented choices
# =============================================================================================
def test_an_inhibited_xapic_access_takes_the_mmio_exit__AVIC_CHOICE_1() -> None:
    vm = avic_pair(Avic())
    mmio_write(vm, 1, REG_ID, 0x05000000)
    assert vm.inhibits & Inhibits.APIC_ID_MODIFIED
    mmio_write(vm, 0, REG_ICR2, 1 << 24)
    assert vm.exits[-1].reason is ExitReason.EPT_MISCONFIG


def test_icr2_and_edge_eoi_are_accelerated_level_eoi_traps__AVIC_CHOICE_2() -> None:
    vm = avic_pair(Avic())
    n = vm.stats.exits
    mmio_write(vm, 0, REG_ICR2, 1 << 24)
    mmio_write(vm, 0, REG_ICR, 0x80000 | 0x44)  # all including self, no exit
    assert vm.vcpu(0).run() == [0x44]  # its handler's EOI (edge): no exit
    assert vm.stats.exits == n
    vm.lapic(0).accept(0x45, trigger=__import__("lapic").Trigger.LEVEL)
    assert vm.vcpu(0).run() == [0x45]
    assert vm.exits[-1].reason is ExitReason.AVIC_UNACCELERATED_ACCESS
    assert vm.exits[-1].qualification == 0x1_000000B0


def test_the_index_of_a_logical_failure_is_the_logical_table_index__AVIC_CHOICE_3() -> None:
    vm = avic_pair(Avic())
    mmio_write(vm, 0, 0xD0, 0x01000000)
    mmio_write(vm, 1, REG_ICR2, 0x04 << 24)
    mmio_write(vm, 1, REG_ICR, 0x800 | 0x50)  # logical bit 2: no entry
    assert vm.exits[-1].value == (2 << 32) | 2
    mmio_write(vm, 1, REG_ICR, 0x400)  # NMI: INVALID_INT_TYPE, index 0
    assert vm.exits[-1].value == 0


def test_a_woken_vcpu_is_runnable_with_is_running_clear_until_it_enters__AVIC_CHOICE_4() -> None:
    vm = avic_pair(Avic())
    vm.vcpu(1).halt()
    mmio_write(vm, 0, REG_ICR2, 1 << 24)
    mmio_write(vm, 0, REG_ICR, 0x50)
    assert vm.vcpu(1).run_state is RunState.PREEMPTED
    assert not avic_of(vm).physical_table[1].is_running
    mmio_write(vm, 0, REG_ICR, 0x51)  # in the window: exit, kick only
    assert [e.value >> 32 for e in vm.exits if e.reason is ExitReason.AVIC_INCOMPLETE_IPI] == [1, 1]
    assert vm.vcpu(1).run() == [0x51, 0x50]
    assert avic_of(vm).physical_table[1].is_running


def test_an_x2apic_guest_without_x2avic_is_intercepted_but_delivered_by_the_page__AVIC_CHOICE_5(
) -> None:
    vm = Vm(2, accelerator=Avic(x2avic=False), host=Host(2))
    for i in range(2):
        vm.vcpu(i).wrmsr(0x1B, 0xFEE00000 | 0xC00 | (0x100 if i == 0 else 0))
        vm.vcpu(i).wrmsr(0x80F, SVR_ON)
    vm.host.running = vm.vcpu(0)
    vm.vcpu(0).wrmsr(MSR_ICR, 1 << 32 | 0x60)
    assert vm.exits[-1].reason is ExitReason.MSR_WRITE
    assert list(avic_of(vm).doorbells) == [1]
    assert 0x60 in vm.lapic(1).irr
    assert not vm.lapic(0).icr_split or vm.lapic(0).icr == 1 << 32 | 0x60


def test_low_vectors_exit_only_with_invalid_vector_exit__AVIC_CHOICE_6() -> None:
    vm = avic_pair(Avic(invalid_vector_exit=True))
    mmio_write(vm, 0, REG_ICR2, 1 << 24)
    mmio_write(vm, 0, REG_ICR, 0x05)
    assert vm.exits[-1].value >> 32 == 4
    assert 5 not in vm.lapic(1).irr
    vm = avic_pair(Avic())
    mmio_write(vm, 0, REG_ICR2, 1 << 24)
    mmio_write(vm, 0, REG_ICR, 0x05)
    assert 5 in vm.lapic(1).irr


def test_level_icr_is_not_accelerated() -> None:
    """AV-B1 for the level-assert fixed message: INVALID_INT_TYPE, emulated once."""
    vm = avic_pair(Avic())
    mmio_write(vm, 0, REG_ICR2, 1 << 24)
    mmio_write(vm, 0, REG_ICR, ICR_LEVEL | 0x4000 | 0x70)
    assert vm.exits[-1].value >> 32 == 0
    assert PhysicalEntry(avic_of(vm).shadow[1]).valid
