"""The model against the host's KVM, side by side in one run (``apicsim.kvm.KvmVm``).

Run: ``./dev python bench/bench_kernel.py`` (``--quick`` for a short run).  Prints one table
and the ratios; each row is the best of several repeats of a loop timed with
``time.perf_counter`` (wall clock), so background load can only make a row look slower, and
the model's and the kernel's repeats alternate, so that load falls on both alike.  Not a
test: it exits 0 whatever it measures, and without a usable ``/dev/kvm`` it prints the model's
rows only.

What is measured, on the same topology for both (4 vCPUs, every APIC software-enabled and in
x2APIC mode; the model gets the guest CPUID features and ``vector_hashing`` of the host's KVM):

(a) one fixed, edge, physical MSI to the vCPU with APIC ID 2 (address 0xFEE02000, data 0xF0):
    the model's ``Vm.signal_msi`` against ``KvmVm.signal_msi``, which is one KVM_SIGNAL_MSI
    ioctl (libc ``ioctl`` through ctypes).  Target: the model at least half the ioctl's rate.
(b) one guest ICR write, x2APIC unicast fixed IPI to APIC ID 1 (WRMSR 0x830): the model's
    ``vm.vcpu(0).wrmsr`` (trap-and-emulate: VM exit, ICR emulation, map fast path, accept)
    against ``KvmVm.vcpu(0).wrmsr``, a round trip into a real guest that executes the WRMSR
    (KVM_SET_REGS, KVM_GET_MP_STATE, KVM_GET_SREGS, one KVM_RUN, KVM_GET_REGS).  Target: the
    model at least 5x faster.

Why it is fair: both sides are called from Python, one operation per call, through the same
interface (``hypervisor.api.HostApi``, which ``hypervisor.Vm`` and ``KvmVm`` share), with the
same arguments and the same argument checks (``hypervisor.api``), and both deliver the same
interrupt to the same vCPU state (the destination's IRR bit is set by the first call; every
later call is delivered onto it, on both).  The model runs
with its exit log and tracer off, as KVM runs with its tracepoints off.  (b) on the kernel side
includes what any VMM pays to run guest code from Python: the register set-up ioctls and the
exit back to userspace; it is "one guest ICR write as seen from the host", not KVM's in-kernel
emulation time alone.  On this host KVM is ``kvm_pvm`` (guest code runs through KVM's
instruction emulator; ``specs/kvm_backend.md``), so its KVM_RUN is slower than with VMX/SVM.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apicsim.kvm import KvmVm, guest_features, host_vector_hashing, kvm_available
from hypervisor import Vm

VCPUS = 4
VECTOR = 0xF0
MSI_ADDRESS = 0xFEE00000 | 2 << 12  # fixed, physical, destination APIC ID 2
MSI_DATA = VECTOR  # fixed, edge
ICR = 1 << 32 | 0x4000 | VECTOR  # x2APIC: destination 1, fixed, physical, assert, edge
X2APIC_ENABLE = 0xFEE00C00  # APIC_BASE: EN | EXTD, default base
SVR = 0x1FF


def best_rates(loops: list[tuple[Callable[[int], None], int]], repeats: int) -> list[float]:
    """Operations per second of each ``(fn, n)`` (``fn(n)`` does ``n`` operations): the best
    of ``repeats``.  The repeats are interleaved (model, kernel, model, kernel, ...) so that
    background load falls on both sides alike."""
    best = [float("inf")] * len(loops)
    for _ in range(repeats):
        for k, (fn, n) in enumerate(loops):
            t0 = time.perf_counter()
            fn(n)
            best[k] = min(best[k], time.perf_counter() - t0)
    return [n / t for (_, n), t in zip(loops, best, strict=True)]


def model_vm() -> Vm:
    """The model, configured as the host's KVM guest (features, vector_hashing)."""
    ok, _ = kvm_available()
    features = guest_features() if ok else None
    hashing = host_vector_hashing() if ok else None
    return Vm(VCPUS, features=features, vector_hashing=hashing, exit_log=0)


def setup_x2apic(wrmsrs: list[Callable[[int, int], None]]) -> None:
    """Every vCPU's guest (its ``wrmsr``) enables x2APIC mode, then software-enables its APIC."""
    for wrmsr in wrmsrs:
        wrmsr(0x1B, X2APIC_ENABLE)
        wrmsr(0x80F, SVR)


def msi_loop(signal: Callable[[int, int, int, int], int]) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            signal(MSI_ADDRESS, 0, MSI_DATA, 0)

    return run


def icr_loop(wrmsr: Callable[[int, int], None]) -> Callable[[int], None]:
    def run(n: int) -> None:
        for _ in range(n):
            wrmsr(0x830, ICR)

    return run


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    rate: float | None
    """Operations per second (None: not measured here)."""


def measure(quick: bool) -> tuple[list[Row], str | None]:
    """The four rows ((a) model, (a) kernel, (b) model, (b) kernel); the reason KVM was not
    measured, if it was not."""
    msi_n, icr_model_n, icr_kvm_n, repeats = (
        (5_000, 5_000, 300, 3) if quick else (50_000, 50_000, 3_000, 5)
    )
    vm = model_vm()
    setup_x2apic([vm.vcpu(i).wrmsr for i in range(VCPUS)])
    assert vm.signal_msi(MSI_ADDRESS, 0, MSI_DATA, 0) == 1
    model_msi_loop = (msi_loop(vm.signal_msi), msi_n)
    model_icr_loop = (icr_loop(vm.vcpu(0).wrmsr), icr_model_n)
    names = (
        "(a) MSI       model   Vm.signal_msi",
        "(a) MSI       kernel  KVM_SIGNAL_MSI",
        "(b) ICR write model   vcpu(0).wrmsr(0x830)",
        "(b) ICR write kernel  guest WRMSR, one KVM_RUN",
    )
    ok, why = kvm_available()
    if not ok:
        model_msi, model_icr = best_rates([model_msi_loop, model_icr_loop], repeats)
        rates: list[float | None] = [model_msi, None, model_icr, None]
        return [Row(name, rate) for name, rate in zip(names, rates, strict=True)], why
    with KvmVm(VCPUS) as kvm:
        setup_x2apic([kvm.vcpu(i).wrmsr for i in range(VCPUS)])
        assert kvm.signal_msi(MSI_ADDRESS, 0, MSI_DATA, 0) == 1
        msi = best_rates([model_msi_loop, (msi_loop(kvm.signal_msi), msi_n)], repeats)
        icr = best_rates([model_icr_loop, (icr_loop(kvm.vcpu(0).wrmsr), icr_kvm_n)], repeats)
        assert VECTOR in kvm.lapic_view(1).irr and VECTOR in kvm.lapic_view(2).irr
    assert VECTOR in vm.lapic(1).irr and VECTOR in vm.lapic(2).irr
    rates = [msi[0], msi[1], icr[0], icr[1]]
    return [Row(name, rate) for name, rate in zip(names, rates, strict=True)], None


def report(rows: list[Row], why: str | None) -> None:
    width = max(len(r.name) for r in rows)
    print(f"{'benchmark (4 x2APIC vCPUs)':<{width}}  {'ops/s':>12}  {'per op':>10}")
    for r in rows:
        if r.rate is None:
            print(f"{r.name:<{width}}  {'-':>12}  {'-':>10}")
        else:
            print(f"{r.name:<{width}}  {r.rate:>12,.0f}  {1e6 / r.rate:>8.2f}us")
    if why is not None:
        print(f"\nKVM not measured: {why}; targets not evaluated")
        return
    model_msi, kvm_msi, model_icr, kvm_icr = (r.rate for r in rows)
    assert model_msi and kvm_msi and model_icr and kvm_icr
    targets = [
        ("(a) model / ioctl rate, MSI", model_msi / kvm_msi, 0.5),
        ("(b) model / kernel rate, ICR write", model_icr / kvm_icr, 5.0),
    ]
    print()
    print(f"{'ratio':<{width}}  {'measured':>12}  {'target':>10}  verdict")
    for name, ratio, target in targets:
        verdict = "met" if ratio >= target else "NOT met"
        print(f"{name:<{width}}  {ratio:>11.2f}x  {'>= ' + f'{target:g}x':>10}  {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args(argv)
    rows, why = measure(args.quick)
    report(rows, why)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
