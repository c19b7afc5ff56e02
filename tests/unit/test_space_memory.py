"""The space watch keeps each factory's last reply for a while: a round that lost a datagram
(or all of one factory's) must not make its LMs or its abort vanish from the planner's view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lmrunner.vacquery import client, space
from lmrunner.vacquery.space import KEEP_SECONDS, SpaceWatch
from tests.unit.test_factory import Env

A, B = "a.example.com", "b.example.com"


def reply(factory: str, machinetype: str, **values: Any) -> dict[str, Any]:
    return {"factory": factory, "machinetype": machinetype, "running_hs06": 2.0,
            "running_processors": 2, "running_machines": 1, "num_before_fizzle": 0,
            "shutdown_message": None, "shutdown_time": None, **values}  # fmt: skip


def rounds(monkeypatch: pytest.MonkeyPatch, results: list[dict[str, dict[str, Any]]]) -> None:
    """client.query answers these, round after round (factory -> machinetype -> reply)."""

    def query(kind: str, names: Any, *args: Any, **kwargs: Any) -> client.Answers:
        got = results.pop(0)
        answers = client.Answers("machinetype_status", {n: {} for n in names})
        for name, items in got.items():
            answers.replies[name] = dict(items)
        return answers

    monkeypatch.setattr(client, "query", query)


def test_a_lost_reply_keeps_its_abort_and_lms_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Env(tmp_path)
    config = env.config(cpus=1, factory={"disk_method": "none", "factories": [".", A, B]})
    now = [1000.0]
    watch = SpaceWatch(lambda: config, clock=lambda: now[0])
    aborted = reply(A, "alpha", shutdown_message="300 No more work", shutdown_time=990)
    rounds(monkeypatch, [
        {A: {"alpha": aborted}, B: {"alpha": reply(B, "alpha")}},
        {B: {"alpha": reply(B, "alpha")}},  # A's reply lost
        {B: {"alpha": reply(B, "alpha")}},
    ])  # fmt: skip
    first = watch.round()
    assert first.types["alpha"].last_abort == 990 and first.types["alpha"].running_machines == 2
    now[0] += 5
    second = watch.round()
    assert second.silent == (A,)  # said as it is ...
    assert second.types["alpha"].last_abort == 990  # ... but what A said still counts
    assert second.types["alpha"].running_machines == 2
    now[0] += KEEP_SECONDS
    third = watch.round()
    assert third.types["alpha"].last_abort is None  # too old now: A is gone from the view
    assert third.types["alpha"].running_machines == 1


def test_silent_excludes_vac_factories_that_answered_unsigned() -> None:
    answers = client.Answers("machinetype_status", {A: {}, B: {}}, signed=True, unsigned={A})
    assert space.aggregate(answers, 0.0).silent == (B,)
