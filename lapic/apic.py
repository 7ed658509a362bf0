"""``LocalApic``: one architectural local APIC, register for register.

Implements (reference ``kvm_lapic.md`` section numbers; SDM Vol. 3 APIC chapter):

* the register page (§1.1, SDM Table 10-1): one 4 KiB ``bytearray``, ``regs``, which is the
  only home of every register, IRR/ISR/TMR included, exactly as KVM's ``apic->regs``.  The
  ``irr``/``isr``/``tmr`` sets, MMIO reads, MSR reads and the 1 KiB state image are views of it;
* xAPIC MMIO access rules (§3) and x2APIC MSR access rules (§4), dispatched through the
  register table in ``lapic.registers``;
* the ICR and SELF IPI send path (§7), acceptance per delivery mode (§8);
* IA32_APIC_BASE (MSR 0x1B) transitions, guest- and host-initiated (§2);
* RESET and INIT (§15); the LVT timer (``lapic.timer``); the pending events
  (``lapic.events``) behind the ``*_pending`` attribute names.

The class is assembled from mixins along ``lapic.c``'s seams: per-register write semantics
(§5) in ``lapic.writers``; priorities, acknowledge and EOI (§6, §9.7) in ``lapic.priority``;
the ``kvm_lapic_state`` image (§14), snapshots and pickling in ``lapic.state``; shared
attributes in ``lapic.core``.  Every method is reachable as ``LocalApic.<name>``.

Where an interrupt goes after an ICR write is not decided here: the decoded
:class:`~lapic.icr.Interrupt` goes to the APIC's ops (``lapic.ops``; by default ``send_hook``:
a ``lapic.bus.ApicBus`` or the hypervisor).  A lone APIC with no hook delivers only to itself,
if it is a destination.  How IRR is set, read, acknowledged and EOI'd, and how the vCPU hears
of it, is the ops' too (inline when they are the defaults).

Not modelled: the 8259 PIC path of LINT0 ExtINT (``accept`` answers False for EXTINT, as KVM's
``__apic_accept_irq`` does); Hyper-V SynIC auto-EOI; PV EOI; the remote IRR and delivery-status
bits' dynamic behaviour (delivery is synchronous, so they read as written under ``kvm`` and 0
under ``sdm``); vCPU-level handling of pending NMI/SMI/INIT/SIPI (the hypervisor consumes the
``*_pending`` fields).

Choices settled here (each is also in ``specs/lapic.md``):
* ``accept`` on a hardware-disabled APIC answers False for every mode.  KVM's
  ``__apic_accept_irq`` would queue an NMI, but no KVM caller reaches it: every delivery path
  first filters on ``kvm_apic_present``.
* A lone APIC without ``send_hook`` delivers to itself when it matches (as one APIC on a bus).
* ``icr_split`` (the vendor's x2APIC ICR layout) is a constructor keyword, not a profile field:
  it is a fact of the CPU vendor (AMD x2AVIC), not a choice between ``lapic.c`` and the SDM.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from lapic import destination
from lapic import dump as apic_dump
from lapic.core import ApicCore, ApicHook, ApicMode, EoiHook, Features, SendHook
from lapic.events import PendingEvents
from lapic.faults import (
    ApicTypeError,
    ApicValueError,
    GuestFault,
    check_instance,
    check_int,
    check_size,
    gp,
)
from lapic.icr import (
    _DM,
    _DST,
    _LVL,
    _SH,
    _TRG,
    X2APIC_ICR_RESERVED,
    DeliveryMode,
    Interrupt,
    Level,
    Trigger,
)
from lapic.ops import DEFAULT_OPS, ApicEvent, ApicOps, overridden
from lapic.priority import PriorityMixin
from lapic.profile import Profile, resolve
from lapic.registers import (
    APIC_BASE,
    APIC_BASE_ADDR_MASK,
    APIC_BASE_BSP,
    APIC_BASE_EN,
    APIC_BASE_EXTD,
    APIC_BASE_MSR,
    APIC_DEFAULT_BASE,
    APIC_PAGE_SIZE,
    DFR_FLAT,
    ESR_ILLEGAL_REGISTER,
    ESR_RECV_ILLEGAL_VECTOR,
    ESR_REDIRECTABLE_IPI,
    ESR_SEND_ILLEGAL_VECTOR,
    IRR_BASE,
    ISR_BASE,
    KVM_APIC_VERSION,
    LVR,
    LVR_DIRECTED_EOI,
    LVT,
    LVT_LEVEL,
    LVT_MASKED,
    LVT_TIMER_MODE,
    REGISTER_BY_MSR,
    REGISTER_BY_NAME,
    REGISTER_BY_OFFSET,
    SVR,
    SVR_ENABLE,
    TIMER_PERIODIC,
    TMR_BASE,
    TSC_DEADLINE_MSR,
    X2APIC_MSR_FIRST,
    XAPIC_ID,
    Access,
)
from lapic.state import GAPS, ApicSnapshot, StateError, StateMixin
from lapic.timer import ApicTimer, Clock
from lapic.vectors import SPAN_BYTES, FrozenVectorSet, VectorBitmap
from lapic.writers import ICR2_OFF, ICR_OFF, LVT_ORDER, LVT_WORDS, RegisterMixin

if sys.byteorder != "little":  # pragma: no cover - x86 models run on little-endian hosts
    raise ImportError("lapic needs a little-endian host (the register page is x86 layout)")

_MODE_BITS = APIC_BASE_EN | APIC_BASE_EXTD
_new_tuple = tuple.__new__
_U64_MAX = (1 << 64) - 1
_ID = REGISTER_BY_NAME["ID"].offset >> 2
_LDR = REGISTER_BY_NAME["LDR"].offset >> 2
_DFR = REGISTER_BY_NAME["DFR"].offset >> 2
_LVR = REGISTER_BY_NAME["LVR"].offset >> 2
_TPR = REGISTER_BY_NAME["TPR"].offset >> 2
_PPR = REGISTER_BY_NAME["PPR"].offset >> 2
_SVR = REGISTER_BY_NAME["SVR"].offset >> 2
_ESR = REGISTER_BY_NAME["ESR"].offset >> 2
_TMICT = REGISTER_BY_NAME["TMICT"].offset >> 2
_TDCR = REGISTER_BY_NAME["TDCR"].offset >> 2
_ICR = ICR_OFF >> 2
_ICR_HIGH = (ICR_OFF + 4) >> 2
_ICR2 = ICR2_OFF >> 2
_LINT0 = REGISTER_BY_NAME["LVT0"].offset >> 2
_XAPIC_ID = XAPIC_ID["id"]
_EV_INTERRUPT = ApicEvent.INTERRUPT  # enum member lookups cost ~100 ns; globals do not
_EV_NMI = ApicEvent.NMI
_EV_SMI = ApicEvent.SMI
_EV_INIT = ApicEvent.INIT
_EV_SIPI = ApicEvent.SIPI
_EV_PV_UNHALT = ApicEvent.PV_UNHALT
_LVT_VECTOR = LVT["vector"]
_LVT_MODE = LVT["delivery_mode"]
_MAX_LVT = LVR["max_lvt"]
_BASE_RESERVED_LOW = APIC_BASE.reserved
"""IA32_APIC_BASE bits 7:0 and 9 (0x2FF); the bits above MAXPHYADDR are added per APIC."""
_SVR_RESET = SVR.pack(vector=0xFF)
# _accept and _local_deliver are hot paths: they use these constants' literal values
# (SVR dword 0xF0 >> 2, LVT vector 7:0, delivery mode 10:8), pinned here.
assert _SVR == 0xF0 >> 2 and _LVT_VECTOR.mask == 0xFF and _LVT_MODE.shift == 8


def _refused() -> bool:
    """The acceptor of a fixed message a disabled APIC refuses (``LocalApic.acceptor``)."""
    return False


class Acceptor:
    """``LocalApic.acceptor`` of a message other than an asserting fixed one with a valid
    vector: ``accept_fast`` with the message's fields."""

    __slots__ = ("apic", "level", "mode", "trigger", "vector")

    def __init__(self, apic: LocalApic, vector: int, mode: int, trigger: int, level: int):
        self.apic = apic
        self.vector = vector
        self.mode = mode
        self.trigger = trigger
        self.level = level

    def accept(self) -> bool:
        return self.apic.accept_fast(self.vector, self.mode, self.trigger, self.level)


class FixedAcceptor:
    """``LocalApic.acceptor`` of a fixed message that asserts, with a vector the APIC accepts,
    to an enabled APIC with ops of its own: ``accept_fast``'s FIXED branch less what the
    message and the enable bits decided (the bound ops and ``notify_hook`` are read on every
    call)."""

    __slots__ = ("apic", "bit", "level_triggered", "tmr", "vector")

    def __init__(self, apic: LocalApic, vector: int, trigger: int):
        self.apic = apic
        self.vector = vector
        self.bit = ((vector >> 5) << 7) | (vector & 31)  # lapic.vectors.bit_index
        self.tmr = 1 if trigger else 0
        self.level_triggered = bool(trigger)

    def accept(self) -> bool:
        apic = self.apic
        ready = apic._op_set_intr_ready
        if ready is None:  # DefaultApicOps.set_intr_ready, inlined
            bit = self.bit
            apic._tmr_bits[bit] = self.tmr  # PRIO-6: TMR follows the trigger
            apic._irr_bits[bit] = 1
        elif not ready(apic, self.vector, self.level_triggered):
            return True  # the accelerator notified the vCPU itself
        op = apic._op_raise_event
        if op is None:  # DefaultApicOps.raise_event, inlined
            hook = apic.notify_hook
            if hook is not None:
                hook(apic)
        else:
            op(apic, _EV_INTERRUPT)
        return True


class DefaultFixedAcceptor(FixedAcceptor):
    """:class:`FixedAcceptor` of an APIC with the default ``set_intr_ready`` and
    ``raise_event`` (both inline: IRR and TMR set in the page, then ``notify_hook``)."""

    __slots__ = ()

    def accept(self) -> bool:
        apic = self.apic
        bit = self.bit
        apic._tmr_bits[bit] = self.tmr  # PRIO-6: TMR follows the trigger
        apic._irr_bits[bit] = 1
        hook = apic.notify_hook
        if hook is not None:
            hook(apic)
        return True


class LocalApic(StateMixin, RegisterMixin, PriorityMixin, ApicCore):
    """One local APIC.  ``LocalApic(vcpu_id=3, profile="kvm", bsp=False)`` is in RESET state.

    ``icr_split`` is the vendor's x2APIC ICR layout in the register page (KVM
    ``x2apic_icr_is_split``, commit 73b42dc69be8): False as on Intel VMX (the 64-bit ICR at
    0x300, so the state image also carries the destination at 0x304), True as on AMD SVM with
    x2AVIC (ICR at 0x300, destination at 0x310).  Visible only in the bytes of the 1 KiB state
    image.  ``ops`` is the delivery vtable (:mod:`lapic.ops`; default: today's behaviour).
    """

    def __init__(
        self,
        vcpu_id: int = 0,
        profile: str | Profile = "kvm",
        bsp: bool = False,
        *,
        features: Features | None = None,
        clock: Clock | None = None,
        icr_split: bool = False,
        ops: ApicOps | None = None,
    ) -> None:
        self.vcpu_id = check_int("vcpu_id", vcpu_id, 0, 0xFFFFFFFE)
        self.profile = resolve(profile)
        if not isinstance(bsp, bool):
            raise ApicTypeError(f"bsp must be a bool, not {type(bsp).__name__}")
        self.bsp = bsp
        """The reset BSP (KVM ``kvm_vcpu_is_reset_bsp``), not APIC_BASE.BSP, which can change."""
        if features is None:
            features = Features()
        elif not isinstance(features, Features):
            raise ApicTypeError(f"features must be Features, not {type(features).__name__}")
        check_int("features.maxphyaddr", features.maxphyaddr, 32, 52)
        self.features = features
        if clock is not None:
            check_instance("clock", clock, Clock)
        self.clock = clock if clock is not None else Clock()
        if not isinstance(icr_split, bool):
            raise ApicTypeError(f"icr_split must be a bool, not {type(icr_split).__name__}")
        self.icr_split = icr_split

        self.regs = bytearray(APIC_PAGE_SIZE)
        """The register page: the one home of every register (KVM ``apic->regs``)."""
        self._build_views()
        self._gap_bytes = bytes(len(GAPS) * 12)

        self.apic_base = 0
        self.arb_prio = 0
        """KVM ``apic_arb_prio``: bumped by every lowest-priority acceptance attempt (LP-3)."""
        self.events = PendingEvents()
        """NMI/SMI/INIT/SIPI/PV-unhalt pending here (the ``*_pending`` properties read it)."""
        self._esr_pending = 0
        self._in_error = False
        self._mmio_data = 0
        """The data of the last serviced MMIO read (KVM's emulator buffer, KVMB-4)."""
        self._isr_cache = -1
        """KVM ``highest_isr_cache``: the vector last acknowledged, until the next EOI; only
        its one observable effect is modelled (the stale PPR of KVM_SET_LAPIC, STATE-4)."""
        self._sender_checks = (
            not self.profile.accept_illegal_vectors or not self.profile.x2apic_lowest_priority_ipi
        )
        self.lvt_count = 7 if features.cmci else 6
        self._timer_mode_mask = LVT_TIMER_MODE if features.tsc_deadline else TIMER_PERIODIC
        self.timer = ApicTimer(
            self.clock,
            self._timer_fired,
            bus_cycle_ns=self.profile.bus_cycle_ns,
            min_periodic_ns=self.profile.min_periodic_ns,
        )

        self.send_hook: SendHook | None = None
        """Receives every interrupt this APIC sends (ICR, SELF IPI)."""
        self.eoi_hook: EoiHook | None = None
        """``(apic, vector, level_triggered, suppressed)`` for every EOI that cleared ISR."""
        self.notify_hook: ApicHook | None = None
        """Called when something became pending for this APIC (KVM's kick/KVM_REQ_EVENT)."""
        self.map_hook: ApicHook | None = None
        """Called when anything destination matching depends on changed (map dirty)."""
        self.bind_ops(ops)
        self._build_writers()
        self.reset()

    def _build_views(self) -> None:
        """The views over ``regs``: 32-bit words and the IRR/ISR/TMR bitmaps."""
        view = memoryview(self.regs)
        self._w = view.cast("I")
        self._q = view.cast("Q")
        self._irr = VectorBitmap.over(view[IRR_BASE : IRR_BASE + SPAN_BYTES])
        self._isr = VectorBitmap.over(view[ISR_BASE : ISR_BASE + SPAN_BYTES])
        self._tmr = VectorBitmap.over(view[TMR_BASE : TMR_BASE + SPAN_BYTES])
        self._irr_bits = self._irr.bits
        self._tmr_bits = self._tmr.bits

    def bind_ops(self, ops: ApicOps | None = None) -> None:
        """Install the delivery vtable (:mod:`lapic.ops`; None: :data:`DEFAULT_OPS`).  A
        hypervisor calls it when it wires a vCPU to an accelerator.  Each operation ``ops``
        inherits unchanged from ``DefaultApicOps`` runs inline; the others are cached here as
        bound methods, so a call costs no lookup through ``ops``.  Binding other ops than the
        bound ones first raises ``map_changed`` through the ones being replaced (whoever keeps
        this APIC's ``acceptor`` drops it: it chose between inline and bound operations when
        it was made; the new ops are not told, as an accelerator binds them before its own
        state for the vCPU exists)."""
        if ops is None:
            ops = DEFAULT_OPS
        bound = overridden(ops)
        if getattr(self, "ops", ops) is not ops:  # the constructor binds the first ops
            self._map_changed()  # through the ops being replaced, not the new ones
        self.ops = ops
        self._op_set_intr_ready = bound.get("set_intr_ready")  # type: ignore[assignment]
        self._op_pending_intr = bound.get("pending_intr")  # type: ignore[assignment]
        self._op_intr_accepted = bound.get("intr_accepted")  # type: ignore[assignment]
        self._op_eoi = bound.get("eoi")  # type: ignore[assignment]
        self._op_send = bound.get("send")  # type: ignore[assignment]
        self._op_raise_event = bound.get("raise_event")  # type: ignore[assignment]
        self._op_map_changed = bound.get("map_changed")  # type: ignore[assignment]
        self._op_eoi_reported = bound.get("eoi_reported")  # type: ignore[assignment]

    # ===================================================================================
    # Pending events (lapic.events): the names other layers use
    # ===================================================================================
    @property
    def nmi_pending(self) -> int:
        return self.events.nmi

    @nmi_pending.setter
    def nmi_pending(self, value: int) -> None:
        self.events.nmi = value

    @property
    def smi_pending(self) -> bool:
        return self.events.smi

    @smi_pending.setter
    def smi_pending(self, value: bool) -> None:
        self.events.smi = value

    @property
    def init_pending(self) -> bool:
        return self.events.init

    @init_pending.setter
    def init_pending(self, value: bool) -> None:
        self.events.init = value

    @property
    def sipi_pending(self) -> bool:
        return self.events.sipi

    @sipi_pending.setter
    def sipi_pending(self, value: bool) -> None:
        self.events.sipi = value

    @property
    def sipi_vector(self) -> int:
        return self.events.sipi_vector

    @sipi_vector.setter
    def sipi_vector(self, value: int) -> None:
        self.events.sipi_vector = value

    @property
    def pv_unhalted(self) -> bool:
        return self.events.pv_unhalted

    @pv_unhalted.setter
    def pv_unhalted(self, value: bool) -> None:
        self.events.pv_unhalted = value

    # ===================================================================================
    # Mode and identity
    # ===================================================================================
    @property
    def base_address(self) -> int:
        return self.apic_base & APIC_BASE_ADDR_MASK

    @property
    def cpuid_apic(self) -> bool:
        """CPUID.01H:EDX[9] as the guest sees it: tracks APIC_BASE.EN (BASE-6)."""
        return self.hw_enabled

    @property
    def id_register(self) -> int:
        return int(self._w[_ID])

    @property
    def physical_id(self) -> int:
        """The ID physical destinations compare against: the 32-bit x2APIC ID in x2APIC mode,
        else the 8-bit xAPIC ID (ID bits 31:24)."""
        reg = int(self._w[_ID])
        return reg if self.x2apic_mode else _XAPIC_ID.get(reg)

    @property
    def x2apic_id(self) -> int:
        """KVM's x2APIC ID: always the vCPU id (``kvm_x2apic_id``)."""
        return self.vcpu_id

    @property
    def ldr(self) -> int:
        return int(self._w[_LDR])

    @property
    def dfr(self) -> int:
        return int(self._w[_DFR])

    @property
    def svr(self) -> int:
        return int(self._w[_SVR])

    @property
    def tpr(self) -> int:
        return int(self._w[_TPR])

    @property
    def ppr(self) -> int:
        self._update_ppr()
        return int(self._w[_PPR])

    @property
    def esr(self) -> int:
        return int(self._w[_ESR])

    @property
    def lvr(self) -> int:
        return int(self._w[_LVR])

    @property
    def icr(self) -> int:
        """The 64-bit ICR as RDMSR 0x830 shows it (xAPIC: ICR2 in the high dword)."""
        if self.x2apic_mode and not self.icr_split:
            return int(self._w[_ICR]) | int(self._w[_ICR_HIGH]) << 32
        return int(self._w[_ICR]) | int(self._w[_ICR2]) << 32

    @property
    def irr(self) -> FrozenVectorSet:
        """The IRR now, as a frozen value (a later change of the APIC does not change it)."""
        return self._irr.frozen()

    @property
    def isr(self) -> FrozenVectorSet:
        """The ISR now, as a frozen value."""
        return self._isr.frozen()

    @property
    def tmr(self) -> FrozenVectorSet:
        """The TMR now, as a frozen value."""
        return self._tmr.frozen()

    def lvt(self, name: str) -> int:
        """An LVT entry by register name (``"LVTT"``, ``"LVT0"``, ...)."""
        reg = REGISTER_BY_NAME.get(name)
        if reg is None or not reg.is_lvt:
            raise ApicValueError(f"name={name!r} is not an LVT register")
        return int(self._w[reg.offset >> 2])

    def register(self, name: str) -> int:
        """Host-side peek at any register by mnemonic, as its reading would return it."""
        reg = REGISTER_BY_NAME.get(name)
        if reg is None:
            raise ApicValueError(f"name={name!r} is not a register; see lapic.registers")
        if reg.name == "ICR":
            return self.icr
        return self._read(reg)

    # ===================================================================================
    # xAPIC MMIO
    # ===================================================================================
    def mmio_read(self, offset: int, size: int = 4) -> int:
        """A guest read of ``size`` bytes at ``offset`` in the APIC page (MMIO-1..4)."""
        check_int("offset", offset, 0, APIC_PAGE_SIZE - 1)
        check_size("size", size)
        mask = (1 << (8 * size)) - 1
        if not self.hw_enabled or self.x2apic_mode:
            if self.profile.mmio_hole_quirk:
                self._mmio_data |= mask
                return mask
            return self._unserviced(mask)
        align = offset & 0xF
        reg = REGISTER_BY_OFFSET.get(offset & 0xFF0)
        if align + size > 4 or reg is None or not self._readable(reg, False):
            if reg is None and self.profile.esr_latching:
                self._log_error(ESR_ILLEGAL_REGISTER)
            return self._unserviced(mask)
        value = (self._read(reg) >> (8 * align)) & mask
        # KVM's emulator buffer is byte-wise: a read of n bytes replaces its first n bytes.
        self._mmio_data = (self._mmio_data & ~mask) | value
        return value

    def _unserviced(self, mask: int) -> int:
        """A read nobody services (MMIO-4, KVMB-4)."""
        if self.profile.unserviced_read_repeats_last:
            return self._mmio_data & mask
        return self.profile.unserviced_read_value & mask

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        """A guest write at ``offset`` (MMIO-2/3/5): only aligned 4-byte writes do anything."""
        check_int("offset", offset, 0, APIC_PAGE_SIZE - 1)
        check_size("size", size)
        check_int("value", value, 0, (1 << (8 * size)) - 1)
        if not self.hw_enabled or self.x2apic_mode:
            return
        if size != 4 or offset & 0xF:
            return
        reg = REGISTER_BY_OFFSET.get(offset)
        if reg is None or Access.W not in reg.xapic or not self._present(reg):
            if reg is None and self.profile.esr_latching:
                self._log_error(ESR_ILLEGAL_REGISTER)
            return
        self._writers[reg.name](value, False)

    # ===================================================================================
    # MSRs
    # ===================================================================================
    def rdmsr(self, msr: int) -> int:
        """RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register (MSR-1/4)."""
        check_int("msr", msr, 0, 0xFFFFFFFF)
        if msr == APIC_BASE_MSR:
            return self.apic_base
        if msr == TSC_DEADLINE_MSR:
            if not self.features.tsc_deadline and self.profile.tsc_deadline_msr_needs_cpuid:
                raise gp("IA32_TSC_DEADLINE without CPUID.01H:ECX.TSC_DEADLINE")
            return self.timer.read_deadline() if self.hw_enabled else 0
        if X2APIC_MSR_FIRST <= msr <= 0xBFF:
            if not self.x2apic_mode:
                raise gp(f"RDMSR {msr:#x} outside x2APIC mode")
            reg = REGISTER_BY_MSR.get(msr)
            if reg is None or not self._readable(reg, True):
                raise gp(f"RDMSR {msr:#x}: no readable x2APIC register")
            if reg.name == "ICR":
                return self.icr
            return self._read(reg)
        raise ApicValueError(f"msr={msr:#x} is not a local APIC MSR")

    def wrmsr(self, msr: int, value: int, host_initiated: bool = False) -> None:
        """WRMSR; a #GP raises :class:`GuestFault` (vector 13) and changes nothing."""
        if (
            type(msr) is not int
            or type(value) is not int
            or not 0 <= msr <= 0xFFFFFFFF
            or not 0 <= value <= _U64_MAX
        ):
            check_int("msr", msr, 0, 0xFFFFFFFF)
            check_int("value", value, 0, _U64_MAX)
        if (
            msr == 0x830
            and self.apic_base & _MODE_BITS == _MODE_BITS
            and not value & X2APIC_ICR_RESERVED
        ):
            self._write_icr(value, True)  # the hot path: a valid x2APIC ICR write
            return
        if msr == APIC_BASE_MSR:
            self.set_apic_base(value, host_initiated=host_initiated)
            return
        if msr == TSC_DEADLINE_MSR:
            if not self.features.tsc_deadline and self.profile.tsc_deadline_msr_needs_cpuid:
                raise gp("IA32_TSC_DEADLINE without CPUID.01H:ECX.TSC_DEADLINE")
            if self.hw_enabled:
                self.timer.write_deadline(value)
                self.timer.poll()
            return
        if X2APIC_MSR_FIRST <= msr <= 0xBFF:
            if not self.x2apic_mode:
                raise gp(f"WRMSR {msr:#x} outside x2APIC mode")
            reg = REGISTER_BY_MSR.get(msr)
            if reg is None or Access.W not in reg.x2apic or not self._present(reg):
                raise gp(f"WRMSR {msr:#x}: no writable x2APIC register")
            if reg.name == "ICR":
                if value & X2APIC_ICR_RESERVED:
                    raise gp(
                        f"WRMSR ICR {value:#x}: reserved bits {value & X2APIC_ICR_RESERVED:#x} "
                        f"set (reserved mask {X2APIC_ICR_RESERVED:#x})"
                    )
            elif value >> 32:
                raise gp(f"WRMSR {msr:#x}: bits 63:32 are reserved")
            elif reg.name == "ESR" and value:
                raise gp("WRMSR ESR with a non-zero value")
            elif reg.name == "SELF_IPI" and value & ~0xFF:
                raise gp("WRMSR SELF IPI: bits 31:8 are reserved")
            elif self.profile.x2apic_strict_reserved_bits and value & self._reserved_bits(reg):
                raise gp(f"WRMSR {reg.name} {value:#x}: reserved bits set")
            self._writers[reg.name](value, True)
            return
        raise ApicValueError(f"msr={msr:#x} is not a local APIC MSR")

    # ===================================================================================
    # IA32_APIC_BASE
    # ===================================================================================
    def set_apic_base(self, value: int, *, host_initiated: bool = False) -> None:
        """KVM ``kvm_apic_set_base`` (BASE-1..6); a refused write raises #GP, changes nothing."""
        check_int("value", value, 0, _U64_MAX)
        if value == self.apic_base:
            return
        reserved = (_U64_MAX & ~((1 << self.features.maxphyaddr) - 1)) | _BASE_RESERVED_LOW
        if not self.features.x2apic:
            reserved |= APIC_BASE_EXTD
        if value & reserved:
            raise gp(f"IA32_APIC_BASE {value:#x}: reserved bits {value & reserved:#x}")
        new_mode = value & (APIC_BASE_EN | APIC_BASE_EXTD)
        if new_mode == APIC_BASE_EXTD:
            raise gp("IA32_APIC_BASE: EXTD=1 with EN=0 is invalid")
        old_mode = self.apic_base & (APIC_BASE_EN | APIC_BASE_EXTD)
        if not host_initiated or not self.profile.host_may_leave_x2apic:
            if old_mode == ApicMode.X2APIC and new_mode == ApicMode.XAPIC:
                raise gp("IA32_APIC_BASE: x2APIC -> xAPIC is illegal")
            if old_mode == ApicMode.DISABLED and new_mode == ApicMode.X2APIC:
                raise gp("IA32_APIC_BASE: disabled -> x2APIC is illegal")
        self._apply_apic_base(value)

    def _apply_apic_base(self, value: int) -> None:
        """KVM ``__kvm_apic_set_base``: the side effects of a change of IA32_APIC_BASE."""
        old = self.apic_base
        self.apic_base = value
        changed = old ^ value
        if changed & APIC_BASE_EN:
            if value & APIC_BASE_EN:
                self._set_xapic_id(self.vcpu_id & 0xFF)
            elif self.profile.disable_resets_state:
                self._reset_registers()
        if changed & APIC_BASE_EXTD:
            if value & APIC_BASE_EXTD:
                self._set_x2apic_id()
            elif value & APIC_BASE_EN:
                self._set_xapic_id(self.vcpu_id & 0xFF)
        self._map_changed()  # KVM recalculates the map after every APIC_BASE change

    def _set_xapic_id(self, xapic_id: int) -> None:
        self._w[_ID] = _XAPIC_ID.place(xapic_id)
        self._map_changed()

    def _set_x2apic_id(self) -> None:
        vid = self.vcpu_id
        self._w[_ID] = vid
        self._w[_LDR] = destination.x2apic_ldr(vid)
        self._map_changed()

    # ===================================================================================
    # RESET / INIT
    # ===================================================================================
    def reset(self) -> None:
        """Power-up RESET (KVM ``kvm_lapic_reset(init_event=false)``, SDM 10.4.7.1)."""
        self.timer.cancel()
        base = APIC_DEFAULT_BASE | APIC_BASE_EN | (APIC_BASE_BSP if self.bsp else 0)
        self._apply_apic_base(base)
        self._set_xapic_id(self.vcpu_id & 0xFF)
        self._reset_registers()
        self.events.load(_NO_EVENTS)

    def init(self) -> None:
        """INIT (KVM ``kvm_lapic_reset(init_event=true)``, SDM 10.4.7.3 / 10.12.5.1):
        registers as at RESET except IA32_APIC_BASE, the ID and, in x2APIC mode, the LDR.
        Also drops pending NMI/SMI and the consumed INIT, as ``kvm_vcpu_reset`` does; a
        pending SIPI stays (it is what the vCPU waits for next)."""
        self._reset_registers()
        ev = self.events
        ev.nmi = 0
        ev.smi = False
        ev.init = False
        ev.pv_unhalted = False

    def _reset_registers(self) -> None:
        """What RESET and INIT share (KVM ``kvm_lapic_reset`` past the APIC_BASE write)."""
        w = self._w
        self.timer.cancel()
        self._set_version()
        for name in LVT_ORDER[: self.lvt_count]:
            w[LVT_WORDS[name]] = LVT_MASKED
        if self.bsp and self.profile.lint0_reenabled_quirk:
            w[_LINT0] = _LVT_MODE.place(DeliveryMode.EXTINT)
        w[_DFR] = DFR_FLAT
        w[_SVR] = _SVR_RESET
        w[_TPR] = 0
        x2 = self.x2apic_mode
        if not x2:
            w[_LDR] = 0
        w[_ESR] = 0
        self._esr_pending = 0
        w[_ICR] = 0
        if x2 and not self.icr_split:
            w[_ICR_HIGH] = 0
        else:
            w[_ICR2] = 0
        w[_TDCR] = 0
        w[_TMICT] = 0
        self._irr.clear()
        self._isr.clear()
        self._tmr.clear()
        self.timer.reset()
        self._update_ppr()
        self.arb_prio = 0
        self._map_changed()

    def _set_version(self) -> None:
        lvr = KVM_APIC_VERSION | _MAX_LVT.place(self.lvt_count - 1)
        if self._advertises_directed_eoi():
            lvr |= LVR_DIRECTED_EOI
        self._w[_LVR] = lvr

    def _advertises_directed_eoi(self) -> bool:
        """LVR bit 24 (REG-LVR-1): only when the vCPU has directed EOI (KVM 0bcc3fb95b97: not
        merely because the guest CPUID has x2APIC; the in-kernel IOAPIC has no EOI register)."""
        return self.features.directed_eoi

    # ===================================================================================
    # Sending (§7)
    # ===================================================================================
    def _send(self, low: int, dest: int) -> None:
        """Decode an ICR write (KVM ``kvm_icr_to_lapic_irq``) and hand it on (``ApicOps.send``:
        by default ``send_hook``, or this APIC alone when it is a destination)."""
        # lapic.icr.interrupt_of_icr, inlined on the hot path of every IPI (a call costs more
        # than the decode); the shifts are ICR_LOW's, pinned by the asserts in lapic.icr, and
        # tests/lapic/test_fields.py checks this copy against interrupt_of_icr.
        irq: Interrupt = _new_tuple(
            Interrupt,
            (
                low & 0xFF,
                _DM[(low >> 8) & 7],
                _DST[(low >> 11) & 1],
                _LVL[(low >> 14) & 1],
                _TRG[(low >> 15) & 1],
                _SH[(low >> 18) & 3],
                dest,
                False,
            ),
        )
        if self._sender_checks:
            mode = irq[1]
            if not self.profile.accept_illegal_vectors and mode <= 1 and irq[0] < 16:
                self._log_error(ESR_SEND_ILLEGAL_VECTOR)
                return
            if mode == 1 and self.x2apic_mode and not self.profile.x2apic_lowest_priority_ipi:
                self._log_error(ESR_REDIRECTABLE_IPI)
                return
        op = self._op_send
        if op is not None:
            op(self, irq)
            return
        hook = self.send_hook
        if hook is not None:
            hook(self, irq)
        elif destination.matches(irq, self, self, is_ipi=True, profile=self.profile):
            self.accept_interrupt(irq)

    # ===================================================================================
    # Accepting (§8)
    # ===================================================================================
    def accept(
        self,
        vector: int,
        mode: DeliveryMode = DeliveryMode.FIXED,
        trigger: Trigger = Trigger.EDGE,
        level: bool | Level = True,
    ) -> bool:
        """Offer an interrupt to this APIC (KVM ``__apic_accept_irq``); True if accepted."""
        check_int("vector", vector, 0, 255)
        if not isinstance(mode, DeliveryMode):
            raise ApicTypeError(f"mode must be a DeliveryMode, not {type(mode).__name__}")
        if not isinstance(trigger, Trigger):
            raise ApicTypeError(f"trigger must be a Trigger, not {type(trigger).__name__}")
        if not isinstance(level, (bool, Level)):
            raise ApicTypeError(f"level must be a bool or Level, not {type(level).__name__}")
        return self.accept_fast(vector, int(mode), int(trigger), bool(level))

    def accept_interrupt(self, irq: Interrupt) -> bool:
        """``accept`` for a decoded message (delivery stages call this)."""
        return self.accept_fast(irq[0], irq[1], irq[4], irq[3])

    def accept_fast(self, vector: int, mode: int, trigger: int, level: int) -> bool:
        """``accept`` without argument checks, for delivery stages whose message is already
        valid (``mode`` 0..7, ``trigger`` and ``level`` 0/1 as ints or the enums): the hot
        path of every interrupt.  The ``_accept`` alias is the same function."""
        if not self.apic_base & APIC_BASE_EN:
            return False
        if mode <= 1:  # FIXED, LOWEST
            if mode == 1:
                self.arb_prio += 1
            if trigger and not level:
                return False
            if not self._w[0xF0 >> 2] & SVR_ENABLE:  # SVR (_SVR, pinned above)
                return False
            if vector < 16 and not self.profile.accept_illegal_vectors:
                self._log_error(ESR_RECV_ILLEGAL_VECTOR)
                return False
            ready = self._op_set_intr_ready
            if ready is None:  # DefaultApicOps.set_intr_ready, inlined (bhyve: no hook)
                bit = ((vector >> 5) << 7) | (vector & 31)  # lapic.vectors.bit_index
                self._tmr_bits[bit] = 1 if trigger else 0  # PRIO-6: TMR follows the trigger
                self._irr_bits[bit] = 1
            elif not ready(self, vector, bool(trigger)):
                return True  # the accelerator notified the vCPU itself
            event = _EV_INTERRUPT
        elif mode == 4:  # NMI
            # KVM process_nmi(): at most two NMIs pending (one to inject, one latched, as the
            # CPU latches one NMI while another is handled); further ones are dropped but
            # still reported as accepted (measured on Linux 6.18 by tests/differential).
            ev = self.events
            if ev.nmi < 2:
                ev.nmi += 1
            event = _EV_NMI
        elif mode == 5:  # INIT
            if trigger and not level:  # INIT level de-assert
                return self.profile.init_deassert_accepted
            ev = self.events
            ev.init = True
            ev.sipi = False
            event = _EV_INIT
        elif mode == 6:  # STARTUP
            ev = self.events
            ev.sipi_vector = vector
            ev.sipi = True
            event = _EV_SIPI
        elif mode == 2:  # SMI
            if not self.features.smm:
                return False
            self.events.smi = True
            event = _EV_SMI
        elif mode == 3:  # remote read / KVM PV unhalt
            if not self.profile.remote_read_is_pv_kick:
                return False
            self.events.pv_unhalted = True
            event = _EV_PV_UNHALT
        else:  # EXTINT: only through the PIC path, not modelled
            return False
        op = self._op_raise_event
        if op is None:  # DefaultApicOps.raise_event, inlined
            hook = self.notify_hook
            if hook is not None:
                hook(self)
        else:
            op(self, event)
        return True

    _accept = accept_fast
    """The historical name (``apicsim.replays`` and the LVT path call it)."""

    def acceptor(self, vector: int, mode: int, trigger: int, level: int) -> Callable[[], bool]:
        """``accept_fast`` of one message, made once for a route that delivers it again and
        again (``hypervisor.routes``): a function of no arguments with the same effect and
        result as ``self.accept_fast(vector, mode, trigger, level)``, for as long as this
        APIC raises no ``map_changed`` (the caller drops it then: every APIC_BASE change,
        every change of SVR's software enable and every ``bind_ops`` of other ops raises it,
        so the two enable bits and the choice of inline or bound ops are made once, here).
        For a fixed message
        that asserts, with a vector this APIC accepts, what the message decides (mode,
        trigger, the vector's validity, the IRR/TMR bit) is decided here too, and whether
        ``set_intr_ready`` and ``raise_event`` run inline (:class:`DefaultFixedAcceptor`) or
        through the bound ops (:class:`FixedAcceptor`); any other message calls
        ``accept_fast`` itself (:class:`Acceptor`).  Bound methods, so a VM that keeps them
        still copies and pickles."""
        if (
            mode
            or (trigger and not level)
            or (vector < 16 and not self.profile.accept_illegal_vectors)
        ):
            return Acceptor(self, vector, mode, trigger, level).accept
        if not self.apic_base & APIC_BASE_EN or not self._w[_SVR] & SVR_ENABLE:
            return _refused  # accept_fast refuses it, and changes nothing
        if self._op_set_intr_ready is None and self._op_raise_event is None:
            return DefaultFixedAcceptor(self, vector, trigger).accept
        return FixedAcceptor(self, vector, trigger).accept

    # Methods of the mixins that ``apicsim.replays`` swaps by name: its patcher replaces
    # entries of LocalApic's own namespace, so they are named here as well.
    ack = PriorityMixin.ack
    eoi = PriorityMixin.eoi
    get_state = StateMixin.get_state
    set_state = StateMixin.set_state

    def local_deliver(self, lvt: str) -> bool:
        """Deliver through an LVT entry (KVM ``kvm_apic_local_deliver``): the pin or event
        of ``lvt`` (``"LVT0"``, ``"LVT1"``, ``"LVTPC"``, ``"LVTTHMR"``, ``"LVTERR"``,
        ``"LVTCMCI"``, ``"LVTT"``) fired.  Returns whether the APIC accepted it."""
        reg = REGISTER_BY_NAME.get(lvt)
        if reg is None or not reg.is_lvt:
            raise ApicValueError(f"lvt={lvt!r} is not an LVT register")
        if not self._present(reg):
            return False
        return self._local_deliver(reg.offset)

    def _local_deliver(self, offset: int) -> bool:
        value = int(self._w[offset >> 2])
        if not self.apic_base & APIC_BASE_EN or value & LVT_MASKED:
            return False
        # LVT vector 7:0 and delivery mode 10:8 (lapic.registers.LVT, pinned above).
        accepted = self._accept(value & 0xFF, (value >> 8) & 7, 1 if value & LVT_LEVEL else 0, True)
        if accepted and offset == 0x340 and self._pmi_masks_lvtpc():
            self._w[offset >> 2] = value | LVT_MASKED
        return accepted

    def _pmi_masks_lvtpc(self) -> bool:
        """Whether delivering a PMI through LVTPC sets its mask bit (REG-LVT-2): on an
        Intel-compatible vCPU, as the hardware does (KVM a16eb25b09c0)."""
        return self.features.intel_compatible

    def _timer_fired(self) -> None:
        self._local_deliver(0x320)

    def _log_error(self, bits: int) -> None:
        """SDM 10.5.3: latch an error for the next ESR write; fire LVT Error once."""
        self._esr_pending |= bits
        if not self._in_error:
            self._in_error = True
            try:
                self._local_deliver(0x370)
            finally:
                self._in_error = False

    # ===================================================================================
    # Time
    # ===================================================================================
    def advance(self, ns: int) -> int:
        """Advance this APIC's clock by ``ns`` and run the timer; returns timer interrupts."""
        self.clock.advance(ns)
        return self.poll_timer()

    def poll_timer(self) -> int:
        return self.timer.poll()

    # ===================================================================================
    def __repr__(self) -> str:
        return f"LocalApic(vcpu_id={self.vcpu_id}, profile={self.profile!r}, bsp={self.bsp})"

    def dump(self) -> str:
        """Every register decoded, as QEMU's ``info lapic`` shows it (``lapic.dump``)."""
        return apic_dump.text(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self) if cycle else self.dump())

    def _repr_html_(self) -> str:
        return apic_dump.html(self)


_NO_EVENTS = PendingEvents().frozen()



__all__ = [
    "ApicMode",
    "ApicSnapshot",
    "Features",
    "GuestFault",
    "LocalApic",
    "StateError",
]


# What a bug replay (``apicsim/replays/``, specs/replays.md) may swap, and the fix behind each.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        "LocalApic._apply_apic_base",  # BUG-10 map after re-enable; BUG-23 xAPIC ID reinit
        "LocalApic.set_apic_base",  # BUG-30 58d269d8cccc: BSP is writable
        "LocalApic.get_state",  # BUG-17 4b7c3f6d04bd, BUG-19 73b42dc69be8: the state image
        "LocalApic.set_state",  # BUG-17 (x2APIC ID read-only), BUG-19 (ICR re-split)
        "LocalApic.wrmsr",  # BUG-20 SELF IPI #GP; BUG-21 bits 63:32 #GP
        "LocalApic.rdmsr",  # BUG-22: DFR non-existent in x2APIC mode
        "LocalApic._pmi_masks_lvtpc",  # BUG-24 a16eb25b09c0: mask LVTPC on a PMI
        "LocalApic._advertises_directed_eoi",  # BUG-25 0bcc3fb95b97: not with in-kernel IOAPIC
        "LocalApic.eoi",  # BUG-29 highest-ISR cache purge
        "LocalApic.ack",  # BUG-29: the highest-ISR cache
        "LocalApic.base_address",  # FID-2: the window from APIC_BASE bits 31:12
    }
)
