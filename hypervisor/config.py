"""A VM's configuration as data: :class:`VmConfig`, the KVM-level options in :class:`KvmOptions`.

``Vm(config)`` and ``Vm(vcpus, profile, **keywords)`` are one code path: the keywords build a
``VmConfig`` (:meth:`VmConfig.build`) and ``vm.config`` gives it back.  Every field is checked
with exact types (no bool for an int, no float for an int, no truthy value for a bool) when the
config is made, before any VM exists; each error names the field.  ``repr(config)`` is valid
Python that rebuilds an equal config with ``VmConfig``, ``KvmOptions``, ``AccelConfig``,
``Profile``, ``Features`` and ``LowestPriorityPolicy`` in scope.

Three layers of choices, each in its own record:

* :class:`lapic.Profile`: what one local APIC does where Linux KVM's ``lapic.c`` and the SDM
  differ;
* :class:`KvmOptions`: what KVM does around the APICs of a VM (the optimized map, the
  broadcast quirk, the lowest-priority policy, the x2APIC API format, PV features): VM
  capabilities (KVM_ENABLE_CAP), module parameters, and measured KVM behaviour of the VM;
* :class:`AccelConfig`: how interrupts reach the guest (``"emulated"`` today; AVIC and APICv
  configurations are subclasses with their own fields).

Not modelled here: KVM's own limits on the host (``apicsim.kvm.HostLimits``), the IOAPIC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypervisor.accelerators import config_for
from hypervisor.pv_ipi import (
    KVM_FEATURE_PV_SCHED_YIELD,
    KVM_FEATURE_PV_SEND_IPI,
    KVM_FEATURE_PV_UNHALT,
)
from lapic.apic import Features
from lapic.faults import (
    ApicTypeError,
    ApicValueError,
    check_bool,
    check_instance,
    check_int,
    check_optional_bool,
)
from lapic.profile import KVM, LowestPriorityPolicy, Profile, resolve
from lapic.slowpath import apply_vector_hashing, reference_defaults

KVM_MAX_VCPU_IDS = 4096
"""KVM_MAX_VCPU_IDS on x86-64 (KVM_CAP_MAX_VCPU_ID's default)."""

DEFAULT_PV_FEATURES = frozenset(
    {KVM_FEATURE_PV_UNHALT, KVM_FEATURE_PV_SEND_IPI, KVM_FEATURE_PV_SCHED_YIELD}
)
"""CPUID 0x40000001 EAX bits advertised by default (PV unhalt, PV send-IPI, PV sched-yield)."""


# ===========================================================================================
# Checkers (exact types, the field's name in every message)
# ===========================================================================================
def check_max_vcpu_ids(value: object) -> int:
    """KVM_CAP_MAX_VCPU_ID for a VM being made: an int in [1, 2**32] (the capability's
    argument), and at most ``KVM_MAX_VCPU_IDS``: KVM's ``kvm_vm_ioctl_enable_cap`` refuses a
    larger one with -EINVAL, which also bounds every vCPU id and so the optimized map's size
    (MAP-5).  A ``VmConfig`` may describe more (another host's KVM); ``Vm`` refuses it."""
    check_int("max_vcpu_ids", value, 1, 1 << 32)
    assert isinstance(value, int)
    if value > KVM_MAX_VCPU_IDS:
        raise ApicValueError(
            f"max_vcpu_ids={value:#x} is above KVM_MAX_VCPU_IDS ({KVM_MAX_VCPU_IDS:#x}): "
            "KVM_ENABLE_CAP(KVM_CAP_MAX_VCPU_ID) fails with EINVAL"
        )
    return value


def _check_fields(record: object, checks: Mapping[str, type[Any]]) -> None:
    for name, kind in checks.items():
        value = getattr(record, name)
        if kind is bool:
            check_bool(name, value)
        elif kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ApicTypeError(f"{name} must be an int, not {type(value).__name__}")
        else:
            check_instance(name, value, kind)


def _replace(record: Any, changes: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(record)}
    for key in changes:
        if key not in names:
            raise ApicValueError(f"{key!r} is not a {type(record).__name__} field")
    return dataclasses.replace(record, **changes)


# ===========================================================================================
# KVM options
# ===========================================================================================
@dataclass(frozen=True, slots=True)
class KvmOptions:
    """KVM's VM-level options and behaviour around the APICs; each field names its source.

    Presets: :data:`KVM_OPTIONS` (Linux KVM's defaults) and :data:`SDM_OPTIONS` (no map, no
    quirk, the SDM's TPR/focus arbitration).  A VM whose options are not given takes the
    preset of its profile's name (:meth:`for_profile`)."""

    x2apic_format: bool = False
    """KVM_X2APIC_API_USE_32BIT_IDS (KVM_CAP_X2APIC_API): MSI address_hi carries destination
    bits 31:8 and the state image holds the 32-bit x2APIC ID (MAP-3, STATE-5)."""

    broadcast_quirk: bool = True
    """DIFF-D9, MATCH-1.  KVM (unless KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK): a non-IPI
    message to 0xFF is a broadcast to x2APIC targets too.  SDM: 0xFF is only the xAPIC
    broadcast (the sdm preset: False)."""

    lowest_priority: LowestPriorityPolicy = LowestPriorityPolicy.VECTOR_HASHING
    """DIFF-D5, LP-1..3.  KVM's module parameter ``vector_hashing`` (default 1) picks
    VECTOR_HASHING, 0 ARB_COUNTER; TPR/PPR are never consulted.  SDM 10.6.2.4: LOWEST_TPR
    (the sdm preset)."""

    optimized_apic_map: bool = True
    """DIFF-D6/D8, FAST-8/9.  KVM first tries its optimized APIC map (``kvm_apic_map``),
    whose answers differ from the architectural rules in documented corners (a logical
    message while every APIC is software-disabled is dropped; aliased xAPIC IDs under
    x2apic_format reach one vCPU; 0 instead of -1 for no target).  The SDM has no such map:
    the sdm preset delivers by the architectural rules only.  The VM also skips the map for a
    profile or policy whose matching or arbitration is not KVM's (the map encodes KVM's)."""

    map_excludes_new_vcpu: bool = True
    """KVMB-8 (measured on Linux 6.18): KVM rebuilds its optimized APIC map while creating a
    vCPU, before that vCPU is online, and marks the map clean; the vCPU created last is
    missing from the map (fast path) until something dirties it (an ID/LDR/DFR write, a
    software-enable or APIC_BASE mode change, KVM_SET_LAPIC, another vCPU).  Only matters with
    ``optimized_apic_map``; the sdm preset: False."""

    tpr_low_bits_survive_exit: bool = True
    """KVMB-11.  Whether TPR bits 3:0 survive a guest exit.  True: VMX with a TPR shadow (the
    virtual-APIC page holds the whole TPR byte; ``vmx/vmx.c``, SDM 30.1.2) and this project's
    host (Linux 6.18, PVM backend: measured by ``apicsim.kvm.host_tpr_low_bits_survive_exit``).
    False: SVM without AVIC, where the guest's TPR lives in the VMCB's 4-bit V_TPR and, after
    every exit while CR8 writes are not intercepted, KVM copies it back into the APIC
    (``svm/svm.c`` ``sync_cr8_to_lapic`` -> ``kvm_set_cr8``: TPR := V_TPR << 4).  KVM
    intercepts CR8 writes while a requested vector's class is not above the TPR's
    (``svm_update_cr8_intercept``, from ``x86.c`` ``update_cr8_intercept``)."""

    enforce_pv_cpuid: bool = False
    """KVM_CAP_ENFORCE_PV_FEATURE_CPUID: a hypercall whose feature bit is not in
    ``pv_features`` fails with -KVM_ENOSYS (HC-4)."""

    pv_features: frozenset[int] = DEFAULT_PV_FEATURES
    """CPUID 0x40000001 EAX: the PV feature bits advertised to the guest (bit numbers)."""

    def __post_init__(self) -> None:
        _check_fields(self, _KVM_OPTION_TYPES)
        if not isinstance(self.pv_features, frozenset):
            # Any iterable of bit numbers is accepted and stored as a frozenset.
            features = self.pv_features
            if isinstance(features, (str, bytes)) or not isinstance(features, Iterable):
                raise ApicTypeError(
                    f"pv_features must be an iterable of ints, not {type(features).__name__}"
                )
            object.__setattr__(self, "pv_features", frozenset(features))
        for bit in self.pv_features:
            check_int("pv_features", bit, 0, 31)

    @property
    def vector_hashing(self) -> bool:
        """KVM's ``vector_hashing`` module parameter as this policy implies it."""
        return self.lowest_priority is LowestPriorityPolicy.VECTOR_HASHING

    @staticmethod
    def for_profile(profile: Profile) -> KvmOptions:
        """The options a VM takes when none are given: the preset named like the preset the
        profile was built from (``"sdm"``, ``"sdm+custom"`` -> :data:`SDM_OPTIONS`; anything
        else -> :data:`KVM_OPTIONS`).  The broadcast quirk and the lowest-priority policy come
        from ``lapic.slowpath.reference_defaults``, the one table the reference bus reads."""
        quirk, policy = reference_defaults(profile)
        base = SDM_OPTIONS if policy is LowestPriorityPolicy.LOWEST_TPR else KVM_OPTIONS
        return base.replace(broadcast_quirk=quirk, lowest_priority=policy)

    def replace(self, **changes: Any) -> KvmOptions:
        """A copy with ``changes`` (field names only), checked like a new record."""
        result: KvmOptions = _replace(self, changes)
        return result

    def __repr__(self) -> str:
        """Valid Python: ``KvmOptions(...)`` with the fields that differ from the defaults."""
        default = KVM_OPTIONS if "KVM_OPTIONS" in globals() else self
        args = [
            f"{f.name}={_repr_value(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return f"KvmOptions({', '.join(args)})"


_KVM_OPTION_TYPES: dict[str, type[Any]] = {
    "x2apic_format": bool,
    "broadcast_quirk": bool,
    "lowest_priority": LowestPriorityPolicy,
    "optimized_apic_map": bool,
    "map_excludes_new_vcpu": bool,
    "tpr_low_bits_survive_exit": bool,
    "enforce_pv_cpuid": bool,
}


def _repr_value(value: object) -> str:
    if isinstance(value, frozenset):
        return f"frozenset({sorted(value)!r})"
    return repr(value)


KVM_OPTIONS = KvmOptions()
"""Linux KVM's defaults."""
SDM_OPTIONS = KvmOptions(
    broadcast_quirk=False,
    lowest_priority=LowestPriorityPolicy.LOWEST_TPR,
    optimized_apic_map=False,
    map_excludes_new_vcpu=False,
)
"""What the sdm profile used to carry: no optimized map, no broadcast quirk, TPR/focus
arbitration (SDM 10.6.2.4), every vCPU reachable."""


# ===========================================================================================
# Accelerator configuration
# ===========================================================================================
@dataclass(frozen=True, slots=True)
class AccelConfig:
    """How interrupts reach the guest; ``name`` is a key of
    ``hypervisor.accelerators.ACCELERATORS`` (checked when the VM is made).  Accelerators with
    settings of their own (AVIC, APICv) subclass this record and add fields."""

    name: str = "emulated"

    @property
    def icr_split(self) -> bool:
        """Where the x2APIC ICR's high half lives in the APIC page, a vendor fact passed to
        each ``LocalApic(icr_split=...)``: False = one 64-bit ICR at 0x300 (Intel: SDM
        10.12.9, VMX's virtual-APIC page; also KVM's in-kernel page without AVIC), True = split
        into 0x300/0x310 as AMD x2AVIC's backing page holds it (APM Vol. 2, 15.29.3;
        ``kvm_lapic_state`` then keeps ICR2 at 0x310).  Accelerators whose hardware reads the
        page override this."""
        return False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ApicTypeError(f"accelerator must be a str, not {type(self.name).__name__}")


# ===========================================================================================
# The VM configuration
# ===========================================================================================
@dataclass(frozen=True, slots=True)
class VmConfig:
    """Everything a ``hypervisor.Vm`` is made from."""

    vcpu_ids: tuple[int, ...] = (0,)
    """The ids of the vCPUs created with the VM, in creation order (KVM_CREATE_VCPU)."""
    profile: Profile = KVM
    """The one-APIC choices (``lapic.Profile``)."""
    kvm: KvmOptions = field(default=KVM_OPTIONS)
    """KVM's VM-level options (:class:`KvmOptions`)."""
    features: Features = field(default_factory=Features)
    """What the virtual CPUs advertise (CPUID/MSR features)."""
    accelerator: AccelConfig = field(default_factory=AccelConfig)
    """How interrupts reach the guest (:class:`AccelConfig`)."""
    bsp_vcpu_id: int = 0
    """KVM_SET_BOOT_CPU_ID: the vCPU whose APIC_BASE has BSP set."""
    max_vcpu_ids: int = KVM_MAX_VCPU_IDS
    """KVM_CAP_MAX_VCPU_ID: vCPU ids are below this."""
    aps_started: bool = True
    """False: application processors wait for INIT-SIPI-SIPI, as on a real boot."""
    exit_log: int = 4096
    """How many recent exits ``vm.exits`` keeps (0: none)."""
    trace: bool = False
    """Record tracepoint-like events (``vm.tracer``)."""

    def __post_init__(self) -> None:
        ids = self.vcpu_ids
        if isinstance(ids, (str, bytes, int)) or not isinstance(ids, Sequence):
            raise ApicTypeError(f"vcpu_ids must be a sequence of ints, not {type(ids).__name__}")
        if not isinstance(ids, tuple):
            object.__setattr__(self, "vcpu_ids", tuple(ids))
        _check_fields(self, _VM_CONFIG_TYPES)
        check_int("max_vcpu_ids", self.max_vcpu_ids, 1, 1 << 32)
        check_int("bsp_vcpu_id", self.bsp_vcpu_id, 0, (1 << 32) - 1)
        check_int("exit_log", self.exit_log, 0, 1 << 32)
        seen: set[int] = set()
        for vid in self.vcpu_ids:
            check_int("vcpu_id", vid, 0, self.max_vcpu_ids - 1)
            if vid in seen:
                raise ApicValueError(f"vcpu_id={vid} already exists")
            seen.add(vid)
        if not self.vcpu_ids:
            raise ApicValueError("vcpu_ids must name at least one vCPU")

    @staticmethod
    def build(
        vcpus: int = 1,
        profile: str | Profile = "kvm",
        *,
        x2apic_format: bool = False,
        broadcast_quirk: bool | None = None,
        vector_hashing: bool | None = None,
        vcpu_ids: Sequence[int] | None = None,
        max_vcpu_ids: int = KVM_MAX_VCPU_IDS,
        bsp_vcpu_id: int = 0,
        features: Features | None = None,
        accelerator: str | AccelConfig = "emulated",
        enforce_pv_cpuid: bool = False,
        pv_features: Iterable[int] = DEFAULT_PV_FEATURES,
        aps_started: bool = True,
        exit_log: int = 4096,
        trace: bool = False,
    ) -> VmConfig:
        """The config of ``Vm(vcpus, profile, **keywords)`` (``hypervisor.Vm``'s keywords).

        The KVM options start from :meth:`KvmOptions.for_profile`; ``broadcast_quirk`` and
        ``vector_hashing`` (None: the preset's) and the other option keywords change them."""
        prof = resolve(profile)
        check_bool("x2apic_format", x2apic_format)
        check_bool("enforce_pv_cpuid", enforce_pv_cpuid)
        check_bool("aps_started", aps_started)
        check_bool("trace", trace)
        check_optional_bool("broadcast_quirk", broadcast_quirk)
        check_max_vcpu_ids(max_vcpu_ids)
        if vcpu_ids is None:
            check_int("vcpus", vcpus, 1, max_vcpu_ids)
            vcpu_ids = range(vcpus)
        elif isinstance(vcpu_ids, (str, bytes)) or not isinstance(vcpu_ids, Sequence):
            raise ApicTypeError(
                f"vcpu_ids must be a sequence of ints, not {type(vcpu_ids).__name__}"
            )
        if isinstance(pv_features, (str, bytes)) or not isinstance(pv_features, Iterable):
            raise ApicTypeError(
                f"pv_features must be an iterable of ints, not {type(pv_features).__name__}"
            )
        pv_features = tuple(pv_features)
        for bit in pv_features:
            check_int("pv_features", bit, 0, 31)
        check_int("bsp_vcpu_id", bsp_vcpu_id, 0, max_vcpu_ids - 1)
        if bsp_vcpu_id and bsp_vcpu_id not in vcpu_ids:
            # KVM_SET_BOOT_CPU_ID accepts any id below max_vcpu_ids (a BSP hotplugged later);
            # a BSP chosen with the VM's own vCPUs must be one of them.
            raise ApicValueError(
                f"bsp_vcpu_id={bsp_vcpu_id} is not one of the VM's vcpu_ids: "
                "the VM would have no BSP"
            )
        base = KvmOptions.for_profile(prof)
        options = base.replace(
            x2apic_format=x2apic_format,
            broadcast_quirk=base.broadcast_quirk if broadcast_quirk is None else broadcast_quirk,
            lowest_priority=policy_for(base.lowest_priority, vector_hashing, prof.name),
            enforce_pv_cpuid=enforce_pv_cpuid,
            pv_features=frozenset(pv_features),
        )
        if isinstance(accelerator, str):
            default = config_for(accelerator)
            accelerator = default if isinstance(default, AccelConfig) else AccelConfig(accelerator)
        return VmConfig(
            vcpu_ids=tuple(vcpu_ids),
            profile=prof,
            kvm=options,
            features=Features() if features is None else features,
            accelerator=accelerator,
            bsp_vcpu_id=bsp_vcpu_id,
            max_vcpu_ids=max_vcpu_ids,
            aps_started=aps_started,
            exit_log=exit_log,
            trace=trace,
        )

    def replace(self, **changes: Any) -> VmConfig:
        """A copy with ``changes`` (field names only), checked like a new config."""
        result: VmConfig = _replace(self, changes)
        return result


_VM_CONFIG_TYPES: dict[str, type[Any]] = {
    "profile": Profile,
    "kvm": KvmOptions,
    "features": Features,
    "accelerator": AccelConfig,
    "bsp_vcpu_id": int,
    "max_vcpu_ids": int,
    "aps_started": bool,
    "exit_log": int,
    "trace": bool,
}


def policy_for(
    policy: LowestPriorityPolicy, vector_hashing: bool | None, profile_name: str
) -> LowestPriorityPolicy:
    """``policy`` changed by KVM's ``vector_hashing`` module parameter (None: unchanged)."""
    return apply_vector_hashing(policy, vector_hashing, profile_name)
