"""The differential harness checked on its own, without KVM: the exclusion list and its table in
``specs/differential.md``, the generators, the engine (two identical models never disagree),
and the scenario a disagreement becomes (a model with a changed profile stands in for KVM, so
``apicsim run`` must fail on the file exactly where the two part)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from apicsim import cli, scenario
from apicsim.ops import (
    GUEST_PRIMITIVES,
    GetMsr,
    InitSipi,
    Ipi,
    MmioRead,
    MmioWrite,
    Msi,
    Op,
    RegRead,
    RegWrite,
    Restore,
    SetBase,
    SetMsr,
    Wrmsr,
)
from hypervisor import MpState, Vm
from lapic.profile import Profile
from tests.differential import replay
from tests.differential.engine import ModelSide, ReadBuffer, compare, expand, run
from tests.differential.exclusions import (
    BY_KEY,
    EXCLUSIONS,
    excluded_by,
    markdown_table,
    permitted,
    sends_init_to_itself,
)
from tests.differential.harness import check_sides
from tests.differential.strategies import Program, Topology, programs
from tests.kvm.support import FEATURES, VECTOR_HASHING, Factory

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "differential.md"
BEGIN = "<!-- exclusions: begin (rendered by tests/differential/exclusions.py) -->"
END = "<!-- exclusions: end -->"


def sides(program: Program, **changes: object) -> tuple[ModelSide, ModelSide]:
    """The reference model and a model whose profile has ``changes`` (the stand-in for KVM)."""
    args = program.topology.vm_args()
    reference = Factory("model")(**args)
    assert isinstance(reference, Vm)
    profile = Profile.preset("kvm").replace(**changes)
    subject = Vm(profile=profile, features=FEATURES, vector_hashing=VECTOR_HASHING, **args)
    return ModelSide(reference), ModelSide(subject, "mutant")


def disagree(
    program: Program, monkeypatch: pytest.MonkeyPatch, tmp: Path, **changes: object
) -> str:
    """Run ``program`` against a changed model, expect the failure, return its message."""
    monkeypatch.setenv(replay.OUT_ENV, str(tmp))
    reference, subject = sides(program, **changes)
    with pytest.raises(AssertionError) as failure:
        check_sides(program, reference, subject, test="harness", rules=["MMIO-4"])
    return str(failure.value)


# =============================================================================================
# The exclusion list
# =============================================================================================
def test_the_exclusion_table_in_specs_differential_md_is_the_one_the_list_renders() -> None:
    """``specs/differential.md`` carries the table between its markers exactly as
    ``exclusions.markdown_table()`` renders it (``python -m tests.differential.exclusions``)."""
    text = SPEC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"{SPEC} lacks the exclusion table markers"
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
    assert table == markdown_table(), (
        "specs/differential.md's exclusion table is out of date; paste the output of "
        "`python -m tests.differential.exclusions` between the markers"
    )


def test_every_exclusion_has_a_unique_key_a_stage_and_a_reason() -> None:
    """Each entry says what and why; ``generated`` ones carry the predicate the generators use;
    an open disagreement says so at the start of its reason."""
    assert len(BY_KEY) == len(EXCLUSIONS)
    for e in EXCLUSIONS:
        assert e.what.strip() and e.why.strip() and "|" not in e.what + e.why, e.key
        assert e.stage in ("generated", "executed", "compared"), e.key
        assert (e.excludes is not None) == (e.stage == "generated"), e.key
        assert "open disagreement" not in e.why or e.why.startswith("open disagreement: "), e.key


@pytest.mark.parametrize(
    ("op", "key"),
    [
        (MmioWrite(0, 0x380, 1), "timer"),
        (RegWrite(0, 0x380, 0x100), "timer"),
        (Wrmsr(0, 0x838, 5), "timer"),
        (SetMsr(0, 0x6E0, 12345), "timer"),
        (Restore(0, ((0x380, 7),)), "timer"),
        (Wrmsr(0, 0x10, 0), "non-apic-msrs"),
        (MmioRead(0, 0xFFE, 4), "page-crossing"),
    ],
)
def test_the_generated_exclusions_recognise_what_they_exclude(op: Op, key: str) -> None:
    excluded = excluded_by(op)
    assert excluded is not None and excluded.key == key


@pytest.mark.parametrize(
    "op",
    [
        MmioWrite(0, 0x380, 0),
        Wrmsr(0, 0x6E0, 0),
        Wrmsr(0, 0x6E0, 1 << 62),
        Restore(0, ((0x380, None), (0x390, 5))),
        MmioRead(0, 0xFFC, 4),
        Wrmsr(0, 0xBFF, 1),
    ],
)
def test_what_the_exclusions_leave_is_permitted(op: Op) -> None:
    assert permitted(op)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=programs())
def test_generated_programs_are_permitted_and_two_identical_models_never_disagree(
    program: Program,
) -> None:
    """Every operation drawn passes the exclusions (the engine also checks every primitive it
    expands to), and the engine sees no difference between two models of the same VM: the
    comparison is deterministic."""
    assert all(permitted(op) for op in program.steps)
    reference, subject = sides(program)
    trace = run(program, reference, subject)
    assert not trace.differences, trace.differences


def test_an_init_ipi_that_reaches_the_sender_is_skipped_and_one_to_another_vcpu_is_not() -> None:
    """The ``self-init`` exclusion: a physical INIT to the sender's own ID, or with the self
    shorthand, is skipped; an INIT to vCPU 1, or an INIT level de-assert to itself, is not."""
    vm = Factory("model")(vcpus=2)
    assert isinstance(vm, Vm)
    assert sends_init_to_itself(MmioWrite(0, 0x300, 0x4500), vm) is not None  # ICR2 = 0: itself
    assert sends_init_to_itself(MmioWrite(0, 0x300, 0x44500), vm) is not None  # self
    assert sends_init_to_itself(MmioWrite(0, 0x300, 0xC4500), vm) is None  # all but self
    assert sends_init_to_itself(MmioWrite(0, 0x300, 0x8500), vm) is None  # level de-assert
    vm.vcpu(0).mmio_write(0xFEE00310, 1 << 24)
    assert sends_init_to_itself(MmioWrite(0, 0x300, 0x4500), vm) is None
    steps = run(Program(Topology((0, 1)), (), (InitSipi(1, 1, 0x12),)), *sides_of(2))
    assert [s.skipped.key if s.skipped else None for s in steps.steps] == [
        None, "self-init", None, None,
    ]  # fmt: skip


def sides_of(vcpus: int) -> tuple[ModelSide, ModelSide]:
    return sides(Program(Topology(tuple(range(vcpus))), (), ()))


def test_macros_expand_through_the_interface_of_the_vcpu_s_current_mode() -> None:
    vm = Factory("model")(vcpus=2)
    assert isinstance(vm, Vm)
    assert expand(Ipi(0, 1, 0x4031), vm) == [
        MmioWrite(0, 0x310, 1 << 24),
        MmioWrite(0, 0x300, 0x4031),
    ]
    assert expand(RegRead(0, 0x80), vm) == [MmioRead(0, 0x80)]
    assert expand(SetBase(0, False, "x2apic"), vm) == [Wrmsr(0, 0x1B, 0xFEE00D00)]
    vm.vcpu(1).wrmsr(0x1B, 0xFEE00C00)
    assert expand(Ipi(1, 0x10001, 0x80F1), vm) == [Wrmsr(1, 0x830, 0x10001_000080F1)]
    assert expand(SetBase(1, True, "disabled", bsp="set"), vm) == [SetMsr(1, 0x1B, 0xFEE00100)]
    assert all(isinstance(p, GUEST_PRIMITIVES) for p in expand(RegWrite(1, 0xB0, 0), vm))


# =============================================================================================
# The scenario a disagreement becomes
# =============================================================================================
def test_a_disagreement_is_written_as_a_scenario_that_apicsim_run_fails_at_that_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """KVMB-4 / MMIO-4: the stand-in for KVM returns 0xAB for an unserviced read instead of
    the previous read's bytes.  The failure names the file; the file replays every agreed step
    and fails at the read, expecting the stand-in's value; ``apicsim run`` exits 1."""
    program = Program(
        Topology((0, 1)),
        (RegWrite(1, 0xF0, 0x1FF),),
        (MmioRead(1, 0x20), Ipi(0, 1, 0x4031), MmioRead(1, 0x24), MmioRead(1, 0x80)),
    )
    message = disagree(
        program, monkeypatch, tmp_path, unserviced_read_repeats_last=False,
        unserviced_read_value=0xAB,
    )  # fmt: skip
    path = tmp_path / "harness.toml"
    assert f"apicsim run {path}" in message
    assert "result: model ('ok', 16777216), mutant ('ok', 171)" in message
    assert "the replay fails at step 5, as it should" in message
    text = path.read_text(encoding="utf-8")
    assert 'action = "mmio_read"\nvcpu = 1\noffset = 0x024\nexpect = { value = 0xab }' in text
    assert cli.main(["run", str(path)]) == 1
    assert (
        "step 5 (mmio_read): expect.value: read 0x01000000, expected 0xab"
        in capsys.readouterr().err
    )


def test_a_state_disagreement_becomes_irr_expectations_and_get_lapic_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PRIO-7 / DIFF-D2: the stand-in refuses vectors below 16 (the sdm rule).  A self IPI
    with vector 0x0F then differs in IRR only: the file expects the stand-in's IRR at that
    step and replays to a failure there."""
    program = Program(Topology((0,)), (RegWrite(0, 0xF0, 0x1FF),), (Ipi(0, 0, 0x4000F),))
    message = disagree(program, monkeypatch, tmp_path, accept_illegal_vectors=False)
    assert "cpu0 IRR: model {0xf}, mutant {}" in message
    assert "the replay fails at step 3, as it should" in message
    text = (tmp_path / "harness.toml").read_text(encoding="utf-8")
    assert 'value = 0x4000f\nexpect = { irr = { "0" = [] } }' in text


def test_an_access_both_refuse_replays_as_a_run_that_processes_the_init(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """KVMB-9: after an INIT from vCPU 0, vCPU 1's accesses are refused on both (it waits
    for SIPI); the file has a ``run`` step there, so the INIT is processed in the replay as
    it was in the test, and the replay fails at the later disagreement, not before."""
    program = Program(
        Topology((0, 1)),
        (RegWrite(1, 0xF0, 0x1FF), RegWrite(1, 0x80, 0x20)),
        (Ipi(0, 1, 0x4500), RegRead(1, 0x80), Restore(1, ((0x80, 0x30),)), MmioRead(0, 0x24)),
    )
    message = disagree(
        program, monkeypatch, tmp_path, unserviced_read_repeats_last=False,
        unserviced_read_value=0xAB,
    )  # fmt: skip
    path = tmp_path / "harness.toml"
    text = path.read_text(encoding="utf-8")
    assert 'action = "run"\nvcpu = 1\nexpect = { result = [] }' in text
    assert "as it should" in message and "step 7 (mmio_read)" in message
    runner = scenario.Runner(scenario.load(path))
    for step in runner.sc.steps[:6]:
        assert not runner.run_step(step).failures
    backend = runner.backend
    assert isinstance(backend, scenario.ModelBackend)
    assert backend.model.vcpu(1).mp_state is MpState.INIT_RECEIVED
    assert not backend.model.lapic(1).init_pending and backend.model.lapic(1).tpr == 0x30


def test_a_skipped_step_and_a_host_msr_read_are_comments_in_the_scenario(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A step an exclusion skips and a KVM_GET_MSRS (no scenario action) leave comments; the
    replay still fails where the two part."""
    program = Program(
        Topology((0,)),
        (),
        (
            Ipi(0, 0, 0x44500),
            Restore(0, ((0x110, 0x100),)),
            GetMsr(0, 0x1B),
            MmioRead(0, 0x24),
        ),
    )
    message = disagree(
        program, monkeypatch, tmp_path, unserviced_read_repeats_last=False,
        unserviced_read_value=0xAB,
    )  # fmt: skip
    text = (tmp_path / "harness.toml").read_text(encoding="utf-8")
    assert "skipped (self-init)" in text
    assert "host KVM_GET_MSRS 0x1b: kvm 0xfee00900 (no scenario action; not replayed)" in text
    assert "as it should" in message


def test_an_nmi_difference_is_reported_and_marked_as_not_replayable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Scenarios have no NMI expectation: an NMI-only difference is reported, written as a
    comment, and the message says the replay cannot show it."""
    program = Program(Topology((0, 1)), (), (Msi(0xFEE01000, 0, 0x400), Msi(0xFEE01000, 0, 0)))
    reference, subject = sides(program)
    subject.model.lapic(1).nmi_pending = 1  # the stand-in already holds an NMI
    monkeypatch.setenv(replay.OUT_ENV, str(tmp_path))
    with pytest.raises(AssertionError) as failure:
        check_sides(program, reference, subject, test="harness", rules=["ACCEPT-NMI"])
    assert "cpu1 NMIs pending + taken by the guest: model 0+0, mutant 1+0" in str(failure.value)
    assert "the replay passes: the difference is one a scenario cannot express" in str(
        failure.value
    )
    assert "no scenario expectation for NMIs" in (tmp_path / "harness.toml").read_text()


def test_the_engine_predicts_kvm_s_byte_wise_read_buffer_and_excuses_only_the_model() -> None:
    """The ``read-buffer-bytes`` exclusion: after reads of LVR (4 bytes) and TPR (1 byte), an
    unserviced 4-byte read gives KVM's byte-wise buffer, 0x50000 (the LVR's upper bytes); the
    model's value (now the same byte-wise buffer, so 0x50000 too) needs no excuse; a stand-in
    that gave 0 would be excused, any other value is not."""
    program = Program(
        Topology((0,)), (), (MmioRead(0, 0x30), MmioRead(0, 0x80, 1), MmioRead(0, 0x24))
    )
    reference, subject = sides(program)
    trace = run(program, reference, subject, stop=False)
    read = trace.steps[-1]
    assert read.reference == read.subject == ("ok", 0x50000) and read.unread is None
    # Both are the model here; what KVM returns is compared with the engine's buffer:
    buffer = ReadBuffer()
    buffer.read(4, "serviced", ("ok", 0x50014), ("ok", 0x50014))
    buffer.read(1, "serviced", ("ok", 0), ("ok", 0))
    excused = buffer.read(4, "unserviced", ("ok", 0), ("ok", 0x50000))
    assert excused is not None and excused.key == "read-buffer-bytes"
    assert buffer.read(4, "unserviced", ("ok", 0), ("ok", 0x12345)) is None
    buffer.forget()
    unknown = buffer.read(2, "unserviced", ("ok", 0), ("ok", 7))
    assert unknown is not None and unknown.key == "nmi-handler-reads"


def test_a_ppr_left_stale_by_kvm_set_lapic_is_exact_at_the_call_and_tolerant_after_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ``ppr-after-set-lapic`` exclusion (STATE-4): right after the KVM_SET_LAPIC the
    stale PPR is compared exactly (a stand-in that recomputes it at once disagrees); later, a
    PPR recomputed from TPR and ISR is accepted while the model's is still stale, and only
    then."""
    program = Program(Topology((0,)), (), (Restore(0, ((0x110, 0x100),)), MmioRead(0, 0x20)))
    message = disagree(program, monkeypatch, tmp_path, set_state_stale_ppr=False)
    assert "disagree at operation 1 of the program" in message
    assert "cpu0 [0x0a0 PPR]: model 0x00000000, mutant 0x00000020" in message
    reference, subject = sides(program)
    trace = run(program, reference, subject)
    assert not trace.differences
    later = trace.steps[-1]
    fresh = bytearray(later.subject_state[0].image)
    fresh[0xA0:0xA4] = (0x20).to_bytes(4, "little")
    other = bytearray(fresh)
    other[0xA0:0xA4] = (0x30).to_bytes(4, "little")
    # The model now recomputes PPR at the vCPU's next entry as KVM does, so the later image
    # already holds the fresh PPR: equal with or without the tolerance; 0x30 still differs.
    for image, stale, differs in ((fresh, {0}, False), (fresh, set(), False), (other, {0}, True)):
        snap = dataclasses.replace(later.subject_state[0], image=bytes(image))
        step = dataclasses.replace(later, subject_state=(snap,))
        assert bool(compare(step, stale_ppr=stale)) is differs


def test_found_scenarios_go_to_a_directory_git_ignores() -> None:
    ignore = (replay.DEFAULT_OUT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "*" in ignore and "!.gitignore" in ignore


def test_an_unserviced_read_after_the_guest_took_an_nmi_is_compared_only_in_kind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ``nmi-handler-reads`` exclusion: once the guest took an NMI, the value of an
    unserviced read is not compared (the stand-in returns 0xAB, the model the previous read's
    bytes) until a serviced read of as many bytes has filled the buffer again."""
    program = Program(
        Topology((0, 1)),
        (),
        (
            MmioRead(0, 0x20),
            Msi(0xFEE00000, 0, 0x400),
            MmioRead(0, 0x24),
            MmioRead(0, 0x20, 2),
            MmioRead(0, 0x24, 2),
            MmioRead(0, 0x24, 4),
        ),
    )
    message = disagree(
        program, monkeypatch, tmp_path, unserviced_read_repeats_last=False,
        unserviced_read_value=0xAB,
    )  # fmt: skip
    assert "disagree at operation 5 of the program" in message
    text = (tmp_path / "harness.toml").read_text(encoding="utf-8")
    assert "value not compared (nmi-handler-reads): model 0x0, kvm 0xab" in text
