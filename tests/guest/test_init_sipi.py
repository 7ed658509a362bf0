"""``GuestCpu.send_INIT_SIPI``: INIT assert/de-assert and two STARTUP IPIs as Linux's
``wakeup_secondary_cpu_via_init`` sends them; the pending INIT/SIPI show in ``repr(vcpu)``."""

from __future__ import annotations

import pytest

from guest import Guest
from hypervisor import Vm
from hypervisor.trace import KvmApicIpi
from lapic.faults import ApicValueError


@pytest.mark.parametrize("driver", ["physflat", "x2apic_phys", "x2apic_cluster"])
def test_init_then_two_sipis_restart_the_target_at_the_startup_vector(driver: str) -> None:
    vm = Vm(vcpus=3, trace=True)
    g = Guest(vm, driver=driver)
    vm.tracer.clear()
    assert g.cpu(0).send_INIT_SIPI(2, 0x9F000) == 0
    icrs = [e.icr_low for e in vm.tracer.of(KvmApicIpi)]  # type: ignore[union-attr]
    assert icrs == [0xC500, 0x8500, 0x69F, 0x69F]
    assert all(e.dest_id == g.cpu_to_apicid[2] for e in vm.tracer.of(KvmApicIpi))  # type: ignore[union-attr]
    v = vm.vcpu(2)
    assert "INIT-pending SIPI-pending=0x9f" in repr(v)
    v.run()
    assert v.sipi_entry == 0x9F000 and "pending" not in repr(v)
    assert "pending" not in repr(vm.vcpu(1))


def test_send_init_sipi_checks_its_arguments() -> None:
    vm = Vm(vcpus=2)
    g = Guest(vm, driver="x2apic_phys")
    with pytest.raises(ApicValueError, match="start_eip"):
        g.cpu(0).send_INIT_SIPI(1, 0x9F010)
    with pytest.raises(ApicValueError, match="target"):
        g.cpu(0).send_INIT_SIPI(2)
