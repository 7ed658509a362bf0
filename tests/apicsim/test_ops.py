"""``apicsim.ops``: the one typed operation vocabulary of scenarios and differential programs.

Every operation round-trips through a scenario ``[[step]]`` table and through TOML text; the
ICR choice lists are the ``lapic.icr`` enums; a macro performs the same primitives it expands
to; the model and the host-only backend perform an operation alike.
"""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apicsim import ops
from apicsim.ops import (
    DEST_MODES,
    LEVELS,
    MODES,
    OPS,
    SHORTHANDS,
    TRIGGERS,
    Field,
    GetLapic,
    HostOnly,
    Icr,
    InitSipi,
    Ipi,
    MmioRead,
    MmioWrite,
    Op,
    RegRead,
    RegWrite,
    Restore,
    SetBase,
    SetLapic,
    SetMsr,
    Unsupported,
    Wrmsr,
    op_from_toml,
    render_toml,
)
from hypervisor import Vm
from lapic.faults import ApicValueError
from lapic.icr import DeliveryMode, DestMode, Level, Shorthand, Trigger

TOML_INT_MAX = (1 << 63) - 1


def _field(spec: Field) -> st.SearchStrategy[Any]:
    if spec.kind == "int":
        return st.integers(spec.lo, min(spec.hi, TOML_INT_MAX))
    if spec.kind == "bool":
        return st.booleans()
    if spec.kind == "choice":
        if spec.hi < 0:
            return st.sampled_from(spec.choices)
        return st.integers(0, spec.hi)
    if spec.kind == "cpus":
        return st.one_of(st.none(), st.lists(st.integers(0, 63), max_size=8).map(tuple))
    if spec.kind == "vectors":
        return st.lists(st.integers(0, 255), max_size=8).map(tuple)
    offsets = st.integers(0, 0xFF).map(lambda d: d * 4)
    value: st.SearchStrategy[Any] = st.integers(0, 0xFFFFFFFF)
    if spec.kind == "restore":
        value = st.one_of(st.none(), value)
    pairs = st.lists(st.tuples(offsets, value), min_size=1, max_size=6, unique_by=lambda p: p[0])
    return pairs.map(tuple)


def _op(cls: type[Op]) -> st.SearchStrategy[Op]:
    strategies = {name: _field(spec) for name, spec in cls.FIELDS.items()}
    if cls in (MmioRead, MmioWrite):
        strategies["gpa"] = st.none()
        by_offset = st.builds(cls, **strategies)
        del strategies["offset"]
        strategies["gpa"] = st.integers(0, (1 << 52) - 1)
        by_gpa = st.builds(cls, offset=st.just(0), **strategies)
        return st.one_of(by_offset, by_gpa)
    return st.builds(cls, **strategies)


any_op = st.one_of(*(_op(cls) for cls in OPS.values()))


@given(op=any_op)
def test_every_operation_round_trips_through_its_step_table(op: Op) -> None:
    table = op.to_toml()
    assert table["action"] == op.ACTION
    assert op_from_toml(table) == op


@given(op=any_op)
def test_every_operation_round_trips_through_scenario_toml_text(op: Op) -> None:
    text = "\n".join(render_toml(op.to_toml())) + "\n"
    assert op_from_toml(tomllib.loads(text)) == op


def test_every_action_has_one_operation_and_a_description() -> None:
    assert set(OPS) >= {
        "wrmsr", "rdmsr", "mmio_write", "mmio_read", "icr", "hypercall", "msi", "set_msr",
        "get_lapic", "set_lapic", "run", "advance", "send_ipi", "set_tpr", "eoi",
        "reg_write", "reg_read", "ipi", "init_sipi", "set_base", "restore", "get_msr",
    }  # fmt: skip
    for name, cls in OPS.items():
        assert name == cls.ACTION
        assert cls.__doc__, name


def test_the_icr_choice_lists_are_the_lapic_icr_enums__ICR_1() -> None:
    assert [MODES.index(m.name.lower()) for m in DeliveryMode] == [int(m) for m in DeliveryMode]
    assert DEST_MODES.index("logical") == DestMode.LOGICAL
    assert LEVELS.index("assert") == Level.ASSERT
    assert TRIGGERS.index("level") == Trigger.LEVEL
    assert SHORTHANDS.index("self") == Shorthand.SELF
    assert SHORTHANDS.index("all") == Shorthand.ALL_INCLUDING_SELF
    assert SHORTHANDS.index("allbutself") == Shorthand.ALL_EXCLUDING_SELF


def test_the_icr_low_dword_packs_the_fields_at_their_sdm_positions__ICR_1() -> None:
    op = Icr(
        0,
        3,
        0xF1,
        mode=DeliveryMode.LOWEST,
        dest_mode=DestMode.LOGICAL,
        shorthand=Shorthand.ALL_EXCLUDING_SELF,
        level=Level.ASSERT,
        trigger=Trigger.LEVEL,
    )
    assert op.low == 0xF1 | 1 << 8 | 1 << 11 | 1 << 14 | 1 << 15 | 3 << 18
    assert op.describe() == "icr cpu0 -> 0x3 log lowest 0xf1 allbutself"


def test_the_descriptions_keep_the_runner_and_differential_texts() -> None:
    assert MmioRead(0, 0x300).describe() == "mmio_read cpu0 +0x300"
    assert MmioWrite(1, 0, 5, 2, gpa=0xFEE00300).describe() == "mmio_write cpu1 0xfee00300 = 0x5 /2"
    assert Ipi(0, 1, 0x4031).describe() == "cpu0 IPI dest=0x1 icr=0x4031"
    assert RegWrite(2, 0x80, 0x20).describe() == "cpu2 write reg 0x080 = 0x20"
    assert Restore(1, ((0x80, None), (0x20, 5))).describe() == (
        "host restore cpu1 {0x80=as read, 0x20=0x5}"
    )


def test_an_mmio_access_takes_an_offset_or_a_gpa_not_both() -> None:
    with pytest.raises(ApicValueError, match="offset"):
        MmioRead(0, 0x20, gpa=0xFEE00020)


def test_a_macro_performs_the_primitives_it_expands_to__ICR_2() -> None:
    a, b = Vm(2), Vm(2)
    for vm in (a, b):
        RegWrite(0, 0xF0, 0x1FF).perform(HostOnly(vm))
        RegWrite(1, 0xF0, 0x1FF).perform(HostOnly(vm))
    op = Ipi(0, 1, 0x40F1)
    prims = op.expand(a)
    assert prims == [MmioWrite(0, 0x310, 1 << 24), MmioWrite(0, 0x300, 0x40F1)]
    op.perform(HostOnly(a))
    for prim in prims:
        prim.perform(HostOnly(b))
    assert a.get_lapic(1) == b.get_lapic(1)
    assert 0xF1 in a.lapic(1).irr


def test_set_base_and_reg_read_follow_the_vcpu_mode__BASE_1() -> None:
    vm = Vm(1)
    backend = HostOnly(vm)
    assert SetBase(0, False, "x2apic").expand(vm) == [Wrmsr(0, 0x1B, 0xFEE00D00)]
    assert SetBase(0, True, "x2apic", bsp="clear").expand(vm) == [SetMsr(0, 0x1B, 0xFEE00C00)]
    SetBase(0, False, "x2apic").perform(backend)
    assert RegRead(0, 0x20).perform(backend) == 0
    assert InitSipi(0, 0, 0x10).expand(vm)[0] == Wrmsr(0, 0x830, 0x4500)


def test_restore_rewrites_the_image_it_reads_and_set_lapic_patches_dwords__STATE_1() -> None:
    vm = Vm(1)
    backend = HostOnly(vm)
    assert Restore(0, ((0x80, 0x30),)).perform(backend) == 0
    assert GetLapic(0, 0x80).perform(backend) == 0x30
    assert SetLapic(0, ((0x80, 0x10),)).perform(backend) == 0
    assert GetLapic(0, 0x80).perform(backend) == 0x10
    assert Restore(0, ((0x80, None),)).expand(vm) == [SetLapic(0, ((0x80, 0x10),))]


def test_the_host_only_backend_has_no_run_clock_or_guest() -> None:
    backend = HostOnly(Vm(1))
    for op in (ops.Run(0), ops.Advance(10), ops.Eoi(0)):
        with pytest.raises(Unsupported):
            op.perform(backend)


def test_an_unknown_action_is_refused_with_its_name() -> None:
    with pytest.raises(ApicValueError, match="action='nope'"):
        op_from_toml({"action": "nope"})
