"""``LocalApic.acceptor``: a message's acceptance made once for a route that delivers it again.

Rules: the §8 table of ``kvm_lapic.md`` (ACCEPT-FIXED and the other modes) through
``accept_fast``, which an acceptor must equal for as long as its APIC raises no
``map_changed`` (FAST-10: a kept route is dropped at every map change).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lapic import LocalApic
from tests.lapic.strategies import (
    Access_,
    ApicConfig,
    accesses,
    apic_configs,
    apply_access,
    snapshot,
)


class Seen:
    """The APIC's ``notify_hook`` (counted) and ``map_hook`` (whether it ran)."""

    def __init__(self, apic: LocalApic) -> None:
        self.notified = 0
        self.map_changed = False
        apic.notify_hook = self.notify
        apic.map_hook = self.map

    def notify(self, apic: LocalApic) -> None:
        self.notified += 1

    def map(self, apic: LocalApic) -> None:
        self.map_changed = True


def twins(
    config: ApicConfig, enabled: bool, steps: list[Access_]
) -> tuple[LocalApic, LocalApic]:
    """Two APICs brought to the same state by the same accesses."""
    a, b = config.build(sw_enabled=enabled), config.build(sw_enabled=enabled)
    for step in steps:
        assert repr(apply_access(a, step)) == repr(apply_access(b, step))
    return a, b


messages = st.tuples(
    st.integers(0, 255),  # vector
    st.sampled_from([0, 0, 0, 1, 2, 3, 4, 5, 6, 7]),  # delivery mode (fixed most often)
    st.integers(0, 1),  # trigger (1 = level)
    st.integers(0, 1),  # level (1 = assert)
)


@given(
    apic_configs(), st.booleans(), accesses(), messages, accesses(max_size=8), st.integers(1, 3)
)
def test_an_acceptor_does_what_accept_fast_does_until_its_apic_changes_the_map__FAST_10(
    config: ApicConfig,
    enabled: bool,
    before: list[Access_],
    message: tuple[int, int, int, int],
    between: list[Access_],
    calls: int,
) -> None:
    made, plain = twins(config, enabled, before)
    seen_made, seen_plain = Seen(made), Seen(plain)
    accept = made.acceptor(*message)
    for step in between:  # valid for as long as no map change follows
        assert repr(apply_access(made, step)) == repr(apply_access(plain, step))
    if seen_made.map_changed:
        return  # the acceptor's owner (a route) has been dropped: nothing left to compare
    for _ in range(calls):
        assert accept() == plain.accept_fast(*message)
        assert snapshot(made) == snapshot(plain)
        assert seen_made.notified == seen_plain.notified


def test_binding_other_ops_raises_map_changed_so_kept_acceptors_are_dropped__FAST_10() -> None:
    from lapic.ops import DefaultApicOps

    class Counting(DefaultApicOps):
        def set_intr_ready(self, apic: LocalApic, vector: int, level_triggered: bool) -> bool:
            return super().set_intr_ready(apic, vector, level_triggered)

    apic = LocalApic(0, "kvm", False)
    seen = Seen(apic)
    apic.bind_ops(None)  # the ops it has: nothing to drop
    assert not seen.map_changed
    apic.bind_ops(Counting())
    assert seen.map_changed
