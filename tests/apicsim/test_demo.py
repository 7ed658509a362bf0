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


def test_the_demo_shows_the_apicv_and_ipiv_columns__IPIV_3_IPIV_5_PI_J2_VID_6(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """IPIV-3: under IPIv x2apic_phys's physical unicasts cost no exit, x2apic_cluster's
    logical writes one APIC-write exit each (5); without IPIv (VID-6, IPIV-1) every ICR WRMSR
    is an MSR-write exit.  PI-J2: each of the 79 vectors is posted once, and a running target
    is notified with 0xF2.  IPIV-5: under IPIv the CPU notifies a halted target with the
    wake-up vector 0xF1 (40 of them) and each is woken once; without IPIv, and for KVM's own
    posts, the halted targets are woken by KVM directly."""
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert row(out, "APICv VM exits") == ["79", "79", "5", "5"]
    assert row(out, "APICv MSR-write exits") == ["79", "79", "5", "5"]
    assert row(out, "APICv APIC-write exits") == ["0"] * 4
    assert row(out, "IPIv VM exits") == ["0", "0", "5", "5"]
    assert row(out, "IPIv APIC-write exits") == ["0", "0", "5", "5"]
    for title in ("APICv", "IPIv"):
        assert row(out, f"{title} posted") == ["79"] * 4
        assert row(out, f"{title} notify 0xf2") == ["79", "39", "79", "39"]
        assert row(out, f"{title} wake-ups") == ["0", "40", "0", "40"]
        assert row(out, f"{title} handled 0xf0") == ["79/79"] * 4
        assert row(out, f"{title} result") == ["PASS"] * 4
    assert row(out, "APICv notify 0xf1") == ["0"] * 4
    assert row(out, "IPIv notify 0xf1") == ["0", "40", "0", "0"]
    assert row(out, "AVIC VM exits") == ["0", "40", "0", "5"]


def test_the_demo_fails_when_an_apicv_vcpu_misses_the_ipi(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hypervisor.accel.apicv import ApicvState

    deliver = ApicvState.deliver_interrupt

    def lossy(self: ApicvState, apic: LocalApic, vector: int, level: bool) -> bool:
        if apic.vcpu_id == 7 and vector == 0xF0 and self.name == "apicv":
            return False  # KVM's sender drops it
        return deliver(self, apic, vector, level)

    monkeypatch.setattr(ApicvState, "deliver_interrupt", lossy)
    assert main(["demo"]) == 1
    out = capsys.readouterr().out
    assert row(out, "APICv result") == ["FAIL"] * 4
    assert row(out, "IPIv result")[:2] == ["PASS", "PASS"]
    assert "APICv FAIL x2apic_phys/running: vCPUs [7] missed 0xf0" in out
