"""Runs one program on two backends in lockstep and compares every observable after each step.

The *reference* is the model (``hypervisor.Vm`` with the kvm profile, the guest CPU of the KVM
backend and the host's ``vector_hashing``); the *subject* is the KVM backend (``KvmVm``), or,
in the harness's own tests, a model with a changed profile.  For each operation the engine

1. expands a macro into primitives against the reference's state (``expand``: the
   operations are those of ``apicsim.ops``, which perform themselves on each backend);
2. skips a primitive an ``executed`` exclusion rules out (the APIC window in the KVM backend's
   RAM, KVMB-7);
3. performs the primitive on both and records its outcome: the value read, the MSI's return
   value, ``("fault", vector)`` for a guest exception, ``("state-error", errno)`` for a failed
   KVM_SET_LAPIC, ``("refused", 0)`` for an access the backend does not perform;
4. takes a snapshot of every vCPU: the whole KVM_GET_LAPIC image (TMCCT included: no timer ever
   runs), IA32_APIC_BASE, the NMIs pending and the NMIs the guest has taken (compared as their
   sum: when KVM injects one depends on host timing);
5. stops at the first step whose outcome or snapshot differs.

Before a guest access on the reference, the engine does what KVM does at the entry for it: it
processes a pending INIT/SIPI as the model's ``Vcpu`` would, and if the vCPU then runs, it
takes one pending NMI (KVMB-3, ``nmi-injection``).  After each step it drops NMIs beyond KVM's
two pending (``nmi-pending-limit``).  A PPR that KVM_SET_LAPIC left stale is compared with
tolerance (``ppr-after-set-lapic``).  Each of these is an entry of ``exclusions.py``.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from apicsim import ops
from apicsim.kvm import AnyVm, KvmVm
from apicsim.kvm.view import vectors
from apicsim.ops import (
    APIC_BASE_MSR,
    GUEST_PRIMITIVES,
    PRIMITIVE_TYPES,
    HostOnly,
    MmioRead,
    Msi,
    Op,
    Primitive,
    SetLapic,
)
from hypervisor import MpState, Vm
from lapic.registers import REGISTER_BY_OFFSET
from tests.differential.exclusions import (
    BY_KEY,
    NMI_PENDING_LIMIT,
    Exclusion,
    excluded_by,
    read_kind,
    sends_init_to_itself,
    skipped_at_run_time,
)
from tests.differential.strategies import Program
from tests.kvm.support import Outcome, outcome

STATE_SIZE = 0x400
PPR = 0xA0


@dataclass(frozen=True, slots=True)
class VcpuSnapshot:
    image: bytes
    apic_base: int
    nmi_pending: int
    nmi_taken: int


Snapshot = tuple[VcpuSnapshot, ...]


class Side(Protocol):
    """One backend as the engine drives it."""

    name: str
    vm: AnyVm
    ram_size: int

    def before_guest_access(self, i: int) -> None: ...

    def after_step(self) -> None: ...

    def snapshot(self) -> Snapshot: ...


class ModelSide:
    """``hypervisor.Vm``: NMIs are taken at a guest access as the KVM backend's guest does."""

    ram_size = 0

    def __init__(self, vm: Vm, name: str = "model") -> None:
        self.name = name
        self.vm: AnyVm = vm
        self.model = vm
        self.taken = [0] * len(vm)

    def before_guest_access(self, i: int) -> None:
        """What the KVM backend's guest goes through at the entry for an access: a pending
        INIT/SIPI is processed (as ``Vcpu._executing`` would); then, if the vCPU runs, it takes
        one pending NMI (KVM injects one; the next waits for an NMI window, which on this host
        opens only after the access has exited: measured, 2 pending -> 1 taken, 1 pending)."""
        vcpu = self.model.vcpu(i)
        apic = self.model.lapic(i)
        if apic.init_pending or apic.sipi_pending:
            vcpu.accept_events()
        if vcpu.mp_state is MpState.RUNNABLE and apic.nmi_pending:
            apic.nmi_pending -= 1
            self.taken[i] += 1

    def after_step(self) -> None:
        """KVM keeps at most two NMIs pending (the ``nmi-pending-limit`` exclusion): drop the
        model's excess, as KVM's ``process_nmi()`` does when the engine reads its state (each
        step adds at most one NMI per vCPU)."""
        for i in range(len(self.model)):
            apic = self.model.lapic(i)
            apic.nmi_pending = min(apic.nmi_pending, NMI_PENDING_LIMIT)

    def snapshot(self) -> Snapshot:
        m = self.model
        return tuple(
            VcpuSnapshot(m.get_lapic(i), m.get_msr(i, APIC_BASE_MSR), m.lapic(i).nmi_pending,
                         self.taken[i])
            for i in range(len(m))
        )  # fmt: skip


class KvmSide:
    """``KvmVm``: NMIs pending from KVM_GET_VCPU_EVENTS, taken from the guest's NMI counter."""

    name = "kvm"

    def __init__(self, vm: KvmVm) -> None:
        self.vm: AnyVm = vm
        self.kvm = vm
        self.ram_size = vm.ram_size

    def before_guest_access(self, i: int) -> None:
        return None

    def after_step(self) -> None:
        return None

    def snapshot(self) -> Snapshot:
        k = self.kvm
        out = []
        for i in range(len(k)):
            cpu = k.vcpu(i)
            out.append(
                VcpuSnapshot(
                    k.get_lapic(i), k.get_msr(i, APIC_BASE_MSR), cpu.nmi_pending, cpu.nmi_count
                )
            )
        return tuple(out)


# =============================================================================================
# Expansion and execution
# =============================================================================================
def expand(op: Op, model: Vm) -> list[Primitive]:
    """The primitives ``op`` stands for, given the model's current state (``Op.expand``)."""
    out: list[Primitive] = []
    for prim in op.expand(model):
        if not isinstance(prim, PRIMITIVE_TYPES):
            raise AssertionError(f"{op} expanded to {prim}, not a guest access or host ioctl")
        out.append(prim)
    return out


def window(side: Side, i: int) -> int:
    """vCPU ``i``'s APIC window: IA32_APIC_BASE & ~0xFFF (KVMB-7, as in the model)."""
    return ops.window(side.vm, i)


def perform(side: Side, prim: Primitive) -> Outcome:
    """Carry out one primitive on one backend (``Op.perform`` on its host API)."""
    if isinstance(prim, GUEST_PRIMITIVES):
        side.before_guest_access(prim.vcpu)
    return outcome(partial(prim.perform, HostOnly(side.vm)))


@dataclass(frozen=True, slots=True)
class Executed:
    """One primitive as run: ``skipped`` by an exclusion, or both outcomes and snapshots."""

    number: int
    op: Op
    prim: Primitive
    skipped: Exclusion | None = None
    unread: Exclusion | None = None
    """An exclusion under which the value of the outcome is not compared."""
    reference: Outcome = ("ok", 0)
    subject: Outcome = ("ok", 0)
    reference_state: Snapshot = ()
    subject_state: Snapshot = ()


@dataclass(slots=True)
class Trace:
    steps: list[Executed] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)

    @property
    def mismatch(self) -> Executed | None:
        return self.steps[-1] if self.differences else None

    @property
    def performed(self) -> int:
        return sum(1 for s in self.steps if s.skipped is None)


def run(program: Program, reference: ModelSide, subject: Side, *, stop: bool = True) -> Trace:
    """Run ``program`` on both sides in lockstep; stop at the first difference (unless not
    ``stop``: then ``differences`` are those of the last step, for exploring by hand)."""
    trace = Trace()
    number = 0
    buffers = [ReadBuffer() for _ in range(len(reference.model))]
    taken = [0] * len(reference.model)  # the subject's NMIs taken by each vCPU's guest so far
    stale_ppr: set[int] = set()  # vCPUs whose PPR KVM_SET_LAPIC left stale in the model
    for op in program.steps:
        for prim in expand(op, reference.model):
            number += 1
            rule = excluded_by(prim)
            if rule is not None:
                raise AssertionError(f"{op} expanded to {prim}, excluded by {rule.key}")
            skip = sends_init_to_itself(prim, reference.model)
            if skip is None and not isinstance(prim, Msi):
                skip = skipped_at_run_time(prim, window(subject, prim.vcpu), subject.ram_size)
            if skip is not None:
                trace.steps.append(Executed(number, op, prim, skip))
                continue
            kind = read_kind(prim, reference.model) if isinstance(prim, MmioRead) else ""
            ref_out = perform(reference, prim)
            sub_out = perform(subject, prim)
            reference.after_step()
            subject.after_step()
            ref_state = reference.snapshot()
            sub_state = subject.snapshot()
            unread = None
            nmis = [snap.nmi_taken - before for snap, before in zip(sub_state, taken, strict=True)]
            taken = [snap.nmi_taken for snap in sub_state]
            for i, n in enumerate(nmis):
                if n:  # the NMI handler's reads (nmi-handler-reads); for a read, at its entry
                    buffers[i].forget()
            if isinstance(prim, MmioRead):
                unread = buffers[prim.vcpu].read(prim.size, kind, ref_out, sub_out)
                if nmis[prim.vcpu] > 1:  # a second NMI may have come after the read
                    buffers[prim.vcpu].forget()
            step = Executed(number, op, prim, None, unread, ref_out, sub_out, ref_state, sub_state)
            trace.steps.append(step)
            stale_ppr = {
                i
                for i in stale_ppr
                if word(ref_state[i].image, PPR) != fresh_ppr(ref_state[i].image)
            }
            trace.differences = compare(step, reference.name, subject.name, stale_ppr)
            if isinstance(prim, SetLapic) and ref_out == ("ok", 0):
                stale_ppr.add(prim.vcpu)  # compared exactly right after the call, not since
            if trace.differences and stop:
                return trace
    return trace


@dataclass(slots=True)
class ReadBuffer:
    """KVM's emulator buffer for one vCPU as KVM behaves (KVMB-4, byte-wise): 8 bytes, and
    which of them are known (a fresh vCPU's are 0; the guest's NMI handler makes them
    unknown)."""

    data: bytearray = field(default_factory=lambda: bytearray(8))
    known: int = 0xFF

    def forget(self) -> None:
        self.known = 0

    def read(self, size: int, kind: str, model: Outcome, kvm: Outcome) -> Exclusion | None:
        """Account for one MMIO read of ``size`` bytes (``kind``: ``exclusions.read_kind``);
        return the exclusion under which its value is not compared, if any."""
        mask = (1 << size) - 1
        if kind != "unserviced":
            if kvm[0] == "ok":
                self.data[:size] = kvm[1].to_bytes(size, "little")
                self.known |= mask
            return None
        if self.known & mask != mask:
            return BY_KEY["nmi-handler-reads"]
        predicted = ("ok", int.from_bytes(self.data[:size], "little"))
        if kvm == predicted and model != predicted and model[0] == "ok":
            return BY_KEY["read-buffer-bytes"]
        return None


# =============================================================================================
# Comparison
# =============================================================================================
def word(image: bytes, offset: int) -> int:
    return int.from_bytes(image[offset : offset + 4], "little")


def word_name(offset: int) -> str:
    reg = REGISTER_BY_OFFSET.get(offset & ~0xF)
    if reg is None:
        return f"{offset:#05x}"
    return f"{offset:#05x} {reg.name}" + ("" if offset & 0xF == 0 else f"+{offset & 0xF}")


def _vset(vs: frozenset[int]) -> str:
    return "{" + ",".join(f"{v:#x}" for v in sorted(vs)) + "}"


def fresh_ppr(image: bytes) -> int:
    """PRIO-2: PPR as computed from the TPR and the highest ISR vector of a state image."""
    tpr = word(image, 0x80) & 0xFF
    isr = vectors(image, 0x100)
    isrv = max(isr) if isr else 0
    return tpr if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0


def compare(
    step: Executed, ref: str = "model", sub: str = "kvm", stale_ppr: AbstractSet[int] = frozenset()
) -> list[str]:
    """Lines naming each observable that differs after ``step`` (empty: all equal).  For the
    vCPUs in ``stale_ppr`` the subject's PPR may also be the recomputed one
    (``ppr-after-set-lapic``)."""
    lines: list[str] = []
    same_kind = step.reference[0] == step.subject[0] == "ok"
    if step.reference != step.subject and not (step.unread is not None and same_kind):
        lines.append(f"result: {ref} {step.reference}, {sub} {step.subject}")
    for i, (a, b) in enumerate(zip(step.reference_state, step.subject_state, strict=True)):
        if a == b:
            continue
        if a.apic_base != b.apic_base:
            lines.append(f"cpu{i} APIC_BASE: {ref} {a.apic_base:#x}, {sub} {b.apic_base:#x}")
        for base, name in ((0x100, "ISR"), (0x180, "TMR"), (0x200, "IRR")):
            va, vb = vectors(a.image, base), vectors(b.image, base)
            if va != vb:
                lines.append(f"cpu{i} {name}: {ref} {_vset(va)}, {sub} {_vset(vb)}")
        for off in range(0, STATE_SIZE, 4):
            if off & 0xF == 0 and 0x100 <= off < 0x280:
                continue  # the vector words, shown as sets above
            wa, wb = word(a.image, off), word(b.image, off)
            if off == PPR and i in stale_ppr and wb == fresh_ppr(a.image):
                continue  # ppr-after-set-lapic
            if wa != wb:
                lines.append(f"cpu{i} [{word_name(off)}]: {ref} {wa:#010x}, {sub} {wb:#010x}")
        if a.nmi_pending + a.nmi_taken != b.nmi_pending + b.nmi_taken:
            lines.append(
                f"cpu{i} NMIs pending + taken by the guest: {ref} {a.nmi_pending}+{a.nmi_taken}, "
                f"{sub} {b.nmi_pending}+{b.nmi_taken}"
            )
    return lines
