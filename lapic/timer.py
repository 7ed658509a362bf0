"""The APIC timer on a virtual clock the caller advances.

Implements (SDM Vol. 3 "APIC Timer"; KVM ``start_apic_timer``, ``apic_get_tmcct``,
``apic_update_lvtt``, ``update_target_expiration``, ``apic_timer_fn``; reference §1.5, REG-TMR-1):

* one-shot and periodic modes: the count runs down from TMICT at one tick per
  ``bus_cycle_ns * divide`` nanoseconds; at zero the timer fires through LVT Timer; a periodic
  timer reloads (KVM raises a period below ``min_periodic_ns`` to that minimum);
* TSC-deadline mode: IA32_TSC_DEADLINE (MSR 0x6E0) arms the timer; it fires once when the TSC
  reaches the deadline, which then reads 0; a write of 0 disarms it;
* the TDCR divide table; a divide change while counting keeps the remaining *count* (KVM
  scales the remaining time by new/old divide);
* TMCCT as KVM computes it: 0 when TMICT is 0, in TSC-deadline mode, or after a one-shot
  expired; else the remaining time (modulo the period) in ticks.

The clock is virtual: nothing happens until the owner calls :meth:`ApicTimer.poll`
(``LocalApic.advance`` does that).  Expiries missed by a long advance are not caught up: as
KVM's ``advance_periodic_target_expiration`` does, one interrupt is delivered and the next
expiry is one period after "now".  ``expirations`` counts delivered timer interrupts.

Choices settled here:
* A TMCCT read at the very instant of the TMICT write returns the full period in ticks: TMICT,
  or more when KVM raised a periodic period to ``min_periodic_ns``.  KVM computes
  ``remaining mod period``, which would give 0 at remaining == period, but on a real host time
  always moves between the two accesses (KVM then reads one tick less); the SDM says the count
  starts at TMICT.
* TSC = ``now_ns * tsc_khz / 1e6`` (default 1 GHz: one tick per nanosecond), integer division.

Not modelled: the "lapic_timer_advance" early-injection tuning, preemption-timer offload, and
KVM's rate limiting of restored counts beyond clamping to the period.
"""

from __future__ import annotations

from collections.abc import Callable

from lapic.faults import check_int
from lapic.registers import TIMER_PERIODIC, TIMER_TSC_DEADLINE


def divide_value(tdcr: int) -> int:
    """TDCR bits 3,1,0 to the divisor (KVM ``update_divide_count``; reference §1.5)."""
    t = tdcr & 0xF
    return 1 << ((((t & 3) | ((t & 8) >> 1)) + 1) & 7)


class Clock:
    """Virtual time in nanoseconds, shared by every timer of a machine."""

    __slots__ = ("now", "tsc_khz")

    def __init__(self, now: int = 0, tsc_khz: int = 1_000_000) -> None:
        self.now = check_int("now", now, 0, 1 << 63)
        self.tsc_khz = check_int("tsc_khz", tsc_khz, 1, 1 << 32)

    def advance(self, ns: int) -> None:
        self.now += check_int("ns", ns, 0, 1 << 63)

    @property
    def tsc(self) -> int:
        return self.now * self.tsc_khz // 1_000_000

    def ns_until_tsc(self, tsc: int) -> int:
        """Smallest ``now`` at which the TSC reads at least ``tsc``."""
        return -(-tsc * 1_000_000 // self.tsc_khz)

    def __repr__(self) -> str:
        return f"Clock(now={self.now}, tsc_khz={self.tsc_khz})"


class ApicTimer:
    """Timer state derived from LVTT/TMICT/TDCR (which live in the register page)."""

    __slots__ = (
        "_fire",
        "bus_cycle_ns",
        "clock",
        "deadline",
        "divide",
        "expirations",
        "min_periodic_ns",
        "mode",
        "period",
        "target",
    )

    def __init__(
        self,
        clock: Clock,
        fire: Callable[[], None],
        *,
        bus_cycle_ns: int = 1,
        min_periodic_ns: int = 0,
    ) -> None:
        self.clock = clock
        self._fire = fire
        self.bus_cycle_ns = bus_cycle_ns
        self.min_periodic_ns = min_periodic_ns
        self.mode = 0
        """LVTT timer-mode bits (0 one-shot, TIMER_PERIODIC, TIMER_TSC_DEADLINE)."""
        self.divide = 2
        self.period = 0
        """ns per full count in one-shot/periodic mode; 0 = not counting."""
        self.target: int | None = None
        """Virtual time of the next expiry, or None when disarmed."""
        self.deadline = 0
        """IA32_TSC_DEADLINE as last written (0 = disarmed / fired)."""
        self.expirations = 0

    # -- register events ---------------------------------------------------------------
    def reset(self) -> None:
        self.mode = 0
        self.divide = 2
        self.period = 0
        self.target = None
        self.deadline = 0

    def set_mode(self, mode: int) -> bool:
        """LVTT written with timer-mode bits ``mode``.  True: the caller must zero TMICT."""
        if mode == self.mode:
            return False
        switched = (self.mode == TIMER_TSC_DEADLINE) != (mode == TIMER_TSC_DEADLINE)
        self.mode = mode
        if switched:
            self.period = 0
            self.target = None
            self.deadline = 0
            return True
        if mode == TIMER_PERIODIC and 0 < self.period < self.min_periodic_ns:
            self.period = self.min_periodic_ns
        return False

    def set_divide(self, tdcr: int, tmict: int) -> None:
        """TDCR written.  While counting, the remaining time is scaled by new/old divide
        (KVM ``update_target_expiration``), so the remaining *count* is kept.  An expired
        one-shot timer stays expired (KVM's re-arm in that corner is not modelled)."""
        old = self.divide
        self.divide = divide_value(tdcr)
        if self.divide != old and self.period and self.target is not None:
            now = self.clock.now
            remaining = max(self.target - now, 0)
            self.period = tmict * self.bus_cycle_ns * self.divide
            self._clamp_period()
            self.target = now + remaining * self.divide // old

    def start(self, tmict: int) -> None:
        """TMICT written (one-shot/periodic mode): restart, or stop when 0.  In the reserved
        timer mode 11b nothing counts (KVM starts neither kind of timer)."""
        if self.mode not in (0, TIMER_PERIODIC):
            self.period = 0
            self.target = None
            return
        self.period = tmict * self.bus_cycle_ns * self.divide
        if not self.period:
            self.target = None
            return
        self._clamp_period()
        self.target = self.clock.now + self.period

    def restore(self, tmict: int, tmcct: int) -> None:
        """KVM_SET_LAPIC: restart from the image's TMCCT (``__start_apic_timer(APIC_TMCCT)``).
        A count above TMICT restarts a full period (KVM also clamps the TMCCT it keeps in the
        page to 0 there; the caller zeroes the stored TMCCT anyway).
        """
        self.target = None
        if self.mode == TIMER_TSC_DEADLINE:
            self.write_deadline(self.deadline)
            return
        if self.mode != 0 and self.mode != TIMER_PERIODIC:
            return
        self.period = tmict * self.bus_cycle_ns * self.divide
        if not self.period:
            return
        self._clamp_period()
        remaining = min(tmcct * self.bus_cycle_ns * self.divide, self.period)
        if remaining <= 0:
            remaining = self.period if self.mode == TIMER_PERIODIC else 0
        self.target = self.clock.now + remaining

    def write_deadline(self, tsc: int) -> None:
        """IA32_TSC_DEADLINE write; only arms in TSC-deadline mode (KVM ignores it otherwise)."""
        if self.mode != TIMER_TSC_DEADLINE:
            return
        self.deadline = tsc
        self.target = None if tsc == 0 else max(self.clock.ns_until_tsc(tsc), self.clock.now)

    def read_deadline(self) -> int:
        # Equivalent mutant: ``deadline`` is already 0 outside TSC-deadline mode (leaving the
        # mode zeroes it, writes outside it are ignored); the guard states TIMER-4 directly.
        return self.deadline if self.mode == TIMER_TSC_DEADLINE else 0  # pragma: no mutate

    def current_count(self, tmict: int) -> int:
        """TMCCT (KVM ``apic_get_tmcct`` with the same-instant choice of the module doc)."""
        if self.mode == TIMER_TSC_DEADLINE or tmict == 0:
            return 0
        if self.period == 0:
            return self._count_without_period()
        if self.target is None:
            return 0
        remaining = self.target - self.clock.now
        if remaining <= 0:
            return 0
        tick = self.bus_cycle_ns * self.divide
        if remaining == self.period:
            return self.period // tick
        return (remaining % self.period) // tick

    def _count_without_period(self) -> int:
        """REG-TMR-1, the CVE-2013-6367 fix: TMICT != 0 but nothing counts (the reserved
        timer mode), so TMCCT reads 0 instead of dividing by the zero period."""
        return 0

    def cancel(self) -> None:
        self.target = None

    # -- time ----------------------------------------------------------------------------
    def poll(self) -> int:
        """Fire every expiry due at ``clock.now``; one interrupt however many were due."""
        target = self.target
        now = self.clock.now
        if target is None or target > now:
            return 0
        if self.mode == TIMER_PERIODIC and self.period:
            # KVM advance_periodic_target_expiration: no catch-up; a next expiry already in
            # the past is moved to "now" (and coalesces with this one), then runs on.
            following = target + self.period
            if following <= now:
                following = now + self.period
            self.target = following
        else:
            self.target = None
            if self.mode == TIMER_TSC_DEADLINE:
                self.deadline = 0
        self.expirations += 1
        self._fire()
        return 1

    def next_expiry(self) -> int | None:
        return self.target

    def _clamp_period(self) -> None:
        if self.mode == TIMER_PERIODIC:
            self.period = max(self.period, self.min_periodic_ns)

    def __repr__(self) -> str:
        return (
            f"ApicTimer(mode={self.mode:#x}, divide={self.divide}, period={self.period}, "
            f"target={self.target}, deadline={self.deadline})"
        )


# What a bug replay (``apicsim/replays/``, specs/replays.md) may swap, and the fix behind each.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "ApicTimer._count_without_period",  # BUG-9 CVE-2013-6367: TMCCT with a zero period
    }
)
