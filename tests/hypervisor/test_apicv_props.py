"""APICv and IPIv under random workloads and interleavings: the invisibility property shared
with AVIC, the exit counts, and Part O's invariants in a state machine (APICV-O-*).

* for random sequences of guest IPIs, MSIs, halts (IF=1 and IF=0), preemptions, migrations and
  runs (``accel_props``, the workload AVIC's test uses too) the guest's handlers receive under
  ``"apicv"`` and ``"ipiv"``, xAPIC and x2APIC, exactly what they receive under
  trap-and-emulate, in the same order;
* exit counts: a fixed physical unicast IPI costs its sender no exit under IPIv, and exactly one
  exit otherwise (an APIC-write exit for an xAPIC write or a non-virtualizable x2APIC one, an
  MSR-write exit for an x2APIC write without IPIv);
* a ``RuleBasedStateMachine`` interleaves senders (ICR writes, NMIs, MSIs, VT-d posts) with
  targets entering and leaving the guest, blocking with IF=0 and IF=1, preemption, migration
  and inhibit toggles, each protocol's atomic steps in any order, and checks Part O
  (``specs/apicv_invariants.md``): nothing lost, nothing delivered twice, NV in {0xF2, 0xF1}
  and NV = 0xF1 iff the vCPU is on exactly one pCPU's wake-up list, SN = 1 only off the lists,
  the PID-pointer table's bounds, ICR.BUSY clear.  The machine runs with the UNVERIFIED
  choices of Part P set both ways (KVM must not rely on them), and seeded random walks of the
  same machine find the old bugs (BR-V*) when their replays are on.

Not here: the worked examples of each rule (``test_apicv.py``) and the replays' own killing
checks (``test_apicv_replays.py``).
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

from apicsim.replays import apicv as replays_apicv
from hypervisor import ExitReason, RunState, Vm
from hypervisor.accel.apicv import Apicv, ApicvState
from hypervisor.hw.vmx import IpivMiss, ndst_of

from .accel_props import (
    NMI_MSI_DATA,
    N,
    assert_same_as_emulated,
    msi_address,
    script_ops,
    scripted_vm,
    send_ipi,
)
from .builders import ICR_LOGICAL, ICR_NMI, REG_ID, mmio_write


def apicv_of(vm: Vm) -> ApicvState:
    """``vm.accel`` as the APICv state it is."""
    accel = vm.accel
    assert isinstance(accel, ApicvState)
    return accel


# =============================================================================================
# APICv / IPIv == trap-and-emulate, as the guest sees it
# =============================================================================================
workload = script_ops(N, msi=True, cli_halt=True, migrate=True)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(workload)
def test_apicv_guest_visible_results_equal_emulated__APICV_O_1(
    script: list[tuple[int | str, ...]],
) -> None:
    assert_same_as_emulated("apicv", script)


@PROPERTY
@given(workload)
def test_ipiv_guest_visible_results_equal_emulated__APICV_O_1(
    script: list[tuple[int | str, ...]],
) -> None:
    assert_same_as_emulated("ipiv", script)


@PROPERTY
@given(workload)
def test_x2apic_guests_see_the_same_under_apicv_and_ipiv__APICV_O_1(
    script: list[tuple[int | str, ...]],
) -> None:
    assert_same_as_emulated("apicv", script, x2apic=True)
    assert_same_as_emulated("ipiv", script, x2apic=True)


# =============================================================================================
# Exit counts
# =============================================================================================
unicasts = st.lists(
    st.tuples(st.integers(0, N - 1), st.integers(0, N - 1), st.integers(32, 255)),
    min_size=1,
    max_size=12,
)


def sender_exits(accelerator: str, x2apic: bool, ipis: list[tuple[int, int, int]],
                 low_bits: int = 0) -> tuple[Vm, dict[ExitReason, int], int]:
    """Send ``ipis`` between running vCPUs; the exits they cost by reason, and in all."""
    vm = scripted_vm(accelerator, N, x2apic=x2apic)
    before = dict(vm.stats.exits_by_reason)
    exits = vm.stats.exits
    for src, dst, vector in ipis:
        send_ipi(vm, src, dst, vector | low_bits)
    by_reason = {
        r: n - before.get(r, 0)
        for r, n in vm.stats.exits_by_reason.items()
        if n != before.get(r, 0)
    }
    return vm, by_reason, vm.stats.exits - exits


@settings(max_examples=30, deadline=None)
@given(unicasts, st.booleans())
def test_ipiv_virtualizes_fixed_physical_unicasts_with_no_sender_exit__IPIV_3(
    ipis: list[tuple[int, int, int]], x2apic: bool
) -> None:
    vm, by_reason, exits = sender_exits("ipiv", x2apic, ipis)
    assert exits == 0 and by_reason == {}
    # each write posts into a PIR that the running target's notification emptied (PI-J1)
    assert vm.stats.posted == len(ipis)
    assert sum(vm.stats.notifications.values()) == len(ipis)
    want = [sorted({v for _, d, v in ipis if d == i}, reverse=True) for i in range(N)]
    assert [vm.vcpu(i).run() for i in range(N)] == want


@settings(max_examples=30, deadline=None)
@given(unicasts, st.booleans())
def test_without_ipiv_each_icr_write_is_one_exit__VID_6_IPIV_1(
    ipis: list[tuple[int, int, int]], x2apic: bool
) -> None:
    _, by_reason, exits = sender_exits("apicv", x2apic, ipis)
    reason = ExitReason.MSR_WRITE if x2apic else ExitReason.APIC_WRITE
    assert exits == len(ipis)
    assert by_reason == {reason: len(ipis)}


@settings(max_examples=30, deadline=None)
@given(unicasts, st.booleans(), st.sampled_from([ICR_NMI, ICR_LOGICAL]))
def test_under_ipiv_an_nmi_or_logical_icr_write_is_one_apic_write_exit__IPIV_3_IPIV_4(
    ipis: list[tuple[int, int, int]], x2apic: bool, kind: int
) -> None:
    _, by_reason, exits = sender_exits("ipiv", x2apic, ipis, kind)
    assert exits == len(ipis)
    assert by_reason == {ExitReason.APIC_WRITE: len(ipis)}


# =============================================================================================
# The state machine (Part O)
# =============================================================================================
class ApicvMachine(RuleBasedStateMachine):
    """Senders (ICR writes, NMIs, MSIs) interleaved with load/put/block/migrate and inhibit
    toggles, every protocol queued as atomic steps.  vCPUs 0..n-1 send and receive; vCPU n only
    writes its xAPIC ID (the inhibit toggle), so no message is ever addressed to an ID that
    changes under it."""

    config: Apicv = Apicv()
    x2apic = False
    n = 3

    def __init__(self) -> None:
        super().__init__()
        self.vm = scripted_vm(self.config, self.n + 1, x2apic=self.x2apic)
        self.acc = apicv_of(self.vm)
        self.steps = self.vm.host.steps
        self.steps.queued = True
        self.next_vector = 0x30
        self.sent: list[int] = []
        self.handled: list[int] = []
        self.cli: set[int] = set()
        """vCPUs whose guest runs with IF=0 (``cli; hlt``): only an NMI wakes them."""

    # -- helpers -------------------------------------------------------------------------
    def _free(self, i: int) -> bool:
        """No protocol of vCPU ``i``'s is half done."""
        return not any(f"vcpu{i}" in t.name for t in self.steps.pending())

    def _vector(self) -> int | None:
        if self.next_vector > 0xEF:
            return None
        v = self.next_vector
        self.next_vector += 1
        return v

    def _take(self, vectors: list[int]) -> None:
        self.handled.extend(v for v in vectors if v != 2)  # NMIs (2) are not counted

    def _sender(self, i: int) -> bool:
        v = self.vm.vcpu(i)
        return v.run_state is not RunState.BLOCKED and self._free(i)

    # -- senders -------------------------------------------------------------------------
    @rule(src=st.integers(0, 2), dst=st.integers(0, 2))
    def send(self, src: int, dst: int) -> None:
        """A fixed physical unicast ICR write (virtualized under IPIv)."""
        src, dst = src % self.n, dst % self.n
        if not self._sender(src):
            return
        vector = self._vector()
        if vector is None:
            return
        self.sent.append(vector)
        send_ipi(self.vm, src, self.vm.lapic(dst).physical_id, vector)

    @rule(src=st.integers(0, 2), dst=st.integers(0, 2))
    def send_nmi(self, src: int, dst: int) -> None:
        """An NMI by ICR: never virtualized, an APIC-write exit (or MSR exit) and emulation."""
        src, dst = src % self.n, dst % self.n
        if self._sender(src):
            send_ipi(self.vm, src, self.vm.lapic(dst).physical_id, ICR_NMI)

    @rule(dst=st.integers(0, 2))
    def msi(self, dst: int) -> None:
        """A host-side delivery (KVM_SIGNAL_MSI, as from IRQ context on the host's pCPU)."""
        vector = self._vector()
        if vector is None:
            return
        self.sent.append(vector)
        self.vm.signal_msi(msi_address(self.vm.lapic(dst % self.n).physical_id), 0, vector)

    @rule(dst=st.integers(0, 2))
    def device_post(self, dst: int) -> None:
        """A VT-d posted interrupt (an assigned device: ``Apicv(device_posting=True)``): the
        IOMMU posts by the ON/SN rule, whether or not APICv is inhibited."""
        if not self.config.device_posting:
            return
        vector = self._vector()
        if vector is None:
            return
        self.sent.append(vector)
        self.acc.device_post(dst % self.n, vector)

    # -- targets -------------------------------------------------------------------------
    @rule(i=st.integers(0, 2), interruptible=st.booleans())
    def halt(self, i: int, interruptible: bool) -> None:
        i %= self.n
        v = self.vm.vcpu(i)
        if v.run_state is not RunState.IN_GUEST or not self._free(i):
            return
        v.guest_if = interruptible
        if interruptible:
            self.cli.discard(i)
        else:
            self.cli.add(i)
        v.halt()

    @rule(i=st.integers(0, 2))
    def preempt(self, i: int) -> None:
        i %= self.n
        if self.vm.vcpu(i).run_state is RunState.IN_GUEST and self._free(i):
            self.vm.vcpu(i).preempt()

    @rule(i=st.integers(0, 2), pcpu=st.integers(0, 2))
    def enter(self, i: int, pcpu: int) -> None:
        """Load a runnable vCPU, on another pCPU than before or the same."""
        i, pcpu = i % self.n, pcpu % self.n
        v = self.vm.vcpu(i)
        if v.run_state is RunState.PREEMPTED and self._free(i):
            v.enter(pcpu=pcpu)

    @rule(i=st.integers(0, 2))
    def run(self, i: int) -> None:
        i %= self.n
        v = self.vm.vcpu(i)
        if v.run_state is not RunState.BLOCKED and not self.steps.pending():
            self.steps.queued = False
            self._take(v.run())
            self.steps.queued = True

    @rule(i=st.integers(0, 2))
    def sti(self, i: int) -> None:
        """The guest of a running ``cli`` vCPU executes STI."""
        i %= self.n
        v = self.vm.vcpu(i)
        if i in self.cli and v.run_state is not RunState.BLOCKED:
            v.guest_if = True
            self.cli.discard(i)

    @rule(on=st.booleans())
    def toggle_inhibit(self, on: bool) -> None:
        """APIC_ID_MODIFIED on or off (an xAPIC ID write by vCPU ``n``, IPIV-2): while it is
        on, delivery is emulated; PIR bits posted before are not lost (BR-V11)."""
        if not self.x2apic:
            mmio_write(self.vm, self.n, REG_ID, (7 if on else self.n) << 24)

    @rule(i=st.integers(0, 2))
    def pending_check(self, i: int) -> None:
        """PI-J4: the directed-yield question about vCPU ``i``, asked from wherever the host
        is: ``ON || (SN && PIR)``, and it changes nothing."""
        i %= self.n
        before = (self.acc.pid(i), self.vm.lapic(i).irr, self.acc.state())
        pid = before[0]
        assert self.acc.pi_has_pending_interrupt(i) == (pid.on or (pid.sn and bool(pid.pir)))
        assert (self.acc.pid(i), self.vm.lapic(i).irr, self.acc.state()) == before

    @precondition(lambda self: bool(self.steps.pending()))
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        pending = self.steps.pending()
        self.steps.step(data.draw(st.sampled_from(pending)))

    @precondition(lambda self: bool(self.steps.pending()))
    @rule()
    def settle(self) -> None:
        """Every half-done protocol runs to its end."""
        self.steps.run_all()

    # -- Part O --------------------------------------------------------------------------
    @invariant()
    def pid_invariants(self) -> None:
        """APICV-O-2 (Part O item 4, IPIV-5, IPIV-6), in every state no protocol is in the
        middle of."""
        if self.steps.pending():
            return
        vm, acc, cfg = self.vm, self.acc, self.config
        lists = [p.wakeup_list for p in vm.host.pcpus]
        for v in vm.vcpus:
            pid = acc.pid(v.index)
            on_lists = sum(lst.count(v) for lst in lists)
            armed = pid.nv == cfg.wakeup_vector
            assert pid.nv in (cfg.posted_intr_vector, cfg.wakeup_vector), pid
            assert on_lists <= 1 and armed == (on_lists == 1), (v, pid)
            assert not (pid.sn and on_lists), (v, pid)
            if armed:  # only a vCPU halted with IF=1 is armed (1831fa4)
                assert v.run_state is RunState.BLOCKED and v.guest_if, (v, pid)
            if acc.needs_pi_wakeup() and v.run_state is not RunState.IN_GUEST:
                # every put that does not arm sets SN (BR-V12), and so does a wake-up off the
                # list (APICV-CHOICE-2), also before the arming ran
                assert pid.sn or armed, (v, pid)
            if v.run_state is RunState.IN_GUEST and acc.vcpu_active(v):
                p = v.last_pcpu
                assert p is not None
                assert not pid.sn and pid.nv == cfg.posted_intr_vector, (v, pid)
                assert pid.ndst == ndst_of(p.apic_id, cfg.host_x2apic), (v, pid)
                assert not pid.pir or pid.on, (v, pid)
        assert acc.warnings == []

    @invariant()
    def table_bounds_and_busy(self) -> None:
        """APICV-O-3 (Part O items 5 and 6)."""
        vm, acc = self.vm, self.acc
        assert acc.last_pid_pointer_index == vm.max_vcpu_ids - 1
        assert acc.last_pid_pointer_index < len(acc.pid_table)
        for v in vm.vcpus:  # every possible destination is in range and valid (IPIV-2)
            assert v.vcpu_id <= acc.last_pid_pointer_index
            assert acc.pid_table[v.vcpu_id] == acc.pid_pa(v.index) | 1
            assert not vm.lapic(v.index).icr & 0x1000

    @invariant()
    def no_lost_and_no_duplicate_interrupt(self) -> None:
        """APICV-O-1 (Part O items 1 and 2)."""
        assert len(self.handled) == len(set(self.handled))
        assert set(self.handled) <= set(self.sent)
        if not self.steps.pending():
            for v in self.vm.vcpus:
                if v.index not in self.cli:
                    assert not (v.run_state is RunState.BLOCKED and v.has_events()), v

    def teardown(self) -> None:
        """Finish every protocol, wake every ``cli; hlt`` vCPU with an NMI and let its guest
        STI, run everyone: each vector sent is handled exactly once (APICV-O-1)."""
        self.steps.run_all()
        self.steps.queued = False
        for v in self.vm.vcpus:
            if v.run_state is RunState.BLOCKED and v.index in self.cli:
                self.vm.signal_msi(msi_address(v.apic.physical_id), 0, NMI_MSI_DATA)
                self._take(v.run())
            v.guest_if = True
        for v in self.vm.vcpus:
            self._take(v.run())
        assert sorted(self.handled) == sorted(self.sent)


MACHINE = settings(
    max_examples=100, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def machine(config: Apicv, *, x2apic: bool = False) -> type[ApicvMachine]:
    """The machine for one configuration (a subclass, as Hypothesis runs a class)."""
    return type("ApicvMachine", (ApicvMachine,), {"config": config, "x2apic": x2apic})


def test_the_apicv_state_machine_keeps_part_o_invariants__APICV_O_1_APICV_O_2_APICV_O_3() -> None:
    run_state_machine_as_test(machine(Apicv()), settings=MACHINE)


def test_the_ipiv_state_machine_keeps_part_o_invariants__APICV_O_1_APICV_O_2_APICV_O_3() -> None:
    run_state_machine_as_test(machine(Apicv(ipiv=True)), settings=MACHINE)


def test_with_an_assigned_device_posting_plain_apicv_keeps_them__APICV_O_1_APICV_O_2() -> None:
    """VT-d posting makes ``vmx_needs_pi_wakeup`` hold without IPIv: SN on put, the wake-up
    vector, and the device's own posts (BR-V11 while inhibited)."""
    run_state_machine_as_test(machine(Apicv(device_posting=True)), settings=MACHINE)


def test_the_ipiv_state_machine_keeps_them_for_x2apic_guests_on_an_xapic_host__APICV_O_2() -> None:
    run_state_machine_as_test(
        machine(Apicv(ipiv=True, host_x2apic=False), x2apic=True), settings=MACHINE
    )


UNVERIFIED_CHOICES = (
    Apicv(ipiv=True, ipiv_notify_always=True),
    Apicv(ipiv=True, ipiv_past_last=IpivMiss.DROP, ipiv_invalid_entry=IpivMiss.DROP),
    Apicv(ipiv=True, ipiv_min_vector=0x40),
    Apicv(ipiv=True, icr_busy_on_apic_write=False),
)


@pytest.mark.parametrize(
    "config", UNVERIFIED_CHOICES, ids=["notify_always", "miss_drops", "min_vector", "no_busy"]
)
def test_kvm_relies_on_none_of_the_unverified_ipiv_behaviours__APICV_O_1_IPIV_3(
    config: Apicv,
) -> None:
    """Part P item 3: whatever the CPU does past the last index or on an invalid entry, whether
    its posts follow the ON/SN rule, the lowest vector it posts, whether it leaves BUSY: the
    machine's invariants hold for xAPIC and x2APIC guests alike."""
    few = settings(MACHINE, max_examples=25)
    run_state_machine_as_test(machine(config), settings=few)
    run_state_machine_as_test(machine(config, x2apic=True), settings=few)


# =============================================================================================
# The machine finds the old bugs
# =============================================================================================
RULES = (
    ["send"] * 3 + ["msi"] * 2 + ["device"] + ["halt"] * 3
    + ["send_nmi", "preempt", "enter", "run", "sti", "toggle", "check"]
    + ["step"] * 8 + ["settle"]
)


def random_walks(
    machine_class: type[ApicvMachine], seed: int, walks: int, length: int = 30
) -> int:
    """Drive the machine's own rules in random order (weighted towards steps, sends and halts)
    for ``walks`` runs, checking its invariants and teardown; the number of the first run that
    fails, else -1."""
    rnd = random.Random(seed)
    for walk in range(walks):
        m = machine_class()
        try:
            for _ in range(length):
                r = rnd.choice(RULES)
                i, j = rnd.randrange(3), rnd.randrange(3)
                if r == "send":
                    m.send(i, j)
                elif r == "send_nmi":
                    m.send_nmi(i, j)
                elif r == "msi":
                    m.msi(i)
                elif r == "device":
                    m.device_post(i)
                elif r == "halt":
                    m.halt(i, rnd.random() < 0.6)
                elif r == "preempt":
                    m.preempt(i)
                elif r == "enter":
                    m.enter(i, j)
                elif r == "run":
                    m.run(i)
                elif r == "sti":
                    m.sti(i)
                elif r == "toggle":
                    m.toggle_inhibit(rnd.random() < 0.5)
                elif r == "check":
                    m.pending_check(i)
                elif r == "settle":
                    m.steps.run_all()
                elif m.steps.pending():
                    m.steps.step(rnd.choice(m.steps.pending()))
                m.pid_invariants()
                m.table_bounds_and_busy()
                m.no_lost_and_no_duplicate_interrupt()
            m.teardown()
        except AssertionError:
            return walk
    return -1


CONFIGS = {"apicv": (Apicv(), False), "ipiv": (Apicv(ipiv=True), False),
           "ipiv-x2apic": (Apicv(ipiv=True), True), "vtd": (Apicv(device_posting=True), False)}


def test_random_walks_of_the_machine_hold_on_the_model__APICV_O_1() -> None:
    for config, x2apic in CONFIGS.values():
        assert random_walks(machine(config, x2apic=x2apic), seed=10, walks=150) == -1


FOUND_BY_THE_MACHINE = (
    ("BR-V1", "apicv"),  # the running vCPU's post skips its wake-up: a lost interrupt
    ("BR-V2", "ipiv"),  # cli; hlt armed with the wake-up vector
    ("BR-V3", "ipiv"),  # no ON re-check while arming: a lost wake-up
    ("BR-V5", "ipiv"),  # the pending check syncs the PIR: it is not read-only
    ("BR-V7", "ipiv-x2apic"),  # BUSY left in the x2APIC ICR after an NMI's APIC-write exit
    ("BR-V8", "ipiv"),  # the last PID-pointer index is the count
    ("BR-V11", "ipiv"),  # the PIR ignored while inhibited: a lost interrupt
    ("BR-V12", "ipiv"),  # no SN for cli; hlt: notifications to a pCPU it left
)


@pytest.mark.parametrize(("bug", "where"), FOUND_BY_THE_MACHINE)
def test_the_machine_finds_the_old_bugs__APICV_O_1_APICV_O_2_APICV_O_3(
    bug: str, where: str
) -> None:
    """Each replayable BR-V* that a running VM can show breaks one of the machine's invariants
    in some random walk (BR-V6's memset is repaired by the first load, before any walk)."""
    config, x2apic = CONFIGS[where]
    with replays_apicv.active([bug]):
        assert random_walks(machine(config, x2apic=x2apic), seed=1, walks=500) >= 0
