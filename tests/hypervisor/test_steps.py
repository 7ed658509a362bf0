"""Atomic steps: eager by default, queued on demand, and the halt vs. IPI race (STEP-1..5).

The race is KVM's ``kvm_vcpu_block`` (mark blocked, then re-check pending events) against
``kvm_vcpu_kick`` (set IRR, then wake a blocked target or IPI a running one): every order of
one sender and one halting target must handle the interrupt exactly once, and the broken
check-then-block variant must lose it in some order.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import pytest

from hypervisor import RunState, Vm
from hypervisor.host.steps import Protocol, Step, Steps, explore
from lapic.faults import ApicValueError

from .builders import ICR_ASSERT, MSR_ICR, x2apic_vm

VECTOR = 0x41


def race(recheck: bool = True) -> tuple[Vm, Steps]:
    """vCPU 1 halts while vCPU 0 sends it VECTOR: both protocols queued, nothing run yet."""
    vm = x2apic_vm([0, 1])
    vm.sched.halt_recheck = recheck
    steps = vm.host.steps
    steps.queued = True
    assert vm.vcpu(1).halt() is False  # queued: the halt has not blocked yet
    vm.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | VECTOR)
    assert [t.name for t in steps.pending()] == ["halt.vcpu1#1", "ipi.vcpu0#2"]
    return vm, steps


def lost_wakeup(vm: Vm) -> bool:
    """The target sleeps with an event pending: nothing will ever wake it."""
    v1 = vm.vcpu(1)
    return v1.run_state is RunState.BLOCKED and v1.has_events()


def handled_after_run(vm: Vm) -> list[int]:
    """Let the target run until nothing is left (as the host would once it is runnable)."""
    vm.host.steps.queued = False
    v1 = vm.vcpu(1)
    v1.run()
    v1.run()
    return v1.handled


def replay_fresh(order: tuple[str, ...], recheck: bool) -> Vm:
    vm, steps = race(recheck)
    steps.replay(order)
    assert not steps.pending()
    return vm


def test_two_queued_interleavings_of_sender_and_halting_target_handle_the_irq_once__STEP_4(
) -> None:
    # Sender first: the IRR is set before the halt's first check, so the halt does not block.
    vm, steps = race()
    for name in ("ipi.vcpu0#2",) * 4 + ("halt.vcpu1#1",):
        if steps.thread(name).next_step is not None:
            steps.step(name)
    assert not steps.pending()
    assert steps.thread("halt.vcpu1#1").result is False
    assert not lost_wakeup(vm)
    assert handled_after_run(vm) == [VECTOR]
    # Target checks, then the whole IPI runs, then the target blocks and re-checks.
    vm, steps = race()
    steps.step("halt.vcpu1#1")  # halt.check: nothing pending
    while steps.thread("ipi.vcpu0#2").next_step is not None:
        steps.step("ipi.vcpu0#2")  # IRR set; the kick sees the target still in guest
    steps.run_all()  # halt.block, halt.recheck: the re-check finds the IRR and un-blocks
    assert [s for _, s in steps.history][-2:] == ["halt.block[1]", "halt.recheck[1]"]
    assert steps.thread("halt.vcpu1#1").result is False
    assert not lost_wakeup(vm)
    assert handled_after_run(vm) == [VECTOR]


def test_every_order_of_sender_and_halting_target_handles_the_irq_exactly_once__STEP_4(
) -> None:
    orders = list(explore(lambda: race()[1]))
    assert len(orders) >= 10
    outcomes = set()
    for order in orders:
        vm = replay_fresh(order, recheck=True)
        assert not lost_wakeup(vm), order
        outcomes.add((vm.vcpu(1).run_state, vm.stats.wakeups, vm.stats.kicks))
        assert handled_after_run(vm) == [VECTOR], order
    # The orders do reach different states: woken by the kick, kicked in guest, not blocked.
    assert len(outcomes) >= 3


def test_check_then_block_without_recheck_loses_the_wakeup_in_a_replayable_order__STEP_5(
) -> None:
    lost = [o for o in explore(lambda: race(recheck=False)[1]) if lost_wakeup(
        replay_fresh(o, recheck=False))]
    assert lost
    order = (
        "halt.vcpu1#1",  # halt.check: nothing pending yet
        "ipi.vcpu0#2",  # deliver.resolve
        "ipi.vcpu0#2",  # deliver.set_irr[1]
        "ipi.vcpu0#2",  # kick.wake_up[1]: not blocked, nothing to wake
        "ipi.vcpu0#2",  # kick.ipi[1]: a host IPI to a vCPU about to sleep
        "halt.vcpu1#1",  # halt.block: asleep with IRR set
    )
    assert order in lost
    vm = replay_fresh(order, recheck=False)
    assert lost_wakeup(vm) and vm.stats.wakeups == 0 and vm.stats.kicks == 1
    assert vm.lapic(1).pending_interrupt() == VECTOR
    # The same order under KVM's protocol has one more step, which saves it.
    vm, steps = race()
    steps.replay(order)
    assert steps.step("halt.vcpu1#1").name == "halt.recheck[1]"
    assert not lost_wakeup(vm) and handled_after_run(vm) == [VECTOR]


def test_each_step_declares_what_it_reads_and_writes__STEP_3() -> None:
    _vm, steps = race()
    seen: dict[str, Step] = {}
    first = steps.thread("halt.vcpu1#1").next_step
    assert first is not None
    seen[first.name] = first
    steps.step("halt.vcpu1#1")  # check first, so the halt goes on to block
    while steps.pending():
        for t in steps.pending():
            nxt = t.next_step
            assert nxt is not None
            seen[nxt.name] = nxt
        steps.step(steps.pending()[-1])
    assert seen["deliver.set_irr[1]"].writes == frozenset({"irr[1]"})
    assert "irr[1]" in seen["halt.check[1]"].reads
    assert seen["halt.block[1]"].writes == frozenset({"run_state[1]", "mp_state[1]"})
    assert seen["halt.check[1]"].conflicts(seen["deliver.set_irr[1]"])
    assert not seen["halt.check[1]"].conflicts(seen["deliver.resolve"])
    assert seen["kick.wake_up[1]"].conflicts(seen["halt.block[1]"])


def test_a_protocol_started_inside_a_queued_step_continues_its_thread__STEP_3() -> None:
    _vm, steps = race()
    ipi = steps.thread("ipi.vcpu0#2")
    while ipi.next_step is not None:
        steps.step(ipi)
    assert ipi.steps_run == [
        "deliver.resolve",
        "deliver.set_irr[1]",
        "kick.wake_up[1]",
        "kick.ipi[1]",
    ]
    assert ipi.done and ipi.result == 1  # KVM's count of APICs that accepted
    assert [t.name for t in steps.pending()] == ["halt.vcpu1#1"]


def test_queued_in_program_order_ends_where_eager_does__STEP_2() -> None:
    def drive(vm: Vm, queued: bool) -> None:
        steps = vm.host.steps
        for action in range(6):
            steps.queued = queued
            if action % 3 == 0:
                vm.vcpu(1).halt()
            elif action % 3 == 1:
                vm.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | (VECTOR + action))
            else:
                vm.signal_msi(0xFEE00000 | (1 << 12), 0, VECTOR + action)
            steps.run_all()
            steps.queued = False
            vm.vcpu(1).run()

    eager, queued = x2apic_vm([0, 1]), x2apic_vm([0, 1])
    drive(eager, False)
    drive(queued, True)
    assert queued.snapshot().diff(eager.snapshot()) == []
    assert queued.snapshot() == eager.snapshot()
    assert eager.vcpu(1).handled == [VECTOR + 1, VECTOR + 2, VECTOR + 4, VECTOR + 5]


def test_eager_is_the_default_and_runs_each_protocol_at_once__STEP_1() -> None:
    vm = x2apic_vm([0, 1])
    assert vm.host.steps.queued is False
    assert vm.vcpu(1).halt() is True
    vm.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | VECTOR)
    assert vm.host.steps.threads == [] and vm.host.steps.history == []
    assert vm.vcpu(1).run_state is RunState.PREEMPTED and vm.stats.wakeups == 1


def test_explore_yields_every_interleaving_of_independent_threads__STEP_3() -> None:
    log: list[str] = []

    def appender(tag: str) -> Callable[[], object]:
        return lambda: log.append(tag)

    def proto(tag: str, n: int) -> Protocol:
        for k in range(n):
            yield Step(f"{tag}{k}", frozenset(), frozenset({tag}), appender(tag))
        return n

    def setup() -> Steps:
        s = Steps()
        s.queued = True
        s.start("a", proto("a", 2))
        s.start("b", proto("b", 3))
        return s

    orders = list(explore(setup))
    assert len(orders) == len(list(combinations(range(5), 2))) == len(set(orders))
    with pytest.raises(ApicValueError, match=r"^limit=3 orders exceeded$"):
        list(explore(setup, limit=3))


def test_run_now_runs_a_protocol_to_completion_and_names_unknown_threads__STEP_1() -> None:
    log: list[int] = []

    def first() -> int:
        log.append(1)
        return 7

    def proto() -> Protocol:
        got = yield Step("one", frozenset(), frozenset({"x"}), first)
        assert isinstance(got, int)
        yield Step("two", frozenset({"x"}), frozenset(), lambda: log.append(got))
        return "done"

    assert Steps.run_now(proto()) == "done" and log == [1, 7]
    s = Steps()
    with pytest.raises(ApicValueError, match=r"^thread='nope' is not queued; pending: \[\]$"):
        s.step("nope")
    t = s.start("p", proto())
    s.run_all()
    assert t.done and t.result == "done" and s.history == [("p#1", "one"), ("p#1", "two")]
    with pytest.raises(ApicValueError, match=r"^thread='p#1' has no step left$"):
        s.step(t)
    s.clear()
    assert s.threads == [] and s.history == []


def test_the_eager_path_builds_no_step_and_no_protocol__STEP_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hypervisor.sched as sched_mod

    built: list[str] = []
    real_step = Step

    def counting_step(*args: object) -> Step:
        built.append(str(args[0]))
        return real_step(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sched_mod, "Step", counting_step)
    vm = x2apic_vm([0, 1])
    for vector in (0x41, 0x42):
        vm.vcpu(1).halt()
        vm.vcpu(0).wrmsr(MSR_ICR, (1 << 32) | ICR_ASSERT | vector)
        vm.signal_msi(0xFEE00000 | (1 << 12), 0, vector + 0x10)
        vm.vcpu(1).run()
    assert built == [] and vm.vcpu(1).handled == [0x51, 0x41, 0x52, 0x42]  # by priority
    vm.host.steps.queued = True
    vm.vcpu(1).halt()
    vm.host.steps.run_all()
    assert built == ["halt.check[1]", "halt.block[1]", "halt.recheck[1]"]


def test_a_spawned_protocol_is_a_thread_of_its_own_even_inside_a_step__STEP_3() -> None:
    steps = Steps()
    steps.queued = True
    order: list[str] = []

    def inner() -> Protocol:
        yield Step("inner", frozenset(), frozenset(), lambda: order.append("inner"))
        return None

    def outer() -> Protocol:
        yield Step("outer.1", frozenset(), frozenset(), lambda: steps.spawn("later", inner()))
        yield Step("outer.2", frozenset(), frozenset(), lambda: order.append("outer.2"))
        return None

    steps.start("outer", outer())
    steps.step("outer#1")
    assert [t.name for t in steps.pending()] == ["outer#1", "later#2"]
    steps.run_all()
    assert order == ["outer.2", "inner"]
