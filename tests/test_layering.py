"""The import directions of the layers (``../shared/ARCHITECTURE.md``, restated in
``specs/README.md``), checked on the source text of every module.

Layers, lowest first; a module may import its own layer and the layers below it, never one
above, not even under ``TYPE_CHECKING`` (every ``import`` statement in the file counts, wherever
it stands)::

    0 lapic              one local APIC; knows nothing of VMs or hosts
    1 hypervisor.host    the physical machine: pCPUs, clock, step scheduler; never names a VM
    2 hypervisor.hw      what the CPU does (PID, VID, IPIv, AVIC tables); no KVM policy
    3 hypervisor         KVM's software: config, Vm, Vcpu, delivery, map, PV IPI, exits, trace
    4 hypervisor.accel   one module per mechanism; never import each other
    5 guest              a Linux-like guest
    6 apicsim            user tools (CLI, ops, scenarios, replays, real-KVM backend)

Two more rules: accelerator modules never import one another (the package ``__init__``, the
registry, may name them), and no model module (layers 0-5) imports ``apicsim`` or ``tests``.
A lower layer that must call up does so through a Protocol it declares itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lapic", "hypervisor", "guest", "apicsim")

LAYERS: tuple[tuple[str, int], ...] = (
    ("lapic", 0),
    ("hypervisor.host", 1),
    ("hypervisor.hw", 2),
    ("hypervisor.accel", 4),
    ("hypervisor", 3),
    ("guest", 5),
    ("apicsim", 6),
)
"""Prefix -> rank; the first prefix that matches wins (so ``hypervisor.host`` before
``hypervisor``)."""


def rank(module: str) -> int | None:
    """The layer of a project module, or None for the standard library and third parties."""
    for prefix, r in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return r
    if module == "tests" or module.startswith("tests."):
        return 99
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, own: str, is_package: bool) -> list[tuple[int, str]]:
    """Every module an ``import`` statement of module ``own`` names, with its line: ``from a.b
    import c`` names both ``a.b`` and ``a.b.c`` (c may be a submodule)."""
    tree = ast.parse(source)
    package = own if is_package else own.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def project_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def violations(source: str, own: str, *, is_package: bool = False) -> list[str]:
    """The layering rules ``source`` (the text of module ``own``) breaks, one line each."""
    own_rank = rank(own)
    assert own_rank is not None, own
    problems: list[str] = []
    for line, target in imported_modules(source, own, is_package):
        r = rank(target)
        if r is None:
            continue
        where = f"{own}:{line} imports {target}"
        if r > own_rank:
            problems.append(f"{where}: upward (layer {own_rank} -> {r})")
        if own.startswith("hypervisor.accel.") and target.startswith("hypervisor.accel."):
            mine = own.split(".")[2]
            theirs = target.split(".")[2]
            if mine != theirs:
                problems.append(f"{where}: accelerators never import each other")
    return problems


def test_every_package_of_the_model_and_tools_is_found() -> None:
    names = {module_name(p) for p in project_modules()}
    assert {"lapic", "hypervisor", "hypervisor.accel", "guest", "apicsim"} <= names


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert violations(source, module_name(path), is_package=path.name == "__init__.py") == []


def test_the_rules_catch_an_upward_import_even_under_type_checking() -> None:
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hypervisor.vm import Vm\n"
    )
    assert violations(source, "lapic.probe") == [
        "lapic.probe:3 imports hypervisor.vm: upward (layer 0 -> 3)",
        "lapic.probe:3 imports hypervisor.vm.Vm: upward (layer 0 -> 3)",
    ]


def test_the_rules_resolve_relative_imports() -> None:
    assert violations("from ..vm import Vm\n", "hypervisor.host.probe") == [
        "hypervisor.host.probe:1 imports hypervisor.vm: upward (layer 1 -> 3)",
        "hypervisor.host.probe:1 imports hypervisor.vm.Vm: upward (layer 1 -> 3)",
    ]
    assert violations("from . import steps\n", "hypervisor.host", is_package=True) == []


def test_the_rules_catch_one_accelerator_importing_another() -> None:
    problems = violations(
        "from hypervisor.accel.emulated import Emulated\n", "hypervisor.accel.avic"
    )
    assert problems and all("accelerators never import each other" in p for p in problems)
    assert (
        violations(
            "from hypervisor.accel.emulated import Emulated\n", "hypervisor.accel", is_package=True
        )
        == []
    )


def test_the_rules_catch_the_model_importing_the_tools_or_the_tests() -> None:
    assert rank("apicsim.ops") == 6 and rank("guest") == 5
    assert rank("tests.lapic.strategies") == 99
    assert rank("hypervisor.host.pcpu") == 1 and rank("hypervisor.hw.pid") == 2
    assert rank("hypervisor.accel.avic") == 4 and rank("hypervisor.vm") == 3
    assert rank("bitarray") is None and rank("collections.abc") is None


def test_no_module_of_the_four_packages_is_over_1000_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in project_modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 1000
    }
    assert long == {}
