"""Test-wide rules.

Under ``CI=true`` an integration or contract test that skips (its engine missing) fails the run:
an engine that CI cannot reach means the feature was not proven.
"""

from __future__ import annotations

import os

import pytest

_SKIPPED_INTEGRATION: list[str] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and ("/integration/" in f"/{report.nodeid}" or "/contract/" in f"/{report.nodeid}")
    ):
        _SKIPPED_INTEGRATION.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _in_ci() and _SKIPPED_INTEGRATION:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _in_ci() and _SKIPPED_INTEGRATION:
        terminalreporter.section("integration tests skipped under CI=true (counted as failures)")
        for nodeid in _SKIPPED_INTEGRATION:
            terminalreporter.write_line(f"SKIPPED-IS-FAILURE {nodeid}")
