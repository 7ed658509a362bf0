"""``check(program, test=..., rules=...)``: one differential example, model against KVM.

Builds the model VM and the KVM VM of the program's topology (``tests.kvm.support.Factory``:
the model gets the KVM guest's CPU features and the host's ``vector_hashing``), runs the
program on both in lockstep (``engine.run``) and, at a disagreement, writes the scenario
(``replay.write``), replays it on the model and fails with a message that names the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apicsim.kvm import KvmVm
from hypervisor import Vm
from tests.differential import replay
from tests.differential.coverage import COVERAGE
from tests.differential.engine import KvmSide, ModelSide, Side, Trace, run
from tests.differential.strategies import Program
from tests.kvm.support import FEATURES, VECTOR_HASHING, Factory


@dataclass(slots=True)
class Counts:
    """What the differential tests of this process have run (for the measurements)."""

    examples: int = 0
    performed: int = 0
    skipped: int = 0


COUNTS = Counts()


def check(program: Program, *, test: str, rules: Sequence[str]) -> Trace:
    """Run ``program`` on the model and on KVM; fail at the first disagreement."""
    args = program.topology.vm_args()
    model = Factory("model")(**args)
    assert isinstance(model, Vm)
    kvm = Factory("kvm")
    try:
        vm = kvm(**args)
        assert isinstance(vm, KvmVm)
        trace = run(program, ModelSide(model), KvmSide(vm))
    finally:
        kvm.close()
    COUNTS.examples += 1
    COUNTS.performed += trace.performed
    COUNTS.skipped += len(trace.steps) - trace.performed
    COVERAGE.add_trace(trace, test)
    if trace.differences:
        fail(program, trace, test=test, rules=rules)
    return trace


def check_sides(
    program: Program, reference: ModelSide, subject: Side, *, test: str, rules: Sequence[str]
) -> Trace:
    """The same as :func:`check` on sides already built (the harness's own tests)."""
    trace = run(program, reference, subject)
    if trace.differences:
        fail(program, trace, test=test, rules=rules)
    return trace


def fail(program: Program, trace: Trace, *, test: str, rules: Sequence[str]) -> None:
    """Write the scenario, replay it, raise AssertionError naming the file."""
    bad = trace.mismatch
    assert bad is not None
    written = replay.write(
        program, trace, test=test, rules=rules, features=FEATURES, vector_hashing=VECTOR_HASHING
    )
    failed_at, failure = replay.replay(written.path)
    if written.step <= failed_at <= written.last_step:
        verdict = f"the replay fails at step {failed_at}, as it should: {failure}"
    elif failed_at:
        verdict = (
            f"HARNESS PROBLEM: the replay fails at step {failed_at}, not at {written.step}"
            f"..{written.last_step}: {failure}"
        )
    elif written.checkable:
        verdict = "HARNESS PROBLEM: the replay passes although the file expects KVM's values"
    else:
        verdict = (
            "the replay passes: the difference is one a scenario cannot express (see the "
            "comments in the file)"
        )
    origin = "" if bad.op == bad.prim else f" (from: {bad.op.describe()})"
    raise AssertionError(
        f"The model and KVM disagree at operation {bad.number} of the program, "
        f"{bad.prim.describe()}{origin}:\n"
        + "\n".join(f"  {d}" for d in trace.differences[:40])
        + f"\nReplay: apicsim run {written.path}\n({verdict})"
    )
