"""Random misuse of the public API and the scenario loader: bad input never crashes and never
half-happens (issue 12).

A session makes a small ``Vm`` (random profile, vCPU count, x2APIC format, maybe a booted
``Guest``) and runs a mix of valid and invalid calls on ``LocalApic``, ``Vm``, ``Vcpu``,
``Guest``/``GuestCpu`` and ``Vm`` construction; another feeds mutated scenario files to the
loader.  Each call may only:

* succeed;
* raise ``GuestFault`` (the guest's exception: the exit is counted, no APIC changed);
* raise ``ApicValueError``/``ApicTypeError`` (misuse) whose message names one of the call's
  arguments, and leave ``vm.snapshot()`` exactly as it was.

The loader may only raise ``ScenarioError``.  The operations come from ``random.Random`` with a
seed Hypothesis draws (derandomized, so CI is deterministic); the ``thorough`` profile runs 20x
the examples.  A long campaign: ``./dev python -m tests.test_fuzz_api --ops 1000000``.

Not covered here: the real-KVM backend (``tests/kvm``) and the CLI's output format
(``tests/apicsim/test_cli_bad_input.py``).
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from apicsim import scenario
from apicsim.scenario import ScenarioError
from guest import Guest
from hypervisor import Vm
from hypervisor.snapshot import VmSnapshot
from lapic.faults import ApicTypeError, ApicValueError, GuestFault
from lapic.icr import DeliveryMode, DestMode, Interrupt, Level, Shorthand, Trigger
from lapic.state import StateError

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "specs" / "scenarios").glob("*.toml"))
OPS_PER_SESSION = 60

_WEIRD: tuple[object, ...] = (
    None, True, False, 4.0, -1, -(2**64), 2**64, 2**32, 0x100, "0", "x", b"\x00", [], [1], {},
    (), object(),
)  # fmt: skip


def _int(rng: random.Random, lo: int, hi: int) -> object:
    """Mostly an int in [lo, hi] (edges often), sometimes anything else."""
    r = rng.random()
    if r < 0.70:
        return rng.choice((lo, hi, rng.randint(lo, hi), rng.randint(lo, hi)))
    if r < 0.85:
        return rng.choice((lo - 1, hi + 1, -1, hi * 2 + 7))
    return rng.choice(_WEIRD)


def _size(rng: random.Random) -> object:
    return rng.choice((4, 4, 4, 1, 2, 8, 3, 0, 16, 4.0, True, "4", None))


def _interrupt(rng: random.Random) -> object:
    if rng.random() < 0.05:
        return rng.choice(_WEIRD)
    fields: dict[str, Any] = {
        "vector": _int(rng, 0, 255),
        "delivery_mode": rng.choice(list(DeliveryMode)),
        "dest_mode": rng.choice(list(DestMode)),
        "level": rng.choice(list(Level)),
        "trigger": rng.choice(list(Trigger)),
        "shorthand": rng.choice(list(Shorthand)),
        "dest": _int(rng, 0, 0xFFFFFFFF) if rng.random() < 0.5 else _int(rng, 0, 3),
        "redir_hint": rng.random() < 0.1,
    }
    if rng.random() < 0.1:
        fields[rng.choice(list(fields))] = rng.choice(_WEIRD)
    return Interrupt(**fields)


@dataclass
class Tally:
    """What a campaign did (for the long run's report)."""

    ops: int = 0
    ok: int = 0
    faults: int = 0
    rejected: int = 0
    sessions: int = 0
    files: int = 0
    by_call: dict[str, int] = field(default_factory=dict)


class Misbehaviour(AssertionError):
    """A call broke the contract."""


def _call(
    tally: Tally, vm: Vm, name: str, args: dict[str, object], fn: Callable[[], object]
) -> None:
    """Run one call and check the contract."""
    tally.ops += 1
    tally.by_call[name] = tally.by_call.get(name, 0) + 1
    before = vm.snapshot()
    try:
        fn()
    except GuestFault:
        tally.faults += 1
        # The faulting instruction exited, so the guest was entered first (which takes pending
        # INIT/SIPI and recomputes PPR): the APICs' registers must be as they were, unless an
        # INIT was pending (the entry resets that APIC).
        after = vm.snapshot()
        if not _entry_only(before, after):
            raise Misbehaviour(f"{name}{args}: a GuestFault changed {before.diff(after)}") from None
    except (ApicValueError, ApicTypeError) as e:
        tally.rejected += 1
        message = str(e)
        # A vCPU that cannot execute (halted, waiting for SIPI) names itself ("vcpu N"), so
        # does a guest CPU ("CPU N") whose APIC the fuzzing left unusable; a guest access to
        # an APIC page the fuzzing moved or disabled names its address.
        receiver = ("vcpu ", "CPU ", "outside the APIC page")
        if args and not any(a in message for a in (*args, *receiver)):
            raise Misbehaviour(f"{name}{args}: message names no argument: {message!r}") from e
        after = vm.snapshot()
        if "outside the APIC page" in message or message.startswith(("CPU ", "vcpu ")):
            # EXIT-1: any 52-bit gpa is a valid access; it exits (EPT misconfig, counted),
            # then no device answers.  A guest CPU that gives up (its ICR stays busy) has
            # executed its reads.  A vCPU left waiting for SIPI was entered first, which took
            # its INIT (KVMB-9).  Only entries and exits happened: no register changed.
            if not _entry_only(before, after):
                raise Misbehaviour(
                    f"{name}{args}: {message} changed {before.diff(after)}"
                ) from e
            return
        if isinstance(e, StateError) and vm.profile.set_state_svr_before_fixup:
            return  # KVM's own -EINVAL of KVM_SET_LAPIC, after it set SVR (profile kvm)
        if after != before:
            raise Misbehaviour(
                f"{name}{args}: rejected ({message}) after changing {before.diff(after)}"
            ) from e
    except Exception as e:
        raise Misbehaviour(f"{name}{args}: undocumented {type(e).__name__}: {e}") from e
    else:
        tally.ok += 1


def _registers(snap: VmSnapshot) -> list[tuple[int, bytes, int]]:
    """Each APIC's IA32_APIC_BASE, register page without PPR (0xA0), and latched ESR."""
    return [
        (c.apic.apic_base, c.apic.page[:0xA0] + c.apic.page[0xB0:], c.apic.esr_pending)
        for c in snap.vcpus
    ]


def _entry_only(before: VmSnapshot, after: VmSnapshot) -> bool:
    """Whether ``after`` differs from ``before`` only by what entering the guest and exiting
    do: exits counted, PPR recomputed, a pending INIT taken (which resets that APIC)."""
    if any(c.apic.events.init for c in before.vcpus):
        return True
    return _registers(after) == _registers(before)


def _make_vm(rng: random.Random, tally: Tally) -> Vm:
    """A VM from random keywords; invalid ones must be rejected with a named argument."""
    while True:
        n = rng.randint(1, 4)
        kw: dict[str, object] = {}
        if rng.random() < 0.5:
            kw["x2apic_format"] = rng.choice((True, False, False, 1, "no"))
        if rng.random() < 0.3:
            kw["broadcast_quirk"] = rng.choice((True, False, None, "no", 0))
        if rng.random() < 0.2:
            kw["bsp_vcpu_id"] = _int(rng, 0, n - 1)
        if rng.random() < 0.1:
            kw["vcpu_ids"] = rng.choice(([0, 2], [1, 0], 5, "01", [0, 0], [0, 4096], None))
        if rng.random() < 0.1:
            kw["max_vcpu_ids"] = _int(rng, 1, 4096)
        if rng.random() < 0.1:
            kw["pv_features"] = rng.choice((None, [3], [99], ["a"], [[1]], frozenset()))
        profile = rng.choice(("kvm", "kvm", "sdm"))
        tally.ops += 1
        try:
            vm = Vm(n, profile, **kw)  # type: ignore[arg-type]
        except (ApicValueError, ApicTypeError) as e:
            tally.rejected += 1
            if not any(k in str(e) for k in (*kw, "vcpus", "vcpu_id")):
                raise Misbehaviour(f"Vm({n}, **{kw}): message names no argument: {e}") from e
            continue
        except Exception as e:
            raise Misbehaviour(f"Vm({n}, **{kw}): undocumented {type(e).__name__}: {e}") from e
        tally.ok += 1
        return vm


def _one_op(rng: random.Random, tally: Tally, vm: Vm, guest: Guest | None) -> None:
    n = len(vm)
    i = _int(rng, 0, n - 1) if rng.random() < 0.2 else rng.randrange(n)
    k = rng.randrange(n)
    v = vm.vcpus[k]
    apic = vm.lapic(k)
    base = apic.base_address
    choice = rng.randrange(21)
    if choice == 0:
        gpa, size = _int(rng, base, base + 0xFFF), _size(rng)
        _call(tally, vm, "Vcpu.mmio_read", {"gpa": gpa, "size": size},
              lambda: v.mmio_read(gpa, size))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 1:
        gpa, size = _int(rng, base, base + 0x3F0), _size(rng)
        value = _int(rng, 0, 0xFFFFFFFF)
        _call(tally, vm, "Vcpu.mmio_write", {"gpa": gpa, "value": value, "size": size},
              lambda: v.mmio_write(gpa, value, size))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 2:
        msr = rng.choice((0x1B, 0x6E0, *range(0x800, 0x840), 0x3F, _int(rng, 0, 0xFFFFFFFF)))
        _call(tally, vm, "Vcpu.rdmsr", {"msr": msr}, lambda: v.rdmsr(msr))
    elif choice == 3:
        msr = rng.choice((0x1B, 0x808, 0x80B, 0x80F, 0x830, 0x83F, _int(rng, 0x800, 0x83F)))
        value = _int(rng, 0, 0xFFFFFFFF) if rng.random() < 0.8 else _int(rng, 0, 2**64 - 1)
        _call(tally, vm, "Vcpu.wrmsr", {"msr": msr, "value": value},
              lambda: v.wrmsr(msr, value))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 4:
        irq = _interrupt(rng)
        _call(tally, vm, "Vm.deliver", {"irq": irq, "vector": 0, "dest": 0, "mode": 0,
                                        "level": 0, "trigger": 0, "shorthand": 0,
                                        "redir_hint": 0},
              lambda: vm.deliver(irq))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 5:
        lo, hi, data = _int(rng, 0xFEE00000, 0xFEEFFFFF), _int(rng, 0, 0xFF), _int(rng, 0, 0xFFFF)
        _call(tally, vm, "Vm.signal_msi", {"address_lo": lo, "address_hi": hi, "data": data},
              lambda: vm.signal_msi(lo, hi, data))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 6:
        apic_id = _int(rng, 0, 0xFFFFFFFF)
        _call(tally, vm, "Vm.kick_cpu", {"apic_id": apic_id},
              lambda: vm.kick_cpu(apic_id))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 7:
        handler = rng.choice((None, None, None, 5, "h"))
        _call(tally, vm, "Vcpu.run", {"handler": handler},
              lambda: v.run(handler))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 8:
        msr = rng.choice((0x1B, 0x802, 0x808, 0x80B, 0x830, _int(rng, 0, 0xFFFFFFFF)))
        _call(tally, vm, "Vm.get_msr", {"i": i, "msr": msr},
              lambda: vm.get_msr(i, msr))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 9:
        msr = rng.choice((0x1B, 0x808, 0x80F, 0x830, _int(rng, 0, 0xFFFFFFFF)))
        value = _int(rng, 0, 2**64 - 1)
        _call(tally, vm, "Vm.set_msr", {"i": i, "msr": msr, "value": value},
              lambda: vm.set_msr(i, msr, value))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 10:
        data = bytearray(vm.get_lapic(k))
        if rng.random() < 0.5 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        raw: object = bytes(data) if rng.random() < 0.9 else rng.choice((b"", None, "x" * 1024))
        _call(tally, vm, "Vm.set_lapic", {"i": i, "data": raw, "state": 0},
              lambda: vm.set_lapic(i, raw))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 11:
        offset, size = _int(rng, 0, 0xFFF), _size(rng)
        _call(tally, vm, "LocalApic.mmio_read", {"offset": offset, "size": size},
              lambda: apic.mmio_read(offset, size))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 12:
        nr = rng.choice((5, 10, 11, _int(rng, 0, 2**64 - 1)))
        a0, a1 = _int(rng, 0, 2**64 - 1), _int(rng, 0, 2**64 - 1)
        _call(tally, vm, "Vcpu.hypercall", {"nr": nr, "a0": a0, "a1": a1},
              lambda: v.hypercall(nr, a0, a1))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 13:
        ns = _int(rng, 0, 10**6)
        _call(tally, vm, "Vm.advance", {"ns": ns}, lambda: vm.advance(ns))  # type: ignore[arg-type]
    elif choice == 14:
        vid = _int(rng, 0, 64)
        _call(tally, vm, "Vm.add_vcpu", {"vcpu_id": vid},
              lambda: vm.add_vcpu(vid))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 15:
        offset, size = _int(rng, 0, 0xFFF), _size(rng)
        value = _int(rng, 0, 0xFFFFFFFF)
        _call(tally, vm, "LocalApic.mmio_write", {"offset": offset, "value": value, "size": size},
              lambda: apic.mmio_write(offset, value, size))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 16:
        msr = rng.choice((0x1B, 0x6E0, 0x808, 0x80B, 0x80F, 0x830, _int(rng, 0x800, 0x8FF)))
        value = _int(rng, 0, 2**64 - 1)
        host = rng.choice((False, True, 1))
        _call(tally, vm, "LocalApic.wrmsr", {"msr": msr, "value": value, "host_initiated": host},
              lambda: apic.wrmsr(msr, value, host))  # type: ignore[arg-type]  # fmt: skip
    elif choice == 17:
        vector = _int(rng, 0, 0xFF)
        mode = rng.choice((*DeliveryMode, 0, "fixed"))
        trigger = rng.choice((*Trigger, 1))
        level = rng.choice((*Level, True, 1))
        _call(tally, vm, "LocalApic.accept",
              {"vector": vector, "mode": mode, "trigger": trigger, "level": level},
              lambda: apic.accept(vector, mode, trigger, level))  # type: ignore[arg-type]  # fmt: skip
    elif guest is not None and len(guest) == len(vm):
        cpu = guest.cpus[k]
        vector = _int(rng, 0x20, 0xFF)
        if choice == 18:
            target = _int(rng, 0, n - 1)
            _call(tally, vm, "GuestCpu.send_IPI", {"target": target, "vector": vector},
                  lambda: cpu.send_IPI(target, vector))  # type: ignore[arg-type]  # fmt: skip
        elif choice == 19:
            cpus = rng.choice(([0], list(range(n)), None, 3, [n], ["a"]))
            _call(tally, vm, "GuestCpu.send_IPI_mask", {"cpus": cpus, "cpu": 0, "vector": vector},
                  lambda: cpu.send_IPI_mask(cpus, vector))  # type: ignore[arg-type]  # fmt: skip
        else:
            _call(tally, vm, "GuestCpu.send_IPI_allbutself", {"vector": vector},
                  lambda: cpu.send_IPI_allbutself(vector))  # type: ignore[arg-type]  # fmt: skip


def _guest(rng: random.Random, tally: Tally, vm: Vm) -> Guest | None:
    if rng.random() < 0.5:
        return None
    driver = rng.choice(("x2apic_phys", "x2apic_cluster", "kvm_pv", "physflat", "flat", 5))
    bits = rng.choice((64, 64, 32, 64.0, True))
    target: object = vm if rng.random() < 0.95 else vm.vcpus[0]
    tally.ops += 1
    try:
        return Guest(target, driver, bits_per_long=bits)  # type: ignore[arg-type]
    except (ApicValueError, ApicTypeError) as e:
        tally.rejected += 1
        if not any(a in str(e) for a in ("vm", "driver", "bits_per_long", "base")):
            raise Misbehaviour(f"Guest({driver!r}, {bits!r}): names nothing: {e}") from e
    except GuestFault:
        tally.faults += 1
    except Exception as e:
        raise Misbehaviour(f"Guest({driver!r}, {bits!r}): {type(e).__name__}: {e}") from e
    return None


def api_session(seed: int, tally: Tally, ops: int = OPS_PER_SESSION) -> None:
    """One VM (and maybe a guest), ``ops`` random calls on it."""
    rng = random.Random(seed)
    tally.sessions += 1
    vm = _make_vm(rng, tally)
    guest = _guest(rng, tally, vm)
    for _ in range(ops):
        _one_op(rng, tally, vm, guest)


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        pos = rng.randrange(len(data) + 1)
        if r < 0.25 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif r < 0.45:
            del data[pos : pos + rng.randint(1, 20)]
        else:
            data[pos:pos] = rng.choice((
                b"\xff\xfe", b"action = { x = 1 }\n", b'action = ["wrmsr"]\n', b"[" * 3000,
                b"vcpu_ids = [0, 4294967295]\n", b"max_vcpu_ids = 4294967296\n", b"= 1",
                b"\n[[step]]\naction = 7\n", b"vector = -1\n", b"vcpus = 0\n", b"\"\n",
            ))  # fmt: skip
    return bytes(data)


def loader_session(seed: int, tally: Tally, directory: Path) -> None:
    """A mutated scenario file: ``load`` raises only ``ScenarioError``, and running what
    loads raises nothing (``run_file`` reports errors as lines)."""
    rng = random.Random(seed)
    source = rng.choice(SCENARIOS)
    path = directory / f"fuzz_{seed}.toml"
    path.write_bytes(_mutate(rng, source.read_bytes()))
    tally.files += 1
    try:
        scenario.load(path)
    except ScenarioError:
        return
    except Exception as e:
        raise Misbehaviour(
            f"load({source.name} mutated, seed {seed}): {type(e).__name__}: {e}"
        ) from e
    rc = scenario.run_file(path, io.StringIO(), io.StringIO(), verbose=False)
    assert rc in (0, 1, 2)


@settings(derandomize=True)
@given(st.integers(0, 2**32 - 1))
def test_random_api_calls_only_raise_documented_errors_that_name_an_argument_and_change_nothing(
    seed: int,
) -> None:
    api_session(seed, Tally())


@settings(derandomize=True)
@given(st.integers(0, 2**32 - 1))
def test_mutated_scenario_files_only_raise_scenario_errors(seed: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        loader_session(seed, Tally(), Path(d))


def main(argv: list[str] | None = None) -> int:
    """The long campaign: API sessions from seed 0 up until ``--ops`` calls, one mutated
    scenario file per ten sessions."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tally = Tally()
    start = time.monotonic()
    seed = args.seed
    with tempfile.TemporaryDirectory() as d:
        while tally.ops < args.ops:
            api_session(seed, tally)
            if seed % 10 == 0:
                loader_session(seed, tally, Path(d))
            seed += 1
    took = time.monotonic() - start
    print(
        f"{tally.ops} API operations in {tally.sessions} sessions and {tally.files} mutated "
        f"scenario files: {tally.ok} ok, {tally.faults} guest faults, {tally.rejected} "
        f"rejected, 0 contract violations; {took:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
