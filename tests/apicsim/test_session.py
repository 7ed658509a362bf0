"""``apicsim.Session``: steps, exact time travel, what each move prints; the README's
"Stepping and tracing" examples, run as a doctest."""

from __future__ import annotations

import doctest
import io
from pathlib import Path

import pytest

from apicsim import Session
from apicsim.ops import Icr, Run
from apicsim.session import irr_has
from guest import Guest
from hypervisor import Vm
from lapic.faults import ApicTypeError, ApicValueError

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "specs" / "scenarios").glob("*.toml"))


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_the_readme_stepping_and_tracing_examples_run_as_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    # A fence line ends an example's expected output, as a blank line does in a docstring.
    section = "\n".join(
        "" if line.startswith("```") else line
        for line in readme_section("Stepping and tracing").splitlines()
    )
    parser = doctest.DocTestParser()
    test = parser.get_doctest(section, {}, "README: Stepping and tracing", "README.md", 0)
    assert len(test.examples) >= 10
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.REPORT_NDIFF
    )
    out = io.StringIO()
    result = runner.run(test, out=out.write)
    assert result.failed == 0, out.getvalue()


def small_session(out: io.StringIO) -> Session:
    vm = Vm(vcpus=2)
    g = Guest(vm, driver="x2apic_phys")
    return Session(vm, g, [Icr(vcpu=0, dest=1, vector=0xF0), Run(vcpu=1)], out=out)


def test_back_restores_the_exact_state_before_the_step_and_forward_the_one_after() -> None:
    out = io.StringIO()
    s = small_session(out)
    start = s.vm.snapshot()
    s.step()
    after_one = s.vm.snapshot()
    s.step()
    assert s.guest is not None and s.guest.cpu(1).handled == [0xF0]
    s.back(2)
    assert s.vm.snapshot() == start and s.position == 0
    assert s.guest.cpu(1).handled == []
    s.forward()
    assert s.vm.snapshot() == after_one and s.position == 1
    s.step()
    assert s.guest.cpu(1).handled == [0xF0] and s.results == [None, [0xF0]]


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_scenario_steps_to_the_end_and_back_to_its_start(path: Path) -> None:
    s = Session.from_scenario(path, out=io.StringIO())
    start = s.vm.snapshot()
    s.step(len(s.steps))
    assert s.position == len(s.steps)
    end = s.vm.snapshot()
    s.back(len(s.steps))
    assert s.vm.snapshot() == start
    s.forward(len(s.steps))
    assert s.vm.snapshot() == end


def test_each_step_prints_its_action_the_counters_the_changes_and_the_trace_in_hex() -> None:
    out = io.StringIO()
    s = small_session(out)
    s.step()
    text = out.getvalue()
    assert "step 1/2: icr cpu0 -> 0x1 phys fixed 0xf0" in text
    assert "irqs_accepted=1" in text
    assert "vcpu 1 IRR: {} -> {0xf0}" in text
    assert "kvm_apic_ipi: dst 0x1 vec 0xf0 (Fixed|physical|assert|edge|dst)" in text
    s.step()
    assert "step 2/2: run cpu1 -> [0xf0]" in out.getvalue()
    assert "guest cpu1 handled: [] -> [0xf0]" in out.getvalue()
    assert "kvm_inj_virq: irq 0xf0" in out.getvalue()


def test_until_steps_until_the_condition_holds_and_reports_when_it_never_does() -> None:
    out = io.StringIO()
    s = small_session(out)
    assert s.until(irr_has(1, 0xF0)) is True and s.position == 1
    assert s.until(irr_has(0, 0x99)) is False
    assert "the condition never held" in out.getvalue()


def test_do_performs_an_operation_now_and_drops_the_steps_undone() -> None:
    out = io.StringIO()
    s = small_session(out)
    s.step(2)
    s.back(2)
    assert s.do(Icr(vcpu=1, dest=0, vector=0x41)) is None
    assert s.steps[0] == Icr(vcpu=1, dest=0, vector=0x41) and len(s.history) == 2
    assert 0x41 in s.vm.lapic(0).irr


def test_a_hypercall_error_prints_as_its_kvm_errno_name() -> None:
    from apicsim.ops import Hypercall

    out = io.StringIO()
    vm = Vm(vcpus=2)
    s = Session(vm, out=out)
    s.do(Hypercall(vcpu=0, nr=0x7FFF))
    assert "-> -KVM_ENOSYS" in out.getvalue()


def test_the_default_session_is_a_small_vm_with_a_booted_guest() -> None:
    s = Session.default(out=io.StringIO())
    assert len(s.vm) == 4 and s.guest is not None and s.steps == []
    assert repr(s) == "<Session default: step 0/0, 4 vCPUs>"


def test_misuse_of_a_session_names_the_argument() -> None:
    s = small_session(io.StringIO())
    with pytest.raises(ApicTypeError, match="vm"):
        Session("vm")  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match="n=0"):
        s.step(0)
    with pytest.raises(ApicTypeError, match="op"):
        s.do("icr")  # type: ignore[arg-type]
    with pytest.raises(ApicValueError, match="b=5"):
        s.diff(0, 5)
    with pytest.raises(ApicTypeError, match="condition"):
        s.until(3)  # type: ignore[arg-type]
