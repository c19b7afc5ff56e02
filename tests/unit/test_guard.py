"""lmrunner.guard.guarded on its own: one LM's error is logged and swallowed, a store's error and
anything that is no Exception (KeyboardInterrupt, SystemExit) pass through."""

from __future__ import annotations

import logging

import pytest

from lmrunner.errors import BackendError, LmrunnerError
from lmrunner.guard import guarded
from lmrunner.state import StoreError, StoreUnwritable

LOGGER = "lmrunner.factory"


def throw(error: BaseException) -> None:
    """Raise ``error`` (a function, so that the type checker sees code after the guard)."""
    raise error


def test_nothing_raised_runs_the_body_and_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    ran = []
    with caplog.at_level(logging.DEBUG, logger=LOGGER), guarded("lm-a"):
        ran.append(1)
    assert ran == [1]
    assert caplog.records == []


@pytest.mark.parametrize(
    "error",
    [LmrunnerError("it broke"), BackendError("fake", "it broke")],
    ids=["LmrunnerError", "BackendError"],
)
def test_an_lmrunner_error_is_one_line_without_traceback(
    caplog: pytest.LogCaptureFixture, error: LmrunnerError
) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER), guarded("lm-a"):
        throw(error)
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == f"lm=lm-a: {error} (retried later)"
    assert record.exc_info is None
    assert "\n" not in caplog.text.strip()


@pytest.mark.parametrize(
    "error", [RuntimeError("bug"), KeyError("k"), OSError(5, "I/O error"), AssertionError("no")]
)
def test_any_other_exception_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER), guarded("lm-b"):
        throw(error)
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "lm=lm-b: unexpected error (retried later)"
    assert record.exc_info is not None and record.exc_info[1] is error
    assert "Traceback" in caplog.text


@pytest.mark.parametrize(
    "error",
    [StoreError("database is corrupt"), StoreUnwritable("disk full")],
    ids=["StoreError", "StoreUnwritable"],
)
def test_a_store_error_is_raised_again_unlogged(
    caplog: pytest.LogCaptureFixture, error: StoreError
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger=LOGGER),
        pytest.raises(type(error)) as raised,
        guarded("lm-c"),
    ):
        throw(error)
    assert raised.value is error
    assert caplog.records == []


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), SystemExit(3), GeneratorExit()], ids=lambda e: type(e).__name__
)
def test_a_base_exception_is_never_swallowed(
    caplog: pytest.LogCaptureFixture, error: BaseException
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger=LOGGER),
        pytest.raises(type(error)) as raised,
        guarded("lm-d"),
    ):
        throw(error)
    assert raised.value is error
    assert caplog.records == []


def test_code_after_the_guard_runs_after_a_swallowed_error() -> None:
    done = []
    for name in ("one", "two"):
        with guarded(name):
            if name == "one":
                throw(LmrunnerError("first fails"))
        done.append(name)
    assert done == ["one", "two"]
