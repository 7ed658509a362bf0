"""What every part of ``LocalApic`` shares: its attributes, identity enums and mode bits.

``LocalApic`` (``lapic.apic``) is assembled from mixins along the seams of KVM's ``lapic.c``:
register reads and writes (``lapic.writers``), priorities, acknowledge and EOI
(``lapic.priority``), the state image and snapshots (``lapic.state``), and the access paths,
acceptance and sending in ``lapic.apic`` itself.  :class:`ApicCore` declares the instance
attributes they all use (created by ``LocalApic.__init__``) and the few methods one mixin calls
in another, so each module type-checks alone; it also holds the mode predicates (IA32_APIC_BASE
EN/EXTD, SVR enable: SDM Vol. 3 10.4.3, 10.12.1) and the two notification paths every part
uses (``raise_event`` and ``map_changed`` of :mod:`lapic.ops`).

Not modelled here: any register semantics (see the mixins).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from bitarray import bitarray

from lapic.events import PendingEvents
from lapic.ops import ApicEvent, ApicOps
from lapic.profile import Profile
from lapic.registers import APIC_BASE_EN, APIC_BASE_EXTD, REGISTER_BY_NAME, SVR_ENABLE, Register
from lapic.timer import ApicTimer, Clock
from lapic.vectors import VectorBitmap

if TYPE_CHECKING:
    from lapic.apic import LocalApic
    from lapic.icr import Interrupt

SendHook = Callable[["LocalApic", "Interrupt"], object]
EoiHook = Callable[["LocalApic", int, bool, bool], None]
ApicHook = Callable[["LocalApic"], None]

_SVR = REGISTER_BY_NAME["SVR"].offset >> 2


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


class ApicCore:
    """Attributes and shared helpers of :class:`lapic.apic.LocalApic` (not used alone)."""

    vcpu_id: int
    profile: Profile
    bsp: bool
    features: Features
    clock: Clock
    icr_split: bool
    regs: bytearray
    _w: memoryview
    _q: memoryview
    _irr: VectorBitmap
    _isr: VectorBitmap
    _tmr: VectorBitmap
    _irr_bits: bitarray
    _tmr_bits: bitarray
    _gap_bytes: bytes
    apic_base: int
    arb_prio: int
    events: PendingEvents
    _esr_pending: int
    _in_error: bool
    _mmio_data: int
    _isr_cache: int
    _sender_checks: bool
    lvt_count: int
    _timer_mode_mask: int
    timer: ApicTimer
    _writers: dict[str, Callable[[int, bool], None]]
    send_hook: SendHook | None
    eoi_hook: EoiHook | None
    notify_hook: ApicHook | None
    map_hook: ApicHook | None
    ops: ApicOps
    # Bound at bind_ops: None = the default operation, run inline.
    _op_set_intr_ready: Callable[[LocalApic, int, bool], bool] | None
    _op_pending_intr: Callable[[LocalApic], int] | None
    _op_intr_accepted: Callable[[LocalApic, int], None] | None
    _op_eoi: Callable[[LocalApic], int] | None
    _op_send: Callable[[LocalApic, Interrupt], None] | None
    _op_raise_event: Callable[[LocalApic, ApicEvent], None] | None
    _op_map_changed: Callable[[LocalApic], None] | None
    _op_eoi_reported: Callable[[LocalApic, int, bool, bool], None] | None

    # Methods one mixin calls in another (defined in lapic.apic / lapic.priority / ...).
    eoi: Callable[[], int | None]
    _send: Callable[[int, int], None]
    _set_xapic_id: Callable[[int], None]
    _set_version: Callable[[], None]
    _log_error: Callable[[int], None]
    _update_ppr: Callable[[], int]
    _update_ppr_and_notify: Callable[[], None]
    _apr: Callable[[], int]
    _ppr_for: Callable[[int], int]
    _deliverable: Callable[[int], int]
    _set_svr: Callable[[int], None]
    _timer_mode_changed: Callable[[], None]
    _build_views: Callable[[], None]
    _build_writers: Callable[[], None]
    bind_ops: Callable[[ApicOps | None], None]
    _present: Callable[[Register], bool]

    # ===================================================================================
    # Mode and enable bits
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
        return bool(self._w[_SVR] & SVR_ENABLE)

    @property
    def enabled(self) -> bool:
        """Hardware- and software-enabled (KVM ``apic_enabled``)."""
        return bool(self.apic_base & APIC_BASE_EN) and bool(self._w[_SVR] & SVR_ENABLE)

    # ===================================================================================
    # Notifications (lapic.ops)
    # ===================================================================================
    def _raise_event(self, event: ApicEvent) -> None:
        """Tell the vCPU something became pending (``ApicOps.raise_event``)."""
        op = self._op_raise_event
        if op is None:
            hook = self.notify_hook
            if hook is not None:
                hook(self)  # type: ignore[arg-type]
        else:
            op(self, event)  # type: ignore[arg-type]

    def _map_changed(self) -> None:
        """Destination matching inputs changed (``ApicOps.map_changed``)."""
        op = self._op_map_changed
        if op is None:
            hook = self.map_hook
            if hook is not None:
                hook(self)  # type: ignore[arg-type]
        else:
            op(self)  # type: ignore[arg-type]
