"""Profiles: every implementation-defined choice, as data chosen at construction.

A :class:`Profile` names each place where Linux KVM's in-kernel LAPIC (6.18) and the Intel SDM
(Vol. 3, APIC chapter) give different answers (reference ``kvm_lapic.md`` §16, rows D1-D19),
plus the KVM quirks that userspace can switch off.  Code asks the profile; it never tests which
preset it runs under.  Two presets:

* ``"kvm"``: Linux KVM bit for bit (the default);
* ``"sdm"``: the architecture as the SDM states it.  Where the SDM allows several outcomes
  ("may"), the field's doc says which one this preset takes and why.

Build your own from a preset: ``Profile.preset("kvm").replace(esr_latching=True)`` or
``Profile.custom("sdm", xapic_id_writable=True)``.

Not here: properties of the virtual CPU (x2APIC/TSC-deadline/CMCI support, MAXPHYADDR), which are
:class:`lapic.apic.Features`; and what concerns several APICs or the VM (the broadcast quirk
D9, the lowest-priority policy D5, KVM's optimized map D6/D8 and KVMB-8, ``x2apic_format``),
which are ``hypervisor.config.KvmOptions``; the reference bus takes the first two as explicit
inputs (``lapic.bus.ApicBus``, defaults in ``lapic.slowpath.REFERENCE_DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lapic.faults import ApicTypeError, ApicValueError


class LowestPriorityPolicy(Enum):
    """How a lowest-priority message picks its one target among the candidates."""

    VECTOR_HASHING = "vector_hashing"
    """KVM with ``vector_hashing=1`` (default): the ``(vector % n)``-th candidate (LP-2)."""
    ARB_COUNTER = "arb_counter"
    """KVM with ``vector_hashing=0``: smallest ``apic_arb_prio``, ties to the first (LP-3)."""
    LOWEST_TPR = "lowest_tpr"
    """SDM 10.6.2.4: focus processor first (vector in its IRR/ISR, focus checking on); else
    the lowest TPR priority class (TPR[7:4], what P4/Xeon chipsets arbitrate on); ties to the
    lowest APIC index.  The SDM leaves the tie-break to the chipset; the lowest index is this
    model's documented choice."""

    def __repr__(self) -> str:
        return f"LowestPriorityPolicy.{self.name}"


@dataclass(frozen=True, slots=True)
class Profile:
    """All knobs; each field's docstring names its source."""

    name: str = "kvm"

    esr_latching: bool = False
    """D1.  KVM never sets ESR bits (REG-ESR-1).  SDM 10.5.3: errors are latched and become
    visible after the next ESR write (write-then-read); each error also fires LVT Error."""

    accept_illegal_vectors: bool = True
    """D2.  KVM delivers vectors 0-15 like any other (PRIO-7).  SDM 10.5.2: a vector 0-15 in a
    fixed/lowest-priority message is illegal: the sender logs Send Illegal Vector and does not
    send; a receiver logs Receive Illegal Vector and does not set IRR."""

    x2apic_strict_reserved_bits: bool = False
    """D3.  KVM #GPs only on bits 63:32, ICR 0xFFF32000, SELF IPI 31:8 and non-zero ESR
    (MSR-6).  SDM 10.12.1.3: a WRMSR setting any reserved bit raises #GP (TPR 31:8, a
    non-zero EOI, reserved SVR/LVT/TDCR bits)."""

    apr_computed: bool = False
    """D13.  KVM reads APR as 0.  SDM 10.6.2.4 (P6 family): APR is computed from TPR, the
    highest IRR and the highest ISR."""

    lvt_status_writable: bool = True
    """D12.  KVM's LVT masks keep bit 12 (delivery status) and, for LINT0/1, bit 14 (remote
    IRR) writable.  SDM Figure 10-8: both are read-only (reads 0 in this model, which
    delivers synchronously)."""

    remote_read_is_pv_kick: bool = True
    """D14.  KVM uses delivery mode 011 (remote read) as the PV unhalt kick: accepted, sets
    ``pv_unhalted``.  SDM: remote read is not supported on P4/Xeon and in x2APIC mode: the
    message is not accepted."""

    cluster15_addressable: bool = True
    """D16.  KVM matches xAPIC logical cluster 0xF like any cluster (MATCH-6).  SDM 10.6.2.2:
    clusters are 0-14; cluster 0xF only appears in the broadcast MDA 0xFF."""

    honor_suppress_eoi_broadcast: bool = False
    """D17.  Legacy KVM (no KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST) reports every EOI of a
    level-triggered vector even with SVR bit 12 set (DEOI-1).  SDM 10.8.5: with SVR bit 12 set,
    an EOI of a level-triggered interrupt is not broadcast to the I/O APICs."""

    xapic_id_writable: bool = True
    """D18.  KVM stores ``val & 0xFF000000`` on an xAPIC ID write (REG-ID-1).  SDM 10.4.6: the
    ID is read-only on Nehalem and later (this preset's reference CPU)."""

    svr_low_nibble_hardwired: bool = False
    """D19.  SDM 10.9: on P6/Pentium SVR bits 3:0 are hard-wired to 1; on P4 and later they are
    programmable (both presets: programmable).  True models the P6."""

    disable_resets_state: bool = False
    """D10.  KVM keeps every register across APIC_BASE EN 1->0->1 except the xAPIC ID
    (BASE-6).  SDM 10.4.3: on EN=0 "prior initialization ... may be lost and the APIC may
    return to the [power-up] state".  The SDM allows both; the sdm preset takes the reset, the
    reading software must be robust against."""

    host_may_leave_x2apic: bool = True
    """D11.  KVM lets a host-initiated APIC_BASE write go x2APIC->xAPIC and disabled->x2APIC
    (BASE-5).  The SDM knows no host writes: every x2APIC->xAPIC transition #GPs."""

    xapic_matches_x2apic_id: bool = True
    """D7.  KVM's hotplug hack: a physical MDA > 0xFF matches an xAPIC-mode target by its
    x2APIC ID (MATCH-4).  SDM/hardware (Knights Landing): the target compares ``MDA & 0xFF``
    with its 8-bit ID."""




    x2apic_lowest_priority_ipi: bool = True
    """D5.  KVM sends lowest-priority IPIs from x2APIC mode.  SDM 10.5.3 (ESR bit 4) and
    reference LP-1: x2APIC does not support lowest-priority IPIs; the sender logs Redirectable
    IPI and nothing is sent."""

    init_deassert_accepted: bool = False
    """D15.  KVM answers 0 (not accepted) to an INIT level de-assert and changes nothing.  SDM
    10.6.1: it only synchronises arbitration IDs, which P4/Xeon no longer support; the sdm
    preset also treats it as not accepted (no observable state changes either way)."""

    tsc_deadline_msr_needs_cpuid: bool = False
    """KVM's ``kvm_set_msr_common``/``kvm_get_msr_common`` handle IA32_TSC_DEADLINE (0x6E0)
    without looking at the guest's CPUID (writes outside deadline mode are ignored, reads
    give 0).  SDM: the MSR exists only with CPUID.01H:ECX[24]; without it, access #GPs."""

    lint0_reenabled_quirk: bool = True
    """KVM_X86_QUIRK_LINT0_REENABLED (default on): after RESET the BSP's LVT LINT0 is 0x700
    (ExtINT, unmasked).  SDM 10.4.7.1: every LVT is masked after RESET."""

    mmio_hole_quirk: bool = True
    """KVM_X86_QUIRK_LAPIC_MMIO_HOLE (default on): with the APIC disabled or in x2APIC mode,
    MMIO reads of the APIC page return all ones and writes are dropped (MMIO-2).  Off (and in
    the SDM, 10.12.2): the page is not decoded by the APIC at all; reads see
    ``unserviced_read_value``."""

    unserviced_read_value: int = 0
    """What a not-serviced MMIO read (unaligned, non-readable register) returns when
    ``unserviced_read_repeats_last`` is off.  The reference marks KVM's value UNVERIFIED
    (§18.1); the measurement is KVMB-4 below.  A parameter, not a fact."""

    unserviced_read_repeats_last: bool = True
    """KVMB-4 (measured on Linux 6.18 through ``apicsim.kvm``): KVM leaves the guest's data
    buffer untouched for an MMIO read it does not service, so the guest sees the bytes of its
    previous MMIO read of the APIC page (0 on a fresh vCPU).  False: ``unserviced_read_value``
    instead (the sdm preset: the SDM does not define these reads)."""


    set_state_stale_ppr: bool = True
    """STATE-4 (measured on Linux 6.18 through ``apicsim.kvm``): ``kvm_apic_set_state``
    recomputes PPR before it recounts the restored in-service vectors, so the PPR stored by
    KVM_SET_LAPIC (and returned by KVM_GET_LAPIC until anything recomputes it: a guest PPR
    read, an interrupt check) is computed from the vCPU's *previous* in-service state, e.g.
    0 instead of 0x40 for a first restore with ISR {0x31, 0x41}.  False: recomputed from the
    restored image."""

    set_state_svr_before_fixup: bool = True
    """KVM ``kvm_apic_set_state`` applies SVR before the x2APIC ID check, so a KVM_SET_LAPIC
    that fails with -EINVAL has still changed SVR (STATE-4, code-derived).  False: the failed
    call changes nothing."""

    bus_cycle_ns: int = 1
    """Timer input clock period: KVM's APIC_BUS_CYCLE_NS_DEFAULT (1 ns, changeable through
    KVM_CAP_X86_APIC_BUS_CYCLES_NS).  On hardware it is the core crystal clock (CPUID 0x15)."""

    min_periodic_ns: int = 200_000
    """KVM ``min_timer_period_us`` (module parameter, default 200): a periodic timer period is
    raised to at least this.  The SDM has no minimum (0)."""

    @staticmethod
    def preset(name: str) -> Profile:
        try:
            return PRESETS[name]
        except KeyError:
            raise ApicValueError(
                f"profile={name!r} is not a preset; choose one of {sorted(PRESETS)}"
            ) from None

    @staticmethod
    def custom(base: str, **changes: Any) -> Profile:
        return Profile.preset(base).replace(**changes)

    def replace(self, **changes: Any) -> Profile:
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise ApicValueError(f"{key!r} is not a Profile field")
            expected = type(getattr(self, key))
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                got = type(value).__name__
                raise ApicTypeError(f"{key} must be {expected.__name__}, not {got}")
        if "name" not in changes:
            changes["name"] = f"{self.name}+custom"
        return dataclasses.replace(self, **changes)

    def differences(self, other: Profile) -> dict[str, tuple[object, object]]:
        """Fields whose values differ: ``{field: (self_value, other_value)}``."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.name != "name" and getattr(self, f.name) != getattr(other, f.name)
        }

    def __repr__(self) -> str:
        """Valid Python that rebuilds an equal profile, ``name`` included."""
        if PRESETS.get(self.name) == self:
            return f"Profile.preset({self.name!r})"
        args = ["'kvm'"]
        if self.name != "kvm+custom":  # the name Profile.custom('kvm', ...) gives by itself
            args.append(f"name={self.name!r}")
        args += [f"{k}={mine!r}" for k, (mine, _) in self.differences(PRESETS["kvm"]).items()]
        return f"Profile.custom({', '.join(args)})"


KVM = Profile()
SDM = Profile(
    name="sdm",
    esr_latching=True,
    accept_illegal_vectors=False,
    x2apic_strict_reserved_bits=True,
    apr_computed=True,
    lvt_status_writable=False,
    remote_read_is_pv_kick=False,
    cluster15_addressable=False,
    honor_suppress_eoi_broadcast=True,
    xapic_id_writable=False,
    disable_resets_state=True,
    host_may_leave_x2apic=False,
    xapic_matches_x2apic_id=False,
    x2apic_lowest_priority_ipi=False,
    tsc_deadline_msr_needs_cpuid=True,
    lint0_reenabled_quirk=False,
    mmio_hole_quirk=False,
    set_state_svr_before_fixup=False,
    set_state_stale_ppr=False,
    unserviced_read_repeats_last=False,
    min_periodic_ns=0,
)
PRESETS: dict[str, Profile] = {"kvm": KVM, "sdm": SDM}


REFERENCE_DEFAULTS: dict[str, tuple[bool, LowestPriorityPolicy]] = {
    "kvm": (True, LowestPriorityPolicy.VECTOR_HASHING),
    "sdm": (False, LowestPriorityPolicy.LOWEST_TPR),
}
"""The bus-level inputs a set of APICs is delivered with when the caller names none, by the
preset a profile was built from: ``(broadcast_quirk, lowest_priority)``.

* ``"kvm"``: KVM's defaults: the broadcast quirk on (MATCH-1; KVM_X2APIC_API_DISABLE_BROADCAST_
  QUIRK not set) and vector hashing (module parameter ``vector_hashing=1``, LP-2);
* ``"sdm"``: 0xFF is only the xAPIC broadcast (DIFF-D9) and the SDM's focus/TPR arbitration
  (10.6.2.4, LP-1).

These are not one-APIC choices, so ``lapic.Profile`` does not carry them; ``lapic.bus.ApicBus``,
``lapic.destination.matches``
and ``hypervisor.config.KvmOptions.for_profile`` read this one table."""


def reference_defaults(profile: Profile) -> tuple[bool, LowestPriorityPolicy]:
    """:data:`REFERENCE_DEFAULTS` for ``profile``: by the part of its name before ``+`` (the
    name ``Profile.custom``/``replace`` give), ``"kvm"``'s for any other name."""
    base = profile.name.partition("+")[0]
    return REFERENCE_DEFAULTS.get(base, REFERENCE_DEFAULTS["kvm"])


def resolve(profile: str | Profile) -> Profile:
    """Accept a preset name or a Profile (for constructors)."""
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, str):
        return Profile.preset(profile)
    raise ApicTypeError(f"profile must be a preset name or a Profile, not {type(profile).__name__}")


