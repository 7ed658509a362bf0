"""256-bit interrupt vector sets (IRR, ISR, TMR; later PIR and VIRR).

The architectural layout (SDM Vol. 3 "Interrupt Request, In-Service and Trigger Mode
Registers"; KVM ``APIC_VECTOR_TO_REG_OFFSET``): vector ``v`` is bit ``v % 32`` of the 32-bit
word at ``base + (v // 32) * 0x10``.  Eight such words, 16 bytes apart, span 128 bytes.

A :class:`VectorBitmap` is a *view*: a little-endian ``bitarray`` laid over those 128 bytes of
some buffer (normally the APIC register page).  So the register page stays the one home of
IRR/ISR/TMR; the bitmaps, the xAPIC MMIO reads and the 1 KiB KVM state image all read the same
bytes.  Bits of the 12 unused bytes between words are never set by anyone.  What a user holds
(``LocalApic.irr``/``isr``/``tmr``) is a :class:`FrozenVectorSet`: a copy taken when read,
immutable and hashable, so a saved value never changes under its holder.

Not modelled here: any ordering or priority policy (see ``lapic.apic``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Self

from bitarray import bitarray, frozenbitarray

from lapic.faults import ApicTypeError, ApicValueError

SPAN_BYTES = 0x80
"""Bytes covered by one vector set in the register page (8 words, 16 bytes apart)."""


def bit_index(vector: int) -> int:
    """Bit position of ``vector`` inside the 128-byte span."""
    return ((vector >> 5) << 7) | (vector & 31)


def vector_of(index: int) -> int:
    """Inverse of :func:`bit_index`."""
    return ((index >> 7) << 5) | (index & 31)


class VectorSet:
    """A read-only set of vectors 0..255: ``in``, ascending iteration, ``len``, ``==``."""

    __slots__ = ("_bits",)

    def __init__(self, vectors: Iterable[int] = (), *, _bits: bitarray | None = None) -> None:
        if _bits is None:
            _bits = bitarray(SPAN_BYTES * 8, endian="little")
            _bits.setall(0)
            for v in vectors:
                _bits[bit_index(_check_vector(v))] = 1
        self._bits = _bits

    @classmethod
    def over(cls, buffer: memoryview) -> Self:
        """A view over 128 bytes of ``buffer`` (e.g. ``page[0x200:0x280]`` for IRR)."""
        if len(buffer) != SPAN_BYTES:
            raise ApicValueError(f"buffer must be {SPAN_BYTES} bytes, got {len(buffer)}")
        return cls(_bits=bitarray(buffer=buffer, endian="little"))

    # -- queries -------------------------------------------------------------------------
    def __contains__(self, vector: object) -> bool:
        if type(vector) is not int or not 0 <= vector <= 255:
            return False
        return bool(self._bits[bit_index(vector)])

    def __iter__(self) -> Iterator[int]:
        for i in self._bits.search(1):
            yield vector_of(i)

    def __len__(self) -> int:
        return int(self._bits.count())

    def __bool__(self) -> bool:
        return self._bits.any()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VectorSet):
            return self._bits == other._bits
        if isinstance(other, (set, frozenset)):
            return set(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a view of mutable state

    def highest(self) -> int:
        """Highest vector in the set, or -1 if empty (KVM ``apic_find_highest_vector``)."""
        i = self._bits.find(1, right=True)
        return -1 if i < 0 else ((i >> 7) << 5) | (i & 31)

    def word(self, n: int) -> int:
        """The 32-bit register word ``n`` (vectors ``32n .. 32n+31``)."""
        start = n << 7
        return int.from_bytes(self._bits[start : start + 32].tobytes(), "little")

    def frozen(self) -> FrozenVectorSet:
        """An immutable, hashable copy of the set as it is now."""
        return FrozenVectorSet(_bits=frozenbitarray(self._bits))

    def __repr__(self) -> str:
        inner = ", ".join(f"{v:#04x}" for v in self)
        return f"VectorSet({{{inner}}})" if inner else "VectorSet()"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


class FrozenVectorSet(VectorSet):
    """A value: a :class:`VectorSet` copied out of an APIC (``LocalApic.irr`` and friends).

    Immutable (no mutators; its bits are a ``frozenbitarray``) and hashable; equal to a plain
    ``set``/``frozenset`` of the same vectors; set algebra (``|``, ``&``, ``-``, ``^``) gives
    frozen sets; printed with vectors in hex."""

    __slots__ = ()

    def __init__(self, vectors: Iterable[int] = (), *, _bits: bitarray | None = None) -> None:
        if _bits is None:
            super().__init__(vectors)
            self._bits = frozenbitarray(self._bits)
        else:
            super().__init__(_bits=_bits)

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self))

    def frozen(self) -> FrozenVectorSet:
        return self

    def _other(self, other: object) -> FrozenVectorSet | None:
        if isinstance(other, VectorSet):
            return other if isinstance(other, FrozenVectorSet) else other.frozen()
        if isinstance(other, (set, frozenset)):
            return FrozenVectorSet(other)
        return None

    def __or__(self, other: object) -> FrozenVectorSet:
        o = self._other(other)
        if o is None:
            return NotImplemented
        return FrozenVectorSet(_bits=frozenbitarray(self._bits | o._bits))

    def __and__(self, other: object) -> FrozenVectorSet:
        o = self._other(other)
        if o is None:
            return NotImplemented
        return FrozenVectorSet(_bits=frozenbitarray(self._bits & o._bits))

    def __sub__(self, other: object) -> FrozenVectorSet:
        o = self._other(other)
        if o is None:
            return NotImplemented
        return FrozenVectorSet(_bits=frozenbitarray(self._bits & ~o._bits))

    def __xor__(self, other: object) -> FrozenVectorSet:
        o = self._other(other)
        if o is None:
            return NotImplemented
        return FrozenVectorSet(_bits=frozenbitarray(self._bits ^ o._bits))

    def __repr__(self) -> str:
        inner = ", ".join(f"{v:#04x}" for v in self)
        return "{" + inner + "}" if inner else "{}"


class VectorBitmap(VectorSet):
    """A :class:`VectorSet` its owner may change; handed out typed as the read-only base."""

    __slots__ = ()

    def add(self, vector: int) -> None:
        self._bits[((vector >> 5) << 7) | (vector & 31)] = 1

    def discard(self, vector: int) -> None:
        self._bits[((vector >> 5) << 7) | (vector & 31)] = 0

    def test_and_set(self, vector: int) -> bool:
        """Set ``vector``; return whether it was already set."""
        i = ((vector >> 5) << 7) | (vector & 31)
        was = bool(self._bits[i])
        self._bits[i] = 1
        return was

    def clear(self) -> None:
        self._bits.setall(0)

    @property
    def bits(self) -> bitarray:
        """The underlying bitarray (bit :func:`bit_index` of a vector), for hot paths."""
        return self._bits

    def set_word(self, n: int, value: int) -> None:
        start = n << 7
        self._bits[start : start + 32] = bitarray(
            buffer=value.to_bytes(4, "little"), endian="little"
        )


def _check_vector(v: object) -> int:
    if type(v) is not int:
        raise ApicTypeError(f"vector must be an int, not {type(v).__name__}")
    if not 0 <= v <= 255:
        raise ApicValueError(f"vector={v} is outside [0, 255]")
    return v
