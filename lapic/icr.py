"""Interrupt messages as values: the ICR, MSI messages, and the decoded interrupt.

Implements:
* the ICR layout (SDM Vol. 3 "Interrupt Command Register", Figure 10-12 xAPIC and Figure 10-28
  x2APIC; reference ``kvm_lapic.md`` §1.2): vector 7:0, delivery mode 10:8, destination mode 11,
  delivery status 12, level 14, trigger 15, shorthand 19:18; destination in ICR2[31:24] (xAPIC)
  or ICR[63:32] (x2APIC);
* the MSI address/data layout (SDM "Message Signalled Interrupts"; KVM ``kvm_msi_to_lapic_irq``
  and ``x86_msi_msg_get_destid``): destination in address bits 19:12, destination mode bit 2,
  redirection hint bit 3, vector data 7:0, delivery mode data 10:8, level data 14, trigger data 15;
  with KVM's 32-bit-ID extension (``x2apic_format``) destination bits 31:8 in address_hi 31:8;
* :class:`Interrupt`, the decoded message every delivery stage works on (KVM ``struct
  kvm_lapic_irq``).

Not modelled: the Intel remappable MSI format (interrupt remapping) and the "extended
destination ID" of address_lo bits 11:5 (a guest-side paravirt feature).

Enum reprs are valid Python (``DeliveryMode.FIXED``), so a decoded message pastes into a test.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from lapic.faults import ApicTypeError, ApicValueError, check_int


class _ReprEnum(IntEnum):
    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    __str__ = __repr__


class DeliveryMode(_ReprEnum):
    """ICR bits 10:8 (value shown shifted down; ``<< 8`` gives the register bits)."""

    FIXED = 0
    LOWEST = 1
    SMI = 2
    REMOTE_READ = 3
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


class DestMode(_ReprEnum):
    PHYSICAL = 0
    LOGICAL = 1


class Level(_ReprEnum):
    DEASSERT = 0
    ASSERT = 1


class Trigger(_ReprEnum):
    EDGE = 0
    LEVEL = 1


class Shorthand(_ReprEnum):
    """ICR bits 19:18."""

    NONE = 0
    SELF = 1
    ALL_INCLUDING_SELF = 2
    ALL_EXCLUDING_SELF = 3


# Raw field masks (reference §1.2).
VECTOR_MASK = 0xFF
DELIVERY_MODE_MASK = 0x700
DEST_LOGICAL = 0x800
DELIVERY_STATUS = 0x1000
LEVEL_ASSERT = 0x4000
TRIGGER_LEVEL = 0x8000
SHORTHAND_MASK = 0xC0000
X2APIC_ICR_RESERVED = 0xFFF32000
"""``GENMASK(31,20) | GENMASK(17,16) | BIT(13)``: must be zero in an x2APIC ICR write."""
ICR_FIELDS_MASK = VECTOR_MASK | DELIVERY_MODE_MASK | DEST_LOGICAL | LEVEL_ASSERT | TRIGGER_LEVEL | (
    SHORTHAND_MASK
)
XAPIC_BROADCAST = 0xFF
X2APIC_BROADCAST = 0xFFFFFFFF


class Interrupt(NamedTuple):
    """A decoded interrupt message (KVM ``struct kvm_lapic_irq``).

    ``dest`` is the raw destination: 8 bits from an xAPIC ICR, 32 bits from an x2APIC ICR or
    a 32-bit-ID MSI.  ``redir_hint`` is the MSI redirection hint; it makes a message
    lowest-priority in KVM (``kvm_lowest_prio_delivery``).
    """

    vector: int
    delivery_mode: DeliveryMode = DeliveryMode.FIXED
    dest_mode: DestMode = DestMode.PHYSICAL
    level: Level = Level.ASSERT
    trigger: Trigger = Trigger.EDGE
    shorthand: Shorthand = Shorthand.NONE
    dest: int = 0
    redir_hint: bool = False

    @property
    def lowest_priority(self) -> bool:
        return self.delivery_mode is DeliveryMode.LOWEST or self.redir_hint


class Icr(NamedTuple):
    """The fields of an ICR write.  ``Icr.decode(value, x2apic=...)`` / ``icr.encode(...)``.

    ``value`` is the 64-bit view: low dword = ICR, high dword = ICR2 (xAPIC: destination in bits
    63:56) or the 32-bit destination (x2APIC).  Encoding writes the fields only: delivery status
    and reserved bits are zero, so ``decode(encode(x)) == x`` and
    ``encode(decode(v)) == v & fields`` (tested).
    """

    vector: int
    delivery_mode: DeliveryMode = DeliveryMode.FIXED
    dest_mode: DestMode = DestMode.PHYSICAL
    level: Level = Level.ASSERT
    trigger: Trigger = Trigger.EDGE
    shorthand: Shorthand = Shorthand.NONE
    dest: int = 0

    @classmethod
    def decode(cls, value: int, *, x2apic: bool) -> Icr:
        """KVM ``kvm_icr_to_lapic_irq`` (reference ICR-4); bits 16-17 and 12-13 are ignored."""
        check_int("value", value, 0, (1 << 64) - 1)
        low = value & 0xFFFFFFFF
        high = value >> 32
        return cls(
            low & VECTOR_MASK,
            _DM[(low >> 8) & 7],
            _DST[(low >> 11) & 1],
            _LVL[(low >> 14) & 1],
            _TRG[(low >> 15) & 1],
            _SH[(low >> 18) & 3],
            high if x2apic else (high >> 24) & 0xFF,
        )

    def encode(self, *, x2apic: bool) -> int:
        _validate(self, 0xFFFFFFFF if x2apic else 0xFF)
        low = (
            self.vector
            | (int(self.delivery_mode) << 8)
            | (int(self.dest_mode) << 11)
            | (int(self.level) << 14)
            | (int(self.trigger) << 15)
            | (int(self.shorthand) << 18)
        )
        high = self.dest if x2apic else self.dest << 24
        return (high << 32) | low

    def to_interrupt(self) -> Interrupt:
        return Interrupt(*self)


class Msi(NamedTuple):
    """An MSI as written by a device or by KVM_SIGNAL_MSI: address (lo/hi) and data."""

    address_lo: int
    address_hi: int = 0
    data: int = 0

    @classmethod
    def compose(
        cls,
        interrupt: Interrupt,
        *,
        x2apic_format: bool = False,
    ) -> Msi:
        """Build the MSI that decodes to ``interrupt`` (shorthands cannot be expressed)."""
        if not isinstance(interrupt, Interrupt):
            raise ApicTypeError(f"interrupt must be an Interrupt, not {type(interrupt).__name__}")
        if interrupt.shorthand is not Shorthand.NONE:
            raise ApicValueError("interrupt.shorthand must be Shorthand.NONE for an MSI")
        limit = 0xFFFFFFFF if x2apic_format else 0xFF
        _validate(interrupt, limit)
        lo = 0xFEE00000 | ((interrupt.dest & 0xFF) << 12) | (int(interrupt.dest_mode) << 2)
        lo |= int(interrupt.redir_hint) << 3
        hi = interrupt.dest & 0xFFFFFF00  # 0 without x2apic_format: dest <= 0xFF there
        data = (
            interrupt.vector
            | (int(interrupt.delivery_mode) << 8)
            | (int(interrupt.level) << 14)
            | (int(interrupt.trigger) << 15)
        )
        return cls(lo, hi, data)

    def decode(self, *, x2apic_format: bool = False) -> Interrupt:
        """KVM ``kvm_msi_to_lapic_irq``: level is always asserted; no shorthand."""
        lo, hi, data = self
        check_int("address_lo", lo, 0, 0xFFFFFFFF)
        check_int("address_hi", hi, 0, 0xFFFFFFFF)
        check_int("data", data, 0, 0xFFFFFFFF)
        dest = (lo >> 12) & 0xFF
        if x2apic_format:
            dest |= hi & 0xFFFFFF00
        return Interrupt(
            data & 0xFF,
            _DM[(data >> 8) & 7],
            _DST[(lo >> 2) & 1],
            Level.ASSERT,
            _TRG[(data >> 15) & 1],
            Shorthand.NONE,
            dest,
            bool((lo >> 3) & 1),
        )


def _validate(msg: Icr | Interrupt, dest_limit: int) -> None:
    check_int("vector", msg.vector, 0, 255)
    check_int("dest", msg.dest, 0, dest_limit)
    for name, enum in (
        ("delivery_mode", DeliveryMode),
        ("dest_mode", DestMode),
        ("level", Level),
        ("trigger", Trigger),
        ("shorthand", Shorthand),
    ):
        if not isinstance(getattr(msg, name), enum):
            raise ApicTypeError(f"{name} must be a {enum.__name__}")


_DM = tuple(DeliveryMode)
_DST = tuple(DestMode)
_LVL = tuple(Level)
_TRG = tuple(Trigger)
_SH = tuple(Shorthand)


# What a bug replay (``apicsim/replays/``, specs/replays.md) may swap, and the fix behind each.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        # BUG-18 71bf395a276f: the x2APIC ICR's must-be-zero bits (swapped where imported).
        "X2APIC_ICR_RESERVED",
    }
)
