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
from lapic.fields import Field, Layout


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


# The declared layouts (reference §1.2): the ICR is packed and unpacked only through these.
_ICR_LOW_FIELDS = (
    Field("vector", 0, 8),
    Field("delivery_mode", 8, 3),
    Field("dest_mode", 11, 1),
    Field("delivery_status", 12, 1),
    Field("level", 14, 1),
    Field("trigger", 15, 1),
    Field("shorthand", 18, 2),
)
ICR_LOW = Layout("ICR", 32, *_ICR_LOW_FIELDS)
"""The ICR low dword (xAPIC 0x300; x2APIC MSR 0x830 bits 31:0)."""
ICR2 = Layout("ICR2", 32, Field("dest", 24, 8))
"""The xAPIC ICR high dword (0x310): the 8-bit destination in bits 31:24."""
ICR_XAPIC = Layout("ICR64_XAPIC", 64, *_ICR_LOW_FIELDS, Field("dest", 56, 8))
"""The 64-bit view of an xAPIC ICR: ICR2 in the high dword."""
ICR_X2APIC = Layout("ICR64_X2APIC", 64, *_ICR_LOW_FIELDS, Field("dest", 32, 32))
"""The x2APIC ICR (MSR 0x830): the 32-bit destination in bits 63:32."""
MSI_ADDRESS = Layout(
    "MSI_ADDRESS",
    32,
    Field("dest_mode", 2, 1),
    Field("redir_hint", 3, 1),
    Field("dest", 12, 8),
    Field("base", 20, 12),
)
"""MSI address_lo (SDM "Message Address Register Format"); ``base`` is 0xFEE."""
MSI_ADDRESS_HI = Layout("MSI_ADDRESS_HI", 32, Field("dest_hi", 8, 24))
"""MSI address_hi under KVM's 32-bit-ID extension: destination bits 31:8."""
MSI_DATA = Layout(
    "MSI_DATA",
    32,
    Field("vector", 0, 8),
    Field("delivery_mode", 8, 3),
    Field("level", 14, 1),
    Field("trigger", 15, 1),
)
"""MSI data (SDM "Message Data Register Format")."""

# Raw field masks, derived from the layouts.
VECTOR_MASK = ICR_LOW["vector"].mask
DELIVERY_MODE_MASK = ICR_LOW["delivery_mode"].mask
DEST_LOGICAL = ICR_LOW["dest_mode"].mask
DELIVERY_STATUS = ICR_LOW["delivery_status"].mask
LEVEL_ASSERT = ICR_LOW["level"].mask
TRIGGER_LEVEL = ICR_LOW["trigger"].mask
SHORTHAND_MASK = ICR_LOW["shorthand"].mask
X2APIC_ICR_RESERVED = ICR_LOW.reserved
"""``GENMASK(31,20) | GENMASK(17,16) | BIT(13)`` (0xFFF32000): the bits of no ICR field,
which must be zero in an x2APIC ICR write."""
ICR_FIELDS_MASK = 0xFFFFFFFF & ~X2APIC_ICR_RESERVED & ~DELIVERY_STATUS
"""The bits an ICR write's fields occupy (delivery status is read-only)."""
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
        high = value >> 32
        dest = high if x2apic else ICR2["dest"].get(high)
        return cls(*interrupt_of_icr(value & 0xFFFFFFFF, dest)[:7])

    def encode(self, *, x2apic: bool) -> int:
        _validate(self, 0xFFFFFFFF if x2apic else 0xFF)
        return (ICR_X2APIC if x2apic else ICR_XAPIC).pack(self)

    @staticmethod
    def low_of(message: Icr | Interrupt) -> int:
        """The ICR low dword that sends ``message`` (delivery status 0; an Interrupt's
        ``redir_hint`` and destination are not part of it)."""
        return ICR_LOW.pack(
            vector=message.vector,
            delivery_mode=message.delivery_mode,
            dest_mode=message.dest_mode,
            level=message.level,
            trigger=message.trigger,
            shorthand=message.shorthand,
        )

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
        lo = MSI_ADDRESS.pack(
            base=0xFEE,
            dest=interrupt.dest & 0xFF,
            dest_mode=interrupt.dest_mode,
            redir_hint=interrupt.redir_hint,
        )
        hi = interrupt.dest & MSI_ADDRESS_HI["dest_hi"].mask  # 0 without x2apic_format
        data = MSI_DATA.pack(
            vector=interrupt.vector,
            delivery_mode=interrupt.delivery_mode,
            level=interrupt.level,
            trigger=interrupt.trigger,
        )
        return cls(lo, hi, data)

    def decode(self, *, x2apic_format: bool = False) -> Interrupt:
        """KVM ``kvm_msi_to_lapic_irq``: level is always asserted; no shorthand."""
        lo, hi, data = self
        check_int("address_lo", lo, 0, 0xFFFFFFFF)
        check_int("address_hi", hi, 0, 0xFFFFFFFF)
        check_int("data", data, 0, 0xFFFFFFFF)
        dest = (lo >> _MSI_DEST.shift) & _MSI_DEST.max
        if x2apic_format:
            dest |= hi & _MSI_DEST_HI.mask
        return Interrupt(
            data & _VECTOR.max,
            _DM[(data >> _MODE.shift) & _MODE.max],
            _DST[(lo >> _MSI_DEST_MODE.shift) & 1],
            Level.ASSERT,
            _TRG[(data >> _TRIGGER.shift) & 1],
            Shorthand.NONE,
            dest,
            bool((lo >> _MSI_REDIR.shift) & 1),
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

_new_tuple = tuple.__new__
_VECTOR = ICR_LOW["vector"]
_MODE = ICR_LOW["delivery_mode"]
_DEST_MODE = ICR_LOW["dest_mode"]
_LEVEL = ICR_LOW["level"]
_TRIGGER = ICR_LOW["trigger"]
_SHORTHAND = ICR_LOW["shorthand"]
_MSI_DEST = MSI_ADDRESS["dest"]
_MSI_DEST_MODE = MSI_ADDRESS["dest_mode"]
_MSI_REDIR = MSI_ADDRESS["redir_hint"]
_MSI_DEST_HI = MSI_ADDRESS_HI["dest_hi"]
assert (_VECTOR.shift, _MODE.shift, _DEST_MODE.shift) == (0, 8, 11)
assert (_LEVEL.shift, _TRIGGER.shift, _SHORTHAND.shift) == (14, 15, 18)
assert MSI_DATA["trigger"].shift == _TRIGGER.shift and MSI_DATA["delivery_mode"] == _MODE


def interrupt_of_icr(low: int, dest: int) -> Interrupt:
    """The ICR decode (KVM ``kvm_icr_to_lapic_irq``): the message an ICR write with low dword
    ``low`` and destination ``dest`` sends.  Unchecked.  The shifts are the ``ICR_LOW``
    declaration's (the asserts above pin them), written as literals so the decode costs no
    lookups.  ``LocalApic._send`` carries an inlined copy (a call would cost more than the
    decode on every IPI); a property test checks the two agree."""
    return _new_tuple(  # Interrupt(...) without NamedTuple.__new__'s overhead
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


# What a bug replay (``apicsim/replays/``, specs/replays.md) may swap, and the fix behind each.
REPLAY_SEAMS: frozenset[str] = frozenset(
    {
        # BUG-18 71bf395a276f: the x2APIC ICR's must-be-zero bits (swapped where imported).
        "X2APIC_ICR_RESERVED",
    }
)
