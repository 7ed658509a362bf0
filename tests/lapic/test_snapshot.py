"""Snapshots and copies of one ``LocalApic`` (SNAP-1..3) and the pending-events record
(EVENTS-1): ``snapshot``/``restore``/``diff``, ``copy.deepcopy`` and ``pickle``."""

from __future__ import annotations

import copy
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lapic import DeliveryMode, LocalApic, Trigger
from lapic.apic import ApicSnapshot
from lapic.events import PendingEvents, PendingEventsState
from lapic.faults import ApicTypeError, ApicValueError
from lapic.icr import Interrupt
from tests.lapic.strategies import Access_, accesses, apic_configs, apply_access

configs = apic_configs()


def run(apic: LocalApic, steps: list[Access_]) -> list[object]:
    return [apply_access(apic, s) for s in steps]


class Sink:
    """A picklable owner of hooks (as a hypervisor would be)."""

    def __init__(self) -> None:
        self.sent: list[Interrupt] = []
        self.notified = 0

    def send(self, apic: LocalApic, irq: Interrupt) -> None:
        self.sent.append(irq)

    def notify(self, apic: LocalApic) -> None:
        self.notified += 1


@settings(max_examples=60, deadline=None)
@given(config=configs, before=accesses(), after=accesses(12))
def test_deepcopy_and_pickle_give_an_equal_apic_that_then_behaves_the_same__SNAP_1(
    config: object, before: list[Access_], after: list[Access_]
) -> None:
    apic = config.build()  # type: ignore[attr-defined]
    run(apic, before)
    snap = apic.snapshot()
    for clone in (copy.deepcopy(apic), pickle.loads(pickle.dumps(apic))):
        assert clone.snapshot() == snap
        assert hash(clone.snapshot()) == hash(snap)
        assert clone is not apic and clone.regs is not apic.regs
    twin = copy.deepcopy(apic)
    assert run(twin, after) == run(apic, after)
    assert twin.snapshot() == apic.snapshot()


@settings(max_examples=60, deadline=None)
@given(config=configs, before=accesses(), detour=accesses(12), after=accesses(12))
def test_restore_then_the_same_operations_give_the_same_results_as_never_leaving__SNAP_2(
    config: object, before: list[Access_], detour: list[Access_], after: list[Access_]
) -> None:
    apic = config.build()  # type: ignore[attr-defined]
    reference = config.build()  # type: ignore[attr-defined]
    run(apic, before)
    run(reference, before)
    snap = apic.snapshot()
    run(apic, detour)
    apic.restore(snap)
    assert apic.snapshot() == snap == reference.snapshot()
    assert run(apic, after) == run(reference, after)
    assert apic.snapshot() == reference.snapshot()
    assert apic.snapshot().diff(reference.snapshot()) == []


def test_hooks_bound_to_a_picklable_object_survive_pickling__SNAP_1() -> None:
    apic = LocalApic(2)
    apic.mmio_write(0xF0, 0x1FF)
    sink = Sink()
    apic.send_hook = sink.send
    apic.notify_hook = sink.notify
    clone = pickle.loads(pickle.dumps(apic))
    clone.mmio_write(0x300, 0x40F1)  # fixed IPI, vector 0xF1
    clone.accept(0x41)
    new_sink = clone.send_hook.__self__
    assert isinstance(new_sink, Sink) and new_sink is not sink
    assert [irq.vector for irq in new_sink.sent] == [0xF1]
    assert new_sink.notified == 1
    assert sink.sent == [] and sink.notified == 0


def test_a_lambda_hook_is_the_callers_problem_pickle_refuses_it__SNAP_1() -> None:
    apic = LocalApic()
    apic.send_hook = lambda a, irq: None
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(apic)


def test_a_snapshot_is_immutable_hashable_and_covers_the_internal_latches__SNAP_1() -> None:
    apic = LocalApic(1, "sdm")  # sdm: ESR latching
    apic.mmio_write(0xF0, 0x1FF)
    snap = apic.snapshot()
    with pytest.raises(AttributeError):
        snap.apic_base = 0  # type: ignore[misc]
    apic.accept(3)  # illegal vector: an ESR bit waits for the next ESR write
    assert apic.snapshot() != snap
    assert apic.snapshot().esr_pending == 0x40
    apic.mmio_read(0x80)
    apic.accept(0x20, DeliveryMode.NMI)
    apic.accept(0x9A, DeliveryMode.STARTUP)
    later = apic.snapshot()
    assert later.events == PendingEventsState(nmi=1, sipi=True, sipi_vector=0x9A)
    assert len({snap, later, apic.snapshot()}) == 2


def test_diff_names_registers_and_fields_in_hex__SNAP_3() -> None:
    apic = LocalApic(0)
    apic.mmio_write(0xF0, 0x1FF)
    a = apic.snapshot()
    apic.mmio_write(0x80, 0x20)
    apic.accept(0x41, DeliveryMode.FIXED, Trigger.LEVEL)
    apic.accept(0, DeliveryMode.NMI)
    b = apic.snapshot()
    lines = a.diff(b)
    assert "TPR: 0x00000000 -> 0x00000020" in lines
    assert "PPR: 0x00000000 -> 0x00000020" in lines
    assert "IRR2: 0x00000000 -> 0x00000002" in lines
    assert "TMR2: 0x00000000 -> 0x00000002" in lines
    assert "events.nmi: 0x0 -> 0x1" in lines
    assert len(lines) == 5
    assert b.diff(b) == []
    with pytest.raises(ApicTypeError, match="other"):
        a.diff(apic)  # type: ignore[arg-type]


def test_restore_checks_its_argument_and_the_vcpu_id__SNAP_2() -> None:
    apic = LocalApic(3)
    with pytest.raises(ApicTypeError, match="snap"):
        apic.restore(b"")  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match="vcpu_id"):
        apic.restore(LocalApic(4).snapshot())
    assert isinstance(apic.snapshot(), ApicSnapshot)


def test_restore_reports_a_map_change_and_keeps_the_hooks__SNAP_2() -> None:
    apic = LocalApic(3)
    snap = apic.snapshot()
    changed: list[LocalApic] = []
    apic.map_hook = changed.append
    apic.restore(snap)
    assert changed == [apic]
    assert apic.map_hook is not None


def test_pending_events_are_one_record_behind_the_old_attribute_names__EVENTS_1() -> None:
    apic = LocalApic()
    apic.mmio_write(0xF0, 0x1FF)
    assert isinstance(apic.events, PendingEvents) and not apic.events
    apic.accept(0, DeliveryMode.NMI)
    apic.accept(0, DeliveryMode.NMI)
    apic.accept(0, DeliveryMode.NMI)
    apic.accept(0, DeliveryMode.SMI)
    apic.accept(0, DeliveryMode.INIT)
    apic.accept(0x12, DeliveryMode.STARTUP)
    apic.accept(0, DeliveryMode.REMOTE_READ)
    assert apic.events.frozen() == PendingEventsState(2, True, True, True, 0x12, True)
    assert (apic.nmi_pending, apic.smi_pending, apic.init_pending) == (2, True, True)
    assert (apic.sipi_pending, apic.sipi_vector, apic.pv_unhalted) == (True, 0x12, True)
    apic.nmi_pending -= 1
    apic.sipi_pending = False
    assert apic.events.nmi == 1 and not apic.events.sipi
    assert "NMI x1" in apic.dump() and "SIPI" not in apic.dump()
    apic.init()
    assert apic.events.frozen() == PendingEventsState(sipi_vector=0x12)
    apic.reset()
    assert apic.events.frozen() == PendingEventsState()


@given(
    st.integers(0, 2),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.integers(0, 255),
    st.booleans(),
)
def test_the_events_record_round_trips_through_its_frozen_state__EVENTS_1(
    nmi: int, smi: bool, init: bool, sipi: bool, vector: int, pv: bool
) -> None:
    state = PendingEventsState(nmi, smi, init, sipi, vector, pv)
    record = PendingEvents()
    record.load(state)
    assert record.frozen() == state
    assert bool(record) == bool(nmi or smi or init or sipi or pv)
