"""The scenario runner: one code path that performs each step on a backend and checks it.

:class:`Runner` performs a parsed scenario's steps in file order on a backend
(:mod:`apicsim.scenario.backends`; the model unless another is given), each step's typed
operation performing itself (:mod:`apicsim.ops`), measures the counters and the IRR/ISR
changes around it, and checks its expectations (:mod:`apicsim.scenario.expect`).  It stops
after the first step that fails, and skips the rest of a scenario from a step the backend
cannot perform.  :func:`run_file` is ``apicsim run`` for one file: 0 = passed (or skipped),
1 = an expectation failed, 2 = malformed or the set-up failed.  Not here: the per-expectation
report of ``apicsim check`` (:mod:`apicsim.check`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from apicsim.ops import Restore, SetLapic, Unsupported
from apicsim.scenario.backends import (
    _UNOBSERVABLE,
    Backend,
    ModelBackend,
    boot_guest,
    build_vm,
)
from apicsim.scenario.expect import (
    NO_RESULT,
    ApicState,
    Failure,
    FaultExpected,
    Observed,
    Verdict,
    vset,
)
from apicsim.scenario.format import Scenario, ScenarioError, Step, load
from apicsim.scenario.render import header, row
from hypervisor import Vm
from lapic.apic import StateError
from lapic.faults import ApicTypeError, ApicValueError, GuestFault

if TYPE_CHECKING:
    from guest import Guest

@dataclass(slots=True)
class StepOutcome:
    step: Step
    result: Any = NO_RESULT
    value: int | None = None
    fault: int | None = None
    exits: int | None = 0
    """VM exits during the step; None where the backend does not count them."""
    changes: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    skipped: str | None = None
    """Why the backend could not perform the step (the scenario is skipped from here)."""


@dataclass(slots=True)
class Report:
    scenario: Scenario
    outcomes: list[StepOutcome] = field(default_factory=list)
    skipped: str | None = None
    """Why the scenario (or its remaining steps) did not run on the backend."""
    backend: str = "model"

    @property
    def failures(self) -> list[Failure]:
        return [f for o in self.outcomes for f in o.failures]

    @property
    def verdicts(self) -> list[Verdict]:
        return [v for o in self.outcomes for v in o.verdicts]

    @property
    def passed(self) -> bool:
        return not self.failures


def _snapshot(backend: Backend) -> list[tuple[frozenset[int], frozenset[int]]]:
    out = []
    for i in range(len(backend.vm)):
        s = backend.state(i)
        out.append((s.irr, s.isr))
    return out



class Runner:
    """Executes one parsed scenario on one backend (the model unless ``backend`` is given)."""

    def __init__(
        self,
        scenario: Scenario,
        vm: Vm | None = None,
        guest: Guest | None = None,
        *,
        backend: Backend | None = None,
    ) -> None:
        self.sc = scenario
        if backend is None:
            if vm is None:
                vm = build_vm(scenario.vm)
            if guest is None and scenario.guest is not None:
                guest = boot_guest(vm, scenario.guest)
            backend = ModelBackend(vm, guest)
        self.backend = backend
        self.vm = backend.vm
        self.guest = backend.guest if isinstance(backend, ModelBackend) else None

    def handled(self, i: int) -> list[int] | None:
        return self.backend.handled(i)

    # -- actions ------------------------------------------------------------------------
    def act(self, step: Step) -> tuple[Any, int | None]:
        """Perform the step's operation: ``(result, value read)``."""
        op = step.op
        try:
            result = op.perform(self.backend)
        except StateError as e:
            if not isinstance(op, SetLapic | Restore):
                raise
            result = -e.errno  # KVM_SET_LAPIC refused the image
        if result is None:
            return NO_RESULT, None
        return result, result if op.READS else None

    # -- one step -------------------------------------------------------------------------
    def run_step(self, step: Step) -> StepOutcome:
        be = self.backend
        out = StepOutcome(step)
        before = _snapshot(be)
        counters = be.counters()
        log = getattr(be.accel(), "notification_log", None)
        mark = None if log is None else len(log)
        try:
            out.result, out.value = self.act(step)
        except GuestFault as e:
            out.fault = e.vector
            fault_text = str(e)
        except (Unsupported, NotImplementedError) as e:
            out.skipped = str(e) or type(e).__name__
            return out
        except (ApicValueError, ApicTypeError) as e:
            who = "the model" if be.name == "model" else f"the {be.name} backend"
            self.fail_action(step, out, f"{who} refused it: {e}")
            return out
        except (OSError, RuntimeError) as e:  # KvmError, TimeoutError, an ioctl's errno
            self.fail_action(step, out, f"the {be.name} backend failed: {e}")
            return out
        else:
            fault_text = ""
        after = _snapshot(be)
        now = be.counters()
        delta = None
        if now is not None and counters is not None:
            delta = {k: now[k] - counters[k] for k in now}
            out.exits = delta["exits"]
        else:
            out.exits = None
        for i, (old, new) in enumerate(zip(before, after, strict=True)):
            if old != new:
                out.changes.append(f"cpu{i} IRR={vset(new[0])} ISR={vset(new[1])}")
        notified = None
        log = getattr(be.accel(), "notification_log", None)  # read again: it may be a copy
        if log is not None and mark is not None:
            notified = [(int(a), int(v)) for a, v in list(log)[mark:]]
        self.check(step, out, fault_text, delta, notified)
        return out

    def line_of(self, step: Step, key: str) -> int:
        """The TOML line of ``key`` (``expect.irr``, ``expect.regs.PPR``) in ``step``."""
        if key == "action":
            return step.line
        parts = key.removeprefix("expect.").split(".")
        return self.sc.locator.find(parts[-1], step=step.number, after="expect")

    def failure(self, step: Step, key: str, message: str) -> Failure:
        return Failure(
            self.sc.path, self.line_of(step, key), step.number, step.action, key, message
        )

    def fail_action(self, step: Step, out: StepOutcome, message: str) -> None:
        out.failures.append(self.failure(step, "action", message))
        out.verdicts.append(
            Verdict(self.sc.path, step.line, step.number, step.action, "action", "FAIL", message)
        )

    def check(
        self,
        step: Step,
        out: StepOutcome,
        fault_text: str,
        delta: dict[str, int] | None,
        notified: list[tuple[int, int]] | None = None,
    ) -> None:
        """Check ``step``'s expectations: a :class:`Verdict` for each, a :class:`Failure` for
        each that did not hold."""
        path = self.sc.path

        def emit(
            key: str, ok: bool | None, detail: str, message: str = "", vcpu: int | None = None
        ) -> None:
            status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
            line = self.line_of(step, key)
            out.verdicts.append(
                Verdict(path, line, step.number, step.action, key, status, detail, vcpu)
            )
            if ok is False:
                out.failures.append(
                    Failure(path, line, step.number, step.action, key, message or detail)
                )

        states: dict[int, ApicState] = {}

        def state(i: int) -> ApicState:
            if i not in states:
                states[i] = self.backend.state(i)
            return states[i]

        seen = Observed(
            step.op,
            out.result,
            out.value,
            out.fault,
            fault_text,
            out.exits,
            delta,
            state,
            self.handled,
            _UNOBSERVABLE.get(self.backend.name, {}),
            self.backend.accel(),
            notified,
        )
        expects_fault = any(isinstance(x, FaultExpected) for x in step.expectations)
        if out.fault is not None and not expects_fault:
            self.fail_action(step, out, f"unexpected {fault_text}")
        for expectation in step.expectations:
            expectation.check(seen, emit)

    def run(self, out: TextIO | None = None, *, verbose: bool = True) -> Report:
        report = Report(self.sc, backend=self.backend.name)
        if verbose and out is not None:
            header(self.sc, len(self.vm), out, self.backend.name)
        for step in self.sc.steps:
            why = self.backend.unsupported(step)
            if why is not None:
                report.skipped = f"step {step.number} ({step.action}, line {step.line}): {why}"
                break
            outcome = self.run_step(step)
            if outcome.skipped is not None:
                report.skipped = (
                    f"step {step.number} ({step.action}, line {step.line}): {outcome.skipped}"
                )
                break
            report.outcomes.append(outcome)
            if verbose and out is not None:
                row(outcome, out)
            if outcome.failures:
                break
        return report


def run_file(
    path: str | Path, out: TextIO, err: TextIO, *, backend: str = "model", verbose: bool = True
) -> int:
    """Load and run one scenario file; 0 = passed (or skipped), 1 = failed, 2 = malformed."""
    try:
        sc = load(path)
    except ScenarioError as e:
        out.flush()
        err.write(f"ERROR {e}\n")
        return 2
    if backend not in sc.backends:
        out.write(f"SKIP {sc.name} ({sc.path}): not a {backend!r} scenario\n")
        return 0
    section = "vm"
    try:
        vm = build_vm(sc.vm)
        section = "guest"
        guest = boot_guest(vm, sc.guest) if sc.guest is not None else None
    except (ApicValueError, ApicTypeError, GuestFault) as e:
        out.flush()
        line = sc.locator.section_line(section) or 1
        err.write(f"ERROR {sc.path}:{line}: [{section}]: the set-up failed: {e}\n")
        return 2
    runner = Runner(sc, vm, guest)
    report = runner.run(out, verbose=verbose)
    if report.skipped is not None and not report.failures:
        out.write(f"SKIP {sc.name} ({sc.path}): {report.skipped}\n")
        return 0
    if report.failures:
        out.flush()
        for f in report.failures:
            err.write(f"FAIL {f}\n")
        out.write(f"FAIL {sc.name}\n")
        return 1
    n = sum(len(s.expect) for s in sc.steps)
    out.write(f"PASS {sc.name}: {len(sc.steps)} steps, {n} expectations\n")
    return 0
