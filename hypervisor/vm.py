"""``Vm``: a KVM virtual machine with an in-kernel local APIC per vCPU.

The host API mirrors KVM's ioctls, with their semantics and return values:

===========================  ===============================================================
``get_lapic(i)``             KVM_GET_LAPIC: the 1 KiB ``kvm_lapic_state`` (§14 fix-ups)
``set_lapic(i, data)``       KVM_SET_LAPIC; -EINVAL raises ``lapic.StateError`` (errno 22)
``get_msr(i, msr)``          KVM_GET_MSRS for one MSR, host-initiated; failure raises
                             ``MsrError`` (KVM would report 0 MSRs read)
``set_msr(i, msr, value)``   KVM_SET_MSRS for one MSR, host-initiated: True if set
``signal_msi(lo, hi, data)`` KVM_SIGNAL_MSI: the kernel's return value (n >= 0 accepted,
                             -1 when no APIC matched, -22 for an invalid route)
``add_vcpu(vcpu_id)``        KVM_CREATE_VCPU (hotplug)
===========================  ===============================================================

The configuration is data (``hypervisor.config``): ``Vm(config)`` takes a ``VmConfig``, and
``Vm(vcpus, profile, **keywords)`` builds one (``VmConfig.build``); ``vm.config`` gives it
back.  VM-wide options are KVM's (``KvmOptions``): ``x2apic_format``
(KVM_X2APIC_API_USE_32BIT_IDS), ``broadcast_quirk`` (cleared by
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK), ``vector_hashing`` (module parameter),
``max_vcpu_ids`` (KVM_CAP_MAX_VCPU_ID), ``enforce_pv_cpuid``
(KVM_CAP_ENFORCE_PV_FEATURE_CPUID) with ``pv_features`` (CPUID 0x40000001 EAX bits).  Without
explicit options the VM takes the preset of its profile (``KvmOptions.for_profile``): KVM's
defaults, or under ``sdm`` no broadcast quirk, the SDM's arbitration and no optimized map, so
every message is delivered by the architectural rules (the slow path).

The host API is ``hypervisor.api.HostApi``, shared with ``apicsim.kvm.KvmVm`` together with
its argument checks and ``MsrError``.

The VM runs on a ``hypervisor.host.Host`` (``host=``, not part of the config: it is the
machine, not the VM; by default a private host whose pCPU ids are 0..2**20, vCPU ``i`` first
loaded on pCPU ``i``), whose clock its APIC timers use and whose step scheduler runs its
multi-step protocols (``hypervisor.sched``).  ``snapshot()`` / ``restore()`` capture and
reinstate everything simulated (``hypervisor.snapshot``).

Delivery keeps the routes the optimized map decided (``hypervisor.routes``, FAST-10): a message
sent again goes straight to its targets, an MSI without a second decode; ``vm.route_cache =
False`` routes every message anew.

Not modelled: the IOAPIC/PIC, irq routing tables (KVM_SET_GSI_ROUTING), KVM_SET_SREGS.
"""

from __future__ import annotations

import html as _html
import inspect
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from hypervisor import views
from hypervisor.accelerators import make as make_accelerator
from hypervisor.api import (
    MsrError,
    check_index,
    check_msi,
    check_msr,
    check_msr_value,
    check_state_data,
    check_vcpu_id,
)
from hypervisor.apic_map import ApicMap, Inhibits, build
from hypervisor.config import (
    DEFAULT_PV_FEATURES,
    KVM_MAX_VCPU_IDS,
    AccelConfig,
    KvmOptions,
    VmConfig,
    check_max_vcpu_ids,
)
from hypervisor.delivery import AcceptFn, deliver
from hypervisor.exits import Exit, ExitReason, ExitRecord
from hypervisor.host.machine import MAX_PCPUS, Host
from hypervisor.pv_ipi import pv_send_ipi
from hypervisor.routes import RouteCache
from hypervisor.sched import Scheduler
from hypervisor.snapshot import VmSnapshot, restore_vm, snapshot_vm
from hypervisor.trace import (
    KvmApicAcceptIrq,
    KvmApicIpi,
    KvmEoi,
    KvmMsiSetIrq,
    KvmPvSendIpi,
    Stats,
    Tracer,
)
from hypervisor.vcpu import Vcpu
from lapic import icr as _icr
from lapic.apic import Features, LocalApic
from lapic.faults import ApicTypeError, ApicValueError, GuestFault, check_int
from lapic.icr import DeliveryMode, Icr, Interrupt, Msi, check_interrupt, interrupt_of_icr
from lapic.profile import LowestPriorityPolicy, Profile
from lapic.registers import APIC_DEFAULT_BASE

EINVAL = 22
KVM_MSI_VALID_DEVID = 1


class Vm:
    """A KVM VM: ``Vm(config)`` with a :class:`~hypervisor.config.VmConfig`, or
    ``Vm(vcpus, profile, **keywords)`` with the keywords of :meth:`VmConfig.build`, which
    makes the config (one code path).  ``vm.config`` gives it back.

    Looking inside: ``vm.table()`` (one row per vCPU), ``vm.dump()`` (every APIC decoded),
    ``vm.stats`` (counters; ``vm.stats - snap`` since ``snap = vm.stats.snapshot()``),
    ``vm.tracer`` (``Vm(..., trace=True)``: KVM's tracepoints as data, ``vm.tracer.report()``
    prints them as ``trace-cmd report`` does), ``vm.snapshot()``/``vm.restore(snap)``."""

    def __init__(
        self,
        vcpus: int | VmConfig = 1,
        profile: str | Profile = "kvm",
        *,
        config: VmConfig | None = None,
        x2apic_format: bool = False,
        broadcast_quirk: bool | None = None,
        vector_hashing: bool | None = None,
        vcpu_ids: Sequence[int] | None = None,
        max_vcpu_ids: int = KVM_MAX_VCPU_IDS,
        bsp_vcpu_id: int = 0,
        features: Features | None = None,
        accelerator: str | AccelConfig = "emulated",
        enforce_pv_cpuid: bool = False,
        pv_features: Iterable[int] = DEFAULT_PV_FEATURES,
        aps_started: bool = True,
        exit_log: int = 4096,
        trace: bool = False,
        host: Host | None = None,
    ) -> None:
        keywords: dict[str, object] = {
            "profile": profile,
            "x2apic_format": x2apic_format,
            "broadcast_quirk": broadcast_quirk,
            "vector_hashing": vector_hashing,
            "vcpu_ids": vcpu_ids,
            "max_vcpu_ids": max_vcpu_ids,
            "bsp_vcpu_id": bsp_vcpu_id,
            "features": features,
            "accelerator": accelerator,
            "enforce_pv_cpuid": enforce_pv_cpuid,
            "pv_features": pv_features,
            "aps_started": aps_started,
            "exit_log": exit_log,
            "trace": trace,
        }
        if isinstance(vcpus, VmConfig):
            if config is not None:
                raise ApicValueError("config is given twice (positionally and as config=)")
            config = vcpus
        if config is not None:
            if not isinstance(config, VmConfig):
                raise ApicTypeError(f"config must be a VmConfig, not {type(config).__name__}")
            mixed = [k for k, v in keywords.items() if v is not _KEYWORD_DEFAULTS[k]]
            if mixed or (vcpus is not config and vcpus != 1):
                names = ", ".join(mixed or ["vcpus"])
                raise ApicValueError(f"config cannot be combined with keywords ({names})")
        else:
            config = VmConfig.build(vcpus, **keywords)  # type: ignore[arg-type]
        check_max_vcpu_ids(config.max_vcpu_ids)
        self._init_host(host)
        self._setup(config)

    def _setup(self, config: VmConfig) -> None:
        """Make the VM ``config`` describes (already checked field by field)."""
        accel = make_accelerator(config.accelerator.name)
        self.config = config
        """The :class:`~hypervisor.config.VmConfig` this VM was made from."""
        options = config.kvm
        self.options = options
        """KVM's VM-level options (``config.kvm``)."""
        self.profile = config.profile
        self.x2apic_format = options.x2apic_format
        self.broadcast_quirk = options.broadcast_quirk
        self.lowest_priority = options.lowest_priority
        """The lowest-priority policy (KVM: the ``vector_hashing`` module parameter)."""
        self.vector_hashing = options.vector_hashing
        self.max_vcpu_ids = config.max_vcpu_ids
        self.bsp_vcpu_id = config.bsp_vcpu_id
        self.features = config.features
        self.enforce_pv_cpuid = options.enforce_pv_cpuid
        self.sync_cr8_at_exit = not options.tpr_low_bits_survive_exit
        """KVMB-11: SVM without AVIC copies V_TPR into the APIC after each exit."""
        self.pv_features = options.pv_features
        self.aps_started = config.aps_started
        self.tracer = Tracer(config.trace, self.clock)
        exit_log = config.exit_log
        self.exit_log: deque[ExitRecord] | None = (
            deque(maxlen=exit_log) if exit_log else None
        )
        """The latest exits as plain ``(vcpu, reason, qualification, value)`` tuples (the
        cheapest record to make per exit); :attr:`exits` reads them as :class:`Exit`."""
        self._vcpus: list[Vcpu] = []
        self.stats = Stats(self._vcpus)
        self._apics: list[LocalApic] = []
        # The map, its dirty bit and its inhibits are set again by add_vcpu (every VM has a
        # vCPU), and read only through apic_map, which rebuilds a dirty map first (and by a
        # snapshot, which records them as they are).
        self._map: ApicMap | None = None
        self._map_dirty = True
        self._map_inhibits = 0
        self._apic_base_modified = False
        """APICV_INHIBIT_REASON_APIC_BASE_MODIFIED: set by an APIC_BASE write, never cleared."""
        self.accel_inhibits = 0
        """Inhibit reasons the accelerator itself sets (AVIC: PHYSICAL_ID_TOO_BIG)."""
        self.route_cache = True
        """Keep the routes the optimized map decided (``hypervisor.routes``); False: every
        message is decoded and routed anew (what the route cache is tested against)."""
        self._routes = RouteCache()
        self.accel = accel
        self._use_map = uses_optimized_map(self.profile, options)
        for vid in config.vcpu_ids:
            self.add_vcpu(vid)

    # ===================================================================================
    # Host and scheduling
    # ===================================================================================
    def _init_host(self, host: Host | None) -> None:
        if host is None:
            host = Host(MAX_PCPUS)
        elif not isinstance(host, Host):
            raise ApicTypeError(f"host must be a Host, not {type(host).__name__}")
        self.host = host
        self.clock = host.clock
        self.sched = Scheduler(self, host)
        self._steps = host.steps

    @property
    def current(self) -> Vcpu | None:
        """The vCPU of this VM whose guest code is executing (``host.running``), or None."""
        v = self.host.running
        if isinstance(v, Vcpu) and v.vm is self:
            return v
        return None

    def snapshot(self) -> VmSnapshot:
        """Everything simulated, as an immutable, hashable, versioned value."""
        return snapshot_vm(self)

    def restore(self, snap: VmSnapshot) -> None:
        """Make this VM (and its pCPUs, clock, counters) equal to ``snap``."""
        restore_vm(self, snap)
        self._routes.forget()  # the restored map is another map

    # ===================================================================================
    # vCPUs
    # ===================================================================================
    def add_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU: the new vCPU's APIC is in RESET state."""
        check_vcpu_id(vcpu_id, self.max_vcpu_ids, [v.vcpu_id for v in self._vcpus])
        apic = LocalApic(
            vcpu_id,
            self.profile,
            bsp=vcpu_id == self.bsp_vcpu_id,
            features=self.features,
            clock=self.clock,
            icr_split=self.config.accelerator.icr_split,
        )
        vcpu = Vcpu(self, len(self._vcpus), apic, started=self.aps_started)
        self.sched.attach(vcpu)
        apic.send_hook = self._deliver
        apic.map_hook = self._mark_map_dirty
        apic.notify_hook = self.accel.notifier(vcpu)
        apic.eoi_hook = self._on_eoi
        self._routes.forget()  # a new vCPU can change any route (it may alias an ID)
        if self.options.map_excludes_new_vcpu:
            # KVMB-8: KVM rebuilds the map during KVM_CREATE_VCPU before the vCPU is online
            # and marks it clean, so the new vCPU is not in it until the map is dirtied.
            self._map, self._map_inhibits = build(self._apics, x2apic_format=self.x2apic_format)
            self._map_dirty = False
        else:
            self._map_dirty = True
        self._vcpus.append(vcpu)
        self._apics.append(apic)
        self.accel.attach(self)
        return vcpu

    @property
    def vcpus(self) -> Sequence[Vcpu]:
        return self._vcpus

    def vcpu(self, i: int) -> Vcpu:
        """vCPU by index (creation order); what the guest executes on it."""
        check_int("i", i, 0, len(self._vcpus) - 1)
        return self._vcpus[i]

    def lapic(self, i: int) -> LocalApic:
        check_int("i", i, 0, len(self._vcpus) - 1)
        return self._apics[i]

    def index_of(self, vcpu_id: int) -> int:
        for v in self._vcpus:
            if v.vcpu_id == vcpu_id:
                return v.index
        raise ApicValueError(f"vcpu_id={vcpu_id} does not exist")

    def __len__(self) -> int:
        return len(self._vcpus)

    # ===================================================================================
    # The optimized map
    # ===================================================================================
    def _mark_map_dirty(self, apic: LocalApic) -> None:
        self._map_dirty = True
        self._routes.forget()  # every route was decided from the map being replaced
        if apic.hw_enabled and apic.base_address != APIC_DEFAULT_BASE:
            # __kvm_apic_set_base: set on the write itself, never cleared.
            self._apic_base_modified = True

    @property
    def apic_map(self) -> ApicMap | None:
        """KVM ``kvm->arch.apic_map``, recalculated if anything it depends on changed."""
        if self._map_dirty:
            self._map, self._map_inhibits = build(self._apics, x2apic_format=self.x2apic_format)
            self._map_dirty = False
        return self._map

    @property
    def inhibits(self) -> int:
        """APICv inhibit reasons in force (``hypervisor.apic_map.Inhibits`` bits)."""
        _ = self.apic_map
        if self._apic_base_modified:
            return self._map_inhibits | Inhibits.APIC_BASE_MODIFIED | self.accel_inhibits
        return self._map_inhibits | self.accel_inhibits

    # ===================================================================================
    # Delivery
    # ===================================================================================
    def _accept(self, apic: LocalApic, irq: Interrupt) -> bool:
        """The acceptance stage as KVM runs it (``kvm_apic_set_irq``), counted and traced."""
        ok = apic.accept_fast(irq[0], irq[1], irq[4], irq[3])
        if ok:
            self.stats.irqs_accepted += 1
        if self.tracer.on:
            self.tracer.emit(
                KvmApicAcceptIrq(
                    apic.vcpu_id, int(irq.delivery_mode) << 8, int(irq.trigger), irq.vector, ok
                )
            )
        return ok

    def deliver(self, irq: Interrupt, source: LocalApic | None = None) -> int:
        """KVM ``kvm_irq_delivery_to_apic``: -1 if nothing matched, else the accepted count."""
        check_interrupt(irq)
        if source is not None and not isinstance(source, LocalApic):
            raise ApicTypeError(f"source must be a LocalApic, not {type(source).__name__}")
        return self._deliver(source, irq)

    def _deliver(
        self, source: LocalApic | None, irq: Interrupt, accept: AcceptFn | None = None
    ) -> int:
        """One interrupt message through KVM's delivery.  Also every APIC's ``send_hook``
        (KVM ``kvm_apic_send_ipi``), so the source comes first.  With the host's steps
        queued, the delivery waits as a protocol (``Scheduler.delivery_steps``), whose
        resolve step calls this with an ``accept`` that only records the targets.  Eager,
        untraced and with the route cache on, a message whose route the map already decided
        goes straight to its targets (``hypervisor.routes``)."""
        if accept is None:
            if self._steps.queued:
                return self.sched.start_delivery(source, irq)
            if self.route_cache and not self.tracer.on:
                by_source = self._routes.by_source.get(source)
                route = None if by_source is None else by_source.get(irq[6] << 8 | irq[0])
                if route is None or route[0] != irq:
                    return self._deliver_and_learn(source, irq)
                # The cached route: what _route does for it, minus the map lookup, with
                # _accept inlined (untraced).
                stats = self.stats
                if source is not None:
                    stats.ipis += 1
                stats.fast_path += 1
                r = 0
                for acceptor in route[1]:
                    if acceptor():
                        r += 1
                stats.irqs_accepted += r
                return r
            accept = self._accept
        return self._route(source, irq, accept)[0]

    def _route(
        self, source: LocalApic | None, irq: Interrupt, accept: AcceptFn
    ) -> tuple[int, bool]:
        """KVM's delivery of ``irq`` (map first, then the slow path), counted and traced:
        ``(result, fast path used)``."""
        stats = self.stats
        if source is not None:
            stats.ipis += 1
            if self.tracer.on:
                self.tracer.emit(KvmApicIpi(source.vcpu_id, _icr_low(irq), irq.dest))
        use_map = self._use_map
        r, fast = deliver(
            irq,
            source,
            self.apic_map if use_map else None,
            self._apics,
            self.profile,
            self.broadcast_quirk,
            self.lowest_priority,
            accept,
            use_map,
        )
        if fast:
            stats.fast_path += 1
        else:
            stats.slow_path += 1
        return r, fast

    def _deliver_and_learn(self, source: LocalApic | None, irq: Interrupt) -> int:
        """:meth:`_route` with this VM's accept, remembering the route when the map decided
        it (``RouteCache.learn`` says which routes may be kept)."""
        learner = self._routes.learner(irq, self._accept)
        if learner is None:
            return self._route(source, irq, self._accept)[0]
        learn, seen = learner
        the_map = self.apic_map if self._use_map else None
        r, fast = self._route(source, irq, learn)
        if fast and self._map is the_map and not self._map_dirty:
            self._routes.learn_source(source, irq, seen)
        return r

    def learn_icr(self, vcpu: Vcpu, value: int) -> None:
        """After ``vcpu``'s guest wrote ``value`` to the x2APIC ICR (WRMSR 0x830) the slow
        way and the write sent its message: keep the route of that ICR value
        (``RouteCache.learn_icr``) if the message it decodes to went through this VM's
        delivery and its route was kept, so the next write of ``value`` goes straight to the
        targets (``Vcpu.msr_exit``).  A value with reserved bits is never kept (the true
        mask, whatever a replay made WRMSR accept).  The route also keeps the exit-log record
        of the write (``Vcpu.msr_exit`` logs it on a hit)."""
        source = vcpu.apic
        if (
            not self.route_cache
            or self.tracer.on
            or self._steps.queued
            or source._op_send is not None
            or source.send_hook != self._deliver
            or not source.x2apic_mode
            or value & _icr.X2APIC_ICR_RESERVED
        ):
            return
        image = source.x2apic_icr_image(value)
        if image is None:
            return  # a split ICR: the fastpath stores one quadword
        irq = interrupt_of_icr(value & 0xFFFFFFFF & ~_icr.DELIVERY_STATUS, value >> 32)
        by_source = self._routes.by_source.get(source)
        route = None if by_source is None else by_source.get(irq[6] << 8 | irq[0])
        if route is not None and route[0] == irq:
            record = (vcpu.index, ExitReason.MSR_WRITE, 0x830, value)
            self._routes.learn_icr(source, value, route, source.send_hook, image, record)

    def _on_eoi(self, apic: LocalApic, vector: int, level: bool, suppressed: bool) -> None:
        if self.tracer.on:
            self.tracer.emit(KvmEoi(apic.vcpu_id, vector))

    def signal_msi(
        self,
        address_lo: int,
        address_hi: int = 0,
        data: int = 0,
        # Equivalent default: 0 and KVM_MSI_VALID_DEVID (1) take the same path (no device ids).
        flags: int = 0,  # pragma: no mutate
    ) -> int:
        """KVM_SIGNAL_MSI (``kvm_send_userspace_msi`` -> ``kvm_set_msi``).  An (address,
        data) pair whose route the map already decided is not decoded again (the route cache,
        eager and untraced only; the pair was checked when its route was learnt)."""
        if (
            type(address_lo) is int
            and type(data) is int
            and type(address_hi) is int
            and type(flags) is int
            and not address_hi
            and not flags
            and self.route_cache
            and not self.tracer.on
            and not self._steps.queued
        ):
            by_data = self._routes.msi.get(data)
            route = None if by_data is None else by_data.get(address_lo)
            if route is not None:  # what the path below does for it, with _accept inlined
                stats = self.stats
                stats.msis += 1
                stats.fast_path += 1
                r = 0
                for acceptor in route[1]:
                    if acceptor():
                        r += 1
                stats.irqs_accepted += r
                return r
        check_msi(address_lo, address_hi, data, flags)
        if flags & ~KVM_MSI_VALID_DEVID:
            return -EINVAL
        if self.x2apic_format and address_hi & 0xFF:
            return -EINVAL
        self.stats.msis += 1
        if self.tracer.on:
            addr = address_lo | (address_hi << 32 if self.x2apic_format else 0)
            self.tracer.emit(KvmMsiSetIrq(addr, data))
        irq = Msi(address_lo, address_hi, data).decode(x2apic_format=self.x2apic_format)
        if address_hi or not self.route_cache or self.tracer.on or self._steps.queued:
            return self._deliver(None, irq)
        learner = self._routes.learner(irq, self._accept)
        if learner is None:
            return self._route(None, irq, self._accept)[0]
        learn, seen = learner
        the_map = self.apic_map if self._use_map else None
        r, fast = self._route(None, irq, learn)
        if fast and self._map is the_map and not self._map_dirty:
            self._routes.learn_msi(address_lo, data, irq, seen)
        return r

    # -- hypercall host side (hypervisor.pv_ipi.HypercallHost) ------------------------------
    def pv_feature(self, feature: int) -> bool:
        return not self.enforce_pv_cpuid or feature in self.pv_features

    def send_ipi_hypercall(
        self, source: int, low: int, high: int, min_id: int, icr: int, op_64_bit: bool
    ) -> int:
        self.stats.pv_ipi_calls += 1
        apic_map = self.apic_map
        r = pv_send_ipi(apic_map, low, high, min_id, icr, op_64_bit=op_64_bit, accept=self._accept)
        if self.tracer.on:
            self.tracer.emit(
                KvmPvSendIpi(self._vcpus[source].vcpu_id, low, high, min_id, icr, r)
            )
        return r

    def kick_cpu(self, apic_id: int) -> None:
        """KVM_HC_KICK_CPU: a remote-read-mode message to ``apic_id`` (PV unhalt)."""
        check_int("apic_id", apic_id, 0, 0xFFFFFFFF)
        self._deliver(None, Interrupt(0, DeliveryMode.REMOTE_READ, dest=apic_id))

    # ===================================================================================
    # Host API (ioctls)
    # ===================================================================================
    def get_lapic(self, i: int) -> bytes:
        check_index(i, len(self._vcpus))
        sync = getattr(self.accel, "sync_pir_to_irr", None)
        if sync is not None:  # kvm_vcpu_ioctl_get_lapic syncs posted interrupts first
            sync(self._vcpus[i])
        return self._apics[i].get_state(x2apic_format=self.x2apic_format)

    def set_lapic(self, i: int, data: bytes) -> None:
        check_index(i, len(self._vcpus))
        raw = check_state_data(data)
        self._apics[i].set_state(raw, x2apic_format=self.x2apic_format)
        restored = getattr(self.accel, "apicv_post_state_restore", None)
        if restored is not None:  # vmx_apicv_post_state_restore: the PIR is dropped
            restored(self._vcpus[i])
        self._vcpus[i].preempt()  # a vCPU ioctl runs outside guest mode; the next access re-enters

    def get_cr8(self, i: int) -> int:
        """The CR8 of KVM_GET_SREGS: TPR bits 7:4 (REG-TPR-1)."""
        check_index(i, len(self._vcpus))
        return self._apics[i].get_cr8()

    def set_cr8(self, i: int, cr8: int) -> None:
        """KVM_SET_SREGS of the vCPU's own KVM_GET_SREGS state with CR8 = ``cr8``: KVM's
        ``kvm_set_cr8`` sets TPR = (cr8 & 0xF) << 4, so even a round trip of the CR8 it read
        clears TPR bits 3:0; a ``cr8`` above 0xF leaves the TPR unchanged (KVMB-10)."""
        check_index(i, len(self._vcpus))
        check_int("cr8", cr8, 0, (1 << 64) - 1)
        if not cr8 >> 4:  # kvm_set_cr8 refuses CR8_RESERVED_BITS
            self._apics[i].set_cr8(cr8)
        self._vcpus[i].preempt()  # a vCPU ioctl runs outside guest mode

    def get_msr(self, i: int, msr: int) -> int:
        check_index(i, len(self._vcpus))
        check_msr(msr)
        try:
            return self._apics[i].rdmsr(msr)
        except (GuestFault, ApicValueError) as e:
            raise MsrError(f"msr={msr:#x} cannot be read on vCPU {i}: {e}") from None

    def set_msr(self, i: int, msr: int, value: int) -> bool:
        check_index(i, len(self._vcpus))
        check_msr(msr)
        check_msr_value(value)
        try:
            self._apics[i].wrmsr(msr, value, host_initiated=True)
        except GuestFault:
            return False
        except ApicValueError as e:
            raise MsrError(f"msr={msr:#x} is not modelled: {e}") from None
        return True

    # ===================================================================================
    # Time
    # ===================================================================================
    def advance(self, ns: int) -> int:
        """Advance the host clock; fire this VM's due APIC timers.  Returns how many fired."""
        self.clock.advance(ns)
        return self.poll_timers()

    def poll_timers(self) -> int:
        """Fire this VM's due APIC timers (after the shared clock moved); how many fired."""
        return sum(a.poll_timer() for a in self._apics)

    def dump(self) -> str:
        """Configuration, counters, then each vCPU with its APIC decoded (``lapic.dump``)."""
        return views.dump(self)

    def table(self) -> str:
        """One row per vCPU: ID, mode, TPR/PPR, IRR/ISR/TMR, pending events, run state."""
        return views.table(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self) if cycle else repr(self) + "\n" + views.table(self))

    def _repr_html_(self) -> str:
        return f"<p>{_html.escape(repr(self))}</p>" + views.html_table(self)

    def __repr__(self) -> str:
        return (
            f"Vm(vcpus={len(self._vcpus)}, profile={self.profile!r}, "
            f"x2apic_format={self.x2apic_format}, broadcast_quirk={self.broadcast_quirk}, "
            f"vector_hashing={self.vector_hashing})"
        )

    @property
    def exits(self) -> list[Exit]:
        """The most recent exits (at most ``exit_log``), oldest first."""
        return [] if self.exit_log is None else [Exit(*e) for e in self.exit_log]


def _icr_low(irq: Interrupt) -> int:
    """The ICR low dword of a decoded message (for the ``kvm_apic_ipi`` event)."""
    return Icr.low_of(irq)


def uses_optimized_map(profile: Profile, options: KvmOptions) -> bool:
    """Whether delivery tries KVM's optimized map first.  The map encodes KVM's matching and
    arbitration only; a profile or policy that changes those rules (cluster 15, the hotplug
    hack, the SDM's lowest-priority policy) is delivered by the slow path alone, so fast and
    slow answers never mix two rule sets."""
    return (
        options.optimized_apic_map
        and profile.cluster15_addressable
        and profile.xapic_matches_x2apic_id
        and options.lowest_priority is not LowestPriorityPolicy.LOWEST_TPR
    )


_KEYWORD_DEFAULTS: dict[str, object] = {
    name: parameter.default
    for name, parameter in inspect.signature(Vm.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY or name == "profile"
}
"""The defaults of ``Vm``'s keywords: a keyword still at its default may accompany a config."""


# What a bug replay (``apicsim/replays/``, specs/replays.md) may swap, and the fix behind each.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "Vm.pv_feature",  # BUG-7: guest_pv_has, PV features only if in the guest's CPUID
    }
)
