"""``LocalApic``: one architectural local APIC, register for register.

Implements (reference ``kvm_lapic.md`` section numbers; SDM Vol. 3 APIC chapter):

* the register page (§1.1, SDM Table 10-1): one 4 KiB ``bytearray``, ``regs``, which is the
  only home of every register, IRR/ISR/TMR included, exactly as KVM's ``apic->regs``.  The
  ``irr``/``isr``/``tmr`` sets, MMIO reads, MSR reads and the 1 KiB state image are views of it;
* xAPIC MMIO access rules (§3) and x2APIC MSR access rules (§4), dispatched through the
  register table in ``lapic.registers``;
* per-register write semantics (§5), priorities, acknowledge and EOI (§6), the ICR and SELF IPI
  send path (§7), acceptance per delivery mode (§8), EOI-broadcast suppression (§9.7);
* IA32_APIC_BASE (MSR 0x1B) transitions, guest- and host-initiated (§2);
* RESET and INIT (§15); the LVT timer (``lapic.timer``);
* the ``kvm_lapic_state`` image with KVM's x2APIC fix-ups (§14).

Where an interrupt goes after an ICR write is not decided here: the decoded
:class:`~lapic.icr.Interrupt` goes to ``send_hook`` (a ``lapic.bus.ApicBus`` or the
hypervisor).  A lone APIC with no hook delivers only to itself, if it is a destination.

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
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from lapic import destination
from lapic.faults import ApicTypeError, ApicValueError, GuestFault, check_int, gp
from lapic.icr import (
    _DM,
    _DST,
    _LVL,
    _SH,
    _TRG,
    DELIVERY_STATUS,
    X2APIC_ICR_RESERVED,
    DeliveryMode,
    Interrupt,
    Level,
    Shorthand,
    Trigger,
)
from lapic.profile import Profile, resolve
from lapic.registers import (
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
    LVR_DIRECTED_EOI,
    LVT_DELIVERY_STATUS,
    LVT_LEVEL,
    LVT_MASKED,
    LVT_REGISTERS,
    LVT_REMOTE_IRR,
    LVT_TIMER_MODE,
    REGISTER_BY_MSR,
    REGISTER_BY_NAME,
    REGISTER_BY_OFFSET,
    STATE_SIZE,
    SVR_ENABLE,
    SVR_SUPPRESS_EOI_BROADCAST,
    TIMER_PERIODIC,
    TIMER_TSC_DEADLINE,
    TMR_BASE,
    TSC_DEADLINE_MSR,
    X2APIC_MSR_FIRST,
    Access,
    Register,
)
from lapic.timer import ApicTimer, Clock
from lapic.vectors import SPAN_BYTES, VectorBitmap, VectorSet

_new_tuple = tuple.__new__

if sys.byteorder != "little":  # pragma: no cover - x86 models run on little-endian hosts
    raise ImportError("lapic needs a little-endian host (the register page is x86 layout)")


class ApicMode(IntEnum):
    """IA32_APIC_BASE bits 11:10 (KVM ``enum lapic_mode``); INVALID (0x400) never holds."""

    DISABLED = 0x000
    XAPIC = 0x800
    X2APIC = 0xC00

    def __repr__(self) -> str:
        return f"ApicMode.{self.name}"


@dataclass(frozen=True, slots=True)
class Features:
    """What the virtual CPU advertises (guest CPUID / MSRs), not a KVM-vs-SDM choice."""

    x2apic: bool = True
    """CPUID.01H:ECX[21].  Without it IA32_APIC_BASE.EXTD is reserved (BASE-2)."""
    tsc_deadline: bool = True
    """CPUID.01H:ECX[24].  Sets LVT timer-mode mask 0x60000 (else 0x20000) and MSR 0x6E0."""
    cmci: bool = False
    """MCG_CAP.MCG_CMCI_P: a 7th LVT (CMCI, offset 0x2F0); LVR max-LVT 6 instead of 5."""
    directed_eoi: bool = False
    """LVR bit 24 (EOI-broadcast suppression).  KVM advertises it only with a split irqchip
    and x2APIC in CPUID (REG-LVR-1); the default models KVM's in-kernel IOAPIC.  Setting it is
    the caller's statement that those conditions hold: it is not cross-checked with ``x2apic``."""
    smm: bool = True
    """SMM emulation available: SMIs are accepted."""
    maxphyaddr: int = 48
    """Guest MAXPHYADDR: IA32_APIC_BASE bits at and above it are reserved."""
    intel_compatible: bool = True
    """Guest CPUID vendor is Intel-compatible: LVTPC masks itself after a PMI (REG-LVT-2)."""


SendHook = Callable[["LocalApic", Interrupt], object]
EoiHook = Callable[["LocalApic", int, bool, bool], None]
ApicHook = Callable[["LocalApic"], None]

_LVT_ORDER = ("LVTT", "LVTTHMR", "LVTPC", "LVT0", "LVT1", "LVTERR", "LVTCMCI")
_MODE_BITS = APIC_BASE_EN | APIC_BASE_EXTD
_ICR_OFF = 0x300
_ICR2_OFF = 0x310
_U64_MAX = (1 << 64) - 1
_GAPS = tuple(
    (base + 0x10 * n + 4, base + 0x10 * n + 16)
    for base in (ISR_BASE, TMR_BASE, IRR_BASE)
    for n in range(8)
)
"""Byte ranges between the vector words of ISR/TMR/IRR (kept aside by ``set_state``)."""


class LocalApic:
    """One local APIC.  ``LocalApic(vcpu_id=3, profile="kvm", bsp=False)`` is in RESET state."""

    def __init__(
        self,
        vcpu_id: int = 0,
        profile: str | Profile = "kvm",
        bsp: bool = False,
        *,
        features: Features | None = None,
        clock: Clock | None = None,
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
        self.clock = clock if clock is not None else Clock()

        self.regs = bytearray(APIC_PAGE_SIZE)
        """The register page: the one home of every register (KVM ``apic->regs``)."""
        view = memoryview(self.regs)
        self._w = view.cast("I")
        self._irr = VectorBitmap.over(view[IRR_BASE : IRR_BASE + SPAN_BYTES])
        self._isr = VectorBitmap.over(view[ISR_BASE : ISR_BASE + SPAN_BYTES])
        self._tmr = VectorBitmap.over(view[TMR_BASE : TMR_BASE + SPAN_BYTES])
        self._irr_bits = self._irr.bits
        self._tmr_bits = self._tmr.bits
        self._gap_bytes = bytes(len(_GAPS) * 12)

        self.apic_base = 0
        self.arb_prio = 0
        """KVM ``apic_arb_prio``: bumped by every lowest-priority acceptance attempt (LP-3)."""
        self.nmi_pending = 0
        self.smi_pending = False
        self.init_pending = False
        self.sipi_pending = False
        self.sipi_vector = 0
        self.pv_unhalted = False
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

        self._writers: dict[str, Callable[[int, bool], None]] = {
            "ID": self._write_id,
            "TPR": self._write_tpr,
            "EOI": self._write_eoi,
            "LDR": self._write_ldr,
            "DFR": self._write_dfr,
            "SVR": self._write_svr,
            "ESR": self._write_esr,
            "ICR": self._write_icr,
            "ICR2": self._write_icr2,
            "TMICT": self._write_tmict,
            "TDCR": self._write_tdcr,
            "SELF_IPI": self._write_self_ipi,
        }
        for reg in LVT_REGISTERS:
            self._writers[reg.name] = self._lvt_writer(reg)
        self.reset()

    # ===================================================================================
    # Mode and identity
    # ===================================================================================
    @property
    def mode(self) -> ApicMode:
        return ApicMode(self.apic_base & (APIC_BASE_EN | APIC_BASE_EXTD))

    @property
    def hw_enabled(self) -> bool:
        """IA32_APIC_BASE.EN (KVM ``kvm_apic_present`` / ``kvm_apic_hw_enabled``)."""
        return bool(self.apic_base & APIC_BASE_EN)

    @property
    def x2apic_mode(self) -> bool:
        return self.apic_base & (APIC_BASE_EN | APIC_BASE_EXTD) == APIC_BASE_EN | APIC_BASE_EXTD

    @property
    def sw_enabled(self) -> bool:
        """SVR bit 8."""
        return bool(self._w[0xF0 >> 2] & SVR_ENABLE)

    @property
    def enabled(self) -> bool:
        """Hardware- and software-enabled (KVM ``apic_enabled``)."""
        return bool(self.apic_base & APIC_BASE_EN) and bool(self._w[0xF0 >> 2] & SVR_ENABLE)

    @property
    def base_address(self) -> int:
        return self.apic_base & APIC_BASE_ADDR_MASK

    @property
    def cpuid_apic(self) -> bool:
        """CPUID.01H:EDX[9] as the guest sees it: tracks APIC_BASE.EN (BASE-6)."""
        return self.hw_enabled

    @property
    def id_register(self) -> int:
        return int(self._w[0x20 >> 2])

    @property
    def physical_id(self) -> int:
        """The ID physical destinations compare against: the 32-bit x2APIC ID in x2APIC mode,
        else the 8-bit xAPIC ID (ID bits 31:24)."""
        reg = self._w[0x20 >> 2]
        return int(reg) if self.x2apic_mode else int(reg >> 24)

    @property
    def x2apic_id(self) -> int:
        """KVM's x2APIC ID: always the vCPU id (``kvm_x2apic_id``)."""
        return self.vcpu_id

    @property
    def ldr(self) -> int:
        return int(self._w[0xD0 >> 2])

    @property
    def dfr(self) -> int:
        return int(self._w[0xE0 >> 2])

    @property
    def svr(self) -> int:
        return int(self._w[0xF0 >> 2])

    @property
    def tpr(self) -> int:
        return int(self._w[0x80 >> 2])

    @property
    def ppr(self) -> int:
        self._update_ppr()
        return int(self._w[0xA0 >> 2])

    @property
    def esr(self) -> int:
        return int(self._w[0x280 >> 2])

    @property
    def lvr(self) -> int:
        return int(self._w[0x30 >> 2])

    @property
    def icr(self) -> int:
        """The 64-bit ICR as RDMSR 0x830 shows it (xAPIC: ICR2 in the high dword)."""
        if self.x2apic_mode and not self.profile.x2apic_icr_split:
            return int(self._w[_ICR_OFF >> 2]) | int(self._w[(_ICR_OFF + 4) >> 2]) << 32
        return int(self._w[_ICR_OFF >> 2]) | int(self._w[_ICR2_OFF >> 2]) << 32

    @property
    def irr(self) -> VectorSet:
        return self._irr

    @property
    def isr(self) -> VectorSet:
        return self._isr

    @property
    def tmr(self) -> VectorSet:
        return self._tmr

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
        if size not in (1, 2, 4, 8):
            raise ApicValueError(f"size={size!r} must be 1, 2, 4 or 8")
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
        if size not in (1, 2, 4, 8):
            raise ApicValueError(f"size={size!r} must be 1, 2, 4 or 8")
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
                    raise gp(f"WRMSR ICR {value:#x}: reserved bits {X2APIC_ICR_RESERVED:#x}")
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

    def _reserved_bits(self, reg: Register) -> int:
        """Bits the SDM reserves in an x2APIC write (used with strict reserved-bit checks)."""
        name = reg.name
        if name == "EOI":
            return 0xFFFFFFFF
        if name == "SVR":
            return 0xFFFFFFFF & ~self._svr_mask()
        if reg.is_lvt:
            # Reserved = outside every field; the read-only status bits are fields, not
            # reserved (a WRMSR setting them is ignored, not faulted).
            mask = reg.write_mask
            if reg.name == "LVTT":
                mask = (mask & ~LVT_TIMER_MODE) | self._timer_mode_mask
            return 0xFFFFFFFF & ~mask
        if name in ("TPR", "TDCR"):
            return 0xFFFFFFFF & ~reg.write_mask
        return 0

    # ===================================================================================
    # IA32_APIC_BASE
    # ===================================================================================
    def set_apic_base(self, value: int, *, host_initiated: bool = False) -> None:
        """KVM ``kvm_apic_set_base`` (BASE-1..6); a refused write raises #GP, changes nothing."""
        check_int("value", value, 0, _U64_MAX)
        if value == self.apic_base:
            return
        reserved = (_U64_MAX & ~((1 << self.features.maxphyaddr) - 1)) | 0x2FF
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
        self._w[0x20 >> 2] = xapic_id << 24
        self._map_changed()

    def _set_x2apic_id(self) -> None:
        vid = self.vcpu_id
        self._w[0x20 >> 2] = vid
        self._w[0xD0 >> 2] = destination.x2apic_ldr(vid)
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
        self.nmi_pending = 0
        self.smi_pending = False
        self.init_pending = False
        self.sipi_pending = False
        self.sipi_vector = 0
        self.pv_unhalted = False

    def init(self) -> None:
        """INIT (KVM ``kvm_lapic_reset(init_event=true)``, SDM 10.4.7.3 / 10.12.5.1):
        registers as at RESET except IA32_APIC_BASE, the ID and, in x2APIC mode, the LDR.
        Also drops pending NMI/SMI and the consumed INIT, as ``kvm_vcpu_reset`` does; a
        pending SIPI stays (it is what the vCPU waits for next)."""
        self._reset_registers()
        self.nmi_pending = 0
        self.smi_pending = False
        self.init_pending = False
        self.pv_unhalted = False

    def _reset_registers(self) -> None:
        """What RESET and INIT share (KVM ``kvm_lapic_reset`` past the APIC_BASE write)."""
        w = self._w
        self.timer.cancel()
        self._set_version()
        for name in _LVT_ORDER[: self.lvt_count]:
            w[REGISTER_BY_NAME[name].offset >> 2] = LVT_MASKED
        if self.bsp and self.profile.lint0_reenabled_quirk:
            w[0x350 >> 2] = 0x700
        w[0xE0 >> 2] = DFR_FLAT
        w[0xF0 >> 2] = 0xFF
        w[0x80 >> 2] = 0
        x2 = self.x2apic_mode
        if not x2:
            w[0xD0 >> 2] = 0
        w[0x280 >> 2] = 0
        self._esr_pending = 0
        w[_ICR_OFF >> 2] = 0
        if x2 and not self.profile.x2apic_icr_split:
            w[(_ICR_OFF + 4) >> 2] = 0
        else:
            w[_ICR2_OFF >> 2] = 0
        w[0x3E0 >> 2] = 0
        w[0x380 >> 2] = 0
        self._irr.clear()
        self._isr.clear()
        self._tmr.clear()
        self.timer.reset()
        self._update_ppr()
        self.arb_prio = 0
        self._map_changed()

    def _set_version(self) -> None:
        lvr = KVM_APIC_VERSION | ((self.lvt_count - 1) << 16)
        if self.features.directed_eoi:
            lvr |= LVR_DIRECTED_EOI
        self._w[0x30 >> 2] = lvr

    # ===================================================================================
    # Reading registers
    # ===================================================================================
    def _present(self, reg: Register) -> bool:
        return reg.feature is None or (reg.feature == "cmci" and self.features.cmci)

    def _readable(self, reg: Register, x2apic: bool) -> bool:
        access = reg.x2apic if x2apic else reg.xapic
        return Access.R in access and self._present(reg)

    def _read(self, reg: Register) -> int:
        name = reg.name
        if name == "PPR":
            self._update_ppr()
        elif name == "TMCCT":
            self.timer.poll()
            return self.timer.current_count(int(self._w[0x380 >> 2]))
        elif name == "APR":
            return self._apr() if self.profile.apr_computed else 0
        return int(self._w[reg.offset >> 2])

    def _apr(self) -> int:
        """SDM 10.6.2.4 (P6 family) arbitration priority.  The SDM's figure writes the else
        branch as ``max(TPR[7:4] AND ISRV[7:4], IRRV[7:4])``; the model reads it as the
        highest of the three priority classes (a bitwise AND of two classes has no meaning
        as a priority), the reading the surrounding text describes."""
        tpr = int(self._w[0x80 >> 2])
        irrv = max(self._irr.highest(), 0)
        isrv = max(self._isr.highest(), 0)
        if tpr >> 4 >= irrv >> 4 and tpr >> 4 > isrv >> 4:
            return tpr
        return max(tpr >> 4, isrv >> 4, irrv >> 4) << 4

    # ===================================================================================
    # Writing registers (kvm_lapic_reg_write)
    # ===================================================================================
    def _write_id(self, value: int, x2apic: bool) -> None:
        if self.profile.xapic_id_writable:
            self._set_xapic_id(value >> 24)

    def _write_tpr(self, value: int, x2apic: bool) -> None:
        self._w[0x80 >> 2] = value & 0xFF
        self._update_ppr_and_notify()

    def _write_eoi(self, value: int, x2apic: bool) -> None:
        self.eoi()

    def _write_ldr(self, value: int, x2apic: bool) -> None:
        self._w[0xD0 >> 2] = value & 0xFF000000
        self._map_changed()

    def _write_dfr(self, value: int, x2apic: bool) -> None:
        self._w[0xE0 >> 2] = value | 0x0FFFFFFF
        self._map_changed()

    def _svr_mask(self) -> int:
        mask = 0x3FF
        if self._w[0x30 >> 2] & LVR_DIRECTED_EOI:
            mask |= SVR_SUPPRESS_EOI_BROADCAST
        return mask

    def _write_svr(self, value: int, x2apic: bool) -> None:
        stored = value & self._svr_mask()
        if self.profile.svr_low_nibble_hardwired:
            stored |= 0xF
        self._set_svr(stored)
        if not stored & SVR_ENABLE:
            w = self._w
            for name in _LVT_ORDER[: self.lvt_count]:
                w[REGISTER_BY_NAME[name].offset >> 2] |= LVT_MASKED
            self._timer_mode_changed()

    def _set_svr(self, value: int) -> None:
        """KVM ``apic_set_spiv``: store verbatim; a software-enable change dirties the map."""
        was = self.sw_enabled
        self._w[0xF0 >> 2] = value
        if bool(value & SVR_ENABLE) != was:
            self._map_changed()

    def _write_esr(self, value: int, x2apic: bool) -> None:
        if self.profile.esr_latching:
            self._w[0x280 >> 2] = self._esr_pending
            self._esr_pending = 0

    def _write_icr(self, value: int, x2apic: bool) -> None:
        w = self._w
        if x2apic:
            value &= ~DELIVERY_STATUS
            low = value & 0xFFFFFFFF
            dest = value >> 32
            self._send(low, dest)
            w[_ICR_OFF >> 2] = low
            if self.profile.x2apic_icr_split:
                w[_ICR2_OFF >> 2] = dest
            else:
                w[(_ICR_OFF + 4) >> 2] = dest
        else:
            value &= ~DELIVERY_STATUS
            self._send(value, (int(w[_ICR2_OFF >> 2]) >> 24) & 0xFF)
            w[_ICR_OFF >> 2] = value

    def _write_icr2(self, value: int, x2apic: bool) -> None:
        self._w[_ICR2_OFF >> 2] = value & 0xFF000000

    def _write_self_ipi(self, value: int, x2apic: bool) -> None:
        self._send((Shorthand.SELF << 18) | (value & 0xFF), 0)

    def _write_tmict(self, value: int, x2apic: bool) -> None:
        self.timer.poll()
        if self.timer.mode == TIMER_TSC_DEADLINE:
            return
        self._w[0x380 >> 2] = value
        self.timer.start(value)

    def _write_tdcr(self, value: int, x2apic: bool) -> None:
        self._w[0x3E0 >> 2] = value & 0xB
        self.timer.poll()
        self.timer.set_divide(value & 0xB, int(self._w[0x380 >> 2]))
        self.timer.poll()

    def _lvt_mask(self, reg: Register) -> int:
        mask = reg.write_mask
        if reg.name == "LVTT":
            mask = (mask & ~LVT_TIMER_MODE) | self._timer_mode_mask
        if not self.profile.lvt_status_writable:
            mask &= ~LVT_DELIVERY_STATUS
            if reg.name in ("LVT0", "LVT1"):
                mask &= ~LVT_REMOTE_IRR
        return mask

    def _lvt_writer(self, reg: Register) -> Callable[[int, bool], None]:
        offset = reg.offset >> 2
        is_timer = reg.name == "LVTT"

        def write(value: int, x2apic: bool) -> None:
            if not self._w[0xF0 >> 2] & SVR_ENABLE:
                value |= LVT_MASKED
            self._w[offset] = value & self._lvt_mask(reg)
            if is_timer:
                self._timer_mode_changed()

        return write

    def _timer_mode_changed(self) -> None:
        """KVM ``apic_update_lvtt``."""
        self.timer.poll()
        mode = int(self._w[0x320 >> 2]) & self._timer_mode_mask
        if self.timer.set_mode(mode):
            self._w[0x380 >> 2] = 0

    # ===================================================================================
    # Priority, acknowledge, EOI (§6)
    # ===================================================================================
    def _ppr_for(self, isrv: int) -> int:
        """PRIO-2: PPR from TPR and the highest in-service vector ``isrv`` (-1: none)."""
        tpr = int(self._w[0x80 >> 2])
        if isrv < 0:
            isrv = 0
        return tpr & 0xFF if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0

    def _update_ppr(self) -> int:
        """KVM ``__apic_update_ppr``; returns the new PPR."""
        ppr = self._ppr_for(self._isr.highest())
        self._w[0xA0 >> 2] = ppr
        return ppr

    def _update_ppr_and_notify(self) -> None:
        old = int(self._w[0xA0 >> 2])
        ppr = self._update_ppr()
        if ppr < old and self.notify_hook is not None and self._deliverable(ppr) >= 0:
            self.notify_hook(self)

    def _deliverable(self, ppr: int) -> int:
        v = self._irr.highest()
        if v < 0 or (v & 0xF0) <= ppr:
            return -1
        return v

    def pending_interrupt(self) -> int | None:
        """Highest IRR vector whose class is above PPR (PRIO-3), else None.  Only needs the
        APIC hardware-enabled: a software-disabled APIC still delivers what is pending."""
        if not self.apic_base & APIC_BASE_EN:
            return None
        v = self._deliverable(self._update_ppr())
        return None if v < 0 else v

    def ack(self) -> int | None:
        """Interrupt acknowledge (PRIO-4): the deliverable vector moves IRR -> ISR."""
        v = self.pending_interrupt()
        if v is None:
            return None
        self._irr.discard(v)
        self._isr.add(v)
        self._isr_cache = v
        self._update_ppr()
        return v

    def eoi(self) -> int | None:
        """EOI (PRIO-5): clear the highest ISR bit; report it through ``eoi_hook``."""
        v = self._isr.highest()
        if v < 0:
            return None
        self._isr.discard(v)
        self._isr_cache = -1
        self._update_ppr_and_notify()
        hook = self.eoi_hook
        if hook is not None:
            level = v in self._tmr
            suppressed = (
                level
                and self.profile.honor_suppress_eoi_broadcast
                and bool(self._w[0xF0 >> 2] & SVR_SUPPRESS_EOI_BROADCAST)
            )
            hook(self, v, level, suppressed)
        return v

    def set_cr8(self, cr8: int) -> None:
        """MOV to CR8 (REG-TPR-1): TPR = (cr8 & 0xF) << 4."""
        check_int("cr8", cr8, 0, _U64_MAX)
        self._w[0x80 >> 2] = (cr8 & 0xF) << 4
        self._update_ppr_and_notify()

    def get_cr8(self) -> int:
        return (int(self._w[0x80 >> 2]) & 0xF0) >> 4

    # ===================================================================================
    # Sending (§7)
    # ===================================================================================
    def _send(self, low: int, dest: int) -> None:
        """Decode an ICR write (KVM ``kvm_icr_to_lapic_irq``) and hand it on."""
        mode = (low >> 8) & 7
        if self._sender_checks:
            if not self.profile.accept_illegal_vectors and mode <= 1 and (low & 0xFF) < 16:
                self._log_error(ESR_SEND_ILLEGAL_VECTOR)
                return
            if mode == 1 and self.x2apic_mode and not self.profile.x2apic_lowest_priority_ipi:
                self._log_error(ESR_REDIRECTABLE_IPI)
                return
        irq: Interrupt = _new_tuple(  # Interrupt(...) without NamedTuple.__new__'s overhead
            Interrupt,
            (
                low & 0xFF,
                _DM[mode],
                _DST[(low >> 11) & 1],
                _LVL[(low >> 14) & 1],
                _TRG[(low >> 15) & 1],
                _SH[(low >> 18) & 3],
                dest,
                False,
            ),
        )
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
        return self._accept(vector, int(mode), int(trigger), bool(level))

    def accept_interrupt(self, irq: Interrupt) -> bool:
        """``accept`` for a decoded message (delivery stages call this)."""
        return self._accept(irq[0], irq[1], irq[4], irq[3])

    def _accept(self, vector: int, mode: int, trigger: int, level: int) -> bool:
        if not self.apic_base & APIC_BASE_EN:
            return False
        if mode <= 1:  # FIXED, LOWEST
            if mode == 1:
                self.arb_prio += 1
            if trigger and not level:
                return False
            if not self._w[0xF0 >> 2] & SVR_ENABLE:
                return False
            if vector < 16 and not self.profile.accept_illegal_vectors:
                self._log_error(ESR_RECV_ILLEGAL_VECTOR)
                return False
            bit = ((vector >> 5) << 7) | (vector & 31)  # lapic.vectors.bit_index, inlined
            self._tmr_bits[bit] = 1 if trigger else 0  # PRIO-6: TMR follows the trigger mode
            self._irr_bits[bit] = 1
        elif mode == 4:  # NMI
            # KVM process_nmi(): at most two NMIs pending (one to inject, one latched, as the
            # CPU latches one NMI while another is handled); further ones are dropped but
            # still reported as accepted (measured on Linux 6.18 by tests/differential).
            if self.nmi_pending < 2:
                self.nmi_pending += 1
        elif mode == 5:  # INIT
            if trigger and not level:  # INIT level de-assert
                return self.profile.init_deassert_accepted
            self.init_pending = True
            self.sipi_pending = False
        elif mode == 6:  # STARTUP
            self.sipi_vector = vector
            self.sipi_pending = True
        elif mode == 2:  # SMI
            if not self.features.smm:
                return False
            self.smi_pending = True
        elif mode == 3:  # remote read / KVM PV unhalt
            if not self.profile.remote_read_is_pv_kick:
                return False
            self.pv_unhalted = True
        else:  # EXTINT: only through the PIC path, not modelled
            return False
        hook = self.notify_hook
        if hook is not None:
            hook(self)
        return True

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
        accepted = self._accept(value & 0xFF, (value >> 8) & 7, 1 if value & LVT_LEVEL else 0, True)
        if accepted and offset == 0x340 and self.features.intel_compatible:
            self._w[offset >> 2] = value | LVT_MASKED
        return accepted

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
    # KVM_GET_LAPIC / KVM_SET_LAPIC (§14)
    # ===================================================================================
    def get_state(self, *, x2apic_format: bool = False) -> bytes:
        """The 1 KiB ``struct kvm_lapic_state`` (KVM ``kvm_apic_get_state``)."""
        self.timer.poll()
        s = bytearray(self.regs[:STATE_SIZE])
        for (start, end), k in zip(_GAPS, range(0, len(self._gap_bytes), 12), strict=True):
            s[start:end] = self._gap_bytes[k : k + 12]
        tmcct = self.timer.current_count(int(self._w[0x380 >> 2]))
        s[0x390:0x394] = tmcct.to_bytes(4, "little")
        if self.x2apic_mode:
            if not x2apic_format:
                s[0x20:0x24] = ((self.vcpu_id << 24) & 0xFFFFFFFF).to_bytes(4, "little")
            if not self.profile.x2apic_icr_split:
                s[0x310:0x314] = s[0x304:0x308]
        return bytes(s)

    def set_state(
        self, data: bytes | bytearray | memoryview, *, x2apic_format: bool = False
    ) -> None:
        """KVM ``kvm_apic_set_state``.  Raises :class:`StateError` (errno EINVAL) when an
        x2APIC-mode image under ``x2apic_format`` carries an ID other than the vCPU id."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ApicTypeError(f"data must be bytes, not {type(data).__name__}")
        s = bytearray(data)
        if len(s) != STATE_SIZE:
            raise ApicValueError(f"data must be {STATE_SIZE} bytes, got {len(s)}")
        svr = int.from_bytes(s[0xF0:0xF4], "little")
        x2 = self.x2apic_mode
        mismatch = x2 and x2apic_format and int.from_bytes(s[0x20:0x24], "little") != self.vcpu_id
        if mismatch:
            if self.profile.set_state_svr_before_fixup:
                self._set_svr(svr)
            raise StateError(22, "x2APIC ID in the state differs from the vCPU's x2APIC ID")
        self._set_svr(svr)
        if x2:
            s[0x20:0x24] = self.vcpu_id.to_bytes(4, "little")
            s[0xD0:0xD4] = destination.x2apic_ldr(self.vcpu_id).to_bytes(4, "little")
            if not self.profile.x2apic_icr_split:
                s[0x304:0x308] = s[0x310:0x314]
        gaps = bytearray()
        for start, end in _GAPS:
            gaps += s[start:end]
            s[start:end] = bytes(end - start)
        self._gap_bytes = bytes(gaps)
        self.timer.poll()
        old_isr_count = len(self._isr)
        self.regs[:STATE_SIZE] = s
        self._map_changed()
        self._set_version()
        if self.profile.set_state_stale_ppr:
            # kvm_apic_set_state runs apic_update_ppr before kvm_apic_update_apicv recounts
            # the restored ISR: the highest in-service vector is still found through the old
            # isr_count / highest_isr_cache (measured on Linux 6.18, STATE-4).
            if not old_isr_count:
                isrv = -1
            elif self._isr_cache >= 0:
                isrv = self._isr_cache
            else:
                isrv = self._isr.highest()
            self._w[0xA0 >> 2] = self._ppr_for(isrv)
        else:
            self._update_ppr()
        self._isr_cache = -1
        self.timer.cancel()
        self._timer_mode_changed()
        w = self._w
        self.timer.set_divide(int(w[0x3E0 >> 2]), int(w[0x380 >> 2]))
        self.timer.restore(int(w[0x380 >> 2]), int(w[0x390 >> 2]))
        w[0x390 >> 2] = 0
        self.arb_prio = 0
        self.timer.poll()
        if (
            self.notify_hook is not None
            and self.hw_enabled
            and self._deliverable(self._ppr_for(self._isr.highest())) >= 0
        ):
            self.notify_hook(self)  # KVM_REQ_EVENT; PPR itself is recomputed at the next use

    # ===================================================================================
    # Hooks and presentation
    # ===================================================================================
    def _map_changed(self) -> None:
        hook = self.map_hook
        if hook is not None:
            hook(self)

    def __repr__(self) -> str:
        return f"LocalApic(vcpu_id={self.vcpu_id}, profile={self.profile!r}, bsp={self.bsp})"

    def dump(self) -> str:
        """A state summary a person can read at a glance."""
        lines = [
            f"LocalApic vcpu {self.vcpu_id} [{self.profile.name}] {self.mode.name} "
            f"base={self.apic_base:#x} id={self.id_register:#010x} "
            f"{'sw-enabled' if self.sw_enabled else 'sw-disabled'}",
            f"  TPR={self.tpr:#04x} PPR={self.ppr:#04x} LDR={self.ldr:#010x} "
            f"DFR={self.dfr:#010x} SVR={self.svr:#x} ESR={self.esr:#x}",
            f"  IRR={_fmt(self._irr)} ISR={_fmt(self._isr)} TMR={_fmt(self._tmr)}",
            "  LVT " + " ".join(
                f"{n}={self._w[REGISTER_BY_NAME[n].offset >> 2]:#x}"
                for n in _LVT_ORDER[: self.lvt_count]
            ),
            f"  ICR={self.icr:#018x} TMICT={self._w[0x380 >> 2]:#x} "
            f"TDCR={self._w[0x3E0 >> 2]:#x} timer={self.timer!r}",
        ]
        pend = [
            name
            for name, on in (
                (f"NMI x{self.nmi_pending}", self.nmi_pending),
                ("SMI", self.smi_pending),
                ("INIT", self.init_pending),
                (f"SIPI {self.sipi_vector:#04x}", self.sipi_pending),
                ("PV-unhalt", self.pv_unhalted),
            )
            if on
        ]
        if pend:
            lines.append("  pending: " + ", ".join(pend))
        return "\n".join(lines)


def _fmt(vs: VectorSet) -> str:
    return "{" + ",".join(f"{v:#x}" for v in vs) + "}"


class StateError(ApicValueError):
    """KVM_SET_LAPIC refused the image; ``errno`` is KVM's (22 = EINVAL)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(f"state: {message} (errno {errno})")
        self.errno = errno


__all__ = [
    "ApicMode",
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
        "LocalApic._local_deliver",  # BUG-24 a16eb25b09c0: mask LVTPC on a PMI
        "LocalApic._set_version",  # BUG-25 0bcc3fb95b97: no directed EOI with in-kernel IOAPIC
        "LocalApic.eoi",  # BUG-26 suppress EOI broadcast; BUG-29 highest-ISR cache purge
        "LocalApic.ack",  # BUG-29: the highest-ISR cache
    }
)
