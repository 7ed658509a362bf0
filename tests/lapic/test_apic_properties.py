"""Properties and a state machine over one ``LocalApic``.

(a) any guest access raises nothing but #GP, and a faulting access changes nothing (MSR-1..6,
    BASE-2..4, ICR-3, ICR-5); (b) KVM_GET_LAPIC/KVM_SET_LAPIC round trip (STATE-1..4);
(c) PPR and deliverability (PRIO-2, PRIO-3, PRIO-4); (d) EOI (PRIO-5); (e) a rule-based state
machine whose invariants are PRIO-1..3, the vector-register layout (PRIO-1, STATE-1), the x2APIC
identity (MATCH-7, BASE-6, BUG-17), DIFF-D4 and REG-LVR-1.

Profiles drawn: the ``kvm`` and ``sdm`` presets, and ``kvm`` with the SVM split ICR (BUG-19).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lapic import (
    DeliveryMode,
    Features,
    GuestFault,
    Icr,
    Interrupt,
    LocalApic,
    Profile,
    StateError,
    Trigger,
)
from lapic.registers import REGISTERS, STATE_SIZE

PROFILES: dict[str, Profile] = {
    "kvm": Profile.preset("kvm"),
    "sdm": Profile.preset("sdm"),
    "kvm+split": Profile.preset("kvm"),
}
SPLIT = {"kvm+split"}
"""Profile names whose APICs are built with ``icr_split=True`` (the SVM layout, BUG-19)."""

TPR = 0x80
PPR = 0xA0
EOI = 0xB0
SVR = 0xF0
ISR_BASE = 0x100
TMR_BASE = 0x180
IRR_BASE = 0x200
ICR = 0x300
ICR2 = 0x310
LVTT = 0x320
TMICT = 0x380
TMCCT = 0x390
BUSY = 0x1000
X2APIC_ICR_RESERVED = 0xFFF32000
TIMER_PERIODIC = 0x20000
TIMER_TSC_DEADLINE = 0x40000
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

APIC_BASES = [
    0xFEE00800,
    0xFEE00900,
    0xFEE00C00,
    0xFEE00D00,
    0xFEE00000,
    0xFEE00100,
    0xFEE00400,
    0xFEE00A00,
    0xFED00800,
    0xFED00C00,
    0x1_00000800,
    0,
]
INTERESTING_32 = [
    0, 1, 0xFF, 0x100, 0x1FF, 0x11FF, 0x3FF, 0xFFFFFFFF, 0x0FFFFFFF, 0xF0000000, 0x10000,
    0x400, 0x700, 0x8041, 0x41, 0xEF, 0x200EF, 0x400EF, 0x600EF, 0x000040F1, 0x000050F1,
    0x000400F1, 0x000C40F1, 0x000C44F1, 0x0000C9F1, 0x00004500, 0x00004600 | 0x9A,
    0x03000000, 0x01000000, 0xFF000000, 0xB, 0x8, 1000, 100_000,
]
LVT_OFFSETS = [0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370]
LVT_NAMES = ["LVTT", "LVTTHMR", "LVTPC", "LVT0", "LVT1", "LVTERR", "LVTCMCI"]


# =====================================================================================
# Helpers
# =====================================================================================
def word(buf: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(buf[offset : offset + 4], "little")


def put32(image: bytearray, offset: int, value: int) -> None:
    image[offset : offset + 4] = value.to_bytes(4, "little")


def ppr_formula(tpr: int, isr_highest: int) -> int:
    """PRIO-2."""
    isrv = max(isr_highest, 0)
    return tpr & 0xFF if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0


def x2apic_ldr(vcpu_id: int) -> int:
    """MATCH-7, as KVM's u32 ``kvm_apic_calc_x2apic_ldr``."""
    return (((vcpu_id >> 4) << 16) | (1 << (vcpu_id & 0xF))) & U32


def vector_words(vectors: set[int] | frozenset[int]) -> list[int]:
    words = [0] * 8
    for v in vectors:
        words[v >> 5] |= 1 << (v & 31)
    return words


def load_vectors(image: bytearray, base: int, vectors: set[int] | frozenset[int]) -> None:
    for n, w in enumerate(vector_words(vectors)):
        put32(image, base + 0x10 * n, w)


@dataclass(frozen=True)
class Snapshot:
    """Everything a faulting access must leave as it was."""

    state: bytes
    state_32: bytes
    apic_base: int
    events: tuple[object, ...]

    @classmethod
    def of(cls, apic: LocalApic) -> Snapshot:
        return cls(
            apic.get_state(),
            apic.get_state(x2apic_format=True),
            apic.apic_base,
            (
                apic.nmi_pending,
                apic.smi_pending,
                apic.init_pending,
                apic.sipi_pending,
                apic.sipi_vector,
                apic.pv_unhalted,
                apic.arb_prio,
            ),
        )


def guest(apic: LocalApic, access: Callable[[], object]) -> bool:
    """Run one guest access.  Only #GP may escape it, and a #GP must change nothing.
    Returns whether it faulted."""
    before = Snapshot.of(apic)
    try:
        access()
    except GuestFault as fault:
        assert fault.vector == 13, fault
        after = Snapshot.of(apic)
        assert after == before, f"{fault!r} changed the APIC"
        return True
    return False


def counter_restarts_differently(apic: LocalApic, image: bytes) -> bool:
    """STATE-4 (code-derived): a one-shot/periodic timer whose image TMCCT is 0 is not restored
    as 0 (a one-shot fires at once, a periodic one gets a full period); a timer in the reserved
    mode 11b is stopped by SET.  Such images are not fixed points of GET -> SET -> GET."""
    if word(image, TMICT) == 0:
        return False
    mode = apic.timer.mode
    if mode == TIMER_TSC_DEADLINE:
        return False
    if mode not in (0, TIMER_PERIODIC):
        return True
    return word(image, TMCCT) == 0


# =====================================================================================
# Strategies
# =====================================================================================
def features() -> st.SearchStrategy[Features]:
    return st.builds(
        Features,
        x2apic=st.booleans(),
        tsc_deadline=st.booleans(),
        cmci=st.booleans(),
        directed_eoi=st.booleans(),
        smm=st.booleans(),
        maxphyaddr=st.sampled_from([36, 39, 46, 48, 52]),
        intel_compatible=st.booleans(),
    )


vcpu_ids = st.one_of(st.sampled_from([0, 1, 3, 17, 0xFF, 0x100, 0x123]), st.integers(0, 0xFFFFF))
values_32 = st.one_of(st.sampled_from(INTERESTING_32), st.integers(0, U32))
values_64 = st.one_of(
    st.sampled_from(APIC_BASES),
    values_32,
    st.integers(0, U64).map(lambda v: v & ~X2APIC_ICR_RESERVED),
    st.integers(0, U64),
)
offsets = st.one_of(
    st.sampled_from(sorted({r.offset for r in REGISTERS} | {0x3F0, 0x090, 0x0C0})),
    st.integers(0, 0xFFF),
)
msrs = st.one_of(
    st.just(0x1B),
    st.sampled_from(sorted(r.msr for r in REGISTERS if r.msr is not None)),
    st.integers(0x800, 0x8FF),
)


@dataclass(frozen=True)
class Op:
    """One guest access (or interrupt-controller event) on an APIC."""

    kind: str
    args: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(hex(a) for a in self.args)})"

    def apply(self, apic: LocalApic) -> None:
        a = self.args
        if self.kind == "mmio_read":
            apic.mmio_read(a[0], a[1])
        elif self.kind == "mmio_write":
            apic.mmio_write(a[0], a[1], a[2])
        elif self.kind == "rdmsr":
            apic.rdmsr(a[0])
        elif self.kind == "wrmsr":
            apic.wrmsr(a[0], a[1])
        elif self.kind == "accept":
            apic.accept(a[0], DeliveryMode(a[1]), Trigger(a[2]), bool(a[3]))
        elif self.kind == "ack":
            apic.ack()
        elif self.kind == "eoi":
            apic.eoi()
        elif self.kind == "advance":
            apic.advance(a[0])
        else:  # pragma: no cover - the strategy makes no other kinds
            raise AssertionError(self.kind)


@st.composite
def _mmio_writes(draw: st.DrawFn) -> Op:
    offset = draw(offsets)
    size = draw(st.one_of(st.just(4), st.sampled_from([1, 2, 4, 8])))
    value = draw(st.one_of(values_32, st.integers(0, U64))) & ((1 << (8 * size)) - 1)
    return Op("mmio_write", (offset, value, size))


guest_ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(lambda o, s: Op("mmio_read", (o, s)), offsets, st.sampled_from([1, 2, 4, 8])),
    _mmio_writes(),
    st.builds(lambda m: Op("rdmsr", (m,)), msrs),
    st.builds(lambda m, v: Op("wrmsr", (m, v)), msrs, values_64),
    st.builds(
        lambda v, m, t, lv: Op("accept", (v, m, t, lv)),
        st.integers(0, 255),
        st.integers(0, 7),
        st.integers(0, 1),
        st.integers(0, 1),
    ),
    st.just(Op("ack")),
    st.just(Op("eoi")),
    st.builds(lambda ns: Op("advance", (ns,)), st.integers(0, 3_000_000)),
)


@dataclass(frozen=True)
class Config:
    profile: str
    vcpu_id: int
    bsp: bool
    features: Features

    def build(self) -> LocalApic:
        return LocalApic(
            self.vcpu_id,
            PROFILES[self.profile],
            self.bsp,
            features=self.features,
            icr_split=self.profile in SPLIT,
        )


configs = st.builds(Config, st.sampled_from(sorted(PROFILES)), vcpu_ids, st.booleans(), features())


def run(apic: LocalApic, ops: list[Op]) -> None:
    for op in ops:
        note(f"{op!r}")
        guest(apic, partial(op.apply, apic))


# =====================================================================================
# (a) guest accesses raise nothing but #GP; a #GP changes nothing
# =====================================================================================
@given(config=configs, ops=st.lists(guest_ops, max_size=60))
def test_guest_accesses_raise_only_gp_and_a_faulting_access_changes_nothing__MSR_1_BASE_2(
    config: Config, ops: list[Op]
) -> None:
    """MSR-1..MSR-6, BASE-2..BASE-4, ICR-3, ICR-5: the only exception a guest can see is #GP
    (vector 13), and the access that raised it left the APIC exactly as it was."""
    apic = config.build()
    run(apic, ops)


@given(config=configs, ops=st.lists(guest_ops, max_size=30))
def test_guest_accesses_from_x2apic_mode_raise_only_gp__MSR_3_MSR_5(
    config: Config, ops: list[Op]
) -> None:
    """Same property, starting in x2APIC mode (where most MSR accesses are live)."""
    assume(config.features.x2apic)
    apic = config.build()
    apic.mmio_write(SVR, 0x1FF)
    apic.wrmsr(0x1B, 0xFEE00C00)
    run(apic, ops)


@given(
    vcpu_id=st.one_of(st.integers(0, 0xFFFFFFFE), st.sampled_from([0xFFFFF, 0x100000, 0xFFFFFFFE])),
    profile=st.sampled_from(sorted(PROFILES)),
    host=st.booleans(),
)
def test_entering_x2apic_mode_works_for_every_vcpu_id_the_constructor_accepts__MATCH_7_BASE_6(
    vcpu_id: int, profile: str, host: bool
) -> None:
    """BASE-6: EXTD 0->1 sets the x2APIC ID to vcpu_id and LDR to the MATCH-7 value (a 32-bit
    register, as KVM's u32 computation)."""
    apic = LocalApic(vcpu_id, PROFILES[profile], icr_split=profile in SPLIT)
    apic.wrmsr(0x1B, 0xFEE00C00, host_initiated=host)
    assert apic.x2apic_mode
    assert apic.rdmsr(0x802) == vcpu_id
    assert apic.rdmsr(0x80D) == x2apic_ldr(vcpu_id)
    assert len(apic.get_state(x2apic_format=True)) == STATE_SIZE


# =====================================================================================
# (b) GET/SET round trip
# =====================================================================================
@given(config=configs, ops=st.lists(guest_ops, max_size=40), fmt=st.booleans())
def test_set_state_of_a_get_state_image_is_the_identity__STATE_1_STATE_3_STATE_4(
    config: Config, ops: list[Op], fmt: bool
) -> None:
    apic = config.build()
    apic.send_hook = lambda a, irq: None
    run(apic, ops)
    image = apic.get_state(x2apic_format=fmt)
    assume(not counter_restarts_differently(apic, image))
    base = apic.apic_base
    apic.set_state(image, x2apic_format=fmt)
    assert apic.get_state(x2apic_format=fmt) == image
    assert apic.apic_base == base


@given(config=configs, ops=st.lists(guest_ops, max_size=40), fmt=st.booleans())
def test_a_get_state_image_moves_to_a_twin_apic_unchanged__STATE_1_STATE_2_STATE_3(
    config: Config, ops: list[Op], fmt: bool
) -> None:
    apic = config.build()
    apic.send_hook = lambda a, irq: None
    run(apic, ops)
    image = apic.get_state(x2apic_format=fmt)
    assume(not counter_restarts_differently(apic, image))
    assume(apic.timer.mode != TIMER_TSC_DEADLINE)  # the deadline MSR is not in the image
    twin = config.build()
    twin.send_hook = lambda a, irq: None
    twin.set_apic_base(apic.apic_base, host_initiated=True)
    twin.set_state(image, x2apic_format=fmt)
    expected = bytearray(image)
    if twin.profile.set_state_stale_ppr:  # STATE-4: PPR from TPR alone on a fresh APIC (kvm)
        put32(expected, PPR, ppr_formula(word(image, TPR), -1))
    assert twin.get_state(x2apic_format=fmt) == bytes(expected)
    assert twin.ppr == word(image, PPR)
    assert twin.get_state(x2apic_format=fmt) == image


# =====================================================================================
# (c) PPR and deliverability
# =====================================================================================
vector_sets = st.frozensets(st.integers(0, 255), max_size=8)


@given(
    profile=st.sampled_from(sorted(PROFILES)),
    tpr=st.integers(0, 255),
    isr=vector_sets,
    irr=vector_sets,
    sw_enabled=st.booleans(),
    x2=st.booleans(),
)
def test_ppr_and_the_deliverable_vector_follow_the_formulas__PRIO_2_PRIO_3_PRIO_4(
    profile: str,
    tpr: int,
    isr: frozenset[int],
    irr: frozenset[int],
    sw_enabled: bool,
    x2: bool,
) -> None:
    apic = LocalApic(0, PROFILES[profile], icr_split=profile in SPLIT)
    if x2:
        apic.wrmsr(0x1B, 0xFEE00C00)
    image = bytearray(apic.get_state())
    put32(image, TPR, tpr)
    put32(image, SVR, 0x1FF if sw_enabled else 0xFF)
    load_vectors(image, ISR_BASE, isr)
    load_vectors(image, IRR_BASE, irr)
    apic.set_state(bytes(image))

    ppr = ppr_formula(tpr, max(isr, default=-1))
    # STATE-4: kvm (``set_state_stale_ppr``, measured) computes PPR at SET before it counts the
    # restored ISR, so from TPR alone for an APIC with nothing in service; sdm: from the image.
    stale = apic.profile.set_state_stale_ppr
    assert word(apic.regs, PPR) == (ppr_formula(tpr, -1) if stale else ppr)
    assert apic.ppr == ppr  # a PPR read recomputes it (PRIO-2)
    assert word(apic.regs, PPR) == ppr
    assert (apic.rdmsr(0x80A) if x2 else apic.mmio_read(PPR)) == ppr

    top = max(irr, default=-1)
    expected = top if top >= 0 and (top & 0xF0) > ppr else None
    assert apic.pending_interrupt() == expected
    assert apic.ack() == expected
    if expected is not None:
        assert set(apic.irr) == set(irr) - {expected}
        assert set(apic.isr) == set(isr) | {expected}
        assert word(apic.regs, PPR) == ppr_formula(tpr, max(isr | {expected}))
    else:
        assert set(apic.irr) == set(irr)
        assert set(apic.isr) == set(isr)


@given(
    profile=st.sampled_from(sorted(PROFILES)),
    isr=vector_sets,
    irr=vector_sets,
    new_tpr=st.integers(0, U32),
)
def test_a_tpr_write_recomputes_ppr_at_once__PRIO_2(
    profile: str, isr: frozenset[int], irr: frozenset[int], new_tpr: int
) -> None:
    apic = LocalApic(0, PROFILES[profile], icr_split=profile in SPLIT)
    image = bytearray(apic.get_state())
    load_vectors(image, ISR_BASE, isr)
    load_vectors(image, IRR_BASE, irr)
    apic.set_state(bytes(image))
    apic.mmio_write(TPR, new_tpr)
    assert word(apic.regs, PPR) == ppr_formula(new_tpr & 0xFF, max(isr, default=-1))


@given(profile=st.sampled_from(sorted(PROFILES)), irr=vector_sets, isr=vector_sets)
def test_a_hardware_disabled_apic_never_has_a_deliverable_interrupt__PRIO_3(
    profile: str, irr: frozenset[int], isr: frozenset[int]
) -> None:
    apic = LocalApic(0, PROFILES[profile], icr_split=profile in SPLIT)
    apic.wrmsr(0x1B, 0xFEE00000)  # first: the sdm preset resets the registers here (DIFF-D10)
    image = bytearray(apic.get_state())
    load_vectors(image, ISR_BASE, isr)
    load_vectors(image, IRR_BASE, irr)
    apic.set_state(bytes(image))
    assert not apic.hw_enabled
    assert apic.pending_interrupt() is None
    assert apic.ack() is None
    assert set(apic.irr) == set(irr)


# =====================================================================================
# (d) EOI
# =====================================================================================
@given(
    profile=st.sampled_from(sorted(PROFILES)),
    tpr=st.integers(0, 255),
    isr=vector_sets,
    tmr=vector_sets,
    irr=vector_sets,
    path=st.sampled_from(["call", "mmio", "msr"]),
    value=values_32,
)
def test_eoi_clears_exactly_the_highest_isr_bit__PRIO_5(
    profile: str,
    tpr: int,
    isr: frozenset[int],
    tmr: frozenset[int],
    irr: frozenset[int],
    path: str,
    value: int,
) -> None:
    apic = LocalApic(0, PROFILES[profile], icr_split=profile in SPLIT)
    if path == "msr":
        apic.wrmsr(0x1B, 0xFEE00C00)
        if profile == "sdm":
            value = 0  # a non-zero x2APIC EOI is DIFF-D3
    image = bytearray(apic.get_state())
    put32(image, TPR, tpr)
    put32(image, SVR, 0x1FF)
    load_vectors(image, ISR_BASE, isr)
    load_vectors(image, TMR_BASE, tmr)
    load_vectors(image, IRR_BASE, irr)
    apic.set_state(bytes(image))
    calls: list[tuple[int, bool, bool]] = []
    apic.eoi_hook = lambda a, v, level, suppressed: calls.append((v, level, suppressed))

    if path == "call":
        apic.eoi()
    elif path == "mmio":
        apic.mmio_write(EOI, value)
    else:
        apic.wrmsr(0x80B, value)

    assert set(apic.irr) == set(irr)
    assert set(apic.tmr) == set(tmr)
    if not isr:
        assert not apic.isr
        assert calls == []
        assert word(apic.regs, PPR) == ppr_formula(tpr, -1)
        return
    top = max(isr)
    assert set(apic.isr) == set(isr) - {top}
    assert calls == [(top, top in tmr, False)]  # SVR bit 12 clear: never suppressed
    assert word(apic.regs, PPR) == ppr_formula(tpr, max(isr - {top}, default=-1))


# =====================================================================================
# (e) the state machine
# =====================================================================================
def sdm_refuses_to_send(profile: Profile, low: int, x2: bool) -> bool:
    mode = (low >> 8) & 7
    if not profile.accept_illegal_vectors and mode <= 1 and (low & 0xFF) < 16:
        return True
    return x2 and mode == 1 and not profile.x2apic_lowest_priority_ipi


def expected_acceptance(
    apic: LocalApic, vector: int, mode: DeliveryMode, trigger: Trigger, level: bool
) -> bool:
    """Reference §8 (``__apic_accept_irq``) with the profile's knobs."""
    if not apic.hw_enabled:
        return False  # model choice: no KVM caller offers a message to an absent APIC
    deassert = trigger is Trigger.LEVEL and not level
    if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST):
        if deassert or not apic.sw_enabled:
            return False
        return vector >= 16 or apic.profile.accept_illegal_vectors
    if mode is DeliveryMode.REMOTE_READ:
        return apic.profile.remote_read_is_pv_kick
    if mode is DeliveryMode.SMI:
        return apic.features.smm
    if mode is DeliveryMode.INIT:
        return not deassert or apic.profile.init_deassert_accepted
    return mode in (DeliveryMode.NMI, DeliveryMode.STARTUP)


class ApicMachine(RuleBasedStateMachine):
    """Random guest and host operations on one APIC; invariants after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.apic = LocalApic()
        self.sent: list[Interrupt] = []
        self.eois: list[tuple[int, bool, bool]] = []
        self.hooked = False
        self.ppr_may_be_stale = False
        """True right after a KVM_SET_LAPIC under ``set_state_stale_ppr`` (STATE-4)."""

    # -- set-up ------------------------------------------------------------------------
    @initialize(
        config=configs,
        sw_enable=st.booleans(),
        hooked=st.booleans(),
        start_x2apic=st.booleans(),
    )
    def build(
        self, config: Config, sw_enable: bool, hooked: bool, start_x2apic: bool = False
    ) -> None:
        self.apic = config.build()
        self.hooked = hooked
        self.apic.eoi_hook = lambda a, v, level, suppressed: self.eois.append(
            (v, level, suppressed)
        )
        if hooked:
            self.apic.send_hook = lambda a, irq: self.sent.append(irq)
        if sw_enable:
            self.apic.mmio_write(SVR, 0x1FF)
        if start_x2apic and config.features.x2apic:
            self.apic.wrmsr(0x1B, 0xFEE00C00)

    # -- helpers -----------------------------------------------------------------------
    @property
    def x2(self) -> bool:
        return self.apic.x2apic_mode

    @property
    def xapic_page_live(self) -> bool:
        return self.apic.hw_enabled and not self.apic.x2apic_mode

    def write_register(self, offset: int, value: int) -> bool:
        """A guest write of a 32-bit register through the interface of the current mode."""
        if self.x2:
            return guest(self.apic, lambda: self.apic.wrmsr(0x800 + (offset >> 4), value))
        return guest(self.apic, lambda: self.apic.mmio_write(offset, value))

    # -- interrupts --------------------------------------------------------------------
    @rule(
        vector=st.integers(0, 255),
        mode=st.sampled_from(DeliveryMode),
        trigger=st.sampled_from(Trigger),
        level=st.booleans(),
    )
    def accept(self, vector: int, mode: DeliveryMode, trigger: Trigger, level: bool) -> None:
        """The §8 table as an oracle (ACCEPT-FIXED .. ACCEPT-EXTINT, PRIO-6, PRIO-7)."""
        apic = self.apic
        expected = expected_acceptance(apic, vector, mode, trigger, level)
        arb, nmis = apic.arb_prio, apic.nmi_pending
        assert apic.accept(vector, mode, trigger, level) is expected
        if mode is DeliveryMode.LOWEST and apic.hw_enabled:
            assert apic.arb_prio == arb + 1
        else:
            assert apic.arb_prio == arb
        if not expected:
            return
        if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST):
            assert vector in apic.irr
            assert (vector in apic.tmr) is (trigger is Trigger.LEVEL)
        elif mode is DeliveryMode.NMI:
            assert apic.nmi_pending == min(nmis + 1, 2)  # ACCEPT-NMI: at most two pending
        elif mode is DeliveryMode.INIT:
            assert apic.init_pending and not apic.sipi_pending
        elif mode is DeliveryMode.STARTUP:
            assert apic.sipi_pending and apic.sipi_vector == vector
        elif mode is DeliveryMode.SMI:
            assert apic.smi_pending
        elif mode is DeliveryMode.REMOTE_READ:
            assert apic.pv_unhalted

    @rule()
    def ack(self) -> None:
        expected = self.apic.pending_interrupt()
        got = self.apic.ack()
        assert got == expected
        if got is not None:
            assert got in self.apic.isr
            assert got not in self.apic.irr

    @rule()
    def eoi(self) -> None:
        """PRIO-5, DEOI-1, DEOI-2."""
        apic = self.apic
        top = apic.isr.highest()
        level = top in apic.tmr
        suppress = (
            level and apic.profile.honor_suppress_eoi_broadcast and bool(apic.svr & 0x1000)
        )
        del self.eois[:]
        got = apic.eoi()
        assert got == (top if top >= 0 else None)
        if got is not None:
            assert got not in apic.isr
            assert self.eois == [(top, level, suppress)]
        else:
            assert self.eois == []

    @rule(value=values_32)
    def eoi_register(self, value: int) -> None:
        top = self.apic.isr.highest()
        faulted = self.write_register(EOI, value)
        if top >= 0 and not faulted and self.apic.hw_enabled:
            assert top not in self.apic.isr

    @rule(lvt=st.sampled_from(LVT_NAMES))
    def local_deliver(self, lvt: str) -> None:
        self.apic.local_deliver(lvt)

    # -- registers ---------------------------------------------------------------------
    @rule(value=st.one_of(st.integers(0, 0xFF), values_32))
    def write_tpr(self, value: int) -> None:
        self.write_register(TPR, value)

    @rule(cr8=st.integers(0, 15))
    def set_cr8(self, cr8: int) -> None:
        self.apic.set_cr8(cr8)
        assert self.apic.get_cr8() == cr8

    @rule(value=st.one_of(st.sampled_from([0xFF, 0x1FF, 0x11FF, 0x10F]), values_32))
    def write_svr(self, value: int) -> None:
        self.write_register(SVR, value)

    @rule(offset=st.sampled_from(LVT_OFFSETS), value=values_32)
    def write_lvt(self, offset: int, value: int) -> None:
        self.write_register(offset, value)

    @rule(offset=st.sampled_from([0x20, 0xD0, 0xE0, 0x280, 0x3E0, TMICT]), value=values_32)
    def write_other(self, offset: int, value: int) -> None:
        self.write_register(offset, value)

    @rule(value=values_64)
    def write_icr(self, value: int) -> None:
        before = len(self.sent)
        if self.x2:
            faulted = guest(self.apic, lambda: self.apic.wrmsr(0x830, value))
            if faulted:
                assert len(self.sent) == before
                return
            sent_value = value & ~BUSY
            assert self.apic.rdmsr(0x830) == sent_value
        elif self.xapic_page_live:
            self.apic.mmio_write(ICR2, value >> 32)
            self.apic.mmio_write(ICR, value & U32)
            sent_value = value & ((0xFF << 56) | U32) & ~BUSY
            assert self.apic.mmio_read(ICR) | self.apic.mmio_read(ICR2) << 32 == sent_value
        else:
            return
        if not self.hooked:
            return
        if sdm_refuses_to_send(self.apic.profile, value & U32, self.x2):
            assert len(self.sent) == before
        else:
            assert self.sent[before:] == [Icr.decode(sent_value, x2apic=self.x2).to_interrupt()]

    @rule(vector=st.integers(0, 0x1FF))
    def self_ipi(self, vector: int) -> None:
        faulted = guest(self.apic, lambda: self.apic.wrmsr(0x83F, vector))
        assert faulted == (not self.x2 or vector > 0xFF)

    # -- time --------------------------------------------------------------------------
    @rule(ns=st.one_of(st.integers(0, 5_000), st.integers(0, 5_000_000)))
    def advance(self, ns: int) -> None:
        self.apic.advance(ns)

    # -- mode and lifecycle ------------------------------------------------------------
    @rule(base=st.sampled_from(APIC_BASES), host=st.booleans())
    def set_apic_base(self, base: int, host: bool) -> None:
        guest(self.apic, lambda: self.apic.wrmsr(0x1B, base, host_initiated=host))

    @rule()
    def enter_x2apic_mode(self) -> None:
        """BASE-4: xAPIC -> x2APIC is legal when CPUID has x2APIC; from disabled it #GPs."""
        faulted = guest(self.apic, lambda: self.apic.wrmsr(0x1B, 0xFEE00C00))
        if self.apic.features.x2apic and self.apic.hw_enabled:
            assert not faulted
            assert self.x2

    @rule(op=guest_ops)
    def any_guest_access(self, op: Op) -> None:
        guest(self.apic, lambda: op.apply(self.apic))

    @rule()
    def init(self) -> None:
        self.apic.init()

    @rule()
    def reset(self) -> None:
        self.apic.reset()

    # -- KVM_GET_LAPIC / KVM_SET_LAPIC -------------------------------------------------
    @rule(fmt=st.booleans())
    def state_round_trip(self, fmt: bool) -> None:
        """STATE-1..4: GET -> SET -> GET is the identity; the x2APIC image has the STATE-3
        userspace view (ID per format, derived LDR, ICR split to 0x300/0x310)."""
        apic = self.apic
        image = apic.get_state(x2apic_format=fmt)
        if self.x2:
            vid = apic.vcpu_id
            assert word(image, 0x20) == (vid if fmt else (vid << 24) & U32)
            assert word(image, 0xD0) == x2apic_ldr(vid)
            assert word(image, ICR) | word(image, ICR2) << 32 == apic.rdmsr(0x830)
        if counter_restarts_differently(apic, image):
            return
        apic.set_state(image, x2apic_format=fmt)
        assert apic.get_state(x2apic_format=fmt) == image
        assert apic.arb_prio == 0

    @rule(
        fmt=st.booleans(),
        tpr=st.integers(0, 255),
        isr=vector_sets,
        irr=vector_sets,
        tmr=vector_sets,
        svr=st.sampled_from([0xFF, 0x1FF, 0x11FF]),
        id_value=st.one_of(st.none(), vcpu_ids, values_32),
        lvr=values_32,
    )
    def set_edited_state(
        self,
        fmt: bool,
        tpr: int,
        isr: frozenset[int],
        irr: frozenset[int],
        tmr: frozenset[int],
        svr: int,
        id_value: int | None,
        lvr: int,
    ) -> None:
        """STATE-2..4 with an edited image (ICR left alone: SET may store any ICR)."""
        apic = self.apic
        image = bytearray(apic.get_state(x2apic_format=fmt))
        put32(image, TPR, tpr)
        put32(image, SVR, svr)
        if id_value is None:
            id_value = word(image, 0x20)  # keep the ID GET returned
        put32(image, 0x20, id_value)
        put32(image, 0x30, lvr)
        load_vectors(image, ISR_BASE, isr)
        load_vectors(image, IRR_BASE, irr)
        load_vectors(image, TMR_BASE, tmr)
        old_svr = apic.svr
        timer_fires = counter_restarts_differently(apic, bytes(image))
        try:
            self.ppr_may_be_stale = apic.profile.set_state_stale_ppr
            apic.set_state(bytes(image), x2apic_format=fmt)
        except StateError as e:
            assert e.errno == 22
            assert self.x2 and fmt and id_value != apic.vcpu_id
            assert apic.svr == (svr if apic.profile.set_state_svr_before_fixup else old_svr)
            return
        assert apic.svr == svr
        assert apic.arb_prio == 0
        assert set(apic.isr) == set(isr)
        if not timer_fires:  # else the restored timer may already have added its vector
            assert set(apic.irr) == set(irr)
            assert set(apic.tmr) == set(tmr)

    # -- invariants --------------------------------------------------------------------
    @invariant()
    def ppr_is_the_formula_of_tpr_and_the_highest_isr(self) -> None:
        """PRIO-2: the PPR word of the page is up to date without a PPR read, except right
        after a KVM_SET_LAPIC under ``set_state_stale_ppr`` (STATE-4), until a PPR read."""
        expected = ppr_formula(word(self.apic.regs, TPR), self.apic.isr.highest())
        if not self.ppr_may_be_stale:
            assert word(self.apic.regs, PPR) == expected
        assert self.apic.ppr == expected
        assert word(self.apic.regs, PPR) == expected
        self.ppr_may_be_stale = False

    @invariant()
    def vector_views_agree_with_the_page(self) -> None:
        """PRIO-1 / §1.4: irr/isr/tmr are views of the page words; MMIO and MSRs read them."""
        apic = self.apic
        for base, view in ((IRR_BASE, apic.irr), (ISR_BASE, apic.isr), (TMR_BASE, apic.tmr)):
            words = [word(apic.regs, base + 0x10 * n) for n in range(8)]
            assert [view.word(n) for n in range(8)] == words
            members = {32 * n + b for n, w in enumerate(words) for b in range(32) if w >> b & 1}
            assert set(view) == members
            assert len(view) == len(members)
            assert view.highest() == max(members, default=-1)
            for n in range(8):
                gap = apic.regs[base + 0x10 * n + 4 : base + 0x10 * n + 16]
                assert gap == bytes(12)
            if self.xapic_page_live:
                assert [apic.mmio_read(base + 0x10 * n) for n in range(8)] == words
            elif self.x2:
                msr = 0x800 + (base >> 4)
                assert [apic.rdmsr(msr + n) for n in range(8)] == words

    @invariant()
    def x2apic_id_and_ldr_are_derived_from_the_vcpu_id(self) -> None:
        """MATCH-7, BASE-6, BUG-17."""
        if not self.x2:
            return
        apic = self.apic
        assert apic.rdmsr(0x802) == apic.vcpu_id
        assert apic.id_register == apic.vcpu_id
        assert apic.rdmsr(0x80D) == x2apic_ldr(apic.vcpu_id)
        assert apic.ldr == x2apic_ldr(apic.vcpu_id)

    @invariant()
    def icr_never_shows_delivery_status(self) -> None:
        """DIFF-D4, ICR-2, ICR-3."""
        assert self.apic.icr & BUSY == 0
        if self.xapic_page_live:
            assert self.apic.mmio_read(ICR) & BUSY == 0
        elif self.x2:
            assert self.apic.rdmsr(0x830) & BUSY == 0

    @invariant()
    def the_pending_interrupt_is_above_ppr(self) -> None:
        """PRIO-3."""
        apic = self.apic
        pending = apic.pending_interrupt()
        ppr = word(apic.regs, PPR)
        top = apic.irr.highest()
        if pending is not None:
            assert apic.hw_enabled
            assert pending == top
            assert (pending & 0xF0) > ppr
            assert (pending & 0xF0) > (ppr & 0xF0)
        else:
            assert not apic.hw_enabled or top < 0 or (top & 0xF0) <= ppr

    @invariant()
    def lvr_comes_from_the_features(self) -> None:
        """REG-LVR-1."""
        f = self.apic.features
        expected = 0x14 | ((6 if f.cmci else 5) << 16) | (0x01000000 if f.directed_eoi else 0)
        assert self.apic.lvr == expected


TestApicMachine = ApicMachine.TestCase


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_state_machine_helpers_detect_a_stale_ppr__PRIO_2(profile: str) -> None:
    """The PRIO-2 invariant can fail: a page whose PPR word is stale is caught."""
    machine = ApicMachine()
    machine.build(Config(profile, 0, False, Features()), True, False)
    machine.apic.accept(0x41)
    machine.apic.ack()
    machine.ppr_is_the_formula_of_tpr_and_the_highest_isr()
    machine.apic.regs[PPR] = 0
    with pytest.raises(AssertionError):
        machine.ppr_is_the_formula_of_tpr_and_the_highest_isr()
