"""Bounded history: which ended LMs and accounting records leave the store, and which stay."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lmrunner.config import Config
from lmrunner.ending import accounting_record
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.prune import BATCH, DAY, Pruner
from lmrunner.state import LmRecord
from tests.unit.test_factory import T0, Env, bare_record

DONE = Outcome(200, "Intended work completed ok", OutcomeSource.PAYLOAD)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def config(env: Env, **factory: object) -> Config:
    return env.config(factory={"disk_method": "none", **factory})


def ended(env: Env, index: int, days_ago: float, **extra: object) -> LmRecord:
    """An LM created and ended ``days_ago``, with its accounting record (the store's way)."""
    uuid = f"{index:08d}-0000-4000-8000-000000000000"
    when = T0 - days_ago * DAY
    record = env.store.insert(replace(bare_record(env, index % 4, uuid), created=when - 60))
    env.store.transition(uuid, LmState.STARTING)
    env.store.transition(uuid, LmState.RUNNING, started=when - 50)
    done = env.store.finish(uuid, LmState.FINISHED, lambda r: accounting_record(r, None, None),
                            outcome=DONE, finished=when)  # fmt: skip
    if extra.get("cleaned", True):
        env.store.update(uuid, cleaned=True)
    assert record.uuid == done.uuid
    return done


def uuids(env: Env) -> set[str]:
    return {r.uuid[:8] for r in env.store.recent()}


def test_old_cleaned_accounted_lms_go_but_each_types_latest_stays(env: Env) -> None:
    for index, age in enumerate([90, 60, 40, 35, 10, 1]):
        ended(env, index, age)
    pruner = Pruner(lambda: config(env, history_days=30), clock=lambda: T0)
    lms, _accounting = pruner.round(env.store)
    assert lms == 4
    assert uuids(env) == {"00000004", "00000005"}
    # All of alpha's old ones went; had they been its latest, one would stay:
    assert Pruner(lambda: config(env, history_days=0.5), clock=lambda: T0).round(env.store)[0] == 1
    assert uuids(env) == {"00000005"}


def test_uncleaned_and_unaccounted_lms_stay(env: Env) -> None:
    ended(env, 0, 90, cleaned=False)  # its directory is still there: cleanup needs the row
    unaccounted = ended(env, 1, 80)
    env.store.db.execute("DELETE FROM accounting WHERE uuid = ?", (unaccounted.uuid,))
    ended(env, 2, 1)
    assert Pruner(lambda: config(env, history_days=30), clock=lambda: T0).round(env.store)[0] == 0
    assert uuids(env) == {"00000000", "00000001", "00000002"}


def test_history_days_0_keeps_everything(env: Env) -> None:
    for index in range(3):
        ended(env, index, 400 - index)
    assert Pruner(lambda: config(env, history_days=0, accounting_days=0),
                  clock=lambda: T0).round(env.store) == (0, 0)  # fmt: skip
    assert len(uuids(env)) == 3


def test_accounting_goes_after_its_lm_and_apel(env: Env) -> None:
    for index, age in enumerate([500, 400, 2]):
        ended(env, index, age)
    env.store.db.execute("UPDATE accounting SET apel_written = 1 WHERE uuid LIKE '00000000%'")
    pruner = Pruner(lambda: config(env, history_days=30, accounting_days=300), clock=lambda: T0)
    assert pruner.round(env.store) == (2, 1)  # 00000001's APEL message is not written yet
    left = {r.uuid[:8] for r in env.store.accounting()}
    assert left == {"00000001", "00000002"}


def test_batches_remove_everything_due(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmrunner.prune.BATCH", 2)
    monkeypatch.setattr("lmrunner.prune.PAUSE_SECONDS", 0)
    for index in range(7):
        ended(env, index, 100 - index)
    ended(env, 99, 1)
    assert Pruner(lambda: config(env, history_days=30), clock=lambda: T0).round(env.store)[0] == 7
    assert uuids(env) == {"00000099"}
    assert BATCH >= 100  # the real batch: a handful of milliseconds of the loop's time
