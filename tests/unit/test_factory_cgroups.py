"""The factory's use of cgroups and accounting (issue 6), on the fake backend and an in-memory
cgroup controller: each LM's cgroup made and limited before its start, its counters read when it
ends (OOM rule, CPU and peak memory into the record), one accounting row per LM, the cgroup killed
and removed (retried by reconciles when that fails).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner.accounting import Flag
from lmrunner.backends.base import Handle, LmCgroup, MachineSpec
from lmrunner.cgroups import CgroupController, CgroupRef, Usage
from lmrunner.config import Config
from lmrunner.ending import accounting_record
from lmrunner.errors import CgroupError, CgroupUnsupported, SpecError
from lmrunner.factory import Factory
from lmrunner.lifecycle import LmState, OutcomeSource
from lmrunner.lmcgroups import cgroup_name, host_cgroups
from lmrunner.state import LmRecord
from tests.unit.test_factory import LM0, T0, TUNING, Env, QuietFake

MIB = 1 << 20
PARENT = "/sys/fs/cgroup/lmrunner"
USED = Usage(
    cpu_seconds=12.5,
    memory_bytes=100 * MIB,
    memory_peak_bytes=300 * MIB,
    oom_kills=0,
    throttled_periods=0,
    throttled_seconds=0.0,
)


@dataclass
class Limited:
    """What set_limits was given."""

    cpus: float
    memory_bytes: int
    swap_bytes: int
    pids: int


class FakeCgroups:
    """A CgroupController in memory: records every call, returns the Usage a test sets.

    Like the kernel's files, a removed cgroup's counters cannot be read any more.
    """

    version = 2
    manager = "cgroupfs"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (method, cgroup name)
        self.live: set[str] = set()
        self.limits: dict[str, Limited] = {}
        self.usage_of: dict[str, Usage] = {}
        self.default_usage = USED
        self.fail_remove = False
        self.fail_limits = False

    def _name(self, ref: CgroupRef) -> str:
        assert ref.version == 2 and ref.path("unified") == Path(PARENT) / ref.name
        return ref.name

    def create(self, name: str) -> CgroupRef:
        self.calls.append(("create", name))
        self.live.add(name)
        return CgroupRef(2, name, (("unified", f"{PARENT}/{name}"),))

    def set_limits(
        self, ref: CgroupRef, *, cpus: float, memory_bytes: int, swap_bytes: int, pids: int
    ) -> None:
        self.calls.append(("set_limits", self._name(ref)))
        if self.fail_limits:
            raise CgroupError(f"cannot write {PARENT}/{ref.name}/memory.max")
        self.limits[ref.name] = Limited(cpus, memory_bytes, swap_bytes, pids)

    def add_pid(self, ref: CgroupRef, pid: int) -> None:
        self.calls.append(("add_pid", self._name(ref)))

    def pids(self, ref: CgroupRef) -> frozenset[int]:
        return frozenset()

    def usage(self, ref: CgroupRef) -> Usage:
        name = self._name(ref)
        self.calls.append(("usage", name))
        if name not in self.live:
            raise CgroupError(f"cannot read {PARENT}/{name}/cpu.stat: No such file or directory")
        return self.usage_of.get(name, self.default_usage)

    def freeze(self, ref: CgroupRef) -> None:
        self.calls.append(("freeze", self._name(ref)))

    def thaw(self, ref: CgroupRef) -> None:
        self.calls.append(("thaw", self._name(ref)))

    def kill(self, ref: CgroupRef, *, timeout: float = 10.0) -> None:
        self.calls.append(("kill", self._name(ref)))

    def signal(self, ref: CgroupRef, signum: int) -> int:
        self.calls.append(("signal", self._name(ref)))
        return 0

    def procs_files(self, ref: CgroupRef) -> tuple[Path, ...]:
        return (Path(PARENT) / self._name(ref) / "cgroup.procs",)

    def engine_path(self, ref: CgroupRef) -> str | None:
        return f"/lmrunner/{self._name(ref)}"

    def engine_unit(self, ref: CgroupRef) -> str | None:
        return None

    def launcher(self, ref: CgroupRef, user: tuple[int, int] | None) -> tuple[str, ...]:
        return ()

    def names(self) -> list[str]:
        return sorted(self.live)

    def delegate(self, ref: CgroupRef, uid: int, gid: int) -> None:
        self.calls.append(("delegate", self._name(ref)))

    def existing(self, name: str) -> CgroupRef | None:
        return CgroupRef(2, name, (("unified", f"{PARENT}/{name}"),)) if name in self.live else None

    def remove(self, ref: CgroupRef) -> None:
        name = self._name(ref)
        self.calls.append(("remove", name))
        if self.fail_remove:
            raise CgroupError(f"cannot remove cgroup {PARENT}/{name}: Device or resource busy")
        self.live.discard(name)

    def release(self) -> None:
        self.calls.append(("release", ""))

    def of(self, name: str) -> list[str]:
        """The methods called for cgroup ``name``, in order."""
        return [method for method, each in self.calls if each == name]


class Recording(QuietFake):
    """The quiet fake backend, remembering each spec and what the cgroups were at its start."""

    cgroups: FakeCgroups | None = None
    invalid = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.specs: list[MachineSpec] = []
        self.calls_at_start: list[list[tuple[str, str]]] = []

    def validate(self, spec: MachineSpec) -> None:
        if self.invalid:
            raise SpecError("fake: this spec is refused")
        super().validate(spec)

    def start(self, spec: MachineSpec) -> Handle:
        self.specs.append(spec)
        self.calls_at_start.append(list(self.cgroups.calls) if self.cgroups else [])
        return super().start(spec)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    made.backend = Recording(made.state_dir / "fake-engine", clock=made.clock)
    yield made
    made.close()


@pytest.fixture
def cgroups(env: Env) -> FakeCgroups:
    made = FakeCgroups()
    backend(env).cgroups = made
    return made


def backend(env: Env) -> Recording:
    assert isinstance(env.backend, Recording)
    return env.backend


def factory(env: Env, config: Config, cgroups: CgroupController | None) -> Factory:
    made = Factory(
        config,
        env.store,
        {"fake": env.backend},
        tuning=TUNING,
        clock=env.clock,
        rng=random.Random(0),
        load_average=lambda: (0.0, 0.0, 0.0),
        cgroups=cgroups,
    )
    env.factories.append(made)
    return made


def run_one(env: Env, made: Factory, seconds: float) -> LmRecord:
    """Start one LM at T0 and run passes until it has ended at T0 + ``seconds``."""
    assert env.pass_at(made, 0).started == [LM0]
    uuid = env.only_active().uuid
    assert LM0 in env.pass_at(made, seconds).finished
    return env.get(uuid)


def test_the_fake_is_a_cgroup_controller() -> None:
    assert isinstance(FakeCgroups(), CgroupController)


def test_cgroup_name_is_by_uuid() -> None:
    assert cgroup_name("0b8e3f4c-3c1e") == "lm-0b8e3f4c-3c1e"


# --- before the start ---------------------------------------------------------------------------


def test_an_lm_gets_a_limited_cgroup_before_it_starts(env: Env, cgroups: FakeCgroups) -> None:
    config = env.config(
        cpus=2,
        factory={
            "processors_per_superslot": 2,
            "mb_per_processor": 1000,
            "swap_mb_per_processor": 100,
            "pids_per_processor": 50,
        },
        min_processors=2,
        max_processors=2,
    )
    made = factory(env, config, cgroups)
    assert env.pass_at(made, 0).started == [LM0]
    lm = env.only_active()
    name = f"lm-{lm.uuid}"
    # Made and limited before the engine got the spec; nothing else touched it.
    [at_start] = backend(env).calls_at_start
    assert at_start == [("create", name), ("set_limits", name)]
    assert cgroups.limits[name] == Limited(
        cpus=2.0, memory_bytes=2000 * MIB, swap_bytes=200 * MIB, pids=100
    )
    [spec] = backend(env).specs
    ref = CgroupRef(2, name, (("unified", f"{PARENT}/{name}"),))
    assert spec.cgroup == LmCgroup(
        ref=ref,
        procs_files=(Path(PARENT) / name / "cgroup.procs",),
        engine_path=f"/lmrunner/{name}",
    )
    assert lm.cgroup is not None and CgroupRef.from_json(lm.cgroup) == ref


def test_no_pids_limit_means_the_kernels_maximum(env: Env, cgroups: FakeCgroups) -> None:
    made = factory(env, env.config(factory={"pids_per_processor": 0}), cgroups)
    env.pass_at(made, 0)
    [limited] = cgroups.limits.values()
    assert limited.pids == 4_194_304


def test_a_refused_spec_makes_no_cgroup(env: Env, cgroups: FakeCgroups) -> None:
    backend(env).invalid = True
    made = factory(env, env.config(), cgroups)
    assert env.pass_at(made, 0).started == []
    [failed] = env.store.recent()
    assert failed.state is LmState.FAILED
    assert cgroups.calls == []
    assert failed.cgroup is None
    [row] = env.store.accounting()
    assert row.flags == {Flag.FAILED, Flag.UNMEASURED}
    assert row.wall_seconds == 0.0


def test_a_failed_start_removes_its_cgroup_and_is_accounted(env: Env, cgroups: FakeCgroups) -> None:
    made = factory(env, env.config(image="fake:fail_start=1"), cgroups)
    assert env.pass_at(made, 0).started == []
    [failed] = env.store.recent()
    assert failed.state is LmState.FAILED
    name = f"lm-{failed.uuid}"
    assert cgroups.of(name) == ["create", "set_limits", "kill", "remove"]
    assert failed.cgroup is None
    [row] = env.store.accounting()
    assert row.uuid == failed.uuid
    assert row.started is None and row.wall_seconds == 0.0
    assert row.flags == {Flag.FAILED, Flag.UNMEASURED}
    assert row.outcome_source == OutcomeSource.START_FAILED.value
    assert row.cpu_seconds is None


def test_a_cgroup_that_cannot_be_limited_fails_the_start(env: Env, cgroups: FakeCgroups) -> None:
    cgroups.fail_limits = True
    made = factory(env, env.config(), cgroups)
    assert env.pass_at(made, 0).started == []
    [failed] = env.store.recent()
    assert failed.state is LmState.FAILED
    assert failed.outcome is not None and "memory.max" in failed.outcome.text
    assert backend(env).specs == []  # never handed to the engine
    assert cgroups.of(f"lm-{failed.uuid}") == ["create", "set_limits", "kill", "remove"]
    assert failed.cgroup is None


# --- when it ends -------------------------------------------------------------------------------


def test_usage_lands_in_the_record_and_one_accounting_row(env: Env, cgroups: FakeCgroups) -> None:
    config = env.config(image="fake:seconds=100", accounting_fqan="/lhcb/Role=pilot")
    done = run_one(env, factory(env, config, cgroups), 100)
    assert done.state is LmState.FINISHED
    assert done.cpu_seconds == 12.5
    assert done.memory_peak_bytes == 300 * MIB
    [row] = env.store.accounting()
    assert row.uuid == done.uuid
    assert (row.started, row.finished) == (T0, T0 + 100)
    assert row.wall_seconds == 100.0
    assert row.cpu_seconds == 12.5
    assert row.memory_peak_bytes == 300 * MIB
    assert row.memory_limit_bytes == done.limits.memory_bytes
    assert row.oom_kills == 0
    assert row.flags == frozenset()
    assert (row.fqan, row.vo) == ("/lhcb/Role=pilot", "lhcb")
    assert (row.outcome_code, row.outcome_source) == (200, OutcomeSource.EXIT_STATUS.value)
    assert env.store.apel_pending() == []  # its APEL message was written


def test_the_cgroup_is_read_then_killed_and_removed(env: Env, cgroups: FakeCgroups) -> None:
    done = run_one(env, factory(env, env.config(image="fake:seconds=100"), cgroups), 100)
    calls = cgroups.of(f"lm-{done.uuid}")
    assert calls[:2] == ["create", "set_limits"]
    end = calls.index("kill")
    assert "usage" in calls[:end]  # the counters are read before the kill
    assert calls[end : end + 2] == ["kill", "remove"]
    assert done.cgroup is None
    assert env.store.leftover_cgroups() == []


def test_a_removed_cgroup_is_never_read_again(
    env: Env, cgroups: FakeCgroups, caplog: pytest.LogCaptureFixture
) -> None:
    """The memory sampler must not read the cgroup of an LM finalised in the same reconcile:
    it is removed by then, so the read fails and an error is logged for every LM that ends."""
    caplog.set_level(logging.ERROR, logger="lmrunner.factory")
    done = run_one(env, factory(env, env.config(image="fake:seconds=100"), cgroups), 100)
    calls = cgroups.of(f"lm-{done.uuid}")
    assert calls[calls.index("kill") :] == ["kill", "remove"]
    assert [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()] == []


def test_a_short_run_is_flagged(env: Env, cgroups: FakeCgroups) -> None:
    config = env.config(image="fake:seconds=100", fizzle_seconds=600)
    done = run_one(env, factory(env, config, cgroups), 100)
    [row] = env.store.accounting()
    assert row.flags == {Flag.SHORT}
    assert row.wall_seconds == 100.0
    assert done.outcome is not None and done.outcome.code == 300  # fizzled


@pytest.mark.parametrize("oom_kills", [0, 2])
def test_engine_oom_kill_is_flagged(env: Env, cgroups: FakeCgroups, oom_kills: int) -> None:
    cgroups.default_usage = replace(USED, oom_kills=oom_kills)
    done = run_one(env, factory(env, env.config(image="fake:seconds=5;oom=1"), cgroups), 5)
    assert done.outcome is not None and done.outcome.source is OutcomeSource.OOM
    [row] = env.store.accounting()
    assert Flag.OOM in row.flags
    assert row.oom_kills == oom_kills


def test_a_cgroup_oom_kill_with_a_failed_exit_is_an_oom(env: Env, cgroups: FakeCgroups) -> None:
    """The engine did not see it (a payload's child was killed), the cgroup did."""
    cgroups.default_usage = replace(USED, oom_kills=1)
    done = run_one(env, factory(env, env.config(image="fake:seconds=100;exit=1"), cgroups), 100)
    assert done.outcome is not None
    assert done.outcome.source is OutcomeSource.OOM
    [row] = env.store.accounting()
    assert row.oom_kills == 1
    assert Flag.OOM in row.flags
    assert row.outcome_source == OutcomeSource.OOM.value


def test_a_cgroup_oom_kill_with_exit_zero_is_not_an_oom(env: Env, cgroups: FakeCgroups) -> None:
    """The payload survived the kill of one of its children: its own result stands."""
    cgroups.default_usage = replace(USED, oom_kills=1)
    done = run_one(env, factory(env, env.config(image="fake:seconds=100;exit=0"), cgroups), 100)
    assert done.outcome is not None
    assert done.outcome.source is OutcomeSource.EXIT_STATUS
    assert done.outcome.code == 200
    [row] = env.store.accounting()
    assert row.oom_kills == 1
    assert Flag.OOM in row.flags  # the kernel did kill something in it: worth a look


def test_without_memory_peak_the_sampled_maximum_is_kept(env: Env, cgroups: FakeCgroups) -> None:
    """cgroup v2 before Linux 5.19 keeps no peak: each reconcile samples memory.current."""
    made = factory(env, env.config(image="fake:seconds=100"), cgroups)
    assert env.pass_at(made, 0).started == [LM0]
    uuid = env.only_active().uuid
    name = f"lm-{uuid}"
    no_peak = replace(USED, memory_peak_bytes=None)
    for offset, current, kept in [(10, 100, 100), (20, 300, 300), (30, 50, 300), (40, 200, 300)]:
        cgroups.usage_of[name] = replace(no_peak, memory_bytes=current * MIB)
        env.pass_at(made, offset)
        assert env.get(uuid).memory_peak_bytes == kept * MIB, offset
    cgroups.usage_of[name] = replace(no_peak, memory_bytes=10 * MIB)
    assert env.pass_at(made, 100).finished == [LM0]
    done = env.get(uuid)
    assert done.memory_peak_bytes == 300 * MIB
    [row] = env.store.accounting()
    assert row.memory_peak_bytes == 300 * MIB


def test_a_final_reading_above_the_samples_is_the_peak(env: Env, cgroups: FakeCgroups) -> None:
    made = factory(env, env.config(image="fake:seconds=100"), cgroups)
    env.pass_at(made, 0)
    name = f"lm-{env.only_active().uuid}"
    cgroups.usage_of[name] = replace(USED, memory_peak_bytes=None, memory_bytes=50 * MIB)
    env.pass_at(made, 10)
    cgroups.usage_of[name] = replace(USED, memory_peak_bytes=None, memory_bytes=80 * MIB)
    env.pass_at(made, 100)
    [row] = env.store.accounting()
    assert row.memory_peak_bytes == 80 * MIB


# --- removal, retried ---------------------------------------------------------------------------


def test_a_cgroup_that_cannot_be_removed_is_retried_by_a_reconcile(
    env: Env, cgroups: FakeCgroups
) -> None:
    cgroups.fail_remove = True
    made = factory(env, env.config(image="fake:seconds=100"), cgroups)
    done = run_one(env, made, 100)
    assert done.state is LmState.FINISHED
    assert done.cgroup is not None  # kept, to be retried
    assert [r.uuid for r in env.store.leftover_cgroups()] == [done.uuid]
    assert len(env.store.accounting()) == 1  # accounted all the same

    env.pass_at(made, 101)  # still busy
    assert env.get(done.uuid).cgroup is not None

    cgroups.fail_remove = False
    env.pass_at(made, 102)
    assert env.get(done.uuid).cgroup is None
    assert env.store.leftover_cgroups() == []
    assert cgroups.of(f"lm-{done.uuid}")[-2:] == ["kill", "remove"]
    assert len(env.store.accounting()) == 1


def test_a_half_created_lm_with_a_cgroup_loses_it_on_adopt(env: Env, cgroups: FakeCgroups) -> None:
    config = env.config()
    first = factory(env, config, cgroups)
    env.pass_at(first, 0)
    lm = env.only_active()
    # A crash between the cgroup and the start: the record is still CREATING with its cgroup.
    env.store.db.execute(
        "UPDATE lms SET state = 'creating', handle = NULL, started = NULL, rev = rev + 1 "
        "WHERE uuid = ?",
        (lm.uuid,),
    )
    restarted = factory(env, config, cgroups)
    assert restarted.adopt().finished == [LM0]
    settled = env.get(lm.uuid)
    assert settled.state is LmState.FAILED
    assert settled.cgroup is None
    assert cgroups.of(f"lm-{lm.uuid}")[-2:] == ["kill", "remove"]
    [row] = env.store.accounting()
    assert row.flags == {Flag.FAILED, Flag.UNMEASURED}


def test_remove_all_removes_the_cgroups_of_active_lms(env: Env, cgroups: FakeCgroups) -> None:
    made = factory(env, env.config(cpus=2), cgroups)
    assert len(env.pass_at(made, 0).started) == 2
    uuids = [record.uuid for record in env.store.active()]
    assert made.remove_all() == 2
    for uuid in uuids:
        assert env.get(uuid).cgroup is None
        assert cgroups.of(f"lm-{uuid}")[-2:] == ["kill", "remove"]
    assert env.engine() == {}


# --- without cgroups ----------------------------------------------------------------------------


def test_without_cgroups_lms_run_unmeasured(env: Env) -> None:
    made = factory(env, env.config(image="fake:seconds=100", fizzle_seconds=10), None)
    done = run_one(env, made, 100)
    assert done.state is LmState.FINISHED
    assert backend(env).specs[0].cgroup is None
    assert done.cgroup is None
    assert (done.cpu_seconds, done.memory_peak_bytes) == (None, None)
    [row] = env.store.accounting()
    assert row.flags == {Flag.UNMEASURED}
    assert row.wall_seconds == 100.0
    assert (row.cpu_seconds, row.memory_peak_bytes, row.oom_kills) == (None, None, 0)


def test_an_unreadable_cgroup_leaves_the_lm_unmeasured(env: Env, cgroups: FakeCgroups) -> None:
    made = factory(env, env.config(image="fake:seconds=100"), cgroups)
    env.pass_at(made, 0)
    cgroups.live.clear()  # its counters cannot be read any more
    env.pass_at(made, 100)
    [row] = env.store.accounting()
    assert row.flags == {Flag.UNMEASURED}
    assert row.cpu_seconds is None


def test_host_cgroups_none_when_the_host_has_none(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unsupported(parent: str, **options: Any) -> CgroupController:
        raise CgroupUnsupported("no cgroup filesystem is mounted")

    monkeypatch.setattr("lmrunner.lmcgroups.open_controller", unsupported)
    with caplog.at_level(logging.WARNING, logger="lmrunner.factory"):
        assert host_cgroups(env.config().factory) is None
    assert "no cgroup filesystem is mounted" in caplog.text


def test_host_cgroups_uses_the_configured_parent(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[str, dict[str, Any]]] = []
    fake = FakeCgroups()

    def open_controller(parent: str, **options: Any) -> CgroupController:
        opened.append((parent, options))
        return fake

    monkeypatch.setattr("lmrunner.lmcgroups.open_controller", open_controller)
    config = env.config(factory={"cgroup_parent": "/sites/lmrunner", "memory_high_ratio": 0.9})
    assert host_cgroups(config.factory) is fake
    assert opened == [("/sites/lmrunner", {"memory_high_ratio": 0.9, "manager": "auto"})]


# --- accounting happens once ----------------------------------------------------------------


def test_accounting_is_never_duplicated(env: Env, cgroups: FakeCgroups) -> None:
    config = env.config(image="fake:seconds=100")
    made = factory(env, config, cgroups)
    done = run_one(env, made, 100)
    [row] = env.store.accounting()
    # The end reported again (a late notification, another reconcile) changes nothing.
    made.events.put(done.uuid)
    made.events.put(done.uuid)
    env.pass_at(made, 101)
    env.pass_at(made, 102)
    assert env.store.accounting() == [row]
    # Accounting the same LM again (a retried finalisation) keeps the first record.
    again = accounting_record(done, replace(USED, cpu_seconds=99.0), config.machinetypes["alpha"])
    assert env.store.add_accounting(again) is False
    assert env.store.accounting() == [row]
    assert env.store.add_accounting(replace(row, cpu_seconds=1.0)) is False
    assert env.store.accounting() == [row]


def test_a_cgroup_made_but_never_recorded_is_removed_by_a_reconcile(
    env: Env, cgroups: FakeCgroups
) -> None:
    """The daemon died between making an LM's cgroup and recording it: the LM's row (made
    first) is settled, and the reconcile removes the cgroup it does not name; a cgroup of an
    uuid this store does not know (another factory's) is left alone."""
    made = factory(env, env.config(), cgroups)
    assert env.pass_at(made, 0).started == [LM0]
    lm = env.only_active()
    env.store.update(lm.uuid, cgroup=None)  # as if that write never happened
    cgroups.live.add("lm-not-ours")
    assert LM0 in env.pass_at(made, 3600).finished
    made.run_pass()
    assert f"lm-{lm.uuid}" not in cgroups.live
    assert "lm-not-ours" in cgroups.live
