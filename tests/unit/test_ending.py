"""lmrunner.ending without a Factory: Endings on the fake backend, the in-memory FakeCgroups and
a Store in tmp_path, fed Status facts by hand; accounting_record's flags."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner import apel, ending
from lmrunner.accounting import AccountingRecord, Flag
from lmrunner.backends.base import EngineState, Status
from lmrunner.cgroups import Usage
from lmrunner.config import Config
from lmrunner.ending import RESTART_OUTCOME, UNRECORDED_OUTCOME, Endings, accounting_record
from lmrunner.errors import BackendError
from lmrunner.lifecycle import (
    IllegalTransition,
    LmState,
    Outcome,
    OutcomeSource,
    operator_outcome,
    start_failed_outcome,
    wallclock_outcome,
)
from lmrunner.lmcgroups import LmCgroups, cgroup_name
from lmrunner.lmdisks import LmDisks
from lmrunner.state import LmRecord
from tests.unit.test_factory import LIMITS, T0, Env, bare_record, message_file, outcome_of
from tests.unit.test_factory_cgroups import USED, FakeCgroups
from tests.unit.test_factory_faults import FaultyFake

LOGGER = "lmrunner.factory"
UUID = "aaaaaaaa-ending"
OTHER = "bbbbbbbb-other"
EXITED_0 = (200, "Exited with status 0 without a shutdown_message", OutcomeSource.EXIT_STATUS)


class Setup:
    """An Env whose engine is a FaultyFake, with FakeCgroups and the Endings under test."""

    def __init__(self, tmp_path: Path) -> None:
        self.env = Env(tmp_path)
        self.engine = FaultyFake(self.env.state_dir / "fake-engine", clock=self.env.clock)
        self.env.backend = self.engine
        self.fake = FakeCgroups()
        self.cgroups = LmCgroups(self.fake, self.env.store)
        self.endings = Endings(
            self.env.store, self.cgroups, LmDisks(None, self.env.store), self.env.clock
        )

    def config(self, **alpha: Any) -> Config:
        return self.env.config(
            **{"fizzle_seconds": 0, "accounting_fqan": "/lhcb/Role=pilot", **alpha}
        )

    def running(self, uuid: str = UUID, slot: int = 0, *, started: float = T0) -> LmRecord:
        """An LM the engine runs, with a cgroup, started at ``started``."""
        record = self.env.store.insert(bare_record(self.env, slot, uuid))
        self.cgroups.make(record, LIMITS, owner=(1000, 1000))
        self.env.store.transition(uuid, LmState.STARTING)
        spec = self.env.spec(uuid, record.name, record.directory, self.env.store.factory_id)
        handle = self.engine.start(spec)
        return self.env.store.transition(uuid, LmState.RUNNING, handle=handle, started=started)

    def get(self, uuid: str = UUID) -> LmRecord:
        return self.env.get(uuid)

    def rows(self, uuid: str = UUID) -> list[AccountingRecord]:
        return [row for row in self.env.store.accounting() if row.uuid == uuid]


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    made = Setup(tmp_path)
    yield made
    made.env.close()


def exited(code: int | None = 0, **extra: Any) -> Status:
    return Status(EngineState.EXITED, code, **{"ended_at": T0 + 100.0, **extra})


# --- finish ------------------------------------------------------------------------------------


def test_finish_records_the_end_with_its_accounting_then_removes_the_lm(s: Setup) -> None:
    config = s.config()
    lm = s.running()
    s.env.clock.now = T0 + 105
    returned = s.endings.finish(config, lm, s.engine, exited(0))

    done = s.get()
    assert (returned.state, returned.outcome, returned.finished) == (
        done.state,
        done.outcome,
        done.finished,
    )
    assert done.state is LmState.FINISHED
    assert outcome_of(done) == EXITED_0
    assert done.finished == T0 + 100  # the engine's end, not the clock's
    assert (done.cpu_seconds, done.memory_peak_bytes) == (USED.cpu_seconds, USED.memory_peak_bytes)
    # Vac's reason where the payload's would be, since the payload left none.
    assert message_file(done).read_text() == f"{EXITED_0[0]} {EXITED_0[1]}\n"
    # The engine object destroyed, the cgroup read, killed and removed (after the usage read).
    assert ("destroy", UUID) in s.engine.calls
    assert UUID not in s.env.engine()
    assert s.fake.of(cgroup_name(UUID)) == ["create", "set_limits", "usage", "kill", "remove"]
    assert done.cgroup is None
    [row] = s.rows()
    assert (row.outcome_code, row.outcome_source, row.flags) == (200, "exit_status", frozenset())
    assert (row.wall_seconds, row.cpu_seconds, row.fqan, row.vo) == (
        100.0,
        USED.cpu_seconds,
        "/lhcb/Role=pilot",
        "lhcb",
    )
    assert s.env.store.apel_pending() == []  # published
    assert list((s.env.state_dir / apel.ARCHIVE).rglob("*"))


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (exited(1), (700, "Exited with status 1 without a shutdown_message", "exit_status")),
        (
            exited(None),
            (700, "Exited with status unknown without a shutdown_message", "exit_status"),
        ),
        (exited(137, oom_killed=True), (700, "Killed for exceeding its memory limit (OOM)", "oom")),
        (Status(EngineState.MISSING), (500, "Engine object vanished; the LM was lost", "lost")),
        (
            exited(1, engine_fault="docker: container removed by hand"),
            (500, "docker: container removed by hand", "lost"),
        ),
        (
            exited(143),
            (
                500,
                "Stopped from outside lmrunner (exit status 143: SIGTERM, by the host or an admin)",
                "lost",
            ),
        ),
    ],
    ids=["exit-1", "exit-unknown", "oom", "missing", "engine-fault", "outside-sigterm"],
)
def test_the_outcome_comes_from_the_status_facts(
    s: Setup, status: Status, expected: tuple[int, str, str]
) -> None:
    lm = s.running()
    done = s.endings.finish(s.config(), lm, s.engine, status)
    assert outcome_of(done) == (expected[0], expected[1], OutcomeSource(expected[2]))
    assert message_file(done).read_text() == f"{expected[0]} {expected[1]}\n"
    [row] = s.rows()
    assert row.outcome_code == expected[0]
    assert (Flag.OOM in row.flags) is (expected[2] == "oom")


def test_the_stop_reason_wins_over_the_exit_status(s: Setup) -> None:
    lm = s.running()
    stopping = s.env.store.transition(
        UUID, LmState.STOPPING, stop_reason=wallclock_outcome(), stop_deadline=T0 + 200.0
    )
    done = s.endings.finish(s.config(), stopping, s.engine, exited(143))
    assert done.outcome == wallclock_outcome()
    assert message_file(lm).read_text() == "100 Shutdown time reached\n"


def test_a_short_life_without_a_message_is_a_fizzle(s: Setup) -> None:
    lm = s.running()
    done = s.endings.finish(s.config(fizzle_seconds=600), lm, s.engine, exited(0))
    text = "Fizzled after 100 s without a shutdown_message (exit status 0)"
    assert outcome_of(done) == (300, text, OutcomeSource.EXIT_STATUS)
    assert s.rows()[0].flags == frozenset({Flag.SHORT})


def test_an_engine_end_before_lmruners_start_stamp_is_a_zero_lifetime(s: Setup) -> None:
    lm = s.running(started=T0 + 150)
    done = s.endings.finish(s.config(fizzle_seconds=600), lm, s.engine, exited(0))
    assert done.outcome is not None
    assert done.outcome.text.startswith("Fizzled after 0 s")
    assert s.rows()[0].wall_seconds == 0.0


def test_without_an_engine_end_time_the_clock_is_the_end(s: Setup) -> None:
    lm = s.running()
    s.env.clock.now = T0 + 42
    done = s.endings.finish(s.config(), lm, s.engine, Status(EngineState.EXITED, 0))
    assert done.finished == T0 + 42


@pytest.mark.parametrize(("exit_code", "oom"), [(1, True), (None, True), (0, False)])
def test_a_cgroup_oom_kill_counts_unless_the_payload_exited_0(
    s: Setup, exit_code: int | None, oom: bool
) -> None:
    lm = s.running()
    s.fake.usage_of[cgroup_name(UUID)] = replace(USED, oom_kills=1)
    done = s.endings.finish(s.config(), lm, s.engine, exited(exit_code))
    assert done.outcome is not None
    assert (done.outcome.source is OutcomeSource.OOM) is oom
    [row] = s.rows()
    assert row.oom_kills == 1 and Flag.OOM in row.flags  # the kill is accounted either way


def test_the_payloads_message_is_the_outcome_and_is_left_as_it_is(s: Setup) -> None:
    lm = s.running()
    message_file(lm).write_text("300 No more work\nmore lines\n")
    stopping = s.env.store.transition(
        UUID, LmState.STOPPING, stop_reason=operator_outcome(False), stop_deadline=T0 + 200.0
    )
    done = s.endings.finish(s.config(), stopping, s.engine, exited(143))
    assert outcome_of(done) == (300, "No more work", OutcomeSource.PAYLOAD)
    assert message_file(done).read_text() == "300 No more work\nmore lines\n"


@pytest.mark.parametrize(
    ("left", "oom"),
    [("not a shutdown message\n", False), ("700 my child was killed\n", True), ("", False)],
    ids=["unparsable", "700-after-oom", "empty"],
)
def test_what_the_payload_left_is_never_overwritten(s: Setup, left: str, oom: bool) -> None:
    lm = s.running()
    message_file(lm).write_text(left)
    done = s.endings.finish(s.config(), lm, s.engine, exited(137 if oom else 1, oom_killed=oom))
    assert done.outcome is not None and done.outcome.source is not OutcomeSource.PAYLOAD
    assert message_file(done).read_text() == left


def test_a_symlinked_message_is_neither_read_nor_written_through(s: Setup, tmp_path: Path) -> None:
    lm = s.running()
    target = tmp_path / "host-file"
    target.write_text("100 from the host\n")
    message_file(lm).symlink_to(target)
    done = s.endings.finish(s.config(), lm, s.engine, exited(0))
    assert outcome_of(done) == EXITED_0
    assert target.read_text() == "100 from the host\n"
    assert message_file(done).is_symlink()


def test_a_message_that_cannot_be_written_is_a_warning(
    s: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    lm = s.running()
    (lm.directory / "joboutputs").rmdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        done = s.endings.finish(s.config(), lm, s.engine, exited(0))
    assert done.state is LmState.FINISHED
    assert f"lm={lm.name}: cannot write its shutdown_message" in caplog.text
    assert len(s.rows()) == 1


def test_state_and_accounting_are_one_transaction(
    s: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = s.running()

    def broken(*args: Any) -> AccountingRecord:
        raise RuntimeError("accounting bug")

    monkeypatch.setattr(ending, "accounting_record", broken)
    with pytest.raises(RuntimeError, match="accounting bug"):
        s.endings.finish(s.config(), lm, s.engine, exited(0))
    # Nothing of the end happened: a later pass finishes it whole.
    left = s.get()
    assert left.state is LmState.RUNNING and left.outcome is None and left.finished is None
    assert s.rows() == []
    assert not message_file(lm).exists()
    assert UUID in s.env.engine()
    assert s.fake.live == {cgroup_name(UUID)}

    monkeypatch.undo()
    done = s.endings.finish(s.config(), left, s.engine, exited(0))
    assert outcome_of(done) == EXITED_0 and len(s.rows()) == 1


def test_an_end_is_recorded_once(s: Setup) -> None:
    lm = s.running()
    s.endings.finish(s.config(), lm, s.engine, exited(0))
    with pytest.raises(IllegalTransition):
        s.endings.finish(s.config(), s.get(), s.engine, exited(1))
    assert outcome_of(s.get()) == EXITED_0
    assert len(s.rows()) == 1


def test_a_destroy_that_fails_is_logged_and_the_end_stays_recorded(
    s: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    lm = s.running()
    s.engine.faults[("destroy", UUID)] = BackendError("fake", "engine busy")
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        done = s.endings.finish(s.config(), lm, s.engine, exited(0))
    assert done.state is LmState.FINISHED and len(s.rows()) == 1
    assert UUID in s.env.engine()  # left for a reconcile
    assert f"lm={lm.name}: fake: engine busy (retried later)" in caplog.text
    assert s.fake.live == set() and s.get().cgroup is None  # the cgroup goes all the same


def test_a_cgroup_that_cannot_be_removed_stays_recorded(s: Setup) -> None:
    lm = s.running()
    s.fake.fail_remove = True
    done = s.endings.finish(s.config(), lm, s.engine, exited(0))
    assert done.state is LmState.FINISHED
    assert s.get().cgroup is not None
    assert [r.uuid for r in s.env.store.leftover_cgroups()] == [UUID]


def test_without_cgroups_the_lm_is_unmeasured(s: Setup) -> None:
    endings = Endings(
        s.env.store, LmCgroups(None, s.env.store), LmDisks(None, s.env.store), s.env.clock
    )
    record = s.env.store.insert(bare_record(s.env, 0, UUID))
    s.env.store.transition(UUID, LmState.STARTING)
    lm = s.env.store.transition(UUID, LmState.RUNNING, started=float(T0))  # no handle
    done = endings.finish(s.config(), lm, s.engine, exited(0))
    assert (done.cpu_seconds, done.memory_peak_bytes) == (None, None)
    assert s.rows()[0].flags == frozenset({Flag.UNMEASURED})
    assert ("destroy", UUID) not in s.engine.calls  # nothing to destroy without a handle
    assert not record.directory.exists()  # never made, and finish() does not make it


def test_an_lm_whose_machinetype_is_gone_ends_without_fizzle_or_fqan(s: Setup) -> None:
    lm = s.running()
    beta = {"backend": "fake", "image": "fake:", "target_share": 1, "fizzle_seconds": 600}
    config = s.env.config(machinetypes={"beta": beta})
    done = s.endings.finish(config, lm, s.engine, exited(0))
    assert outcome_of(done) == EXITED_0
    [row] = s.rows()
    assert (row.machinetype, row.fqan, row.vo, row.flags) == ("alpha", None, None, frozenset())


def test_apel_that_cannot_be_written_is_logged_and_retried_later(
    s: Setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lm = s.running()

    def full(*args: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(apel, "publish", full)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        done = s.endings.finish(s.config(), lm, s.engine, exited(0))
    assert done.state is LmState.FINISHED
    assert "cannot write APEL records now: [Errno 28] No space left on device" in caplog.text
    assert [r.uuid for r in s.env.store.apel_pending()] == [UUID]
    monkeypatch.undo()
    s.endings.publish(s.config())
    assert s.env.store.apel_pending() == []


# --- fail and settle_half_created --------------------------------------------------------------


def test_fail_ends_an_lm_that_never_ran(s: Setup) -> None:
    record = s.env.store.insert(bare_record(s.env, 0, UUID))
    s.cgroups.make(record, LIMITS, owner=(1000, 1000))
    s.env.clock.now = T0 + 7
    outcome = start_failed_outcome("image not found")
    s.endings.fail(s.config(), s.get(), outcome)
    failed = s.get()
    assert failed.state is LmState.FAILED
    assert (failed.outcome, failed.finished, failed.cgroup) == (outcome, T0 + 7, None)
    assert s.fake.live == set()
    [row] = s.rows()
    assert row.flags == frozenset({Flag.FAILED, Flag.UNMEASURED})
    assert (row.wall_seconds, row.outcome_code, row.outcome_source) == (0.0, 500, "start_failed")
    assert s.env.store.apel_pending() == []  # marked: an LM that never ran gets no message
    assert not list((s.env.state_dir / apel.ARCHIVE).rglob("*.*"))
    assert not message_file(failed).exists()


@pytest.mark.parametrize("outcome", [RESTART_OUTCOME, UNRECORDED_OUTCOME])
def test_settle_half_created_removes_only_its_own_engine_object_and_folder(
    s: Setup, outcome: Outcome, caplog: pytest.LogCaptureFixture
) -> None:
    other = s.running(OTHER, 1)
    record = s.env.store.insert(bare_record(s.env, 0, UUID))
    s.env.store.transition(UUID, LmState.STARTING)
    s.engine.start(s.env.spec(UUID, record.name, record.directory, s.env.store.factory_id))
    assert set(s.env.engine()) == {UUID, OTHER}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s.endings.settle_half_created(s.config(), s.get(), s.engine, outcome)
    assert set(s.env.engine()) == {OTHER}
    assert not record.directory.exists() and other.directory.exists()
    done = s.get()
    assert (done.state, done.outcome) == (LmState.FAILED, outcome)
    assert len(s.rows()) == 1 and s.get(OTHER).state is LmState.RUNNING
    assert f"lm={record.name}: half-created ({outcome.text}); removed" in caplog.text


def test_settle_half_created_when_the_engine_cannot_list(
    s: Setup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    record = s.env.store.insert(bare_record(s.env, 0, UUID))
    record.directory.mkdir(parents=True)

    def cannot_list() -> list[Any]:
        raise BackendError("fake", "engine down")

    monkeypatch.setattr(s.engine, "list_owned", cannot_list)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        s.endings.settle_half_created(s.config(), record, s.engine, RESTART_OUTCOME)
    assert f"lm={record.name}: cannot look for its engine object now: fake: engine down" in (
        caplog.text
    )
    assert s.get().state is LmState.FAILED
    assert not record.directory.exists()


# --- backfill ------------------------------------------------------------------------------------


def test_backfill_accounts_ended_lms_once_and_survives_a_broken_one(
    s: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    outcome = Outcome(200, "done", OutcomeSource.PAYLOAD)
    ended: dict[str, dict[str, Any]] = {
        "11111111-finished": {"state": LmState.FINISHED, "started": T0 - 100.0, "finished": T0},
        "22222222-failed": {"state": LmState.FAILED, "finished": T0 - 50.0},
        "33333333-broken": {"state": LmState.FINISHED},  # no end time: no record can be made
    }
    for slot, (uuid, extra) in enumerate(ended.items()):
        s.env.store.insert(bare_record(s.env, slot, uuid, outcome=outcome, **extra))
    s.running("44444444-running", 5)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s.endings.backfill(s.config())
    assert {row.uuid for row in s.env.store.accounting()} == {
        "11111111-finished",
        "22222222-failed",
    }
    assert s.rows("11111111-finished")[0].wall_seconds == 100.0
    assert s.rows("22222222-failed")[0].flags == frozenset({Flag.FAILED, Flag.UNMEASURED})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warnings) == [
        "lm=factory-00.example.com: accounting record backfilled",
        "lm=factory-01.example.com: accounting record backfilled",
    ]
    assert "lm=factory-02.example.com: unexpected error" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s.endings.backfill(s.config())
    assert len(s.env.store.accounting()) == 2
    assert "backfilled" not in caplog.text


# --- accounting_record ---------------------------------------------------------------------------


def account(
    s: Setup, usage: Usage | None = None, *, mt: bool = True, **extra: Any
) -> AccountingRecord:
    fields: dict[str, Any] = {
        "state": LmState.FINISHED,
        "started": float(T0),
        "finished": T0 + 1000.0,
        "outcome": Outcome(200, "done", OutcomeSource.PAYLOAD),
        **extra,
    }
    record = bare_record(s.env, 0, UUID, **fields)
    config = s.config(fizzle_seconds=600)
    return accounting_record(record, usage, config.machinetypes["alpha"] if mt else None)


def test_accounting_record_of_an_ordinary_end(s: Setup) -> None:
    row = account(s, USED, cpu_seconds=12.5, memory_peak_bytes=300 << 20)
    assert row.flags == frozenset()
    assert (row.wall_seconds, row.cpu_seconds, row.memory_peak_bytes) == (1000.0, 12.5, 300 << 20)
    assert (row.outcome_code, row.outcome_text, row.outcome_source) == (200, "done", "payload")
    assert (row.fqan, row.vo, row.hs06) == ("/lhcb/Role=pilot", "lhcb", None)
    assert (row.memory_limit_bytes, row.processors, row.backend) == (
        LIMITS.memory_bytes,
        1,
        "fake",
    )
    assert (row.created, row.started, row.finished) == (T0 - 60, T0, T0 + 1000.0)


def test_accounting_record_flags(s: Setup) -> None:
    assert account(s, started=None).flags == frozenset({Flag.FAILED, Flag.UNMEASURED})
    assert account(s, started=None).wall_seconds == 0.0
    assert account(s, USED, finished=T0 + 599.0).flags == frozenset({Flag.SHORT})
    assert account(s, USED, finished=T0 + 600.0).flags == frozenset()
    assert account(s, USED, finished=T0 + 5.0, mt=False).flags == frozenset()  # type gone
    assert account(s).flags == frozenset({Flag.UNMEASURED})
    assert account(s, cpu_seconds=3.0).flags == frozenset()  # its own CPU figure counts
    oom = account(s, replace(USED, oom_kills=2))
    assert (oom.flags, oom.oom_kills) == (frozenset({Flag.OOM}), 2)
    by_outcome = account(s, USED, outcome=Outcome(700, "OOM", OutcomeSource.OOM))
    assert (by_outcome.flags, by_outcome.oom_kills) == (frozenset({Flag.OOM}), 0)


def test_accounting_record_without_an_outcome_or_a_positive_wall(s: Setup) -> None:
    row = account(s, USED, outcome=None, finished=T0 - 5.0)
    assert (row.outcome_code, row.outcome_text) == (500, "Start failed: unknown")
    assert row.wall_seconds == 0.0


def test_accounting_record_hs06_is_per_processor(s: Setup) -> None:
    record = replace(
        bare_record(s.env, 0, UUID, state=LmState.FINISHED, started=float(T0), finished=T0 + 1.0),
        processors=4,
        limits=replace(LIMITS, processors=4, hs06=40.0),
    )
    assert accounting_record(record, USED, None).hs06 == 10.0
