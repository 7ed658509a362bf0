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
icr            vcpu, [dest=0], [vector=0], [mode="fixed"],            (none)
               [dest_mode="physical"], [shorthand="none"],
               [level="assert"], [trigger="edge"]
hypercall      vcpu, nr, [a0..a3=0], [long_mode=true], [cpl=0]        RAX
msi            address_lo, [address_hi=0], data, [flags=0]            KVM_SIGNAL_MSI
set_msr        vcpu, msr, value (host-initiated KVM_SET_MSRS)         true if set
get_lapic      vcpu, offset (a dword of the 1 KiB KVM_GET_LAPIC)      value read
set_lapic      vcpu, writes = { "0x20" = 0x05000000, ... }            0 or -errno
run            vcpu                                                   vectors handled
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
``apicsim.kvm.KvmVm`` share (:class:`ScenarioVm`); a small :class:`Backend` adapter supplies
the rest.  :class:`ModelBackend` reads the model's APICs and counters and has ``run``,
``advance`` and the guest; :class:`KvmBackend` reads KVM_GET_LAPIC/KVM_GET_MSRS, has no
counters (``exits``/``stats``/``handled`` verdicts are SKIP) and cannot do ``run``,
``advance`` or guest steps.  :func:`open_backend` builds either from a scenario, raising
:class:`Unsupported` (a skip, with the reason) for what the backend cannot be or do.  Every
checked expectation is a :class:`Verdict` (PASS/FAIL/SKIP); ``apicsim check``
(:mod:`apicsim.check`) prints them.
"""

from __future__ import annotations

import re
import textwrap
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from hypervisor import Vm
from hypervisor.exits import ExitReason
from hypervisor.trace import Stats
from lapic.apic import Features, LocalApic, StateError
from lapic.faults import ApicTypeError, ApicValueError, GuestFault
from lapic.icr import Icr
from lapic.profile import LowestPriorityPolicy, Profile
from lapic.registers import (
    APIC_BASE_ADDR_MASK,
    APIC_BASE_EN,
    APIC_BASE_EXTD,
    APIC_BASE_MSR,
    REGISTER_BY_NAME,
)

if TYPE_CHECKING:
    from apicsim.kvm import KvmVm, LapicView
    from guest import Guest, GuestCpu

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

BACKENDS = ("model", "kvm")
DRIVERS = ("flat", "physflat", "x2apic_phys", "x2apic_cluster", "kvm_pv")
RULE_ID = re.compile(r"^[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+$")
VCPU_SPEC = re.compile(r"^(?:\*|\d+|\d+-\d+)$")

MODES = ("fixed", "lowest", "smi", "remote_read", "nmi", "init", "startup", "extint")
DEST_MODES = ("physical", "logical")
SHORTHANDS = ("none", "self", "all", "allbutself")
LEVELS = ("deassert", "assert")
TRIGGERS = ("edge", "level")
IPI_KINDS = ("mask", "mask_allbutself", "allbutself", "all", "self")
VECTOR_EXPECTS = ("irr", "isr", "tmr", "handled")
STAT_NAMES = tuple(n for n in Stats.__slots__ if n != "exits_by_reason")


# =========================================================================================
# Errors and locations
# =========================================================================================
class ScenarioError(Exception):
    """The file is not a valid scenario (syntax, unknown key, wrong type, missing field)."""

    def __init__(self, path: Path, line: int | None, where: str, message: str) -> None:
        self.path = path
        self.line = line
        self.where = where
        self.message = message
        loc = f"{path}:{line}" if line else str(path)
        super().__init__(f"{loc}: {where}: {message}" if where else f"{loc}: {message}")


@dataclass(frozen=True, slots=True)
class Failure:
    """One expectation that did not hold (or a step that raised)."""

    path: Path
    line: int
    step: int
    action: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: step {self.step} ({self.action}): {self.field}: " + (
            self.message
        )


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")


@dataclass(slots=True)
class _Block:
    header: str  # "" for the top level, "vm", "vm.features", "step", "step.expect", ...
    step: int  # 1-based step the block belongs to, 0 outside steps
    first: int  # 1-based line of the header (or 1)
    last: int


class Locator:
    """Finds the TOML line of a key by scanning the text (tomllib keeps no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.blocks: list[_Block] = []
        current = _Block("", 0, 1, len(self.lines))
        step = 0
        for number, line in enumerate(self.lines, start=1):
            m = _HEADER.match(line)
            if m is None:
                continue
            current.last = number - 1
            self.blocks.append(current)
            name = m.group(2).replace('"', "").replace(" ", "")
            if m.group(1) == "[[" and name == "step":
                step += 1
            current = _Block(name, step if name.split(".")[0] == "step" else 0, number, 0)
        current.last = len(self.lines)
        self.blocks.append(current)

    def step_line(self, step: int) -> int:
        for b in self.blocks:
            if b.header == "step" and b.step == step:
                return b.first
        return 1

    def section_line(self, section: str) -> int | None:
        for b in self.blocks:
            if b.header == section and b.step == 0:
                return b.first
        return None

    def find(self, key: str, section: str = "", step: int = 0, after: str | None = None) -> int:
        """Line of ``key = `` in ``section`` (or in step ``step`` and its sub-tables).

        ``after``: look only past the first occurrence of that key (e.g. ``expect``)."""
        pattern = re.compile(r'(?:^|[\s{,.])"?' + re.escape(key) + r'"?\s*=')
        if step:
            blocks = [b for b in self.blocks if b.step == step]
            fallback = self.step_line(step)
        else:
            blocks = [b for b in self.blocks if b.header == section and b.step == 0]
            fallback = blocks[0].first if blocks else 1
            # a dotted section may also be written inline in its parent: [vm] features = {..}
            if "." in section:
                parent = section.rsplit(".", 1)[0]
                blocks += [b for b in self.blocks if b.header == parent and b.step == 0]
        started = after is None
        after_pat = (
            re.compile(r'(?:^|[\s{,.])"?' + re.escape(after) + r'"?\s*[=.]') if after else None
        )
        for b in blocks:
            if after is not None and b.header.endswith("." + after):
                started = True
            for number in range(b.first, b.last + 1):
                text = _strip_comment(self.lines[number - 1])
                if not started and after_pat is not None:
                    m = after_pat.search(text)
                    if m is None:
                        continue
                    started = True
                    text = text[m.end() :]
                if pattern.search(text):
                    return number
        return fallback


def _strip_comment(line: str) -> str:
    out = []
    quote: str | None = None
    for ch in line:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        out.append(ch)
    return "".join(out)


# =========================================================================================
# The parsed scenario
# =========================================================================================
@dataclass(frozen=True, slots=True)
class VmSpec:
    vcpus: int = 1
    vcpu_ids: tuple[int, ...] | None = None
    profile: Profile = field(default_factory=Profile)
    x2apic_format: bool = False
    broadcast_quirk: bool | None = None
    vector_hashing: bool | None = None
    max_vcpu_ids: int = 4096
    enforce_pv_cpuid: bool = False
    pv_features: tuple[int, ...] | None = None
    aps_started: bool = True
    features: Features = field(default_factory=Features)
    mode: str = "xapic"
    svr: int | None = None
    given: frozenset[str] = frozenset()
    """The ``[vm]`` keys the file sets (the rest are defaults)."""
    features_given: frozenset[str] = frozenset()
    """The ``[vm] features`` fields the file sets."""

    @property
    def count(self) -> int:
        return len(self.vcpu_ids) if self.vcpu_ids is not None else self.vcpus


@dataclass(frozen=True, slots=True)
class GuestSpec:
    driver: str
    base: str | None = None
    bits_per_long: int = 64


@dataclass(frozen=True, slots=True)
class Step:
    number: int
    line: int
    action: str
    params: Mapping[str, Any]
    expect: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Scenario:
    path: Path
    name: str
    description: str
    rules: tuple[str, ...]
    backends: tuple[str, ...]
    vm: VmSpec
    guest: GuestSpec | None
    steps: tuple[Step, ...]
    locator: Locator


# =========================================================================================
# Parsing
# =========================================================================================
@dataclass(frozen=True, slots=True)
class _Field:
    kind: str  # int, bool, str, choice, cpus, writes
    required: bool = False
    default: Any = None
    lo: int = 0
    hi: int = U64
    choices: tuple[str, ...] = ()


_VCPU = _Field("int", True, hi=U32)
_MSR = _Field("int", True, hi=U32)
_VALUE = _Field("int", True, hi=U64)
_ARG = _Field("int", False, 0, hi=U64)

ACTIONS: dict[str, dict[str, _Field]] = {
    "wrmsr": {"vcpu": _VCPU, "msr": _MSR, "value": _VALUE},
    "rdmsr": {"vcpu": _VCPU, "msr": _MSR},
    "mmio_write": {
        "vcpu": _VCPU,
        "offset": _Field("int", hi=0xFFF),
        "gpa": _Field("int", hi=(1 << 52) - 1),
        "value": _VALUE,
        "size": _Field("int", False, 4, lo=1, hi=8),
    },
    "mmio_read": {
        "vcpu": _VCPU,
        "offset": _Field("int", hi=0xFFF),
        "gpa": _Field("int", hi=(1 << 52) - 1),
        "size": _Field("int", False, 4, lo=1, hi=8),
    },
    "icr": {
        "vcpu": _VCPU,
        "dest": _Field("int", False, 0, hi=U32),
        "vector": _Field("int", False, 0, hi=0xFF),
        "mode": _Field("choice", False, 0, hi=7, choices=MODES),
        "dest_mode": _Field("choice", False, 0, hi=1, choices=DEST_MODES),
        "shorthand": _Field("choice", False, 0, hi=3, choices=SHORTHANDS),
        "level": _Field("choice", False, 1, hi=1, choices=LEVELS),
        "trigger": _Field("choice", False, 0, hi=1, choices=TRIGGERS),
    },
    "hypercall": {
        "vcpu": _VCPU,
        "nr": _Field("int", True, hi=U64),
        "a0": _ARG,
        "a1": _ARG,
        "a2": _ARG,
        "a3": _ARG,
        "long_mode": _Field("bool", False, True),
        "cpl": _Field("int", False, 0, hi=3),
    },
    "msi": {
        "address_lo": _Field("int", True, hi=U32),
        "address_hi": _Field("int", False, 0, hi=U32),
        "data": _Field("int", True, hi=U32),
        "flags": _Field("int", False, 0, hi=U32),
    },
    "set_msr": {"vcpu": _VCPU, "msr": _MSR, "value": _VALUE},
    "get_lapic": {"vcpu": _VCPU, "offset": _Field("int", True, hi=0x3FC)},
    "set_lapic": {"vcpu": _VCPU, "writes": _Field("writes", True)},
    "run": {"vcpu": _VCPU},
    "advance": {"ns": _Field("int", True, hi=1 << 62)},
    "send_ipi": {
        "cpu": _VCPU,
        "kind": _Field("choice", True, choices=IPI_KINDS, hi=-1),
        "cpus": _Field("cpus"),
        "vector": _Field("int", True, hi=0xFF),
    },
    "set_tpr": {"cpu": _VCPU, "value": _Field("int", True, hi=0xFF)},
    "eoi": {"cpu": _VCPU},
}
GUEST_ACTIONS = frozenset({"send_ipi", "set_tpr", "eoi"})
RESULT_ACTIONS = frozenset(
    {
        "rdmsr",
        "mmio_read",
        "hypercall",
        "msi",
        "set_msr",
        "get_lapic",
        "set_lapic",
        "run",
        "advance",
    }
)
VALUE_ACTIONS = frozenset({"rdmsr", "mmio_read", "get_lapic"})
EXPECT_KEYS = (
    "result",
    "fault",
    "value",
    "exits",
    "stats",
    "irr",
    "isr",
    "tmr",
    "handled",
    "regs",
    "vcpu",
)


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


class _Parser:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.loc = Locator(text)

    # -- error helpers -------------------------------------------------------------------
    def fail(self, section: str, key: str, message: str, step: int = 0) -> ScenarioError:
        if step:
            line = self.loc.find(key, step=step) if key else self.loc.step_line(step)
            where = f"step {step}" + (f", field '{key}'" if key else "")
        else:
            line = self.loc.find(key, section) if key else self.loc.section_line(section) or 1
            prefix = f"[{section}] " if section else ""
            where = f"{prefix}field '{key}'" if key else (f"[{section}]" if section else "")
        return ScenarioError(self.path, line, where, message)

    def fail_expect(self, step: int, key: str, message: str) -> ScenarioError:
        line = self.loc.find(key.split(".")[0], step=step, after="expect")
        return ScenarioError(self.path, line, f"step {step}, field 'expect.{key}'", message)

    # -- scalars -------------------------------------------------------------------------
    @staticmethod
    def _int(value: object, lo: int, hi: int) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, got {_type_name(value)} {value!r}"
        if not lo <= value <= hi:
            return f"must be in [{lo:#x}, {hi:#x}], got {value:#x}"
        return None

    def check_table(
        self, raw: Mapping[str, Any], allowed: Iterable[str], section: str, step: int = 0
    ) -> None:
        allowed = tuple(allowed)
        for key in raw:
            if key not in allowed:
                raise self.fail(section, key, f"unknown key (allowed: {', '.join(allowed)})", step)

    # -- top level ----------------------------------------------------------------------
    def parse(self, data: Mapping[str, Any]) -> Scenario:
        top = ("name", "description", "rules", "backends", "vm", "guest", "step")
        self.check_table(data, top, "")
        name = self.string(data, "name", "")
        description = self.string(data, "description", "")
        rules = self.strings(data, "rules", "", pattern=RULE_ID, what="a rule id like 'ICR-2'")
        backends = self.strings(data, "backends", "", choices=BACKENDS)
        if not backends:
            raise self.fail("", "backends", "must name at least one backend")
        vm_raw = data.get("vm", {})
        if not isinstance(vm_raw, dict):
            raise self.fail("", "vm", f"must be a table, got {_type_name(vm_raw)}")
        vm = self.parse_vm(vm_raw)
        guest: GuestSpec | None = None
        if "guest" in data:
            g = data["guest"]
            if not isinstance(g, dict):
                raise self.fail("", "guest", f"must be a table, got {_type_name(g)}")
            guest = self.parse_guest(g)
        raw_steps = data.get("step", [])
        if not isinstance(raw_steps, list) or not all(isinstance(s, dict) for s in raw_steps):
            raise self.fail("", "step", "must be an array of tables: write [[step]]")
        if not raw_steps:
            raise ScenarioError(self.path, None, "", "no [[step]] in the file")
        steps = tuple(self.parse_step(i, s, vm, guest) for i, s in enumerate(raw_steps, start=1))
        return Scenario(
            self.path,
            name,
            description,
            tuple(rules),
            tuple(backends),
            vm,
            guest,
            steps,
            self.loc,
        )

    def string(self, raw: Mapping[str, Any], key: str, section: str) -> str:
        if key not in raw:
            raise self.fail(section, "", f"missing required field '{key}'")
        value = raw[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(section, key, f"must be a non-empty string, got {value!r}")
        return value

    def strings(
        self,
        raw: Mapping[str, Any],
        key: str,
        section: str,
        *,
        pattern: re.Pattern[str] | None = None,
        choices: Sequence[str] = (),
        what: str = "",
    ) -> list[str]:
        if key not in raw:
            raise self.fail(section, "", f"missing required field '{key}'")
        value = raw[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(section, key, f"must be an array of strings, got {value!r}")
        for v in value:
            if pattern is not None and not pattern.match(v):
                raise self.fail(section, key, f"{v!r} is not {what}")
            if choices and v not in choices:
                raise self.fail(section, key, f"{v!r} is not one of {', '.join(choices)}")
        return list(value)

    # -- [vm] -----------------------------------------------------------------------------
    def parse_vm(self, raw: Mapping[str, Any]) -> VmSpec:
        keys = (
            "vcpus",
            "vcpu_ids",
            "profile",
            "profile_changes",
            "x2apic_format",
            "broadcast_quirk",
            "vector_hashing",
            "max_vcpu_ids",
            "enforce_pv_cpuid",
            "pv_features",
            "aps_started",
            "features",
            "mode",
            "svr",
        )
        self.check_table(raw, keys, "vm")
        kw: dict[str, Any] = {}

        def integer(key: str, lo: int, hi: int) -> None:
            if key in raw:
                err = self._int(raw[key], lo, hi)
                if err:
                    raise self.fail("vm", key, err)
                kw[key] = raw[key]

        def boolean(key: str) -> None:
            if key in raw:
                if not isinstance(raw[key], bool):
                    raise self.fail("vm", key, f"must be true or false, got {raw[key]!r}")
                kw[key] = raw[key]

        if "vcpus" in raw and "vcpu_ids" in raw:
            raise self.fail("vm", "vcpu_ids", "give either 'vcpus' or 'vcpu_ids', not both")
        integer("vcpus", 1, 4096)
        if "vcpu_ids" in raw:
            ids = raw["vcpu_ids"]
            if not isinstance(ids, list) or not ids or any(self._int(v, 0, U32 - 1) for v in ids):
                raise self.fail("vm", "vcpu_ids", f"must be a non-empty array of ids, got {ids!r}")
            if len(set(ids)) != len(ids):
                raise self.fail("vm", "vcpu_ids", "ids must be distinct")
            kw["vcpu_ids"] = tuple(ids)
        integer("max_vcpu_ids", 1, 1 << 32)
        integer("svr", 0, U32)
        for key in (
            "x2apic_format",
            "broadcast_quirk",
            "vector_hashing",
            "enforce_pv_cpuid",
            "aps_started",
        ):
            boolean(key)
        if "pv_features" in raw:
            pv = raw["pv_features"]
            if not isinstance(pv, list) or any(self._int(v, 0, 31) for v in pv):
                raise self.fail("vm", "pv_features", f"must be an array of bit numbers, got {pv!r}")
            kw["pv_features"] = tuple(pv)
        if "mode" in raw:
            if raw["mode"] not in ("xapic", "x2apic"):
                got = raw["mode"]
                raise self.fail("vm", "mode", f'must be "xapic" or "x2apic", got {got!r}')
            kw["mode"] = raw["mode"]
        base = raw.get("profile", "kvm")
        if base not in ("kvm", "sdm"):
            raise self.fail("vm", "profile", f'must be "kvm" or "sdm", got {base!r}')
        profile = Profile.preset(base)
        if "profile_changes" in raw:
            changes = raw["profile_changes"]
            if not isinstance(changes, dict):
                raise self.fail("vm", "profile_changes", "must be a table of Profile fields")
            fixed: dict[str, Any] = {}
            for key, value in changes.items():
                if key == "lowest_priority" and isinstance(value, str):
                    try:
                        value = LowestPriorityPolicy(value)
                    except ValueError:
                        choices = ", ".join(p.value for p in LowestPriorityPolicy)
                        raise self.fail(
                            "vm.profile_changes", key, f"must be one of {choices}"
                        ) from None
                fixed[key] = value
            try:
                profile = profile.replace(**fixed)
            except (ApicValueError, ApicTypeError) as e:
                bad = next((k for k in changes if k in str(e)), "")
                raise self.fail("vm.profile_changes", bad, str(e)) from None
        kw["profile"] = profile
        if "features" in raw:
            feats = raw["features"]
            if not isinstance(feats, dict):
                raise self.fail("vm", "features", "must be a table of lapic.Features fields")
            allowed = Features.__dataclass_fields__
            self.check_table(feats, allowed, "vm.features")
            for key, value in feats.items():
                want = bool if key != "maxphyaddr" else int
                if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                    raise self.fail("vm.features", key, f"must be {want.__name__}, got {value!r}")
            kw["features"] = Features(**feats)
            kw["features_given"] = frozenset(feats)
        kw["given"] = frozenset(raw)
        spec = VmSpec(**kw)
        if spec.vcpu_ids is not None and max(spec.vcpu_ids) >= spec.max_vcpu_ids:
            raise self.fail("vm", "vcpu_ids", "an id is not below max_vcpu_ids")
        return spec

    def parse_guest(self, raw: Mapping[str, Any]) -> GuestSpec:
        self.check_table(raw, ("driver", "base", "bits_per_long"), "guest")
        driver = self.string(raw, "driver", "guest")
        if driver not in DRIVERS:
            raise self.fail("guest", "driver", f"{driver!r} is not one of {', '.join(DRIVERS)}")
        base = raw.get("base")
        if base is not None:
            if driver != "kvm_pv":
                raise self.fail("guest", "base", "only the kvm_pv driver has a base driver")
            if base not in DRIVERS or base == "kvm_pv":
                raise self.fail("guest", "base", f"{base!r} is not a base driver")
        bits = raw.get("bits_per_long", 64)
        if bits not in (32, 64) or isinstance(bits, bool):
            raise self.fail("guest", "bits_per_long", f"must be 32 or 64, got {bits!r}")
        return GuestSpec(driver, base, bits)

    # -- [[step]] -------------------------------------------------------------------------
    def parse_step(
        self, n: int, raw: Mapping[str, Any], vm: VmSpec, guest: GuestSpec | None
    ) -> Step:
        line = self.loc.step_line(n)
        if "action" not in raw:
            raise ScenarioError(self.path, line, f"step {n}", "missing required field 'action'")
        action = raw["action"]
        if action not in ACTIONS:
            raise self.fail(
                "", "action", f"unknown action {action!r} (one of {', '.join(ACTIONS)})", n
            )
        if action in GUEST_ACTIONS and guest is None:
            raise self.fail("", "action", f"action {action!r} needs a [guest] section", n)
        fields = ACTIONS[action]
        self.check_table(raw, ("action", "expect", *fields), "", n)
        params: dict[str, Any] = {}
        for key, f in fields.items():
            if key not in raw:
                if f.required:
                    raise ScenarioError(
                        self.path, line, f"step {n} ({action})", f"missing required field '{key}'"
                    )
                if f.default is not None:
                    params[key] = f.default
                continue
            params[key] = self.parse_field(n, key, f, raw[key], vm.count)
        if action in ("mmio_write", "mmio_read") and ("offset" in params) == ("gpa" in params):
            raise ScenarioError(
                self.path, line, f"step {n} ({action})", "give exactly one of 'offset' or 'gpa'"
            )
        if action == "send_ipi":
            needs = params["kind"] in ("mask", "mask_allbutself")
            if needs and "cpus" not in params:
                raise ScenarioError(
                    self.path, line, f"step {n} (send_ipi)", f"kind {params['kind']!r} needs 'cpus'"
                )
            if not needs and "cpus" in params:
                raise self.fail("", "cpus", f"kind {params['kind']!r} takes no 'cpus'", n)
        expect_raw = raw.get("expect", {})
        if not isinstance(expect_raw, dict):
            raise self.fail("", "expect", f"must be a table, got {_type_name(expect_raw)}", n)
        expect = self.parse_expect(n, action, params, expect_raw, vm.count)
        return Step(n, line, action, params, expect)

    def parse_field(self, n: int, key: str, f: _Field, value: Any, count: int) -> Any:
        if f.kind == "int":
            err = self._int(value, f.lo, f.hi)
            if err:
                raise self.fail("", key, err, n)
            if key in ("vcpu", "cpu") and value >= count:
                raise self.fail("", key, f"vCPU index {value} does not exist ({count} vCPUs)", n)
            return value
        if f.kind == "bool":
            if not isinstance(value, bool):
                raise self.fail("", key, f"must be true or false, got {value!r}", n)
            return value
        if f.kind == "choice":
            if isinstance(value, str) and value in f.choices:
                return value if f.hi < 0 else f.choices.index(value)
            if (
                f.hi >= 0
                and isinstance(value, int)
                and not isinstance(value, bool)
                and 0 <= value <= f.hi
            ):
                return value
            raw_ok = f" or an integer 0..{f.hi}" if f.hi >= 0 else ""
            raise self.fail(
                "", key, f"must be one of {', '.join(f.choices)}{raw_ok}, got {value!r}", n
            )
        if f.kind == "cpus":
            if value == "all":
                return list(range(count))
            if not isinstance(value, list) or any(self._int(v, 0, count - 1) for v in value):
                raise self.fail(
                    "", key, f'must be "all" or an array of vCPU indexes, got {value!r}', n
                )
            return list(value)
        if f.kind == "writes":
            if not isinstance(value, dict) or not value:
                raise self.fail("", key, 'must be a table { "0x20" = value, ... }', n)
            out: dict[int, int] = {}
            for k, v in value.items():
                try:
                    off = int(k, 0)
                except ValueError:
                    raise self.fail("", key, f"offset {k!r} is not an integer", n) from None
                if not 0 <= off <= 0x3FC or off & 3:
                    raise self.fail("", key, f"offset {k!r} is not a dword of the 1 KiB image", n)
                err = self._int(v, 0, U32)
                if err:
                    raise self.fail("", key, f"value at {k}: {err}", n)
                out[off] = v
            return out
        raise AssertionError(f.kind)  # pragma: no cover

    def parse_expect(
        self, n: int, action: str, params: Mapping[str, Any], raw: Mapping[str, Any], count: int
    ) -> dict[str, Any]:
        for key in raw:
            if key not in EXPECT_KEYS:
                raise self.fail_expect(
                    n, key, f"unknown expectation (allowed: {', '.join(EXPECT_KEYS)})"
                )
        out: dict[str, Any] = {}
        default_vcpu = raw.get("vcpu", params.get("vcpu", params.get("cpu")))
        if "vcpu" in raw:
            err = self._int(raw["vcpu"], 0, count - 1)
            if err:
                raise self.fail_expect(n, "vcpu", err)
        if "result" in raw:
            if action not in RESULT_ACTIONS:
                raise self.fail_expect(n, "result", f"action {action!r} has no result")
            value = raw["result"]
            want: type = list if action == "run" else bool if action == "set_msr" else int
            ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
            if ok and want is list:
                ok = not any(self._int(v, 0, 255) for v in value)
            if not ok:
                raise self.fail_expect(
                    n, "result", f"must be {_kind_word(want)} for {action}, got {value!r}"
                )
            out["result"] = value
        if "value" in raw:
            if action not in VALUE_ACTIONS:
                raise self.fail_expect(n, "value", f"action {action!r} reads no value")
            err = self._int(raw["value"], 0, U64)
            if err:
                raise self.fail_expect(n, "value", err)
            out["value"] = raw["value"]
        for key in ("fault", "exits"):
            if key in raw:
                err = self._int(raw[key], 0, 255 if key == "fault" else U32)
                if err:
                    raise self.fail_expect(n, key, err)
                out[key] = raw[key]
        if "stats" in raw:
            st = raw["stats"]
            if not isinstance(st, dict):
                raise self.fail_expect(n, "stats", "must be a table { counter = delta }")
            names = (*STAT_NAMES, *ExitReason.__members__)
            for k, v in st.items():
                if k not in names:
                    raise self.fail_expect(
                        n, f"stats.{k}", f"unknown counter (one of {', '.join(names)})"
                    )
                err = self._int(v, 0, U32)
                if err:
                    raise self.fail_expect(n, f"stats.{k}", err)
            out["stats"] = dict(st)
        for key in VECTOR_EXPECTS:
            if key in raw:
                out[key] = self.per_vcpu(n, key, raw[key], default_vcpu, count, self._vectors)
        if "regs" in raw:
            out["regs"] = self.per_vcpu(n, "regs", raw["regs"], default_vcpu, count, self._regs)
        return out

    def _vectors(self, value: Any) -> str | None:
        if not isinstance(value, list) or any(self._int(v, 0, 255) for v in value):
            return f"must be an array of vectors 0..255, got {value!r}"
        return None

    def _regs(self, value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be a table {{ NAME = value }}, got {value!r}"
        for k, v in value.items():
            if k != "APIC_BASE" and k not in REGISTER_BY_NAME:
                return f"{k!r} is not a register mnemonic (lapic.registers, or APIC_BASE)"
            err = self._int(v, 0, U64)
            if err:
                return f"{k}: {err}"
        return None

    def per_vcpu(
        self,
        n: int,
        key: str,
        value: Any,
        default_vcpu: Any,
        count: int,
        check: Callable[[Any], str | None],
    ) -> dict[int, Any]:
        """``{vcpu index: expected}`` from a per-vCPU table or a value for the step's vCPU."""
        per_vcpu_form = (
            isinstance(value, dict)
            and all(VCPU_SPEC.match(k) for k in value)
            and (bool(value) or key != "regs")
        )
        if not per_vcpu_form:
            if not isinstance(default_vcpu, int):
                raise self.fail_expect(
                    n, key, 'the step has no vcpu: write { "1" = ... } or add expect.vcpu'
                )
            err = check(value)
            if err:
                raise self.fail_expect(n, key, err)
            return {default_vcpu: value}
        out: dict[int, Any] = {}
        for spec, v in value.items():
            indexes = _vcpu_range(spec, count)
            if indexes is None:
                raise self.fail_expect(n, key, f"vCPU {spec!r} does not exist ({count} vCPUs)")
            err = check(v)
            if err:
                raise self.fail_expect(n, f"{key}.{spec}", err)
            for i in indexes:
                out[i] = v
        return out


def _kind_word(t: type) -> str:
    return {list: "an array of vectors", bool: "true or false", int: "an integer"}[t]


def _vcpu_range(spec: str, count: int) -> range | None:
    if spec == "*":
        return range(count)
    if "-" in spec:
        a, b = (int(x) for x in spec.split("-"))
        return range(a, b + 1) if a <= b < count else None
    i = int(spec)
    return range(i, i + 1) if i < count else None


def load(path: str | Path) -> Scenario:
    """Parse and validate one scenario file; raises :class:`ScenarioError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError(p, None, "", f"cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise ScenarioError(
            p, int(m.group(1)) if m else None, "", f"TOML syntax error: {e}"
        ) from None
    return _Parser(p, text).parse(data)


# =========================================================================================
# Running
# =========================================================================================
_NO_RESULT = object()


class Unsupported(Exception):
    """The backend cannot do what the scenario asks (a set-up option or a step): the scenario
    is skipped from that point, with this reason."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """One expectation after a step: ``PASS``, ``FAIL`` or ``SKIP`` (not observable on the
    backend, or not meaningful after a fault), with what was expected and what was seen."""

    path: Path
    line: int
    step: int
    action: str
    field: str
    """``expect.irr``, ``expect.regs.PPR``, ``expect.stats.ipis``, ... or ``action``."""
    status: str
    detail: str
    vcpu: int | None = None
    vcpu_first: int | None = None
    """Set when the verdict stands for vCPUs ``vcpu_first`` to ``vcpu`` (same detail)."""

    def __str__(self) -> str:
        who = "" if self.vcpu is None else f" vCPU {self.vcpu}"
        if self.vcpu_first is not None:
            who = f" vCPUs {self.vcpu_first}-{self.vcpu}"
        return (
            f"{self.status} {self.path}:{self.line}: step {self.step} ({self.action}): "
            f"{self.field}{who}: {self.detail}"
        )


@dataclass(slots=True)
class StepOutcome:
    step: Step
    result: Any = _NO_RESULT
    value: int | None = None
    fault: int | None = None
    exits: int | None = 0
    """VM exits during the step; None where the backend does not count them."""
    changes: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    skipped: str | None = None
    """Why the backend could not perform the step (the scenario is skipped from here)."""


@dataclass(slots=True)
class Report:
    scenario: Scenario
    outcomes: list[StepOutcome] = field(default_factory=list)
    skipped: str | None = None
    """Why the scenario (or its remaining steps) did not run on the backend."""
    backend: str = "model"

    @property
    def failures(self) -> list[Failure]:
        return [f for o in self.outcomes for f in o.failures]

    @property
    def verdicts(self) -> list[Verdict]:
        return [v for o in self.outcomes for v in o.verdicts]

    @property
    def passed(self) -> bool:
        return not self.failures


def build_vm(spec: VmSpec) -> Vm:
    kw: dict[str, Any] = {}
    if spec.pv_features is not None:
        kw["pv_features"] = spec.pv_features
    vm = Vm(
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
        **kw,
    )
    apply_setup(vm, spec)
    return vm


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


def _x2apic(apic_base: int) -> bool:
    return apic_base & (APIC_BASE_EN | APIC_BASE_EXTD) == APIC_BASE_EN | APIC_BASE_EXTD


def boot_guest(vm: Vm, spec: GuestSpec) -> Guest:
    from guest import Guest

    return Guest(vm, driver=spec.driver, base=spec.base, bits_per_long=spec.bits_per_long)


# -- the backend adapter ------------------------------------------------------------------
class ScenarioCpu(Protocol):
    """What a step has a vCPU execute: ``hypervisor.Vcpu`` and ``apicsim.kvm.KvmVcpu``."""

    def mmio_read(self, gpa: int, size: int = 4) -> int: ...

    def mmio_write(self, gpa: int, value: int, size: int = 4) -> None: ...

    def rdmsr(self, msr: int) -> int: ...

    def wrmsr(self, msr: int, value: int) -> None: ...

    def hypercall(
        self,
        nr: int,
        a0: int = 0,
        a1: int = 0,
        a2: int = 0,
        a3: int = 0,
        *,
        long_mode: bool = True,
        cpl: int = 0,
    ) -> int: ...


class ScenarioVm(Protocol):
    """The host API a scenario uses: ``hypervisor.Vm`` and ``apicsim.kvm.KvmVm``."""

    def __len__(self) -> int: ...

    def vcpu(self, i: int) -> ScenarioCpu: ...

    def get_lapic(self, i: int) -> bytes: ...

    def set_lapic(self, i: int, data: bytes) -> None: ...

    def get_msr(self, i: int, msr: int) -> int: ...

    def set_msr(self, i: int, msr: int, value: int) -> bool: ...

    def signal_msi(
        self, address_lo: int, address_hi: int = 0, data: int = 0, flags: int = 0
    ) -> int: ...


@dataclass(frozen=True, slots=True)
class ApicState:
    """One vCPU's APIC as the host sees it after a step."""

    irr: frozenset[int]
    isr: frozenset[int]
    tmr: frozenset[int]
    register: Callable[[str], int]
    """A register by mnemonic (``lapic.registers``, or ``APIC_BASE``)."""


class Backend:
    """What the runner needs beyond :class:`ScenarioVm`: the APIC state, the counters, and
    the steps only some backends can do.  The runner itself has one code path."""

    name = ""

    def __init__(self, vm: ScenarioVm) -> None:
        self.vm = vm

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

    def run_vcpu(self, i: int) -> list[int]:
        raise Unsupported(f"{self.name}: no 'run'")

    def advance(self, ns: int) -> int:
        raise Unsupported(f"{self.name}: no virtual clock")

    def guest_cpu(self, i: int) -> GuestCpu:
        raise Unsupported(f"{self.name}: no Python guest")

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
    preset = Profile.preset("kvm")
    changed = [
        f.name
        for f in fields(Profile)
        if f.name != "name" and getattr(spec.profile, f.name) != getattr(preset, f.name)
    ]
    if changed:
        return f"profile_changes ({', '.join(changed)}) describe a KVM that is not this one"
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
    }
}


def _snapshot(backend: Backend) -> list[tuple[frozenset[int], frozenset[int]]]:
    out = []
    for i in range(len(backend.vm)):
        s = backend.state(i)
        out.append((s.irr, s.isr))
    return out


def _vset(vectors: Iterable[int]) -> str:
    return "{" + ",".join(f"{v:#x}" for v in sorted(vectors)) + "}"


def _counters(stats: Stats) -> dict[str, int]:
    out = {name: int(getattr(stats, name)) for name in STAT_NAMES}
    out["exits"] = stats.exits
    for reason in ExitReason:
        out[reason.name] = stats.exits_by_reason[reason]
    return out


class Runner:
    """Executes one parsed scenario on one backend (the model unless ``backend`` is given)."""

    def __init__(
        self,
        scenario: Scenario,
        vm: Vm | None = None,
        guest: Guest | None = None,
        *,
        backend: Backend | None = None,
    ) -> None:
        self.sc = scenario
        if backend is None:
            if vm is None:
                vm = build_vm(scenario.vm)
            if guest is None and scenario.guest is not None:
                guest = boot_guest(vm, scenario.guest)
            backend = ModelBackend(vm, guest)
        self.backend = backend
        self.vm = backend.vm
        self.guest = backend.guest if isinstance(backend, ModelBackend) else None

    def handled(self, i: int) -> list[int] | None:
        return self.backend.handled(i)

    # -- actions ------------------------------------------------------------------------
    def act(self, step: Step) -> tuple[Any, int | None]:
        """Perform the action: ``(result, value read)``."""
        p = step.params
        vm = self.vm
        be = self.backend
        a = step.action
        if a in ("wrmsr", "rdmsr", "mmio_write", "mmio_read", "icr", "hypercall"):
            vcpu = vm.vcpu(p["vcpu"])
            if a == "wrmsr":
                vcpu.wrmsr(p["msr"], p["value"])
                return _NO_RESULT, None
            if a == "rdmsr":
                v = vcpu.rdmsr(p["msr"])
                return v, v
            apic_base = vm.get_msr(p["vcpu"], APIC_BASE_MSR)
            if a in ("mmio_write", "mmio_read"):
                gpa = p["gpa"] if "gpa" in p else (apic_base & APIC_BASE_ADDR_MASK) + p["offset"]
                if a == "mmio_write":
                    vcpu.mmio_write(gpa, p["value"], p["size"])
                    return _NO_RESULT, None
                v = vcpu.mmio_read(gpa, p["size"])
                return v, v
            if a == "icr":
                low = (
                    p["vector"]
                    | p["mode"] << 8
                    | p["dest_mode"] << 11
                    | p["level"] << 14
                    | p["trigger"] << 15
                    | p["shorthand"] << 18
                )
                if _x2apic(apic_base):
                    vcpu.wrmsr(0x830, p["dest"] << 32 | low)
                else:
                    if p["dest"] > 0xFF:
                        raise ApicValueError(
                            f"dest={p['dest']:#x} does not fit the 8-bit xAPIC destination"
                        )
                    base = apic_base & APIC_BASE_ADDR_MASK
                    vcpu.mmio_write(base + 0x310, p["dest"] << 24)
                    vcpu.mmio_write(base + 0x300, low)
                return _NO_RESULT, None
            r = vcpu.hypercall(
                p["nr"],
                p["a0"],
                p["a1"],
                p["a2"],
                p["a3"],
                long_mode=p["long_mode"],
                cpl=p["cpl"],
            )
            return r, None
        if a == "msi":
            return vm.signal_msi(p["address_lo"], p["address_hi"], p["data"], p["flags"]), None
        if a == "set_msr":
            return vm.set_msr(p["vcpu"], p["msr"], p["value"]), None
        if a == "get_lapic":
            off = p["offset"]
            v = int.from_bytes(vm.get_lapic(p["vcpu"])[off : off + 4], "little")
            return v, v
        if a == "set_lapic":
            image = bytearray(vm.get_lapic(p["vcpu"]))
            for off, v in p["writes"].items():
                image[off : off + 4] = v.to_bytes(4, "little")
            try:
                vm.set_lapic(p["vcpu"], bytes(image))
            except StateError as e:
                return -e.errno, None
            return 0, None
        if a == "run":
            return be.run_vcpu(p["vcpu"]), None
        if a == "advance":
            return be.advance(p["ns"]), None
        cpu = be.guest_cpu(p["cpu"])
        if a == "send_ipi":
            kind, vector = p["kind"], p["vector"]
            if kind == "mask":
                cpu.send_IPI_mask(p["cpus"], vector)
            elif kind == "mask_allbutself":
                cpu.send_IPI_mask_allbutself(p["cpus"], vector)
            elif kind == "allbutself":
                cpu.send_IPI_allbutself(vector)
            elif kind == "all":
                cpu.send_IPI_all(vector)
            else:
                cpu.send_IPI_self(vector)
        elif a == "set_tpr":
            cpu.set_tpr(p["value"])
        else:
            cpu.eoi()
        return _NO_RESULT, None

    # -- one step -------------------------------------------------------------------------
    def run_step(self, step: Step) -> StepOutcome:
        be = self.backend
        out = StepOutcome(step)
        before = _snapshot(be)
        counters = be.counters()
        try:
            out.result, out.value = self.act(step)
        except GuestFault as e:
            out.fault = e.vector
            fault_text = str(e)
        except (Unsupported, NotImplementedError) as e:
            out.skipped = str(e) or type(e).__name__
            return out
        except (ApicValueError, ApicTypeError) as e:
            who = "the model" if be.name == "model" else f"the {be.name} backend"
            self.fail_action(step, out, f"{who} refused it: {e}")
            return out
        except (OSError, RuntimeError) as e:  # KvmError, TimeoutError, an ioctl's errno
            self.fail_action(step, out, f"the {be.name} backend failed: {e}")
            return out
        else:
            fault_text = ""
        after = _snapshot(be)
        now = be.counters()
        delta = None
        if now is not None and counters is not None:
            delta = {k: now[k] - counters[k] for k in now}
            out.exits = delta["exits"]
        else:
            out.exits = None
        for i, (old, new) in enumerate(zip(before, after, strict=True)):
            if old != new:
                out.changes.append(f"cpu{i} IRR={_vset(new[0])} ISR={_vset(new[1])}")
        self.check(step, out, fault_text, delta)
        return out

    def line_of(self, step: Step, key: str) -> int:
        """The TOML line of ``key`` (``expect.irr``, ``expect.regs.PPR``) in ``step``."""
        if key == "action":
            return step.line
        parts = key.removeprefix("expect.").split(".")
        return self.sc.locator.find(parts[-1], step=step.number, after="expect")

    def failure(self, step: Step, key: str, message: str) -> Failure:
        return Failure(
            self.sc.path, self.line_of(step, key), step.number, step.action, key, message
        )

    def fail_action(self, step: Step, out: StepOutcome, message: str) -> None:
        out.failures.append(self.failure(step, "action", message))
        out.verdicts.append(
            Verdict(self.sc.path, step.line, step.number, step.action, "action", "FAIL", message)
        )

    def check(
        self, step: Step, out: StepOutcome, fault_text: str, delta: dict[str, int] | None
    ) -> None:
        """Check ``step``'s expectations: a :class:`Verdict` for each, a :class:`Failure` for
        each that did not hold."""
        e = step.expect
        path = self.sc.path
        unobservable = _UNOBSERVABLE.get(self.backend.name, {})

        def verdict(
            key: str, ok: bool | None, detail: str, message: str = "", vcpu: int | None = None
        ) -> None:
            status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
            line = self.line_of(step, key)
            out.verdicts.append(
                Verdict(path, line, step.number, step.action, key, status, detail, vcpu)
            )
            if ok is False:
                out.failures.append(
                    Failure(path, line, step.number, step.action, key, message or detail)
                )

        def compared(want: str, got: str) -> str:
            return f"expected {want}, got {got}"

        if "fault" in e:
            want_f = f"#{_fault_name(e['fault'])}"
            if out.fault is None:
                verdict(
                    "expect.fault",
                    False,
                    compared(want_f, "no fault"),
                    f"no fault was raised, expected #{_fault_name(e['fault'])}",
                )
            elif out.fault != e["fault"]:
                verdict(
                    "expect.fault",
                    False,
                    compared(want_f, f"#{_fault_name(out.fault)}"),
                    f"raised {fault_text}, expected vector {e['fault']}",
                )
            else:
                verdict("expect.fault", True, compared(want_f, want_f))
        elif out.fault is not None:
            self.fail_action(step, out, f"unexpected {fault_text}")
        for key in ("result", "value"):
            if key not in e:
                continue
            want = e[key]
            got = out.result if key == "result" else out.value
            if out.fault is not None:
                verdict(f"expect.{key}", None, f"expected {_fmt(want)}; the access faulted")
                continue
            ok = _result_matches(step, want, got) if key == "result" else got == want
            verb = "got" if key == "result" else "read"
            verdict(
                f"expect.{key}",
                ok,
                compared(_fmt(want), _fmt(got)),
                f"{verb} {_fmt(got)}, expected {_fmt(want)}",
            )
        if "exits" in e:
            if out.exits is None:
                verdict("expect.exits", None, f"expected {e['exits']}; {unobservable['exits']}")
            else:
                verdict(
                    "expect.exits",
                    out.exits == e["exits"],
                    compared(str(e["exits"]), str(out.exits)),
                    f"{out.exits} VM exits during the step, expected {e['exits']}",
                )
        for name, want in e.get("stats", {}).items():
            key = f"expect.stats.{name}"
            if delta is None:
                verdict(key, None, f"expected +{want}; {unobservable['stats']}")
            else:
                verdict(
                    key,
                    delta[name] == want,
                    compared(f"+{want}", f"+{delta[name]}"),
                    f"changed by {delta[name]}, expected {want}",
                )
        states: dict[int, ApicState] = {}

        def state(i: int) -> ApicState:
            if i not in states:
                states[i] = self.backend.state(i)
            return states[i]

        for key in ("irr", "isr", "tmr"):
            for i, want in sorted(e.get(key, {}).items()):
                got_set = getattr(state(i), key)
                got_text, want_text = _vset(got_set), _vset(want)
                verdict(
                    f"expect.{key}",
                    set(got_set) == set(want),
                    compared(want_text, got_text),
                    f"vCPU {i} {key.upper()} is {got_text}, expected {want_text}",
                    i,
                )
        for i, want in sorted(e.get("handled", {}).items()):
            got_list = self.handled(i)
            if got_list is None:
                verdict(
                    "expect.handled",
                    None,
                    f"expected {_vlist(want)}; {unobservable['handled']}",
                    vcpu=i,
                )
                continue
            verdict(
                "expect.handled",
                got_list == list(want),
                compared(_vlist(want), _vlist(got_list)),
                f"vCPU {i} handled {_vlist(got_list)}, expected {_vlist(want)}",
                i,
            )
        for i, regs in sorted(e.get("regs", {}).items()):
            for name, want in regs.items():
                got = state(i).register(name)
                verdict(
                    f"expect.regs.{name}",
                    got == want,
                    compared(f"{want:#x}", f"{got:#x}"),
                    f"vCPU {i} {name} is {got:#x}, expected {want:#x}",
                    i,
                )

    def run(self, out: TextIO | None = None, *, verbose: bool = True) -> Report:
        report = Report(self.sc, backend=self.backend.name)
        if verbose and out is not None:
            _header(self.sc, len(self.vm), out, self.backend.name)
        for step in self.sc.steps:
            why = self.backend.unsupported(step)
            if why is not None:
                report.skipped = f"step {step.number} ({step.action}, line {step.line}): {why}"
                break
            outcome = self.run_step(step)
            if outcome.skipped is not None:
                report.skipped = (
                    f"step {step.number} ({step.action}, line {step.line}): {outcome.skipped}"
                )
                break
            report.outcomes.append(outcome)
            if verbose and out is not None:
                _row(outcome, out)
            if outcome.failures:
                break
        return report


def _register(apic: LocalApic, name: str) -> int:
    if name == "APIC_BASE":
        return apic.apic_base
    return apic.register(name)


def _fault_name(vector: int) -> str:
    return {13: "GP", 6: "UD"}.get(vector, str(vector))


def _result_matches(step: Step, want: Any, got: Any) -> bool:
    if isinstance(want, (bool, list)):
        return bool(want == got)
    if not isinstance(got, int) or isinstance(got, bool):
        return False
    if want == got:
        return True
    if step.action == "hypercall" and want < 0:
        mask = U64 if step.params["long_mode"] else U32
        return bool((want & mask) == got)
    return False


def _fmt(value: Any) -> str:
    if value is _NO_RESULT or value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return _vlist(value)
    if isinstance(value, int):
        if value >= 1 << 63:
            return str(value - (1 << 64))
        if -10 < value < 10 or value < 0:
            return str(value)
        if value > U32:
            return f"{value:#018x}"
        return f"{value:#010x}" if value > 0xFFFF else f"{value:#x}"
    return repr(value)


def _vlist(vectors: Iterable[int]) -> str:
    return "[" + ",".join(f"{v:#x}" for v in vectors) + "]"


def describe(step: Step) -> str:
    """A one-line rendering of a step's action."""
    p = step.params
    a = step.action
    if a in ("wrmsr", "set_msr"):
        return f"{a} cpu{p['vcpu']} {p['msr']:#x} = {p['value']:#x}"
    if a == "rdmsr":
        return f"rdmsr cpu{p['vcpu']} {p['msr']:#x}"
    if a in ("mmio_write", "mmio_read"):
        where = f"+{p['offset']:#05x}" if "offset" in p else f"{p['gpa']:#x}"
        size = "" if p["size"] == 4 else f" /{p['size']}"
        val = f" = {p['value']:#x}" if a == "mmio_write" else ""
        return f"{a} cpu{p['vcpu']} {where}{val}{size}"
    if a == "icr":
        icr = Icr.decode(
            p["vector"]
            | p["mode"] << 8
            | p["dest_mode"] << 11
            | p["level"] << 14
            | p["trigger"] << 15
            | p["shorthand"] << 18,
            x2apic=True,
        )
        sh = "" if not p["shorthand"] else f" {SHORTHANDS[p['shorthand']]}"
        dm = "log" if p["dest_mode"] else "phys"
        return f"icr cpu{p['vcpu']} -> {p['dest']:#x} {dm} {MODES[p['mode']]} {icr.vector:#04x}{sh}"
    if a == "hypercall":
        args = ",".join(f"{p[k]:#x}" for k in ("a0", "a1", "a2", "a3"))
        mode = "" if p["long_mode"] else " 32-bit"
        cpl = "" if not p["cpl"] else f" cpl{p['cpl']}"
        return f"hypercall cpu{p['vcpu']} nr={p['nr']} ({args}){mode}{cpl}"
    if a == "msi":
        hi = f" hi={p['address_hi']:#x}" if p["address_hi"] else ""
        return f"msi addr={p['address_lo']:#x}{hi} data={p['data']:#x}"
    if a == "get_lapic":
        return f"get_lapic cpu{p['vcpu']} [{p['offset']:#05x}]"
    if a == "set_lapic":
        w = ",".join(f"{k:#x}={v:#x}" for k, v in p["writes"].items())
        return f"set_lapic cpu{p['vcpu']} {{{w}}}"
    if a == "run":
        return f"run cpu{p['vcpu']}"
    if a == "advance":
        return f"advance {p['ns']} ns"
    if a == "send_ipi":
        cpus = p.get("cpus")
        target = "" if cpus is None else f" cpus={_short_list(cpus)}"
        return f"send_ipi cpu{p['cpu']} {p['kind']}{target} {p['vector']:#04x}"
    if a == "set_tpr":
        return f"set_tpr cpu{p['cpu']} {p['value']:#x}"
    return f"eoi cpu{p['cpu']}"


def _short_list(xs: Sequence[int]) -> str:
    if len(xs) > 6 and list(xs) == list(range(xs[0], xs[0] + len(xs))):
        return f"{xs[0]}..{xs[-1]}"
    return "[" + ",".join(str(x) for x in xs) + "]"


def _header(sc: Scenario, vcpus: int, out: TextIO, backend: str = "model") -> None:
    guest = ""
    if sc.guest is not None:
        guest = f", guest {sc.guest.driver}" + (f" on {sc.guest.base}" if sc.guest.base else "")
    out.write(f"== {sc.name}  ({sc.path})\n")
    desc = textwrap.fill(
        " ".join(sc.description.split()), width=100, initial_indent="   ", subsequent_indent="   "
    )
    out.write(desc + "\n")
    out.write(
        f"   rules: {', '.join(sc.rules)}; backends: {', '.join(sc.backends)}; "
        f"vm: {vcpus} vCPUs, profile {sc.vm.profile.name}{guest}; running on {backend}\n"
    )
    out.write(f"   {'step':>4} {'line':>4}  {'action':<46} {'result':<14} {'exits':>5}  changes\n")


def _row(o: StepOutcome, out: TextIO) -> None:
    result = f"#{_fault_name(o.fault)}" if o.fault is not None else _fmt(o.result)
    changes = o.changes
    if len(changes) > 4:
        changes = [*changes[:3], f"... {len(changes) - 3} more vCPUs changed"]
    text = "; ".join(changes)
    mark = "  FAIL" if o.failures else ""
    exits = "-" if o.exits is None else str(o.exits)
    out.write(
        f"   {o.step.number:>4} {o.step.line:>4}  {describe(o.step):<46} {result:<14} "
        f"{exits:>5}  {text}{mark}\n"
    )


def run_file(
    path: str | Path, out: TextIO, err: TextIO, *, backend: str = "model", verbose: bool = True
) -> int:
    """Load and run one scenario file; 0 = passed (or skipped), 1 = failed, 2 = malformed."""
    try:
        sc = load(path)
    except ScenarioError as e:
        out.flush()
        err.write(f"ERROR {e}\n")
        return 2
    if backend not in sc.backends:
        out.write(f"SKIP {sc.name} ({sc.path}): not a {backend!r} scenario\n")
        return 0
    section = "vm"
    try:
        vm = build_vm(sc.vm)
        section = "guest"
        guest = boot_guest(vm, sc.guest) if sc.guest is not None else None
    except (ApicValueError, ApicTypeError, GuestFault) as e:
        out.flush()
        line = sc.locator.section_line(section) or 1
        err.write(f"ERROR {sc.path}:{line}: [{section}]: the set-up failed: {e}\n")
        return 2
    runner = Runner(sc, vm, guest)
    report = runner.run(out, verbose=verbose)
    if report.skipped is not None and not report.failures:
        out.write(f"SKIP {sc.name} ({sc.path}): {report.skipped}\n")
        return 0
    if report.failures:
        out.flush()
        for f in report.failures:
            err.write(f"FAIL {f}\n")
        out.write(f"FAIL {sc.name}\n")
        return 1
    n = sum(len(s.expect) for s in sc.steps)
    out.write(f"PASS {sc.name}: {len(sc.steps)} steps, {n} expectations\n")
    return 0
