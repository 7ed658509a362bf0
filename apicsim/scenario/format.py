"""The scenario file format: parsing and validating a TOML scenario into a :class:`Scenario`.

Reads the format ``specs/scenarios/README.md`` documents (header, ``[vm]``, ``[guest]``,
``[[step]]`` with ``expect``) with ``tomllib``, checks every key, type, range and vCPU index
before anything runs, and turns each step's action into a typed operation of
:mod:`apicsim.ops` and its ``expect`` table into expectations (:mod:`apicsim.scenario.expect`).
Errors name the file, the TOML line (found by scanning the text: :class:`Locator`, since
``tomllib`` keeps no positions) and the field.  Not here: running a scenario
(:mod:`apicsim.scenario.runner`) and the backends (:mod:`apicsim.scenario.backends`).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apicsim.ops import (
    AS_READ,
    GUEST_ACTIONS,
    OPS,
    U32,
    U64,
    Field,
    Op,
)
from apicsim.scenario.expect import (
    EXPECT_KEYS,
    PID_FIELDS,
    STAT_NAMES,
    Expectation,
    expectations,
)
from hypervisor.accel import ACCELERATORS
from hypervisor.accelerators import config_for
from hypervisor.config import AccelConfig
from hypervisor.exits import ExitReason
from lapic.apic import Features
from lapic.faults import ApicTypeError, ApicValueError
from lapic.profile import LowestPriorityPolicy, Profile
from lapic.registers import REGISTER_BY_NAME

BACKENDS = ("model", "kvm")
DRIVERS = ("flat", "physflat", "x2apic_phys", "x2apic_cluster", "kvm_pv")
RULE_ID = re.compile(r"^[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+$")
VCPU_SPEC = re.compile(r"^(?:\*|\d+|\d+-\d+)$")
VECTOR_EXPECTS = ("irr", "isr", "tmr", "handled")
ACTIONS: dict[str, dict[str, Field]] = {name: cls.FIELDS for name, cls in OPS.items()}
"""Every action and its fields (from the operations of :mod:`apicsim.ops`)."""
RESULT_ACTIONS = frozenset(name for name, cls in OPS.items() if cls.RESULT is not None)
VALUE_ACTIONS = frozenset(name for name, cls in OPS.items() if cls.READS)

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
KVM_OPTION_KEYS = ("lowest_priority", "optimized_apic_map", "map_excludes_new_vcpu")
"""The ``[vm] kvm_options`` keys (the rest of ``KvmOptions`` has ``[vm]`` keys of its own)."""


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
    accelerator: str = "emulated"
    """``hypervisor.accel.ACCELERATORS`` name, passed to ``Vm(accelerator=...)``."""
    kvm_options: tuple[tuple[str, Any], ...] = ()
    """``[vm] kvm_options``: ``hypervisor.config.KvmOptions`` fields changed (name, value)."""
    accelerator_options: tuple[tuple[str, Any], ...] = ()
    """``[vm] accelerator_options``: fields of the accelerator's config record changed
    (``hypervisor.accel.avic.Avic``'s ``x2avic``, ``enable_ipiv``, ``cpu_family``...)."""
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
    """One ``[[step]]``: its number and line, the operation and the expectations (``expect``
    is the validated table, ``expectations`` the checks built from it, in checking order)."""

    number: int
    line: int
    op: Op
    expect: Mapping[str, Any]
    expectations: tuple[Expectation, ...] = ()

    @property
    def action(self) -> str:
        return self.op.ACTION


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
            "accelerator",
            "accelerator_options",
            "kvm_options",
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
        if "accelerator" in raw:
            accel = raw["accelerator"]
            if not isinstance(accel, str) or accel not in ACCELERATORS:
                choices = ", ".join(ACCELERATORS)
                raise self.fail("vm", "accelerator", f"must be one of {choices}, got {accel!r}")
            kw["accelerator"] = accel
        if "accelerator_options" in raw:
            kw["accelerator_options"] = self.parse_accelerator_options(
                raw["accelerator_options"], kw.get("accelerator", "emulated")
            )
        base = raw.get("profile", "kvm")
        if base not in ("kvm", "sdm"):
            raise self.fail("vm", "profile", f'must be "kvm" or "sdm", got {base!r}')
        profile = Profile.preset(base)
        if "profile_changes" in raw:
            changes = raw["profile_changes"]
            if not isinstance(changes, dict):
                raise self.fail("vm", "profile_changes", "must be a table of Profile fields")
            try:
                profile = profile.replace(**changes)
            except (ApicValueError, ApicTypeError) as e:
                bad = next((k for k in changes if k in str(e)), "")
                raise self.fail("vm.profile_changes", bad, str(e)) from None
        if "kvm_options" in raw:
            kw["kvm_options"] = self.parse_kvm_options(raw["kvm_options"])
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

    def parse_accelerator_options(self, raw: object, name: str) -> tuple[tuple[str, Any], ...]:
        """``[vm] accelerator_options``: fields of the accelerator's config record, checked
        by building it."""
        where = "vm.accelerator_options"
        if not isinstance(raw, dict):
            raise self.fail("vm", "accelerator_options", "must be a table of config fields")
        default = config_for(name)
        if not isinstance(default, AccelConfig):
            raise self.fail("vm", "accelerator_options", f"accelerator {name!r} has no options")
        allowed = [f.name for f in dataclasses.fields(default) if f.name != "name"]
        self.check_table(raw, allowed, where)
        try:
            dataclasses.replace(default, **raw)
        except (ApicValueError, ApicTypeError) as e:
            bad = next((k for k in raw if k in str(e)), "")
            raise self.fail(where, bad, str(e)) from None
        return tuple(raw.items())

    def parse_kvm_options(self, raw: object) -> tuple[tuple[str, Any], ...]:
        """``[vm] kvm_options``: the KVM-level knobs of ``hypervisor.config.KvmOptions`` that
        have no ``[vm]`` key of their own (``lowest_priority``, ``optimized_apic_map``,
        ``map_excludes_new_vcpu``)."""
        if not isinstance(raw, dict):
            raise self.fail("vm", "kvm_options", "must be a table of KvmOptions fields")
        self.check_table(raw, KVM_OPTION_KEYS, "vm.kvm_options")
        out: list[tuple[str, Any]] = []
        for key, value in raw.items():
            if key == "lowest_priority":
                try:
                    value = LowestPriorityPolicy(value)
                except ValueError:
                    choices = ", ".join(p.value for p in LowestPriorityPolicy)
                    raise self.fail("vm.kvm_options", key, f"must be one of {choices}") from None
            elif not isinstance(value, bool):
                raise self.fail("vm.kvm_options", key, f"must be true or false, got {value!r}")
            out.append((key, value))
        return tuple(out)

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
        if not isinstance(action, str):
            raise self.fail(
                "", "action", f"action must be a string, got {_type_name(action)}", n
            )
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
        op = OPS[action].from_toml(params)
        expect = self.parse_expect(n, action, params, expect_raw, vm.count)
        return Step(n, line, op, expect, expectations(op, expect))

    def parse_field(self, n: int, key: str, f: Field, value: Any, count: int) -> Any:
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
        if f.kind == "vectors":
            err = self._vectors(value)
            if err:
                raise self.fail("", key, err, n)
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
        if f.kind == "restore":
            if not isinstance(value, dict) or not value:
                raise self.fail("", key, 'must be a table { "0x80" = value or "as read", ... }', n)
            kept: dict[int, int | str] = {}
            for k, v in value.items():
                try:
                    off = int(k, 0)
                except ValueError:
                    raise self.fail("", key, f"offset {k!r} is not an integer", n) from None
                if not 0 <= off <= 0x3FC or off & 3:
                    raise self.fail("", key, f"offset {k!r} is not a dword of the 1 KiB image", n)
                err = None if v == AS_READ else self._int(v, 0, U32)
                if err:
                    raise self.fail("", key, f'value at {k}: {err} or "{AS_READ}"', n)
                kept[off] = v
            return kept
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
            want = OPS[action].RESULT
            assert want is not None
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
        if "pid" in raw:
            out["pid"] = self.per_vcpu(n, "pid", raw["pid"], default_vcpu, count, self._pid)
        if "intr_status" in raw:
            out["intr_status"] = self.per_vcpu(
                n, "intr_status", raw["intr_status"], default_vcpu, count, self._intr_status
            )
        if "notifications" in raw:
            value = raw["notifications"]
            ok = isinstance(value, list) and all(
                isinstance(p, list)
                and len(p) == 2
                and not self._int(p[0], 0, U32)
                and not self._int(p[1], 0, 255)
                for p in value
            )
            if not ok:
                raise self.fail_expect(
                    n,
                    "notifications",
                    f"must be an array of [host APIC ID, vector] pairs, got {value!r}",
                )
            out["notifications"] = [tuple(p) for p in value]
        return out

    def _pid(self, value: Any) -> str | None:
        if not isinstance(value, dict) or not value:
            return f"must be a table {{ {' = ..., '.join(PID_FIELDS)} = ... }}, got {value!r}"
        for k, v in value.items():
            if k not in PID_FIELDS:
                return f"{k!r} is not a PID field (one of {', '.join(PID_FIELDS)})"
            if k == "pir":
                err = self._vectors(v)
            elif k in ("on", "sn"):
                err = None if isinstance(v, bool) else f"must be true or false, got {v!r}"
            else:
                err = self._int(v, 0, 0xFF if k == "nv" else U32)
            if err:
                return f"{k}: {err}"
        return None

    def _intr_status(self, value: Any) -> str | None:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or any(self._int(v, 0, 255) for v in value)
        ):
            return f"must be [RVI, SVI], two vectors 0..255, got {value!r}"
        return None

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
            and (bool(value) or key not in ("regs", "pid"))
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
        raw = p.read_bytes()
    except OSError as e:
        raise ScenarioError(p, None, "", f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ScenarioError(
            p, line, "", f"not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start}"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise ScenarioError(
            p, int(m.group(1)) if m else None, "", f"TOML syntax error: {e}"
        ) from None
    except RecursionError:
        raise ScenarioError(
            p, None, "", "TOML nested too deeply (arrays or inline tables) to parse"
        ) from None
    return _Parser(p, text).parse(data)


