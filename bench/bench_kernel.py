"""The model against the host's KVM, side by side in one run (``apicsim.kvm.KvmVm``).

Run: ``./dev python bench/bench_kernel.py`` (``--quick`` for a short run).  Prints the machine
(CPU model as ``lscpu`` names it, kernel, Python, cores, load average at the start), one table
of rates and one table of every ratio with its target (with ``--ipi``, the guest-driver rows
of ``bench/bench_ipi.py`` too).  Each row is a loop run in many short repeats, timed with
``time.thread_time`` (the CPU time of this thread: Python, the kernel's ioctl work and the
guest's run time alike; not the time it waited for a CPU, which on a shared, loaded machine is
most of the wall clock and none of the code's cost).  The repeats of all rows alternate (row 1,
row 2, ..., row 1, ...), and each timed repeat follows an untimed one an eighth its length, so
that no row pays for refilling the caches and branch predictors the row before it used (the
guest loop's KVM_RUN rows most of all).  A rate is the median over the repeats; a ratio of two
rows is the median of the ratios measured in the same repeat, side by side (a slow spell of
the shared machine, which can last seconds and slow everything by a third, then falls on both
rows of a pair alike: over five runs on this machine, this median of the ICR row moved
between 0.370x and 0.381x, where the ratio of the two rows' best repeats moved between 0.296x
and 0.409x).  Not a test: it exits 0 whatever it measures, and without a usable ``/dev/kvm``
it prints the model's rows only.

What is measured, on the same topology for both (4 vCPUs, every APIC software-enabled and in
x2APIC mode; the model gets the guest CPUID features and ``vector_hashing`` of the host's KVM):

(a) one fixed, edge, physical MSI to the vCPU with APIC ID 2 (address 0xFEE02000, data 0xF0).
    Model: ``Vm.signal_msi``.  Baseline: the raw KVM_SIGNAL_MSI ioctl issued from Python
    (``fcntl.ioctl`` on the VM fd with a ``struct kvm_msi`` built once), the fastest honest way
    to ask the kernel for the same delivery from Python.  Also shown, labelled as such: the
    ``KvmVm.signal_msi`` wrapper, which checks its arguments and packs the struct on every call.
    Target: the model at least 0.5x the raw ioctl's rate (goal 1.0x).
(b) one guest ICR write, x2APIC unicast fixed IPI to APIC ID 1 (WRMSR 0x830).  Model:
    ``vm.vcpu(0).wrmsr`` (trap-and-emulate: the exit, counted and recorded in the exit log,
    then KVM's fastpath for an x2APIC ICR write: the kept route, the accept, the kick), with 4
    and with 4096 vCPUs (the 4096-vCPU VM sends to its last vCPU), and with 4 vCPUs and the
    exit log off (``exit_log=0``: what KVM itself keeps of an exit, its counters; no record is
    kept; with the log on, a kept value's record is kept with its route, so neither row
    allocates per write).  Kernel baseline: a guest loop ``wrmsr; out; jmp`` entered once
    with its registers set, then one KVM_RUN per WRMSR (the fewest ioctls a VMM needs: KVM_RUN,
    then a look at ``kvm_run.exit_reason``).  Also shown, labelled: the ``KvmVcpu.wrmsr``
    wrapper (KVM_GET_MP_STATE, KVM_GET_SREGS, KVM_SET_REGS, KVM_RUN, KVM_GET_REGS per write).
    Targets: the model at least 0.35x the raw KVM_SIGNAL_MSI rate (shown for both exit-log
    settings); the 4096-vCPU cost per write within 1.1x of the 4-vCPU cost.

The model runs as configured by default (its exit log on, 4096 entries) with its tracer off,
as KVM runs with its tracepoints off; both deliver the same interrupt to the same vCPU state
(the destination's IRR bit is set by the first call; every later call is delivered onto it).
(b) on the kernel side includes what any VMM pays to run guest code from Python (the exit back
to userspace); it is "one guest ICR write as seen from the host", not KVM's in-kernel
emulation time alone.  On this host KVM may be ``kvm_pvm`` (guest code runs through KVM's
instruction emulator; ``specs/kvm_backend.md``), so its KVM_RUN is slower than with VMX/SVM.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_ipi

from apicsim.kvm import KvmVm, guest_features, host_vector_hashing, kvm_available
from apicsim.kvm import ioctl as k
from hypervisor import Vm

VCPUS = 4
BIG_VCPUS = 4096
VECTOR = 0xF0
MSI_ADDRESS = 0xFEE00000 | 2 << 12  # fixed, physical, destination APIC ID 2
MSI_DATA = VECTOR  # fixed, edge
ICR = 1 << 32 | 0x4000 | VECTOR  # x2APIC: destination 1, fixed, physical, assert, edge
BIG_ICR = (BIG_VCPUS - 1) << 32 | 0x4000 | VECTOR  # the same, to the last of 4096 vCPUs
X2APIC_ENABLE = 0xFEE00C00  # APIC_BASE: EN | EXTD, default base
SVR = 0x1FF

Loop = Callable[[int], None]


def machine() -> str:
    """The CPU model (``lscpu``'s "Model name", else ``/proc/cpuinfo``), the kernel, the Python,
    the cores and the load average (1, 5, 15 minutes) when the benchmark started."""
    cpu = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        lines = []
    for line in lines:
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
            break
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}; Linux {platform.release()}; "
        f"{platform.python_implementation()} {platform.python_version()}; "
        f"{os.cpu_count()} cores; load {load}"
    )


def timed_repeats(loops: list[tuple[Loop, int]], repeats: int) -> list[list[float]]:
    """Seconds per operation of each ``(fn, n)`` (``fn(n)`` does ``n`` operations) in each of
    ``repeats`` rounds.  The rounds are interleaved (row 1, row 2, ..., row 1, ...), so that
    the ``k``-th times of all rows were measured side by side."""
    times: list[list[float]] = [[] for _ in loops]
    clock = time.thread_time
    for _ in range(repeats):
        for (fn, n), row in zip(loops, times, strict=True):
            fn(max(1, n // 8))  # warm-up, untimed: the caches the row before filled are refilled
            t0 = clock()
            fn(n)
            row.append(max(clock() - t0, 1e-9) / n)
    return times


def model_vm(vcpus: int, exit_log: int = 4096) -> Vm:
    """The model, configured as the host's KVM guest (features, vector_hashing); every other
    option at its default (the exit log on, unless ``exit_log=0``)."""
    ok, _ = kvm_available()
    features = guest_features() if ok else None
    hashing = host_vector_hashing() if ok else None
    vm = Vm(vcpus, features=features, vector_hashing=hashing, exit_log=exit_log)
    setup_x2apic([vm.vcpu(i).wrmsr for i in range(vcpus)])
    return vm


def setup_x2apic(wrmsrs: list[Callable[[int, int], None]]) -> None:
    """Every vCPU's guest (its ``wrmsr``) enables x2APIC mode, then software-enables its APIC."""
    for wrmsr in wrmsrs:
        wrmsr(0x1B, X2APIC_ENABLE)
        wrmsr(0x80F, SVR)


def msi_loop(signal: Callable[[int, int, int, int], int]) -> Loop:
    def run(n: int) -> None:
        for _ in range(n):
            signal(MSI_ADDRESS, 0, MSI_DATA, 0)

    return run


def raw_msi_loop(vm_fd: int) -> Loop:
    """KVM_SIGNAL_MSI from Python with a prebuilt ``struct kvm_msi``: one ioctl per MSI."""
    msi = k.KvmMsi(address_lo=MSI_ADDRESS, address_hi=0, data=MSI_DATA, flags=0)
    request = k.KVM_SIGNAL_MSI

    def run(n: int) -> None:
        ioctl = fcntl.ioctl
        for _ in range(n):
            ioctl(vm_fd, request, msi, True)

    assert fcntl.ioctl(vm_fd, request, msi, True) == 1
    return run


def icr_loop(wrmsr: Callable[[int, int], None], value: int = ICR) -> Loop:
    def run(n: int) -> None:
        for _ in range(n):
            wrmsr(0x830, value)

    return run


def raw_wrmsr_loop(kvm: KvmVm) -> tuple[Loop, Callable[[], None]]:
    """The guest's ``wrmsr; out; jmp`` loop on vCPU 0: each run enters it once with RIP and
    RCX/EDX:EAX set (the first of its ``n`` writes, through ``KvmVcpu.execute``, since another
    row runs other guest code on vCPU 0 in between); every further KVM_RUN executes one WRMSR
    of the ICR and exits at the OUT.  Returns the loop and the clean-up (the exit-reason view
    must be released before the VM closes)."""
    vcpu = kvm.vcpu(0)
    entry = kvm.stubs.wrmsr_loop
    reasons = memoryview(vcpu.run_page).cast("I")
    slot = k.RUN_EXIT_REASON // 4
    fd = vcpu.fd
    request = k.KVM_RUN

    def run(n: int) -> None:
        vcpu.execute(entry, "WRMSR loop", rcx=0x830, rax=ICR & 0xFFFFFFFF, rdx=ICR >> 32)
        ioctl = fcntl.ioctl
        for _ in range(n - 1):
            ioctl(fd, request, 0)
            if reasons[slot] != k.KVM_EXIT_IO:
                raise RuntimeError(f"WRMSR loop: exit reason {reasons[slot]}")

    return run, reasons.release


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    name: str
    rate: float | None
    """Operations per second, the median over the repeats (None: not measured here)."""
    times: tuple[float, ...] = ()
    """Seconds per operation in each repeat, in the order of every other row's repeats."""


ROWS = {
    "msi_model": "(a) MSI        model   Vm.signal_msi",
    "msi_raw": "(a) MSI        kernel  KVM_SIGNAL_MSI ioctl, prebuilt struct (baseline)",
    "msi_wrapper": "(a) MSI        kernel  KvmVm.signal_msi wrapper (checks + packs per call)",
    "icr_model": "(b) ICR write  model   vcpu(0).wrmsr(0x830), 4 vCPUs",
    "icr_model_nolog": "(b) ICR write  model   vcpu(0).wrmsr(0x830), 4 vCPUs, exit log off",
    "icr_model_big": "(b) ICR write  model   vcpu(0).wrmsr(0x830), 4096 vCPUs",
    "icr_raw": "(b) ICR write  kernel  guest WRMSR loop, one KVM_RUN per write (baseline)",
    "icr_wrapper": "(b) ICR write  kernel  KvmVcpu.wrmsr wrapper (5 ioctls per write)",
}


def measure(quick: bool) -> tuple[list[Row], str | None]:
    """Every row of ``ROWS``; the reason KVM was not measured, if it was not."""
    n, kvm_n, wrapper_n, repeats = (500, 500, 50, 20) if quick else (500, 500, 50, 160)
    vm = model_vm(VCPUS)
    nolog = model_vm(VCPUS, exit_log=0)
    big = model_vm(BIG_VCPUS)
    assert vm.signal_msi(MSI_ADDRESS, 0, MSI_DATA, 0) == 1
    loops: dict[str, tuple[Loop, int]] = {
        "msi_model": (msi_loop(vm.signal_msi), n),
        "icr_model": (icr_loop(vm.vcpu(0).wrmsr), n),
        "icr_model_nolog": (icr_loop(nolog.vcpu(0).wrmsr), n),
        "icr_model_big": (icr_loop(big.vcpu(0).wrmsr, BIG_ICR), n),
    }
    ok, why = kvm_available()
    if not ok:
        return rows(loops, timed_repeats(list(loops.values()), repeats)), why
    with KvmVm(VCPUS) as kvm:
        setup_x2apic([kvm.vcpu(i).wrmsr for i in range(VCPUS)])
        assert kvm.signal_msi(MSI_ADDRESS, 0, MSI_DATA, 0) == 1
        loops["msi_raw"] = (raw_msi_loop(kvm.fd), n)
        loops["msi_wrapper"] = (msi_loop(kvm.signal_msi), kvm_n)
        loops["icr_wrapper"] = (icr_loop(kvm.vcpu(0).wrmsr), wrapper_n)
        raw_icr, release = raw_wrmsr_loop(kvm)
        loops["icr_raw"] = (raw_icr, kvm_n)
        try:
            times = timed_repeats(list(loops.values()), repeats)
        finally:
            release()
        assert VECTOR in kvm.lapic_view(1).irr and VECTOR in kvm.lapic_view(2).irr
    assert VECTOR in vm.lapic(1).irr and VECTOR in vm.lapic(2).irr
    assert VECTOR in nolog.lapic(1).irr and not nolog.exits
    assert VECTOR in big.lapic(BIG_VCPUS - 1).irr
    return rows(loops, times), None


def rows(loops: dict[str, tuple[Loop, int]], times: list[list[float]]) -> list[Row]:
    """Every row of ``ROWS``, with the times measured for the keys of ``loops``."""
    by_key = dict(zip(loops, times, strict=True))
    out = []
    for key, name in ROWS.items():
        t = by_key.get(key)
        out.append(Row(key, name, None if t is None else 1 / statistics.median(t), tuple(t or ())))
    return out


def ratios(rows: list[Row]) -> list[tuple[str, float, str, bool | None]]:
    """``(what, ratio, target, met)`` for every ratio that can be computed from ``rows``."""
    r = {row.key: row.times for row in rows if row.times}
    out: list[tuple[str, float, str, bool | None]] = []

    def add(what: str, num: str, den: str, target: float | None, at_most: bool = False) -> None:
        a, b = r.get(num), r.get(den)
        if a is None or b is None:
            return
        value = bench_ipi.paired_ratio(b, a)  # rate a / rate b: the cost of b over the cost of a
        if target is None:
            out.append((what, value, "", None))
        elif at_most:
            out.append((what, value, f"<= {target:g}x", value <= target))
        else:
            out.append((what, value, f">= {target:g}x", value >= target))

    add("(a) model MSI / raw KVM_SIGNAL_MSI rate (goal 1.0x)", "msi_model", "msi_raw", 0.5)
    add("(a) model MSI / KvmVm.signal_msi wrapper rate", "msi_model", "msi_wrapper", None)
    add("(a) KvmVm.signal_msi wrapper / raw ioctl rate", "msi_wrapper", "msi_raw", None)
    add("(b) model ICR write / raw KVM_SIGNAL_MSI rate", "icr_model", "msi_raw", 0.35)
    add("(b) model ICR write, exit log off / raw KVM_SIGNAL_MSI", "icr_model_nolog", "msi_raw",
        0.35)
    add("(b) model ICR write / guest WRMSR, one KVM_RUN", "icr_model", "icr_raw", None)
    add("(b) model ICR write / KvmVcpu.wrmsr wrapper", "icr_model", "icr_wrapper", None)
    add("(b) model cost per ICR write, 4096 / 4 vCPUs", "icr_model", "icr_model_big", 1.1, True)
    return out


def guest_ratios(quick: bool) -> list[tuple[str, float, str, bool | None]]:
    """The ratios of ``bench/bench_ipi.py`` (the Linux guest driver's paths, model only), in
    :func:`ratios`' form, so that one table holds every ratio of ``bench/``."""
    n, repeats = (1_000, 5) if quick else (2_000, 40)
    u4, _, unicast_ratio = bench_ipi.unicast_costs(n, repeats)
    _, _, pv_ratio = bench_ipi.pv_vs_accept(max(50, n // 20), repeats)
    return [
        ("(c) guest driver unicast IPI rate / 500,000 per s", 1 / u4 / 500_000, ">= 1x",
         1 / u4 >= 500_000),
        ("(c) guest driver cost per unicast IPI, 4096 / 4 vCPUs", unicast_ratio, "<= 1.1x",
         unicast_ratio <= 1.1),
        ("(c) PV send-IPI hypercall, 128 targets / 128 accepts", pv_ratio, "<= 1.2x",
         pv_ratio <= 1.2),
    ]  # fmt: skip


def report(
    rows: list[Row],
    why: str | None,
    where: str,
    extra: Sequence[tuple[str, float, str, bool | None]] = (),
) -> None:
    print(f"machine: {where}")
    width = max(len(r.name) for r in rows)
    print(f"{'benchmark (x2APIC vCPUs)':<{width}}  {'ops/s':>12}  {'per op':>10}")
    for r in rows:
        if r.rate is None:
            print(f"{r.name:<{width}}  {'-':>12}  {'-':>10}")
        else:
            print(f"{r.name:<{width}}  {r.rate:>12,.0f}  {1e6 / r.rate:>8.2f}us")
    if why is not None:
        print(f"\nKVM not measured: {why}; only the model's ratios are shown")
    print()
    print(f"{'ratio':<{width}}  {'measured':>12}  {'target':>10}  verdict")
    for what, value, target, met in [*ratios(rows), *extra]:
        verdict = "" if met is None else ("met" if met else "NOT met")
        print(f"{what:<{width}}  {value:>11.3f}x  {target:>10}  {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument(
        "--no-guest", action="store_true", help="skip the (c) rows of bench/bench_ipi.py"
    )
    args = parser.parse_args(argv)
    where = machine()  # the load before the benchmark's own
    rows, why = measure(args.quick)
    extra = [] if args.no_guest else guest_ratios(args.quick)
    report(rows, why, where, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
