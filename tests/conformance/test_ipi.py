"""IPIs through the ICR (xAPIC MMIO, x2APIC WRMSR): who receives, handling, ICR read-back.

Rules: MATCH-2 (shorthands), MATCH-4 (physical unicast), ICR-2/ICR-3/ICR-5 (the send path),
PRIO-4/PRIO-5 (acknowledge, EOI), DIFF-D4 (the delivery-status bit), DIFF-D2 (vectors 0-15).
"""

from __future__ import annotations

from functools import partial

from hypothesis import given
from hypothesis import strategies as st

from apicsim.testing.topologies import Topology

from .conftest import (
    BASE_EN,
    BASE_EXTD,
    ICR,
    ICR2,
    ICR_ASSERT,
    ICR_BUSY,
    ICR_LOGICAL,
    MSR_APIC_BASE,
    MSR_ICR,
    MSR_SELF_IPI,
    X2APIC_ICR_RESERVED,
    Mode,
    Platform,
    accepts_vector,
    boot,
    expect_gp,
    irr,
    irrs,
    isr,
    legal_vectors,
    mode_and_ids,
    topologies,
    u32,
    u64,
    vectors,
)

NONE = frozenset[int]()
ICR_MODE_BIT0 = 0x100

SHORTHANDS = {"self": 0x40000, "all-including-self": 0x80000, "all-excluding-self": 0xC0000}


@given(topo=topologies(), data=st.data())
def test_a_physical_unicast_reaches_exactly_its_targets_irr__MATCH_4(
    platform: Platform, topo: Topology, data: st.DataObject
) -> None:
    """MATCH-4, ICR-2, ICR-3: a fixed, edge, physical IPI to vCPU t's APIC ID (= its vCPU id;
    xAPIC: ICR2 then ICR over MMIO, x2APIC: one WRMSR 0x830) sets the vector in t's IRR and
    nowhere else, the sender included unless it is t.  Vectors 0-15 are delivered only where
    the profile accepts them (DIFF-D2: otherwise nothing is sent).  Running every vCPU then
    handles it exactly once, on t only (PRIO-4, PRIO-5), except that a vector 0-15 can never
    be delivered (PRIO-3: its class 0 is never above PPR) and stays in IRR."""
    mode, ids = mode_and_ids(topo)
    vm = platform.vm(vcpu_ids=ids)
    cpus = boot(vm, mode)
    n = len(ids)
    src = data.draw(st.integers(0, n - 1), label="source")
    dst = data.draw(st.integers(0, n - 1), label="target")
    vector = data.draw(vectors, label="vector")
    assert irrs(vm) == [NONE] * n

    cpus[src].send(ICR_ASSERT | vector, ids[dst])

    got = frozenset({vector}) if accepts_vector(platform.profile, vector) else NONE
    expected = [got if i == dst else NONE for i in range(n)]
    assert irrs(vm) == expected
    deliverable = vector >= 16
    assert [cpu.run() for cpu in cpus] == [sorted(e) if deliverable else [] for e in expected]
    assert irrs(vm) == ([NONE] * n if deliverable else expected)
    assert [isr(vm, i) for i in range(n)] == [NONE] * n


@given(topo=topologies(), data=st.data())
def test_after_run_each_target_handled_each_vector_once_and_isr_is_empty__PRIO_4_PRIO_5(
    platform: Platform, topo: Topology, data: st.DataObject
) -> None:
    """PRIO-4, PRIO-5, PRIO-3: after a batch of fixed physical unicasts (random senders,
    targets, legal vectors, repeats included), one ``run()`` of each vCPU handles exactly the
    distinct vectors sent to it, each once (IRR coalesces repeats), highest first (PRIO-3: the
    highest IRR vector is delivered next), and the handler's EOIs leave ISR and IRR empty."""
    mode, ids = mode_and_ids(topo)
    vm = platform.vm(vcpu_ids=ids)
    cpus = boot(vm, mode)
    n = len(ids)
    sends = data.draw(
        st.lists(
            st.tuples(st.integers(0, n - 1), st.integers(0, n - 1), legal_vectors),
            min_size=1,
            max_size=12,
        ),
        label="sends (source, target, vector)",
    )
    expected: list[set[int]] = [set() for _ in range(n)]
    for src, dst, vector in sends:
        cpus[src].send(ICR_ASSERT | vector, ids[dst])
        expected[dst].add(vector)

    assert irrs(vm) == [frozenset(e) for e in expected]
    assert [cpu.run() for cpu in cpus] == [sorted(e, reverse=True) for e in expected]
    for i in range(n):
        assert isr(vm, i) == NONE, f"vCPU {i}: EOI left ISR set"
        assert irr(vm, i) == NONE, f"vCPU {i}: IRR still pending"
    assert [cpu.run() for cpu in cpus] == [[] for _ in range(n)], "handled twice"


@given(topo=topologies(min_size=2), data=st.data())
def test_shorthands_reach_exactly_their_set_of_enabled_apics__MATCH_2(
    platform: Platform, topo: Topology, data: st.DataObject
) -> None:
    """MATCH-2, ICR-5, ICR-6: self reaches only the sender; all-including-self every
    hardware-enabled APIC; all-excluding-self every one but the sender.  The destination field
    and the destination mode are ignored (random here), and so is the level bit of an edge
    IPI.  vCPUs whose guest cleared IA32_APIC_BASE.EN are never reached.  In x2APIC mode the
    SELF IPI MSR (0x83F) is a self shorthand too."""
    mode, ids = mode_and_ids(topo)
    vm = platform.vm(vcpu_ids=ids)
    cpus = boot(vm, mode)
    n = len(ids)
    src = data.draw(st.integers(0, n - 1), label="source")
    off = data.draw(
        st.sets(st.sampled_from([i for i in range(n) if i != src])), label="hw-disabled vCPUs"
    )
    for i in off:
        vcpu = cpus[i].vcpu
        vcpu.wrmsr(MSR_APIC_BASE, vcpu.rdmsr(MSR_APIC_BASE) & ~(BASE_EN | BASE_EXTD))
    kinds = [*SHORTHANDS, "SELF IPI MSR"] if mode is Mode.X2APIC else list(SHORTHANDS)
    kind = data.draw(st.sampled_from(kinds), label="shorthand")
    vector = data.draw(legal_vectors, label="vector")
    enabled = {i for i in range(n) if i not in off}

    if kind == "SELF IPI MSR":
        cpus[src].vcpu.wrmsr(MSR_SELF_IPI, vector)
        reached = {src}
    else:
        extra = data.draw(st.sampled_from([0, ICR_ASSERT, ICR_LOGICAL, ICR_ASSERT | ICR_LOGICAL]))
        dest = data.draw(u32 if mode is Mode.X2APIC else st.integers(0, 0xFF), label="dest")
        cpus[src].send(SHORTHANDS[kind] | extra | vector, dest)
        reached = {
            "self": {src},
            "all-including-self": enabled,
            "all-excluding-self": enabled - {src},
        }[kind]

    assert irrs(vm) == [frozenset({vector}) if i in reached else NONE for i in range(n)]
    assert [cpu.run() for cpu in cpus] == [[vector] if i in reached else [] for i in range(n)]
    assert [isr(vm, i) for i in range(n)] == [NONE] * n


def without_init(icr: int) -> int:
    """Delivery mode INIT (101b) becomes NMI (100b); every other bit is kept."""
    return icr & ~ICR_MODE_BIT0 if (icr >> 8) & 7 == 5 else icr


@given(topo=topologies(), data=st.data())
def test_icr_never_reads_back_the_delivery_status_bit__DIFF_D4(
    platform: Platform, topo: Topology, data: st.DataObject
) -> None:
    """DIFF-D4, ICR-2, ICR-3: after any ICR write the sender reads back exactly what it wrote
    minus bit 12 (delivery status), never 1 while pending: xAPIC ``ICR`` reads ``val &
    ~0x1000`` and ICR2 its bits 31:24; x2APIC RDMSR 0x830 reads ``val & ~0x1000``.  An x2APIC
    write with a must-be-zero bit (0xFFF32000) is a #GP that leaves the ICR as it was.  The
    values are random, so the writes send every kind of IPI along the way, except INIT: an
    INIT that reaches the sender resets its APIC at its next instruction (INIT-1), ICR
    included, which is another rule."""
    mode, ids = mode_and_ids(topo)
    vm = platform.vm(vcpu_ids=ids)
    cpus = boot(vm, mode)
    cpu = cpus[data.draw(st.integers(0, len(ids) - 1), label="sender")]
    for _ in range(data.draw(st.integers(1, 4), label="writes")):
        if mode is Mode.X2APIC:
            value = data.draw(
                st.one_of(u64.map(lambda v: v & ~X2APIC_ICR_RESERVED), u64).map(without_init)
            )
            before = cpu.vcpu.rdmsr(MSR_ICR)
            if value & X2APIC_ICR_RESERVED:
                expect_gp(partial(cpu.vcpu.wrmsr, MSR_ICR, value))
                assert cpu.vcpu.rdmsr(MSR_ICR) == before
                continue
            cpu.vcpu.wrmsr(MSR_ICR, value)
            assert cpu.vcpu.rdmsr(MSR_ICR) == value & ~ICR_BUSY
        else:
            high, low = data.draw(u32, label="ICR2"), data.draw(u32.map(without_init), label="ICR")
            cpu.write(ICR2, high)
            cpu.write(ICR, low)
            assert cpu.read(ICR) == low & ~ICR_BUSY
            assert cpu.read(ICR2) == high & 0xFF000000
