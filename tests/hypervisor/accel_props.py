"""Shared by the accelerators' property tests (``test_avic_props.py``, ``test_apicv_props.py``):
the random workload an accelerator must be invisible under, and the player that runs it.

A *script* is a list of operations on ``n`` vCPUs, each a tuple:

* ``("ipi", src, dest, vector)``: a fixed, physical ICR write by vCPU ``src`` (``dest == n``:
  the all-including-self shorthand);
* ``("msi", dest, vector)``: KVM_SIGNAL_MSI, fixed, physical;
* ``("halt", i)``: HLT; ``("cli_halt", i)``: ``cli; hlt`` (HLT with RFLAGS.IF = 0: no
  interrupt wakes it; when it is next run, an NMI (an MSI) wakes it if it is still blocked, and
  its guest executes STI);
* ``("preempt", i)``: KVM ``vcpu_put``; ``("enter", i, pcpu)``: load a preempted vCPU on a
  pCPU (a migration when it differs from the last one);
* ``("run", i)``: one VM entry, the guest's handlers take what is pending.

:func:`play` runs a script on a fresh VM with any accelerator and returns what each vCPU's
handlers received, in order; :func:`assert_same_as_emulated` is the invisibility property
(the same as under ``"emulated"``).

Not here: the accelerators' own checks (exit counts, their tables), which stay with each test.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from hypervisor import Host, RunState, Vm

from .builders import MSR_ICR, MSR_SVR, REG_ICR, REG_ICR2, REG_SVR, SVR_ON, mmio_write

N = 4
"""vCPUs (and pCPUs) of the scripted VM."""

Script = list[tuple[Any, ...]]

NMI_MSI_DATA = 0x400
"""MSI data of an NMI (delivery mode 100, vector 0)."""

X2APIC_ON = 0xFEE00000 | 0xC00
"""IA32_APIC_BASE with EN and EXTD (the BSP bit is added for vCPU 0)."""


def script_ops(
    n: int = N,
    *,
    msi: bool = False,
    cli_halt: bool = False,
    migrate: bool = False,
    max_size: int = 25,
) -> st.SearchStrategy[Script]:
    """Scripts over ``n`` vCPUs: IPIs, halts, preemptions and runs, plus MSIs, ``cli; hlt``
    and migrations when asked."""
    choices: list[st.SearchStrategy[tuple[Any, ...]]] = [
        st.tuples(st.just("ipi"), st.integers(0, n - 1), st.integers(0, n), st.integers(32, 255)),
        st.tuples(st.just("halt"), st.integers(0, n - 1)),
        st.tuples(st.just("preempt"), st.integers(0, n - 1)),
        st.tuples(st.just("run"), st.integers(0, n - 1)),
    ]
    if msi:
        choices.append(st.tuples(st.just("msi"), st.integers(0, n - 1), st.integers(32, 255)))
    if cli_halt:
        choices.append(st.tuples(st.just("cli_halt"), st.integers(0, n - 1)))
    if migrate:
        choices.append(
            st.tuples(st.just("enter"), st.integers(0, n - 1), st.integers(0, n - 1))
        )
    return st.lists(st.one_of(*choices), max_size=max_size)


def scripted_vm(accelerator: object, n: int = N, *, x2apic: bool = False) -> Vm:
    """``n`` vCPUs on ``n`` pCPUs, every APIC software-enabled (and in x2APIC mode if asked),
    each vCPU in guest mode on the pCPU of its index."""
    vm = Vm(n, accelerator=accelerator, host=Host(n))  # type: ignore[arg-type]
    for i in range(n):
        if x2apic:
            vm.vcpu(i).wrmsr(0x1B, X2APIC_ON | (0x100 if i == 0 else 0))
            vm.vcpu(i).wrmsr(MSR_SVR, SVR_ON)
        else:
            mmio_write(vm, i, REG_SVR, SVR_ON)
    return vm


def send_ipi(vm: Vm, src: int, dest: int, low: int) -> None:
    """vCPU ``src`` writes ICR (``low``) for physical destination ``dest`` through its APIC's
    interface: WRMSR 0x830 in x2APIC mode, ICR2 then ICR in xAPIC mode."""
    if vm.lapic(src).x2apic_mode:
        vm.vcpu(src).wrmsr(MSR_ICR, dest << 32 | low)
    else:
        mmio_write(vm, src, REG_ICR2, dest << 24)
        mmio_write(vm, src, REG_ICR, low)


def msi_address(dest: int) -> int:
    """A physical, fixed MSI address for destination APIC ID ``dest`` (< 256)."""
    return 0xFEE00000 | dest << 12


def play(
    accelerator: object, script: Script, n: int = N, *, x2apic: bool = False
) -> tuple[Vm, list[list[int]]]:
    """Run ``script`` on a fresh :func:`scripted_vm`; then run every vCPU once more (a
    ``cli; hlt`` vCPU with its ``sti`` first).  Returns the VM and, per vCPU, the vectors its
    handlers received in order."""
    vm = scripted_vm(accelerator, n, x2apic=x2apic)
    seen: list[list[int]] = [[] for _ in range(n)]
    cli: set[int] = set()

    def run(i: int) -> None:
        v = vm.vcpu(i)
        if i in cli:  # only an NMI wakes a ``cli; hlt`` vCPU; its guest then executes STI
            cli.discard(i)
            if v.run_state is RunState.BLOCKED:
                vm.signal_msi(msi_address(i), 0, NMI_MSI_DATA)
                seen[i].extend(v.run())
            v.guest_if = True
        seen[i].extend(v.run())

    for op in script:
        kind = op[0]
        if kind == "msi":
            vm.signal_msi(msi_address(int(op[1]) % n), 0, int(op[2]))
            continue
        i = int(op[1])
        v = vm.vcpu(i)
        if kind == "ipi":
            if v.run_state is RunState.BLOCKED:
                continue
            dest, vector = int(op[2]), int(op[3])
            low = vector | (0x80000 if dest == n else 0)  # n: broadcast including self
            send_ipi(vm, i, dest % n, low)
        elif kind in ("halt", "cli_halt"):
            if v.run_state is not RunState.BLOCKED:
                if kind == "cli_halt":
                    v.guest_if = False
                    cli.add(i)
                v.halt()
        elif kind == "preempt":
            v.preempt()
        elif kind == "enter":
            if v.run_state is RunState.PREEMPTED:
                v.enter(pcpu=int(op[2]) % n)
        else:
            run(i)
    for i in range(n):
        run(i)
    return vm, seen


def assert_same_as_emulated(
    accelerator: object, script: Script, n: int = N, *, x2apic: bool = False
) -> Vm:
    """The invisibility property: under ``accelerator`` the guest's handlers receive what they
    receive under trap-and-emulate, in the same order, and each APIC ends with the same IRR and
    ISR and each vCPU in the same run state.  Returns the accelerated VM."""
    emu, seen_emu = play("emulated", script, n, x2apic=x2apic)
    vm, seen = play(accelerator, script, n, x2apic=x2apic)
    assert seen == seen_emu
    for i in range(n):
        assert vm.lapic(i).irr == emu.lapic(i).irr, i
        assert vm.lapic(i).isr == emu.lapic(i).isr, i
        assert vm.vcpu(i).run_state is emu.vcpu(i).run_state, i
    return vm
