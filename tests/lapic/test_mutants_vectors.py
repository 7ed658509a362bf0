"""``lapic.vectors``: the 256-bit vector sets laid over the register page (PRIO-1 layout).

Rules: PRIO-1 (vector ``v`` is bit ``v % 32`` of the word at ``base + (v // 32) * 0x10``).
The API contracts (argument errors name the argument, reprs paste back) have no spec id.
"""

from __future__ import annotations

import pytest

from lapic import ApicTypeError, ApicValueError, VectorSet
from lapic.vectors import SPAN_BYTES, VectorBitmap


def _bitmap() -> tuple[bytearray, VectorBitmap]:
    buf = bytearray(SPAN_BYTES)
    return buf, VectorBitmap.over(memoryview(buf))


def _word_bytes(buf: bytearray, n: int) -> bytes:
    return bytes(buf[0x10 * n : 0x10 * n + 4])


def test_a_vector_set_accepts_exactly_vectors_0_to_255__PRIO_1() -> None:
    assert list(VectorSet([0, 255])) == [0, 255]
    for bad in (-1, 256):
        with pytest.raises(ApicValueError, match=rf"^vector={bad} is outside \[0, 255\]$"):
            VectorSet([bad])


@pytest.mark.parametrize("bad", [True, 1.0, "1", None])
def test_a_vector_set_refuses_a_vector_that_is_not_an_int(bad: object) -> None:
    with pytest.raises(ApicTypeError, match=rf"^vector must be an int, not {type(bad).__name__}$"):
        VectorSet([bad])  # type: ignore[list-item]


def test_word_n_is_the_32_bit_register_word_of_vectors_32n_to_32n_31__PRIO_1() -> None:
    """PRIO-1 example: 0xE1 is word 7 bit 1, 0x21 word 1 bit 1."""
    s = VectorSet([0x00, 0x21, 0x3F, 0xE1, 0xF0])
    assert [s.word(n) for n in range(8)] == [1, 0x80000002, 0, 0, 0, 0, 0, 0x00010002]


def test_word_ignores_the_unused_bytes_between_words__PRIO_1() -> None:
    """A view over a buffer whose gap bytes are set still yields 32-bit words only."""
    s = VectorSet.over(memoryview(bytearray(b"\xff" * SPAN_BYTES)))
    assert [s.word(n) for n in range(8)] == [0xFFFFFFFF] * 8


def test_test_and_set_sets_the_bit_of_the_vector_and_reports_the_old_value__PRIO_1() -> None:
    buf, bm = _bitmap()
    assert bm.test_and_set(0xB7) is False
    assert set(bm) == {0xB7}
    assert _word_bytes(buf, 5) == (1 << 23).to_bytes(4, "little")
    assert bm.test_and_set(0xB7) is True
    assert set(bm) == {0xB7}
    assert bm.test_and_set(0x21) is False
    assert set(bm) == {0x21, 0xB7}


def test_set_word_replaces_one_register_word__PRIO_1() -> None:
    buf, bm = _bitmap()
    bm.add(0x20)
    bm.add(0x61)
    bm.set_word(3, 0x80000101)
    assert set(bm) == {0x20, 0x60, 0x68, 0x7F}
    assert _word_bytes(buf, 3) == bytes([0x01, 0x01, 0x00, 0x80])
    assert len(buf) == SPAN_BYTES
    bm.set_word(0, 0)
    bm.set_word(1, 0)
    assert set(bm) == {0x60, 0x68, 0x7F}


def test_vector_sets_compare_by_members() -> None:
    a, b = VectorSet([1, 0x80]), VectorSet([0x80, 1])
    assert a == b
    assert (a != b) is False
    assert a != VectorSet([1])
    assert a == {1, 0x80}
    assert a == frozenset({1, 0x80})
    assert a != {1}
    assert a != [1, 0x80]


def test_vector_set_repr_is_valid_python() -> None:
    """``lapic.vectors`` contract: a repr pastes back into a test (no spec id)."""
    assert repr(VectorSet()) == "VectorSet()"
    assert repr(VectorSet([0x41, 0x05])) == "VectorSet({0x05, 0x41})"
    for s in (VectorSet(), VectorSet([0]), VectorSet([0x05, 0x41, 0xFF])):
        assert eval(repr(s), {"VectorSet": VectorSet}) == s


@pytest.mark.parametrize("probe", [True, 1.0, "1", None, -1, 256])
def test_membership_of_a_non_vector_is_false(probe: object) -> None:
    assert probe not in VectorSet([1])
