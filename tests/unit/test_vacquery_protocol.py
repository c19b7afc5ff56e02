"""lmrunner.vacquery.protocol without sockets: requests and replies checked against VacQuery
01.03 as Vac defines it (``/work/shared/reference/vac.md`` §8.2, §8.3)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from lmrunner import __version__
from lmrunner.vacquery import protocol
from lmrunner.vacquery.protocol import ProtocolError, parse_reply, parse_request

SPACE = "space.example.com"
#: A key left out of a request.
_ABSENT = object()
COOKIE = "0123456789abcdef" * 4


def vac_keys(text: str) -> list[str]:
    """Keys as vac.md lists them: ``a, b, c``."""
    return text.split(", ")


#: The keys of each reply, copied from vac.md §8.3 (not from protocol.KEYS: they are checked
#: against each other).
VAC_KEYS = {
    "machine_status": vac_keys(
        "message_type, vac_version, daemon_version, vacquery_version, cookie, space, factory, "
        "num_machines, time_sent, machine, state, machine_model, uuid, created_time, "
        "started_time, heartbeat_time, num_cpus, num_processors, cpu_seconds, cpu_percentage, "
        "hs06, machinetype, shutdown_message, shutdown_time, site"
    ),
    "machinetype_status": vac_keys(
        "message_type, vac_version, daemon_version, vacquery_version, cookie, space, factory, "
        "num_machinetypes, time_sent, machinetype, bytes_per_processor, running_hs06, "
        "running_machines, running_cpus, running_processors, num_before_fizzle, "
        "shutdown_message, shutdown_time, shutdown_machine, site"
    ),
    "factory_status": vac_keys(
        "message_type, vac_version, daemon_version, vacquery_version, cookie, space, factory, "
        "time_sent, running_cpus, running_processors, running_machines, running_hs06, max_cpus, "
        "max_processors, max_machines, max_hs06, total_cpus, total_machines, total_hs06, "
        "root_disk_avail_kb, root_disk_avail_inodes, vac_disk_avail_kb, daemon_disk_avail_kb, "
        "vac_disk_avail_inodes, daemon_disk_avail_inodes, load_average, kernel_version, "
        "os_issue, boot_time, factory_heartbeat_time, responder_heartbeat_time, "
        "mjf_heartbeat_time, metadata_heartbeat_time, swap_used_kb, swap_free_kb, mem_used_kb, "
        "mem_total_kb, site"
    ),
}
VAC_OPTIONAL = {
    "machine_status": {"fqan"},
    "machinetype_status": {"fqan", "max_wallclock_seconds", "max_processors"},
    "factory_status": set(),
}


def common(kind: str) -> dict[str, Any]:
    """The envelope as a Vac 03.01 factory sends it."""
    return {
        "message_type": kind,
        "vac_version": "Vac 03.01 vacd-factory",
        "daemon_version": "Vac 03.01 vacd-factory",
        "vacquery_version": "VacQuery 01.03",
        "cookie": COOKIE,
        "space": SPACE,
        "factory": "vac01.example.com",
        "time_sent": 1700000000,
        "site": "example.com",
    }


def machine_status(**changes: Any) -> dict[str, Any]:
    """A running LM's reply, with Vac's value types."""
    reply = common("machine_status")
    reply.update(
        num_machines=8,
        machine="vac01-00.example.com",
        state="Running",
        machine_model="docker",
        uuid="0b6ef7c5-2e1f-4a6c-9d55-6a6f2f6f0b01",
        created_time=1699990000,
        started_time=1699990010,
        heartbeat_time=1699999990,
        num_cpus=1,
        num_processors=1,
        cpu_seconds=9000.5,
        cpu_percentage=90.1,
        hs06=10.0,
        machinetype="lhcb",
        shutdown_message=None,
        shutdown_time=None,
        fqan="/lhcb/Role=pilot",
    )
    reply.update(changes)
    return reply


def empty_slot() -> dict[str, Any]:
    """An empty slot's reply: its optional facts are nulls (Vac's None)."""
    return machine_status(
        machine="vac01-07.example.com",
        state="Shut down",
        machine_model=None,
        uuid=None,
        created_time=None,
        started_time=None,
        heartbeat_time=None,
        num_cpus=0,
        num_processors=0,
        cpu_seconds=0,
        cpu_percentage=0,
        hs06=0,
        machinetype=None,
        shutdown_message="300 Nothing to do",
        shutdown_time=1699999000,
    )


def machinetype_status(**changes: Any) -> dict[str, Any]:
    reply = common("machinetype_status")
    reply.update(
        num_machinetypes=2,
        machinetype="lhcb",
        bytes_per_processor=2048 * 1024 * 1024,
        running_hs06=40.0,
        running_machines=4,
        running_cpus=4,
        running_processors=4,
        num_before_fizzle=1,
        shutdown_message="300 Nothing to do",
        shutdown_time=1699999000,
        shutdown_machine="vac01-03.example.com",
        fqan="/lhcb/Role=pilot",
        max_wallclock_seconds=172800,
        max_processors=1,
    )
    reply.update(changes)
    return reply


def factory_status(**changes: Any) -> dict[str, Any]:
    reply = common("factory_status")
    reply.update(
        running_cpus=4,
        running_processors=4,
        running_machines=4,
        running_hs06=40.0,
        max_cpus=8,
        max_processors=8,
        max_machines=8,
        max_hs06=80.0,
        total_cpus=8,
        total_machines=8,
        total_hs06=80.0,
        root_disk_avail_kb=1000000,
        root_disk_avail_inodes=50000,
        vac_disk_avail_kb=9000000,
        daemon_disk_avail_kb=9000000,
        vac_disk_avail_inodes=60000,
        daemon_disk_avail_inodes=60000,
        load_average=3.25,
        kernel_version="3.10.0-1160.el7.x86_64",
        os_issue="CentOS Linux release 7.9.2009 (Core)",
        boot_time=1690000000,
        factory_heartbeat_time=1699999990,
        responder_heartbeat_time=1700000000,
        mjf_heartbeat_time=1699999900,
        metadata_heartbeat_time=1699999900,
        swap_used_kb=0,
        swap_free_kb=4000000,
        mem_used_kb=12000000,
        mem_total_kb=16000000,
    )
    reply.update(changes)
    return reply


SAMPLES = {
    "machine_status": machine_status,
    "machinetype_status": machinetype_status,
    "factory_status": factory_status,
}


def wire(body: Any) -> bytes:
    return json.dumps(body).encode()


def query(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "message_type": "machines_query",
        "vac_version": "Vac 03.01 vac",
        "vacquery_version": "VacQuery 01.03",
        "space": SPACE,
        "cookie": COOKIE,
    }
    body.update(changes)
    return {key: value for key, value in body.items() if value is not _ABSENT}


# --- the key tables against vac.md ----------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(VAC_KEYS))
def test_reply_keys_are_vacs(kind: str) -> None:
    # bytes_per_processor: vac.md lists it, but Vac 01.03 releases exist that do not send it;
    # their replies must still count, so it is read when present.
    lenient = {"bytes_per_processor"}
    assert set(protocol.KEYS[kind]) == set(VAC_KEYS[kind]) - lenient
    assert set(protocol.OPTIONAL) == set().union(*VAC_OPTIONAL.values()) | lenient


def test_every_query_type_has_its_reply_type() -> None:
    assert protocol.REPLY_TYPE == {
        "machines_query": "machine_status",
        "machinetypes_query": "machinetype_status",
        "factory_query": "factory_status",
    }
    assert set(protocol.REPLY_TYPE.values()) == set(protocol.KEYS)


def test_versions_and_limits_are_vacs() -> None:
    assert protocol.VACQUERY_VERSION == "VacQuery 01.03"
    assert (protocol.REQUEST_LIMIT, protocol.REPLY_LIMIT, protocol.DEFAULT_PORT) == (
        1024,
        10240,
        995,
    )


# --- parse_request --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["machines_query", "machinetypes_query", "factory_query"])
def test_parse_request_reads_message_type(kind: str) -> None:
    request = parse_request(wire(query(message_type=kind)))
    assert request == protocol.Request(kind, SPACE, COOKIE, "Vac 03.01 vac")


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("machines", "machines_query"),
        ("machinetypes", "machinetypes_query"),
        ("factories", "factory_query"),
    ],
)
def test_parse_request_reads_vacs_legacy_method(method: str, kind: str) -> None:
    request = parse_request(wire(query(message_type=_ABSENT, method=method)))
    assert request.kind == kind
    assert (request.space, request.cookie) == (SPACE, COOKIE)


def test_parse_request_legacy_method_with_null_message_type() -> None:
    assert parse_request(wire(query(message_type=None, method="factories"))).kind == (
        "factory_query"
    )


def test_message_type_wins_over_method() -> None:
    # Vac 03 clients send both; they agree, but message_type is the current key.
    body = query(message_type="factory_query", method="machines")
    assert parse_request(wire(body)).kind == "factory_query"


def test_parse_request_names_the_client() -> None:
    assert parse_request(wire(query())).client == "Vac 03.01 vac"
    older = query(vac_version=_ABSENT, daemon_version="Vac 01.00 vacd")
    assert parse_request(wire(older)).client == "Vac 01.00 vacd"
    assert parse_request(wire(query(vac_version=_ABSENT))).client == "-"
    assert len(parse_request(wire(query(vac_version="v" * 500))).client) == 80


def test_parse_request_bounds_the_cookie() -> None:
    assert parse_request(wire(query(cookie="c" * 500))).cookie == "c" * 128


def test_parse_request_takes_exactly_request_limit_bytes() -> None:
    body = query()
    body["padding"] = ""
    size = len(wire(body))
    body["padding"] = "x" * (protocol.REQUEST_LIMIT - size)
    data = wire(body)
    assert len(data) == protocol.REQUEST_LIMIT
    assert parse_request(data).kind == "machines_query"
    with pytest.raises(ProtocolError, match="more than 1024 bytes"):
        parse_request(data + b" ")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"machines_query", id="bare-word"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"{'message_type': 'machines_query'}", id="python-repr"),
    ],
)
def test_parse_request_rejects_non_json(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        parse_request(data)


@pytest.mark.parametrize("body", [[], [query()], "machines_query", 995, None, True])
def test_parse_request_rejects_json_non_objects(body: Any) -> None:
    with pytest.raises(ProtocolError, match="not a JSON object"):
        parse_request(wire(body))


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"message_type": "machine_status"}, id="a-reply-type"),
        pytest.param({"message_type": "census_query"}, id="unknown-type"),
        pytest.param({"message_type": "MACHINES_QUERY"}, id="wrong-case"),
        pytest.param({"message_type": _ABSENT}, id="no-type"),
        pytest.param({"message_type": _ABSENT, "method": "census"}, id="unknown-method"),
        pytest.param({"message_type": _ABSENT, "method": 1}, id="method-not-a-string"),
        pytest.param({"message_type": 3}, id="type-a-number"),
        pytest.param({"message_type": "census_query", "method": "machines"}, id="bad-type-wins"),
    ],
)
def test_parse_request_rejects_unknown_types(changes: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="no query type"):
        parse_request(wire(query(**changes)))


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"cookie": _ABSENT}, id="no-cookie"),
        pytest.param({"cookie": ""}, id="empty-cookie"),
        pytest.param({"cookie": None}, id="null-cookie"),
        pytest.param({"cookie": 12345}, id="numeric-cookie"),
        pytest.param({"space": _ABSENT}, id="no-space"),
        pytest.param({"space": None}, id="null-space"),
        pytest.param({"space": ["space.example.com"]}, id="list-space"),
    ],
)
def test_parse_request_needs_a_space_and_a_cookie(changes: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="needs a space and a cookie"):
        parse_request(wire(query(**changes)))


@pytest.mark.parametrize("kind", [[], {}], ids=["list", "object"])
def test_parse_request_rejects_an_unhashable_message_type(kind: Any) -> None:
    with pytest.raises(ProtocolError):
        parse_request(wire(query(message_type=kind)))


def test_parse_request_rejects_deeply_nested_json() -> None:
    with pytest.raises(ProtocolError):
        parse_request(b"[" * protocol.REQUEST_LIMIT)


# --- parse_reply ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_parse_reply_accepts_a_complete_reply(kind: str) -> None:
    reply = SAMPLES[kind]()
    assert set(VAC_KEYS[kind]) <= set(reply)
    assert parse_reply(wire(reply)) == reply


def test_parse_reply_accepts_an_empty_slot_with_nulls() -> None:
    reply = empty_slot()
    assert parse_reply(wire(reply)) == reply


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_parse_reply_accepts_a_reply_without_optional_keys(kind: str) -> None:
    reply = SAMPLES[kind]()
    for key in VAC_OPTIONAL[kind]:
        del reply[key]
    assert parse_reply(wire(reply)) == reply


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_parse_reply_ignores_keys_it_does_not_know(kind: str) -> None:
    reply = SAMPLES[kind](min_processors=1, future_key={"nested": [1, 2]})
    assert parse_reply(wire(reply))["future_key"] == {"nested": [1, 2]}


def test_parse_reply_accepts_floats_where_numbers_are_needed() -> None:
    reply = machine_status(time_sent=1700000000.25, num_cpus=1.0, created_time=1699990000.5)
    assert parse_reply(wire(reply))["time_sent"] == 1700000000.25


@pytest.mark.parametrize(
    ("kind", "key"),
    [(kind, key) for kind in sorted(VAC_KEYS) for key in VAC_KEYS[kind]
     if key != "bytes_per_processor"],  # optional: some Vac releases do not send it
)  # fmt: skip
def test_parse_reply_rejects_a_missing_key(kind: str, key: str) -> None:
    reply = SAMPLES[kind]()
    del reply[key]
    with pytest.raises(ProtocolError):
        parse_reply(wire(reply))


@pytest.mark.parametrize(
    ("kind", "changes"),
    [
        pytest.param("machine_status", {"time_sent": "1700000000"}, id="time_sent-string"),
        pytest.param("machine_status", {"num_machines": "8"}, id="num_machines-string"),
        pytest.param("machine_status", {"num_machines": 8.0}, id="num_machines-float"),
        pytest.param("machine_status", {"hs06": "10"}, id="hs06-string"),
        pytest.param("machine_status", {"machine": None}, id="machine-null"),
        pytest.param("machine_status", {"state": 1}, id="state-number"),
        pytest.param("machine_status", {"uuid": 1234}, id="uuid-number"),
        pytest.param("machine_status", {"cpu_seconds": None}, id="cpu_seconds-null"),
        pytest.param("machine_status", {"site": ["example.com"]}, id="site-list"),
        pytest.param("machinetype_status", {"running_hs06": "40"}, id="running_hs06-string"),
        pytest.param("machinetype_status", {"num_before_fizzle": 1.5}, id="fizzle-float"),
        pytest.param("machinetype_status", {"shutdown_time": "now"}, id="shutdown_time-str"),
        pytest.param("factory_status", {"load_average": "3.25"}, id="load-string"),
        pytest.param("factory_status", {"kernel_version": 3}, id="kernel-number"),
        pytest.param("factory_status", {"max_machines": {}}, id="max_machines-object"),
    ],
)
def test_parse_reply_rejects_a_wrong_json_type(kind: str, changes: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(wire(SAMPLES[kind](**changes)))


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("machine_status", "num_machines"),
        ("machine_status", "time_sent"),
        ("machine_status", "hs06"),
        ("machine_status", "created_time"),  # a number or null: never a boolean
        ("machinetype_status", "running_machines"),
        ("machinetype_status", "bytes_per_processor"),
        ("factory_status", "running_processors"),
        ("factory_status", "mem_total_kb"),
    ],
)
@pytest.mark.parametrize("value", [True, False])
def test_parse_reply_rejects_a_boolean_where_a_number_is_needed(
    kind: str, key: str, value: bool
) -> None:
    assert isinstance(value, int)  # what the check must see through
    with pytest.raises(ProtocolError, match=f"{key} is bool"):
        parse_reply(wire(SAMPLES[kind](**{key: value})))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fqan", 5),
        ("fqan", None),
        ("max_wallclock_seconds", "172800"),
        ("max_wallclock_seconds", True),
        ("max_processors", [1]),
        ("max_processors", None),
    ],
)
def test_parse_reply_rejects_a_bad_optional_key(key: str, value: Any) -> None:
    with pytest.raises(ProtocolError, match=f"{key} is"):
        parse_reply(wire(machinetype_status(**{key: value})))


@pytest.mark.parametrize(
    "message_type", ["machines_query", "census_status", None, 3, ["machine_status"]]
)
def test_parse_reply_rejects_what_is_no_reply(message_type: Any) -> None:
    with pytest.raises(ProtocolError, match="not a reply"):
        parse_reply(wire(machine_status(message_type=message_type)))


@pytest.mark.parametrize("data", [b"", b"not json", b"[1, 2]", b'"machine_status"', b"\xff"])
def test_parse_reply_rejects_non_objects(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(data)


def test_parse_reply_rejects_deeply_nested_json() -> None:
    with pytest.raises(ProtocolError):
        parse_reply(b"[" * protocol.REPLY_LIMIT)


# --- cookies and requests -------------------------------------------------------------------


def test_cookie_is_vacs_sha256_of_salt_and_factory_name() -> None:
    salt = base64.b64encode(bytes(range(32)))
    expected = hashlib.sha256(salt + b"vac01.example.com").hexdigest()
    assert protocol.cookie(salt, "vac01.example.com") == expected
    assert len(expected) == 64
    assert protocol.cookie(salt, "vac02.example.com") != expected
    assert protocol.cookie(base64.b64encode(bytes(32)), "vac01.example.com") != expected


def test_new_salt_is_32_random_bytes_in_base64() -> None:
    salt = protocol.new_salt()
    assert len(base64.b64decode(salt, validate=True)) == 32
    assert salt != protocol.new_salt()


@pytest.mark.parametrize(
    ("kind", "method"),
    [
        ("machines_query", "machines"),
        ("machinetypes_query", "machinetypes"),
        ("factory_query", "factories"),
    ],
)
def test_request_is_what_vac_sends(kind: str, method: str) -> None:
    data = protocol.request(kind, SPACE, COOKIE, client="census")
    body = json.loads(data)
    assert body == {
        "message_type": kind,
        "method": method,  # for Vac 01/02 responders
        "vac_version": f"lmrunner {__version__} census",
        "vacquery_version": "VacQuery 01.03",
        "space": SPACE,
        "cookie": COOKIE,
    }
    assert len(data) <= protocol.REQUEST_LIMIT
    assert parse_request(data) == protocol.Request(
        kind, SPACE, COOKIE, f"lmrunner {__version__} census"
    )


def test_request_method_alone_is_understood() -> None:
    """What a Vac 01/02 responder reads (``method`` only) names the same query."""
    for kind in protocol.REPLY_TYPE:
        body = json.loads(protocol.request(kind, SPACE, COOKIE))
        del body["message_type"]
        assert parse_request(wire(body)).kind == kind


def test_daemon_version_is_software_version_client() -> None:
    assert protocol.daemon_version() == f"lmrunner {__version__} -"
    assert protocol.daemon_version("vacd-factory").split(" ") == [
        "lmrunner",
        __version__,
        "vacd-factory",
    ]


# --- envelope, site, encode -----------------------------------------------------------------


def test_envelope_has_every_common_key() -> None:
    envelope = protocol.envelope(
        "factory_status", SPACE, "vac01.example.com", COOKIE, 1700000000.9, "example.com"
    )
    assert set(envelope) == set(protocol.COMMON)
    assert envelope["time_sent"] == 1700000000
    assert envelope["vacquery_version"] == "VacQuery 01.03"
    assert envelope["vac_version"] == envelope["daemon_version"] == protocol.daemon_version()
    assert (envelope["cookie"], envelope["space"], envelope["factory"]) == (
        COOKIE,
        SPACE,
        "vac01.example.com",
    )


@pytest.mark.parametrize(
    ("space", "gocdb", "site"),
    [
        ("space.example.com", None, "example.com"),
        ("vac.gridpp.rl.ac.uk", None, "gridpp.rl.ac.uk"),
        ("space.example.com", "UKI-SOUTHGRID-OX-HEP", "UKI-SOUTHGRID-OX-HEP"),
        ("space.example.com", "", "example.com"),  # an empty GOCDB name is none
        ("localspace", None, "localspace"),  # no dot: the space itself
        ("localspace", "SITE", "SITE"),
    ],
)
def test_site_of(space: str, gocdb: str | None, site: str) -> None:
    assert protocol.site_of(space, gocdb) == site


def test_encode_is_compact_json_that_parses_back() -> None:
    reply = machinetype_status()
    data = protocol.encode(reply)
    assert b": " not in data
    assert b", " not in data
    assert json.loads(data) == reply
    assert parse_reply(data) == reply
