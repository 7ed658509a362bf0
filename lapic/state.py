"""The state of one local APIC as data: KVM's state image, snapshots, copies (a mixin).

Implements:

* ``get_state``/``set_state``: the 1 KiB ``struct kvm_lapic_state`` (reference
  ``kvm_lapic.md`` §14; KVM ``kvm_apic_get_state``, ``kvm_apic_set_state``,
  ``kvm_apic_state_fixup``) with the x2APIC ID/LDR fix-ups, the ICR split of
  ``LocalApic.icr_split`` (KVM ``x2apic_icr_is_split``), TMCCT and the stale PPR (STATE-4);
* ``snapshot``/``restore``: everything the APIC simulates as one immutable, hashable
  :class:`ApicSnapshot` (the whole register page, IA32_APIC_BASE, the pending events, the
  timer and the clock's time, and the internal latches: the ESR bits waiting for the next ESR
  write, the MMIO read buffer, ``highest_isr_cache``, ``arb_prio``, the bytes ``set_state``
  kept aside), with :meth:`ApicSnapshot.diff` listing what differs by register name;
* ``copy.deepcopy``/``pickle``: ``__getstate__``/``__setstate__`` leave the views over the
  register page (the ``memoryview`` and the IRR/ISR/TMR bitarrays), the per-register write
  handlers (closures) and the bound ops out of the pickled state and rebuild them.  The hooks
  and the ops object are pickled as they are: a bound method of a picklable object (e.g. a
  ``hypervisor.Vm``) survives, a lambda or a local function does not (``pickle`` raises; that
  is the caller's to avoid).  ``copy.deepcopy`` copies what bound hooks are bound to as well;
  it shares plain functions and lambdas (Python copies functions by reference).

Not modelled: configuration (``vcpu_id``, profile, features, ``icr_split``, hooks, ops) is
not part of a snapshot; ``restore`` requires the same ``vcpu_id`` and leaves wiring alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lapic import destination
from lapic.core import ApicCore
from lapic.events import PendingEventsState
from lapic.faults import ApicTypeError, ApicValueError
from lapic.ops import ApicEvent
from lapic.registers import (
    APIC_PAGE_SIZE,
    IRR_BASE,
    ISR_BASE,
    REGISTER_BY_OFFSET,
    STATE_SIZE,
    TMR_BASE,
    XAPIC_ID,
)

GAPS = tuple(
    (base + 0x10 * n + 4, base + 0x10 * n + 16)
    for base in (ISR_BASE, TMR_BASE, IRR_BASE)
    for n in range(8)
)
"""Byte ranges between the vector words of ISR/TMR/IRR (kept aside by ``set_state``)."""

_VIEWS = (
    "_w",
    "_q",
    "_irr",
    "_isr",
    "_tmr",
    "_irr_bits",
    "_tmr_bits",
    "_writers",
    "_op_set_intr_ready",
    "_op_pending_intr",
    "_op_intr_accepted",
    "_op_eoi",
    "_op_send",
    "_op_raise_event",
    "_op_map_changed",
    "_op_eoi_reported",
)
"""Attributes rebuilt on unpickling instead of pickled."""

_XAPIC_ID = XAPIC_ID["id"]
_PPR = REGISTER_BY_OFFSET[0xA0].offset >> 2
_TMICT = REGISTER_BY_OFFSET[0x380].offset >> 2
_TMCCT = REGISTER_BY_OFFSET[0x390].offset >> 2
_TDCR = REGISTER_BY_OFFSET[0x3E0].offset >> 2


class StateError(ApicValueError):
    """KVM_SET_LAPIC refused the image; ``errno`` is KVM's (22 = EINVAL)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(f"state: {message} (errno {errno})")
        self.errno = errno


@dataclass(frozen=True, slots=True)
class TimerState:
    """``lapic.timer.ApicTimer``'s fields (the count registers live in the page)."""

    mode: int
    divide: int
    period: int
    target: int | None
    deadline: int
    expirations: int


@dataclass(frozen=True, slots=True)
class ApicSnapshot:
    """Everything one ``LocalApic`` simulates, immutable and hashable.

    ``LocalApic.snapshot()`` makes one, ``LocalApic.restore(snap)`` makes an APIC equal to it;
    equal snapshots mean equal APIC states.  :meth:`diff` says what differs.
    """

    vcpu_id: int
    page: bytes
    """The 4 KiB register page (IRR/ISR/TMR included; TMCCT as stored, i.e. 0)."""
    apic_base: int
    events: PendingEventsState
    timer: TimerState
    clock_now: int
    """The virtual time of the APIC's clock (timer targets are absolute times on it)."""
    esr_pending: int
    """ESR bits latched for the next ESR write (SDM 10.5.3)."""
    mmio_data: int
    """The MMIO read buffer (KVMB-4)."""
    isr_cache: int
    """KVM ``highest_isr_cache`` (-1: none)."""
    arb_prio: int
    gap_bytes: bytes
    """The bytes of the last ``set_state`` image between the vector words of ISR/TMR/IRR."""

    def diff(self, other: ApicSnapshot) -> list[str]:
        """What differs from ``self`` to ``other``, one readable line each: page dwords by
        register name (``"TPR: 0x00000000 -> 0x00000020"``), other fields by name."""
        if not isinstance(other, ApicSnapshot):
            raise ApicTypeError(f"other must be an ApicSnapshot, not {type(other).__name__}")
        lines: list[str] = []
        a, b = self.page, other.page
        if a != b:
            for off in range(0, APIC_PAGE_SIZE, 4):
                old = int.from_bytes(a[off : off + 4], "little")
                new = int.from_bytes(b[off : off + 4], "little")
                if old != new:
                    lines.append(f"{_dword_name(off)}: {old:#010x} -> {new:#010x}")
        for f in fields(self):
            name = f.name
            if name == "page":
                continue
            old_v, new_v = getattr(self, name), getattr(other, name)
            if old_v == new_v:
                continue
            if isinstance(old_v, (PendingEventsState, TimerState)):
                for g in fields(old_v):
                    x, y = getattr(old_v, g.name), getattr(new_v, g.name)
                    if x != y:
                        lines.append(f"{name}.{g.name}: {_fmt(x)} -> {_fmt(y)}")
            else:
                lines.append(f"{name}: {_fmt(old_v)} -> {_fmt(new_v)}")
        return lines


def _fmt(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return f"{value:#x}"
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


def _dword_name(off: int) -> str:
    reg = REGISTER_BY_OFFSET.get(off & ~0xF)
    if reg is None:
        return f"page[{off:#05x}]"
    if off & 0xF == 0:
        return reg.name
    if reg.name == "ICR" and off & 0xF == 4:
        return "ICR[63:32]"
    return f"{reg.name}+{off & 0xF:#x}"


class StateMixin(ApicCore):
    """State image, snapshot/restore and pickling (see the module documentation)."""

    def get_state(self, *, x2apic_format: bool = False) -> bytes:
        """The 1 KiB ``struct kvm_lapic_state`` (KVM ``kvm_apic_get_state``)."""
        self.timer.poll()
        s = bytearray(self.regs[:STATE_SIZE])
        for (start, end), k in zip(GAPS, range(0, len(self._gap_bytes), 12), strict=True):
            s[start:end] = self._gap_bytes[k : k + 12]
        tmcct = self.timer.current_count(int(self._w[_TMICT]))
        s[0x390:0x394] = tmcct.to_bytes(4, "little")
        if self.x2apic_mode:
            if not x2apic_format:
                s[0x20:0x24] = _XAPIC_ID.place(self.vcpu_id & 0xFF).to_bytes(4, "little")
            if not self.icr_split:
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
            if not self.icr_split:
                s[0x304:0x308] = s[0x310:0x314]
        gaps = bytearray()
        for start, end in GAPS:
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
            self._w[_PPR] = self._ppr_for(isrv)
        else:
            self._update_ppr()
        self._isr_cache = -1
        self.timer.cancel()
        self._timer_mode_changed()
        w = self._w
        self.timer.set_divide(int(w[_TDCR]), int(w[_TMICT]))
        self.timer.restore(int(w[_TMICT]), int(w[_TMCCT]))
        w[_TMCCT] = 0
        self.arb_prio = 0
        self.timer.poll()
        if (
            (self._op_raise_event is not None or self.notify_hook is not None)
            and self.hw_enabled
            and self._deliverable(self._ppr_for(self._isr.highest())) >= 0
        ):
            # KVM_REQ_EVENT; PPR itself is recomputed at the next use
            self._raise_event(ApicEvent.INTERRUPT)

    # ===================================================================================
    # Snapshots and copies
    # ===================================================================================
    def snapshot(self) -> ApicSnapshot:
        """Everything this APIC simulates, as an immutable, hashable value."""
        t = self.timer
        return ApicSnapshot(
            vcpu_id=self.vcpu_id,
            page=bytes(self.regs),
            apic_base=self.apic_base,
            events=self.events.frozen(),
            timer=TimerState(t.mode, t.divide, t.period, t.target, t.deadline, t.expirations),
            clock_now=self.clock.now,
            esr_pending=self._esr_pending,
            mmio_data=self._mmio_data,
            isr_cache=self._isr_cache,
            arb_prio=self.arb_prio,
            gap_bytes=self._gap_bytes,
        )

    def restore(self, snap: ApicSnapshot) -> None:
        """Make this APIC equal to ``snap`` (taken from this APIC or a copy of it).

        Also sets the clock's time to ``snap.clock_now``: the clock may be shared (a
        ``hypervisor.Vm``'s), so restore every APIC on it from snapshots of one instant.
        Hooks and ops stay as they are; ``map_changed`` runs (the IDs may differ), no event
        is raised (a restored vCPU's pending state is restored with it, not newly raised).
        """
        if not isinstance(snap, ApicSnapshot):
            raise ApicTypeError(f"snap must be an ApicSnapshot, not {type(snap).__name__}")
        if snap.vcpu_id != self.vcpu_id:
            raise ApicValueError(
                f"snap.vcpu_id={snap.vcpu_id} differs from this APIC's vcpu_id={self.vcpu_id}"
            )
        self.regs[:] = snap.page
        self.apic_base = snap.apic_base
        self.events.load(snap.events)
        t, s = self.timer, snap.timer
        t.mode, t.divide, t.period = s.mode, s.divide, s.period
        t.target, t.deadline, t.expirations = s.target, s.deadline, s.expirations
        self.clock.now = snap.clock_now
        self._esr_pending = snap.esr_pending
        self._mmio_data = snap.mmio_data
        self._isr_cache = snap.isr_cache
        self.arb_prio = snap.arb_prio
        self._gap_bytes = snap.gap_bytes
        self._map_changed()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in _VIEWS:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build_views()
        self._build_writers()
        self.bind_ops(self.ops)
