"""Factory.run's hooks for the systemd service: ``on_ready`` once after adoption and the first
pass, ``on_pass`` after every pass, ``max_wait`` capping the idle wait (the watchdog is fed from
the loop itself); the LM fields on the factory's log lines; the daemon's status line."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from typing import Any

import pytest

from lmrunner import service
from lmrunner.cli.daemon import _Status
from lmrunner.ending import lm_fields
from lmrunner.factory import Factory, PassReport, Tuning
from lmrunner.lifecycle import LmState, OutcomeSource, operator_outcome
from lmrunner.service import JournalHandler
from tests.unit.test_factory import LM0, LONG, Env, start_one
from tests.unit.test_factory_faults import deadline

# The fake clock stands still: the loop's own wait is idle_wait_seconds (the reconcile is later).
IDLE = Tuning(reconcile_seconds=60, idle_wait_seconds=5)


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


class Waits(queue.SimpleQueue[str]):
    """The factory's event queue, remembering each timeout the loop waited with."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def get(self, block: bool = True, timeout: float | None = None) -> str:
        self.timeouts.append(timeout)
        return super().get(block, timeout)


def test_on_ready_once_after_adoption_and_the_first_pass(env: Env) -> None:
    factory = env.factory(env.config())
    calls: list[str] = []
    real_adopt, real_pass = factory.adopt, factory.run_pass

    def adopt() -> PassReport:
        calls.append("adopt")
        return real_adopt()

    def run_pass() -> PassReport:
        calls.append("pass")
        return real_pass()

    factory.adopt = adopt  # type: ignore[method-assign]
    factory.run_pass = run_pass  # type: ignore[method-assign]
    reports: list[PassReport] = []

    def on_pass(report: PassReport) -> None:
        calls.append("on_pass")
        reports.append(report)

    factory.run(once=True, on_ready=lambda: calls.append("ready"), on_pass=on_pass)
    assert calls == ["adopt", "pass", "ready", "on_pass"]
    assert reports[0].started == [LM0]


def test_on_pass_after_every_pass_and_max_wait_caps_the_idle_wait(env: Env) -> None:
    factory = env.factory(env.config(), tuning=IDLE)
    waits = Waits()
    factory.events = waits
    ready: list[int] = []
    passes: list[PassReport] = []

    def on_pass(report: PassReport) -> None:
        passes.append(report)
        if len(passes) == 4:
            factory.request_stop()

    with deadline(10):  # without the cap, the fake clock's 5 s idle wait repeats
        factory.run(on_ready=lambda: ready.append(len(passes)), on_pass=on_pass, max_wait=0.01)
    assert ready == [0]  # once, before the first on_pass
    assert len(passes) == 4
    assert passes[0].started == [LM0]
    assert [p.started for p in passes[1:]] == [[], [], []]  # idle passes, fed all the same
    assert len(waits.timeouts) == 3
    assert all(t is not None and t <= 0.01 for t in waits.timeouts)
    assert factory.next_wait() == 5  # the cap, not the factory's own deadline, ended the waits


def test_without_max_wait_the_factory_waits_for_its_own_deadline(env: Env) -> None:
    factory = env.factory(env.config(), tuning=IDLE)
    waits = Waits()
    factory.events = waits
    passes: list[PassReport] = []

    def on_pass(report: PassReport) -> None:
        passes.append(report)
        if len(passes) == 1:
            waits.put("")  # an event wakes the loop at once
        else:
            factory.request_stop()

    with deadline(10):
        factory.run(on_pass=on_pass)
    assert waits.timeouts == [pytest.approx(factory.tuning.idle_wait_seconds)]


def test_a_failing_hook_does_not_stop_the_loop(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    factory = env.factory(env.config())

    def broken(*args: Any) -> None:
        raise RuntimeError("systemd hook broke")

    with caplog.at_level(logging.ERROR, logger="lmrunner.factory"):
        factory.run(once=True, on_ready=broken, on_pass=broken)
    assert env.only_active().name == LM0
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "lm=on_ready: unexpected error (retried later)" in logged
    assert "lm=on_pass: unexpected error (retried later)" in logged


# --- the LM fields on the factory's own lines --------------------------------------------------


class Sent:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def __call__(self, **fields: Any) -> int:
        self.entries.append(fields)
        return 0


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sent]:
    """The factory's log lines as journal entries (sent nowhere)."""
    sent = Sent()
    monkeypatch.setattr(service, "journal_send", sent)
    logger = logging.getLogger("lmrunner")
    handler = JournalHandler(level=logging.INFO)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield sent
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def entries(sent: Sent, text: str) -> list[dict[str, Any]]:
    return [e for e in sent.entries if text in e["MESSAGE"]]


def test_started_adopted_and_finished_lines_carry_the_lm_fields(env: Env, journal: Sent) -> None:
    factory = env.factory(env.config(image="fake:seconds=10;exit=0"))
    record = start_one(env, factory)
    (started,) = entries(journal, ": started (")
    assert started["MESSAGE"].startswith(f"lm={LM0} machinetype=alpha processors=1: started (")
    assert (started["LM_NAME"], started["LM_UUID"], started["MACHINETYPE"]) == (
        LM0, record.uuid, "alpha")  # fmt: skip
    assert "OUTCOME_CODE" not in started

    env.factory(env.config(image="fake:seconds=10;exit=0")).adopt()  # a restarted daemon
    (adopted,) = entries(journal, ": adopted")
    assert adopted["MESSAGE"] == f"lm={LM0} machinetype=alpha: adopted"
    assert adopted["LM_UUID"] == record.uuid

    report = env.pass_at(factory, 20)
    assert report.finished == [LM0]
    ended = env.get(record.uuid)
    assert ended.state is LmState.FINISHED and ended.outcome is not None
    (finished,) = entries(journal, ": finished: ")
    assert finished["MESSAGE"] == (f"lm={LM0} machinetype=alpha: finished: "
                                   f"{ended.outcome.message} ({ended.outcome.source})")  # fmt: skip
    assert finished["LM_UUID"] == record.uuid
    assert finished["OUTCOME_CODE"] == ended.outcome.code
    assert finished["OUTCOME_SOURCE"] == ended.outcome.source.value


def test_lm_fields_are_the_journal_handlers(env: Env) -> None:
    factory = env.factory(env.config(image=LONG))
    record = start_one(env, factory)
    fields = lm_fields(record)
    assert fields == {"lm_name": LM0, "lm_uuid": record.uuid, "machinetype": "alpha"}
    assert record.outcome is None
    outcome = operator_outcome(False)
    with_outcome = lm_fields(record, outcome)
    assert with_outcome["outcome_code"] == outcome.code
    assert with_outcome["outcome_source"] == OutcomeSource.OPERATOR.value
    assert set(with_outcome) == set(service.LM_FIELDS)


# --- the daemon's status line ---------------------------------------------------------------


def test_the_status_line_counts_lms_and_free_processors(env: Env) -> None:
    factory: Factory = env.factory(env.config(cpus=3), tuning=Tuning(max_starts_per_pass=2))
    status = _Status(factory)
    report = env.pass_at(factory, 0)
    assert len(report.started) == 2
    assert status.after(report) == "2 LMs running, 1 of 3 processors free"
    reads: list[int] = []
    real_active = factory.store.active

    def active() -> Any:
        reads.append(1)
        return real_active()

    factory.store.active = active  # type: ignore[method-assign]
    assert status.after(PassReport()) == "2 LMs running, 1 of 3 processors free"
    assert reads == []  # nothing started or finished: no read of the table
    assert status.after(PassReport(blocked="draining")) == (
        "2 LMs running, 1 of 3 processors free; not starting: draining"
    )
    report = env.pass_at(factory, 1)
    assert len(report.started) == 1
    reads.clear()  # the pass's own
    assert status.after(report) == "3 LMs running, 0 of 3 processors free"
    assert reads == [1]
    # With none free, the planner's reason (all in use) is no news.
    assert status.after(PassReport(blocked="all 3 processors in use")) == (
        "3 LMs running, 0 of 3 processors free"
    )
    factory.request_stop()
    assert status.after(PassReport()) == (
        "3 LMs running, 0 of 3 processors free; stopping (running LMs keep running)"
    )
