"""Issue 12, the CLI cases: a malformed file becomes one ``ERROR file[:line]: message`` line, the
exit status is 2, no traceback is printed, and the other files of a directory still run
(``apicsim run`` and ``apicsim check``); ``mutants --ids ''`` and ``run --backend kvm``.

Not here: the loader's own messages for valid TOML (``tests/apicsim/test_scenarios.py``).
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest

from apicsim import check, scenario
from apicsim.cli import main
from apicsim.kvm import kvm_available

ROOT = Path(__file__).resolve().parents[2]
GOOD = ROOT / "specs" / "scenarios" / "eoi_highest_isr.toml"
HEADER = 'name = "bad"\ndescription = "A bad file."\nrules = ["ICR-2"]\nbackends = ["model"]\n'

BAD: dict[str, bytes] = {
    "non_utf8": HEADER.encode() + b'\n[vm]\nvcpus = 1\n# caf\xe9\n',
    "action_table": (HEADER + "\n[vm]\nvcpus = 1\n\n[[step]]\naction = { x = 1 }\n").encode(),
    "action_array": (HEADER + '\n[vm]\nvcpus = 1\n\n[[step]]\naction = ["wrmsr"]\n').encode(),
    "deep_nesting": (HEADER + "\n[vm]\nvcpus = 1\nx = " + "[" * 2000 + "]" * 2000).encode(),
    "huge_vcpu_ids": (
        HEADER + "\n[vm]\nvcpu_ids = [0, 4294967294]\nmax_vcpu_ids = 4294967296\n"
        '\n[[step]]\naction = "rdmsr"\nvcpu = 0\nmsr = 0x1B\n'
    ).encode(),
}
"""Each malformed file of the issue, as bytes."""

MESSAGE = {
    "non_utf8": r":8: not UTF-8 text: byte 0xe9",
    "action_table": r":10: step 1, field 'action': action must be a string, got table",
    "action_array": r":10: step 1, field 'action': action must be a string, got array",
    "deep_nesting": r": TOML nested too deeply",
    "huge_vcpu_ids": r":6: \[vm\]: the set-up failed( on model)?: max_vcpu_ids=0x1\d+ is above",
}


def bad_dir(tmp_path: Path, name: str) -> Path:
    """A directory with the bad file first and a good scenario after it."""
    d = tmp_path / name
    d.mkdir()
    (d / f"a_{name}.toml").write_bytes(BAD[name])
    shutil.copy(GOOD, d / "b_good.toml")
    return d


@pytest.mark.parametrize("name", sorted(BAD))
def test_apicsim_run_reports_a_malformed_file_as_an_error_line_and_runs_the_rest(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = bad_dir(tmp_path, name)
    assert main(["run", "--quiet", str(d)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 1, err
    assert re.match(rf"ERROR {re.escape(str(d / f'a_{name}.toml'))}{MESSAGE[name]}", errors[0])
    assert "PASS eoi-highest-isr" in out


@pytest.mark.parametrize("name", sorted(BAD))
def test_apicsim_check_reports_a_malformed_file_as_an_error_and_checks_the_rest(
    name: str, tmp_path: Path
) -> None:
    d = bad_dir(tmp_path, name)
    out, err = io.StringIO(), io.StringIO()
    status, results = check.check([d], "model", out, err, quiet=True)
    assert status == 2
    assert [r.status for r in results] == ["ERROR", "PASS"]
    assert re.search(MESSAGE[name], results[0].reason), results[0].reason
    assert "Traceback" not in out.getvalue() + err.getvalue()


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_loader_raises_only_scenario_errors_for_the_malformed_files(
    name: str, tmp_path: Path
) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_bytes(BAD[name])
    if name == "huge_vcpu_ids":  # valid TOML and a valid [vm]: the VM build refuses it
        assert scenario.load(path).vm.max_vcpu_ids == 1 << 32
        return
    with pytest.raises(scenario.ScenarioError, match=MESSAGE[name].lstrip(":0123456789 ")):
        scenario.load(path)


def test_apicsim_mutants_with_empty_ids_is_a_usage_error_not_every_replay(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["mutants", "--ids", ""]) == 2
    assert "--ids '' names no replay" in capsys.readouterr().err


def test_apicsim_run_backend_kvm_runs_the_scenarios_on_the_host_kvm(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--help`` offers ``--backend kvm``; it runs (as ``apicsim check --backend kvm``) or says
    why the host cannot."""
    rc = main(["run", "--backend", "kvm", "--quiet", str(GOOD)])
    out, err = capsys.readouterr()
    assert "not implemented" not in out + err
    ok, why = kvm_available()
    if ok:
        assert rc == 0, out + err
        assert "PASS eoi-highest-isr" in out
    else:
        assert rc == 2 and why in err
