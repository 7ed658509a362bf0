"""Reports what the differential tests compared (examples, operations, skipped steps) at the
end of the run, for the measurements in ``specs/differential.md``."""

from __future__ import annotations

import pytest

from tests.differential.harness import COUNTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if COUNTS.examples:
        terminalreporter.write_line(
            f"differential: {COUNTS.examples} programs run on the model and on KVM, "
            f"{COUNTS.performed} operations compared, {COUNTS.skipped} skipped by exclusions"
        )
