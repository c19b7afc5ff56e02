"""lmrunner.vacquery.replies from a Facts built here: what this factory says of its slots,
machinetypes and itself, and that every reply is one a Vac client accepts (vac.md §8.3)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner import __version__
from lmrunner.config import Config
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.payload import lm_name
from lmrunner.state import LmRecord
from lmrunner.vacquery import protocol, replies
from lmrunner.vacquery.replies import Facts
from tests.unit.test_factory import HOST, LONG, T0, Env, bare_record
from tests.unit.test_vacquery_protocol import VAC_KEYS

NOW = T0 + 1000.0
COOKIE = "c0ffee" * 10
CPUS = 6
FQAN = "/lhcb/Role=pilot"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


def make_config(env: Env, **factory: Any) -> Config:
    """Three machinetypes on six processors: alpha (with an FQAN), beta (2-processor LMs) and
    gamma (nothing ever ran)."""
    kind = {"backend": "fake", "image": LONG, "target_share": 1, "fizzle_seconds": 600}
    return env.config(
        cpus=CPUS,
        factory={"hs06_per_processor": 10.0, **factory},
        machinetypes={
            "alpha": {**kind, "accounting_fqan": FQAN, "max_wallclock_seconds": 172800},
            "beta": {**kind, "max_processors": 2},
            "gamma": kind,
        },
    )


@pytest.fixture
def config(env: Env) -> Config:
    return make_config(env)


def lm(env: Env, slot: int, machinetype: str, uuid: str, **changes: Any) -> LmRecord:
    """An LM named as the factory names slot ``slot``'s LMs."""
    return replace(
        bare_record(env, slot, uuid), name=lm_name(HOST, slot), machinetype=machinetype, **changes
    )


@pytest.fixture
def active(env: Env) -> list[LmRecord]:
    """Slots 0, 1, 3 and 4 busy; 2 and 5 empty."""
    return [
        lm(env, 0, "alpha", "00000000-creating"),  # not started: Starting, before fizzle
        lm(
            env,
            1,
            "alpha",
            "11111111-running",
            state=LmState.RUNNING,
            started=NOW - 100,
            cpu_seconds=50.0,
        ),
        lm(
            env,
            3,
            "beta",
            "33333333-running",
            state=LmState.RUNNING,
            started=NOW - 300,
            processors=2,
            hs06=2.0,
            backend="docker",
        ),
        lm(
            env,
            4,
            "beta",
            "44444444-stopping",
            state=LmState.STOPPING,
            started=NOW - 5000,
            backend="apptainer",
            cpu_seconds=4500.0,
        ),
    ]


@pytest.fixture
def finished(env: Env) -> LmRecord:
    return lm(
        env,
        1,
        "alpha",
        "99999999-finished",
        state=LmState.FINISHED,
        started=NOW - 900,
        finished=NOW - 200.5,
        outcome=Outcome(300, "Nothing to do", OutcomeSource.PAYLOAD),
        cpu_seconds=10.0,
    )


@pytest.fixture
def facts(config: Config, active: list[LmRecord], finished: LmRecord) -> Facts:
    return Facts(config, active, {"alpha": finished}, NOW)


def valid(built: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each reply as a Vac client reads it: sent through protocol.encode, parsed back and
    checked (every key of vac.md §8.3, of its JSON type); unchanged by the trip."""
    out = []
    for reply in built:
        data = protocol.encode(reply)
        assert len(data) <= protocol.REPLY_LIMIT
        assert json.loads(data) == reply
        parsed = protocol.parse_reply(data)
        assert set(VAC_KEYS[parsed["message_type"]]) <= set(parsed)
        out.append(parsed)
    return out


# --- machine_status -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "started", "expected"),
    [
        (LmState.CREATING, None, "Starting"),
        (LmState.CREATING, NOW, "Starting"),
        (LmState.STARTING, None, "Starting"),
        (LmState.STARTING, NOW, "Starting"),
        (LmState.RUNNING, None, "Starting"),  # not started yet, whatever the state says
        (LmState.RUNNING, NOW, "Running"),
        (LmState.STOPPING, NOW, "Running"),
        (LmState.FINISHED, NOW, "Shut down"),
        (LmState.FAILED, None, "Shut down"),
    ],
)
def test_machine_state(env: Env, state: LmState, started: float | None, expected: str) -> None:
    record = lm(env, 0, "alpha", "00000000-x", state=state, started=started)
    assert replies.machine_state(record) == expected


def test_machine_state_of_an_empty_slot() -> None:
    assert replies.machine_state(None) == "Shut down"


def test_machines_one_reply_per_slot_empty_ones_included(facts: Facts) -> None:
    got = valid(replies.machines(facts, COOKIE))
    assert len(got) == CPUS == facts.config.factory.total_processors
    assert {reply["num_machines"] for reply in got} == {CPUS}
    assert [reply["machine"] for reply in got] == [lm_name(HOST, slot) for slot in range(CPUS)]
    assert [reply["state"] for reply in got] == [
        "Starting",
        "Running",
        "Shut down",
        "Running",
        "Running",
        "Shut down",
    ]
    for reply in got:
        assert reply["message_type"] == "machine_status"
        assert (reply["cookie"], reply["space"], reply["factory"]) == (
            COOKIE,
            "space.example.com",
            HOST,
        )
        assert reply["site"] == "example.com"
        assert reply["time_sent"] == int(NOW)
        assert reply["vacquery_version"] == "VacQuery 01.03"


def test_machines_empty_slot(facts: Facts) -> None:
    empty = valid(replies.machines(facts, COOKIE))[2]
    assert empty["state"] == "Shut down"
    assert empty["machine"] == "factory-02.example.com"
    nulls = (
        "uuid",
        "machinetype",
        "created_time",
        "started_time",
        "heartbeat_time",
        "shutdown_message",
        "shutdown_time",
    )
    assert {key: empty[key] for key in nulls} == dict.fromkeys(nulls)
    assert (empty["num_processors"], empty["num_cpus"], empty["hs06"]) == (0, 0, 0)
    assert empty["machine_model"] is None  # as Vac says of an empty slot
    assert "fqan" not in empty


def test_machines_busy_slots(facts: Facts, active: list[LmRecord]) -> None:
    got = valid(replies.machines(facts, COOKIE))
    creating, running = got[0], got[1]
    assert creating["uuid"] == active[0].uuid
    assert creating["machinetype"] == "alpha"
    assert creating["started_time"] is None
    assert creating["created_time"] == T0 - 60
    assert creating["cpu_seconds"] == 0
    assert creating["cpu_percentage"] == 0
    assert creating["fqan"] == FQAN

    assert running["uuid"] == active[1].uuid
    assert running["started_time"] == int(NOW - 100)
    assert running["heartbeat_time"] == int(NOW)
    assert running["cpu_seconds"] == 50.0
    assert running["cpu_percentage"] == pytest.approx(50.0)  # 50 s of 100 s on 1 processor
    assert (running["num_cpus"], running["num_processors"], running["hs06"]) == (1, 1, 1.0)
    assert running["machine_model"] == "fake"

    beta = got[3]
    assert (beta["num_cpus"], beta["num_processors"], beta["hs06"]) == (2, 2, 2.0)
    assert beta["machinetype"] == "beta"
    assert "fqan" not in beta  # beta has no accounting_fqan
    assert (beta["shutdown_message"], beta["shutdown_time"]) == (None, None)


def test_every_active_lm_has_a_machine_status(env: Env, config: Config) -> None:
    beyond = lm(env, CPUS + 1, "alpha", "77777777-beyond", state=LmState.RUNNING, started=NOW - 10)
    facts = Facts(config, [beyond], {}, NOW)
    assert valid([replies.factory_status(facts, COOKIE)])[0]["running_machines"] == 1
    got = valid(replies.machines(facts, COOKIE))
    assert beyond.name in {reply["machine"] for reply in got}
    assert {reply["num_machines"] for reply in got} == {len(got)}


@pytest.mark.parametrize(
    ("backend", "model"),
    [("docker", "docker"), ("apptainer", "singularity"), ("vm", "vm-raw"), ("fake", "fake")],
)
def test_machine_model_names_are_vacs(env: Env, config: Config, backend: str, model: str) -> None:
    record = lm(
        env, 0, "alpha", "00000000-x", state=LmState.RUNNING, started=NOW - 10, backend=backend
    )
    reply = valid(replies.machines(Facts(config, [record], {}, NOW), COOKIE))[0]
    assert reply["machine_model"] == model


def test_machines_echo_the_client(facts: Facts) -> None:
    reply = valid(replies.machines(facts, COOKIE, client="vacd-factory"))[0]
    assert reply["daemon_version"] == f"lmrunner {__version__} vacd-factory"
    assert reply["vac_version"] == reply["daemon_version"]


# --- machinetype_status ---------------------------------------------------------------------


def test_machinetypes_one_reply_per_machinetype(facts: Facts) -> None:
    got = valid(replies.machinetypes(facts, COOKIE))
    assert [reply["machinetype"] for reply in got] == ["alpha", "beta", "gamma"]
    assert {reply["num_machinetypes"] for reply in got} == {3}
    assert {reply["bytes_per_processor"] for reply in got} == {2048 * 1024 * 1024}
    assert {reply["message_type"] for reply in got} == {"machinetype_status"}


def test_machinetypes_sum_their_running_lms(facts: Facts) -> None:
    by_type = {reply["machinetype"]: reply for reply in valid(replies.machinetypes(facts, COOKIE))}
    sums = {
        name: (
            r["running_machines"],
            r["running_processors"],
            r["running_cpus"],
            r["running_hs06"],
            r["num_before_fizzle"],
        )
        for name, r in by_type.items()
    }
    assert sums == {
        # 0: not started, 1: started 100 s ago (< fizzle_seconds 600): both before fizzle
        "alpha": (2, 2, 2, 2.0, 2),
        # 3: started 300 s ago (before fizzle), 4: 5000 s ago (after)
        "beta": (2, 3, 3, 3.0, 1),
        "gamma": (0, 0, 0, 0, 0),
    }


def test_machinetypes_before_fizzle_ends_at_fizzle_seconds(env: Env, config: Config) -> None:
    at_edge = lm(env, 0, "alpha", "00000000-edge", state=LmState.RUNNING, started=NOW - 600)
    inside = lm(env, 1, "alpha", "11111111-inside", state=LmState.RUNNING, started=NOW - 599)
    facts = Facts(config, [at_edge, inside], {}, NOW)
    alpha = valid(replies.machinetypes(facts, COOKIE))[0]
    assert alpha["num_before_fizzle"] == 1


def test_machinetypes_shutdown_of_the_last_finished(facts: Facts) -> None:
    by_type = {reply["machinetype"]: reply for reply in valid(replies.machinetypes(facts, COOKIE))}
    alpha = by_type["alpha"]
    assert alpha["shutdown_message"] == "300 Nothing to do"
    assert alpha["shutdown_time"] == int(NOW - 200.5)
    assert isinstance(alpha["shutdown_time"], int)
    assert alpha["shutdown_machine"] == "factory-01.example.com"
    for name in ("beta", "gamma"):
        got = by_type[name]
        assert (got["shutdown_message"], got["shutdown_time"], got["shutdown_machine"]) == (
            None,
            None,
            None,
        )


def test_machinetypes_last_finished_without_outcome(env: Env, config: Config) -> None:
    ended = lm(env, 0, "alpha", "00000000-ended", state=LmState.FAILED, finished=NOW - 5)
    alpha = valid(replies.machinetypes(Facts(config, [], {"alpha": ended}, NOW), COOKIE))[0]
    assert (alpha["shutdown_message"], alpha["shutdown_time"], alpha["shutdown_machine"]) == (
        None,
        None,
        None,
    )


def test_machinetypes_optional_keys(facts: Facts) -> None:
    by_type = {reply["machinetype"]: reply for reply in valid(replies.machinetypes(facts, COOKIE))}
    assert by_type["alpha"]["fqan"] == FQAN
    assert "fqan" not in by_type["beta"]
    assert by_type["alpha"]["max_wallclock_seconds"] == 172800
    assert by_type["beta"]["max_wallclock_seconds"] == 86400
    assert (by_type["alpha"]["max_processors"], by_type["beta"]["max_processors"]) == (1, 2)


def test_machinetypes_from_the_store_last_finished(env: Env, config: Config) -> None:
    """Facts as the responder builds them: Store.last_finished picks the most recently created
    ended LM of each type, whichever finished last."""
    older = lm(
        env,
        0,
        "alpha",
        "00000000-older",
        state=LmState.FINISHED,
        created=NOW - 900,
        started=NOW - 890,
        finished=NOW - 10,
        outcome=Outcome(100, "Shutdown time reached", OutcomeSource.WALLCLOCK),
    )
    newer = lm(
        env,
        1,
        "alpha",
        "11111111-newer",
        state=LmState.FINISHED,
        created=NOW - 500,
        started=NOW - 490,
        finished=NOW - 400,
        outcome=Outcome(500, "Start failed: no image", OutcomeSource.START_FAILED),
    )
    env.store.insert_many([older, newer])
    facts = Facts(config, env.store.active(), env.store.last_finished(config.machinetypes), NOW)
    alpha = valid(replies.machinetypes(facts, COOKIE))[0]
    assert alpha["shutdown_message"] == "500 Start failed: no image"
    assert alpha["shutdown_time"] == int(NOW - 400)
    assert alpha["shutdown_machine"] == "factory-01.example.com"
    assert alpha["running_machines"] == 0


# --- factory_status -------------------------------------------------------------------------


def test_factory_status_counts(facts: Facts) -> None:
    reply = valid([replies.factory_status(facts, COOKIE)])[0]
    assert reply["message_type"] == "factory_status"
    assert reply["running_machines"] == 4
    assert reply["running_processors"] == reply["running_cpus"] == 5
    assert reply["running_hs06"] == 5.0
    assert reply["max_cpus"] == reply["max_processors"] == reply["max_machines"] == CPUS
    assert reply["total_cpus"] == reply["total_machines"] == CPUS
    assert reply["max_hs06"] == reply["total_hs06"] == CPUS * 10.0
    assert reply["factory_heartbeat_time"] == int(NOW)
    assert reply["time_sent"] == int(NOW)


def test_factory_status_max_hs06_without_hs06_per_processor(env: Env) -> None:
    config = make_config(env, hs06_per_processor=None)
    reply = valid([replies.factory_status(Facts(config, [], {}, NOW), COOKIE)])[0]
    assert reply["max_hs06"] == CPUS * 1.0
    assert (reply["running_machines"], reply["running_processors"], reply["running_hs06"]) == (
        0,
        0,
        0,
    )


def test_factory_status_host_facts(facts: Facts, monkeypatch: pytest.MonkeyPatch) -> None:
    disks = {str(facts.config.factory.state_dir): (9000, 90), "/tmp": (1000, 10)}
    monkeypatch.setattr(replies, "_statvfs", lambda path: disks[str(path)])
    monkeypatch.setattr(
        replies,
        "_meminfo",
        lambda: {"MemTotal": 16000, "MemFree": 4000, "SwapTotal": 2000, "SwapFree": 1500},
    )
    reply = valid([replies.factory_status(facts, COOKIE)])[0]
    assert (reply["root_disk_avail_kb"], reply["root_disk_avail_inodes"]) == (1000, 10)
    assert (reply["vac_disk_avail_kb"], reply["vac_disk_avail_inodes"]) == (9000, 90)
    assert (reply["daemon_disk_avail_kb"], reply["daemon_disk_avail_inodes"]) == (9000, 90)
    assert (reply["mem_total_kb"], reply["mem_used_kb"]) == (16000, 12000)
    assert (reply["swap_free_kb"], reply["swap_used_kb"]) == (1500, 500)
    assert reply["kernel_version"] == os.uname().release
    assert isinstance(reply["os_issue"], str)
    assert reply["os_issue"]
    assert reply["load_average"] >= 0


def test_factory_status_without_a_state_dir(env: Env, tmp_path: Path) -> None:
    """statvfs failing (the state directory gone) gives zeros, still a valid reply."""
    config = make_config(env, state_dir=str(tmp_path / "nowhere"))
    reply = valid([replies.factory_status(Facts(config, [], {}, NOW), COOKIE)])[0]
    assert (reply["daemon_disk_avail_kb"], reply["daemon_disk_avail_inodes"]) == (0, 0)


def test_site_is_the_gocdb_name_when_set(env: Env) -> None:
    config = make_config(env, gocdb_sitename="UKI-EXAMPLE")
    facts = Facts(config, [], {}, NOW)
    built = [
        *replies.machines(facts, COOKIE),
        *replies.machinetypes(facts, COOKIE),
        replies.factory_status(facts, COOKIE),
    ]
    assert {reply["site"] for reply in valid(built)} == {"UKI-EXAMPLE"}


# --- every reply, as a Vac client reads it --------------------------------------------------


def test_an_idle_factory_answers_validly(config: Config) -> None:
    facts = Facts(config, [], {}, NOW)
    machines = valid(replies.machines(facts, COOKIE))
    assert [reply["state"] for reply in machines] == ["Shut down"] * CPUS
    assert [reply["running_machines"] for reply in valid(replies.machinetypes(facts, COOKIE))] == [
        0,
        0,
        0,
    ]
    assert valid([replies.factory_status(facts, COOKIE)])[0]["running_machines"] == 0


def test_every_reply_is_complete_and_survives_json(facts: Facts) -> None:
    built = [
        *replies.machines(facts, COOKIE),
        *replies.machinetypes(facts, COOKIE),
        replies.factory_status(facts, COOKIE),
    ]
    got = valid(built)
    assert len(got) == CPUS + 3 + 1
    for reply in got:
        kind = reply["message_type"]
        missing = set(protocol.KEYS[kind]) - set(reply)
        assert not missing, (kind, missing)
        extra = set(reply) - set(protocol.KEYS[kind]) - set(protocol.OPTIONAL)
        assert not extra, (kind, extra)
