"""``apicsim demo``: the cost of one broadcast under x2apic_phys, x2apic_cluster and kvm_pv."""

from __future__ import annotations

import math

import pytest

from apicsim.cli import main
from hypervisor import Vm
from lapic.apic import LocalApic
from lapic.icr import Interrupt


def row(out: str, name: str) -> list[str]:
    """The cells of the table row called ``name``."""
    for line in out.splitlines():
        if line.startswith(name + " "):
            return line[len(name) :].split()
    raise AssertionError(f"no row {name!r} in:\n{out}")


def test_the_demo_exits_zero_and_shows_79_5_1_exits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert row(out, "VM exits") == ["79", "5", "1"]


def test_the_demo_names_the_three_drivers_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "x2apic_phys" in line and "kvm_pv" in line)
    assert header.index("x2apic_phys") < header.index("x2apic_cluster") < header.index("kvm_pv")


def test_only_the_pv_driver_makes_a_hypercall_and_only_the_others_write_msrs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert row(out, "hypercalls") == ["0", "0", "1"]
    assert row(out, "MSR writes") == ["79", "5", "0"]
    assert row(out, "IPIs accepted") == ["79", "79", "79"]
    assert row(out, "handled 0xf0 once") == ["79/79"] * 3
    assert row(out, "result") == ["PASS"] * 3
    assert out.count("\nPASS ") == 3


def test_the_demo_scales_with_the_number_of_vcpus(capsys: pytest.CaptureFixture[str]) -> None:
    """200 vCPUs: 199 destinations; 13 clusters of 16; IDs 1..199 need two 128-ID windows."""
    assert main(["demo", "--vcpus", "200", "--vector", "0x41"]) == 0
    out = capsys.readouterr().out
    assert row(out, "VM exits") == ["199", "13", "2"]
    assert math.ceil(200 / 16) == 13
    assert row(out, "handled 0x41 once") == ["199/199"] * 3


def test_the_demo_fails_when_a_vcpu_misses_the_ipi(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    accept = Vm._accept

    def lossy(self: Vm, apic: LocalApic, irq: Interrupt) -> bool:
        if apic.vcpu_id == 7 and irq.vector == 0xF0:
            return False
        return accept(self, apic, irq)

    monkeypatch.setattr(Vm, "_accept", lossy)
    assert main(["demo"]) == 1
    out = capsys.readouterr().out
    assert row(out, "result") == ["FAIL"] * 3
    assert "vCPU 7 x0" in out


@pytest.mark.parametrize(
    "args", [["demo", "--vector", "0x300"], ["demo", "--vcpus", "1"], ["demo", "--vector", "x"]]
)
def test_the_demo_rejects_bad_options(args: list[str]) -> None:
    assert main(args) == 2


def test_the_demo_shows_the_avic_columns_running_and_half_halted__AV_B2_AV_C4(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """AV-B2: with every target running the CPU sends all 79 IPIs with no exit and one
    doorbell each; with the 40 odd vCPUs halted, x2apic_phys exits once per halted target
    (TARGET_NOT_RUNNING) and KVM wakes each once."""
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert row(out, "AVIC VM exits") == ["0", "40", "0", "5"]
    assert row(out, "AVIC incomplete IPIs") == ["0", "40", "0", "5"]
    assert row(out, "AVIC doorbells")[:3] == ["79", "39", "79"]
    assert row(out, "AVIC wake-ups") == ["0", "40", "0", "40"]
    assert row(out, "AVIC result") == ["PASS"] * 4
    assert row(out, "VM exits") == ["79", "5", "1"]
