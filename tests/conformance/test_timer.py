"""The APIC timer as a guest programs it: one-shot mode.

Rule: TIMER-2 (a one-shot fires once through LVTT, after TMICT x divide x bus cycle), with
TIMER-1 (the divider) and TIMER-7 (TMCCT reads 0 after expiry).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from .conftest import (
    LVTT,
    TDCR,
    TMCCT,
    TMICT,
    Mode,
    Platform,
    boot,
    irr,
    legal_vectors,
    modes,
)

TDCR_VALUES = (0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB)
"""Every divide configuration, written without reserved bits (DIFF-D3 under strict x2APIC)."""

NONE = frozenset[int]()


def divide(tdcr: int) -> int:
    """TIMER-1."""
    t = tdcr & 0xF
    return 1 << ((((t & 3) | ((t & 8) >> 1)) + 1) & 7)


@given(
    mode=modes,
    vector=legal_vectors,
    tdcr=st.sampled_from(TDCR_VALUES),
    count=st.integers(1, 1 << 16),
    start=st.integers(0, 10**9),
    cuts=st.lists(st.floats(0, 1), max_size=4),
    later=st.integers(1, 10**10),
)
def test_a_one_shot_timer_fires_exactly_once_after_the_programmed_time__TIMER_2(
    platform: Platform,
    mode: Mode,
    vector: int,
    tdcr: int,
    count: int,
    start: int,
    cuts: list[float],
    later: int,
) -> None:
    """TIMER-2, TIMER-1, TIMER-7: at any time, the guest writes TDCR, LVTT = vector (one-shot,
    unmasked) and TMICT = count.  Up to ``count * divide * bus_cycle_ns`` ns minus one (waited
    in random slices) nothing is pending; at that instant the vector is in IRR, exactly once,
    TMCCT reads 0 and one VM entry handles it; nothing more comes, however long the guest then
    waits."""
    vm = platform.vm()
    (cpu,) = boot(vm, mode)
    vm.advance(start)
    cpu.write(TDCR, tdcr)
    cpu.write(LVTT, vector)
    cpu.write(TMICT, count)
    expiry = count * divide(tdcr) * platform.profile.bus_cycle_ns

    waited = 0
    for point in [*sorted(int(c * (expiry - 1)) for c in cuts), expiry - 1]:
        assert vm.advance(point - waited) == 0, f"fired early, {point} ns after TMICT"
        waited = point
        assert irr(vm, 0) == NONE
    assert vm.advance(1) == 1
    assert irr(vm, 0) == {vector}
    assert cpu.read(TMCCT) == 0
    assert cpu.run() == [vector]
    assert vm.advance(later) == 0
    assert irr(vm, 0) == NONE
    assert cpu.run() == []
