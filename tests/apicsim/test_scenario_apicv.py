"""The scenario vocabulary of APICv and IPIv: the ``set_if`` and ``set_eoi_exit_bitmap``
actions, the ``pid``, ``notifications`` and ``intr_status`` expectations and the
``posted``/``notifications``/``wakeups`` counters (``specs/scenarios/README.md``).

The shipped APICv scenarios themselves run in ``test_scenarios.py`` with every other file.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from apicsim import scenario
from apicsim.cli import main
from apicsim.ops import HostOnly, SetEoiExitBitmap, SetIf, Unsupported, op_from_toml
from apicsim.scenario import Runner, build_vm
from hypervisor.accel.apicv import ApicvState

from .scenario_files import line_of

HEADER = """\
name = "t"
description = "A test scenario.  Model-only."
rules = ["PI-J2"]
backends = ["model"]
"""


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(HEADER + textwrap.dedent(body), encoding="utf-8")
    return path


VM = """
[vm]
vcpus = 2
svr = 0x1FF
accelerator = "{accel}"
"""


def test_the_two_actions_round_trip_and_describe_themselves() -> None:
    op = op_from_toml({"action": "set_eoi_exit_bitmap", "vcpu": 1, "vectors": [0x51, 0x31]})
    assert op == SetEoiExitBitmap(1, (0x51, 0x31))
    assert op.to_toml() == {"action": "set_eoi_exit_bitmap", "vcpu": 1, "vectors": [0x51, 0x31]}
    assert op.describe() == "set_eoi_exit_bitmap cpu1 [0x51,0x31]"
    assert SetIf(0, False).describe() == "cli cpu0"
    assert SetIf(0, True).describe() == "sti cpu0"


@pytest.mark.parametrize(
    ("expect", "message"),
    [
        ('pid = { "1" = { xyz = 1 } }', "'xyz' is not a PID field"),
        ('pid = { "1" = { on = 1 } }', "on: must be true or false"),
        ('pid = { "1" = { nv = 0x100 } }', "nv:"),
        ('pid = { "1" = { pir = [0x141] } }', "pir: must be an array of vectors"),
        ("notifications = [[1]]", "must be an array of [host APIC ID, vector] pairs"),
        ("notifications = [[1, 0x1F2]]", "must be an array of [host APIC ID, vector] pairs"),
        ('intr_status = { "1" = [1] }', "must be [RVI, SVI]"),
    ],
)
def test_a_malformed_apicv_expectation_is_named_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], expect: str, message: str
) -> None:
    path = write(
        tmp_path,
        VM.format(accel="apicv")
        + f"""
        [[step]]
        action = "run"
        vcpu = 1
        expect = {{ {expect} }}
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert f"{path}:" in err


def test_an_eoi_exit_bitmap_takes_vectors_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        VM.format(accel="apicv")
        + """
        [[step]]
        action = "set_eoi_exit_bitmap"
        vcpu = 1
        vectors = [0x51, 0x100]
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, 'vectors =')}" in err
    assert "must be an array of vectors 0..255" in err


def test_a_wrong_pid_expectation_names_the_vcpu_and_the_field__PI_H1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        VM.format(accel="ipiv")
        + """
        [[step]]
        action = "preempt"
        vcpu = 1
        expect = { pid = { sn = false, nv = 0xF2 } }
        """,
    )
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"FAIL {path}:{line_of(path, 'expect =')}: step 1 (preempt): expect.pid.sn:" in err
    assert "vCPU 1 PID.SN is 1, expected 0" in err
    assert "expect.pid.nv" not in err


def test_notifications_are_those_of_the_step_in_order__PI_J2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        VM.format(accel="ipiv")
        + """
        [[step]]
        action = "icr"
        vcpu = 0
        dest = 1
        vector = 0x41
        expect = { notifications = [[1, 0xF2]], stats = { notifications = 1, posted = 1 } }

        [[step]]
        action = "icr"
        vcpu = 0
        dest = 1
        vector = 0x42
        expect = { notifications = [[1, 0xF1]] }
        """,
    )
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "step 2 (icr): expect.notifications: notifications sent [(0x1, 0xf2)], " in err
    assert "expected [(0x1, 0xf1)]" in err
    assert "step 1" not in err


def test_apicv_expectations_are_skipped_where_there_is_no_apicv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under ``emulated`` a ``pid`` or ``intr_status`` expectation cannot be observed: a SKIP
    line, not a failure; ``notifications`` likewise."""
    path = write(
        tmp_path,
        VM.format(accel="emulated")
        + """
        [[step]]
        action = "icr"
        vcpu = 0
        dest = 1
        vector = 0x41
        [step.expect]
        irr = { "1" = [0x41] }
        pid = { "1" = { on = true } }
        intr_status = { "1" = [0x41, 0] }
        notifications = []
        """,
    )
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "expect.pid.on vCPU 1: expected True; accelerator 'emulated' has no pid" in out
    assert "expect.intr_status vCPU 1" in out and "has no guest_interrupt_status" in out
    assert "expect.notifications: expected []" in out
    assert "PASS" in out


def test_set_if_and_the_eoi_exit_bitmap_reach_the_model__VID_5_IPIV_5(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        VM.format(accel="apicv")
        + """
        [[step]]
        action = "set_if"
        vcpu = 1
        value = false

        [[step]]
        action = "set_eoi_exit_bitmap"
        vcpu = 1
        vectors = [0x51, 0x61]
        """,
    )
    vm = build_vm(scenario.load(path).vm)
    report = Runner(scenario.load(path), vm).run()
    assert report.passed and not report.skipped
    assert vm.vcpu(1).guest_if is False
    assert isinstance(vm.accel, ApicvState)
    assert vm.accel.eoi_exit_bitmap(1) == {0x51, 0x61}


def test_a_backend_without_them_skips_the_two_actions() -> None:
    class NoModel:
        def vcpu(self, i: int) -> object:
            return object()

    backend = HostOnly(NoModel())  # type: ignore[arg-type]
    with pytest.raises(Unsupported, match=r"RFLAGS\.IF"):
        SetIf(0, True).perform(backend)
    with pytest.raises(Unsupported, match="EOI-exit bitmap"):
        SetEoiExitBitmap(0, (0x51,)).perform(backend)
