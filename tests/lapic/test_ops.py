"""The delivery vtable of one ``LocalApic`` (OPS-1, OPS-2): the default is today's
behaviour whether it runs inline or through bound methods, and an accelerator's ops take over
IRR setting, pending-vector lookup, acknowledge, EOI, sending and notification."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from lapic import DeliveryMode, Interrupt, LocalApic, Trigger
from lapic.faults import ApicTypeError
from lapic.ops import DEFAULT_OPS, OP_NAMES, ApicEvent, ApicOps, DefaultApicOps, overridden
from tests.lapic.strategies import Access_, accesses, apic_configs, apply_access


class Recorder:
    """Hooks that record what they hear (the old hook interface)."""

    def __init__(self, apic: LocalApic) -> None:
        self.log: list[tuple[object, ...]] = []
        apic.send_hook = lambda a, irq: self.log.append(("send", irq))
        apic.notify_hook = lambda a: self.log.append(("notify",))
        apic.map_hook = lambda a: self.log.append(("map",))
        apic.eoi_hook = lambda a, v, lvl, sup: self.log.append(("eoi", v, lvl, sup))


class PassThrough:
    """An ``ApicOps`` that does not subclass ``DefaultApicOps``: every operation is called
    through the bound methods ``bind_ops`` caches, and forwards to the default."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def set_intr_ready(self, apic: LocalApic, vector: int, level_triggered: bool) -> bool:
        self.calls.append("set_intr_ready")
        return DEFAULT_OPS.set_intr_ready(apic, vector, level_triggered)

    def pending_intr(self, apic: LocalApic) -> int:
        self.calls.append("pending_intr")
        return DEFAULT_OPS.pending_intr(apic)

    def intr_accepted(self, apic: LocalApic, vector: int) -> None:
        self.calls.append("intr_accepted")
        DEFAULT_OPS.intr_accepted(apic, vector)

    def eoi(self, apic: LocalApic) -> int:
        self.calls.append("eoi")
        return DEFAULT_OPS.eoi(apic)

    def send(self, apic: LocalApic, irq: Interrupt) -> None:
        self.calls.append("send")
        DEFAULT_OPS.send(apic, irq)

    def raise_event(self, apic: LocalApic, event: ApicEvent) -> None:
        self.calls.append("raise_event")
        DEFAULT_OPS.raise_event(apic, event)

    def map_changed(self, apic: LocalApic) -> None:
        self.calls.append("map_changed")
        DEFAULT_OPS.map_changed(apic)

    def eoi_reported(
        self, apic: LocalApic, vector: int, level_triggered: bool, suppressed: bool
    ) -> None:
        self.calls.append("eoi_reported")
        DEFAULT_OPS.eoi_reported(apic, vector, level_triggered, suppressed)


@settings(max_examples=80, deadline=None)
@given(config=apic_configs(), steps=accesses(30))
def test_the_default_ops_inline_and_called_give_identical_results__OPS_1(
    config: object, steps: list[Access_]
) -> None:
    inline = config.build()  # type: ignore[attr-defined]
    called = config.build()  # type: ignore[attr-defined]
    ops = PassThrough()
    called.bind_ops(ops)
    rec_inline, rec_called = Recorder(inline), Recorder(called)
    for step in steps:
        assert apply_access(called, step) == apply_access(inline, step)
    assert called.snapshot() == inline.snapshot()
    assert rec_called.log == rec_inline.log
    assert all(getattr(called, f"_op_{name}") is not None for name in OP_NAMES)
    assert set(ops.calls) <= set(OP_NAMES)


def test_a_new_apic_binds_the_default_ops_and_runs_every_operation_inline__OPS_1() -> None:
    apic = LocalApic()
    assert apic.ops is DEFAULT_OPS
    assert overridden(DEFAULT_OPS) == {}
    assert all(getattr(apic, f"_op_{name}") is None for name in OP_NAMES)
    assert repr(DEFAULT_OPS) == "DefaultApicOps()"


def test_a_lone_apic_without_a_send_hook_delivers_its_self_ipi_through_default_send__OPS_1(
) -> None:
    apic = LocalApic(0, ops=PassThrough())
    apic.mmio_write(0xF0, 0x1FF)
    apic.wrmsr(0x1B, 0xFEE00C00)
    apic.wrmsr(0x83F, 0x55)  # SELF IPI
    assert 0x55 in apic.irr
    assert isinstance(apic.ops, PassThrough)
    assert apic.ops.calls[-3:] == ["send", "set_intr_ready", "raise_event"]


class PostedOps(DefaultApicOps):
    """An accelerator in miniature: interrupts go to a private PIR, not IRR, and are synced
    into IRR when the APIC asks for the highest pending vector (APICv's ``sync_pir_to_irr``)."""

    __slots__ = ("events", "pir")

    def __init__(self) -> None:
        self.pir: set[int] = set()
        self.events: list[ApicEvent] = []

    def set_intr_ready(self, apic: LocalApic, vector: int, level_triggered: bool) -> bool:
        self.pir.add(vector)
        return vector != 0x99  # 0x99: "the doorbell rang", no notification needed

    def pending_intr(self, apic: LocalApic) -> int:
        for v in sorted(self.pir):
            super().set_intr_ready(apic, v, False)
        self.pir.clear()
        return super().pending_intr(apic)

    def raise_event(self, apic: LocalApic, event: ApicEvent) -> None:
        self.events.append(event)


def test_an_accelerators_ops_post_to_a_pir_and_sync_it_before_the_acknowledge__OPS_2() -> None:
    ops = PostedOps()
    apic = LocalApic(0, ops=ops)
    assert set(overridden(ops)) == {"set_intr_ready", "pending_intr", "raise_event"}
    apic.mmio_write(0xF0, 0x1FF)
    assert apic.accept(0x41) and apic.accept(0x99)
    assert apic.accept(0, DeliveryMode.NMI)
    assert ops.pir == {0x41, 0x99} and not apic.irr  # IRR untouched until the sync
    assert ops.events == [ApicEvent.INTERRUPT, ApicEvent.NMI]
    assert apic.ack() == 0x99
    assert ops.pir == set() and set(apic.irr) == {0x41} and set(apic.isr) == {0x99}
    assert apic.eoi() == 0x99
    assert ops.events[-1] is ApicEvent.INTERRUPT  # PPR fell: 0x41 became deliverable
    apic.bind_ops(None)
    assert apic.ops is DEFAULT_OPS and apic.accept(0x42) and 0x42 in apic.irr


def test_an_accelerator_hears_each_kind_of_event_it_raises__OPS_2() -> None:
    ops = PostedOps()
    apic = LocalApic(0, ops=ops)
    apic.mmio_write(0xF0, 0x1FF)
    for mode in (DeliveryMode.SMI, DeliveryMode.INIT, DeliveryMode.STARTUP):
        assert apic.accept(0x10, mode)
    assert apic.accept(0, DeliveryMode.REMOTE_READ)
    assert not apic.accept(0x30, DeliveryMode.INIT, Trigger.LEVEL, False)  # de-assert
    assert ops.events == [ApicEvent.SMI, ApicEvent.INIT, ApicEvent.SIPI, ApicEvent.PV_UNHALT]
    assert repr(ApicEvent.SIPI) == "ApicEvent.SIPI"


def test_binding_an_object_that_lacks_an_operation_raises_a_type_error_naming_it__OPS_1(
) -> None:
    class Partial:
        def send(self, apic: LocalApic, irq: Interrupt) -> None: ...

    with pytest.raises(ApicTypeError, match="set_intr_ready"):
        LocalApic(0, ops=Partial())  # type: ignore[arg-type]


def test_the_default_ops_object_is_typed_as_an_apic_ops__OPS_1() -> None:
    ops: ApicOps = DEFAULT_OPS
    assert callable(ops.eoi_reported)


def test_an_apic_copied_with_its_ops_rebinds_the_copied_ops__SNAP_1() -> None:
    import copy
    import pickle

    apic = LocalApic(0, ops=PostedOps())
    apic.mmio_write(0xF0, 0x1FF)
    apic.accept(0x41)
    for clone in (copy.deepcopy(apic), pickle.loads(pickle.dumps(apic))):
        ops = clone.ops
        assert isinstance(ops, PostedOps) and ops is not apic.ops
        assert ops.pir == {0x41}
        assert clone.accept(0x52)
        assert ops.pir == {0x41, 0x52} and apic.ops.pir == {0x41}  # type: ignore[attr-defined]
        assert clone.ack() == 0x52
