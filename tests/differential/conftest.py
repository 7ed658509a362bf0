"""Reports what the differential tests compared (examples, operations, skipped steps) at the
end of the run, for the measurements in ``specs/differential.md``, and the bit coverage of the
compared registers (``coverage.py``): printed with ``-v``, written to the file named by
``APICSIM_DIFF_COVERAGE``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.differential.coverage import COVERAGE, ENV_VAR
from tests.differential.harness import COUNTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if COUNTS.examples:
        terminalreporter.write_line(
            f"differential: {COUNTS.examples} programs run on the model and on KVM, "
            f"{COUNTS.performed} operations compared, {COUNTS.skipped} skipped by exclusions"
        )
        lines = COVERAGE.report()
        if terminalreporter.config.get_verbosity() > 0:
            for line in lines:
                terminalreporter.write_line(line)
        out = os.environ.get(ENV_VAR)
        if out:
            Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
            terminalreporter.write_line(f"differential bit coverage written to {out}")
