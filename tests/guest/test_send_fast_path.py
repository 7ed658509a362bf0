"""The guest's IPI send fast paths equal the full checks they short-cut.

``GuestCpu.send_IPI``, ``send_IPI_mask`` and ``send_IPI_mask_allbutself`` (through
``Guest.cpumask``) accept the common case (plain ints in range, a list or tuple mask already
ascending and without repeats) with a fast inline test and give everything else to the full
checks (``guest.cpu.checked_cpumask``, ``check_int``).  Here every entry point is run on one
VM and, on an identical twin VM, the full path (the full checks, then the driver) is run with
the same arguments: the same ICR writes (the same exits, in order), the same machine state,
the same error (type and message), and on an error nothing sent and nothing counted.
Arguments range over masks of any CPUs (unsorted, repeated, negative, too big, bools, floats,
an int subclass, non-list iterables, non-iterables) and vectors 0..255 with NMI 2, out of
range, bools, floats, an int subclass; drivers: every one, ``kvm_pv`` over each base.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from functools import partial
from itertools import islice

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest import DRIVERS, Guest
from guest.cpu import checked_cpumask
from guest.drivers import BASE_DRIVERS, NMI_VECTOR
from hypervisor import Vm
from lapic.faults import check_int

CASES: tuple[tuple[str, str | None], ...] = (
    *((d, None) for d in DRIVERS if d != "kvm_pv"),
    *(("kvm_pv", base) for base in BASE_DRIVERS),
)
"""Every driver ``Guest`` accepts; ``kvm_pv`` over every base driver."""


class Num(enum.IntEnum):
    """An int subclass: not a plain int, so it takes the full checks (which accept it)."""

    ONE = 1
    TWO = 2
    BIG = 0xF0


def twins(driver: str, base: str | None, ids: list[int]) -> tuple[tuple[Vm, Guest], ...]:
    """Two identical booted VMs: one for the fast path, one for the full path."""
    out = []
    for _ in range(2):
        vm = Vm(len(ids), vcpu_ids=ids)
        out.append((vm, Guest(vm, driver, base=base)))
    return tuple(out)


def outcome(vm: Vm, action: Callable[[], object], state: bool = True) -> tuple[object, ...]:
    """What ``action`` did: its error (type, message) or None, the exits it caused, the
    IPIs counted, and (``state``) the machine state afterwards."""
    exits_before, ipis_before = vm.stats.exits, vm.stats.ipis
    error: tuple[type[BaseException], str] | None = None
    try:
        action()
    except (TypeError, ValueError) as e:
        error = (type(e), str(e))
    n = vm.stats.exits - exits_before
    assert vm.exit_log is not None and n <= (vm.exit_log.maxlen or 0)
    exits = list(islice(reversed(vm.exit_log), n))[::-1]
    if error is not None:
        assert n == 0 and vm.stats.ipis == ipis_before, "an error after a side effect"
    done = (error, exits, vm.stats.ipis - ipis_before)
    return (*done, vm.snapshot()) if state else done


@st.composite
def guests(draw: st.DrawFn) -> tuple[str, str | None, list[int]]:
    driver, base = draw(st.sampled_from(CASES), label="driver, base")
    most = 8 if (base or driver) == "flat" else 6
    ids = draw(st.lists(st.integers(0, 40), min_size=1, max_size=most, unique=True))
    return driver, base, ids


def cpu_numbers(n: int) -> st.SearchStrategy[object]:
    return st.one_of(
        st.integers(-2, n + 1),
        st.booleans(),
        st.sampled_from((0.0, 1.0, 2.5, -1.0)),
        st.sampled_from((Num.ONE, Num.TWO)),
    )


def masks(n: int) -> st.SearchStrategy[object]:
    """Masks: mostly valid ascending lists/tuples (the fast path), and anything else."""
    valid = st.lists(st.integers(0, n - 1), unique=True, max_size=n).map(sorted)
    in_range = st.lists(st.integers(0, n - 1), min_size=2, max_size=6)  # repeats, any order
    # Ascending, but for one bad value: too low first, too big last, or not a plain int.
    low, high = st.sampled_from((-2, -1)), st.sampled_from((n, n + 1))
    odd = st.sampled_from((True, False, 1.0, Num.ONE))
    edged = st.one_of(
        st.tuples(low, valid).map(lambda t: [t[0], *t[1]]),
        st.tuples(valid, high).map(lambda t: [*t[0], t[1]]),
        st.tuples(valid, odd, st.booleans()).map(
            lambda t: [*t[0], t[1]] if t[2] else [t[1], *t[0]]
        ),
    )
    anything = st.lists(cpu_numbers(n), max_size=6)
    lists: st.SearchStrategy[list[object]] = st.one_of(valid, in_range, edged, anything)
    others = st.one_of(
        lists.map(lambda c: iter(c)),
        st.lists(st.integers(0, n - 1)).map(set),
        lists.map(lambda c: _ListSub(c)),
        st.sampled_from((None, 1, "01", b"\x00", 1.0)),
    )
    return st.one_of(edged, edged.map(tuple), lists, lists.map(tuple), others)


class _ListSub(list[object]):
    """A list subclass: not ``type(x) is list``, so it takes the full check."""


VECTORS = st.one_of(
    st.integers(0, 0xFF),
    st.sampled_from((-1, 0, NMI_VECTOR, 0xFF, 0x100)),
    st.integers(-2, 0x102),
    st.booleans(),
    st.sampled_from((2.0, 240.5, Num.TWO, Num.BIG, None)),
)


def copy_of(mask: object) -> tuple[object, object]:
    """Two equal masks (an iterator can be consumed only once)."""
    if isinstance(mask, Iterable) and not isinstance(mask, list | tuple | set | str | bytes):
        items = list(mask)
        return iter(items), iter(list(items))
    if isinstance(mask, _ListSub):
        return mask, _ListSub(mask)
    return mask, mask


def full_vector(vector: object) -> int:
    return check_int("vector", vector, 0, 0xFF)


def full_send_IPI(g: Guest, sender: int, target: object, vector: object) -> None:
    """``GuestCpu.send_IPI`` without its fast test: the full checks, then the driver."""
    checked = check_int("target", target, 0, len(g) - 1)
    g.driver.send_IPI(g.cpu(sender), checked, full_vector(vector))


def full_send_IPI_mask(g: Guest, sender: int, cpus: object, vector: object) -> None:
    """``GuestCpu.send_IPI_mask`` without its fast test: the full checks, then the driver."""
    mask = checked_cpumask(cpus, len(g))  # type: ignore[arg-type]
    g.driver.send_IPI_mask(g.cpu(sender), mask, full_vector(vector))


def full_send_IPI_mask_allbutself(g: Guest, sender: int, cpus: object, vector: object) -> None:
    """``GuestCpu.send_IPI_mask_allbutself`` without fast tests: full checks, then driver."""
    mask = checked_cpumask(cpus, len(g))  # type: ignore[arg-type]
    g.driver.send_IPI_mask_allbutself(g.cpu(sender), mask, full_vector(vector))


@pytest.mark.parametrize(
    ("entry", "full_path"),
    [
        ("send_IPI_mask", full_send_IPI_mask),
        ("send_IPI_mask_allbutself", full_send_IPI_mask_allbutself),
    ],
)
@given(case=guests(), data=st.data())
def test_a_mask_send_fast_path_writes_the_icr_as_the_full_path_does(
    entry: str,
    full_path: Callable[[Guest, int, object, object], None],
    case: tuple[str, str | None, list[int]],
    data: st.DataObject,
) -> None:
    driver, base, ids = case
    (vm, g), (ref_vm, ref_g) = twins(driver, base, ids)
    n = len(ids)
    sender = data.draw(st.integers(0, n - 1), label="sender")
    mask, ref_mask = copy_of(data.draw(masks(n), label="cpus"))
    vector = data.draw(VECTORS, label="vector")

    send = getattr(g.cpu(sender), entry)
    got = outcome(vm, lambda: send(mask, vector))
    assert got == outcome(ref_vm, partial(full_path, ref_g, sender, ref_mask, vector))


@given(case=guests(), data=st.data())
def test_send_ipi_fast_path_writes_the_icr_as_the_full_path_does(
    case: tuple[str, str | None, list[int]], data: st.DataObject
) -> None:
    driver, base, ids = case
    (vm, g), (ref_vm, ref_g) = twins(driver, base, ids)
    n = len(ids)
    sender = data.draw(st.integers(0, n - 1), label="sender")
    target = data.draw(st.one_of(cpu_numbers(n), st.none()), label="target")
    vector = data.draw(VECTORS, label="vector")

    got = outcome(vm, lambda: g.cpu(sender).send_IPI(target, vector))  # type: ignore[arg-type]
    assert got == outcome(ref_vm, partial(full_send_IPI, ref_g, sender, target, vector))


@given(data=st.data())
def test_cpumask_fast_path_equals_the_full_check(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 6), label="cpus in the guest")
    _, g = twins("x2apic_phys", None, list(range(n)))[0]
    mask, ref_mask = copy_of(data.draw(masks(n), label="cpus"))
    try:
        expected: object = checked_cpumask(ref_mask, n)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        expected = (type(e), str(e))
    try:
        got: object = list(g.cpumask(mask))  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        got = (type(e), str(e))
    assert got == expected


@pytest.mark.parametrize("mask", [[0, 2, 3], (1,), [], [3]])
def test_an_ascending_plain_mask_is_returned_as_it_is(mask: list[int] | tuple[int, ...]) -> None:
    _, g = twins("x2apic_phys", None, [0, 1, 2, 3])[0]
    assert g.cpumask(mask) is mask


@pytest.mark.parametrize("mask", [[3, 1], [1, 1], [True], [0, 4], [-1], [1.0]])
def test_any_other_mask_takes_the_full_check(mask: list[object]) -> None:
    _, g = twins("x2apic_phys", None, [0, 1, 2, 3])[0]
    try:
        result = g.cpumask(mask)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return
    assert result is not mask and list(result) == sorted(set(mask))  # type: ignore[type-var]


EVERY_VECTOR: tuple[object, ...] = (
    *range(-2, 0x103),
    True,
    False,
    2.0,
    240.5,
    Num.TWO,
    Num.BIG,
    None,
)
"""Every vector 0..255 (NMI 2 included), the ints just outside, and values of other types."""

EVERY_CPU: tuple[object, ...] = (*range(-2, 6), True, False, 1.0, Num.ONE, None)
"""Every CPU of a 4-CPU guest, the ints just outside, and values of other types."""


def same(vm: Vm, ref_vm: Vm, fast: Callable[..., object], full: Callable[..., object],
         *args: object) -> None:
    """``fast(*args)`` on ``vm`` does what ``full(*args)`` does on the twin ``ref_vm``."""
    assert outcome(vm, partial(fast, *args), False) == outcome(
        ref_vm, partial(full, *args), False
    ), args


@pytest.mark.parametrize(("driver", "base"), CASES)
def test_every_vector_takes_the_fast_path_exactly_when_the_full_check_accepts_it(
    driver: str, base: str | None
) -> None:
    (vm, g), (ref_vm, ref_g) = twins(driver, base, [0, 1, 2, 3])
    cpu = g.cpu(1)
    for vector in EVERY_VECTOR:
        same(vm, ref_vm, cpu.send_IPI, partial(full_send_IPI, ref_g, 1), 2, vector)
        for mask in ([3], (0, 2, 3), []):
            same(vm, ref_vm, cpu.send_IPI_mask, partial(full_send_IPI_mask, ref_g, 1), mask, vector)
        full = partial(full_send_IPI_mask_allbutself, ref_g, 1)
        same(vm, ref_vm, cpu.send_IPI_mask_allbutself, full, [0, 1, 2, 3], vector)
    assert vm.snapshot() == ref_vm.snapshot()


@pytest.mark.parametrize(("driver", "base"), CASES)
def test_every_target_and_one_cpu_mask_takes_the_fast_path_exactly_when_the_full_check_accepts_it(
    driver: str, base: str | None
) -> None:
    (vm, g), (ref_vm, ref_g) = twins(driver, base, [0, 1, 2, 3])
    cpu = g.cpu(1)
    for c in EVERY_CPU:
        same(vm, ref_vm, cpu.send_IPI, partial(full_send_IPI, ref_g, 1), c, 0x40)
        for mask in ([c], (c,), [0, c], [c, 3]):
            same(vm, ref_vm, cpu.send_IPI_mask, partial(full_send_IPI_mask, ref_g, 1), mask, 0x41)
            full = partial(full_send_IPI_mask_allbutself, ref_g, 1)
            same(vm, ref_vm, cpu.send_IPI_mask_allbutself, full, mask, 0x42)
    assert vm.snapshot() == ref_vm.snapshot()
