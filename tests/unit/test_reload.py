"""lmrunner.reload without a Factory: pinned (what a reload may not change) and remade (which
backends are made anew, closed, watched, and told about the running LMs)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner.backends.base import Backend, Handle
from lmrunner.config import Config
from lmrunner.errors import BackendError, BackendUnavailable, MachineNotFound
from lmrunner.reload import changes, pinned, remade
from lmrunner.state import LmRecord
from tests.unit.test_factory import Env, QuietFake, bare_record

LOGGER = "lmrunner.factory"


def ignore(uuid: str) -> None:
    """``notify`` for tests that do not look at it."""


class Engine(QuietFake):
    """The quiet fake, remembering its closing and what it was asked to recover."""

    def __init__(self, label: str, engine_dir: Path) -> None:
        super().__init__(engine_dir)
        self.label = label
        self.closed = 0
        self.recovered: list[str] = []
        self.faults: dict[str, Exception] = {}  # uuid -> what recover raises

    def recover(self, uuid: str, handle: Handle) -> None:
        self.recovered.append(uuid)
        fault = self.faults.get(uuid)
        if fault is not None:
            raise fault

    def close(self) -> None:
        self.closed += 1


class Maker:
    """``make``: a fresh Engine per name, None for names in ``missing``."""

    def __init__(self, tmp_path: Path, missing: frozenset[str] = frozenset()) -> None:
        self.tmp_path = tmp_path
        self.missing = missing
        self.asked: list[str] = []
        self.made: dict[str, Engine] = {}

    def __call__(self, name: str) -> Backend | None:
        self.asked.append(name)
        if name in self.missing:
            return None
        fresh = Engine(f"new-{name}", self.tmp_path / f"new-{name}")
        self.made[name] = fresh
        return fresh


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


def types(*backends: str) -> dict[str, dict[str, Any]]:
    return {
        f"type-{name}": {"backend": name, "image": "fake:", "target_share": 1} for name in backends
    }


def configured(env: Env, *backends: str, **factory: Any) -> Config:
    return env.config(factory=factory or None, machinetypes=types(*backends), check_files=False)


def lm(env: Env, slot: int, backend: str, *, handle: bool = True) -> LmRecord:
    uuid = f"{slot:08d}-{backend}"
    return replace(
        bare_record(env, slot, uuid),
        backend=backend,
        handle=Handle(1, {"uuid": uuid}) if handle else None,
    )


def old_engines(env: Env, *names: str) -> dict[str, Engine]:
    return {name: Engine(f"old-{name}", env.tmp_path / f"old-{name}") for name in names}


# --- pinned --------------------------------------------------------------------------------------


def test_pinned_leaves_an_unchanged_state_dir_and_cgroup_parent_alone(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    old = configured(env, "fake")
    new = configured(env, "fake", hs06_per_processor=12.0)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert pinned(old, new) is new
    assert caplog.records == []


@pytest.mark.parametrize(
    "changed",
    [
        {"state_dir": "elsewhere"},
        {"cgroup_parent": "/other"},
        {"state_dir": "x", "cgroup_parent": "y"},
    ],
    ids=["state_dir", "cgroup_parent", "both"],
)
def test_pinned_keeps_state_dir_and_cgroup_parent_with_a_warning(
    env: Env, caplog: pytest.LogCaptureFixture, changed: dict[str, str]
) -> None:
    old = configured(env, "fake")
    if "state_dir" in changed:
        changed = {**changed, "state_dir": str(env.tmp_path / changed["state_dir"])}
    new = configured(env, "fake", "docker", hs06_per_processor=12.0, **changed)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        kept = pinned(old, new)
    assert kept.factory.state_dir == old.factory.state_dir == env.state_dir
    assert kept.factory.cgroup_parent == old.factory.cgroup_parent == "/lmrunner"
    assert kept.factory.hs06_per_processor == 12.0  # the rest is the new configuration's
    assert kept.machinetypes == new.machinetypes
    assert kept.factory == replace(new.factory, state_dir=env.state_dir, cgroup_parent="/lmrunner")
    assert [r.getMessage() for r in caplog.records] == [
        "factory.state_dir, factory.cgroup_parent, factory.disk_method change at a restart only"
    ]
    assert caplog.records[0].levelno == logging.WARNING


# --- remade --------------------------------------------------------------------------------------


def test_same_factory_settings_make_only_missing_backends(env: Env) -> None:
    old = configured(env, "fake")
    new = configured(env, "fake", "docker")
    backends = old_engines(env, "fake")
    maker = Maker(env.tmp_path)
    notified: list[str] = []
    out = remade(old, new, backends, [lm(env, 0, "fake")], maker, notified.append)
    assert maker.asked == ["docker"]
    assert out["fake"] is backends["fake"] and backends["fake"].closed == 0
    assert out["docker"] is maker.made["docker"]
    assert maker.made["docker"].notify == notified.append  # watched
    assert backends["fake"].recovered == [] and notified == []  # nothing new to tell
    assert set(backends) == {"fake"}  # the caller's mapping is not changed


def test_nothing_missing_makes_nothing(env: Env) -> None:
    old = configured(env, "fake")
    backends = old_engines(env, "fake")
    maker = Maker(env.tmp_path)
    out = remade(old, configured(env, "fake"), backends, [], maker, ignore)
    assert maker.asked == []
    assert out == backends


def test_changed_factory_settings_make_all_needed_backends_anew(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    old = configured(env, "fake", "vm")
    new = configured(env, "fake", "docker", hs06_per_processor=10.0)
    backends = old_engines(env, "fake", "vm")
    running = lm(env, 0, "fake")
    half_created = lm(env, 1, "fake", handle=False)
    on_vm = lm(env, 2, "vm")  # its machinetype is gone: still supervised, by a new vm backend
    maker = Maker(env.tmp_path)
    notified: list[str] = []
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = remade(old, new, backends, [running, half_created, on_vm], maker, notified.append)

    assert maker.asked == ["docker", "fake", "vm"]
    assert out == maker.made
    assert (backends["fake"].closed, backends["vm"].closed) == (1, 1)
    for fresh in maker.made.values():
        assert fresh.notify == notified.append and fresh.closed == 0
    assert maker.made["fake"].recovered == [running.uuid]  # not the one without a handle
    assert maker.made["vm"].recovered == [on_vm.uuid]
    assert maker.made["docker"].recovered == []
    assert notified == [running.uuid, on_vm.uuid]
    assert [r.getMessage() for r in caplog.records] == [
        f"backend={name}: made anew for the new configuration" for name in ("docker", "fake", "vm")
    ]


def test_a_backend_no_longer_needed_is_kept_as_it_is(env: Env) -> None:
    old = configured(env, "fake", "vm")
    new = configured(env, "fake", hs06_per_processor=10.0)
    backends = old_engines(env, "fake", "vm")
    maker = Maker(env.tmp_path)
    out = remade(old, new, backends, [], maker, ignore)
    assert maker.asked == ["fake"]
    assert out["vm"] is backends["vm"] and backends["vm"].closed == 0


def test_a_running_lms_backend_is_made_when_missing(env: Env) -> None:
    old = configured(env, "fake")
    new = configured(env, "fake")
    maker = Maker(env.tmp_path)
    notified: list[str] = []
    on_vm = lm(env, 0, "vm")
    out = remade(old, new, old_engines(env, "fake"), [on_vm], maker, notified.append)
    assert maker.asked == ["vm"]
    assert maker.made["vm"].recovered == [on_vm.uuid] and notified == [on_vm.uuid]
    assert out["vm"] is maker.made["vm"]


def test_names_make_returns_none_for_are_skipped(env: Env) -> None:
    old = configured(env, "fake", "docker")
    new = configured(env, "fake", "docker", "vm", hs06_per_processor=10.0)
    backends = old_engines(env, "docker")
    maker = Maker(env.tmp_path, missing=frozenset({"docker", "vm"}))
    notified: list[str] = []
    out = remade(old, new, backends, [lm(env, 0, "docker")], maker, notified.append)
    assert maker.asked == ["docker", "fake", "vm"]
    assert set(out) == {"docker", "fake"}
    assert out["docker"] is backends["docker"] and backends["docker"].closed == 0
    assert backends["docker"].recovered == [] and notified == []


@pytest.mark.parametrize(
    "fault",
    [
        MachineNotFound("fake", "gone"),
        BackendUnavailable("fake", "engine down"),
        RuntimeError("engine surprise"),
    ],
    ids=["gone", "unavailable", "bug"],
)
def test_a_recover_that_fails_is_one_lms_and_it_is_looked_at_all_the_same(
    env: Env, caplog: pytest.LogCaptureFixture, fault: Exception
) -> None:
    old = configured(env, "fake")
    new = configured(env, "fake", hs06_per_processor=10.0)
    first, second = lm(env, 0, "fake"), lm(env, 1, "fake")

    class Failing(Maker):
        def __call__(self, name: str) -> Backend | None:
            fresh = super().__call__(name)
            assert isinstance(fresh, Engine)
            fresh.faults[first.uuid] = fault
            return fresh

    maker = Failing(env.tmp_path)
    notified: list[str] = []
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        remade(old, new, old_engines(env, "fake"), [first, second], maker, notified.append)
    assert maker.made["fake"].recovered == [first.uuid, second.uuid]
    assert notified == [first.uuid, second.uuid]
    errors = [r.getMessage() for r in caplog.records]
    if isinstance(fault, MachineNotFound):
        assert errors == []  # its end is found by the next look
    elif isinstance(fault, BackendError):
        assert errors == [f"lm={first.name}: fake: engine down (retried later)"]
    else:
        assert errors == [f"lm={first.name}: unexpected error (retried later)"]


def test_a_make_that_raises_leaves_the_running_backends_open(env: Env) -> None:
    old = configured(env, "docker", "fake")
    new = configured(env, "docker", "fake", hs06_per_processor=10.0)
    backends = old_engines(env, "docker", "fake")
    maker = Maker(env.tmp_path)

    def make(name: str) -> Backend | None:
        if name == "fake":
            raise OSError(13, "Permission denied")
        return maker(name)

    with pytest.raises(OSError, match="Permission denied"):
        remade(old, new, backends, [], make, ignore)
    assert [engine.closed for engine in backends.values()] == [0, 0]


# --- changes: what a reload says it changed -----------------------------------------------------


def mt(**options: Any) -> dict[str, Any]:
    return {"backend": "fake", "image": "fake:", "target_share": 1, **options}


def test_changes_lists_added_removed_and_changed_machinetypes(env: Env) -> None:
    old = env.config(machinetypes={"alpha": mt(), "beta": mt(), "delta": mt(), "gamma": mt()},
                     check_files=False)  # fmt: skip
    new = env.config(
        machinetypes={
            "alpha": mt(target_share=2),
            "delta": mt(),  # unchanged: no line
            "gamma": mt(image="fake:seconds=5", max_wallclock_seconds=3600),
            "omega": mt(),
        },
        check_files=False,
    )
    assert changes(old, new) == [
        "machinetype omega added",
        "machinetype beta removed (its running LMs go on)",
        "machinetype alpha changed: target_share",
        "machinetype gamma changed: image, max_wallclock_seconds",  # in the options' order
    ]


def test_changes_of_an_unchanged_configuration_are_none(env: Env) -> None:
    old = env.config(machinetypes={"alpha": mt()}, check_files=False)
    assert changes(old, env.config(machinetypes={"alpha": mt()}, check_files=False)) == []
    # Factory settings are no machinetype's: a reload reports them elsewhere.
    changed_factory = env.config(
        machinetypes={"alpha": mt()}, factory={"hs06_per_processor": 10.0}, check_files=False
    )
    assert changes(old, changed_factory) == []


def test_reconfigure_logs_the_changes(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    old = env.config(machinetypes={"alpha": mt(), "beta": mt()}, check_files=False)
    factory = env.factory(old)
    new = env.config(machinetypes={"alpha": mt(fizzle_seconds=7)}, check_files=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        factory.reconfigure(new, Maker(env.tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reload: ")]
    assert lines == [
        "reload: machinetype beta removed (its running LMs go on)",
        "reload: machinetype alpha changed: fizzle_seconds",
    ]
    assert factory.config.machinetypes.keys() == {"alpha"}
