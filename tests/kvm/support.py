"""Helpers for tests that run one body on the model and on the host's KVM."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest

from apicsim.kvm import (
    AnyVm,
    KvmVm,
    guest_features,
    host_tpr_low_bits_survive_exit,
    host_vector_hashing,
    kvm_available,
)
from hypervisor import Vm
from hypervisor.config import VmConfig
from lapic import ApicValueError, Features, GuestFault, StateError

T = TypeVar("T")

APIC = 0xFEE00000
"""The default APIC page (guest physical)."""
XAPIC_ENABLE = 0xFEE00800
X2APIC_ENABLE = 0xFEE00C00
BSP = 0x100
TMCCT = 0x390
"""The live timer count: the one word of the state image that depends on wall-clock time."""

Outcome = tuple[str, int]
"""``("ok", value)``, ``("fault", vector)``, ``("state-error", errno)`` or ``("refused", 0)``
(an ``ApicValueError``: the access is not one the backend performs)."""


KVM_OK, KVM_WHY = kvm_available()
FEATURES = guest_features() if KVM_OK else Features()
"""The virtual CPU KvmVm's guest CPUID advertises: the model is given the same."""
VECTOR_HASHING = host_vector_hashing() if KVM_OK else None
"""KVM's ``vector_hashing`` module parameter: the model's lowest-priority policy follows it."""
TPR_LOW_BITS_SURVIVE_EXIT = host_tpr_low_bits_survive_exit() if KVM_OK else True
"""KVMB-11 as measured on this host: the model's ``KvmOptions.tpr_low_bits_survive_exit``."""


class Factory:
    """``make(vcpus, *, x2apic_format, broadcast_quirk, vcpu_ids)`` for one backend."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.made: list[KvmVm] = []

    def __call__(
        self,
        vcpus: int = 1,
        *,
        x2apic_format: bool = False,
        broadcast_quirk: bool = True,
        vcpu_ids: Sequence[int] | None = None,
    ) -> AnyVm:
        if self.backend == "model":
            config = VmConfig.build(
                vcpus,
                x2apic_format=x2apic_format,
                broadcast_quirk=broadcast_quirk,
                vcpu_ids=vcpu_ids,
                features=FEATURES,
                vector_hashing=VECTOR_HASHING,
            )
            kvm = config.kvm.replace(tpr_low_bits_survive_exit=TPR_LOW_BITS_SURVIVE_EXIT)
            return Vm(config.replace(kvm=kvm))
        vm = KvmVm(
            vcpus, x2apic_format=x2apic_format, broadcast_quirk=broadcast_quirk, vcpu_ids=vcpu_ids
        )
        self.made.append(vm)
        return vm

    def close(self) -> None:
        for vm in self.made:
            vm.close()
        self.made.clear()


def skip_without_kvm() -> None:
    if not KVM_OK:
        pytest.skip(f"KVM backend unavailable: {KVM_WHY}")


needs_kvm = pytest.mark.skipif(not KVM_OK, reason=f"KVM backend unavailable: {KVM_WHY}")


class Both:
    """Runs a body on the model and on KVM and asserts the observables are equal."""

    def __init__(self) -> None:
        self.model = Factory("model")
        self.kvm = Factory("kvm")

    def run(self, body: Callable[[AnyVm], T], **vm_args: Any) -> T:
        expected = body(self.model(**vm_args))
        try:
            observed = body(self.kvm(**vm_args))
        finally:
            self.kvm.close()
        assert observed == expected, (
            f"KVM disagrees with the model for {body.__qualname__}({vm_args}):\n"
            + "\n".join(difference(expected, observed))
        )
        return expected

    def close(self) -> None:
        self.kvm.close()


def run_both(body: Callable[[AnyVm], T], **vm_args: Any) -> T:
    """``Both().run(body, **vm_args)`` on fresh VMs (for tests that make many VMs)."""
    b = Both()
    try:
        return b.run(body, **vm_args)
    finally:
        b.close()


def outcome(action: Callable[[], int | bool | None]) -> Outcome:
    """What ``action`` did, in a form both backends can be compared on."""
    try:
        value = action()
    except GuestFault as fault:
        return ("fault", fault.vector)
    except StateError as error:
        return ("state-error", error.errno)
    except ApicValueError:
        return ("refused", 0)
    return ("ok", int(value) if value is not None else 0)


def state_diff(a: bytes, b: bytes, *, skip: tuple[int, ...] = (TMCCT,)) -> list[str]:
    """``offset: a != b`` for each 32-bit word of two state images that differs."""
    return [
        f"{o:#05x}: {int.from_bytes(a[o : o + 4], 'little'):#010x} "
        f"!= {int.from_bytes(b[o : o + 4], 'little'):#010x}"
        for o in range(0, len(a), 4)
        if o not in skip and a[o : o + 4] != b[o : o + 4]
    ]


def states(vm: AnyVm) -> list[bytes]:
    """KVM_GET_LAPIC of every vCPU, with the time-dependent TMCCT zeroed."""
    out = []
    for i in range(len(vm)):
        s = bytearray(vm.get_lapic(i))
        s[TMCCT : TMCCT + 4] = bytes(4)
        out.append(bytes(s))
    return out


def word(state: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(state[offset : offset + 4], "little")


def sw_enable(vm: AnyVm, i: int, svr: int = 0x1FF) -> None:
    """The guest of vCPU ``i`` writes SVR through whichever interface its mode uses."""
    cpu = vm.vcpu(i)
    if vm.get_msr(i, 0x1B) & 0x400:
        cpu.wrmsr(0x80F, svr)
    else:
        cpu.mmio_write(APIC + 0xF0, svr)


def guest_x2apic(vm: AnyVm, i: int) -> None:
    """The guest of vCPU ``i`` enables x2APIC mode (WRMSR IA32_APIC_BASE, BSP bit kept)."""
    vm.vcpu(i).wrmsr(0x1B, X2APIC_ENABLE | (vm.get_msr(i, 0x1B) & BSP))


def difference(model: object, kvm: object, where: str = "") -> list[str]:
    """Where two observables differ, as short lines (state images word by word)."""
    if model == kvm:
        return []
    if isinstance(model, bytes) and isinstance(kvm, bytes) and len(model) == len(kvm) == 0x400:
        return [f"  {where or 'state'} {d} (model != kvm)" for d in state_diff(model, kvm)]
    if (
        isinstance(model, (list, tuple))
        and isinstance(kvm, (list, tuple))
        and len(model) == len(kvm)
    ):
        lines: list[str] = []
        for n, (a, b) in enumerate(zip(model, kvm, strict=True)):
            lines += difference(a, b, f"{where}[{n}]")
            if len(lines) > 40:
                return [*lines[:40], "  ..."]
        return lines
    return [f"  {where or 'result'}: model {model!r}, kvm {kvm!r}"]
