"""The LVT timer as the guest and the VMM see it: LVTT/TMICT/TMCCT/TDCR, IA32_TSC_DEADLINE.

Rules (reference ``kvm_lapic.md``): TIMER-1..7, REG-TMR-1, REG-TDCR-1 (§1.5), STATE-4 (the
timer restart of KVM_SET_LAPIC), BUG-9 (CVE-2013-6367 replay).

KVM facts these tests pin (``arch/x86/kvm/lapic.c``), with ``bus_cycle_ns`` = 1 in both presets:

* period = TMICT * bus_cycle_ns * divide; TMCCT = (remaining mod period) // (bus_cycle_ns *
  divide), i.e. ``TMICT - ceil(elapsed / divide)`` while a one-shot count runs; the model's
  documented choice: a read at the very instant of the TMICT write returns TMICT;
* a periodic period is raised to ``min_timer_period_us`` = 200 us under ``kvm`` (no minimum
  under ``sdm``); a periodic timer re-arms at target + period, or at now + period when that
  is already past (no catch-up: one interrupt);
* every interrupt goes through LVTT (masked: nothing; the vector is LVTT's).

Interrupts are observed from outside: IRR, and ``notify_hook`` (one call per accepted
interrupt, KVM's kick), never the timer's private counters.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lapic import ApicTypeError, ApicValueError, Clock, Features, GuestFault, LocalApic

SVR = 0x0F0
LVTT = 0x320
TMICT = 0x380
TMCCT = 0x390
TDCR = 0x3E0
TSC_DEADLINE = 0x6E0

ONE_SHOT = 0x00000
PERIODIC = 0x20000
TSC_DEADLINE_MODE = 0x40000
RESERVED_MODE = 0x60000
MASKED = 0x10000

VEC = 0xEF
PROFILES = ("kvm", "sdm")
KVM_MIN_PERIOD_NS = 200_000
MIN_PERIOD = {"kvm": KVM_MIN_PERIOD_NS, "sdm": 0}
"""Expected ``min_timer_period_us`` per preset (not read from the model's profile)."""

DIVIDE = {0x0: 2, 0x1: 4, 0x2: 8, 0x3: 16, 0x8: 32, 0x9: 64, 0xA: 128, 0xB: 1}
"""SDM Figure 10-10 / reference §1.5: TDCR bits 3,1,0 -> divisor."""


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
class Kicks:
    """Counts ``notify_hook`` calls: one per interrupt the APIC accepted."""

    def __init__(self, apic: LocalApic) -> None:
        self.count = 0
        apic.notify_hook = self._kick

    def _kick(self, apic: LocalApic) -> None:
        self.count += 1


def make_apic(
    profile: str = "kvm", *, features: Features | None = None, clock: Clock | None = None
) -> LocalApic:
    """vCPU 0 after RESET, software-enabled (SVR = 0x1FF)."""
    apic = LocalApic(0, profile, features=features, clock=clock)
    apic.mmio_write(SVR, 0x1FF)
    return apic


def arm(apic: LocalApic, *, lvtt: int, tdcr: int, tmict: int) -> None:
    """Program the timer the way a guest does: TDCR, LVTT, then TMICT."""
    apic.mmio_write(TDCR, tdcr)
    apic.mmio_write(LVTT, lvtt)
    apic.mmio_write(TMICT, tmict)


def tmcct(apic: LocalApic) -> int:
    return apic.mmio_read(TMCCT)


def drain(apic: LocalApic) -> list[int]:
    """Acknowledge and EOI everything deliverable; the vectors, in delivery order."""
    got: list[int] = []
    while (v := apic.ack()) is not None:
        got.append(v)
        apic.eoi()
    return got


def image_tmcct(state: bytes) -> int:
    return int.from_bytes(state[TMCCT : TMCCT + 4], "little")


def with_tmcct(state: bytes, value: int) -> bytes:
    s = bytearray(state)
    s[TMCCT : TMCCT + 4] = value.to_bytes(4, "little")
    return bytes(s)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------
# TIMER-1 / REG-TDCR-1: the divide configuration
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("written", range(16))
def test_divide_configuration_maps_to_the_sdm_table__TIMER_1(written: int) -> None:
    """TIMER-1, REG-TDCR-1: TDCR stores ``val & 0xB``; the divisor follows §1.5's table and
    sets the count rate (one tick per ``divide`` ns)."""
    stored = written & 0xB
    divide = DIVIDE[stored]
    apic = make_apic()
    kicks = Kicks(apic)
    arm(apic, lvtt=VEC, tdcr=written, tmict=100)
    assert apic.mmio_read(TDCR) == stored
    apic.advance(40 * divide)
    assert tmcct(apic) == 60
    apic.advance(60 * divide - 1)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1
    assert apic.irr == {VEC}


@pytest.mark.parametrize(("written", "reads", "divide"), [(0xF, 0xB, 1), (0x4, 0x0, 2)])
def test_tdcr_bit_2_and_upper_bits_are_dropped__REG_TDCR_1(
    written: int, reads: int, divide: int
) -> None:
    """REG-TDCR-1 examples: write 0xF -> reads 0xB, divide 1; write 0x4 -> reads 0x0, divide 2.
    Upper bits are dropped too."""
    for value in (written, written | 0xFFFFFFF0):
        apic = make_apic()
        arm(apic, lvtt=VEC, tdcr=value, tmict=1000)
        assert apic.mmio_read(TDCR) == reads
        apic.advance(10 * divide)
        assert tmcct(apic) == 990


def test_tdcr_default_after_reset_divides_by_2__TIMER_1() -> None:
    """TIMER-1 / §15: TDCR is 0 after RESET, i.e. divide by 2."""
    apic = make_apic()
    assert apic.mmio_read(TDCR) == 0
    apic.mmio_write(LVTT, VEC)
    apic.mmio_write(TMICT, 1000)
    apic.advance(200)
    assert tmcct(apic) == 900


# ---------------------------------------------------------------------------------------
# TIMER-2: one-shot
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("vector", [0x20, VEC])
@pytest.mark.parametrize("profile", PROFILES)
def test_one_shot_counts_down_and_fires_once_through_lvtt__TIMER_2(
    profile: str, vector: int
) -> None:
    """TIMER-2: TMICT 1000, divide 2 -> period 2000 ns.  TMCCT = remaining // 2 (floor),
    the interrupt at exactly 2000 ns with LVTT's vector (edge: LVTT has no level bit), once;
    TMCCT reads 0 after, TMICT keeps its value."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=vector, tdcr=0x0, tmict=1000)
    assert tmcct(apic) == 1000
    expected = [(1, 999), (1, 999), (1, 998), (997, 500), (998, 1), (1, 0)]
    for step, count in expected:
        apic.advance(step)
        assert tmcct(apic) == count, apic.clock.now
        assert kicks.count == 0
        assert not apic.irr
    assert apic.clock.now == 1999
    apic.advance(1)
    assert kicks.count == 1
    assert apic.irr == {vector}
    assert vector not in apic.tmr
    assert tmcct(apic) == 0
    assert drain(apic) == [vector]
    apic.advance(10**7)
    assert kicks.count == 1
    assert not apic.irr
    assert tmcct(apic) == 0
    assert apic.mmio_read(TMICT) == 1000


def test_one_shot_via_x2apic_msrs__TIMER_2() -> None:
    """TIMER-2 in x2APIC mode: LVTT 0x832, TDCR 0x83E, TMICT 0x838, TMCCT 0x839."""
    apic = make_apic()
    kicks = Kicks(apic)
    apic.set_apic_base(0xFEE00C00)
    assert apic.x2apic_mode
    apic.wrmsr(0x83E, 0xB)
    apic.wrmsr(0x832, VEC)
    apic.wrmsr(0x838, 500)
    assert apic.rdmsr(0x838) == 500
    assert apic.rdmsr(0x83E) == 0xB
    apic.advance(100)
    assert apic.rdmsr(0x839) == 400
    apic.advance(399)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1
    assert apic.irr == {VEC}
    assert apic.rdmsr(0x839) == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_masked_lvtt_delivers_nothing__TIMER_2(profile: str) -> None:
    """TIMER-2: the expiry goes through LVTT; masked -> no IRR bit, no kick."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=MASKED | VEC, tdcr=0xB, tmict=100)
    assert apic.mmio_read(LVTT) == MASKED | VEC
    apic.advance(1000)
    assert kicks.count == 0
    assert not apic.irr
    assert tmcct(apic) == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_software_disable_masks_lvtt_so_the_expiry_is_lost__TIMER_2(profile: str) -> None:
    """TIMER-2 / REG-SVR-2: clearing SVR bit 8 sets LVTT.MASKED; re-enabling SVR does not
    clear it, so the running one-shot expires into a masked LVTT and nothing is raised."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=VEC, tdcr=0xB, tmict=1000)
    apic.advance(100)
    apic.mmio_write(SVR, 0xFF)
    assert apic.mmio_read(LVTT) == MASKED | VEC
    apic.mmio_write(SVR, 0x1FF)
    assert apic.mmio_read(LVTT) == MASKED | VEC
    apic.advance(10_000)
    assert kicks.count == 0
    assert not apic.irr


# ---------------------------------------------------------------------------------------
# TIMER-3: periodic
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
def test_periodic_period_is_raised_to_200us_under_kvm_only__TIMER_3(profile: str) -> None:
    """TIMER-3: TMICT 1000, divide 1.  kvm: period 200000 ns (min_timer_period_us);
    sdm: 1000 ns.  TMCCT = (remaining mod period) // divide, so under kvm it exceeds TMICT."""
    period = max(1000, MIN_PERIOD[profile])
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=PERIODIC | VEC, tdcr=0xB, tmict=1000)
    apic.advance(250)
    assert tmcct(apic) == period - 250
    apic.advance(period - 250 - 1)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1
    assert drain(apic) == [VEC]
    apic.advance(period - 1)
    assert kicks.count == 1
    apic.advance(1)
    assert kicks.count == 2
    assert apic.irr == {VEC}


@pytest.mark.parametrize("profile", PROFILES)
def test_one_shot_period_is_not_raised__TIMER_3(profile: str) -> None:
    """TIMER-3: the 200 us floor is for periodic mode only; a 1000 ns one-shot fires at 1000."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=ONE_SHOT | VEC, tdcr=0xB, tmict=1000)
    apic.advance(999)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1


@pytest.mark.parametrize("profile", PROFILES)
def test_periodic_reloads_at_target_plus_period__TIMER_3(profile: str) -> None:
    """TIMER-3: period 300000 ns (above the kvm floor).  Expiries at P, 2P, 3P, measured
    from the target, not from the instant the expiry was noticed."""
    p = 300_000
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=PERIODIC | VEC, tdcr=0xB, tmict=p)
    apic.advance(p + 10)
    assert kicks.count == 1
    assert drain(apic) == [VEC]
    assert tmcct(apic) == p - 10
    apic.advance(p - 11)
    assert kicks.count == 1
    apic.advance(1)
    assert kicks.count == 2
    drain(apic)
    apic.advance(p // 2)
    assert tmcct(apic) == p // 2
    assert apic.mmio_read(TMICT) == p
    apic.advance(p // 2)
    assert kicks.count == 3


@pytest.mark.parametrize("profile", PROFILES)
def test_long_advance_gives_one_interrupt_and_next_expiry_now_plus_period__TIMER_3(
    profile: str,
) -> None:
    """TIMER-3: ten periods missed at once -> one interrupt (no catch-up); the next expiry is
    now + period (KVM ``advance_periodic_target_expiration``)."""
    p = 300_000
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=PERIODIC | VEC, tdcr=0xB, tmict=p)
    assert apic.advance(10 * p + 37) == 1
    assert kicks.count == 1
    assert drain(apic) == [VEC]
    apic.advance(1)
    assert tmcct(apic) == p - 1
    apic.advance(p - 2)
    assert kicks.count == 1
    apic.advance(1)
    assert kicks.count == 2
    assert apic.irr == {VEC}


@pytest.mark.parametrize("profile", PROFILES)
def test_masked_periodic_timer_keeps_running__TIMER_3(profile: str) -> None:
    """TIMER-3 / TIMER-2: a masked LVTT loses the expiry but the periodic timer runs on;
    after unmasking (same mode) the next reload delivers."""
    p = 300_000
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=MASKED | PERIODIC | VEC, tdcr=0xB, tmict=p)
    apic.advance(p + 5)
    assert kicks.count == 0
    apic.mmio_write(LVTT, PERIODIC | VEC)
    assert apic.mmio_read(TMICT) == p
    assert tmcct(apic) == p - 5
    apic.advance(p - 6)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1
    assert apic.irr == {VEC}


# ---------------------------------------------------------------------------------------
# TIMER-4: TSC deadline
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
def test_tsc_deadline_fires_when_the_tsc_reaches_it__TIMER_4(profile: str) -> None:
    """TIMER-4: LVTT deadline mode; WRMSR 0x6E0 arms; fires when TSC >= deadline (1 GHz TSC:
    one tick per ns); the MSR then reads 0; TMCCT reads 0 throughout."""
    apic = make_apic(profile, clock=Clock(now=1_000_000))
    kicks = Kicks(apic)
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    assert apic.mmio_read(LVTT) == TSC_DEADLINE_MODE | VEC
    apic.wrmsr(TSC_DEADLINE, 1_005_000)
    assert apic.rdmsr(TSC_DEADLINE) == 1_005_000
    assert tmcct(apic) == 0
    apic.advance(4_999)
    assert kicks.count == 0
    assert apic.rdmsr(TSC_DEADLINE) == 1_005_000
    apic.advance(1)
    assert kicks.count == 1
    assert apic.irr == {VEC}
    assert apic.rdmsr(TSC_DEADLINE) == 0
    drain(apic)
    apic.advance(10**9)
    assert kicks.count == 1
    assert not apic.irr


def test_tsc_deadline_follows_the_tsc_frequency__TIMER_4() -> None:
    """TIMER-4: at 2.5 GHz, deadline 10001 is reached at 4001 ns (TSC 10002), not 4000 ns
    (TSC 10000)."""
    apic = make_apic(clock=Clock(tsc_khz=2_500_000))
    kicks = Kicks(apic)
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    apic.wrmsr(TSC_DEADLINE, 10_001)
    apic.advance(4_000)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1
    assert apic.irr == {VEC}


@pytest.mark.parametrize("behind", [0, 1, 5_000])
def test_tsc_deadline_at_or_before_now_fires_at_once__TIMER_4(behind: int) -> None:
    """TIMER-4: a deadline <= current TSC fires during the WRMSR, then reads 0."""
    apic = make_apic()
    kicks = Kicks(apic)
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    apic.advance(10_000)
    apic.wrmsr(TSC_DEADLINE, 10_000 - behind)
    assert kicks.count == 1
    assert apic.irr == {VEC}
    assert apic.rdmsr(TSC_DEADLINE) == 0


def test_tsc_deadline_write_of_zero_disarms__TIMER_4() -> None:
    """TIMER-4: WRMSR 0x6E0 = 0 disarms an armed deadline."""
    apic = make_apic()
    kicks = Kicks(apic)
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    apic.wrmsr(TSC_DEADLINE, 5_000)
    apic.advance(1_000)
    apic.wrmsr(TSC_DEADLINE, 0)
    assert apic.rdmsr(TSC_DEADLINE) == 0
    apic.advance(10**6)
    assert kicks.count == 0
    assert not apic.irr


def test_tsc_deadline_rewrite_moves_the_deadline__TIMER_4() -> None:
    """TIMER-4: a second WRMSR replaces the first deadline (later and earlier)."""
    apic = make_apic()
    kicks = Kicks(apic)
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    apic.wrmsr(TSC_DEADLINE, 5_000)
    apic.wrmsr(TSC_DEADLINE, 8_000)
    apic.advance(7_999)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1
    drain(apic)
    apic.wrmsr(TSC_DEADLINE, 20_000)
    apic.wrmsr(TSC_DEADLINE, 9_000)
    apic.advance(999)
    assert kicks.count == 1
    apic.advance(1)
    assert kicks.count == 2


@pytest.mark.parametrize("mode", [ONE_SHOT, PERIODIC, RESERVED_MODE])
def test_tsc_deadline_msr_ignored_outside_deadline_mode__TIMER_4(mode: int) -> None:
    """TIMER-4: WRMSR 0x6E0 outside TSC-deadline mode arms nothing and the MSR reads 0; a
    later switch to deadline mode does not resurrect the ignored value."""
    apic = make_apic()
    kicks = Kicks(apic)
    apic.mmio_write(LVTT, mode | VEC)
    apic.wrmsr(TSC_DEADLINE, 1_000)
    assert apic.rdmsr(TSC_DEADLINE) == 0
    apic.advance(5_000)
    assert kicks.count == 0
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    assert apic.rdmsr(TSC_DEADLINE) == 0
    apic.advance(5_000)
    assert kicks.count == 0
    assert not apic.irr


def test_tsc_deadline_msr_gp_without_the_cpuid_feature_only_under_sdm__TIMER_4() -> None:
    """TIMER-4: without CPUID.01H:ECX.TSC_DEADLINE, the sdm profile #GPs on WRMSR/RDMSR 0x6E0
    (the MSR does not exist); KVM does not check CPUID there: the write is ignored (LVTT
    cannot even select deadline mode) and the read gives 0."""
    apic = make_apic("sdm", features=Features(tsc_deadline=False))
    kicks = Kicks(apic)
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    with pytest.raises(GuestFault) as info:
        apic.wrmsr(TSC_DEADLINE, 1_000)
    assert info.value.vector == 13
    with pytest.raises(GuestFault):
        apic.rdmsr(TSC_DEADLINE)
    apic.advance(10_000)
    assert kicks.count == 0

    kvm = make_apic("kvm", features=Features(tsc_deadline=False))
    kvm_kicks = Kicks(kvm)
    kvm.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    kvm.wrmsr(TSC_DEADLINE, 1_000)
    assert kvm.rdmsr(TSC_DEADLINE) == 0
    kvm.advance(10_000)
    assert kvm_kicks.count == 0


@pytest.mark.parametrize(
    ("tsc_deadline", "written", "reads"),
    [
        (False, 0xFFFFFFFF, 0x310FF),
        (False, TSC_DEADLINE_MODE | VEC, VEC),
        (False, RESERVED_MODE | VEC, PERIODIC | VEC),
        (True, 0xFFFFFFFF, 0x710FF),
        (True, TSC_DEADLINE_MODE | VEC, TSC_DEADLINE_MODE | VEC),
        (True, RESERVED_MODE | VEC, RESERVED_MODE | VEC),
    ],
)
def test_lvtt_timer_mode_mask_depends_on_tsc_deadline_cpuid__TIMER_4(
    tsc_deadline: bool, written: int, reads: int
) -> None:
    """TIMER-4 / REG-LVT-1: the LVTT timer-mode mask is 0x60000 with TSC-deadline in CPUID,
    else 0x20000."""
    apic = make_apic(features=Features(tsc_deadline=tsc_deadline))
    apic.mmio_write(LVTT, written)
    assert apic.mmio_read(LVTT) == reads


def test_deadline_bit_without_cpuid_leaves_a_one_shot_timer__TIMER_4() -> None:
    """TIMER-4: without TSC-deadline support LVTT 0x400EF is a one-shot LVTT: TMICT is
    stored and counts (it would be ignored in deadline mode)."""
    apic = make_apic(features=Features(tsc_deadline=False))
    kicks = Kicks(apic)
    arm(apic, lvtt=TSC_DEADLINE_MODE | VEC, tdcr=0xB, tmict=100)
    assert apic.mmio_read(TMICT) == 100
    apic.advance(40)
    assert tmcct(apic) == 60
    apic.advance(60)
    assert kicks.count == 1
    assert apic.irr == {VEC}


# ---------------------------------------------------------------------------------------
# TIMER-5: mode switches
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("start", [ONE_SHOT, PERIODIC])
def test_switch_to_deadline_mode_zeroes_tmict_and_stops_the_count__TIMER_5(
    profile: str, start: int
) -> None:
    """TIMER-5 / REG-TMR-1: counting timer, LVTT -> TSC-deadline: TMICT := 0, the count
    stops; switching back does not restart it."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=start | VEC, tdcr=0xB, tmict=300_000)
    apic.advance(1_000)
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    assert apic.mmio_read(TMICT) == 0
    assert tmcct(apic) == 0
    apic.advance(10**6)
    assert kicks.count == 0
    apic.mmio_write(LVTT, start | VEC)
    assert apic.mmio_read(TMICT) == 0
    assert tmcct(apic) == 0
    apic.advance(10**6)
    assert kicks.count == 0
    assert not apic.irr


@pytest.mark.parametrize("to", [ONE_SHOT, PERIODIC])
def test_switch_out_of_deadline_mode_disarms_the_deadline__TIMER_5(to: int) -> None:
    """TIMER-5: armed deadline, LVTT -> one-shot/periodic: the deadline is dropped (MSR reads
    0, nothing fires, also not after switching back); TMICT reads 0."""
    apic = make_apic()
    kicks = Kicks(apic)
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    apic.wrmsr(TSC_DEADLINE, 5_000)
    apic.mmio_write(LVTT, to | VEC)
    assert apic.rdmsr(TSC_DEADLINE) == 0
    assert apic.mmio_read(TMICT) == 0
    apic.advance(10_000)
    assert kicks.count == 0
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    assert apic.rdmsr(TSC_DEADLINE) == 0
    apic.advance(10_000)
    assert kicks.count == 0
    assert not apic.irr


@pytest.mark.parametrize("profile", PROFILES)
def test_one_shot_periodic_switch_keeps_tmict__TIMER_5(profile: str) -> None:
    """TIMER-5: only a switch across TSC-deadline zeroes TMICT; one-shot <-> periodic keeps
    TMICT and the running count."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=ONE_SHOT | VEC, tdcr=0xB, tmict=300_000)
    apic.advance(100_000)
    apic.mmio_write(LVTT, PERIODIC | VEC)
    assert apic.mmio_read(TMICT) == 300_000
    assert tmcct(apic) == 200_000
    apic.mmio_write(LVTT, ONE_SHOT | VEC)
    assert apic.mmio_read(TMICT) == 300_000
    apic.advance(200_000)
    assert kicks.count == 1


# ---------------------------------------------------------------------------------------
# TIMER-6: divide change while counting
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(("old", "new"), [(0x0, 0x3), (0x3, 0xB), (0xB, 0xA), (0x9, 0x1)])
def test_tdcr_change_keeps_the_remaining_count__TIMER_6(profile: str, old: int, new: int) -> None:
    """TIMER-6: one-shot TMICT 1000; after 250 ticks TDCR changes: TMCCT stays 750 and the
    remaining 750 ticks run at the new divide (remaining time scaled by new/old)."""
    old_div, new_div = DIVIDE[old], DIVIDE[new]
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=VEC, tdcr=old, tmict=1000)
    apic.advance(250 * old_div)
    assert tmcct(apic) == 750
    apic.mmio_write(TDCR, new)
    assert tmcct(apic) == 750
    apic.advance(100 * new_div)
    assert tmcct(apic) == 650
    apic.advance(650 * new_div - 1)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1
    assert apic.irr == {VEC}


@pytest.mark.parametrize("profile", PROFILES)
def test_tdcr_change_rescales_a_periodic_timer__TIMER_6(profile: str) -> None:
    """TIMER-6: periodic TMICT 300000 at divide 1; at count 200000 the divide becomes 2: the
    count is kept (expiry 400000 ns later) and the next period is 600000 ns."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=PERIODIC | VEC, tdcr=0xB, tmict=300_000)
    apic.advance(100_000)
    assert tmcct(apic) == 200_000
    apic.mmio_write(TDCR, 0x0)
    assert tmcct(apic) == 200_000
    apic.advance(399_999)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1
    drain(apic)
    apic.advance(2)
    assert tmcct(apic) == 299_999
    apic.advance(599_997)
    assert kicks.count == 1
    apic.advance(1)
    assert kicks.count == 2


# ---------------------------------------------------------------------------------------
# TIMER-7 / REG-TMR-1: TMCCT and TMICT
# ---------------------------------------------------------------------------------------
def test_tmcct_is_zero_after_reset__TIMER_7() -> None:
    """TIMER-7: TMICT 0 -> TMCCT 0, even with a time-consuming LVTT configuration."""
    apic = make_apic()
    assert tmcct(apic) == 0
    apic.mmio_write(LVTT, PERIODIC | VEC)
    apic.advance(10**6)
    assert apic.mmio_read(TMICT) == 0
    assert tmcct(apic) == 0


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("mode", [ONE_SHOT, PERIODIC])
def test_tmict_write_of_zero_stops_the_timer__TIMER_7(profile: str, mode: int) -> None:
    """TIMER-7 / REG-TMR-1: TMICT := 0 while counting stops it; TMCCT 0, no interrupt."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=mode | VEC, tdcr=0xB, tmict=300_000)
    apic.advance(1_000)
    apic.mmio_write(TMICT, 0)
    assert tmcct(apic) == 0
    apic.advance(10**7)
    assert kicks.count == 0
    assert tmcct(apic) == 0


def test_tmcct_is_zero_in_deadline_mode_while_armed__TIMER_7() -> None:
    """TIMER-7: TSC-deadline mode -> TMCCT 0 even with a deadline pending."""
    apic = make_apic()
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    apic.wrmsr(TSC_DEADLINE, 50_000)
    apic.advance(1_000)
    assert tmcct(apic) == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_tmcct_is_zero_after_one_shot_expiry__TIMER_7(profile: str) -> None:
    """TIMER-7: an expired one-shot reads 0 (not a wrapped count), however long after."""
    apic = make_apic(profile)
    arm(apic, lvtt=VEC, tdcr=0x0, tmict=1000)
    for step in (2_000, 1, 999, 1_000, 10**6):
        apic.advance(step)
        assert tmcct(apic) == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_tmict_write_ignored_in_deadline_mode__REG_TMR_1(profile: str) -> None:
    """REG-TMR-1: TMICT writes are ignored in TSC-deadline mode (TMICT reads 0, no count) and
    do not disturb an armed deadline."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    apic.mmio_write(LVTT, TSC_DEADLINE_MODE | VEC)
    apic.wrmsr(TSC_DEADLINE, 5_000)
    apic.mmio_write(TMICT, 1_000)
    assert apic.mmio_read(TMICT) == 0
    assert tmcct(apic) == 0
    apic.advance(4_999)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1
    assert apic.rdmsr(TSC_DEADLINE) == 0
    apic.advance(10**6)
    assert kicks.count == 1


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("mode", [ONE_SHOT, PERIODIC])
def test_tmict_write_restarts_the_count__REG_TMR_1(profile: str, mode: int) -> None:
    """REG-TMR-1: TMICT stores the value and (re)starts from it: a rewrite mid-count moves the
    expiry to one full period after the rewrite."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=mode | VEC, tdcr=0x0, tmict=300_000)
    apic.advance(400_000)
    assert tmcct(apic) == 100_000
    apic.mmio_write(TMICT, 250_000)
    assert apic.mmio_read(TMICT) == 250_000
    apic.advance(1)
    assert tmcct(apic) == 249_999
    apic.advance(499_998)
    assert kicks.count == 0
    apic.advance(1)
    assert kicks.count == 1


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(
    ("mode", "tdcr", "tmict"),
    [(ONE_SHOT, 0x0, 1000), (ONE_SHOT, 0xA, 7), (ONE_SHOT, 0xB, 1), (PERIODIC, 0xB, 300_000)],
)
def test_tmcct_at_the_instant_of_the_tmict_write_is_tmict__REG_TMR_1(
    profile: str, mode: int, tdcr: int, tmict: int
) -> None:
    """REG-TMR-1 (model's documented choice): a TMCCT read at the instant of the TMICT write
    returns TMICT."""
    apic = make_apic(profile)
    arm(apic, lvtt=mode | VEC, tdcr=tdcr, tmict=tmict)
    assert tmcct(apic) == tmict


@pytest.mark.parametrize("profile", PROFILES)
def test_tmcct_at_the_instant_of_a_clamped_periodic_tmict_write__REG_TMR_1(profile: str) -> None:
    """REG-TMR-1 / TIMER-3: the documented same-instant choice reads the full period in ticks,
    which is TMICT unless kvm raised the periodic period to 200 us: TMICT 1000 at divide 1
    reads 1000 (sdm) or 200000 (kvm) at the write instant, and (remaining mod period) //
    divide one ns later."""
    period = max(1000, MIN_PERIOD[profile])
    apic = make_apic(profile)
    arm(apic, lvtt=PERIODIC | VEC, tdcr=0xB, tmict=1000)
    assert tmcct(apic) == period
    apic.advance(1)
    assert tmcct(apic) == period - 1


@pytest.mark.parametrize("profile", PROFILES)
def test_reserved_timer_mode_counts_nothing__BUG_9(profile: str) -> None:
    """BUG-9 (CVE-2013-6367) replay: LVTT = periodic|0xEF; TMICT = 0; LVTT = 0x600EF (mode
    11b, reserved); TMICT = 0x1000 -> TMCCT reads 0, no error, nothing raised."""
    apic = make_apic(profile)
    kicks = Kicks(apic)
    apic.mmio_write(LVTT, PERIODIC | 0xEF)
    apic.mmio_write(TMICT, 0)
    apic.mmio_write(LVTT, 0x600EF)
    assert apic.mmio_read(LVTT) == 0x600EF
    apic.mmio_write(TMICT, 0x1000)
    assert apic.mmio_read(TMICT) == 0x1000
    assert tmcct(apic) == 0
    apic.advance(10**9)
    assert tmcct(apic) == 0
    assert kicks.count == 0
    assert not apic.irr


# ---------------------------------------------------------------------------------------
# STATE-4: KVM_SET_LAPIC restarts the timer from the image's TMCCT
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
def test_restore_mid_count_continues_the_one_shot__STATE_4(profile: str) -> None:
    """STATE-4: GET fills TMCCT with the live count; SET on a fresh APIC at the same clock
    time restarts from it (8500 ticks at divide 2 -> 17000 ns) and keeps TMICT/TDCR/LVTT."""
    a = make_apic(profile)
    arm(a, lvtt=VEC, tdcr=0x0, tmict=10_000)
    a.advance(3_000)
    state = a.get_state()
    assert image_tmcct(state) == 8_500

    b = LocalApic(0, profile, clock=Clock(now=a.clock.now))
    kicks = Kicks(b)
    b.set_state(state)
    assert tmcct(b) == 8_500
    assert b.mmio_read(TMICT) == 10_000
    assert b.mmio_read(TDCR) == 0
    assert b.mmio_read(LVTT) == VEC
    assert image_tmcct(b.get_state()) == 8_500
    b.advance(1_000)
    assert tmcct(b) == 8_000
    b.advance(15_999)
    assert kicks.count == 0
    b.advance(1)
    assert kicks.count == 1
    assert b.irr == {VEC}
    drain(b)
    b.advance(10**7)
    assert kicks.count == 1
    assert tmcct(b) == 0


@pytest.mark.parametrize("profile", PROFILES)
def test_restore_mid_count_continues_the_periodic_timer__STATE_4(profile: str) -> None:
    """STATE-4: periodic 300000 ns restored at count 200000: expiry after 200000 ns, then the
    full period again."""
    a = make_apic(profile)
    arm(a, lvtt=PERIODIC | VEC, tdcr=0xB, tmict=300_000)
    a.advance(100_000)
    state = a.get_state()
    assert image_tmcct(state) == 200_000

    b = LocalApic(0, profile, clock=Clock(now=a.clock.now))
    kicks = Kicks(b)
    b.set_state(state)
    assert tmcct(b) == 200_000
    b.advance(199_999)
    assert kicks.count == 0
    b.advance(1)
    assert kicks.count == 1
    drain(b)
    b.advance(299_999)
    assert kicks.count == 1
    b.advance(1)
    assert kicks.count == 2


@pytest.mark.parametrize("profile", PROFILES)
def test_restore_of_an_expired_one_shot_fires_at_once__STATE_4(profile: str) -> None:
    """STATE-4: an expired one-shot's image has TMCCT 0; SET restarts it with remaining 0,
    so it fires during SET (once), although the image's IRR is empty."""
    a = make_apic(profile)
    arm(a, lvtt=VEC, tdcr=0x0, tmict=1000)
    a.advance(5_000)
    assert drain(a) == [VEC]
    state = a.get_state()
    assert image_tmcct(state) == 0
    assert not any(state[0x200:0x280])

    b = LocalApic(0, profile, clock=Clock(now=a.clock.now))
    b.set_state(state)
    assert b.irr == {VEC}
    assert tmcct(b) == 0
    assert drain(b) == [VEC]
    b.advance(10**7)
    assert drain(b) == []


@pytest.mark.parametrize("profile", PROFILES)
def test_restore_of_periodic_with_tmcct_zero_waits_a_full_period__STATE_4(profile: str) -> None:
    """STATE-4: periodic image with TMCCT 0 -> remaining = one period (not an instant fire)."""
    a = make_apic(profile)
    arm(a, lvtt=PERIODIC | VEC, tdcr=0xB, tmict=300_000)
    state = with_tmcct(a.get_state(), 0)

    b = LocalApic(0, profile, clock=Clock(now=a.clock.now))
    kicks = Kicks(b)
    b.set_state(state)
    assert not b.irr
    b.advance(299_999)
    assert kicks.count == 0
    b.advance(1)
    assert kicks.count == 1


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("mode", [ONE_SHOT, PERIODIC])
def test_restore_clamps_an_oversized_count_to_the_period__STATE_4(profile: str, mode: int) -> None:
    """STATE-4: image TMCCT 900000 > TMICT 300000 (divide 1): the restart uses one period."""
    a = make_apic(profile)
    arm(a, lvtt=mode | VEC, tdcr=0xB, tmict=300_000)
    state = with_tmcct(a.get_state(), 900_000)

    b = LocalApic(0, profile, clock=Clock(now=a.clock.now))
    kicks = Kicks(b)
    b.set_state(state)
    b.advance(1)
    assert tmcct(b) == 299_999
    b.advance(299_998)
    assert kicks.count == 0
    b.advance(1)
    assert kicks.count == 1


# ---------------------------------------------------------------------------------------
# property: one-shot TMCCT
# ---------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    profile=st.sampled_from(PROFILES),
    tdcr=st.integers(0, 0xF),
    tmict=st.integers(1, 10**6),
    data=st.data(),
)
def test_one_shot_tmcct_is_monotonic_and_exact__TIMER_2(
    profile: str, tdcr: int, tmict: int, data: st.DataObject
) -> None:
    """TIMER-2 / TIMER-1 / TIMER-7 property, bus_cycle_ns 1: after ``elapsed`` ns a one-shot
    reads TMCCT = (period - elapsed) // divide = max(0, TMICT - ceil(elapsed / divide)) (KVM's
    floor of the remaining time), which is max(0, TMICT - elapsed // divide) whenever elapsed is
    a multiple of divide; it never increases; one interrupt once elapsed >= period."""
    divide = DIVIDE[tdcr & 0xB]
    period = tmict * divide
    step = st.one_of(
        st.integers(0, 3),
        st.integers(0, 4 * divide),
        st.integers(0, period // 4 + 1),
        st.integers(0, 2 * period),
    )
    steps = data.draw(st.lists(step, min_size=1, max_size=25), label="advances")

    apic = make_apic(profile)
    kicks = Kicks(apic)
    arm(apic, lvtt=VEC, tdcr=tdcr, tmict=tmict)
    previous = tmcct(apic)
    assert previous == tmict
    elapsed = 0
    for ns in steps:
        apic.advance(ns)
        elapsed += ns
        count = tmcct(apic)
        assert count == max(0, tmict - ceil_div(elapsed, divide)), elapsed
        if elapsed % divide == 0:
            assert count == max(0, tmict - elapsed // divide), elapsed
        assert count <= previous, elapsed
        previous = count
        fired = elapsed >= period
        assert kicks.count == int(fired), elapsed
        assert (VEC in apic.irr) == fired, elapsed


# ---------------------------------------------------------------------------------------
# Corners found by mutation testing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
def test_a_restored_count_of_one_tick_fires_one_tick_later__STATE_4_TIMER_2(profile: str) -> None:
    """STATE-4: a one-shot restored with TMCCT = 1 (divide by 1) fires after 1 ns, not at once
    and not a full period later."""
    apic = make_apic(profile)
    image = bytearray(apic.get_state())
    for offset, value in ((LVTT, VEC), (TDCR, 0xB), (TMICT, 1000), (TMCCT, 1)):
        image[offset : offset + 4] = value.to_bytes(4, "little")
    apic.set_state(bytes(image))
    assert not apic.irr
    assert tmcct(apic) == 1
    apic.advance(1)
    assert set(apic.irr) == {VEC}


@pytest.mark.parametrize("profile", PROFILES)
def test_a_tmict_write_in_the_reserved_timer_mode_stops_the_count__TIMER_2(profile: str) -> None:
    """Timer mode 11b counts nothing: after a TMICT write there, a switch to periodic mode
    does not revive a period (the timer's repr shows period=0)."""
    apic = make_apic(profile)
    arm(apic, lvtt=VEC, tdcr=0xB, tmict=1000)
    apic.mmio_write(LVTT, RESERVED_MODE | VEC)
    apic.mmio_write(TMICT, 500)
    assert apic.timer.period == 0
    assert "period=0," in repr(apic.timer)
    apic.mmio_write(LVTT, PERIODIC | VEC)
    assert apic.timer.period == 0
    apic.advance(10_000_000)
    assert not apic.irr


def test_clock_advance_takes_0_to_2_pow_63_ns_and_names_ns() -> None:
    clock = Clock()
    clock.advance(0)
    clock.advance(1 << 63)
    assert clock.now == 1 << 63
    with pytest.raises(ApicValueError, match=r"^ns=0x8000000000000001 is outside "):
        Clock().advance((1 << 63) + 1)
    with pytest.raises(ApicValueError, match=r"^ns=-0x1 is outside "):
        clock.advance(-1)
    with pytest.raises(ApicTypeError, match=r"^ns must be an int, not float$"):
        clock.advance(1.0)  # type: ignore[arg-type]
    assert clock.now == 1 << 63


@pytest.mark.parametrize(("tsc_khz", "tsc", "ns"), [(3, 1, 333_334), (3, 3, 1_000_000), (7, 0, 0)])
def test_the_first_instant_the_tsc_reaches_a_value_is_a_whole_ns__TIMER_4(
    tsc_khz: int, tsc: int, ns: int
) -> None:
    clock = Clock(tsc_khz=tsc_khz)
    got = clock.ns_until_tsc(tsc)
    assert type(got) is int
    assert got == ns
    clock.advance(got)
    assert clock.tsc >= tsc
