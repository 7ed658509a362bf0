"""The route cache: the targets the optimized map chose for a message, kept until the map
changes.

KVM's optimized map (``kvm->arch.apic_map``, ``hypervisor.apic_map``) is already a cache of
the destination decision: ``kvm_irq_delivery_to_apic_fast`` looks a message's destination up
in it instead of asking every APIC.  This module keeps the answer of that lookup (reference
``kvm_lapic.md`` §10.2, FAST-1..9) per message, so a message sent again is neither decoded nor
looked up again:

* per source APIC (None for a device MSI), a decoded :class:`~lapic.icr.Interrupt` -> the
  APICs the map chose, in the order the map path offered it to them (keyed by destination
  and vector, the whole message compared on a hit);
* per raw MSI (address_lo, data) with address_hi = 0 and no flags: the decoded message and
  its targets (KVM_SIGNAL_MSI then skips the decode too);
* per source APIC in x2APIC mode (ICR not split), per raw 64-bit ICR value written with WRMSR
  0x830: its targets, the ``send_hook`` it went through, what the write stores and the
  exit's record for the exit log (``Vcpu.msr_exit`` then neither decodes nor looks up the
  message, nor makes a record: KVM's own fastpath for this exit,
  ``handle_fastpath_set_x2apic_icr_irqoff``, is the model).  Learnt from a route
  already kept for the decoded message, so it is exactly as valid as that route.

What may be kept: only a route the map decided (``deliver`` reported the fast path) with at
least one target, for a message that is not lowest priority (its arbitration reads PPR and
``arb_prio``, or hashes the vector: it is decided anew every time), learnt while the map
stayed the same.  Everything else is routed anew every time, as before.

When it is forgotten (``forget``): whenever the map is marked dirty (``Vm._mark_map_dirty``,
every APIC's ``map_hook``: an APIC ID, LDR, DFR, APIC_BASE (enable, x2APIC mode, base),
SVR software enable, a RESET/INIT or a KVM_SET_LAPIC image), when a vCPU is added (hotplug)
and when a snapshot is restored.  Those are everything a route depends on besides the
message and the VM's fixed options (``KvmOptions``: one cache per VM): the map, and the
source's x2APIC mode (the broadcast test and the ICR layout), itself an APIC_BASE change.
What a hit still checks each time, because it can change without touching the map: the
route cache switch, the tracer, queued steps, and for an ICR value the sender's ``send`` op
(an accelerator may bind its own) and ``send_hook``.  Each target accepts through its
``LocalApic.acceptor`` of the message, made when the route is kept: it has read the
target's enable bits (APIC_BASE.EN, SVR's software enable) and chosen between its inline and
bound ops then, which is right for as long as the route lives, because changing any of them
dirties the map; its ``notify_hook`` it reads on every delivery.

The cache is bounded (``LIMIT`` routes; past it, everything is forgotten).  Not modelled:
anything of KVM; this is a simulator speed-up whose answers equal the uncached ones (tested
by ``tests/hypervisor/test_routes.py`` against a VM with ``route_cache = False``).
"""

from __future__ import annotations

from collections.abc import Callable

from hypervisor.delivery import AcceptFn
from hypervisor.exits import ExitRecord
from lapic.apic import LocalApic
from lapic.icr import Interrupt

LIMIT = 1 << 16
"""Routes kept at most (source routes and MSI routes together; ICR values, apart)."""

Targets = tuple[LocalApic, ...]
Accepts = tuple[Callable[[], bool], ...]
"""Each target's ``LocalApic.acceptor`` of the message, in the targets' order: what a hit
calls (no decode, no lookup, no per-call argument handling)."""
Route = tuple[Interrupt, Accepts, Targets, int, int, int, int]
"""A kept route: the decoded message (compared whole on a hit), its targets' acceptors, the
targets, then the message's vector, delivery mode, trigger and level as
``LocalApic.accept_fast`` takes them (what the acceptors were made from)."""
IcrRoute = tuple[Accepts, object, int, Targets, int, int, int, int, ExitRecord]
"""A kept x2APIC ICR route: the targets' acceptors, the ``send_hook`` the message was sent
through (a hit requires the sender's hook to be that very object still), the quadword the
write stores (``LocalApic.x2apic_icr_image``), then the targets, vector, delivery mode,
trigger and level, as in :data:`Route`, and last the exit log's record of the write
(``(vcpu index, MSR_WRITE, 0x830, value)``, as ``Vm.exit_log`` holds it)."""


class RouteCache:
    """The routes of one VM (``Vm._routes``)."""

    __slots__ = ("_icr_count", "_icr_filled", "_size", "by_source", "icr", "msi")

    def __init__(self) -> None:
        self.by_source: dict[LocalApic | None, dict[int, Route]] = {}
        """source APIC (None: a device) -> ``dest << 8 | vector`` -> (message, targets): one
        message per key (the last learnt), compared whole on a hit, so the lookup hashes
        two ints instead of the message.  Read directly by the hot path of ``Vm._deliver``
        (what :meth:`of_source` does, inlined); written only here."""
        self.msi: dict[int, dict[int, Route]] = {}
        """data -> address_lo -> (message, targets); read like ``by_source``."""
        self.icr: dict[LocalApic, dict[int, IcrRoute]] = {}
        """source APIC -> 64-bit x2APIC ICR value -> ``IcrRoute``.  One dict
        per source for the life of the VM (:meth:`icr_of`: a vCPU holds its own), emptied in
        place by :meth:`forget`."""
        self._icr_filled: list[dict[int, IcrRoute]] = []
        """The per-source ICR dicts that hold a route (what :meth:`forget` empties)."""
        self._icr_count = 0
        """ICR values kept (bounded by ``LIMIT`` too; not in ``len``: each names a route of
        ``by_source``, which ``len`` counts)."""
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def forget(self) -> None:
        """Drop every route (the map they were decided from is being replaced)."""
        if self._size or self._icr_count:
            self.by_source.clear()
            self.msi.clear()
            for routes in self._icr_filled:
                routes.clear()
            self._icr_filled.clear()
            self._size = self._icr_count = 0

    def icr_of(self, source: LocalApic) -> dict[int, IcrRoute]:
        """The ICR routes of ``source`` (the same dict for the life of the VM)."""
        routes = self.icr.get(source)
        if routes is None:
            routes = self.icr[source] = {}
        return routes

    def of_source(self, source: LocalApic | None, irq: Interrupt) -> Targets | None:
        """The targets of ``irq`` sent by ``source``, if known."""
        by = self.by_source.get(source)
        route = None if by is None else by.get(irq[6] << 8 | irq[0])
        return None if route is None or route[0] != irq else route[2]

    def of_msi(self, address_lo: int, data: int) -> Route | None:
        """The decoded message and targets of the MSI (``address_lo``, 0, ``data``), if
        known."""
        by = self.msi.get(data)
        return None if by is None else by.get(address_lo)

    @staticmethod
    def learner(irq: Interrupt, accept: AcceptFn) -> tuple[AcceptFn, list[LocalApic]] | None:
        """An ``accept`` that also lists the APICs it is offered ``irq`` to, and that list;
        None for a message whose route must not be kept (lowest priority)."""
        if irq.lowest_priority:
            return None
        seen: list[LocalApic] = []

        def learn(apic: LocalApic, message: Interrupt) -> bool:
            seen.append(apic)
            return accept(apic, message)

        return learn, seen

    def learn_source(self, source: LocalApic | None, irq: Interrupt, seen: list[LocalApic]) -> None:
        """Keep the route the map decided for ``irq`` from ``source`` (if it has targets)."""
        if not seen:
            return
        self._grow()
        by = self.by_source.get(source)
        if by is None:
            by = self.by_source[source] = {}
        by[irq[6] << 8 | irq[0]] = _route(irq, seen)

    def learn_msi(self, address_lo: int, data: int, irq: Interrupt, seen: list[LocalApic]) -> None:
        """Keep the route the map decided for the MSI (``address_lo``, 0, ``data``)."""
        if not seen:
            return
        self._grow()
        by = self.msi.get(data)
        if by is None:
            by = self.msi[data] = {}
        by[address_lo] = _route(irq, seen)

    def learn_icr(
        self,
        source: LocalApic,
        value: int,
        route: Route,
        hook: object,
        image: int,
        record: ExitRecord,
    ) -> None:
        """Keep ``route`` (kept for the message ICR ``value`` decodes to) for ``value``, which
        stores ``image`` in the ICR and is logged as ``record``."""
        if self._icr_count >= LIMIT:
            self.forget()
        routes = self.icr_of(source)
        if not routes:
            self._icr_filled.append(routes)
        routes[value] = (route[1], hook, image, *route[2:], record)
        self._icr_count += 1

    def _grow(self) -> None:
        if self._size >= LIMIT:
            self.forget()
        self._size += 1


def _route(irq: Interrupt, seen: list[LocalApic]) -> Route:
    vector, mode, trigger, level = irq[0], irq[1], irq[4], irq[3]
    accepts = tuple(apic.acceptor(vector, mode, trigger, level) for apic in seen)
    return (irq, accepts, tuple(seen), vector, mode, trigger, level)
