"""Logical destinations: multicast (flat, cluster, x2APIC cluster) and lowest priority.

Rules: MATCH-5 (logical match), MATCH-6 (xAPIC cluster 0xF), MATCH-1/MATCH-3 (broadcasts),
MATCH-7 (x2APIC LDR), LP-1 (one target among the candidates), MSI-1 (KVM_SIGNAL_MSI result).
The expected receivers are computed from the spec's formulas over the IDs the guests wrote;
the model is reached only through guest accesses and KVM_SIGNAL_MSI.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from operator import or_

from hypothesis import given
from hypothesis import strategies as st

from apicsim.testing.topologies import XAPIC, ApicSpec, Topology
from hypervisor import Vm
from lapic.profile import Profile

from .conftest import (
    DFR,
    ICR_ASSERT,
    ICR_LOGICAL,
    ICR_LOWEST,
    LDR,
    TPR,
    X2APIC_BROADCAST,
    XAPIC_BROADCAST,
    GuestApic,
    Mode,
    Platform,
    boot,
    irrs,
    legal_vectors,
    u32,
)

MODELS = ("flat", "cluster", "x2apic")
DFR_VALUE = {"flat": 0xFFFFFFFF, "cluster": 0x0FFFFFFF}
MSI_BASE = 0xFEE00000
MSI_LOGICAL = 1 << 2
MSI_REDIRECTION_HINT = 1 << 3
MSI_LOWEST = 0x100
NONE = frozenset[int]()


def derived_ldr(x2apic_id: int) -> int:
    """MATCH-7."""
    return ((x2apic_id >> 4) << 16) | (1 << (x2apic_id & 0xF))


@dataclass(frozen=True)
class LogicalTopology:
    """Every vCPU in one logical model with a distinct logical ID, all software-enabled: the
    data is an ``apicsim.testing`` :class:`Topology` (xAPIC models: one ``ApicSpec`` per vCPU
    with its logical ID, and the DFR; x2APIC: uniform, the LDRs derived), with the MATCH-*
    oracles of this module on top."""

    model: str
    topology: Topology

    @classmethod
    def of(cls, model: str, vcpu_ids: tuple[int, ...], lids: tuple[int, ...]) -> LogicalTopology:
        """``lids``: the 8-bit xAPIC logical IDs (ignored for x2apic: MATCH-7 derives them)."""
        if model == "x2apic":
            return cls(model, Topology(vcpu_ids, x2apic=True))
        specs = tuple(ApicSpec(XAPIC, True, v & 0xFF, lid) for v, lid in zip(vcpu_ids, lids,
                                                                            strict=True))
        return cls(model, Topology(vcpu_ids, apics=specs, dfr=DFR_VALUE[model]))

    @property
    def vcpu_ids(self) -> tuple[int, ...]:
        return self.topology.vcpu_ids

    @property
    def logical_ids(self) -> tuple[int, ...]:
        """xAPIC: the 8-bit ID written to LDR[31:24]; x2APIC: the derived 32-bit LDR."""
        if self.model == "x2apic":
            return tuple(derived_ldr(v) for v in self.vcpu_ids)
        return tuple(spec.lid for spec in self.topology.apics)

    @property
    def mode(self) -> Mode:
        return Mode.X2APIC if self.model == "x2apic" else Mode.XAPIC

    def build(self, platform: Platform) -> tuple[Vm, list[GuestApic]]:
        vm = platform.vm(vcpu_ids=self.vcpu_ids)
        cpus = boot(vm, self.mode)
        if self.model != "x2apic":
            for cpu, lid in zip(cpus, self.logical_ids, strict=True):
                cpu.write(DFR, DFR_VALUE[self.model])
                cpu.write(LDR, lid << 24)
        return vm, cpus

    def matches(self, i: int, mda: int, profile: Profile) -> bool:
        """MATCH-5 (and MATCH-6 for cluster 0xF) for vCPU ``i`` and an already-computed MDA."""
        lid = self.logical_ids[i]
        if self.model == "x2apic":
            if mda == X2APIC_BROADCAST:
                return True
            return lid >> 16 == mda >> 16 and bool(lid & mda & 0xFFFF)
        if mda == XAPIC_BROADCAST:
            return True
        if self.model == "flat":
            return bool(lid & mda)
        if mda >> 4 == 0xF and not profile.cluster15_addressable:
            return False
        return lid >> 4 == mda >> 4 and bool(lid & mda & 0xF)

    def mda(self, dest: int, *, msi: bool, broadcast_quirk: bool) -> int:
        """MATCH-1: a device's (MSI's) 0xFF is the x2APIC broadcast when the quirk is on."""
        if msi and self.model == "x2apic" and dest == XAPIC_BROADCAST and broadcast_quirk:
            return X2APIC_BROADCAST
        return dest

    def receivers(self, dest: int, profile: Profile, *, msi: bool, quirk: bool) -> set[int]:
        mda = self.mda(dest, msi=msi, broadcast_quirk=quirk)
        return {i for i in range(len(self.vcpu_ids)) if self.matches(i, mda, profile)}


@st.composite
def topologies(draw: st.DrawFn, max_size: int = 8) -> LogicalTopology:
    model = draw(st.sampled_from(MODELS), label="model")
    n = draw(st.integers(1, max_size), label="vCPUs")
    if model == "x2apic":
        # Few clusters, so that multicasts reach several vCPUs; sometimes far ones.
        one = st.one_of(st.integers(0, 40), st.integers(0, 4095))
        ids = draw(st.lists(one, min_size=n, max_size=n, unique=True), label="vcpu_ids")
        return LogicalTopology.of(model, tuple(ids), tuple(derived_ldr(v) for v in ids))
    ids = draw(st.lists(st.integers(0, 0xFE), min_size=n, max_size=n, unique=True))
    # One bit per vCPU (as Linux programs it; KVM's optimized map can then serve the message),
    # or any bytes (several bits per ID: KVM falls back to the architectural rules).
    one_bit = draw(st.booleans(), label="one bit per logical ID")
    if model == "flat":
        lid = st.integers(0, 7).map(lambda b: 1 << b) if one_bit else st.integers(0, 0xFF)
    else:
        cluster = st.one_of(st.sampled_from((0, 1, 0xE, 0xF)), st.integers(0, 0xF))
        member = st.integers(0, 3).map(lambda b: 1 << b) if one_bit else st.integers(0, 0xF)
        lid = st.tuples(cluster, member).map(lambda cm: cm[0] << 4 | cm[1])
    lids = draw(st.lists(lid, min_size=n, max_size=n, unique=True), label="logical IDs")
    return LogicalTopology.of(model, tuple(ids), tuple(lids))


def destinations(top: LogicalTopology) -> st.SearchStrategy[int]:
    """Random MDAs, unions of the vCPUs' own logical IDs (within one cluster) and broadcasts."""
    lids = list(top.logical_ids)
    if top.model == "flat":
        return st.one_of(
            st.integers(0, 0xFF),
            st.sets(st.sampled_from(lids), min_size=1).map(lambda s: reduce(or_, s)),
            st.just(XAPIC_BROADCAST),
        )
    if top.model == "cluster":
        return st.one_of(
            st.integers(0, 0xFF),
            st.tuples(st.sampled_from(lids), st.integers(0, 0xF)).map(
                lambda lm: (lm[0] & 0xF0) | lm[1]
            ),
            st.just(XAPIC_BROADCAST),
        )
    return st.one_of(
        u32,
        st.integers(0, 0xFF),
        st.just(XAPIC_BROADCAST),  # from a device: the x2APIC broadcast only under MATCH-1
        st.tuples(st.sampled_from(lids), st.integers(0, 0xFFFF)).map(
            lambda lm: (lm[0] & 0xFFFF0000) | lm[1]
        ),
        st.just(X2APIC_BROADCAST),
    )


def signal_logical_msi(vm: Vm, dest: int, vector: int, *, lowest: bool, hint: bool) -> int:
    """KVM_SIGNAL_MSI, logical destination mode, edge, 8-bit destination."""
    address = MSI_BASE | (dest & 0xFF) << 12 | MSI_LOGICAL | (MSI_REDIRECTION_HINT if hint else 0)
    return vm.signal_msi(address, 0, (MSI_LOWEST if lowest else 0) | vector)


@given(top=topologies(), data=st.data())
def test_a_logical_multicast_reaches_exactly_the_matching_apics__MATCH_5(
    platform: Platform, top: LogicalTopology, data: st.DataObject
) -> None:
    """MATCH-5, MATCH-6, MATCH-3, MATCH-1, MSI-1: with every APIC software-enabled, in one
    logical model (xAPIC flat, xAPIC cluster, x2APIC cluster) and with distinct logical IDs, a
    fixed logical message (an IPI from any vCPU, or an MSI) reaches exactly the APICs whose
    logical ID matches the MDA: flat ``lid & MDA``; cluster equal clusters and
    ``lid & MDA & 0xF`` (cluster 0xF only if the profile addresses it); x2APIC equal
    ``LDR >> 16`` and ``LDR & MDA & 0xFFFF``; the broadcast MDA everyone.  An MSI's 0xFF is the
    x2APIC broadcast only under the broadcast quirk.  KVM_SIGNAL_MSI returns the number that
    accepted, or 0/-1 when there is none (MSI-1, FAST-8)."""
    vm, cpus = top.build(platform)
    n = len(cpus)
    vector = data.draw(legal_vectors, label="vector")
    dest = data.draw(destinations(top), label="dest")
    msi = top.mode is Mode.XAPIC or dest <= 0xFF
    msi = msi and data.draw(st.booleans(), label="MSI (else IPI)")

    if msi:
        result = signal_logical_msi(vm, dest, vector, lowest=False, hint=False)
    else:
        src = data.draw(st.integers(0, n - 1), label="source")
        cpus[src].send(ICR_LOGICAL | ICR_ASSERT | vector, dest)
    expected = top.receivers(
        dest, platform.profile, msi=msi, quirk=platform.kvm.broadcast_quirk
    )

    assert irrs(vm) == [frozenset({vector}) if i in expected else NONE for i in range(n)]
    if msi:
        assert result == len(expected) if expected else result in (0, -1)
    assert [cpu.run() for cpu in cpus] == [[vector] if i in expected else [] for i in range(n)]


@st.composite
def lowest_priority_cases(draw: st.DrawFn) -> tuple[LogicalTopology, int]:
    """A topology and an MDA that is the union of some vCPUs' logical IDs in one cluster, so
    that every bit of the MDA names an APIC."""
    top = draw(topologies())
    usable = [
        i
        for i, lid in enumerate(top.logical_ids)
        if lid & (0xFFFF if top.model == "x2apic" else 0xF if top.model == "cluster" else 0xFF)
    ]
    if not usable:
        return top, X2APIC_BROADCAST if top.model == "x2apic" else XAPIC_BROADCAST
    first = draw(st.sampled_from(usable), label="first candidate")
    cluster_mask = {"flat": 0, "cluster": 0xF0, "x2apic": 0xFFFF0000}[top.model]
    same_cluster = [
        i
        for i in usable
        if top.logical_ids[i] & cluster_mask == top.logical_ids[first] & cluster_mask
    ]
    chosen = draw(st.sets(st.sampled_from(same_cluster)), label="more candidates") | {first}
    return top, reduce(or_, (top.logical_ids[i] for i in chosen))


@given(case=lowest_priority_cases(), data=st.data())
def test_lowest_priority_reaches_exactly_one_candidate__LP_1(
    platform: Platform, case: tuple[LogicalTopology, int], data: st.DataObject
) -> None:
    """LP-1, SLOW-2: a lowest-priority logical message (an IPI with delivery mode LOWEST, an
    MSI in LOWEST mode, or a FIXED MSI with the redirection hint) whose MDA is made of
    software-enabled APICs' logical IDs reaches exactly one of the APICs it matches (MATCH-5),
    whatever the policy (vector hashing, arbitration counter, TPR) and whatever TPR each vCPU
    has; a sequence of such messages reaches one candidate each time.  In x2APIC mode a LOWEST
    IPI is sent only if the profile allows x2APIC lowest-priority IPIs (DIFF-D5); otherwise
    nobody receives it."""
    top, dest = case
    vm, cpus = top.build(platform)
    n = len(cpus)
    for cpu in cpus:
        cpu.write(TPR, data.draw(st.integers(0, 0x7F), label=f"TPR of vCPU {cpu.index}"))
    candidates = top.receivers(
        dest, platform.profile, msi=False, quirk=platform.kvm.broadcast_quirk
    )
    kinds = ["IPI"] + (["MSI LOWEST", "MSI FIXED + hint"] if dest <= 0xFF else [])
    # The MSI 0xFF quirk (MATCH-1) makes it a broadcast for x2APIC targets: recompute then.
    for _ in range(data.draw(st.integers(1, 4), label="messages")):
        kind = data.draw(st.sampled_from(kinds), label="kind")
        vector = data.draw(st.integers(0x80, 0xFF), label="vector (above every TPR)")
        if kind == "IPI":
            src = data.draw(st.integers(0, n - 1), label="source")
            cpus[src].send(ICR_LOGICAL | ICR_LOWEST | ICR_ASSERT | vector, dest)
            matching = candidates
            if top.mode is Mode.X2APIC and not platform.profile.x2apic_lowest_priority_ipi:
                matching = set()
        else:
            lowest = kind == "MSI LOWEST"
            signal_logical_msi(vm, dest, vector, lowest=lowest, hint=not lowest)
            matching = top.receivers(
                dest, platform.profile, msi=True, quirk=platform.kvm.broadcast_quirk
            )

        got = [i for i, pending in enumerate(irrs(vm)) if pending]
        if not matching:
            assert got == [], (kind, "nothing may be delivered")
            continue
        assert len(got) == 1, (kind, f"delivered to {got}, expected exactly one of {matching}")
        (winner,) = got
        assert winner in matching, (kind, winner, matching)
        assert irrs(vm)[winner] == {vector}
        assert cpus[winner].run() == [vector]


@given(
    members=st.lists(st.integers(1, 0xF), min_size=1, max_size=4, unique=True),
    dest=st.one_of(st.integers(0xF0, 0xFF), st.just(XAPIC_BROADCAST)),
    vector=legal_vectors,
    msi=st.booleans(),
)
def test_cluster_15_is_reached_only_where_the_profile_addresses_it__MATCH_6(
    platform: Platform, members: list[int], dest: int, vector: int, msi: bool
) -> None:
    """MATCH-6, MATCH-5: xAPIC cluster model, some vCPUs in cluster 0xF (LDR 0xF<m>) and one in
    cluster 1.  A logical MDA 0xF<x> (IPI or MSI) reaches the cluster-0xF vCPUs sharing a
    member bit with it if and only if the profile addresses cluster 0xF; 0xFF, the broadcast,
    reaches every vCPU under every profile."""
    lids = (*(0xF0 | m for m in members), 0x11)
    top = LogicalTopology.of("cluster", tuple(range(len(lids))), lids)
    vm, cpus = top.build(platform)
    if msi:
        signal_logical_msi(vm, dest, vector, lowest=False, hint=False)
    else:
        cpus[-1].send(ICR_LOGICAL | ICR_ASSERT | vector, dest)
    expected = top.receivers(
        dest, platform.profile, msi=msi, quirk=platform.kvm.broadcast_quirk
    )
    if dest == XAPIC_BROADCAST:
        assert expected == set(range(len(lids)))
    assert irrs(vm) == [frozenset({vector}) if i in expected else NONE for i in range(len(lids))]


@given(
    ids=st.lists(
        st.one_of(st.integers(0, 20), st.sampled_from((0xFF, 0x100, 4095))),
        min_size=1,
        max_size=6,
        unique=True,
    ),
    logical=st.booleans(),
    vector=legal_vectors,
)
def test_a_device_0xff_is_an_x2apic_broadcast_only_under_the_quirk__MATCH_1(
    platform: Platform, ids: list[int], logical: bool, vector: int
) -> None:
    """MATCH-1, MATCH-3, MATCH-4, MATCH-5, MSI-1: an MSI to destination 0xFF with every vCPU in
    x2APIC mode is the x2APIC broadcast (every vCPU) when the broadcast quirk is on (the VM's
    default is the profile's).  With it off, 0xFF is an ordinary x2APIC destination: physical,
    the vCPU whose x2APIC ID is 0xFF; logical, cluster 0 members 0-7 (x2APIC IDs 0-7)."""
    vm = platform.vm(vcpu_ids=ids)
    boot(vm, Mode.X2APIC)
    address = MSI_BASE | XAPIC_BROADCAST << 12 | (MSI_LOGICAL if logical else 0)
    result = vm.signal_msi(address, 0, vector)
    if platform.kvm.broadcast_quirk:
        expected = set(range(len(ids)))
    elif logical:
        expected = {i for i, v in enumerate(ids) if v < 8}
    else:
        expected = {i for i, v in enumerate(ids) if v == XAPIC_BROADCAST}
    assert irrs(vm) == [frozenset({vector}) if i in expected else NONE for i in range(len(ids))]
    assert result == len(expected) if expected else result in (0, -1)
