"""Observers: the no-op base, and the fan-out that tells every observer even when one fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.model import Limits
from lmrunner.observe import Observer, Observers
from lmrunner.state import LmRecord

LIMITS = Limits(processors=1, memory_bytes=1 << 30, swap_bytes=0, disk_bytes=10**9, hs06=None)


def record(name: str = "factory-00.example.com") -> LmRecord:
    return LmRecord(
        uuid="00000000-observe",
        name=name,
        machinetype="alpha",
        backend="fake",
        slot=0,
        processors=1,
        limits=LIMITS,
        hs06=1.0,
        shutdown_time=1_700_086_400,
        directory=Path("/nonexistent/observe"),
        created=1_700_000_000.0,
        state=LmState.FINISHED,
        outcome=Outcome(200, "done", OutcomeSource.PAYLOAD),
    )


class Taking(Observer):
    """Notes every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def started(self, record: LmRecord) -> None:
        self.calls.append(("started", record.name))

    def ended(self, record: LmRecord) -> None:
        self.calls.append(("ended", record.name))

    def passed(self, seconds: float, blocked: str | None) -> None:
        self.calls.append(("passed", seconds, blocked))

    def reacted(self, seconds: float) -> None:
        self.calls.append(("reacted", seconds))


class Broken(Observer):
    """Raises from every call."""

    def __init__(self) -> None:
        self.tried = 0

    def _fail(self) -> None:
        self.tried += 1
        raise RuntimeError(f"broken observer, call {self.tried}")

    def started(self, record: LmRecord) -> None:
        self._fail()

    def ended(self, record: LmRecord) -> None:
        self._fail()

    def passed(self, seconds: float, blocked: str | None) -> None:
        self._fail()

    def reacted(self, seconds: float) -> None:
        self._fail()


def tell_everything(observer: Observer) -> None:
    observer.started(record("factory-00.example.com"))
    observer.ended(record("factory-01.example.com"))
    observer.passed(0.25, "the state directory is full")
    observer.reacted(0.5)


def test_the_base_observer_does_nothing() -> None:
    tell_everything(Observer())  # raises nothing, needs nothing


def test_no_observers_is_fine() -> None:
    tell_everything(Observers())
    assert Observers().observers == ()


def test_every_observer_is_told_in_order() -> None:
    first, second = Taking(), Taking()
    fan = Observers([first, second])
    tell_everything(fan)
    expected = [
        ("started", "factory-00.example.com"),
        ("ended", "factory-01.example.com"),
        ("passed", 0.25, "the state directory is full"),
        ("reacted", 0.5),
    ]
    assert first.calls == expected
    assert second.calls == expected


def test_observers_are_kept_as_a_tuple_copy() -> None:
    given: list[Observer] = [Taking()]
    fan = Observers(given)
    given.append(Taking())
    assert len(fan.observers) == 1


@pytest.mark.parametrize("broken_at", [0, 1, 2])
def test_a_raising_observer_does_not_stop_the_others(
    broken_at: int, caplog: pytest.LogCaptureFixture
) -> None:
    takers = [Taking(), Taking()]
    broken = Broken()
    observers: list[Observer] = list(takers)
    observers.insert(broken_at, broken)
    fan = Observers(observers)
    caplog.set_level(logging.DEBUG, logger="lmrunner.observe")
    tell_everything(fan)  # raises nothing
    for taker in takers:
        assert [call[0] for call in taker.calls] == ["started", "ended", "passed", "reacted"]
    assert broken.tried == 4


def test_each_failure_is_logged_once_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    broken = Broken()
    fan = Observers([broken, Taking()])
    caplog.set_level(logging.DEBUG, logger="lmrunner.observe")
    fan.passed(0.1, None)
    failures = [r for r in caplog.records if r.name == "lmrunner.observe"]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR
    assert failures[0].getMessage() == "observer Broken failed"
    assert failures[0].exc_info is not None
    assert "call 1" in str(failures[0].exc_info[1])
    caplog.clear()
    tell_everything(fan)
    assert len([r for r in caplog.records if r.name == "lmrunner.observe"]) == 4


def test_two_broken_observers_are_each_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Other(Broken):
        pass

    taker = Taking()
    fan = Observers([Broken(), taker, Other()])
    caplog.set_level(logging.DEBUG, logger="lmrunner.observe")
    fan.reacted(0.01)
    names = [r.getMessage() for r in caplog.records if r.name == "lmrunner.observe"]
    assert names == ["observer Broken failed", "observer Other failed"]
    assert taker.calls == [("reacted", 0.01)]


def test_a_base_exception_is_not_swallowed() -> None:
    """Only Exception is the observer's bug; KeyboardInterrupt and SystemExit go through."""

    class Interrupting(Observer):
        def reacted(self, seconds: float) -> None:
            raise KeyboardInterrupt

    taker = Taking()
    with pytest.raises(KeyboardInterrupt):
        Observers([Interrupting(), taker]).reacted(0.1)
    assert taker.calls == []


def test_observers_nest() -> None:
    inner = Taking()
    outer = Taking()
    fan = Observers([Observers([Broken(), inner]), outer])
    tell_everything(fan)
    assert inner.calls == outer.calls
    assert len(inner.calls) == 4
