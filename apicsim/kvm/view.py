"""``LapicView``: a small read-only look at one APIC, from its 1 KiB ``kvm_lapic_state``.

Works for either backend: ``lapic_view(vm, i)`` needs only ``get_lapic`` and ``get_msr``
(``hypervisor.api.StateReader``).  The host-API Protocols themselves are declared once, in
``hypervisor.api``; ``AnyVm`` and ``GuestCpu`` are their names here.
"""

from __future__ import annotations

from hypervisor.api import HostApi, StateReader, VcpuApi
from lapic.faults import ApicTypeError, check_int
from lapic.registers import APIC_BASE_MSR

STATE_SIZE = 0x400
IRR = 0x200
ISR = 0x100
TMR = 0x180


def vectors(state: bytes, base: int) -> frozenset[int]:
    """The vectors set in the 8 words at ``base + 0x10 * n`` (IRR/ISR/TMR layout)."""
    out: set[int] = set()
    for n in range(8):
        word = int.from_bytes(state[base + 0x10 * n : base + 0x10 * n + 4], "little")
        out.update(32 * n + b for b in range(32) if word >> b & 1)
    return frozenset(out)


class LapicView:
    """``irr``/``isr``/``tmr`` (frozensets of vectors), ``apic_base``, ``register(offset)``."""

    __slots__ = ("apic_base", "irr", "isr", "state", "tmr")

    def __init__(self, state: bytes, apic_base: int) -> None:
        if not isinstance(state, (bytes, bytearray)) or len(state) != STATE_SIZE:
            raise ApicTypeError(f"state must be {STATE_SIZE} bytes")
        self.state = bytes(state)
        self.apic_base = apic_base
        self.irr = vectors(self.state, IRR)
        self.isr = vectors(self.state, ISR)
        self.tmr = vectors(self.state, TMR)

    def register(self, offset: int) -> int:
        """The 32-bit word at ``offset`` (a multiple of 4 below 0x400) of the state image."""
        check_int("offset", offset, 0, STATE_SIZE - 4)
        if offset & 3:
            raise ApicTypeError(f"offset={offset:#x} must be a multiple of 4")
        return int.from_bytes(self.state[offset : offset + 4], "little")

    def __repr__(self) -> str:
        return (
            f"LapicView(apic_base={self.apic_base:#x}, id={self.register(0x20):#x}, "
            f"irr={sorted(self.irr)}, isr={sorted(self.isr)}, tmr={sorted(self.tmr)})"
        )


def lapic_view(vm: StateReader, i: int) -> LapicView:
    """A :class:`LapicView` of vCPU ``i`` of ``vm`` (``hypervisor.Vm`` or ``KvmVm``)."""
    return LapicView(vm.get_lapic(i), vm.get_msr(i, APIC_BASE_MSR))


GuestCpu = VcpuApi
"""What a test body may have a vCPU execute (``hypervisor.api.VcpuApi``)."""

AnyVm = HostApi
"""The host API shared by ``hypervisor.Vm`` and ``KvmVm`` (``hypervisor.api.HostApi``): one
test body runs on both."""
