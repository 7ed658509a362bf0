"""The readable trace: sequence numbers and virtual time, ``trace-cmd report`` text with the
fields decoded in hex, the register-level events, filters, files; ``Stats`` deltas; the
per-vCPU table and the VM's notebook views."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest import Guest
from hypervisor import Vm
from hypervisor.exits import ExitReason
from hypervisor.trace import (
    AccelEvent,
    Event,
    KvmApicAcceptIrq,
    KvmApicIpi,
    KvmApicWrite,
    KvmEoi,
    KvmExit,
    KvmHypercall,
    KvmInjNmi,
    KvmInjVirq,
    KvmMsiSetIrq,
    KvmMsr,
    KvmPvSendIpi,
    Stats,
    Tracer,
    decode_icr_low,
    format_event,
)
from hypervisor.views import errno_text
from lapic.faults import ApicTypeError, ApicValueError, GuestFault


def booted(n: int = 4, driver: str = "x2apic_phys") -> tuple[Vm, Guest]:
    vm = Vm(vcpus=n, trace=True)
    return vm, Guest(vm, driver=driver)


def test_every_event_prints_as_its_tracepoint_with_decoded_fields_in_hex() -> None:
    cases: dict[Event, str] = {
        KvmExit(1, ExitReason.MSR_WRITE, 0x830): "kvm_exit: reason MSR_WRITE info 0x830",
        KvmApicIpi(0, 0x40F1, 2): "kvm_apic_ipi: dst 0x2 vec 0xf1 "
        "(Fixed|physical|assert|edge|dst)",
        KvmApicIpi(0, 0xCC941, 0xF): "kvm_apic_ipi: dst 0xf vec 0x41 "
        "(LowPrio|logical|assert|level|all-but-self)",
        KvmApicAcceptIrq(3, 0x400, 0, 2, True): "kvm_apic_accept_irq: apicid 0x3 vec 0x02 "
        "(NMI|edge)",
        KvmApicAcceptIrq(3, 0, 1, 0x41, False): "kvm_apic_accept_irq: apicid 0x3 vec 0x41 "
        "(Fixed|level) (coalesced)",
        KvmEoi(1, 0x41): "kvm_eoi: apicid 0x1 vector 0x41",
        KvmHypercall(0, 10, 1, 2, 3, 4): "kvm_hypercall: nr 0xa a0 0x1 a1 0x2 a2 0x3 a3 0x4",
        KvmMsiSetIrq(0xFEE0100C, 0x8131): "kvm_msi_set_irq: dst 0x1 vec 0x31 "
        "(LowPrio|logical|level|rh)",
        KvmApicWrite(0, 0x300, 0x40F1): "kvm_apic: apic_write APIC_ICR = 0x40f1",
        KvmMsr(0, 0x83F, 0x31, True): "kvm_msr: msr_write 83f = 0x31 (#GP)",
        KvmInjVirq(2, 0xF0): "kvm_inj_virq: irq 0xf0",
        KvmInjNmi(2): "kvm_inj_nmi:",
        KvmPvSendIpi(0, 0b110, 0, 0, 0xF2, 2): "kvm_pv_send_ipi: bitmap 0x0:0x6 min 0x0 "
        "icr 0xf2 (Fixed|physical|de-assert|edge|dst) ret 2",
        AccelEvent(1, "avic_doorbell", 0x3): "kvm_accel: avic_doorbell 0x3",
    }
    for event, text in cases.items():
        assert format_event(event) == text
    assert decode_icr_low(0x4500) == "INIT|physical|assert|edge|dst"


def test_each_event_has_a_sequence_number_and_the_virtual_time_it_happened() -> None:
    vm, g = booted(2)
    vm.tracer.clear()
    first = vm.tracer.next_seq
    g.cpu(0).send_IPI(1, 0xF0)
    vm.advance(1_500)
    g.cpu(1).run()
    recs = vm.tracer.records()
    assert [r.seq for r in recs] == list(range(first, first + len(recs)))
    ipi = vm.tracer.records(name="kvm_apic_ipi")[0]
    assert ipi.ns == 0
    eoi = vm.tracer.records(name="eoi")[0]
    assert eoi.ns == 1_500
    assert eoi.line() == (
        f"#{eoi.seq:<5d}        CPU 1/KVM [001] 0.000001500: kvm_eoi: apicid 0x1 vector 0xf0"
    )


def test_register_level_events_appear_only_with_detail_on() -> None:
    vm, g = booted(2)
    g.cpu(0).send_IPI(1, 0xF0)
    assert not [e for e in vm.tracer.events if isinstance(e, KvmApicWrite | KvmMsr)]
    vm.tracer.detail = True
    g.cpu(0).send_IPI(1, 0xF1)
    g.cpu(1).run()
    names = [r.name for r in vm.tracer.records(vcpu=0, since=vm.tracer.next_seq - 20)]
    assert names[-4:] == ["kvm_exit", "kvm_apic", "kvm_apic_ipi", "kvm_msr"]
    assert [e for e in vm.tracer.events if isinstance(e, KvmInjVirq)] == [
        KvmInjVirq(1, 0xF1),  # the highest vector first
        KvmInjVirq(1, 0xF0),
    ]


def test_an_xapic_icr_write_is_traced_as_kvm_apic_writes_of_icr2_and_icr() -> None:
    vm, g = booted(2, driver="physflat")
    vm.tracer.detail = True
    vm.tracer.clear()
    g.cpu(0).send_IPI(1, 0xF0)
    writes = [e for e in vm.tracer.events if isinstance(e, KvmApicWrite)]
    assert [(w.offset, w.value) for w in writes][-2:] == [(0x310, 0x1000000), (0x300, 0xF0)]


def test_a_faulting_apic_msr_write_is_traced_as_faulted_without_a_register_write() -> None:
    vm = Vm(vcpus=1, trace=True)
    vm.tracer.detail = True
    with pytest.raises(GuestFault):
        vm.vcpu(0).wrmsr(0x83F, 0x31)  # xAPIC mode: no x2APIC MSRs
    assert vm.tracer.events[-1] == KvmMsr(0, 0x83F, 0x31, True)
    assert not vm.tracer.of(KvmApicWrite)


def test_filters_select_by_vcpu_event_name_and_vector() -> None:
    vm, g = booted(4)
    vm.tracer.clear()
    g.cpu(0).send_IPI_mask([1, 2], 0xF0)
    g.cpu(0).send_IPI(3, 0xF1)
    accepted = vm.tracer.records(name="apic_accept_irq")
    assert [r.event[0] for r in accepted] == [1, 2, 3]
    assert [r.event[0] for r in vm.tracer.records(name="apic_accept_irq", vector=0xF1)] == [3]
    assert {r.event[0] for r in vm.tracer.records(vcpu=[1, 2])} == {1, 2}
    ipis = vm.tracer.records(vector=[0xF0, 0xF1], name=["kvm_apic_ipi"])
    assert [r.event for r in ipis] == [
        KvmApicIpi(0, 0xF0, 1),  # x2APIC: Linux leaves the level bit clear
        KvmApicIpi(0, 0xF0, 2),
        KvmApicIpi(0, 0xF1, 3),
    ]
    with pytest.raises(ApicValueError, match="name='kvm_nope'"):
        vm.tracer.records(name="nope")
    with pytest.raises(ApicTypeError, match="vcpu"):
        vm.tracer.records(vcpu="1")  # type: ignore[arg-type]


def test_a_trace_file_is_trace_cmd_report_text_without_sequence_numbers(tmp_path: Path) -> None:
    vm, g = booted(2)
    vm.tracer.clear()
    g.cpu(0).send_IPI(1, 0xF0)
    path = tmp_path / "model.txt"
    assert vm.tracer.write(path, name="kvm_apic_ipi") == 1
    assert path.read_text() == (
        "       CPU 0/KVM [000] 0.000000000: kvm_apic_ipi: dst 0x1 vec 0xf0 "
        "(Fixed|physical|de-assert|edge|dst)\n"
    )


def test_snapshot_and_restore_bring_back_the_trace_with_its_numbering() -> None:
    vm, g = booted(2)
    snap = vm.snapshot()
    saved = vm.tracer.saved()
    g.cpu(0).send_IPI(1, 0xF0)
    vm.restore(snap)
    assert vm.tracer.saved() == saved and vm.snapshot() == snap
    tracer = Tracer(True)
    tracer.emit(KvmEoi(0, 1))
    tracer.events.append(KvmEoi(0, 2))  # changed by hand: numbered afresh, not lost
    assert [r.seq for r in tracer.records()] == [0, 1]


def test_stats_snapshots_are_frozen_and_their_difference_is_what_happened_since() -> None:
    vm, g = booted(4)
    before = vm.stats.snapshot()
    g.cpu(0).send_IPI_mask([1, 2, 3], 0xF0)
    delta = vm.stats - before
    assert delta.exits == 3 and delta.ipis == 3 and delta.irqs_accepted == 3
    assert delta.exits_by_reason == {"MSR_WRITE": 3}
    assert repr(delta) == (
        "Stats(exits=3, fast_path=3, ipis=3, irqs_accepted=3, kicks=3, "
        "exits_by_reason={MSR_WRITE: 3})"
    )
    assert before.exits == vm.stats.exits - 3  # the snapshot did not move
    assert (vm.stats.snapshot() - vm.stats.snapshot()).as_dict()["exits"] == 0
    assert Stats().snapshot() == Stats().snapshot() and hash(Stats().snapshot())
    with pytest.raises(AttributeError):
        _ = delta.nonexistent


def test_the_vcpu_table_shows_ids_modes_priorities_vectors_and_pending_events() -> None:
    vm, g = booted(2)
    g.cpu(0).send_IPI(1, 0xF0)
    vm.lapic(0).accept_fast(0, 4, 0, 0)  # an NMI pending on vCPU 0
    lines = vm.table().splitlines()
    assert lines[0].split() == [
        "vcpu", "id", "mode", "tpr", "ppr", "irr", "isr", "tmr", "pending", "run", "mp",
        "pcpu", "exits", "accel",
    ]
    assert lines[1].split()[:9] == ["0", "0x0", "x2apic", "0x00", "0x00", "{}", "{}", "{}", "NMI"]
    assert lines[2].split()[:6] == ["1", "0x1", "x2apic", "0x00", "0x00", "{0xf0}"]
    assert lines[1].split()[-1] == "trap"  # Emulated.vcpu_state: every APIC access traps
    html = vm._repr_html_()
    assert html.startswith("<p>Vm(vcpus=2") and "<td><code>{0xf0}</code></td>" in html


def test_hypercall_errors_print_as_kvm_errno_names() -> None:
    assert errno_text(-1000) == "-KVM_ENOSYS"
    assert errno_text((1 << 64) - 22) == "-KVM_EINVAL"
    assert errno_text(3) == "3" and errno_text(-5) == "-5"
