"""The bug-replay catalogue: each historical KVM bug of reference ``kvm_lapic.md`` §17, put back.

A :class:`Replay` names one bug (``BUG-n``), the KVM commit that fixed it, the spec rules it
breaks, and ``apply``: a context manager that swaps one model function, method or attribute for
a faithful re-creation of KVM's behaviour *before* the fix, and restores the original object on
exit.  The model itself carries no bug code: every buggy variant lives in this file.

With a replay active the test suite must fail (the replay is "killed").  Switches:

* ``APICSIM_REPLAY=BUG-13`` (comma-separated for several) activates replays for a whole pytest
  run (``tests/conftest.py``); an unknown id is an error;
* ``apicsim mutants`` (:mod:`apicsim.mutants`) runs every replay against the tests that name it
  or one of its rules and reports which test killed it.

Bugs that cannot be replayed meaningfully carry ``apply=None`` and a ``reason``.

Python renders KVM's memory-safety bugs as exceptions: an out-of-bounds read or write of
``phys_map`` raises ``IndexError`` (what KASAN would report), a NULL dereference raises
``AttributeError`` on ``None``, a division by zero raises ``ZeroDivisionError``.

See ``specs/replays.md`` for the table.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from weakref import WeakKeyDictionary

import guest.kvm_pv as kvm_pv_mod
import hypervisor.apic_map as apic_map_mod
import hypervisor.delivery as delivery_mod
import hypervisor.pv_ipi as pv_ipi_mod
import lapic.apic as apic_mod
import lapic.destination as destination_mod
from guest.cpu import GuestCpu
from guest.kvm_pv import KvmPv
from hypervisor.apic_map import ApicMap, Inhibits, LogicalMode
from hypervisor.delivery import AcceptFn
from hypervisor.vm import Vm
from lapic.apic import LocalApic
from lapic.destination import Target
from lapic.faults import check_int, gp
from lapic.icr import (
    DEST_LOGICAL,
    SHORTHAND_MASK,
    DeliveryMode,
    Interrupt,
    Level,
    Shorthand,
    Trigger,
)
from lapic.profile import LowestPriorityPolicy, Profile
from lapic.registers import (
    APIC_BASE_BSP,
    APIC_BASE_EN,
    APIC_BASE_EXTD,
    DFR_FLAT,
    KVM_APIC_VERSION,
    LVR_DIRECTED_EOI,
    LVT_LEVEL,
    LVT_MASKED,
    SVR_SUPPRESS_EOI_BROADCAST,
    TIMER_TSC_DEADLINE,
)
from lapic.timer import ApicTimer
from lapic.writers import RegisterMixin

ENV_VAR = "APICSIM_REPLAY"
"""Environment variable naming the replays to activate for a pytest run."""

_U32 = 0xFFFFFFFF
_MODEL_PACKAGES = ("lapic", "hypervisor", "guest", "apicsim")

ApplyFn = Callable[[], AbstractContextManager[None]]


class ReplayError(ValueError):
    """An unknown or non-replayable bug id, or a replay whose target left the model."""


@dataclass(frozen=True, slots=True)
class Replay:
    """One historical KVM bug and the switch that puts it back into the model."""

    id: str
    """``BUG-n``, the id of reference §17."""
    commit: str
    """Mainline commit (12 hex digits) of the fix, or ``""`` where the reference has "id ?"."""
    title: str
    """The fix's subject line."""
    what: str
    """What the replay puts back (the behaviour before the fix)."""
    rules: tuple[str, ...]
    """Spec rule ids the buggy behaviour violates (``specs/*.md``)."""
    apply: ApplyFn | None
    """Context manager factory that activates the replay, or None (not replayable)."""
    reason: str = ""
    """Why the bug is not replayable (only with ``apply=None``)."""

    @property
    def replayable(self) -> bool:
        return self.apply is not None


# =============================================================================================
# Patching
# =============================================================================================
class _Patcher:
    """Swaps attributes of model modules/classes and restores the exact original objects."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    @staticmethod
    def current(owner: Any, name: str) -> Any:
        """The object ``owner`` holds under ``name`` (its own ``__dict__`` entry)."""
        ns = vars(owner)
        if name not in ns:
            raise ReplayError(f"{_label(owner)}.{name} is not in the model any more")
        return ns[name]

    def set(self, owner: Any, name: str, value: Any) -> None:
        """Replace ``owner.name``.  A module-level function is also replaced in every model
        module that imported it by name (``from hypervisor.delivery import deliver``)."""
        old = self.current(owner, name)
        self._swap(owner, name, old, value)
        if isinstance(owner, ModuleType) and callable(old):
            for module in _model_modules():
                if module is not owner and vars(module).get(name) is old:
                    self._swap(module, name, old, value)

    def _swap(self, owner: Any, name: str, old: Any, value: Any) -> None:
        setattr(owner, name, value)
        self._undo.append((owner, name, old))

    def restore(self) -> None:
        while self._undo:
            owner, name, old = self._undo.pop()
            setattr(owner, name, old)


def _label(owner: Any) -> str:
    return str(getattr(owner, "__qualname__", getattr(owner, "__name__", repr(owner))))


def _model_modules() -> list[ModuleType]:
    """Loaded modules of the model packages (never test modules, never this one)."""
    return [
        module
        for name, module in list(sys.modules.items())
        if isinstance(module, ModuleType)
        and name.split(".")[0] in _MODEL_PACKAGES
        and name != __name__
    ]


def _applier(install: Callable[[_Patcher], None]) -> ApplyFn:
    @contextmanager
    def apply() -> Iterator[None]:
        patcher = _Patcher()
        try:
            install(patcher)
            yield
        finally:
            patcher.restore()

    apply.__doc__ = install.__doc__
    return apply


def _oob(slots: Sequence[LocalApic | None], index: int) -> LocalApic | None:
    """``slots[index]`` as C reads it, except that an index outside the array raises (KASAN)
    instead of reading a neighbour (Python's negative indices would wrap around)."""
    if not 0 <= index < len(slots):
        raise IndexError(f"out-of-bounds access: phys_map[{index}] of {len(slots)} slots")
    return slots[index]


# =============================================================================================
# PV IPI (BUG-2, BUG-3, BUG-4, BUG-5, BUG-7)
# =============================================================================================
def _bug2(p: _Patcher) -> None:
    """``__pv_send_ipi`` before bdf7ffc89922: ``int min`` and no bounds at all."""

    def _send_half(
        apic_map: ApicMap, bitmap: int, min_id: int, irq: Interrupt, accept: AcceptFn
    ) -> int:
        if min_id >= 1 << 31:  # the pre-fix prototype took a signed ``int min``
            min_id -= 1 << 32
        # No "min > max_apic_id" bail-out and no min(BITS_PER_LONG, max - min + 1) bound:
        # every set bit of the unsigned long indexes phys_map[min + i].
        bitmap &= (1 << 64) - 1
        count = 0
        while bitmap:
            low = bitmap & -bitmap
            target = _oob(apic_map.phys_map, min_id + low.bit_length() - 1)
            if target is not None:
                count += accept(target, irq)
            bitmap ^= low
        return count

    p.set(pv_ipi_mod, "_send_half", _send_half)


def _bug3(p: _Patcher) -> None:
    """``kvm_pv_send_ipi`` before the CVE-2018-19406 fix: ``map`` used without a NULL check."""

    def pv_send_ipi(
        apic_map: ApicMap | None,
        bitmap_low: int,
        bitmap_high: int,
        min_id: int,
        icr: int,
        *,
        op_64_bit: bool,
        accept: AcceptFn,
    ) -> int:
        if icr & (DEST_LOGICAL | SHORTHAND_MASK):
            return -pv_ipi_mod.KVM_EINVAL
        irq = Interrupt(
            icr & 0xFF,
            DeliveryMode((icr >> 8) & 7),
            level=Level((icr >> 14) & 1),
            trigger=Trigger((icr >> 15) & 1),
        )
        # No "if (!map) return -EOPNOTSUPP": a NULL map is dereferenced below.
        the_map: ApicMap = apic_map  # type: ignore[assignment]
        cluster = 64 if op_64_bit else 32
        min_id &= _U32
        count = pv_ipi_mod._send_half(the_map, bitmap_low, min_id, irq, accept)
        min_id = (min_id + cluster) & _U32
        count += pv_ipi_mod._send_half(the_map, bitmap_high, min_id, irq, accept)
        return count

    p.set(pv_ipi_mod, "pv_send_ipi", pv_send_ipi)


def _bug4(p: _Patcher) -> None:
    """The dispatcher with KVM_HC_SEND_IPI inside ``#ifdef CONFIG_X86_64``."""
    original = p.current(pv_ipi_mod, "emulate_hypercall")

    def emulate_hypercall(
        host: pv_ipi_mod.HypercallHost,
        source: int,
        nr: int,
        a0: int,
        a1: int,
        a2: int,
        a3: int,
        *,
        op_64_bit: bool,
        cpl: int,
    ) -> int:
        # The case was compiled only into 64-bit hosts; the model's stand-in for a 32-bit host
        # is a hypercall made outside 64-bit mode (op_64_bit == 0), which falls to -KVM_ENOSYS.
        if not op_64_bit and not cpl and nr & _U32 == pv_ipi_mod.KVM_HC_SEND_IPI:
            return pv_ipi_mod.truncate_result(-pv_ipi_mod.KVM_ENOSYS, op_64_bit)
        result: int = original(host, source, nr, a0, a1, a2, a3, op_64_bit=op_64_bit, cpl=cpl)
        return result

    p.set(pv_ipi_mod, "emulate_hypercall", emulate_hypercall)


def _bug5(p: _Patcher) -> None:
    """The guest's ``__send_ipi_mask`` before the WARN_ONCE: the result is thrown away."""

    def _send_ipi_mask(self: KvmPv, cpu: GuestCpu, cpus: Sequence[int], vector: int) -> None:
        apicids = cpu.guest.cpu_to_apicid
        long_mode = self.bits_per_long == 64
        calls = kvm_pv_mod.pv_send_ipi_hypercalls(
            (apicids[c] for c in cpus), vector, self.bits_per_long
        )
        for a0, a1, a2, a3 in calls:
            cpu.vcpu.hypercall(pv_ipi_mod.KVM_HC_SEND_IPI, a0, a1, a2, a3, long_mode=long_mode)

    p.set(KvmPv, "_send_ipi_mask", _send_ipi_mask)


def _bug7(p: _Patcher) -> None:
    """``guest_pv_has`` did not exist: every PV hypercall is allowed whatever CPUID says."""

    def pv_feature(self: Vm, feature: int) -> bool:
        return True

    p.set(Vm, "pv_feature", pv_feature)


# =============================================================================================
# The optimized map and the fast path (BUG-8, 10, 11, 13, 14, 15, 16, 28)
# =============================================================================================
def _bug8(p: _Patcher) -> None:
    """x2APIC logical lookup before the CVE-2013-6376 fix: the cluster is not bounded."""
    original = p.current(ApicMap, "logical_dest")

    def logical_dest(self: ApicMap, dest: int) -> tuple[list[LocalApic | None], int, int] | None:
        if self.logical_mode == LogicalMode.X2APIC:
            # No "offset > max_apic_id" test and no size clamp: the guest-controlled cluster
            # (dest bits 31:16) indexes past the end of the map.
            return self.phys_map, (dest >> 16) * 16, dest & 0xFFFF
        result: tuple[list[LocalApic | None], int, int] | None = original(self, dest)
        return result

    p.set(ApicMap, "logical_dest", logical_dest)


def _bug10(p: _Patcher) -> None:
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


def _bug11(p: _Patcher) -> None:
    """Before 5bd5db385b3e: an xAPIC-mode vCPU is known only by its 8-bit xAPIC ID, both in
    the map (even with 32-bit IDs) and in ``kvm_apic_match_physical_addr``."""
    original = p.current(apic_map_mod, "_add_physical")

    def _add_physical(new: ApicMap, apic: LocalApic, x2apic_format: bool) -> bool:
        if x2apic_format and not apic.x2apic_mode:
            if new.phys_map[apic.physical_id] is None:
                new.phys_map[apic.physical_id] = apic
            return True
        result: bool = original(new, apic, x2apic_format)
        return result

    def match_physical(mda_value: int, target: Target, profile: Profile) -> bool:
        x2 = target.x2apic_mode
        if not x2 and not profile.xapic_matches_x2apic_id:
            mda_value &= 0xFF
        if destination_mod.is_broadcast(mda_value, x2):
            return True
        if x2:
            return mda_value == target.x2apic_id
        return mda_value == target.physical_id  # no "MDA > 0xFF: compare the x2APIC ID"

    p.set(apic_map_mod, "_add_physical", _add_physical)
    p.set(destination_mod, "match_physical", match_physical)


def _bug12(p: _Patcher) -> None:
    """Before 03d2249ea608/9ea369b032d8: the destination is compared as sent; an IOAPIC/MSI
    0xFF is no broadcast for x2APIC targets (no ``kvm_apic_mda`` rewrite)."""

    def mda(dest: int, target_x2apic: bool, *, is_ipi: bool, broadcast_quirk: bool) -> int:
        return dest

    p.set(destination_mod, "mda", mda)


def _add_logical_variant(
    *, alias_disables: bool, multi_bit_disables: bool
) -> Callable[[ApicMap, LocalApic], None]:
    """``kvm_recalculate_logical_map`` with one of the 2023 checks taken out."""

    def _add_logical(new: ApicMap, apic: LocalApic) -> None:
        if new.logical_mode == LogicalMode.MAP_DISABLED or not apic.sw_enabled:
            return
        ldr = apic.ldr
        if not ldr:
            return
        if apic.x2apic_mode:
            mode = LogicalMode.X2APIC
        else:
            ldr >>= 24
            mode = LogicalMode.XAPIC_FLAT if apic.dfr == DFR_FLAT else LogicalMode.XAPIC_CLUSTER
        if new.logical_mode == LogicalMode.SW_DISABLED:
            new.logical_mode = mode
        elif new.logical_mode != mode:
            new.logical_mode = LogicalMode.MAP_DISABLED
            return
        if mode == LogicalMode.X2APIC:
            return
        found = new.logical_dest(ldr)
        assert found is not None
        slots, _, mask = found
        if not mask:
            return
        index = (mask & -mask).bit_length() - 1
        if (multi_bit_disables and mask & (mask - 1)) or (
            alias_disables and slots[index] is not None
        ):
            new.logical_mode = LogicalMode.MAP_DISABLED
        else:
            slots[index] = apic  # cluster[ffs(mask) - 1] = apic

    return _add_logical


def _bug13(p: _Patcher) -> None:
    """Before 2970052481b9: a second vCPU with the same logical ID overwrites the slot."""
    p.set(
        apic_map_mod,
        "_add_logical",
        _add_logical_variant(alias_disables=False, multi_bit_disables=True),
    )


def _bug14(p: _Patcher) -> None:
    """Before 2bf934aadcac: an LDR with several bits is mapped at its lowest bit only."""
    p.set(
        apic_map_mod,
        "_add_logical",
        _add_logical_variant(alias_disables=True, multi_bit_disables=False),
    )


def _bug15(p: _Patcher) -> None:
    """Before 5b84b0291702: aliased physical IDs do not disable the map; the last vCPU with
    the ID takes the slot, so only it receives."""
    original = p.current(apic_map_mod, "_add_physical")

    def _add_physical(new: ApicMap, apic: LocalApic, x2apic_format: bool) -> bool:
        if x2apic_format:
            result: bool = original(new, apic, x2apic_format)
            return result
        physical_id = apic.vcpu_id if apic.x2apic_mode else apic.physical_id
        new.phys_map[physical_id] = apic
        return True

    p.set(apic_map_mod, "_add_physical", _add_physical)


def _bug16(p: _Patcher) -> None:
    """Before 4364b287982b: the map is sized, then filled, and a vCPU that appeared (or enabled
    its APIC) in between is not in the size.  The race is made deterministic: the sizing pass
    sees the vCPUs present at the previous recalculation.  Filling has no bounds check: without
    32-bit IDs the write lands past ``phys_map`` (IndexError); with them the vCPU is skipped."""
    sized: WeakKeyDictionary[Vm, int] = WeakKeyDictionary()

    def build(
        apics: Sequence[LocalApic], max_id: int, x2apic_format: bool
    ) -> tuple[ApicMap | None, int]:
        new: ApicMap | None = ApicMap(max_id)
        inhibits = 0
        for a in apics:
            if not a.hw_enabled:
                continue
            assert new is not None
            if not a.x2apic_mode and a.physical_id != (a.vcpu_id & 0xFF):
                inhibits |= Inhibits.APIC_ID_MODIFIED
            phys = new.phys_map
            x2apic_id = a.vcpu_id
            if x2apic_format:
                if (a.x2apic_mode or x2apic_id > 0xFF) and x2apic_id <= new.max_apic_id:
                    phys[x2apic_id] = a
                if not a.x2apic_mode and phys[a.physical_id] is None:
                    phys[a.physical_id] = a
            else:
                physical_id = x2apic_id if a.x2apic_mode else a.physical_id
                if _oob(phys, physical_id) is not None:
                    new = None
                    break
                phys[physical_id] = a
            apic_map_mod._add_logical(new, a)
        if new is None:
            inhibits |= Inhibits.PHYSICAL_ID_ALIASED | Inhibits.LOGICAL_ID_ALIASED
        elif new.logical_mode == LogicalMode.MAP_DISABLED:
            inhibits |= Inhibits.LOGICAL_ID_ALIASED
        return new, inhibits

    def apic_map(self: Vm) -> ApicMap | None:
        if self._map_dirty:
            present = max([255, *(a.vcpu_id for a in self._apics if a.hw_enabled)])
            max_id = sized.get(self, present)
            sized[self] = present
            self._map, self._map_inhibits = build(self._apics, max_id, self.x2apic_format)
            self._map_dirty = False
        return self._map

    p.set(Vm, "apic_map", property(apic_map, doc=_label(Vm) + ".apic_map (BUG-16 replay)"))


def _bug28(p: _Patcher) -> None:
    """``kvm_irq_delivery_to_apic_fast`` before "set meaningful return value": ``*r`` starts at
    -1 and only a non-NULL destination raises it to 0, so a message the map handled but that
    found no vCPU (e.g. a lowest-priority pick of an empty slot) reports -1."""
    original = p.current(delivery_mod, "deliver")

    def deliver(
        irq: Interrupt,
        source: LocalApic | None,
        apic_map: ApicMap | None,
        apics: Sequence[LocalApic],
        profile: Profile,
        broadcast_quirk: bool,
        policy: LowestPriorityPolicy,
        accept: AcceptFn,
        use_map: bool = True,
    ) -> tuple[int, bool]:
        if irq.shorthand is not Shorthand.SELF and use_map:
            targets = delivery_mod.map_destinations(
                irq,
                source,
                apic_map,
                broadcast_quirk,
                policy is LowestPriorityPolicy.VECTOR_HASHING,
            )
            if targets is not None:
                r = -1
                for apic in targets:
                    r = max(r, 0) + accept(apic, irq)
                return r, True
        result: tuple[int, bool] = original(
            irq, source, apic_map, apics, profile, broadcast_quirk, policy, accept, use_map
        )
        return result

    p.set(delivery_mod, "deliver", deliver)


# =============================================================================================
# The local APIC (BUG-9, 17..26, 29, 30)
# =============================================================================================
def _bug9(p: _Patcher) -> None:
    """``apic_get_tmcct`` before the CVE-2013-6367 fix: ``mod_64(remaining, period)`` with no
    ``period == 0`` test, reached when TMICT != 0 but nothing counts (reserved timer mode)."""

    def current_count(self: ApicTimer, tmict: int) -> int:
        if self.mode == TIMER_TSC_DEADLINE or tmict == 0:
            return 0
        remaining = 0 if self.target is None else max(self.target - self.clock.now, 0)
        ns = remaining % self.period
        tick = self.bus_cycle_ns * self.divide
        if remaining == self.period:
            return self.period // tick
        return ns // tick

    p.set(ApicTimer, "current_count", current_count)


def _bug17(p: _Patcher) -> None:
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
            image[0x20:0x24] = ((self.id_register << 24) & _U32).to_bytes(4, "little")
        return bytes(image)

    p.set(LocalApic, "set_state", set_state)
    p.set(LocalApic, "get_state", get_state)


def _bug18(p: _Patcher) -> None:
    """x2APIC ICR writes before 71bf395a276f: no must-be-zero bits (``X2APIC_ICR_RESERVED`` as
    ``lapic.apic`` sees it becomes 0, so WRMSR 0x830 never #GPs on bits 13, 16-17, 20-31)."""
    p.set(apic_mod, "X2APIC_ICR_RESERVED", 0)


def _bug19(p: _Patcher) -> None:
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
    check_int("msr", msr, 0, _U32)
    check_int("value", value, 0, (1 << 64) - 1)


def _bug20(p: _Patcher) -> None:
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


def _bug21(p: _Patcher) -> None:
    """x2APIC WRMSR before the bits-63:32 #GP: ``kvm_lapic_reg_write(apic, reg, (u32)data)``."""
    original = p.current(LocalApic, "wrmsr")

    def wrmsr(self: LocalApic, msr: int, value: int, host_initiated: bool = False) -> None:
        _check_wrmsr_args(msr, value)
        if 0x800 <= msr <= 0x8FF and msr != 0x830 and self.x2apic_mode:
            value &= _U32
        original(self, msr, value, host_initiated)

    p.set(LocalApic, "wrmsr", wrmsr)


def _bug22(p: _Patcher) -> None:
    """RDMSR 0x80E before the DFR was marked non-existent for x2APIC: it reads the DFR."""
    original = p.current(LocalApic, "rdmsr")

    def rdmsr(self: LocalApic, msr: int) -> int:
        if msr == 0x80E and self.x2apic_mode:
            return self.dfr
        result: int = original(self, msr)
        return result

    p.set(LocalApic, "rdmsr", rdmsr)


def _bug23(p: _Patcher) -> None:
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


def _bug24(p: _Patcher) -> None:
    """``kvm_apic_local_deliver`` before a16eb25b09c0: LVTPC stays unmasked after a PMI."""

    def _local_deliver(self: LocalApic, offset: int) -> bool:
        value = int(self._w[offset >> 2])
        if not self.apic_base & APIC_BASE_EN or value & LVT_MASKED:
            return False
        return self._accept(value & 0xFF, (value >> 8) & 7, 1 if value & LVT_LEVEL else 0, True)

    p.set(LocalApic, "_local_deliver", _local_deliver)


def _bug25(p: _Patcher) -> None:
    """``kvm_apic_set_version`` before 0bcc3fb95b97: LVR bit 24 whenever the guest CPUID has
    x2APIC, even with the in-kernel IOAPIC (which has no EOI register)."""

    def _set_version(self: LocalApic) -> None:
        lvr = KVM_APIC_VERSION | ((self.lvt_count - 1) << 16)
        if self.features.x2apic:
            lvr |= LVR_DIRECTED_EOI
        self._w[0x30 >> 2] = lvr

    p.set(LocalApic, "_set_version", _set_version)


def _eoi_report(self: LocalApic, vector: int, *, honour_suppression: bool) -> None:
    hook = self.eoi_hook
    if hook is not None:
        level = vector in self._tmr
        suppressed = (
            honour_suppression
            and level
            and self.profile.honor_suppress_eoi_broadcast
            and bool(self._w[0xF0 >> 2] & SVR_SUPPRESS_EOI_BROADCAST)
        )
        hook(self, vector, level, suppressed)


def _bug26(p: _Patcher) -> None:
    """``kvm_ioapic_send_eoi`` before the Suppress-EOI-Broadcast fix: SVR bit 12 is ignored,
    every level EOI is broadcast, even under ``honor_suppress_eoi_broadcast=True``."""

    def eoi(self: LocalApic) -> int | None:
        v = self._isr.highest()
        if v < 0:
            return None
        self._isr.discard(v)
        self._update_ppr_and_notify()
        _eoi_report(self, v, honour_suppression=False)
        return v

    p.set(LocalApic, "eoi", eoi)


def _bug29(p: _Patcher) -> None:
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
        _eoi_report(self, v, honour_suppression=True)
        return v

    p.set(LocalApic, "ack", ack)
    p.set(LocalApic, "eoi", eoi)


def _bug30(p: _Patcher) -> None:
    """``kvm_set_apic_base`` before 58d269d8cccc: bit 8 (BSP) counted as reserved (0x3FF), so
    any write that changes APIC_BASE with BSP set #GPs."""
    original = p.current(LocalApic, "set_apic_base")

    def set_apic_base(self: LocalApic, value: int, *, host_initiated: bool = False) -> None:
        check_int("value", value, 0, (1 << 64) - 1)
        if value != self.apic_base and value & APIC_BASE_BSP:
            raise gp(f"IA32_APIC_BASE {value:#x}: reserved bits {APIC_BASE_BSP:#x}")
        original(self, value, host_initiated=host_initiated)

    p.set(LocalApic, "set_apic_base", set_apic_base)


# =============================================================================================
# The registry
# =============================================================================================
def _r(
    bug: str,
    commit: str,
    title: str,
    what: str,
    rules: tuple[str, ...],
    install: Callable[[_Patcher], None] | None,
    reason: str = "",
) -> Replay:
    return Replay(bug, commit, title, what, rules, _applier(install) if install else None, reason)


REPLAYS: tuple[Replay, ...] = (
    _r(
        "BUG-1",
        "4180bf1b655a",
        'KVM: X86: Implement "send IPI" hypercall',
        "origin of KVM_HC_SEND_IPI",
        ("PVH-0", "PVH-1"),
        None,
        reason="introduces the feature: before it there was no hypercall, not a wrong one",
    ),
    _r(
        "BUG-2",
        "bdf7ffc89922",
        "KVM: LAPIC: Fix pv ipis out-of-bounds access",
        "guest-controlled min (a signed int) indexes phys_map with no bound: every set bit "
        "reads phys_map[min + i]",
        ("PVH-5", "PVH-6", "PVH-7", "PVH-2"),
        _bug2,
    ),
    _r(
        "BUG-3",
        "",
        "KVM: LAPIC: Fix pv ipis use-before-initialization (CVE-2018-19406)",
        "SEND_IPI dereferences a NULL map instead of returning -EOPNOTSUPP",
        ("PVH-12", "MAP-2"),
        _bug3,
    ),
    _r(
        "BUG-4",
        "",
        "KVM: x86: Fix PV IPIs for 32-bit KVM host",
        "KVM_HC_SEND_IPI answers -KVM_ENOSYS to a hypercall made outside 64-bit mode",
        ("PVH-8", "PVH-0"),
        _bug4,
    ),
    _r(
        "BUG-5",
        "",
        "KVM: x86: WARN_ONCE if sending a PV IPI returns a fatal error",
        "the guest encoder drops the hypercall's result: errors are never reported",
        ("PVG-4",),
        _bug5,
    ),
    _r(
        "BUG-6",
        "c87bd4dd43a6",
        "KVM: x86: use array_index_nospec with indices that come from guest",
        "Spectre-v1 hardening",
        ("PVH-6", "PVH-7"),
        None,
        reason="Spectre-v1 hardening only: no architectural change to put back",
    ),
    _r(
        "BUG-7",
        "",
        "kvm: x86: only provide PV features if enabled in guest's CPUID",
        "PV hypercalls are served even with enforcement on and the CPUID bit off",
        ("HC-1",),
        _bug7,
    ),
    _r(
        "BUG-8",
        "",
        "KVM: x86: fix guest-initiated crash with x2apic (CVE-2013-6376)",
        "the x2APIC logical cluster (dest bits 31:16) is not bounded by max_apic_id: the "
        "lookup runs past phys_map",
        ("FAST-6",),
        _bug8,
    ),
    _r(
        "BUG-9",
        "",
        "KVM: x86: Fix potential divide by 0 in lapic (CVE-2013-6367)",
        "TMCCT computes remaining % period with period 0 when TMICT != 0",
        ("REG-TMR-1",),
        _bug9,
    ),
    _r(
        "BUG-10",
        "",
        "KVM: x86: Fix APIC map calculation after re-enabling",
        "APIC_BASE EN 0->1 recalculates the map before storing the new value: the re-enabled "
        "APIC stays out of the map",
        ("MAP-1", "BASE-6"),
        _bug10,
    ),
    _r(
        "BUG-11",
        "5bd5db385b3e",
        "KVM: x86: allow hotplug of VCPU with APIC ID over 0xff",
        "no hotplug hack: an xAPIC-mode vCPU is matched and mapped only by its 8-bit ID",
        ("MATCH-4", "MAP-3", "FAST-9", "DIFF-D7"),
        _bug11,
    ),
    _r(
        "BUG-12",
        "03d2249ea608",
        "KVM: x86: use MDA for interrupt matching / fix mixed APIC mode broadcast (9ea369b032d8)",
        "no MDA rewrite: an IOAPIC/MSI message to 0xFF is not a broadcast to x2APIC targets",
        ("MATCH-1", "MATCH-3", "DIFF-D9", "FAST-4"),
        _bug12,
    ),
    _r(
        "BUG-13",
        "2970052481b9",
        "KVM: x86: Disable APIC logical map if vCPUs are aliased in logical mode",
        "a second vCPU with the same logical ID overwrites the first one's map slot",
        ("MAP-4",),
        _bug13,
    ),
    _r(
        "BUG-14",
        "2bf934aadcac",
        "KVM: x86: Disable APIC logical map if logical ID covers multiple MDAs",
        "an LDR with several bits is mapped at its lowest bit only",
        ("MAP-4",),
        _bug14,
    ),
    _r(
        "BUG-15",
        "5b84b0291702",
        "KVM: x86: Honor architectural behavior for aliased 8-bit APIC IDs",
        "aliased physical xAPIC IDs keep the map; the last vCPU takes the slot",
        ("MAP-2", "DIFF-D8"),
        _bug15,
    ),
    _r(
        "BUG-16",
        "4364b287982b",
        "KVM: x86: Bail from kvm_recalculate_phys_map() if x2APIC ID is out-of-bounds",
        "the map is sized from the vCPUs of the previous recalculation and filled without a "
        "bound: a vCPU added later is written past phys_map (or skipped with 32-bit IDs)",
        ("MAP-1",),
        _bug16,
    ),
    _r(
        "BUG-17",
        "4b7c3f6d04bd",
        "KVM: x86: Make x2APIC ID 100% readonly",
        "KVM_SET_LAPIC on an x2APIC vCPU takes the ID (>> 24) and LDR from the image",
        ("STATE-3",),
        _bug17,
    ),
    _r(
        "BUG-18",
        "71bf395a276f",
        "KVM: x86: Enforce x2APIC's must-be-zero reserved ICR bits",
        "WRMSR 0x830 accepts the reserved ICR bits 0xFFF32000",
        ("ICR-3",),
        _bug18,
    ),
    _r(
        "BUG-19",
        "73b42dc69be8",
        "KVM: x86: Re-split x2APIC ICR into ICR+ICR2 for AMD (x2AVIC)",
        "the state image keeps the x2APIC ICR as one 64-bit value: 0x310 does not carry the "
        "destination and SET does not read it",
        ("STATE-3", "STATE-1"),
        _bug19,
    ),
    _r(
        "BUG-20",
        "",
        "KVM: x86: Inject #GP if WRMSR sets reserved bits in APIC Self-IPI",
        "WRMSR 0x83F with bits 31:8 set sends vector val & 0xFF instead of #GP",
        ("ICR-5",),
        _bug20,
    ),
    _r(
        "BUG-21",
        "",
        "KVM: x86: Inject #GP on x2APIC WRMSR that sets reserved bits 63:32",
        "x2APIC WRMSR (except ICR) truncates the value to 32 bits instead of #GP",
        ("MSR-3",),
        _bug21,
    ),
    _r(
        "BUG-22",
        "",
        "KVM: x86: Mark x2APIC DFR reg as non-existent for x2APIC",
        "RDMSR 0x80E in x2APIC mode returns the DFR instead of #GP",
        ("MSR-4",),
        _bug22,
    ),
    _r(
        "BUG-23",
        "",
        "KVM: x86: Reinitialize xAPIC ID when userspace forces x2APIC => xAPIC",
        "a host x2APIC -> xAPIC write leaves the ID register in x2APIC format",
        ("BASE-6", "BASE-5"),
        _bug23,
    ),
    _r(
        "BUG-24",
        "a16eb25b09c0",
        "KVM: x86: Mask LVTPC when handling a PMI",
        "a PMI delivered through LVTPC leaves it unmasked",
        ("REG-LVT-2",),
        _bug24,
    ),
    _r(
        "BUG-25",
        "0bcc3fb95b97",
        "KVM: lapic: stop advertising DIRECTED_EOI when in-kernel IOAPIC is in use",
        "LVR bit 24 is set whenever CPUID has x2APIC, whatever the irqchip",
        ("REG-LVR-1",),
        _bug25,
    ),
    _r(
        "BUG-26",
        "",
        "KVM: x86: Suppress EOI broadcasts when SVR bit 12 is set (Fixes: 7543a635aa09)",
        "a level EOI with SVR bit 12 set is broadcast even with honor_suppress_eoi_broadcast=True",
        ("DEOI-2", "DIFF-D17"),
        _bug26,
    ),
    _r(
        "BUG-27",
        "520040146a0a",
        "KVM: x86: Use vector-hashing to deliver lowest-priority interrupts",
        "introduces vector hashing",
        ("LP-2", "LP-3"),
        None,
        reason="introduces vector hashing; the behaviour before it is the arbitration "
        "counter, which the model keeps as vector_hashing=False (LP-3)",
    ),
    _r(
        "BUG-28",
        "",
        "kvm/x86 : set meaningful return value",
        "the fast path reports -1 when the map handled a message but found no vCPU",
        ("FAST-8", "LP-2"),
        _bug28,
    ),
    _r(
        "BUG-29",
        "",
        'KVM: x86: Purge "highest ISR" cache when updating APICv state',
        "EOI trusts a highest-ISR cache that a state restore leaves stale",
        ("PRIO-5",),
        _bug29,
    ),
    _r(
        "BUG-30",
        "58d269d8cccc",
        "KVM: x86: BSP in MSR_IA32_APICBASE is writable",
        "APIC_BASE bit 8 (BSP) is reserved: a changing write with it set #GPs",
        ("BASE-2",),
        _bug30,
    ),
)


def _fid1(p: _Patcher) -> None:
    """The model before issue 8: a host CR8 write (KVM_SET_SREGS) keeps TPR bits 3:0."""

    def set_cr8(self: LocalApic, cr8: int) -> None:
        if cr8 & ~0xF:
            return
        self._write_tpr((cr8 & 0xF) << 4 | self.tpr & 0xF, False)

    p.set(RegisterMixin, "set_cr8", set_cr8)


MODEL_REPLAYS: tuple[Replay, ...] = (
    _r(
        "FID-1",
        "",
        "the model's own old behaviour, not a KVM bug: TPR bits 3:0 kept by KVM_SET_SREGS",
        "a host CR8 write keeps TPR bits 3:0 (KVM's kvm_set_cr8 clears them: TPR 0x2F -> "
        "KVM_GET_SREGS/KVM_SET_SREGS -> 0x20); the default differential run finds it",
        ("REG-TPR-1", "KVMB-10"),
        _fid1,
    ),
)
"""Switches that put back an old behaviour of the model itself (the disagreements the
differential suite must find), by the same mechanism as the bug replays."""

BY_ID: Mapping[str, Replay] = {r.id: r for r in (*REPLAYS, *MODEL_REPLAYS)}


# =============================================================================================
# Lookup and activation
# =============================================================================================
def normalize(bug: str) -> str:
    """``bug_13`` / ``bug-13`` / `` BUG-13 `` -> ``BUG-13``."""
    return bug.strip().upper().replace("_", "-")


def get(bug: str) -> Replay:
    replay = BY_ID.get(normalize(bug))
    if replay is None:
        raise ReplayError(f"unknown bug replay {bug!r}; known: {', '.join(BY_ID)}")
    return replay


def parse_ids(text: str) -> list[str]:
    """``"BUG-13, BUG-14"`` -> ``["BUG-13", "BUG-14"]`` (validated, duplicates dropped)."""
    ids: list[str] = []
    for part in text.split(","):
        if part.strip():
            bug = get(part).id
            if bug not in ids:
                ids.append(bug)
    return ids


@contextmanager
def active(ids: Iterable[str]) -> Iterator[list[Replay]]:
    """Activate the named replays (in order) for the duration of the ``with`` block."""
    replays = [get(bug) for bug in ids]
    for replay in replays:
        if replay.apply is None:
            raise ReplayError(f"{replay.id} is not replayable: {replay.reason}")
    with ExitStack() as stack:
        for replay in replays:
            assert replay.apply is not None
            stack.enter_context(replay.apply())
        yield replays


def from_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """The replay ids named by ``APICSIM_REPLAY`` (validated; empty when unset)."""
    env = os.environ if environ is None else environ
    return parse_ids(env.get(ENV_VAR, ""))


__all__ = [
    "BY_ID",
    "ENV_VAR",
    "MODEL_REPLAYS",
    "REPLAYS",
    "Replay",
    "ReplayError",
    "active",
    "from_environment",
    "get",
    "normalize",
    "parse_ids",
]
