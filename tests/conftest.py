"""Hypothesis settings profiles and the example database, chosen by environment variables.

* ``HYPOTHESIS_PROFILE``: ``default`` (100 examples per test) or ``thorough`` (2000) for a long
  run; unset with ``CI`` set and no database below: ``ci``, the default profile derandomized
  (the same examples in every CI run);
* ``HYPOTHESIS_DATABASE=/path``: keep examples (failures, and the corpus HypoFuzz builds) in
  that directory (``DirectoryBasedExampleDatabase``) instead of ``.hypothesis/examples``;
* ``HYPOTHESIS_REDIS_URL=redis://host:6379/0``: share them through Redis between machines
  (``hypothesis.extra.redis.RedisExampleDatabase``; needs ``pip install "hypothesis[redis]"``).
  With both set, examples are read from and written to both.

Neither set: Hypothesis' own default database.  See ``docs/fuzzing.md``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis.database import (
    DirectoryBasedExampleDatabase,
    ExampleDatabase,
    MultiplexedDatabase,
)

PROFILE_ENV = "HYPOTHESIS_PROFILE"
DATABASE_ENV = "HYPOTHESIS_DATABASE"
REDIS_ENV = "HYPOTHESIS_REDIS_URL"


class DatabaseConfigError(RuntimeError):
    """The environment asks for an example database that cannot be set up."""


def database_from_env(env: Mapping[str, str]) -> ExampleDatabase | None:
    """The example database the environment asks for, or None for Hypothesis' default."""
    databases: list[ExampleDatabase] = []
    path = env.get(DATABASE_ENV, "")
    if path:
        databases.append(DirectoryBasedExampleDatabase(path))
    url = env.get(REDIS_ENV, "")
    if url:
        try:
            # Imported only when asked for: redis is not a dependency of the project.
            redis = importlib.import_module("redis")
            extra = importlib.import_module("hypothesis.extra.redis")
        except ImportError as e:
            raise DatabaseConfigError(
                f"{REDIS_ENV}={url!r} is set but the redis client is not installed "
                f'({e}); run: pip install "hypothesis[redis]"'
            ) from e
        databases.append(extra.RedisExampleDatabase(redis.Redis.from_url(url)))
    if not databases:
        return None
    if len(databases) == 1:
        return databases[0]
    return MultiplexedDatabase(*databases)


_database = database_from_env(os.environ)
_db_setting: dict[str, Any] = {} if _database is None else {"database": _database}

settings.register_profile("default", max_examples=100, deadline=None, **_db_setting)
settings.register_profile("thorough", max_examples=2000, deadline=None, **_db_setting)
# Mutation testing runs the suite once per mutant: few examples, no database.
settings.register_profile("mutation", max_examples=20, deadline=None, database=None)
# CI (CI=true, as .ci/run is started there): the default profile, derandomized, so every CI run
# draws the same examples (the differential suite's bit-coverage test then sees the same bits
# each time); local runs and the thorough profile keep exploring new examples.
settings.register_profile("ci", settings.get_profile("default"), derandomize=True)
# An example database asked for by the environment wins: derandomized runs do not use one.
_ci = bool(os.environ.get("CI")) and _database is None
settings.load_profile(os.environ.get(PROFILE_ENV) or ("ci" if _ci else "default"))


# ---------------------------------------------------------------------------------------------
# Bug replays (apicsim.replays): APICSIM_REPLAY=BUG-13[,BUG-14...] puts historical KVM bugs back
# into the model for the whole run; the suite is then expected to fail.  An unknown or
# non-replayable id stops the run with a usage error.
# ---------------------------------------------------------------------------------------------
_replays = ExitStack()
_active_replays: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Activate ``APICSIM_REPLAY`` before collection, so test modules import the replayed
    objects too."""
    config.addinivalue_line(
        "markers", "slow: takes seconds (pytest subprocesses); still part of every run"
    )
    from apicsim import replays

    if not os.environ.get(replays.ENV_VAR, "").strip() or _active_replays:
        return
    try:
        ids = replays.from_environment()
        _replays.enter_context(replays.active(ids))
    except replays.ReplayError as e:
        raise pytest.UsageError(f"{replays.ENV_VAR}: {e}") from None
    _active_replays.extend(ids)
    # Failing examples found under a replay must not come back in later, normal runs, and a
    # replay only needs *a* failure: no shrinking.
    base = settings.get_profile(os.environ.get(PROFILE_ENV, "default"))
    phases = tuple(p for p in base.phases if p is not Phase.shrink)
    settings.register_profile("apicsim-replay", settings(base, database=None, phases=phases))
    settings.load_profile("apicsim-replay")
    config.add_cleanup(_deactivate_replays)


def _deactivate_replays() -> None:
    _replays.close()
    _active_replays.clear()


def pytest_report_header(config: pytest.Config) -> str | None:
    if _active_replays:
        return f"apicsim bug replays ACTIVE ({', '.join(_active_replays)}): failures expected"
    return None
