"""Register reads and writes of one local APIC (a ``LocalApic`` mixin).

Implements (reference ``kvm_lapic.md`` §5; KVM ``kvm_lapic_reg_read``, ``kvm_lapic_reg_write``,
``apic_update_lvtt``, ``apic_set_spiv``): what a read of each register returns (PPR
recomputed, TMCCT counted, APR per profile) and each register's write semantics: ID, TPR, EOI,
LDR, DFR, SVR (masking every LVT on software-disable), ESR (latching per profile), ICR/ICR2 and
SELF IPI (handing the message to ``_send``), the LVTs with their write masks, TMICT and TDCR;
and the SDM's reserved bits of an x2APIC write (``x2apic_strict_reserved_bits``).  Bit fields
come from the declared layouts in ``lapic.registers`` and ``lapic.icr``.

Not modelled: the dynamic delivery-status and remote-IRR bits (delivery is synchronous).
"""

from __future__ import annotations

from collections.abc import Callable

from lapic.core import ApicCore
from lapic.icr import DELIVERY_STATUS, ICR2, ICR_LOW, Shorthand
from lapic.registers import (
    DFR,
    LVR_DIRECTED_EOI,
    LVT_DELIVERY_STATUS,
    LVT_MASKED,
    LVT_REGISTERS,
    LVT_REMOTE_IRR,
    LVT_TIMER_MODE,
    REGISTER_BY_NAME,
    SVR,
    SVR_ENABLE,
    SVR_SUPPRESS_EOI_BROADCAST,
    TDCR,
    TIMER_TSC_DEADLINE,
    XAPIC_ID,
    XAPIC_LDR,
    Access,
    Register,
)

LVT_ORDER = ("LVTT", "LVTTHMR", "LVTPC", "LVT0", "LVT1", "LVTERR", "LVTCMCI")
"""The LVT entries in LVR max-LVT order (the 7th exists only with CMCI)."""
ICR_OFF = 0x300
ICR2_OFF = 0x310
_ICR = ICR_OFF >> 2
_ICR_HIGH = (ICR_OFF + 4) >> 2
"""The x2APIC ICR's destination dword when the ICR is not split (VMX: 64-bit at 0x300)."""
_ICR2 = ICR2_OFF >> 2
_ICR2_DEST = ICR2["dest"]
_ICR_LOW_STORED = 0xFFFFFFFF & ~DELIVERY_STATUS
"""What an ICR write stores of its low dword (delivery status is read-only)."""
_ICR_STORED = (1 << 64) - 1 & ~DELIVERY_STATUS
ICR_QWORD = ICR_OFF >> 3
"""The x2APIC ICR's quadword in the page's quadword view (``LocalApic._q``), unless split."""
assert _ICR_HIGH == _ICR + 1  # the x2APIC ICR's two dwords, one quadword at 0x300
_SELF_IPI = ICR_LOW["shorthand"].place(Shorthand.SELF)
"""The ICR low dword of a SELF IPI write, vector 0 (KVM ``APIC_DEST_SELF``)."""
_XAPIC_ID = XAPIC_ID["id"]
_LDR_MASK = XAPIC_LDR["logical_id"].mask
_DFR_RESERVED = ~DFR["model"].mask & 0xFFFFFFFF
_SVR_WRITABLE = SVR["vector"].mask | SVR_ENABLE | SVR["focus_disable"].mask
"""SVR bits every APIC stores (0x3FF); bit 12 only with directed EOI in LVR."""
_TDCR_MASK = TDCR["divide_low"].mask | TDCR["divide_high"].mask
_ID = REGISTER_BY_NAME["ID"].offset >> 2
_LVR = REGISTER_BY_NAME["LVR"].offset >> 2
_TPR = REGISTER_BY_NAME["TPR"].offset >> 2
_LDR = REGISTER_BY_NAME["LDR"].offset >> 2
_DFR = REGISTER_BY_NAME["DFR"].offset >> 2
_SVR = REGISTER_BY_NAME["SVR"].offset >> 2
_ESR = REGISTER_BY_NAME["ESR"].offset >> 2
_LVTT = REGISTER_BY_NAME["LVTT"].offset >> 2
_TMICT = REGISTER_BY_NAME["TMICT"].offset >> 2
_TDCR = REGISTER_BY_NAME["TDCR"].offset >> 2
LVT_WORDS = {n: REGISTER_BY_NAME[n].offset >> 2 for n in LVT_ORDER}
"""LVT entry name -> index of its dword in the page."""


class RegisterMixin(ApicCore):
    """Per-register read and write semantics (see the module documentation)."""

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
            return self.timer.current_count(int(self._w[_TMICT]))
        elif name == "APR":
            return self._apr() if self.profile.apr_computed else 0
        return int(self._w[reg.offset >> 2])

    # ===================================================================================
    # Writing registers (kvm_lapic_reg_write)
    # ===================================================================================
    def _write_id(self, value: int, x2apic: bool) -> None:
        if self.profile.xapic_id_writable:
            self._set_xapic_id(_XAPIC_ID.get(value))

    def _write_tpr(self, value: int, x2apic: bool) -> None:
        self._w[_TPR] = value & 0xFF
        self._update_ppr_and_notify()

    def _write_eoi(self, value: int, x2apic: bool) -> None:
        self.eoi()

    def _write_ldr(self, value: int, x2apic: bool) -> None:
        self._w[_LDR] = value & _LDR_MASK
        self._map_changed()

    def _write_dfr(self, value: int, x2apic: bool) -> None:
        self._w[_DFR] = value | _DFR_RESERVED
        self._map_changed()

    def _svr_mask(self) -> int:
        mask = _SVR_WRITABLE
        if self._w[_LVR] & LVR_DIRECTED_EOI:
            mask |= SVR_SUPPRESS_EOI_BROADCAST
        return mask

    def _write_svr(self, value: int, x2apic: bool) -> None:
        stored = value & self._svr_mask()
        if self.profile.svr_low_nibble_hardwired:
            stored |= 0xF
        self._set_svr(stored)
        if not stored & SVR_ENABLE:
            w = self._w
            for name in LVT_ORDER[: self.lvt_count]:
                w[LVT_WORDS[name]] |= LVT_MASKED
            self._timer_mode_changed()

    def _set_svr(self, value: int) -> None:
        """KVM ``apic_set_spiv``: store verbatim; a software-enable change dirties the map."""
        was = self.sw_enabled
        self._w[_SVR] = value
        if bool(value & SVR_ENABLE) != was:
            self._map_changed()

    def _write_esr(self, value: int, x2apic: bool) -> None:
        if self.profile.esr_latching:
            self._w[_ESR] = self._esr_pending
            self._esr_pending = 0

    def _write_icr(self, value: int, x2apic: bool) -> None:
        w = self._w
        if x2apic:
            self._send(value & _ICR_LOW_STORED, value >> 32)
            self.store_x2apic_icr(value)
        else:
            value &= ~DELIVERY_STATUS
            self._send(value, _ICR2_DEST.get(int(w[_ICR2])))
            w[_ICR] = value

    def store_x2apic_icr(self, value: int) -> None:
        """The register half of an x2APIC ICR write of ``value`` (already checked): the low
        dword without delivery status at 0x300, the destination at 0x304 or, with
        ``icr_split``, 0x310.  ``_write_icr`` stores it after the send."""
        image = self.x2apic_icr_image(value)
        if image is None:
            w = self._w
            w[_ICR] = value & _ICR_LOW_STORED
            w[_ICR2] = value >> 32
        else:  # 0x300 and 0x304 are one little-endian quadword
            self._q[ICR_QWORD] = image

    def x2apic_icr_image(self, value: int) -> int | None:
        """What an x2APIC ICR write of ``value`` stores, as the quadword at :data:`ICR_QWORD`
        of the page (what :meth:`store_x2apic_icr` writes there), for a hypervisor fastpath
        that keeps it per value (``hypervisor.vcpu.Vcpu.msr_exit``); None with
        ``icr_split``, whose two dwords are not one quadword."""
        return None if self.icr_split else value & _ICR_STORED

    def _write_icr2(self, value: int, x2apic: bool) -> None:
        self._w[_ICR2] = value & _ICR2_DEST.mask

    def _write_self_ipi(self, value: int, x2apic: bool) -> None:
        self._send(_SELF_IPI | (value & 0xFF), 0)

    def _write_tmict(self, value: int, x2apic: bool) -> None:
        self.timer.poll()
        if self.timer.mode == TIMER_TSC_DEADLINE:
            return
        self._w[_TMICT] = value
        self.timer.start(value)

    def _write_tdcr(self, value: int, x2apic: bool) -> None:
        self._w[_TDCR] = value & _TDCR_MASK
        self.timer.poll()
        self.timer.set_divide(value & _TDCR_MASK, int(self._w[_TMICT]))
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
            if not self._w[_SVR] & SVR_ENABLE:
                value |= LVT_MASKED
            self._w[offset] = value & self._lvt_mask(reg)
            if is_timer:
                self._timer_mode_changed()

        return write

    def _timer_mode_changed(self) -> None:
        """KVM ``apic_update_lvtt``."""
        self.timer.poll()
        mode = int(self._w[_LVTT]) & self._timer_mode_mask
        if self.timer.set_mode(mode):
            self._w[_TMICT] = 0

    def _build_writers(self) -> None:
        """The write handler of every writable register, by name (rebuilt after unpickling:
        the LVT handlers are closures)."""
        self._writers = {
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
