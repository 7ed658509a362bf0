"""Task and processor priority as the guest sees them: PPR, nesting, what can be delivered.

Rules: PRIO-2 (PPR), PRIO-3 (deliverability), PRIO-4 (acknowledge), PRIO-5 (EOI), WAKE-1 (HLT).
The reference below is the spec's formulas, nothing more; the model is driven only through
guest accesses (self IPIs, TPR/EOI writes, PPR reads, VM entries, HLT).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from .conftest import (
    ICR_ASSERT,
    MSR_SELF_IPI,
    PPR,
    TPR,
    GuestApic,
    Mode,
    Platform,
    boot,
    irr,
    isr,
    legal_vectors,
    modes,
)

SELF = 0x40000


@dataclass
class Reference:
    """PRIO-2..5 as written in ``specs/lapic.md``."""

    tpr: int = 0
    irr: set[int] = field(default_factory=set)
    isr: set[int] = field(default_factory=set)

    @property
    def ppr(self) -> int:
        """PRIO-2."""
        isrv = max(self.isr, default=0)
        return self.tpr if (self.tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0

    def deliverable(self) -> int | None:
        """PRIO-3: the highest IRR vector if its class is above PPR."""
        v = max(self.irr, default=-1)
        return v if v >= 0 and (v & 0xF0) > self.ppr else None

    def run_without_eoi(self) -> list[int]:
        """A VM entry whose handler does not EOI (the guest nests): PRIO-4 until nothing is
        deliverable."""
        done = []
        while (v := self.deliverable()) is not None:
            self.irr.discard(v)
            self.isr.add(v)
            done.append(v)
        return done

    def eoi(self) -> None:
        """PRIO-5: clear the highest ISR bit, if any."""
        if self.isr:
            self.isr.discard(max(self.isr))


def self_ipi(cpu: GuestApic, vector: int) -> None:
    if cpu.mode is Mode.X2APIC:
        cpu.vcpu.wrmsr(MSR_SELF_IPI, vector)
    else:
        cpu.send(SELF | ICR_ASSERT | vector, 0)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("self IPI"), legal_vectors),
        st.tuples(st.just("TPR"), st.integers(0, 0xFF)),
        st.tuples(st.just("run, no EOI"), st.just(0)),
        st.tuples(st.just("self IPI, run, no EOI"), legal_vectors),
        st.tuples(st.just("EOI"), st.just(0)),
    ),
    max_size=24,
)


@given(mode=modes, steps=ops, last=legal_vectors)
def test_ppr_and_deliverability_follow_the_formulas__PRIO_2_PRIO_3(
    platform: Platform, mode: Mode, steps: list[tuple[str, int]], last: int
) -> None:
    """PRIO-2, PRIO-3, PRIO-4, PRIO-5: the guest interleaves self IPIs, TPR writes, VM entries
    whose handler does not EOI (so ISR nests) and EOIs.  After every step the guest's PPR read
    equals ``TPR`` if ``TPR[7:4] >= ISRV[7:4]`` else ``ISRV & 0xF0``, IRR and ISR (host view)
    equal the reference's, and each VM entry delivers exactly the vectors PRIO-3 allows, highest
    first.  Finally one more self IPI: HLT blocks exactly when nothing is deliverable
    (WAKE-1), and otherwise the next entry delivers exactly PRIO-3's vector."""
    vm = platform.vm()
    (cpu,) = boot(vm, mode)
    ref = Reference()
    for op, value in [*steps, ("self IPI", last)]:
        if op.startswith("self IPI"):
            self_ipi(cpu, value)
            ref.irr.add(value)
        elif op == "TPR":
            cpu.write(TPR, value)
            ref.tpr = value
        elif op == "EOI":
            cpu.eoi()
            ref.eoi()
        if op.endswith("run, no EOI"):
            assert cpu.run(eoi=False) == ref.run_without_eoi(), op
        assert cpu.read(TPR) == ref.tpr
        assert cpu.read(PPR) == ref.ppr, (op, value)
        assert irr(vm, 0) == ref.irr
        assert isr(vm, 0) == ref.isr

    expected = ref.deliverable()
    blocked = cpu.vcpu.halt()
    assert blocked == (expected is None), "HLT must block exactly when nothing is deliverable"
    if not blocked:
        handled = cpu.run(eoi=False)
        assert handled[:1] == [expected]
        assert handled == ref.run_without_eoi()


@given(mode=modes, classes=st.sets(st.integers(1, 0xF), min_size=2), data=st.data())
def test_each_eoi_ends_the_highest_nested_interrupt__PRIO_5(
    platform: Platform, mode: Mode, classes: set[int], data: st.DataObject
) -> None:
    """PRIO-5, PRIO-4, PRIO-2: the guest takes interrupts of rising priority classes without
    EOI (each preempts the previous one, so ISR nests them all); then each EOI clears exactly
    the highest ISR vector, and PPR falls to the class of the next one (TPR is 0)."""
    vm = platform.vm()
    (cpu,) = boot(vm, mode)
    nest = [c << 4 | data.draw(st.integers(0, 0xF), label=f"vector of class {c:#x}") for c in
            sorted(classes)]
    for vector in nest:
        self_ipi(cpu, vector)
        assert cpu.run(eoi=False) == [vector]
    assert isr(vm, 0) == set(nest)
    while nest:
        assert cpu.read(PPR) == nest[-1] & 0xF0
        cpu.eoi()
        nest.pop()
        assert isr(vm, 0) == set(nest)
    assert cpu.read(PPR) == 0
