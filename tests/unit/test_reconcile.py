"""lmrunner.reconcile without a Factory: the Reaper fed owned engine objects by hand (FaultyFake
records and breaks destroy), and cleanup_directories on records in a Store in tmp_path."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lmrunner.backends.base import Backend, Handle, Owned
from lmrunner.errors import BackendError
from lmrunner.lifecycle import LmState
from lmrunner.reconcile import DEFAULT_DIR_DAYS, Reaper, cleanup_directories
from lmrunner.state import LmRecord
from tests.unit.test_factory import T0, Env, bare_record
from tests.unit.test_factory_faults import FaultyFake

LOGGER = "lmrunner.factory"
GRACE = 300.0
DAY = 86400.0


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.env = Env(tmp_path)
        self.engine = FaultyFake(self.env.state_dir / "fake-engine", clock=self.env.clock)
        self.env.backend = self.engine
        self.reaper = Reaper(self.env.store, self.env.clock, GRACE)
        self.mine = self.env.store.factory_id

    def owned(self, uuid: str, name: str = "lm", factory: str | None = None) -> Owned:
        return Owned(
            uuid, name, self.mine if factory is None else factory, Handle(1, {"uuid": uuid})
        )

    def reap_at(self, offset: float, objects: list[Owned], active: set[str] | None = None) -> None:
        self.env.clock.now = T0 + offset
        listing: dict[str, tuple[Backend, list[Owned]]] = {"fake": (self.engine, objects)}
        self.reaper.reap(listing, active or set())

    def destroyed(self) -> list[str]:
        return [uuid for method, uuid in self.engine.calls if method == "destroy"]


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    made = Setup(tmp_path)
    yield made
    made.env.close()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_an_ended_lms_leftover_is_destroyed_at_once(
    s: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    for slot, (uuid, state) in enumerate(
        [("11111111-finished", LmState.FINISHED), ("22222222-failed", LmState.FAILED)]
    ):
        s.env.store.insert(bare_record(s.env, slot, uuid, state=state, finished=T0 - 10.0))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        s.reap_at(0, [s.owned("11111111-finished", "f0"), s.owned("22222222-failed", "f1")])
    assert s.destroyed() == ["11111111-finished", "22222222-failed"]
    assert "lm=f0: engine object of the ended LM removed" in caplog.text
    assert warnings(caplog) == []


def test_an_orphan_is_removed_only_after_the_grace(
    s: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    orphan = s.owned("33333333-orphan", "o")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s.reap_at(0, [orphan])
        s.reap_at(GRACE - 0.5, [orphan])
    assert s.destroyed() == []
    assert (
        warnings(caplog)
        == ["orphan o (33333333-orphan) of fake: no record; removal after grace"] * 2
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s.reap_at(GRACE, [orphan])
    assert s.destroyed() == ["33333333-orphan"]
    assert warnings(caplog) == ["orphan o (33333333-orphan) of fake: no record; removing"]


def test_a_grace_of_zero_removes_an_orphan_at_first_sight(s: Setup) -> None:
    s.reaper = Reaper(s.env.store, s.env.clock, 0)
    s.reap_at(0, [s.owned("33333333-orphan")])
    assert s.destroyed() == ["33333333-orphan"]


def test_an_orphan_that_went_away_starts_a_new_grace_when_it_returns(s: Setup) -> None:
    orphan = s.owned("44444444-orphan")
    s.reap_at(0, [orphan])
    s.reap_at(100, [])  # gone (or not listed): forgotten
    s.reap_at(GRACE + 10, [orphan])
    assert s.destroyed() == []
    s.reap_at(GRACE + 10 + GRACE, [orphan])
    assert s.destroyed() == ["44444444-orphan"]


def test_active_lms_objects_are_left_alone(s: Setup) -> None:
    running = s.env.store.insert(bare_record(s.env, 0, "55555555-running"))
    item = s.owned(running.uuid)
    for offset in (0, GRACE, 10 * GRACE):
        s.reap_at(offset, [item], {running.uuid})
    assert s.destroyed() == []


def test_other_factories_objects_are_never_touched(
    s: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    # Even one whose uuid this store knows as ended: the label decides, not the uuid.
    s.env.store.insert(
        bare_record(s.env, 0, "66666666-ended", state=LmState.FINISHED, finished=T0 - 1.0)
    )
    theirs = [
        s.owned("66666666-ended", "t0", factory="another-factory"),
        s.owned("77777777-theirs", "t1", factory="another-factory"),
        s.owned("88888888-unlabelled", "t2", factory=""),
    ]
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for offset in (0, GRACE, 10 * GRACE):
            s.reap_at(offset, theirs)
    assert s.destroyed() == []
    assert caplog.records == []


def test_a_destroy_that_raises_is_logged_and_retried(
    s: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    s.env.store.insert(
        bare_record(s.env, 0, "99999999-ended", state=LmState.FINISHED, finished=T0 - 1.0)
    )
    ended, orphan = s.owned("99999999-ended", "e"), s.owned("aaaaaaaa-orphan", "o")
    s.engine.faults[("destroy", ended.uuid)] = BackendError("fake", "engine busy")
    s.engine.faults[("destroy", orphan.uuid)] = RuntimeError("engine surprise")
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        s.reap_at(0, [ended, orphan])
        s.reap_at(GRACE, [ended, orphan])
    assert s.destroyed() == [ended.uuid, ended.uuid, orphan.uuid]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "lm=e: fake: engine busy (retried later)",
        "lm=e: fake: engine busy (retried later)",
        "lm=o: unexpected error (retried later)",
    ]
    assert errors[-1].exc_info is not None

    s.engine.faults.clear()
    s.reap_at(GRACE + 1, [ended, orphan])  # the orphan's grace is over already: no new wait
    assert s.destroyed()[-2:] == [ended.uuid, orphan.uuid]


def test_one_backends_failure_does_not_stop_the_others(s: Setup, tmp_path: Path) -> None:
    second = FaultyFake(tmp_path / "second-engine", clock=s.env.clock)
    s.engine.faults[("destroy", "bbbbbbbb-one")] = BackendError("fake", "engine busy")
    s.reaper = Reaper(s.env.store, s.env.clock, 0)
    s.reaper.reap(
        {
            "fake": (s.engine, [s.owned("bbbbbbbb-one")]),
            "second": (second, [s.owned("cccccccc-two")]),
        },
        set(),
    )
    assert s.destroyed() == ["bbbbbbbb-one"]
    assert second.calls == [("destroy", "cccccccc-two")]


# --- cleanup_directories -------------------------------------------------------------------------


def finished_lm(s: Setup, slot: int, machinetype: str, finished: float) -> LmRecord:
    record = bare_record(
        s.env, slot, f"{slot:08d}-{machinetype}", state=LmState.FINISHED, finished=finished
    )
    record = s.env.store.insert(replace(record, machinetype=machinetype))
    (record.directory / "joboutputs").mkdir(parents=True)
    return record


def test_cleanup_honours_machines_dir_days_per_machinetype(s: Setup) -> None:
    config = s.env.config(
        machinetypes={
            "alpha": {"backend": "fake", "image": "fake:", "machines_dir_days": 1},
            "beta": {"backend": "fake", "image": "fake:", "machines_dir_days": 5},
            "forever": {"backend": "fake", "image": "fake:", "machines_dir_days": 0},
        }
    )
    now = T0 + 100 * DAY
    records = {
        "alpha-old": finished_lm(s, 0, "alpha", now - 1 * DAY - 1),
        "alpha-young": finished_lm(s, 1, "alpha", now - 1 * DAY),  # exactly a day: kept
        "beta-old": finished_lm(s, 2, "beta", now - 5 * DAY - 1),
        "beta-young": finished_lm(s, 3, "beta", now - 4 * DAY),
        "forever": finished_lm(s, 4, "forever", now - 99 * DAY),
        "gone-old": finished_lm(s, 5, "gone", now - DEFAULT_DIR_DAYS * DAY - 1),
        "gone-young": finished_lm(s, 6, "gone", now - 2.9 * DAY),
    }
    active = s.env.store.insert(bare_record(s.env, 7, "77777777-active"))
    active.directory.mkdir(parents=True)

    removed = cleanup_directories(config, s.env.store, now)

    old = {"alpha-old", "beta-old", "gone-old"}
    assert sorted(removed) == sorted(records[key].directory for key in old)
    for key, record in records.items():
        assert record.directory.exists() is (key not in old), key
        stored = s.env.get(record.uuid)
        assert stored.cleaned is (key in old), key
    assert active.directory.exists()
    # Cleaned once: a second look finds nothing more to do.
    assert cleanup_directories(config, s.env.store, now) == []


def test_cleanup_of_a_machinetype_kept_forever_and_no_others(s: Setup) -> None:
    config = s.env.config(machines_dir_days=0)
    record = finished_lm(s, 0, "alpha", T0)
    assert cleanup_directories(config, s.env.store, T0 + 1000 * DAY) == []
    assert record.directory.exists()


def test_cleanup_removes_a_planted_link_not_its_target(s: Setup, tmp_path: Path) -> None:
    config = s.env.config(machines_dir_days=1)
    record = finished_lm(s, 0, "alpha", T0)
    target = tmp_path / "host-folder"
    target.mkdir()
    (target / "precious").write_text("keep me")
    (record.directory / "joboutputs" / "link").symlink_to(target)
    assert cleanup_directories(config, s.env.store, T0 + 2 * DAY) == [record.directory]
    assert not record.directory.exists()
    assert (target / "precious").read_text() == "keep me"
