"""``apicsim.testing``: the strategies build what they say, the pytest plugin is installed
(entry point ``pytest11``), and the README's five-line property test passes when run with the
installed apicsim from a directory outside the repository."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from apicsim.ops import Icr, Msi, Run
from apicsim.testing import (
    MATRIX,
    Platform,
    Topology,
    icr_values,
    msi_values,
    programs,
    register_writes,
    topologies,
)
from apicsim.testing.strategies import WRITABLE
from apicsim.testing.topologies import DISABLED, X2APIC, ApicSpec, mixed_topologies
from hypervisor import Vm
from lapic.faults import ApicValueError, GuestFault

ROOT = Path(__file__).resolve().parents[2]


def readme_property_test() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Your own property tests") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_the_readme_property_test_is_five_lines_of_code() -> None:
    code = [line for line in readme_property_test().splitlines() if line.strip()]
    assert len(code) == 5


def test_the_readme_property_test_passes_against_the_installed_apicsim_outside_the_repo(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_mine.py").write_text(readme_property_test())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mine.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(MATRIX)} passed" in proc.stdout
    assert str(ROOT) not in str(tmp_path)


def test_the_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    eps = importlib.metadata.entry_points(group="pytest11")
    assert [ep.value for ep in eps if ep.name == "apicsim"] == ["apicsim.testing.plugin"]


def test_the_platform_matrix_is_every_preset_profile_on_every_accelerator() -> None:
    from hypervisor.accel import ACCELERATORS
    from lapic.profile import PRESETS

    assert {(p.profile.name, p.accelerator) for p in MATRIX} == {
        (name, a) for name in PRESETS for a in ACCELERATORS
    }
    p = MATRIX[0]
    assert isinstance(p, Platform) and len(p.vm(3)) == 3
    assert p == Platform(p.profile, p.accelerator, p.kvm) and hash(p) == hash(MATRIX[0])
    assert repr(p) == f"<Platform {p.profile.name}/{p.accelerator}>"


def test_the_apicsim_vm_fixture_makes_vms(apicsim_vm) -> None:  # type: ignore[no-untyped-def]
    vm = apicsim_vm(3, trace=True)
    assert isinstance(vm, Vm) and len(vm) == 3 and vm.tracer.on


@settings(max_examples=25, deadline=None)
@given(topologies(max_vcpus=4))
def test_a_topology_builds_a_vm_with_its_ids_in_its_mode_software_enabled(top: Topology) -> None:
    vm = top.build()
    assert [v.vcpu_id for v in vm.vcpus] == list(top.vcpu_ids)
    for v in vm.vcpus:
        assert v.apic.x2apic_mode is top.x2apic and v.apic.sw_enabled


@settings(max_examples=25, deadline=None)
@given(mixed_topologies(max_vcpus=5))
def test_a_mixed_topology_builds_the_same_apics_as_a_vm_and_as_a_bus(top: Topology) -> None:
    """One type, two builders: every vCPU's mode, software enable, xAPIC ID and LDR are the
    spec's, on the ``Vm`` (host KVM_SET_MSRS + guest accesses) and on the bare ``ApicBus``."""
    vm, bus = top.build_vm(), top.build_bus()
    assert top.present() and 0 in top.present()
    for i, spec in enumerate(top.specs):
        for apic in (vm.vcpu(i).apic, bus[i]):
            assert apic.hw_enabled is (spec.mode != DISABLED)
            if spec.mode == DISABLED:
                continue
            assert apic.x2apic_mode is (spec.mode == X2APIC)
            assert apic.sw_enabled is spec.sw_enabled
            if spec.mode != X2APIC:
                assert apic.mmio_read(0x20) >> 24 == spec.xapic_id
                assert apic.mmio_read(0xD0) >> 24 == spec.lid
    assert len(top.physical_ids()) == len(top.present())  # MAP-2: distinct physical IDs


def test_a_topology_refuses_specs_that_do_not_fit_naming_the_argument() -> None:
    for bad in (lambda: ApicSpec("x3apic"), lambda: ApicSpec("xapic", xapic_id=256),
                lambda: Topology((0, 1), apics=(ApicSpec("xapic"),))):
        try:
            bad()
        except ApicValueError as e:
            assert str(e).split(":")[0] in ("mode", "xapic_id, lid", "apics")
        else:
            raise AssertionError("accepted")


@settings(max_examples=50, deadline=None)
@given(icr_values(), msi_values(), register_writes())
def test_icr_msi_and_register_values_have_their_documented_shape(
    icr: int, msi: tuple[int, int], write: tuple[int, int]
) -> None:
    assert icr & 0xFFF0_0000 == 0 and icr & 0x3000 == 0 and icr & 0xFF >= 16
    assert (icr >> 8) & 7 in (0, 1, 4) and icr & 0x4000
    lo, data = msi
    assert lo & 0xFFF00000 == 0xFEE00000 and data & 0xFF >= 16 and data >> 11 == 0
    assert write[0] in WRITABLE and 0 <= write[1] <= 0xFFFFFFFF


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_programs_are_operations_that_run_on_their_topology(data: st.DataObject) -> None:
    top = data.draw(topologies(max_vcpus=4))
    prog = data.draw(programs(top, max_size=6))
    vm = top.build()
    from apicsim.ops import HostOnly

    for op in prog:
        assert isinstance(op, Icr | Msi | Run)
        with contextlib.suppress(GuestFault):  # e.g. reserved ICR fields in xAPIC mode
            if isinstance(op, Run):
                vm.vcpu(op.vcpu).run()
            else:
                op.perform(HostOnly(vm))
