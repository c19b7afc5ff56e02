"""VacQuery 01.03 compatibility between lmrunner and Vac, checked from the specification.

The client and the Vac-style responder in this file are written from vac.md §8 (transport
§8.1, requests and cookies §8.2, reply keys §8.3, the client's rounds §8.4) and §3.2/§3.4
(state strings, how ``machinetype_status`` is used), independently of lmrunner's responder:
nothing of ``lmrunner.vacquery`` is imported by the client half, which speaks raw UDP and JSON
and keeps its own table of the keys and JSON types Vac sends. Where vac.md names a key but not
its value (an empty slot's nulls and zeros, ``site`` never null), the values are those of Vac's
own ``shared.py`` of VacQuery 01.03 (``VacSlot``, ``makeMachineResponse``).

First direction, Vac reads lmrunner: a real ``lmrunner daemon`` (fake LMs, on 127.0.0.1 and a
free UDP port) is asked ``machines_query``, ``machinetypes_query`` and ``factory_query``, with
the new ``message_type`` and the legacy ``method``; every reply must carry every key Vac sends
with Vac's JSON types, echo the cookie, name the factory and the space, and agree with the
other replies. Requests Vac's responder ignores (another space, over 1024 bytes, not JSON,
no cookie) get no reply, and the responder still answers afterwards.

Second direction, lmrunner reads Vac: a small responder answering as Vac 03.01 does (its keys,
its strings, ``null`` where Vac has nothing) stands for a Vac factory with two running LMs of
machinetype ``a`` and a recent abort of ``b``; lmrunner's space watch, its client and
``lmrunner factories`` must count them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.state import LmRecord, Store, StoreError
from tests.integration.conftest import REPO, TIMESCALE

pytestmark = pytest.mark.slow

SPACE = "vacquery-compat.example.com"
VACQUERY_VERSION = "VacQuery 01.03"  # vac.md §8.1
#: vac.md §8.1: the server reads at most 1024 bytes, clients at most 10240.
SERVER_READ = 1024
CLIENT_READ = 10240
#: vac.md §3.2: the strings of VacState.
VAC_STATES = {"Unknown", "Shut down", "Starting", "Running", "Paused", "Zombie"}
#: Silence after which a round of replies is over (vac.md §8.4: udp_timeout_seconds / 5).
QUIET = 0.6 * TIMESCALE

# --- JSON types, transcribed from vac.md §8.3 -----------------------------------------------

NUM = "number"  # a JSON number (int or float, never true/false)
INT = "integer"  # a JSON number without a fraction (counts)
STR = "string"
NULL = "null"

#: Keys of every reply.
ENVELOPE: dict[str, tuple[str, ...]] = {
    "message_type": (STR,),
    "vac_version": (STR,),
    "daemon_version": (STR,),
    "vacquery_version": (STR,),
    "cookie": (STR,),
    "space": (STR,),
    "factory": (STR,),
    "time_sent": (NUM,),
    "site": (STR,),  # gocdb_sitename, else the domain part of the space (vac.md §2.2)
}
#: ``machine_status``: one per slot, empty slots included. What an empty slot has not got
#: (its LM, the LM's model and times, a shutdown message) is null in Vac; its numbers are 0.
MACHINE_STATUS: dict[str, tuple[str, ...]] = {
    **ENVELOPE,
    "num_machines": (INT,),
    "machine": (STR,),
    "state": (STR,),
    "machine_model": (STR, NULL),
    "uuid": (STR, NULL),
    "created_time": (NUM, NULL),
    "started_time": (NUM, NULL),
    "heartbeat_time": (NUM, NULL),
    "num_cpus": (NUM,),
    "num_processors": (NUM,),
    "cpu_seconds": (NUM,),
    "cpu_percentage": (NUM,),
    "hs06": (NUM,),
    "machinetype": (STR, NULL),
    "shutdown_message": (STR, NULL),
    "shutdown_time": (NUM, NULL),
}
#: What a slot with a running LM must have (no null).
RUNNING_SLOT: dict[str, tuple[str, ...]] = {
    "uuid": (STR,),
    "created_time": (NUM,),
    "started_time": (NUM,),
    "machinetype": (STR,),
    "machine_model": (STR,),
}
MACHINETYPE_STATUS: dict[str, tuple[str, ...]] = {
    **ENVELOPE,
    "num_machinetypes": (INT,),
    "machinetype": (STR,),
    "bytes_per_processor": (NUM,),
    "running_hs06": (NUM,),
    "running_machines": (INT,),
    "running_cpus": (NUM,),
    "running_processors": (NUM,),
    "num_before_fizzle": (INT,),
    # the most recently created finished LM of the type: null when there is none
    "shutdown_message": (STR, NULL),
    "shutdown_time": (NUM, NULL),
    "shutdown_machine": (STR, NULL),
}
#: ``factory_status``: numbers but for two strings.
FACTORY_NUMBERS = [
    "running_cpus", "running_processors", "running_machines", "running_hs06", "max_cpus",
    "max_processors", "max_machines", "max_hs06", "total_cpus", "total_machines", "total_hs06",
    "root_disk_avail_kb", "root_disk_avail_inodes", "vac_disk_avail_kb", "daemon_disk_avail_kb",
    "vac_disk_avail_inodes", "daemon_disk_avail_inodes", "load_average", "boot_time",
    "factory_heartbeat_time", "responder_heartbeat_time", "mjf_heartbeat_time",
    "metadata_heartbeat_time", "swap_used_kb", "swap_free_kb", "mem_used_kb", "mem_total_kb",
]  # fmt: skip
FACTORY_STATUS: dict[str, tuple[str, ...]] = {
    **ENVELOPE,
    **{key: (NUM,) for key in FACTORY_NUMBERS},
    "kernel_version": (STR,),
    "os_issue": (STR,),
}
#: Keys Vac sends only sometimes (vac.md §8.3 "optional").
OPTIONAL: dict[str, dict[str, tuple[str, ...]]] = {
    "machine_status": {"fqan": (STR,)},
    "machinetype_status": {
        "fqan": (STR,),
        "max_wallclock_seconds": (NUM,),
        "max_processors": (NUM,),
    },
    "factory_status": {},
}
SCHEMAS = {
    "machine_status": MACHINE_STATUS,
    "machinetype_status": MACHINETYPE_STATUS,
    "factory_status": FACTORY_STATUS,
}
#: Request message_type -> reply message_type, legacy method -> message_type (vac.md §8.2).
REPLY_OF = {
    "machines_query": "machine_status",
    "machinetypes_query": "machinetype_status",
    "factory_query": "factory_status",
}
METHOD_OF = {"machines": "machines_query", "machinetypes": "machinetypes_query",
             "factories": "factory_query"}  # fmt: skip
#: Per reply type, the key naming its item (one reply per item), and its count key (§8.4).
ITEM_KEY = {"machine_status": "machine", "machinetype_status": "machinetype", "factory_status": ""}
COUNT_KEY = {"machine_status": "num_machines", "machinetype_status": "num_machinetypes"}


def json_kind(value: object) -> str:
    """The JSON type of a decoded value, in this file's words."""
    if value is None:
        return NULL
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return NUM
    if isinstance(value, str):
        return STR
    return type(value).__name__


def type_ok(value: object, allowed: tuple[str, ...]) -> bool:
    kind = json_kind(value)
    if kind == INT and NUM in allowed:
        return True
    if kind == NUM and INT in allowed and isinstance(value, float) and value.is_integer():
        return True  # 2.0 for a count is still a JSON number without a fraction
    return kind in allowed


def type_problems(reply: dict[str, Any], schema: dict[str, tuple[str, ...]]) -> list[str]:
    """Every key of ``schema`` missing from ``reply`` or of another JSON type."""
    problems = []
    for key, allowed in schema.items():
        if key not in reply:
            problems.append(f"{key}: missing")
        elif not type_ok(reply[key], allowed):
            problems.append(f"{key}: {reply[key]!r} is {json_kind(reply[key])}, not {allowed}")
    return problems


# --- a VacQuery client from vac.md §8.2 and §8.4 --------------------------------------------


def new_salt() -> str:
    """vac.md §8.2: base64 of 32 random bytes."""
    return base64.b64encode(os.urandom(32)).decode()


def make_cookie(salt: str, factory: str) -> str:
    """vac.md §8.2: SHA-256 hex of the salt and the target factory's name."""
    return hashlib.sha256((salt + factory).encode()).hexdigest()


def vac_request(kind: str, cookie: str, space: str = SPACE, **extra: Any) -> dict[str, Any]:
    """A request as Vac's vacd-factory sends it: ``message_type`` and, for the kinds that have
    one, the legacy ``method``."""
    request: dict[str, Any] = {
        "message_type": kind,
        "vac_version": "Vac 03.01 vacquery-compat-test",
        "vacquery_version": VACQUERY_VERSION,
        "space": space,
        "cookie": cookie,
    }
    legacy = {v: k for k, v in METHOD_OF.items() if k != "machinetypes"}
    if kind in legacy:
        request["method"] = legacy[kind]
    request.update(extra)
    return request


def datagrams(sock: socket.socket, quiet: float, limit: float = 10.0) -> Iterator[bytes]:
    """Datagrams as they come, until none came for ``quiet`` seconds (or ``limit``)."""
    end = time.monotonic() + limit * TIMESCALE
    while time.monotonic() < end:
        sock.settimeout(quiet)
        try:
            yield sock.recv(65536)  # more than Vac's 10240: a longer one is an error
        except TimeoutError:
            return


@dataclass
class Round:
    """One query round's replies from one factory, keyed as Vac keys them (§8.4)."""

    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    datagrams: list[bytes] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # why datagrams were not accepted


def query(port: int, factory: str, request: dict[str, Any], *, address: str = "127.0.0.1",
          salt: str) -> Round:  # fmt: skip
    """Vac's client algorithm (vac.md §8.4) against one factory: up to six rounds, each
    re-sending while fewer replies came than announced, then gathering until silence; a reply
    counts only when it is of the expected type, from ``space``, names ``factory`` and carries
    sha256(salt + its factory) as cookie."""
    kind = request.get("message_type") or METHOD_OF[request["method"]]
    reply_type = REPLY_OF[kind]
    result = Round()
    expected = 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(6):
            if len(result.replies) >= expected:
                break
            sock.sendto(json.dumps(request).encode(), (address, port))
            for data in datagrams(sock, QUIET):
                result.datagrams.append(data)
                try:
                    reply = json.loads(data)
                except ValueError as err:
                    result.rejected.append(f"not JSON: {err}")
                    continue
                if not isinstance(reply, dict):
                    result.rejected.append(f"not an object: {reply!r}")
                    continue
                if reply.get("message_type") != reply_type or reply.get("space") != SPACE:
                    result.rejected.append(f"type or space: {reply!r}")
                    continue
                if reply.get("factory") != factory:
                    result.rejected.append(f"another factory: {reply!r}")
                    continue
                if reply.get("cookie") != make_cookie(salt, str(reply.get("factory"))):
                    result.rejected.append(f"cookie: {reply!r}")
                    continue
                item = ITEM_KEY[reply_type]
                result.replies[str(reply.get(item)) if item else ""] = reply
                if reply_type in COUNT_KEY and type_ok(reply.get(COUNT_KEY[reply_type]), (INT,)):
                    expected = int(reply[COUNT_KEY[reply_type]])
                if len(result.replies) >= expected:
                    break
            # fewer than announced: the next round asks again
    return result


# --- the lmrunner daemon ---------------------------------------------------------------------


def _receiver() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    return sock


def _listen(daemon: Daemon, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            data = daemon.vacmon.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return
        daemon.heard.append(json.loads(data))


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


LONG = {"backend": "fake", "image": "fake:seconds=3600", "fizzle_seconds": 0}
#: Ends after a second with an abort code: a finished LM, and a type backed off for an hour.
ABORTING = {"backend": "fake", "image": "fake:seconds=1;message=300 No more work",
            "fizzle_seconds": 0, "backoff_seconds": 3600}  # fmt: skip


@dataclass
class Daemon:
    """A running ``lmrunner daemon`` answering VacQuery on 127.0.0.1:``port``."""

    top: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    #: A VacMon receiver (vac.md §8.5): what the daemon sends it, kept by a thread.
    vacmon: socket.socket = field(default_factory=lambda: _receiver())
    heard: list[dict[str, Any]] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.top / "lmrunner.yaml"

    @property
    def state(self) -> Path:
        return self.top / "state"

    @property
    def log(self) -> Path:
        return self.top / "daemon.log"

    def write(self, a_share: float) -> None:
        """Two slots (total_processors 2, superslots of 2); ``a`` takes both processors in one
        LM, so one slot runs it and the other is empty; ``b`` aborts after a second."""
        document = {
            "factory": {
                "space": SPACE,
                "hostname": "127.0.0.1",
                "state_dir": str(self.state),
                "total_processors": 2,  # at most this host's CPUs
                "processors_per_superslot": 2,
                "overload_per_processor": 1000,
                "disk_method": "none",
                "factories": ["."],
                "udp_timeout_seconds": 2,
                "vacquery_port": self.port,
                "vacmon_hostport": [f"127.0.0.1:{self.vacmon.getsockname()[1]}"],
            },
            "machinetypes": {
                "a": {**LONG, "target_share": a_share, "min_processors": 2, "max_processors": 2},
                "b": {**ABORTING, "target_share": 1, "max_processors": 1},
            },
        }
        self.config.write_text(yaml.safe_dump(document))

    def records(self) -> list[LmRecord]:
        if not (self.state / "lmrunner.db").exists():
            return []
        try:
            store = Store(self.state, readonly=True)
        except StoreError:  # the daemon is making it (schema 0 for a moment): none yet
            return []
        try:
            return store.recent()
        finally:
            store.close()

    def wait_for(self, what: str, condition: Callable[[list[LmRecord]], bool],
                 timeout: float = 30.0) -> None:  # fmt: skip
        deadline = time.monotonic() + timeout * TIMESCALE
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            if condition(self.records()):
                return
            time.sleep(0.2)
        raise AssertionError(f"not within {timeout} s: {what}\n{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """An lmrunner daemon whose ``b`` has aborted (a finished LM with a shutdown message) and
    whose ``a`` runs one 2-processor LM: one running slot, one empty slot, two machinetypes."""
    member = Daemon(tmp_path_factory.mktemp("vacquery-compat"), free_udp_port())
    stop = threading.Event()
    listener = threading.Thread(target=_listen, args=(member, stop), daemon=True)
    listener.start()
    member.write(a_share=0)  # b alone first: ``a`` would otherwise take both processors
    with member.log.open("ab") as err:
        member.process = subprocess.Popen(
            [sys.executable, "-m", "lmrunner", "daemon", "--config", str(member.config)],
            stderr=err,
            cwd=REPO,
        )
    try:
        member.wait_for(
            "b ran and aborted",
            lambda records: (
                any(r.machinetype == "b" and not r.active for r in records)
                and not any(r.machinetype == "b" and r.active for r in records)
            ),
        )
        member.write(a_share=1)
        member.process.send_signal(signal.SIGHUP)
        member.wait_for(
            "a running on both processors",
            lambda records: any(
                r.machinetype == "a" and r.state.value == "running" and r.processors == 2
                for r in records
            ),
        )
        yield member
    finally:
        member.process.send_signal(signal.SIGTERM)
        try:
            member.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            member.process.kill()
            member.process.wait()
            raise
        finally:
            stop.set()
            listener.join(timeout=5)
            member.vacmon.close()


def ask(daemon: Daemon, kind: str, **extra: Any) -> Round:
    salt = new_salt()
    request = vac_request(kind, make_cookie(salt, "127.0.0.1"), **extra)
    return query(daemon.port, "127.0.0.1", request, salt=salt)


def check_envelope(reply: dict[str, Any], reply_type: str, cookie: str) -> list[str]:
    """Every key of the reply type with Vac's JSON types, and the values every reply shares."""
    problems = type_problems(reply, SCHEMAS[reply_type])
    for key, allowed in OPTIONAL[reply_type].items():
        if key in reply and not type_ok(reply[key], allowed):
            problems.append(f"{key} (optional): {reply[key]!r} is {json_kind(reply[key])}")
    expected = {"message_type": reply_type, "cookie": cookie, "space": SPACE,
                "factory": "127.0.0.1", "vacquery_version": VACQUERY_VERSION}  # fmt: skip
    for key, value in expected.items():
        if reply.get(key) != value:
            problems.append(f"{key}: {reply.get(key)!r}, expected {value!r}")
    sent: Any = reply.get("time_sent")
    if type_ok(sent, (NUM,)) and abs(float(sent) - time.time()) > 300:
        problems.append(f"time_sent {sent!r} is not now")
    return problems


def check_datagrams(result: Round) -> None:
    assert not result.rejected, result.rejected
    for data in result.datagrams:
        assert len(data) <= CLIENT_READ, f"a reply of {len(data)} bytes: Vac reads {CLIENT_READ}"


# --- first direction: Vac's client reads lmrunner ---------------------------------------------


def test_machine_status_per_slot(daemon: Daemon) -> None:
    salt = new_salt()
    cookie = make_cookie(salt, "127.0.0.1")
    result = query(daemon.port, "127.0.0.1", vac_request("machines_query", cookie), salt=salt)
    check_datagrams(result)
    replies = list(result.replies.values())
    problems = {r.get("machine"): check_envelope(r, "machine_status", cookie) for r in replies}
    assert not any(problems.values()), problems
    # one reply per slot, empty slots included: total_processors 2 slots
    assert len(replies) == 2, replies
    assert {r["num_machines"] for r in replies} == {2}
    assert len({r["machine"] for r in replies}) == 2
    assert {r["state"] for r in replies} <= VAC_STATES, [r["state"] for r in replies]
    running = [r for r in replies if r["state"] == "Running"]
    idle = [r for r in replies if r["state"] == "Shut down"]
    assert len(running) == 1 and len(idle) == 1, [r["state"] for r in replies]
    lm = running[0]
    assert not type_problems(lm, RUNNING_SLOT), type_problems(lm, RUNNING_SLOT)
    assert lm["machinetype"] == "a"
    assert lm["num_processors"] == 2 and lm["num_cpus"] == 2
    assert lm["hs06"] == pytest.approx(2.0)  # 1.0 per processor when hs06_per_processor unset
    assert lm["created_time"] <= lm["started_time"] <= time.time() + 1
    assert lm["cpu_seconds"] >= 0 and lm["cpu_percentage"] >= 0
    records = {r.uuid: r for r in daemon.records()}
    assert lm["uuid"] in records and records[lm["uuid"]].name == lm["machine"]
    # the empty slot: no LM runs there, so nothing of one is claimed
    assert idle[0]["uuid"] is None or idle[0]["uuid"] not in {
        r.uuid for r in records.values() if r.active
    }


def test_machinetype_status_per_machinetype(daemon: Daemon) -> None:
    salt = new_salt()
    cookie = make_cookie(salt, "127.0.0.1")
    result = query(daemon.port, "127.0.0.1", vac_request("machinetypes_query", cookie), salt=salt)
    check_datagrams(result)
    replies = result.replies
    problems = {n: check_envelope(r, "machinetype_status", cookie) for n, r in replies.items()}
    assert not any(problems.values()), problems
    assert set(replies) == {"a", "b"}
    assert {r["num_machinetypes"] for r in replies.values()} == {2}
    a, b = replies["a"], replies["b"]
    # a: one running LM of two processors (1.0 HS06 each, hs06_per_processor unset)
    assert (a["running_machines"], a["running_processors"], a["running_cpus"]) == (1, 2, 2)
    assert a["running_hs06"] == pytest.approx(2.0)
    assert a["num_before_fizzle"] == 0  # fizzle_seconds 0: past fizzle at once
    assert a["shutdown_message"] is None and a["shutdown_time"] is None
    assert a["shutdown_machine"] is None
    # b: nothing running; its last LM aborted with 300 (§3.4: shutdown_* of the most recently
    # created finished LM, what other factories back off on)
    assert (b["running_machines"], b["running_processors"], b["running_hs06"]) == (0, 0, 0)
    assert b["shutdown_message"] == "300 No more work"
    assert isinstance(b["shutdown_time"], int | float) and b["shutdown_time"] <= time.time() + 1
    ended = [r for r in daemon.records() if r.machinetype == "b" and not r.active]
    assert b["shutdown_machine"] in {r.name for r in ended}
    assert a["bytes_per_processor"] > 0 and b["bytes_per_processor"] > 0
    if "max_processors" in a:
        assert a["max_processors"] == 2
    if "max_wallclock_seconds" in a:
        assert a["max_wallclock_seconds"] == 86400


def test_factory_status_agrees_with_the_machines(daemon: Daemon) -> None:
    salt = new_salt()
    cookie = make_cookie(salt, "127.0.0.1")
    result = query(daemon.port, "127.0.0.1", vac_request("factory_query", cookie), salt=salt)
    check_datagrams(result)
    assert list(result.replies) == [""], result.replies
    status = result.replies[""]
    assert not check_envelope(status, "factory_status", cookie), check_envelope(
        status, "factory_status", cookie
    )
    machines = ask(daemon, "machines_query").replies.values()
    types = ask(daemon, "machinetypes_query").replies.values()
    running = [m for m in machines if m["state"] == "Running"]
    assert status["running_machines"] == len(running) == 1
    assert status["running_processors"] == sum(m["num_processors"] for m in running) == 2
    assert status["running_cpus"] == status["running_processors"]
    assert status["running_hs06"] == pytest.approx(sum(m["hs06"] for m in running))
    assert status["running_processors"] == sum(t["running_processors"] for t in types)
    assert status["running_machines"] == sum(t["running_machines"] for t in types)
    # max_cpus, max_processors, max_machines: all total_processors (vac.md §8.3)
    assert (status["max_cpus"], status["max_processors"], status["max_machines"]) == (2, 2, 2)
    assert status["max_hs06"] == pytest.approx(2.0)
    assert status["load_average"] >= 0 and status["mem_total_kb"] > 0
    assert status["daemon_disk_avail_kb"] >= 0 and status["root_disk_avail_kb"] >= 0


@pytest.mark.parametrize("method", ["machines", "machinetypes", "factories"])
def test_a_legacy_method_request_is_answered(daemon: Daemon, method: str) -> None:
    """Only ``method``, ``space`` and ``cookie`` (vac.md §8.2: all a Vac responder needs)."""
    salt = new_salt()
    cookie = make_cookie(salt, "127.0.0.1")
    request = {"method": method, "space": SPACE, "cookie": cookie}
    result = query(daemon.port, "127.0.0.1", request, salt=salt)
    check_datagrams(result)
    reply_type = REPLY_OF[METHOD_OF[method]]
    assert result.replies, f"no {reply_type} for method {method!r}"
    for reply in result.replies.values():
        assert not check_envelope(reply, reply_type, cookie), check_envelope(
            reply, reply_type, cookie
        )
    assert len(result.replies) == {"machines": 2, "machinetypes": 2, "factories": 1}[method]


def test_a_request_just_under_the_limit_is_answered(daemon: Daemon) -> None:
    """Vac's responder reads 1024 bytes and ignores keys it does not know."""
    salt = new_salt()
    cookie = make_cookie(salt, "127.0.0.1")
    request = vac_request("factory_query", cookie, padding="")
    request["padding"] = "x" * (1000 - len(json.dumps(request)))
    assert 990 <= len(json.dumps(request)) <= SERVER_READ
    result = query(daemon.port, "127.0.0.1", request, salt=salt)
    assert list(result.replies) == [""], result.rejected


def test_requests_vac_ignores_get_no_reply(daemon: Daemon) -> None:
    """Another space, over 1024 bytes, not JSON, not an object, no cookie, no type: silence.
    The responder answers a good request afterwards."""
    salt = new_salt()
    cookie = make_cookie(salt, "127.0.0.1")
    oversized = vac_request("factory_query", cookie + "-big", padding="y" * 1100)
    ignored: dict[str, bytes] = {
        "another space": json.dumps(
            vac_request("factory_query", cookie + "-space", space="other.example.com")
        ).encode(),
        "over 1024 bytes": json.dumps(oversized).encode(),
        "garbage": b"\xff\xfe\x00garbage{{{",
        "invalid JSON": b'{"message_type": "factory_query", "space": ',
        "a JSON list": json.dumps([vac_request("factory_query", cookie + "-list")]).encode(),
        "no cookie": json.dumps(
            {k: v for k, v in vac_request("factory_query", "").items() if k != "cookie"}
        ).encode(),
        "no message_type or method": json.dumps(
            {"space": SPACE, "cookie": cookie + "-notype"}
        ).encode(),
        "unknown message_type": json.dumps(
            {"message_type": "nonsense_query", "space": SPACE, "cookie": cookie + "-unknown"}
        ).encode(),
        "empty": b"",
    }
    assert len(ignored["over 1024 bytes"]) > SERVER_READ
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for data in ignored.values():
            sock.sendto(data, ("127.0.0.1", daemon.port))
        answers = list(datagrams(sock, 1.5 * TIMESCALE))
    assert answers == [], f"replies to requests Vac ignores: {answers!r}"
    after = ask(daemon, "factory_query")
    assert list(after.replies) == [""], "no answer after the ignored requests"


# --- second direction: lmrunner reads a Vac factory -------------------------------------------

VAC_NAME = "localhost"  # the fake Vac factory's hostname (os.uname()[1] in Vac); resolvable
VAC_HS06_PER_PROCESSOR = 10.0


class VacResponder:
    """A Vac 03.01 responder (vac.md §8.2 to 8.3) for a factory of four 1-processor slots: two
    run LMs of ``a``; ``b`` runs nothing, its last LM aborted with ``300 No more work``.

    Its values are Vac's: an empty slot (``VacSlot`` without a slot file) has ``null``
    machine_model, uuid, times and machinetype, and 0 processors, HS06 and CPU; the optional
    keys (fqan, max_wallclock_seconds, max_processors) are sent for ``a`` only."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.port = port
        self.requests: list[bytes] = []
        self.now = int(time.time())
        self.abort_time = self.now - 120
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-vac", daemon=True)

    def __enter__(self) -> VacResponder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(SERVER_READ)
            except TimeoutError:
                continue
            self.requests.append(data)
            try:
                query = json.loads(data)
            except ValueError:
                continue
            if not isinstance(query, dict) or "cookie" not in query:
                continue
            if query.get("space") != SPACE:
                continue
            method, kind = query.get("method"), query.get("message_type")
            if method == "machines" or kind == "machines_query":
                replies = self.machines(query["cookie"])
            elif method == "machinetypes" or kind == "machinetypes_query":
                replies = self.machinetypes(query["cookie"])
            elif method == "factories" or kind == "factory_query":
                replies = [self.factory(query["cookie"])]
            else:
                continue
            for reply in replies:
                self.sock.sendto(json.dumps(reply).encode(), addr)

    def envelope(self, message_type: str, cookie: str) -> dict[str, Any]:
        return {
            "message_type": message_type,
            "vac_version": "Vac 03.01 vacd-factory",
            "daemon_version": "Vac 03.01 vacd-factory",
            "vacquery_version": VACQUERY_VERSION,
            "cookie": cookie,
            "space": SPACE,
            "site": "UKI-TEST-SITE",
            "factory": VAC_NAME,
            "time_sent": int(time.time()),
        }

    def machines(self, cookie: str) -> list[dict[str, Any]]:
        replies = []
        for ordinal in range(4):
            reply = self.envelope("machine_status", cookie)
            reply.update({"num_machines": 4, "machine": f"localhost-{ordinal:02d}"})
            if ordinal < 2:
                reply.update({
                    "state": "Running", "machine_model": "docker",
                    "uuid": f"00000000-0000-4000-8000-00000000000{ordinal}",
                    "created_time": self.now - 600, "started_time": self.now - 590,
                    "heartbeat_time": self.now - 30, "num_cpus": 1, "num_processors": 1,
                    "cpu_seconds": 550, "cpu_percentage": 99.5,
                    "hs06": VAC_HS06_PER_PROCESSOR, "machinetype": "a",
                    "shutdown_message": None, "shutdown_time": None, "fqan": "/atlas/Role=NULL",
                })  # fmt: skip
            else:  # an empty slot, as Vac's VacSlot describes one
                reply.update({
                    "state": "Shut down", "machine_model": None, "uuid": None,
                    "created_time": None, "started_time": None, "heartbeat_time": None,
                    "num_cpus": 0, "num_processors": 0, "cpu_seconds": 0, "cpu_percentage": 0,
                    "hs06": 0.0, "machinetype": None, "shutdown_message": None,
                    "shutdown_time": None,
                })  # fmt: skip
            replies.append(reply)
        return replies

    def machinetypes(self, cookie: str) -> list[dict[str, Any]]:
        replies = []
        for name, running in (("a", 2), ("b", 0)):
            reply = self.envelope("machinetype_status", cookie)
            reply.update({
                "num_machinetypes": 2, "machinetype": name,
                "bytes_per_processor": 2048 * 1024 * 1024,
                "running_hs06": running * VAC_HS06_PER_PROCESSOR, "running_machines": running,
                "running_cpus": running, "running_processors": running,
                "num_before_fizzle": 0,
                "shutdown_message": None, "shutdown_time": None, "shutdown_machine": None,
            })  # fmt: skip
            if name == "a":  # the optional keys, for one type only
                reply.update({"fqan": "/atlas/Role=NULL", "max_wallclock_seconds": 172800,
                              "max_processors": 1})  # fmt: skip
            if name == "b":
                reply.update({"shutdown_message": "300 No more work",
                              "shutdown_time": self.abort_time,
                              "shutdown_machine": "localhost-03"})  # fmt: skip
            replies.append(reply)
        return replies

    def factory(self, cookie: str) -> dict[str, Any]:
        reply = self.envelope("factory_status", cookie)
        reply.update({
            "running_cpus": 2, "running_processors": 2, "running_machines": 2,
            "running_hs06": 2 * VAC_HS06_PER_PROCESSOR,
            "max_cpus": 4, "max_processors": 4, "max_machines": 4,
            "max_hs06": 4 * VAC_HS06_PER_PROCESSOR,
            "total_cpus": 4, "total_machines": 4, "total_hs06": 4 * VAC_HS06_PER_PROCESSOR,
            "root_disk_avail_kb": 10_000_000, "root_disk_avail_inodes": 1_000_000,
            "vac_disk_avail_kb": 50_000_000, "daemon_disk_avail_kb": 50_000_000,
            "vac_disk_avail_inodes": 2_000_000, "daemon_disk_avail_inodes": 2_000_000,
            "load_average": 2.01, "kernel_version": "3.10.0-1160.el7.x86_64",
            "os_issue": "Scientific Linux release 7.9 (Nitrogen)",
            "boot_time": self.now - 86400, "factory_heartbeat_time": self.now - 5,
            "responder_heartbeat_time": self.now - 5, "mjf_heartbeat_time": self.now - 5,
            "metadata_heartbeat_time": self.now - 5, "swap_used_kb": 0,
            "swap_free_kb": 4_000_000, "mem_used_kb": 5_000_000, "mem_total_kb": 16_000_000,
        })  # fmt: skip
        return reply


@pytest.fixture
def vac(tmp_path: Path) -> Iterator[tuple[VacResponder, Path]]:
    """A fake Vac factory ``localhost`` and an lmrunner configuration whose space has it."""
    with VacResponder(free_udp_port()) as responder:
        config = tmp_path / "lmrunner.yaml"
        document = {
            "factory": {
                "space": SPACE,
                "hostname": "127.0.0.3",  # this one: nothing answers there
                "state_dir": str(tmp_path / "state"),
                "total_processors": 1,
                "disk_method": "none",
                "factories": [".", VAC_NAME],
                "udp_timeout_seconds": 2,
                "vacquery_port": responder.port,
            },
            "machinetypes": {
                "a": {**LONG, "target_share": 1},
                "b": {**ABORTING, "target_share": 1},
            },
        }
        config.write_text(yaml.safe_dump(document))
        yield responder, config


def check_lmrunner_requests(responder: VacResponder) -> None:
    """What lmrunner sent is what a Vac responder reads (vac.md §8.1 and 8.2)."""
    assert responder.requests, "lmrunner sent nothing"
    for data in responder.requests:
        assert len(data) <= SERVER_READ, f"a request of {len(data)} bytes: Vac reads 1024"
        request = json.loads(data)
        assert isinstance(request, dict)
        assert request.get("space") == SPACE
        cookie = request.get("cookie")
        assert isinstance(cookie, str) and len(cookie) == 64, cookie  # SHA-256 hex
        int(cookie, 16)
        kind, method = request.get("message_type"), request.get("method")
        assert kind in REPLY_OF or method in METHOD_OF, request
        if kind is not None and method is not None:
            assert METHOD_OF[method] == kind, request
        assert request.get("vacquery_version") == VACQUERY_VERSION, request
        assert isinstance(request.get("vac_version"), str), request


def test_lmrunner_space_watch_counts_a_vac_factory(vac: tuple[VacResponder, Path]) -> None:
    from lmrunner.loader import load_config
    from lmrunner.vacquery.space import SpaceWatch

    responder, config_file = vac
    config = load_config(config_file)
    watch = SpaceWatch(lambda: config, resolve=lambda name: "127.0.0.1")
    view = watch.round()
    assert view.answered == (VAC_NAME,), view
    a, b = view.types["a"], view.types["b"]
    assert a.running_machines == 2
    assert a.running_processors == pytest.approx(2.0)
    assert a.running_hs06 == pytest.approx(2 * VAC_HS06_PER_PROCESSOR)
    assert a.last_abort is None
    assert b.running_machines == 0
    assert b.last_abort == pytest.approx(responder.abort_time)
    assert b.last_abort_factory == VAC_NAME
    check_lmrunner_requests(responder)


def test_lmrunner_client_reads_vac_replies(vac: tuple[VacResponder, Path]) -> None:
    """machinetype_status and factory_status in full, machine_status of the running slots."""
    from lmrunner.vacquery import client

    responder, _ = vac
    got = {}
    for kind in ("machines_query", "machinetypes_query", "factory_query"):
        answers = client.query(kind, [VAC_NAME], SPACE, port=responder.port, timeout=2.0,
                               resolve=lambda name: "127.0.0.1")  # fmt: skip
        got[kind] = answers.replies.get(VAC_NAME, {})
        if kind != "machines_query":  # see the next test for the empty slots
            assert answers.dropped == 0, (kind, answers)
    running = [r for r in got["machines_query"].values() if r["state"] == "Running"]
    assert sorted(r["machine"] for r in running) == ["localhost-00", "localhost-01"]
    assert sum(r["num_processors"] for r in running) == 2
    assert set(got["machinetypes_query"]) == {"a", "b"}
    assert got["machinetypes_query"]["a"]["running_machines"] == 2
    assert got["factory_query"][""]["running_processors"] == 2
    check_lmrunner_requests(responder)


def test_lmrunner_client_keeps_vac_empty_slots(vac: tuple[VacResponder, Path]) -> None:
    """vac.md §8.3: one machine_status per slot, empty ones included (num_machines of them)."""
    from lmrunner.vacquery import client

    responder, _ = vac
    answers = client.query("machines_query", [VAC_NAME], SPACE, port=responder.port,
                           timeout=2.0, resolve=lambda name: "127.0.0.1")  # fmt: skip
    replies = answers.replies.get(VAC_NAME, {})
    assert answers.dropped == 0, answers
    assert sorted(replies) == [f"localhost-{n:02d}" for n in range(4)]
    assert answers.complete(VAC_NAME)


def test_lmrunner_factories_lists_a_vac_factory(vac: tuple[VacResponder, Path]) -> None:
    responder, config_file = vac
    done = subprocess.run(
        [sys.executable, "-m", "lmrunner", "factories", "--json", "--config", str(config_file)],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["schema"] == "lmrunner.factories/1"
    rows = {row["factory"]: row for row in document["factories"]}
    assert set(rows) == {"127.0.0.3", VAC_NAME}
    assert rows["127.0.0.3"]["answered"] is False
    vac_row = rows[VAC_NAME]
    assert vac_row["answered"] is True, document
    assert vac_row["status"]["running_processors"] == 2
    assert vac_row["status"]["running_machines"] == 2
    assert vac_row["status"]["max_processors"] == 4
    assert vac_row["status"]["daemon_version"] == "Vac 03.01 vacd-factory"
    check_lmrunner_requests(responder)


# --- VacMon (vac.md §8.5): what a monitor receives ----------------------------------------


def test_vacmon_gets_status_after_passes_and_each_ended_lm(daemon: Daemon) -> None:
    """``factory_status`` and every ``machinetype_status`` after passes, and the
    ``machine_status`` of each LM that ran and ended (``b``'s, with its 300), cookie "0",
    each with every key Vac sends."""
    deadline = time.monotonic() + 15 * TIMESCALE
    while time.monotonic() < deadline and not any(
        m.get("message_type") == "factory_status" for m in list(daemon.heard)
    ):
        time.sleep(0.2)
    heard = list(daemon.heard)
    kinds = {m.get("message_type") for m in heard}
    assert {"factory_status", "machinetype_status", "machine_status"} <= kinds, kinds
    for message in heard:
        kind = message["message_type"]
        assert check_envelope(message, kind, "0") == [], (kind, message)
    types = {m["machinetype"] for m in heard if m["message_type"] == "machinetype_status"}
    assert types == {"a", "b"}
    ended = [m for m in heard if m["message_type"] == "machine_status"]
    finished_b = {r.uuid for r in daemon.records() if r.machinetype == "b" and not r.active}
    assert {m["uuid"] for m in ended} <= finished_b and ended
    for message in ended:
        assert message["machinetype"] == "b" and message["state"] == "Shut down"
        assert message["shutdown_message"] == "300 No more work"
        assert isinstance(message["shutdown_time"], int)
