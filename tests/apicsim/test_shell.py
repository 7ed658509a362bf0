"""``apicsim shell``: driven through a real pseudo-terminal as a person would (send a line,
read the screen until the prompt comes back), bounded in time."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apicsim import shell
from apicsim.session import Session

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0
"""Seconds the whole conversation may take (the model starts in about one)."""


class Terminal:
    """A child process on a pty: :meth:`send` types a line, :meth:`expect` reads until a
    text appears (or fails after the deadline)."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, close_fds=True
        )
        os.close(slave)
        self.deadline = time.monotonic() + TIMEOUT
        self.screen = ""

    def expect(self, text: str) -> str:
        """Read until ``text`` is on the screen; return what was read up to and with it."""
        while text not in self.screen:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {text!r}; screen:\n{self.screen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"shell exited waiting for {text!r}; screen:\n{self.screen}")
            self.screen += chunk.decode(errors="replace").replace("\r\n", "\n")
        head, _, rest = self.screen.partition(text)
        self.screen = rest
        return head + text

    def send(self, line: str) -> str:
        """Type ``line`` and return everything up to the next prompt."""
        os.write(self.master, line.encode() + b"\n")
        return self.expect(">>> ")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=max(self.deadline - time.monotonic(), 1))
        finally:
            os.close(self.master)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    t = Terminal(
        [sys.executable, "-m", "apicsim", "shell", "--plain",
         "specs/scenarios/x2apic_self_ipi.toml"]
    )
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()


def test_the_shell_steps_a_scenario_forward_and_back_through_a_real_terminal(
    terminal: Terminal,
) -> None:
    banner = terminal.expect(">>> ")
    assert "specs/scenarios/x2apic_self_ipi.toml (7 steps)" in banner
    out = terminal.send("step()")
    assert "step 1/7: mmio_write cpu1 +0x3f0 = 0x31" in out
    assert "kvm_apic: apic_write APIC_SELF_IPI = 0x31" in out
    out = terminal.send("step(3)")
    assert "step 4/7: wrmsr cpu0 0x83f = 0x31" in out
    assert "vcpu 0 IRR: {} -> {0x31}" in out
    out = terminal.send("back()")
    assert "at step 3/7 (was 4)" in out and "vcpu 0 IRR: {0x31} -> {}" in out
    out = terminal.send("until(irr_has(0, 0x31))")
    assert "True" in out
    out = terminal.send("table()")
    assert "x2apic" in out and "{0x31}" in out
    out = terminal.send("vm.lapic(0).mmio_read(0x20) if False else vm.lapic(1).mmio_read(0x20)")
    assert "0x1000000 (16777216)" in out  # results in hex, with the decimal value
    out = terminal.send("trace(name='apic_ipi')")
    assert "kvm_apic_ipi: dst 0x0 vec 0x31 (Fixed|physical|de-assert|edge|self)" in out
    os.write(terminal.master, b"exit()\n")
    assert terminal.close() == 0


def test_the_shell_without_a_scenario_opens_an_empty_session_on_a_small_vm() -> None:
    t = Terminal([sys.executable, "-m", "apicsim", "shell", "--plain"])
    try:
        assert "empty session" in t.expect(">>> ")
        out = t.send("len(vm), session")
        assert "(4, <Session default: step 0/0, 4 vCPUs>)" in out
        out = t.send("guest.cpu(0).send_IPI(2, 0xF0); vm.lapic(2).irr")
        assert "{0xf0}" in out
        os.write(t.master, b"exit()\n")
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


def test_the_shell_namespace_holds_the_session_and_its_shortcuts() -> None:
    s = Session.default()
    ns = shell.namespace(s)
    assert ns["session"] is s and ns["vm"] is s.vm and ns["guest"] is s.guest
    assert ns["step"] == s.step and ns["back"] == s.back and ns["until"] == s.until
    assert {"table", "trace", "diff", "forward", "do", "irr_has", "ops", "Session"} <= set(ns)


def test_a_malformed_scenario_makes_the_shell_exit_2(tmp_path: Path) -> None:
    from apicsim.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n')
    assert main(["shell", "--plain", str(bad)]) == 2


def test_the_ipython_printer_shows_ints_in_hex_with_their_decimal_value() -> None:
    class Printer:
        def __init__(self) -> None:
            self.out = ""

        def text(self, s: str) -> None:
            self.out += s

    for value, text in ((0x3000000, "0x3000000 (50331648)"), (7, "7"), (True, "True")):
        p = Printer()
        shell.pretty_int(value, p, False)
        assert p.out == text

    class Formatter:
        def __init__(self) -> None:
            self.printers: dict[type, object] = {}

        def for_type(self, kind: type, printer: object) -> None:
            self.printers[kind] = printer

    class FakeIPython:
        def __init__(self) -> None:
            self.display_formatter = type("D", (), {"formatters": {"text/plain": Formatter()}})()

    ip = FakeIPython()
    shell.hex_ints(ip)
    assert ip.display_formatter.formatters["text/plain"].printers == {int: shell.pretty_int}


def test_the_shell_uses_ipython_when_it_is_installed() -> None:
    pytest.importorskip("IPython")
    t = Terminal([sys.executable, "-m", "apicsim", "shell", "specs/scenarios/x2apic_self_ipi.toml"])
    try:
        assert "(7 steps)" in t.expect("In [1]: ")
        os.write(t.master, b"vm.lapic(1).mmio_read(0x20)\n")
        assert "0x1000000 (16777216)" in t.expect("In [2]: ")
        os.write(t.master, b"exit()\n")
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()
