"""``Vcpu.msr_exit``: an MSR-write exit as KVM takes it, with its accounting written out.

Rules: EXIT-1 (every trapped APIC access is one exit, counted, logged and traced), FAST-10
(the x2APIC ICR exit fastpath equals the slow path), KVMB-11 (SVM without AVIC syncs CR8 at
every exit).  ``msr_exit`` repeats what ``record_exit`` does for its one reason (it runs once
per x2APIC register write); these properties hold the copy to the original.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor import ExitReason, Vcpu, Vm, VmConfig
from lapic import GuestFault
from lapic.faults import ApicValueError

ENABLE_X2APIC = 0xFEE00C00
X2APIC_MSRS = [0x802, 0x808, 0x80B, 0x80F, 0x828, 0x830, 0x832, 0x835, 0x838, 0x83E, 0x83F]
"""ID, TPR, EOI, SVR, ESR, ICR, LVT timer, LVT LINT0, TMICT, TDCR, SELF IPI."""


def reference(vcpu: Vcpu) -> Callable[[int, int], None]:
    """The exit as two calls: ``record_exit`` of an MSR write, then KVM's emulation."""

    def wrmsr(msr: int, value: int) -> None:
        vcpu.record_exit(ExitReason.MSR_WRITE, msr, value)
        vcpu.emulate_wrmsr(msr, value)

    return wrmsr


writes = st.lists(
    st.tuples(
        st.integers(0, 3),  # vCPU
        st.one_of(st.sampled_from(X2APIC_MSRS), st.just(0x1B), st.integers(0, 0xFFFFFFFF)),
        st.one_of(
            st.integers(0, (1 << 64) - 1),
            st.integers(0, 0xFF),
            st.builds(lambda d, low: d << 32 | low, st.integers(0, 4), st.integers(0, 0xFFFFF)),
        ),
    ),
    max_size=30,
)


@settings(max_examples=100, deadline=None)
@given(
    trace=st.booleans(),
    exit_log=st.sampled_from([0, 3, 4096]),
    svm=st.booleans(),
    cr8=st.lists(st.integers(0, 15), min_size=4, max_size=4),
    ops=writes,
)
def test_an_msr_write_exit_is_recorded_and_handled_as_record_exit_then_emulate_wrmsr__EXIT_1(
    trace: bool, exit_log: int, svm: bool, cr8: list[int], ops: list[tuple[int, int, int]]
) -> None:
    config = VmConfig.build(4, trace=trace, exit_log=exit_log)
    config = config.replace(kvm=config.kvm.replace(tpr_low_bits_survive_exit=not svm))
    vms = Vm(config), Vm(config)
    for vm in vms:
        for i in range(4):
            vm.vcpu(i).wrmsr(0x1B, ENABLE_X2APIC)
            vm.vcpu(i).wrmsr(0x80F, 0x1FF)
            vm.vcpu(i).mov_to_cr8(cr8[i])
    written_out, by_reference = vms
    for i in range(4):
        by_reference.vcpu(i)._wrmsr = reference(by_reference.vcpu(i))
    for step, (i, msr, value) in enumerate(ops):
        outcomes: list[str | None] = []
        for vm in vms:
            try:
                vm.vcpu(i).wrmsr(msr, value)
                outcomes.append(None)
            except (GuestFault, ApicValueError) as e:
                outcomes.append(type(e).__name__)
        assert outcomes[0] == outcomes[1], f"step {step}"
        a, b = written_out.snapshot(), by_reference.snapshot()
        assert a == b, f"step {step}: " + "; ".join(b.diff(a))
        assert written_out.exits == by_reference.exits
        assert [v.exits for v in written_out.vcpus] == [v.exits for v in by_reference.vcpus]


def test_a_target_that_binds_other_ops_takes_them_on_a_kept_route__FAST_10() -> None:
    from lapic import LocalApic
    from lapic.ops import DefaultApicOps

    class Spy(DefaultApicOps):
        def __init__(self) -> None:
            self.vectors: list[int] = []

        def set_intr_ready(self, apic: LocalApic, vector: int, level_triggered: bool) -> bool:
            self.vectors.append(vector)
            return super().set_intr_ready(apic, vector, level_triggered)

    vm = Vm(2)
    for i in range(2):
        vm.vcpu(i).wrmsr(0x1B, ENABLE_X2APIC)
        vm.vcpu(i).wrmsr(0x80F, 0x1FF)
    icr = 1 << 32 | 0x4041
    for _ in range(2):  # the route and the ICR value are kept
        vm.vcpu(0).wrmsr(0x830, icr)
        vm.signal_msi(0xFEE01000, 0, 0x40)
    spy = Spy()
    vm.lapic(1).bind_ops(spy)
    vm.vcpu(0).wrmsr(0x830, icr)
    vm.signal_msi(0xFEE01000, 0, 0x40)
    assert spy.vectors == [0x41, 0x40]


def test_an_accelerator_without_wrmsr_of_or_with_its_own_wrmsr_still_sees_every_write() -> None:
    from hypervisor.accel.emulated import Emulated
    from hypervisor.accelerators import ACCELERATORS

    class Logging(Emulated):
        name = "logging-test"

        def __init__(self) -> None:
            self.seen: list[int] = []

        def wrmsr(self, vcpu: Vcpu, msr: int, value: int) -> None:
            self.seen.append(msr)
            super().wrmsr(vcpu, msr, value)

    class Plain:  # the accelerator interface without wrmsr_of (delegates to Emulated)
        name = "plain-test"

        def __init__(self) -> None:
            self.inner = Emulated()
            self.seen: list[int] = []

        def wrmsr(self, vcpu: Vcpu, msr: int, value: int) -> None:
            self.seen.append(msr)
            self.inner.wrmsr(vcpu, msr, value)

        def __getattr__(self, name: str) -> object:
            if name == "wrmsr_of":
                raise AttributeError(name)
            return getattr(self.inner, name)

    try:
        ACCELERATORS["logging-test"] = Logging
        ACCELERATORS["plain-test"] = Plain  # type: ignore[assignment]
        for name in ("logging-test", "plain-test"):
            vm = Vm(2, accelerator=name)
            for i in range(2):
                vm.vcpu(i).wrmsr(0x1B, ENABLE_X2APIC)
                vm.vcpu(i).wrmsr(0x80F, 0x1FF)
            for _ in range(2):
                vm.vcpu(0).wrmsr(0x830, 1 << 32 | 0x4041)
            assert vm.accel.seen == [0x1B, 0x80F] * 2 + [0x830] * 2  # type: ignore[attr-defined]
            assert vm.stats.exits == 6 and vm.lapic(1).irr == {0x41}
    finally:
        del ACCELERATORS["logging-test"], ACCELERATORS["plain-test"]


def test_exits_by_reason_is_a_copy_and_exits_is_their_sum__EXIT_1() -> None:
    vm = Vm(1)
    vm.vcpu(0).wrmsr(0x1B, ENABLE_X2APIC)
    held = vm.stats.exits_by_reason
    held[ExitReason.HLT] += 5  # a copy: the VM's counts do not change
    vm.vcpu(0).wrmsr(0x80F, 0x1FF)
    assert held == {ExitReason.MSR_WRITE: 1, ExitReason.HLT: 5}
    assert vm.stats.exits_by_reason == {ExitReason.MSR_WRITE: 2} and vm.stats.exits == 2
    assert len(vm.stats.exit_counts) == len(ExitReason)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 4),  # vCPU; 4 is hotplugged halfway
            st.sampled_from(["wrmsr", "rdmsr", "mmio", "hlt", "cr8"]),
            st.integers(0, (1 << 64) - 1),
        ),
        max_size=40,
    ),
    cut=st.integers(0, 40),
)
def test_the_vm_counts_the_sum_of_its_vcpus_exits_and_a_restore_brings_each_vcpus_back__EXIT_1(
    ops: list[tuple[int, str, int]], cut: int
) -> None:
    """KVM counts exits per vCPU (``kvm_vcpu_stat``) and the VM's are their sums: every exit
    the log holds is counted once, at its vCPU and reason; a snapshot taken at ``cut`` and
    restored brings every vCPU's counts back; ``clear`` zeroes them all."""
    vm = Vm(4, exit_log=1 << 16)
    for i in range(4):
        vm.vcpu(i).wrmsr(0x1B, ENABLE_X2APIC)
    snap = counts = None
    for step, (i, what, value) in enumerate(ops):
        if step == len(ops) // 2 and len(vm.vcpus) == 4:
            vm.add_vcpu(4)
        if step == cut:
            snap = vm.snapshot()
            counts = [list(v.exit_counts) for v in vm.vcpus]
        if i >= len(vm.vcpus):
            continue
        vcpu = vm.vcpu(i)
        try:
            if what == "wrmsr":
                vcpu.wrmsr(X2APIC_MSRS[value % len(X2APIC_MSRS)], value)
            elif what == "rdmsr":
                vcpu.rdmsr(X2APIC_MSRS[value % len(X2APIC_MSRS)])
            elif what == "mmio":
                vcpu.mmio_write(0xFEE00000 + (value & 0xFF0), value & 0xFFFFFFFF)
            elif what == "hlt":
                vcpu.halt()
                vcpu.run()
            else:
                vcpu.mov_to_cr8(value & 0xF)
        except (GuestFault, ApicValueError):
            pass
    logged = Counter((e.vcpu, e.reason) for e in vm.exits)
    for v in vm.vcpus:
        assert v.exits_by_reason == Counter({r: n for (i, r), n in logged.items() if i == v.index})
        assert v.exits == sum(v.exit_counts)
    assert vm.stats.exits_by_reason == Counter(e.reason for e in vm.exits)
    assert vm.stats.exits == len(vm.exits) == sum(v.exits for v in vm.vcpus)
    if snap is not None and len(snap.vcpus) == len(vm.vcpus):
        vm.restore(snap)
        assert [v.exit_counts for v in vm.vcpus] == counts
        assert vm.stats.exits == sum(map(sum, counts or []))
    vm.stats.clear()
    assert vm.stats.exits == 0 and not vm.stats.exits_by_reason
    assert all(v.exits == 0 and not v.exits_by_reason for v in vm.vcpus)
