"""The factory driven pass by pass on the fake backend, with a fake clock (no threads, no sleeps).

Section numbers (§) refer to ``/work/shared/reference/vac.md``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.backends.base import LABEL_FACTORY, LABEL_NAME, LABEL_UUID, Handle, MachineSpec
from lmrunner.backends.fake import FakeBackend
from lmrunner.config import Config
from lmrunner.ending import RESTART_OUTCOME
from lmrunner.factory import Factory, PassReport, Tuning
from lmrunner.lifecycle import (
    LmState,
    OutcomeSource,
    heartbeat_outcome,
    operator_outcome,
    wallclock_outcome,
)
from lmrunner.loader import load_config
from lmrunner.model import Limits, Mount
from lmrunner.state import LmRecord, Store

T0 = 1_700_000_000  # an integer: shutdown times are whole seconds
HOST = "factory.example.com"
LM0 = "factory-00.example.com"
LIMITS = Limits(
    processors=1, memory_bytes=2048 << 20, swap_bytes=0, disk_bytes=40 * 10**9, hs06=None
)
TUNING = Tuning(max_starts_per_pass=8, reconcile_seconds=0, orphan_grace_seconds=300)
LONG = "fake:seconds=3600;term_seconds=0.25"  # runs an hour; ends 0.25 s after SIGTERM


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now


class QuietFake(FakeBackend):
    """The fake backend without its watcher thread: the tests run every pass themselves, and the
    periodic reconcile (every pass with ``reconcile_seconds=0``) notices every end."""

    notify: Callable[[str], None] | None = None

    def watch(self, notify: Callable[[str], None]) -> None:
        self.notify = notify


class Env:
    """A state directory, a store, a fake engine and a clock shared by the factories of a test
    (a second factory on the same store is a restarted daemon)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.state_dir = tmp_path / "state"
        self.clock = Clock()
        self.backend = QuietFake(self.state_dir / "fake-engine", clock=self.clock)
        self.store = Store(self.state_dir)
        self.factories: list[Factory] = []

    def config(
        self,
        *,
        cpus: int = 1,
        factory: dict[str, Any] | None = None,
        machinetypes: dict[str, dict[str, Any]] | None = None,
        check_files: bool = True,
        **alpha: Any,
    ) -> Config:
        """One machinetype ``alpha`` with these options (or ``machinetypes``), on ``cpus``."""
        types = machinetypes or {
            "alpha": {
                "backend": "fake",
                "image": LONG,
                "target_share": 1,
                "fizzle_seconds": 0,
                "stop_grace_seconds": 30,
                **alpha,
            }
        }
        data = {
            "factory": {
                "space": "space.example.com",
                "hostname": HOST,
                "state_dir": str(self.state_dir),
                "total_processors": cpus,
                **(factory or {}),
            },
            "machinetypes": types,
        }
        path = self.tmp_path / "lmrunner.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path, cpus=cpus, check_files=check_files)

    def factory(self, config: Config, *, tuning: Tuning = TUNING) -> Factory:
        made = Factory(
            config,
            self.store,
            {"fake": self.backend},
            tuning=tuning,
            clock=self.clock,
            rng=random.Random(0),
            load_average=lambda: (0.0, 0.0, 0.0),
        )
        self.factories.append(made)
        return made

    def pass_at(self, factory: Factory, offset: float) -> PassReport:
        """Move the clock to ``T0 + offset`` and run one pass."""
        self.clock.now = T0 + offset
        return factory.run_pass()

    def get(self, uuid: str) -> LmRecord:
        record = self.store.get(uuid)
        assert record is not None
        return record

    def only_active(self) -> LmRecord:
        active = self.store.active()
        assert len(active) == 1, active
        return active[0]

    def engine(self) -> dict[str, dict[str, Any]]:
        """The fake engine's objects by uuid."""
        return {
            file.stem: json.loads(file.read_text())
            for file in sorted(self.backend.engine_dir.glob("*.json"))
        }

    def spec(self, uuid: str, name: str, directory: Path, factory_id: str) -> MachineSpec:
        """What the factory would hand the backend (enough for the fake to start it)."""
        (directory / "joboutputs").mkdir(parents=True, exist_ok=True)
        return MachineSpec(
            uuid=uuid,
            name=name,
            machinetype="alpha",
            image=LONG,
            command=("/user_data",),
            limits=LIMITS,
            mounts=(
                Mount(directory / "joboutputs", FakeBackend.placement.joboutputs, read_only=False),
            ),
            env={},
            labels={LABEL_FACTORY: factory_id, LABEL_NAME: name, LABEL_UUID: uuid},
            directory=directory,
            owner=(os.getuid(), os.getgid()),
            stop_grace_seconds=30,
        )

    def close(self) -> None:
        for factory in self.factories:
            factory.close()
        self.store.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


def outcome_of(record: LmRecord) -> tuple[int, str, OutcomeSource]:
    assert record.outcome is not None
    return record.outcome.code, record.outcome.text, record.outcome.source


def message_file(record: LmRecord) -> Path:
    return record.directory / "joboutputs" / "shutdown_message"


def start_one(env: Env, factory: Factory, offset: float = 0) -> LmRecord:
    report = env.pass_at(factory, offset)
    assert report.started == [LM0]
    record = env.only_active()
    assert record.state is LmState.RUNNING
    assert record.started == T0 + offset
    return record


# --- 1. heartbeat enforcement (§3.6) ---------------------------------------------------------

HEARTBEAT: dict[str, Any] = {
    "heartbeat_file": "heartbeat",
    "heartbeat_seconds": 60,
    "fizzle_seconds": 100,
}


def test_missing_heartbeat_file_stops_the_lm_after_fizzle_seconds(env: Env) -> None:
    factory = env.factory(env.config(**HEARTBEAT))
    lm = start_one(env, factory)
    # Vac's rule is "more than fizzle_seconds ago": at exactly fizzle_seconds it is left alone.
    assert env.pass_at(factory, 100).stopping == []
    assert env.get(lm.uuid).state is LmState.RUNNING

    report = env.pass_at(factory, 100.5)
    assert report.stopping == [LM0]
    stopping = env.get(lm.uuid)
    assert stopping.state is LmState.STOPPING
    assert stopping.stop_reason == heartbeat_outcome(created=False)
    assert stopping.stop_deadline == T0 + 100.5 + 30  # stop_grace_seconds, then the kill
    assert env.engine()[lm.uuid]["stop_at"] == T0 + 100.5  # SIGTERM, not a kill
    assert env.engine()[lm.uuid]["killed_at"] is None

    report = env.pass_at(factory, 100.75)  # the fake ends 0.25 s after SIGTERM
    assert report.finished == [LM0]
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    assert outcome_of(done) == (700, "Heartbeat file not created", OutcomeSource.HEARTBEAT)
    assert done.finished == T0 + 100.75
    # Vac's own reason goes where the payload's would be, since the payload left none.
    assert message_file(done).read_text() == "700 Heartbeat file not created\n"
    assert lm.uuid not in env.engine()


def test_stale_heartbeat_file_stops_the_lm(env: Env) -> None:
    factory = env.factory(env.config(**HEARTBEAT))
    lm = start_one(env, factory)
    beat = lm.directory / "joboutputs" / "heartbeat"
    beat.write_text("alive\n")
    os.utime(beat, (T0 + 41, T0 + 41))
    # Within fizzle_seconds even a stale file is not looked at.
    assert env.pass_at(factory, 100).stopping == []
    # 60 s old is not older than heartbeat_seconds (60): left alone.
    assert env.pass_at(factory, 101).stopping == []
    assert env.get(lm.uuid).state is LmState.RUNNING

    assert env.pass_at(factory, 101.5).stopping == [LM0]
    assert env.get(lm.uuid).stop_reason == heartbeat_outcome(created=True)
    env.pass_at(factory, 101.75)
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    assert outcome_of(done) == (700, "Heartbeat file not updated", OutcomeSource.HEARTBEAT)
    assert done.finished == T0 + 101.75
    assert message_file(done).read_text() == "700 Heartbeat file not updated\n"


def test_fresh_heartbeat_file_is_left_alone(env: Env) -> None:
    factory = env.factory(env.config(**HEARTBEAT))
    lm = start_one(env, factory)
    beat = lm.directory / "joboutputs" / "heartbeat"
    beat.write_text("alive\n")
    for offset in (150, 500, 1000, 3000):
        os.utime(beat, (T0 + offset - 30, T0 + offset - 30))
        report = env.pass_at(factory, offset)
        assert report.stopping == [] and report.finished == []
    record = env.get(lm.uuid)
    assert record.state is LmState.RUNNING
    assert record.stop_reason is None and record.outcome is None
    assert env.engine()[lm.uuid]["stop_at"] is None


def test_heartbeat_seconds_zero_checks_only_existence(env: Env) -> None:
    """heartbeat_seconds 0: only its existence is checked, however old it is."""
    factory = env.factory(env.config(**{**HEARTBEAT, "heartbeat_seconds": 0}))
    lm = start_one(env, factory)
    beat = lm.directory / "joboutputs" / "heartbeat"
    beat.write_text("alive\n")
    os.utime(beat, (T0, T0))
    assert env.pass_at(factory, 3000).stopping == []
    assert env.get(lm.uuid).state is LmState.RUNNING


def test_no_heartbeat_enforcement_without_fizzle_seconds(env: Env) -> None:
    factory = env.factory(env.config(**{**HEARTBEAT, "fizzle_seconds": 0}))
    lm = start_one(env, factory)
    assert env.pass_at(factory, 3000).stopping == []
    assert env.get(lm.uuid).state is LmState.RUNNING


def test_heartbeat_grace_after_a_factory_restart(env: Env) -> None:
    config = env.config(**HEARTBEAT)
    first = env.factory(config)
    lm = start_one(env, first)
    # The daemon restarts at T0 + 50; the LM runs on without a heartbeat file.
    env.clock.now = T0 + 50
    second = env.factory(config)
    second.adopt()
    assert env.get(lm.uuid).state is LmState.RUNNING
    # 150 s after the LM's start but only 100 s after the factory's: left alone.
    assert env.pass_at(second, 150).stopping == []
    assert env.get(lm.uuid).state is LmState.RUNNING
    assert env.pass_at(second, 150.5).stopping == [LM0]
    assert env.get(lm.uuid).stop_reason == heartbeat_outcome(created=False)


def test_heartbeat_stop_keeps_the_payloads_own_message(env: Env) -> None:
    factory = env.factory(env.config(**HEARTBEAT))
    lm = start_one(env, factory)
    assert env.pass_at(factory, 101).stopping == [LM0]
    message_file(lm).write_text("300 No more work\n")  # written on SIGTERM
    env.pass_at(factory, 101.25)
    done = env.get(lm.uuid)
    assert outcome_of(done) == (300, "No more work", OutcomeSource.PAYLOAD)
    assert message_file(done).read_text() == "300 No more work\n"


# --- 2. shutdown_time (§3.3) -----------------------------------------------------------------


def test_factory_shutdown_time_lowers_the_lms_and_stops_it(env: Env) -> None:
    factory = env.factory(env.config())
    lm = start_one(env, factory)
    machine = lm.directory / "machinefeatures" / "shutdowntime"
    job = lm.directory / "jobfeatures" / "shutdowntime_job"
    assert lm.shutdown_time == T0 + 86400
    assert machine.read_text() == job.read_text() == str(T0 + 86400)

    # A factory shutdown_time later than the LM's changes nothing (SIGHUP reload).
    factory.config = env.config(factory={"shutdown_time": T0 + 90000})
    env.pass_at(factory, 5)
    assert env.get(lm.uuid).shutdown_time == T0 + 86400
    assert machine.read_text() == job.read_text() == str(T0 + 86400)

    factory.config = env.config(factory={"shutdown_time": T0 + 1000})
    report = env.pass_at(factory, 10)
    assert report.stopping == []
    lowered = env.get(lm.uuid)
    assert lowered.state is LmState.RUNNING
    assert lowered.shutdown_time == T0 + 1000
    assert machine.read_text() == job.read_text() == str(T0 + 1000)
    assert factory.next_wait() == 0  # reconcile_seconds=0: due at once

    assert env.pass_at(factory, 999.5).stopping == []
    report = env.pass_at(factory, 1000)
    assert report.stopping == [LM0]
    assert report.blocked == f"shutdown_time {T0 + 1000} reached"
    stopping = env.get(lm.uuid)
    assert stopping.state is LmState.STOPPING
    assert stopping.stop_reason == wallclock_outcome()
    assert stopping.stop_deadline == T0 + 1000 + 30

    report = env.pass_at(factory, 1000.25)
    assert report.finished == [LM0] and report.started == []
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    assert outcome_of(done) == (100, "Shutdown time reached", OutcomeSource.WALLCLOCK)
    assert done.finished == T0 + 1000.25
    assert env.store.active() == []
    assert env.engine() == {}


def test_own_shutdowntime_stops_the_lm(env: Env) -> None:
    factory = env.factory(
        env.config(image="fake:seconds=3600;ignore_term=1", max_wallclock_seconds=600)
    )
    lm = start_one(env, factory)
    assert lm.shutdown_time == T0 + 600
    assert env.pass_at(factory, 599).stopping == []
    assert env.pass_at(factory, 600).stopping == [LM0]
    # It ignores SIGTERM: killed once stop_grace_seconds ran out.
    env.pass_at(factory, 629)
    assert env.get(lm.uuid).state is LmState.STOPPING
    env.pass_at(factory, 630)
    assert env.engine()[lm.uuid]["killed_at"] == T0 + 630
    env.pass_at(factory, 630)
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    assert outcome_of(done) == (100, "Shutdown time reached", OutcomeSource.WALLCLOCK)
    assert done.finished == T0 + 630


# --- 3. fizzle and backoff (§3.4) ------------------------------------------------------------


def test_fizzle_counts_as_an_abort_and_backs_off(env: Env) -> None:
    factory = env.factory(
        env.config(image="fake:seconds=2", fizzle_seconds=600, backoff_seconds=100)
    )
    lm = start_one(env, factory)

    report = env.pass_at(factory, 2)
    assert report.finished == [LM0]
    assert report.started == []
    assert report.blocked == f"no eligible machinetype (alpha: backoff until {T0 + 102})"
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    text = "Fizzled after 2 s without a shutdown_message (exit status 0)"
    assert outcome_of(done) == (300, text, OutcomeSource.EXIT_STATUS)
    assert done.finished == T0 + 2
    assert message_file(done).read_text() == f"300 {text}\n"
    assert factory.histories()["alpha"].last_abort == T0 + 2

    for offset in (50, 101, 102):  # backoff_seconds after the abort: nothing starts
        report = env.pass_at(factory, offset)
        assert report.started == [], offset
        assert report.blocked is not None and "backoff" in report.blocked
    assert env.store.active() == []
    report = env.pass_at(factory, 102.5)
    assert report.started == [LM0]
    assert env.only_active().uuid != lm.uuid


def test_end_after_fizzle_seconds_is_no_abort(env: Env) -> None:
    factory = env.factory(
        env.config(image="fake:seconds=700", fizzle_seconds=600, backoff_seconds=100)
    )
    lm = start_one(env, factory)
    report = env.pass_at(factory, 700)
    assert report.finished == [LM0] and report.started == [LM0]  # no backoff
    text = "Exited with status 0 without a shutdown_message"
    assert outcome_of(env.get(lm.uuid)) == (200, text, OutcomeSource.EXIT_STATUS)


# --- 4. start failures -----------------------------------------------------------------------


def test_backend_start_failure(env: Env) -> None:
    factory = env.factory(env.config(image="fake:fail_start=1", backoff_seconds=50))
    report = env.pass_at(factory, 0)
    assert report.started == []
    [failed] = env.store.recent()
    assert failed.state is LmState.FAILED
    text = f"Start failed: fake: scripted start failure for {LM0}"
    assert outcome_of(failed) == (500, text, OutcomeSource.START_FAILED)
    assert failed.finished == T0
    assert failed.started is None and failed.handle is None
    assert env.engine() == {}
    # The prepared directory is kept (for diagnosis) until machines_dir_days; no message in it.
    assert (failed.directory / "user_data").is_file()
    assert (failed.directory / "jobfeatures" / "job_id").read_text() == failed.uuid
    assert not message_file(failed).exists()

    # The factory keeps going: an abort (500) backs off, then it tries again.
    assert env.pass_at(factory, 50).started == []
    env.pass_at(factory, 50.5)
    records = env.store.recent()
    assert len(records) == 2
    assert [r.state for r in records] == [LmState.FAILED, LmState.FAILED]
    assert records[0].finished == T0 + 50.5
    assert env.store.active() == []


def test_missing_user_data_fails_the_start(env: Env) -> None:
    files = env.state_dir / "machinetypes" / "alpha" / "files"
    files.mkdir(parents=True)
    (files / "user_data").write_text("#!/bin/sh\n")
    factory = env.factory(env.config(user_data="user_data", backoff_seconds=10))
    (files / "user_data").unlink()  # removed after the configuration was checked

    assert env.pass_at(factory, 0).started == []
    [failed] = env.store.recent()
    assert failed.state is LmState.FAILED
    code, text, source = outcome_of(failed)
    assert (code, source) == (500, OutcomeSource.START_FAILED)
    assert text.startswith("Start failed: machinetypes.alpha.user_data: cannot read ")
    assert text.endswith("No such file or directory")
    assert failed.finished == T0
    assert not failed.directory.exists()  # no half-made directory stays behind
    assert env.engine() == {}

    (files / "user_data").write_text("#!/bin/sh\n")
    assert env.pass_at(factory, 10.5).started == [LM0]
    assert env.only_active().state is LmState.RUNNING


# --- 5. adoption of half-created LMs --------------------------------------------------------


def bare_record(env: Env, slot: int, uuid: str, **extra: Any) -> LmRecord:
    name = f"factory-{slot:02d}.example.com"
    return LmRecord(
        uuid=uuid,
        name=name,
        machinetype="alpha",
        backend="fake",
        slot=slot,
        processors=1,
        limits=LIMITS,
        hs06=1.0,
        shutdown_time=T0 + 86400,
        directory=env.state_dir / "machines" / f"{T0}_alpha_{name}_{uuid[:8]}",
        created=T0 - 60,
        **extra,
    )


def test_adopt_settles_half_created_lms(env: Env) -> None:
    config = env.config(cpus=2)
    factory_id = env.store.factory_id
    creating = env.store.insert(bare_record(env, 0, "11111111-creating"))
    creating.directory.mkdir(parents=True)
    starting = env.store.insert(bare_record(env, 1, "22222222-starting"))
    env.store.transition(starting.uuid, LmState.STARTING)
    env.backend.start(env.spec(starting.uuid, starting.name, starting.directory, factory_id))
    assert set(env.engine()) == {starting.uuid}

    env.clock.now = T0 + 5
    factory = env.factory(config)
    report = factory.adopt()
    assert sorted(report.finished) == sorted([creating.name, starting.name])
    for record in (creating, starting):
        done = env.get(record.uuid)
        assert done.state is LmState.FAILED
        assert done.outcome == RESTART_OUTCOME
        assert outcome_of(done) == (
            100,
            "Start interrupted by a factory restart",
            OutcomeSource.START_FAILED,
        )
        assert done.finished == T0 + 5
        assert not record.directory.exists()
    assert env.engine() == {}
    assert env.store.active() == []
    assert env.backend.notify is not None  # adopt() asked for exit notifications

    # No backoff (100 is no abort): both slots fill in the next pass.
    assert sorted(env.pass_at(factory, 5).started) == [LM0, "factory-01.example.com"]


# --- 6. orphans ------------------------------------------------------------------------------


def test_orphans_are_removed_after_the_grace_only(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    factory = env.factory(env.config(target_share=0))
    mine = "33333333-orphan"
    theirs = "44444444-other"
    finished = "55555555-finished"
    env.backend.start(
        env.spec(mine, "factory-07.example.com", env.tmp_path / "m", factory.store.factory_id)
    )
    env.backend.start(
        env.spec(theirs, "other-00.example.com", env.tmp_path / "t", "another-factory")
    )
    # A finished LM whose engine object a failed destroy left behind: removed at once.
    record = bare_record(env, 3, finished, state=LmState.FINISHED, finished=T0 - 10.0)
    env.store.insert(record)
    env.backend.start(env.spec(finished, record.name, env.tmp_path / "f", factory.store.factory_id))

    with caplog.at_level(logging.WARNING, logger="lmrunner.factory"):
        env.pass_at(factory, 0)
    assert set(env.engine()) == {mine, theirs}
    reported = [r.getMessage() for r in caplog.records]
    assert any(mine in line and "removal after grace" in line for line in reported)
    assert not any(theirs in line for line in reported)

    env.pass_at(factory, 299.5)
    assert set(env.engine()) == {mine, theirs}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmrunner.factory"):
        env.pass_at(factory, 300)
    assert set(env.engine()) == {theirs}
    assert any(mine in r.getMessage() and "removing" in r.getMessage() for r in caplog.records)
    for offset in (600, 10_000):  # another factory's objects are never touched
        env.pass_at(factory, offset)
    assert set(env.engine()) == {theirs}
    assert env.store.get(mine) is None  # orphans get no record


# --- 7. draining -----------------------------------------------------------------------------


def test_drain_stops_starts_and_undrain_resumes(env: Env) -> None:
    factory = env.factory(env.config(cpus=2))
    env.store.set_meta("draining", "1")  # `lmrunner drain`
    report = env.pass_at(factory, 0)
    assert report.started == []
    assert report.blocked == "draining"
    assert env.store.recent() == []
    assert env.engine() == {}
    env.store.set_meta("draining", None)  # `lmrunner undrain`
    report = env.pass_at(factory, 1)
    assert sorted(report.started) == [LM0, "factory-01.example.com"]
    assert report.blocked is None


def test_drain_leaves_running_lms_alone(env: Env) -> None:
    factory = env.factory(env.config())
    lm = start_one(env, factory)
    env.store.set_meta("draining", "1")
    report = env.pass_at(factory, 10)
    assert report.stopping == [] and report.started == []
    assert env.get(lm.uuid).state is LmState.RUNNING


# --- 8. operator requests --------------------------------------------------------------------


def test_operator_kill_is_immediate(env: Env) -> None:
    factory = env.factory(env.config(image="fake:seconds=3600;ignore_term=1"))
    lm = start_one(env, factory)
    env.store.add_request(lm.uuid, "kill")
    report = env.pass_at(factory, 10)
    assert report.stopping == [LM0]
    assert report.finished == [LM0]  # in the same pass
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    assert done.stop_reason == operator_outcome(forced=True)
    assert outcome_of(done) == (100, "Killed by operator", OutcomeSource.OPERATOR)
    assert done.stop_deadline == T0 + 10
    assert done.finished == T0 + 10
    assert message_file(done).read_text() == "100 Killed by operator\n"
    assert lm.uuid not in env.engine()
    assert env.store.take_requests() == []


def test_operator_stop_waits_for_the_grace(env: Env) -> None:
    factory = env.factory(env.config(image="fake:seconds=3600;ignore_term=1"))
    lm = start_one(env, factory)
    env.store.add_request(lm.uuid, "stop", 5)
    assert env.pass_at(factory, 10).stopping == [LM0]
    stopping = env.get(lm.uuid)
    assert stopping.state is LmState.STOPPING
    assert stopping.stop_deadline == T0 + 15
    env.pass_at(factory, 14.5)
    assert env.get(lm.uuid).state is LmState.STOPPING
    env.pass_at(factory, 15)  # grace over: killed
    env.pass_at(factory, 15)  # and noticed
    done = env.get(lm.uuid)
    assert outcome_of(done) == (100, "Stopped by operator", OutcomeSource.OPERATOR)
    assert done.finished == T0 + 15


class StuckFake(QuietFake):
    """An engine that does not manage to stop its LM (a process in D state, a hung VM)."""

    stops = 0

    def stop(self, uuid: str, handle: Handle, *, force: bool = False) -> None:
        self.stops += 1


def test_a_kill_that_does_not_take_does_not_make_the_loop_spin(env: Env) -> None:
    stuck = env.backend = StuckFake(env.state_dir / "fake-engine", clock=env.clock)
    factory = env.factory(env.config(), tuning=Tuning(reconcile_seconds=30, idle_wait_seconds=5))
    lm = start_one(env, factory)
    env.store.add_request(lm.uuid, "kill")
    env.pass_at(factory, 1)
    assert env.get(lm.uuid).state is LmState.STOPPING
    # The kill is sent; its exit arrives as an event. The overdue deadline is not due again.
    assert factory.next_wait() == 5.0
    env.pass_at(factory, 6)
    assert factory.next_wait() == 5.0
    # The request's kill, the overdue deadline's, then one retry per wait (no busy loop).
    assert stuck.stops == 3


# --- 9. OOM ----------------------------------------------------------------------------------


def test_oom_kill_without_a_message(env: Env) -> None:
    # fizzle_seconds longer than its life: the OOM kill still wins over a fizzle.
    factory = env.factory(env.config(image="fake:seconds=5;oom=1", fizzle_seconds=600))
    lm = start_one(env, factory)
    assert env.pass_at(factory, 4.5).finished == []
    assert env.pass_at(factory, 5).finished == [LM0]
    done = env.get(lm.uuid)
    assert done.state is LmState.FINISHED
    text = "Killed for exceeding its memory limit (OOM)"
    assert outcome_of(done) == (700, text, OutcomeSource.OOM)
    assert done.finished == T0 + 5
    assert message_file(done).read_text() == f"700 {text}\n"


def test_payload_message_wins_over_oom(env: Env) -> None:
    factory = env.factory(env.config(image="fake:seconds=5;oom=1;message=300 No more work"))
    lm = start_one(env, factory)
    env.pass_at(factory, 5)
    assert outcome_of(env.get(lm.uuid)) == (300, "No more work", OutcomeSource.PAYLOAD)


# --- 10. cleanup of LM directories (§7.3) ---------------------------------------------------


def test_cleanup_directories(env: Env) -> None:
    config = env.config(
        machinetypes={
            "keep2": {"backend": "fake", "image": LONG, "target_share": 0, "machines_dir_days": 2},
            "forever": {
                "backend": "fake",
                "image": LONG,
                "target_share": 0,
                "machines_dir_days": 0,
            },
        }
    )
    factory = env.factory(config)
    day = 86400.0
    cases = {
        "old": ("keep2", T0 - 2 * day - 1),  # older than machines_dir_days: removed
        "young": ("keep2", T0 - 2 * day + 1),  # younger: kept
        "exact": ("keep2", T0 - 2 * day),  # exactly machines_dir_days: kept ("older than")
        "never": ("forever", T0 - 100 * day),  # machines_dir_days 0: kept forever
        "gone": ("unconfigured", T0 - 3 * day - 1),  # type no longer configured: 3 days
    }
    records: dict[str, LmRecord] = {}
    for slot, (key, (machinetype, finished)) in enumerate(cases.items()):
        record = bare_record(env, slot, f"{slot:08d}-{key}", state=LmState.FINISHED)
        record = replace(record, machinetype=machinetype, finished=finished)
        (record.directory / "joboutputs").mkdir(parents=True)
        records[key] = env.store.insert(record)
    running = running_lm(env, factory)

    removed = factory.cleanup_directories()
    assert sorted(removed) == sorted([records["old"].directory, records["gone"].directory])
    for key, record in records.items():
        now = env.get(record.uuid)
        assert now.cleaned is (key in ("old", "gone")), key
        assert record.directory.exists() is (key not in ("old", "gone")), key
    assert running.directory.is_dir()
    assert factory.cleanup_directories() == []  # cleaned ones are not looked at again

    env.clock.now = T0 + 0.5  # now just older than machines_dir_days
    assert factory.cleanup_directories() == [records["exact"].directory]
    assert env.get(records["young"].uuid).cleaned is False


def test_the_daemons_passes_clean_up_hourly(env: Env) -> None:
    config = env.config(
        machinetypes={
            "keep": {"backend": "fake", "image": LONG, "target_share": 0, "machines_dir_days": 1}
        }
    )
    factory = env.factory(config)
    old = bare_record(env, 0, "00000000-old", state=LmState.FINISHED)
    old = env.store.insert(replace(old, machinetype="keep", finished=T0 - 86400 - 1))
    old.directory.mkdir(parents=True)
    factory.run_pass()  # the first pass reconciles, and reconciling cleans up when due
    assert not old.directory.exists()
    assert env.get(old.uuid).cleaned is True


def running_lm(env: Env, factory: Factory) -> LmRecord:
    """A running LM (its directory must survive any cleanup)."""
    lm = env.store.insert(bare_record(env, 9, "99999999-running"))
    lm.directory.mkdir(parents=True)
    env.store.transition(lm.uuid, LmState.STARTING)
    handle = env.backend.start(env.spec(lm.uuid, lm.name, lm.directory, env.store.factory_id))
    return env.store.transition(lm.uuid, LmState.RUNNING, handle=handle, started=T0 - 1.0)


# --- 11. several LMs per pass ----------------------------------------------------------------


def test_an_empty_factory_fills_all_processors_in_one_pass(env: Env) -> None:
    factory = env.factory(env.config(cpus=4))
    assert factory.config.factory.total_processors == 4
    report = env.pass_at(factory, 0)
    names = [f"factory-{n:02d}.example.com" for n in range(4)]
    assert sorted(report.started) == names
    active = env.store.active()
    assert [r.slot for r in active] == [0, 1, 2, 3]
    assert [r.name for r in active] == names
    assert all(r.state is LmState.RUNNING and r.started == T0 for r in active)
    assert set(env.engine()) == {r.uuid for r in active}
    assert len({r.directory for r in active}) == 4
    report = env.pass_at(factory, 1)
    assert report.started == []
    assert report.blocked == "all 4 processors in use"


def test_max_starts_per_pass_limits_a_pass(env: Env) -> None:
    factory = env.factory(
        env.config(cpus=4), tuning=Tuning(max_starts_per_pass=3, reconcile_seconds=0)
    )
    assert len(env.pass_at(factory, 0).started) == 3
    assert env.pass_at(factory, 1).started == ["factory-03.example.com"]
    assert len(env.store.active()) == 4
