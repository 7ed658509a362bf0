"""Writes a disagreement out as a scenario file that ``apicsim run`` replays on the model.

The file holds the topology as ``[vm]`` and every primitive up to the disagreement as a
``[[step]]`` whose expectations are the values both backends agreed on.  The step where they
part carries KVM's values: its result (value read, fault, MSI count, ...), and IRR/ISR/TMR and
APIC_BASE of each vCPU that differs; each other differing dword of the state image follows as a
``get_lapic`` step expecting KVM's word.  So ``apicsim run FILE`` passes every earlier step and
fails where the model departs from KVM.  What a scenario cannot express is written as comments:
NMI counts, a host KVM_GET_MSRS (kept as a comment), a step skipped by an exclusion.  A guest
access both backends refused (the vCPU waits for SIPI) becomes a ``run`` step expecting ``[]``:
it processes the pending INIT the same way and executes nothing.

The directory is ``$APICSIM_DIFF_OUT``, or ``tests/differential/found/`` (ignored by git).
"""

from __future__ import annotations

import dataclasses
import io
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from apicsim import scenario
from apicsim.kvm.view import vectors
from apicsim.ops import (
    GetMsr,
    MmioRead,
    MmioWrite,
    MovFromCr8,
    MovToCr8,
    Msi,
    Primitive,
    Rdmsr,
    SetCr8,
    SetLapic,
    SetMsr,
    Wrmsr,
    render_toml,
)
from lapic import Features
from tests.differential.engine import Executed, Trace, word, word_name
from tests.differential.strategies import Program
from tests.kvm.support import Outcome

OUT_ENV = "APICSIM_DIFF_OUT"
DEFAULT_OUT = Path(__file__).resolve().parent / "found"


def out_dir() -> Path:
    return Path(os.environ.get(OUT_ENV, "") or DEFAULT_OUT)


def _h(value: int) -> str:
    return f"{value:#x}" if value > 9 else str(value)


def _vlist(vs: frozenset[int]) -> str:
    return "[" + ", ".join(f"{v:#04x}" for v in sorted(vs)) + "]"


def _action(prim: Primitive) -> list[str]:
    """The ``[[step]]`` fields of a primitive (``Op.to_toml``; not for GetMsr, which the
    writer keeps as a comment)."""
    return render_toml(prim.to_toml())


def _expect(prim: Primitive, out: Outcome) -> list[str]:
    """The expectation of a step's own result, from one backend's outcome."""
    kind, value = out
    if kind == "fault":
        return [f"fault = {value}"]
    if kind == "state-error":
        return [f"result = -{value}"]
    if kind != "ok":
        return []
    if isinstance(prim, MmioRead | Rdmsr | SetCr8 | MovFromCr8):
        return [f"value = {_h(value)}"]
    if isinstance(prim, Msi):
        return [f"result = {value}"]
    if isinstance(prim, SetMsr):
        return [f"result = {'true' if value else 'false'}"]
    if isinstance(prim, SetLapic):
        return ["result = 0"]
    return []


def outcome_text(out: Outcome) -> str:
    """An outcome as comments show it: ``0xfee00900``, ``#GP (13)``, ``-EINVAL (22)``..."""
    kind, value = out
    if kind == "ok":
        return f"{value:#x}" if value >= 0 else str(value)
    if kind == "fault":
        return f"fault {value}" + (" (#GP)" if value == 13 else "")
    if kind == "state-error":
        return f"-errno {value}"
    return "refused by the backend"


def _features(features: Features) -> str:
    parts = []
    for f in dataclasses.fields(Features):
        v = getattr(features, f.name)
        parts.append(f"{f.name} = {str(v).lower() if isinstance(v, bool) else v}")
    return "{ " + ", ".join(parts) + " }"


class _Writer:
    def __init__(self) -> None:
        self.buf = io.StringIO()
        self.steps = 0

    def line(self, text: str = "") -> None:
        self.buf.write(text + "\n")

    def step(self, fields: Sequence[str], expect: Sequence[str], comments: Sequence[str]) -> int:
        self.steps += 1
        self.line()
        for c in comments:
            self.line(f"# {c}")
        self.line("[[step]]")
        for f in fields:
            self.line(f)
        if expect:
            self.line(f"expect = {{ {', '.join(expect)} }}")
        return self.steps


@dataclasses.dataclass(frozen=True, slots=True)
class Written:
    path: Path
    step: int
    """The file's step number of the disagreeing operation."""
    last_step: int
    """The last step that checks one of its differences (get_lapic follow-ups included)."""
    checkable: bool
    """Whether any difference became an expectation (NMI counts and host MSR reads cannot)."""


def write(
    program: Program,
    trace: Trace,
    *,
    test: str,
    rules: Sequence[str],
    features: Features,
    vector_hashing: bool | None,
    directory: Path | None = None,
) -> Written:
    """Write ``trace`` (which ends at a disagreement) as ``<directory>/<test>.toml``."""
    bad = trace.mismatch
    assert bad is not None, "write() needs a trace that ends in a disagreement"
    directory = out_dir() if directory is None else directory
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{test}.toml"
    topo = program.topology
    w = _Writer()
    w.line(f"# Written by tests/differential ({test}): the model and KVM disagree at operation")
    w.line(f"# {bad.number} ({bad.prim.describe()}). Replay on the model: apicsim run {path}")
    w.line("# Differences after it (model vs kvm):")
    for d in trace.differences:
        w.line(f"#   {d}")
    w.line(f'name = "differential-{test.replace("_", "-")}"')
    description = (
        f"The shortest program found by the differential test {test} on which the model and "
        "the host's KVM disagree. Every step up to the disagreement carries the values both "
        "backends showed; the disagreeing step carries KVM's."
    )
    w.line('description = """' + textwrap.fill(description, width=96) + '"""')
    w.line("rules = [" + ", ".join(f'"{r}"' for r in rules) + "]")
    w.line('backends = ["model", "kvm"]')
    w.line()
    w.line("[vm]")
    if topo.contiguous:
        w.line(f"vcpus = {len(topo.vcpu_ids)}")
    else:
        w.line("vcpu_ids = [" + ", ".join(str(v) for v in topo.vcpu_ids) + "]")
    w.line('profile = "kvm"')
    w.line(f"x2apic_format = {str(topo.x2apic_format).lower()}")
    w.line(f"broadcast_quirk = {str(topo.broadcast_quirk).lower()}")
    if vector_hashing is not None:
        w.line(f"vector_hashing = {str(vector_hashing).lower()}")
    w.line(f"features = {_features(features)}")

    first = 0
    last = 0
    checkable = False
    pending: list[str] = []
    for s in trace.steps:
        origin = "" if s.op == s.prim else f" (from: {s.op.describe()})"
        comments = [f"operation {s.number}: {s.prim.describe()}{origin}"]
        if s.skipped is not None:
            pending.append(f"operation {s.number} skipped ({s.skipped.key}): {s.prim.describe()}")
            continue
        comments = pending + comments
        pending = []
        is_bad = s is bad
        out = s.subject if is_bad else s.reference
        if isinstance(s.prim, GetMsr):
            # A host MSR read stays a comment: the file replays what was done to the VM.
            note = f"host KVM_GET_MSRS {s.prim.msr:#x}: kvm {outcome_text(out)}" + (
                f", model {outcome_text(s.reference)}" if is_bad else ""
            )
            pending = [*comments, note + " (no scenario action; not replayed)"]
            if not is_bad:
                continue
            # a disagreement in a host read: nothing to replay but the state checks below
            fields = ['action = "get_lapic"', f"vcpu = {s.prim.vcpu}", "offset = 0x20"]
            n = w.step(fields, [], pending)
            pending = []
            first = last = n
        elif s.reference == s.subject == ("refused", 0) and isinstance(
            s.prim, MmioRead | MmioWrite | Rdmsr | Wrmsr | MovToCr8 | MovFromCr8
        ):
            comments.append(
                "both backends refused the access: the vCPU waits for SIPI. A run processes "
                "the pending INIT the same way and executes nothing."
            )
            n = w.step(['action = "run"', f"vcpu = {s.prim.vcpu}"], ["result = []"], comments)
        else:
            if is_bad and s.reference != s.subject:
                comments.append(
                    f"model: {outcome_text(s.reference)}; KVM: {outcome_text(s.subject)}"
                )
                if s.subject[0] == "refused":
                    comments.append("KVM refused this step; a scenario cannot expect that")
                else:
                    checkable = True
            expect = _expect(s.prim, out)
            if s.unread is not None and s.reference[0] == s.subject[0] == "ok":
                comments.append(
                    f"value not compared ({s.unread.key}): model {outcome_text(s.reference)}, "
                    f"kvm {outcome_text(s.subject)}"
                )
                expect = []
            n = w.step(_action(s.prim), expect, comments)
        if not is_bad:
            continue
        first = last = n
        checkable |= _state_expectations(w, s)
        last = w.steps
    for c in pending:
        w.line(f"# {c}")
    path.write_text(w.buf.getvalue(), encoding="utf-8")
    return Written(path, first, last, checkable)


def _state_expectations(w: _Writer, s: Executed) -> bool:
    """Add KVM's differing state to the last step (IRR/ISR/TMR, APIC_BASE) and get_lapic
    steps for the other dwords; NMI differences as comments.  True if any was added."""
    expect: dict[str, list[str]] = {"irr": [], "isr": [], "tmr": [], "regs": []}
    follow: list[tuple[int, int, int, int]] = []
    notes: list[str] = []
    for i, (a, b) in enumerate(zip(s.reference_state, s.subject_state, strict=True)):
        for base, key in ((0x100, "isr"), (0x180, "tmr"), (0x200, "irr")):
            vb = vectors(b.image, base)
            if vectors(a.image, base) != vb:
                expect[key].append(f'"{i}" = {_vlist(vb)}')
        if a.apic_base != b.apic_base:
            expect["regs"].append(f'"{i}" = {{ APIC_BASE = {b.apic_base:#x} }}')
        for off in range(0, len(a.image), 4):
            if off & 0xF == 0 and 0x100 <= off < 0x280:
                continue
            if word(a.image, off) != word(b.image, off):
                follow.append((i, off, word(a.image, off), word(b.image, off)))
        if a.nmi_pending + a.nmi_taken != b.nmi_pending + b.nmi_taken:
            notes.append(
                f"cpu{i} NMIs pending/taken: model {a.nmi_pending}/{a.nmi_taken}, "
                f"kvm {b.nmi_pending}/{b.nmi_taken} (no scenario expectation for NMIs)"
            )
    added = [f"{k} = {{ {', '.join(v)} }}" for k, v in expect.items() if v]
    if added:
        _append_expect(w, added)
    for c in notes:
        w.line(f"# {c}")
    for i, off, ref, sub in follow:
        w.step(
            ['action = "get_lapic"', f"vcpu = {i}", f"offset = {off:#05x}"],
            [f"value = {_h(sub)}"],
            [f"state dword {word_name(off)} of cpu{i}: model {ref:#x}, kvm {sub:#x}"],
        )
    return bool(added or follow)


def _append_expect(w: _Writer, items: list[str]) -> None:
    """Merge ``items`` into the ``expect`` line of the step just written."""
    text = w.buf.getvalue()
    lines = text.rstrip("\n").split("\n")
    if lines[-1].startswith("expect = { "):
        lines[-1] = lines[-1][: -len(" }")] + ", " + ", ".join(items) + " }"
    else:
        lines.append("expect = { " + ", ".join(items) + " }")
    w.buf = io.StringIO()
    w.buf.write("\n".join(lines) + "\n")


def replay(path: Path) -> tuple[int, str]:
    """Run the file on the model as ``apicsim run`` does: ``(0, "")`` if every expectation
    held, else the number of the first failing step and its message."""
    try:
        sc = scenario.load(path)
        report = scenario.Runner(sc).run(None, verbose=False)
    except scenario.ScenarioError as e:
        raise AssertionError(f"the scenario written is malformed: {e}") from None
    failures = report.failures
    if not failures:
        return 0, ""
    return failures[0].step, str(failures[0])
