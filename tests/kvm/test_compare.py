"""Sweeps and property tests: the same guest/host actions on the model and on KVM, and every
observable compared (the value or fault of each access, every vCPU's KVM_GET_LAPIC image,
pending NMIs, KVM_SIGNAL_MSI results).  Skipped where KVM is unavailable.

Every VM here has each vCPU's APIC map entry refreshed (an SVR, LDR or APIC_BASE change) before
messages are sent, so KVMB-8 (``test_disagreements.py``) does not mask other differences.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apicsim.kvm import AnyVm, KvmVm
from hypervisor import Vm
from tests.kvm.support import (
    APIC,
    BSP,
    X2APIC_ENABLE,
    Outcome,
    guest_x2apic,
    needs_kvm,
    outcome,
    run_both,
    states,
    sw_enable,
)

pytestmark = needs_kvm

KVM_SETTINGS = settings(
    max_examples=max(10, settings().max_examples * 3 // 5),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
"""Each example makes two VMs, one of them real: 60 examples under the default profile."""


def nmis(vm: AnyVm) -> list[int]:
    if isinstance(vm, KvmVm):
        return [vm.vcpu(i).nmi_pending for i in range(len(vm))]
    assert isinstance(vm, Vm)
    return [vm.lapic(i).nmi_pending for i in range(len(vm))]


# =============================================================================================
# xAPIC MMIO
# =============================================================================================
def test_every_xapic_mmio_read_returns_what_the_model_returns__MMIO_4() -> None:
    """MMIO-4: every offset of the APIC page at sizes 1, 2, 4 and 8 (aligned to the size;
    above 0x400 one read per 16 bytes), after the guest set some registers.  Each read is
    preceded by a read of TMICT (0) because KVM leaves the buffer of a read it does not service
    untouched (KVMB-4): so primed, KVM's unserviced reads return 0, the model's
    ``unserviced_read_value``."""

    def body(vm: AnyVm) -> list[tuple[int, int, int]]:
        cpu = vm.vcpu(1)
        for off, value in ((0xF0, 0x1FF), (0x80, 0x35), (0xD0, 0x0A000000), (0x310, 0x12345678)):
            cpu.mmio_write(APIC + off, value)
        cpu.mmio_write(APIC + 0x370, 0x000100FE)
        out = []
        for off in [*range(0x400), *range(0x400, 0x1000, 0x10)]:
            for size in (1, 2, 4, 8):
                if off % size == 0:
                    cpu.mmio_read(APIC + 0x380)
                    out.append((off, size, cpu.mmio_read(APIC + off, size)))
        return out

    reads = run_both(body, vcpus=2)
    assert (0x80, 4, 0x35) in reads and (0x20, 1, 0) in reads and (0x23, 1, 1) in reads


def test_every_xapic_mmio_write_has_the_model_s_effect__MMIO_3__MMIO_5() -> None:
    """MMIO-3 / MMIO-5 and the per-register write rules: for every register offset, writes of
    several values at sizes 4, 2 and 1 from vCPU 1 (all vCPUs software-enabled first), the
    state images of all three vCPUs compared after each write."""

    def writes_at(offset: int) -> Callable[[AnyVm], list[list[bytes]]]:
        def body(vm: AnyVm) -> list[list[bytes]]:
            for i in range(3):
                sw_enable(vm, i)
            cpu = vm.vcpu(1)
            seen = []
            for value in (0x12345678, 0xFFFFFFFF, 0x000400F3, 0):
                for size in (4, 2, 1):
                    cpu.mmio_write(APIC + offset, value & ((1 << (8 * size)) - 1), size)
                    seen.append(states(vm))
            return seen

        return body

    for offset in range(0, 0x400, 0x10):
        run_both(writes_at(offset), vcpus=3)


# =============================================================================================
# x2APIC MSRs
# =============================================================================================
def test_every_x2apic_msr_reads_as_in_the_model__MSR_1() -> None:
    """MSR-1: RDMSR by the guest and KVM_GET_MSRS by the host of every MSR 0x800..0x8FF on an
    x2APIC vCPU (value or #GP / refused), plus IA32_APIC_BASE."""

    def body(vm: AnyVm) -> list[tuple[int, Outcome, Outcome]]:
        for i in range(2):
            guest_x2apic(vm, i)
        sw_enable(vm, 1)
        cpu = vm.vcpu(1)
        cpu.wrmsr(0x808, 0x40)
        return [
            (msr, outcome(partial(cpu.rdmsr, msr)), outcome(partial(vm.get_msr, 1, msr)))
            for msr in [0x1B, *range(0x800, 0x900)]
        ]

    reads = run_both(body, vcpus=2)
    assert (0x802, ("ok", 1), ("ok", 1)) in reads


def test_every_x2apic_msr_write_has_the_model_s_effect__MSR_6() -> None:
    """MSR-6 and the per-register write rules: WRMSR by the guest and KVM_SET_MSRS by the host
    of values with and without reserved bits to every MSR 0x800..0x83F; the outcome of each
    write and the state images after it compared."""
    values = (0, 0xFF, 0x1FF, 0x100F3, 0xFFFFFFFF, 1 << 32, 0x00000002_000040F4)

    def writes_to(msr: int) -> Callable[[AnyVm], list[tuple[Outcome, Outcome, list[bytes]]]]:
        def body(vm: AnyVm) -> list[tuple[Outcome, Outcome, list[bytes]]]:
            for i in range(3):
                guest_x2apic(vm, i)
                sw_enable(vm, i)
            cpu = vm.vcpu(1)
            seen = []
            for value in values:
                guest = outcome(partial(cpu.wrmsr, msr, value))
                host = outcome(partial(vm.set_msr, 1, msr, value))
                seen.append((guest, host, states(vm)))
            return seen

        return body

    for msr in range(0x800, 0x840):
        run_both(writes_to(msr), vcpus=3)


# =============================================================================================
# Property tests (hypothesis): APIC_BASE, IPIs, MSIs, KVM_SET_LAPIC
# =============================================================================================
APIC_BASE_VALUES = st.sampled_from(
    [
        0xFEE00000,
        0xFEE00800,
        0xFEE00900,
        0xFEE00C00,
        0xFEE00D00,
        0xFEE00400,
        0xFEE00A00,
        0xFED00800,
        0xFED00C00,
        0xFEE00880,
        0xFEE00801,
        0x1_0000_0800,
        0x0000_8000_0000_0800,
        0xFFFF_0000_0000_0800,
    ]
)


@KVM_SETTINGS
@given(
    steps=st.lists(st.tuples(st.booleans(), APIC_BASE_VALUES, st.booleans()), max_size=6),
    x2apic_format=st.booleans(),
)
def test_apic_base_transitions_match_the_model__BASE_2__BASE_5__BASE_6(
    steps: list[tuple[bool, int, bool]], x2apic_format: bool
) -> None:
    """BASE-2..7: a sequence of IA32_APIC_BASE writes, each by the guest (WRMSR) or the host
    (KVM_SET_MSRS); after each, APIC_BASE, and optionally a TPR write/read, an ID read through
    MMIO at the current base (when that window is not in the KVM backend's RAM, KVMB-7) and an
    x2APIC ID read.  Outcomes and state images compared."""

    def body(vm: AnyVm) -> list[object]:
        seen: list[object] = []
        cpu = vm.vcpu(1)
        for host, value, touch in steps:
            if host:
                seen.append(outcome(partial(vm.set_msr, 1, 0x1B, value)))
            else:
                seen.append(outcome(partial(cpu.wrmsr, 0x1B, value)))
            base = vm.get_msr(1, 0x1B)
            seen.append(base)
            window = base & ~0xFFF  # every address bit (KVMB-7)
            if touch and window >= 0xF0000000:  # not in the KVM backend's RAM (KVMB-7)
                seen.append(outcome(partial(cpu.mmio_write, window + 0x80, 0x30)))
                seen.append(outcome(partial(cpu.mmio_read, window + 0x80)))
                seen.append(outcome(partial(cpu.mmio_read, window + 0x20)))
                seen.append(outcome(lambda: cpu.rdmsr(0x802)))
        seen.append(states(vm))
        return seen

    run_both(body, vcpus=2, x2apic_format=x2apic_format)


ICR_LOW = st.builds(
    lambda vector, mode, logical, level, trigger, shorthand: (
        vector | mode | logical | level | trigger | shorthand
    ),
    st.integers(0, 0xFF),
    st.sampled_from([0x000, 0x100, 0x200, 0x400, 0x500, 0x600]),
    st.sampled_from([0, 0x800]),
    st.sampled_from([0, 0x4000]),
    st.sampled_from([0, 0x8000]),
    st.sampled_from([0, 0x40000, 0x80000, 0xC0000]),
)


@KVM_SETTINGS
@given(
    x2apic=st.booleans(),
    low=ICR_LOW,
    dest=st.one_of(
        st.sampled_from([0, 1, 2, 3, 0xF, 0xFF, 0x10, 0x10001, 0x1000F, 0xFFFFFFFF]),
        st.integers(0, 0xFF),
    ),
    ldrs=st.lists(st.sampled_from([1, 2, 4, 8, 3, 0x10, 0x21]), min_size=4, max_size=4),
    cluster=st.booleans(),
    tprs=st.lists(st.sampled_from([0, 0x20, 0xF0]), min_size=4, max_size=4),
    x2apic_format=st.booleans(),
    broadcast_quirk=st.booleans(),
)
def test_an_ipi_from_the_guest_lands_where_the_model_says__ICR_4__FAST_5__FAST_6(
    x2apic: bool,
    low: int,
    dest: int,
    ldrs: list[int],
    cluster: bool,
    tprs: list[int],
    x2apic_format: bool,
    broadcast_quirk: bool,
) -> None:
    """ICR-2..4, FAST-*, LP-*, ACCEPT-*: 4 software-enabled vCPUs (xAPIC with logical IDs and
    flat or cluster DFR, or x2APIC), TPRs set; vCPU 0 writes one ICR.  The write's outcome,
    every state image (IRR, TMR, arbitration) and the pending NMIs compared.  INIT and
    STARTUP are sent but not run (their effect waits for KVM_RUN: KVMB-9)."""

    def body(vm: AnyVm) -> tuple[Outcome, list[bytes], list[int]]:
        for i in range(4):
            cpu = vm.vcpu(i)
            if x2apic:
                guest_x2apic(vm, i)
                cpu.wrmsr(0x80F, 0x1FF)
                cpu.wrmsr(0x808, tprs[i])
            else:
                cpu.mmio_write(APIC + 0xF0, 0x1FF)
                cpu.mmio_write(APIC + 0xD0, ldrs[i] << 24)
                if cluster:
                    cpu.mmio_write(APIC + 0xE0, 0x0FFFFFFF)
                cpu.mmio_write(APIC + 0x80, tprs[i])
        src = vm.vcpu(0)
        if x2apic:
            sent = outcome(lambda: src.wrmsr(0x830, dest << 32 | low))
        else:
            src.mmio_write(APIC + 0x310, (dest & 0xFF) << 24)
            sent = outcome(lambda: src.mmio_write(APIC + 0x300, low))
        return sent, states(vm), nmis(vm)

    run_both(body, vcpus=4, x2apic_format=x2apic_format, broadcast_quirk=broadcast_quirk)


@KVM_SETTINGS
@given(
    ids=st.sampled_from([[0, 1, 2, 3], [0, 1, 2, 0x123], [0, 5, 0x10, 0xFF], [0, 1, 0x100, 0x101]]),
    x2=st.lists(st.booleans(), min_size=4, max_size=4),
    enabled=st.lists(st.booleans(), min_size=4, max_size=4),
    ldrs=st.lists(st.sampled_from([1, 2, 4, 8, 3, 0x10, 0x21]), min_size=4, max_size=4),
    alias=st.booleans(),
    dest=st.sampled_from([0, 1, 2, 3, 5, 0x10, 0x23, 0xFF, 0x100, 0x101, 0x123]),
    redirect=st.booleans(),
    logical=st.booleans(),
    address_hi=st.sampled_from([None, 0, 1, 0x100, 0x12300]),
    data=st.builds(
        lambda v, mode, level, trig: v | mode | level | trig,
        st.integers(0x10, 0xFF),
        st.sampled_from([0, 0x100, 0x200, 0x400, 0x500, 0x700]),
        st.sampled_from([0, 0x4000]),
        st.sampled_from([0, 0x8000]),
    ),
    flags=st.sampled_from([0, 1, 2]),
    x2apic_format=st.booleans(),
    broadcast_quirk=st.booleans(),
)
def test_kvm_signal_msi_matches_the_model__MSI_1__STATE_5__FAST_9(
    ids: list[int],
    x2: list[bool],
    enabled: list[bool],
    ldrs: list[int],
    alias: bool,
    dest: int,
    redirect: bool,
    logical: bool,
    address_hi: int | None,
    data: int,
    flags: int,
    x2apic_format: bool,
    broadcast_quirk: bool,
) -> None:
    """MSI-1, STATE-5, FAST-9, MAP-2/3: vCPU ids possibly above 0xFF, each vCPU in xAPIC
    (with an LDR, maybe software-enabled) or x2APIC mode, maybe an aliased xAPIC ID; one
    KVM_SIGNAL_MSI.  Its return value, every state image and the pending NMIs compared."""
    lo = 0xFEE00000 | (dest & 0xFF) << 12 | (8 if redirect else 0) | (4 if logical else 0)
    hi = dest & ~0xFF if address_hi is None else address_hi

    def body(vm: AnyVm) -> tuple[int, list[bytes], list[int]]:
        for i in range(len(ids)):
            cpu = vm.vcpu(i)
            if x2[i]:
                cpu.wrmsr(0x1B, X2APIC_ENABLE | (BSP if i == 0 else 0))
            sw_enable(vm, i, 0x1FF if enabled[i] else 0xFF)
            if not x2[i]:
                cpu.mmio_write(APIC + 0xD0, ldrs[i] << 24)
        if alias and not x2[-1]:
            vm.vcpu(len(ids) - 1).mmio_write(APIC + 0x20, 0)
        return vm.signal_msi(lo, hi, data, flags), states(vm), nmis(vm)

    run_both(body, vcpu_ids=ids, x2apic_format=x2apic_format, broadcast_quirk=broadcast_quirk)


@KVM_SETTINGS
@given(
    x2apic=st.booleans(),
    x2apic_format=st.booleans(),
    words=st.lists(
        st.one_of(
            st.sampled_from([0, 0xFFFFFFFF, 0xFF, 0x100, 0x10000]), st.integers(0, 0xFFFFFFFF)
        ),
        min_size=64,
        max_size=64,
    ),
    gaps=st.lists(st.integers(0, 0xFFFFFFFF), min_size=64, max_size=64),
    own_id=st.booleans(),
)
def test_kvm_set_lapic_then_eoi_matches_the_model__STATE_3__STATE_4(
    x2apic: bool, x2apic_format: bool, words: list[int], gaps: list[int], own_id: bool
) -> None:
    """STATE-1..4, EOI-*: a random 1 KiB image (timer registers left 0, bytes between the
    registers random too) restored with KVM_SET_LAPIC into an xAPIC or x2APIC vCPU, then one
    guest EOI; the SET's outcome, the EOI's and the state images compared."""
    image = bytearray(0x400)
    for n in range(64):
        off = 0x10 * n
        if off not in (0x380, 0x390):
            image[off : off + 4] = words[n].to_bytes(4, "little")
            image[off + 4 : off + 8] = gaps[n].to_bytes(4, "little")
    if own_id:
        image[0x20:0x24] = (1 if x2apic and x2apic_format else 1 << 24).to_bytes(4, "little")

    def body(vm: AnyVm) -> tuple[Outcome, Outcome, list[bytes]]:
        cpu = vm.vcpu(1)
        if x2apic:
            cpu.wrmsr(0x1B, X2APIC_ENABLE)
        restored = outcome(lambda: vm.set_lapic(1, bytes(image)))
        if x2apic:
            eoi = outcome(lambda: cpu.wrmsr(0x80B, 0))
        else:
            eoi = outcome(lambda: cpu.mmio_write(APIC + 0xB0, 0))
        return restored, eoi, states(vm)

    run_both(body, vcpus=2, x2apic_format=x2apic_format)
