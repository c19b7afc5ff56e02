"""lmrunner.lmcgroups without a Factory: LmCgroups on the in-memory FakeCgroups and a Store in
tmp_path; host_cgroups and peak."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner import lmcgroups
from lmrunner.backends.base import LmCgroup
from lmrunner.cgroups import CgroupRef, Usage
from lmrunner.errors import CgroupError, CgroupUnsupported
from lmrunner.lifecycle import LmState
from lmrunner.lmcgroups import PID_MAX, LmCgroups, cgroup_name, host_cgroups, peak
from lmrunner.model import Limits
from lmrunner.state import LmRecord
from tests.unit.test_factory import T0, Env, bare_record
from tests.unit.test_factory_cgroups import PARENT, USED, FakeCgroups, Limited

LOGGER = "lmrunner.lmcgroups"
MIB = 1 << 20
LIMITS = Limits(
    processors=2,
    memory_bytes=4096 * MIB,
    swap_bytes=512 * MIB,
    disk_bytes=10**9,
    hs06=None,
    pids=8192,
)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


@pytest.fixture
def fake() -> FakeCgroups:
    return FakeCgroups()


@pytest.fixture
def lm_cgroups(env: Env, fake: FakeCgroups) -> LmCgroups:
    return LmCgroups(fake, env.store)


def ref_of(uuid: str) -> CgroupRef:
    name = cgroup_name(uuid)
    return CgroupRef(2, name, (("unified", f"{PARENT}/{name}"),))


def active(env: Env, slot: int, uuid: str, **extra: Any) -> LmRecord:
    return env.store.insert(bare_record(env, slot, uuid, **extra))


def ended(env: Env, slot: int, uuid: str, *, cgroup: bool, fake: FakeCgroups) -> LmRecord:
    """A finished LM; ``cgroup``: its row still names its cgroup (its removal failed)."""
    fake.live.add(cgroup_name(uuid))
    return env.store.insert(
        bare_record(
            env,
            slot,
            uuid,
            state=LmState.FINISHED,
            started=T0 - 50.0,
            finished=T0 - 10.0,
            cgroup=ref_of(uuid).to_json() if cgroup else None,
        )
    )


def cgroup_of(env: Env, uuid: str) -> str | None:
    record = env.store.get(uuid)
    assert record is not None
    return record.cgroup


def test_cgroup_name_is_by_uuid() -> None:
    assert cgroup_name("1234-abcd") == "lm-1234-abcd"


# --- make ----------------------------------------------------------------------------------------


def test_without_a_controller_make_makes_nothing(env: Env) -> None:
    record = active(env, 0, "00000000-none")
    assert LmCgroups(None, env.store).make(record, LIMITS, owner=(1000, 1000)) is None
    assert cgroup_of(env, record.uuid) is None


class CheckingCgroups(FakeCgroups):
    """Remembers what the store said about the LM's cgroup when it was limited."""

    def __init__(self, env: Env) -> None:
        super().__init__()
        self.env = env
        self.recorded_at_limits: list[str | None] = []

    def set_limits(
        self, ref: CgroupRef, *, cpus: float, memory_bytes: int, swap_bytes: int, pids: int
    ) -> None:
        self.recorded_at_limits.append(cgroup_of(self.env, ref.name.removeprefix("lm-")))
        super().set_limits(
            ref, cpus=cpus, memory_bytes=memory_bytes, swap_bytes=swap_bytes, pids=pids
        )


def test_make_records_then_limits_and_returns_what_the_engine_needs(env: Env) -> None:
    fake = CheckingCgroups(env)
    record = active(env, 0, "11111111-make")
    made = LmCgroups(fake, env.store).make(record, LIMITS, owner=(1000, 1000), overhead=64 * MIB)
    name = "lm-11111111-make"
    ref = ref_of(record.uuid)
    assert made == LmCgroup(
        ref=ref,
        procs_files=(Path(PARENT) / name / "cgroup.procs",),
        engine_path=f"/lmrunner/{name}",
    )
    assert fake.of(name) == ["create", "set_limits"]  # not delegated unless asked
    # Recorded before it is limited (and so before anything can run in it).
    assert fake.recorded_at_limits == [ref.to_json()]
    assert cgroup_of(env, record.uuid) == ref.to_json()
    assert fake.limits[name] == Limited(
        cpus=2.0, memory_bytes=(4096 + 64) * MIB, swap_bytes=512 * MIB, pids=8192
    )


def test_no_pids_limit_is_the_kernels_maximum(env: Env, fake: FakeCgroups) -> None:
    record = active(env, 0, "22222222-pids")
    LmCgroups(fake, env.store).make(record, replace(LIMITS, pids=0), owner=(1000, 1000))
    assert fake.limits["lm-22222222-pids"].pids == PID_MAX == 4_194_304


@pytest.mark.parametrize(
    ("delegate", "owner", "delegated"),
    [(True, (1000, 1000), True), (True, (0, 0), False), (False, (1000, 1000), False)],
    ids=["to-an-account", "never-to-root", "not-asked"],
)
def test_delegation_only_when_asked_and_never_to_root(
    env: Env, fake: FakeCgroups, delegate: bool, owner: tuple[int, int], delegated: bool
) -> None:
    record = active(env, 0, "33333333-deleg")
    LmCgroups(fake, env.store).make(record, LIMITS, owner=owner, delegate=delegate)
    assert ("delegate" in fake.of("lm-33333333-deleg")) is delegated
    if delegated:
        assert fake.of("lm-33333333-deleg") == ["create", "set_limits", "delegate"]


def test_a_cgroup_that_cannot_be_limited_stays_recorded_for_its_removal(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups
) -> None:
    record = active(env, 0, "44444444-limit")
    fake.fail_limits = True
    with pytest.raises(CgroupError, match=r"memory\.max"):
        lm_cgroups.make(record, LIMITS, owner=(1000, 1000))
    recorded = env.store.get(record.uuid)
    assert recorded is not None and recorded.cgroup == ref_of(record.uuid).to_json()
    assert lm_cgroups.remove(recorded) is True
    assert fake.live == set()
    assert cgroup_of(env, record.uuid) is None


# --- usage ---------------------------------------------------------------------------------------


def test_usage_of_an_lm_without_a_cgroup_is_none(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups
) -> None:
    record = active(env, 0, "55555555-nocg")
    assert lm_cgroups.usage(record) is None
    assert fake.calls == []


def test_usage_reads_the_controller(env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups) -> None:
    record = active(env, 0, "66666666-usage")
    made = lm_cgroups.make(record, LIMITS, owner=(1000, 1000))
    assert made is not None
    recorded = env.store.get(record.uuid)
    assert recorded is not None
    assert lm_cgroups.usage(recorded) == USED
    assert LmCgroups(None, env.store).usage(recorded) is None  # a host without cgroups now


def test_an_unreadable_reference_or_counters_are_logged_and_none(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    garbled = active(env, 0, "77777777-garbled", cgroup="{not json")
    gone = active(env, 1, "88888888-gone", cgroup=ref_of("88888888-gone").to_json())
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert lm_cgroups.usage(garbled) is None
        assert lm_cgroups.usage(gone) is None  # not live in the fake: its files cannot be read
    assert [r.getMessage().split(":")[0:2] for r in caplog.records] == [
        [f"lm={garbled.name}", " unreadable cgroup reference"],
        [f"lm={gone.name}", " cannot read its cgroup"],
    ]


# --- remove --------------------------------------------------------------------------------------


def test_removing_an_lm_without_a_cgroup_is_done(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups
) -> None:
    record = active(env, 0, "99999999-nocg")
    assert lm_cgroups.remove(record) is True
    assert LmCgroups(None, env.store).remove(record) is True
    assert fake.calls == []


def test_remove_kills_then_removes_and_forgets_the_cgroup(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups
) -> None:
    record = active(env, 0, "aaaaaaaa-remove")
    lm_cgroups.make(record, LIMITS, owner=(1000, 1000))
    recorded = env.store.get(record.uuid)
    assert recorded is not None
    assert lm_cgroups.remove(recorded) is True
    assert fake.of("lm-aaaaaaaa-remove") == ["create", "set_limits", "kill", "remove"]
    assert fake.live == set()
    assert cgroup_of(env, record.uuid) is None


def test_a_cgroup_that_cannot_be_removed_is_kept_for_a_retry(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    record = ended(env, 0, "bbbbbbbb-busy", cgroup=True, fake=fake)
    fake.fail_remove = True
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert lm_cgroups.remove(record) is False
    assert "cannot remove its cgroup yet" in caplog.text
    assert cgroup_of(env, record.uuid) == record.cgroup
    assert env.store.leftover_cgroups() == [record]

    fake.fail_remove = False
    assert lm_cgroups.remove(record) is True
    assert env.store.leftover_cgroups() == []


def test_a_recorded_cgroup_without_a_controller_is_not_done(env: Env, fake: FakeCgroups) -> None:
    record = ended(env, 0, "cccccccc-nocontroller", cgroup=True, fake=fake)
    assert LmCgroups(None, env.store).remove(record) is False
    assert cgroup_of(env, record.uuid) == record.cgroup


# --- remove_leftovers ----------------------------------------------------------------------------


def test_remove_leftovers_removes_ended_lms_cgroups_recorded_or_not(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    recorded = ended(env, 0, "dddddddd-recorded", cgroup=True, fake=fake)
    unrecorded = ended(env, 1, "eeeeeeee-unrecorded", cgroup=False, fake=fake)
    running = active(env, 2, "ffffffff-running", cgroup=ref_of("ffffffff-running").to_json())
    starting = active(env, 3, "12121212-starting")  # made, its row not written yet
    fake.live |= {cgroup_name(running.uuid), cgroup_name(starting.uuid)}
    other_factory = "lm-34343434-of-another-factory"  # under the same parent: never ours
    fake.live |= {other_factory, "system.slice", "lm-"}

    with caplog.at_level(logging.INFO, logger=LOGGER):
        lm_cgroups.remove_leftovers()

    assert fake.live == {
        cgroup_name(running.uuid),
        cgroup_name(starting.uuid),
        other_factory,
        "system.slice",
        "lm-",
    }
    assert fake.of(cgroup_name(recorded.uuid)) == ["kill", "remove"]
    assert fake.of(cgroup_name(unrecorded.uuid)) == ["kill", "remove"]
    for untouched in (cgroup_name(running.uuid), cgroup_name(starting.uuid), other_factory):
        assert fake.of(untouched) == []
    assert cgroup_of(env, recorded.uuid) is None
    assert cgroup_of(env, running.uuid) == running.cgroup
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"lm={unrecorded.name}: removed a cgroup its record did not name"
    ]


def test_an_unrecorded_cgroup_that_cannot_be_removed_is_logged_and_the_rest_go_on(
    env: Env, fake: FakeCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    first = ended(env, 0, "13131313-first", cgroup=False, fake=fake)
    second = ended(env, 1, "14141414-second", cgroup=False, fake=fake)

    class OneBusy(FakeCgroups):
        def remove(self, ref: CgroupRef) -> None:
            if ref.name == cgroup_name(first.uuid):
                raise CgroupError("Device or resource busy")
            super().remove(ref)

    busy = OneBusy()
    busy.live = set(fake.live)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        LmCgroups(busy, env.store).remove_leftovers()
    assert busy.live == {cgroup_name(first.uuid)}
    assert f"lm={first.name}: cannot remove its unrecorded cgroup" in caplog.text
    assert second.name not in caplog.text


def test_a_leftover_whose_removal_fails_is_tried_once_per_call(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups
) -> None:
    record = ended(env, 0, "15151515-busy", cgroup=True, fake=fake)
    fake.fail_remove = True
    lm_cgroups.remove_leftovers()
    # Once as a recorded leftover; its row still names it, so not again as an unrecorded one.
    assert fake.of(cgroup_name(record.uuid)) == ["kill", "remove"]
    fake.fail_remove = False
    lm_cgroups.remove_leftovers()
    assert fake.live == set()
    assert cgroup_of(env, record.uuid) is None


def test_remove_leftovers_without_a_controller_does_nothing(env: Env, fake: FakeCgroups) -> None:
    record = ended(env, 0, "16161616-kept", cgroup=True, fake=fake)
    LmCgroups(None, env.store).remove_leftovers()
    assert cgroup_of(env, record.uuid) == record.cgroup


# --- sample_memory -------------------------------------------------------------------------------


def usage(memory: int, peak_bytes: int | None) -> Usage:
    return replace(USED, memory_bytes=memory, memory_peak_bytes=peak_bytes)


def peak_of(env: Env, uuid: str) -> int | None:
    record = env.store.get(uuid)
    assert record is not None
    return record.memory_peak_bytes


def test_sample_memory_keeps_the_highest_sample_where_the_kernel_keeps_none(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups
) -> None:
    record = active(env, 0, "17171717-sample")
    lm_cgroups.make(record, LIMITS, owner=(1000, 1000))
    name = cgroup_name(record.uuid)
    for memory, expected in ((100 * MIB, 100 * MIB), (300 * MIB, 300 * MIB), (50 * MIB, 300 * MIB)):
        fake.usage_of[name] = usage(memory, None)
        lm_cgroups.sample_memory(env.store.active())
        assert peak_of(env, record.uuid) == expected


def test_sample_memory_leaves_the_kernels_peak_to_the_kernel(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups
) -> None:
    measured = active(env, 0, "18181818-kernel")
    lm_cgroups.make(measured, LIMITS, owner=(1000, 1000))
    unmeasured = active(env, 1, "19191919-none")  # no cgroup: nothing to sample
    fake.usage_of[cgroup_name(measured.uuid)] = usage(900 * MIB, 950 * MIB)
    lm_cgroups.sample_memory(env.store.active())
    assert peak_of(env, measured.uuid) is None
    assert peak_of(env, unmeasured.uuid) is None


# --- host_cgroups and peak -----------------------------------------------------------------------


def test_host_cgroups_opens_the_configured_parent(
    env: Env, fake: FakeCgroups, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, float, str]] = []

    def opened(parent: str, *, memory_high_ratio: float, manager: str) -> FakeCgroups:
        asked.append((parent, memory_high_ratio, manager))
        return fake

    monkeypatch.setattr(lmcgroups, "open_controller", opened)
    config = env.config(factory={"cgroup_parent": "/site/lms", "memory_high_ratio": 0.9})
    assert host_cgroups(config.factory) is fake
    assert asked == [("/site/lms", 0.9, "auto")]


def test_host_cgroups_is_none_and_logged_when_the_host_has_none(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unsupported(parent: str, *, memory_high_ratio: float, manager: str) -> FakeCgroups:
        raise CgroupUnsupported("no cgroup filesystem is mounted")

    monkeypatch.setattr(lmcgroups, "open_controller", unsupported)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert host_cgroups(env.config().factory) is None
    [line] = caplog.records
    assert line.levelno == logging.WARNING
    assert "no cgroup filesystem is mounted" in line.getMessage()


def test_peak_prefers_the_kernels_then_the_highest_sample(env: Env) -> None:
    record = bare_record(env, 0, "20202020-peak", memory_peak_bytes=200 * MIB)
    unsampled = bare_record(env, 1, "21212121-peak")
    assert peak(record, None) == 200 * MIB
    assert peak(unsampled, None) is None
    assert peak(record, usage(100 * MIB, 500 * MIB)) == 500 * MIB
    assert peak(record, usage(100 * MIB, 50 * MIB)) == 50 * MIB  # the kernel's word is final
    assert peak(record, usage(300 * MIB, None)) == 300 * MIB
    assert peak(record, usage(100 * MIB, None)) == 200 * MIB
    assert peak(unsampled, usage(100 * MIB, None)) == 100 * MIB


def test_an_ended_lm_with_an_unreadable_reference_still_loses_its_cgroup(
    env: Env, fake: FakeCgroups, lm_cgroups: LmCgroups
) -> None:
    """The reference is forgotten, and the cgroup is found by its name (lm-<uuid>)."""
    garbled = ended(env, 0, "15151515-garbled", cgroup=False, fake=fake)
    env.store.update(garbled.uuid, cgroup="{not json")
    lm_cgroups.remove_leftovers()
    assert cgroup_of(env, garbled.uuid) is None
    assert cgroup_name(garbled.uuid) not in fake.live
