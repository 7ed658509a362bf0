"""The architectural bus: N local APICs, and where an interrupt message goes among them.

This is the *reference* delivery of the project: simple enough to be obviously right, and the
oracle the hypervisor's faster paths (optimized map, PV IPI, accelerators) are checked against.

Implements:

* KVM's slow path ``kvm_irq_delivery_to_apic`` past its fast-path attempt (``lapic.c`` 6.18;
  reference ``kvm_lapic.md`` §10.3, §11), through ``lapic.slowpath.deliver_slow``, the one
  implementation of the architectural delivery stage (the hypervisor's fallback runs it too;
  its optimized map is the independent path that is checked against it):

  - SLOW-1: a *physical* message to destination 0xFF that is lowest priority (delivery mode
    LOWEST or the MSI redirection hint, KVM ``kvm_lowest_prio_delivery``) has its delivery mode
    rewritten to FIXED.  The redirection hint is *not* cleared, so a hinted message is still
    arbitrated to one target (now accepted as FIXED, which leaves ``arb_prio`` alone), and a
    hinted message of any other mode (NMI, INIT, ExtINT...) becomes FIXED as well; only a LOWEST
    message without the hint becomes a broadcast.  This is what the code does; the reference's
    "all matched get it" holds only for the unhinted case.
  - SLOW-2: the APICs are visited in index order; only hardware-enabled ones are candidates
    (``kvm_apic_present``); matching is ``lapic.destination.matches`` (``kvm_apic_match_dest``,
    MATCH-1..7).  A non-lowest-priority message is offered to every match (``__apic_accept_irq``
    through ``LocalApic.accept_interrupt``); the result starts at -1, becomes 0 at the first
    match and adds each acceptance.
  - LP-1..3: a lowest-priority message considers only the *software-enabled* matches; one of
    them is chosen and offered the message; the result is its acceptance (0 or 1), or -1 when
    there was no software-enabled match.  Choosing follows the bus's ``lowest_priority``:
    VECTOR_HASHING takes the ``(vector % n)``-th candidate in index order
    (``kvm_vector_to_index``); ARB_COUNTER the smallest ``arb_prio``, ties to the first
    (``kvm_apic_compare_prio``); LOWEST_TPR is the SDM's rule below.

* the SDM's lowest-priority arbitration (Vol. 3 10.6.2.4, policy LOWEST_TPR, ``sdm`` preset):
  the focus processor first, i.e. a candidate that already has the vector in IRR or ISR and
  whose SVR bit 9 (focus processor checking disabled) is clear; otherwise the candidate of the
  lowest priority class ``TPR[7:4]``.
* ``signal_msi``: an MSI as KVM_SIGNAL_MSI delivers it (``kvm_set_msi_irq``: ``Msi.decode``,
  then the slow path with no source, so MATCH-1's broadcast quirk applies).
* one shared :class:`~lapic.timer.Clock`: ``advance`` moves it and polls every APIC's timer.

Not modelled here: KVM's optimized map and fast path (``kvm_irq_delivery_to_apic_fast``), the
PV IPI hypercall, ``x2apic_format``'s effect on the map (MAP-3; matching itself does not depend
on it), the IOAPIC and the PIC, the ``dest_map`` RTC EOI tracking, the -EINVAL KVM_SIGNAL_MSI
returns under ``x2apic_format`` when ``address_hi`` bits 7:0 are set (``kvm_msi_route_invalid``,
an ioctl check of the hypervisor layer), and any timing: delivery is synchronous, there is no
APIC bus arbitration, no delivery status, no retry.  Sender-side checks (illegal vector,
x2APIC lowest-priority IPI) happen in ``LocalApic`` before a message reaches the bus.

Choices settled here:

* SLOW-1 applies under every profile.  The SDM (10.6.2.1) says a physical broadcast with
  lowest-priority delivery "is not supported", so no outcome is wrong for the ``sdm`` preset;
  taking KVM's keeps one rule.
* LOWEST_TPR ties (several focus processors, or several candidates in the lowest class) go to
  the lowest index.  The SDM leaves the tie-break to the chipset.  The class is ``TPR[7:4]``
  (the Pentium 4/Xeon chipset rule), not the P6 APR.
* ``vector_hashing`` chooses between VECTOR_HASHING and ARB_COUNTER, KVM's module parameter.
  Under the policy LOWEST_TPR it has no meaning, and passing a bool there raises
  :class:`ApicValueError` rather than being ignored (pass ``lowest_priority=...`` to mix).
* Built from a list, the APICs must share one ``Clock`` and one ``Profile``, have distinct
  vCPU ids, and not already have a ``send_hook`` (the bus takes it over).
* ``deliver`` refuses a ``source`` that is not one of the bus's APICs (SELF and
  ALL_EXCLUDING_SELF are decided by identity, so a stranger would silently change their meaning).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from lapic.apic import LocalApic
from lapic.faults import ApicTypeError, ApicValueError, check_int
from lapic.icr import Interrupt, Msi, _validate
from lapic.profile import LowestPriorityPolicy, Profile, resolve
from lapic.slowpath import apply_vector_hashing, deliver_slow, reference_defaults
from lapic.timer import Clock

KVM_MAX_VCPUS = 4096
"""The largest bus ``ApicBus(n)`` builds (KVM's ``KVM_MAX_VCPUS`` on x86-64)."""


class ApicBus:
    """N local APICs on one bus.  ``ApicBus(4)`` or ``ApicBus([apic0, apic1, ...])``.

    ``broadcast_quirk`` (MATCH-1) and ``lowest_priority`` (LP-1..3) are the bus-level inputs
    (in a VM, KVM's options: ``hypervisor.config.KvmOptions``); ``None`` takes the default of
    the preset the profile was built from (``lapic.slowpath.REFERENCE_DEFAULTS``: KVM's
    quirk on and vector hashing, or the SDM's no quirk and TPR/focus arbitration).
    ``vector_hashing`` (KVM's module parameter) switches a KVM policy between VECTOR_HASHING
    and ARB_COUNTER.  Every APIC's ``send_hook`` is this bus, so
    an ICR write on any of them is delivered here with that APIC as the source.
    """

    def __init__(
        self,
        apics: int | Iterable[LocalApic],
        profile: str | Profile | None = None,
        *,
        broadcast_quirk: bool | None = None,
        lowest_priority: LowestPriorityPolicy | None = None,
        vector_hashing: bool | None = None,
    ) -> None:
        if isinstance(apics, bool):
            raise ApicTypeError("apics must be an int or an iterable of LocalApic, not bool")
        if isinstance(apics, int):
            n = check_int("apics", apics, 1, KVM_MAX_VCPUS)
            prof = resolve("kvm" if profile is None else profile)
            self.clock = Clock()
            self._apics = tuple(
                LocalApic(vcpu_id=i, profile=prof, bsp=(i == 0), clock=self.clock)
                for i in range(n)
            )
        else:
            self._apics, prof = _adopt(apics, profile)
            self.clock = self._apics[0].clock
        self.profile: Profile = prof

        if broadcast_quirk is not None and not isinstance(broadcast_quirk, bool):
            raise ApicTypeError(
                f"broadcast_quirk must be a bool or None, not {type(broadcast_quirk).__name__}"
            )
        if lowest_priority is not None and not isinstance(lowest_priority, LowestPriorityPolicy):
            raise ApicTypeError(
                "lowest_priority must be a LowestPriorityPolicy or None, "
                f"not {type(lowest_priority).__name__}"
            )
        default_quirk, default_policy = reference_defaults(prof)
        self.broadcast_quirk: bool = default_quirk if broadcast_quirk is None else broadcast_quirk
        """MATCH-1 in force on this bus."""

        policy = apply_vector_hashing(
            default_policy if lowest_priority is None else lowest_priority,
            vector_hashing,
            prof.name,
        )
        self.lowest_priority: LowestPriorityPolicy = policy
        """The arbitration policy in force on this bus."""

        self._members = frozenset(id(a) for a in self._apics)
        for apic in self._apics:
            apic.send_hook = self._send_from

    # ---------------------------------------------------------------------------------
    # Container
    # ---------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> LocalApic:
        return self._apics[index]

    def __len__(self) -> int:
        return len(self._apics)

    def __iter__(self) -> Iterator[LocalApic]:
        return iter(self._apics)

    def __repr__(self) -> str:
        return (
            f"ApicBus({len(self._apics)}, profile={self.profile!r}, "
            f"broadcast_quirk={self.broadcast_quirk}, lowest_priority={self.lowest_priority!r})"
        )

    # ---------------------------------------------------------------------------------
    # Delivery
    # ---------------------------------------------------------------------------------
    def deliver(self, irq: Interrupt, source: LocalApic | None = None) -> int:
        """KVM ``kvm_irq_delivery_to_apic`` slow path (SLOW-1, SLOW-2, LP-1..3).

        ``source`` is the sending APIC of an IPI, or None for an IOAPIC/MSI message.  Returns
        -1 when no APIC was offered the message (nothing matched, or a lowest-priority message
        found no software-enabled match), else the number of APICs that accepted it.
        """
        if not isinstance(irq, Interrupt):
            raise ApicTypeError(f"irq must be an Interrupt, not {type(irq).__name__}")
        _validate(irq, 0xFFFFFFFF)
        if not isinstance(irq.redir_hint, bool):
            raise ApicTypeError(f"redir_hint must be a bool, not {type(irq.redir_hint).__name__}")
        if source is not None and id(source) not in self._members:
            raise ApicValueError(f"source={source!r} is not an APIC of this bus")

        return deliver_slow(
            self._apics,
            irq,
            source,
            profile=self.profile,
            broadcast_quirk=self.broadcast_quirk,
            policy=self.lowest_priority,
        )

    def signal_msi(
        self,
        address_lo: int,
        # Equivalent mutant (1): without x2apic_format address_hi is ignored, with it only
        # bits 31:8 count, so any default below 0x100 behaves the same.
        address_hi: int = 0,  # pragma: no mutate
        data: int = 0,
        *,
        x2apic_format: bool = False,
    ) -> int:
        """KVM_SIGNAL_MSI: decode the MSI (``kvm_set_msi_irq``) and deliver it with no source.
        ``x2apic_format`` is KVM_X2APIC_API_USE_32BIT_IDS (destination bits 31:8 from
        ``address_hi``)."""
        if not isinstance(x2apic_format, bool):
            raise ApicTypeError(
                f"x2apic_format must be a bool, not {type(x2apic_format).__name__}"
            )
        # Msi.decode checks address_lo, address_hi and data (32-bit ints, named in errors).
        irq = Msi(address_lo, address_hi, data).decode(x2apic_format=x2apic_format)
        return self.deliver(irq)

    def _send_from(self, source: LocalApic, irq: Interrupt) -> None:
        """``send_hook`` of every APIC: an ICR/SELF IPI write delivers from its APIC."""
        self.deliver(irq, source)

    # ---------------------------------------------------------------------------------
    # Time
    # ---------------------------------------------------------------------------------
    def advance(self, ns: int) -> int:
        """Advance the shared clock by ``ns`` and poll every APIC's timer (index order);
        returns the number of timer interrupts that fired."""
        self.clock.advance(ns)
        return sum(apic.poll_timer() for apic in self._apics)


def _adopt(
    apics: Iterable[LocalApic], profile: str | Profile | None
) -> tuple[tuple[LocalApic, ...], Profile]:
    """Check a caller-built list of APICs (see the module's choices)."""
    if isinstance(apics, (str, bytes)) or not isinstance(apics, Iterable):
        raise ApicTypeError(
            f"apics must be an int or an iterable of LocalApic, not {type(apics).__name__}"
        )
    members = tuple(apics)
    if not members:
        raise ApicValueError("apics must not be empty")
    for apic in members:
        if not isinstance(apic, LocalApic):
            raise ApicTypeError(f"apics must hold LocalApic, not {type(apic).__name__}")
    first = members[0]
    ids = [a.vcpu_id for a in members]
    if len(set(ids)) != len(ids):
        raise ApicValueError(f"apics must have distinct vcpu_ids, got {ids}")
    if any(a.clock is not first.clock for a in members):
        raise ApicValueError("apics must share one Clock (LocalApic(..., clock=shared))")
    if any(a.profile != first.profile for a in members):
        raise ApicValueError("apics must share one Profile")
    prof = first.profile
    if profile is not None and resolve(profile) != prof:
        raise ApicValueError(f"profile={profile!r} differs from the APICs' profile {prof!r}")
    for apic in members:
        if apic.send_hook is not None:
            raise ApicValueError(f"{apic!r} already has a send_hook (is it on another bus?)")
    return members, prof


__all__ = ["KVM_MAX_VCPUS", "ApicBus"]
