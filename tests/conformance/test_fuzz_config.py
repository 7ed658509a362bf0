"""The fuzzing wiring of ``tests/conftest.py``: profile and example database from the environment.

The subprocess tests copy the real ``tests/conftest.py`` next to a tiny generated test in
``tmp_path`` and run pytest there, so what is checked is what a fuzzing run gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase, MultiplexedDatabase

from tests.conftest import (
    DATABASE_ENV,
    PROFILE_ENV,
    REDIS_ENV,
    DatabaseConfigError,
    database_from_env,
)

ROOT = Path(__file__).resolve().parents[2]
CONFTEST = ROOT / "tests" / "conftest.py"

GENERATED_TEST = """
import os

from hypothesis import Phase, given, settings
from hypothesis import strategies as st

PHASES = [Phase.reuse] if os.environ.get("REUSE_ONLY") else list(Phase)


def test_the_loaded_profile():
    assert settings().max_examples == int(os.environ["EXPECTED_MAX_EXAMPLES"])
    database = os.environ.get("EXPECTED_DATABASE")
    if database:
        assert str(getattr(settings().database, "path", None)) == database


@settings(phases=PHASES)
@given(st.integers(0, 10**6))
def test_fails_from_1000(n):
    assert n < 1000
"""


def run_pytest(
    tmp_path: Path, env_vars: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """pytest on the generated test in ``tmp_path``, with only ``env_vars`` of the fuzzing
    variables set (the caller's own HYPOTHESIS_* variables are removed)."""
    (tmp_path / "conftest.py").write_bytes(CONFTEST.read_bytes())
    (tmp_path / "test_generated.py").write_text(GENERATED_TEST, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in (PROFILE_ENV, DATABASE_ENV, REDIS_ENV)}
    env.update(env_vars)
    # The copied conftest may import the project (its other hooks do): keep it importable.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("profile", "max_examples"), [(None, 100), ("thorough", 2000)]
)
def test_hypothesis_profile_selects_the_settings_profile(
    tmp_path: Path, profile: str | None, max_examples: int
) -> None:
    """``HYPOTHESIS_PROFILE`` unset: the ``default`` profile, 100 examples; ``thorough``:
    2000 (both registered with no deadline, checked in-process below)."""
    env = {"EXPECTED_MAX_EXAMPLES": str(max_examples)}
    if profile is not None:
        env[PROFILE_ENV] = profile
    result = run_pytest(tmp_path, env, "-k", "loaded_profile")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_registered_profiles() -> None:
    assert settings.get_profile("default").max_examples == 100
    assert settings.get_profile("thorough").max_examples == 2000
    assert settings.get_profile("thorough").deadline is None


def test_a_directory_database_receives_the_examples(tmp_path: Path) -> None:
    """``HYPOTHESIS_DATABASE=dir``: the run stores its failing example in ``dir`` (and nowhere
    in ``.hypothesis``), and a later run that only replays the database (``Phase.reuse``)
    fails with it; the same replay-only run on an empty database passes."""
    db = tmp_path / "shared-db"
    env = {DATABASE_ENV: str(db), "EXPECTED_MAX_EXAMPLES": "100", "EXPECTED_DATABASE": str(db)}
    first = run_pytest(tmp_path, env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "1 failed, 1 passed" in first.stdout, first.stdout
    assert "n=1000," in first.stdout, first.stdout
    entries = [p for p in db.rglob("*") if p.is_file()]
    assert entries, f"nothing was written to {db}"
    assert not (tmp_path / ".hypothesis" / "examples").exists()

    replay = {**env, "REUSE_ONLY": "1"}
    second = run_pytest(tmp_path, replay, "-k", "fails_from_1000")
    assert second.returncode == 1, second.stdout + second.stderr
    assert "n=1000," in second.stdout, second.stdout

    empty = {**replay, DATABASE_ENV: str(tmp_path / "empty-db")}
    third = run_pytest(tmp_path, empty, "-k", "fails_from_1000")
    assert third.returncode == 0, third.stdout + third.stderr


def test_without_the_variables_hypothesis_keeps_its_default_database() -> None:
    assert database_from_env({}) is None


def test_the_directory_variable_builds_a_directory_database(tmp_path: Path) -> None:
    db = database_from_env({DATABASE_ENV: str(tmp_path)})
    assert isinstance(db, DirectoryBasedExampleDatabase)
    assert Path(db.path) == tmp_path


def test_a_redis_url_without_the_redis_package_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Redis client is imported only when the URL is set; if it is missing the error says
    which variable asked for it and what to install."""
    monkeypatch.setitem(sys.modules, "redis", None)  # makes `import redis` fail
    monkeypatch.delitem(sys.modules, "hypothesis.extra.redis", raising=False)
    with pytest.raises(DatabaseConfigError, match=r'HYPOTHESIS_REDIS_URL.*hypothesis\[redis\]'):
        database_from_env({REDIS_ENV: "redis://127.0.0.1:6379/0"})


def test_a_redis_url_builds_a_redis_database_when_the_package_is_there(tmp_path: Path) -> None:
    """With ``hypothesis[redis]`` installed (not a project dependency, so this may skip):
    the URL gives a ``RedisExampleDatabase`` (no connection is made until it is used), and
    with the directory variable too, a database that reads and writes both."""
    pytest.importorskip("redis")
    from hypothesis.extra.redis import RedisExampleDatabase

    url = "redis://127.0.0.1:6379/0"
    assert isinstance(database_from_env({REDIS_ENV: url}), RedisExampleDatabase)
    both = database_from_env({REDIS_ENV: url, DATABASE_ENV: str(tmp_path)})
    assert isinstance(both, MultiplexedDatabase)
    kinds = {type(db) for db in both._wrapped}  # no public accessor
    assert kinds == {RedisExampleDatabase, DirectoryBasedExampleDatabase}
