"""Declarative scenarios: a TOML file of guest and host actions with expected results.

A scenario builds one ``hypervisor.Vm`` (optionally booting a ``guest.Guest`` on it), runs its
steps in order and checks each step's expectations.  ``apicsim run FILE.toml`` is the front end;
``specs/scenarios/README.md`` is the user documentation with examples.  The format, in short::

    name = "xapic-unicast-mmio"                   # required, string
    description = "What the scenario shows."      # required, string
    rules = ["ICR-1", "ICR-2"]                    # required: rule ids it exercises
    backends = ["model", "kvm"]                   # required: ["model"] = model-only

    [vm]                      # optional; every key optional
    vcpus = 4                 # or vcpu_ids = [0, 3, 17] (not both); default 1
    profile = "kvm"           # "kvm" or "sdm"
    profile_changes = { esr_latching = true }     # Profile fields changed from the preset
    x2apic_format = false     # KVM_X2APIC_API_USE_32BIT_IDS
    broadcast_quirk = true    # false = KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK
    vector_hashing = true     # the kvm module parameter
    max_vcpu_ids = 4096
    enforce_pv_cpuid = false
    pv_features = [7, 11, 13]
    aps_started = true
    features = { x2apic = true, tsc_deadline = true, cmci = false }   # lapic.Features
    mode = "xapic"            # set-up: "x2apic" = every vCPU's guest WRMSRs EXTD into APIC_BASE
    svr = 0x1FF               # set-up: every vCPU's guest writes SVR (MMIO or MSR by mode)
    accelerator = "emulated"  # hypervisor.accel.ACCELERATORS; the kvm backend: "emulated" only

    [guest]                   # optional: boots guest.Guest(vm, driver=..., base=...)
    driver = "x2apic_phys"    # flat, physflat, x2apic_phys, x2apic_cluster, kvm_pv
    base = "x2apic_cluster"   # kvm_pv only (default x2apic_phys)
    bits_per_long = 64        # 32 = an i386 guest (PV IPI windows of 64 IDs)

    [[step]]                  # one action per step, executed in file order
    action = "wrmsr"
    vcpu = 0
    msr = 0x830
    value = 0x3_000040F1
    expect = { irr = { "3" = [0xF1] }, exits = 1 }

Actions and their fields (``vcpu``/``cpu`` are vCPU *indexes*, in creation order):

=============  =====================================================  ===============
action         fields (``[...]`` optional, with default)              result
=============  =====================================================  ===============
wrmsr          vcpu, msr, value                                       (none)
rdmsr          vcpu, msr                                              value read
mmio_write     vcpu, offset *or* gpa, value, [size=4]                 (none)
mmio_read      vcpu, offset *or* gpa, [size=4]                        value read
mov_to_cr8     vcpu, value (the guest's ``mov %rax, %cr8``)           (none)
mov_from_cr8   vcpu (the guest's ``mov %cr8, %rax``)                  value read
icr            vcpu, [dest=0], [vector=0], [mode="fixed"],            (none)
               [dest_mode="physical"], [shorthand="none"],
               [level="assert"], [trigger="edge"]
hypercall      vcpu, nr, [a0..a3=0], [long_mode=true], [cpl=0]        RAX
msi            address_lo, [address_hi=0], data, [flags=0]            KVM_SIGNAL_MSI
set_msr        vcpu, msr, value (host-initiated KVM_SET_MSRS)         true if set
get_lapic      vcpu, offset (a dword of the 1 KiB KVM_GET_LAPIC)      value read
set_lapic      vcpu, writes = { "0x20" = 0x05000000, ... }            0 or -errno
set_cr8        vcpu, [cr8] (KVM_GET/SET_SREGS; absent: as read)       CR8 read
run            vcpu                                                   vectors handled
halt           vcpu (HLT; the model only)                             true if it blocked
advance        ns                                                     timers fired
send_ipi       cpu, kind, [cpus], vector   (needs [guest])            (none)
set_tpr        cpu, value                  (needs [guest])            (none)
eoi            cpu                         (needs [guest])            (none)
=============  =====================================================  ===============

``offset`` is relative to the vCPU's current APIC base.  ``icr`` is written through the
sending vCPU's interface: in x2APIC mode one WRMSR 0x830 (dest in bits 63:32), in xAPIC mode an
MMIO write of ICR2 (dest << 24) then ICR.  Enumerated fields take a name or the raw field
value: mode fixed/lowest/smi/remote_read/nmi/init/startup/extint, dest_mode physical/logical,
shorthand none/self/all/allbutself, level assert/deassert, trigger edge/level.  ``send_ipi``
kinds: mask, mask_allbutself (both need ``cpus``: a list or ``"all"``), allbutself, all, self.
``set_lapic`` reads the current image, replaces the given dwords and writes it back.

Expectations (``expect`` table of a step; all optional):

* ``result``: the action's result.  A negative integer also matches a hypercall's RAX
  holding its two's complement (64-bit, or 32-bit with ``long_mode = false``).
* ``fault``: the exception vector the guest access raised (13 = #GP).  A fault that is not
  expected fails the step.
* ``value``: the value read (rdmsr, mmio_read, get_lapic).
* ``exits``: VM exits during the step; ``stats``: deltas of ``vm.stats`` counters during the
  step (``{ hypercalls = 1, irqs_accepted = 3, MSR_WRITE = 1 }``: counter names or exit reasons).
* ``irr``, ``isr``, ``tmr``, ``handled``: after the step, ``{ "1" = [0xF1], "2-3" = [] }`` per
  vCPU (keys: an index, a range ``"a-b"`` or ``"*"``) or a plain list for the step's ``vcpu``
  (or ``expect.vcpu``).  IRR/ISR/TMR compare as sets; ``handled`` is the vCPU's whole list of
  handled vectors, in order.
* ``regs``: register values by mnemonic (``lapic.registers``, plus ``APIC_BASE``), as the
  host sees them: ``{ ID = 0x11, LDR = 0x10002 }`` for the step's vCPU, or per vCPU
  ``{ "1" = { PPR = 0x30 } }``.

Set-up order: the VM is created, ``[vm] mode`` and ``svr`` are applied to every vCPU, then the
guest boots; counters are measured per step, so set-up never shows in ``exits``.

Errors: a malformed file raises :class:`ScenarioError` naming the file, the line and the field
before anything runs.  A failed expectation is reported as a :class:`Failure` naming the file,
the TOML line, the step number and the field; the run stops after the first failing step.
A set-up the model refuses (a guest that cannot boot on this VM) is reported at ``[vm]`` or
``[guest]``.  :func:`run_file` returns 0 (passed, or skipped: the file does not list the
backend), 1 (an expectation failed) or 2 (malformed, unreadable, or the set-up failed).

Backends: :class:`Runner` has one code path over the host/guest API that ``hypervisor.Vm`` and
``apicsim.kvm.KvmVm`` share (:class:`ScenarioVm`); each step is a typed operation of
:mod:`apicsim.ops` that performs itself on a small :class:`Backend` adapter, which supplies
the rest.  :class:`ModelBackend` reads the model's APICs and counters and has ``run``,
``advance`` and the guest; :class:`KvmBackend` reads KVM_GET_LAPIC/KVM_GET_MSRS, has no
counters (``exits``/``stats``/``handled`` verdicts are SKIP) and cannot do ``run``,
``advance`` or guest steps.  :func:`open_backend` builds either from a scenario, raising
:class:`Unsupported` (a skip, with the reason) for what the backend cannot be or do.  Every
checked expectation is a :class:`Verdict` (PASS/FAIL/SKIP); ``apicsim check``
(:mod:`apicsim.check`) prints them.

The package: :mod:`~apicsim.scenario.format` (the parser), :mod:`~apicsim.scenario.expect`
(the expectations, one class each, and the verdicts), :mod:`~apicsim.scenario.backends` (model
and kvm), :mod:`~apicsim.scenario.runner` and :mod:`~apicsim.scenario.render`; this module
re-exports their public names.  The actions are the operations of :mod:`apicsim.ops` (which
also has the macro actions ``reg_write``, ``reg_read``, ``ipi``, ``init_sipi``, ``set_base``,
``restore`` and the host read ``get_msr``).
"""

from __future__ import annotations

from apicsim.ops import (
    DEST_MODES,
    GUEST_ACTIONS,
    IPI_KINDS,
    LEVELS,
    MODES,
    SHORTHANDS,
    TRIGGERS,
    U32,
    U64,
    Unsupported,
)
from apicsim.scenario.backends import (
    Backend,
    KvmBackend,
    ModelBackend,
    ScenarioCpu,
    ScenarioVm,
    apply_setup,
    boot_guest,
    build_vm,
    open_backend,
)
from apicsim.scenario.expect import (
    EXPECT_KEYS,
    STAT_NAMES,
    ApicState,
    Expectation,
    Failure,
    Observed,
    Verdict,
)
from apicsim.scenario.format import (
    ACTIONS,
    BACKENDS,
    DRIVERS,
    RESULT_ACTIONS,
    VALUE_ACTIONS,
    GuestSpec,
    Locator,
    Scenario,
    ScenarioError,
    Step,
    VmSpec,
    load,
)
from apicsim.scenario.render import describe
from apicsim.scenario.runner import Report, Runner, StepOutcome, run_file

__all__ = [
    "ACTIONS",
    "BACKENDS",
    "DEST_MODES",
    "DRIVERS",
    "EXPECT_KEYS",
    "GUEST_ACTIONS",
    "IPI_KINDS",
    "LEVELS",
    "MODES",
    "RESULT_ACTIONS",
    "SHORTHANDS",
    "STAT_NAMES",
    "TRIGGERS",
    "U32",
    "U64",
    "VALUE_ACTIONS",
    "ApicState",
    "Backend",
    "Expectation",
    "Failure",
    "GuestSpec",
    "KvmBackend",
    "Locator",
    "ModelBackend",
    "Observed",
    "Report",
    "Runner",
    "Scenario",
    "ScenarioCpu",
    "ScenarioError",
    "ScenarioVm",
    "Step",
    "StepOutcome",
    "Unsupported",
    "Verdict",
    "VmSpec",
    "apply_setup",
    "boot_guest",
    "build_vm",
    "describe",
    "load",
    "open_backend",
    "run_file",
]
