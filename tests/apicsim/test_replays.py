"""The bug-replay catalogue (``apicsim.replays``), its pytest switch and ``apicsim mutants``.

Test names here deliberately carry no bug or rule id: ``apicsim mutants`` selects tests by those
ids, and these tests must never run (or start ``apicsim mutants`` again) under a replay.
"""

from __future__ import annotations

import importlib
import io
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from apicsim import cli, mutants, replays
from apicsim.replays import REPLAYS, Patcher, Replay, ReplayError, Swap, declared_seams
from tests.test_spec_coverage import all_rules

ROOT = Path(__file__).resolve().parents[2]
UNDER_REPLAY = bool(os.environ.get(replays.ENV_VAR, "").strip())
MODEL_PACKAGES = ("lapic", "hypervisor", "guest", "apicsim")
REPLAYABLE = [
    r for r in (*REPLAYS, *replays.ACCEL_REPLAYS, *replays.APICV_REPLAYS) if r.replayable
]


def _param_id(replay: Replay) -> str:
    """``n13`` for BUG-13: a parameter id ``-k BUG-13`` does not select."""
    return "n" + replay.id.removeprefix("BUG-")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != replays.ENV_VAR}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) if not path else os.pathsep.join([str(ROOT), path])
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------
def test_the_registry_lists_every_bug_of_the_reference_once_in_order() -> None:
    """Reference §17 numbers its bugs 1..30; each is in the catalogue exactly once."""
    assert [r.id for r in REPLAYS] == [f"BUG-{n}" for n in range(1, 31)]
    assert set(replays.BY_ID) == {r.id for r in (*REPLAYS, *replays.MODEL_REPLAYS)}


@pytest.mark.parametrize("replay", REPLAYS, ids=_param_id)
def test_each_bug_is_replayable_or_says_why_not(replay: Replay) -> None:
    assert replay.title and replay.what and replay.rules
    if replay.replayable:
        assert not replay.reason
    else:
        assert replay.reason, "a bug that is not replayed must give the reason"
    assert replay.commit == "" or re.fullmatch(r"[0-9a-f]{12}", replay.commit)


def test_exactly_the_feature_origin_the_hardening_and_the_hashing_are_not_replayable() -> None:
    assert [r.id for r in REPLAYS if not r.replayable] == ["BUG-1", "BUG-6", "BUG-27"]


def test_every_rule_a_replay_breaks_is_a_spec_rule() -> None:
    known = {rule.rule_id for rule in all_rules()}
    unknown = {r.id: sorted(set(r.rules) - known) for r in REPLAYS if set(r.rules) - known}
    assert not unknown, f"rules not defined in specs/*.md: {unknown}"


def test_ids_are_looked_up_in_any_spelling_and_unknown_ones_are_refused() -> None:
    assert replays.get(" bug_13 ").id == "BUG-13"
    assert replays.parse_ids("BUG-13, bug-14,,BUG-13") == ["BUG-13", "BUG-14"]
    assert replays.from_environment({}) == []
    assert replays.from_environment({replays.ENV_VAR: "BUG-2,BUG-3"}) == ["BUG-2", "BUG-3"]
    with pytest.raises(ReplayError, match="unknown bug replay 'BUG-99'"):
        replays.from_environment({replays.ENV_VAR: "BUG-2,BUG-99"})
    with pytest.raises(ReplayError, match="BUG-1 is not replayable"), replays.active(["BUG-1"]):
        pass


# ---------------------------------------------------------------------------------------------
# apply(): patch, then restore the very same objects
# ---------------------------------------------------------------------------------------------
def _owners() -> list[Any]:
    """Every loaded model module and every class defined in one."""
    modules = [
        m
        for name, m in sorted(sys.modules.items())
        if isinstance(m, ModuleType) and name.split(".")[0] in MODEL_PACKAGES
    ]
    classes = [
        obj
        for m in modules
        for obj in vars(m).values()
        if isinstance(obj, type) and obj.__module__ == m.__name__
    ]
    return [*modules, *classes]


def _snapshot(owners: list[Any]) -> dict[tuple[int, str], Any]:
    return {(id(o), k): v for o in owners for k, v in list(vars(o).items())}


def _changed(before: dict[tuple[int, str], Any], after: dict[tuple[int, str], Any]) -> set[Any]:
    keys = before.keys() | after.keys()
    return {k for k in keys if before.get(k, before) is not after.get(k, before)}


@pytest.mark.parametrize("replay", REPLAYABLE, ids=_param_id)
def test_apply_patches_the_model_and_restores_the_original_objects(replay: Replay) -> None:
    assert replay.apply is not None
    owners = _owners()
    before = _snapshot(owners)
    with replay.apply():
        assert _changed(before, _snapshot(owners)), "the replay changed nothing"
    assert not _changed(before, _snapshot(owners)), "not every object was restored"


def test_stacked_replays_restore_in_reverse_order() -> None:
    owners = _owners()
    before = _snapshot(owners)
    with replays.active(["BUG-20", "BUG-21", "BUG-22"]):  # three wrappers of wrmsr/rdmsr
        pass
    assert not _changed(before, _snapshot(owners))


def test_a_replay_restores_even_when_the_body_raises() -> None:
    owners = _owners()
    before = _snapshot(owners)
    with pytest.raises(RuntimeError, match="boom"), replays.active(["BUG-13"]):
        raise RuntimeError("boom")
    assert not _changed(before, _snapshot(owners))


def test_a_function_imported_by_name_is_patched_where_it_was_imported() -> None:
    """``hypervisor.vm`` holds ``deliver`` by name: the replay must reach it there too."""
    import hypervisor.delivery
    import hypervisor.vm

    def in_vm() -> object:
        return vars(hypervisor.vm)["deliver"]

    original = hypervisor.delivery.deliver
    assert in_vm() is original
    with replays.active(["BUG-28"]):
        assert hypervisor.delivery.deliver is not original
        assert in_vm() is hypervisor.delivery.deliver
    assert in_vm() is original and hypervisor.delivery.deliver is original


# ---------------------------------------------------------------------------------------------
# Declared seams: every swap targets a name its model module declares in REPLAY_SEAMS
# ---------------------------------------------------------------------------------------------
def _model_modules_all() -> list[ModuleType]:
    """Every module of the model packages, imported (a declaration in a module nothing has
    imported yet still counts)."""
    found: list[ModuleType] = []
    for package in ("lapic", "hypervisor", "guest"):
        root = importlib.import_module(package)
        found.append(root)
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            found.append(importlib.import_module(info.name))
    return found


def _recorded_swaps(replay: Replay) -> tuple[Swap, ...]:
    """The swaps ``replay`` makes, recorded by a patcher that checks nothing itself."""
    assert replay.install is not None
    patcher = Patcher(check_seams=False)
    try:
        replay.install(patcher)
    finally:
        patcher.restore()
    return patcher.swaps


@pytest.mark.parametrize("replay", REPLAYABLE, ids=_param_id)
def test_a_replay_swaps_only_seams_that_the_module_defining_them_declares(replay: Replay) -> None:
    """Each replay (the parameter ``n13`` is BUG-13) swaps at least one object, and each
    object it swaps is named in ``REPLAY_SEAMS`` of the model module that defines it (for a
    method: the module of the class along the MRO that defines it).  Copies swapped where a
    function was imported by name follow a declared swap and stay inside the model."""
    swaps = _recorded_swaps(replay)
    assert any(s.declared for s in swaps), "the replay swaps nothing"
    for s in swaps:
        module = sys.modules[s.module]
        assert s.module.split(".")[0] in ("lapic", "hypervisor", "guest"), s
        assert s.seam in declared_seams(module), (
            f"{replay.id} swaps {s.module}.{s.seam}, which {s.module}.REPLAY_SEAMS does not "
            "declare"
        )
        assert s.holder.split(".")[0] in MODEL_PACKAGES, s


def test_every_declared_seam_is_swapped_by_some_replay() -> None:
    """No stale declaration: each name in a model module's ``REPLAY_SEAMS`` is the target of
    at least one replay of the catalogue, and a seam is a plain or ``Class.attribute`` name
    that the module holds (along the class's MRO)."""
    switches = [*REPLAYABLE, *replays.MODEL_REPLAYS]
    used = {(s.module, s.seam) for r in switches for s in _recorded_swaps(r) if s.declared}
    declared: set[tuple[str, str]] = set()
    for module in _model_modules_all():
        for seam in declared_seams(module):
            declared.add((module.__name__, seam))
            owner: Any = module
            *path, name = seam.split(".")
            for part in path:
                owner = vars(owner)[part]
            assert name in vars(owner), f"{module.__name__} declares {seam}, which it lacks"
    assert declared, "no model module declares a seam"
    assert sorted(declared - used) == [], "declared seams that no replay swaps"
    assert sorted(used - declared) == [], "swapped seams that no module declares"


def test_the_patcher_refuses_a_name_the_model_does_not_declare() -> None:
    import lapic.apic

    patcher = Patcher()
    try:
        with pytest.raises(ReplayError, match=r"lapic\.apic\.LocalApic\.advance is not a declared"):
            patcher.set(lapic.apic.LocalApic, "advance", lambda self: None)
        with pytest.raises(ReplayError, match="not in the model any more"):
            patcher.set(lapic.apic.LocalApic, "no_such_method", lambda self: None)
    finally:
        patcher.restore()
    assert patcher.swaps == ()


class _SeamBase:
    def poke(self) -> int:
        return 1


class _SeamChild(_SeamBase):
    pass


REPLAY_SEAMS = frozenset({"_SeamBase.poke"})
"""This test module's own seams, for the MRO test below."""


def test_a_method_defined_in_a_base_class_is_swapped_there_and_restored_exactly() -> None:
    """A method that moved into a mixin is still found from the class a replay names: the
    patcher swaps it on the base class along the MRO (under the base's declared seam) and
    puts back the very same function."""
    original = vars(_SeamBase)["poke"]
    patcher = Patcher()
    try:
        patcher.set(_SeamChild, "poke", lambda self: 2)
        assert _SeamChild().poke() == 2 and "poke" not in vars(_SeamChild)
        assert patcher.current(_SeamChild, "poke") is vars(_SeamBase)["poke"]
    finally:
        patcher.restore()
    assert vars(_SeamBase)["poke"] is original and "poke" not in vars(_SeamChild)
    assert patcher.swaps == (
        Swap(__name__, "_SeamBase.poke", f"{__name__}._SeamBase", declared=True),
    )


def test_a_constant_is_swapped_only_where_the_model_imported_it() -> None:
    """The x2APIC ICR's reserved mask replay: ``lapic.apic`` sees 0, while ``lapic.icr``
    (where test modules import it from) keeps the true mask."""
    import lapic.apic
    import lapic.icr

    mask = lapic.icr.X2APIC_ICR_RESERVED
    replay = next(r for r in REPLAYABLE if r.id.endswith("-18"))
    assert replay.apply is not None
    with replay.apply():
        assert vars(lapic.apic)["X2APIC_ICR_RESERVED"] == 0
        assert lapic.icr.X2APIC_ICR_RESERVED is mask
    assert vars(lapic.apic)["X2APIC_ICR_RESERVED"] is mask


# ---------------------------------------------------------------------------------------------
# The switch: APICSIM_REPLAY in a pytest run
# ---------------------------------------------------------------------------------------------
def _pytest(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.skipif(UNDER_REPLAY, reason="not nested under a replay")
def test_an_unknown_id_in_the_environment_stops_the_run() -> None:
    proc = _pytest(_env(**{replays.ENV_VAR: "BUG-99"}), "tests/test_spec_coverage.py")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "unknown bug replay 'BUG-99'" in proc.stderr


@pytest.mark.skipif(UNDER_REPLAY, reason="not nested under a replay")
def test_a_non_replayable_id_in_the_environment_stops_the_run() -> None:
    proc = _pytest(_env(**{replays.ENV_VAR: "BUG-6"}), "tests/test_spec_coverage.py")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "not replayable" in proc.stderr


@pytest.mark.skipif(UNDER_REPLAY, reason="not nested under a replay")
def test_the_switch_makes_the_owning_test_fail_and_leaves_normal_runs_alone() -> None:
    target = "tests/lapic/test_msr.py"
    proc = _pytest(_env(**{replays.ENV_VAR: "BUG-22"}), target, "-k", "MSR_4", "-x", "-rf")
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, proc.stdout[-2000:]
    assert mutants.first_failure(proc.stdout) is not None
    plain = _pytest(_env(), target, "-k", "MSR_4")
    assert plain.returncode == pytest.ExitCode.OK, plain.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# apicsim mutants
# ---------------------------------------------------------------------------------------------
def test_the_keyword_expression_names_the_bug_and_its_rules_in_both_spellings() -> None:
    assert mutants.keyword_expression(replays.get("BUG-13")) == "BUG_13 or BUG-13 or MAP_4"


def test_only_modules_that_mention_a_keyword_are_collected() -> None:
    files = mutants.modules_naming(replays.get("BUG-13"))
    assert "tests/hypervisor/test_apic_map.py" in files
    assert "tests/lapic/test_timer.py" not in files
    assert all(f.startswith("tests/") and f.endswith(".py") for f in files)


def test_the_first_failure_is_read_from_the_short_summary() -> None:
    out = (
        "....F\n=== short test summary info ===\n"
        "FAILED tests/a.py::test_x[kvm-0x10] - AssertionError: boom - more\n"
        "ERROR tests/b.py::test_y\n"
    )
    assert mutants.first_failure(out) == "tests/a.py::test_x[kvm-0x10]"
    assert mutants.first_failure("ERROR tests/b.py::test_y\n") == "tests/b.py::test_y"
    assert mutants.first_failure("5 passed\n") is None


def test_mutants_refuses_unknown_ids_and_bad_job_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mutants", "--ids", "BUG-99"]) == 2
    assert "unknown bug replay" in capsys.readouterr().err
    assert cli.main(["mutants", "--jobs", "0"]) == 2


def test_mutants_lists_a_non_replayable_bug_without_failing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["mutants", "--ids", "BUG-27"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^BUG-27\s+520040146a0a\s.*not replayable: introduces vector hashing", out,
                     re.M)


def test_a_surviving_replay_makes_mutants_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    def survive(replay: Replay, keyword: str | None, timeout: float, *paths: Any) -> Any:
        return subprocess.CompletedProcess([], 0, stdout="3 passed\n", stderr="")

    monkeypatch.setattr(mutants, "_pytest", survive)
    out = io.StringIO()
    outcomes = mutants.run(["BUG-13"], 1, out)
    assert [o.ok for o in outcomes] == [False]
    assert re.search(r"^BUG-13\s+2970052481b9\s.*SURVIVED$", out.getvalue(), re.M)


def test_nothing_selected_falls_back_to_the_whole_tests_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str | None] = []

    def fake(replay: Replay, keyword: str | None, timeout: float, *paths: Any) -> Any:
        calls.append(keyword)
        if keyword is not None:
            return subprocess.CompletedProcess([], 5, stdout="no tests ran\n", stderr="")
        return subprocess.CompletedProcess([], 1, stdout="FAILED tests/z.py::test_z - x\n",
                                           stderr="")

    monkeypatch.setattr(mutants, "_pytest", fake)
    outcome = mutants.run_replay(replays.get("BUG-13"))
    assert calls == [mutants.keyword_expression(replays.get("BUG-13")), None]
    assert outcome.killed_by == "tests/z.py::test_z" and outcome.selected == "tests/"


@pytest.mark.slow
@pytest.mark.skipif(UNDER_REPLAY, reason="not nested under a replay")
def test_apicsim_mutants_kills_two_replays_and_names_the_tests() -> None:
    """Slow-ish (two pytest subprocesses), still part of every run."""
    proc = subprocess.run(
        [sys.executable, "-m", "apicsim", "mutants", "--ids", "BUG-18,BUG-22", "--jobs", "2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("BUG-")}
    assert set(rows) == {"BUG-18", "BUG-22"}
    assert re.search(r"\stests/\S+\.py::test_\S*ICR_3", rows["BUG-18"]), rows["BUG-18"]
    assert re.search(r"\stests/\S+\.py::test_\S*MSR_4", rows["BUG-22"]), rows["BUG-22"]
    assert "2 replays: 2 killed, 0 not killed" in proc.stdout


def test_a_module_that_fails_to_import_is_an_error_not_a_kill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(replay: Replay, keyword: str | None, timeout: float, *paths: Any) -> Any:
        return subprocess.CompletedProcess(
            [], 2, stdout="ERROR tests/broken.py - SyntaxError\n", stderr=""
        )

    monkeypatch.setattr(mutants, "_pytest", broken)
    outcome = mutants.run_replay(replays.get("BUG-13"))
    assert not outcome.ok
    assert outcome.detail == "ERROR: collection failed in tests/broken.py"


def test_the_replays_document_has_one_row_per_bug_with_its_commit() -> None:
    """``specs/replays.md`` tables every bug with the registry's fix commit."""
    rows: dict[str, str] = {}
    for line in (ROOT / "specs" / "replays.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| BUG-") and len(cells) >= 3:
            rows[cells[0]] = cells[1]
    assert set(rows) == {r.id for r in REPLAYS}
    for r in REPLAYS:
        expected = r.commit or "—"
        assert rows[r.id].startswith(expected), (r.id, rows[r.id])
