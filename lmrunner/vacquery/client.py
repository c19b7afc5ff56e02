"""Asking the space: one query round to every factory, retransmitted per factory and bounded by
an overall deadline (Vac's client had none: a chatty factory could keep it going for ever).

Each round re-sends only to factories that have not yet given as many replies as they announced
(``num_machines``/``num_machinetypes``; one for ``factory_query``), then gathers until the socket
has been silent for ``timeout / tries`` or the deadline passes. Replies are keyed by factory and
machine or machinetype, so duplicates are harmless; a reply is used only when it is valid
(:func:`lmrunner.vacquery.protocol.parse_reply`), from the space asked, and carries the cookie
made for the factory it names, one of those asked.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lmrunner.vacquery import protocol
from lmrunner.vacquery.auth import SpaceAuth, is_signed

#: Vac's ``vacqueryTries``: rounds after the first.
TRIES = 5
#: The item key of each reply type (one reply per item and factory).
ITEM = {"machine_status": "machine", "machinetype_status": "machinetype", "factory_status": ""}
COUNT = {"machine_status": "num_machines", "machinetype_status": "num_machinetypes"}
#: The most replies kept from one factory in one round (slots or machinetypes).
MAX_ITEMS = 4096


@dataclass
class Answers:
    """What each factory answered in one round."""

    kind: str
    replies: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    sent: int = 0  # datagrams
    sent_bytes: int = 0
    received: int = 0
    received_bytes: int = 0
    dropped: int = 0  # invalid, foreign, unsigned or unasked-for datagrams
    #: Whether requests were signed (a space secret), and the factories whose replies came
    #: unsigned all the same (Vac's; kept only when asked).
    signed: bool = False
    unsigned: set[str] = field(default_factory=set)

    def verified(self, factory: str) -> bool:
        """Whether this factory's replies were signed with the space's secret."""
        return self.signed and factory not in self.unsigned

    def complete(self, factory: str) -> bool:
        return len(self.replies.get(factory, {})) >= self.expected.get(factory, 1)

    def answered(self) -> list[str]:
        return sorted(name for name, got in self.replies.items() if got)

    def items(self) -> list[dict[str, Any]]:
        """Every reply, factory by factory."""
        return [reply for name in sorted(self.replies) for reply in self.replies[name].values()]


def query(
    kind: str,
    factories: Iterable[str],
    space: str,
    *,
    port: int = protocol.DEFAULT_PORT,
    timeout: float = 10.0,
    deadline: float | None = None,
    tries: int = TRIES,
    client: str = "-",
    resolve: Callable[[str], str] | None = None,
    auth: SpaceAuth | None = None,
    unsigned: bool = False,
) -> Answers:
    """Ask ``factories`` (names as they call themselves: replies name their sender) and gather
    their replies of the type ``kind`` asks for; never longer than ``deadline`` seconds
    (default: ``timeout``). ``resolve`` maps a factory's name to the address to send to (tests,
    spaces without DNS); by default the name itself. With ``auth`` (a space secret), requests
    are signed and only signed replies are kept, unless ``unsigned`` (inspection, never
    planning) also keeps plain ones, from Vac factories, listed in ``Answers.unsigned``."""
    names = sorted(set(factories))
    reply_type = protocol.REPLY_TYPE[kind]
    answers = Answers(reply_type, {name: {} for name in names}, signed=auth is not None)
    salt = protocol.new_salt()
    cookies = {name: protocol.cookie(salt, name) for name in names}
    budget = timeout if deadline is None else deadline
    started = time.monotonic()
    end = started + budget
    quiet = max(timeout / max(tries, 1), 0.05)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        for _ in range(tries + 1):
            # In planning, a Vac factory's plain reply is not used, but it did answer.
            ignored = set() if unsigned else answers.unsigned
            missing = [n for n in names if not answers.complete(n) and n not in ignored]
            if not missing or time.monotonic() >= end:
                break
            for name in missing:
                sign = None if auth is None else functools.partial(auth.sign, to=name)
                datagram = protocol.request(kind, space, cookies[name], client, sign)
                try:
                    address = resolve(name) if resolve else name
                    sock.sendto(datagram, (address, port))
                except (OSError, UnicodeError):
                    continue  # unresolvable or unreachable now: the next round tries again
                answers.sent += 1
                answers.sent_bytes += len(datagram)
            _gather(sock, answers, cookies, space, quiet, end, auth, unsigned)
    answers.seconds = time.monotonic() - started
    return answers


def _gather(
    sock: socket.socket,
    answers: Answers,
    cookies: dict[str, str],
    space: str,
    quiet: float,
    end: float,
    auth: SpaceAuth | None = None,
    unsigned: bool = False,
) -> None:
    """Read replies until every factory gave all it announced, none came for ``quiet``
    seconds, or ``end``."""
    # The factories still owing replies, kept as replies come (checking every factory after
    # each datagram made a round quadratic: 3 million checks at 500 factories).
    ignored = set() if unsigned else answers.unsigned
    owing = {n for n in cookies if not answers.complete(n) and n not in ignored}
    while owing:
        left = end - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(min(quiet, left))
        try:
            data = sock.recv(protocol.REPLY_LIMIT)
        except TimeoutError:
            return
        except OSError:
            return
        answers.received += 1
        answers.received_bytes += len(data)
        try:
            reply = protocol.parse_reply(data)
        except protocol.ProtocolError:
            answers.dropped += 1
            continue
        factory = reply["factory"]
        if (
            reply["message_type"] != answers.kind
            or reply["space"] != space
            or cookies.get(factory) != reply["cookie"]
        ):
            answers.dropped += 1
            continue
        if auth is not None and not auth.verify(reply):
            if is_signed(reply):  # forged, replayed or from another secret
                answers.dropped += 1
                continue
            answers.unsigned.add(factory)  # a Vac factory answering plainly
            if not unsigned:  # planning: never used, but it answered: no more asking
                answers.dropped += 1
                owing.discard(factory)
                continue
        item = ITEM[answers.kind]
        key = str(reply[item]) if item else ""
        got = answers.replies[factory]
        if key not in got and len(got) >= MAX_ITEMS:
            answers.dropped += 1  # a factory claiming more than any has: not stored
            continue
        got[key] = reply
        count = COUNT.get(answers.kind)
        if count is not None:
            answers.expected[factory] = max(int(reply[count]), 0)
        if answers.complete(factory):
            owing.discard(factory)
        else:  # a later reply may announce more than an earlier one
            owing.add(factory)
