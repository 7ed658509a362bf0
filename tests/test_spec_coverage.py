"""The rule catalogue in ``specs/*.md`` and the tests stay in step.

A rule is a ``### ID — title`` heading in a ``specs/*.md`` file (fenced code blocks are not
read). A test *names* a rule by writing its id anywhere in a ``tests/**/*.py`` file, as written
(``BASE-2``) or with ``_`` for ``-`` (``BASE_2``); test names and docstrings are the intended
places.  See ``specs/README.md``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = ROOT / "specs"
TESTS_DIR = ROOT / "tests"
THIS_FILE = Path(__file__).resolve()

RULE_HEADING = re.compile(r"^### ([A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+) — ")
ID_SHAPED_HEADING = re.compile(r"^###\s+[A-Z][A-Z0-9]*-[A-Z0-9]")
ANY_HEADING = re.compile(r"^#{1,6}\s")
FENCE = re.compile(r"^\s*(```|~~~)")
SOURCE_LINE = re.compile(r"^- Source:\s*\S")


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``### ID — title`` section of a spec file."""

    rule_id: str
    path: Path
    line: int
    heading: str
    body: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True, slots=True)
class Heading:
    """A ``###`` heading outside fenced code, with its location."""

    path: Path
    line: int
    text: str


def spec_files() -> list[Path]:
    return sorted(SPECS_DIR.glob("*.md"))


def _unfenced_lines(path: Path) -> list[tuple[int, str, bool]]:
    """``(line number, text, inside a fenced code block)`` for every line of ``path``."""
    result: list[tuple[int, str, bool]] = []
    fenced = False
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(text):
            result.append((number, text, True))
            fenced = not fenced
            continue
        result.append((number, text, fenced))
    return result


def level3_headings() -> list[Heading]:
    return [
        Heading(path, number, text)
        for path in spec_files()
        for number, text, fenced in _unfenced_lines(path)
        if not fenced and text.startswith("### ")
    ]


def _rules_in(path: Path) -> list[Rule]:
    rules: list[Rule] = []
    current: tuple[str, int, str] | None = None
    body: list[str] = []

    def close() -> None:
        if current is not None:
            rule_id, line, heading = current
            rules.append(Rule(rule_id, path, line, heading, tuple(body)))

    for number, text, fenced in _unfenced_lines(path):
        if not fenced and ANY_HEADING.match(text):
            close()
            body = []
            match = RULE_HEADING.match(text)
            current = (match.group(1), number, text) if match else None
        elif current is not None:
            body.append(text)
    close()
    return rules


@cache
def all_rules() -> tuple[Rule, ...]:
    return tuple(rule for path in spec_files() for rule in _rules_in(path))


@cache
def sources_of_tests() -> tuple[str, ...]:
    """The text of every ``tests/**/*.py`` file except this one."""
    return tuple(
        path.read_text(encoding="utf-8")
        for path in sorted(TESTS_DIR.rglob("*.py"))
        if path.resolve() != THIS_FILE
    )


def id_pattern(rule_id: str) -> re.Pattern[str]:
    """Matches ``rule_id`` as written or with ``_`` for ``-``, standing alone.

    "Standing alone" means no letter or digit on either side, and no ``-`` before it, so
    ``DIFF-D1`` is not found inside ``DIFF-D10`` and ``INIT-1`` not inside ``X-INIT-1``.  A
    ``_`` may touch the underscore form, as in ``test_something__BASE_2``.
    """
    forms = sorted({rule_id, rule_id.replace("-", "_")})
    alternatives = "|".join(re.escape(form) for form in forms)
    return re.compile(rf"(?<![A-Za-z0-9-])(?:{alternatives})(?![A-Za-z0-9])")


def is_named_by_a_test(rule_id: str, sources: tuple[str, ...]) -> bool:
    pattern = id_pattern(rule_id)
    return any(pattern.search(text) for text in sources)


def test_the_specs_folder_defines_rules() -> None:
    assert spec_files(), f"no rules files in {SPECS_DIR}"
    assert all_rules(), (
        f"no '### ID — title' headings found in {SPECS_DIR}/*.md; the coverage check would pass "
        "vacuously"
    )


def test_every_id_shaped_heading_is_a_well_formed_rule() -> None:
    malformed = [
        f"{h.path.relative_to(ROOT)}:{h.line}: {h.text}"
        for h in level3_headings()
        if ID_SHAPED_HEADING.match(h.text) and not RULE_HEADING.match(h.text)
    ]
    assert not malformed, (
        "these headings look like rules but do not match '### ID — title' (em dash U+2014, "
        "one space either side), so the coverage check would skip them:\n  "
        + "\n  ".join(malformed)
    )


def test_rule_ids_are_unique_across_all_spec_files() -> None:
    counts = Counter(rule.rule_id for rule in all_rules())
    duplicates = {
        rule_id: [rule.where for rule in all_rules() if rule.rule_id == rule_id]
        for rule_id, count in counts.items()
        if count > 1
    }
    assert not duplicates, f"rule ids defined more than once: {duplicates}"


def test_every_rule_names_its_source() -> None:
    missing = [
        f"{rule.rule_id} ({rule.where})"
        for rule in all_rules()
        if not any(SOURCE_LINE.match(line) for line in rule.body)
    ]
    assert not missing, "rules without a '- Source:' line: " + ", ".join(missing)


def test_the_id_matcher_accepts_both_spellings_and_rejects_longer_ids() -> None:
    pattern = id_pattern("DIFF-D1")
    assert pattern.search('"""DIFF-D1: ESR latching."""')
    assert pattern.search("def test_esr_latches__DIFF_D1() -> None:")
    assert not pattern.search("def test_svr_nibble__DIFF_D19() -> None:")
    assert not pattern.search('"""DIFF-D10 only."""')
    assert not id_pattern("INIT-1").search('"""ACCEPT-INIT-1"""')


def test_every_rule_id_is_named_by_a_test() -> None:
    sources = sources_of_tests()
    by_file: dict[str, list[str]] = {}
    for rule in all_rules():
        if not is_named_by_a_test(rule.rule_id, sources):
            by_file.setdefault(str(rule.path.relative_to(ROOT)), []).append(rule.rule_id)
    uncovered = [rule_id for ids in by_file.values() for rule_id in ids]
    report = "\n".join(f"  {path}: {', '.join(ids)}" for path, ids in by_file.items())
    assert not uncovered, (
        f"{len(uncovered)} of {len(all_rules())} rule ids are not named by any test "
        "(write the id, or it with '_' for '-', in a test name or docstring under tests/):\n"
        + report
    )
