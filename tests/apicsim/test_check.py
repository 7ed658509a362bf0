"""``apicsim check``: the shipped scenarios on the model and on the host's KVM, expectation by
expectation; wrong expectations fail on both backends; model-only scenarios are reported.

The command is :mod:`apicsim.check`; the runner and its backend adapters are in
:mod:`apicsim.scenario`.  The kvm tests are skipped, with ``kvm_available()``'s reason, where
``/dev/kvm`` is missing or unusable.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from apicsim import check, scenario
from apicsim.cli import main
from apicsim.kvm import kvm_available

from .scenario_files import line_of

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "specs" / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.toml"))
BOTH = [p for p in SHIPPED if "kvm" in scenario.load(p).backends]
MODEL_ONLY = [p for p in SHIPPED if scenario.load(p).backends == ("model",)]

KVM_OK, KVM_WHY = kvm_available()
needs_kvm = pytest.mark.skipif(not KVM_OK, reason=f"KVM backend unavailable: {KVM_WHY}")
BACKENDS = ["model", pytest.param("kvm", marks=needs_kvm)]

VMCALL_SKIP = "hypercall"
"""The one reason a kvm scenario may be skipped on a host: its guest's VMCALL cannot reach
KVM (KVMB-6).  Anything else the kvm backend cannot do makes the scenario model-only."""


def write(
    tmp_path: Path, body: str, *, backends: str = '["model", "kvm"]', name: str = "t"
) -> Path:
    path = tmp_path / f"{name}.toml"
    header = (
        f'name = "{name}"\n'
        'description = "A test scenario. Model-only: only when backends says so."\n'
        'rules = ["ICR-2"]\n'
        f"backends = {backends}\n"
    )
    path.write_text(header + textwrap.dedent(body), encoding="utf-8")
    return path


def run_check(paths: list[Path], backend: str) -> tuple[int, list[check.FileResult], str]:
    out, err = io.StringIO(), io.StringIO()
    status, results = check.check(paths, backend, out, err)
    return status, results, out.getvalue() + err.getvalue()


# =========================================================================================
# The shipped scenarios
# =========================================================================================
def test_check_on_the_model_passes_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(SCENARIOS)]) == 0
    out = capsys.readouterr().out
    n = len(SHIPPED)
    assert f"{n} scenario files: {n} passed, 0 failed, 0 skipped, 0 model-only, 0 errors" in out
    assert "FAIL" not in out


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_scenario_passes_every_expectation_on_the_model(path: Path) -> None:
    status, [result], text = run_check([path], "model")
    assert (status, result.status) == (0, "PASS"), text
    assert result.count("PASS") > 0
    assert result.count("SKIP") == 0, "the model observes every expectation"


@needs_kvm
def test_check_on_kvm_passes_every_scenario_that_is_not_model_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--backend", "kvm", str(SCENARIOS)]) == 0
    out = capsys.readouterr().out
    assert f"{len(MODEL_ONLY)} model-only, 0 errors" in out
    assert ", 0 failed," in out


@needs_kvm
@pytest.mark.parametrize("path", BOTH, ids=[p.stem for p in BOTH])
def test_every_kvm_scenario_passes_on_kvm(path: Path) -> None:
    status, [result], text = run_check([path], "kvm")
    assert status == 0, text
    if result.status == "SKIP":
        # only a hypercall the host cannot deliver; the steps before it must have passed
        assert VMCALL_SKIP in result.reason, result.reason
    else:
        assert result.status == "PASS", text
    assert result.count("FAIL") == 0


@needs_kvm
def test_kvm_reports_the_model_counters_as_skipped_expectations() -> None:
    path = SCENARIOS / "xapic_unicast_mmio.toml"
    status, [result], text = run_check([path], "kvm")
    assert (status, result.status) == (0, "PASS"), text
    assert "SKIP" in text and "expect.exits: expected 1; not observable on kvm" in text
    assert "expect.irr vCPU 3: expected {0xf1}, got {0xf1}" in text


@pytest.mark.parametrize("path", MODEL_ONLY, ids=[p.stem for p in MODEL_ONLY])
def test_model_only_scenarios_are_reported_as_such_on_kvm(path: Path) -> None:
    out = io.StringIO()
    result = check.check_file(path, "kvm", out)
    assert result.status == "MODEL-ONLY"
    assert not result.verdicts, "a model-only scenario is not run on kvm"
    assert "model-only" in result.reason.lower(), "the reason comes from the description"
    assert out.getvalue().startswith(f"MODEL-ONLY {scenario.load(path).name} ")


def test_model_only_scenarios_say_why_in_a_header_comment() -> None:
    for path in MODEL_ONLY:
        text = path.read_text(encoding="utf-8")
        assert "model-only" in text.lower(), path.name


# =========================================================================================
# Wrong expectations fail on both backends, naming the file, line, step and field
# =========================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wrong_expectation_fails_with_its_step_and_field(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2
        svr = 0x1FF

        [[step]]
        action = "mmio_read"
        vcpu = 0
        offset = 0x30
        expect = { value = 0x50014 }

        [[step]]
        action = "icr"
        vcpu = 0
        dest = 1
        vector = 0x40
        expect = { irr = { "1" = [0x41] } }

        [[step]]
        action = "mmio_read"
        vcpu = 1
        offset = 0x20
        expect = { value = 0x01000000 }
        """,
    )
    assert main(["check", "--backend", backend, str(path)]) == 1
    out = capsys.readouterr().out
    assert (
        f"PASS {path}:{line_of(path, 'value = 0x50014')}: step 1 (mmio_read): expect.value: " in out
    )
    line = line_of(path, "[0x41]")
    assert (
        f"FAIL {path}:{line}: step 2 (icr): expect.irr vCPU 1: expected {{0x41}}, got {{0x40}}"
        in out
    )
    assert "step 3" not in out, "the file stops at the failing step"
    assert f"FAIL t ({path}): 1 expectations passed, 1 failed" in out
    assert "1 scenario files: 0 passed, 1 failed" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wrong_register_expectation_names_the_register(backend: str, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2
        mode = "x2apic"
        svr = 0x1FF

        [[step]]
        action = "wrmsr"
        vcpu = 0
        msr = 0x830
        value = 0x1_000040F1
        expect = { regs = { "0" = { ICR = 0x1_000040F1 }, "1" = { ID = 1, LDR = 2, PPR = 0x10 } } }
        """,
    )
    status, [result], text = run_check([path], backend)
    assert status == 1, text
    fails = [v for v in result.verdicts if v.status == "FAIL"]
    assert [(v.field, v.vcpu) for v in fails] == [("expect.regs.PPR", 1)], text
    assert "expected 0x10, got 0x0" in str(fails[0])
    passed = {(v.field, v.vcpu) for v in result.verdicts if v.status == "PASS"}
    assert {("expect.regs.ICR", 0), ("expect.regs.ID", 1), ("expect.regs.LDR", 1)} <= passed


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unexpected_fault_fails_the_action(backend: str, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[step]]
        action = "rdmsr"
        vcpu = 0
        msr = 0x830
        expect = { value = 0 }
        """,
    )
    status, [result], text = run_check([path], backend)
    assert status == 1
    assert f"FAIL {path}:{line_of(path, '[[step]]')}: step 1 (rdmsr): action: unexpected" in text
    assert [v.status for v in result.verdicts] == ["FAIL", "SKIP"], text


# =========================================================================================
# What the kvm backend cannot do: the scenario is skipped, with the reason
# =========================================================================================
def test_a_run_step_skips_a_kvm_scenario_before_it_starts(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2

        [[step]]
        action = "rdmsr"
        vcpu = 0
        msr = 0x1B
        expect = { value = 0xFEE00900 }

        [[step]]
        action = "run"
        vcpu = 1
        expect = { result = [] }
        """,
    )
    result = check.check_file(path, "kvm", io.StringIO())
    assert result.status == "SKIP"
    step_lines = [n for n, t in enumerate(path.read_text().splitlines(), 1) if t == "[[step]]"]
    assert result.reason.startswith(f"step 2 (run, line {step_lines[1]}): ")
    assert "KvmVm has no 'run'" in result.reason
    assert not result.verdicts
    assert check.check_file(path, "model", io.StringIO()).status == "PASS"


@pytest.mark.parametrize(
    ("vm", "reason"),
    [
        ('profile = "sdm"', "[vm]: profile 'sdm'"),
        ("profile_changes = { esr_latching = true }", "[vm]: profile_changes (esr_latching)"),
        ("aps_started = false", "[vm]: KvmVm makes every vCPU runnable"),
        ("enforce_pv_cpuid = true", "[vm]: KvmVm gives the guest KVM's supported PV CPUID"),
    ],
)
def test_options_a_real_kvm_cannot_take_skip_the_scenario(
    vm: str, reason: str, tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        f"""
        [vm]
        vcpus = 2
        {vm}

        [[step]]
        action = "rdmsr"
        vcpu = 0
        msr = 0x1B
        expect = {{ value = 0xFEE00900 }}
        """,
    )
    out = io.StringIO()
    result = check.check_file(path, "kvm", out)
    assert result.status == "SKIP", out.getvalue()
    assert result.reason.startswith(reason), result.reason


def test_an_accelerator_other_than_emulated_skips_a_kvm_scenario(tmp_path: Path) -> None:
    import dataclasses

    path = write(
        tmp_path,
        """
        [vm]
        accelerator = "emulated"

        [[step]]
        action = "get_msr"
        vcpu = 0
        msr = 0x1B
        expect = { value = 0xFEE00900 }
        """,
    )
    sc = scenario.load(path)
    other = dataclasses.replace(sc, vm=dataclasses.replace(sc.vm, accelerator="apicv"))
    with pytest.raises(scenario.Unsupported, match=r"^\[vm\]: accelerator 'apicv' is the model's"):
        scenario.open_backend(other, "kvm")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_macro_actions_pass_on_both_backends__ICR_2(backend: str, tmp_path: Path) -> None:
    from tests.apicsim.test_scenarios import MACROS

    path = write(tmp_path, MACROS)
    status, [result], text = run_check([path], backend)
    assert status == 0, text
    assert result.status == "PASS", text
    assert "FAIL" not in {v.status for v in result.verdicts}


@needs_kvm
def test_features_the_host_lacks_skip_the_scenario(tmp_path: Path) -> None:
    from apicsim.kvm import guest_features

    other = not guest_features().intel_compatible
    path = write(
        tmp_path,
        f"""
        [vm]
        features = {{ intel_compatible = {"true" if other else "false"} }}

        [[step]]
        action = "rdmsr"
        vcpu = 0
        msr = 0x1B
        expect = {{ value = 0xFEE00900 }}
        """,
    )
    result = check.check_file(path, "kvm", io.StringIO())
    assert result.status == "SKIP"
    assert "features.intel_compatible" in result.reason


@needs_kvm
def test_a_hypercall_that_cannot_reach_kvm_skips_from_that_step(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2
        svr = 0x1FF

        [[step]]
        action = "icr"
        vcpu = 0
        dest = 1
        vector = 0x40
        expect = { irr = { "1" = [0x40] } }

        [[step]]
        action = "hypercall"
        vcpu = 0
        nr = 10
        a0 = 0b10
        a3 = 0xF1
        expect = { result = 1 }
        """,
    )
    result = check.check_file(path, "kvm", io.StringIO())
    if result.status == "PASS":  # a host whose guest VMCALL reaches KVM
        return
    assert result.status == "SKIP"
    assert result.reason.startswith("step 2 (hypercall")
    assert [(v.status, v.step) for v in result.verdicts] == [("PASS", 1)]


# =========================================================================================
# The command line
# =========================================================================================
def test_a_directory_is_searched_recursively(tmp_path: Path) -> None:
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    body = """
        [[step]]
        action = "rdmsr"
        vcpu = 0
        msr = 0x1B
        expect = { value = 0xFEE00900 }
        """
    write(tmp_path, body, name="top", backends='["model"]')
    write(sub, body, name="deep", backends='["model"]')
    assert [p.name for p in check.expand([tmp_path])] == ["deep.toml", "top.toml"]
    status, results, _ = run_check([tmp_path], "model")
    assert status == 0
    assert [r.status for r in results] == ["PASS", "PASS"]


def test_a_malformed_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[[step]]\naction = "rdmsr"\nvcpu = 0\nmsrr = 0x1B\n')
    assert main(["check", str(path)]) == 2
    out = capsys.readouterr().out
    assert f"ERROR {path}:" in out and "'msrr'" in out


def test_no_files_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path)]) == 2
    assert "no scenario files found" in capsys.readouterr().err


def test_apicsim_run_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-q", str(SCENARIOS)]) == 0
    assert f"{len(SHIPPED)} scenario files: all passed" in capsys.readouterr().out
