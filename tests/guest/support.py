"""Helpers shared by the guest tests: boot a guest, capture the exits of one action."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from guest import Guest
from hypervisor import Exit, ExitReason, Vm

APIC_PAGE = 0xFEE00000
ICR_MSR = 0x830


def boot(
    driver: str,
    vcpus: int = 4,
    *,
    vcpu_ids: Sequence[int] | None = None,
    base: str | None = None,
    bits_per_long: int = 64,
    trace: bool = False,
) -> tuple[Vm, Guest]:
    vm = Vm(vcpus, vcpu_ids=vcpu_ids, trace=trace)
    return vm, Guest(vm, driver, base=base, bits_per_long=bits_per_long)


def exits_of(vm: Vm, action: Callable[[], object]) -> list[Exit]:
    """The exits ``action`` caused, in order."""
    before = vm.stats.exits
    action()
    n = vm.stats.exits - before
    assert vm.exit_log is not None and n <= (vm.exit_log.maxlen or 0)
    return vm.exits[len(vm.exits) - n :]


def reasons(exits: Sequence[Exit]) -> Counter[ExitReason]:
    return Counter(e.reason for e in exits)


def run_all(g: Guest) -> list[list[int]]:
    """Run every CPU once; the vectors each handled."""
    return [cpu.run() for cpu in g.cpus]
