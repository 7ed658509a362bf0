"""``apicsim demo``: what one IPI broadcast costs under each x2APIC driver and under PV IPIs.

The seed workload of the PV IPI work (reference §12-13).  For each of x2apic_phys,
x2apic_cluster and kvm_pv (on x2apic_phys) a fresh ``Vm(vcpus=80)`` boots a ``Guest``; vCPU 0
then sends one vector with ``send_IPI_mask_allbutself(all CPUs)``, and the VM's counters are
read just before and just after that one call (boot is not counted).  Then every vCPU runs,
and each driver passes when every other vCPU handled the vector exactly once and vCPU 0 did not.

What the drivers predict under trap-and-emulate, for N vCPUs with x2APIC IDs 0..N-1:

* x2apic_phys: one ICR WRMSR per destination: N-1 exits;
* x2apic_cluster: one ICR WRMSR per cluster of 16 present in the mask: ceil(N/16) exits
  (5 for 80 CPUs);
* kvm_pv: one KVM_HC_SEND_IPI per 128-ID window (PVG-3): ceil(N/128) VMCALLs (1 for 80 CPUs).

A second table shows the same broadcast under AMD AVIC (``Vm(accelerator="avic")``, x2AVIC)
for x2apic_phys and x2apic_cluster, first with every target running in guest mode (no exit:
the CPU writes each backing page and rings one doorbell per target), then with the odd vCPUs
halted (one AVIC_INCOMPLETE_IPI exit per ICR write that reached a halted target, and KVM's
wake-ups).

Two more tables show it under Intel APICv (``Vm(accelerator="apicv")``: virtual-interrupt
delivery and posted interrupts, every ICR write still intercepted: an x2APIC guest's WRMSR 0x830
is an MSR-write exit, KVM posts each vector into the target's PIR and notifies it) and under
IPIv (``"ipiv"``: the CPU virtualizes fixed physical unicast ICR writes, so x2apic_phys sends
with no exit; x2apic_cluster's logical writes still take one APIC-write exit each), with the
same two workloads: the posted vectors, the notification IPIs by vector (0xF2 to a running
target, the wake-up vector 0xF1 to a blocked one under IPIv) and the wake-ups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from hypervisor import ExitReason, Vm
from hypervisor.trace import Stats

DRIVERS: tuple[tuple[str, str | None], ...] = (
    ("x2apic_phys", None),
    ("x2apic_cluster", None),
    ("kvm_pv", "x2apic_phys"),
)


@dataclass(frozen=True, slots=True)
class Measurement:
    driver: str
    base: str | None
    exits: int
    hypercalls: int
    msr_writes: int
    accepted: int
    destinations: int
    handled_once: int
    self_handled: int
    problems: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.driver if self.base is None else f"{self.driver} ({self.base})"

    @property
    def passed(self) -> bool:
        return not self.problems


def measure(driver: str, base: str | None, *, vcpus: int, vector: int) -> Measurement:
    """Boot a fresh VM and guest, send the broadcast, run every vCPU, check who handled it."""
    from guest import Guest

    vm = Vm(vcpus=vcpus)
    guest = Guest(vm, driver=driver) if base is None else Guest(vm, driver=driver, base=base)
    stats = vm.stats
    exits0 = stats.exits
    hypercalls0 = stats.hypercalls
    msr0 = stats.exits_by_reason[ExitReason.MSR_WRITE]
    accepted0 = stats.irqs_accepted
    sender = guest.cpu(0)
    before = [guest.cpu(i).handled.count(vector) for i in range(vcpus)]
    sender.send_IPI_mask_allbutself(list(range(vcpus)), vector)
    exits = stats.exits - exits0
    hypercalls = stats.hypercalls - hypercalls0
    msr_writes = stats.exits_by_reason[ExitReason.MSR_WRITE] - msr0
    accepted = stats.irqs_accepted - accepted0
    for i in range(vcpus):
        guest.cpu(i).run()
    counts = [guest.cpu(i).handled.count(vector) - before[i] for i in range(vcpus)]
    problems: list[str] = []
    if guest.driver.name != driver:
        problems.append(f"the guest installed {guest.driver.name!r}, not {driver!r}")
    wrong = [i for i in range(1, vcpus) if counts[i] != 1]
    if wrong:
        shown = ", ".join(f"vCPU {i} x{counts[i]}" for i in wrong[:5])
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        problems.append(
            f"{len(wrong)} vCPUs did not handle {vector:#x} exactly once: {shown}{more}"
        )
    if counts[0]:
        problems.append(f"the sender (vCPU 0) handled {vector:#x} {counts[0]} times")
    return Measurement(
        driver,
        base,
        exits,
        hypercalls,
        msr_writes,
        accepted,
        vcpus - 1,
        sum(1 for i in range(1, vcpus) if counts[i] == 1),
        counts[0],
        tuple(problems),
    )


class _Workload:
    """What the AVIC and Intel rows have in common: the workload a row measured, labelled by
    its driver and whether the odd vCPUs were halted."""

    __slots__ = ()
    driver: str
    halted: int

    @property
    def label(self) -> str:
        return f"{self.driver}/{'half halted' if self.halted else 'running'}"


@dataclass(frozen=True, slots=True)
class AvicMeasurement(_Workload):
    driver: str
    halted: int
    exits: int
    incomplete_ipi: int
    doorbells: int
    wakeups: int
    destinations: int
    handled_once: int
    problems: tuple[str, ...]


def _accelerated_broadcast(
    vm: Vm, driver: str, *, halt_odd: bool, vcpus: int, vector: int,
    counters: Callable[[Stats], dict[str, int]],
) -> tuple[int, dict[str, int], int, list[str]]:
    """The broadcast both accelerated tables make: boot ``driver`` on ``vm``, halt the odd
    vCPUs if ``halt_odd``, send, run every vCPU.  Returns the vCPUs halted, how much each of
    ``counters(vm.stats)`` grew during the send alone, the destinations that handled the vector
    exactly once, and what went wrong (a missed or duplicated vector, wake-ups that do not
    match the halted vCPUs; ``counters`` must name ``"wakeups"``)."""
    from guest import Guest

    guest = Guest(vm, driver=driver)
    halted = sum(vm.vcpu(i).halt() for i in range(1, vcpus, 2)) if halt_odd else 0
    start = counters(vm.stats)
    before = [guest.cpu(i).handled.count(vector) for i in range(vcpus)]
    guest.cpu(0).send_IPI_mask_allbutself(list(range(vcpus)), vector)
    end = counters(vm.stats)
    grew = {k: end.get(k, 0) - start.get(k, 0) for k in sorted(end.keys() | start.keys())}
    for i in range(vcpus):
        guest.cpu(i).run()
    counts = [guest.cpu(i).handled.count(vector) - before[i] for i in range(vcpus)]
    problems: list[str] = []
    wrong = [i for i in range(1, vcpus) if counts[i] != 1]
    if wrong or counts[0]:
        problems.append(f"vCPUs {wrong[:5]} missed {vector:#x} or the sender handled it")
    if halted and grew["wakeups"] != halted:
        problems.append(f"{halted} halted vCPUs but {grew['wakeups']} wake-ups")
    return halted, grew, sum(1 for i in range(1, vcpus) if counts[i] == 1), problems


def _avic_counters(stats: Stats) -> dict[str, int]:
    return {
        "exits": stats.exits,
        "incomplete": stats.exits_by_reason[ExitReason.AVIC_INCOMPLETE_IPI],
        "doorbells": stats.doorbells,
        "wakeups": stats.wakeups,
    }


def measure_avic(driver: str, *, halt_odd: bool, vcpus: int, vector: int) -> AvicMeasurement:
    """The broadcast under AVIC; with ``halt_odd`` the odd vCPUs execute HLT first."""
    vm = Vm(vcpus=vcpus, accelerator="avic")
    halted, grew, once, problems = _accelerated_broadcast(
        vm, driver, halt_odd=halt_odd, vcpus=vcpus, vector=vector, counters=_avic_counters
    )
    return AvicMeasurement(
        driver, halted, grew["exits"], grew["incomplete"], grew["doorbells"], grew["wakeups"],
        vcpus - 1, once, tuple(problems),
    )


def _grid(labels: list[str], rows: list[tuple[str, list[str]]], name_width: int = 22) -> list[str]:
    """The lines of one table: a header of column ``labels``, then each named row of cells,
    right-aligned in columns at least 16 wide."""
    width = max(16, *(len(label) + 2 for label in labels))
    lines = [f"{'':<{name_width}}" + "".join(f"{label:>{width}}" for label in labels)]
    for name, cells in rows:
        lines.append(f"{name:<{name_width}}" + "".join(f"{c:>{width}}" for c in cells))
    return lines


def render_avic(results: list[AvicMeasurement], *, vector: int) -> str:
    """The AVIC table (its row names start with "AVIC", its verdicts with "AVIC PASS")."""
    rows: list[tuple[str, list[str]]] = [
        ("AVIC VM exits", [str(m.exits) for m in results]),
        ("AVIC incomplete IPIs", [str(m.incomplete_ipi) for m in results]),
        ("AVIC doorbells", [str(m.doorbells) for m in results]),
        ("AVIC wake-ups", [str(m.wakeups) for m in results]),
        (f"AVIC handled {vector:#x}", [f"{m.handled_once}/{m.destinations}" for m in results]),
        ("AVIC result", ["FAIL" if m.problems else "PASS" for m in results]),
    ]
    lines = [
        "",
        "the same call under AMD AVIC (x2AVIC, IPI virtualization on): every target running, "
        "then the odd vCPUs halted",
        "",
        *_grid([m.label for m in results], rows),
        "",
    ]
    for m in results:
        verdict = "AVIC FAIL" if m.problems else "AVIC PASS"
        lines.append(f"{verdict} {m.label}: {'; '.join(m.problems) or 'every target once'}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class VmxMeasurement(_Workload):
    """One workload under APICv or IPIv (``accelerator``)."""

    accelerator: str
    driver: str
    halted: int
    exits: int
    apic_writes: int
    msr_writes: int
    posted: int
    notifications: dict[int, int]
    wakeups: int
    destinations: int
    handled_once: int
    problems: tuple[str, ...]


VMX_ACCELERATORS = (("apicv", "APICv"), ("ipiv", "IPIv"))
"""The Intel accelerators of the demo: ``Vm(accelerator=...)`` name and table title."""


def _vmx_counters(stats: Stats) -> dict[str, int]:
    by_reason = stats.exits_by_reason
    return {
        "exits": stats.exits,
        "posted": stats.posted,
        "wakeups": stats.wakeups,
        "apic_writes": by_reason[ExitReason.APIC_WRITE],
        "msr_writes": by_reason[ExitReason.MSR_WRITE],
        **{f"notify {v:#x}": n for v, n in stats.notifications.items()},
    }


def measure_vmx(
    accelerator: str, driver: str, *, halt_odd: bool, vcpus: int, vector: int
) -> VmxMeasurement:
    """The broadcast under APICv or IPIv; with ``halt_odd`` the odd vCPUs execute HLT first
    (with RFLAGS.IF = 1: woken by the posted vector)."""
    vm = Vm(vcpus=vcpus, accelerator=accelerator)
    halted, grew, once, problems = _accelerated_broadcast(
        vm, driver, halt_odd=halt_odd, vcpus=vcpus, vector=vector, counters=_vmx_counters
    )
    if grew["posted"] != vcpus - 1:
        problems.append(f"{grew['posted']} vectors posted for {vcpus - 1} destinations")
    notified = {
        int(k.split()[1], 16): n for k, n in grew.items() if k.startswith("notify ") and n
    }
    return VmxMeasurement(
        accelerator, driver, halted, grew["exits"], grew["apic_writes"], grew["msr_writes"],
        grew["posted"], notified, grew["wakeups"], vcpus - 1, once, tuple(problems),
    )


def render_vmx(results: list[VmxMeasurement], title: str, *, vector: int) -> str:
    """One Intel table: its row names start with ``title`` ("APICv", "IPIv"), its verdicts
    with "<title> PASS"."""
    name_width = max(22, len(title) + 20)
    rows: list[tuple[str, list[str]]] = [
        (f"{title} VM exits", [str(m.exits) for m in results]),
        (f"{title} APIC-write exits", [str(m.apic_writes) for m in results]),
        (f"{title} MSR-write exits", [str(m.msr_writes) for m in results]),
        (f"{title} posted", [str(m.posted) for m in results]),
        (f"{title} notify 0xf2", [str(m.notifications.get(0xF2, 0)) for m in results]),
        (f"{title} notify 0xf1", [str(m.notifications.get(0xF1, 0)) for m in results]),
        (f"{title} wake-ups", [str(m.wakeups) for m in results]),
        (f"{title} handled {vector:#x}", [f"{m.handled_once}/{m.destinations}" for m in results]),
        (f"{title} result", ["FAIL" if m.problems else "PASS" for m in results]),
    ]
    what = (
        "virtual-interrupt delivery and posted interrupts, ICR writes intercepted"
        if title == "APICv"
        else "the CPU virtualizes fixed physical unicast ICR writes"
    )
    lines = [
        "",
        f"the same call under Intel {title} ({what}): every target running, then the odd "
        "vCPUs halted",
        "",
        *_grid([m.label for m in results], rows, name_width),
        "",
    ]
    for m in results:
        verdict = f"{title} FAIL" if m.problems else f"{title} PASS"
        lines.append(f"{verdict} {m.label}: {'; '.join(m.problems) or 'every target once'}")
    return "\n".join(lines) + "\n"


def render(results: list[Measurement], *, vcpus: int, vector: int) -> str:
    """The side-by-side table."""
    rows: list[tuple[str, list[str]]] = [
        ("VM exits", [str(m.exits) for m in results]),
        ("hypercalls", [str(m.hypercalls) for m in results]),
        ("MSR writes", [str(m.msr_writes) for m in results]),
        ("IPIs accepted", [str(m.accepted) for m in results]),
        ("exits per destination", [f"{m.exits / m.destinations:.3f}" for m in results]),
        (f"handled {vector:#x} once", [f"{m.handled_once}/{m.destinations}" for m in results]),
        ("result", ["PASS" if m.passed else "FAIL" for m in results]),
    ]
    lines = [
        f"apicsim demo: vCPU 0 sends vector {vector:#x} to all other {vcpus - 1} of {vcpus} "
        "vCPUs (send_IPI_mask_allbutself), trap-and-emulate; counts are for that one call",
        "",
        *_grid([m.label for m in results], rows),
        "",
    ]
    for m in results:
        verdict = "PASS" if m.passed else "FAIL"
        detail = (
            "; ".join(m.problems)
            if m.problems
            else (f"every other vCPU handled {vector:#x} once, vCPU 0 did not")
        )
        lines.append(f"{verdict} {m.label}: {detail}")
    return "\n".join(lines) + "\n"


def run(*, vcpus: int = 80, vector: int = 0xF0, out: TextIO) -> int:
    """Run the demo; print the table; 0 when every driver passed, else 1."""
    results = [measure(d, b, vcpus=vcpus, vector=vector) for d, b in DRIVERS]
    out.write(render(results, vcpus=vcpus, vector=vector))
    avic = [
        measure_avic(d, halt_odd=h, vcpus=vcpus, vector=vector)
        for d in ("x2apic_phys", "x2apic_cluster")
        for h in (False, True)
    ]
    out.write(render_avic(avic, vector=vector))
    ok = all(m.passed for m in results) and not any(m.problems for m in avic)
    for accelerator, title in VMX_ACCELERATORS:
        vmx = [
            measure_vmx(accelerator, d, halt_odd=h, vcpus=vcpus, vector=vector)
            for d in ("x2apic_phys", "x2apic_cluster")
            for h in (False, True)
        ]
        out.write(render_vmx(vmx, title, vector=vector))
        ok = ok and not any(m.problems for m in vmx)
    return 0 if ok else 1
