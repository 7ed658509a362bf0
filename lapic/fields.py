"""Declared bit layouts: named fields of a register word, packed and unpacked in one place.

Implements a small field-declaration helper in the spirit of QEMU's ``hw/registerfields.h``
(``REG32(name, addr)`` / ``FIELD(reg, field, shift, length)`` with ``FIELD_EX32``/``FIELD_DP32``):

* :class:`Field`: ``name``, ``shift``, ``width``; ``mask`` (the field's bits in place),
  ``get(word)`` (extract, QEMU ``FIELD_EX``), ``set(word, value)`` (deposit, ``FIELD_DP``) and
  ``place(value)`` (the value shifted into place, for OR-ing constants together);
* :class:`Layout`: a register (or table entry, or descriptor word) of 8..64 bits as a tuple of
  non-overlapping fields; ``pack`` a mapping or a NamedTuple whose field names match,
  ``unpack`` to a dict, ``reserved`` (bits outside every field), ``describe`` (a readable line).

Layouts of any width up to 64 bits work the same way, so the 64-bit ICR, the AVIC physical and
logical APIC ID table entries, the posted-interrupt descriptor's control word and exit-info
words can all be declared with it.  The register layouts of the local APIC are declared next to
their registers (``lapic.registers``, ``lapic.icr``).

Hot paths read a field's ``shift`` and ``mask`` once (module constants computed from the
declaration) instead of calling ``get``: a method call per field would cost more than the work.

Not modelled: multi-word fields (a field never spans two layouts) and signed fields.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lapic.faults import ApicTypeError, ApicValueError, check_int


@dataclass(frozen=True, slots=True)
class Field:
    """Bits ``shift .. shift + width - 1`` of a word, called ``name``."""

    name: str
    shift: int
    width: int
    max: int = field(init=False, repr=False, compare=False)
    """The largest value the field holds (``2**width - 1``)."""
    mask: int = field(init=False, repr=False, compare=False)
    """The field's bits in place (``max << shift``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ApicValueError(f"name={self.name!r} must be an identifier")
        check_int("shift", self.shift, 0, 63)
        check_int("width", self.width, 1, 64 - self.shift)
        object.__setattr__(self, "max", (1 << self.width) - 1)
        object.__setattr__(self, "mask", ((1 << self.width) - 1) << self.shift)

    def get(self, word: int) -> int:
        """The field's value in ``word`` (QEMU ``FIELD_EX64``)."""
        return (word >> self.shift) & self.max

    def set(self, word: int, value: int) -> int:
        """``word`` with the field replaced by ``value`` (QEMU ``FIELD_DP64``)."""
        return (word & ~self.mask) | self.place(value)

    def place(self, value: int) -> int:
        """``value`` shifted into the field's bits; raises if it does not fit."""
        value = int(value)
        if not 0 <= value <= self.max:
            raise ApicValueError(
                f"{self.name}={value:#x} does not fit in {self.width} bit(s)"
            )
        return value << self.shift


class Layout:
    """A word of ``bits`` bits made of named, non-overlapping :class:`Field` s."""

    __slots__ = ("_by_name", "bits", "fields", "name", "reserved", "word_mask")

    def __init__(self, name: str, bits: int, *fields: Field) -> None:
        check_int("bits", bits, 1, 64)
        self.name = name
        self.bits = bits
        self.fields: tuple[Field, ...] = tuple(sorted(fields, key=lambda f: f.shift))
        self.word_mask = (1 << bits) - 1
        used = 0
        by_name: dict[str, Field] = {}
        for f in self.fields:
            if not isinstance(f, Field):
                raise ApicTypeError(f"fields must be Field, not {type(f).__name__}")
            if f.name in by_name:
                raise ApicValueError(f"{name}: field name {f.name!r} declared twice")
            if f.mask & ~self.word_mask:
                raise ApicValueError(f"{name}: field {f.name!r} lies outside {bits} bits")
            if f.mask & used:
                raise ApicValueError(f"{name}: field {f.name!r} overlaps another field")
            used |= f.mask
            by_name[f.name] = f
        self._by_name = by_name
        self.reserved = self.word_mask & ~used
        """Bits that belong to no field."""

    def __getitem__(self, name: str) -> Field:
        try:
            return self._by_name[name]
        except KeyError:
            raise ApicValueError(f"name={name!r} is not a field of {self.name}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def pack(self, values: Mapping[str, int] | tuple[Any, ...] = (), /, **kw: int) -> int:
        """The word holding ``values`` (a mapping, or a NamedTuple whose field names are
        fields here) and ``kw``; fields not named are 0.  A name that is not a field raises."""
        items: dict[str, int] = {}
        if isinstance(values, Mapping):
            items.update(values)
        elif hasattr(values, "_asdict"):
            items.update(values._asdict())
        elif values:
            raise ApicTypeError(
                f"values must be a mapping or a NamedTuple, not {type(values).__name__}"
            )
        items.update(kw)
        word = 0
        for name, value in items.items():
            word |= self[name].place(value)
        return word

    def unpack(self, word: int) -> dict[str, int]:
        """Every field's value in ``word``, in bit order."""
        check_int("word", word, 0, self.word_mask)
        return {f.name: (word >> f.shift) & f.max for f in self.fields}

    def describe(self, word: int) -> str:
        """``word`` as ``NAME{field=0x.., ...}``, non-zero fields only (reserved bits too)."""
        parts = [f"{n}={v:#x}" for n, v in self.unpack(word).items() if v]
        if word & self.reserved:
            parts.append(f"reserved={word & self.reserved:#x}")
        return f"{self.name}{{{', '.join(parts)}}}"

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}[{f.shift + f.width - 1}:{f.shift}]" for f in self.fields)
        return f"Layout({self.name!r}, {self.bits}: {inner})"


__all__ = ["Field", "Layout"]
