"""Sparse hardware tables: the storage the AVIC APIC ID tables and the VMX PID-pointer table
share.

A table of raw entries (u64 or u32) indexed by an APIC ID, almost all of them zero (invalid):
:class:`SparseTable` stores the non-zero entries by index (a slot not stored reads as 0),
reads one raw entry without building an object (what the CPU does), and gives its state as
sorted ``(index, raw)`` pairs for snapshots.  Sizes, bounds and the meaning of the bits are the
subclasses' (``hypervisor.hw.avic``, ``hypervisor.hw.vmx``).

Not modelled: the memory itself (a table is never read as bytes).
"""

from __future__ import annotations

from collections.abc import Iterator


class SparseTable:
    """The non-zero entries of a hardware table by index; a slot not stored reads as 0."""

    __slots__ = ("_raw",)

    def __init__(self) -> None:
        self._raw: dict[int, int] = {}

    def _store(self, i: int, raw: int) -> None:
        if raw:
            self._raw[i] = raw
        else:
            self._raw.pop(i, None)

    def raw(self, index: int) -> int:
        """The raw entry without building an entry object (the hardware's read)."""
        return self._raw.get(index, 0)

    def _sorted(self) -> Iterator[tuple[int, int]]:
        """The non-zero entries by index, raw."""
        for i in sorted(self._raw):
            yield i, self._raw[i]

    def state(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted(self._raw.items()))

    def set_state(self, state: tuple[tuple[int, int], ...]) -> None:
        self._raw = dict(state)
