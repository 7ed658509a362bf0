"""``apicsim run``: the shipped scenarios pass, and broken files fail loudly and precisely.

The scenario format is documented in ``apicsim/scenario/__init__.py`` and
``specs/scenarios/README.md``; the actions are the operations of ``apicsim.ops``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from apicsim import scenario
from apicsim.cli import main
from lapic.profile import LowestPriorityPolicy

from .scenario_files import line_of

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "specs" / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.toml"))

HEADER = """\
name = "t"
description = "A test scenario."
rules = ["ICR-2"]
backends = ["model"]
"""


def write(tmp_path: Path, body: str, name: str = "t.toml") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + textwrap.dedent(body), encoding="utf-8")
    return path


# =========================================================================================
# The shipped scenarios
# =========================================================================================
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_scenario_passes(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"PASS {scenario.load(path).name}" in out


def test_at_least_fifteen_scenarios_are_shipped() -> None:
    assert len(SHIPPED) >= 15


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_scenario_runs_on_the_model_and_names_its_rules(path: Path) -> None:
    sc = scenario.load(path)
    assert "model" in sc.backends
    assert sc.rules
    assert all(step.expect for step in sc.steps[-1:]), "the last step should check something"


def test_model_only_scenarios_say_so_in_their_description() -> None:
    for path in SHIPPED:
        sc = scenario.load(path)
        if "kvm" not in sc.backends:
            assert "model-only" in sc.description.lower(), path.name


def test_scenario_names_are_unique() -> None:
    names = [scenario.load(p).name for p in SHIPPED]
    assert len(names) == len(set(names))


def test_the_required_topics_each_have_a_scenario() -> None:
    rules = {r for p in SHIPPED for r in scenario.load(p).rules}
    for rule in (
        "ICR-2", "ICR-3", "ICR-5", "MATCH-1", "LP-2", "BASE-4", "BASE-6", "STATE-3", "PVH-1",
        "PVH-4", "PVH-6", "FAST-8", "MAP-2", "BUG-15", "PRIO-5", "PRIO-3", "TIMER-2", "DIFF-D1",
    ):  # fmt: skip
        assert rule in rules, rule


def test_a_directory_runs_every_scenario_in_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--quiet", str(SCENARIOS)]) == 0
    out = capsys.readouterr().out
    assert f"{len(SHIPPED)} scenario files: all passed" in out
    assert "step" not in out.split("PASS", 1)[0], "--quiet prints no step table"


def test_python_dash_m_apicsim_runs_a_scenario() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "apicsim", "run", "-q", str(SCENARIOS / "x2apic_self_ipi.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "PASS x2apic-self-ipi" in proc.stdout


# =========================================================================================
# Malformed files: exit 2, with the file, the line and the field
# =========================================================================================
def test_an_unknown_step_key_names_its_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2

        [[step]]
        action = "icr"
        vcpu = 0
        vectr = 0xF1
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, 'vectr')}:" in err
    assert "step 1" in err
    assert "'vectr'" in err
    assert "unknown key" in err


def test_a_wrong_type_in_the_vm_section_names_its_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = "2"

        [[step]]
        action = "run"
        vcpu = 0
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, 'vcpus =')}:" in err
    assert "[vm] field 'vcpus'" in err
    assert "must be an integer" in err


def test_a_missing_step_field_names_the_step_line_and_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [[step]]
        action = "run"
        vcpu = 0

        [[step]]
        action = "wrmsr"
        vcpu = 0
        msr = 0x830
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    second_step = [i for i, t in enumerate(path.read_text().splitlines(), 1) if t == "[[step]]"][1]
    assert f"{path}:{second_step}:" in err
    assert "step 2 (wrmsr)" in err
    assert "missing required field 'value'" in err


def test_a_bad_expectation_value_names_its_line_in_a_sub_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [[step]]
        action = "rdmsr"
        vcpu = 0
        msr = 0x1B
        [step.expect]
        value = 0x1B
        irr = [0x300]
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, 'irr =')}:" in err
    assert "'expect.irr'" in err


def test_a_vcpu_index_that_does_not_exist_is_malformed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2

        [[step]]
        action = "run"
        vcpu = 2
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, 'vcpu = 2')}:" in err
    assert "does not exist" in err


def test_a_guest_action_without_a_guest_section_is_malformed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [[step]]
        action = "send_ipi"
        cpu = 0
        kind = "self"
        vector = 0xF1
        """,
    )
    assert main(["run", str(path)]) == 2
    assert "needs a [guest] section" in capsys.readouterr().err


def test_a_toml_syntax_error_names_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[vm\nvcpus = 2\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, '[vm')}:" in err
    assert "TOML syntax error" in err


def test_a_missing_header_field_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.toml"
    path.write_text('name = "t"\nrules = []\nbackends = ["model"]\n[[step]]\naction = "run"\n'
                    "vcpu = 0\n")  # fmt: skip
    assert main(["run", str(path)]) == 2
    assert "missing required field 'description'" in capsys.readouterr().err


def test_a_file_that_does_not_exist_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tmp_path / "absent.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


# =========================================================================================
# Failing expectations: exit 1, with the file, the step, the line and the field
# =========================================================================================
def test_a_failing_expectation_names_the_file_step_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2
        svr = 0x1FF

        [[step]]
        action = "run"
        vcpu = 0

        [[step]]
        action = "icr"
        vcpu = 0
        dest = 1
        vector = 0x40
        expect = { exits = 2, irr = { "1" = [0x41] } }
        """,
    )
    assert main(["run", str(path)]) == 1
    captured = capsys.readouterr()
    line = line_of(path, "expect = {")
    assert f"FAIL {path}:{line}: step 2 (icr): expect.irr:" in captured.err
    assert "vCPU 1 IRR is {0x40}, expected {0x41}" in captured.err
    assert "FAIL t" in captured.out


def test_the_run_stops_after_the_first_failing_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [[step]]
        action = "rdmsr"
        vcpu = 0
        msr = 0x1B
        expect = { value = 0 }

        [[step]]
        action = "rdmsr"
        vcpu = 0
        msr = 0x1B
        expect = { value = 1 }
        """,
    )
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "step 1 (rdmsr): expect.value: read 0xfee00900, expected 0" in err
    assert "step 2" not in err


def test_an_unexpected_fault_fails_the_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [[step]]
        action = "wrmsr"
        vcpu = 0
        msr = 0x1B
        value = 0xFEE00A00
        """,
    )
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, '[[step]]')}: step 1 (wrmsr): action: unexpected" in err
    assert "#GP" in err


def test_an_expected_fault_that_does_not_happen_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [[step]]
        action = "wrmsr"
        vcpu = 0
        msr = 0x1B
        value = 0xFEE00900
        expect = { fault = 13 }
        """,
    )
    assert main(["run", str(path)]) == 1
    assert "expect.fault: no fault was raised, expected #GP" in capsys.readouterr().err


def test_a_negative_hypercall_result_matches_rax_in_both_modes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2

        [[step]]
        action = "hypercall"
        vcpu = 0
        nr = 10
        a3 = 0x8F1
        expect = { result = -22 }

        [[step]]
        action = "hypercall"
        vcpu = 0
        nr = 10
        a3 = 0x8F1
        long_mode = false
        expect = { result = -22 }

        [[step]]
        action = "hypercall"
        vcpu = 0
        nr = 10
        a3 = 0x8F1
        long_mode = false
        expect = { result = 0xFFFFFFEA }
        """,
    )
    assert main(["run", "-q", str(path)]) == 0


def test_a_stats_expectation_checks_the_delta_of_the_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2
        mode = "x2apic"
        svr = 0x1FF

        [[step]]
        action = "icr"
        vcpu = 0
        dest = 1
        vector = 0xF1
        expect = { stats = { MSR_WRITE = 1, ipis = 1, irqs_accepted = 2 } }
        """,
    )
    assert main(["run", "-q", str(path)]) == 1
    assert "expect.stats.irqs_accepted: changed by 1, expected 2" in capsys.readouterr().err


def test_a_scenario_without_the_model_backend_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.toml"
    path.write_text(
        HEADER.replace('["model"]', '["kvm"]') + '[[step]]\naction = "run"\nvcpu = 0\n',
        encoding="utf-8",
    )
    assert main(["run", str(path)]) == 0
    assert "SKIP t" in capsys.readouterr().out


# =========================================================================================
# Output and parsing details
# =========================================================================================
def test_the_step_table_shows_the_result_and_the_vcpus_whose_irr_changed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", str(SCENARIOS / "xapic_unicast_mmio.toml")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "+0x300 = 0x50f1" in line)
    assert "cpu3 IRR={0xf1}" in row
    read = next(line for line in out.splitlines() if "mmio_read cpu0 +0x300" in line)
    assert "0x40f1" in read


def test_the_locator_finds_keys_in_inline_tables_and_sub_tables() -> None:
    text = textwrap.dedent(
        """\
        name = "x"
        [vm]
        vcpus = 2
        features = { x2apic = false }
        [[step]]
        action = "rdmsr"
        value = 1
        expect = { value = 2, irr = [] }
        [[step]]
        action = "run"
        [step.expect]
        irr = []
        """
    )
    loc = scenario.Locator(text)
    assert loc.step_line(1) == 5
    assert loc.step_line(2) == 9
    assert loc.find("vcpus", "vm") == 3
    assert loc.find("x2apic", "vm.features") == 4
    assert loc.find("value", step=1) == 7
    assert loc.find("value", step=1, after="expect") == 8
    assert loc.find("irr", step=2, after="expect") == 12


def test_set_lapic_reports_einval_as_minus_22(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2
        x2apic_format = true
        mode = "x2apic"

        [[step]]
        action = "set_lapic"
        vcpu = 1
        writes = { "0x20" = 7 }
        expect = { result = -22 }
        """,
    )
    assert main(["run", "-q", str(path)]) == 0


def test_a_guest_that_cannot_boot_is_reported_at_the_guest_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 9

        [guest]
        driver = "flat"

        [[step]]
        action = "run"
        vcpu = 0
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, '[guest]')}: [guest]: the set-up failed" in err


def test_a_vm_set_up_that_faults_is_reported_at_the_vm_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2
        mode = "x2apic"
        features = { x2apic = false }

        [[step]]
        action = "run"
        vcpu = 0
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, '[vm]')}: [vm]: the set-up failed" in err


# =========================================================================================
# The macro actions of apicsim.ops, the host MSR read, and [vm] accelerator
# =========================================================================================
MACROS = """
        [vm]
        vcpus = 2
        svr = 0x1FF

        [[step]]
        action = "reg_write"          # xAPIC mode: an MMIO write of TPR
        vcpu = 1
        offset = 0x80
        value = 0x20
        expect = { exits = 1, regs = { TPR = 0x20 } }

        [[step]]
        action = "reg_read"
        vcpu = 1
        offset = 0x80
        expect = { value = 0x20 }

        [[step]]
        action = "ipi"                # ICR2 then ICR: fixed 0xF1 to APIC ID 1 (ICR-2)
        vcpu = 0
        dest = 1
        low = 0x40F1
        expect = { exits = 2, irr = { "1" = [0xF1] } }

        [[step]]
        action = "set_base"           # host KVM_SET_MSRS: xAPIC -> x2APIC, BSP kept (BASE-2)
        vcpu = 0
        host = true
        mode = "x2apic"
        expect = { regs = { APIC_BASE = 0xFEE00D00 } }

        [[step]]
        action = "get_msr"
        vcpu = 0
        msr = 0x1B
        expect = { value = 0xFEE00D00, result = 0xFEE00D00 }

        [[step]]
        action = "restore"            # KVM_SET_LAPIC of the image as read, TPR replaced
        vcpu = 1
        writes = { "0x80" = 0x30, "0x20" = "as read" }
        expect = { result = 0, regs = { TPR = 0x30 }, irr = [0xF1] }
"""


def test_the_macro_actions_go_through_the_vcpus_current_interface__ICR_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, MACROS)
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "cpu0 IPI dest=0x1 icr=0x40f1" in out
    assert "host restore cpu1 {0x80=0x30, 0x20=as read}" in out
    assert "PASS t: 6 steps" in out


def test_every_step_of_a_scenario_round_trips_through_its_operation(tmp_path: Path) -> None:
    import tomllib

    from apicsim.ops import op_from_toml

    path = write(tmp_path, MACROS)
    sc = scenario.load(path)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))["step"]
    for step, table in zip(sc.steps, raw, strict=True):
        assert op_from_toml(step.op.to_toml()) == step.op
        assert op_from_toml(table) == step.op


def test_an_accelerator_by_name_is_the_vms(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2
        accelerator = "emulated"

        [[step]]
        action = "rdmsr"
        vcpu = 1
        msr = 0x1B
        expect = { value = 0xFEE00800 }
        """,
    )
    sc = scenario.load(path)
    assert sc.vm.accelerator == "emulated"
    assert main(["run", "-q", str(path)]) == 0


def test_an_unknown_accelerator_names_its_line_and_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2
        accelerator = "no-such-accelerator"

        [[step]]
        action = "run"
        vcpu = 0
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, 'accelerator')}: [vm] field 'accelerator': " in err
    assert "must be one of emulated, avic, apicv, ipiv, got 'no-such-accelerator'" in err


def test_a_restore_value_must_be_a_dword_or_as_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [[step]]
        action = "restore"
        vcpu = 0
        writes = { "0x80" = "kept" }
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line_of(path, 'writes')}: step 1, field 'writes'" in err
    assert '"as read"' in err


def test_halt_blocks_until_a_deliverable_ipi_wakes_the_vcpu__WAKE_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        vcpus = 2
        svr = 0x1FF

        [[step]]
        action = "halt"               # nothing pending: the vCPU blocks (one HLT exit)
        vcpu = 1
        expect = { result = true, exits = 1, stats = { HLT = 1 } }

        [[step]]
        action = "icr"                # a fixed IPI above PPR wakes it (WAKE-1)
        vcpu = 0
        dest = 1
        vector = 0x41
        expect = { irr = { "1" = [0x41] }, stats = { wakeups = 1 } }

        [[step]]
        action = "halt"               # a deliverable vector is pending: HLT does not block
        vcpu = 1
        expect = { result = false }

        [[step]]
        action = "run"
        vcpu = 1
        expect = { result = [0x41] }
        """,
    )
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    assert "halt cpu1" in capsys.readouterr().out
    sc = scenario.load(path)
    from apicsim.scenario import open_backend

    with pytest.raises(scenario.Unsupported, match=r"step 1 \(halt, line \d+\): KvmVm's guest"):
        open_backend(sc, "kvm")


# =========================================================================================
# [vm] kvm_options: the KVM-level knobs of hypervisor.config.KvmOptions
# =========================================================================================
@pytest.mark.parametrize(("optimized", "fast", "slow"), [(True, 1, 0), (False, 0, 1)])
def test_kvm_options_choose_whether_the_optimized_map_delivers__FAST_1(
    tmp_path: Path, optimized: bool, fast: int, slow: int
) -> None:
    stats = f"{{ fast_path = {fast}, slow_path = {slow} }}"
    path = write(
        tmp_path,
        f"""
        [vm]
        vcpus = 2
        svr = 0x1FF
        kvm_options = {{ optimized_apic_map = {str(optimized).lower()} }}

        [[step]]
        action = "msi"
        address_lo = 0xFEE01000
        data = 0x41
        expect = {{ result = 1, irr = {{ 1 = [0x41] }}, stats = {stats} }}
        """,
    )
    assert main(["run", str(path)]) == 0


def test_kvm_options_lowest_priority_takes_a_policy_name_and_rejects_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """
        [vm]
        kvm_options = { lowest_priority = "fastest" }

        [[step]]
        action = "run"
        vcpu = 0
        """,
    )
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[vm.kvm_options] field 'lowest_priority'" in err
    assert "vector_hashing, arb_counter, lowest_tpr" in err
    assert scenario.load(
        write(
            tmp_path,
            '[vm]\nkvm_options = { lowest_priority = "arb_counter" }\n'
            '[[step]]\naction = "run"\nvcpu = 0\n',
            "ok.toml",
        )
    ).vm.kvm_options == (("lowest_priority", LowestPriorityPolicy.ARB_COUNTER),)


def test_kvm_options_reject_an_unknown_knob_and_a_non_boolean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for body, field in (
        ("kvm_options = { broadcast = true }", "broadcast"),
        ("kvm_options = { optimized_apic_map = 1 }", "optimized_apic_map"),
        ("kvm_options = 3", "kvm_options"),
    ):
        path = write(tmp_path, f"[vm]\n{body}\n[[step]]\naction = \"run\"\nvcpu = 0\n")
        assert main(["run", str(path)]) == 2
        assert f"'{field}'" in capsys.readouterr().err
