"""Destination matching (reference ``kvm_lapic.md`` §9, MATCH-1..7; §16 DIFF-D7/D9/D16).

Every worked example of §9 is here, under both presets where they agree, with each preset's
own outcome where they differ.  Targets are plain records (``Tgt``), so these tests pin the
pure rules of ``lapic.destination``; ``test_bus.py`` checks the same rules through real APICs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lapic.destination import (
    is_broadcast,
    match_dest,
    match_logical,
    match_physical,
    matches,
    mda,
    x2apic_ldr,
)
from lapic.icr import DeliveryMode, DestMode, Interrupt, Shorthand
from lapic.profile import Profile
from lapic.registers import DFR_CLUSTER, DFR_FLAT

KVM = Profile.preset("kvm")
SDM = Profile.preset("sdm")
BOTH = pytest.mark.parametrize("profile", [KVM, SDM], ids=["kvm", "sdm"])
PHYS = DestMode.PHYSICAL
LOG = DestMode.LOGICAL


@dataclass(frozen=True)
class Tgt:
    """A matching target as plain data (satisfies ``lapic.destination.Target``)."""

    x2apic_mode: bool = False
    physical_id: int = 0
    x2apic_id: int = 0
    ldr: int = 0
    dfr: int = DFR_FLAT


def xapic(xapic_id: int = 0, *, vcpu_id: int | None = None, ldr: int = 0,
          dfr: int = DFR_FLAT) -> Tgt:
    vid = xapic_id if vcpu_id is None else vcpu_id
    return Tgt(False, xapic_id, vid, ldr, dfr)


def x2apic(vcpu_id: int) -> Tgt:
    return Tgt(True, vcpu_id, vcpu_id, x2apic_ldr(vcpu_id), DFR_FLAT)


def dest(target: Tgt, d: int, mode: DestMode, *, profile: Profile = KVM,
         source: object | None = None, quirk: bool = True) -> bool:
    return match_dest(target, source, Shorthand.NONE, d, mode, broadcast_quirk=quirk,
                      profile=profile)


# ---------------------------------------------------------------------------------------
# MATCH-1: the MDA rewrite of the broadcast quirk
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("is_ipi", [False, True])
@pytest.mark.parametrize("quirk", [False, True])
@pytest.mark.parametrize("target_x2apic", [False, True])
def test_mda_becomes_x2apic_broadcast_only_for_non_ipi_with_quirk_on_x2apic_target__MATCH_1(
    is_ipi: bool, quirk: bool, target_x2apic: bool
) -> None:
    got = mda(0xFF, target_x2apic, is_ipi=is_ipi, broadcast_quirk=quirk)
    rewritten = quirk and not is_ipi and target_x2apic
    assert got == (0xFFFFFFFF if rewritten else 0xFF)


def test_mda_rewrite_needs_destination_0xff__MATCH_1() -> None:
    assert mda(0xFE, True, is_ipi=False, broadcast_quirk=True) == 0xFE
    assert mda(0x1FF, True, is_ipi=False, broadcast_quirk=True) == 0x1FF


def test_msi_to_0xff_reaches_x2apic_target_with_quirk_only__MATCH_1() -> None:
    t = x2apic(5)
    assert dest(t, 0xFF, PHYS, source=None, quirk=True)
    assert dest(t, 0xFF, LOG, source=None, quirk=True)
    assert not dest(t, 0xFF, PHYS, source=None, quirk=False)
    # Logical 0xFF without the quirk: cluster 0, bits 0-7, and id 5 is bit 5 of cluster 0.
    assert dest(t, 0xFF, LOG, source=None, quirk=False)
    assert not dest(x2apic(17), 0xFF, LOG, source=None, quirk=False)


def test_ipi_to_0xff_is_never_rewritten_for_x2apic_target__MATCH_1() -> None:
    src = object()
    assert not dest(x2apic(5), 0xFF, PHYS, source=src, quirk=True)


def test_broadcast_quirk_default_follows_profile__MATCH_1_DIFF_D9() -> None:
    irq = Interrupt(0x31, dest=0xFF)
    t = x2apic(5)
    assert matches(irq, t, None, is_ipi=False, profile=KVM)
    assert not matches(irq, t, None, is_ipi=False, profile=SDM)
    # An explicit VM option overrides either default.
    assert not matches(irq, t, None, is_ipi=False, profile=KVM, broadcast_quirk=False)
    assert matches(irq, t, None, is_ipi=False, profile=SDM, broadcast_quirk=True)


def test_matches_drops_source_of_a_non_ipi__MATCH_1() -> None:
    t = x2apic(5)
    irq = Interrupt(0x31, dest=0xFF)
    assert not matches(irq, t, t, is_ipi=True, profile=KVM)
    assert matches(irq, t, t, is_ipi=False, profile=KVM)


# ---------------------------------------------------------------------------------------
# MATCH-2: shorthands
# ---------------------------------------------------------------------------------------
@BOTH
def test_shorthands_pick_self_all_or_all_but_self__MATCH_2(profile: Profile) -> None:
    src, other = xapic(0), xapic(1)

    def m(t: Tgt, sh: Shorthand) -> bool:
        return match_dest(t, src, sh, 0, PHYS, broadcast_quirk=True, profile=profile)

    assert m(src, Shorthand.SELF) and not m(other, Shorthand.SELF)
    assert m(src, Shorthand.ALL_INCLUDING_SELF) and m(other, Shorthand.ALL_INCLUDING_SELF)
    assert not m(src, Shorthand.ALL_EXCLUDING_SELF) and m(other, Shorthand.ALL_EXCLUDING_SELF)


def test_self_is_decided_by_identity_not_equality__MATCH_2() -> None:
    a, b = xapic(3), xapic(3)
    assert a == b
    assert not match_dest(b, a, Shorthand.SELF, 0, PHYS, broadcast_quirk=True, profile=KVM)
    assert match_dest(b, a, Shorthand.ALL_EXCLUDING_SELF, 0, PHYS, broadcast_quirk=True,
                      profile=KVM)


def test_shorthand_without_source_matches_no_self_and_everyone_but_self__MATCH_2() -> None:
    t = xapic(0)
    assert not match_dest(t, None, Shorthand.SELF, 0, PHYS, broadcast_quirk=True, profile=KVM)
    assert match_dest(t, None, Shorthand.ALL_EXCLUDING_SELF, 0, PHYS, broadcast_quirk=True,
                      profile=KVM)


targets = st.one_of(
    st.builds(xapic, st.integers(0, 0xFF), ldr=st.integers(0, 0xFF).map(lambda b: b << 24),
              dfr=st.sampled_from([DFR_FLAT, DFR_CLUSTER, 0x5FFFFFFF])),
    st.builds(x2apic, st.integers(0, 0xFFFF)),
)


@given(
    target=targets,
    is_source=st.booleans(),
    shorthand=st.sampled_from(
        [Shorthand.SELF, Shorthand.ALL_INCLUDING_SELF, Shorthand.ALL_EXCLUDING_SELF]
    ),
    d=st.integers(0, 0xFFFFFFFF),
    mode=st.sampled_from(DestMode),
    quirk=st.booleans(),
    profile=st.sampled_from([KVM, SDM]),
)
def test_shorthands_ignore_destination_and_mode__MATCH_2(
    target: Tgt, is_source: bool, shorthand: Shorthand, d: int, mode: DestMode, quirk: bool,
    profile: Profile,
) -> None:
    source = target if is_source else xapic(0)
    expected = {
        Shorthand.SELF: is_source,
        Shorthand.ALL_INCLUDING_SELF: True,
        Shorthand.ALL_EXCLUDING_SELF: not is_source,
    }[shorthand]
    got = match_dest(target, source, shorthand, d, mode, broadcast_quirk=quirk, profile=profile)
    assert got == expected


# ---------------------------------------------------------------------------------------
# MATCH-3: broadcast in the target's own ID width
# ---------------------------------------------------------------------------------------
@BOTH
def test_broadcast_is_all_ones_in_the_target_width__MATCH_3(profile: Profile) -> None:
    assert is_broadcast(0xFF, False) and not is_broadcast(0xFF, True)
    assert is_broadcast(0xFFFFFFFF, True) and not is_broadcast(0xFE, False)
    flat0 = xapic(7, ldr=0)  # LDR 0: only a broadcast can reach it logically
    assert dest(flat0, 0xFF, PHYS, profile=profile, source=object())
    assert dest(flat0, 0xFF, LOG, profile=profile, source=object())
    t = x2apic(0x1234)
    assert dest(t, 0xFFFFFFFF, PHYS, profile=profile, source=object())
    assert dest(t, 0xFFFFFFFF, LOG, profile=profile, source=object())


@BOTH
def test_xapic_source_0xff_to_x2apic_target_is_not_broadcast__MATCH_3(profile: Profile) -> None:
    src = object()
    # physical: only x2APIC ID 255
    assert dest(x2apic(255), 0xFF, PHYS, profile=profile, source=src)
    assert not dest(x2apic(5), 0xFF, PHYS, profile=profile, source=src)
    # logical: cluster 0, bits 0-7 (x2APIC IDs 0-7)
    assert dest(x2apic(3), 0xFF, LOG, profile=profile, source=src)
    assert dest(x2apic(7), 0xFF, LOG, profile=profile, source=src)
    assert not dest(x2apic(8), 0xFF, LOG, profile=profile, source=src)
    assert not dest(x2apic(17), 0xFF, LOG, profile=profile, source=src)


# ---------------------------------------------------------------------------------------
# MATCH-4: physical, and the hotplug hack (DIFF-D7)
# ---------------------------------------------------------------------------------------
@BOTH
def test_physical_compares_xapic_id_or_x2apic_id__MATCH_4(profile: Profile) -> None:
    t = xapic(3, vcpu_id=9)
    assert match_physical(3, t, profile)
    assert not match_physical(9, t, profile)
    assert match_physical(0x12345, x2apic(0x12345), profile)
    assert not match_physical(0x12346, x2apic(0x12345), profile)
    assert not match_physical(0x45, x2apic(0x12345), profile)


def test_hotplug_hack_matches_xapic_target_by_x2apic_id_above_0xff__MATCH_4_DIFF_D7() -> None:
    # vCPU 0x123 after reset: xAPIC mode, xAPIC ID 0x23.
    t = xapic(0x23, vcpu_id=0x123)
    assert match_physical(0x123, t, KVM)
    assert match_physical(0x23, t, KVM)
    # SDM: dest & 0xFF is compared, so 0x123 also matches, through the 8-bit ID.
    assert match_physical(0x123, t, SDM)
    # They differ when the low byte and the x2APIC ID disagree:
    assert not match_physical(0x223, t, KVM)  # > 0xFF: compares 0x123
    assert match_physical(0x223, t, SDM)  # 0x223 & 0xFF == 0x23
    moved = xapic(0x07, vcpu_id=0x123)  # xAPIC ID rewritten by the guest
    assert match_physical(0x123, moved, KVM)
    assert not match_physical(0x123, moved, SDM)
    small = xapic(5, vcpu_id=5)
    assert not match_physical(0x105, small, KVM)
    assert match_physical(0x105, small, SDM)


def test_mda_above_0xff_compares_the_x2apic_id_not_the_low_byte__DIFF_D7() -> None:
    # specs DIFF-D7 example: vcpu_id 0x23, xAPIC ID 0x23, physical MDA 0x123.
    t = xapic(0x23, vcpu_id=0x23)
    assert not match_physical(0x123, t, KVM)
    assert match_physical(0x123, t, SDM)
    assert KVM.xapic_matches_x2apic_id and not SDM.xapic_matches_x2apic_id


def test_hotplug_hack_needs_an_unencodable_id__MATCH_4() -> None:
    # MDA 0x23 <= 0xFF compares the (rewritten) xAPIC ID, never the vCPU id.
    assert not match_physical(0x23, xapic(0x07, vcpu_id=0x23), KVM)


@BOTH
def test_physical_0xff_broadcasts_to_xapic_target_even_with_large_vcpu_id__MATCH_4(
    profile: Profile,
) -> None:
    assert match_physical(0xFF, xapic(0x23, vcpu_id=0x123), profile)


# ---------------------------------------------------------------------------------------
# MATCH-5/6: logical
# ---------------------------------------------------------------------------------------
@BOTH
def test_flat_logical_destination_matches_any_common_bit__MATCH_5(profile: Profile) -> None:
    t = xapic(0, ldr=0x01000000, dfr=DFR_FLAT)
    assert match_logical(0x03, t, profile)
    assert not match_logical(0x02, t, profile)
    assert match_logical(0xFF, t, profile)


@BOTH
def test_cluster_logical_destination_needs_same_cluster_and_common_bit__MATCH_5(
    profile: Profile,
) -> None:
    t = xapic(0, ldr=0x12000000, dfr=DFR_CLUSTER)
    assert match_logical(0x13, t, profile)
    assert not match_logical(0x23, t, profile)
    assert not match_logical(0x11, t, profile)
    assert match_logical(0xFF, t, profile)


@BOTH
def test_x2apic_logical_destination_is_cluster_and_bitmap__MATCH_5(profile: Profile) -> None:
    t = x2apic(17)
    assert t.ldr == 0x00010002
    assert match_logical(0x00010006, t, profile)
    assert not match_logical(0x00020002, t, profile)
    assert not match_logical(0x00010001, t, profile)
    assert match_logical(0xFFFFFFFF, t, profile)


@BOTH
def test_dfr_neither_flat_nor_cluster_matches_nothing_but_broadcast__MATCH_5(
    profile: Profile,
) -> None:
    t = xapic(0, ldr=0x01000000, dfr=0x5FFFFFFF)
    assert not match_logical(0x01, t, profile)
    assert match_logical(0xFF, t, profile)


def test_cluster_15_is_addressable_in_kvm_only__MATCH_6_DIFF_D16() -> None:
    t = xapic(0, ldr=0xF1000000, dfr=DFR_CLUSTER)
    assert match_logical(0xF1, t, KVM)
    assert not match_logical(0xF1, t, SDM)
    assert match_logical(0xFF, t, KVM) and match_logical(0xFF, t, SDM)
    assert KVM.cluster15_addressable and not SDM.cluster15_addressable


def test_xapic_logical_compares_low_byte_under_sdm_only__MATCH_5_DIFF_D7() -> None:
    # A 32-bit MDA (from an x2APIC sender) to an xAPIC target in cluster mode.
    t = xapic(0, ldr=0x12000000, dfr=DFR_CLUSTER)
    assert not match_logical(0x112, t, KVM)
    assert match_logical(0x112, t, SDM)
    # ... and 0x1FF is the xAPIC broadcast under sdm, nothing under kvm.
    flat0 = xapic(0, ldr=0, dfr=DFR_FLAT)
    assert not match_logical(0x1FF, flat0, KVM)
    assert match_logical(0x1FF, flat0, SDM)


@given(lid=st.integers(0, 0xFF), m=st.integers(0, 0xFF), profile=st.sampled_from([KVM, SDM]))
def test_flat_logical_match_is_common_bit_or_broadcast__MATCH_5(
    lid: int, m: int, profile: Profile
) -> None:
    t = xapic(0, ldr=lid << 24, dfr=DFR_FLAT)
    assert match_logical(m, t, profile) == ((lid & m) != 0 or m == 0xFF)
    assert dest(t, m, LOG, profile=profile, source=t) == ((lid & m) != 0 or m == 0xFF)


@given(vid=st.integers(0, 0xFFFFE), m=st.integers(0, 0xFFFFFFFF))
def test_x2apic_logical_match_is_same_cluster_and_own_bit__MATCH_5(vid: int, m: int) -> None:
    expected = m == 0xFFFFFFFF or ((m >> 16) == (vid >> 4) and bool(m >> (vid & 0xF) & 1))
    assert match_logical(m, x2apic(vid), KVM) == expected


# ---------------------------------------------------------------------------------------
# MATCH-7: the derived x2APIC LDR
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x2apic_id", "ldr"),
    [(0, 0x00000001), (5, 0x00000020), (17, 0x00010002), (0x123, 0x00120008),
     (255, 0x000F8000)],
)
def test_x2apic_ldr_is_cluster_and_bit_of_the_id__MATCH_7(x2apic_id: int, ldr: int) -> None:
    assert x2apic_ldr(x2apic_id) == ldr


@given(st.integers(0, (1 << 20) - 1))
def test_x2apic_ldr_inverts_to_the_id__MATCH_7(x2apic_id: int) -> None:
    ldr = x2apic_ldr(x2apic_id)
    bits = ldr & 0xFFFF
    assert bits and bits & (bits - 1) == 0  # exactly one bit
    assert ((ldr >> 16) << 4) | (bits.bit_length() - 1) == x2apic_id
    assert x2apic(x2apic_id).ldr == ldr
    assert match_logical(ldr, x2apic(x2apic_id), KVM)


def test_x2apic_ldr_is_computed_in_u32_like_kvm__MATCH_7() -> None:
    # kvm_apic_calc_x2apic_ldr(u32 id): the cluster's bits above 15 fall off.
    assert x2apic_ldr(0x100000) == 0x00000001
    assert x2apic_ldr(0xFFFFFFFE) == 0xFFFF4000
    assert all(x2apic_ldr(i) <= 0xFFFFFFFF for i in (0x1234567, 0xFFFFFFF0, 0xFFFFFFFE))


# ---------------------------------------------------------------------------------------
# matches(): the decoded-message entry point
# ---------------------------------------------------------------------------------------
@BOTH
def test_matches_reads_shorthand_dest_and_mode_from_the_message__MATCH_2_MATCH_5(
    profile: Profile,
) -> None:
    t = xapic(2, ldr=0x04000000)
    src = xapic(0)
    assert matches(Interrupt(0x40, dest=2), t, src, is_ipi=True, profile=profile)
    assert not matches(Interrupt(0x40, dest=4), t, src, is_ipi=True, profile=profile)
    assert matches(Interrupt(0x40, dest_mode=LOG, dest=4), t, src, is_ipi=True, profile=profile)
    assert not matches(Interrupt(0x40, dest_mode=LOG, dest=2), t, src, is_ipi=True,
                       profile=profile)
    selfie = Interrupt(0x40, DeliveryMode.FIXED, shorthand=Shorthand.SELF, dest=2)
    assert not matches(selfie, t, src, is_ipi=True, profile=profile)
    assert matches(selfie, src, src, is_ipi=True, profile=profile)
