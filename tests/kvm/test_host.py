"""Facts of the host's KVM that the backend relies on or exposes (KVMB-* in
``specs/kvm_backend.md``); skipped where KVM is unavailable."""

from __future__ import annotations

import time
from typing import Any

import pytest

from apicsim import replays
from apicsim.kvm import AnyVm, KvmVm, guest_features, kvm_available
from apicsim.kvm import guest as image
from hypervisor import Vm
from lapic import ApicValueError, GuestFault
from tests.hypervisor.test_config import BAD_CALLS
from tests.kvm.support import (
    APIC,
    X2APIC_ENABLE,
    Factory,
    needs_kvm,
    outcome,
    run_both,
    sw_enable,
    word,
)

pytestmark = needs_kvm


def test_kvm_available_says_why() -> None:
    ok, why = kvm_available()
    assert ok and "KVM API 12" in why


def test_the_host_limits_are_read_and_enforced__KVMB_1() -> None:
    """KVMB-1: KVM_CAP_MAX_VCPUS / KVM_CAP_MAX_VCPU_ID bound what a KvmVm accepts, with a
    message that names the capability."""
    with KvmVm(1) as vm:
        limits = vm.limits
        assert limits.max_vcpus >= 256 and limits.max_vcpu_id >= limits.max_vcpus
        with pytest.raises(ApicValueError, match="KVM_CAP_MAX_VCPU_ID"):
            vm.add_vcpu(limits.max_vcpu_id)
        assert vm.add_vcpu(limits.max_vcpu_id - 1).vcpu_id == limits.max_vcpu_id - 1
    with pytest.raises(ApicValueError, match="KVM_CAP_MAX_VCPUS"):
        KvmVm(limits.max_vcpus + 1)


def test_the_guest_cpu_is_described_to_the_model__KVMB_1() -> None:
    """KVMB-1: ``guest_features()`` is what KvmVm's CPUID advertises; KVM's LVR agrees with
    the model's given those features."""
    with KvmVm(1) as vm:
        features = vm.features
        assert features == guest_features()
        assert features.x2apic
        assert vm.get_lapic(0)[0x30:0x34] == Vm(1, features=features).get_lapic(0)[0x30:0x34]


def test_a_guest_exception_is_a_guest_fault_and_the_vcpu_runs_on__KVMB_2() -> None:
    """KVMB-2: #GP from a WRMSR to an unknown MSR comes back as GuestFault(13) with KVM's
    error code and RIP; the next access runs normally."""
    with KvmVm(1) as vm:
        cpu = vm.vcpu(0)
        with pytest.raises(GuestFault) as fault:
            cpu.wrmsr(0x12345678, 1)
        assert fault.value.vector == 13
        assert "error code 0x0" in fault.value.reason
        assert cpu.mmio_read(APIC + 0x30) == 0x50014


def test_a_guest_that_never_reports_is_stopped_by_the_timeout__KVMB_2() -> None:
    """KVMB-2: every KVM_RUN is bounded; a guest spinning on ``jmp $`` ends in TimeoutError
    and the vCPU is usable afterwards."""
    with KvmVm(1, timeout=0.2) as vm:
        cpu = vm.vcpu(0)
        spin = image.HANDLERS + 4  # the `jmp $` after vector 0's report
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            cpu.execute(spin, "spin")
        assert time.monotonic() - start < 2
        assert cpu.mmio_read(APIC + 0x20) == 0


def test_an_nmi_is_counted_by_the_guest_and_is_not_a_fault__KVMB_3() -> None:
    """KVMB-3: an NMI IPI reaches vCPU 1 (pending in KVM_GET_VCPU_EVENTS); its next guest
    access takes the NMI (the handler counts it and IRETs) and then completes normally.
    (vCPU 1 of 3, not the last one created: see KVMB-8.)"""
    with KvmVm(3) as vm:
        src = vm.vcpu(0)
        src.mmio_write(APIC + 0x310, 0x01000000)
        src.mmio_write(APIC + 0x300, 0x00004400)
        target = vm.vcpu(1)
        assert (target.nmi_pending, target.nmi_count) == (1, 0)
        assert target.mmio_read(APIC + 0x20) == 0x01000000
        assert (target.nmi_pending, target.nmi_count) == (0, 1)


@pytest.mark.parametrize("backend", ["model", "kvm"])
def test_the_apic_map_lacks_the_vcpu_created_last_until_it_is_rebuilt__KVMB_8(
    backend: str,
) -> None:
    """KVMB-8 (measured on this host, modelled by ``KvmOptions.map_excludes_new_vcpu``): the APIC
    map KVM builds while creating a vCPU does not contain that vCPU, so until something marks
    the map dirty (an ID/LDR/DFR/SVR change, KVM_SET_LAPIC, another KVM_CREATE_VCPU) the fast
    path finds no APIC at its ID: an NMI MSI to it returns 0 and is lost."""
    if backend == "kvm":
        ok, reason = kvm_available()
        if not ok:
            pytest.skip(reason)
    vm: AnyVm = KvmVm(2) if backend == "kvm" else Vm(2)
    try:
        assert vm.signal_msi(0xFEE01000, 0, 0x400) == 0
        assert vm.vcpu(1).nmi_pending == 0
        assert vm.signal_msi(0xFEE00000, 0, 0x400) == 1  # vCPU 0 is in the map
        vm.vcpu(1).mmio_read(APIC + 0x20)  # running it does not rebuild the map
        assert vm.set_msr(1, 0x1B, 0xFEE00800)  # nor does an APIC_BASE write of its value
        assert vm.signal_msi(0xFEE01000, 0, 0x400) == 0
        vm.add_vcpu(2)
        assert vm.signal_msi(0xFEE01000, 0, 0x400) == 1
        assert vm.signal_msi(0xFEE02000, 0, 0x400) == 0
        vm.set_lapic(2, vm.get_lapic(2))
        assert vm.signal_msi(0xFEE02000, 0, 0x400) == 1
    finally:
        if isinstance(vm, KvmVm):
            vm.close()
    assert Vm(2, "sdm").signal_msi(0xFEE01000, 0, 0x400) == 1  # the SDM has no such map


@pytest.mark.parametrize("backend", ["model", "kvm"])
def test_an_unserviced_mmio_read_returns_the_previous_read_s_bytes__KVMB_4(backend: str) -> None:
    """KVMB-4 (MMIO-4's parameter, measured; modelled by
    ``Profile.unserviced_read_repeats_last``): KVM leaves the emulator's read buffer untouched
    for a read it does not service, so the guest sees the bytes of its previous MMIO read
    (0 on a fresh vCPU)."""
    if backend == "kvm":
        ok, reason = kvm_available()
        if not ok:
            pytest.skip(reason)
    vm: AnyVm = KvmVm(2) if backend == "kvm" else Vm(2)
    try:
        cpu = vm.vcpu(1)
        assert cpu.mmio_read(APIC + 0x24) == 0  # fresh vCPU: nothing read yet
        assert cpu.mmio_read(APIC + 0xE0) == 0xFFFFFFFF  # DFR
        assert cpu.mmio_read(APIC + 0x24) == 0xFFFFFFFF  # crosses the word: not serviced
        assert cpu.mmio_read(APIC + 0x20) == 0x01000000  # ID
        assert cpu.mmio_read(APIC + 0x40) == 0x01000000  # reserved offset
        assert cpu.mmio_read(APIC + 0x20, 8) == 0x01000000  # 8 bytes: not serviced
        assert cpu.mmio_read(APIC + 0xFF0) == 0x01000000  # above 0x3F0
        cpu.rdmsr(0x1B)
        cpu.mmio_write(APIC + 0x80, 0x20)
        assert cpu.mmio_read(APIC + 0x44) == 0x01000000  # only MMIO reads refill it
    finally:
        if isinstance(vm, KvmVm):
            vm.close()
    assert Vm(1, "sdm").vcpu(0).mmio_read(APIC + 0x24) == 0  # sdm: unserviced_read_value


def test_kvm_itself_answers_mmio_to_an_apic_that_does_not_decode_it__KVMB_5() -> None:
    """KVMB-5 (MMIO-2): in x2APIC mode and with APIC_BASE.EN clear, KVM answers xAPIC MMIO
    reads with all ones and drops writes (KVM_X86_QUIRK_LAPIC_MMIO_HOLE): no access is handed
    to userspace, so the backend's own all-ones answer is never what the test sees."""
    with KvmVm(2) as vm:
        x2 = vm.vcpu(0)
        x2.wrmsr(0x1B, X2APIC_ENABLE | 0x100)
        off = vm.vcpu(1)
        off.wrmsr(0x1B, 0xFEE00000)
        for cpu in (x2, off):
            assert cpu.mmio_read(APIC + 0x30) == 0xFFFFFFFF
            assert cpu.mmio_read(APIC + 0x80, 2) == 0xFFFF
            cpu.mmio_write(APIC + 0x80, 0x20)
            assert cpu.user_mmio_exits == 0
        assert vm.get_msr(0, 0x808) == 0
        assert vm.get_lapic(1)[0x80] == 0


def test_hypercalls_are_kvm_s_or_not_implemented__KVMB_6() -> None:
    """KVMB-6: where the guest's VMCALL reaches KVM, KVM_HC_SEND_IPI (10) returns what the
    model returns; on a host where it faults (#UD) or never completes (PVM here), the
    backend says so with NotImplementedError, quickly, and the vCPU runs on."""

    def body(vm: AnyVm) -> int:
        assert isinstance(vm, (Vm, KvmVm))
        for i in range(3):
            sw_enable(vm, i)
        return vm.vcpu(0).hypercall(10, 0b110, 0, 0, 0xF1)

    try:
        assert run_both(body, vcpus=3) == 2
    except NotImplementedError as e:
        assert "VMCALL" in str(e)
        with KvmVm(1) as vm:
            start = time.monotonic()
            for _ in range(2):
                with pytest.raises(NotImplementedError):
                    vm.vcpu(0).hypercall(10)
            assert time.monotonic() - start < 2
            assert vm.hypercall_unavailable is not None
            assert vm.vcpu(0).mmio_read(APIC + 0x20) == 0


def test_an_apic_window_moved_into_guest_ram_is_refused__KVMB_7() -> None:
    """KVMB-7: the backend's RAM starts at GPA 0, and a memory slot shadows the APIC there, so
    an access to a window inside it is refused rather than silently reading RAM."""
    with KvmVm(1) as vm:
        assert vm.set_msr(0, 0x1B, 0x800)
        assert outcome(lambda: vm.vcpu(0).mmio_read(0x20)) == ("refused", 0)
        assert vm.set_msr(0, 0x1B, 0xFED00800)
        assert vm.vcpu(0).mmio_read(0xFED00030) == 0x50014


@pytest.mark.parametrize("high", [1, 0x10, 0x7F, 0xFFF])
def test_every_apic_base_address_bit_moves_the_window_on_both_backends__KVMB_7__MMIO_1(
    high: int,
) -> None:
    """KVMB-7 / MMIO-1: IA32_APIC_BASE ``high << 32 | 0xFEE00900`` puts the window at
    ``high << 32 | 0xFEE00000`` on KVM and in the model (bits 63:12 of the register, not
    31:12): a TPR write there reads back, and the ID reads through it; the same offsets at
    0xFEE00000 are outside the window (the backend and the model refuse them)."""
    base = high << 32 | 0xFEE00000

    def body(vm: AnyVm) -> list[object]:
        cpu = vm.vcpu(0)
        if outcome(lambda: cpu.wrmsr(0x1B, base | 0x900)) == ("fault", 13):
            return ["#GP"]  # above this vCPU's MAXPHYADDR: reserved (BASE-2)
        cpu.wrmsr(0x1B, base | 0x900)
        cpu.mmio_write(base + 0xF0, 0x1FF)
        cpu.mmio_write(base + 0x80, 0x50)
        return [
            hex(cpu.mmio_read(base + 0x80)),
            hex(cpu.mmio_read(base + 0x20)),
            outcome(lambda: cpu.mmio_read(0xFEE00080))[0],
            word(vm.get_lapic(0), 0x80),
        ]

    assert run_both(body) in (["0x50", "0x0", "refused", 0x50], ["#GP"])


def test_the_fid_2_switch_puts_back_the_window_from_bits_31_12__KVMB_7() -> None:
    """KVMB-7: ``APICSIM_REPLAY=FID-2`` (``apicsim.replays.MODEL_REPLAYS``) is the model's old
    window, IA32_APIC_BASE bits 31:12, which the default differential run finds; off again,
    the window follows every address bit."""
    with replays.active(["FID-2"]):
        vm = Vm(1)
        vm.vcpu(0).wrmsr(0x1B, 0x1_FEE00900)
        assert vm.lapic(0).base_address == 0xFEE00000
    vm = Vm(1)
    vm.vcpu(0).wrmsr(0x1B, 0x1_FEE00900)
    assert vm.lapic(0).base_address == 0x1_FEE00000


def test_init_and_sipi_take_effect_when_the_vcpu_next_enters__KVMB_9() -> None:
    """KVMB-9 (ACCEPT-INIT, ACCEPT-STARTUP, INIT-1): an INIT IPI to vCPU 1 changes nothing in
    KVM_GET_LAPIC until vCPU 1 is entered; then the AP is reset to the INIT-1 values and waits
    for SIPI, so the backend refuses to run it (as the model's ``Vcpu`` refuses an
    INIT_RECEIVED vCPU).  After a STARTUP IPI it runs again: the backend puts it back in
    64-bit mode, and its APIC still has the INIT values (SVR 0xFF, TPR 0)."""
    with KvmVm(3) as vm:
        sw_enable(vm, 1)
        target = vm.vcpu(1)
        target.mmio_write(APIC + 0x80, 0x20)
        src = vm.vcpu(0)
        src.mmio_write(APIC + 0x310, 0x01000000)
        src.mmio_write(APIC + 0x300, 0x00004500)
        assert vm.get_lapic(1)[0x80] == 0x20  # nothing happened yet
        with pytest.raises(ApicValueError, match="INIT_RECEIVED"):
            target.mmio_read(APIC + 0x80)
        assert (vm.get_lapic(1)[0x80], vm.get_lapic(1)[0xF0]) == (0, 0xFF)
        src.mmio_write(APIC + 0x300, 0x00004612)
        assert (target.mmio_read(APIC + 0x80), target.mmio_read(APIC + 0xF0)) == (0, 0xFF)
        assert target.mmio_read(APIC + 0x20) == 0x01000000


@pytest.mark.parametrize(("method", "args", "error", "message"), BAD_CALLS)
def test_both_backends_check_host_api_arguments_alike_before_any_ioctl__MSI_1(
    backends: Factory, method: str, args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    """``hypervisor.Vm`` and ``KvmVm`` run the one set of checks of ``hypervisor.api``: the
    same misuse raises the same error with the same message on both, and changes nothing."""
    vm = backends(1)
    before = (vm.get_lapic(0), len(vm))
    with pytest.raises(error, match=message):
        getattr(vm, method)(*args)
    assert (vm.get_lapic(0), len(vm)) == before
