"""The scenario backends: the model (``hypervisor.Vm``) and the host's KVM (``KvmVm``).

The runner (:mod:`apicsim.scenario.runner`) has one code path over the host/guest API that both
VMs share; the operations of :mod:`apicsim.ops` perform themselves on a :class:`Backend`, the
small adapter that adds what differs: the APIC state as the host sees it, the counters, and the
steps only the model has (``run``, ``advance``, the Python guest).  :func:`open_backend` builds
either from a scenario, raising :class:`Unsupported` (a skip, with the reason) for what the
backend cannot be or do.  On kvm the state comes from KVM_GET_LAPIC and KVM_GET_MSRS
(``specs/kvm_backend.md``); the counters are not observable there.  Not here: the checks
(:mod:`apicsim.scenario.expect`) and the order of the steps (the runner).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from apicsim.ops import (
    APIC_BASE_MSR,
    HostOnly,
    HypercallCpu,
    OpVm,
    Unsupported,
    x2apic_mode,
)
from apicsim.scenario.expect import STAT_NAMES, ApicState
from apicsim.scenario.format import BACKENDS, GuestSpec, Scenario, Step, VmSpec
from hypervisor import Vm
from hypervisor.accelerators import config_for
from hypervisor.config import AccelConfig, VmConfig
from hypervisor.exits import ExitReason
from hypervisor.trace import Stats
from lapic.apic import Features, LocalApic
from lapic.faults import ApicValueError
from lapic.profile import Profile
from lapic.registers import APIC_BASE_ADDR_MASK, APIC_BASE_EN, APIC_BASE_EXTD, REGISTER_BY_NAME

if TYPE_CHECKING:
    from apicsim.kvm import KvmVm, LapicView
    from guest import Guest, GuestCpu

ScenarioCpu = HypercallCpu
"""What a step has a vCPU execute: ``hypervisor.Vcpu`` and ``apicsim.kvm.KvmVcpu``."""
ScenarioVm = OpVm
"""The host API a scenario uses: ``hypervisor.Vm`` and ``apicsim.kvm.KvmVm``."""


def build_vm(spec: VmSpec) -> Vm:
    """The model VM of ``[vm]``, with ``kvm_options``, ``mode`` and ``svr`` applied."""
    kw: dict[str, Any] = {}
    if spec.pv_features is not None:
        kw["pv_features"] = spec.pv_features
    config = VmConfig.build(
        spec.vcpus,
        spec.profile,
        x2apic_format=spec.x2apic_format,
        broadcast_quirk=spec.broadcast_quirk,
        vector_hashing=spec.vector_hashing,
        vcpu_ids=spec.vcpu_ids,
        max_vcpu_ids=spec.max_vcpu_ids,
        features=spec.features,
        enforce_pv_cpuid=spec.enforce_pv_cpuid,
        aps_started=spec.aps_started,
        accelerator=_accelerator(spec),
        **kw,
    )
    if spec.kvm_options:
        config = config.replace(kvm=config.kvm.replace(**dict(spec.kvm_options)))
    vm = Vm(config)
    apply_setup(vm, spec)
    return vm


def _accelerator(spec: VmSpec) -> str | AccelConfig:
    """``[vm] accelerator`` with its ``accelerator_options`` applied to the config record."""
    if not spec.accelerator_options:
        return spec.accelerator
    default = config_for(spec.accelerator)
    assert isinstance(default, AccelConfig)
    changed: AccelConfig = replace(default, **dict(spec.accelerator_options))
    return changed


def apply_setup(vm: ScenarioVm, spec: VmSpec) -> None:
    """``[vm] mode`` and ``svr``: every vCPU's guest writes APIC_BASE.EXTD, then SVR (by MSR
    in x2APIC mode, else by MMIO), through the shared guest interface of either backend."""
    for i in range(len(vm)):
        vcpu = vm.vcpu(i)
        base = vm.get_msr(i, APIC_BASE_MSR)
        if spec.mode == "x2apic" and not _x2apic(base):
            vcpu.wrmsr(APIC_BASE_MSR, base | APIC_BASE_EN | APIC_BASE_EXTD)
            base = vm.get_msr(i, APIC_BASE_MSR)
        if spec.svr is not None:
            if _x2apic(base):
                vcpu.wrmsr(0x80F, spec.svr)
            else:
                vcpu.mmio_write((base & APIC_BASE_ADDR_MASK) + 0xF0, spec.svr)


_x2apic = x2apic_mode


def boot_guest(vm: Vm, spec: GuestSpec) -> Guest:
    """``guest.Guest`` booted on every vCPU of ``vm`` as ``[guest]`` says."""
    from guest import Guest

    return Guest(vm, driver=spec.driver, base=spec.base, bits_per_long=spec.bits_per_long)


class Backend(HostOnly):
    """What the runner needs beyond :class:`ScenarioVm`: the APIC state, the counters, and
    the steps only some backends can do (an :class:`apicsim.ops.OpBackend`: the operations
    perform themselves on it).  The runner itself has one code path."""

    name = ""

    def state(self, i: int) -> ApicState:
        raise NotImplementedError

    def counters(self) -> dict[str, int] | None:
        """``exits``, ``vm.stats`` counters and exit reasons; None: not observable."""
        return None

    def handled(self, i: int) -> list[int] | None:
        """The vectors vCPU ``i``'s guest has handled; None: not observable."""
        return None

    def unsupported(self, step: Step) -> str | None:
        """Why this backend cannot perform ``step`` (checked before the scenario runs)."""
        return None

    def accel(self) -> Any:
        """The model's accelerator state (``vm.accel``: PIDs, the notification log), or None
        where the backend has none."""
        return None

    def close(self) -> None:
        """Release the backend's resources (KVM file descriptors)."""


class ModelBackend(Backend):
    """``hypervisor.Vm``, optionally with a booted ``guest.Guest``."""

    name = "model"

    def __init__(self, vm: Vm, guest: Guest | None = None) -> None:
        super().__init__(vm)
        self.model = vm
        self.guest = guest

    def state(self, i: int) -> ApicState:
        apic = self.model.lapic(i)
        return ApicState(
            frozenset(apic.irr),
            frozenset(apic.isr),
            frozenset(apic.tmr),
            lambda name: _register(apic, name),
        )

    def counters(self) -> dict[str, int]:
        return _counters(self.model.stats)

    def accel(self) -> Any:
        return self.model.accel

    def handled(self, i: int) -> list[int]:
        if self.guest is not None:
            return list(self.guest.cpu(i).handled)
        return list(self.model.vcpu(i).handled)

    def run_vcpu(self, i: int) -> list[int]:
        if self.guest is not None:
            return list(self.guest.cpu(i).run())
        return list(self.model.vcpu(i).run())

    def advance(self, ns: int) -> int:
        return self.model.advance(ns)

    def guest_cpu(self, i: int) -> GuestCpu:
        if self.guest is None:  # pragma: no cover - the parser requires [guest]
            raise Unsupported("the step needs a [guest] section")
        return self.guest.cpu(i)


_KVM_NO_GUEST = (
    "the Python guest stub (guest.Guest) runs on the model only; KvmVm's guest executes one "
    "access at a time"
)
_KVM_CANNOT = {
    "run": "KvmVm has no 'run': its guest runs with RFLAGS.IF=0 and no interrupt handlers of "
    "its own, so it cannot acknowledge and EOI interrupts as the model's VM entry does",
    "advance": "the virtual clock is the model's; KVM's APIC timer runs on host time",
    "halt": "KvmVm's guest executes one access at a time with RFLAGS.IF=0: a HLT there would "
    "never be woken",
    "set_if": "KvmVm's guest executes one access at a time with RFLAGS.IF=0; its IF is not "
    "the scenario's to set",
    "set_eoi_exit_bitmap": "the EOI-exit bitmap is the model's APICv accelerators' (KvmVm's "
    "APIC is whatever the host's KVM uses)",
    "send_ipi": _KVM_NO_GUEST,
    "set_tpr": _KVM_NO_GUEST,
    "eoi": _KVM_NO_GUEST,
}


class KvmBackend(Backend):
    """``apicsim.kvm.KvmVm``: the host's KVM.  Counters and handled vectors are not
    observable; the APIC state comes from KVM_GET_LAPIC and KVM_GET_MSRS."""

    name = "kvm"

    def __init__(self, vm: KvmVm) -> None:
        super().__init__(vm)
        self.kvm = vm

    def state(self, i: int) -> ApicState:
        view = self.kvm.lapic_view(i)
        x2apic_id = self.kvm.vcpu(i).vcpu_id
        x2apic_format = self.kvm.x2apic_format

        def register(name: str) -> int:
            return _image_register(view, name, x2apic_id, x2apic_format=x2apic_format)

        return ApicState(view.irr, view.isr, view.tmr, register)

    def unsupported(self, step: Step) -> str | None:
        return _KVM_CANNOT.get(step.action)


def _image_register(view: LapicView, name: str, x2apic_id: int, *, x2apic_format: bool) -> int:
    """A register as ``LocalApic.register`` shows it, from a KVM_GET_LAPIC image.

    The image is KVM's (``kvm_apic_get_state``): ICR's high dword is at ICR2 (0x310) in both
    modes; in x2APIC mode without USE_32BIT_IDS the ID word holds ``id << 24``, so the
    32-bit x2APIC ID (the vcpu_id, KVM ``kvm_apic_set_x2apic_id``) is given instead."""
    if name == "APIC_BASE":
        return view.apic_base
    if name == "ICR":
        return view.register(0x300) | view.register(0x310) << 32
    if name == "ID" and _x2apic(view.apic_base) and not x2apic_format:
        return x2apic_id
    return view.register(REGISTER_BY_NAME[name].offset)


def _kvm_refusal(spec: VmSpec) -> str | None:
    """Why a real KVM cannot be the VM ``spec`` describes (before anything is created)."""
    base = spec.profile.name.split("+")[0]
    if base != "kvm":
        return f"profile {base!r} is the model's reading of the SDM; a real KVM is the kvm profile"
    if spec.accelerator != "emulated":
        return (
            f"accelerator {spec.accelerator!r} is the model's; KvmVm's APIC is whatever the "
            "host's KVM uses (the scenario runs there only with accelerator = \"emulated\")"
        )
    preset = Profile.preset("kvm")
    changed = [
        f.name
        for f in fields(Profile)
        if f.name != "name" and getattr(spec.profile, f.name) != getattr(preset, f.name)
    ]
    if changed:
        return f"profile_changes ({', '.join(changed)}) describe a KVM that is not this one"
    if spec.kvm_options:
        names = ", ".join(name for name, _ in spec.kvm_options)
        return f"kvm_options ({names}) describe a KVM that is not this one"
    if spec.enforce_pv_cpuid or spec.pv_features is not None:
        return "KvmVm gives the guest KVM's supported PV CPUID; it does not enforce it"
    if not spec.aps_started:
        return "KvmVm makes every vCPU runnable (aps_started = false is the model's)"
    if "vector_hashing" in spec.given:
        from apicsim.kvm import host_vector_hashing

        host = host_vector_hashing()
        if host is None:
            return "the host's kvm.vector_hashing parameter cannot be read"
        if host != spec.vector_hashing:
            want = spec.vector_hashing
            return f"the host's kvm.vector_hashing is {host}; the scenario needs {want}"
    if "features" in spec.given:
        from apicsim.kvm import guest_features

        host_features = guest_features()
        for f in fields(Features):
            if f.name in spec.features_given:
                want, have = getattr(spec.features, f.name), getattr(host_features, f.name)
                if want != have:
                    return (
                        f"the scenario needs features.{f.name} = {want!r}; this host's guest "
                        f"CPUID gives {have!r}"
                    )
    return None


def open_backend(sc: Scenario, backend: str) -> Backend:
    """A fresh VM of ``backend`` for ``sc``, set up as its ``[vm]``/``[guest]`` say.

    Raises :class:`Unsupported` when the backend cannot be that VM or cannot perform one of
    the steps (a skip), ``ApicValueError``/``ApicTypeError``/``GuestFault`` when the set-up
    fails."""
    if backend == "model":
        vm = build_vm(sc.vm)
        guest = boot_guest(vm, sc.guest) if sc.guest is not None else None
        return ModelBackend(vm, guest)
    if backend != "kvm":
        raise ApicValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if sc.guest is not None:
        raise Unsupported(f"[guest]: {_KVM_NO_GUEST}")
    for step in sc.steps:
        why = _KVM_CANNOT.get(step.action)
        if why is not None:
            raise Unsupported(f"step {step.number} ({step.action}, line {step.line}): {why}")
    why = _kvm_refusal(sc.vm)
    if why is not None:
        raise Unsupported(f"[vm]: {why}")
    from apicsim.kvm import KvmVm, kvm_available

    ok, reason = kvm_available()
    if not ok:
        raise Unsupported(f"KVM backend unavailable: {reason}")
    spec = sc.vm
    try:
        kvm = KvmVm(
            spec.vcpus,
            x2apic_format=spec.x2apic_format,
            broadcast_quirk=True if spec.broadcast_quirk is None else spec.broadcast_quirk,
            vcpu_ids=spec.vcpu_ids,
        )
    except ApicValueError as e:  # more vCPUs or higher ids than this host's KVM allows
        raise Unsupported(f"[vm]: {e}") from None
    try:
        if "max_vcpu_ids" in spec.given and spec.max_vcpu_ids != kvm.limits.max_vcpu_id:
            raise Unsupported(
                f"[vm]: max_vcpu_ids = {spec.max_vcpu_ids}; KVM_CAP_MAX_VCPU_ID on this host "
                f"is {kvm.limits.max_vcpu_id} and KvmVm does not change it"
            )
        apply_setup(kvm, spec)
    except BaseException:
        kvm.close()
        raise
    return KvmBackend(kvm)


_UNOBSERVABLE = {
    "kvm": {
        "exits": "not observable on kvm: KvmVm does not count VM exits (KVM handles them)",
        "stats": "not observable on kvm: the vm.stats counters are the model's",
        "handled": "not observable on kvm: KvmVm's guest runs no interrupt handlers",
        "accel": "not observable on kvm: PIDs and notifications are the model's accelerator's",
    }
}



def _count(value: object) -> int:
    """A counter's value; a counter kept by key (``notifications``, by vector) as its total."""
    if isinstance(value, Mapping):
        return sum(int(n) for n in value.values())
    assert isinstance(value, int)
    return value


def _counters(stats: Stats) -> dict[str, int]:
    out = {name: _count(getattr(stats, name)) for name in STAT_NAMES}
    out["exits"] = stats.exits
    for reason in ExitReason:
        out[reason.name] = stats.exits_by_reason[reason]
    return out



def _register(apic: LocalApic, name: str) -> int:
    if name == "APIC_BASE":
        return apic.apic_base
    return apic.register(name)

