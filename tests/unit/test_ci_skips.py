"""Under CI=true a skipped integration test fails the run; elsewhere it is only reported."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def make_suite(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    integration = pytester.mkpydir("integration")
    (integration / "test_engine.py").write_text(
        "import pytest\ndef test_needs_engine():\n    pytest.skip('engine missing')\n"
    )
    unit = pytester.mkpydir("unit")
    (unit / "test_plain.py").write_text(
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "@pytest.mark.skip(reason='unit skips are fine')\n"
        "def test_skipped():\n    pass\n"
    )


def test_skipped_integration_test_fails_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    make_suite(pytester)
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*SKIPPED-IS-FAILURE integration/test_engine.py::test_needs_engine"]
    )


def test_skipped_integration_test_is_only_a_skip_outside_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    make_suite(pytester)
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=2)
