"""VacQuery 01.03 messages (vac.md §8): JSON objects, one per UDP datagram.

Requests carry ``message_type`` (``machines_query``, ``machinetypes_query``, ``factory_query``;
Vac's older ``method`` is read too), ``space`` and a ``cookie`` the reply echoes. A reply is
accepted only from the space asked, with the cookie made for the factory it names, and with every
key its type needs, of the right JSON type: a datagram that fails any check is dropped, never
half-used. Building replies is pure (the facts in, the JSON out), so a Vac factory and an
lmrunner factory read each other's the same way.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lmrunner import __version__

VERSION = "01.03"
VACQUERY_VERSION = f"VacQuery {VERSION}"
#: Vac's responder reads at most this much of a request; so does lmrunner's.
REQUEST_LIMIT = 1024
#: What a client reads of one reply datagram (Vac's figure).
REPLY_LIMIT = 10240
DEFAULT_PORT = 995

MACHINES_QUERY = "machines_query"
MACHINETYPES_QUERY = "machinetypes_query"
FACTORY_QUERY = "factory_query"
#: Vac's deprecated ``method`` values, still sent by Vac 03 clients beside ``message_type``.
METHODS = {"machines": MACHINES_QUERY, "machinetypes": MACHINETYPES_QUERY,
           "factories": FACTORY_QUERY}  # fmt: skip
REPLY_TYPE = {
    MACHINES_QUERY: "machine_status",
    MACHINETYPES_QUERY: "machinetype_status",
    FACTORY_QUERY: "factory_status",
}

#: Signs a message in place and returns it (see :mod:`lmrunner.vacquery.auth`).
Signer = Callable[[dict[str, Any]], dict[str, Any]]

_NUMBER = (int, float)
_OPT_NUMBER = (int, float, type(None))
_OPT_STR = (str, type(None))
#: The keys of each reply and their JSON types (vac.md §8.3); a reply lacking one is dropped.
COMMON: dict[str, tuple[type, ...]] = {
    "message_type": (str,),
    "vac_version": (str,),
    "daemon_version": (str,),
    "vacquery_version": (str,),
    "cookie": (str,),
    "space": (str,),
    "factory": (str,),
    "time_sent": _NUMBER,
    "site": (str,),
}
KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "machine_status": {
        **COMMON,
        "num_machines": (int,),
        "machine": (str,),
        "state": (str,),
        "machine_model": _OPT_STR,  # Vac's empty slot: null
        "uuid": _OPT_STR,
        "created_time": _OPT_NUMBER,
        "started_time": _OPT_NUMBER,
        "heartbeat_time": _OPT_NUMBER,
        "num_cpus": _NUMBER,
        "num_processors": _NUMBER,
        "cpu_seconds": _NUMBER,
        "cpu_percentage": _NUMBER,
        "hs06": _NUMBER,
        "machinetype": _OPT_STR,
        "shutdown_message": _OPT_STR,
        "shutdown_time": _OPT_NUMBER,
    },
    "machinetype_status": {
        **COMMON,
        "num_machinetypes": (int,),
        "machinetype": (str,),
        "running_hs06": _NUMBER,
        "running_machines": (int,),
        "running_cpus": _NUMBER,
        "running_processors": _NUMBER,
        "num_before_fizzle": (int,),
        "shutdown_message": _OPT_STR,
        "shutdown_time": _OPT_NUMBER,
        "shutdown_machine": _OPT_STR,
    },
    "factory_status": {
        **COMMON,
        "running_cpus": _NUMBER,
        "running_processors": _NUMBER,
        "running_machines": (int,),
        "running_hs06": _NUMBER,
        "max_cpus": _NUMBER,
        "max_processors": _NUMBER,
        "max_machines": _NUMBER,
        "max_hs06": _NUMBER,
        "total_cpus": _NUMBER,
        "total_machines": _NUMBER,
        "total_hs06": _NUMBER,
        "root_disk_avail_kb": _NUMBER,
        "root_disk_avail_inodes": _NUMBER,
        "vac_disk_avail_kb": _NUMBER,
        "daemon_disk_avail_kb": _NUMBER,
        "vac_disk_avail_inodes": _NUMBER,
        "daemon_disk_avail_inodes": _NUMBER,
        "load_average": _NUMBER,
        "kernel_version": (str,),
        "os_issue": (str,),
        "boot_time": _NUMBER,
        "factory_heartbeat_time": _NUMBER,
        "responder_heartbeat_time": _NUMBER,
        "mjf_heartbeat_time": _NUMBER,
        "metadata_heartbeat_time": _NUMBER,
        "swap_used_kb": _NUMBER,
        "swap_free_kb": _NUMBER,
        "mem_used_kb": _NUMBER,
        "mem_total_kb": _NUMBER,
    },
}
#: Keys a reply may carry besides (Vac sends them when known).
OPTIONAL: dict[str, tuple[type, ...]] = {
    "fqan": (str,),
    "max_wallclock_seconds": _NUMBER,
    "max_processors": _NUMBER,
    # vac.md lists it, but some Vac 01.03 releases do not send it: their replies still count.
    "bytes_per_processor": _OPT_NUMBER,
}


class ProtocolError(ValueError):
    """A datagram that is not a valid VacQuery message (it is dropped)."""


def daemon_version(client: str = "-") -> str:
    """What lmrunner says it is, in Vac's ``<software> <version> <client>`` form."""
    return f"lmrunner {__version__} {client}"


def new_salt() -> bytes:
    """A client's secret for one round: cookies are made from it and each factory's name."""
    return base64.b64encode(os.urandom(32))


def cookie(salt: bytes, factory: str) -> str:
    """Vac's cookie: SHA-256 of the salt and the factory's name (a reply must echo it)."""
    return hashlib.sha256(salt + factory.encode()).hexdigest()


def request(
    kind: str, space: str, cookie_value: str, client: str = "-", sign: Signer | None = None
) -> bytes:
    """A query datagram, as Vac 03.01 sends it (``method`` too, for Vac 01/02 responders);
    signed by ``sign`` in a space with a secret."""
    body: dict[str, Any] = {
        "message_type": kind,
        "vac_version": daemon_version(client),
        "vacquery_version": VACQUERY_VERSION,
        "space": space,
        "cookie": cookie_value,
    }
    method = {v: k for k, v in METHODS.items()}.get(kind)
    if method is not None:
        body["method"] = method
    if sign is not None:
        body = sign(body)
    return json.dumps(body).encode()


@dataclass(frozen=True, slots=True)
class Request:
    kind: str  # one of MACHINES_QUERY, MACHINETYPES_QUERY, FACTORY_QUERY
    space: str
    cookie: str
    client: str  # the sender's vac_version, for logs
    #: As sent (a signature covers the whole); not part of what a request is.
    body: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


def parse_request(data: bytes) -> Request:
    """A request datagram, checked; :class:`ProtocolError` when it is none."""
    if len(data) > REQUEST_LIMIT:
        raise ProtocolError(f"more than {REQUEST_LIMIT} bytes")
    body = _object(data)
    kind = body.get("message_type")
    if kind is None and isinstance(body.get("method"), str):
        kind = METHODS.get(body["method"])
    if not isinstance(kind, str) or kind not in REPLY_TYPE:
        raise ProtocolError(f"no query type: {str(body.get('message_type'))[:40]!r}")
    space, value = body.get("space"), body.get("cookie")
    if not isinstance(space, str) or not isinstance(value, str) or not value:
        raise ProtocolError("a query needs a space and a cookie")
    client = body.get("vac_version") or body.get("daemon_version") or "-"
    return Request(str(kind), space, value[:128], str(client)[:80], body)


def parse_reply(data: bytes) -> dict[str, Any]:
    """A reply datagram with every key its ``message_type`` needs, of the right JSON type."""
    body = _object(data)
    kind = body.get("message_type")
    keys = KEYS.get(kind) if isinstance(kind, str) else None
    if keys is None:
        raise ProtocolError(f"not a reply: {str(kind)[:40]!r}")
    for key, types in keys.items():
        if key not in body:
            raise ProtocolError(f"{kind}: no {key}")
        if not _is(body[key], types):
            raise ProtocolError(f"{kind}: {key} is {type(body[key]).__name__}")
    for key, types in OPTIONAL.items():
        if key in body and not _is(body[key], types):
            raise ProtocolError(f"{kind}: {key} is {type(body[key]).__name__}")
    return body


def _is(value: object, types: tuple[type, ...]) -> bool:
    # JSON true/false are bools, which Python counts as ints: never a number here.
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _object(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # nesting: a hostile sender
        raise ProtocolError(f"not JSON: {err}") from err
    if not isinstance(body, dict):
        raise ProtocolError("not a JSON object")
    return body


def envelope(
    kind: str, space: str, factory: str, cookie_value: str, now: float, site: str,
    client: str = "-",
) -> dict[str, Any]:  # fmt: skip
    """The keys every reply starts with."""
    return {
        "message_type": kind,
        "vac_version": daemon_version(client),
        "daemon_version": daemon_version(client),
        "vacquery_version": VACQUERY_VERSION,
        "cookie": cookie_value,
        "space": space,
        "factory": factory,
        "time_sent": int(now),
        "site": site,
    }


def site_of(space: str, gocdb_sitename: str | None) -> str:
    """Vac's ``site``: the GOCDB name, else the space without its first label."""
    if gocdb_sitename:
        return gocdb_sitename
    return space.split(".", 1)[1] if "." in space else space


def encode(reply: Mapping[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode()
