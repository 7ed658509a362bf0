"""Bug replays that patch the local APIC layer (``lapic/``): the timer (BUG-9), destination
matching (BUG-12) and the APIC itself (BUG-10, 17..26, 29, 30).

Each function installs one replay on a :class:`~apicsim.replays.patcher.Patcher`, swapping a
seam that ``lapic/*.py`` declares in ``REPLAY_SEAMS`` for a re-creation of KVM's code before
the fix (reference ``kvm_lapic.md`` §17).  A method is found along ``LocalApic``'s MRO, so a
replay keeps working when the method moves into a base class (its seam moves with it).  Not
here: the catalogue (``apicsim.replays``) and the replays of the upper layers
(``hypervisor.py``, ``guest.py``).
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import lapic.destination as destination_mod
import lapic.icr as icr_mod
from hypervisor.vm import Vm
from lapic.apic import LocalApic
from lapic.faults import check_int, gp
from lapic.priority import PriorityMixin
from lapic.registers import (
    APIC_BASE_BSP,
    APIC_BASE_EN,
    APIC_BASE_EXTD,
)
from lapic.timer import ApicTimer

from .patcher import U32, Patcher


# =============================================================================================
# The timer and destination matching (BUG-9, BUG-12)
# =============================================================================================
def bug9(p: Patcher) -> None:
    """``apic_get_tmcct`` before the CVE-2013-6367 fix: no ``period == 0`` test, so TMICT != 0
    with nothing counting (the reserved timer mode) reaches ``mod_64(remaining, period)``."""

    def _count_without_period(self: ApicTimer) -> int:
        remaining = 0 if self.target is None else max(self.target - self.clock.now, 0)
        ns = remaining % self.period  # mod_64(remaining, 0): ZeroDivisionError
        return ns // (self.bus_cycle_ns * self.divide)

    p.set(ApicTimer, "_count_without_period", _count_without_period)


def bug12(p: Patcher) -> None:
    """Before 03d2249ea608/9ea369b032d8: the destination is compared as sent; an IOAPIC/MSI
    0xFF is no broadcast for x2APIC targets (no ``kvm_apic_mda`` rewrite)."""

    def mda(dest: int, target_x2apic: bool, *, is_ipi: bool, broadcast_quirk: bool) -> int:
        return dest

    p.set(destination_mod, "mda", mda)

# =============================================================================================
# The APIC (BUG-10, 17..26, 29, 30)
# =============================================================================================
def bug10(p: Patcher) -> None:
    """``kvm_lapic_set_base`` recalculating the map before it stored the new APIC_BASE."""
    original = p.current(LocalApic, "_apply_apic_base")

    def _apply_apic_base(self: LocalApic, value: int) -> None:
        if not (value & ~self.apic_base & APIC_BASE_EN):
            original(self, value)
            return
        hook = self.map_hook
        if hook is not None:
            hook(self)  # recalculate_apic_map() ran here, with the old (disabled) APIC_BASE
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, Vm):
                _ = owner.apic_map
        self.map_hook = None  # ... and nothing recalculated it once the new value was stored
        try:
            original(self, value)
        finally:
            self.map_hook = hook

    p.set(LocalApic, "_apply_apic_base", _apply_apic_base)

def bug17(p: Patcher) -> None:
    """``kvm_apic_state_fixup`` before 4b7c3f6d04bd: without 32-bit IDs, SET takes the x2APIC
    ID from the image (``*id >>= 24``) and derives the LDR from it; GET shows ``*id <<= 24``."""
    original_set = p.current(LocalApic, "set_state")
    original_get = p.current(LocalApic, "get_state")

    def set_state(self: LocalApic, data: bytes, *, x2apic_format: bool = False) -> None:
        original_set(self, data, x2apic_format=x2apic_format)
        if self.x2apic_mode and not x2apic_format:
            new_id = int.from_bytes(bytes(data[0x20:0x24]), "little") >> 24
            self._w[0x20 >> 2] = new_id
            self._w[0xD0 >> 2] = destination_mod.x2apic_ldr(new_id)
            self._map_changed()

    def get_state(self: LocalApic, *, x2apic_format: bool = False) -> bytes:
        image = bytearray(original_get(self, x2apic_format=x2apic_format))
        if self.x2apic_mode and not x2apic_format:
            image[0x20:0x24] = ((self.id_register << 24) & U32).to_bytes(4, "little")
        return bytes(image)

    p.set(LocalApic, "set_state", set_state)
    p.set(LocalApic, "get_state", get_state)

def bug18(p: Patcher) -> None:
    """x2APIC ICR writes before 71bf395a276f: no must-be-zero bits.  ``X2APIC_ICR_RESERVED``
    becomes 0 in every model module that imported it from ``lapic.icr`` (``lapic.apic``), so
    WRMSR 0x830 never #GPs on bits 13, 16-17, 20-31; ``lapic.icr`` itself, and the tests that
    import it, keep the true mask."""
    p.set_imported(icr_mod, "X2APIC_ICR_RESERVED", 0)


def bug19(p: Patcher) -> None:
    """The state image with the 64-bit x2APIC ICR left whole: GET does not copy ICR[63:32] to
    0x310 and SET does not join 0x310 back into it (userspace sees the raw 64-bit layout)."""
    original_set = p.current(LocalApic, "set_state")
    original_get = p.current(LocalApic, "get_state")

    def get_state(self: LocalApic, *, x2apic_format: bool = False) -> bytes:
        image = bytearray(original_get(self, x2apic_format=x2apic_format))
        if self.x2apic_mode and not self.icr_split:
            image[0x310:0x314] = self.regs[0x310:0x314]
        return bytes(image)

    def set_state(self: LocalApic, data: bytes, *, x2apic_format: bool = False) -> None:
        original_set(self, data, x2apic_format=x2apic_format)
        if self.x2apic_mode and not self.icr_split:
            self.regs[0x304:0x308] = bytes(data[0x304:0x308])

    p.set(LocalApic, "get_state", get_state)
    p.set(LocalApic, "set_state", set_state)

def _check_wrmsr_args(msr: int, value: int) -> None:
    check_int("msr", msr, 0, U32)
    check_int("value", value, 0, (1 << 64) - 1)

def bug20(p: Patcher) -> None:
    """SELF IPI before the #GP fix: ``APIC_DEST_SELF | (val & APIC_VECTOR_MASK)``, bits 31:8
    silently dropped."""
    original = p.current(LocalApic, "wrmsr")

    def wrmsr(self: LocalApic, msr: int, value: int, host_initiated: bool = False) -> None:
        _check_wrmsr_args(msr, value)
        if msr == 0x83F and self.x2apic_mode and not value >> 32 and value & ~0xFF:
            self._write_self_ipi(value & 0xFF, True)
            return
        original(self, msr, value, host_initiated)

    p.set(LocalApic, "wrmsr", wrmsr)

def bug21(p: Patcher) -> None:
    """x2APIC WRMSR before the bits-63:32 #GP: ``kvm_lapic_reg_write(apic, reg, (u32)data)``."""
    original = p.current(LocalApic, "wrmsr")

    def wrmsr(self: LocalApic, msr: int, value: int, host_initiated: bool = False) -> None:
        _check_wrmsr_args(msr, value)
        if 0x800 <= msr <= 0x8FF and msr != 0x830 and self.x2apic_mode:
            value &= U32
        original(self, msr, value, host_initiated)

    p.set(LocalApic, "wrmsr", wrmsr)

def bug22(p: Patcher) -> None:
    """RDMSR 0x80E before the DFR was marked non-existent for x2APIC: it reads the DFR."""
    original = p.current(LocalApic, "rdmsr")

    def rdmsr(self: LocalApic, msr: int) -> int:
        if msr == 0x80E and self.x2apic_mode:
            return self.dfr
        result: int = original(self, msr)
        return result

    p.set(LocalApic, "rdmsr", rdmsr)

def bug23(p: Patcher) -> None:
    """``__kvm_apic_set_base`` before the xAPIC ID reinit: a host-forced x2APIC -> xAPIC
    transition keeps the x2APIC-format ID register (vcpu_id in bits 31:0)."""
    original = p.current(LocalApic, "_apply_apic_base")

    def _apply_apic_base(self: LocalApic, value: int) -> None:
        id_register = self.id_register
        left_x2apic = self.apic_base & APIC_BASE_EXTD and not value & APIC_BASE_EXTD
        original(self, value)
        if left_x2apic and value & APIC_BASE_EN:
            self._w[0x20 >> 2] = id_register
            self._map_changed()

    p.set(LocalApic, "_apply_apic_base", _apply_apic_base)

def bug24(p: Patcher) -> None:
    """``kvm_apic_local_deliver`` before a16eb25b09c0: LVTPC stays unmasked after a PMI."""
    p.set(LocalApic, "_pmi_masks_lvtpc", lambda self: False)


def bug25(p: Patcher) -> None:
    """``kvm_apic_set_version`` before 0bcc3fb95b97: LVR bit 24 whenever the guest CPUID has
    x2APIC, even with the in-kernel IOAPIC (which has no EOI register)."""
    p.set(LocalApic, "_advertises_directed_eoi", lambda self: self.features.x2apic)


def _eoi_report(self: LocalApic, vector: int) -> None:
    hook = self.eoi_hook
    if hook is not None:
        level = vector in self._tmr
        hook(self, vector, level, level and self._eoi_broadcast_suppressed())


def bug26(p: Patcher) -> None:
    """``kvm_ioapic_send_eoi`` before the Suppress-EOI-Broadcast fix: SVR bit 12 is ignored,
    every level EOI is broadcast, even under ``honor_suppress_eoi_broadcast=True``."""
    p.set(PriorityMixin, "_eoi_broadcast_suppressed", lambda self: False)


def bug29(p: Patcher) -> None:
    """KVM's ``highest_isr_cache`` without the purge: acknowledge caches the vector it moved to
    ISR, EOI trusts the cache, and a state restore (KVM: an APICv update) leaves it stale, so
    EOI clears the wrong vector (or none) and reports it."""
    original_ack = p.current(LocalApic, "ack")
    cache: WeakKeyDictionary[LocalApic, int] = WeakKeyDictionary()

    def ack(self: LocalApic) -> int | None:
        v: int | None = original_ack(self)
        if v is not None:
            cache[self] = v  # apic_set_isr: highest_isr_cache = vec
        return v

    def eoi(self: LocalApic) -> int | None:
        isr = self._isr
        if not isr:  # isr_count == 0
            return None
        v = cache.get(self, -1)  # apic_find_highest_isr trusts the cache when it is set
        if v < 0:
            v = isr.highest()
        if v in isr:  # apic_clear_isr: nothing happens if the bit is not set
            isr.discard(v)
            cache[self] = -1
        self._update_ppr_and_notify()
        _eoi_report(self, v)
        return v

    p.set(LocalApic, "ack", ack)
    p.set(LocalApic, "eoi", eoi)

def bug30(p: Patcher) -> None:
    """``kvm_set_apic_base`` before 58d269d8cccc: bit 8 (BSP) counted as reserved (0x3FF), so
    any write that changes APIC_BASE with BSP set #GPs."""
    original = p.current(LocalApic, "set_apic_base")

    def set_apic_base(self: LocalApic, value: int, *, host_initiated: bool = False) -> None:
        check_int("value", value, 0, (1 << 64) - 1)
        if value != self.apic_base and value & APIC_BASE_BSP:
            raise gp(f"IA32_APIC_BASE {value:#x}: reserved bits {APIC_BASE_BSP:#x}")
        original(self, value, host_initiated=host_initiated)

    p.set(LocalApic, "set_apic_base", set_apic_base)

__all__ = ["bug9", "bug10", "bug12", "bug17", "bug18", "bug19", "bug20", "bug21", "bug22",
           "bug23", "bug24", "bug25", "bug26", "bug29", "bug30"]


def fid1(p: Patcher) -> None:
    """FID-1, the model before issue 8: a host CR8 write (KVM_SET_SREGS) keeps TPR bits 3:0."""

    def set_cr8(self: LocalApic, cr8: int) -> None:
        self._write_tpr((cr8 & 0xF) << 4 | self.tpr & 0xF, False)

    p.set(LocalApic, "set_cr8", set_cr8)


def fid2(p: Patcher) -> None:
    """FID-2, the model before this change: the APIC window is IA32_APIC_BASE bits 31:12."""

    def base_address(self: LocalApic) -> int:
        return self.apic_base & 0xFFFFF000

    p.set(LocalApic, "base_address", property(base_address))
