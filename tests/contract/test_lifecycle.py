"""Life-cycle scenarios every backend must pass (see conftest.py)."""

from __future__ import annotations

import itertools

from lmrunner.backends.base import EngineState
from lmrunner.lifecycle import LmState, OutcomeSource
from tests.contract.conftest import TIMESCALE, Behaviour, Harness


def test_payload_message_becomes_the_outcome(harness: Harness) -> None:
    config = harness.config(
        Behaviour(seconds=0.5, message="300 No more work"), backoff_seconds=3600
    )
    factory = harness.factory(config)
    harness.drive(factory, lambda: any(not r.active for r in factory.store.recent()))
    record = factory.store.recent()[-1]
    assert record.state is LmState.FINISHED
    assert record.outcome is not None
    assert (record.outcome.code, record.outcome.text) == (300, "No more work")
    assert record.outcome.source is OutcomeSource.PAYLOAD
    assert record.started is not None and record.finished is not None
    assert record.finished >= record.started
    # An abort makes the machinetype back off: nothing else starts.
    factory.run_pass()
    assert factory.store.active() == []


def test_processors_are_reused_after_an_exit(harness: Harness) -> None:
    config = harness.config(Behaviour(seconds=0.3, message="200 Intended work completed ok"))
    factory = harness.factory(config)
    harness.drive(factory, lambda: len(factory.store.recent()) >= 3)
    records = factory.store.recent()
    assert all(r.outcome is None or r.outcome.code == 200 for r in records)
    assert len(factory.store.active()) <= 1  # never over the 1 processor configured


def test_operator_stop_with_grace(harness: Harness) -> None:
    factory = harness.factory(harness.config(Behaviour(seconds=60)))
    harness.drive(factory, lambda: bool(factory.store.active()))
    record = factory.store.active()[0]
    factory.store.add_request(record.uuid, "stop", harness.case.stop_grace)
    harness.drive(factory, lambda: not factory.store.get(record.uuid).active)  # type: ignore[union-attr]
    done = factory.store.get(record.uuid)
    assert done is not None and done.outcome is not None
    assert (done.outcome.code, done.outcome.source) == (100, OutcomeSource.OPERATOR)
    assert done.outcome.text == "Stopped by operator"
    # It ended within the grace period (by itself, on SIGTERM), not by the kill.
    assert done.finished is not None and done.stop_deadline is not None
    assert done.finished < done.stop_deadline


def test_wallclock_stop_kills_a_payload_that_ignores_sigterm(harness: Harness) -> None:
    config = harness.config(
        Behaviour(seconds=60, ignore_term=True),
        # long enough for the payload to set its trap first: in the TCG guest an engine's
        # start-up alone takes seconds
        max_wallclock_seconds=round(3 * TIMESCALE),
        min_wallclock_seconds=0,
    )
    factory = harness.factory(config)
    harness.drive(factory, lambda: bool(factory.store.recent()))
    first = factory.store.recent()[-1]
    harness.drive(factory, lambda: not factory.store.get(first.uuid).active)  # type: ignore[union-attr]
    done = factory.store.get(first.uuid)
    assert done is not None and done.outcome is not None
    assert (done.outcome.code, done.outcome.source) == (100, OutcomeSource.WALLCLOCK)
    # Killed only once the grace period (stop_grace_seconds 1) had run out.
    assert done.stop_deadline is not None and done.finished is not None
    assert done.finished >= done.stop_deadline


def test_running_lm_is_adopted_by_a_restarted_daemon(harness: Harness) -> None:
    config = harness.config(Behaviour(seconds=2, message="200 Intended work completed ok"))
    first = harness.factory(config)
    harness.drive(first, lambda: bool(first.store.active()))
    record = first.store.active()[0]
    first.close()  # the daemon dies; the LM keeps running in its engine
    second = harness.factory(config)
    assert [r.uuid for r in second.store.active()] == [record.uuid]  # adopted, not restarted
    harness.drive(second, lambda: not second.store.get(record.uuid).active)  # type: ignore[union-attr]
    done = second.store.get(record.uuid)
    assert done is not None and done.outcome is not None
    assert done.outcome.code == 200
    assert sum(1 for r in second.store.recent() if r.uuid == record.uuid) == 1


def test_destroy_is_idempotent(harness: Harness) -> None:
    factory = harness.factory(harness.config(Behaviour(seconds=60)))
    harness.drive(factory, lambda: bool(factory.store.active()))
    record = factory.store.active()[0]
    backend = factory.backends[record.backend]
    assert record.handle is not None
    backend.stop(record.uuid, record.handle, force=True)
    backend.destroy(record.uuid, record.handle)
    backend.destroy(record.uuid, record.handle)  # already gone: still fine
    assert backend.inspect(record.uuid, record.handle).state is EngineState.MISSING
    assert record.uuid not in {owned.uuid for owned in backend.list_owned()}


def test_lm_removed_behind_lmrunners_back_is_lost(harness: Harness) -> None:
    factory = harness.factory(harness.config(Behaviour(seconds=60)))
    harness.drive(factory, lambda: bool(factory.store.active()))
    record = factory.store.active()[0]
    assert record.handle is not None
    factory.backends[record.backend].destroy(record.uuid, record.handle)
    factory.events.put(record.uuid)
    harness.drive(factory, lambda: not factory.store.get(record.uuid).active)  # type: ignore[union-attr]
    done = factory.store.get(record.uuid)
    assert done is not None and done.outcome is not None
    assert done.outcome.source is OutcomeSource.LOST


def test_an_exit_is_handled_and_its_processor_reused_within_a_second(harness: Harness) -> None:
    # Event-driven: the backend reports the exit; no fixed cycle delays the next start.
    config = harness.config(Behaviour(seconds=0.5, message="200 Intended work completed ok"))
    factory = harness.factory(config)
    harness.drive(factory, lambda: len(factory.store.recent()) >= 4)
    records = sorted(factory.store.recent(), key=lambda r: r.created)
    for ended, following in itertools.pairwise(records):
        assert ended.finished is not None
        assert following.created - ended.finished < 1.0 * TIMESCALE, (ended, following)
